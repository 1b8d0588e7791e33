// The NBD server (nbd/server.h) against real NBD clients: nbdinfo and
// nbdcopy (libnbd) and qemu-img (QEMU's own NBD client) run as
// subprocesses against serve() behind a UNIX socket in this process, with
// a sparse in-memory export defined here.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/use_awaitable.hpp>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <thread>

#include "nbd/server.h"

namespace ferry::nbd {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::uint8_t>;

// Sparse memory in 64 KiB blocks, allocated when first written; a block
// never written (or trimmed or zeroed whole) is a hole. One io thread
// serves every connection, so no locking is needed.
class SparseBackend : public Backend {
 public:
  static constexpr std::uint64_t block = 64u << 10;
  explicit SparseBackend(std::uint64_t size) : size_(size) {}

  std::uint64_t size() const override { return size_; }
  Capabilities capabilities() const override { return {}; }
  std::string description() const override { return "sparse test memory"; }

  asio::awaitable<void> read(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map) override {
    for_blocks(offset, out.size(), [&](std::uint64_t b, std::uint64_t at, std::uint64_t n, std::uint64_t done) {
      auto it = blocks_.find(b);
      const bool hole = it == blocks_.end();
      if (!hole)
        std::memcpy(out.data() + done, it->second.data() + at, n);
      else if (!map)
        std::memset(out.data() + done, 0, n);
      if (map) add(*map, n, hole ? state_hole | state_zero : 0);
    });
    co_return;
  }
  asio::awaitable<void> write(std::span<const std::uint8_t> data, std::uint64_t offset, bool) override {
    for_blocks(offset, data.size(), [&](std::uint64_t b, std::uint64_t at, std::uint64_t n, std::uint64_t done) {
      auto& blk = blocks_[b];
      if (blk.empty()) blk.resize(block, 0);
      std::memcpy(blk.data() + at, data.data() + done, n);
    });
    co_return;
  }
  asio::awaitable<void> flush() override { co_return; }
  asio::awaitable<void> trim(std::uint64_t offset, std::uint64_t length, bool) override {
    clear(offset, length, true);
    co_return;
  }
  asio::awaitable<void> zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override {
    clear(offset, length, flags.may_trim);
    co_return;
  }
  asio::awaitable<std::vector<Extent>> extents(std::uint64_t offset, std::uint64_t length) override {
    std::vector<Extent> out;
    for_blocks(offset, length, [&](std::uint64_t b, std::uint64_t, std::uint64_t n, std::uint64_t) {
      add(out, n, blocks_.count(b) ? 0 : state_hole | state_zero);
    });
    co_return out;
  }

  void put(std::uint64_t offset, const Bytes& bytes) {
    for_blocks(offset, bytes.size(), [&](std::uint64_t b, std::uint64_t at, std::uint64_t n, std::uint64_t done) {
      auto& blk = blocks_[b];
      if (blk.empty()) blk.resize(block, 0);
      std::memcpy(blk.data() + at, bytes.data() + done, n);
    });
  }
  Bytes image() const {
    Bytes out(size_, 0);
    for (const auto& [b, blk] : blocks_) std::memcpy(out.data() + b * block, blk.data(), block);
    return out;
  }
  std::size_t allocated_blocks() const { return blocks_.size(); }

 private:
  template <class F>
  void for_blocks(std::uint64_t offset, std::uint64_t length, F&& f) {
    std::uint64_t done = 0;
    while (done < length) {
      const std::uint64_t pos = offset + done;
      const std::uint64_t b = pos / block;
      const std::uint64_t at = pos % block;
      const std::uint64_t n = std::min(block - at, length - done);
      f(b, at, n, done);
      done += n;
    }
  }
  static void add(std::vector<Extent>& map, std::uint64_t n, std::uint32_t flags) {
    if (!map.empty() && map.back().flags == flags)
      map.back().length += n;
    else
      map.push_back({n, flags});
  }
  void clear(std::uint64_t offset, std::uint64_t length, bool may_trim) {
    for_blocks(offset, length, [&](std::uint64_t b, std::uint64_t at, std::uint64_t n, std::uint64_t) {
      auto it = blocks_.find(b);
      if (it == blocks_.end()) return;
      if (may_trim && n == block)
        blocks_.erase(it);
      else
        std::memset(it->second.data() + at, 0, n);
    });
  }

