#include "stream/service.h"

#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/post.hpp>
#include <condition_variable>

namespace ferry::stream::detail {

void ReplySlot::complete(rpc::detail::RawResult result) {
  std::function<void()> waiter;
  std::shared_ptr<Stream> stream;
  std::optional<Error> error = result.error;
  {
    std::lock_guard lock(shared_->mutex);
    shared_->result = std::move(result);
    waiter = std::move(shared_->waiter);
    shared_->waiter = nullptr;
    stream = shared_->stream;
  }
  if (stream) {
    // The call is over: nothing more arrives for this serial.
    if (error) stream->fail(*error);
    if (shared_->client) shared_->client->detach_stream(stream->serial());
  }
  if (waiter) waiter();
}

asio::awaitable<void> wait_reply(const std::shared_ptr<ReplyShared>& owner) {
  // The initiation is a temporary inside a co_await expression, which GCC
  // 12 may destroy twice: it captures only a raw pointer (the caller keeps
  // `owner` alive), so a second destruction releases nothing.
  ReplyShared* shared = owner.get();
  co_await asio::async_initiate<decltype(asio::use_awaitable), void()>(
      [shared](auto handler) {
        auto h = std::make_shared<decltype(handler)>(std::move(handler));
        auto resume = [h] {
          auto ex = asio::get_associated_executor(*h);
          asio::post(ex, [h]() mutable { std::move(*h)(); });
        };
        {
          std::lock_guard lock(shared->mutex);
          if (!shared->result) {
            shared->waiter = std::move(resume);
            return;
          }
        }
        resume();
      },
      asio::use_awaitable);
}

void wait_reply_sync(const std::shared_ptr<ReplyShared>& shared) {
  auto done = std::make_shared<std::promise<void>>();
  auto f = done->get_future();
  {
    std::lock_guard lock(shared->mutex);
    if (shared->result) return;
    shared->waiter = [done] { done->set_value(); };
  }
  f.get();
}

}  // namespace ferry::stream::detail
