#include "nbd/remote_backend.h"

#include <asio/async_result.hpp>
#include <asio/bind_executor.hpp>
#include <asio/execution/outstanding_work.hpp>
#include <asio/post.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/prefer.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <utility>

#include <fcntl.h>
#include <libnbd.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include "nbd/memory_backend.h"  // describe_size
#include "rpc/error.h"

namespace ferry::nbd {

namespace {

constexpr std::uint32_t hole_flags = state_hole | state_zero;
constexpr std::uint32_t default_max_block = 32u << 20;
// Commands without a payload (trim, zero, cache, block status) carry a
// 32-bit length on the wire; longer ranges go in pieces of this size.
constexpr std::uint64_t max_nonpayload = 1ULL << 31;
constexpr const char* allocation_context = "base:allocation";

bool is_nbd_errno(int err) {
  switch (err) {
    case EPERM:
    case EIO:
    case ENOMEM:
    case EINVAL:
    case ENOSPC:
    case EOVERFLOW:
    case ENOTSUP:
    case ESHUTDOWN:
      return true;
    default:
      return false;
  }
}

bool is_connection_errno(int err) {
  return err == ENOTCONN || err == ECONNRESET || err == EPIPE || err == ECONNABORTED || err == ETIMEDOUT ||
         err == ECONNREFUSED || err == EHOSTUNREACH || err == ENETUNREACH;
}

// The error a failed remote command or connection becomes.
Error remote_error(int err, const std::string& what) {
  if (err == 0) err = EIO;
  if (is_connection_errno(err)) {
    return Error(Code::unavailable, what + ": " + std::strerror(err), "nbd", true, EIO);
  }
  Error e = Error::from_errno(err, what, "nbd");
  if (is_nbd_errno(err)) return e;
  // Not a number NBD clients know: they get EIO, the message keeps the rest.
  return Error(e.code(), e.message(), e.domain(), e.retryable(), EIO);
}

// The error a failed connect becomes: whatever the reason (no such socket,
// refused, no such export, timeout), the remote is unavailable.
Error connect_error(int err, const std::string& what) {
  if (err == 0) err = ECONNREFUSED;
  return Error(Code::unavailable, what + " (" + std::strerror(err) + ")", "nbd", true, err);
}

void push_extent(std::vector<Extent>& v, std::uint64_t length, std::uint32_t flags) {
  if (length == 0) return;
  if (!v.empty() && v.back().flags == flags)
    v.back().length += length;
  else
    v.push_back({length, flags});
}

}  // namespace

// What one Backend call asks of the remote; split into libnbd commands on
// the strand.
struct RemoteBackend::Request {
  enum class Kind { read, write, flush, trim, zero, block_status, cache } kind = Kind::flush;
  std::uint8_t* data = nullptr;   // read / write
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  std::uint32_t flags = 0;        // LIBNBD_CMD_FLAG_*
  std::vector<Extent>* map = nullptr;      // read: the caller wants holes told apart
  std::vector<Extent>* extents = nullptr;  // block_status: the result
};

namespace {

using Request = RemoteBackend::Request;

const char* kind_name(Request::Kind k) {
  switch (k) {
    case Request::Kind::read: return "read";
    case Request::Kind::write: return "write";
    case Request::Kind::flush: return "flush";
    case Request::Kind::trim: return "trim";
    case Request::Kind::zero: return "zero";
    case Request::Kind::block_status: return "block status";
    case Request::Kind::cache: return "cache";
  }
  return "command";
}

// One Backend call (or the connect) in flight: one or more libnbd commands.
// Lives on the strand: every field is touched only there (or in the
// connection's destructor, when nothing else runs). Deleted when the last
// command's free callback has run and the issuer has let go.
class Op {
 public:
  virtual ~Op() = default;

  Request request;
  bool connect = false;              // the handshake, not a command
  const std::string* uri = nullptr;  // for messages; the connection outlives its ops
  unsigned refs = 1;                 // the issuer's, plus one per libnbd command not yet freed
  int error = 0;
  std::string message;
  bool abandoned = false;  // a command was freed without completing
  std::vector<std::pair<std::uint64_t, std::uint64_t>> holes;  // read map: (offset, length)

  // The first failure wins.
  void fail(int err, std::string what) {
    if (error) return;
    error = err ? err : EIO;
    message = std::move(what);
  }
  void release() {
    if (--refs == 0) finish();
  }

