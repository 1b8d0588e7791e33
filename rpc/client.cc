#include "rpc/client.h"

#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <map>
#include <mutex>
#include <utility>
#include <spdlog/spdlog.h>
#include <unordered_map>

#include "ferry/v1/control.ferry.h"
#include "ferry/v1/error.pb.h"

namespace ferry::rpc {

// ---- CancelSource ----

void CancelSource::cancel() {
  std::vector<std::pair<std::size_t, std::function<void()>>> watchers;
  {
    std::lock_guard lock(mutex_);
    if (cancelled_) return;
    cancelled_ = true;
    watchers.swap(watchers_);
  }
  for (auto& [id, fn] : watchers) fn();
}

bool CancelSource::cancelled() const {
  std::lock_guard lock(mutex_);
  return cancelled_;
}

std::size_t CancelSource::watch(std::function<void()> fn) {
  {
    std::lock_guard lock(mutex_);
    if (!cancelled_) {
      watchers_.emplace_back(next_id_, std::move(fn));
      return next_id_++;
    }
  }
  fn();
  return 0;
}

void CancelSource::forget(std::size_t id) {
  std::lock_guard lock(mutex_);
  std::erase_if(watchers_, [id](const auto& w) { return w.first == id; });
}

namespace detail {

using Control = ferry::v1::Control;

class ClientCore final : public FrameHandler, public std::enable_shared_from_this<ClientCore> {
 public:
  ClientCore(std::shared_ptr<Connection> connection, ClientOptions options)
      : connection_(std::move(connection)), executor_(connection_->get_executor()), options_(std::move(options)) {}

  Serial start(std::uint32_t program, std::uint32_t version, std::uint32_t procedure, Buffer body,
               CallOptions options, std::unique_ptr<CallCompletion> done, StreamFactory make_stream) {
    std::shared_ptr<StreamSink> stream;
    Pending pending;
    pending.done = std::move(done);
    pending.program = program;
    pending.version = version;
    pending.procedure = procedure;
    Serial serial;
    std::optional<Error> refused;
    const std::uint32_t max_frame = server_.limits.max_frame ? server_.limits.max_frame : options_.connection.limits.max_frame;
    if (options.cancel && options.cancel->cancelled()) {
      refused = Error(Code::cancelled, "call cancelled before it was sent");
    } else if (body.size() > max_frame) {
      // The server would close the connection on such a frame; refuse it
      // here so only this call fails.
      refused = Error(Code::invalid_argument, "request of " + std::to_string(body.size()) +
                                                  " bytes exceeds the connection's maximum frame size of " +
                                                  std::to_string(max_frame) + " bytes");
    }
    {
      std::lock_guard lock(mutex_);
      do {
        serial = next_serial_++;
      } while (serial == 0 || pending_.count(serial));
      if (refused) {
        // fall through to the refusal below
      } else if (closed_reason_) {
        refused = *closed_reason_;
      } else {
        if (options.timeout) pending.timer = std::make_unique<asio::steady_timer>(executor_, *options.timeout);
        pending.timeout = options.timeout;
        pending_.emplace(serial, std::move(pending));
        if (make_stream) {
          stream = make_stream(serial);
          streams_[serial] = stream;
        }
      }
    }
    if (refused) {
      if (make_stream) make_stream(serial)->on_connection_closed(*refused);
      pending.done->complete(RawResult{std::move(*refused), {}});
      return serial;
    }
    // Queue the CALL before arming the timer and the cancel watch: a cancel
    // that fires from here on either finds the CALL still queued (and
    // removes it) or sends CANCEL behind it, never ahead of it.
    Header h{program, version, procedure, FrameType::call, serial, FrameStatus::ok};
    if (!connection_->send(h, std::move(body))) {
      fail(serial, closed_error());
      return serial;
    }
    std::weak_ptr<ClientCore> weak = shared_from_this();
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(serial);
      if (it != pending_.end() && it->second.timer) {
        it->second.timer->async_wait([weak, serial](std::error_code ec) {
          if (ec) return;
          if (auto core = weak.lock()) core->expire(serial);
        });
      }
    }
    if (options.cancel) {
      auto source = options.cancel;
      std::size_t id = source->watch([weak, serial] {
        if (auto core = weak.lock()) core->cancel(serial);
      });
      std::lock_guard lock(mutex_);
      auto it = pending_.find(serial);
      if (it != pending_.end()) {
        it->second.cancel = std::move(source);
        it->second.watch_id = id;
      } else if (id) {
        source->forget(id);
      }
    }
    return serial;
  }

