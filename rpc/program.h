// Program: one service's procedures, as the server dispatches them.
//
// A program is built from the traits protoc-gen-ferry generates, one line
// per procedure:
//
//   auto program = Program::of<Test>();
//   program->on<Test::Echo>([](const EchoCall& call, CallContext& ctx) -> asio::awaitable<EchoReply> {...});
//   program->on<Test::Slow>([](const SlowCall& call, ReplyToken<SlowReply> token) { ...later: token.reply(r); });
//
// Two handler shapes, both without a thread per request:
//  - a coroutine returning asio::awaitable<Reply>; it runs on its own strand
//    of the io threads (or the worker pool for may_block procedures), may
//    co_await anything, and a CANCEL from the client arrives as terminal
//    cancellation (an awaited timer or socket op throws operation_aborted);
//  - a callback taking a move-only ReplyToken it may complete later, from
//    any thread. If the token dies unanswered the caller gets INTERNAL
//    ("handler abandoned the call"), or CANCELLED if a cancel was asked, so
//    no caller waits forever.
// A handler that throws ferry::Error answers with that error; any other
// exception becomes INTERNAL and is logged.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/post.hpp>
#include <google/protobuf/message_lite.h>
#include <atomic>
#include <concepts>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>

#include "rpc/buffer.h"
#include "rpc/connection.h"
#include "rpc/error.h"
#include "rpc/frame.h"
#include "rpc/stream_sink.h"
#include "rpc/transport.h"

namespace ferry::rpc {

class Connection;

namespace detail {

// Where a call's answer goes; implemented by the server's per-connection
// session. Thread-safe.
class CallSink {
 public:
  virtual ~CallSink() = default;
  // `lane`: bulk for the final REPLY of a stream, so it follows the
  // stream's last chunk instead of overtaking it.
  virtual void finish_call(const Header& call, FrameStatus status, Buffer body, Lane lane) = 0;
  virtual bool push_message(std::uint32_t program, std::uint32_t version, std::uint32_t procedure,
                            Buffer body) = 0;
  virtual const PeerIdentity& peer() const = 0;
  virtual void note_cancelled() = 0;
  virtual BufferPool* pool() = 0;
  // Streams: the connection, what Hello negotiated, and routing of this
  // serial's stream frames to a sink until detached.
  virtual std::shared_ptr<Connection> connection() = 0;
  virtual StreamLimits stream_limits() const = 0;
  virtual void attach_stream(Serial serial, std::shared_ptr<StreamSink> sink) = 0;
  virtual void detach_stream(Serial serial) = 0;
};

// Shared by the dispatcher, the handler's context/token and the CANCEL path.
struct CallState {
  std::shared_ptr<CallSink> sink;
  Header header;
  std::string procedure_name;
  asio::any_io_executor executor;      // where the handler runs
  // Set with the cancel: a stream handler's remaining work leaves the
  // io thread's stream queue for its call queue (bulk_queue.h). Null for
  // handlers not on a BulkExecutor.
  std::shared_ptr<std::atomic<bool>> urgent;
  asio::cancellation_signal signal;    // emitted on `executor` only
  std::atomic<bool> finished{false};
  std::atomic<bool> cancel_requested{false};
  // The cancel came from the server's administrator (JobCancel), not the
  // client: the error says so.
  std::atomic<bool> cancelled_by_admin{false};
  Lane reply_lane = Lane::control;     // set before the handler starts
  std::mutex mutex;                    // guards on_cancel and subject
  std::function<void()> on_cancel;
  std::string subject;                 // what the call works on, for the admin job list

  // The error of a call that was cancelled (by the client or the admin).
  Error cancelled_error() const {
    return cancelled_by_admin.load() ? Error(Code::cancelled, "cancelled by the administrator")
                                     : Error(Code::cancelled, "call cancelled by the client");
  }