 protected:
  // Posts the handler with `e` (null for success) and deletes this.
  virtual void deliver(std::exception_ptr e) = 0;

 private:
  std::string describe() const {
    if (connect) return "remote " + (uri ? *uri : std::string("NBD server"));
    std::string s = std::string(kind_name(request.kind));
    if (request.kind != Request::Kind::flush)
      s += " " + std::to_string(request.length) + " bytes at offset " + std::to_string(request.offset);
    return "remote " + (uri ? *uri : std::string("NBD server")) + ": " + s;
  }
  void finish() {
    if (!error && abandoned) fail(ENOTCONN, "the connection closed with the command pending");
    if (error) {
      std::string what = describe();
      if (!message.empty()) what += ": " + message;
      deliver(std::make_exception_ptr(connect ? connect_error(error, what) : remote_error(error, what)));
      return;
    }
    if (request.kind == Request::Kind::read && request.map && !holes.empty()) {
      std::sort(holes.begin(), holes.end());
      std::vector<Extent>& map = *request.map;
      map.clear();
      std::uint64_t pos = request.offset;
      const std::uint64_t end = request.offset + request.length;
      for (const auto& [off, len] : holes) {
        const std::uint64_t from = std::max(off, pos);
        const std::uint64_t to = std::min(off + len, end);
        if (to <= from) continue;
        push_extent(map, from - pos, 0);
        push_extent(map, to - from, hole_flags);
        pos = to;
      }
      push_extent(map, end - pos, 0);
    }
    deliver(nullptr);
  }
};

template <class Handler>
class HandlerOp final : public Op {
 public:
  explicit HandlerOp(Handler handler)
      : handler_(std::move(handler)),
        work_(asio::prefer(asio::get_associated_executor(handler_), asio::execution::outstanding_work.tracked)) {}

 private:
  void deliver(std::exception_ptr e) override {
    auto executor = asio::get_associated_executor(handler_);
    asio::post(executor, [handler = std::move(handler_), e]() mutable { std::move(handler)(e); });
    delete this;
  }

  Handler handler_;
  decltype(asio::prefer(std::declval<asio::associated_executor_t<Handler>>(),
                        asio::execution::outstanding_work.tracked)) work_;
};

// One libnbd command of an Op: the user_data of its callbacks.
struct Piece {
  Op* op;
  bool completed = false;
};

int on_complete(void* user_data, int* error) {
  auto* piece = static_cast<Piece*>(user_data);
  piece->completed = true;
  if (*error) piece->op->fail(*error, "");
  return 1;  // retire the command: nobody calls nbd_aio_command_completed
}

// Called exactly once per command: after completion, when libnbd refused the
// command, or when the handle is closed with the command still pending.
void on_free(void* user_data) {
  auto* piece = static_cast<Piece*>(user_data);
  Op* op = piece->op;
  // Not completed: refused at once (the issuer records why) or abandoned
  // by nbd_close.
  if (!piece->completed) op->abandoned = true;
  delete piece;
  op->release();
}

int on_chunk(void* user_data, const void*, std::size_t count, std::uint64_t offset, unsigned status, int*) {
  auto* piece = static_cast<Piece*>(user_data);
  if (status == LIBNBD_READ_HOLE) piece->op->holes.emplace_back(offset, count);
  return 0;
}

int on_extent(void* user_data, const char* context, std::uint64_t, std::uint32_t* entries, std::size_t nr_entries,
              int*) {
  auto* piece = static_cast<Piece*>(user_data);
  if (std::strcmp(context, allocation_context) != 0) return 0;
  std::vector<Extent>* out = piece->op->request.extents;
  if (!out) return 0;
  for (std::size_t i = 0; i + 1 < nr_entries; i += 2) {
    if (entries[i] == 0) continue;
    push_extent(*out, entries[i], entries[i + 1] & hole_flags);
  }
  return 0;
}

}  // namespace

// ---------------------------------------------------------------------------
// Connection: the libnbd handle and the pump that drives it. Everything
// below runs on strand_, except the constructor, connect_blocking() (before
// the strand is used), the posting entry points and the destructor (when no
// handler holds a reference any more).

class RemoteBackend::Connection : public std::enable_shared_from_this<Connection> {
 public:
  struct Info {
    std::uint64_t size = 0;
    Capabilities caps;
    bool structured = false;
    bool remote_multi_conn = false;
    std::uint64_t max_io = default_max_block;  // largest read/write piece
  };

