// The NBD server (nbd/server.h) over a real socketpair: serve() runs on an
// io thread behind one end, and a client written out here, byte by byte
// as the protocol document has it, drives the other end with blocking
// reads and writes. The export is an in-memory backend defined below that
// can delay, fail and count its operations.
#include "nbd/server.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/local/connect_pair.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "nbd/protocol.h"

namespace ferry::nbd {
namespace {

using namespace std::chrono_literals;
using Bytes = std::vector<std::uint8_t>;

// ------------------------------------------------------------ backend

// Memory in 4 KiB blocks; a block never written (or trimmed, or zeroed
// with may_trim) is a hole. Hooks let a test delay or fail an operation.
class TestBackend : public Backend {
 public:
  static constexpr std::uint64_t block = 4096;

  explicit TestBackend(std::uint64_t size, Capabilities caps = {})
      : size_(size), caps_(caps), data_(size, 0), allocated_((size + block - 1) / block, false) {}

  std::uint64_t size() const override { return size_; }
  Capabilities capabilities() const override { return caps_; }
  std::string description() const override { return "test memory"; }

  // How long an operation ("read", "write", ...) at `offset` takes.
  std::function<std::chrono::milliseconds(const std::string& op, std::uint64_t offset)> delay;
  // An errno to fail an operation with (-1: succeed).
  std::function<int(const std::string& op, std::uint64_t offset)> fail;

  asio::awaitable<void> read(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map) override {
    co_await begin("read", offset);
    if (map) {
      // Holes are described, and their bytes left as garbage: the server
      // must never send them.
      map->clear();
      for (std::uint64_t pos = offset; pos < offset + out.size();) {
        const std::uint64_t end = std::min<std::uint64_t>(offset + out.size(), (pos / block + 1) * block);
        const bool hole = !allocated_[pos / block];
        if (hole)
          std::memset(out.data() + (pos - offset), 0xee, end - pos);
        else
          std::memcpy(out.data() + (pos - offset), data_.data() + pos, end - pos);
        const std::uint32_t flags = hole ? state_hole | state_zero : 0;
        if (!map->empty() && map->back().flags == flags)
          map->back().length += end - pos;
        else
          map->push_back({end - pos, flags});
        pos = end;
      }
    } else {
      std::memcpy(out.data(), data_.data() + offset, out.size());
    }
    finish();
  }
  asio::awaitable<void> write(std::span<const std::uint8_t> data, std::uint64_t offset, bool fua) override {
    co_await begin("write", offset);
    std::memcpy(data_.data() + offset, data.data(), data.size());
    for (std::uint64_t b = offset / block; b * block < offset + data.size(); ++b) allocated_[b] = true;
    write_fua.push_back(fua);
    finish();
  }
  asio::awaitable<void> flush() override {
    co_await begin("flush", 0);
    ++flushes;
    finish();
  }
  asio::awaitable<void> trim(std::uint64_t offset, std::uint64_t length, bool) override {
    co_await begin("trim", offset);
    punch(offset, length);
    finish();
  }
  asio::awaitable<void> zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override {
    co_await begin("zero", offset);
    zero_calls.push_back(flags);
    if (flags.fast && !fast_zero_works) {
      finish();
      throw Error(Code::unimplemented, "no fast zero here", "test", false, ENOTSUP);
    }
    std::memset(data_.data() + offset, 0, length);
    if (flags.may_trim) punch(offset, length);
    finish();
  }
  asio::awaitable<std::vector<Extent>> extents(std::uint64_t offset, std::uint64_t length) override {
    co_await begin("extents", offset);
    // Whole blocks: the last extent may run past the request.
    std::vector<Extent> out;
    for (std::uint64_t b = offset / block; b * block < offset + length && b < allocated_.size(); ++b) {
      const std::uint64_t start = std::max(offset, b * block);
      const std::uint64_t n = std::min((b + 1) * block, size_) - start;
      const std::uint32_t flags = allocated_[b] ? 0 : state_hole | state_zero;
      if (!out.empty() && out.back().flags == flags)
        out.back().length += n;
      else
        out.push_back({n, flags});
    }
    finish();
    co_return out;
  }
  asio::awaitable<void> cache(std::uint64_t offset, std::uint64_t) override {
    co_await begin("cache", offset);
    ++caches;
    finish();
  }

  void put(std::uint64_t offset, const Bytes& bytes) {
    std::memcpy(data_.data() + offset, bytes.data(), bytes.size());
    for (std::uint64_t b = offset / block; b * block < offset + bytes.size(); ++b) allocated_[b] = true;
  }
  Bytes get(std::uint64_t offset, std::size_t n) const {
    return Bytes(data_.begin() + static_cast<std::ptrdiff_t>(offset),
                 data_.begin() + static_cast<std::ptrdiff_t>(offset + n));
  }

  // Everything below is touched on the server's io thread only, and read
  // by the test after serve() has returned.
  std::vector<bool> write_fua;
  std::vector<ZeroFlags> zero_calls;
  int flushes = 0;
  int caches = 0;
  int active = 0;
  int peak_active = 0;
  int completed = 0;
  bool fast_zero_works = false;

 private:
  asio::awaitable<void> begin(const char* op, std::uint64_t offset) {
    ++active;
    peak_active = std::max(peak_active, active);
    const std::string name(op);
    if (delay) {
      const auto d = delay(name, offset);
      if (d.count() > 0) {
        asio::steady_timer t(co_await asio::this_coro::executor, d);
        co_await t.async_wait(asio::use_awaitable);
      }
    }
    if (fail) {
      const int err = fail(name, offset);
      if (err >= 0) {
        --active;
        ++completed;
        throw Error(Code::internal, "injected failure of " + name, "test", false, err);
      }
    }
  }
  void finish() {
    --active;
    ++completed;
  }
  void punch(std::uint64_t offset, std::uint64_t length) {
    for (std::uint64_t b = (offset + block - 1) / block; (b + 1) * block <= offset + length; ++b) allocated_[b] = false;
  }

  std::uint64_t size_;
  Capabilities caps_;
  Bytes data_;
  std::vector<bool> allocated_;
};

class Exports : public ExportSource {
 public:
  std::shared_ptr<Export> add(std::string name, std::shared_ptr<Backend> backend, bool read_only = false,
                              std::string description = "") {
    auto e = std::make_shared<Export>();
    e->name = std::move(name);
    e->backend = std::move(backend);
    e->read_only = read_only;
    e->description = std::move(description);
    exports_.push_back(e);
    return e;
  }
  std::shared_ptr<Export> find(const std::string& name) override {
    if (name.empty() && !exports_.empty()) return exports_.front();
    for (auto& e : exports_)
      if (e->name == name) return e;
    return nullptr;
  }
  std::vector<std::pair<std::string, std::string>> list() override {
    std::vector<std::pair<std::string, std::string>> out;
    for (auto& e : exports_) out.emplace_back(e->name, e->description);
    return out;
  }

