// Client: calls from any number of threads and coroutines over one
// connection, matched to replies by serial and completed out of order.
//
// Three ways to call, all on the same machinery (Asio's async_initiate):
//   co_await client.call<Test::Echo>(request);            // coroutine
//   client.call_future<Test::Echo>(request).get();        // blocking
//   client.async_call<Test::Echo>(request, {}, handler);  // any Asio token
// or through a generated stub: `Test::Stub stub(client); co_await stub.echo(req);`.
// A failed call throws (or hands the handler) ferry::Error; the completion
// signature is void(std::exception_ptr, Reply).
//
// Cancellation: CallOptions::cancel (a CancelSource), an Asio cancellation
// slot bound to the token (e.g. `co_await (call || timer)`), or a timeout.
// Cancel before the CALL reaches the socket and it is never sent; after,
// a CANCEL frame goes out and the call ends when the server answers (with
// CANCELLED once its handler has let go). A timeout ends the call at once
// with DEADLINE_EXCEEDED and still tells the server to stop.
//
// Reconnecting (ClientOptions::reconnect, off by default): after a lost
// connection the client connects again with backoff, sends again the calls
// in flight whose procedure is idempotent, fails the others and the streams
// with UNAVAILABLE, and holds calls made meanwhile until it is back.
//
// Threading: replies are read on the connection's strand; a coroutine
// resumes on its own executor; callbacks without an associated executor and
// futures complete on an io thread, so they must not block. Nothing holds a
// lock across I/O.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/dispatch.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "rpc/buffer.h"
#include "rpc/call_options.h"
#include "rpc/connection.h"
#include "rpc/error.h"
#include "rpc/sasl.h"
#include "rpc/stream_sink.h"
#include "rpc/fault_transport.h"
#include "rpc/tls.h"

