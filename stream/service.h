// Opening and serving streams: the glue between a stream procedure's
// traits (its (ferry.v1.proc) stream kind) and Stream.
//
// Server:
//   stream::on<Volume::Upload>(*program,
//       [](const UploadCall& call, stream::Stream& s, rpc::CallContext& ctx) -> asio::awaitable<UploadReply> {
//         for (;;) { auto item = co_await s.read(); if (item.kind == stream::Item::Kind::end) break; ... }
//         co_return reply;
//       });
//   When the handler returns, a download's end of stream is sent if the
//   handler did not send it, then the REPLY, queued behind the stream's last
//   chunk. When it throws, the stream is aborted with that error (unless it
//   already failed) and the REPLY carries it. A CANCEL fails the stream and
//   cancels the handler.
//
// Client:
//   auto up = stream::open<Volume::Upload>(client, call);
//   co_await up.stream->write(std::move(buffer)); co_await up.stream->finish();
//   UploadReply reply = co_await up.reply();
//   If the server refuses the call, or the call fails, the stream fails with
//   the same error, so a writer learns at its next write.
#pragma once

#include <asio/bind_cancellation_slot.hpp>
#include <asio/co_spawn.hpp>
#include <asio/use_awaitable.hpp>
#include <memory>
#include <mutex>

#include "rpc/client.h"
#include "rpc/program.h"
#include "ferry/v1/options.pb.h"
#include "stream/stream.h"

namespace ferry::stream {

namespace detail {

// Holds the opening call's answer until someone asks for it.
class ReplySlot : public rpc::detail::CallCompletion {
 public:
  explicit ReplySlot(std::shared_ptr<struct ReplyShared> shared) : shared_(std::move(shared)) {}
  void complete(rpc::detail::RawResult result) override;

 private:
  std::shared_ptr<struct ReplyShared> shared_;
};

struct ReplyShared {
  std::mutex mutex;
  std::optional<rpc::detail::RawResult> result;
  std::function<void()> waiter;
  std::shared_ptr<Stream> stream;
  rpc::Client* client = nullptr;
  std::weak_ptr<rpc::Connection> connection;
};

// `shared` must outlive the wait (callers hold it in their own frame).
// GCC 12 may destroy a temporary twice when it is an argument of a call
// inside a co_await expression (a by-value coroutine parameter, or an
// initiation lambda): nothing here passes one that owns anything.
asio::awaitable<void> wait_reply(const std::shared_ptr<ReplyShared>& shared);
void wait_reply_sync(const std::shared_ptr<ReplyShared>& shared);

template <class Reply>
Reply take_reply(ReplyShared& shared) {
  std::lock_guard lock(shared.mutex);
  auto& r = *shared.result;
  if (r.error) throw *r.error;
  Reply reply;
  if (!reply.ParseFromArray(r.body.data(), static_cast<int>(r.body.size())))
    throw Error(Code::internal, "malformed REPLY body: not a valid " + reply.GetTypeName() + " message");
  return reply;
}

}  // namespace detail

template <class Reply>
class ClientStream {
 public:
  std::shared_ptr<Stream> stream;

  // The opening call's REPLY (after the stream ended). Throws its error.
  // The coroutine takes its own reference to the answer when it starts, so
  // this object must be alive at the co_await (as in `co_await s.reply()`)
  // but not after it.
  asio::awaitable<Reply> reply() {
    std::shared_ptr<detail::ReplyShared> shared = shared_;
    co_await detail::wait_reply(shared);
    co_return detail::take_reply<Reply>(*shared);
  }
  Reply reply_sync() {
    detail::wait_reply_sync(shared_);
    return detail::take_reply<Reply>(*shared_);
  }

  explicit ClientStream(std::shared_ptr<detail::ReplyShared> shared) : shared_(std::move(shared)) {}