  std::uint64_t size_;
  std::map<std::uint64_t, Bytes> blocks_;
};

using Socket = asio::local::stream_protocol::socket;

// serve() for every connection to a UNIX socket, on one io thread.
class Listener {
 public:
  Listener(const std::string& path, std::shared_ptr<Backend> backend) : acceptor_(io_) {
    auto e = std::make_shared<Export>();
    e->name = "";
    e->description = "interop test export";
    e->backend = std::move(backend);
    exports_ = std::make_unique<SingleExport>(e);
    acceptor_.open(asio::local::stream_protocol());
    acceptor_.bind(asio::local::stream_protocol::endpoint(path));
    acceptor_.listen();
    asio::co_spawn(io_, accept_loop(), [](std::exception_ptr) {});
    thread_ = std::thread([this] { io_.run(); });
  }
  ~Listener() {
    asio::post(io_, [this] {
      std::error_code ignored;
      acceptor_.close(ignored);
    });
    // Sessions end when their clients leave; the tools have exited by now.
    for (int i = 0; i < 500 && active_ > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    io_.stop();
    thread_.join();
  }
  int sessions() const { return sessions_; }
  int clean() const { return clean_; }

 private:
  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto [ec, socket] = co_await acceptor_.async_accept(asio::experimental::as_tuple(asio::use_awaitable));
      if (ec) co_return;
      start(std::move(socket));
    }
  }
  void start(Socket socket) {
    auto pipe = std::make_shared<SocketPipe<Socket>>(std::move(socket), "unix socket");
    ++active_;
    ++sessions_;
    asio::co_spawn(io_, serve(*pipe, *exports_, options_), [this, pipe](std::exception_ptr e, SessionStats stats) {
      EXPECT_FALSE(e) << "serve() threw";
      if (stats.clean_disconnect) ++clean_;
      --active_;
    });
  }

  asio::io_context io_;
  asio::local::stream_protocol::acceptor acceptor_;
  std::unique_ptr<SingleExport> exports_;
  ServerOptions options_;
  std::atomic<int> active_{0};
  std::atomic<int> sessions_{0};
  std::atomic<int> clean_{0};
  std::thread thread_;
};

bool have_tool(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':'))
    if (!dir.empty() && ::access((dir + "/" + name).c_str(), X_OK) == 0) return true;
  return false;
}

// Runs a shell command; its exit status and standard output.
std::pair<int, std::string> run(const std::string& command) {
  std::string out;
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (!p) return {-1, ""};
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// The value after "key": in nbdinfo's JSON (a number, true/false, or a
// quoted string without its quotes).
std::string json_value(const std::string& json, const std::string& key) {
  const auto at = json.find("\"" + key + "\"");
  if (at == std::string::npos) return "";
  auto pos = json.find(':', at);
  if (pos == std::string::npos) return "";
  ++pos;
  while (pos < json.size() && json[pos] == ' ') ++pos;
  if (pos < json.size() && json[pos] == '"') {
    const auto end = json.find('"', pos + 1);
    return json.substr(pos + 1, end - pos - 1);
  }
  const auto end = json.find_first_of(",}\n", pos);
  return json.substr(pos, end - pos);
}

Bytes random_bytes(std::size_t n, unsigned seed) {
  std::mt19937_64 rng(seed);
  Bytes b(n);
  for (auto& x : b) x = static_cast<std::uint8_t>(rng());
  return b;
}

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A 64 MiB sparse file with data at a few places, and the same in memory.
Bytes write_sparse_file(const std::string& path, std::uint64_t size) {
  Bytes image(size, 0);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const std::pair<std::uint64_t, std::size_t> pieces[] = {
      {0, 100000}, {3u << 20, 1u << 20}, {17u << 20, 4096}, {40u << 20, 5u << 20}, {size - 65536, 65536}};
  unsigned seed = 1;
  for (const auto& [at, n] : pieces) {
    const Bytes b = random_bytes(n, seed++);
    std::memcpy(image.data() + at, b.data(), n);
    out.seekp(static_cast<std::streamoff>(at));
    out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(n));
  }
  out.close();
  fs::resize_file(path, size);
  return image;
}

struct Interop : ::testing::Test {
  void SetUp() override {
    std::string t = (fs::temp_directory_path() / "ferry-nbd-interop-XXXXXX").string();
    ASSERT_NE(::mkdtemp(t.data()), nullptr);
    dir = t;
    socket = dir + "/nbd.sock";
    uri = "'nbd+unix:///?socket=" + socket + "'";
    backend = std::make_shared<SparseBackend>(size);
    listener = std::make_unique<Listener>(socket, backend);
  }
  void TearDown() override {
    listener.reset();
    fs::remove_all(dir);
  }
  static constexpr std::uint64_t size = 64u << 20;
  std::string dir, socket, uri;
  std::shared_ptr<SparseBackend> backend;
  std::unique_ptr<Listener> listener;
};

