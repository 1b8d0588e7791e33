#include "rpc/grpc_transport.h"

#include <grpc/grpc_security_constants.h>
#include <grpcpp/channel.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>

#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>
#include <cctype>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <mutex>
#include <optional>
#include <spdlog/spdlog.h>
#include <sstream>
#include <string>
#include <vector>

#include "ferry/v1/tunnel.grpc.pb.h"
#include "rpc/error.h"

namespace ferry::rpc {

namespace {

using ferry::v1::Frames;
using ferry::v1::Tunnel;
using Clock = std::chrono::steady_clock;
constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);

// Received messages kept queued before the reader stops asking for more.
constexpr std::size_t kQueueBytes = 8u << 20;

// What the transport asks of the reactor (client or server side). Called
// only under Shared::mutex and only while Shared::ops points at it.
struct StreamOps {
  virtual ~StreamOps() = default;
  virtual void start_read(Frames* message) = 0;
  virtual void start_write(const Frames* message) = 0;
  // Ends our sending direction; false when that ended the whole stream
  // (server: Finish), after which no operation may be started.
  virtual bool end_writes() = 0;
  // Cancels the stream and gives the reactor up: no operation may be
  // started afterwards, and the reactor may delete itself once gRPC is
  // done with it.
  virtual void release() = 0;
};

// The timers the transport's coroutines wait on: live on the strand,
// owned by the transport; gRPC's threads reach them only through a
// weak_ptr posted to the strand.
struct Wakers {
  explicit Wakers(const asio::any_io_executor& ex) : read(ex), write(ex) {}
  asio::steady_timer read;
  asio::steady_timer write;
};

// State shared by the transport (strand) and its reactor (gRPC threads).
struct Shared : std::enable_shared_from_this<Shared> {
  std::mutex mutex;
  std::condition_variable done_cv;  // done became true
  StreamOps* ops = nullptr;  // null once released or done
  asio::any_io_executor strand;
  std::weak_ptr<Wakers> wakers;

  // Read side.
  Frames read_message;
  bool read_outstanding = false;
  std::deque<std::string> queue;
  std::size_t queue_offset = 0;  // consumed bytes of queue.front()
  std::size_t queue_bytes = 0;
  bool ended = false;  // the peer finished or the stream failed: EOF after the queue

  // Write side.
  Frames write_message;
  bool write_outstanding = false;
  bool write_failed = false;
  bool writes_ended = false;

  // Client start-up: the server's initial metadata (1), or failure (-1).
  int started = 0;
  bool done = false;  // OnDone ran
  std::string final_status;
  bool closed = false;  // close() ran: no more wake-ups

  // Wakes whatever waits on the strand. Any thread; mutex held or not.
  void notify_locked() {
    if (closed) return;
    asio::post(strand, [w = wakers] {
      if (auto wakers = w.lock()) {
        wakers->read.cancel();
        wakers->write.cancel();
      }
    });
  }

  // Asks gRPC for the next message if none is pending and the queue has room.
  void maybe_read_locked() {
    if (!ops || read_outstanding || ended || queue_bytes >= kQueueBytes) return;
    read_outstanding = true;
    read_message.Clear();
    ops->start_read(&read_message);
  }

  // Reactions (gRPC threads).
  void on_read_done(bool ok) {
    std::lock_guard lock(mutex);
    read_outstanding = false;
    if (ok) {
      std::string data = std::move(*read_message.mutable_data());
      if (!data.empty()) {
        queue_bytes += data.size();
        queue.push_back(std::move(data));
      }
      maybe_read_locked();
    } else {
      ended = true;
    }
    notify_locked();
  }
  void on_write_done(bool ok) {
    std::lock_guard lock(mutex);
    write_outstanding = false;
    if (!ok) write_failed = true;
    notify_locked();
  }
  void on_started(bool ok) {
    std::lock_guard lock(mutex);
    started = ok ? 1 : -1;
    notify_locked();
  }
  void on_cancel() {
    std::lock_guard lock(mutex);
    ended = true;
    write_failed = true;
    if (ops) {
      ops->release();
      ops = nullptr;
    }
    notify_locked();
  }
  void on_done(const grpc::Status& status) {
    std::lock_guard lock(mutex);
    ops = nullptr;
    done = true;
    ended = true;
    if (write_outstanding) write_failed = true;
    if (!status.ok())
      final_status = status.error_message().empty() ? "gRPC status " + std::to_string(status.error_code())
                                                    : status.error_message();
    notify_locked();
    done_cv.notify_all();
  }