  Connection(const asio::any_io_executor& executor, const std::string& uri, const RemoteOptions& options)
      : strand_(asio::make_strand(executor)),
        fd_(strand_),
        connect_timer_(strand_),
        uri_(uri),
        options_(options) {
    h_ = nbd_create();
    if (!h_) {
      const char* why = nbd_get_error();
      throw remote_error(nbd_get_errno(), "remote " + uri_ + ": nbd_create: " + (why ? why : "failed"));
    }
    auto check = [&](int rc, const char* what) {
      if (rc == -1) {
        const int err = nbd_get_errno();
        const std::string msg = nbd_get_error() ? nbd_get_error() : "";
        nbd_close(h_);
        h_ = nullptr;
        throw remote_error(err, "remote " + uri_ + ": " + what + ": " + msg);
      }
    };
    check(nbd_set_handle_name(h_, "ferry"), "nbd_set_handle_name");
    check(nbd_add_meta_context(h_, allocation_context), "nbd_add_meta_context");
    // The server in front checks ranges; alignment is the remote's business
    // (it answers EINVAL itself) rather than a libnbd refusal.
    check(nbd_set_strict_mode(h_, LIBNBD_STRICT_COMMANDS | LIBNBD_STRICT_FLAGS | LIBNBD_STRICT_BOUNDS |
                                      LIBNBD_STRICT_ZERO_SIZE),
          "nbd_set_strict_mode");
    if (nbd_supports_uri(h_) != 1) check(-1, "this libnbd was built without URI support");
  }

  ~Connection() {
    // No handler refers to this any more; whatever the strand did not get
    // to do is done here.
    if (connect_op_) {
      Op* op = std::exchange(connect_op_, nullptr);
      op->fail(ESHUTDOWN, "the backend was closed while connecting");
      op->release();
    }
    close_handle();
  }

  const Info& info() const { return info_; }
  const std::string& uri() const { return uri_; }
  bool usable() const { return usable_.load(std::memory_order_acquire); }

  // Any thread: starts the asynchronous connect; `op` completes when the
  // handshake is done or has failed.
  void start_connect(Op* op) {
    asio::post(strand_, [self = shared_from_this(), op] { self->begin_connect(op); });
  }

  // The caller's thread, before anything else uses this connection.
  void connect_blocking() {
    if (nbd_connect_uri(h_, uri_.c_str()) == -1) {
      const int err = nbd_get_errno();
      const std::string msg = nbd_get_error() ? nbd_get_error() : "";
      state_ = State::failed;
      throw connect_error(err, "remote " + uri_ + ": connecting: " + msg);
    }
    read_info();
    state_ = State::ready;
    usable_.store(true, std::memory_order_release);
    asio::post(strand_, [self = shared_from_this()] {
      self->refresh_fd();
      self->arm();
    });
  }

  // Any thread: sends `op`'s command(s) from the strand.
  void start(Op* op) {
    op->uri = &uri_;
    asio::post(strand_, [self = shared_from_this(), op] { self->issue(op); });
  }

  // Any thread: disconnect and close on the strand.
  void shutdown() {
    asio::post(strand_, [self = shared_from_this()] { self->close_now(); });
  }

 private:
  enum class State { created, connecting, ready, failed, lost, closed };

  void begin_connect(Op* op) {
    op->uri = &uri_;
    op->connect = true;
    connect_op_ = op;
    state_ = State::connecting;
    if (nbd_aio_connect_uri(h_, uri_.c_str()) == -1) {
      const int err = nbd_get_errno();
      finish_connect(err ? err : ECONNREFUSED, nbd_get_error() ? nbd_get_error() : "nbd_aio_connect_uri failed");
      return;
    }
    if (options_.connect_timeout.count() > 0) {
      connect_timer_.expires_after(options_.connect_timeout);
      connect_timer_.async_wait(asio::bind_executor(strand_, [self = shared_from_this()](std::error_code ec) {
        if (ec || self->state_ != State::connecting) return;
        self->finish_connect(ETIMEDOUT, "no answer within " + std::to_string(self->options_.connect_timeout.count()) +
                                            " ms");
      }));
    }
    progress(0, "");
  }

