// ByteBudget: a bound on the bytes of request and reply payloads an NBD
// server holds at once, shared by every connection of a daemon. Before it
// reads a WRITE's payload or allocates a READ's buffer the server takes the
// request's bytes from the budget, and it gives them back when the reply has
// been written; when the budget is spent it stops reading requests (the
// client's own queue then waits in its socket), so memory stays bounded
// however many requests a client sends.
//
// Thread-safe: connections on different io threads share one budget; a
// waiter resumes on its own executor, in arrival order.
#pragma once

#include <asio/awaitable.hpp>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>

namespace ferry::nbd {

class ByteBudget : public std::enable_shared_from_this<ByteBudget> {
 public:
  static std::shared_ptr<ByteBudget> create(std::uint64_t limit) {
    return std::shared_ptr<ByteBudget>(new ByteBudget(limit));
  }

  // Waits until `bytes` can be taken (a request larger than the whole
  // budget waits until nothing else is held, then takes it all).
  asio::awaitable<void> acquire(std::uint64_t bytes);
  bool try_acquire(std::uint64_t bytes);
  void release(std::uint64_t bytes);

  std::uint64_t limit() const { return limit_; }
  std::uint64_t in_use() const;
  std::uint64_t peak() const;

 private:
  explicit ByteBudget(std::uint64_t limit) : limit_(limit) {}
  bool fits_locked(std::uint64_t bytes) const;
  struct Waiter {
    std::uint64_t bytes;
    std::function<void()> resume;  // posts the waiter's continuation to its executor
  };
  const std::uint64_t limit_;
  mutable std::mutex mutex_;
  std::uint64_t used_ = 0;
  std::uint64_t peak_ = 0;
  std::deque<Waiter> waiters_;
};

}  // namespace ferry::nbd