  // Copies queued bytes into `buffers` in turn; returns the count.
  std::size_t take_locked(std::initializer_list<asio::mutable_buffer> buffers) {
    std::size_t total = 0;
    for (asio::mutable_buffer b : buffers) {
      while (b.size() > 0 && !queue.empty()) {
        const std::string& front = queue.front();
        const std::size_t n = std::min(b.size(), front.size() - queue_offset);
        std::memcpy(b.data(), front.data() + queue_offset, n);
        b += n;
        total += n;
        queue_offset += n;
        queue_bytes -= n;
        if (queue_offset == front.size()) {
          queue.pop_front();
          queue_offset = 0;
        }
      }
    }
    return total;
  }
};

// The client's reactor. It holds neither the channel nor the stub: the
// transport owns the channel and lets it go, on its own thread, once the
// call is over (OnDone). In gRPC 1.51 the last grpc::Channel going away
// shuts down the callback queue all client reactions run on; destroyed
// inside a reaction, or while a call on it is still in flight, that aborts
// the process ("assertion failed: prior > 0" in grpc_cq_internal_unref).
class ClientStream final : public grpc::ClientBidiReactor<Frames, Frames>, public StreamOps {
 public:
  explicit ClientStream(std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {}

  // Under shared->mutex.
  void begin(Tunnel::Stub& stub) {
    stub.async()->Connect(&context_, this);
    AddHold();  // OnDone waits for release(): we may still start operations until then
    shared_->ops = this;
    shared_->maybe_read_locked();
    StartCall();
  }

  void start_read(Frames* message) override { StartRead(message); }
  void start_write(const Frames* message) override { StartWrite(message); }
  bool end_writes() override {
    StartWritesDone();
    return true;
  }
  void release() override {
    context_.TryCancel();
    RemoveHold();
  }

  void OnReadInitialMetadataDone(bool ok) override { shared_->on_started(ok); }
  void OnReadDone(bool ok) override { shared_->on_read_done(ok); }
  void OnWriteDone(bool ok) override { shared_->on_write_done(ok); }
  void OnWritesDoneDone(bool) override {}
  void OnDone(const grpc::Status& status) override {
    shared_->on_done(status);
    delete this;
  }

 private:
  std::shared_ptr<Shared> shared_;
  grpc::ClientContext context_;
};

class ServerStream final : public grpc::ServerBidiReactor<Frames, Frames>, public StreamOps {
 public:
  ServerStream(grpc::CallbackServerContext* context, std::shared_ptr<Shared> shared)
      : context_(context), shared_(std::move(shared)) {
    // The client waits for this before it calls the stream connected.
    StartSendInitialMetadata();
    std::lock_guard lock(shared_->mutex);
    shared_->ops = this;
    shared_->maybe_read_locked();
  }

  void start_read(Frames* message) override { StartRead(message); }
  void start_write(const Frames* message) override { StartWrite(message); }
  bool end_writes() override {
    finish(grpc::Status::OK);
    return false;
  }
  void release() override {
    context_->TryCancel();
    finish(grpc::Status(grpc::StatusCode::CANCELLED, "connection closed"));
  }

  void OnSendInitialMetadataDone(bool) override {}
  void OnReadDone(bool ok) override { shared_->on_read_done(ok); }
  void OnWriteDone(bool ok) override { shared_->on_write_done(ok); }
  void OnCancel() override { shared_->on_cancel(); }
  void OnDone() override {
    shared_->on_done(grpc::Status::OK);
    delete this;
  }

