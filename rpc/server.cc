#include "rpc/server.h"

#include <grp.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/post.hpp>
#include <asio/strand.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <set>
#include <spdlog/spdlog.h>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "ferry/v1/control.ferry.h"
#include "ferry/v1/error.pb.h"
#include "rpc/bulk_queue.h"
#include "rpc/connection.h"
#include "rpc/hello.h"
#include "rpc/socket_handover.h"
#include "rpc/socket_transport.h"
#include "rpc/tls.h"
#if FERRY_HAVE_GRPC
#include "rpc/grpc_transport.h"
#endif

namespace ferry::rpc {

namespace detail {

bool CallState::finish_error(const Error& error) { return finish(FrameStatus::error, serialize(error.to_proto())); }

void request_cancel(const std::shared_ptr<CallState>& state) {
  if (state->cancel_requested.exchange(true)) return;
  state->sink->note_cancelled();
  std::function<void()> fn;
  {
    std::lock_guard lock(state->mutex);
    fn = std::move(state->on_cancel);
  }
  if (fn) fn();
  if (state->urgent) state->urgent->store(true, std::memory_order_release);
  if (state->executor)
    asio::post(state->executor, [state] { state->signal.emit(asio::cancellation_type::terminal); });
}

void log_handler_exception(const CallState& state, const Error& error) {
  spdlog::error("handler {} (serial {}) from {} failed: {}", state.procedure_name, state.header.serial,
                state.sink->peer().address, error.message());
}

}  // namespace detail

namespace {
constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);
using Control = ferry::v1::Control;
using Clock = std::chrono::steady_clock;
constexpr auto relaxed = std::memory_order_relaxed;
// Admin connections at once; they are outside max_clients.
constexpr std::size_t max_admin_clients = 32;

std::int64_t wall_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string ms_text(std::chrono::milliseconds ms) {
  if (ms.count() % 1000 == 0) return std::to_string(ms.count() / 1000) + " s";
  return std::to_string(ms.count()) + " ms";
}

// A user or group given by name or number.
std::optional<int> lookup_id(const std::string& text, bool group) {
  if (!text.empty() && text.find_first_not_of("0123456789") == std::string::npos) return std::stoi(text);
  if (group) {
    if (struct group* g = ::getgrnam(text.c_str())) return static_cast<int>(g->gr_gid);
  } else {
    if (struct passwd* p = ::getpwnam(text.c_str())) return static_cast<int>(p->pw_uid);
  }
  return std::nullopt;
}
}  // namespace

const char* to_string(AuthMode mode) { return mode == AuthMode::sasl ? "sasl" : "none"; }

AuthMode parse_auth_mode(const std::string& text) {
  if (text == "none") return AuthMode::none;
  if (text == "sasl") return AuthMode::sasl;
  throw Error(Code::invalid_argument, "unknown auth mode '" + text + "' (expected none or sasl)");
}

class Server::Impl {
 public:
  explicit Impl(ServerOptions options)
      : options_(std::move(options)),
        io_threads_(options_.io_threads ? options_.io_threads : std::max(1u, std::thread::hardware_concurrency())),
        workers_(std::max(1u, options_.worker_threads)) {
    // One single-threaded io_context per io thread: a connection and the
    // handlers it starts stay on one thread, so the hops between reader,
    // handler and writer are queue pushes, not cross-thread wake-ups.
    // Context 0 also runs the acceptors.
    for (unsigned i = 0; i < io_threads_; ++i) {
      contexts_.push_back(std::make_unique<asio::io_context>(1));
      bulk_.push_back(std::make_unique<BulkQueue>(*contexts_.back()));
    }
    live_.max_clients = options_.max_clients;
    live_.max_unauthenticated_clients = options_.max_unauthenticated_clients;
    live_.max_calls = options_.max_calls;
    live_.max_streams = options_.max_streams;
    live_.max_calls_per_client = options_.max_calls_per_client;
    live_.max_streams_per_client = options_.max_streams_per_client;
    live_.max_buffered_bytes_per_client = options_.max_buffered_bytes_per_client;
    live_.max_buffered_bytes = options_.max_buffered_bytes;
    live_.auth_timeout_ms = options_.auth_timeout.count();
    live_.idle_timeout_ms = options_.idle_timeout.count();
  }

  // The limits in force; the admin interface changes them while the server
  // runs, so the call path reads them here (relaxed loads), not in options_.
  struct LiveLimits {
    std::atomic<std::size_t> max_clients{0};
    std::atomic<std::size_t> max_unauthenticated_clients{0};
    std::atomic<std::size_t> max_calls{0};
    std::atomic<std::size_t> max_streams{0};
    std::atomic<std::size_t> max_calls_per_client{0};
    std::atomic<std::size_t> max_streams_per_client{0};
    std::atomic<std::size_t> max_buffered_bytes_per_client{0};
    std::atomic<std::size_t> max_buffered_bytes{0};
    std::atomic<std::int64_t> auth_timeout_ms{0};
    std::atomic<std::int64_t> idle_timeout_ms{0};
    std::chrono::milliseconds auth_timeout() const { return std::chrono::milliseconds(auth_timeout_ms.load(relaxed)); }
    std::chrono::milliseconds idle_timeout() const { return std::chrono::milliseconds(idle_timeout_ms.load(relaxed)); }
  };
  LiveLimits live_;

  asio::io_context& io() { return *contexts_[0]; }
  // The stream-work queue of the io thread that runs `ex`; null when stream
  // handlers share the io_context's queue (calls_before_streams off).
  BulkQueue* bulk_for(const asio::any_io_executor& ex) {
    if (!options_.calls_before_streams) return nullptr;
    const asio::execution_context* context = &asio::query(ex, asio::execution::context);
    for (std::size_t i = 0; i < contexts_.size(); ++i)
      if (contexts_[i].get() == context) return bulk_[i].get();
    return nullptr;
  }
  asio::io_context& next_context() {
    return *contexts_[next_context_.fetch_add(1, std::memory_order_relaxed) % contexts_.size()];
  }

  class Session;

  ServerOptions options_;
  unsigned io_threads_;
  std::vector<std::unique_ptr<asio::io_context>> contexts_;
  std::vector<std::unique_ptr<BulkQueue>> bulk_;  // one per context; cleared before the contexts go
  // One pool of large buffers for every connection: idle bytes are capped
  // once for the process instead of once per client.
  std::shared_ptr<BufferPool> pool_ = BufferPool::create(64u << 20);
  std::atomic<std::size_t> next_context_{0};
  asio::thread_pool workers_;
  std::vector<std::thread> threads_;
  std::map<std::uint32_t, std::shared_ptr<Program>> programs_;
  std::map<std::uint32_t, std::shared_ptr<Program>> admin_programs_;  // served on the admin socket only

  std::vector<std::unique_ptr<asio::local::stream_protocol::acceptor>> unix_acceptors_;
  std::vector<std::unique_ptr<asio::local::stream_protocol::acceptor>> admin_acceptors_;
  struct InetAcceptor {
    std::unique_ptr<asio::ip::tcp::acceptor> acceptor;
    bool tls = false;
  };
  std::vector<InetAcceptor> tcp_acceptors_;
#if FERRY_HAVE_GRPC
  // grpc: and grpcs: listeners: a grpc::Server each, started by listen().
  std::vector<std::unique_ptr<GrpcListener>> grpc_listeners_;
#endif
  std::vector<std::string> unix_paths_;
  std::vector<int> unix_allowed_uids_;
  // unix_allowed_users as uids, looked up once, when the first unix
  // listener is made or handed over.
  void resolve_unix_allowed_users();
  // Serves a bound TCP acceptor as tcp or tls (making the TLS context on
  // first use); returns "auth ..." for the log line.
  std::string add_inet_acceptor(std::unique_ptr<asio::ip::tcp::acceptor> acceptor, bool tls, Endpoint& endpoint);

  // The TLS context for new connections; replaced by reload_tls().
  mutable std::mutex tls_mutex_;
  std::shared_ptr<TlsContext> tls_;

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::set<std::shared_ptr<Session>> sessions_;
  std::atomic<bool> shutting_down_{false};
  bool started_ = false;
  bool stopped_ = false;
  bool done_ = false;

