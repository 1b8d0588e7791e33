// IoThreads: an io_context and the threads that run it, owned by whoever
// creates it. libferry starts no hidden threads: a program that wants the
// blocking API makes one of these (or runs its own io_context) and hands
// its executor to Client::connect.
#pragma once

#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <thread>
#include <vector>

namespace ferry::rpc {

class IoThreads {
 public:
  // The thread count is also the io_context's concurrency hint: with one
  // thread, Asio skips cross-thread wake-ups between handlers.
  explicit IoThreads(unsigned threads = 1)
      : context_(static_cast<int>(threads ? threads : 1)), work_(asio::make_work_guard(context_)) {
    if (threads == 0) threads = 1;
    for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { context_.run(); });
  }
  ~IoThreads() { stop(); }
  IoThreads(const IoThreads&) = delete;
  IoThreads& operator=(const IoThreads&) = delete;

  asio::io_context& context() { return context_; }
  asio::io_context::executor_type executor() { return context_.get_executor(); }

  // Stops the io_context (pending handlers are not run) and joins the
  // threads. Safe to repeat.
  void stop() {
    work_.reset();
    context_.stop();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

 private:
  asio::io_context context_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::vector<std::thread> threads_;
};

}  // namespace ferry::rpc