  void finish_connect(int err, const std::string& why) {
    connect_timer_.cancel();
    Op* op = std::exchange(connect_op_, nullptr);
    if (err) {
      state_ = State::failed;
      close_fd();
      if (op) op->fail(err, "connecting: " + why);
    } else {
      state_ = State::ready;
      usable_.store(true, std::memory_order_release);
    }
    if (op) op->release();
  }

  void read_info() {
    Info i;
    const std::int64_t size = nbd_get_size(h_);
    i.size = size > 0 ? static_cast<std::uint64_t>(size) : 0;
    Capabilities& c = i.caps;
    c.read_only = nbd_is_read_only(h_) == 1;
    c.can_flush = nbd_can_flush(h_) == 1;
    c.can_fua = nbd_can_fua(h_) == 1;
    c.can_trim = nbd_can_trim(h_) == 1;
    c.can_zero = nbd_can_zero(h_) == 1;
    c.can_fast_zero = nbd_can_fast_zero(h_) == 1;
    c.can_cache = nbd_can_cache(h_) == 1;
    c.can_extents = nbd_can_meta_context(h_, allocation_context) == 1;
    c.can_multi_conn = true;  // one remote connection behind every client: see the header
    c.rotational = nbd_is_rotational(h_) == 1;
    i.remote_multi_conn = nbd_can_multi_conn(h_) == 1;
    i.structured = nbd_get_structured_replies_negotiated(h_) == 1;
    const std::int64_t min = nbd_get_block_size(h_, LIBNBD_SIZE_MINIMUM);
    const std::int64_t preferred = nbd_get_block_size(h_, LIBNBD_SIZE_PREFERRED);
    const std::int64_t max = nbd_get_block_size(h_, LIBNBD_SIZE_MAXIMUM);
    c.max_block = max > 0 ? static_cast<std::uint32_t>(std::min<std::int64_t>(max, default_max_block)) : default_max_block;
    c.min_block = min > 0 ? static_cast<std::uint32_t>(std::min<std::int64_t>(min, c.max_block)) : 1;
    c.preferred_block = preferred > 0 ? static_cast<std::uint32_t>(std::min<std::int64_t>(preferred, c.max_block))
                                      : std::min<std::uint32_t>(4096, c.max_block);
    c.preferred_block = std::max(c.preferred_block, c.min_block);
    i.max_io = c.max_block;
    info_ = i;
  }

  // After nbd_aio_connect_uri or a notify: sees where the state machine
  // went, then waits for what it needs next.
  void progress(int err, const std::string& why) {
    if (!h_) return;
    const bool gone = nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1;
    if (state_ == State::connecting) {
      if (nbd_aio_is_ready(h_) == 1) {
        read_info();
        refresh_fd();
        finish_connect(0, "");
      } else if (gone) {
        finish_connect(err ? err : ECONNREFUSED, why.empty() ? "the server closed the connection" : why);
        return;
      } else {
        refresh_fd();  // connecting may have moved to another socket (next address)
      }
    } else if (state_ == State::ready && gone) {
      state_ = State::lost;
      usable_.store(false, std::memory_order_release);
      lost_reason_ = why.empty() ? "the server closed the connection" : why;
      spdlog::warn("nbd: connection to remote {} lost: {}", uri_, lost_reason_);
      close_fd();
      return;
    }
    arm();
  }

  // Watches a duplicate of libnbd's socket: libnbd closes its descriptor
  // when the connection dies (or moves to the next address while
  // connecting), and the duplicate keeps that from pulling the descriptor
  // number out from under the reactor.
  void refresh_fd() {
    const int fd = nbd_aio_get_fd(h_);
    if (fd < 0) return;
    struct stat st {};
    if (::fstat(fd, &st) != 0) return;
    if (fd_.is_open() && st.st_ino == fd_ino_ && st.st_dev == fd_dev_) return;
    close_fd();
    const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0) {
      spdlog::error("nbd: remote {}: cannot duplicate the socket: {}", uri_, std::strerror(errno));
      return;
    }
    std::error_code ec;
    fd_.assign(copy, ec);
    if (ec) {
      ::close(copy);
      spdlog::error("nbd: remote {}: cannot watch the socket: {}", uri_, ec.message());
      return;
    }
    fd_ino_ = st.st_ino;
    fd_dev_ = st.st_dev;
  }

