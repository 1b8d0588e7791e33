// Volume file I/O shared by the volume service's streams and migration:
// a descriptor shared with the operations in flight, a bounded pipeline of
// file operations, and a reader that turns a range of a volume into data
// and hole pieces with several reads in flight.
#pragma once

#include <unistd.h>

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "daemon/file_io.h"
#include "rpc/buffer.h"
#include "rpc/waker.h"
#include "stream/sparse.h"

namespace ferry::daemon {

// An open descriptor shared by a handler and its file operations in flight.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

// Up to `depth` file operations in flight, started in order, finishing in
// any order; the first failure wins. Everything an operation needs (buffer,
// descriptor, the writer lock) is owned by the operation or by `keep`, so a
// handler that leaves early (cancelled, client gone) never frees what the
// kernel still writes into, and the volume's lock is released only when its
// last write has landed.
class Pipeline {
 public:
  Pipeline(asio::any_io_executor ex, unsigned depth, std::shared_ptr<void> keep)
      : state_(std::make_shared<State>(ex, std::move(keep))), depth_(std::max(1u, depth)) {}

  // Waits until another operation may start (and throws the first
  // failure). A coroutine without by-value parameters on purpose: the
  // operation is handed to start(), a plain function, afterwards.
  asio::awaitable<void> room() {
    while (state_->running >= depth_ && !state_->error) co_await state_->waker.wait();
    rethrow();
  }
  template <class Op>
  void start(Op op) {
    ++state_->running;
    auto st = state_;
    asio::co_spawn(st->ex, std::move(op), asio::bind_executor(st->ex, [st](std::exception_ptr e) {
                     --st->running;
                     if (e && !st->error) st->error = e;
                     st->waker.wake();
                   }));
  }
  asio::awaitable<void> drain() {
    while (state_->running > 0) co_await state_->waker.wait();
    rethrow();
  }
  void rethrow() const {
    if (state_->error) std::rethrow_exception(state_->error);
  }
  // Drops what the pipeline keeps alive for its operations (a writer lock,
  // a file). After drain() nothing runs, but the operations' completion
  // handlers may still be on their way to being destroyed on other
  // threads; whoever must see the lock gone when the reply goes out calls
  // this rather than leaving it to them.
  void release() { state_->keep.reset(); }

 private:
  struct State {
    State(asio::any_io_executor e, std::shared_ptr<void> k) : ex(e), waker(e), keep(std::move(k)) {}
    asio::any_io_executor ex;
    rpc::Waker waker;
    std::shared_ptr<void> keep;
    unsigned running = 0;
    std::exception_ptr error;
  };
  std::shared_ptr<State> state_;
  unsigned depth_;
};

// Reads [offset, end) of a volume as pieces in order: holes (from
// SEEK_DATA/SEEK_HOLE, and all-zero chunks with detect_zeros) merged into
// one piece each, data in chunks of at most `chunk` bytes, with up to
// `depth` reads in flight ahead of the consumer. Throws ABORTED if the file
// shrinks under it. Single consumer; the file stays open while reads run.
class RangeReader {
 public:
  struct Options {
    std::uint64_t chunk = 256u << 10;
    unsigned depth = 8;
    bool dense = false;         // read holes as data
    bool detect_zeros = false;  // all-zero chunks become holes
  };
  struct Piece {
    enum class Kind { data, hole, end } kind = Kind::end;
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
    rpc::Buffer data;  // kind == data
  };

  RangeReader(asio::any_io_executor ex, FileIo* io, std::shared_ptr<Fd> file, std::uint64_t offset,
              std::uint64_t end, Options options, rpc::BufferPool* pool, std::string what);
  ~RangeReader();
  RangeReader(const RangeReader&) = delete;
  RangeReader& operator=(const RangeReader&) = delete;

  asio::awaitable<Piece> next();

 private:
  struct Slot;
  struct Shared;
  asio::awaitable<void> plan();

  asio::any_io_executor ex_;
  FileIo* io_;
  std::shared_ptr<Fd> file_;
  std::uint64_t end_;
  Options options_;
  rpc::BufferPool* pool_;
  std::string what_;
  std::shared_ptr<Shared> shared_;
  std::deque<std::shared_ptr<Slot>> ahead_;
  std::vector<stream::Extent> extents_;
  std::size_t next_extent_ = 0;
  std::uint64_t planned_;
  unsigned reads_in_flight_ = 0;
  Piece held_;  // a hole being merged, or data due after a hole
};

}  // namespace ferry::daemon
