#include "client/copy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/use_future.hpp>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "ferry/v1/migration.ferry.h"
#include "ferry/v1/volume.ferry.h"
#include "nbd/remote_backend.h"
#include "rpc/io_threads.h"
#include "stream/digest.h"
#include "stream/service.h"
#include "stream/sparse.h"

namespace ferry {

namespace {

using Clock = std::chrono::steady_clock;
using stream::Digest;
using stream::ExtentHasher;

constexpr std::uint64_t default_extent = 64ull << 20;
constexpr unsigned default_parallel = 8;
constexpr std::size_t local_chunk = 1u << 20;  // hashing a local extent

Error copy_error(Code code, const std::string& message) { return Error(code, message, "copy"); }

using stream::from_digest;
using stream::to_digest;

std::string new_copy_id() {
  std::mt19937_64 rng{std::random_device{}()};
  char text[32];
  std::snprintf(text, sizeof text, "copy-%012llx", static_cast<unsigned long long>(rng() & 0xffffffffffffull));
  return text;
}

// ---------------------------------------------------------------- files

class FileDisk final : public LocalDisk {
 public:
  FileDisk(int fd, std::string path, std::uint64_t size, std::string marker)
      : fd_(fd), path_(std::move(path)), size_(size), marker_(std::move(marker)) {}
  ~FileDisk() override { ::close(fd_); }

  std::uint64_t size() const override { return size_; }
  std::string description() const override { return "file " + path_; }

  std::unique_ptr<Reader> reader(std::uint64_t offset, std::uint64_t length, std::size_t chunk) override {
    struct R final : Reader {
      stream::SparseReader sparse;
      R(int fd, std::uint64_t offset, std::uint64_t length, std::size_t chunk) : sparse(fd, offset, length, chunk, true) {}
      std::optional<Item> next(std::span<std::uint8_t> buffer) override {
        auto item = sparse.next(buffer);
        if (!item) return std::nullopt;
        return Item{item->hole, item->length};
      }
    };
    return std::make_unique<R>(fd_, offset, length, chunk);
  }

  std::unique_ptr<Writer> writer(std::uint64_t offset) override {
    struct W final : Writer {
      stream::SparseWriter sparse;
      W(int fd, std::uint64_t offset) : sparse(fd, offset, false) {}
      void write(std::span<const std::uint8_t> data) override { sparse.write(data); }
      void write_hole(std::uint64_t length) override { sparse.write_hole(length); }
    };
    return std::make_unique<W>(fd_, offset);
  }

  void flush() override {
    if (::fdatasync(fd_) != 0) throw Error::from_errno(errno, "fdatasync " + path_);
  }

  void complete() override {
    if (marker_.empty()) return;
    if (::unlink(marker_.c_str()) != 0 && errno != ENOENT) throw Error::from_errno(errno, "remove " + marker_);
    sync_directory_of(marker_);
    marker_.clear();
  }

  static void sync_directory_of(const std::string& path) {
    const auto slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    const int d = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d < 0) return;
    ::fsync(d);
    ::close(d);
  }

 private:
  int fd_;
  std::string path_;
  std::uint64_t size_;
  std::string marker_;
};

// ---------------------------------------------------------------- NBD

class NbdDisk final : public LocalDisk {
 public:
  NbdDisk(const std::string& uri, bool writable, std::uint64_t capacity) : uri_(uri), io_(1) {
    backend_ = nbd::RemoteBackend::connect_blocking(io_.executor(), uri);
    caps_ = backend_->capabilities();
    if (writable && caps_.read_only) throw copy_error(Code::permission_denied, "NBD export " + uri + " is read-only");
    if (writable && backend_->size() < capacity)
      throw copy_error(Code::out_of_range, "NBD export " + uri + " has " + std::to_string(backend_->size()) +
                                               " bytes, fewer than the volume's " + std::to_string(capacity));
    size_ = writable ? capacity : backend_->size();
  }
  ~NbdDisk() override {
    backend_.reset();
    io_.finish(std::chrono::seconds(2));
  }

