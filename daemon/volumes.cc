#include "daemon/volumes.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <chrono>
#include <deque>
#include <filesystem>
#include <random>
#include <spdlog/spdlog.h>

#include "daemon/config.h"
#include "daemon/copy_state.h"
#include "daemon/volume_io.h"
#include "ferry/v1/volume.ferry.h"
#include "stream/service.h"
#include "stream/sparse.h"
#include "rpc/waker.h"

namespace ferry::daemon {

using v1::Volume;
using v1::VolumeInfo;
using v1::VolumeRef;
using v1::PoolInfo;
using v1::PoolListCall;
using v1::PoolListReply;
using v1::VolListCall;
using v1::VolListReply;
using v1::VolCreateCall;
using v1::VolResizeCall;
using v1::VolUploadCall;
using v1::VolUploadReply;
using v1::VolDownloadCall;
using v1::VolDownloadReply;
using v1::VolumeEvent;
using v1::VolumeEventKind;
using v1::EventSubscribeCall;
using v1::EventSubscribeReply;
using v1::EventUnsubscribeCall;
using v1::Empty;
using v1::VOLUME_CREATED;
using v1::VOLUME_DELETED;
using v1::VOLUME_RESIZED;
using v1::VOLUME_WRITTEN;

namespace {

constexpr std::uint64_t max_capacity = (1ull << 63) - 1;

std::string ref_text(const std::string& pool, const std::string& name) { return pool + "/" + name; }

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string who(const rpc::PeerIdentity& peer) {
  std::string out = peer.transport + " " + peer.address;
  if (!peer.user.empty()) out += " user " + peer.user;
  if (peer.pid) out += " pid " + std::to_string(*peer.pid);
  return out;
}

std::string bytes_text(std::uint64_t n) { return std::to_string(n) + " bytes"; }

Error pool_error(Code code, const std::string& message, bool retryable = false) {
  return Error(code, message, "volume", retryable);
}

VolumeInfo stat_info(const std::string& pool, const std::string& name, const struct stat& st) {
  VolumeInfo info;
  info.set_pool(pool);
  info.set_name(name);
  info.set_capacity(static_cast<std::uint64_t>(st.st_size));
  info.set_allocation(static_cast<std::uint64_t>(st.st_blocks) * 512);
  info.set_modified_ns(static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec);
  return info;
}

}  // namespace

void validate_volume_name(const std::string& name) {
  if (name.empty()) throw pool_error(Code::invalid_argument, "volume name is empty");
  if (name.size() > 255)
    throw pool_error(Code::invalid_argument, "volume name is " + std::to_string(name.size()) + " bytes; at most 255");
  if (name[0] == '.')
    throw pool_error(Code::invalid_argument, "volume name '" + name + "' starts with '.'; names are plain file names");
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '+' || c == '-';
    if (!ok) {
      const std::string shown = (c == '/') ? "'/'" : (static_cast<unsigned char>(c) < 0x20 ? "a control character" : std::string("'") + c + "'");
      throw pool_error(Code::invalid_argument, "volume name '" + name + "' contains " + shown +
                                                   "; names are plain file names of letters, digits, '.', '_', '+', '-'");
    }
  }
}

// ---------------------------------------------------------------------------
// Writer locks and running downloads, per volume.

class VolumeService::Registry : public std::enable_shared_from_this<Registry> {
 public:
  struct Entry {
    bool writing = false;
    std::string writer;  // who, for the refusal message
    unsigned nbd_writers = 0;  // writable NBD connections (they share the volume)
    std::vector<std::weak_ptr<stream::Stream>> readers;
  };

  // Released by dropping the returned handle.
  std::shared_ptr<void> lock_writer(const std::string& key, const std::string& writer) {
    std::lock_guard lock(mutex_);
    Entry& e = entries_[key];
    if (e.writing)
      throw Error(Code::failed_precondition,
                  "volume " + key + " is in use by " + e.writer + "; wait for it to finish or cancel it",
                  "volume", true);
    if (e.nbd_writers)
      throw Error(Code::failed_precondition,
                  "volume " + key + " is open for writing by " + std::to_string(e.nbd_writers) +
                      " NBD connection(s); wait for them to disconnect",
                  "volume", true);
    e.writing = true;
    e.writer = writer;
    auto self = shared_from_this();
    return std::shared_ptr<void>(nullptr, [self, key](void*) {
      std::lock_guard lock(self->mutex_);
      auto it = self->entries_.find(key);
      if (it == self->entries_.end()) return;
      it->second.writing = false;
      self->tidy(it);
    });
  }

