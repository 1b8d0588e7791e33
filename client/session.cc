#include "client/session.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <set>
#include <spdlog/spdlog.h>

#include "ferry/v1/volume.ferry.h"
#include "stream/service.h"
#include "stream/sparse.h"

namespace ferry {

using v1::Volume;
using Clock = std::chrono::steady_clock;

// Streams running now, so abort_transfers() can reach them from any thread.
struct Session::Active : std::enable_shared_from_this<Session::Active> {
  std::mutex mutex;
  std::set<std::shared_ptr<stream::Stream>> streams;

  std::shared_ptr<void> add(std::shared_ptr<stream::Stream> s) {
    {
      std::lock_guard lock(mutex);
      streams.insert(s);
    }
    return std::shared_ptr<void>(nullptr, [weak = weak_from_this(), s](void*) {
      if (auto self = weak.lock()) {
        std::lock_guard lock(self->mutex);
        self->streams.erase(s);
      }
    });
  }
  void abort_all(const std::string& reason) {
    std::vector<std::shared_ptr<stream::Stream>> now;
    {
      std::lock_guard lock(mutex);
      now.assign(streams.begin(), streams.end());
    }
    for (auto& s : now) s->abort(Error(Code::cancelled, reason, "client"));
  }
};

namespace {

v1::VolumeRef ref(const std::string& pool, const std::string& name) {
  v1::VolumeRef r;
  r.set_pool(pool);
  r.set_name(name);
  return r;
}

class Throttle {
 public:
  Throttle(ProgressFn fn, std::uint64_t total) : fn_(std::move(fn)), start_(Clock::now()) { p_.total = total; }
  void add(std::uint64_t bytes, bool hole) {
    p_.done += bytes;
    (hole ? p_.hole_bytes : p_.data_bytes) += bytes;
    if (!fn_) return;
    const auto now = Clock::now();
    if (now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    p_.elapsed = now - start_;
    fn_(p_);
  }
  Progress finish() {
    p_.elapsed = Clock::now() - start_;
    p_.finished = true;
    if (fn_) fn_(p_);
    return p_;
  }
  Clock::time_point start() const { return start_; }

 private:
  ProgressFn fn_;
  Progress p_;
  Clock::time_point start_;
  Clock::time_point last_{};
};

// Aborts `stream` when `cancel` fires, for as long as it lives.
class CancelWatch {
 public:
  CancelWatch(const std::shared_ptr<rpc::CancelSource>& cancel, const std::shared_ptr<stream::Stream>& s)
      : cancel_(cancel) {
    if (!cancel_) return;
    id_ = cancel_->watch([weak = std::weak_ptr<stream::Stream>(s)] {
      if (auto locked = weak.lock()) locked->abort(Error(Code::cancelled, "transfer cancelled by the client", "client"));
    });
  }
  CancelWatch(const CancelWatch&) = delete;
  CancelWatch& operator=(const CancelWatch&) = delete;
  ~CancelWatch() {
    if (cancel_) cancel_->forget(id_);
  }