  void close_fd() {
    ++generation_;  // waits already started report to nobody
    read_armed_ = write_armed_ = false;
    std::error_code ignored;
    fd_.close(ignored);
  }

  void arm() {
    if (!h_ || !fd_.is_open()) return;
    const unsigned dir = nbd_aio_get_direction(h_);
    if ((dir & LIBNBD_AIO_DIRECTION_READ) && !read_armed_) {
      read_armed_ = true;
      fd_.async_wait(asio::posix::stream_descriptor::wait_read,
                     asio::bind_executor(strand_, [self = shared_from_this(), g = generation_](std::error_code ec) {
                       self->on_ready(ec, true, g);
                     }));
    }
    if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && !write_armed_) {
      write_armed_ = true;
      fd_.async_wait(asio::posix::stream_descriptor::wait_write,
                     asio::bind_executor(strand_, [self = shared_from_this(), g = generation_](std::error_code ec) {
                       self->on_ready(ec, false, g);
                     }));
    }
  }

  bool readable_now() {
    pollfd p{fd_.native_handle(), POLLIN, 0};
    return ::poll(&p, 1, 0) == 1 && (p.revents & (POLLIN | POLLHUP | POLLERR)) != 0;
  }

  void on_ready(std::error_code ec, bool readable, std::uint64_t generation) {
    if (generation != generation_ || !h_) return;
    (readable ? read_armed_ : write_armed_) = false;
    if (ec) {
      if (ec != asio::error::operation_aborted)
        spdlog::warn("nbd: remote {}: waiting on the socket failed: {}", uri_, ec.message());
      return;
    }
    int rc = 0;
    if (readable) {
      // Only with data actually waiting: epoll may report a readiness that
      // a notification already used up (an edge delivered after its data
      // was read), and a notification without data parks libnbd in
      // REPLY.START, where it sends no new command until the next reply
      // comes, which may be never. libnbd also takes one reply per
      // notification, so replies already waiting are taken now rather than
      // after another trip through the reactor.
      for (int i = 0; i < 64 && rc != -1 && (nbd_aio_get_direction(h_) & LIBNBD_AIO_DIRECTION_READ) &&
                      readable_now();
           ++i)
        rc = nbd_aio_notify_read(h_);
    } else if (nbd_aio_get_direction(h_) & LIBNBD_AIO_DIRECTION_WRITE) {
      // A spurious write readiness is harmless: libnbd's send sees EAGAIN
      // and stays where it is.
      rc = nbd_aio_notify_write(h_);
    }
    if (rc == -1) {
      const int err = nbd_get_errno();
      progress(err, nbd_get_error() ? nbd_get_error() : "");
    } else {
      progress(0, "");
    }
  }

  // Sends the libnbd command(s) of one Backend call.
  void issue(Op* op) {
    const Request& r = op->request;
    if (state_ != State::ready || !h_) {
      op->fail(ENOTCONN, state_ == State::lost ? "connection lost: " + lost_reason_ : std::string("not connected"));
      op->release();
      return;
    }
    std::uint64_t piece_max = max_nonpayload;
    if (r.kind == Request::Kind::read || r.kind == Request::Kind::write) piece_max = info_.max_io;
    if (r.kind == Request::Kind::flush || r.kind == Request::Kind::block_status) piece_max = ~std::uint64_t{0};

    std::uint64_t done = 0;
    do {
      const std::uint64_t n = std::min(r.length - done, piece_max);
      const std::uint64_t off = r.offset + done;
      auto* piece = new Piece{op};
      ++op->refs;
      const nbd_completion_callback completion{.callback = &on_complete, .user_data = piece, .free = &on_free};
      std::int64_t cookie = -1;
      switch (r.kind) {
        case Request::Kind::read:
          if (r.map && info_.structured) {
            const nbd_chunk_callback chunk{.callback = &on_chunk, .user_data = piece, .free = nullptr};
            cookie = nbd_aio_pread_structured(h_, r.data + done, n, off, chunk, completion, 0);
          } else {
            cookie = nbd_aio_pread(h_, r.data + done, n, off, completion, 0);
          }
          break;
        case Request::Kind::write:
          cookie = nbd_aio_pwrite(h_, r.data + done, n, off, completion, r.flags);
          break;
        case Request::Kind::flush:
          cookie = nbd_aio_flush(h_, completion, 0);
          break;
        case Request::Kind::trim:
          cookie = nbd_aio_trim(h_, n, off, completion, r.flags);
          break;
        case Request::Kind::zero:
          cookie = nbd_aio_zero(h_, n, off, completion, r.flags);
          break;
        case Request::Kind::cache:
          cookie = nbd_aio_cache(h_, n, off, completion, 0);
          break;
        case Request::Kind::block_status: {
          const nbd_extent_callback extent{.callback = &on_extent, .user_data = piece, .free = nullptr};
          cookie = nbd_aio_block_status(h_, n, off, extent, completion, 0);
          break;
        }
      }
      if (cookie == -1) {
        // libnbd has already run the free callback (the piece is gone).
        const int err = nbd_get_errno();
        op->fail(err, nbd_get_error() ? nbd_get_error() : "");
        break;
      }
      done += n;
    } while (done < r.length);
    op->release();
    progress(0, "");
  }

  void close_now() {
    if (closed_) return;
    closed_ = true;
    connect_timer_.cancel();
    if (connect_op_) finish_connect(ESHUTDOWN, "the backend was closed");
    close_fd();
    close_handle();
    state_ = State::closed;
  }

  // Says goodbye if the connection works, then closes the handle: commands
  // still pending are abandoned (their free callbacks fail their ops).
  void close_handle() {
    if (!h_) return;
    usable_.store(false, std::memory_order_release);
    nbd_handle* h = std::exchange(h_, nullptr);
    if (nbd_aio_is_ready(h) == 1 || nbd_aio_is_processing(h) == 1) nbd_aio_disconnect(h, 0);
    nbd_close(h);
  }

  asio::strand<asio::any_io_executor> strand_;
  asio::posix::stream_descriptor fd_;
  asio::steady_timer connect_timer_;
  nbd_handle* h_ = nullptr;
  const std::string uri_;
  const RemoteOptions options_;
  State state_ = State::created;
  std::atomic<bool> usable_{false};
  bool closed_ = false;
  Info info_;
  Op* connect_op_ = nullptr;
  std::string lost_reason_;
  std::uint64_t generation_ = 0;
  bool read_armed_ = false;
  bool write_armed_ = false;
  ino_t fd_ino_ = 0;
  dev_t fd_dev_ = 0;
};

