#include "rpc/client.h"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/post.hpp>
#include <asio/strand.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <algorithm>
#include <cmath>
#include <map>
#include <random>
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
using Clock = std::chrono::steady_clock;

namespace {

std::chrono::milliseconds ms_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(to - from);
}

// Connect errors worth another attempt: the daemon is away, slow or full.
// Anything else (refused credentials, a protocol the server does not
// speak) would fail the same way again.
bool worth_retrying(const Error& e) {
  switch (e.code()) {
    case Code::unavailable:
    case Code::deadline_exceeded:
    case Code::resource_exhausted:
    case Code::aborted:
    case Code::unknown:
    case Code::internal:
      return true;
    default:
      return false;
  }
}

}  // namespace

class ClientCore;
asio::awaitable<void> establish(std::shared_ptr<ClientCore> core, bool initial);

// The FrameHandler of one connection: forwards to the core with the
// connection's number, so the core tells the current connection from one it
// has left behind. Holds the core until the connection has closed.
class Link final : public FrameHandler {
 public:
  Link(std::shared_ptr<ClientCore> core, std::uint64_t generation)
      : core_(std::move(core)), generation_(generation) {}
  void on_frame(const Header& header, Buffer body) override;
  void on_close(const Error& reason) override;

 private:
  std::shared_ptr<ClientCore> core_;
  std::uint64_t generation_;
};

// Calls matched to replies by serial, over one connection at a time.
//
// A call is tracked in pending_ from start() until it completes. It is sent
// on the connection numbered `generation`; 0 means it waits for one (made
// while reconnecting, or in flight on a lost connection and idempotent).
// Invariant: every pending call with generation != 0 went out on the
// current connection, because on_close() settles all calls of the
// connection it closes before another one is attached.
class ClientCore final : public std::enable_shared_from_this<ClientCore> {
 public:
  ClientCore(asio::any_io_executor io, Endpoint endpoint, ClientOptions options, std::shared_ptr<TlsContext> tls)
      : io_(io),
        loop_(asio::make_strand(io)),
        endpoint_(std::move(endpoint)),
        options_(std::move(options)),
        tls_(std::move(tls)),
        pool_(options_.connection.pool ? options_.connection.pool : BufferPool::create()),
        backoff_(loop_) {
    // One pool for every connection the client makes: bodies outlive them.
    options_.connection.pool = pool_;
  }

  const ClientOptions& options() const { return options_; }
  const Endpoint& endpoint() const { return endpoint_; }
  asio::any_io_executor io() const { return io_; }
  const std::shared_ptr<TlsContext>& tls() const { return tls_; }
  bool reconnect_enabled() const { return options_.reconnect.enabled; }

