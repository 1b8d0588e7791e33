#include "daemon/nbd_service.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/this_coro.hpp>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <spdlog/spdlog.h>

#include "ferry/v1/nbd.ferry.h"
#include "nbd/delay_backend.h"
#include "nbd/memory_backend.h"
#include "nbd/remote_backend.h"
#include "nbd/stream_pipe.h"
#include "rpc/socket_handover.h"
#include "rpc/socket_transport.h"
#include "rpc/units.h"
#include "stream/service.h"

namespace ferry::daemon {

using v1::Nbd;
using v1::NbdConnectCall;
using v1::NbdConnectReply;
using v1::NbdExportListCall;
using v1::NbdExportListReply;

namespace {

Error nbd_error(Code code, const std::string& message, bool retryable = false) {
  return Error(code, message, "nbd", retryable);
}

// ---------------------------------------------------------------------------
// A volume file as an NBD backend.

class VolumeBackend final : public nbd::Backend {
 public:
  VolumeBackend(FileIo& io, VolumeService::NbdVolume volume) : io_(io), v_(std::move(volume)) {}

  std::uint64_t size() const override { return v_.size; }
  nbd::Capabilities capabilities() const override {
    nbd::Capabilities c;
    c.read_only = v_.read_only;
    // Every connection writes the same file through the same page cache,
    // and fdatasync covers the file's dirty pages whoever wrote them.
    c.can_multi_conn = true;
    c.rotational = false;
    return c;
  }
  std::string description() const override {
    return "volume " + v_.pool + "/" + v_.name + (v_.read_only ? " (read-only)" : "");
  }

  asio::awaitable<void> read(std::span<std::uint8_t> out, std::uint64_t offset,
                             std::vector<nbd::Extent>* map) override {
    if (map) {
      // Holes are found with SEEK_DATA/SEEK_HOLE (metadata only, cheap
      // enough to do on the io thread) and left unread.
      auto segments = allocation(offset, out.size(), 0);
      if (segments.size() > 1 || (segments.size() == 1 && segments[0].flags != 0)) {
        std::uint64_t pos = 0;
        for (const auto& seg : segments) {
          if (seg.flags == 0) co_await read_exact(out.subspan(pos, seg.length), offset + pos);
          pos += seg.length;
        }
        *map = std::move(segments);
        co_return;
      }
    }
    co_await read_exact(out, offset);
  }

  asio::awaitable<void> write(std::span<const std::uint8_t> data, std::uint64_t offset, bool fua) override {
    co_await io_.write(v_.fd, data, offset);
    if (fua) co_await io_.datasync(v_.fd);
  }

  asio::awaitable<void> flush() override { co_await io_.datasync(v_.fd); }

  asio::awaitable<void> trim(std::uint64_t offset, std::uint64_t length, bool fua) override {
    // Advisory: a filesystem that cannot punch keeps the data.
    co_await io_.punch_hole(v_.fd, offset, length);
    if (fua) co_await io_.datasync(v_.fd);
  }

  asio::awaitable<void> zero(std::uint64_t offset, std::uint64_t length, nbd::ZeroFlags flags) override {
    bool done = false;
    if (flags.may_trim) {
      done = co_await io_.punch_hole(v_.fd, offset, length);
    } else {
      const int fd = v_.fd;
      const int err = co_await io_.run([fd, offset, length] {
        const int r = ::fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                                  static_cast<off_t>(length));
        return r == 0 ? 0 : errno;
      });
      if (err == 0)
        done = true;
      else if (err != EOPNOTSUPP && err != ENOSYS)
        throw Error::from_errno(err, "zero " + std::to_string(length) + " bytes of " + description());
    }
    if (!done) {
      if (flags.fast)
        throw Error(Code::unimplemented, "this filesystem cannot zero without writing", "nbd", false, ENOTSUP);
      co_await write_zeros(offset, length);
    }
    if (flags.fua) co_await io_.datasync(v_.fd);
  }