TEST_F(Interop, NbdinfoJsonReportsSizeAndFlags) {
  if (!have_tool("nbdinfo")) GTEST_SKIP() << "nbdinfo is not installed";
  const auto [status, out] = run("nbdinfo --json " + uri);
  ASSERT_EQ(status, 0) << out;
  EXPECT_EQ(json_value(out, "export-size"), std::to_string(size)) << out;
  EXPECT_EQ(json_value(out, "protocol"), "newstyle-fixed") << out;
  EXPECT_EQ(json_value(out, "is_read_only"), "false") << out;
  EXPECT_EQ(json_value(out, "can_flush"), "true") << out;
  EXPECT_EQ(json_value(out, "can_fua"), "true") << out;
  EXPECT_EQ(json_value(out, "can_trim"), "true") << out;
  EXPECT_EQ(json_value(out, "can_zero"), "true") << out;
  EXPECT_EQ(json_value(out, "can_fast_zero"), "true") << out;
  EXPECT_EQ(json_value(out, "can_multi_conn"), "true") << out;
  EXPECT_EQ(json_value(out, "can_cache"), "true") << out;
  EXPECT_EQ(json_value(out, "can_df"), "true") << out;
  EXPECT_EQ(json_value(out, "is_rotational"), "false") << out;
  EXPECT_EQ(json_value(out, "block_size_minimum"), "1") << out;
  EXPECT_EQ(json_value(out, "block_size_preferred"), "4096") << out;
  EXPECT_EQ(json_value(out, "block_size_maximum"), std::to_string(32u << 20)) << out;
  EXPECT_NE(out.find("base:allocation"), std::string::npos) << out;
}

TEST_F(Interop, NbdinfoMapShowsHoleAndDataExtents) {
  if (!have_tool("nbdinfo")) GTEST_SKIP() << "nbdinfo is not installed";
  backend->put(1u << 20, random_bytes(128u << 10, 3));
  backend->put(10u << 20, random_bytes(64u << 10, 4));
  const auto [status, out] = run("nbdinfo --map " + uri);
  ASSERT_EQ(status, 0) << out;
  // "offset length type description", one extent a line.
  std::vector<std::tuple<std::uint64_t, std::uint64_t, unsigned>> extents;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::uint64_t offset, length;
    unsigned type;
    if (fields >> offset >> length >> type) extents.emplace_back(offset, length, type);
  }
  const std::vector<std::tuple<std::uint64_t, std::uint64_t, unsigned>> expected = {
      {0, 1u << 20, 3},
      {1u << 20, 128u << 10, 0},
      {(1u << 20) + (128u << 10), (10u << 20) - (1u << 20) - (128u << 10), 3},
      {10u << 20, 64u << 10, 0},
      {(10u << 20) + (64u << 10), size - (10u << 20) - (64u << 10), 3},
  };
  EXPECT_EQ(extents, expected) << out;
  EXPECT_NE(out.find("hole,zero"), std::string::npos) << out;
  EXPECT_NE(out.find("data"), std::string::npos) << out;
}

TEST_F(Interop, QemuImgConvertsAFileInAndBackOut) {
  if (!have_tool("qemu-img")) GTEST_SKIP() << "qemu-img is not installed";
  const std::string src = dir + "/src.img";
  const std::string dst = dir + "/dst.img";
  const Bytes image = write_sparse_file(src, size);
  auto [status, out] = run("qemu-img convert -n -f raw -O raw '" + src + "' " + uri);
  ASSERT_EQ(status, 0) << out;
  EXPECT_TRUE(backend->image() == image) << "the export differs from the file after qemu-img convert";
  // qemu-img skips zero runs, so the holes stay holes.
  EXPECT_LT(backend->allocated_blocks(), (size / SparseBackend::block) / 2);

  std::tie(status, out) = run("qemu-img convert -f raw -O raw " + uri + " '" + dst + "'");
  ASSERT_EQ(status, 0) << out;
  EXPECT_TRUE(read_file(dst) == image) << "the file read back differs";
  EXPECT_GE(listener->sessions(), 2);
}

TEST_F(Interop, NbdcopyWithFourConnectionsBothWays) {
  if (!have_tool("nbdcopy")) GTEST_SKIP() << "nbdcopy is not installed";
  const std::string src = dir + "/src.img";
  const std::string dst = dir + "/dst.img";
  const Bytes image = write_sparse_file(src, size);
  auto [status, out] = run("nbdcopy --requests 64 --connections 4 -C 4 -T 4 '" + src + "' " + uri);
  ASSERT_EQ(status, 0) << out;
  EXPECT_TRUE(backend->image() == image) << "the export differs from the file after nbdcopy";

  std::tie(status, out) = run("nbdcopy --requests 64 --connections 4 -C 4 -T 4 " + uri + " '" + dst + "'");
  ASSERT_EQ(status, 0) << out;
  EXPECT_TRUE(read_file(dst) == image) << "the file read back differs";
  EXPECT_GE(listener->sessions(), 5);  // several connections each way
  EXPECT_GE(listener->clean(), 2);
}

}  // namespace
}  // namespace ferry::nbd
