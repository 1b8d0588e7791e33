// Waker: wakes one coroutine waiting on a single-threaded executor (an io
// thread's io_context, or a strand). A timer set to "never" that wake()
// cancels. A wake with nobody waiting is lost, so waiters loop on the
// condition they wait for; wait() and wake() run on the same executor,
// which makes check-then-wait race-free.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

namespace ferry::rpc {

class Waker {
 public:
  explicit Waker(const asio::any_io_executor& ex) : timer_(ex) {}
  asio::awaitable<void> wait() {
    timer_.expires_at(asio::steady_timer::time_point::max());
    co_await timer_.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
  }
  void wake() { timer_.cancel(); }

 private:
  asio::steady_timer timer_;
};

}  // namespace ferry::rpc