namespace ferry::rpc {

// What happened during a reconnect, handed to ReconnectOptions::on_event.
struct ReconnectEvent {
  enum class Kind {
    lost,            // the connection ended; reconnecting starts
    attempt_failed,  // one connect attempt failed; `delay` until the next
    reconnected,     // connected and authenticated again; waiting calls go out
    gave_up,         // give_up_after or max_attempts reached (or a permanent error)
  };
  Kind kind = Kind::lost;
  unsigned attempt = 0;                 // 1-based number of the attempt (attempt_failed, reconnected, gave_up)
  std::chrono::milliseconds elapsed{};  // since the connection was lost
  // attempt_failed: the backoff the policy gives before the next attempt,
  // and the delay actually waited (with jitter, clamped to max_backoff and
  // to what is left of give_up_after).
  std::chrono::milliseconds backoff{};
  std::chrono::milliseconds delay{};
  // lost: why the connection ended; attempt_failed, gave_up: the connect error.
  std::optional<Error> error;
  // lost: what became of the calls in flight on the lost connection.
  std::size_t replaying = 0;             // idempotent calls, sent again once reconnected
  std::size_t failed_not_idempotent = 0; // failed with UNAVAILABLE
  std::size_t streams_failed = 0;        // streams in flight, failed
};

// Opt-in: when the connection is lost (peer closed or reset it, keepalive
// declared it unreachable, the daemon restarted), connect again to the same
// address with the same TLS and SASL credentials, backing off
// exponentially with jitter. Calls in flight are sent again only if their
// procedure is marked idempotent; the others fail with UNAVAILABLE. Calls
// made while reconnecting wait (bounded by their own timeout). Streams in
// flight fail. The first connect() is not retried. docs/libferry.md,
// "Reconnecting".
struct ReconnectOptions {
  bool enabled = false;
  std::chrono::milliseconds initial_backoff{100};  // after the first failed attempt
  std::chrono::milliseconds max_backoff{10000};
  double multiplier = 2;
  double jitter = 0.2;        // each delay is backoff * (1 +- jitter), at most max_backoff
  unsigned max_attempts = 0;  // 0: until give_up_after
  std::chrono::milliseconds give_up_after{60000};  // since the loss
  // Runs on an io thread, outside any lock: keep it short and do not block
  // on calls of this client (asynchronous calls are fine).
  std::function<void(const ReconnectEvent&)> on_event;
};

// Counters since the client was made (Client::reconnect_stats()).
struct ReconnectStats {
  std::uint64_t connections_lost = 0;
  std::uint64_t attempts = 0;  // connect attempts, failed and successful
  std::uint64_t reconnects = 0;
  std::uint64_t calls_replayed = 0;  // idempotent calls sent again on a new connection
  std::uint64_t calls_failed_not_idempotent = 0;
  std::uint64_t streams_failed = 0;
  std::uint64_t gave_up = 0;
};

struct ClientOptions {
  ConnectionOptions connection;
  std::uint32_t window = 4u << 20;  // stream credit window to propose
  std::string name = "libferry";
  // Covers the TCP connect, the TLS handshake, Hello and authentication.
  std::chrono::milliseconds connect_timeout{10000};
  // tls: addresses. `tls_context` (made once with TlsContext::client and
  // shared by many clients) wins over `tls`.
  TlsOptions tls;
  std::shared_ptr<TlsContext> tls_context;
  // Credentials for servers that ask for SASL (HelloReply.auth_required).
  SaslClientOptions sasl;
  // Faults injected into this connection's bytes (rpc/fault_transport.h),
  // for tests and for reproducing a field problem; off unless set.
  FaultOptions fault;
  // Reconnecting after a lost connection (off by default).
  ReconnectOptions reconnect;
};

// The domain of the errors a reconnecting client gives what it does not send
// again after a lost connection: streams in flight, calls in flight whose
// procedure is not idempotent, and streams opened while reconnecting. They
// are UNAVAILABLE; a caller that knows the operation is safe to repeat may
// start it again (it waits for the new connection).
inline constexpr std::string_view kReconnectDomain = "reconnect";
inline bool lost_with_reconnect(const Error& e) {
  return e.code() == Code::unavailable && e.domain() == kReconnectDomain;
}

// What a call's procedure allows, from the generated traits. `name` must
// outlive the call (the generated names are static).
struct ProcedureInfo {
  std::string_view name;
  bool idempotent = false;  // safe to send again on a new connection
};

template <class P>
constexpr ProcedureInfo procedure_info() {
  return ProcedureInfo{P::name, P::idempotent};
}

// What the server accepted in Hello.
struct ServerInfo {
  std::string name;
  std::uint32_t protocol_version = 0;
  FrameLimits limits;
  std::uint32_t window = 0;
  bool auth_required = false;
  // After SASL: the mechanism, the name we authenticated as and the
  // strength of the security layer (0: none, e.g. over TLS).
  std::string mechanism;
  std::string user;
  unsigned ssf = 0;
};

namespace detail {

struct RawResult {
  std::optional<Error> error;
  Buffer body;
};

class CallCompletion {
 public:
  virtual ~CallCompletion() = default;
  virtual void complete(RawResult result) = 0;
};

class ClientCore;
// Makes the sink for a stream-opening call once its serial is known, on the
// connection the CALL goes out on (with what that connection's Hello
// negotiated).
using StreamFactory =
    std::function<std::shared_ptr<StreamSink>(Serial, const std::shared_ptr<Connection>&, StreamLimits)>;
Serial start_call(const std::shared_ptr<ClientCore>& core, std::uint32_t program, std::uint32_t version,
                  std::uint32_t procedure, Buffer body, CallOptions options,
                  std::unique_ptr<CallCompletion> done, StreamFactory make_stream = nullptr,
                  ProcedureInfo info = {});
void cancel_call(const std::weak_ptr<ClientCore>& core, Serial serial);
asio::any_io_executor core_executor(ClientCore& core);
BufferPool* core_pool(ClientCore& core);

template <class Reply, class Handler>
class TypedCompletion final : public CallCompletion {
 public:
  TypedCompletion(Handler handler, asio::any_io_executor fallback)
      : handler_(std::move(handler)),
        work_(asio::make_work_guard(asio::get_associated_executor(handler_, fallback))) {}

  void complete(RawResult result) override {
    std::exception_ptr error;
    Reply reply;
    if (result.error) {
      error = std::make_exception_ptr(*result.error);
    } else if (!reply.ParseFromArray(result.body.data(), static_cast<int>(result.body.size()))) {
      error = std::make_exception_ptr(Error(Code::internal, "malformed REPLY body: not a valid " +
                                                                reply.GetTypeName() + " message"));
    }
    auto executor = work_.get_executor();
    work_.reset();
    asio::dispatch(executor, [handler = std::move(handler_), error, reply = std::move(reply)]() mutable {
      asio::get_associated_cancellation_slot(handler).clear();
      std::move(handler)(error, std::move(reply));
    });
  }