  Serial start(std::uint32_t program, std::uint32_t version, std::uint32_t procedure, Buffer body,
               CallOptions options, std::unique_ptr<CallCompletion> done, StreamFactory make_stream,
               ProcedureInfo info) {
    std::shared_ptr<StreamSink> stream;
    Pending pending;
    pending.done = std::move(done);
    pending.program = program;
    pending.version = version;
    pending.procedure = procedure;
    pending.info = info;
    pending.opens_stream = make_stream != nullptr;
    Serial serial;
    std::optional<Error> refused;
    std::shared_ptr<Connection> connection;
    StreamLimits limits;
    bool send_now = false;
    if (options.cancel && options.cancel->cancelled()) refused = Error(Code::cancelled, "call cancelled before it was sent");
    // Connection control (Hello, SASL) belongs to the handshake and goes
    // out on the connection being set up; everything else waits for it.
    const bool handshake = program == Control::program;
    {
      std::lock_guard lock(mutex_);
      do {
        serial = next_serial_++;
      } while (serial == 0 || pending_.count(serial));
      connection = connection_;
      limits = stream_limits_locked();
      const std::uint32_t max_frame =
          server_.limits.max_frame ? server_.limits.max_frame : options_.connection.limits.max_frame;
      if (!refused && body.size() > max_frame) {
        // The server would close the connection on such a frame; refuse it
        // here so only this call fails.
        refused = Error(Code::invalid_argument, "request of " + std::to_string(body.size()) +
                                                    " bytes exceeds the connection's maximum frame size of " +
                                                    std::to_string(max_frame) + " bytes");
      }
      if (refused) {
        // fall through to the refusal below
      } else if (state_ == State::closed) {
        refused = closed_reason_ ? *closed_reason_ : Error(Code::unavailable, "connection closed");
      } else if (state_ == State::connected || (handshake && state_ == State::handshaking)) {
        send_now = true;
        pending.generation = generation_;
        // Kept to send again on a new connection.
        if (reconnect_enabled() && info.idempotent && !make_stream && !handshake)
          pending.body = Buffer::copy_of(std::span<const std::uint8_t>(body.data(), body.size()));
      } else if (make_stream) {
        refused = Error(Code::unavailable,
                        "cannot open a " + name_of(pending) + " stream while reconnecting to " + endpoint_.to_string() +
                            last_error_suffix_locked() + "; streams are not queued",
                        std::string(kReconnectDomain));
      } else {
        pending.generation = 0;  // waits for the new connection
        pending.body = std::move(body);
      }
      if (!refused) {
        if (options.timeout) pending.timer = std::make_unique<asio::steady_timer>(io_, *options.timeout);
        pending.timeout = options.timeout;
        pending_.emplace(serial, std::move(pending));
        if (make_stream) {
          stream = make_stream(serial, connection, limits);
          streams_[serial] = stream;
        }
      }
    }
    if (refused) {
      if (make_stream) make_stream(serial, connection, limits)->on_connection_closed(*refused);
      pending.done->complete(RawResult{std::move(*refused), {}});
      return serial;
    }
    // Queue the CALL before arming the timer and the cancel watch: a cancel
    // that fires from here on either finds the CALL still queued (and
    // removes it) or sends CANCEL behind it, never ahead of it.
    if (send_now) {
      Header h{program, version, procedure, FrameType::call, serial, FrameStatus::ok};
      if (!connection->send(h, std::move(body))) {
        // Without reconnecting the call fails now; with it, the closed
        // connection's on_close decides (send again or fail).
        if (!reconnect_enabled() || handshake) fail(serial, closed_error());
        if (!reconnect_enabled()) return serial;
      }
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

  // Ask the server to stop; the call ends with the server's answer. A call
  // still waiting for a connection ends at once.
  void cancel(Serial serial) {
    Header h;
    std::shared_ptr<Connection> connection;
    std::optional<Pending> waiting;
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(serial);
      if (it == pending_.end() || it->second.cancel_sent) return;
      if (it->second.generation == 0) {
        waiting = std::move(it->second);
        pending_.erase(it);
      } else {
        it->second.cancel_sent = true;
        h = Header{it->second.program, it->second.version, it->second.procedure, FrameType::cancel, serial,
                   FrameStatus::ok};
        connection = connection_;
      }
    }
    if (waiting) {
      finish(std::move(*waiting),
             Error(Code::cancelled, "call cancelled while waiting for the connection to come back"));
      return;
    }
    if (connection->unqueue(serial, FrameType::call)) {
      fail(serial, Error(Code::cancelled, "call cancelled before it was sent"));
      return;
    }
    connection->send(h, {});
  }

  void expire(Serial serial) {
    Header h;
    std::chrono::milliseconds after{0};
    std::shared_ptr<Connection> connection;
    std::optional<Pending> waiting;
    std::string waiting_why;
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(serial);
      if (it == pending_.end()) return;
      if (it->second.timeout) after = std::chrono::duration_cast<std::chrono::milliseconds>(*it->second.timeout);
      if (it->second.generation == 0) {
        waiting = std::move(it->second);
        pending_.erase(it);
        waiting_why = " while waiting for the connection to " + endpoint_.to_string() + " to come back" +
                      last_error_suffix_locked();
      } else {
        h = Header{it->second.program, it->second.version, it->second.procedure, FrameType::cancel, serial,
                   FrameStatus::ok};
        if (it->second.cancel_sent) h.type = FrameType::call;  // marker: nothing more to send
        it->second.cancel_sent = true;
        connection = connection_;
      }
    }
    if (waiting) {
      finish(std::move(*waiting), Error(Code::deadline_exceeded,
                                        "deadline of " + std::to_string(after.count()) + " ms exceeded" + waiting_why));
      return;
    }
    const bool unsent = connection->unqueue(serial, FrameType::call);
    fail(serial, Error(Code::deadline_exceeded, "deadline of " + std::to_string(after.count()) +
                                                    " ms exceeded" + (unsent ? " before the call was sent" : "")));
    if (!unsent && h.type == FrameType::cancel) connection->send(h, {});
  }

