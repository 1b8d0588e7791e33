// gRPC baseline: a stock unary service as gRPC's async examples write it
// (greeter_async_server / greeter_async_client2): insecure credentials,
// default channel and server arguments, protobuf messages, one completion
// queue drained by one thread on each side.
//
// The completion-queue API is used because on this class of machine (2
// cores, client and server sharing them) it is the fastest way to drive gRPC
// unary calls: the callback API measured at roughly half the calls/s, and so
// did a server mixing one async method with callback ones (the callback
// machinery brings its own threads that compete for the two cores). The
// baseline should be gRPC at its best as a user would configure it, not a
// strawman, so every method, streams included, is on the one queue.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bench/baselines.h"
#include "bench/harness.h"

#if FERRY_BENCH_HAVE_GRPC

#include <grpcpp/grpcpp.h>

#include <memory>

#include "bench/proto/bench_echo.grpc.pb.h"

namespace ferry::bench {
namespace {

constexpr std::size_t default_chunk_bytes = 256 * 1024;

// Every call the server holds is a tag on its one completion queue; each
// completion advances that call's state machine.
class ServerCall {
 public:
  virtual ~ServerCall() = default;
  virtual void proceed(bool ok) = 0;
};

class ServerEchoCall final : public ServerCall {
 public:
  ServerEchoCall(EchoService::AsyncService& service, grpc::ServerCompletionQueue& cq)
      : service_(service), cq_(cq), responder_(&context_) {
    service_.RequestEcho(&context_, &request_, &responder_, &cq_, &cq_, this);
  }

  void proceed(bool ok) override {
    if (answered_ || !ok) {
      delete this;
      return;
    }
    // Keep a call requested at all times, as the async example does.
    new ServerEchoCall(service_, cq_);
    response_.set_payload(request_.payload());
    answered_ = true;
    responder_.Finish(response_, grpc::Status::OK, this);
  }

 private:
  EchoService::AsyncService& service_;
  grpc::ServerCompletionQueue& cq_;
  grpc::ServerContext context_;
  EchoMessage request_;
  EchoMessage response_;
  grpc::ServerAsyncResponseWriter<EchoMessage> responder_;
  bool answered_ = false;
};

class ServerUploadCall final : public ServerCall {
 public:
  ServerUploadCall(EchoService::AsyncService& service, grpc::ServerCompletionQueue& cq)
      : service_(service), cq_(cq), reader_(&context_) {
    service_.RequestUpload(&context_, &reader_, &cq_, &cq_, this);
  }

  void proceed(bool ok) override {
    switch (state_) {
      case State::requested:
        if (!ok) break;
        new ServerUploadCall(service_, cq_);
        state_ = State::reading;
        reader_.Read(&chunk_, this);
        return;
      case State::reading:
        if (ok) {
          summary_.set_bytes(summary_.bytes() + chunk_.data().size());
          summary_.set_chunks(summary_.chunks() + 1);
          reader_.Read(&chunk_, this);
          return;
        }
        // The client half-closed: the upload is complete.
        state_ = State::finishing;
        reader_.Finish(summary_, grpc::Status::OK, this);
        return;
      case State::finishing:
        break;
    }
    delete this;
  }

 private:
  enum class State { requested, reading, finishing };
  EchoService::AsyncService& service_;
  grpc::ServerCompletionQueue& cq_;
  grpc::ServerContext context_;
  grpc::ServerAsyncReader<UploadSummary, Chunk> reader_;
  Chunk chunk_;
  UploadSummary summary_;
  State state_ = State::requested;
};

class ServerDownloadCall final : public ServerCall {
 public:
  ServerDownloadCall(EchoService::AsyncService& service, grpc::ServerCompletionQueue& cq)
      : service_(service), cq_(cq), writer_(&context_) {
    service_.RequestDownload(&context_, &request_, &writer_, &cq_, &cq_, this);
  }

  void proceed(bool ok) override {
    switch (state_) {
      case State::requested:
        if (!ok) break;
        new ServerDownloadCall(service_, cq_);
        left_ = request_.total_bytes();
        chunk_.mutable_data()->assign(
            request_.chunk_size() ? request_.chunk_size() : default_chunk_bytes, '\x5a');
        state_ = State::writing;
        next();
        return;
      case State::writing:
        if (ok) {
          next();
        } else {
          state_ = State::finishing;
          writer_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"), this);
        }
        return;
      case State::finishing:
        break;
    }
    delete this;
  }

 private:
  enum class State { requested, writing, finishing };

  void next() {
    if (left_ == 0) {
      state_ = State::finishing;
      writer_.Finish(grpc::Status::OK, this);
      return;
    }
    if (left_ < chunk_.data().size()) chunk_.mutable_data()->resize(left_);
    left_ -= chunk_.data().size();
    writer_.Write(chunk_, this);
  }