  std::atomic<std::uint64_t> calls_in_flight_{0};
  std::atomic<std::uint64_t> streams_in_flight_{0};
  std::atomic<std::uint64_t> calls_overloaded_{0};
  std::atomic<std::uint64_t> calls_total_{0};
  std::atomic<std::uint64_t> calls_cancelled_{0};
  std::atomic<std::uint64_t> protocol_errors_{0};
  std::atomic<std::uint64_t> clients_refused_{0};
  std::atomic<std::uint64_t> auth_failures_{0};
  // Connections not yet authenticated: TLS handshakes in progress plus
  // sessions before Hello/SASL completed.
  std::atomic<std::size_t> unauthenticated_{0};
  std::atomic<std::size_t> handshakes_{0};
  std::atomic<std::uint64_t> next_client_id_{1};
  std::atomic<std::uint64_t> next_job_id_{1};
  // Bytes of connections that have closed (guarded by mutex_, so that a
  // closing session moves from the live sum to these at one moment).
  std::uint64_t closed_bytes_in_ = 0;
  std::uint64_t closed_bytes_out_ = 0;

  std::shared_ptr<TlsContext> tls_context() const {
    std::lock_guard lock(tls_mutex_);
    return tls_;
  }
  AuthMode auth_for(const std::string& transport) const {
    if (transport == "tls" || transport == "grpcs") return options_.auth_tls;
    if (transport == "tcp" || transport == "grpc") return options_.auth_tcp;
    return options_.auth_unix;
  }
  // Counts a new unauthenticated connection unless the limit is reached.
  bool admit_unauthenticated() {
    std::size_t n = unauthenticated_.load();
    do {
      if (n >= live_.max_unauthenticated_clients.load(relaxed)) return false;
    } while (!unauthenticated_.compare_exchange_weak(n, n + 1));
    return true;
  }
  void accept_connection(std::unique_ptr<Transport> transport, bool counted_unauthenticated, Clock::time_point accepted,
                         bool admin = false);
  asio::awaitable<void> tls_handshake(asio::ip::tcp::socket socket, Clock::time_point accepted);
  void session_closed(const std::shared_ptr<Session>& session);
  template <class Acceptor>
  asio::awaitable<void> accept_loop(Acceptor& acceptor, std::string name, bool tls, bool admin = false);
  std::vector<std::shared_ptr<Session>> session_list() const;
  std::shared_ptr<Session> find_session(std::uint64_t id) const;
  void begin_shutdown();
  void finish_shutdown();
};

