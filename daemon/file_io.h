// Asynchronous file I/O for volumes: the daemon's io threads start reads,
// writes, hole punches and syncs and go on serving other connections while
// the kernel does them.
//
// Two engines behind one interface:
//  - io_uring (liburing): one ring per FileIo and one small thread that
//    alone enters the kernel: any thread queues a request and wakes it (an
//    eventfd the ring polls); it submits, reaps, and posts each result to
//    the awaiting coroutine's executor. No thread per request, and one set
//    of kernel io-wq workers, capped at `threads` + 1.
//  - a bounded thread pool doing pread/pwrite/fallocate/fdatasync, used
//    where the kernel refuses io_uring (io_uring_disabled, seccomp, old
//    kernels) or when asked for (`file_io = "threads"`).
// The pool also runs the few calls io_uring has no operation for here
// (lseek SEEK_DATA/SEEK_HOLE, ftruncate, directory scans) through run().
//
// Failures throw ferry::Error from the errno (ENOSPC: RESOURCE_EXHAUSTED
// with os_errno set, EIO: DATA_LOSS ...). Buffers passed in must stay alive
// until the awaited operation returns, as for any Asio operation.
#pragma once

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>

#include "daemon/io_fault.h"

namespace ferry::daemon {

class FileIo {
 public:
  enum class Engine { io_uring, threads };
  struct Options {
    Engine engine = Engine::io_uring;  // preferred; threads is the fallback
    unsigned threads = 4;              // pool size (blocking work; all I/O for Engine::threads)
    unsigned queue_depth = 256;        // io_uring submission queue entries
    // Faults injected before operations reach the kernel (daemon/io_fault.h).
    std::shared_ptr<IoFault> fault;
  };

  explicit FileIo(Options options);
  ~FileIo();
  FileIo(const FileIo&) = delete;
  FileIo& operator=(const FileIo&) = delete;

  Engine engine() const { return engine_; }
  // "io_uring (256 entries)", "4 threads (io_uring unavailable: ...)".
  std::string describe() const { return description_; }
  // Operations started and not yet completed (for bounds checks in tests).
  std::uint64_t in_flight() const;

  // Reads up to out.size() bytes at `offset`, fewer only at end of file.
  asio::awaitable<std::size_t> read(int fd, std::span<std::uint8_t> out, std::uint64_t offset);
  // Writes all of `data` at `offset`.
  asio::awaitable<void> write(int fd, std::span<const std::uint8_t> data, std::uint64_t offset);
  // fallocate(PUNCH_HOLE | KEEP_SIZE); returns false if the filesystem
  // cannot punch (the caller writes zeros instead).
  asio::awaitable<bool> punch_hole(int fd, std::uint64_t offset, std::uint64_t length);
  // Makes [offset, offset+length) read as zeros: a punched hole, or written
  // zeros where the filesystem cannot punch.
  asio::awaitable<void> zero_range(int fd, std::uint64_t offset, std::uint64_t length);
  asio::awaitable<void> datasync(int fd);

  // Runs blocking `fn` on the pool; its result or exception comes back.
  // Not a coroutine itself: `fn` goes straight to co_spawn, never through
  // a by-value coroutine parameter (docs/architecture.md, "Volume I/O").
  template <class F>
  auto run(F fn) {
    using R = std::invoke_result_t<F>;
    return asio::co_spawn(
        pool_.get_executor(), [fn = std::move(fn)]() mutable -> asio::awaitable<R> { co_return fn(); },
        asio::use_awaitable);
  }

  // One raw operation: the result as the kernel gives it (>= 0, or -errno).
  struct Request {
    enum class Op { read, write, punch, datasync } op;
    int fd = -1;
    void* data = nullptr;
    std::uint64_t length = 0;
    std::uint64_t offset = 0;
  };
  struct Completion {
    virtual ~Completion() = default;
    virtual void complete(int result) = 0;
  };

 private:
  asio::awaitable<int> submit(Request request);
  void start(const Request& request, Completion* completion);
  void reap();
  void wake();

  struct Ring;
  Engine engine_;
  std::string description_;
  asio::thread_pool pool_;
  std::unique_ptr<Ring> ring_;
  std::shared_ptr<IoFault> fault_;
};

}  // namespace ferry::daemon
