// ByteBudget (nbd/budget.h): bytes taken and given back, waiters served
// in arrival order on their own executors, a request larger than the
// whole budget, and many threads at once.
#include "nbd/budget.h"

#include <gtest/gtest.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <atomic>
#include <thread>
#include <vector>

namespace ferry::nbd {
namespace {

// A waiting coroutine keeps its io_context busy, so the tests drive it
// with poll(): run what is ready, return.

// Starts a coroutine that acquires `bytes` and then appends `tag` to `order`.
void spawn_acquire(asio::io_context& io, ByteBudget& budget, std::uint64_t bytes, std::vector<int>& order, int tag) {
  asio::co_spawn(
      io,
      [&budget, bytes, &order, tag]() -> asio::awaitable<void> {
        co_await budget.acquire(bytes);
        order.push_back(tag);
      },
      asio::detached);
}

TEST(ByteBudget, AcquireAndReleaseTrackBytesInUseAndPeak) {
  auto budget = ByteBudget::create(1000);
  EXPECT_EQ(budget->limit(), 1000u);
  EXPECT_TRUE(budget->try_acquire(400));
  EXPECT_TRUE(budget->try_acquire(600));
  EXPECT_EQ(budget->in_use(), 1000u);
  EXPECT_FALSE(budget->try_acquire(1));
  budget->release(600);
  EXPECT_EQ(budget->in_use(), 400u);
  EXPECT_TRUE(budget->try_acquire(100));
  EXPECT_EQ(budget->in_use(), 500u);
  EXPECT_EQ(budget->peak(), 1000u);
  budget->release(500);
  EXPECT_EQ(budget->in_use(), 0u);
}

TEST(ByteBudget, AcquireWithRoomCompletesAtOnce) {
  auto budget = ByteBudget::create(1000);
  asio::io_context io;
  std::vector<int> order;
  spawn_acquire(io, *budget, 700, order, 1);
  io.run();
  EXPECT_EQ(order, std::vector<int>{1});
  EXPECT_EQ(budget->in_use(), 700u);
}

TEST(ByteBudget, WaitersAreServedInArrivalOrder) {
  auto budget = ByteBudget::create(1000);
  ASSERT_TRUE(budget->try_acquire(1000));
  asio::io_context io;
  std::vector<int> order;
  spawn_acquire(io, *budget, 600, order, 1);
  spawn_acquire(io, *budget, 100, order, 2);  // would fit before 1, but waits its turn
  spawn_acquire(io, *budget, 300, order, 3);
  io.poll();
  EXPECT_TRUE(order.empty());
  // A small try_acquire does not overtake the queue either.
  EXPECT_FALSE(budget->try_acquire(1));

  budget->release(500);  // 500 free: not enough for the first waiter
  io.restart();
  io.poll();
  EXPECT_TRUE(order.empty());

  budget->release(500);  // 1000 free: 600 + 100 + 300 all fit, in order
  io.restart();
  io.poll();
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(budget->in_use(), 1000u);
}

TEST(ByteBudget, RequestLargerThanTheBudgetWaitsUntilNothingIsHeldAndTakesItAll) {
  auto budget = ByteBudget::create(1000);
  ASSERT_TRUE(budget->try_acquire(10));
  asio::io_context io;
  std::vector<int> order;
  spawn_acquire(io, *budget, 5000, order, 1);
  io.poll();
  EXPECT_TRUE(order.empty());
  budget->release(10);
  io.restart();
  io.poll();
  EXPECT_EQ(order, std::vector<int>{1});
  EXPECT_EQ(budget->in_use(), 1000u);  // charged as the whole budget
  EXPECT_FALSE(budget->try_acquire(1));
  budget->release(5000);
  EXPECT_EQ(budget->in_use(), 0u);
  EXPECT_LE(budget->peak(), budget->limit());
}

TEST(ByteBudget, WaiterResumesOnItsOwnExecutor) {
  auto budget = ByteBudget::create(100);
  ASSERT_TRUE(budget->try_acquire(100));
  asio::io_context io;
  std::atomic<bool> resumed_on_io_thread{false};
  std::thread::id io_thread;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        co_await budget->acquire(50);
        resumed_on_io_thread = std::this_thread::get_id() == io_thread;
      },
      asio::detached);
  std::thread t([&] {
    io_thread = std::this_thread::get_id();
    auto guard = asio::make_work_guard(io);
    asio::post(io, [] {});
    // Runs until the coroutine is done and the guard is dropped below.
    io.run();
  });
  // Released from this (another) thread: the waiter still runs on `t`.
  while (budget->in_use() != 100) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  budget->release(100);
  for (int i = 0; i < 500 && !resumed_on_io_thread; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  io.stop();
  t.join();
  EXPECT_TRUE(resumed_on_io_thread);
  EXPECT_EQ(budget->in_use(), 50u);
}

TEST(ByteBudget, ManyThreadsNeverExceedTheLimit) {
  auto budget = ByteBudget::create(64 << 10);
  constexpr int threads = 4;
  constexpr int per_thread = 2000;
  std::vector<std::unique_ptr<asio::io_context>> ios;
  std::vector<std::thread> workers;
  std::atomic<int> done{0};
  for (int t = 0; t < threads; ++t) {
    ios.push_back(std::make_unique<asio::io_context>());
    auto& io = *ios.back();
    asio::co_spawn(
        io,
        [&budget, &done, t]() -> asio::awaitable<void> {
          for (int i = 0; i < per_thread; ++i) {
            const std::uint64_t n = 1024 + static_cast<std::uint64_t>((i * 7 + t * 13) % 32) * 1024;
            co_await budget->acquire(n);
            EXPECT_LE(budget->in_use(), budget->limit());
            budget->release(n);
          }
          ++done;
        },
        asio::detached);
    workers.emplace_back([&io] { io.run(); });
  }
  for (auto& w : workers) w.join();
  EXPECT_EQ(done.load(), threads);
  EXPECT_EQ(budget->in_use(), 0u);
  EXPECT_LE(budget->peak(), budget->limit());
  EXPECT_GT(budget->peak(), 0u);
}

}  // namespace
}  // namespace ferry::nbd