  std::uint64_t size() const override { return size_; }
  std::string description() const override { return "NBD " + uri_; }

  template <class T>
  T run(asio::awaitable<T> work) {
    return asio::co_spawn(io_.executor(), std::move(work), asio::use_future).get();
  }

  std::unique_ptr<Reader> reader(std::uint64_t offset, std::uint64_t length, std::size_t chunk) override {
    struct R final : Reader {
      NbdDisk& disk;
      std::uint64_t pos, end;
      std::size_t chunk;
      std::deque<std::pair<std::uint64_t, bool>> map;  // extents from pos on: length, zero
      R(NbdDisk& d, std::uint64_t offset, std::uint64_t length, std::size_t c)
          : disk(d), pos(offset), end(offset + length), chunk(c) {}
      std::optional<Item> next(std::span<std::uint8_t> buffer) override {
        if (pos >= end) return std::nullopt;
        if (map.empty()) {
          if (disk.caps_.can_extents) {
            for (const auto& e : disk.run(disk.backend_->extents(pos, end - pos)))
              map.push_back({e.length, (e.flags & nbd::state_zero) != 0});
          }
          if (map.empty()) map.push_back({end - pos, false});
        }
        auto& [left, zero] = map.front();
        const std::uint64_t run_length = std::min(left, end - pos);
        std::uint64_t n;
        bool hole;
        if (zero) {
          n = run_length;
          hole = true;
        } else {
          n = std::min<std::uint64_t>({run_length, chunk, buffer.size()});
          disk.run(disk.backend_->read(buffer.first(static_cast<std::size_t>(n)), pos, nullptr));
          hole = stream::is_all_zero(buffer.first(static_cast<std::size_t>(n)));
        }
        pos += n;
        left -= std::min(left, n);
        if (left == 0 || pos >= end) map.pop_front();
        if (pos >= end) map.clear();
        return Item{hole, n};
      }
    };
    return std::make_unique<R>(*this, offset, length, chunk);
  }

  std::unique_ptr<Writer> writer(std::uint64_t offset) override {
    struct W final : Writer {
      NbdDisk& disk;
      std::uint64_t pos;
      W(NbdDisk& d, std::uint64_t offset) : disk(d), pos(offset) {}
      void write(std::span<const std::uint8_t> data) override {
        disk.run(disk.backend_->write(data, pos, false));
        pos += data.size();
      }
      void write_hole(std::uint64_t length) override {
        while (length) {
          const std::uint64_t n = std::min<std::uint64_t>(length, 1ull << 30);
          if (disk.caps_.can_zero) {
            disk.run(disk.backend_->zero(pos, n, nbd::ZeroFlags{}));
          } else {
            static const std::vector<std::uint8_t> zeros(1u << 20);
            for (std::uint64_t done = 0; done < n;) {
              const auto k = static_cast<std::size_t>(std::min<std::uint64_t>(n - done, zeros.size()));
              disk.run(disk.backend_->write(std::span<const std::uint8_t>(zeros.data(), k), pos + done, false));
              done += k;
            }
          }
          pos += n;
          length -= n;
        }
      }
    };
    return std::make_unique<W>(*this, offset);
  }

  void flush() override {
    if (caps_.can_flush) run(backend_->flush());
  }

 private:
  std::string uri_;
  rpc::IoThreads io_;
  std::shared_ptr<nbd::RemoteBackend> backend_;
  nbd::Capabilities caps_;
  std::uint64_t size_ = 0;
};

// ---------------------------------------------------------------- the copy

// What the workers of one copy share.
class Copy {
 public:
  Copy(std::uint64_t capacity, const LocalCopyOptions& options)
      : capacity_(capacity),
        extent_(options.extent_size ? std::max<std::uint64_t>(1u << 20, options.extent_size) : default_extent),
        options_(options) {
    if (extent_ % 4096) throw copy_error(Code::invalid_argument, "the extent size must be a multiple of 4096");
    extents_ = (capacity_ + extent_ - 1) / extent_;
  }