  asio::awaitable<std::vector<nbd::Extent>> extents(std::uint64_t offset, std::uint64_t length) override {
    co_return allocation(offset, length, 1024);
  }

  asio::awaitable<void> cache(std::uint64_t offset, std::uint64_t length) override {
    ::posix_fadvise(v_.fd, static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_WILLNEED);
    co_return;
  }

 private:
  asio::awaitable<void> read_exact(std::span<std::uint8_t> out, std::uint64_t offset) {
    std::size_t done = 0;
    while (done < out.size()) {
      const std::size_t n = co_await io_.read(v_.fd, out.subspan(done), offset + done);
      if (n == 0) {  // the file is shorter than when it was opened: zeros
        std::memset(out.data() + done, 0, out.size() - done);
        break;
      }
      done += n;
    }
  }

  asio::awaitable<void> write_zeros(std::uint64_t offset, std::uint64_t length) {
    static const std::vector<std::uint8_t> zeros(1u << 20, 0);
    while (length > 0) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(length, zeros.size()));
      co_await io_.write(v_.fd, std::span<const std::uint8_t>(zeros.data(), n), offset);
      offset += n;
      length -= n;
    }
  }

  // Data and hole runs of [offset, offset + length), at most `max` of them
  // (0: no limit); holes read as zeros.
  std::vector<nbd::Extent> allocation(std::uint64_t offset, std::uint64_t length, std::size_t max) const {
    std::vector<nbd::Extent> out;
    const std::uint64_t end = offset + length;
    std::uint64_t pos = offset;
    auto push = [&](std::uint64_t len, std::uint32_t flags) {
      if (len == 0) return;
      if (!out.empty() && out.back().flags == flags)
        out.back().length += len;
      else
        out.push_back({len, flags});
    };
    while (pos < end && (max == 0 || out.size() < max)) {
      off_t data = ::lseek(v_.fd, static_cast<off_t>(pos), SEEK_DATA);
      if (data < 0) {
        if (errno != ENXIO) throw Error::from_errno(errno, "find data in " + description());
        data = static_cast<off_t>(end);  // nothing but hole up to the end of the file
      }
      const std::uint64_t d = std::min<std::uint64_t>(static_cast<std::uint64_t>(data), end);
      push(d - pos, nbd::state_hole | nbd::state_zero);
      pos = d;
      if (pos >= end) break;
      off_t hole = ::lseek(v_.fd, static_cast<off_t>(pos), SEEK_HOLE);
      if (hole < 0) throw Error::from_errno(errno, "find holes in " + description());
      const std::uint64_t h = std::min<std::uint64_t>(static_cast<std::uint64_t>(hole), end);
      push(h - pos, 0);
      pos = h;
    }
    if (out.empty()) out.push_back({length, 0});
    return out;
  }

  FileIo& io_;
  VolumeService::NbdVolume v_;
};

// An export's size ("64M", "1G", "1.5GiB", "4096"), or INVALID_ARGUMENT.
std::uint64_t export_size(const std::string& text) {
  const auto bytes = ferry::parse_size(text);
  if (!bytes) throw nbd_error(Code::invalid_argument, "'" + text + "' is not a size (like 512M or 2G)");
  return *bytes;
}

struct ExportSpec {
  std::string kind;  // memory, null, nbd, volume
  std::string arg;
  std::chrono::nanoseconds delay{0};
  bool read_only = false;
};

