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
#include <string>

#include "rpc/buffer.h"
#include "rpc/call_options.h"
#include "rpc/connection.h"
#include "rpc/error.h"
#include "rpc/sasl.h"
#include "rpc/stream_sink.h"
#include "rpc/fault_transport.h"
#include "rpc/tls.h"

namespace ferry::rpc {

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
};

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
// Makes the sink for a stream-opening call once its serial is known.
using StreamFactory = std::function<std::shared_ptr<StreamSink>(Serial)>;
Serial start_call(const std::shared_ptr<ClientCore>& core, std::uint32_t program, std::uint32_t version,
                  std::uint32_t procedure, Buffer body, CallOptions options,
                  std::unique_ptr<CallCompletion> done, StreamFactory make_stream = nullptr);
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
    static_assert(!P::message, "MESSAGE procedures are not called; use on_message");
    // Serialized now, so the request may be a temporary even when the token
    // (use_awaitable) starts the operation later.
    return asio::async_initiate<Token, void(std::exception_ptr, typename P::Reply)>(
        [core = core_](auto handler, Buffer body, CallOptions options) {
          using Handler = decltype(handler);
          auto slot = asio::get_associated_cancellation_slot(handler);
          auto completion = std::make_unique<detail::TypedCompletion<typename P::Reply, Handler>>(
              std::move(handler), detail::core_executor(*core));
          Serial serial = detail::start_call(core, P::Program::program, P::Program::version, P::number,
                                             std::move(body), std::move(options), std::move(completion));
          if (slot.is_connected()) {
            std::weak_ptr<detail::ClientCore> weak = core;
            slot.assign([weak, serial](asio::cancellation_type) { detail::cancel_call(weak, serial); });
          }
        },
        token, serialize(call, detail::core_pool(*core_)), std::move(options));
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

  // Closes the connection; calls in flight fail with UNAVAILABLE. Safe to repeat.
  void close();
  bool is_open() const;
  const ServerInfo& server() const;
  const PeerIdentity& peer() const;
  ConnectionStats stats() const;
  std::size_t calls_in_flight() const;
  asio::any_io_executor executor() const;
  // The connection underneath, for layers built on top (streams).
  std::shared_ptr<Connection> connection() const;

  // Raw form: program/version/procedure and serialized body. Returns the
  // serial; `done` runs exactly once.
  // With `stream`, the call opens a stream: its frames go to the sink from
  // before the CALL is sent until detach_stream().
  Serial start_call(std::uint32_t program, std::uint32_t version, std::uint32_t procedure, Buffer body,
                    CallOptions options, std::unique_ptr<detail::CallCompletion> done,
                    detail::StreamFactory make_stream = nullptr) {
    return detail::start_call(core_, program, version, procedure, std::move(body), std::move(options),
                              std::move(done), std::move(make_stream));
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