 private:
  void finish(grpc::Status status) {
    if (finished_) return;
    finished_ = true;
    Finish(std::move(status));
  }
  grpc::CallbackServerContext* context_;
  std::shared_ptr<Shared> shared_;
  bool finished_ = false;  // under shared_->mutex
};

// Channels whose call did not end in time: destroying one would abort
// (see ClientStream), so they stay, reachable, until the process exits.
void keep_forever(std::shared_ptr<grpc::Channel> channel) {
  static std::mutex mutex;
  static auto* const kept = new std::vector<std::shared_ptr<grpc::Channel>>;
  std::lock_guard lock(mutex);
  kept->push_back(std::move(channel));
}

class GrpcTransport final : public Transport {
 public:
  GrpcTransport(asio::any_io_executor strand, std::shared_ptr<Shared> shared, PeerIdentity peer,
                std::shared_ptr<grpc::Channel> channel = nullptr)
      : strand_(std::move(strand)),
        shared_(std::move(shared)),
        wakers_(std::make_shared<Wakers>(strand_)),
        channel_(std::move(channel)) {
    peer_ = std::move(peer);
    std::lock_guard lock(shared_->mutex);
    shared_->wakers = wakers_;
  }
  ~GrpcTransport() override {
    release();
    if (channel_) {
      // The call was cancelled just now (if it was still up); gRPC ends
      // it within moments. The channel may only go after that (see
      // ClientStream).
      std::unique_lock lock(shared_->mutex);
      if (!shared_->done_cv.wait_for(lock, std::chrono::seconds(10), [&] { return shared_->done; })) {
        spdlog::warn("gRPC stream to {} did not end within 10 s of its cancellation; keeping its channel",
                     peer_.address);
        keep_forever(std::move(channel_));  // destroying it now would abort
      }
    }
    channel_.reset();
  }

  asio::any_io_executor get_executor() override { return strand_; }

  asio::awaitable<IoResult> read_some(asio::mutable_buffer buffer) override {
    co_return co_await read_into(buffer, asio::mutable_buffer());
  }
  asio::awaitable<IoResult> read_some_split(asio::mutable_buffer body, asio::mutable_buffer tail) override {
    co_return co_await read_into(body, tail);
  }

  asio::awaitable<IoResult> write_all(std::span<const asio::const_buffer> buffers) override {
    std::size_t total = 0;
    for (const auto& b : buffers) total += b.size();
    std::size_t written = 0;
    auto it = buffers.begin();
    std::size_t offset = 0;  // into *it
    while (written < total) {
      {
        std::lock_guard lock(shared_->mutex);
        if (closed_) co_return IoResult{asio::error::operation_aborted, written};
        if (!shared_->ops || shared_->write_failed || shared_->writes_ended)
          co_return IoResult{asio::error::broken_pipe, written};
        // One message per write_all, unless it is larger than kGrpcMaxWrite.
        std::string& data = *shared_->write_message.mutable_data();
        data.clear();
        const std::size_t size = std::min(total - written, kGrpcMaxWrite);
        data.reserve(size);
        while (data.size() < size) {
          const std::size_t n = std::min(it->size() - offset, size - data.size());
          data.append(static_cast<const char*>(it->data()) + offset, n);
          offset += n;
          if (offset == it->size()) {
            ++it;
            offset = 0;
          }
        }
        shared_->write_outstanding = true;
        shared_->ops->start_write(&shared_->write_message);
      }
      for (;;) {
        {
          std::lock_guard lock(shared_->mutex);
          if (!shared_->write_outstanding) {
            if (shared_->write_failed) co_return IoResult{asio::error::connection_reset, written};
            written += shared_->write_message.data().size();
            break;
          }
        }
        // An outstanding write after close(): gRPC completes it (cancelled)
        // shortly; the message must live until then, which it does (Shared).
        if (closed_) co_return IoResult{asio::error::operation_aborted, written};
        co_await wait(wakers_->write);
      }
    }
    co_return IoResult{std::error_code{}, written};
  }

