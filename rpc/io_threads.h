// IoThreads: an io_context and the threads that run it, owned by whoever
// creates it. libferry starts no hidden threads: a program that wants the
// blocking API makes one of these (or runs its own io_context) and hands
// its executor to Client::connect.
#pragma once

#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <chrono>
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

  // Lets the threads finish what is queued (a closed connection's
  // coroutines unwinding, its last frames written) for up to `grace`, then
  // stops and joins them. Use it after closing clients, so nothing they
  // own is left behind in unrun handlers.
  void finish(std::chrono::milliseconds grace) {
    work_.reset();
    const auto deadline = std::chrono::steady_clock::now() + grace;
    while (!context_.stopped() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    stop();
  }

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
