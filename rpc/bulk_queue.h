// BulkQueue: the second, lower-priority run queue of an io thread.
//
// Stream handlers (an upload writing a volume, a download reading,
// hashing and sending one) do their CPU work in the io thread of their
// connection. On the io_context's own queue each of their steps would take
// a turn with everything else, so a thread serving a few streams flat out
// makes every small call on it wait behind one step of each of them, again
// at each hop of the call (read, handler, reply). Their executor is
// instead a BulkExecutor: its work goes to this queue, and the io thread's
// loop (run_io_thread) runs one step from it only when nothing else on the
// io_context is ready. Calls, replies, socket reads and writes, credit and
// keepalive stay ahead of stream work; a stream step waits at most for a
// bounded burst of them.
//
// One queue per io thread, used only by that thread's loop; push() is
// thread-safe (file I/O completions arrive from other threads).
#pragma once

#include <asio/execution.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <atomic>
#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

namespace ferry::rpc {

class BulkQueue {
 public:
  explicit BulkQueue(asio::io_context& context) : context_(context) {}
  BulkQueue(const BulkQueue&) = delete;
  BulkQueue& operator=(const BulkQueue&) = delete;

  asio::io_context& context() const { return context_; }

  template <class F>
  void push(F f) {
    bool wake;
    {
      std::lock_guard lock(mutex_);
      wake = tasks_.empty();
      tasks_.push_back(std::make_unique<Task<F>>(std::move(f)));
    }
    // From another thread, the loop may be blocked in the io_context
    // waiting for work: give it some, after which it looks here again. On
    // the loop's own thread it is running, and looks here next anyway.
    if (wake && std::this_thread::get_id() != loop_thread_.load(std::memory_order_relaxed))
      asio::post(context_, [] {});
  }

  // Runs the oldest step, if any. On the io thread only.
  bool run_one();
  std::size_t size() const;
  // Destroys the steps not run (a stopped server's coroutines), before the
  // io_context they refer to goes.
  void clear();

 private:
  struct TaskBase {
    virtual ~TaskBase() = default;
    virtual void run() = 0;
  };
  template <class F>
  struct Task final : TaskBase {
    explicit Task(F&& f) : fn(std::move(f)) {}
    void run() override { std::move(fn)(); }
    F fn;
  };

  friend void run_io_thread(asio::io_context&, BulkQueue&, std::size_t);
  asio::io_context& context_;
  std::atomic<std::thread::id> loop_thread_{};
  mutable std::mutex mutex_;
  std::deque<std::unique_ptr<TaskBase>> tasks_;
};

// An Asio executor whose work runs from a BulkQueue. Usable wherever an
// any_io_executor is: timers, sockets and co_spawn see the io_context.
//
// With an `urgent` flag, once it is set the work goes to the io_context
// itself instead, ahead of queued stream work: a cancelled stream (by
// CANCEL, an abort, or its connection closing) unwinds and frees what it
// holds at call priority. Both queues are run by the same thread, so the
// handler still never runs on two threads at once.
class BulkExecutor {
 public:
  explicit BulkExecutor(BulkQueue& queue, std::shared_ptr<const std::atomic<bool>> urgent = nullptr) noexcept
      : queue_(&queue), urgent_(std::move(urgent)) {}

  asio::execution_context& query(asio::execution::context_t) const noexcept { return queue_->context(); }
  static constexpr asio::execution::blocking_t query(asio::execution::blocking_t) noexcept {
    return asio::execution::blocking.never;
  }
  BulkExecutor require(asio::execution::blocking_t::never_t) const noexcept { return *this; }

  template <class F>
  void execute(F f) const {
    if (urgent_ && urgent_->load(std::memory_order_acquire)) {
      // Wrapped, so that post() sees a plain function with no executor of
      // its own to send it back to.
      asio::post(queue_->context(), [f = std::move(f)]() mutable { std::move(f)(); });
    } else {
      queue_->push(std::move(f));
    }
  }

  friend bool operator==(const BulkExecutor& a, const BulkExecutor& b) noexcept {
    return a.queue_ == b.queue_ && a.urgent_ == b.urgent_;
  }
  friend bool operator!=(const BulkExecutor& a, const BulkExecutor& b) noexcept { return !(a == b); }

 private:
  BulkQueue* queue_;
  std::shared_ptr<const std::atomic<bool>> urgent_;
};

// The loop of an io thread with a BulkQueue: everything ready on the
// io_context first (at most `burst` handlers in a row), then one step of
// stream work; blocks in the io_context when both are empty. Returns when
// the io_context is stopped.
void run_io_thread(asio::io_context& context, BulkQueue& bulk, std::size_t burst = 256);

}  // namespace ferry::rpc