// One client connection: Hello, dispatch, CANCEL, limits. The map of calls
// in flight is touched by the strand (new calls, cancels) and by whatever
// thread a handler finishes on, hence the mutex.
class Server::Impl::Session final : public FrameHandler,
                                    public detail::CallSink,
                                    public std::enable_shared_from_this<Session> {
 public:
  // The server outlives its sessions: shutdown joins the io threads before
  // the Impl goes away, so a plain pointer suffices and makes no cycle.
  Session(Impl* server, std::shared_ptr<Connection> connection, bool counted_unauthenticated, bool admin)
      : connection_(std::move(connection)),
        id_(server->next_client_id_.fetch_add(1, relaxed)),
        admin_(admin),
        connected_ns_(wall_ns()),
        server_(server),
        auth_(admin ? AuthMode::none : server->auth_for(connection_->peer().transport)),
        counted_unauthenticated_(counted_unauthenticated),
        auth_timer_(connection_->get_executor()),
        idle_timer_(connection_->get_executor()),
        identity_(connection_->peer()) {
    max_frame_.store(server->options_.limits.max_frame, std::memory_order_relaxed);
    touch();
  }

  std::uint64_t id() const { return id_; }
  bool admin() const { return admin_; }

  ClientInfo info() const {
    ClientInfo out;
    out.id = id_;
    out.admin = admin_;
    out.connected_ns = connected_ns_;
    out.authenticated = authenticated_.load();
    const auto st = connection_->stats();
    out.bytes_in = st.bytes_in;
    out.bytes_out = st.bytes_out;
    std::lock_guard lock(mutex_);
    out.peer = identity_;
    out.client_name = client_name_;
    out.calls_in_flight = calls_.size();
    out.streams_in_flight = stream_calls_.size();
    return out;
  }

  struct JobRef {
    std::uint64_t id = 0;
    std::int64_t started_ns = 0;
    std::shared_ptr<StreamSink> sink;
    std::shared_ptr<detail::CallState> state;
  };
  // The streams open on this connection (or the one with job id `only`).
  std::vector<JobRef> jobs(std::uint64_t only = 0) const {
    std::vector<JobRef> out;
    std::lock_guard lock(mutex_);
    for (const auto& [serial, job] : stream_jobs_) {
      if (only && job.first != only) continue;
      auto sit = streams_.find(serial);
      auto cit = calls_.find(serial);
      if (sit == streams_.end() || cit == calls_.end()) continue;
      out.push_back(JobRef{job.first, job.second, sit->second, cit->second});
    }
    return out;
  }

  // Arms the auth and idle timers; `accepted` is when the socket was
  // accepted, so a TLS handshake counts against the auth timeout.
  void start_timers(Clock::time_point accepted) {
    std::weak_ptr<Session> weak = shared_from_this();
    auth_timeout_ = server_->live_.auth_timeout();
    if (auth_timeout_.count() > 0) {
      auth_timer_.expires_at(accepted + auth_timeout_);
      auth_timer_.async_wait([weak](std::error_code ec) {
        if (ec) return;
        if (auto self = weak.lock()) self->auth_timed_out();
      });
    }
    if (const auto idle = server_->live_.idle_timeout(); idle.count() > 0) arm_idle_timer(idle);
  }

  void on_frame(const Header& header, Buffer body) override {
    if (refused_) return;  // turned away: only the Goodbye is said
    switch (header.type) {
      case FrameType::call:
        on_call(header, std::move(body));
        return;
      case FrameType::cancel:
        on_cancel(header);
        return;
      case FrameType::message:
        spdlog::debug("ignoring MESSAGE program {} procedure {} from {}", header.program, header.procedure,
                      peer().address);
        return;
      case FrameType::reply:
        protocol_error("client sent a REPLY (serial " + std::to_string(header.serial) + "); clients only call");
        return;
      default:
        on_stream_frame(header, std::move(body));
        return;
    }
  }

  void on_close(const Error& reason) override {
    release_unauthenticated();
    auth_timer_.cancel();
    idle_timer_.cancel();
    std::vector<std::shared_ptr<detail::CallState>> calls;
    std::vector<std::shared_ptr<StreamSink>> streams;
    {
      std::lock_guard lock(mutex_);
      closed_ = true;
      for (auto& [serial, state] : calls_) calls.push_back(state);
      for (auto& [serial, sink] : streams_) streams.push_back(sink);
      streams_.clear();
      stream_jobs_.clear();
    }
    for (auto& s : streams) s->on_connection_closed(reason);
    if (!calls.empty())
      spdlog::info("client {} gone with {} calls in flight ({}); cancelling them", peer().address, calls.size(),
                   reason.message());
    else
      spdlog::debug("client {} disconnected: {}", peer().address, reason.message());
    for (auto& state : calls) detail::request_cancel(state);
    server_->session_closed(shared_from_this());
  }

  // CallSink
  void finish_call(const Header& call, FrameStatus status, Buffer body, Lane lane) override {
    {
      std::lock_guard lock(mutex_);
      if (calls_.erase(call.serial) == 0) return;
      if (stream_calls_.erase(call.serial) && !admin_) server_->streams_in_flight_.fetch_sub(1, std::memory_order_relaxed);
    }
    touch();
    if (!admin_) server_->calls_in_flight_.fetch_sub(1, std::memory_order_relaxed);
    Header h = call;
    h.type = FrameType::reply;
    h.status = status;
    const std::uint32_t max_frame = max_frame_.load(std::memory_order_relaxed);
    if (body.size() > max_frame) {
      // The client would treat such a frame as a protocol error and drop
      // the connection with every call on it; fail this call alone.
      spdlog::warn("reply to serial {} from {} is {} bytes, over the negotiated maximum of {}; answering with an error",
                   call.serial, peer().address, body.size(), max_frame);
      h.status = FrameStatus::error;
      const auto too_big = Error(Code::resource_exhausted, "reply of " + std::to_string(body.size()) +
                                                 " bytes exceeds the connection's maximum frame size of " +
                                                 std::to_string(max_frame) + " bytes")
                 .to_proto();
      body = serialize(too_big);
    }
    connection_->send(h, std::move(body), lane);
  }

  bool push_message(std::uint32_t program, std::uint32_t version, std::uint32_t procedure,
                    Buffer body) override {
    if (body.size() > max_frame_.load(std::memory_order_relaxed)) {
      spdlog::error("dropping MESSAGE {}/{} of {} bytes for {}: over the negotiated maximum frame size", program,
                    procedure, body.size(), peer().address);
      return false;
    }
    Header h{program, version, procedure, FrameType::message, 0, FrameStatus::ok};
    return connection_->send(h, std::move(body));
  }

  const PeerIdentity& peer() const override { return connection_->peer(); }
  void note_cancelled() override { server_->calls_cancelled_.fetch_add(1, std::memory_order_relaxed); }
  BufferPool* pool() override { return &connection_->pool(); }
  std::shared_ptr<Connection> connection() override { return connection_; }
  StreamLimits stream_limits() const override {
    std::lock_guard lock(mutex_);
    return stream_limits_;
  }
  void attach_stream(Serial serial, std::shared_ptr<StreamSink> sink) override {
    bool closed;
    {
      std::lock_guard lock(mutex_);
      closed = closed_;
      if (!closed) {
        streams_[serial] = sink;
        stream_jobs_[serial] = {server_->next_job_id_.fetch_add(1, relaxed), wall_ns()};
      }
    }
    if (closed) sink->on_connection_closed(Error(Code::unavailable, "connection closed"));
  }
  void detach_stream(Serial serial) override {
    std::lock_guard lock(mutex_);
    stream_jobs_.erase(serial);
    if (streams_.erase(serial)) {
      // Frames the peer sent before it learnt the stream ended are dropped
      // quietly; anything for a serial never seen stays a protocol error.
      recently_closed_.push_back(serial);
      if (recently_closed_.size() > 1024) recently_closed_.pop_front();
    }
  }

  std::vector<std::shared_ptr<detail::CallState>> calls() {
    std::lock_guard lock(mutex_);
    std::vector<std::shared_ptr<detail::CallState>> out;
    for (auto& [serial, state] : calls_) out.push_back(state);
    return out;
  }

  void refuse(Code code, const std::string& reason) {
    refused_ = true;
    goodbye(code, reason);
  }

  void goodbye(Code code, const std::string& reason) {
    ferry::v1::GoodbyeNotice bye;
    bye.set_reason(reason);
    bye.set_code(static_cast<ferry::v1::Code>(code));
    push_message(Control::program, Control::version, Control::Goodbye::number, serialize(bye));
    connection_->close_after_flush(Error(code, reason));
  }

  std::shared_ptr<Connection> connection_;

 private:
  void reply_error(const Header& call, const Error& error) {
    Header h = call;
    h.type = FrameType::reply;
    h.status = FrameStatus::error;
    connection_->send(h, serialize(error.to_proto()));
  }

  void protocol_error(const std::string& why) {
    server_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
    spdlog::warn("protocol error from {} ({}): {}; closing the connection", peer().address, peer().transport, why);
    connection_->close(Error(Code::unavailable, "protocol error: " + why));
  }

  void on_call(const Header& h, Buffer body) {
    if (h.program == Control::program) {
      on_control(h, body);
      return;
    }
    if (!hello_done_) {
      reply_error(h, Error(Code::failed_precondition,
                           "Hello (program 0 procedure 1) must be the first call on a connection"));
      return;
    }
    if (!authenticated_) {
      reply_error(h, Error(Code::unauthenticated,
                           "authentication required: this listener needs SASL (AuthList, SaslStart, SaslStep) "
                           "before any call of program " + std::to_string(h.program)));
      return;
    }
    touch();
    if (server_->shutting_down_.load()) {
      reply_error(h, Error(Code::unavailable, "server is shutting down", "rpc", true));
      return;
    }
    const auto& programs = admin_ ? server_->admin_programs_ : server_->programs_;
    auto pit = programs.find(h.program);
    if (pit == programs.end()) {
      if (admin_) {
        reply_error(h, Error(Code::permission_denied,
                             "the admin socket serves only the admin program; program " + std::to_string(h.program) +
                                 " is served on the daemon's ordinary listeners"));
      } else if (auto ait = server_->admin_programs_.find(h.program); ait != server_->admin_programs_.end()) {
        spdlog::warn("client {} ({}) called the {} program on an ordinary listener; refused", peer().address,
                     peer().transport, ait->second->name());
        reply_error(h, Error(Code::permission_denied,
                             "program " + ait->second->name() + " (" + std::to_string(h.program) +
                                 ") is served only on the daemon's admin socket, not on " + peer().transport +
                                 " listeners"));
      } else {
        reply_error(h, Error(Code::unimplemented, "unknown program " + std::to_string(h.program)));
      }
      return;
    }
    const Program& program = *pit->second;
    if (h.version != program.version()) {
      reply_error(h, Error(Code::unimplemented, "program " + program.name() + " (" + std::to_string(h.program) +
                                                    ") version " + std::to_string(h.version) +
                                                    " is not supported; this server has version " +
                                                    std::to_string(program.version())));
      return;
    }
    const Program::Entry* entry = program.find(h.procedure);
    if (!entry) {
      reply_error(h, Error(Code::unimplemented, "program " + program.name() + " has no procedure " +
                                                    std::to_string(h.procedure)));
      return;
    }
    auto state = std::make_shared<detail::CallState>();
    state->sink = shared_from_this();
    state->header = h;
    state->procedure_name = entry->name;
    {
      std::lock_guard lock(mutex_);
      if (calls_.count(h.serial)) {
        // Two calls under one serial make every later reply ambiguous.
        protocol_error("serial " + std::to_string(h.serial) + " reused while its call is still in flight");
        return;
      }
      const auto refuse = [&](const std::string& why) {
        server_->calls_overloaded_.fetch_add(1, std::memory_order_relaxed);
        reply_error(h, Error(Code::resource_exhausted, why, "rpc", true));
      };
      // The admin socket is outside the global limits (it must answer when
      // the server is full) and outside the counters of application work.
      const LiveLimits& o = server_->live_;
      const std::size_t max_calls_per_client = o.max_calls_per_client.load(relaxed);
      if (calls_.size() >= max_calls_per_client) {
        refuse("too many calls in flight on this connection (limit " + std::to_string(max_calls_per_client) +
               ", max_calls_per_client); retry later");
        return;
      }
      const std::size_t max_calls = o.max_calls.load(relaxed);
      if (!admin_ && server_->calls_in_flight_.load(std::memory_order_relaxed) >= max_calls) {
        refuse("overloaded: " + std::to_string(max_calls) +
               " calls in flight across all clients (max_calls); retry later");
        return;
      }
      if (const std::size_t max_buffered = o.max_buffered_bytes.load(relaxed); max_buffered != 0 && !admin_) {
        if (const std::size_t held = server_->pool_->in_use_bytes(); held >= max_buffered) {
          refuse("overloaded: " + std::to_string(held) + " bytes buffered across all clients (max_buffered_bytes " +
                 std::to_string(max_buffered) + "); retry later");
          return;
        }
      }
      if (entry->opens_stream) {
        const std::size_t max_streams_per_client = o.max_streams_per_client.load(relaxed);
        if (stream_calls_.size() >= max_streams_per_client) {
          refuse("too many streams open on this connection (limit " + std::to_string(max_streams_per_client) +
                 ", max_streams_per_client); finish one and retry");
          return;
        }
        const std::size_t max_streams = o.max_streams.load(relaxed);
        if (!admin_ && server_->streams_in_flight_.fetch_add(1, std::memory_order_relaxed) >= max_streams) {
          server_->streams_in_flight_.fetch_sub(1, std::memory_order_relaxed);
          refuse("overloaded: " + std::to_string(max_streams) +
                 " streams open across all clients (max_streams); retry later");
          return;
        }
        stream_calls_.insert(h.serial);
      }
      calls_.emplace(h.serial, state);
    }
    if (!admin_) {
      server_->calls_in_flight_.fetch_add(1, std::memory_order_relaxed);
      server_->calls_total_.fetch_add(1, std::memory_order_relaxed);
    }
    // Handlers run on the connection's own io thread (or, if they may
    // block, on a strand of the worker pool), never on a thread of their own.
    // Stream handlers do theirs on the same io thread, from its stream-work
    // queue, which waits while calls and frames are ready (bulk_queue.h).
    asio::any_io_executor ex = connection_->get_executor();
    if (entry->may_block) {
      ex = asio::make_strand(server_->workers_);
    } else if (entry->opens_stream) {
      if (BulkQueue* bulk = server_->bulk_for(ex)) {
        state->urgent = std::make_shared<std::atomic<bool>>(false);
        ex = BulkExecutor(*bulk, state->urgent);
      }
    }
    if (!entry->invoke(state, std::move(body), ex)) {
      // DESIGN.md: a body that does not parse is a protocol error. Say so to
      // the caller first, so it sees why rather than a bare reset.
      state->finish_error(Error(Code::invalid_argument, "malformed CALL body for " + entry->name +
                                                            ": not a valid protobuf message; closing the connection"));
      server_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
      spdlog::warn("protocol error from {}: malformed CALL body for {} (serial {}); closing the connection",
                   peer().address, entry->name, h.serial);
      connection_->close_after_flush(Error(Code::unavailable, "protocol error: malformed CALL body for " + entry->name));
    }
  }

  void on_stream_frame(const Header& h, Buffer body) {
    std::shared_ptr<StreamSink> sink;
    bool recent = false;
    {
      std::lock_guard lock(mutex_);
      auto it = streams_.find(h.serial);
      if (it != streams_.end())
        sink = it->second;
      else
        recent = std::find(recently_closed_.begin(), recently_closed_.end(), h.serial) != recently_closed_.end();
    }
    if (sink) {
      sink->on_stream_frame(h, std::move(body));
    } else if (!recent) {
      protocol_error(std::string(to_string(h.type)) + " for serial " + std::to_string(h.serial) +
                     ", which opened no stream");
    }
  }

  void on_cancel(const Header& h) {
    std::shared_ptr<detail::CallState> state;
    std::shared_ptr<StreamSink> stream;
    {
      std::lock_guard lock(mutex_);
      auto it = calls_.find(h.serial);
      if (it == calls_.end()) return;  // already answered: a no-op by design
      state = it->second;
      auto sit = streams_.find(h.serial);
      if (sit != streams_.end()) stream = sit->second;
    }
    if (stream) stream->on_call_cancelled();
    detail::request_cancel(state);
  }

  void on_control(const Header& h, const Buffer& body) {
    switch (h.procedure) {
      case Control::Hello::number: {
        if (hello_done_) {
          reply_error(h, Error(Code::failed_precondition, "Hello was already done on this connection"));
          return;
        }
        HelloOffer offer;
        offer.limits = server_->options_.limits;
        offer.window = server_->options_.window;
        offer.name = server_->options_.name;
        offer.keepalive_interval = server_->options_.keepalive_interval;
        offer.keepalive_count = server_->options_.keepalive_count;
        offer.auth_required = auth_ == AuthMode::sasl;
        HelloAccepted accepted;
        try {
          accepted = negotiate_hello(std::span<const std::uint8_t>(body.data(), body.size()), offer);
        } catch (const Error& e) {
          reply_error(h, e);
          if (e.code() == Code::invalid_argument)
            connection_->close_after_flush(Error(Code::unavailable, "protocol error: malformed Hello"));
          return;
        }
        const auto& reply = accepted.reply;
        {
          std::lock_guard lock(mutex_);
          client_name_ = accepted.client_name;
        }
        connection_->set_limits(accepted.limits);
        max_frame_.store(accepted.limits.max_frame, std::memory_order_relaxed);
        {
          std::lock_guard lock(mutex_);
          stream_limits_.window = accepted.window;
          stream_limits_.chunk_size = accepted.limits.max_chunk;
        }
        hello_done_ = true;
        Header r = h;
        r.type = FrameType::reply;
        r.status = FrameStatus::ok;
        connection_->send(r, serialize(reply));
        if (auth_ == AuthMode::none) mark_authenticated();
        spdlog::debug("client {} ({}) said hello as '{}'", peer().address, peer().transport, client_name_);
        return;
      }
      case Control::KeepalivePing::number: {
        ferry::v1::Ping ping;
        ferry::v1::Pong pong;
        if (ping.ParseFromArray(body.data(), static_cast<int>(body.size()))) pong.set_token(ping.token());
        Header r = h;
        r.type = FrameType::reply;
        r.status = FrameStatus::ok;
        connection_->send(r, serialize(pong));
        return;
      }
      case Control::AuthList::number: {
        if (!hello_done_) {
          reply_error(h, Error(Code::failed_precondition, "Hello must come before AuthList"));
          return;
        }
        ferry::v1::AuthListReply reply;  // empty: this listener asks for no SASL
        if (auth_ == AuthMode::sasl && !authenticated_) {
          try {
            for (auto& m : sasl().mechanisms()) reply.add_mechanisms(m);
          } catch (const Error& e) {
            reply_error(h, e);
            return;
          }
        }
        Header r = h;
        r.type = FrameType::reply;
        connection_->send(r, serialize(reply));
        return;
      }
      case Control::SaslStart::number:
      case Control::SaslStep::number:
        on_sasl(h, body);
        return;
      default:
        reply_error(h, Error(Code::unimplemented, "program 0 has no procedure " + std::to_string(h.procedure)));
        return;
    }
  }

  SaslServer& sasl() {
    if (!sasl_) sasl_ = std::make_unique<SaslServer>(server_->options_.sasl, peer(), std::string(), peer().address);
    return *sasl_;
  }

  // SaslStart / SaslStep. Cyrus may read its password database (or ask
  // saslauthd), so the step runs on the worker pool; the reader holds until
  // the answer is queued, because the next byte may already be protected
  // by the security layer this step negotiates.
  void on_sasl(const Header& h, const Buffer& body) {
    if (!hello_done_) {
      reply_error(h, Error(Code::failed_precondition, "Hello must come before SASL"));
      return;
    }
    if (auth_ != AuthMode::sasl) {
      reply_error(h, Error(Code::failed_precondition, "this listener does not use SASL (auth is " +
                                                          std::string(to_string(auth_)) + ")"));
      return;
    }
    if (authenticated_) {
      reply_error(h, Error(Code::failed_precondition, "already authenticated on this connection"));
      return;
    }
    std::string mechanism;
    SaslToken token;
    const bool start = h.procedure == Control::SaslStart::number;
    bool parsed;
    if (start) {
      ferry::v1::SaslStartCall call;
      parsed = call.ParseFromArray(body.data(), static_cast<int>(body.size()));
      mechanism = call.mechanism();
      if (call.has_data() || !call.data().empty()) token = call.data();
    } else {
      ferry::v1::SaslStepCall call;
      parsed = call.ParseFromArray(body.data(), static_cast<int>(body.size()));
      if (call.has_data() || !call.data().empty()) token = call.data();
    }
    if (!parsed) {
      reply_error(h, Error(Code::invalid_argument, "malformed SASL body; closing the connection"));
      connection_->close_after_flush(Error(Code::unavailable, "protocol error: malformed SASL body"));
      return;
    }
    try {
      (void)sasl();
    } catch (const Error& e) {
      reply_error(h, e);
      return;
    }
    connection_->hold_reads();
    auto self = shared_from_this();
    asio::post(server_->workers_, [self, h, start, mechanism = std::move(mechanism), token = std::move(token)] {
      std::optional<SaslResult> result;
      std::optional<Error> error;
      try {
        result = start ? self->sasl_->start(mechanism, token) : self->sasl_->step(token);
      } catch (const Error& e) {
        error = e;
      } catch (const std::exception& e) {
        error = Error(Code::internal, std::string("SASL step failed: ") + e.what(), "sasl");
      }
      asio::dispatch(self->connection_->get_executor(),
                     [self, h, result = std::move(result), error = std::move(error)] {
                       self->sasl_done(h, result, error);
                     });
    });
  }

  void sasl_done(const Header& h, const std::optional<SaslResult>& result, const std::optional<Error>& error) {
    if (error) {
      reply_error(h, *error);
      server_->auth_failures_.fetch_add(1, std::memory_order_relaxed);
      if (++auth_failures_ >= 3) {
        spdlog::warn("client {}: {} failed authentication attempts; closing", peer().address, auth_failures_);
        goodbye(Code::unauthenticated, "too many failed authentication attempts");
      }
      connection_->resume_reads();
      return;
    }
    ferry::v1::SaslStepReply reply;
    reply.set_complete(result->complete);
    if (result->data) {
      reply.set_data(*result->data);
      reply.set_has_data(true);
    }
    std::shared_ptr<SecurityLayer> layer;
    if (result->complete && peer().transport != "tls" && peer().transport != "grpcs") layer = sasl_->layer();
    reply.set_ssf(layer ? result->ssf : 0);
    Header r = h;
    r.type = FrameType::reply;
    r.status = FrameStatus::ok;
    connection_->send(r, serialize(reply));
    if (result->complete) {
      connection_->set_peer_auth(result->user, sasl_->mechanism(), layer ? result->ssf : 0);
      {
        std::lock_guard lock(mutex_);
        identity_.user = result->user;
        identity_.mechanism = sasl_->mechanism();
        identity_.ssf = layer ? result->ssf : 0;
      }
      if (layer) connection_->secure_writes(layer);
      spdlog::info("client {} authenticated as '{}' with {}{}", peer().address, result->user, sasl_->mechanism(),
                   layer ? " (security layer, SSF " + std::to_string(result->ssf) + ")" : std::string());
      mark_authenticated();
    }
    connection_->resume_reads(layer);
  }

  void release_unauthenticated() {
    if (counted_unauthenticated_.exchange(false)) server_->unauthenticated_.fetch_sub(1);
  }

  void mark_authenticated() {
    authenticated_ = true;
    release_unauthenticated();
    auth_timer_.cancel();
  }

  void auth_timed_out() {
    if (authenticated_ || refused_) return;
    server_->auth_failures_.fetch_add(1, std::memory_order_relaxed);
    const std::string what = auth_ == AuthMode::sasl ? "authentication" : "Hello";
    spdlog::warn("client {} ({}): {} not completed within {} (auth_timeout); closing", peer().address,
                 peer().transport, what, ms_text(auth_timeout_));
    refuse(Code::unauthenticated,
           what + " not completed within " + ms_text(auth_timeout_) + " (auth_timeout)");
  }

  void touch() {
    last_activity_.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
  }

  void arm_idle_timer(Clock::duration after) {
    std::weak_ptr<Session> weak = shared_from_this();
    idle_timer_.expires_after(after);
    idle_timer_.async_wait([weak](std::error_code ec) {
      if (ec) return;
      if (auto self = weak.lock()) self->check_idle();
    });
  }

  void check_idle() {
    const auto timeout = server_->live_.idle_timeout();
    if (timeout.count() <= 0) return;  // switched off at run time
    bool busy;
    {
      std::lock_guard lock(mutex_);
      busy = !calls_.empty() || !streams_.empty() || closed_;
    }
    const auto last = Clock::time_point(Clock::duration(last_activity_.load(std::memory_order_relaxed)));
    const auto idle = Clock::now() - last;
    if (busy || idle < timeout) {
      arm_idle_timer(busy ? Clock::duration(timeout) : timeout - idle);
      return;
    }
    spdlog::info("client {} idle for {} (idle_timeout); closing", peer().address, ms_text(timeout));
    goodbye(Code::unavailable, "idle for " + ms_text(timeout) + " with nothing in flight (idle_timeout); reconnect when needed");
  }

  const std::uint64_t id_;
  const bool admin_;
  const std::int64_t connected_ns_;
  Impl* server_;
  AuthMode auth_;
  std::atomic<bool> authenticated_{false};  // written on the strand only
  std::chrono::milliseconds auth_timeout_{0};
  std::atomic<bool> counted_unauthenticated_;
  std::unique_ptr<SaslServer> sasl_;  // strand, or the worker running a step while reads are held
  unsigned auth_failures_ = 0;
  asio::steady_timer auth_timer_;
  asio::steady_timer idle_timer_;
  std::atomic<Clock::rep> last_activity_{0};
  std::unordered_set<Serial> stream_calls_;  // guarded by mutex_
  mutable std::mutex mutex_;
  std::unordered_map<Serial, std::shared_ptr<StreamSink>> streams_;
  std::deque<Serial> recently_closed_;
  StreamLimits stream_limits_;
  std::unordered_map<Serial, std::shared_ptr<detail::CallState>> calls_;
  bool closed_ = false;
  bool hello_done_ = false;  // strand only
  std::atomic<bool> refused_{false};
  std::atomic<std::uint32_t> max_frame_{FrameLimits{}.max_frame};
  std::string client_name_;  // guarded by mutex_
  PeerIdentity identity_;    // guarded by mutex_: the peer as accepted, then who SASL said it is
  // Open streams as admin jobs: serial -> (job id, started).
  std::unordered_map<Serial, std::pair<std::uint64_t, std::int64_t>> stream_jobs_;  // guarded by mutex_
};

