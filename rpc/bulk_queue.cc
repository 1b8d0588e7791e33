#include "rpc/bulk_queue.h"

namespace ferry::rpc {

bool BulkQueue::run_one() {
  std::unique_ptr<TaskBase> task;
  {
    std::lock_guard lock(mutex_);
    if (tasks_.empty()) return false;
    task = std::move(tasks_.front());
    tasks_.pop_front();
  }
  task->run();
  return true;
}

std::size_t BulkQueue::size() const {
  std::lock_guard lock(mutex_);
  return tasks_.size();
}

void BulkQueue::clear() {
  std::deque<std::unique_ptr<TaskBase>> dropped;
  {
    std::lock_guard lock(mutex_);
    dropped.swap(tasks_);
  }
  // Destroying a step may destroy a coroutine whose frame holds other
  // steps' owners; they go outside the lock, and anything they queue too.
  dropped.clear();
  for (;;) {
    {
      std::lock_guard lock(mutex_);
      if (tasks_.empty()) return;
      dropped.swap(tasks_);
    }
    dropped.clear();
  }
}

void run_io_thread(asio::io_context& context, BulkQueue& bulk, std::size_t burst) {
  bulk.loop_thread_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  for (;;) {
    std::size_t n = 0;
    while (n < burst && context.poll_one() > 0) ++n;
    if (context.stopped()) return;
    if (bulk.run_one()) continue;
    if (n > 0) continue;  // more may have become ready meanwhile
    if (context.run_one() == 0 && context.stopped()) return;
  }
}

}  // namespace ferry::rpc