// ---------------------------------------------------------------------------
// RemoteBackend

RemoteBackend::RemoteBackend(std::shared_ptr<Connection> connection)
    : connection_(std::move(connection)),
      uri_(connection_->uri()),
      size_(connection_->info().size),
      caps_(connection_->info().caps),
      structured_replies_(connection_->info().structured),
      remote_multi_conn_(connection_->info().remote_multi_conn) {}

RemoteBackend::~RemoteBackend() {
  if (connection_) connection_->shutdown();
}

asio::awaitable<std::shared_ptr<RemoteBackend>> RemoteBackend::connect(const asio::any_io_executor& executor,
                                                                       const std::string& uri,
                                                                       const RemoteOptions& options) {
  auto connection = std::make_shared<Connection>(executor, uri, options);
  // The initiation is a temporary of the co_await expression: it captures
  // only a raw pointer; `connection` in this frame keeps the target alive.
  Connection* c = connection.get();
  co_await asio::async_initiate<decltype(asio::use_awaitable), void(std::exception_ptr)>(
      [c](auto handler) {
        using H = std::decay_t<decltype(handler)>;
        c->start_connect(new HandlerOp<H>(std::move(handler)));
      },
      asio::use_awaitable);
  std::shared_ptr<RemoteBackend> backend(new RemoteBackend(std::move(connection)));
  spdlog::debug("nbd: connected to {}", backend->description());
  co_return backend;
}

std::shared_ptr<RemoteBackend> RemoteBackend::connect_blocking(const asio::any_io_executor& executor,
                                                               const std::string& uri, const RemoteOptions& options) {
  auto connection = std::make_shared<Connection>(executor, uri, options);
  connection->connect_blocking();
  return std::shared_ptr<RemoteBackend>(new RemoteBackend(std::move(connection)));
}

std::string RemoteBackend::description() const {
  return "remote " + uri_ + " " + describe_size(size_) + (caps_.read_only ? " (read-only)" : "");
}

bool RemoteBackend::connected() const { return connection_->usable(); }