  asio::awaitable<std::error_code> wait_readable() override {
    for (;;) {
      {
        std::lock_guard lock(shared_->mutex);
        if (closed_) co_return asio::error::operation_aborted;
        if (!shared_->queue.empty() || shared_->ended) co_return std::error_code{};
        shared_->maybe_read_locked();
      }
      co_await wait(wakers_->read);
    }
  }

  void shutdown_send() override {
    std::lock_guard lock(shared_->mutex);
    if (shared_->writes_ended) return;
    shared_->writes_ended = true;
    if (shared_->ops && !shared_->ops->end_writes()) shared_->ops = nullptr;
  }

  void close() override {
    release();
    wakers_->read.cancel();
    wakers_->write.cancel();
  }

  // For the client's start-up: waits (run it on the strand) until the server's
  // initial metadata arrived; on failure, the reason.
  asio::awaitable<std::optional<Error>> wait_started(Clock::time_point deadline, const std::string& what) {
    for (;;) {
      {
        std::lock_guard lock(shared_->mutex);
        if (shared_->started > 0) co_return std::nullopt;
        if (shared_->done)
          co_return Error(Code::unavailable, "cannot connect to " + what + ": " +
                                                 (shared_->final_status.empty() ? std::string("stream refused")
                                                                                : shared_->final_status));
        if (shared_->started < 0 && shared_->ops) {
          // Failed: end the call to learn why (OnDone brings the status).
          shared_->ops->release();
          shared_->ops = nullptr;
        }
        if (Clock::now() >= deadline) {
          if (shared_->ops) {
            shared_->ops->release();
            shared_->ops = nullptr;
          }
          co_return Error(Code::deadline_exceeded, "cannot connect to " + what + ": timed out");
        }
      }
      wakers_->read.expires_at(deadline);
      co_await wakers_->read.async_wait(use_tuple);
    }
  }

 private:
  asio::awaitable<IoResult> read_into(asio::mutable_buffer first, asio::mutable_buffer second) {
    if (first.size() == 0 && second.size() == 0) co_return IoResult{std::error_code{}, 0};
    for (;;) {
      {
        std::lock_guard lock(shared_->mutex);
        if (closed_) co_return IoResult{asio::error::operation_aborted, 0};
        if (!shared_->queue.empty()) {
          const std::size_t n = shared_->take_locked({first, second});
          shared_->maybe_read_locked();
          co_return IoResult{std::error_code{}, n};
        }
        if (shared_->ended) co_return IoResult{asio::error::eof, 0};
        shared_->maybe_read_locked();
      }
      co_await wait(wakers_->read);
    }
  }

  static asio::awaitable<void> wait(asio::steady_timer& timer) {
    timer.expires_at(asio::steady_timer::time_point::max());
    co_await timer.async_wait(use_tuple);
  }

  void release() {
    std::lock_guard lock(shared_->mutex);
    closed_ = true;
    shared_->closed = true;
    // The reactor may outlive the transport and, in a process that is
    // ending, the io_context: the last reference to Shared can go on a
    // gRPC thread after the io_context is gone, so Shared must not keep a
    // handle to the strand past this point.
    shared_->strand = asio::any_io_executor();
    if (shared_->ops) {
      shared_->ops->release();
      shared_->ops = nullptr;
    }
  }

  asio::any_io_executor strand_;
  std::shared_ptr<Shared> shared_;
  std::shared_ptr<Wakers> wakers_;
  std::shared_ptr<grpc::Channel> channel_;  // client side
  bool closed_ = false;  // under shared_->mutex
};

std::string read_pem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(Code::invalid_argument, std::string("cannot read ") + what + " '" + path + "'", "tls");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string host_port(const Endpoint& endpoint) {
  if (endpoint.host.find(':') != std::string::npos)
    return "[" + endpoint.host + "]:" + std::to_string(endpoint.port);
  return endpoint.host + ":" + std::to_string(endpoint.port);
}

// "ipv4:127.0.0.1:5000" -> "127.0.0.1:5000"; "ipv6:[::1]:5000" -> "[::1]:5000".
std::string peer_address(std::string peer) {
  for (const char* prefix : {"ipv4:", "ipv6:"})
    if (peer.rfind(prefix, 0) == 0) return peer.substr(std::strlen(prefix));
  return peer;
}

// Percent-decodes what gRPC's peer() escapes ("[" as %5B in ipv6 forms).
std::string unescape(const std::string& text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%' && i + 2 < text.size() && std::isxdigit(static_cast<unsigned char>(text[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(text[i + 2]))) {
      out.push_back(static_cast<char>(std::stoi(text.substr(i + 1, 2), nullptr, 16)));
      i += 2;
    } else {
      out.push_back(text[i]);
    }
  }
  return out;
}