  std::uint64_t extents() const { return extents_; }
  std::uint64_t offset(std::uint64_t i) const { return i * extent_; }
  std::uint64_t length(std::uint64_t i) const { return std::min(extent_, capacity_ - offset(i)); }
  std::uint64_t extent_size() const { return extent_; }

  // Runs `work(i)` for every extent on `parallel` threads while this thread
  // watches for an interruption and reports progress. The first failure
  // stops the rest.
  void run(const std::function<void(std::uint64_t)>& work, const ProgressFn& progress) {
    for (std::uint64_t i = 0; i < extents_; ++i) todo_.push_back(i);
    const unsigned n = static_cast<unsigned>(
        std::min<std::uint64_t>(options_.parallel ? options_.parallel : default_parallel, std::max<std::uint64_t>(1, extents_)));
    std::vector<std::thread> threads;
    unsigned running = n;
    for (unsigned t = 0; t < n; ++t)
      threads.emplace_back([&] {
        for (;;) {
          std::uint64_t i;
          {
            std::lock_guard lock(mutex_);
            if (stop_ || todo_.empty()) break;
            i = todo_.front();
            todo_.pop_front();
          }
          try {
            work(i);
          } catch (...) {
            halt(Error::from_exception(std::current_exception()));
          }
        }
        std::lock_guard lock(mutex_);
        --running;
        cv_.notify_all();
      });
    {
      std::unique_lock lock(mutex_);
      while (running > 0) {
        cv_.wait_for(lock, std::chrono::milliseconds(100));
        lock.unlock();
        if (options_.interrupted && options_.interrupted())
          halt(Error(Code::cancelled, "interrupted on the ferry client (Ctrl-C)", "client"));
        if (progress) progress(snapshot(false));
        lock.lock();
      }
    }
    for (auto& t : threads) t.join();
    if (progress) progress(snapshot(!stop_));
  }

  void halt(const Error& e) {
    std::set<std::shared_ptr<stream::Stream>> active;
    {
      std::lock_guard lock(mutex_);
      if (stop_) return;
      stop_ = e;
      active = active_;
    }
    for (auto& s : active) s->abort(e);
    cv_.notify_all();
  }
  std::optional<Error> stopped() {
    std::lock_guard lock(mutex_);
    return stop_;
  }
  void check() {
    if (auto e = stopped()) throw *e;
  }

  void track(const std::shared_ptr<stream::Stream>& s) {
    std::lock_guard lock(mutex_);
    active_.insert(s);
    if (stop_) s->abort(*stop_);
  }
  void untrack(const std::shared_ptr<stream::Stream>& s) {
    std::lock_guard lock(mutex_);
    active_.erase(s);
  }
  // Runs `body` with `s` tracked, so that a stop aborts it; a failure the
  // daemon caused is reported with the daemon's reason, which says more
  // than ours.
  template <class F>
  void over(const std::shared_ptr<stream::Stream>& s, F&& body) {
    track(s);
    try {
      body();
    } catch (...) {
      untrack(s);
      if (s->failed_by_peer() && s->error() && !stopped()) throw *s->error();
      throw;
    }
    untrack(s);
  }

  // Spends `bytes` of the bandwidth cap, in 20 ms steps so a stop is seen.
  void throttle(std::uint64_t bytes) {
    if (!options_.bandwidth) return;
    Clock::time_point at;
    {
      std::lock_guard lock(mutex_);
      const auto now = Clock::now();
      if (next_send_ < now) next_send_ = now;
      at = next_send_;
      next_send_ += std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(static_cast<double>(bytes) / static_cast<double>(options_.bandwidth)));
    }
    while (Clock::now() < at) {
      check();
      std::this_thread::sleep_for(std::min<Clock::duration>(at - Clock::now(), std::chrono::milliseconds(20)));
    }
  }

  void done(std::uint64_t i, const Digest& d, bool skipped) {
    std::lock_guard lock(mutex_);
    digests_[i] = d;
    if (skipped) skipped_ += length(i);
  }
  void moved(std::uint64_t n, bool hole) {
    std::lock_guard lock(mutex_);
    (hole ? holes_ : data_) += n;
  }