  // Ask the server to stop; the call ends with the server's answer.
  void cancel(Serial serial) {
    Header h;
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(serial);
      if (it == pending_.end() || it->second.cancel_sent) return;
      it->second.cancel_sent = true;
      h = Header{it->second.program, it->second.version, it->second.procedure, FrameType::cancel, serial,
                 FrameStatus::ok};
    }
    if (connection_->unqueue(serial, FrameType::call)) {
      fail(serial, Error(Code::cancelled, "call cancelled before it was sent"));
      return;
    }
    connection_->send(h, {});
  }

  void expire(Serial serial) {
    Header h;
    std::chrono::milliseconds after{};
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(serial);
      if (it == pending_.end()) return;
      h = Header{it->second.program, it->second.version, it->second.procedure, FrameType::cancel, serial,
                 FrameStatus::ok};
      if (it->second.timeout)
        after = std::chrono::duration_cast<std::chrono::milliseconds>(*it->second.timeout);
      if (it->second.cancel_sent) h.type = FrameType::call;  // marker: nothing more to send
      it->second.cancel_sent = true;
    }
    const bool unsent = connection_->unqueue(serial, FrameType::call);
    fail(serial, Error(Code::deadline_exceeded, "deadline of " + std::to_string(after.count()) +
                                                    " ms exceeded" + (unsent ? " before the call was sent" : "")));
    if (!unsent && h.type == FrameType::cancel) connection_->send(h, {});
  }

  void fail(Serial serial, Error error) { complete(serial, RawResult{std::move(error), {}}); }

  void complete(Serial serial, RawResult result) {
    Pending pending;
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(serial);
      if (it == pending_.end()) return;  // already completed (deadline, cancel race)
      pending = std::move(it->second);
      pending_.erase(it);
    }
    if (pending.timer) pending.timer->cancel();
    if (pending.cancel && pending.watch_id) pending.cancel->forget(pending.watch_id);
    pending.done->complete(std::move(result));
  }

  void on_frame(const Header& header, Buffer body) override {
    switch (header.type) {
      case FrameType::reply:
        // A SASL reply may be the last plaintext frame: read nothing more
        // until the exchange has looked at it (security_layer.h).
        if (header.program == Control::program &&
            (header.procedure == Control::SaslStart::number || header.procedure == Control::SaslStep::number))
          connection_->hold_reads();
        if (header.status == FrameStatus::ok) {
          complete(header.serial, RawResult{std::nullopt, std::move(body)});
        } else {
          ferry::v1::Error e;
          if (!e.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
            fail(header.serial, Error(Code::internal, "server sent an ERROR reply whose body does not parse"));
          } else {
            fail(header.serial, Error::from_proto(e));
          }
        }
        return;
      case FrameType::message:
        on_message(header, body);
        return;
      case FrameType::data_chunk:
      case FrameType::stream_hole:
      case FrameType::stream_credit: {
        std::shared_ptr<StreamSink> sink;
        {
          std::lock_guard lock(mutex_);
          auto it = streams_.find(header.serial);
          if (it != streams_.end()) sink = it->second;
        }
        if (sink) sink->on_stream_frame(header, std::move(body));
        return;
      }
      default:
        spdlog::debug("client: ignoring {} frame for serial {}", to_string(header.type), header.serial);
        return;
    }
  }

  void on_message(const Header& header, const Buffer& body) {
    if (header.program == Control::program && header.procedure == Control::Goodbye::number) {
      ferry::v1::GoodbyeNotice bye;
      if (bye.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
        std::lock_guard lock(mutex_);
        goodbye_ = Error(static_cast<Code>(bye.code()), "server closed the connection: " + bye.reason());
      }
      return;
    }
    // Held while the handler runs, so that replacing it waits for a call in
    // progress: a handler that captures a caller's locals can be swapped out
    // before they go. Recursive: a handler may replace itself.
    std::lock_guard dispatch(dispatch_mutex_);
    std::function<void(const Buffer&)> fn;
    {
      std::lock_guard lock(mutex_);
      auto it = message_handlers_.find({header.program, header.procedure});
      if (it != message_handlers_.end()) fn = it->second;
    }
    if (fn) fn(body);
  }

  void on_close(const Error& reason) override {
    std::unordered_map<Serial, Pending> pending;
    std::unordered_map<Serial, std::shared_ptr<StreamSink>> streams;
    Error why = reason;
    {
      std::lock_guard lock(mutex_);
      if (goodbye_) why = *goodbye_;
      closed_reason_ = why;
      pending.swap(pending_);
      streams.swap(streams_);
    }
    for (auto& [serial, s] : streams) s->on_connection_closed(why);
    for (auto& [serial, p] : pending) {
      if (p.timer) p.timer->cancel();
      if (p.cancel && p.watch_id) p.cancel->forget(p.watch_id);
      p.done->complete(RawResult{why, {}});
    }
  }

  Error closed_error() {
    std::lock_guard lock(mutex_);
    if (closed_reason_) return *closed_reason_;
    return Error(Code::unavailable, "connection closed");
  }

  void set_message_handler(std::uint32_t program, std::uint32_t procedure, std::function<void(const Buffer&)> fn) {
    std::function<void(const Buffer&)> old;
    std::lock_guard dispatch(dispatch_mutex_);
    std::lock_guard lock(mutex_);
    old = std::exchange(message_handlers_[{program, procedure}], std::move(fn));
  }

  std::size_t in_flight() const {
    std::lock_guard lock(mutex_);
    return pending_.size();
  }

  bool open() const {
    std::lock_guard lock(mutex_);
    return !closed_reason_;
  }

  std::shared_ptr<Connection> connection_;
  asio::any_io_executor executor_;
  ClientOptions options_;
  ServerInfo server_;

 private:
  struct Pending {
    std::unique_ptr<CallCompletion> done;
    std::unique_ptr<asio::steady_timer> timer;
    std::optional<std::chrono::steady_clock::duration> timeout;
    std::shared_ptr<CancelSource> cancel;
    std::size_t watch_id = 0;
    std::uint32_t program = 0, version = 0, procedure = 0;
    bool cancel_sent = false;
  };

  mutable std::mutex mutex_;
  std::recursive_mutex dispatch_mutex_;  // taken before mutex_, never after
  std::unordered_map<Serial, Pending> pending_;
  Serial next_serial_ = 1;
  std::optional<Error> closed_reason_;
  std::optional<Error> goodbye_;
  std::map<std::pair<std::uint32_t, std::uint32_t>, std::function<void(const Buffer&)>> message_handlers_;

 public:
  std::unordered_map<Serial, std::shared_ptr<StreamSink>> streams_;  // guarded by mutex_
  void detach(Serial serial) {
    std::lock_guard lock(mutex_);
    streams_.erase(serial);
  }
};