 private:
  std::shared_ptr<rpc::CancelSource> cancel_;
  std::size_t id_ = 0;
};

struct FileCloser {
  int fd;
  bool owned;
  ~FileCloser() {
    if (owned && fd >= 0) ::close(fd);
  }
};

// Reads up to buffer.size() bytes from a pipe or file position; fewer only
// at end of input.
std::size_t read_some_fully(int fd, std::span<std::uint8_t> buffer, const std::string& path) {
  std::size_t done = 0;
  while (done < buffer.size()) {
    const ssize_t n = ::read(fd, buffer.data() + done, buffer.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error::from_errno(errno, "read " + path);
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  return done;
}

void write_fully(int fd, const std::uint8_t* data, std::size_t size, const std::string& path) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error::from_errno(errno, "write " + path);
    data += n;
    size -= static_cast<std::size_t>(n);
  }
}

}  // namespace

// ---------------------------------------------------------------------------

struct UploadStream::Impl {
  stream::ClientStream<v1::VolUploadReply> open;
  std::shared_ptr<void> registration;
  rpc::BufferPool* pool = nullptr;
};

UploadStream::UploadStream(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
UploadStream::UploadStream(UploadStream&&) noexcept = default;
UploadStream::~UploadStream() {
  if (impl_ && !impl_->open.stream->finished_sending() && !impl_->open.stream->error())
    impl_->open.stream->abort(Error(Code::cancelled, "upload abandoned by the client", "client"));
}

void UploadStream::write(std::span<const std::uint8_t> data) {
  rpc::Buffer buffer = impl_->pool ? impl_->pool->get(data.size()) : rpc::Buffer(data.size());
  if (!data.empty()) std::memcpy(buffer.data(), data.data(), data.size());
  impl_->open.stream->write_sync(std::move(buffer));
}
void UploadStream::write_hole(std::uint64_t length) { impl_->open.stream->write_hole_sync(length); }
v1::VolUploadReply UploadStream::finish() {
  impl_->open.stream->finish_sync();
  auto reply = impl_->open.reply_sync();
  impl_->registration.reset();
  return reply;
}
void UploadStream::abort(const std::string& reason) {
  impl_->open.stream->abort(Error(Code::cancelled, reason, "client"));
}
std::uint64_t UploadStream::bytes_sent() const { return impl_->open.stream->bytes_sent(); }

struct DownloadStream::Impl {
  stream::ClientStream<v1::VolDownloadReply> open;
  std::shared_ptr<void> registration;
};

DownloadStream::DownloadStream(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DownloadStream::DownloadStream(DownloadStream&&) noexcept = default;
DownloadStream::~DownloadStream() {
  if (impl_ && !impl_->open.stream->error() && impl_->registration)
    impl_->open.stream->abort(Error(Code::cancelled, "download abandoned by the client", "client"));
}

DownloadStream::Piece DownloadStream::read() {
  stream::Item item = impl_->open.stream->read_sync();
  Piece piece;
  piece.length = item.length;
  switch (item.kind) {
    case stream::Item::Kind::data:
      piece.kind = Piece::Kind::data;
      piece.data = std::move(item.data);
      break;
    case stream::Item::Kind::hole:
      piece.kind = Piece::Kind::hole;
      break;
    case stream::Item::Kind::end:
      piece.kind = Piece::Kind::end;
      break;
  }
  return piece;
}
v1::VolDownloadReply DownloadStream::finish() {
  auto reply = impl_->open.reply_sync();
  impl_->registration.reset();
  return reply;
}
void DownloadStream::abort(const std::string& reason) {
  impl_->open.stream->abort(Error(Code::cancelled, reason, "client"));
}

// ---------------------------------------------------------------------------

// The event subscription to make again after a reconnect.
struct Session::Subscription {
  std::mutex mutex;
  rpc::Client* client = nullptr;  // set once connected; cleared by close()
  bool active = false;
  std::string pool;

  void renew() {
    std::lock_guard lock(mutex);
    if (!client || !active) return;
    v1::EventSubscribeCall call;
    call.set_pool(pool);
    // Asynchronous: this runs on the io thread, which must not block.
    client->async_call<Volume::EventSubscribe>(call, {}, [](std::exception_ptr error, v1::EventSubscribeReply) {
      if (error) spdlog::warn("session: subscribing to events again failed: {}", Error::from_exception(error).describe());
    });
  }
};

Session Session::connect(const std::string& uri, rpc::ClientOptions options) {
  Session s;
  s.io_ = std::make_unique<rpc::IoThreads>(1);
  s.subscription_ = std::make_shared<Subscription>();
  s.reconnect_ = options.reconnect.enabled;
  if (s.reconnect_) {
    options.reconnect.on_event = [user = std::move(options.reconnect.on_event),
                                  subscription = s.subscription_](const rpc::ReconnectEvent& e) {
      if (e.kind == rpc::ReconnectEvent::Kind::reconnected) subscription->renew();
      if (user) user(e);
    };
  }
  s.client_ = std::make_unique<rpc::Client>(rpc::Client::connect_sync(s.io_->executor(), uri, std::move(options)));
  {
    std::lock_guard lock(s.subscription_->mutex);
    s.subscription_->client = s.client_.get();
  }
  s.active_ = std::make_shared<Active>();
  return s;
}

Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&& other) noexcept {
  if (this != &other) {
    close();
    io_ = std::move(other.io_);
    client_ = std::move(other.client_);
    active_ = std::move(other.active_);
    subscription_ = std::move(other.subscription_);
    reconnect_ = other.reconnect_;
  }
  return *this;
}
Session::~Session() { close(); }

rpc::Client& Session::rpc() { return *client_; }
asio::any_io_executor Session::executor() { return io_->executor(); }

void Session::close() {
  if (client_ && client_->is_open()) client_->close();
  // Let the closed connection's coroutines unwind and its calls complete
  // (their completions still reach client_) before the thread stops; only
  // then drop the client.
  if (io_) io_->finish(std::chrono::seconds(2));
  if (subscription_) {
    std::lock_guard lock(subscription_->mutex);
    subscription_->client = nullptr;
  }
  client_.reset();
}

void Session::abort_transfers(const std::string& reason) {
  if (active_) active_->abort_all(reason);
}

std::vector<v1::PoolInfo> Session::pool_list() {
  auto reply = client_->call_future<Volume::PoolList>(v1::PoolListCall{}).get();
  return {reply.pools().begin(), reply.pools().end()};
}

std::vector<v1::VolumeInfo> Session::vol_list(const std::string& pool) {
  v1::VolListCall call;
  call.set_pool(pool);
  auto reply = client_->call_future<Volume::VolList>(call).get();
  return {reply.volumes().begin(), reply.volumes().end()};
}

v1::VolumeInfo Session::vol_info(const std::string& pool, const std::string& name) {
  return client_->call_future<Volume::VolInfo>(ref(pool, name)).get();
}

v1::VolumeInfo Session::vol_create(const std::string& pool, const std::string& name, std::uint64_t capacity,
                                   bool preallocate) {
  v1::VolCreateCall call;
  *call.mutable_volume() = ref(pool, name);
  call.set_capacity(capacity);
  call.set_preallocate(preallocate);
  return client_->call_future<Volume::VolCreate>(call).get();
}

void Session::vol_delete(const std::string& pool, const std::string& name) {
  client_->call_future<Volume::VolDelete>(ref(pool, name)).get();
}

v1::VolumeInfo Session::vol_resize(const std::string& pool, const std::string& name, std::uint64_t capacity,
                                   bool allow_shrink) {
  v1::VolResizeCall call;
  *call.mutable_volume() = ref(pool, name);
  call.set_capacity(capacity);
  call.set_allow_shrink(allow_shrink);
  return client_->call_future<Volume::VolResize>(call).get();
}

UploadStream Session::open_upload(const v1::VolUploadCall& call) {
  auto impl = std::make_unique<UploadStream::Impl>(UploadStream::Impl{
      stream::open<Volume::VolUpload>(*client_, call), nullptr, nullptr});
  impl->registration = active_->add(impl->open.stream);
  if (auto c = client_->connection()) impl->pool = &c->pool();
  return UploadStream(std::move(impl));
}

DownloadStream Session::open_download(const v1::VolDownloadCall& call) {
  auto impl = std::make_unique<DownloadStream::Impl>(
      DownloadStream::Impl{stream::open<Volume::VolDownload>(*client_, call), nullptr});
  impl->registration = active_->add(impl->open.stream);
  return DownloadStream(std::move(impl));
}

TransferResult Session::upload_file(const std::string& pool, const std::string& name, const std::string& path,
                                    const UploadOptions& options, ProgressFn progress) {
  const bool from_stdin = path == "-";
  const int fd = from_stdin ? STDIN_FILENO : ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error::from_errno(errno, "open " + path);
  FileCloser closer{fd, !from_stdin};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error::from_errno(errno, "stat " + path);
  const bool seekable = S_ISREG(st.st_mode);
  std::optional<std::uint64_t> length = options.length;
  if (seekable) {
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (length && *length > size)
      throw Error(Code::out_of_range,
                  path + " has " + std::to_string(size) + " bytes, fewer than the " + std::to_string(*length) + " asked for",
                  "client");
    if (!length) length = size;
  }

  if (options.create) {
    try {
      vol_info(pool, name);
    } catch (const Error& e) {
      if (e.code() != Code::not_found) throw;
      if (!length)
        throw Error(Code::invalid_argument, "cannot create " + pool + "/" + name + " from " + path +
                                                ": its size is unknown; create the volume first (ferry vol-create)",
                    "client");
      vol_create(pool, name, std::max<std::uint64_t>(1, options.offset + *length));
    }
  }

  v1::VolUploadCall call;
  *call.mutable_volume() = ref(pool, name);
  call.set_offset(options.offset);
  if (length) call.set_length(*length);
  call.set_atomic(options.atomic);
  call.set_keep_capacity(options.keep_capacity);
  call.set_no_sync(options.no_sync);
  auto open = stream::open<Volume::VolUpload>(*client_, call);
  auto registration = active_->add(open.stream);
  CancelWatch watch(options.cancel, open.stream);
  auto& s = *open.stream;
  const std::size_t chunk = client_->stream_limits().chunk_size;
  auto connection = client_->connection();
  auto get_buffer = [&](std::size_t n) { return connection ? connection->pool().get(n) : rpc::Buffer(n); };
  Throttle throttle(std::move(progress), length.value_or(0));

  try {
    if (seekable && !options.dense) {
      stream::SparseReader reader(fd, 0, *length, chunk, options.detect_zeros);
      rpc::Buffer buffer = get_buffer(chunk);
      while (auto item = reader.next({buffer.data(), buffer.size()})) {
        if (item->hole) {
          s.write_hole_sync(item->length);
        } else if (item->length == buffer.size()) {
          s.write_sync(std::move(buffer));
          buffer = get_buffer(chunk);
        } else {
          s.write_sync(rpc::Buffer::copy_of(std::span<const std::uint8_t>(buffer.data(), item->length)));
        }
        throttle.add(item->length, item->hole);
      }
      if (reader.position() != *length)
        throw Error(Code::aborted, path + " shrank while it was being sent", "client");
    } else {
      // A pipe, or dense: read everything in order.
      std::uint64_t sent = 0;
      for (;;) {
        std::size_t want = chunk;
        if (length) want = static_cast<std::size_t>(std::min<std::uint64_t>(chunk, *length - sent));
        if (want == 0) break;
        rpc::Buffer buffer = get_buffer(want);
        const std::size_t n = seekable ? [&] {
          std::size_t done = 0;
          while (done < want) {
            const ssize_t r = ::pread(fd, buffer.data() + done, want - done, static_cast<off_t>(sent + done));
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) throw Error::from_errno(errno, "read " + path);
            if (r == 0) break;
            done += static_cast<std::size_t>(r);
          }
          return done;
        }()
                                       : read_some_fully(fd, {buffer.data(), want}, path);
        if (n == 0) break;
        const bool zero = options.detect_zeros && stream::is_all_zero({buffer.data(), n});
        if (zero)
          s.write_hole_sync(n);
        else if (n == want)
          s.write_sync(std::move(buffer));
        else
          s.write_sync(rpc::Buffer::copy_of(std::span<const std::uint8_t>(buffer.data(), n)));
        throttle.add(n, zero);
        sent += n;
        if (n < want) break;
      }
      if (length && sent != *length) throw Error(Code::aborted, path + " ended early while it was being sent", "client");
    }
    s.finish_sync();
  } catch (const Error& e) {
    // The daemon's own error explains more than ours (it aborted the stream).
    if (s.failed_by_peer()) {
      try {
        open.reply_sync();
      } catch (const Error& remote) {
        throw remote;
      }
    }
    s.abort(e);
    throw;
  }
  auto reply = open.reply_sync();
  Progress p = throttle.finish();
  TransferResult result;
  result.data_bytes = reply.data_bytes();
  result.hole_bytes = reply.hole_bytes();
  result.elapsed = p.elapsed;
  result.volume = reply.volume();
  return result;
}

TransferResult Session::download_file(const std::string& pool, const std::string& name, const std::string& path,
                                      const DownloadOptions& options, ProgressFn progress) {
  const v1::VolumeInfo info = vol_info(pool, name);
  if (options.offset > info.capacity())
    throw Error(Code::out_of_range, "offset " + std::to_string(options.offset) + " is past the end of " + pool + "/" +
                                        name + " (" + std::to_string(info.capacity()) + " bytes)",
                "client");
  const std::uint64_t total = options.length.value_or(info.capacity() - options.offset);
  const bool to_stdout = path == "-";
  const int fd = to_stdout ? STDOUT_FILENO : ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error::from_errno(errno, "create " + path);
  FileCloser closer{fd, !to_stdout};
  struct stat st {};
  ::fstat(fd, &st);
  const bool seekable = S_ISREG(st.st_mode);

  Throttle throttle(std::move(progress), total);
  std::optional<stream::SparseWriter> writer;
  if (seekable && !options.dense) writer.emplace(fd, 0, true);
  std::vector<std::uint8_t> zeros;
  std::uint64_t pos = 0;
  std::uint64_t data_bytes = 0, hole_bytes = 0;
  // With reconnecting, a download cut by a lost connection goes on from
  // where it was on the new one: VolDownload is idempotent and what has
  // arrived is on disk, in order.
  for (;;) {
    v1::VolDownloadCall call;
    *call.mutable_volume() = ref(pool, name);
    call.set_offset(options.offset + pos);
    if (options.length || pos > 0) call.set_length(total - pos);
    call.set_detect_zeros(options.detect_zeros);
    auto open = stream::open<Volume::VolDownload>(*client_, call);
    auto registration = active_->add(open.stream);
    CancelWatch watch(options.cancel, open.stream);
    auto& s = *open.stream;
    bool resume = false;
    std::uint64_t got_data = 0, got_holes = 0;  // what this stream brought
    try {
      for (;;) {
        stream::Item item = s.read_sync();
        if (item.kind == stream::Item::Kind::end) break;
        (item.kind == stream::Item::Kind::data ? got_data : got_holes) += item.length;
        if (item.kind == stream::Item::Kind::data) {
          if (writer)
            writer->write(item.data.bytes());
          else if (seekable) {
            std::size_t done = 0;
            auto bytes = item.data.bytes();
            while (done < bytes.size()) {
              const ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(pos + done));
              if (n < 0 && errno == EINTR) continue;
              if (n < 0) throw Error::from_errno(errno, "write " + path);
              done += static_cast<std::size_t>(n);
            }
          } else
            write_fully(fd, item.data.bytes().data(), item.data.size(), path);
          throttle.add(item.length, false);
        } else {
          if (writer) {
            writer->write_hole(item.length);
          } else {
            if (zeros.empty()) zeros.resize(1u << 20);
            for (std::uint64_t done = 0; done < item.length;) {
              const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(zeros.size(), item.length - done));
              if (seekable) {
                if (::pwrite(fd, zeros.data(), n, static_cast<off_t>(pos + done)) != static_cast<ssize_t>(n))
                  throw Error::from_errno(errno ? errno : ENOSPC, "write " + path);
              } else {
                write_fully(fd, zeros.data(), n, path);
              }
              done += n;
            }
          }
          throttle.add(item.length, true);
        }
        pos += item.length;
      }
      if (writer) writer->finish(false);
    } catch (const Error& e) {
      if (s.failed_by_peer()) {
        try {
          open.reply_sync();
        } catch (const Error& remote) {
          throw remote;
        }
      }
      if (!reconnect_ || !rpc::lost_with_reconnect(e)) {
        s.abort(e);
        throw;
      }
      resume = true;
      // The daemon's answer for this stream is lost: count what arrived.
      data_bytes += got_data;
      hole_bytes += got_holes;
    }
    if (resume) {
      spdlog::info("session: download of {}/{} cut at byte {} of {}: resuming once reconnected", pool, name, pos, total);
      // Waits for the new connection (VolInfo is idempotent); throws if
      // reconnecting gives up.
      vol_info(pool, name);
      continue;
    }
    auto reply = open.reply_sync();
    data_bytes += reply.data_bytes();
    hole_bytes += reply.hole_bytes();
    break;
  }
  if (pos != total)
    throw Error(Code::data_loss, "the download of " + pool + "/" + name + " ended after " + std::to_string(pos) +
                                     " of " + std::to_string(total) + " bytes",
                "client");
  Progress p = throttle.finish();
  TransferResult result;
  result.data_bytes = data_bytes;
  result.hole_bytes = hole_bytes;
  result.elapsed = p.elapsed;
  result.volume = info;
  return result;
}

void Session::subscribe(std::function<void(const v1::VolumeEvent&)> on_event, const std::string& pool) {
  client_->on_message<Volume::Event>([fn = std::move(on_event)](v1::VolumeEvent e) { fn(e); });
  v1::EventSubscribeCall call;
  call.set_pool(pool);
  client_->call_future<Volume::EventSubscribe>(call).get();
  std::lock_guard lock(subscription_->mutex);
  subscription_->active = true;
  subscription_->pool = pool;
}

void Session::unsubscribe() {
  {
    std::lock_guard lock(subscription_->mutex);
    subscription_->active = false;
  }
  client_->call_future<Volume::EventUnsubscribe>(v1::EventUnsubscribeCall{}).get();
}

}  // namespace ferry