void Server::Impl::accept_connection(std::unique_ptr<Transport> transport, bool counted_unauthenticated,
                                     Clock::time_point accepted, bool admin) {
  if (options_.fault.any() && !admin) transport = std::make_unique<FaultTransport>(std::move(transport), options_.fault);
  ConnectionOptions copts;
  copts.limits = options_.limits;
  copts.keepalive_interval = options_.keepalive_interval;
  copts.keepalive_count = options_.keepalive_count;
  copts.socket_buffer_bytes = options_.socket_buffer_bytes;
  copts.max_queued_bytes = live_.max_buffered_bytes_per_client.load(relaxed);
  copts.pool = pool_;
  auto connection = std::make_shared<Connection>(std::move(transport), copts);
  const PeerIdentity& peer = connection->peer();
  // Admin connections are outside max_clients and the unauthenticated
  // count: the administrator gets in when the server is full.
  if (!counted_unauthenticated && !admin) counted_unauthenticated = admit_unauthenticated();
  auto session = std::make_shared<Session>(this, connection, counted_unauthenticated, admin);
  // Why this client is turned away, if it is: said in a Goodbye, then closed.
  std::optional<std::pair<Code, std::string>> refusal;
  {
    std::lock_guard lock(mutex_);
    std::size_t count = 0, admins = 0;
    for (const auto& s : sessions_) (s->admin() ? admins : count)++;
    const std::size_t max_clients = live_.max_clients.load(relaxed);
    if (shutting_down_.load()) {
      refusal.emplace(Code::unavailable, "server is shutting down");
    } else if (admin) {
      if (admins >= max_admin_clients)
        refusal.emplace(Code::resource_exhausted, "too many admin connections (" + std::to_string(max_admin_clients) +
                                                      "); try again later");
      else
        sessions_.insert(session);
    } else if (count >= max_clients) {
      refusal.emplace(Code::resource_exhausted,
                      "too many clients (max_clients " + std::to_string(max_clients) + "); try again later");
    } else if (!counted_unauthenticated) {
      refusal.emplace(Code::resource_exhausted,
                      "too many connections still authenticating (max_unauthenticated_clients " +
                          std::to_string(live_.max_unauthenticated_clients.load(relaxed)) + "); try again later");
    } else {
      sessions_.insert(session);
    }
  }
  if (!refusal && admin && (!peer.uid || (*peer.uid != 0 && *peer.uid != static_cast<int>(::geteuid())))) {
    refusal.emplace(Code::permission_denied,
                    "uid " + (peer.uid ? std::to_string(*peer.uid) : std::string("?")) +
                        " may not use the admin socket (only root and uid " + std::to_string(::geteuid()) +
                        ", the daemon's own, may)");
  }
  if (!refusal && !admin && peer.transport == "unix" && !unix_allowed_uids_.empty() &&
      (!peer.uid || std::find(unix_allowed_uids_.begin(), unix_allowed_uids_.end(), *peer.uid) ==
                        unix_allowed_uids_.end())) {
    refusal.emplace(Code::permission_denied, "uid " + (peer.uid ? std::to_string(*peer.uid) : std::string("?")) +
                                                 " is not allowed to use this socket (unix_allowed_users)");
  }
  if (!refusal && (peer.transport == "tls" || peer.transport == "grpcs") && !dn_allowed(peer.tls_subject, options_.tls.allowed_dn)) {
    refusal.emplace(Code::permission_denied,
                    peer.tls_subject.empty()
                        ? std::string("a client certificate is required (tls allowed_dn is set)")
                        : "client certificate '" + peer.tls_subject + "' is not in the allowed DN list");
  }
  if (refusal) {
    clients_refused_.fetch_add(1, std::memory_order_relaxed);
    if (refusal->first == Code::permission_denied) auth_failures_.fetch_add(1, std::memory_order_relaxed);
    if (refusal->first != Code::unavailable)
      spdlog::warn("refusing client {} ({}): {}", peer.address, peer.transport, refusal->second);
    {
      std::lock_guard lock(mutex_);
      sessions_.erase(session);
    }
    // A session that is never listed: it only says why, then closes. It is
    // marked refused before it starts reading, so it answers nothing else.
    session->refuse(refusal->first, refusal->second);
    connection->start(session);
    return;
  }
  spdlog::debug("client {} (id {}) connected over {}{}", peer.address, session->id(), peer.transport,
                admin ? " (admin socket)" : "");
  connection->start(session);
  asio::dispatch(connection->get_executor(), [session, accepted] { session->start_timers(accepted); });
}