 private:
  std::vector<std::shared_ptr<Export>> exports_;
};

// ------------------------------------------------------------- server

using Socket = asio::local::stream_protocol::socket;

// serve() on its own io thread behind one end of a socketpair; the test
// holds the other end as a plain blocking descriptor.
class Server {
 public:
  Server(ExportSource& exports, ServerOptions options) : options_(std::move(options)) {
    Socket a(io_), b(io_);
    asio::local::connect_pair(a, b);
    fd_ = b.release();
    pipe_ = std::make_unique<SocketPipe<Socket>>(std::move(a), "test client");
    asio::co_spawn(io_, serve(*pipe_, exports, options_),
                   [this](std::exception_ptr e, SessionStats stats) {
                     if (e) {
                       threw_ = true;
                     }
                     result_.set_value(std::move(stats));
                   });
    thread_ = std::thread([this] { io_.run(); });
  }
  ~Server() {
    close_client();
    if (thread_.joinable()) {
      if (!finished_) result_.get_future().wait_for(10s);
      io_.stop();
      thread_.join();
    }
  }
  int fd() const { return fd_; }
  void close_client() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // Waits for serve() to return.
  SessionStats stats() {
    auto f = result_.get_future();
    finished_ = true;
    EXPECT_EQ(f.wait_for(10s), std::future_status::ready) << "serve() did not return";
    SessionStats s = f.get();
    thread_.join();
    EXPECT_FALSE(threw_) << "serve() threw";
    return s;
  }

 private:
  asio::io_context io_;
  ServerOptions options_;  // serve() keeps a reference until its session starts
  std::unique_ptr<SocketPipe<Socket>> pipe_;
  std::promise<SessionStats> result_;
  bool finished_ = false;
  bool threw_ = false;
  std::thread thread_;
  int fd_ = -1;
};

// -------------------------------------------------------------- client

struct OptionReply {
  std::uint32_t option = 0;
  std::uint32_t type = 0;
  Bytes data;
};

struct Reply {
  bool structured = false;
  std::uint16_t flags = 0;   // structured
  std::uint16_t type = 0;    // structured
  std::uint32_t error = 0;   // simple
  std::uint64_t cookie = 0;
  Bytes payload;             // structured payload
};

class Client {
 public:
  explicit Client(int fd) : fd_(fd) {}

  void send(const Bytes& b) { send(b.data(), b.size()); }
  void send(const std::uint8_t* p, std::size_t n) {
    while (n > 0) {
      const ssize_t w = ::send(fd_, p, n, MSG_NOSIGNAL);
      ASSERT_GT(w, 0) << "send failed: " << std::strerror(errno);
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }
  template <std::size_t N>
  void send(const std::array<std::uint8_t, N>& a) {
    send(a.data(), a.size());
  }
  // Reads exactly n bytes; false (and a test failure unless `eof_ok`) on
  // end of input or a 10 s silence.
  bool recv(std::uint8_t* p, std::size_t n, bool eof_ok = false) {
    while (n > 0) {
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, 10000) != 1) {
        ADD_FAILURE() << "no data from the server for 10 s";
        return false;
      }
      const ssize_t r = ::recv(fd_, p, n, 0);
      if (r <= 0) {
        if (!eof_ok) ADD_FAILURE() << "connection ended while " << n << " bytes were expected";
        return false;
      }
      p += r;
      n -= static_cast<std::size_t>(r);
    }
    return true;
  }
  Bytes recv(std::size_t n) {
    Bytes b(n);
    if (!recv(b.data(), n)) b.clear();
    return b;
  }
  // True if the server closed its end (after anything still pending).
  bool closed() {
    std::uint8_t byte;
    pollfd pfd{fd_, POLLIN, 0};
    if (::poll(&pfd, 1, 10000) != 1) return false;
    return ::recv(fd_, &byte, 1, 0) == 0;
  }

  // Greeting and client flags.
  void greet(std::uint32_t flags = flag_c_fixed_newstyle | flag_c_no_zeroes) {
    const Bytes g = recv(18);
    ASSERT_EQ(g.size(), 18u);
    EXPECT_EQ(load_be64(g.data()), nbd_magic);
    EXPECT_EQ(load_be64(g.data() + 8), ihaveopt_magic);
    EXPECT_EQ(load_be16(g.data() + 16), flag_fixed_newstyle | flag_no_zeroes);
    std::uint8_t f[4];
    store_be32(f, flags);
    send(f, 4);
  }
  void option(std::uint32_t opt, const Bytes& data = {}) {
    send(encode_option_header(opt, static_cast<std::uint32_t>(data.size())));
    if (!data.empty()) send(data);
  }
  OptionReply option_reply() {
    OptionReply r;
    const Bytes h = recv(20);
    if (h.size() != 20) return r;
    EXPECT_EQ(load_be64(h.data()), option_reply_magic);
    r.option = load_be32(h.data() + 8);
    r.type = load_be32(h.data() + 12);
    r.data = recv(load_be32(h.data() + 16));
    return r;
  }
  static Bytes info_data(const std::string& name, const std::vector<std::uint16_t>& infos) {
    Bytes d(4);
    store_be32(d.data(), static_cast<std::uint32_t>(name.size()));
    d.insert(d.end(), name.begin(), name.end());
    d.push_back(static_cast<std::uint8_t>(infos.size() >> 8));
    d.push_back(static_cast<std::uint8_t>(infos.size()));
    for (auto i : infos) {
      d.push_back(static_cast<std::uint8_t>(i >> 8));
      d.push_back(static_cast<std::uint8_t>(i));
    }
    return d;
  }
  static Bytes meta_data(const std::string& name, const std::vector<std::string>& queries) {
    Bytes d(4);
    store_be32(d.data(), static_cast<std::uint32_t>(name.size()));
    d.insert(d.end(), name.begin(), name.end());
    std::uint8_t n[4];
    store_be32(n, static_cast<std::uint32_t>(queries.size()));
    d.insert(d.end(), n, n + 4);
    for (const auto& q : queries) {
      store_be32(n, static_cast<std::uint32_t>(q.size()));
      d.insert(d.end(), n, n + 4);
      d.insert(d.end(), q.begin(), q.end());
    }
    return d;
  }

  // Full negotiation through NBD_OPT_GO; returns the transmission flags.
  std::uint16_t go(const std::string& name = "", bool structured = false, bool base_allocation = false) {
    greet();
    if (structured) {
      option(opt_structured_reply);
      EXPECT_EQ(option_reply().type, rep_ack);
    }
    if (base_allocation) {
      option(opt_set_meta_context, meta_data(name, {"base:allocation"}));
      const auto m = option_reply();
      EXPECT_EQ(m.type, rep_meta_context);
      EXPECT_EQ(option_reply().type, rep_ack);
    }
    option(opt_go, info_data(name, {}));
    std::uint16_t flags = 0;
    for (;;) {
      const auto r = option_reply();
      if (r.type == rep_info && r.data.size() >= 12 && load_be16(r.data.data()) == info_export) {
        size = load_be64(r.data.data() + 2);
        flags = load_be16(r.data.data() + 10);
        continue;
      }
      if (r.type == rep_info) continue;
      EXPECT_EQ(r.type, rep_ack) << option_reply_name(r.type);
      break;
    }
    return flags;
  }