  // First answer wins; later ones are dropped (cancel/shutdown races).
  bool finish(FrameStatus status, Buffer body) {
    if (finished.exchange(true)) return false;
    sink->finish_call(header, status, std::move(body), reply_lane);
    return true;
  }
  bool finish_ok(const google::protobuf::MessageLite& reply) {
    return finish(FrameStatus::ok, serialize(reply, sink->pool()));
  }
  bool finish_error(const Error& error);
};

// Fires cancellation into the handler: its on_cancel callback, and terminal
// cancellation on its executor. Thread-safe, idempotent.
void request_cancel(const std::shared_ptr<CallState>& state);
void log_handler_exception(const CallState& state, const Error& error);

}  // namespace detail

// Pushes MESSAGEs to one client after the call that handed it out has
// ended (event subscriptions). Holds the client's session weakly: once the
// client is gone, send() returns false and open() turns false. Copyable,
// thread-safe.
class MessageChannel {
 public:
  MessageChannel() = default;
  explicit MessageChannel(std::weak_ptr<detail::CallSink> sink) : sink_(std::move(sink)) {}

  template <class P>
  bool send(const typename P::Call& message) const {
    static_assert(P::message, "MessageChannel::send takes a MESSAGE procedure");
    auto sink = sink_.lock();
    if (!sink) return false;
    return sink->push_message(P::Program::program, P::Program::version, P::number,
                              serialize(message, sink->pool()));
  }
  bool open() const {
    auto sink = sink_.lock();
    return sink && sink->connection() && !sink->connection()->closed();
  }
  // Both lead to the same client connection.
  bool same_client(const MessageChannel& other) const {
    return !sink_.owner_before(other.sink_) && !other.sink_.owner_before(sink_);
  }

 private:
  std::weak_ptr<detail::CallSink> sink_;
};

// What a handler knows about its call. Valid for the handler's lifetime.
class CallContext {
 public:
  explicit CallContext(std::shared_ptr<detail::CallState> state) : state_(std::move(state)) {}

  const PeerIdentity& peer() const { return state_->sink->peer(); }
  Serial serial() const { return state_->header.serial; }
  bool cancelled() const { return state_->cancel_requested.load(); }
  asio::any_io_executor executor() const { return state_->executor; }
  // Recycled buffers for large replies and stream chunks.
  BufferPool& pool() const { return *state_->sink->pool(); }

  // Pushes a MESSAGE of procedure P to the client that made this call.
  template <class P>
  bool send_message(const typename P::Call& message) const {
    static_assert(P::message, "send_message takes a MESSAGE procedure");
    return state_->sink->push_message(P::Program::program, P::Program::version, P::number,
                                      serialize(message, state_->sink->pool()));
  }
  // A handle to push MESSAGEs to this client later, after this call.
  MessageChannel channel() const { return MessageChannel(state_->sink); }
  // Names what the call works on ("pool/volume"), shown in the admin job
  // list. Thread-safe.
  void set_subject(std::string subject) const {
    std::lock_guard lock(state_->mutex);
    state_->subject = std::move(subject);
  }

 private:
  std::shared_ptr<detail::CallState> state_;
};

// Move-only promise of exactly one answer; see the header comment.
template <class Reply>
class ReplyToken {
 public:
  explicit ReplyToken(std::shared_ptr<detail::CallState> state) : state_(std::move(state)) {}
  ReplyToken(ReplyToken&&) noexcept = default;
  ReplyToken& operator=(ReplyToken&& other) noexcept {
    if (this != &other) {
      abandon();
      state_ = std::move(other.state_);
    }
    return *this;
  }
  ReplyToken(const ReplyToken&) = delete;
  ReplyToken& operator=(const ReplyToken&) = delete;
  ~ReplyToken() { abandon(); }

  // Any thread. Returns false if the call was already answered.
  bool reply(const Reply& reply) {
    if (!state_) return false;
    auto s = std::move(state_);
    return s->finish_ok(reply);
  }
  bool fail(const Error& error) {
    if (!state_) return false;
    auto s = std::move(state_);
    return s->finish_error(error);
  }
  bool cancelled() const { return state_ && state_->cancel_requested.load(); }
  // Runs `fn` (on the io thread that read the CANCEL, so it must not block)
  // when the client cancels; at once if it already has.
  void on_cancel(std::function<void()> fn) {
    if (!state_) return;
    {
      std::lock_guard lock(state_->mutex);
      if (!state_->cancel_requested.load()) {
        state_->on_cancel = std::move(fn);
        return;
      }
    }
    fn();
  }
  CallContext context() const { return CallContext(state_); }
  explicit operator bool() const { return state_ != nullptr; }

