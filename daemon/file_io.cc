#include "daemon/file_io.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/post.hpp>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <spdlog/spdlog.h>
#include <thread>
#include <vector>

#include "rpc/error.h"

namespace ferry::daemon {

namespace {

std::atomic<std::uint64_t> g_in_flight{0};

int run_blocking(const FileIo::Request& r) {
  ssize_t n = 0;
  switch (r.op) {
    case FileIo::Request::Op::read:
      n = ::pread(r.fd, r.data, r.length, static_cast<off_t>(r.offset));
      break;
    case FileIo::Request::Op::write:
      n = ::pwrite(r.fd, r.data, r.length, static_cast<off_t>(r.offset));
      break;
    case FileIo::Request::Op::punch:
      n = ::fallocate(r.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(r.offset),
                      static_cast<off_t>(r.length));
      break;
    case FileIo::Request::Op::datasync:
      n = ::fdatasync(r.fd);
      break;
  }
  return n < 0 ? -errno : static_cast<int>(n);
}

template <class Handler>
class HandlerCompletion final : public FileIo::Completion {
 public:
  explicit HandlerCompletion(Handler handler) : handler_(std::move(handler)) {}
  void complete(int result) override {
    g_in_flight.fetch_sub(1, std::memory_order_relaxed);
    auto executor = asio::get_associated_executor(handler_);
    asio::post(executor, [handler = std::move(handler_), result]() mutable { handler(result); });
    delete this;
  }

 private:
  Handler handler_;
};

Error io_error(int err, const char* what, int fd) {
  std::string path;
  char link[64];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  char target[4096];
  const ssize_t n = ::readlink(link, target, sizeof target - 1);
  if (n > 0) path.assign(target, static_cast<std::size_t>(n));
  return Error::from_errno(err, std::string(what) + (path.empty() ? "" : " " + path));
}

bool io_uring_disabled_by_sysctl() {
  std::ifstream in("/proc/sys/kernel/io_uring_disabled");
  int v = 0;
  return (in >> v) && v != 0;
}

}  // namespace

struct FileIo::Ring {
  io_uring ring{};
  std::mutex submit_mutex;
  std::thread reaper;
  std::atomic<bool> stopping{false};
};

FileIo::FileIo(Options options) : engine_(Engine::threads), pool_(std::max(1u, options.threads)) {
  const std::string pool_text = std::to_string(std::max(1u, options.threads)) + " threads";
  if (options.engine == Engine::threads) {
    description_ = "thread pool of " + pool_text + " (configured)";
    return;
  }
  if (io_uring_disabled_by_sysctl()) {
    description_ = "thread pool of " + pool_text + " (io_uring disabled by kernel.io_uring_disabled)";
    return;
  }
  auto ring = std::make_unique<Ring>();
  const int rc = io_uring_queue_init(std::max(8u, options.queue_depth), &ring->ring, 0);
  if (rc < 0) {
    description_ = "thread pool of " + pool_text + " (io_uring unavailable: " + std::strerror(-rc) + ")";
    return;
  }
  // Writes that cannot complete at once (buffered writes on ext4, for one)
  // run on the kernel's io-wq workers, which count as threads of ferryd.
  // Cap them like the pool, so the thread count stays fixed whatever the load.
  // File I/O is "bounded" work; "unbounded" (sockets, pipes) never comes here.
  unsigned workers[2] = {std::max(1u, options.threads), 1};
  const int capped = io_uring_register_iowq_max_workers(&ring->ring, workers);
  ring_ = std::move(ring);
  engine_ = Engine::io_uring;
  description_ = "io_uring (" + std::to_string(std::max(8u, options.queue_depth)) + " entries" +
                 (capped == 0 ? ", at most " + std::to_string(std::max(1u, options.threads) + 1) + " kernel workers"
                              : std::string(", kernel workers uncapped: ") + std::strerror(-capped)) +
                 "), " + pool_text + " for metadata";
  ring_->reaper = std::thread([this] { reap(); });
}

FileIo::~FileIo() {
  if (ring_) {
    {
      std::lock_guard lock(ring_->submit_mutex);
      ring_->stopping = true;
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_->ring);
      while (!sqe) {
        io_uring_submit(&ring_->ring);
        sqe = io_uring_get_sqe(&ring_->ring);
      }
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data(sqe, nullptr);
      io_uring_submit(&ring_->ring);
    }
    ring_->reaper.join();
    io_uring_queue_exit(&ring_->ring);
  }
  pool_.join();
}

std::uint64_t FileIo::in_flight() const { return g_in_flight.load(std::memory_order_relaxed); }