  void request(std::uint16_t type, std::uint64_t cookie, std::uint64_t offset, std::uint32_t length,
               std::uint16_t flags = 0, const Bytes& payload = {}) {
    Request r;
    r.type = type;
    r.flags = flags;
    r.cookie = cookie;
    r.offset = offset;
    r.length = length;
    const auto header = encode_request(r);
    Bytes b(header.begin(), header.end());
    b.insert(b.end(), payload.begin(), payload.end());
    send(b);
  }
  // One simple reply or one structured chunk. A simple reply to a READ
  // (`read_length` > 0, no error) carries its data in payload.
  Reply reply(std::uint32_t read_length = 0) {
    Reply r;
    const Bytes m = recv(4);
    if (m.size() != 4) return r;
    const std::uint32_t magic = load_be32(m.data());
    if (magic == simple_reply_magic) {
      const Bytes h = recv(12);
      r.error = load_be32(h.data());
      r.cookie = load_be64(h.data() + 4);
      if (read_length && r.error == 0) r.payload = recv(read_length);
      return r;
    }
    EXPECT_EQ(magic, structured_reply_magic);
    r.structured = true;
    const Bytes h = recv(16);
    r.flags = load_be16(h.data());
    r.type = load_be16(h.data() + 2);
    r.cookie = load_be64(h.data() + 4);
    r.payload = recv(load_be32(h.data() + 12));
    return r;
  }
  // Simple-reply READ.
  Bytes read(std::uint64_t offset, std::uint32_t length, std::uint64_t cookie = 1) {
    request(cmd_read, cookie, offset, length);
    const Reply r = reply(length);
    EXPECT_EQ(r.cookie, cookie);
    EXPECT_EQ(r.error, 0u);
    return r.payload;
  }
  std::uint32_t write(std::uint64_t offset, const Bytes& data, std::uint64_t cookie = 1, std::uint16_t flags = 0) {
    request(cmd_write, cookie, offset, static_cast<std::uint32_t>(data.size()), flags, data);
    const Reply r = reply();
    EXPECT_EQ(r.cookie, cookie);
    return r.error;
  }
  // A whole structured reply: every chunk up to the one marked DONE.
  std::vector<Reply> chunks(std::uint64_t cookie) {
    std::vector<Reply> out;
    for (;;) {
      Reply r = reply();
      EXPECT_EQ(r.cookie, cookie);
      if (!r.structured) {
        out.push_back(std::move(r));
        break;
      }
      const bool done = r.flags & reply_flag_done;
      out.push_back(std::move(r));
      if (done) break;
    }
    return out;
  }
  void disconnect() { request(cmd_disc, 0, 0, 0); }

  std::uint64_t size = 0;