Serial start_call(const std::shared_ptr<ClientCore>& core, std::uint32_t program, std::uint32_t version,
                  std::uint32_t procedure, Buffer body, CallOptions options,
                  std::unique_ptr<CallCompletion> done, StreamFactory make_stream) {
  return core->start(program, version, procedure, std::move(body), std::move(options), std::move(done),
                     std::move(make_stream));
}

void cancel_call(const std::weak_ptr<ClientCore>& weak, Serial serial) {
  if (auto core = weak.lock()) core->cancel(serial);
}

asio::any_io_executor core_executor(ClientCore& core) { return core.executor_; }
BufferPool* core_pool(ClientCore& core) { return &core.connection_->pool(); }

}  // namespace detail

namespace {

// The SASL exchange of connection start (sasl.h). Every SaslStart/SaslStep
// reply holds the reader; each path out of here resumes it, with the
// security layer when one was negotiated.
asio::awaitable<void> authenticate(Client& client, Connection& connection, ServerInfo& info, const Endpoint& endpoint,
                                   const ClientOptions& options) {
  using Control = ferry::v1::Control;
  if (!options.sasl.enabled())
    throw Error(Code::unauthenticated, "server " + endpoint.to_string() +
                                           " requires SASL authentication; give a user name and password");
  const auto timeout = with_timeout(options.connect_timeout);
  const auto list = co_await client.call<Control::AuthList>(ferry::v1::AuthListCall{}, timeout);
  std::vector<std::string> offered(list.mechanisms().begin(), list.mechanisms().end());
  const bool over_tls = connection.peer().transport == "tls" || connection.peer().transport == "grpcs";
  SaslClient sasl(options.sasl, endpoint.kind == Endpoint::Kind::unix_socket ? "localhost" : endpoint.host,
                  connection.peer());
  auto [mechanism, token] = sasl.start(offered);
  ferry::v1::SaslStartCall start;
  start.set_mechanism(mechanism);
  if (token) {
    start.set_data(*token);
    start.set_has_data(true);
  }
  // The reader holds after each SASL reply until it has been looked at.
  // Every path out of here resumes it: explicitly once a reply is handled,
  // and this guard for errors (a failed call holds too). No try/catch around
  // co_await, which GCC 12 coroutines mishandle.
  struct ResumeOnExit {
    Connection& connection;
    ~ResumeOnExit() { connection.resume_reads(); }
  } guard{connection};
  auto reply = co_await client.call<Control::SaslStart>(start, timeout);
  for (;;) {
    if (reply.complete()) {
      // The server's last token (SCRAM's server signature) proves it knew
      // the password too.
      if (reply.has_data()) sasl.step(reply.data());
      std::shared_ptr<SecurityLayer> layer;
      if (reply.ssf() > 0 && !over_tls) {
        layer = sasl.layer();
        if (!layer || sasl.ssf() != reply.ssf())
          throw Error(Code::unauthenticated, "SASL security layer mismatch: server says SSF " +
                                                 std::to_string(reply.ssf()) + ", client has " +
                                                 std::to_string(sasl.ssf()), "sasl");
        connection.secure_writes(layer);
      }
      connection.resume_reads(layer);
      info.mechanism = mechanism;
      info.user = options.sasl.username;
      info.ssf = layer ? reply.ssf() : 0;
      co_return;
    }
    auto answer = sasl.step(reply.has_data() ? SaslToken(reply.data()) : std::nullopt);
    connection.resume_reads();
    ferry::v1::SaslStepCall step;
    if (answer) {
      step.set_data(*answer);
      step.set_has_data(true);
    }
    reply = co_await client.call<Control::SaslStep>(step, timeout);
  }
}

asio::awaitable<void> hello_and_auth(Client& client, Connection& connection, ServerInfo& info, const Endpoint& endpoint,
                                     const ClientOptions& options) {
  ferry::v1::HelloCall hello;
  hello.set_protocol_version(1);
  hello.set_max_frame(options.connection.limits.max_frame);
  hello.set_chunk_size(options.connection.limits.max_chunk);
  hello.set_window(options.window);
  hello.set_client_name(options.name);
  hello.set_keepalive_interval_ms(static_cast<std::uint32_t>(options.connection.keepalive_interval.count()));
  hello.set_keepalive_count(options.connection.keepalive_count);
  auto reply = co_await client.call<ferry::v1::Control::Hello>(hello, with_timeout(options.connect_timeout));
  if (reply.protocol_version() != 1)
    throw Error(Code::unimplemented,
                "server speaks protocol version " + std::to_string(reply.protocol_version()) + ", this client 1");
  info.name = reply.server_name();
  info.protocol_version = reply.protocol_version();
  info.limits.max_frame = reply.max_frame();
  info.limits.max_chunk = reply.chunk_size();
  info.window = reply.window();
  info.auth_required = reply.auth_required();
  connection.set_limits(info.limits);
  if (info.auth_required) co_await authenticate(client, connection, info, endpoint, options);
}

}  // namespace