 private:
  Handler handler_;
  asio::executor_work_guard<asio::associated_executor_t<Handler, asio::any_io_executor>> work_;
};

template <class P, class Token>
auto async_call(const std::shared_ptr<ClientCore>& core, const typename P::Call& call, CallOptions options,
                Token&& token) {
  static_assert(!P::message, "MESSAGE procedures are not called; use on_message");
  // Serialized now, so the request may be a temporary even when the token
  // (use_awaitable) starts the operation later.
  return asio::async_initiate<Token, void(std::exception_ptr, typename P::Reply)>(
      [core](auto handler, Buffer body, CallOptions options) {
        using Handler = decltype(handler);
        auto slot = asio::get_associated_cancellation_slot(handler);
        auto completion = std::make_unique<TypedCompletion<typename P::Reply, Handler>>(std::move(handler),
                                                                                        core_executor(*core));
        Serial serial = start_call(core, P::Program::program, P::Program::version, P::number, std::move(body),
                                   std::move(options), std::move(completion), nullptr, procedure_info<P>());
        if (slot.is_connected()) {
          std::weak_ptr<ClientCore> weak = core;
          slot.assign([weak, serial](asio::cancellation_type) { cancel_call(weak, serial); });
        }
      },
      token, serialize(call, core_pool(*core)), std::move(options));
}

}  // namespace detail

class Client {
 public:
  // Connects, says Hello and returns a ready client. Throws ferry::Error
  // (UNAVAILABLE when the server cannot be reached or turns us away, with
  // its reason). `executor` runs the connection; its io_context must be run
  // by someone (see IoThreads).
  static asio::awaitable<Client> connect(asio::any_io_executor executor, std::string address,
                                         ClientOptions options = {});
  // Blocking form; must not be called from a thread running `executor`.
  static Client connect_sync(asio::any_io_executor executor, std::string address, ClientOptions options = {});

  // An empty client (connected to nothing) until assigned from connect().
  Client() = default;
  Client(Client&&) noexcept = default;
  Client& operator=(Client&&) noexcept;
  ~Client();

  template <class P, class Token>
  auto async_call(const typename P::Call& call, CallOptions options, Token&& token) {
    return detail::async_call<P>(core_, call, std::move(options), std::forward<Token>(token));
  }

  template <class P>
  asio::awaitable<typename P::Reply> call(const typename P::Call& call, CallOptions options = {}) {
    return async_call<P>(call, std::move(options), asio::use_awaitable);
  }

  template <class P>
  std::future<typename P::Reply> call_future(const typename P::Call& call, CallOptions options = {}) {
    return async_call<P>(call, std::move(options), asio::use_future);
  }

  // Registers a handler for a server-pushed MESSAGE procedure, replacing
  // the previous one. It runs on the connection's strand: keep it short.
  // When on_message returns, the handler it replaced is not running and will
  // not run again, so a handler may capture locals that a later
  // on_message (for example one with an empty handler) detaches it from.
  template <class P>
  void on_message(std::function<void(typename P::Call)> handler) {
    static_assert(P::message, "on_message takes a MESSAGE procedure");
    set_message_handler(P::Program::program, P::number,
                        [handler = std::move(handler)](const Buffer& body) {
                          typename P::Call msg;
                          if (msg.ParseFromArray(body.data(), static_cast<int>(body.size()))) handler(std::move(msg));
                        });
  }

  // Closes the connection (and stops reconnecting); calls in flight or
  // waiting fail with UNAVAILABLE. Safe to repeat.
  void close();
  // False once closed for good (by close(), a loss without reconnect, or
  // reconnecting having given up); true while reconnecting.
  bool is_open() const;
  // True while connected and authenticated (false while reconnecting).
  bool is_connected() const;
  // The current connection's: after a reconnect they describe the new one.
  ServerInfo server() const;
  PeerIdentity peer() const;
  ReconnectStats reconnect_stats() const;
  ConnectionStats stats() const;
  std::size_t calls_in_flight() const;
  asio::any_io_executor executor() const;
  // The connection underneath, for layers built on top (streams). With
  // reconnecting, the current one (a later call may return another).
  std::shared_ptr<Connection> connection() const;

  // Raw form: program/version/procedure and serialized body. Returns the
  // serial; `done` runs exactly once.
  // With `stream`, the call opens a stream: its frames go to the sink from
  // before the CALL is sent until detach_stream(). A stream is never sent
  // again after a reconnect, and one opened while reconnecting fails at once.
  // `info` (procedure_info<P>()) names the procedure in errors and says
  // whether the call may be sent again after a reconnect.
  Serial start_call(std::uint32_t program, std::uint32_t version, std::uint32_t procedure, Buffer body,
                    CallOptions options, std::unique_ptr<detail::CallCompletion> done,
                    detail::StreamFactory make_stream = nullptr, ProcedureInfo info = {}) {
    return detail::start_call(core_, program, version, procedure, std::move(body), std::move(options),
                              std::move(done), std::move(make_stream), info);
  }
  void detach_stream(Serial serial);
  StreamLimits stream_limits() const;
  void set_message_handler(std::uint32_t program, std::uint32_t procedure,
                           std::function<void(const Buffer&)> handler);

 private:
  explicit Client(std::shared_ptr<detail::ClientCore> core) : core_(std::move(core)) {}
  std::shared_ptr<detail::ClientCore> core_;
};

}  // namespace ferry::rpc
