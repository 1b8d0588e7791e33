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

#include <algorithm>
#include <atomic>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "bench/proto/bench_echo.grpc.pb.h"
#include "tests/material/tls_material.h"

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

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

struct ClientEchoCall {
  grpc::ClientContext context;
  EchoMessage response;
  grpc::Status status;
  std::unique_ptr<grpc::ClientAsyncResponseReader<EchoMessage>> reader;
};

}  // namespace

int serve_grpc(const std::string& listen, const std::string& cert, const std::string& key) {
  EchoService::AsyncService service;
  grpc::ServerBuilder builder;
  int port = 0;
  std::string address = grpc_listen_address(listen);
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!cert.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({read_text_file(key), read_text_file(cert)});
    credentials = grpc::SslServerCredentials(ssl);
  }
  builder.AddListeningPort(address, credentials, &port);
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

Measurement grpc_echo_inflight(const CaseOptions& options, int inflight, bool tcp) {
  ScratchDir dir;
  std::string listen = options.addr.empty() ? (tcp ? "tcp:127.0.0.1:0" : dir.unix_address("grpc.sock")) : options.addr;
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

namespace {

// A gRPC peer (bench/proto EchoService) in a child process and one channel
// to it, over TCP on loopback (or --addr), a unix socket, or TLS with
// gRPC's own SSL credentials: a certificate for localhost from a CA made
// for the run.
struct GrpcPeer {
  ScratchDir dir;
  std::optional<testing::TlsMaterial> tls;
  ChildProcess server;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<EchoService::Stub> stub;

  GrpcPeer(const CaseOptions& options, bool tcp, bool use_tls, bool raised_malloc_thresholds = false) {
    if (raised_malloc_thresholds) raise_malloc_thresholds();
    std::string listen = options.addr.empty() ? (tcp || use_tls ? "tcp:127.0.0.1:0" : dir.unix_address("grpc.sock"))
                                              : options.addr;
    std::vector<std::string> argv = {self_exe(), "serve-grpc", "--listen", listen};
    if (raised_malloc_thresholds) argv.push_back("--raise-malloc-thresholds");
    std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
    if (use_tls) {
      tls = testing::make_tls_material(dir.path().string());
      argv.insert(argv.end(), {"--cert", tls->server.cert, "--key", tls->server.key});
      grpc::SslCredentialsOptions ssl;
      ssl.pem_root_certs = read_text_file(tls->ca.cert);
      credentials = grpc::SslCredentials(ssl);
    }
    server = spawn_server(argv, options.server_netns);
    std::string target = server.ready_info();
    // The certificate names localhost (and 127.0.0.1).
    if (use_tls && target.starts_with("127.0.0.1:")) target = "localhost:" + target.substr(10);
    channel = grpc::CreateChannel(target, credentials);
    if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)))
      throw std::runtime_error("gRPC channel did not connect to " + target);
    stub = EchoService::NewStub(channel);
  }
  ~GrpcPeer() {
    stub.reset();
    channel.reset();
    server.stop();
  }
  std::string wire() const { return tls ? "TLS (gRPC SSL credentials)" : "the same socket kind as ferry's side"; }
};

std::string grpc_version() { return "gRPC " + std::string(GRPC_CPP_VERSION_STRING); }

}  // namespace

std::string malloc_note(bool raised) {
  return raised ? ", glibc mmap/trim thresholds raised to 32/256 MiB in both processes" : "";
}

Measurement grpc_upload(const CaseOptions& options, bool tls, std::uint64_t total, bool raised_malloc_thresholds) {
  GrpcPeer peer(options, true, tls, raised_malloc_thresholds);
  Chunk chunk;
  chunk.mutable_data()->assign(default_chunk_bytes, '\x5a');
  grpc::ClientContext context;
  UploadSummary summary;
  const auto start = Clock::now();
  auto writer = peer.stub->Upload(&context, &summary);
  for (std::uint64_t sent = 0; sent < total; sent += default_chunk_bytes)
    if (!writer->Write(chunk)) break;
  writer->WritesDone();
  const grpc::Status status = writer->Finish();
  const double secs = seconds_since(start);
  if (!status.ok()) throw std::runtime_error("gRPC upload failed: " + status.error_message());
  if (summary.bytes() < total)
    throw std::runtime_error("gRPC server counted " + std::to_string(summary.bytes()) + " of " + std::to_string(total));
  return {static_cast<double>(summary.bytes()) / secs / 1e6, "MB/s",
          grpc_version() + " client-streaming Upload, 256 KiB bytes messages, sync API, default channel and server " +
              "args, over tcp" + (tls ? " with TLS (gRPC SSL credentials)" : "") + ", server counts and drops" +
              malloc_note(raised_malloc_thresholds)};
}