  // Writable NBD connections share a volume with each other (multi-conn)
  // but exclude uploads, resizes and deletes, as those exclude them.
  std::shared_ptr<void> lock_nbd_writer(const std::string& key) {
    std::lock_guard lock(mutex_);
    Entry& e = entries_[key];
    if (e.writing)
      throw Error(Code::failed_precondition,
                  "volume " + key + " is in use by " + e.writer + "; wait for it to finish or cancel it",
                  "volume", true);
    ++e.nbd_writers;
    auto self = shared_from_this();
    return std::shared_ptr<void>(nullptr, [self, key](void*) {
      std::lock_guard lock(self->mutex_);
      auto it = self->entries_.find(key);
      if (it == self->entries_.end()) return;
      --it->second.nbd_writers;
      self->tidy(it);
    });
  }

  std::shared_ptr<void> add_reader(const std::string& key, std::weak_ptr<stream::Stream> s) {
    std::lock_guard lock(mutex_);
    entries_[key].readers.push_back(s);
    auto self = shared_from_this();
    return std::shared_ptr<void>(nullptr, [self, key, s](void*) {
      std::lock_guard lock(self->mutex_);
      auto it = self->entries_.find(key);
      if (it == self->entries_.end()) return;
      auto& r = it->second.readers;
      r.erase(std::remove_if(r.begin(), r.end(),
                             [&](const std::weak_ptr<stream::Stream>& w) {
                               return !w.owner_before(s) && !s.owner_before(w);
                             }),
              r.end());
      self->tidy(it);
    });
  }

  // Aborts every running download of `key` with `error`.
  void abort_readers(const std::string& key, const Error& error) {
    std::vector<std::shared_ptr<stream::Stream>> streams;
    {
      std::lock_guard lock(mutex_);
      auto it = entries_.find(key);
      if (it == entries_.end()) return;
      for (auto& w : it->second.readers)
        if (auto s = w.lock()) streams.push_back(std::move(s));
    }
    for (auto& s : streams) s->abort(error);
  }

  void fill(const std::string& key, VolumeInfo& info) {
    std::lock_guard lock(mutex_);
    auto it = entries_.find(key);
    if (it == entries_.end()) return;
    info.set_writing(it->second.writing || it->second.nbd_writers > 0);
    info.set_readers(static_cast<std::uint32_t>(it->second.readers.size()));
  }

 private:
  void tidy(std::map<std::string, Entry>::iterator it) {
    if (!it->second.writing && !it->second.nbd_writers && it->second.readers.empty()) entries_.erase(it);
  }
  std::mutex mutex_;
  std::map<std::string, Entry> entries_;
};

// ---------------------------------------------------------------------------
// Event subscriptions.

class VolumeService::Events {
 public:
  void subscribe(rpc::MessageChannel channel, std::string pool) {
    std::lock_guard lock(mutex_);
    for (auto& s : subs_)
      if (s.channel.same_client(channel)) {
        s.pool = std::move(pool);
        return;
      }
    subs_.push_back({std::move(channel), std::move(pool)});
  }
  void unsubscribe(const rpc::MessageChannel& channel) {
    std::lock_guard lock(mutex_);
    std::erase_if(subs_, [&](const Sub& s) { return s.channel.same_client(channel); });
  }
  void publish(VolumeEventKind kind, const std::string& pool, const std::string& name, std::uint64_t capacity,
               std::string detail) {
    VolumeEvent event;
    event.set_kind(kind);
    event.mutable_volume()->set_pool(pool);
    event.mutable_volume()->set_name(name);
    event.set_capacity(capacity);
    event.set_detail(std::move(detail));
    event.set_time_ns(now_ns());
    std::lock_guard lock(mutex_);
    std::erase_if(subs_, [&](const Sub& s) {
      if (!s.pool.empty() && s.pool != pool) return !s.channel.open();
      return !s.channel.send<Volume::Event>(event) && !s.channel.open();
    });
  }