asio::awaitable<void> Server::Impl::tls_handshake(asio::ip::tcp::socket socket, Clock::time_point accepted) {
  // Counted as unauthenticated (by the caller) from accept on.
  std::string address = "?";
  {
    std::error_code ec;
    auto ep = socket.remote_endpoint(ec);
    if (!ec) address = ep.address().to_string() + ":" + std::to_string(ep.port());
  }
  std::unique_ptr<Transport> transport;
  try {
    transport = co_await TlsTransport::accept(std::move(socket), tls_context(), live_.auth_timeout());
  } catch (const Error& e) {
    auth_failures_.fetch_add(1, std::memory_order_relaxed);
    handshakes_.fetch_sub(1);
    unauthenticated_.fetch_sub(1);
    spdlog::warn("{}", e.message());
    co_return;
  }
  handshakes_.fetch_sub(1);
  accept_connection(std::move(transport), true, accepted);
}

void Server::Impl::session_closed(const std::shared_ptr<Session>& session) {
  const auto st = session->connection_->stats();
  std::lock_guard lock(mutex_);
  closed_bytes_in_ += st.bytes_in;
  closed_bytes_out_ += st.bytes_out;
  sessions_.erase(session);
  cv_.notify_all();
}

template <class Acceptor>
asio::awaitable<void> Server::Impl::accept_loop(Acceptor& acceptor, std::string name, bool tls, bool admin) {
  while (!shutting_down_.load()) {
    auto [ec, socket] = co_await acceptor.async_accept(next_context(), use_tuple);
    if (ec == asio::error::operation_aborted || shutting_down_.load()) break;
    if (ec) {
      // EMFILE and friends: log, breathe, keep serving the clients we have.
      spdlog::error("accept on {} failed: {}", name, ec.message());
      asio::steady_timer t(io(), std::chrono::milliseconds(100));
      co_await t.async_wait(use_tuple);
      continue;
    }
    const auto accepted = Clock::now();
    using Protocol = typename std::decay_t<decltype(socket)>::protocol_type;
    if constexpr (std::is_same_v<Protocol, asio::local::stream_protocol>) {
      accept_connection(std::make_unique<UnixTransport>(UnixTransport::Socket(std::move(socket))), false, accepted,
                        admin);
    } else if (!tls) {
      accept_connection(std::make_unique<TcpTransport>(TcpTransport::Socket(std::move(socket))), false, accepted);
    } else {
      // Handshakes in progress are bounded by max_unauthenticated_clients;
      // past that there is no way to say why (TLS is not up), so the socket
      // is just closed. max_clients is checked after the handshake, where
      // a Goodbye can say so.
      if (!admit_unauthenticated()) {
        clients_refused_.fetch_add(1, std::memory_order_relaxed);
        std::error_code rec;
        auto ep = socket.remote_endpoint(rec);
        spdlog::warn("refusing TLS client {}: max_unauthenticated_clients ({}) reached",
                     rec ? std::string("?") : ep.address().to_string(), live_.max_unauthenticated_clients.load(relaxed));
        socket.close(rec);
        continue;
      }
      handshakes_.fetch_add(1);
      auto executor = socket.get_executor();
      asio::co_spawn(executor, tls_handshake(std::move(socket), accepted), asio::detached);
    }
  }
}