Measurement grpc_download(const CaseOptions& options, bool tls, std::uint64_t total, bool raised_malloc_thresholds) {
  GrpcPeer peer(options, true, tls, raised_malloc_thresholds);
  DownloadRequest request;
  request.set_total_bytes(total);
  grpc::ClientContext context;
  const auto start = Clock::now();
  auto reader = peer.stub->Download(&context, request);
  Chunk chunk;
  std::uint64_t got = 0;
  while (reader->Read(&chunk)) got += chunk.data().size();
  const grpc::Status status = reader->Finish();
  const double secs = seconds_since(start);
  if (!status.ok()) throw std::runtime_error("gRPC download failed: " + status.error_message());
  if (got != total) throw std::runtime_error("gRPC download short: " + std::to_string(got) + " of " + std::to_string(total));
  return {static_cast<double>(got) / secs / 1e6, "MB/s",
          grpc_version() + " server-streaming Download, 256 KiB bytes messages, sync API, default args, over tcp" +
              (tls ? " with TLS" : "") + ", client reads and drops" + malloc_note(raised_malloc_thresholds)};
}

Measurement grpc_call_p99(const CaseOptions& options) {
  // ferry's side (ferry_call_p99) runs on a unix socket; so does this one.
  GrpcPeer peer(options, false, false);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> streamed{0};
  grpc::ClientContext load_context;
  std::thread load([&] {
    DownloadRequest request;
    request.set_total_bytes(std::uint64_t{1} << 40);  // until cancelled
    auto reader = peer.stub->Download(&load_context, request);
    Chunk chunk;
    while (!stop.load() && reader->Read(&chunk)) streamed += chunk.data().size();
    load_context.TryCancel();
    reader->Finish();
  });
  std::this_thread::sleep_for(warmup_window());
  // One small call every millisecond on the same channel, timed from issue
  // to reply, as ferry's side does.
  EchoMessage request;
  request.set_payload(std::string(echo_payload_bytes, 'p'));
  std::vector<double> latencies;
  const auto window = measure_window(options.quick);
  const std::uint64_t streamed_before = streamed.load();
  const auto start = Clock::now();
  std::string error;
  while (Clock::now() - start < window) {
    const auto t = Clock::now();
    grpc::ClientContext context;
    EchoMessage response;
    const grpc::Status status = peer.stub->Echo(&context, request, &response);
    if (!status.ok()) {
      error = "gRPC echo failed under load: " + status.error_message();
      break;
    }
    latencies.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
    std::this_thread::sleep_until(t + std::chrono::milliseconds(1));
  }
  const double secs = seconds_since(start);
  const double stream_mbs = static_cast<double>(streamed.load() - streamed_before) / secs / 1e6;
  stop = true;
  load_context.TryCancel();
  load.join();
  if (!error.empty()) throw std::runtime_error(error);
  if (latencies.empty()) throw std::runtime_error("no gRPC echo completed under load");
  std::sort(latencies.begin(), latencies.end());
  auto pct = [&](double p) { return latencies[static_cast<std::size_t>(p * static_cast<double>(latencies.size() - 1))]; };
  char note[240];
  std::snprintf(note, sizeof note,
                "%s, %zu unary Echo calls on the channel of a saturating server-streaming Download (%.0f MB/s during "
                "the calls), p50 %.3f ms, p99 %.3f ms, unix socket, default args",
                grpc_version().c_str(), latencies.size(), stream_mbs, pct(0.5), pct(0.99));
  return {pct(0.99), "ms", note};
}

}  // namespace ferry::bench

#else  // !FERRY_BENCH_HAVE_GRPC

namespace ferry::bench {

int serve_grpc(const std::string&, const std::string&, const std::string&) {
  throw Unavailable("gRPC baseline not built");
}
Measurement grpc_upload(const CaseOptions&, bool, std::uint64_t, bool) { throw Unavailable("gRPC baseline not built"); }
Measurement grpc_download(const CaseOptions&, bool, std::uint64_t, bool) {
  throw Unavailable("gRPC baseline not built");
}
Measurement grpc_call_p99(const CaseOptions&) { throw Unavailable("gRPC baseline not built"); }

Measurement grpc_echo_inflight(const CaseOptions&, int, bool) {
  throw Unavailable("gRPC baseline not built");
}

}  // namespace ferry::bench

#endif

#include <malloc.h>

namespace ferry::bench {

void raise_malloc_thresholds() {
  // Setting either threshold also turns off glibc's own adjustment of both.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

}  // namespace ferry::bench