// gRPC 1.51 runs every client reaction on one process-wide callback queue
// that lives while some grpc::Channel uses it, and shuts it down (joining
// its threads) when the last such channel goes. That shutdown races with
// the reactor of the call that just ended, still unwinding on one of those
// threads, and aborts the process. A channel that holds the queue for the
// life of the process (never connected, never freed) keeps it up.
void hold_callback_queue() {
  struct Idle final : grpc::ClientBidiReactor<Frames, Frames> {
    void OnDone(const grpc::Status&) override {}
  };
  struct Held {
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<Tunnel::Stub> stub;
    grpc::ClientContext context;
    Idle reactor;
  };
  // Reachable from this static for the life of the process (so leak
  // checkers see a singleton, not a leak); never destroyed, because
  // destroying it is what shuts the queue down.
  static Held* const held = [] {
    auto* h = new Held;
    h->channel = grpc::CreateChannel("unix:/nonexistent/ferry-callback-queue", grpc::InsecureChannelCredentials());
    h->stub = Tunnel::NewStub(h->channel);
    // Creating the call (never started) makes the channel take the queue.
    h->stub->async()->Connect(&h->context, &h->reactor);
    return h;
  }();
  (void)held;
}

}  // namespace

asio::awaitable<std::unique_ptr<Transport>> connect_grpc(asio::any_io_executor strand, const Endpoint& endpoint,
                                                         const TlsOptions* tls, std::chrono::milliseconds timeout) {
  const bool secure = endpoint.kind == Endpoint::Kind::grpcs;
  hold_callback_queue();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kGrpcMaxMessage);
  args.SetMaxSendMessageSize(kGrpcMaxMessage);
  // Each ferry connection is a channel (one HTTP/2 connection) of its own,
  // never shared with another: two connections to one daemon are
  // independent, as over TCP.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (secure) {
    grpc::SslCredentialsOptions ssl;
    if (tls) {
      if (!tls->ca_file.empty()) ssl.pem_root_certs = read_pem(tls->ca_file, "CA file");
      if (!tls->cert_file.empty()) ssl.pem_cert_chain = read_pem(tls->cert_file, "certificate file");
      if (!tls->key_file.empty()) ssl.pem_private_key = read_pem(tls->key_file, "key file");
      if (!tls->server_name.empty()) args.SetSslTargetNameOverride(tls->server_name);
    }
    credentials = grpc::SslCredentials(ssl);
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  const std::string target = host_port(endpoint);
  auto channel = grpc::CreateCustomChannel(target, credentials, args);

  auto shared = std::make_shared<Shared>();
  shared->strand = strand;
  PeerIdentity peer;
  peer.transport = secure ? "grpcs" : "grpc";
  peer.address = target;
  if (secure) {
    peer.tls_version = "TLS (gRPC)";
    peer.tls_bits = 128;
  }
  auto stub = Tunnel::NewStub(channel);
  auto transport = std::make_unique<GrpcTransport>(strand, shared, std::move(peer), std::move(channel));
  {
    std::lock_guard lock(shared->mutex);
    auto* stream = new ClientStream(shared);  // deletes itself in OnDone
    stream->begin(*stub);
  }
  stub.reset();
  // On the transport's strand, where gRPC's wake-ups arrive (the caller
  // runs on whatever executor it was given).
  auto failure = co_await asio::co_spawn(
      strand, transport->wait_started(Clock::now() + timeout, endpoint.to_string()), asio::use_awaitable);
  if (failure) throw *failure;
  co_return transport;
}

