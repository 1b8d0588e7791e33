#include "daemon/file_io.h"

#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
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

// Only the reaper thread enters the kernel. io_uring hands work it cannot
// finish at once (buffered writes on most filesystems) to io-wq workers of
// the *submitting* task, each task with its own set, so submitting from every
// io thread would multiply the workers by the io threads. Instead start()
// queues the request and wakes the reaper through an eventfd that a poll in
// the ring watches; the reaper prepares, submits and reaps. One set of
// workers, capped below, whatever the number of io threads.
struct FileIo::Ring {
  io_uring ring{};
  int wake_fd = -1;
  std::mutex mutex;  // guards pending, wake_pending, stopping
  std::vector<std::pair<Request, Completion*>> pending;
  bool wake_pending = false;
  bool stopping = false;
  std::thread reaper;
};

namespace {
// user_data of the eventfd poll; completions carry Completion pointers.
char wake_tag;
}  // namespace

FileIo::FileIo(Options options)
    : engine_(Engine::threads), pool_(std::max(1u, options.threads)), fault_(options.fault) {
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
  ring->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (ring->wake_fd < 0) {
    io_uring_queue_exit(&ring->ring);
    description_ = "thread pool of " + pool_text + " (eventfd: " + std::strerror(errno) + ")";
    return;
  }
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
      std::lock_guard lock(ring_->mutex);
      ring_->stopping = true;
    }
    wake();
    ring_->reaper.join();
    io_uring_queue_exit(&ring_->ring);
    ::close(ring_->wake_fd);
  }
  pool_.join();
}

void FileIo::wake() {
  const std::uint64_t one = 1;
  while (::write(ring_->wake_fd, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

std::uint64_t FileIo::in_flight() const { return g_in_flight.load(std::memory_order_relaxed); }

namespace {

io_uring_sqe* next_sqe(io_uring* ring) {
  io_uring_sqe* sqe = io_uring_get_sqe(ring);
  while (!sqe) {  // queue full: hand what is there to the kernel first
    io_uring_submit(ring);
    sqe = io_uring_get_sqe(ring);
  }
  return sqe;
}

void prepare(io_uring_sqe* sqe, const FileIo::Request& r) {
  using Op = FileIo::Request::Op;
  switch (r.op) {
    case Op::read:
      io_uring_prep_read(sqe, r.fd, r.data, static_cast<unsigned>(r.length), r.offset);
      break;
    case Op::write:
      io_uring_prep_write(sqe, r.fd, r.data, static_cast<unsigned>(r.length), r.offset);
      break;
    case Op::punch:
      io_uring_prep_fallocate(sqe, r.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, r.offset, r.length);
      break;
    case Op::datasync:
      io_uring_prep_fsync(sqe, r.fd, IORING_FSYNC_DATASYNC);
      break;
  }
}

}  // namespace

void FileIo::reap() {
  io_uring* ring = &ring_->ring;
  bool watching = false;  // the eventfd poll is armed
  std::vector<std::pair<Request, Completion*>> batch;
  std::uint64_t in_ring = 0;  // requests submitted and not completed
  bool stopping = false;
  for (;;) {
    if (!watching) {
      io_uring_sqe* sqe = next_sqe(ring);
      io_uring_prep_poll_add(sqe, ring_->wake_fd, POLLIN);
      io_uring_sqe_set_data(sqe, &wake_tag);
      watching = true;
    }
    if (stopping && in_ring == 0) return;
    const int rc = io_uring_submit_and_wait(ring, 1);
    if (rc < 0 && rc != -EINTR && rc != -EBUSY && rc != -EAGAIN) {
      spdlog::critical("io_uring_submit_and_wait failed: {}", std::strerror(-rc));
      std::abort();
    }
    unsigned head = 0;
    unsigned seen = 0;
    bool woken = false;
    io_uring_cqe* cqe = nullptr;
    io_uring_for_each_cqe(ring, head, cqe) {
      ++seen;
      void* data = io_uring_cqe_get_data(cqe);
      if (data == &wake_tag) {
        watching = false;
        woken = true;
        continue;
      }
      --in_ring;
      static_cast<Completion*>(data)->complete(cqe->res);
    }
    io_uring_cq_advance(ring, seen);
    if (!woken) continue;
    std::uint64_t count = 0;
    while (::read(ring_->wake_fd, &count, sizeof count) < 0 && errno == EINTR) {
    }
    {
      std::lock_guard lock(ring_->mutex);
      batch.swap(ring_->pending);
      ring_->wake_pending = false;
      stopping = ring_->stopping;
    }
    for (auto& [request, completion] : batch) {
      io_uring_sqe* sqe = next_sqe(ring);
      prepare(sqe, request);
      io_uring_sqe_set_data(sqe, completion);
      ++in_ring;
    }
    batch.clear();
  }
}

void FileIo::start(const Request& r, Completion* completion) {
  g_in_flight.fetch_add(1, std::memory_order_relaxed);
  if (!ring_) {
    asio::post(pool_, [r, completion] { completion->complete(run_blocking(r)); });
    return;
  }
  bool wake_now = false;
  {
    std::lock_guard lock(ring_->mutex);
    ring_->pending.emplace_back(r, completion);
    wake_now = !ring_->wake_pending;
    ring_->wake_pending = true;
  }
  if (wake_now) wake();
}

asio::awaitable<int> FileIo::submit(Request request) {
  if (fault_) {
    const IoFaultOptions::Op op = request.op == Request::Op::read    ? IoFaultOptions::read
                                  : request.op == Request::Op::write ? IoFaultOptions::write
                                  : request.op == Request::Op::punch ? IoFaultOptions::punch
                                                                     : IoFaultOptions::datasync;
    if (const auto delay = fault_->delay(op); delay.count() > 0) {
      asio::steady_timer timer(co_await asio::this_coro::executor, delay);
      co_await timer.async_wait(asio::use_awaitable);
    }
    if (const int error = fault_->check(op, request.fd, request.length)) co_return -error;
  }
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

asio::awaitable<void> FileIo::zero_range(int fd, std::uint64_t offset, std::uint64_t length) {
  if (co_await punch_hole(fd, offset, length)) co_return;
  static const std::vector<std::uint8_t> zeros(1u << 20);
  for (std::uint64_t done = 0; done < length;) {
    const std::uint64_t n = std::min<std::uint64_t>(zeros.size(), length - done);
    co_await write(fd, std::span<const std::uint8_t>(zeros.data(), n), offset + done);
    done += n;
  }
}

asio::awaitable<void> FileIo::datasync(int fd) {
  const int rc = co_await submit({Request::Op::datasync, fd, nullptr, 0, 0});
  if (rc < 0) throw io_error(-rc, "fdatasync", fd);
}

}  // namespace ferry::daemon