asio::awaitable<void> RemoteBackend::run(Request& request) {
  Connection* c = connection_.get();
  Request* r = &request;
  co_await asio::async_initiate<decltype(asio::use_awaitable), void(std::exception_ptr)>(
      [c, r](auto handler) {
        using H = std::decay_t<decltype(handler)>;
        auto* op = new HandlerOp<H>(std::move(handler));
        op->request = *r;
        c->start(op);
      },
      asio::use_awaitable);
}

asio::awaitable<void> RemoteBackend::read(std::span<std::uint8_t> out, std::uint64_t offset,
                                          std::vector<Extent>* map) {
  if (map) map->clear();
  if (out.empty()) co_return;
  Request r;
  r.kind = Request::Kind::read;
  r.data = out.data();
  r.offset = offset;
  r.length = out.size();
  r.map = map;
  co_await run(r);
}

asio::awaitable<void> RemoteBackend::write(std::span<const std::uint8_t> data, std::uint64_t offset, bool fua) {
  if (data.empty()) co_return;
  Request r;
  r.kind = Request::Kind::write;
  r.data = const_cast<std::uint8_t*>(data.data());  // libnbd only reads it
  r.offset = offset;
  r.length = data.size();
  r.flags = fua && caps_.can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  co_await run(r);
  if (fua && !caps_.can_fua) co_await flush();
}

asio::awaitable<void> RemoteBackend::flush() {
  if (!caps_.can_flush) co_return;
  Request r;
  r.kind = Request::Kind::flush;
  co_await run(r);
}

asio::awaitable<void> RemoteBackend::trim(std::uint64_t offset, std::uint64_t length, bool fua) {
  // Trim is advisory: a remote without it just keeps the data.
  if (!caps_.can_trim || length == 0) co_return;
  Request r;
  r.kind = Request::Kind::trim;
  r.offset = offset;
  r.length = length;
  r.flags = fua && caps_.can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  co_await run(r);
  if (fua && !caps_.can_fua) co_await flush();
}

asio::awaitable<void> RemoteBackend::zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) {
  if (length == 0) co_return;
  if (flags.fast && !(caps_.can_zero && caps_.can_fast_zero))
    throw Error(Code::unimplemented, "remote " + uri_ + ": no fast zero", "nbd", false, ENOTSUP);
  if (!caps_.can_zero) {
    // The remote cannot zero: write zeros.
    const std::uint64_t chunk_size = std::min<std::uint64_t>(length, std::min<std::uint32_t>(caps_.max_block, 1u << 20));
    std::vector<std::uint8_t> zeros(chunk_size);
    for (std::uint64_t done = 0; done < length;) {
      const std::uint64_t n = std::min(length - done, chunk_size);
      std::span<const std::uint8_t> piece(zeros.data(), n);
      co_await write(piece, offset + done, false);
      done += n;
    }
    if (flags.fua) co_await flush();
    co_return;
  }
  Request r;
  r.kind = Request::Kind::zero;
  r.offset = offset;
  r.length = length;
  r.flags = (flags.may_trim ? 0 : LIBNBD_CMD_FLAG_NO_HOLE) | (flags.fast ? LIBNBD_CMD_FLAG_FAST_ZERO : 0) |
            (flags.fua && caps_.can_fua ? LIBNBD_CMD_FLAG_FUA : 0);
  co_await run(r);
  if (flags.fua && !caps_.can_fua) co_await flush();
}

asio::awaitable<std::vector<Extent>> RemoteBackend::extents(std::uint64_t offset, std::uint64_t length) {
  std::vector<Extent> result;
  if (length == 0) co_return result;
  if (!caps_.can_extents) {
    result.push_back({length, 0});
    co_return result;
  }
  Request r;
  r.kind = Request::Kind::block_status;
  r.offset = offset;
  r.length = std::min(length, max_nonpayload);
  r.extents = &result;
  co_await run(r);
  if (result.empty()) result.push_back({r.length, 0});  // the remote said nothing: call it data
  co_return result;
}

asio::awaitable<void> RemoteBackend::cache(std::uint64_t offset, std::uint64_t length) {
  if (!caps_.can_cache || length == 0) co_return;
  Request r;
  r.kind = Request::Kind::cache;
  r.offset = offset;
  r.length = length;
  co_await run(r);
}

}  // namespace ferry::nbd