  EchoService::AsyncService& service_;
  grpc::ServerCompletionQueue& cq_;
  grpc::ServerContext context_;
  DownloadRequest request_;
  grpc::ServerAsyncWriter<Chunk> writer_;
  Chunk chunk_;
  uint64_t left_ = 0;
  State state_ = State::requested;
};

// gRPC spells tcp addresses as HOST:PORT; ferry's "tcp:" prefix is dropped.
std::string grpc_listen_address(const std::string& listen) {
  if (listen.starts_with("tcp:")) return listen.substr(4);
  return listen;
}

struct ClientEchoCall {
  grpc::ClientContext context;
  EchoMessage response;
  grpc::Status status;
  std::unique_ptr<grpc::ClientAsyncResponseReader<EchoMessage>> reader;
};

}  // namespace

int serve_grpc(const std::string& listen) {
  EchoService::AsyncService service;
  grpc::ServerBuilder builder;
  int port = 0;
  std::string address = grpc_listen_address(listen);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::ServerCompletionQueue> cq = builder.AddCompletionQueue();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) throw std::runtime_error("gRPC server cannot listen on " + address);
  if (!address.starts_with("unix:")) {
    address = address.substr(0, address.rfind(':') + 1) + std::to_string(port);
  }
  // Enough requested calls that a burst of new ones never waits for the
  // loop below to re-arm.
  for (int i = 0; i < 256; ++i) new ServerEchoCall(service, *cq);
  new ServerUploadCall(service, *cq);
  new ServerDownloadCall(service, *cq);
  signal_ready(address);
  void* tag = nullptr;
  bool ok = false;
  while (cq->Next(&tag, &ok)) static_cast<ServerCall*>(tag)->proceed(ok);
  return 0;
}

Measurement grpc_echo_inflight(const CaseOptions& options, int inflight) {
  ScratchDir dir;
  std::string listen = options.addr.empty() ? dir.unix_address("grpc.sock") : options.addr;
  ChildProcess server =
      spawn_server({self_exe(), "serve-grpc", "--listen", listen}, options.server_netns);

  auto channel = grpc::CreateChannel(server.ready_info(), grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
    throw std::runtime_error("gRPC channel did not connect to " + server.ready_info());
  }
  auto stub = EchoService::NewStub(channel);
  EchoMessage request;
  request.set_payload(std::string(echo_payload_bytes, '\x5a'));

  grpc::CompletionQueue cq;
  auto issue = [&] {
    auto* call = new ClientEchoCall;
    call->reader = stub->AsyncEcho(&call->context, request, &cq);
    call->reader->Finish(&call->response, &call->status, call);
  };

  auto start = Clock::now();
  auto measure_from = start + warmup_window();
  auto measure_until = measure_from + measure_window(options.quick);
  Clock::time_point window_start;
  uint64_t completed = 0;
  uint64_t completed_before = 0;
  bool measuring = false;
  bool stopping = false;
  std::string error;
  int outstanding = 0;
  for (; outstanding < inflight; ++outstanding) issue();

  void* tag = nullptr;
  bool ok = false;
  while (outstanding > 0 && cq.Next(&tag, &ok)) {
    std::unique_ptr<ClientEchoCall> call(static_cast<ClientEchoCall*>(tag));
    if (!ok || !call->status.ok() || call->response.payload().size() != echo_payload_bytes) {
      if (error.empty()) {
        error = call->status.ok() ? "gRPC echo returned a wrong payload"
                                  : "gRPC echo failed: " + call->status.error_message();
      }
      stopping = true;
    } else {
      ++completed;
    }
    // Reading the clock every call would cost a visible share of each call.
    if (!stopping && completed % 64 == 0) {
      auto now = Clock::now();
      if (!measuring && now >= measure_from) {
        measuring = true;
        window_start = now;
        completed_before = completed;
      } else if (measuring && now >= measure_until) {
        stopping = true;
        measure_until = now;
      }
    }
    if (stopping) {
      --outstanding;
    } else {
      issue();
    }
  }
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) delete static_cast<ClientEchoCall*>(tag);
  if (!error.empty()) throw std::runtime_error(error);
  if (!measuring) throw std::runtime_error("gRPC echo never reached the measuring window");

  double elapsed = std::chrono::duration<double>(measure_until - window_start).count();
  double rate = static_cast<double>(completed - completed_before) / elapsed;
  stub.reset();
  channel.reset();
  server.stop();
  return {rate, "calls/s",
          "gRPC " + std::string(GRPC_CPP_VERSION_STRING) + " async unary (one completion queue " +
              "thread per side), " + std::to_string(inflight) + " in flight on one channel, " +
              std::to_string(echo_payload_bytes) + " B payload, " +
              (listen.starts_with("unix:") ? "unix socket" : "tcp") + ", default args"};
}

}  // namespace ferry::bench

#else  // !FERRY_BENCH_HAVE_GRPC

namespace ferry::bench {

int serve_grpc(const std::string&) { throw Unavailable("gRPC baseline not built"); }

Measurement grpc_echo_inflight(const CaseOptions&, int) {
  throw Unavailable("gRPC baseline not built");
}

}  // namespace ferry::bench

#endif