void Server::Impl::begin_shutdown() {
  shutting_down_.store(true);
  asio::post(io(), [this] {
    std::error_code ec;
    for (auto& a : unix_acceptors_) a->close(ec);
    for (auto& a : admin_acceptors_) a->close(ec);
    for (auto& a : tcp_acceptors_) a.acceptor->close(ec);
  });
}

Server::Server(ServerOptions options) : impl_(std::make_shared<Impl>(std::move(options))) {}

Server::~Server() { shutdown(std::chrono::milliseconds(0)); }

void Server::add_program(std::shared_ptr<Program> program) { impl_->programs_[program->id()] = std::move(program); }
void Server::add_admin_program(std::shared_ptr<Program> program) {
  impl_->admin_programs_[program->id()] = std::move(program);
}

Endpoint Server::listen_admin(const std::string& path) {
  prepare_unix_listen_path(path);
  auto acceptor = std::make_unique<asio::local::stream_protocol::acceptor>(impl_->io());
  std::error_code ec;
  acceptor->open(asio::local::stream_protocol(), ec);
  // Created 0600 from the start (no window in which another user may
  // connect), then chmod in case the umask was stricter.
  const mode_t old_mask = ::umask(0177);
  if (!ec) acceptor->bind(asio::local::stream_protocol::endpoint(path), ec);
  ::umask(old_mask);
  if (!ec && ::chmod(path.c_str(), 0600) != 0) ec = std::error_code(errno, std::generic_category());
  if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) throw Error(Code::unavailable, "cannot listen on the admin socket " + path + ": " + ec.message());
  impl_->admin_acceptors_.push_back(std::move(acceptor));
  impl_->unix_paths_.push_back(path);
  spdlog::info("admin socket {} (mode 0600, uid 0 and {} only)", path, ::geteuid());
  return Endpoint::unix_socket(path);
}

void Server::Impl::resolve_unix_allowed_users() {
  if (!unix_allowed_uids_.empty()) return;
  for (const auto& u : options_.unix_allowed_users) {
    auto uid = lookup_id(u, false);
    if (!uid) throw Error(Code::invalid_argument, "unix_allowed_users: no such user '" + u + "'");
    unix_allowed_uids_.push_back(*uid);
  }
}

std::string Server::Impl::add_inet_acceptor(std::unique_ptr<asio::ip::tcp::acceptor> acceptor, bool tls,
                                            Endpoint& endpoint) {
  if (tls) {
    endpoint.kind = Endpoint::Kind::tls;
    std::lock_guard lock(tls_mutex_);
    if (!tls_) tls_ = TlsContext::server(options_.tls);
  }
  const AuthMode auth = auth_for(tls ? "tls" : "tcp");
  if (auth == AuthMode::sasl) sasl_global_init();
  tcp_acceptors_.push_back(InetAcceptor{std::move(acceptor), tls});
  return std::string("auth ") + to_string(auth) +
         (tls ? options_.tls.verify_peer ? ", client certificates required" : ", no client certificates" : "");
}