asio::awaitable<Client> Client::connect(asio::any_io_executor executor, std::string address, ClientOptions options) {
  const Endpoint endpoint = Endpoint::parse(address);
  std::shared_ptr<TlsContext> tls = options.tls_context;
  if (!tls && endpoint.is_secure()) tls = TlsContext::client(options.tls);
  auto transport = co_await connect_transport(executor, endpoint, tls, options.connect_timeout);
  if (options.fault.any()) transport = std::make_unique<FaultTransport>(std::move(transport), options.fault);
  // No keepalive probes until the connection is set up: a probe must not
  // slip between the last SASL step and the security layer switch.
  ConnectionOptions copts = options.connection;
  copts.keepalive_interval = std::chrono::milliseconds(0);
  auto connection = std::make_shared<Connection>(std::move(transport), copts);
  auto core = std::make_shared<detail::ClientCore>(connection, options);
  connection->start(core);
  Client client(core);

  ServerInfo& info = core->server_;
  // Run as a child and take its exception as a value: no try/catch around
  // co_await (GCC 12 coroutines mishandle it).
  auto [failure] = co_await asio::co_spawn(executor, hello_and_auth(client, *connection, info, endpoint, options),
                                           asio::experimental::as_tuple(asio::use_awaitable));
  if (failure) {
    const Error error = Error::from_exception(failure);
    std::string why = error.message();
    // A TLS listener drops a plaintext Hello without a word.
    if (endpoint.kind == Endpoint::Kind::tcp && info.protocol_version == 0 && error.code() == Code::unavailable &&
        why.find("closed by peer") != std::string::npos)
      why += "; if that port is a TLS listener, connect with ferry+tls://";
    throw Error(error.code() == Code::deadline_exceeded ? Code::unavailable : error.code(),
                "handshake with " + endpoint.to_string() + " failed: " + why, error.domain(), error.retryable());
  }
  connection->set_keepalive(options.connection.keepalive_interval, options.connection.keepalive_count);
  co_return client;
}