 private:
  std::shared_ptr<detail::ReplyShared> shared_;
};

template <class P>
ClientStream<typename P::Reply> open(rpc::Client& client, const typename P::Call& call, rpc::CallOptions options = {}) {
  static_assert(P::stream != ::ferry::v1::STREAM_NONE, "open() takes a stream procedure");
  auto shared = std::make_shared<detail::ReplyShared>();
  shared->client = &client;
  rpc::Header base{P::Program::program, P::Program::version, P::number, rpc::FrameType::call, 0,
                   rpc::FrameStatus::ok};
  // The stream is made on the connection the CALL goes out on (with
  // reconnecting, the one current at that moment).
  client.start_call(P::Program::program, P::Program::version, P::number, rpc::serialize(call), std::move(options),
                    std::make_unique<detail::ReplySlot>(shared),
                    [shared, base](rpc::Serial serial, const std::shared_ptr<rpc::Connection>& connection,
                                   rpc::StreamLimits limits) {
                      rpc::Header h = base;
                      h.serial = serial;
                      auto s = std::make_shared<Stream>(connection, h, limits);
                      std::lock_guard lock(shared->mutex);
                      shared->stream = s;
                      return std::static_pointer_cast<rpc::StreamSink>(s);
                    },
                    rpc::procedure_info<P>());
  ClientStream<typename P::Reply> out(shared);
  std::lock_guard lock(shared->mutex);
  out.stream = shared->stream;
  return out;
}

template <class P, class F>
void on(rpc::Program& program, F handler) {
  static_assert(P::stream != ::ferry::v1::STREAM_NONE, "stream::on takes a stream procedure");
  using Call = typename P::Call;
  using Reply = typename P::Reply;
  rpc::Program::Entry entry;
  entry.name = std::string(P::Program::name) + "." + std::string(P::name);
  entry.may_block = P::may_block;
  entry.cancellable = true;
  entry.opens_stream = true;
  entry.invoke = [handler = std::move(handler)](std::shared_ptr<rpc::detail::CallState> state, rpc::Buffer body,
                                                asio::any_io_executor ex) {
    auto call = std::make_shared<Call>();
    if (!call->ParseFromArray(body.data(), static_cast<int>(body.size()))) return false;
    state->executor = ex;
    state->reply_lane = rpc::Lane::bulk;
    auto stream = std::make_shared<Stream>(state->sink->connection(), state->header, state->sink->stream_limits());
    state->sink->attach_stream(state->header.serial, stream);
    // A peer's abort reaches the handler at once, even one that is not
    // reading: it is cancelled as by a CANCEL.
    std::weak_ptr<rpc::detail::CallState> weak_state = state;
    stream->on_peer_failure([weak_state] {
      if (auto s = weak_state.lock()) rpc::detail::request_cancel(s);
    });
    auto slot = state->signal.slot();
    asio::co_spawn(
        ex,
        [handler, call, stream, state]() -> asio::awaitable<Reply> {
          rpc::CallContext context(state);
          co_return co_await handler(*call, *stream, context);
        },
        asio::bind_cancellation_slot(slot, [state, stream](std::exception_ptr e, Reply reply) {
          const rpc::Serial serial = state->header.serial;
          if (!e) {
            if constexpr (P::stream == ::ferry::v1::STREAM_DOWNLOAD || P::stream == ::ferry::v1::STREAM_BIDI) {
              if (!stream->error()) stream->end();
            }
            state->sink->detach_stream(serial);
            state->finish_ok(reply);
            return;
          }
          Error error = Error::from_exception(e);
          if (stream->failed_by_peer())
            error = *stream->error();  // the peer's own code and message
          else if (state->cancel_requested.load())
            error = state->cancelled_error();
          else if (error.code() == Code::internal) rpc::detail::log_handler_exception(*state, error);
          stream->abort(error);
          state->sink->detach_stream(serial);
          // After an abort the REPLY goes on the control lane, right behind
          // the ERROR chunk; the stream's queued data was dropped.
          state->reply_lane = rpc::Lane::control;
          state->finish_error(error);
        }));
    return true;
  };
  program.add_entry(P::number, std::move(entry));
}

}  // namespace ferry::stream