struct GrpcListener::Impl {
  class Service final : public Tunnel::CallbackService {
   public:
    Service(bool secure, ExecutorFor executor_for, Accept accept)
        : secure_(secure), executor_for_(std::move(executor_for)), accept_(std::move(accept)) {}

    grpc::ServerBidiReactor<Frames, Frames>* Connect(grpc::CallbackServerContext* context) override {
      auto shared = std::make_shared<Shared>();
      shared->strand = asio::make_strand(executor_for_());
      PeerIdentity peer;
      peer.transport = secure_ ? "grpcs" : "grpc";
      peer.address = unescape(peer_address(context->peer()));
      if (secure_) {
        peer.tls_version = "TLS (gRPC)";
        peer.tls_bits = 128;
        if (auto auth = context->auth_context()) {
          auto subject = auth->FindPropertyValues(GRPC_X509_SUBJECT_PROPERTY_NAME);
          if (!subject.empty()) peer.tls_subject = std::string(subject.front().data(), subject.front().size());
        }
      }
      auto transport = std::make_unique<GrpcTransport>(shared->strand, shared, std::move(peer));
      auto* stream = new ServerStream(context, shared);  // deletes itself in OnDone
      accept_(std::move(transport));
      return stream;
    }

   private:
    bool secure_;
    ExecutorFor executor_for_;
    Accept accept_;
  };

  Endpoint bound;
  std::unique_ptr<Service> service;
  std::unique_ptr<grpc::Server> server;
  std::mutex mutex;
  bool stopped = false;
};

GrpcListener::GrpcListener(const Endpoint& endpoint, const TlsOptions& tls, ExecutorFor executor_for, Accept accept)
    : impl_(std::make_unique<Impl>()) {
  const bool secure = endpoint.kind == Endpoint::Kind::grpcs;
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (secure) {
    if (tls.cert_file.empty() || tls.key_file.empty())
      throw Error(Code::invalid_argument, "a grpcs listener needs a certificate and key (tls cert_file/key_file)",
                  "tls");
    const bool require_client = tls.verify_peer && !tls.ca_file.empty();
    grpc::SslServerCredentialsOptions ssl(require_client ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                                         : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    if (!tls.ca_file.empty()) ssl.pem_root_certs = read_pem(tls.ca_file, "CA file");
    ssl.pem_key_cert_pairs.push_back({read_pem(tls.key_file, "key file"), read_pem(tls.cert_file, "certificate file")});
    credentials = grpc::SslServerCredentials(ssl);
  } else {
    credentials = grpc::InsecureServerCredentials();
  }
  impl_->service = std::make_unique<Impl::Service>(secure, std::move(executor_for), std::move(accept));
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(kGrpcMaxMessage);
  builder.SetMaxSendMessageSize(kGrpcMaxMessage);
  // Two daemons must not share a port silently (gRPC sets SO_REUSEPORT).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  int port = 0;
  builder.AddListeningPort(host_port(endpoint), credentials, &port);
  builder.RegisterService(impl_->service.get());
  impl_->server = builder.BuildAndStart();
  if (!impl_->server || port == 0)
    throw Error(Code::unavailable, "cannot listen on " + endpoint.to_string() + ": gRPC could not bind the address");
  impl_->bound = Endpoint::grpc(endpoint.host, static_cast<std::uint16_t>(port), secure);
}

GrpcListener::~GrpcListener() { shutdown(std::chrono::milliseconds(0)); }

const Endpoint& GrpcListener::endpoint() const { return impl_->bound; }

void GrpcListener::shutdown(std::chrono::milliseconds grace) {
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->stopped) return;
    impl_->stopped = true;
  }
  if (impl_->server) {
    impl_->server->Shutdown(std::chrono::system_clock::now() + grace);
    impl_->server->Wait();
  }
}

}  // namespace ferry::rpc