Endpoint Server::listen(const Endpoint& endpoint) {
  if (endpoint.is_grpc()) {
#if FERRY_HAVE_GRPC
    // gRPC accepts on its own threads; each new stream is handed to the
    // first io thread, like a socket from an acceptor, and runs on a strand
    // of the next io thread.
    Impl* impl = impl_.get();
    auto listener = std::make_unique<GrpcListener>(
        endpoint, impl->options_.tls, [impl] { return asio::any_io_executor(impl->next_context().get_executor()); },
        [impl](std::unique_ptr<Transport> transport) {
          const auto accepted = Clock::now();
          asio::post(impl->io(), [impl, accepted, transport = std::move(transport)]() mutable {
            impl->accept_connection(std::move(transport), false, accepted);
          });
        });
    Endpoint result = listener->endpoint();
    const bool secure = endpoint.kind == Endpoint::Kind::grpcs;
    if (impl->auth_for(secure ? "grpcs" : "grpc") == AuthMode::sasl) sasl_global_init();
    impl->grpc_listeners_.push_back(std::move(listener));
    spdlog::info("listening on {} (auth {}{})", result.to_string(), to_string(impl->auth_for(secure ? "grpcs" : "grpc")),
                 secure ? impl->options_.tls.verify_peer && !impl->options_.tls.ca_file.empty()
                              ? ", client certificates required"
                              : ", no client certificates"
                        : "");
    return result;
#else
    throw Error(Code::unimplemented, "cannot listen on " + endpoint.to_string() + ": ferry was built without gRPC");
#endif
  }
  if (endpoint.kind == Endpoint::Kind::unix_socket) {
    prepare_unix_listen_path(endpoint.path);
    auto acceptor = std::make_unique<asio::local::stream_protocol::acceptor>(impl_->io());
    std::error_code ec;
    acceptor->open(asio::local::stream_protocol(), ec);
    if (!ec) acceptor->bind(asio::local::stream_protocol::endpoint(endpoint.path), ec);
    if (!ec && ::chmod(endpoint.path.c_str(), impl_->options_.unix_socket_mode) != 0)
      ec = std::error_code(errno, std::generic_category());
    if (!ec && !impl_->options_.unix_socket_group.empty()) {
      auto gid = lookup_id(impl_->options_.unix_socket_group, true);
      if (!gid)
        throw Error(Code::invalid_argument, "unix socket group '" + impl_->options_.unix_socket_group + "' does not exist");
      if (::chown(endpoint.path.c_str(), static_cast<uid_t>(-1), static_cast<gid_t>(*gid)) != 0)
        ec = std::error_code(errno, std::generic_category());
    }
    impl_->resolve_unix_allowed_users();
    if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) throw Error(Code::unavailable, "cannot listen on " + endpoint.to_string() + ": " + ec.message());
    impl_->unix_acceptors_.push_back(std::move(acceptor));
    impl_->unix_paths_.push_back(endpoint.path);
    spdlog::info("listening on {}", endpoint.to_string());
    return endpoint;
  }
  asio::ip::tcp::resolver resolver(impl_->io());
  std::error_code ec;
  auto results = resolver.resolve(endpoint.host, std::to_string(endpoint.port), asio::ip::tcp::resolver::passive, ec);
  if (ec || results.empty())
    throw Error(Code::invalid_argument, "cannot resolve listen address " + endpoint.to_string() + ": " + ec.message());
  auto ep = results.begin()->endpoint();
  auto acceptor = std::make_unique<asio::ip::tcp::acceptor>(impl_->io());
  acceptor->open(ep.protocol(), ec);
  if (!ec) acceptor->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor->bind(ep, ec);
  if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) throw Error(Code::unavailable, "cannot listen on " + endpoint.to_string() + ": " + ec.message());
  auto bound = acceptor->local_endpoint();
  Endpoint result = Endpoint::tcp(bound.address().to_string(), bound.port());
  const std::string auth = impl_->add_inet_acceptor(std::move(acceptor), endpoint.kind == Endpoint::Kind::tls, result);
  spdlog::info("listening on {} ({})", result.to_string(), auth);
  return result;
}

Endpoint Server::adopt(int fd, Endpoint::Kind kind) {
  // Closes fd on every error path until an acceptor owns it.
  struct Owned {
    int fd;
    ~Owned() {
      if (fd >= 0) ::close(fd);
    }
    int release() { return std::exchange(fd, -1); }
  } owned{fd};
  const std::string which = "descriptor " + std::to_string(fd);
  if (kind == Endpoint::Kind::grpc || kind == Endpoint::Kind::grpcs)
    throw Error(Code::invalid_argument, which + ": gRPC listeners cannot be handed over, only unix, tcp and tls ones");
  const int family = listening_stream_family(fd);
  const bool want_unix = kind == Endpoint::Kind::unix_socket;
  if (want_unix != (family == AF_UNIX))
    throw Error(Code::invalid_argument, which + " is an " + socket_family_name(family) + " socket; a " +
                                            (want_unix ? "unix" : kind == Endpoint::Kind::tls ? "tls" : "tcp") +
                                            " listener needs " + (want_unix ? "an AF_UNIX" : "an AF_INET or AF_INET6") +
                                            " one");
  std::error_code ec;
  if (want_unix) {
    auto acceptor = std::make_unique<asio::local::stream_protocol::acceptor>(impl_->io());
    acceptor->assign(asio::local::stream_protocol(), fd, ec);
    if (ec) throw Error(Code::unavailable, "cannot serve " + which + ": " + ec.message());
    owned.release();
    auto local = acceptor->local_endpoint(ec);
    std::string path = ec ? std::string() : local.path();
    if (!path.empty() && path.front() == '\0') path = "@" + path.substr(1);  // abstract socket
    impl_->resolve_unix_allowed_users();
    impl_->unix_acceptors_.push_back(std::move(acceptor));
    Endpoint result = Endpoint::unix_socket(path);
    spdlog::info("listening on {} (socket handed over as {})", result.to_string(), which);
    return result;
  }
  auto acceptor = std::make_unique<asio::ip::tcp::acceptor>(impl_->io());
  acceptor->assign(family == AF_INET6 ? asio::ip::tcp::v6() : asio::ip::tcp::v4(), fd, ec);
  if (ec) throw Error(Code::unavailable, "cannot serve " + which + ": " + ec.message());
  owned.release();
  auto bound = acceptor->local_endpoint(ec);
  if (ec) throw Error(Code::unavailable, "cannot serve " + which + ": " + ec.message());
  Endpoint result = Endpoint::tcp(bound.address().to_string(), bound.port());
  const std::string auth = impl_->add_inet_acceptor(std::move(acceptor), kind == Endpoint::Kind::tls, result);
  spdlog::info("listening on {} (socket handed over as {}; {})", result.to_string(), which, auth);
  return result;
}

void Server::start() {
  auto& impl = *impl_;
  {
    std::lock_guard lock(impl.mutex_);
    if (impl.started_) return;
    impl.started_ = true;
  }
  for (auto& a : impl.unix_acceptors_)
    asio::co_spawn(impl.io(), impl.accept_loop(*a, "unix", false), asio::detached);
  for (auto& a : impl.admin_acceptors_)
    asio::co_spawn(impl.io(), impl.accept_loop(*a, "admin", false, true), asio::detached);
  for (auto& a : impl.tcp_acceptors_)
    asio::co_spawn(impl.io(), impl.accept_loop(*a.acceptor, a.tls ? "tls" : "tcp", a.tls), asio::detached);
  for (unsigned i = 0; i < impl.io_threads_; ++i) {
    impl.threads_.emplace_back([&impl, i] {
      asio::io_context& context = *impl.contexts_[i];
      auto guard = asio::make_work_guard(context);
      for (;;) {
        try {
          if (impl.options_.calls_before_streams)
            run_io_thread(context, *impl.bulk_[i]);
          else
            context.run();
          break;
        } catch (const std::exception& e) {
          spdlog::critical("uncaught exception on an io thread: {}", e.what());
        }
      }
    });
  }
}

void Server::reload_tls() {
  {
    std::lock_guard lock(impl_->tls_mutex_);
    if (!impl_->tls_) return;  // no TLS listener
  }
  auto fresh = TlsContext::server(impl_->options_.tls);  // throws, keeping the old one
  std::shared_ptr<TlsContext> old;
  {
    std::lock_guard lock(impl_->tls_mutex_);
    old = std::move(impl_->tls_);
    impl_->tls_ = fresh;
  }
  spdlog::info("TLS certificate reloaded: {} (was {})", fresh->fingerprint(), old ? old->fingerprint() : "none");
}