  // The digest of extent i of a local disk.
  Digest hash_local(LocalDisk& disk, std::uint64_t i) {
    auto reader = disk.reader(offset(i), length(i), local_chunk);
    std::vector<std::uint8_t> buffer(local_chunk);
    ExtentHasher h;
    while (auto item = reader->next(buffer)) {
      check();
      if (item->hole)
        h.zeros(item->length);
      else
        h.data(std::span<const std::uint8_t>(buffer.data(), static_cast<std::size_t>(item->length)));
    }
    return h.digest();
  }

  LocalCopyResult result(const std::string& digest) {
    std::lock_guard lock(mutex_);
    LocalCopyResult r;
    r.total_bytes = capacity_;
    r.data_bytes = data_;
    r.hole_bytes = holes_;
    r.skipped_bytes = skipped_;
    r.extents = extents_;
    r.digest = digest;
    r.elapsed = Clock::now() - started_;
    return r;
  }
  std::map<std::uint64_t, Digest> digests() {
    std::lock_guard lock(mutex_);
    return digests_;
  }

 private:
  Progress snapshot(bool finished) {
    std::lock_guard lock(mutex_);
    Progress p;
    p.total = capacity_;
    // Bytes moved (data and holes) or verified in place: it grows with every
    // chunk, rather than once per finished extent.
    p.done = data_ + holes_ + skipped_;
    p.data_bytes = data_;
    p.hole_bytes = holes_;
    p.elapsed = Clock::now() - started_;
    p.finished = finished;
    return p;
  }

  const std::uint64_t capacity_;
  const std::uint64_t extent_;
  const LocalCopyOptions& options_;
  std::uint64_t extents_ = 0;
  const Clock::time_point started_ = Clock::now();
  std::mutex mutex_;
  std::condition_variable cv_;
  std::optional<Error> stop_;
  std::deque<std::uint64_t> todo_;
  std::set<std::shared_ptr<stream::Stream>> active_;
  std::map<std::uint64_t, Digest> digests_;
  std::uint64_t data_ = 0, holes_ = 0, skipped_ = 0;
  Clock::time_point next_send_{};
};

std::string hex(const Digest& d) { return stream::digest_hex(d); }

}  // namespace

// ---------------------------------------------------------------- opening

std::unique_ptr<LocalDisk> open_file_source(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error::from_errno(errno, "open " + path);
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw copy_error(Code::invalid_argument, path + " is not a regular file (an NBD export can serve a device)");
  }
  if (st.st_size == 0) {
    ::close(fd);
    throw copy_error(Code::failed_precondition, path + " is empty: nothing to copy");
  }
  return std::make_unique<FileDisk>(fd, path, static_cast<std::uint64_t>(st.st_size), "");
}