ExportSpec parse_spec(const std::string& name, const std::string& text) {
  ExportSpec spec;
  std::string rest = text;
  // Options come last, after commas: ",ro", ",delay=64ms".
  for (;;) {
    const auto comma = rest.rfind(',');
    if (comma == std::string::npos) break;
    const std::string opt = rest.substr(comma + 1);
    if (opt == "ro" || opt == "read-only") {
      spec.read_only = true;
    } else if (opt.rfind("delay=", 0) == 0) {
      try {
        spec.delay = nbd::parse_delay(opt.substr(6));
      } catch (const Error& e) {
        throw nbd_error(Code::invalid_argument, "NBD export '" + name + "': " + e.message());
      }
    } else {
      break;
    }
    rest.resize(comma);
  }
  const auto colon = rest.find(':');
  if (colon == std::string::npos)
    throw nbd_error(Code::invalid_argument, "NBD export '" + name + "': backend '" + text +
                                                "' should be memory:SIZE, null:SIZE, nbd:URI or volume:POOL/NAME, "
                                                "optionally followed by ,delay=DURATION and ,ro");
  spec.kind = rest.substr(0, colon);
  spec.arg = rest.substr(colon + 1);
  if (spec.kind != "memory" && spec.kind != "null" && spec.kind != "nbd" && spec.kind != "volume")
    throw nbd_error(Code::invalid_argument, "NBD export '" + name + "': unknown backend kind '" + spec.kind +
                                                "' (memory, null, nbd, volume)");
  return spec;
}

// "POOL/NAME" or "NAME" (pool "default"); a leading '/' (as NBD URIs give
// it) is dropped.
std::pair<std::string, std::string> split_volume(std::string ref) {
  if (!ref.empty() && ref.front() == '/') ref.erase(0, 1);
  const auto slash = ref.find('/');
  if (slash == std::string::npos) return {"default", ref};
  return {ref.substr(0, slash), ref.substr(slash + 1)};
}

}  // namespace

std::shared_ptr<nbd::Backend> make_volume_backend(FileIo& io, VolumeService::NbdVolume volume) {
  return std::make_shared<VolumeBackend>(io, std::move(volume));
}

// ---------------------------------------------------------------------------
// Exports: configured ones by name, then volumes.

class NbdService::Exports : public nbd::ExportSource {
 public:
  Exports(VolumeService& volumes, std::vector<NbdExportConfig> configs)
      : volumes_(volumes), configs_(std::move(configs)) {}

  void open(rpc::Server& server) {
    for (const auto& c : configs_) {
      const ExportSpec spec = parse_spec(c.name, c.backend);
      std::shared_ptr<nbd::Backend> backend;
      if (spec.kind == "memory") {
        backend = std::make_shared<nbd::MemoryBackend>(export_size(spec.arg));
      } else if (spec.kind == "null") {
        backend = std::make_shared<nbd::NullBackend>(export_size(spec.arg));
      } else if (spec.kind == "nbd") {
        // Called from the main thread at start-up: blocking here is fine.
        backend = nbd::RemoteBackend::connect_blocking(server.next_io_context().get_executor(), spec.arg);
      } else {  // volume: opened per connection, like any volume
        auto [pool, name] = split_volume(spec.arg);
        volume_aliases_[c.name] = {pool, name, spec.read_only, spec.delay};
        spdlog::info("NBD export {}: volume {}/{}{}", c.name, pool, name, spec.read_only ? " (read-only)" : "");
        continue;
      }
      if (spec.delay.count()) backend = std::make_shared<nbd::DelayBackend>(backend, nbd::DelayOptions::all(spec.delay));
      auto e = std::make_shared<nbd::Export>();
      e->name = c.name;
      e->description = backend->description();
      e->backend = backend;
      e->read_only = spec.read_only;
      spdlog::info("NBD export {}: {}{}", c.name, e->description, spec.read_only ? " (read-only)" : "");
      named_[c.name] = std::move(e);
    }
  }

