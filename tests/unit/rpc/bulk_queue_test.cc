// BulkQueue and run_io_thread: stream work waits while io_context work is
// ready, and a BulkExecutor behaves as an executor for coroutines and timers.
#include "rpc/bulk_queue.h"

#include <gtest/gtest.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <string>
#include <thread>

namespace ferry::rpc {
namespace {

using namespace std::chrono_literals;

struct Loop {
  asio::io_context context{1};
  BulkQueue bulk{context};
  asio::executor_work_guard<asio::io_context::executor_type> guard = asio::make_work_guard(context);
  std::thread thread;

  void start() {
    thread = std::thread([this] { run_io_thread(context, bulk); });
  }
  ~Loop() {
    context.stop();
    if (thread.joinable()) thread.join();
    bulk.clear();
  }
};

TEST(BulkQueue, WorkReadyOnTheIoContextRunsBeforeTheNextStreamStep) {
  Loop loop;
  std::mutex mu;
  std::string order;
  std::promise<void> done;
  auto note = [&](char c) {
    std::lock_guard lock(mu);
    order += c;
    if (order.size() == 6) done.set_value();
  };
  // Three stream steps, each of which makes a call's work ready (as a
  // download step that queues a frame makes the writer ready).
  for (int i = 0; i < 3; ++i) {
    asio::post(BulkExecutor(loop.bulk), [&] {
      note('S');
      asio::post(loop.context, [&] { note('c'); });
    });
  }
  loop.start();
  ASSERT_EQ(done.get_future().wait_for(5s), std::future_status::ready);
  // In one FIFO queue it would be SSSccc: each call waiting for every step.
  EXPECT_EQ(order, "ScScSc");
}

TEST(BulkQueue, OnceUrgentAStreamsWorkGoesAheadOfQueuedStreamWork) {
  Loop loop;
  std::mutex mu;
  std::string order;
  std::promise<void> done;
  auto note = [&](char c) {
    std::lock_guard lock(mu);
    order += c;
    if (order.size() == 5) done.set_value();
  };
  auto urgent = std::make_shared<std::atomic<bool>>(false);
  const BulkExecutor busy(loop.bulk);
  const BulkExecutor cancelled(loop.bulk, urgent);
  for (int i = 0; i < 3; ++i) asio::post(busy, [&] { note('b'); });
  asio::post(cancelled, [&] { note('1'); });  // queued before the cancel: waits its turn
  urgent->store(true);                         // the call is cancelled
  asio::post(cancelled, [&] { note('U'); });
  loop.start();
  ASSERT_EQ(done.get_future().wait_for(5s), std::future_status::ready);
  EXPECT_EQ(order, "Ubbb1");
}

TEST(BulkQueue, ABurstOfIoContextWorkStillLetsStreamWorkThrough) {
  Loop loop;
  std::atomic<bool> stream_ran{false};
  std::atomic<bool> stop{false};
  // Work on the io_context that never runs dry: every handler posts another.
  std::function<void()> spin = [&] {
    if (!stop.load()) asio::post(loop.context, spin);
  };
  asio::post(loop.context, spin);
  asio::post(BulkExecutor(loop.bulk), [&] { stream_ran = true; });
  loop.start();
  for (int i = 0; i < 500 && !stream_ran.load(); ++i) std::this_thread::sleep_for(10ms);
  EXPECT_TRUE(stream_ran.load()) << "stream work starved by a busy io_context";
  stop = true;
}

TEST(BulkQueue, StreamWorkFromAnotherThreadWakesAnIdleLoop) {
  Loop loop;
  loop.start();
  std::this_thread::sleep_for(50ms);  // the loop is blocked in the io_context
  std::promise<std::thread::id> ran_on;
  std::thread other([&] { asio::post(BulkExecutor(loop.bulk), [&] { ran_on.set_value(std::this_thread::get_id()); }); });
  other.join();
  auto f = ran_on.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(f.get(), loop.thread.get_id());
}

TEST(BulkQueue, CoroutinesAndTimersRunOnABulkExecutor) {
  Loop loop;
  loop.start();
  std::promise<int> result;
  asio::co_spawn(
      asio::any_io_executor(BulkExecutor(loop.bulk)),
      [&]() -> asio::awaitable<void> {
        asio::steady_timer timer(co_await asio::this_coro::executor, 20ms);
        co_await timer.async_wait(asio::use_awaitable);
        result.set_value(42);
      },
      asio::detached);
  auto f = result.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(f.get(), 42);
}

TEST(BulkQueue, StoppingTheIoContextEndsTheLoopAndClearDropsWhatIsLeft) {
  auto owner = std::make_shared<int>(7);
  std::weak_ptr<int> watch = owner;
  {
    Loop loop;
    loop.start();
    loop.context.stop();
    loop.thread.join();
    asio::post(BulkExecutor(loop.bulk), [owner = std::move(owner)] { FAIL() << "ran after stop"; });
    EXPECT_EQ(loop.bulk.size(), 1u);
    loop.bulk.clear();
    EXPECT_EQ(loop.bulk.size(), 0u);
    EXPECT_TRUE(watch.expired()) << "a dropped step's captures were not released";
  }
}

}  // namespace
}  // namespace ferry::rpc