void FileIo::reap() {
  for (;;) {
    io_uring_cqe* cqe = nullptr;
    const int rc = io_uring_wait_cqe(&ring_->ring, &cqe);
    if (rc == -EINTR) continue;
    if (rc < 0) {
      spdlog::critical("io_uring_wait_cqe failed: {}", std::strerror(-rc));
      std::abort();
    }
    auto* completion = static_cast<Completion*>(io_uring_cqe_get_data(cqe));
    const int result = cqe->res;
    io_uring_cqe_seen(&ring_->ring, cqe);
    if (!completion) {
      if (ring_->stopping) return;
      continue;
    }
    completion->complete(result);
  }
}

void FileIo::start(const Request& r, Completion* completion) {
  g_in_flight.fetch_add(1, std::memory_order_relaxed);
  if (!ring_) {
    asio::post(pool_, [r, completion] { completion->complete(run_blocking(r)); });
    return;
  }
  std::lock_guard lock(ring_->submit_mutex);
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_->ring);
  while (!sqe) {  // queue full: hand what is there to the kernel first
    io_uring_submit(&ring_->ring);
    sqe = io_uring_get_sqe(&ring_->ring);
  }
  switch (r.op) {
    case Request::Op::read:
      io_uring_prep_read(sqe, r.fd, r.data, static_cast<unsigned>(r.length), r.offset);
      break;
    case Request::Op::write:
      io_uring_prep_write(sqe, r.fd, r.data, static_cast<unsigned>(r.length), r.offset);
      break;
    case Request::Op::punch:
      io_uring_prep_fallocate(sqe, r.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, r.offset, r.length);
      break;
    case Request::Op::datasync:
      io_uring_prep_fsync(sqe, r.fd, IORING_FSYNC_DATASYNC);
      break;
  }
  io_uring_sqe_set_data(sqe, completion);
  const int rc = io_uring_submit(&ring_->ring);
  if (rc < 0) {
    // The kernel took nothing: nothing will complete it but us.
    spdlog::error("io_uring_submit failed ({}); running the request on the pool", std::strerror(-rc));
    asio::post(pool_, [r, completion] { completion->complete(run_blocking(r)); });
  }
}

asio::awaitable<int> FileIo::submit(Request request) {
  co_return co_await asio::async_initiate<decltype(asio::use_awaitable), void(int)>(
      [this, request](auto handler) {
        using H = std::decay_t<decltype(handler)>;
        start(request, new HandlerCompletion<H>(std::move(handler)));
      },
      asio::use_awaitable);
}

// One request moves at most this much: io_uring takes unsigned lengths and
// a single huge write would starve nothing but is pointless.
constexpr std::uint64_t max_request = 64u << 20;

asio::awaitable<std::size_t> FileIo::read(int fd, std::span<std::uint8_t> out, std::uint64_t offset) {
  std::size_t done = 0;
  while (done < out.size()) {
    const std::uint64_t n = std::min<std::uint64_t>(out.size() - done, max_request);
    const int rc = co_await submit({Request::Op::read, fd, out.data() + done, n, offset + done});
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) throw io_error(-rc, "read from", fd);
    if (rc == 0) break;  // end of file
    done += static_cast<std::size_t>(rc);
  }
  co_return done;
}

asio::awaitable<void> FileIo::write(int fd, std::span<const std::uint8_t> data, std::uint64_t offset) {
  std::size_t done = 0;
  while (done < data.size()) {
    const std::uint64_t n = std::min<std::uint64_t>(data.size() - done, max_request);
    const int rc = co_await submit(
        {Request::Op::write, fd, const_cast<std::uint8_t*>(data.data() + done), n, offset + done});
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) throw io_error(-rc, "write to", fd);
    if (rc == 0) throw io_error(ENOSPC, "write to", fd);  // a regular file that takes nothing is full
    done += static_cast<std::size_t>(rc);
  }
}

asio::awaitable<bool> FileIo::punch_hole(int fd, std::uint64_t offset, std::uint64_t length) {
  const int rc = co_await submit({Request::Op::punch, fd, nullptr, length, offset});
  if (rc == -EOPNOTSUPP || rc == -ENOSYS) co_return false;
  if (rc < 0) throw io_error(-rc, "punch a hole in", fd);
  co_return true;
}

asio::awaitable<void> FileIo::datasync(int fd) {
  const int rc = co_await submit({Request::Op::datasync, fd, nullptr, 0, 0});
  if (rc < 0) throw io_error(-rc, "fdatasync", fd);
}

}  // namespace ferry::daemon