  // The export `name`, opened for one connection; NOT_FOUND if there is
  // none, FAILED_PRECONDITION if an upload holds the volume.
  std::shared_ptr<nbd::Export> open_export(const std::string& requested, bool read_only) {
    std::string name = requested;
    if (name.empty()) {
      if (named_.size() == 1 && volume_aliases_.empty()) name = named_.begin()->first;
      else
        throw nbd_error(Code::invalid_argument,
                        "no export name given; name a volume as POOL/NAME or one of the configured exports");
    }
    if (auto it = named_.find(name); it != named_.end()) {
      if (!read_only) return it->second;
      auto e = std::make_shared<nbd::Export>(*it->second);
      e->read_only = true;
      return e;
    }
    std::string pool, vol;
    bool ro = read_only;
    std::chrono::nanoseconds delay{0};
    if (auto it = volume_aliases_.find(name); it != volume_aliases_.end()) {
      pool = it->second.pool;
      vol = it->second.name;
      ro = ro || it->second.read_only;
      delay = it->second.delay;
    } else {
      std::tie(pool, vol) = split_volume(name);
    }
    auto v = volumes_.open_nbd(pool, vol, ro);
    auto e = std::make_shared<nbd::Export>();
    e->name = name;
    e->read_only = v.read_only;
    e->backend = make_volume_backend(volumes_.file_io(), std::move(v));
    if (delay.count()) e->backend = std::make_shared<nbd::DelayBackend>(e->backend, nbd::DelayOptions::all(delay));
    e->description = e->backend->description();
    return e;
  }

  std::shared_ptr<nbd::Export> find(const std::string& name) override {
    try {
      return open_export(name, false);
    } catch (const Error& e) {
      if (e.code() == Code::not_found || e.code() == Code::invalid_argument) return nullptr;
      throw;
    }
  }

  std::vector<std::pair<std::string, std::string>> list() override {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& [name, e] : named_) out.emplace_back(name, e->description);
    for (const auto& [name, alias] : volume_aliases_) out.emplace_back(name, "volume " + alias.pool + "/" + alias.name);
    return out;
  }

  void fill(NbdExportListReply& reply) {
    for (const auto& [name, e] : named_) {
      auto* x = reply.add_exports();
      x->set_name(name);
      x->set_description(e->description);
      x->set_size(e->backend->size());
      x->set_read_only(e->read_only || e->backend->capabilities().read_only);
    }
    for (const auto& [name, alias] : volume_aliases_) {
      auto* x = reply.add_exports();
      x->set_name(name);
      x->set_description("volume " + alias.pool + "/" + alias.name);
      x->set_read_only(alias.read_only);
    }
  }

  std::string describe() const {
    std::string out;
    for (const auto& [name, e] : named_) out += (out.empty() ? "" : ", ") + name + " (" + e->description + ")";
    for (const auto& [name, a] : volume_aliases_) out += (out.empty() ? "" : ", ") + name + " (volume " + a.pool + "/" + a.name + ")";
    return out.empty() ? "volumes as POOL/NAME" : "volumes as POOL/NAME; " + out;
  }

 private:
  struct Alias {
    std::string pool, name;
    bool read_only = false;
    std::chrono::nanoseconds delay{0};
  };
  VolumeService& volumes_;
  std::vector<NbdExportConfig> configs_;
  std::map<std::string, std::shared_ptr<nbd::Export>> named_;
  std::map<std::string, Alias> volume_aliases_;
};

// ---------------------------------------------------------------------------
// Plain NBD listeners.

class NbdService::Listener {
 public:
  Listener(NbdService& service) : service_(service) {}