 private:
  int fd_;
};

Bytes pattern(std::size_t n, std::uint8_t seed) {
  Bytes b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::uint8_t>(seed + i * 7 + (i >> 9));
  return b;
}

std::uint32_t structured_error(const Reply& r) {
  EXPECT_TRUE(r.structured);
  EXPECT_EQ(r.type, reply_type_error);
  EXPECT_TRUE(r.flags & reply_flag_done);
  if (r.payload.size() < 6) return 0;
  EXPECT_EQ(r.payload.size(), 6u + load_be16(r.payload.data() + 4));
  return load_be32(r.payload.data());
}

struct Fixture : ::testing::Test {
  std::shared_ptr<TestBackend> backend = std::make_shared<TestBackend>(1 << 20);
  Exports exports;
  ServerOptions options;
  void SetUp() override { exports.add("disk", backend, false, "a test disk"); }
};

// ------------------------------------------------------------ handshake

using NbdServerHandshake = Fixture;

TEST_F(NbdServerHandshake, GoRepliesExportInfoNameDescriptionBlockSizeThenEntersTransmission) {
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  c.option(opt_go, Client::info_data("disk", {info_name, info_description, info_block_size}));
  std::map<std::uint16_t, Bytes> infos;
  OptionReply r;
  for (r = c.option_reply(); r.type == rep_info; r = c.option_reply()) {
    EXPECT_EQ(r.option, opt_go);
    infos[load_be16(r.data.data())] = Bytes(r.data.begin() + 2, r.data.end());
  }
  EXPECT_EQ(r.type, rep_ack);
  ASSERT_EQ(infos[info_export].size(), 10u);
  EXPECT_EQ(load_be64(infos[info_export].data()), 1u << 20);
  const std::uint16_t flags = load_be16(infos[info_export].data() + 8);
  EXPECT_EQ(flags, flag_has_flags | flag_send_flush | flag_send_fua | flag_send_trim | flag_send_write_zeroes |
                       flag_can_multi_conn | flag_send_cache | flag_send_fast_zero);
  EXPECT_EQ(std::string(infos[info_name].begin(), infos[info_name].end()), "disk");
  EXPECT_EQ(std::string(infos[info_description].begin(), infos[info_description].end()), "a test disk");
  ASSERT_EQ(infos[info_block_size].size(), 12u);
  EXPECT_EQ(load_be32(infos[info_block_size].data()), 1u);
  EXPECT_EQ(load_be32(infos[info_block_size].data() + 4), 4096u);
  EXPECT_EQ(load_be32(infos[info_block_size].data() + 8), 32u << 20);

  // Transmission works.
  EXPECT_EQ(c.write(0, pattern(512, 1)), 0u);
  c.disconnect();
  EXPECT_TRUE(c.closed());
  const auto stats = server.stats();
  EXPECT_TRUE(stats.clean_disconnect);
  EXPECT_EQ(stats.export_name, "disk");
  EXPECT_EQ(stats.requests, 2u);
  EXPECT_EQ(stats.bytes_written, 512u);
}

TEST_F(NbdServerHandshake, InfoAlwaysSendsExportAndBlockSizeAndStaysInNegotiation) {
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  c.option(opt_info, Client::info_data("", {}));
  std::set<std::uint16_t> types;
  OptionReply r;
  for (r = c.option_reply(); r.type == rep_info; r = c.option_reply()) types.insert(load_be16(r.data.data()));
  EXPECT_EQ(r.type, rep_ack);
  EXPECT_EQ(types, (std::set<std::uint16_t>{info_export, info_block_size}));
  // Still negotiating: an ABORT is answered.
  c.option(opt_abort);
  EXPECT_EQ(c.option_reply().type, rep_ack);
  EXPECT_TRUE(c.closed());
  const auto stats = server.stats();
  EXPECT_TRUE(stats.clean_disconnect);
  EXPECT_EQ(stats.requests, 0u);
}

TEST_F(NbdServerHandshake, InfoAndGoForAnUnknownExportGetErrUnknownAndNegotiationGoesOn) {
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  c.option(opt_info, Client::info_data("nope", {}));
  auto r = c.option_reply();
  EXPECT_EQ(r.type, rep_err_unknown);
  EXPECT_FALSE(r.data.empty());  // a message for people
  c.option(opt_go, Client::info_data("nope", {}));
  EXPECT_EQ(c.option_reply().type, rep_err_unknown);
  // A malformed request is INVALID.
  c.option(opt_go, Bytes{0, 0, 0, 9, 'x'});
  EXPECT_EQ(c.option_reply().type, rep_err_invalid);
  c.option(opt_go, Client::info_data("disk", {}));
  for (r = c.option_reply(); r.type == rep_info; r = c.option_reply()) {
  }
  EXPECT_EQ(r.type, rep_ack);
  c.disconnect();
  EXPECT_TRUE(c.closed());
  EXPECT_TRUE(server.stats().clean_disconnect);
}

TEST_F(NbdServerHandshake, ListRepliesOneServerPerExportThenAck) {
  exports.add("second", std::make_shared<TestBackend>(4096), false, "another");
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  c.option(opt_list);
  std::vector<std::pair<std::string, std::string>> seen;
  OptionReply r;
  for (r = c.option_reply(); r.type == rep_server; r = c.option_reply()) {
    const std::uint32_t n = load_be32(r.data.data());
    seen.emplace_back(std::string(r.data.begin() + 4, r.data.begin() + 4 + n),
                      std::string(r.data.begin() + 4 + n, r.data.end()));
  }
  EXPECT_EQ(r.type, rep_ack);
  EXPECT_EQ(seen, (std::vector<std::pair<std::string, std::string>>{{"disk", "a test disk"}, {"second", "another"}}));
  // LIST with data is INVALID.
  c.option(opt_list, Bytes{1});
  EXPECT_EQ(c.option_reply().type, rep_err_invalid);
  c.option(opt_abort);
  EXPECT_EQ(c.option_reply().type, rep_ack);
  EXPECT_TRUE(c.closed());
}

TEST_F(NbdServerHandshake, ListIsRefusedWithPolicyWhenNotAllowed) {
  options.allow_list = false;
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  c.option(opt_list);
  EXPECT_EQ(c.option_reply().type, rep_err_policy);
  c.option(opt_abort);
  EXPECT_EQ(c.option_reply().type, rep_ack);
}

TEST_F(NbdServerHandshake, ExportNameRepliesSizeFlagsAndZeroesUnlessNoZeroes) {
  {
    Server server(exports, options);
    Client c(server.fd());
    c.greet(flag_c_fixed_newstyle);
    const std::string name = "disk";
    c.option(opt_export_name, Bytes(name.begin(), name.end()));
    const Bytes reply = c.recv(8 + 2 + 124);
    ASSERT_EQ(reply.size(), 134u);
    EXPECT_EQ(load_be64(reply.data()), 1u << 20);
    EXPECT_TRUE(load_be16(reply.data() + 8) & flag_has_flags);
    EXPECT_FALSE(load_be16(reply.data() + 8) & flag_send_df);  // no structured replies
    EXPECT_EQ(Bytes(reply.begin() + 10, reply.end()), Bytes(124, 0));
    EXPECT_EQ(c.write(4096, pattern(100, 3)), 0u);
    EXPECT_EQ(c.read(4096, 100), pattern(100, 3));
    c.disconnect();
    EXPECT_TRUE(c.closed());
  }
  {
    Server server(exports, options);
    Client c(server.fd());
    c.greet(flag_c_fixed_newstyle | flag_c_no_zeroes);
    c.option(opt_export_name);  // "" is the default export
    const Bytes reply = c.recv(10);
    EXPECT_EQ(load_be64(reply.data()), 1u << 20);
    // The next bytes are already transmission: a READ reply.
    EXPECT_EQ(c.read(4096, 100), pattern(100, 3));
    c.disconnect();
    EXPECT_TRUE(c.closed());
    EXPECT_EQ(server.stats().export_name, "disk");
  }
}

TEST_F(NbdServerHandshake, ExportNameForAnUnknownExportClosesTheConnection) {
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  c.option(opt_export_name, Bytes{'x'});
  EXPECT_TRUE(c.closed());
  const auto stats = server.stats();
  EXPECT_FALSE(stats.clean_disconnect);
  EXPECT_TRUE(stats.export_name.empty());
}

TEST_F(NbdServerHandshake, UnknownAndUnsupportedOptionsGetUnsupAndNegotiationGoesOn) {
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  for (std::uint32_t opt : {std::uint32_t{opt_starttls}, std::uint32_t{opt_extended_headers},
                            std::uint32_t{opt_peek_export}, std::uint32_t{0x1234}}) {
    c.option(opt, Bytes{1, 2, 3});
    const auto r = c.option_reply();
    EXPECT_EQ(r.option, opt);
    EXPECT_EQ(r.type, rep_err_unsup) << option_name(opt);
  }
  c.option(opt_go, Client::info_data("disk", {}));
  OptionReply r;
  for (r = c.option_reply(); r.type == rep_info; r = c.option_reply()) {
  }
  EXPECT_EQ(r.type, rep_ack);
  c.disconnect();
  EXPECT_TRUE(c.closed());
}

TEST_F(NbdServerHandshake, BadOptionMagicClosesTheConnection) {
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  Bytes bad(16, 0);
  store_be64(bad.data(), 0x1122334455667788ull);
  c.send(bad);
  EXPECT_TRUE(c.closed());
  EXPECT_FALSE(server.stats().clean_disconnect);
}

TEST_F(NbdServerHandshake, ClientWithoutFixedNewstyleOrWithUnknownFlagsIsRefused) {
  {
    Server server(exports, options);
    Client c(server.fd());
    c.greet(0);
    EXPECT_TRUE(c.closed());
  }
  {
    Server server(exports, options);
    Client c(server.fd());
    c.greet(flag_c_fixed_newstyle | 0x100);
    EXPECT_TRUE(c.closed());
  }
}

TEST_F(NbdServerHandshake, OptionLongerThanMaxOptionClosesTheConnection) {
  options.max_option = 1024;
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  c.send(encode_option_header(opt_go, 1025));
  EXPECT_TRUE(c.closed());
  server.stats();
}

TEST_F(NbdServerHandshake, StructuredReplyTwiceIsInvalid) {
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  c.option(opt_structured_reply);
  EXPECT_EQ(c.option_reply().type, rep_ack);
  c.option(opt_structured_reply);
  EXPECT_EQ(c.option_reply().type, rep_err_invalid);
  c.option(opt_abort);
  EXPECT_EQ(c.option_reply().type, rep_ack);
}

TEST_F(NbdServerHandshake, MetaContexts) {
  Server server(exports, options);
  Client c(server.fd());
  c.greet();
  // SET needs structured replies.
  c.option(opt_set_meta_context, Client::meta_data("disk", {"base:allocation"}));
  EXPECT_EQ(c.option_reply().type, rep_err_invalid);
  // LIST with no query names base:allocation.
  c.option(opt_list_meta_context, Client::meta_data("disk", {}));
  auto r = c.option_reply();
  ASSERT_EQ(r.type, rep_meta_context);
  EXPECT_EQ(std::string(r.data.begin() + 4, r.data.end()), "base:allocation");
  EXPECT_EQ(c.option_reply().type, rep_ack);
  // LIST of an unknown context returns nothing but the ACK.
  c.option(opt_list_meta_context, Client::meta_data("disk", {"qemu:dirty-bitmap:x"}));
  EXPECT_EQ(c.option_reply().type, rep_ack);
  // Unknown export.
  c.option(opt_list_meta_context, Client::meta_data("nope", {}));
  EXPECT_EQ(c.option_reply().type, rep_err_unknown);
  // Malformed.
  c.option(opt_list_meta_context, Bytes{0, 0, 0});
  EXPECT_EQ(c.option_reply().type, rep_err_invalid);

  c.option(opt_structured_reply);
  EXPECT_EQ(c.option_reply().type, rep_ack);
  c.option(opt_set_meta_context, Client::meta_data("disk", {"qemu:dirty-bitmap:x", "base:allocation"}));
  r = c.option_reply();
  ASSERT_EQ(r.type, rep_meta_context);
  EXPECT_NE(load_be32(r.data.data()), 0u);  // an id to match BLOCK_STATUS chunks with
  EXPECT_EQ(std::string(r.data.begin() + 4, r.data.end()), "base:allocation");
  EXPECT_EQ(c.option_reply().type, rep_ack);
  c.option(opt_abort);
  EXPECT_EQ(c.option_reply().type, rep_ack);
}

// --------------------------------------------------------- transmission

using NbdServer = Fixture;

TEST_F(NbdServer, WriteThenReadRoundTripsWithSimpleReplies) {
  Server server(exports, options);
  Client c(server.fd());
  const std::uint16_t flags = c.go("disk");
  EXPECT_FALSE(flags & flag_read_only);
  EXPECT_EQ(c.size, 1u << 20);
  const Bytes data = pattern(200000, 9);
  EXPECT_EQ(c.write(12345, data, 7), 0u);
  EXPECT_EQ(c.read(12345, 200000, 8), data);
  EXPECT_EQ(backend->get(12345, data.size()), data);
  // A read across written data and never-written holes reads zeros there.
  const Bytes around = c.read(8192, 8192, 9);
  EXPECT_EQ(Bytes(around.begin(), around.begin() + (12345 - 8192)), Bytes(12345 - 8192, 0));
  c.request(cmd_flush, 10, 0, 0);
  EXPECT_EQ(c.reply().error, 0u);
  c.request(cmd_cache, 11, 0, 4096);
  EXPECT_EQ(c.reply().error, 0u);
  c.disconnect();
  EXPECT_TRUE(c.closed());
  const auto stats = server.stats();
  EXPECT_EQ(stats.bytes_written, 200000u);
  EXPECT_EQ(stats.bytes_read, 200000u + 8192u);
  EXPECT_FALSE(stats.structured_replies);
  EXPECT_EQ(backend->flushes, 1);
  EXPECT_EQ(backend->caches, 1);
}

TEST_F(NbdServer, RepliesGoOutAsRequestsCompleteNotInRequestOrder) {
  backend->put(0, pattern(3 * 4096, 1));
  // The first request takes longest, the last is immediate.
  backend->delay = [](const std::string&, std::uint64_t offset) {
    return offset == 0 ? 300ms : offset == 4096 ? 150ms : 0ms;
  };
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk");
  c.request(cmd_read, 1, 0, 4096);
  c.request(cmd_read, 2, 4096, 4096);
  c.request(cmd_read, 3, 8192, 4096);
  std::vector<std::uint64_t> order;
  for (int i = 0; i < 3; ++i) {
    const Reply r = c.reply(4096);
    EXPECT_EQ(r.error, 0u);
    EXPECT_EQ(r.payload, backend->get((r.cookie - 1) * 4096, 4096));
    order.push_back(r.cookie);
  }
  EXPECT_EQ(order, (std::vector<std::uint64_t>{3, 2, 1}));
  c.disconnect();
  EXPECT_TRUE(c.closed());
  EXPECT_GE(server.stats().peak_in_flight, 3u);
}

TEST_F(NbdServer, StructuredReadSendsDataChunksAndHoleChunks) {
  // Data in blocks 1 and 3 of [0, 5 blocks); blocks 0, 2, 4 are holes.
  backend->put(4096, pattern(4096, 1));
  backend->put(3 * 4096, pattern(4096, 2));
  Server server(exports, options);
  Client c(server.fd());
  const std::uint16_t flags = c.go("disk", true);
  EXPECT_TRUE(flags & flag_send_df);
  c.request(cmd_read, 5, 0, 5 * 4096);
  const auto chunks = c.chunks(5);
  // Reassemble, checking every byte is covered once.
  Bytes image(5 * 4096, 0xaa);
  std::vector<bool> covered(5 * 4096, false);
  int holes = 0, datas = 0;
  for (const auto& ch : chunks) {
    ASSERT_TRUE(ch.structured);
    const std::uint64_t at = load_be64(ch.payload.data());
    if (ch.type == reply_type_offset_hole) {
      ++holes;
      const std::uint32_t n = load_be32(ch.payload.data() + 8);
      for (std::uint64_t i = at; i < at + n; ++i) {
        EXPECT_FALSE(covered[i]);
        covered[i] = true;
        image[i] = 0;
      }
    } else {
      ASSERT_EQ(ch.type, reply_type_offset_data);
      ++datas;
      for (std::size_t i = 8; i < ch.payload.size(); ++i) {
        EXPECT_FALSE(covered[at + i - 8]);
        covered[at + i - 8] = true;
        image[at + i - 8] = ch.payload[i];
      }
    }
  }
  EXPECT_EQ(holes, 3);
  EXPECT_EQ(datas, 2);
  EXPECT_TRUE(chunks.back().flags & reply_flag_done);
  EXPECT_EQ(std::count(covered.begin(), covered.end(), false), 0);
  EXPECT_EQ(image, backend->get(0, 5 * 4096));

  // With DF: one data chunk, holes as zeros (never the backend's garbage).
  c.request(cmd_read, 6, 0, 5 * 4096, cmd_flag_df);
  const auto df = c.chunks(6);
  ASSERT_EQ(df.size(), 1u);
  EXPECT_EQ(df[0].type, reply_type_offset_data);
  EXPECT_TRUE(df[0].flags & reply_flag_done);
  EXPECT_EQ(load_be64(df[0].payload.data()), 0u);
  EXPECT_EQ(Bytes(df[0].payload.begin() + 8, df[0].payload.end()), backend->get(0, 5 * 4096));

  // Data first, then a hole.
  c.request(cmd_read, 10, 4096, 2 * 4096);
  const auto two = c.chunks(10);
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[0].type, reply_type_offset_data);
  EXPECT_EQ(load_be64(two[0].payload.data()), 4096u);
  EXPECT_EQ(Bytes(two[0].payload.begin() + 8, two[0].payload.end()), pattern(4096, 1));
  EXPECT_EQ(two[1].type, reply_type_offset_hole);
  EXPECT_EQ(load_be64(two[1].payload.data()), 8192u);
  EXPECT_EQ(load_be32(two[1].payload.data() + 8), 4096u);
  EXPECT_TRUE(two[1].flags & reply_flag_done);