 private:
  void abandon() {
    if (!state_) return;
    auto s = std::move(state_);
    if (s->cancel_requested.load())
      s->finish_error(s->cancelled_error());
    else
      s->finish_error(Error(Code::internal, "handler abandoned the call without replying"));
  }

  std::shared_ptr<detail::CallState> state_;
};

class Program {
 public:
  // Dispatch entry. `invoke` parses the body (false: it does not parse) and
  // starts the handler.
  struct Entry {
    std::string name;
    bool may_block = false;
    bool cancellable = false;
    bool opens_stream = false;  // counted against the per-client stream limit
    std::function<bool(std::shared_ptr<detail::CallState>, Buffer, asio::any_io_executor handler_executor)> invoke;
  };

  Program(std::uint32_t id, std::uint32_t version, std::string name)
      : id_(id), version_(version), name_(std::move(name)) {}

  template <class Service>
  static std::shared_ptr<Program> of() {
    return std::make_shared<Program>(Service::program, Service::version, std::string(Service::name));
  }

  template <class P, class F>
  Program& on(F handler) {
    static_assert(!P::message, "MESSAGE procedures have no handler");
    using Call = typename P::Call;
    using Reply = typename P::Reply;
    Entry entry;
    entry.name = std::string(P::Program::name) + "." + std::string(P::name);
    entry.may_block = P::may_block;
    entry.cancellable = P::cancellable;
    if constexpr (std::is_invocable_r_v<asio::awaitable<Reply>, F&, const Call&, CallContext&>) {
      entry.invoke = [handler = std::move(handler)](std::shared_ptr<detail::CallState> state, Buffer body,
                                                    asio::any_io_executor ex) {
        auto call = std::make_unique<Call>();
        if (!call->ParseFromArray(body.data(), static_cast<int>(body.size()))) return false;
        state->executor = ex;
        auto slot = state->signal.slot();
        asio::co_spawn(
            ex,
            [handler, call = std::move(call), state]() -> asio::awaitable<Reply> {
              CallContext context(state);
              co_return co_await handler(*call, context);
            },
            asio::bind_cancellation_slot(slot, [state](std::exception_ptr e, Reply reply) {
              if (!e) {
                state->finish_ok(reply);
                return;
              }
              Error error = Error::from_exception(e);
              if (state->cancel_requested.load())
                error = state->cancelled_error();
              else if (error.code() == Code::internal)
                detail::log_handler_exception(*state, error);
              state->finish_error(error);
            }));
        return true;
      };
    } else if constexpr (std::is_invocable_v<F&, const Call&, ReplyToken<Reply>>) {
      entry.invoke = [handler = std::move(handler)](std::shared_ptr<detail::CallState> state, Buffer body,
                                                    asio::any_io_executor ex) {
        auto call = std::make_shared<Call>();
        if (!call->ParseFromArray(body.data(), static_cast<int>(body.size()))) return false;
        state->executor = ex;
        asio::post(ex, [handler, call, state]() mutable {
          try {
            handler(*call, ReplyToken<Reply>(state));
          } catch (...) {
            Error error = Error::from_exception(std::current_exception());
            if (error.code() == Code::internal) detail::log_handler_exception(*state, error);
            state->finish_error(error);
          }
        });
        return true;
      };
    } else {
      static_assert(sizeof(F) == 0,
                    "a handler is either awaitable<Reply>(const Call&, CallContext&) "
                    "or void(const Call&, ReplyToken<Reply>)");
    }
    entries_[P::number] = std::move(entry);
    return *this;
  }

  // Registers a prepared entry; used by layers above (stream/) that build
  // their own handler shapes.
  void add_entry(std::uint32_t procedure, Entry entry) { entries_[procedure] = std::move(entry); }

  const Entry* find(std::uint32_t procedure) const {
    auto it = entries_.find(procedure);
    return it == entries_.end() ? nullptr : &it->second;
  }
  std::uint32_t id() const { return id_; }
  std::uint32_t version() const { return version_; }
  const std::string& name() const { return name_; }

 private:
  std::uint32_t id_;
  std::uint32_t version_;
  std::string name_;
  std::map<std::uint32_t, Entry> entries_;
};

}  // namespace ferry::rpc