 private:
  struct Sub {
    rpc::MessageChannel channel;
    std::string pool;
  };
  std::mutex mutex_;
  std::vector<Sub> subs_;
};

// ---------------------------------------------------------------------------

namespace {

FileIo::Options file_io_options(const VolumeOptions& o) {
  FileIo::Options f;
  f.engine = o.file_io == "threads" ? FileIo::Engine::threads : FileIo::Engine::io_uring;
  f.threads = o.file_io_threads;
  if (o.fault.any()) f.fault = std::make_shared<IoFault>(o.fault);
  return f;
}

// Opens a volume of `pool` by name: no links followed, regular files only.
std::shared_ptr<Fd> open_volume(const VolumeService::Pool& pool, const std::string& name, int flags,
                                struct stat* st) {
  const int fd = ::openat(pool.dirfd, name.c_str(), flags | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT)
      throw pool_error(Code::not_found, "no volume '" + name + "' in pool '" + pool.name + "'");
    if (err == ELOOP)
      throw pool_error(Code::failed_precondition, "volume " + ref_text(pool.name, name) +
                                                      " is a symbolic link; ferry does not follow links in pools");
    throw Error::from_errno(err, "open volume " + ref_text(pool.name, name));
  }
  auto out = std::make_shared<Fd>(fd);
  struct stat local {};
  struct stat& s = st ? *st : local;
  if (::fstat(fd, &s) != 0) throw Error::from_errno(errno, "stat volume " + ref_text(pool.name, name));
  if (!S_ISREG(s.st_mode))
    throw pool_error(Code::failed_precondition,
                     "volume " + ref_text(pool.name, name) + " is not a regular file; ferry serves only raw files");
  return out;
}

// A volume with a copy state is incomplete (daemon/copy_state.h).
void note_copy_state(const VolumeService::Pool& pool, VolumeInfo& info) {
  try {
    if (auto state = read_copy_state(pool.dirfd, info.name())) {
      info.set_state("incomplete");
      info.set_state_detail(state->summary());
    }
  } catch (const Error& e) {
    info.set_state("incomplete");
    info.set_state_detail(e.message());
  }
}