std::unique_ptr<LocalDisk> open_file_destination(const std::string& path, std::uint64_t capacity,
                                                 const std::string& source, bool overwrite, bool resume) {
  struct stat st {};
  const bool exists = ::stat(path.c_str(), &st) == 0;
  if (exists && !S_ISREG(st.st_mode))
    throw copy_error(Code::invalid_argument, path + " is not a regular file (serve a device over NBD to copy into it)");
  if (exists && !overwrite && !resume)
    throw copy_error(Code::already_exists,
                     path + " exists: --overwrite replaces it, --resume continues an interrupted copy into it");
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | (overwrite ? O_TRUNC : 0), 0644);
  if (fd < 0) throw Error::from_errno(errno, "open " + path);
  try {
    if (::ftruncate(fd, static_cast<off_t>(capacity)) != 0) throw Error::from_errno(errno, "size " + path);
    // The marker: this file is not a finished copy until it goes.
    const std::string marker = path + ".ferry-copy";
    const std::string text = "ferry-copy 1 capacity=" + std::to_string(capacity) + "\nsource " + source + "\n";
    const int m = ::open(marker.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (m < 0) throw Error::from_errno(errno, "create " + marker);
    const bool ok = ::write(m, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(m) == 0;
    const int err = errno;
    ::close(m);
    if (!ok) throw Error::from_errno(err, "write " + marker);
    FileDisk::sync_directory_of(path);
    return std::make_unique<FileDisk>(fd, path, capacity, marker);
  } catch (...) {
    ::close(fd);
    throw;
  }
}

std::unique_ptr<LocalDisk> open_nbd_disk(const std::string& uri, bool writable, std::uint64_t capacity) {
  auto disk = std::make_unique<NbdDisk>(uri, writable, capacity);
  if (!writable && disk->size() == 0) throw copy_error(Code::failed_precondition, "NBD export " + uri + " is empty");
  return disk;
}

// ---------------------------------------------------------------- to a volume

LocalCopyResult copy_to_volume(Session& session, LocalDisk& source, const std::string& pool, const std::string& name,
                               const LocalCopyOptions& options, ProgressFn progress) {
  using Migration = v1::Migration;
  rpc::Client& client = session.rpc();
  Copy copy(source.size(), options);
  const std::string copy_id = new_copy_id();

  v1::CopyOpenCall open;
  open.mutable_volume()->set_pool(pool);
  open.mutable_volume()->set_name(name);
  open.set_capacity(source.size());
  open.set_extent_size(copy.extent_size());
  open.set_copy_id(copy_id);
  open.set_source(options.source_text.empty() ? source.description() : options.source_text);
  open.set_resume(options.resume);
  open.set_overwrite(options.overwrite);
  open.set_no_sync(options.no_sync);
  const v1::CopyOpenReply opened = client.call_future<Migration::CopyOpen>(open).get();
  std::map<std::uint64_t, Digest> committed;
  for (const auto& c : opened.committed()) committed[c.index()] = to_digest(c.digest());

  auto send = [&](std::uint64_t i) {
    if (auto it = committed.find(i); it != committed.end()) {
      const Digest mine = copy.hash_local(source, i);
      if (mine == it->second) {
        copy.done(i, mine, true);
        return;
      }
    }
    v1::CopyWriteCall call;
    call.set_copy_id(copy_id);
    call.set_index(i);
    call.set_offset(copy.offset(i));
    call.set_length(copy.length(i));
    auto s = stream::open<Migration::CopyWrite>(client, call);
    ExtentHasher h;
    v1::CopyWriteReply reply;
    copy.over(s.stream, [&] {
      const std::size_t chunk = s.stream->limits().chunk_size;
      auto reader = source.reader(copy.offset(i), copy.length(i), chunk);
      rpc::BufferPool* pool_of = client.connection() ? &client.connection()->pool() : nullptr;
      for (;;) {
        copy.check();
        rpc::Buffer buffer = pool_of ? pool_of->get(chunk) : rpc::Buffer(chunk);
        auto item = reader->next(std::span<std::uint8_t>(buffer.data(), chunk));
        if (!item) break;
        if (item->hole) {
          h.zeros(item->length);
          s.stream->write_hole_sync(item->length);
        } else {
          buffer.shrink(static_cast<std::size_t>(item->length));
          h.data(buffer.span());
          copy.throttle(item->length);
          s.stream->write_sync(std::move(buffer));
        }
        copy.moved(item->length, item->hole);
      }
      s.stream->finish_sync();
      reply = s.reply_sync();
    });
    const Digest mine = h.digest();
    if (reply.digest() != from_digest(mine))
      throw copy_error(Code::data_loss, "extent " + std::to_string(i) + ": the destination wrote digest " +
                                            hex(to_digest(reply.digest())) + ", this end sent " + hex(mine));
    copy.done(i, mine, false);
  };

  try {
    copy.run(send, progress);
    copy.check();
    v1::CopyFinishCall finish;
    finish.set_copy_id(copy_id);
    const auto digests = copy.digests();
    for (const auto& [i, d] : digests) {
      auto* e = finish.add_digests();
      e->set_index(i);
      e->set_digest(from_digest(d));
    }
    const auto done = client.call_future<Migration::CopyFinish>(finish).get();
    if (done.digest() != from_digest(stream::combine_digests(digests)))
      throw copy_error(Code::data_loss, "the destination's volume digest " + hex(to_digest(done.digest())) +
                                            " differs from this end's");
    auto r = copy.result(done.digest());
    r.job = opened.job();
    return r;
  } catch (const std::exception&) {
    const Error why = copy.stopped() ? *copy.stopped() : Error::from_exception(std::current_exception());
    if (client.is_open()) {
      v1::CopyAbortCall abort;
      abort.set_copy_id(copy_id);
      abort.set_code(static_cast<std::uint32_t>(why.code()));
      abort.set_message(why.message());
      try {
        client.call_future<Migration::CopyAbort>(abort, rpc::with_timeout(std::chrono::seconds(2))).get();
      } catch (const std::exception&) {
        // The daemon also ends the session when this connection closes.
      }
    }
    throw why;
  }
}

// ---------------------------------------------------------------- from a volume

LocalCopyResult copy_from_volume(Session& session, const std::string& pool, const std::string& name,
                                 LocalDisk& destination, const LocalCopyOptions& options, ProgressFn progress) {
  rpc::Client& client = session.rpc();
  const std::uint64_t capacity = destination.size();
  Copy copy(capacity, options);

  auto fetch = [&](std::uint64_t i) {
    if (options.resume) {
      // What the file (or export) holds already, against the volume now.
      v1::ExtentDigestsCall ask;
      ask.mutable_volume()->set_pool(pool);
      ask.mutable_volume()->set_name(name);
      ask.set_extent_size(copy.extent_size());
      ask.set_first(i);
      ask.set_count(1);
      auto theirs = client.call_future<v1::Migration::ExtentDigests>(ask);
      const Digest mine = copy.hash_local(destination, i);
      const auto reply = theirs.get();
      if (reply.capacity() != capacity)
        throw copy_error(Code::aborted, "volume " + pool + "/" + name + " changed size during the copy");
      if (reply.digests_size() != 1) throw copy_error(Code::internal, "no digest for extent " + std::to_string(i));
      if (mine == to_digest(reply.digests(0).digest())) {
        copy.done(i, mine, true);
        return;
      }
    }
    v1::VolDownloadCall call;
    call.mutable_volume()->set_pool(pool);
    call.mutable_volume()->set_name(name);
    call.set_offset(copy.offset(i));
    call.set_length(copy.length(i));
    call.set_detect_zeros(true);
    call.set_digest(true);  // the daemon hashes what it reads and sends, as a source daemon does
    auto s = stream::open<v1::Volume::VolDownload>(client, call);
    ExtentHasher h;
    v1::VolDownloadReply reply;
    copy.over(s.stream, [&] {
      auto writer = destination.writer(copy.offset(i));
      for (;;) {
        copy.check();
        stream::Item item = s.stream->read_sync();
        if (item.kind == stream::Item::Kind::end) break;
        if (item.kind == stream::Item::Kind::hole) {
          h.zeros(item.length);
          writer->write_hole(item.length);
        } else {
          h.data(item.data.bytes());
          copy.throttle(item.length);
          writer->write(item.data.bytes());
        }
        copy.moved(item.length, item.kind == stream::Item::Kind::hole);
      }
      reply = s.reply_sync();
    });
    if (reply.capacity() != capacity)
      throw copy_error(Code::aborted, "volume " + pool + "/" + name + " changed size during the copy");
    if (reply.digest().size() != sizeof(Digest))
      throw copy_error(Code::unimplemented, "the daemon does not send download digests (an older ferryd?)");
    const Digest mine = h.digest();
    const Digest source_digest = to_digest(reply.digest());
    if (mine != source_digest)
      throw copy_error(Code::data_loss, "extent " + std::to_string(i) + ": received digest " + hex(mine) +
                                            ", the source's is " + hex(source_digest));
    copy.done(i, mine, false);
  };

  copy.run(fetch, progress);
  copy.check();
  destination.flush();
  destination.complete();
  return copy.result(from_digest(stream::combine_digests(copy.digests())));
}

}  // namespace ferry