  rpc::Endpoint listen(rpc::Server& server, const rpc::Endpoint& endpoint) {
    server_ = &server;
    if (endpoint.kind != rpc::Endpoint::Kind::unix_socket && endpoint.kind != rpc::Endpoint::Kind::tcp)
      throw nbd_error(Code::invalid_argument, "plain NBD listens on unix: or tcp: addresses, not " +
                                                  endpoint.to_string().substr(0, endpoint.to_string().find(':') + 1));
    std::error_code ec;
    if (endpoint.kind == rpc::Endpoint::Kind::unix_socket) {
      rpc::prepare_unix_listen_path(endpoint.path);
      auto a = std::make_shared<asio::local::stream_protocol::acceptor>(server.io_context());
      a->open(asio::local::stream_protocol(), ec);
      if (!ec) a->bind(asio::local::stream_protocol::endpoint(endpoint.path), ec);
      if (!ec && ::chmod(endpoint.path.c_str(), 0600) != 0) ec = std::error_code(errno, std::generic_category());
      if (!ec) a->listen(asio::socket_base::max_listen_connections, ec);
      if (ec) throw nbd_error(Code::unavailable, "cannot listen for NBD on " + endpoint.to_string() + ": " + ec.message());
      unix_.push_back(a);
      paths_.push_back(endpoint.path);
      spdlog::info("listening for plain NBD on {} (mode 0600; NBD has no authentication)", endpoint.to_string());
      return endpoint;
    }
    asio::ip::tcp::resolver resolver(server.io_context());
    auto results = resolver.resolve(endpoint.host, std::to_string(endpoint.port), asio::ip::tcp::resolver::passive, ec);
    if (ec || results.empty())
      throw nbd_error(Code::invalid_argument, "cannot resolve NBD listen address " + endpoint.to_string() + ": " + ec.message());
    auto ep = results.begin()->endpoint();
    auto a = std::make_shared<asio::ip::tcp::acceptor>(server.io_context());
    a->open(ep.protocol(), ec);
    if (!ec) a->set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) a->bind(ep, ec);
    if (!ec) a->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) throw nbd_error(Code::unavailable, "cannot listen for NBD on " + endpoint.to_string() + ": " + ec.message());
    rpc::Endpoint bound = rpc::Endpoint::tcp(endpoint.host, a->local_endpoint().port());
    tcp_.push_back(a);
    if (!ep.address().is_loopback())
      spdlog::warn("plain NBD on {} is reachable from the network with no authentication or encryption; "
                   "prefer `ferry nbd-serve` over a ferry+tls connection",
                   bound.to_string());
    spdlog::info("listening for plain NBD on {}", bound.to_string());
    return bound;
  }

  rpc::Endpoint adopt(rpc::Server& server, int fd) {
    server_ = &server;
    int family = -1;
    try {
      family = rpc::listening_stream_family(fd);
    } catch (...) {
      ::close(fd);
      throw;
    }
    std::error_code ec;
    if (family == AF_UNIX) {
      auto a = std::make_shared<asio::local::stream_protocol::acceptor>(server.io_context());
      a->assign(asio::local::stream_protocol(), fd, ec);
      if (ec) {
        ::close(fd);
        throw nbd_error(Code::unavailable, "cannot serve NBD on descriptor " + std::to_string(fd) + ": " + ec.message());
      }
      const auto local = a->local_endpoint(ec);
      rpc::Endpoint bound = rpc::Endpoint::unix_socket(ec ? std::string() : local.path());
      unix_.push_back(a);
      spdlog::info("listening for plain NBD on {} (socket handed over as descriptor {}; NBD has no authentication)",
                   bound.to_string(), fd);
      return bound;
    }
    auto a = std::make_shared<asio::ip::tcp::acceptor>(server.io_context());
    a->assign(family == AF_INET6 ? asio::ip::tcp::v6() : asio::ip::tcp::v4(), fd, ec);
    if (ec) {
      ::close(fd);
      throw nbd_error(Code::unavailable, "cannot serve NBD on descriptor " + std::to_string(fd) + ": " + ec.message());
    }
    const auto local = a->local_endpoint(ec);
    if (ec) throw nbd_error(Code::unavailable, "cannot serve NBD on descriptor " + std::to_string(fd) + ": " + ec.message());
    rpc::Endpoint bound = rpc::Endpoint::tcp(local.address().to_string(), local.port());
    tcp_.push_back(a);
    if (!local.address().is_loopback())
      spdlog::warn("plain NBD on {} is reachable from the network with no authentication or encryption; "
                   "prefer `ferry nbd-serve` over a ferry+tls connection",
                   bound.to_string());
    spdlog::info("listening for plain NBD on {} (socket handed over as descriptor {})", bound.to_string(), fd);
    return bound;
  }

  void start() {
    for (auto& a : unix_) asio::co_spawn(a->get_executor(), accept_loop(a.get()), asio::detached);
    for (auto& a : tcp_) asio::co_spawn(a->get_executor(), accept_loop(a.get()), asio::detached);
  }

  void shutdown(std::chrono::milliseconds grace) {
    stopping_ = true;
    if (server_) {
      // The acceptors belong to io context 0: close them there.
      std::promise<void> closed;
      asio::post(server_->io_context(), [this, &closed] {
        std::error_code ignored;
        for (auto& a : unix_) a->close(ignored);
        for (auto& a : tcp_) a->close(ignored);
        closed.set_value();
      });
      closed.get_future().wait_for(std::chrono::seconds(2));
    }
    for (const auto& p : paths_) ::unlink(p.c_str());
    std::vector<std::shared_ptr<Session>> live;
    {
      std::lock_guard lock(mutex_);
      for (auto& w : sessions_)
        if (auto s = w.lock()) live.push_back(s);
    }
    for (auto& s : live) asio::post(s->executor, [s] { s->pipe->close(); });
    const auto deadline = std::chrono::steady_clock::now() + grace;
    while (active_.load() > 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (active_.load() > 0) spdlog::warn("shutdown: {} NBD connection(s) still closing", active_.load());
  }

  std::size_t active() const { return active_.load(); }

 private:
  struct Session {
    asio::any_io_executor executor;
    std::unique_ptr<nbd::Pipe> pipe;
  };

  template <class Acceptor>
  asio::awaitable<void> accept_loop(Acceptor* acceptor) {
    using Protocol = typename Acceptor::protocol_type;
    for (;;) {
      auto& io = server_->next_io_context();
      std::error_code ec;
      typename Protocol::socket socket = co_await acceptor->async_accept(io, asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        if (stopping_ || ec == asio::error::operation_aborted) co_return;
        spdlog::warn("NBD accept: {}", ec.message());
        continue;
      }
      std::string peer = "NBD client";
      if constexpr (std::is_same_v<Protocol, asio::ip::tcp>) {
        std::error_code pec;
        auto ep = socket.remote_endpoint(pec);
        peer = "NBD client " + (pec ? std::string("?") : ep.address().to_string() + ":" + std::to_string(ep.port()));
        socket.set_option(asio::ip::tcp::no_delay(true), pec);
      } else {
        peer = "NBD client on a unix socket";
      }
      auto session = std::make_shared<Session>();
      session->executor = io.get_executor();
      session->pipe = std::make_unique<nbd::SocketPipe<typename Protocol::socket>>(std::move(socket), peer);
      {
        std::lock_guard lock(mutex_);
        std::erase_if(sessions_, [](const std::weak_ptr<Session>& w) { return w.expired(); });
        sessions_.push_back(session);
      }
      ++active_;
      spdlog::debug("accepted {}", peer);
      Session* raw = session.get();
      asio::co_spawn(session->executor, serve_one(raw), [this, session](std::exception_ptr e) {
        if (e) {
          try {
            std::rethrow_exception(e);
          } catch (const std::exception& x) {
            spdlog::warn("{}: {}", session->pipe->peer(), x.what());
          }
        }
        --active_;
      });
    }
  }

  asio::awaitable<void> serve_one(Session* session) {
    auto opts = service_.server_options();
    co_await nbd::serve(*session->pipe, *service_.exports_, opts);
  }

  NbdService& service_;
  rpc::Server* server_ = nullptr;
  std::vector<std::shared_ptr<asio::local::stream_protocol::acceptor>> unix_;
  std::vector<std::shared_ptr<asio::ip::tcp::acceptor>> tcp_;
  std::vector<std::string> paths_;
  std::atomic<bool> stopping_{false};
  std::atomic<std::size_t> active_{0};
  std::mutex mutex_;
  std::vector<std::weak_ptr<Session>> sessions_;
};