void Server::shutdown(std::chrono::milliseconds grace) {
  auto& impl = *impl_;
  {
    std::lock_guard lock(impl.mutex_);
    if (impl.stopped_) return;
    impl.stopped_ = true;
  }
  impl.begin_shutdown();
  using clock = std::chrono::steady_clock;
  auto wait_calls = [&](clock::time_point until) {
    while (impl.calls_in_flight_.load() > 0 && clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
  };
  if (impl.started_) {
    wait_calls(clock::now() + grace);
    std::vector<std::shared_ptr<Impl::Session>> sessions;
    {
      std::lock_guard lock(impl.mutex_);
      sessions.assign(impl.sessions_.begin(), impl.sessions_.end());
    }
    if (impl.calls_in_flight_.load() > 0) {
      spdlog::info("shutdown: cancelling {} calls still in flight", impl.calls_in_flight_.load());
      for (auto& s : sessions)
        for (auto& c : s->calls()) detail::request_cancel(c);
      wait_calls(clock::now() + std::chrono::seconds(1));
      for (auto& s : sessions)
        for (auto& c : s->calls())
          c->finish_error(Error(Code::unavailable, "server shut down before the call completed", "rpc", true));
    }
    for (auto& s : sessions) s->goodbye(Code::unavailable, "server is shutting down");
    {
      std::unique_lock lock(impl.mutex_);
      impl.cv_.wait_for(lock, std::chrono::seconds(3), [&] { return impl.sessions_.empty(); });
    }
  }
#if FERRY_HAVE_GRPC
  // Sessions have said Goodbye; streams still open are cancelled.
  for (auto& g : impl.grpc_listeners_) g->shutdown(std::chrono::milliseconds(500));
#endif
  for (auto& c : impl.contexts_) c->stop();
  for (auto& t : impl.threads_)
    if (t.joinable()) t.join();
  impl.threads_.clear();
  for (auto& b : impl.bulk_) b->clear();
  impl.workers_.stop();
  impl.workers_.join();
  for (auto& path : impl.unix_paths_) ::unlink(path.c_str());
  // Sessions still listed hold the server through their handler states;
  // drop them so the io objects can be destroyed in order.
  {
    std::lock_guard lock(impl.mutex_);
    impl.sessions_.clear();
    impl.done_ = true;
    impl.cv_.notify_all();
  }
}

void Server::wait() {
  auto& impl = *impl_;
  std::unique_lock lock(impl.mutex_);
  impl.cv_.wait(lock, [&] { return impl.done_; });
}

ServerStats Server::stats() const {
  ServerStats s;
  {
    std::lock_guard lock(impl_->mutex_);
    s.bytes_in = impl_->closed_bytes_in_;
    s.bytes_out = impl_->closed_bytes_out_;
    for (const auto& session : impl_->sessions_) {
      const auto st = session->connection_->stats();
      s.bytes_in += st.bytes_in;
      s.bytes_out += st.bytes_out;
      s.read_pauses += session->connection_->read_pauses();
      if (session->admin()) {
        ++s.admin_clients;
        continue;
      }
      ++s.clients;
      ++s.clients_by_transport[session->connection_->peer().transport];
    }
  }
  s.clients_total = impl_->next_client_id_.load() - 1;
  s.io_threads = impl_->io_threads_;
  s.worker_threads = std::max(1u, impl_->options_.worker_threads);
  s.calls_in_flight = impl_->calls_in_flight_.load();
  s.streams_in_flight = impl_->streams_in_flight_.load();
  s.calls_overloaded = impl_->calls_overloaded_.load();
  s.calls_total = impl_->calls_total_.load();
  s.calls_cancelled = impl_->calls_cancelled_.load();
  s.protocol_errors = impl_->protocol_errors_.load();
  s.clients_refused = impl_->clients_refused_.load();
  s.clients_unauthenticated = impl_->unauthenticated_.load();
  s.auth_failures = impl_->auth_failures_.load();
  s.buffer_bytes_in_use = impl_->pool_->in_use_bytes();
  return s;
}

asio::io_context& Server::io_context() { return impl_->io(); }
asio::io_context& Server::next_io_context() { return impl_->next_context(); }
std::shared_ptr<BufferPool> Server::buffer_pool() { return impl_->pool_; }

}  // namespace ferry::rpc

namespace ferry::rpc {

std::vector<std::shared_ptr<Server::Impl::Session>> Server::Impl::session_list() const {
  std::lock_guard lock(mutex_);
  return {sessions_.begin(), sessions_.end()};
}

std::shared_ptr<Server::Impl::Session> Server::Impl::find_session(std::uint64_t id) const {
  std::lock_guard lock(mutex_);
  for (const auto& s : sessions_)
    if (s->id() == id) return s;
  return nullptr;
}

ServerLimits Server::limits() const {
  const auto& l = impl_->live_;
  ServerLimits out;
  out.max_clients = l.max_clients.load();
  out.max_unauthenticated_clients = l.max_unauthenticated_clients.load();
  out.max_calls = l.max_calls.load();
  out.max_streams = l.max_streams.load();
  out.max_calls_per_client = l.max_calls_per_client.load();
  out.max_streams_per_client = l.max_streams_per_client.load();
  out.max_buffered_bytes_per_client = l.max_buffered_bytes_per_client.load();
  out.max_buffered_bytes = l.max_buffered_bytes.load();
  out.auth_timeout = l.auth_timeout();
  out.idle_timeout = l.idle_timeout();
  return out;
}

void Server::set_limits(const ServerLimits& limits) {
  auto need = [](std::size_t v, const char* name) {
    if (v == 0) throw Error(Code::invalid_argument, std::string(name) + " must be at least 1");
  };
  need(limits.max_clients, "max_clients");
  need(limits.max_unauthenticated_clients, "max_unauthenticated_clients");
  need(limits.max_calls, "max_calls");
  need(limits.max_streams, "max_streams");
  need(limits.max_calls_per_client, "max_calls_per_client");
  need(limits.max_streams_per_client, "max_streams_per_client");
  if (limits.auth_timeout.count() < 0 || limits.idle_timeout.count() < 0)
    throw Error(Code::invalid_argument, "timeouts may not be negative");
  auto& l = impl_->live_;
  l.max_clients = limits.max_clients;
  l.max_unauthenticated_clients = limits.max_unauthenticated_clients;
  l.max_calls = limits.max_calls;
  l.max_streams = limits.max_streams;
  l.max_calls_per_client = limits.max_calls_per_client;
  l.max_streams_per_client = limits.max_streams_per_client;
  l.max_buffered_bytes = limits.max_buffered_bytes;
  l.auth_timeout_ms = limits.auth_timeout.count();
  l.idle_timeout_ms = limits.idle_timeout.count();
  if (l.max_buffered_bytes_per_client.exchange(limits.max_buffered_bytes_per_client) !=
      limits.max_buffered_bytes_per_client) {
    // Clients connected now take the new bound too (the admin socket's own
    // connections included, as at accept).
    for (const auto& s : impl_->session_list()) s->connection()->set_max_queued_bytes(limits.max_buffered_bytes_per_client);
  }
}

std::vector<ClientInfo> Server::clients() const {
  std::vector<ClientInfo> out;
  for (const auto& s : impl_->session_list()) out.push_back(s->info());
  std::sort(out.begin(), out.end(), [](const ClientInfo& a, const ClientInfo& b) { return a.id < b.id; });
  return out;
}

std::optional<ClientInfo> Server::client(std::uint64_t id) const {
  if (auto s = impl_->find_session(id)) return s->info();
  return std::nullopt;
}

bool Server::disconnect(std::uint64_t id, const std::string& reason) {
  auto s = impl_->find_session(id);
  if (!s) return false;
  spdlog::info("client {} (id {}, {}) disconnected by the administrator: {}", s->peer().address, id,
               s->peer().transport, reason);
  s->goodbye(Code::aborted, reason);
  return true;
}

std::vector<StreamJob> Server::stream_jobs() const {
  std::vector<StreamJob> out;
  for (const auto& s : impl_->session_list()) {
    for (const auto& j : s->jobs()) {
      StreamJob job;
      job.id = j.id;
      job.client_id = s->id();
      job.started_ns = j.started_ns;
      job.procedure = j.state->procedure_name;
      {
        std::lock_guard lock(j.state->mutex);
        job.subject = j.state->subject;
      }
      job.bytes = j.sink->bytes_transferred();
      out.push_back(std::move(job));
    }
  }
  std::sort(out.begin(), out.end(), [](const StreamJob& a, const StreamJob& b) { return a.id < b.id; });
  return out;
}

bool Server::cancel_stream_job(std::uint64_t id, const Error& error) {
  for (const auto& s : impl_->session_list()) {
    auto jobs = s->jobs(id);
    if (jobs.empty()) continue;
    auto& j = jobs.front();
    spdlog::info("job {} ({} from {}, client id {}) ends: {}", id, j.state->procedure_name,
                 s->peer().address, s->id(), error.message());
    j.state->cancelled_by_admin.store(true);
    j.sink->abort_by_server(error);
    detail::request_cancel(j.state);
    return true;
  }
  return false;
}

}  // namespace ferry::rpc