  void fail(Serial serial, Error error) { complete(serial, RawResult{std::move(error), {}}); }

  // Completes the call if it is still pending (and, with `generation`, was
  // sent on that connection): exactly once, whatever races with it.
  void complete(Serial serial, RawResult result, std::uint64_t generation = 0) {
    Pending pending;
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(serial);
      if (it == pending_.end()) return;  // already completed (deadline, cancel race)
      if (generation && it->second.generation != generation) return;  // a reply from a connection left behind
      pending = std::move(it->second);
      pending_.erase(it);
    }
    finish(std::move(pending), std::move(result));
  }

  void on_frame(std::uint64_t generation, const Header& header, Buffer body) {
    std::shared_ptr<Connection> connection;
    {
      std::lock_guard lock(mutex_);
      if (generation != generation_) return;
      connection = connection_;
    }
    switch (header.type) {
      case FrameType::reply:
        // A SASL reply may be the last plaintext frame: read nothing more
        // until the exchange has looked at it (security_layer.h).
        if (header.program == Control::program &&
            (header.procedure == Control::SaslStart::number || header.procedure == Control::SaslStep::number))
          connection->hold_reads();
        if (header.status == FrameStatus::ok) {
          complete(header.serial, RawResult{std::nullopt, std::move(body)}, generation);
        } else {
          ferry::v1::Error e;
          if (!e.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
            complete(header.serial,
                     RawResult{Error(Code::internal, "server sent an ERROR reply whose body does not parse"), {}},
                     generation);
          } else {
            complete(header.serial, RawResult{Error::from_proto(e), {}}, generation);
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

  void on_close(std::uint64_t generation, const Error& reason) {
    Settle settle;
    bool start_loop = false;
    ReconnectEvent event;
    Error why = reason;
    {
      std::lock_guard lock(mutex_);
      if (generation != generation_) return;  // not the current connection: nothing of ours is on it
      if (goodbye_) why = *goodbye_;
      if (state_ == State::connected && reconnect_enabled() && !closing_) {
        state_ = State::reconnecting;
        lost_at_ = Clock::now();
        last_connect_error_.reset();
        ++stats_.connections_lost;
        start_loop = true;
        loop_running_ = true;
        event.kind = ReconnectEvent::Kind::lost;
        event.error = why;
        const std::string where = endpoint_.to_string();
        for (auto it = pending_.begin(); it != pending_.end();) {
          Pending& p = it->second;
          const Serial serial = it->first;
          if (p.generation != generation) {
            ++it;
            continue;
          }
          std::optional<Error> error;
          if (p.opens_stream) {
            error = Error(Code::unavailable,
                          "connection to " + where + " lost during the " + name_of(p) + " stream (" + why.message() +
                              "); streams are not sent again",
                          std::string(kReconnectDomain));
            if (auto s = streams_.find(serial); s != streams_.end()) {
              settle.streams.emplace_back(s->second, *error);
              streams_.erase(s);
            }
            ++stats_.streams_failed;
            ++event.streams_failed;
          } else if (p.cancel_sent) {
            error = Error(Code::cancelled, "call cancelled; the connection to " + where +
                                               " was lost before the server answered");
          } else if (p.info.idempotent) {
            p.generation = 0;
            p.replay = true;
            ++event.replaying;
          } else {
            error = Error(Code::unavailable,
                          "connection to " + where + " lost before the reply (" + why.message() +
                              "); not replayed because " + name_of(p) + " is not idempotent: it may or may not have run",
                          std::string(kReconnectDomain));
            ++stats_.calls_failed_not_idempotent;
            ++event.failed_not_idempotent;
          }
          if (error) {
            settle.calls.emplace_back(std::move(p), std::move(*error));
            it = pending_.erase(it);
          } else {
            ++it;
          }
        }
        // Stream sinks whose call already ended (detached late): closed too.
        for (auto& [serial, s] : streams_) settle.streams.emplace_back(s, why);
        streams_.clear();
      } else if (state_ != State::closed && loop_running_ && !closing_) {
        // A reconnect attempt's connection: its handshake calls fail, the
        // attempt reports it; the calls waiting go on waiting.
        state_ = State::reconnecting;
        take_generation_locked(generation, why, settle);
      } else {
        // Closed for good: by the client, without reconnecting, or the
        // handshake of the first connect failed.
        state_ = State::closed;
        if (!closed_reason_) closed_reason_ = why;
        take_all_locked(*closed_reason_, settle);
      }
    }
    if (!start_loop) {
      settle.run();
      return;
    }
    {
      spdlog::warn("client: connection to {} lost ({}); reconnecting ({} calls to send again, {} failed as not "
                   "idempotent, {} streams failed)",
                   endpoint_.to_string(), why.message(), event.replaying, event.failed_not_idempotent,
                   event.streams_failed);
      // Reported before the calls fail (as for gave_up).
      notify(event);
      settle.run();
      asio::co_spawn(loop_, reconnect_loop(shared_from_this()), asio::detached);
    }
  }

  // A new connection becomes the current one; its handshake may start.
  // Returns its number, 0 if the client was closed meanwhile.
  std::uint64_t attach(std::shared_ptr<Connection> connection) {
    std::lock_guard lock(mutex_);
    if (closing_ || state_ == State::closed) return 0;
    connection_ = std::move(connection);
    ++generation_;
    state_ = State::handshaking;
    goodbye_.reset();
    return generation_;
  }

  // The handshake on connection `generation` is done: calls go out on it,
  // first those waiting. False if it was lost meanwhile.
  bool connected(std::uint64_t generation, const ServerInfo& info) {
    std::lock_guard lock(mutex_);
    if (generation != generation_ || state_ != State::handshaking || closing_) return false;
    state_ = State::connected;
    server_ = info;
    // Oldest first: serials grow with time.
    std::vector<Serial> order;
    for (auto& [serial, p] : pending_)
      if (p.generation == 0) order.push_back(serial);
    std::sort(order.begin(), order.end());
    for (Serial serial : order) {
      Pending& p = pending_.at(serial);
      p.generation = generation;
      if (p.replay) ++stats_.calls_replayed;
      Header h{p.program, p.version, p.procedure, FrameType::call, serial, FrameStatus::ok};
      Buffer body = p.info.idempotent ? Buffer::copy_of(std::span<const std::uint8_t>(p.body.data(), p.body.size()))
                                      : std::move(p.body);
      // Queued under the lock, so a cancel cannot overtake it; if the
      // connection is already gone its on_close settles the call.
      connection_->send(h, std::move(body));
    }
    return true;
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
    return state_ != State::closed;
  }
  bool is_connected() const {
    std::lock_guard lock(mutex_);
    return state_ == State::connected;
  }
  std::shared_ptr<Connection> connection() const {
    std::lock_guard lock(mutex_);
    return connection_;
  }
  ServerInfo server() const {
    std::lock_guard lock(mutex_);
    return server_;
  }
  StreamLimits stream_limits() const {
    std::lock_guard lock(mutex_);
    return stream_limits_locked();
  }
  ReconnectStats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  BufferPool* pool() { return pool_.get(); }

  // Client::close(): no more reconnecting; everything pending fails.
  void close_by_client() {
    Settle settle;
    std::shared_ptr<Connection> connection;
    bool loop_running = false;
    const Error why(Code::unavailable, "connection closed by the client");
    {
      std::lock_guard lock(mutex_);
      closing_ = true;
      loop_running = loop_running_;
      connection = connection_;
      if (state_ == State::reconnecting) {
        state_ = State::closed;
        closed_reason_ = why;
        take_all_locked(why, settle);
      }
    }
    settle.run();
    if (connection) connection->close(why);
    if (loop_running) asio::post(loop_, [self = shared_from_this()] { self->backoff_.cancel(); });
  }

  void detach(Serial serial) {
    std::lock_guard lock(mutex_);
    streams_.erase(serial);
  }

  asio::any_io_executor executor_;  // fallback for completions: the first connection's strand

 private:
  enum class State { handshaking, connected, reconnecting, closed };

  struct Pending {
    std::unique_ptr<CallCompletion> done;
    std::unique_ptr<asio::steady_timer> timer;
    std::optional<std::chrono::steady_clock::duration> timeout;
    std::shared_ptr<CancelSource> cancel;
    std::size_t watch_id = 0;
    std::uint32_t program = 0, version = 0, procedure = 0;
    bool cancel_sent = false;
    ProcedureInfo info;
    std::uint64_t generation = 0;  // the connection it went out on; 0: waiting for one
    bool replay = false;           // in flight on a lost connection, to be sent again
    bool opens_stream = false;     // never sent again: its data is not kept
    Buffer body;                   // while waiting; after sending, only if it may be sent again
  };

  // Failures collected under the lock, delivered after it.
  struct Settle {
    std::vector<std::pair<Pending, Error>> calls;
    std::vector<std::pair<std::shared_ptr<StreamSink>, Error>> streams;
    void run() {
      for (auto& [s, e] : streams) s->on_connection_closed(e);
      for (auto& [p, e] : calls) finish(std::move(p), RawResult{std::move(e), {}});
    }
  };

  static void finish(Pending pending, RawResult result) {
    if (pending.timer) pending.timer->cancel();
    if (pending.cancel && pending.watch_id) pending.cancel->forget(pending.watch_id);
    pending.done->complete(std::move(result));
  }
  static void finish(Pending pending, Error error) { finish(std::move(pending), RawResult{std::move(error), {}}); }

  static std::string name_of(const Pending& p) {
    if (!p.info.name.empty()) return std::string(p.info.name);
    return "procedure " + std::to_string(p.procedure) + " of program " + std::to_string(p.program);
  }

  std::string last_error_suffix_locked() const {
    return last_connect_error_ ? " (last attempt: " + last_connect_error_->message() + ")" : std::string();
  }

  StreamLimits stream_limits_locked() const {
    StreamLimits l;
    if (server_.window) l.window = server_.window;
    if (server_.limits.max_chunk) l.chunk_size = server_.limits.max_chunk;
    return l;
  }

  void take_generation_locked(std::uint64_t generation, const Error& why, Settle& settle) {
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->second.generation == generation) {
        settle.calls.emplace_back(std::move(it->second), why);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto& [serial, s] : streams_) settle.streams.emplace_back(s, why);
    streams_.clear();
  }

  void take_all_locked(const Error& why, Settle& settle) {
    for (auto& [serial, p] : pending_) settle.calls.emplace_back(std::move(p), why);
    pending_.clear();
    for (auto& [serial, s] : streams_) settle.streams.emplace_back(s, why);
    streams_.clear();
  }

  void notify(const ReconnectEvent& event) {
    if (options_.reconnect.on_event) options_.reconnect.on_event(event);
  }

  static asio::awaitable<void> reconnect_loop(std::shared_ptr<ClientCore> self);
  friend asio::awaitable<void> establish(std::shared_ptr<ClientCore> core, bool initial);
  void give_up(unsigned attempt, const Error& last, std::chrono::milliseconds elapsed, const std::string& why);

  asio::any_io_executor io_;
  asio::strand<asio::any_io_executor> loop_;  // the reconnect loop and its timer
  Endpoint endpoint_;
  ClientOptions options_;
  std::shared_ptr<TlsContext> tls_;
  std::shared_ptr<BufferPool> pool_;
  asio::steady_timer backoff_;

  mutable std::mutex mutex_;
  std::recursive_mutex dispatch_mutex_;  // taken before mutex_, never after
  std::unordered_map<Serial, Pending> pending_;
  std::unordered_map<Serial, std::shared_ptr<StreamSink>> streams_;
  Serial next_serial_ = 1;
  std::shared_ptr<Connection> connection_;
  std::uint64_t generation_ = 0;
  State state_ = State::handshaking;
  bool closing_ = false;       // Client::close() was called
  bool loop_running_ = false;  // reconnect_loop() is running
  ServerInfo server_;
  std::optional<Error> closed_reason_;
  std::optional<Error> goodbye_;
  std::optional<Error> last_connect_error_;
  Clock::time_point lost_at_;
  ReconnectStats stats_;
  std::map<std::pair<std::uint32_t, std::uint32_t>, std::function<void(const Buffer&)>> message_handlers_;
};

void Link::on_frame(const Header& header, Buffer body) { core_->on_frame(generation_, header, std::move(body)); }
void Link::on_close(const Error& reason) { core_->on_close(generation_, reason); }

Serial start_call(const std::shared_ptr<ClientCore>& core, std::uint32_t program, std::uint32_t version,
                  std::uint32_t procedure, Buffer body, CallOptions options,
                  std::unique_ptr<CallCompletion> done, StreamFactory make_stream, ProcedureInfo info) {
  return core->start(program, version, procedure, std::move(body), std::move(options), std::move(done),
                     std::move(make_stream), info);
}

void cancel_call(const std::weak_ptr<ClientCore>& weak, Serial serial) {
  if (auto core = weak.lock()) core->cancel(serial);
}

asio::any_io_executor core_executor(ClientCore& core) { return core.executor_; }
BufferPool* core_pool(ClientCore& core) { return core.pool(); }


namespace {

// Calls of the handshake, made on the core directly (no Client owns it yet,
// or it is reconnecting).
struct Caller {
  std::shared_ptr<ClientCore> core;
  template <class P>
  asio::awaitable<typename P::Reply> call(const typename P::Call& request, CallOptions options = {}) {
    return async_call<P>(core, request, std::move(options), asio::use_awaitable);
  }
};

// The SASL exchange of connection start (sasl.h). Every SaslStart/SaslStep
// reply holds the reader; each path out of here resumes it, with the
// security layer when one was negotiated.
asio::awaitable<void> authenticate(Caller& client, Connection& connection, ServerInfo& info, const Endpoint& endpoint,
                                   const ClientOptions& options) {
  using Control = ferry::v1::Control;
  if (!options.sasl.enabled())
    throw Error(Code::unauthenticated, "server " + endpoint.to_string() +
                                           " requires SASL authentication; give a user name and password");
  const auto timeout = with_timeout(options.connect_timeout);
  const ferry::v1::AuthListCall list_call;
  const auto list = co_await client.call<Control::AuthList>(list_call, timeout);
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

asio::awaitable<void> hello_and_auth(Caller& client, Connection& connection, ServerInfo& info, const Endpoint& endpoint,
                                     const ClientOptions& options) {
  ferry::v1::HelloCall hello;
  hello.set_protocol_version(1);
  hello.set_max_frame(options.connection.limits.max_frame);
  hello.set_chunk_size(options.connection.limits.max_chunk);
  hello.set_window(options.window);
  hello.set_client_name(options.name);
  hello.set_keepalive_interval_ms(static_cast<std::uint32_t>(options.connection.keepalive_interval.count()));
  hello.set_keepalive_count(options.connection.keepalive_count);
  const CallOptions hello_options = with_timeout(options.connect_timeout);
  auto reply = co_await client.call<ferry::v1::Control::Hello>(hello, hello_options);
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


// Connects the transport, says Hello, authenticates; on success the new
// connection is the core's current one and waiting calls have gone out on
// it. Throws the connect or handshake error.
asio::awaitable<void> establish(std::shared_ptr<ClientCore> core, bool initial) {
  const ClientOptions& options = core->options();
  const Endpoint& endpoint = core->endpoint();
  auto transport = co_await connect_transport(core->io(), endpoint, core->tls(), options.connect_timeout);
  if (options.fault.any()) transport = std::make_unique<FaultTransport>(std::move(transport), options.fault);
  // No keepalive probes until the connection is set up: a probe must not
  // slip between the last SASL step and the security layer switch.
  ConnectionOptions copts = options.connection;
  copts.keepalive_interval = std::chrono::milliseconds(0);
  auto connection = std::make_shared<Connection>(std::move(transport), copts);
  if (initial) core->executor_ = connection->get_executor();
  const std::uint64_t generation = core->attach(connection);
  if (generation == 0) {
    connection->close(Error(Code::unavailable, "connection closed by the client"));
    throw Error(Code::unavailable, "connection closed by the client");
  }
  connection->start(std::make_shared<Link>(core, generation));

  ServerInfo info;
  Caller caller{core};
  // Run as a child and take its exception as a value: no try/catch around
  // co_await (GCC 12 coroutines mishandle it).
  auto [failure] = co_await asio::co_spawn(core->io(), hello_and_auth(caller, *connection, info, endpoint, options),
                                           asio::experimental::as_tuple(asio::use_awaitable));
  if (failure) {
    const Error error = Error::from_exception(failure);
    connection->close(error);
    std::string why = error.message();
    // A TLS listener drops a plaintext Hello without a word.
    if (endpoint.kind == Endpoint::Kind::tcp && info.protocol_version == 0 && error.code() == Code::unavailable &&
        why.find("closed by peer") != std::string::npos)
      why += "; if that port is a TLS listener, connect with ferry+tls://";
    throw Error(error.code() == Code::deadline_exceeded ? Code::unavailable : error.code(),
                "handshake with " + endpoint.to_string() + " failed: " + why, error.domain(), error.retryable());
  }
  connection->set_keepalive(options.connection.keepalive_interval, options.connection.keepalive_count);
  if (!core->connected(generation, info))
    throw Error(Code::unavailable, "connection to " + endpoint.to_string() + " lost right after the handshake");
}

asio::awaitable<void> ClientCore::reconnect_loop(std::shared_ptr<ClientCore> self) {
  const ReconnectOptions& policy = self->options_.reconnect;
  const std::string where = self->endpoint_.to_string();
  Clock::time_point lost;
  {
    std::lock_guard lock(self->mutex_);
    lost = self->lost_at_;
  }
  std::minstd_rand rng(std::random_device{}());
  std::uniform_real_distribution<double> spread(-1.0, 1.0);
  const double multiplier = std::max(1.0, policy.multiplier);
  const double jitter = std::clamp(policy.jitter, 0.0, 1.0);
  std::chrono::milliseconds backoff = std::min(policy.initial_backoff, policy.max_backoff);
  for (unsigned attempt = 1;; ++attempt) {
    {
      std::lock_guard lock(self->mutex_);
      if (self->closing_) {
        self->loop_running_ = false;
        co_return;
      }
      ++self->stats_.attempts;
    }
    spdlog::info("client: reconnecting to {}, attempt {}", where, attempt);
    auto [failure] = co_await asio::co_spawn(self->loop_, establish(self, false),
                                             asio::experimental::as_tuple(asio::use_awaitable));
    const auto elapsed = ms_between(lost, Clock::now());
    if (!failure) {
      {
        std::lock_guard lock(self->mutex_);
        ++self->stats_.reconnects;
        self->loop_running_ = false;
        self->last_connect_error_.reset();
      }
      spdlog::info("client: reconnected to {} at attempt {}, {} ms after the loss", where, attempt, elapsed.count());
      ReconnectEvent event;
      event.kind = ReconnectEvent::Kind::reconnected;
      event.attempt = attempt;
      event.elapsed = elapsed;
      self->notify(event);
      co_return;
    }
    const Error error = Error::from_exception(failure);
    bool closing = false;
    {
      std::lock_guard lock(self->mutex_);
      closing = self->closing_;
      self->last_connect_error_ = error;
      if (closing) self->loop_running_ = false;
    }
    if (closing) co_return;
    spdlog::warn("client: reconnect attempt {} to {} failed: {}", attempt, where, error.describe());
    if (!worth_retrying(error)) {
      self->give_up(attempt, error, elapsed, "the error is not one a retry can cure");
      co_return;
    }
    if (policy.max_attempts && attempt >= policy.max_attempts) {
      self->give_up(attempt, error, elapsed, "max_attempts reached");
      co_return;
    }
    if (elapsed >= policy.give_up_after) {
      self->give_up(attempt, error, elapsed, "give_up_after reached");
      co_return;
    }
    const double jittered = static_cast<double>(backoff.count()) * (1.0 + jitter * spread(rng));
    auto delay = std::chrono::milliseconds(static_cast<std::int64_t>(
        std::llround(std::clamp(jittered, 0.0, static_cast<double>(policy.max_backoff.count())))));
    delay = std::min(delay, policy.give_up_after - elapsed);
    ReconnectEvent event;
    event.kind = ReconnectEvent::Kind::attempt_failed;
    event.attempt = attempt;
    event.elapsed = elapsed;
    event.backoff = backoff;
    event.delay = delay;
    event.error = error;
    self->notify(event);
    backoff = std::min(policy.max_backoff, std::chrono::milliseconds(static_cast<std::int64_t>(
                                               std::llround(static_cast<double>(backoff.count()) * multiplier))));
    self->backoff_.expires_after(delay);
    co_await self->backoff_.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
  }
}

void ClientCore::give_up(unsigned attempt, const Error& last, std::chrono::milliseconds elapsed,
                         const std::string& why) {
  Settle settle;
  const Error reason(Code::unavailable,
                     "gave up reconnecting to " + endpoint_.to_string() + " after " + std::to_string(attempt) +
                         (attempt == 1 ? " attempt" : " attempts") + " in " + std::to_string(elapsed.count()) +
                         " ms (" + why + "); last error: " + last.message(),
                     last.domain(), false);
  {
    std::lock_guard lock(mutex_);
    state_ = State::closed;
    closed_reason_ = reason;
    loop_running_ = false;
    ++stats_.gave_up;
    take_all_locked(reason, settle);
  }
  spdlog::error("client: {}", reason.message());
  // Reported before the calls fail, so a caller that sees its call fail
  // finds the event already delivered.
  ReconnectEvent event;
  event.kind = ReconnectEvent::Kind::gave_up;
  event.attempt = attempt;
  event.elapsed = elapsed;
  event.error = last;
  notify(event);
  settle.run();
}

}  // namespace detail

asio::awaitable<Client> Client::connect(asio::any_io_executor executor, std::string address, ClientOptions options) {
  const Endpoint endpoint = Endpoint::parse(address);
  std::shared_ptr<TlsContext> tls = options.tls_context;
  if (!tls && endpoint.is_secure()) tls = TlsContext::client(options.tls);
  auto core = std::make_shared<detail::ClientCore>(executor, endpoint, std::move(options), std::move(tls));
  co_await detail::establish(core, true);
  co_return Client(core);
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
  if (core_) core_->close_by_client();
}

bool Client::is_open() const { return core_ && core_->open(); }
bool Client::is_connected() const { return core_ && core_->is_connected(); }
ServerInfo Client::server() const { return core_->server(); }
PeerIdentity Client::peer() const { return core_->connection()->peer(); }
ReconnectStats Client::reconnect_stats() const { return core_->stats(); }
ConnectionStats Client::stats() const { return core_->connection()->stats(); }
std::size_t Client::calls_in_flight() const { return core_->in_flight(); }
asio::any_io_executor Client::executor() const { return core_->executor_; }
std::shared_ptr<Connection> Client::connection() const { return core_->connection(); }
void Client::detach_stream(Serial serial) {
  if (core_) core_->detach(serial);
}
StreamLimits Client::stream_limits() const { return core_->stream_limits(); }

void Client::set_message_handler(std::uint32_t program, std::uint32_t procedure,
                                 std::function<void(const Buffer&)> handler) {
  core_->set_message_handler(program, procedure, std::move(handler));
}

}  // namespace ferry::rpc