// ---------------------------------------------------------------------------

NbdService::NbdService(VolumeService& volumes, const NbdConfig& config)
    : volumes_(volumes),
      config_(config),
      budget_(nbd::ByteBudget::create(config.buffer_bytes)),
      buffers_(rpc::BufferPool::create(config.buffer_bytes)),
      exports_(std::make_shared<Exports>(volumes, config.exports)),
      listener_(std::make_unique<Listener>(*this)) {}

NbdService::~NbdService() = default;

void NbdService::open_exports(rpc::Server& server) {
  exports_->open(server);
  listener_->start();
}

nbd::ExportSource& NbdService::exports() { return *exports_; }

std::string NbdService::describe() const {
  return exports_->describe() + "; payload budget " + std::to_string(config_.buffer_bytes >> 20) + " MiB, " +
         std::to_string(config_.max_in_flight) + " requests in flight per connection";
}

nbd::ServerOptions NbdService::server_options() const {
  nbd::ServerOptions o;
  o.max_in_flight = config_.max_in_flight;
  o.max_request = config_.max_request;
  o.budget = budget_;
  o.buffers = buffers_;
  return o;
}

rpc::Endpoint NbdService::listen(rpc::Server& server, const rpc::Endpoint& endpoint) {
  return listener_->listen(server, endpoint);
}

