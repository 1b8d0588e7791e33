#include "nbd/budget.h"

#include <algorithm>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>
#include <utility>
#include <vector>

namespace ferry::nbd {

// A request larger than the whole budget is charged as the whole budget:
// it then runs alone, and in_use() never passes the limit.
static std::uint64_t charge(std::uint64_t bytes, std::uint64_t limit) { return std::min(bytes, limit); }

bool ByteBudget::fits_locked(std::uint64_t bytes) const { return used_ + charge(bytes, limit_) <= limit_; }

bool ByteBudget::try_acquire(std::uint64_t bytes) {
  std::lock_guard lock(mutex_);
  // First come, first served: nobody overtakes a waiter, however small.
  if (!waiters_.empty() || !fits_locked(bytes)) return false;
  used_ += charge(bytes, limit_);
  peak_ = std::max(peak_, used_);
  return true;
}

asio::awaitable<void> ByteBudget::acquire(std::uint64_t bytes) {
  if (try_acquire(bytes)) co_return;
  // The initiation captures only `this` and an integer (a temporary in a
  // co_await expression may be destroyed twice). The handler is kept in a
  // shared_ptr the queued resume function owns; release() takes the bytes
  // for the waiter before resuming it, so a woken waiter owns them.
  co_await asio::async_initiate<decltype(asio::use_awaitable), void()>(
      [this, bytes](auto handler) {
        using Handler = decltype(handler);
        auto h = std::make_shared<Handler>(std::move(handler));
        std::function<void()> resume = [h] {
          auto ex = asio::get_associated_executor(*h);
          asio::post(ex, [h]() mutable { std::move(*h)(); });
        };
        {
          std::lock_guard lock(mutex_);
          if (!waiters_.empty() || !fits_locked(bytes)) {
            waiters_.push_back(Waiter{bytes, std::move(resume)});
            return;
          }
          used_ += charge(bytes, limit_);
          peak_ = std::max(peak_, used_);
        }
        resume();
      },
      asio::use_awaitable);
}

void ByteBudget::release(std::uint64_t bytes) {
  std::vector<std::function<void()>> wake;
  {
    std::lock_guard lock(mutex_);
    used_ -= std::min(used_, charge(bytes, limit_));
    while (!waiters_.empty() && fits_locked(waiters_.front().bytes)) {
      used_ += charge(waiters_.front().bytes, limit_);
      peak_ = std::max(peak_, used_);
      wake.push_back(std::move(waiters_.front().resume));
      waiters_.pop_front();
    }
  }
  for (auto& w : wake) w();
}

std::uint64_t ByteBudget::in_use() const {
  std::lock_guard lock(mutex_);
  return used_;
}

std::uint64_t ByteBudget::peak() const {
  std::lock_guard lock(mutex_);
  return peak_;
}

}  // namespace ferry::nbd