  // All data: one chunk.
  c.request(cmd_read, 7, 4096, 4096);
  const auto one = c.chunks(7);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].type, reply_type_offset_data);
  EXPECT_EQ(Bytes(one[0].payload.begin() + 8, one[0].payload.end()), pattern(4096, 1));

  // All hole: one hole chunk.
  c.request(cmd_read, 8, 8192, 4096);
  const auto hole = c.chunks(8);
  ASSERT_EQ(hole.size(), 1u);
  EXPECT_EQ(hole[0].type, reply_type_offset_hole);
  EXPECT_EQ(load_be64(hole[0].payload.data()), 8192u);
  EXPECT_EQ(load_be32(hole[0].payload.data() + 8), 4096u);

  // Writes get a plain success.
  EXPECT_EQ(c.write(0, pattern(10, 1), 9), 0u);
  c.disconnect();
  EXPECT_TRUE(c.closed());
  EXPECT_TRUE(server.stats().structured_replies);
}

TEST_F(NbdServer, BackendWithoutExtentsIsReadWithoutAMap) {
  Capabilities caps;
  caps.can_extents = false;
  auto plain = std::make_shared<TestBackend>(65536, caps);
  plain->put(4096, pattern(4096, 4));
  Exports only;
  only.add("p", plain);
  Server server(only, options);
  Client c(server.fd());
  c.go("p", true);
  c.request(cmd_read, 1, 0, 3 * 4096);
  const auto chunks = c.chunks(1);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].type, reply_type_offset_data);
  EXPECT_EQ(Bytes(chunks[0].payload.begin() + 8, chunks[0].payload.end()), plain->get(0, 3 * 4096));
  c.disconnect();
  EXPECT_TRUE(c.closed());
}