rpc::Endpoint NbdService::adopt(rpc::Server& server, int fd) { return listener_->adopt(server, fd); }

void NbdService::shutdown(std::chrono::milliseconds grace) { listener_->shutdown(grace); }

std::shared_ptr<rpc::Program> NbdService::program() {
  auto program = rpc::Program::of<Nbd>();
  auto exports = exports_;
  program->on<Nbd::ExportList>([exports](const NbdExportListCall& call,
                                         rpc::CallContext&) -> asio::awaitable<NbdExportListReply> {
    NbdExportListReply reply;
    if (call.name().empty()) {
      exports->fill(reply);
      co_return reply;
    }
    // One export by name, volumes included: opened read-only and closed
    // again, so it says what a Connect would find.
    auto e = exports->open_export(call.name(), true);
    auto* x = reply.add_exports();
    x->set_name(call.name());
    x->set_description(e->description);
    x->set_size(e->backend->size());
    x->set_read_only(e->backend->capabilities().read_only);
    co_return reply;
  });
  stream::on<Nbd::Connect>(*program, [this, exports](const NbdConnectCall& call, stream::Stream& s,
                                                     rpc::CallContext& ctx) -> asio::awaitable<NbdConnectReply> {
    // The session ends when the stream does (the client's end, an abort, a
    // CANCEL, the connection's loss); cancelling the handler's own waits
    // instead would leave the NBD server's requests behind.
    co_await asio::this_coro::reset_cancellation_state(asio::disable_cancellation());
    ctx.set_subject("export " + call.export_name());
    auto e = exports->open_export(call.export_name(), call.read_only());
    nbd::SingleExport source(e);
    const auto ex = co_await asio::this_coro::executor;
    nbd::StreamPipe pipe(s.shared_from_this(), ex, buffers_);
    const auto opts = server_options();
    spdlog::debug("NBD over ferry stream {}: export {}", s.serial(), e->description);
    const nbd::SessionStats stats = co_await nbd::serve(pipe, source, opts);
    if (auto err = s.error()) throw *err;
    NbdConnectReply reply;
    reply.set_requests(stats.requests);
    reply.set_bytes_read(stats.bytes_read);
    reply.set_bytes_written(stats.bytes_written);
    co_return reply;
  });
  return program;
}

}  // namespace ferry::daemon