Client Client::connect_sync(asio::any_io_executor executor, std::string address, ClientOptions options) {
  auto future = asio::co_spawn(executor, connect(executor, std::move(address), std::move(options)), asio::use_future);
  return future.get();
}

Client& Client::operator=(Client&& other) noexcept {
  if (this != &other) {
    close();
    core_ = std::move(other.core_);
  }
  return *this;
}

Client::~Client() { close(); }

void Client::close() {
  if (core_) core_->connection_->close(Error(Code::unavailable, "connection closed by the client"));
}

bool Client::is_open() const { return core_ && core_->open(); }
const ServerInfo& Client::server() const { return core_->server_; }
const PeerIdentity& Client::peer() const { return core_->connection_->peer(); }
ConnectionStats Client::stats() const { return core_->connection_->stats(); }
std::size_t Client::calls_in_flight() const { return core_->in_flight(); }
asio::any_io_executor Client::executor() const { return core_->executor_; }
std::shared_ptr<Connection> Client::connection() const { return core_->connection_; }
void Client::detach_stream(Serial serial) {
  if (core_) core_->detach(serial);
}
StreamLimits Client::stream_limits() const {
  StreamLimits l;
  if (core_->server_.window) l.window = core_->server_.window;
  if (core_->server_.limits.max_chunk) l.chunk_size = core_->server_.limits.max_chunk;
  return l;
}

void Client::set_message_handler(std::uint32_t program, std::uint32_t procedure,
                                 std::function<void(const Buffer&)> handler) {
  core_->set_message_handler(program, procedure, std::move(handler));
}

}  // namespace ferry::rpc