TEST_F(NbdServer, BlockStatusReportsExtentsTrimmedToTheRequest) {
  backend->put(4096, pattern(8192, 1));  // blocks 1 and 2 data, the rest holes
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk", true, true);
  // [1000, 15000): hole to 4096, data to 12288, then a hole the backend
  // reports to 16384, cut at 15000.
  c.request(cmd_block_status, 3, 1000, 14000);
  auto chunks = c.chunks(3);
  ASSERT_EQ(chunks.size(), 1u);
  ASSERT_EQ(chunks[0].type, reply_type_block_status);
  EXPECT_TRUE(chunks[0].flags & reply_flag_done);
  const Bytes& p = chunks[0].payload;
  ASSERT_EQ(p.size(), 4u + 3 * 8);
  EXPECT_EQ(load_be32(p.data()), 1u);  // the id SET_META_CONTEXT gave
  EXPECT_EQ(load_be32(p.data() + 4), 3096u);
  EXPECT_EQ(load_be32(p.data() + 8), state_hole | state_zero);
  EXPECT_EQ(load_be32(p.data() + 12), 8192u);
  EXPECT_EQ(load_be32(p.data() + 16), 0u);
  EXPECT_EQ(load_be32(p.data() + 20), 2712u);
  EXPECT_EQ(load_be32(p.data() + 24), state_hole | state_zero);

  // REQ_ONE: the first extent only.
  c.request(cmd_block_status, 4, 1000, 14000, cmd_flag_req_one);
  chunks = c.chunks(4);
  ASSERT_EQ(chunks.size(), 1u);
  ASSERT_EQ(chunks[0].payload.size(), 4u + 8);
  EXPECT_EQ(load_be32(chunks[0].payload.data() + 4), 3096u);

  // Past the end: EINVAL, as an error chunk.
  c.request(cmd_block_status, 5, (1 << 20) - 10, 100);
  chunks = c.chunks(5);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(structured_error(chunks[0]), nbd_einval);
  c.disconnect();
  EXPECT_TRUE(c.closed());
}

TEST_F(NbdServer, BlockStatusWithoutANegotiatedContextIsEinval) {
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk", true, false);
  c.request(cmd_block_status, 1, 0, 4096);
  EXPECT_EQ(structured_error(c.reply()), nbd_einval);
  c.disconnect();
  EXPECT_TRUE(c.closed());
}

TEST_F(NbdServer, ErrorsAreMappedToNbdErrors) {
  backend->fail = [](const std::string& op, std::uint64_t offset) {
    if (offset == 8192) return EIO;
    if (offset == 12288) return ENOSPC;
    if (offset == 16384) return 0;  // no errno: EIO
    if (offset == 20480) return EACCES;  // no NBD equivalent: EIO
    if (op == "flush") return EPERM;
    return -1;
  };
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk");
  std::uint64_t cookie = 100;
  auto error_of = [&](std::uint16_t type, std::uint64_t offset, std::uint32_t length, std::uint16_t flags = 0) {
    c.request(type, ++cookie, offset, length, flags);
    const Reply r = c.reply();
    EXPECT_EQ(r.cookie, cookie);
    return r.error;
  };
  EXPECT_EQ(error_of(cmd_read, (1 << 20) - 100, 200), nbd_einval);   // past the end
  EXPECT_EQ(error_of(cmd_read, std::uint64_t{1} << 40, 1), nbd_einval);
  EXPECT_EQ(error_of(cmd_trim, (1 << 20) - 100, 200), nbd_einval);
  EXPECT_EQ(error_of(cmd_write_zeroes, (1 << 20) - 100, 200), nbd_enospc);
  EXPECT_EQ(error_of(42, 0, 0), nbd_einval);                          // unknown command
  EXPECT_EQ(error_of(cmd_read, 0, 512, 0x100), nbd_einval);            // unknown flag
  EXPECT_EQ(error_of(cmd_read, 0, 512, cmd_flag_df), nbd_einval);      // DF without structured replies
  EXPECT_EQ(error_of(cmd_read, 8192, 512), nbd_eio);
  EXPECT_EQ(error_of(cmd_read, 12288, 512), nbd_enospc);
  EXPECT_EQ(error_of(cmd_read, 16384, 512), nbd_eio);
  EXPECT_EQ(error_of(cmd_read, 20480, 512), nbd_eio);
  EXPECT_EQ(error_of(cmd_flush, 0, 0), nbd_eperm);
  // A write past the end is ENOSPC, and its payload is skipped.
  c.request(cmd_write, ++cookie, (1 << 20) - 100, 200, 0, pattern(200, 1));
  EXPECT_EQ(c.reply().error, nbd_enospc);
  // The stream is still in step.
  EXPECT_EQ(c.read(0, 16, ++cookie), Bytes(16, 0));
  c.disconnect();
  EXPECT_TRUE(c.closed());
}