VolumeInfo info_at(const VolumeService::Pool& pool, const std::string& name) {
  struct stat st {};
  if (::fstatat(pool.dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    if (errno == ENOENT) throw pool_error(Code::not_found, "no volume '" + name + "' in pool '" + pool.name + "'");
    throw Error::from_errno(errno, "stat volume " + ref_text(pool.name, name));
  }
  if (S_ISLNK(st.st_mode))
    throw pool_error(Code::failed_precondition,
                     "volume " + ref_text(pool.name, name) + " is a symbolic link; ferry does not follow links in pools");
  if (!S_ISREG(st.st_mode))
    throw pool_error(Code::failed_precondition,
                     "volume " + ref_text(pool.name, name) + " is not a regular file; ferry serves only raw files");
  VolumeInfo info = stat_info(pool.name, name, st);
  note_copy_state(pool, info);
  return info;
}

// Volume names in a pool's directory, sorted: regular files with valid
// names (temporary upload files start with '.', so they never show).
std::vector<std::string> list_names(const VolumeService::Pool& pool) {
  const int fd = ::openat(pool.dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw Error::from_errno(errno, "open pool " + pool.name);
  DIR* dir = ::fdopendir(fd);
  if (!dir) {
    ::close(fd);
    throw Error::from_errno(errno, "read pool " + pool.name);
  }
  std::vector<std::string> names;
  while (dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (e->d_type != DT_REG && e->d_type != DT_UNKNOWN) continue;
    try {
      validate_volume_name(name);
    } catch (const Error&) {
      continue;
    }
    names.push_back(std::move(name));
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

std::string temp_name(const std::string& name) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  char suffix[20];
  std::snprintf(suffix, sizeof suffix, "%016llx", static_cast<unsigned long long>(rng()));
  return ".ferry-upload." + name + "." + suffix;
}

}  // namespace

VolumeService::VolumeService(const std::vector<PoolConfig>& pools, VolumeOptions options)
    : options_(options),
      io_(std::make_unique<FileIo>(file_io_options(options))),
      registry_(std::make_shared<Registry>()),
      events_(std::make_shared<Events>()) {
  for (const auto& pc : pools) {
    Pool p;
    p.name = pc.name;
    p.path = pc.path;
    p.read_only = pc.read_only;
    std::error_code ec;
    if (!pc.read_only && !std::filesystem::exists(pc.path, ec)) {
      std::filesystem::create_directories(pc.path, ec);
      if (ec) throw Error(Code::failed_precondition, "pool " + pc.name + ": cannot create " + pc.path + ": " + ec.message(), "volume");
      spdlog::info("pool {}: created directory {}", pc.name, pc.path);
    }
    p.dirfd = ::open(pc.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (p.dirfd < 0)
      throw Error::from_errno(errno, "pool " + pc.name + ": open directory " + pc.path);
    // Left over by uploads that were running when the daemon died.
    for (const auto& entry : std::filesystem::directory_iterator(pc.path, ec)) {
      const std::string n = entry.path().filename().string();
      if (n.rfind(".ferry-upload.", 0) == 0 && !pc.read_only) {
        ::unlinkat(p.dirfd, n.c_str(), 0);
        spdlog::warn("pool {}: removed {} left by an interrupted atomic upload", pc.name, n);
      }
    }
    pools_.push_back(std::move(p));
  }
}

VolumeService::~VolumeService() {
  io_.reset();  // waits for nothing in flight: handlers are gone by now
  for (auto& p : pools_)
    if (p.dirfd >= 0) ::close(p.dirfd);
}

std::string VolumeService::describe() const {
  std::string out = std::to_string(pools_.size()) + " pool(s):";
  for (const auto& p : pools_) out += " " + p.name + "=" + p.path + (p.read_only ? " (read-only)" : "");
  return out + "; file I/O: " + io_->describe();
}

const VolumeService::Pool& VolumeService::pool(const std::string& name) const {
  for (const auto& p : pools_)
    if (p.name == name) return p;
  std::string known;
  for (const auto& p : pools_) known += (known.empty() ? "" : ", ") + p.name;
  throw pool_error(Code::not_found, "no pool '" + name + "' (pools: " + (known.empty() ? "none" : known) + ")");
}

const VolumeService::Pool& VolumeService::writable_pool(const std::string& name, const char* what) const {
  const Pool& p = pool(name);
  if (p.read_only)
    throw pool_error(Code::failed_precondition, std::string("cannot ") + what + " in pool '" + p.name + "': it is read-only");
  return p;
}

std::shared_ptr<void> VolumeService::lock_writer(const std::string& pool_name, const std::string& name,
                                                 const std::string& writer) {
  return registry_->lock_writer(ref_text(pool_name, name), writer);
}

std::shared_ptr<Fd> VolumeService::open_file(const Pool& p, const std::string& name, int flags, struct stat* st) {
  return open_volume(p, name, flags, st);
}

VolumeInfo VolumeService::info(const Pool& p, const std::string& name) {
  VolumeInfo out = info_at(p, name);
  registry_->fill(ref_text(p.name, name), out);
  return out;
}

void VolumeService::publish(VolumeEventKind kind, const std::string& pool_name, const std::string& name,
                            std::uint64_t capacity, const std::string& detail) {
  events_->publish(kind, pool_name, name, capacity, detail);
}

VolumeService::NbdVolume VolumeService::open_nbd(const std::string& pool_name, const std::string& name,
                                                bool read_only) {
  const Pool& p = pool(pool_name);
  validate_volume_name(name);
  const std::string key = ref_text(p.name, name);
  NbdVolume out;
  out.pool = p.name;
  out.name = name;
  out.read_only = read_only || p.read_only;
  std::shared_ptr<void> lock;
  if (!out.read_only) lock = registry_->lock_nbd_writer(key);
  struct stat st {};
  auto fd = open_volume(p, name, out.read_only ? O_RDONLY : O_RDWR, &st);
  out.fd = fd->fd;
  out.size = static_cast<std::uint64_t>(st.st_size);
  out.keep = std::make_shared<std::pair<std::shared_ptr<Fd>, std::shared_ptr<void>>>(fd, lock);
  return out;
}

std::shared_ptr<rpc::Program> VolumeService::program() {
  auto program = rpc::Program::of<Volume>();
  auto registry = registry_;
  auto events = events_;
  FileIo* io = io_.get();
  const unsigned depth = std::max(1u, options_.io_depth);

  auto writable = [this](const std::string& pool_name, const char* what) -> const Pool& {
    return writable_pool(pool_name, what);
  };

  program->on<Volume::PoolList>([this](const PoolListCall&, rpc::CallContext&) -> asio::awaitable<PoolListReply> {
    PoolListReply reply;
    for (const auto& p : pools_) {
      PoolInfo* info = reply.add_pools();
      info->set_name(p.name);
      info->set_path(p.path);
      info->set_read_only(p.read_only);
      struct statvfs vfs {};
      if (::fstatvfs(p.dirfd, &vfs) == 0) {
        info->set_capacity(static_cast<std::uint64_t>(vfs.f_blocks) * vfs.f_frsize);
        info->set_available(static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize);
      }
      std::uint64_t allocation = 0;
      std::uint32_t count = 0;
      for (const auto& name : list_names(p)) {
        struct stat st {};
        if (::fstatat(p.dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
        allocation += static_cast<std::uint64_t>(st.st_blocks) * 512;
        ++count;
      }
      info->set_volumes(count);
      info->set_allocation(allocation);
    }
    co_return reply;
  });

  program->on<Volume::VolList>([this, registry](const VolListCall& call,
                                                rpc::CallContext&) -> asio::awaitable<VolListReply> {
    const Pool& p = pool(call.pool());
    VolListReply reply;
    for (const auto& name : list_names(p)) {
      struct stat st {};
      if (::fstatat(p.dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
      VolumeInfo* info = reply.add_volumes();
      *info = stat_info(p.name, name, st);
      note_copy_state(p, *info);
      registry->fill(ref_text(p.name, name), *info);
    }
    co_return reply;
  });

  program->on<Volume::VolInfo>([this, registry](const VolumeRef& ref, rpc::CallContext&) -> asio::awaitable<VolumeInfo> {
    const Pool& p = pool(ref.pool());
    validate_volume_name(ref.name());
    VolumeInfo info = info_at(p, ref.name());
    registry->fill(ref_text(p.name, ref.name()), info);
    co_return info;
  });

  program->on<Volume::VolCreate>([writable, events](const VolCreateCall& call,
                                                    rpc::CallContext& ctx) -> asio::awaitable<VolumeInfo> {
    const Pool& p = writable(call.volume().pool(), "create a volume");
    const std::string& name = call.volume().name();
    validate_volume_name(name);
    if (call.capacity() == 0) throw pool_error(Code::invalid_argument, "capacity must be more than 0 bytes");
    if (call.capacity() > max_capacity)
      throw pool_error(Code::invalid_argument, "capacity " + std::to_string(call.capacity()) + " is over 2^63-1 bytes");
    const int fd = ::openat(p.dirfd, name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) {
      if (errno == EEXIST)
        throw pool_error(Code::already_exists, "volume " + ref_text(p.name, name) + " already exists");
      throw Error::from_errno(errno, "create volume " + ref_text(p.name, name));
    }
    Fd file(fd);
    auto fail = [&](int err, const char* what) {
      ::unlinkat(p.dirfd, name.c_str(), 0);
      return Error::from_errno(err, std::string(what) + " volume " + ref_text(p.name, name) + " of " +
                                        bytes_text(call.capacity()));
    };
    if (::ftruncate(fd, static_cast<off_t>(call.capacity())) != 0) throw fail(errno, "size");
    if (call.preallocate()) {
      if (const int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(call.capacity())); rc != 0)
        throw fail(rc, "preallocate");
    }
    struct stat st {};
    ::fstat(fd, &st);
    spdlog::info("volume {} created, {} ({})", ref_text(p.name, name), bytes_text(call.capacity()), who(ctx.peer()));
    events->publish(VOLUME_CREATED, p.name, name, call.capacity(), "created, " + bytes_text(call.capacity()));
    co_return stat_info(p.name, name, st);
  });

  program->on<Volume::VolDelete>([writable, registry, events](const VolumeRef& ref,
                                                              rpc::CallContext& ctx) -> asio::awaitable<Empty> {
    const Pool& p = writable(ref.pool(), "delete a volume");
    validate_volume_name(ref.name());
    const std::string key = ref_text(p.name, ref.name());
    info_at(p, ref.name());  // NOT_FOUND, or refuses links and non-files
    auto lock = registry->lock_writer(key, "a delete");
    if (::unlinkat(p.dirfd, ref.name().c_str(), 0) != 0) {
      if (errno == ENOENT) throw pool_error(Code::not_found, "no volume '" + ref.name() + "' in pool '" + p.name + "'");
      throw Error::from_errno(errno, "delete volume " + key);
    }
    remove_copy_state(p.dirfd, ref.name());
    registry->abort_readers(key, Error(Code::aborted, "volume " + key + " was deleted during the download", "volume"));
    spdlog::info("volume {} deleted ({})", key, who(ctx.peer()));
    events->publish(VOLUME_DELETED, p.name, ref.name(), 0, "deleted");
    co_return Empty{};
  });

  program->on<Volume::VolResize>([writable, registry, events](const VolResizeCall& call,
                                                              rpc::CallContext& ctx) -> asio::awaitable<VolumeInfo> {
    const Pool& p = writable(call.volume().pool(), "resize a volume");
    const std::string& name = call.volume().name();
    validate_volume_name(name);
    const std::string key = ref_text(p.name, name);
    if (call.capacity() == 0) throw pool_error(Code::invalid_argument, "capacity must be more than 0 bytes");
    if (call.capacity() > max_capacity)
      throw pool_error(Code::invalid_argument, "capacity " + std::to_string(call.capacity()) + " is over 2^63-1 bytes");
    // The writer lock for the length of the resize: no upload runs into it.
    auto lock = registry->lock_writer(key, "a resize");
    struct stat st {};
    auto file = open_volume(p, name, O_RDWR, &st);
    const auto old = static_cast<std::uint64_t>(st.st_size);
    if (call.capacity() < old && !call.allow_shrink())
      throw pool_error(Code::failed_precondition, "shrinking " + key + " from " + bytes_text(old) + " to " +
                                                      bytes_text(call.capacity()) +
                                                      " drops data; allow it explicitly (ferry vol-resize --shrink)");
    if (::ftruncate(file->fd, static_cast<off_t>(call.capacity())) != 0)
      throw Error::from_errno(errno, "resize volume " + key);
    ::fstat(file->fd, &st);
    spdlog::info("volume {} resized from {} to {} ({})", key, old, call.capacity(), who(ctx.peer()));
    events->publish(VOLUME_RESIZED, p.name, name, call.capacity(),
                    "resized from " + bytes_text(old) + " to " + bytes_text(call.capacity()));
    co_return stat_info(p.name, name, st);
  });

  program->on<Volume::EventSubscribe>([this, events](const EventSubscribeCall& call,
                                                     rpc::CallContext& ctx) -> asio::awaitable<EventSubscribeReply> {
    if (!call.pool().empty()) pool(call.pool());
    events->subscribe(ctx.channel(), call.pool());
    co_return EventSubscribeReply{};
  });
  program->on<Volume::EventUnsubscribe>([events](const EventUnsubscribeCall&,
                                                 rpc::CallContext& ctx) -> asio::awaitable<Empty> {
    events->unsubscribe(ctx.channel());
    co_return Empty{};
  });

  // ---- upload ----
  stream::on<Volume::VolUpload>(*program, [this, writable, registry, events, io, depth](
                                              const VolUploadCall& call, stream::Stream& s,
                                              rpc::CallContext& ctx) -> asio::awaitable<VolUploadReply> {
    const Pool& p = writable(call.volume().pool(), "upload to a volume");
    const std::string name = call.volume().name();
    validate_volume_name(name);
    const std::string key = ref_text(p.name, name);
    if (call.atomic() && call.offset() != 0)
      throw pool_error(Code::invalid_argument,
                       "an atomic upload replaces the whole volume; it takes no offset (got " +
                           std::to_string(call.offset()) + ")");
    ctx.set_subject(key);
    auto lock = registry->lock_writer(key, "an upload from " + who(ctx.peer()));
    struct stat st {};
    auto target = co_await io->run([&p, &name, &st] { return open_volume(p, name, O_RDWR, &st); });
    const auto capacity = static_cast<std::uint64_t>(st.st_size);
    if (call.offset() > capacity)
      throw pool_error(Code::out_of_range, "offset " + std::to_string(call.offset()) + " is past the end of " + key +
                                               " (capacity " + bytes_text(capacity) + ")");
    std::uint64_t limit = call.atomic() ? max_capacity : capacity;
    if (call.has_length()) {
      if (call.length() > limit - call.offset())
        throw pool_error(Code::out_of_range, "offset " + std::to_string(call.offset()) + " + length " +
                                                 std::to_string(call.length()) + " passes the end of " + key +
                                                 " (capacity " + bytes_text(capacity) + "); resize it first");
      limit = call.offset() + call.length();
    }

    // Atomic: into a new temporary file beside the volume.
    std::shared_ptr<Fd> out = target;
    std::string temp;
    bool fresh = false;  // nothing at or past offset holds data
    if (call.atomic()) {
      temp = temp_name(name);
      const int fd = ::openat(p.dirfd, temp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, st.st_mode & 07777);
      if (fd < 0) throw Error::from_errno(errno, "create a temporary file for " + key);
      out = std::make_shared<Fd>(fd);
      fresh = true;
    }
    const std::uint64_t old_size = fresh ? 0 : capacity;

    const auto ex = co_await asio::this_coro::executor;
    Pipeline pipeline(ex, depth, std::make_shared<std::pair<std::shared_ptr<void>, std::shared_ptr<Fd>>>(lock, out));
    std::uint64_t pos = call.offset();
    VolUploadReply reply;
    try {
      for (;;) {
        stream::Item item = co_await s.read();
        if (item.kind == stream::Item::Kind::end) break;
        if (item.length > limit - pos)
          throw pool_error(Code::out_of_range,
                           "the upload passes the end of " + key + " at offset " + std::to_string(limit) +
                               (call.has_length() ? " (offset + length given)" : " (its capacity); resize it first or upload with --atomic"));
        if (item.kind == stream::Item::Kind::data) {
          auto chunk = std::make_shared<stream::Chunk>(std::move(item.data));
          const std::uint64_t at = pos;
          co_await pipeline.room();
          pipeline.start([io, out, chunk, at]() -> asio::awaitable<void> {
            co_await io->write(out->fd, chunk->bytes(), at);
          });
          reply.set_data_bytes(reply.data_bytes() + item.length);
        } else {
          reply.set_hole_bytes(reply.hole_bytes() + item.length);
          // Over bytes that may hold data, make the hole real; past the old
          // end the file already reads as zeros.
          if (pos < old_size) {
            const std::uint64_t len = std::min(item.length, old_size - pos);
            const std::uint64_t at = pos;
            co_await pipeline.room();
            pipeline.start(
                [io, out, at, len]() -> asio::awaitable<void> { co_await io->zero_range(out->fd, at, len); });
          }
        }
        pos += item.length;
      }
      if (call.has_length() && pos != limit)
        throw pool_error(Code::invalid_argument, "the upload ended after " + bytes_text(pos - call.offset()) + " of the " +
                                                     bytes_text(call.length()) + " it announced");
      co_await pipeline.drain();
      if (call.atomic()) {
        const std::uint64_t size = call.keep_capacity() ? std::max(capacity, pos) : pos;
        if (::ftruncate(out->fd, static_cast<off_t>(size)) != 0) throw Error::from_errno(errno, "size the new " + key);
      }
      if (!call.no_sync()) co_await io->datasync(out->fd);
      if (call.atomic()) {
        if (::renameat(p.dirfd, temp.c_str(), p.dirfd, name.c_str()) != 0)
          throw Error::from_errno(errno, "replace " + key + " with the uploaded data");
        temp.clear();
        if (!call.no_sync()) ::fsync(p.dirfd);
      }
      // Every write has landed: the volume is free for the next writer
      // before the reply says so (one that follows at once must not find
      // it held).
      pipeline.release();
      lock.reset();
    } catch (...) {
      Error error = Error::from_exception(std::current_exception());
      if (s.failed_by_peer() && s.error()) error = *s.error();
      if (!temp.empty()) {
        ::unlinkat(p.dirfd, temp.c_str(), 0);
        spdlog::info("upload to {} ({}) failed: {}; the volume keeps its old contents", key, who(ctx.peer()),
                     error.message());
      } else {
        spdlog::info("upload to {} ({}) failed after {} bytes at offset {}: {}; the bytes written so far stay", key,
                     who(ctx.peer()), pos - call.offset(), call.offset(), error.message());
        if (pos > call.offset())
          events->publish(VOLUME_WRITTEN, p.name, name, capacity,
                          "upload failed after " + bytes_text(pos - call.offset()) + ": " + error.message());
      }
      throw;
    }
    struct stat after {};
    ::fstat(out->fd, &after);
    *reply.mutable_volume() = stat_info(p.name, name, after);
    spdlog::info("upload to {} done: {} data, {} holes from offset {}{} ({})", key, reply.data_bytes(),
                 reply.hole_bytes(), call.offset(), call.atomic() ? ", atomic" : "", who(ctx.peer()));
    events->publish(VOLUME_WRITTEN, p.name, name, static_cast<std::uint64_t>(after.st_size),
                    "uploaded " + bytes_text(reply.data_bytes()) + " of data and " + bytes_text(reply.hole_bytes()) +
                        " of holes" + (call.atomic() ? " (atomic)" : ""));
    co_return reply;
  });

  // ---- download ----
  stream::on<Volume::VolDownload>(*program, [this, registry, io, depth](
                                                const VolDownloadCall& call, stream::Stream& s,
                                                rpc::CallContext& ctx) -> asio::awaitable<VolDownloadReply> {
    const Pool& p = pool(call.volume().pool());
    const std::string name = call.volume().name();
    validate_volume_name(name);
    const std::string key = ref_text(p.name, name);
    ctx.set_subject(key);
    struct stat st {};
    auto file = co_await io->run([&p, &name, &st] { return open_volume(p, name, O_RDONLY, &st); });
    const auto capacity = static_cast<std::uint64_t>(st.st_size);
    if (call.offset() > capacity)
      throw pool_error(Code::out_of_range, "offset " + std::to_string(call.offset()) + " is past the end of " + key +
                                               " (capacity " + bytes_text(capacity) + ")");
    std::uint64_t end = capacity;
    if (call.has_length()) {
      if (call.length() > capacity - call.offset())
        throw pool_error(Code::out_of_range, "offset " + std::to_string(call.offset()) + " + length " +
                                                 std::to_string(call.length()) + " passes the end of " + key +
                                                 " (capacity " + bytes_text(capacity) + ")");
      end = call.offset() + call.length();
    }
    auto reading = registry->add_reader(key, s.weak_from_this());
    RangeReader::Options options;
    options.chunk = s.limits().chunk_size;
    options.depth = depth;
    options.dense = call.dense();
    options.detect_zeros = call.detect_zeros();
    RangeReader reader(co_await asio::this_coro::executor, io, file, call.offset(), end, options, &ctx.pool(),
                       "volume " + key);
    VolDownloadReply reply;
    reply.set_capacity(capacity);
    std::optional<ExtentHasher> hasher;
    if (call.digest()) hasher.emplace();
    for (;;) {
      RangeReader::Piece piece = co_await reader.next();
      if (piece.kind == RangeReader::Piece::Kind::end) break;
      if (piece.kind == RangeReader::Piece::Kind::hole) {
        reply.set_hole_bytes(reply.hole_bytes() + piece.length);
        if (hasher) hasher->zeros(piece.length);
        co_await s.write_hole(piece.length);
      } else {
        reply.set_data_bytes(reply.data_bytes() + piece.length);
        if (hasher) hasher->data(piece.data.span());
        co_await s.write(std::move(piece.data));
      }
    }
    if (hasher) {
      const Digest d = hasher->digest();
      reply.set_digest(std::string(d.begin(), d.end()));
    }
    (void)reading;
    co_return reply;
  });

  return program;
}

}  // namespace ferry::daemon