TEST_F(NbdServer, StructuredErrorsCarryAMessage) {
  backend->fail = [](const std::string&, std::uint64_t offset) { return offset == 8192 ? ENOSPC : -1; };
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk", true);
  c.request(cmd_read, 1, 8192, 512);
  const Reply r = c.reply();
  EXPECT_EQ(structured_error(r), nbd_enospc);
  const std::uint16_t n = load_be16(r.payload.data() + 4);
  EXPECT_NE(std::string(r.payload.begin() + 6, r.payload.begin() + 6 + n).find("injected"), std::string::npos);
  c.request(cmd_write, 2, 1 << 20, 1, 0, Bytes{1});
  EXPECT_EQ(structured_error(c.reply()), nbd_enospc);
  c.disconnect();
  EXPECT_TRUE(c.closed());
}

TEST_F(NbdServer, ReadOnlyExportAdvertisesItAndRefusesWritesWithEperm) {
  Exports ro;
  ro.add("ro", backend, true);
  Server server(ro, options);
  Client c(server.fd());
  const std::uint16_t flags = c.go("ro");
  EXPECT_TRUE(flags & flag_read_only);
  EXPECT_EQ(c.write(0, pattern(4096, 1), 1), nbd_eperm);
  c.request(cmd_trim, 2, 0, 4096);
  EXPECT_EQ(c.reply().error, nbd_eperm);
  c.request(cmd_write_zeroes, 3, 0, 4096);
  EXPECT_EQ(c.reply().error, nbd_eperm);
  // Reads still work, and nothing was written.
  EXPECT_EQ(c.read(0, 4096, 4), Bytes(4096, 0));
  c.disconnect();
  EXPECT_TRUE(c.closed());
  server.stats();
  EXPECT_TRUE(backend->write_fua.empty());
}

TEST_F(NbdServer, FuaNoHoleAndFastZeroPassThrough) {
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk", true);
  EXPECT_EQ(c.write(0, pattern(512, 1), 1, cmd_flag_fua), 0u);
  EXPECT_EQ(c.write(512, pattern(512, 1), 2), 0u);
  c.request(cmd_write_zeroes, 3, 0, 4096, cmd_flag_no_hole | cmd_flag_fua);
  EXPECT_EQ(c.reply().error, 0u);
  c.request(cmd_write_zeroes, 4, 0, 4096);
  EXPECT_EQ(c.reply().error, 0u);
  // This backend cannot zero fast: NBD_ENOTSUP, as an error chunk.
  c.request(cmd_write_zeroes, 5, 0, 4096, cmd_flag_fast_zero);
  EXPECT_EQ(structured_error(c.reply()), nbd_enotsup);
  c.disconnect();
  EXPECT_TRUE(c.closed());
  server.stats();
  EXPECT_EQ(backend->write_fua, (std::vector<bool>{true, false}));
  ASSERT_EQ(backend->zero_calls.size(), 3u);
  EXPECT_FALSE(backend->zero_calls[0].may_trim);
  EXPECT_TRUE(backend->zero_calls[0].fua);
  EXPECT_FALSE(backend->zero_calls[0].fast);
  EXPECT_TRUE(backend->zero_calls[1].may_trim);
  EXPECT_FALSE(backend->zero_calls[1].fua);
  EXPECT_TRUE(backend->zero_calls[2].fast);
}

TEST_F(NbdServer, CommandsTheBackendCannotDoAreEinval) {
  Capabilities caps;
  caps.can_flush = caps.can_trim = caps.can_zero = caps.can_cache = caps.can_fua = false;
  auto limited = std::make_shared<TestBackend>(65536, caps);
  Exports only;
  only.add("l", limited);
  Server server(only, options);
  Client c(server.fd());
  const std::uint16_t flags = c.go("l");
  EXPECT_EQ(flags & (flag_send_flush | flag_send_trim | flag_send_write_zeroes | flag_send_cache | flag_send_fua |
                     flag_send_fast_zero),
            0);
  std::uint64_t cookie = 0;
  for (auto type : {cmd_flush, cmd_trim, cmd_write_zeroes, cmd_cache}) {
    c.request(type, ++cookie, 0, type == cmd_flush ? 0 : 4096);
    EXPECT_EQ(c.reply().error, nbd_einval) << command_name(type);
  }
  EXPECT_EQ(c.write(0, pattern(16, 1), ++cookie, cmd_flag_fua), nbd_einval);
  c.disconnect();
  EXPECT_TRUE(c.closed());
}

TEST_F(NbdServer, DiscWaitsForRequestsInFlightAndSendsTheirReplies) {
  backend->delay = [](const std::string&, std::uint64_t) { return 200ms; };
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk");
  for (std::uint64_t i = 0; i < 8; ++i) c.request(cmd_write, i + 1, i * 4096, 4096, 0, pattern(4096, 1));
  c.disconnect();
  std::set<std::uint64_t> cookies;
  for (int i = 0; i < 8; ++i) {
    const Reply r = c.reply();
    EXPECT_EQ(r.error, 0u);
    cookies.insert(r.cookie);
  }
  EXPECT_EQ(cookies.size(), 8u);
  EXPECT_TRUE(c.closed());
  const auto stats = server.stats();
  EXPECT_TRUE(stats.clean_disconnect);
  EXPECT_EQ(backend->completed, 8);
  EXPECT_EQ(backend->get(7 * 4096, 4096), pattern(4096, 1));
}

TEST_F(NbdServer, MaxInFlightBoundsRequestsAtTheBackend) {
  options.max_in_flight = 4;
  backend->delay = [](const std::string&, std::uint64_t) { return 10ms; };
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk");
  // 64 requests sent at once; the client reads replies on another thread.
  std::thread sender([&] {
    for (std::uint64_t i = 0; i < 64; ++i) c.request(cmd_write, i + 1, (i % 16) * 4096, 4096, 0, pattern(4096, 2));
  });
  std::set<std::uint64_t> cookies;
  for (int i = 0; i < 64; ++i) {
    const Reply r = c.reply();
    EXPECT_EQ(r.error, 0u);
    cookies.insert(r.cookie);
  }
  sender.join();
  EXPECT_EQ(cookies.size(), 64u);
  c.disconnect();
  EXPECT_TRUE(c.closed());
  const auto stats = server.stats();
  EXPECT_LE(stats.peak_in_flight, 4u);
  EXPECT_GE(stats.peak_in_flight, 2u);
  EXPECT_LE(backend->peak_active, 4);
}

TEST_F(NbdServer, ByteBudgetBoundsPayloadBytesHeld) {
  auto big = std::make_shared<TestBackend>(16 << 20);
  big->delay = [](const std::string&, std::uint64_t) { return 20ms; };
  Exports only;
  only.add("big", big);
  options.budget = ByteBudget::create(1 << 20);
  options.buffers = rpc::BufferPool::create();
  Server server(only, options);
  Client c(server.fd());
  c.go("big");
  constexpr int n = 48;
  const Bytes data = pattern(256 << 10, 5);
  std::thread sender([&] {
    for (int i = 0; i < n; ++i) c.request(cmd_write, i + 1, std::uint64_t(i % 32) * data.size(), data.size(), 0, data);
    for (int i = 0; i < n; ++i) c.request(cmd_read, 1000 + i, std::uint64_t(i % 32) * data.size(), data.size());
  });
  for (int i = 0; i < n; ++i) EXPECT_EQ(c.reply().error, 0u);
  for (int i = 0; i < n; ++i) {
    const Reply r = c.reply(static_cast<std::uint32_t>(data.size()));
    EXPECT_EQ(r.error, 0u);
    EXPECT_EQ(r.payload, data);
  }
  sender.join();
  c.disconnect();
  EXPECT_TRUE(c.closed());
  server.stats();
  EXPECT_LE(options.budget->peak(), options.budget->limit());
  EXPECT_GE(options.budget->peak(), 512u << 10);  // it did run several at once
  EXPECT_EQ(options.budget->in_use(), 0u);
}

TEST_F(NbdServer, RequestsLongerThanMaxRequest) {
  options.max_request = 64 << 10;
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk");
  // A READ gets EINVAL and the session goes on.
  c.request(cmd_read, 1, 0, (64 << 10) + 1);
  EXPECT_EQ(c.reply().error, nbd_einval);
  EXPECT_EQ(c.read(0, 64 << 10, 2).size(), 64u << 10);
  // A WRITE that long ends the session: its payload is not read.
  c.request(cmd_write, 3, 0, (64 << 10) + 1);
  EXPECT_TRUE(c.closed());
  EXPECT_FALSE(server.stats().clean_disconnect);
}

TEST_F(NbdServer, RequestWithBadMagicEndsTheSessionAfterPendingReplies) {
  backend->delay = [](const std::string&, std::uint64_t) { return 100ms; };
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk");
  c.request(cmd_write, 1, 0, 512, 0, pattern(512, 1));
  c.send(Bytes(28, 0x55));
  const Reply r = c.reply();
  EXPECT_EQ(r.cookie, 1u);
  EXPECT_EQ(r.error, 0u);
  EXPECT_TRUE(c.closed());
  const auto stats = server.stats();
  EXPECT_FALSE(stats.clean_disconnect);
  EXPECT_EQ(backend->get(0, 512), pattern(512, 1));
}

TEST_F(NbdServer, ClientVanishingLetsBackendOperationsFinishBeforeServeReturns) {
  backend->delay = [](const std::string&, std::uint64_t) { return 150ms; };
  Server server(exports, options);
  Client c(server.fd());
  c.go("disk");
  for (std::uint64_t i = 0; i < 16; ++i) c.request(cmd_write, i + 1, i * 4096, 4096, 0, pattern(4096, 3));
  for (std::uint64_t i = 0; i < 16; ++i) c.request(cmd_read, 100 + i, i * 4096, 4096);
  std::this_thread::sleep_for(50ms);
  server.close_client();
  const auto stats = server.stats();
  EXPECT_FALSE(stats.clean_disconnect);
  // Every operation the backend started ran to its end (their buffers
  // stayed alive until then: AddressSanitizer checks that part).
  EXPECT_EQ(backend->active, 0);
  EXPECT_EQ(backend->completed, 32);
}

TEST_F(NbdServer, ServeAwaitedOnAnotherExecutorStillRunsOnThePipes) {
  backend->delay = [](const std::string&, std::uint64_t) { return 5ms; };
  asio::io_context pipe_io, caller_io;
  Socket a(pipe_io), b(pipe_io);
  asio::local::connect_pair(a, b);
  const int fd = b.release();
  SocketPipe<Socket> pipe(std::move(a), "test client");
  auto work = asio::make_work_guard(pipe_io);
  std::thread pipe_thread([&] { pipe_io.run(); });
  std::promise<SessionStats> result;
  asio::co_spawn(
      caller_io,
      [&]() -> asio::awaitable<void> {
        const SessionStats stats = co_await serve(pipe, exports, options);
        result.set_value(stats);
      },
      asio::detached);
  std::thread caller_thread([&] { caller_io.run(); });
  {
    Client c(fd);
    c.go("disk");
    for (std::uint64_t i = 0; i < 32; ++i) c.request(cmd_write, i + 1, i * 4096, 4096, 0, pattern(4096, 6));
    for (int i = 0; i < 32; ++i) EXPECT_EQ(c.reply().error, 0u);
    EXPECT_EQ(c.read(4096, 4096, 99), pattern(4096, 6));
    c.disconnect();
    EXPECT_TRUE(c.closed());
  }
  auto f = result.get_future();
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
  EXPECT_TRUE(f.get().clean_disconnect);
  caller_thread.join();
  work.reset();
  pipe_thread.join();
  ::close(fd);
}

TEST_F(NbdServer, WritesArePipelinedAcrossABackendDelay) {
  auto big = std::make_shared<TestBackend>(64 << 20);
  big->delay = [](const std::string&, std::uint64_t) { return 64ms; };
  Exports only;
  only.add("big", big);
  options.buffers = rpc::BufferPool::create();
  Server server(only, options);
  Client c(server.fd());
  c.go("big");
  constexpr int n = 1024;
  const Bytes data = pattern(128 << 10, 7);
  const auto start = std::chrono::steady_clock::now();
  std::thread sender([&] {
    for (int i = 0; i < n; ++i) c.request(cmd_write, i + 1, std::uint64_t(i % 512) * data.size(), data.size(), 0, data);
  });
  for (int i = 0; i < n; ++i) EXPECT_EQ(c.reply().error, 0u);
  sender.join();
  const auto elapsed = std::chrono::steady_clock::now() - start;
  c.disconnect();
  EXPECT_TRUE(c.closed());
  const auto stats = server.stats();
  // One at a time this is 65 s; pipelined, a fraction of a second.
  EXPECT_LT(elapsed, 10s);
  EXPECT_GE(stats.peak_in_flight, 16u);
  EXPECT_EQ(stats.bytes_written, std::uint64_t{n} * data.size());
}

}  // namespace
}  // namespace ferry::nbd
