// NBD end to end, with the real NBD tools as peers: nbdinfo, nbdcopy,
// nbdsh (libnbd-bin), qemu-img (qemu-utils) and nbdkit, against a real
// ferryd, both through `ferry nbd-serve` (NBD inside a ferry stream over
// UNIX, TCP and TLS) and through ferryd's plain NBD listener. Then the slow
// device of the background thread: a 64 ms delay per request, with the
// daemon's threads and memory bounded at 1,024 requests in flight.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "tests/integration/ferryd_process.h"
#include "tests/integration/test_files.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

// The tool's full path, or "" if it is not installed.
std::string which(const std::string& tool) {
  if (tool.find('/') != std::string::npos) return tool;
  for (const char* dir : {"/usr/local/bin/", "/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/"})
    if (::access((dir + tool).c_str(), X_OK) == 0) return dir + tool;
  return {};
}
bool have(const std::string& tool) { return !which(tool).empty(); }
// nbdsh is `python3 -m nbd` with whatever python3 comes first in PATH; the
// binding is Debian's, so ask Debian's interpreter.
std::string python3_nbdsh() { return ::access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3"; }

#define REQUIRE_TOOLS(...)                                                  \
  do {                                                                      \
    for (const char* t_ : {__VA_ARGS__})                                    \
      if (!have(t_)) GTEST_SKIP() << t_ << " is not installed";             \
  } while (0)

bool wait_for_path(const std::string& path, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!fs::exists(path)) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

struct ToolRun {
  int rc = -1;
  std::string out;
};
ToolRun tool(std::vector<std::string> argv) {
  if (const std::string path = which(argv[0]); !path.empty()) argv[0] = path;
  ToolRun r;
  r.rc = run_command(argv, &r.out);
  return r;
}
// A tool in the background (its full path looked up).
std::unique_ptr<ChildProcess> background(std::vector<std::string> argv) {
  if (const std::string path = which(argv[0]); !path.empty()) argv[0] = path;
  return std::make_unique<ChildProcess>(argv);
}
#define EXPECT_RUN_OK(r) EXPECT_EQ((r).rc, 0) << (r).out

std::string nbd_unix_uri(const std::string& socket, const std::string& export_name = "") {
  return "nbd+unix:///" + export_name + "?socket=" + socket;
}

// Samples a process's thread count and RSS while a workload runs.
class Sampler {
 public:
  explicit Sampler(const FerrydProcess& d) : d_(d), thread_([this] { loop(); }) {}
  ~Sampler() { stop(); }
  void stop() {
    done_ = true;
    if (thread_.joinable()) thread_.join();
  }
  unsigned max_threads() const { return max_threads_; }
  std::uint64_t max_rss() const { return max_rss_; }

 private:
  void loop() {
    while (!done_) {
      max_threads_ = std::max(max_threads_.load(), d_.threads());
      max_rss_ = std::max(max_rss_.load(), d_.rss_bytes());
      std::this_thread::sleep_for(10ms);
    }
  }
  const FerrydProcess& d_;
  std::atomic<bool> done_{false};
  std::atomic<unsigned> max_threads_{0};
  std::atomic<std::uint64_t> max_rss_{0};
  std::thread thread_;
};

class NbdBridgeTest : public ::testing::TestWithParam<TransportKind> {
 protected:
  FerrydProcess::GrpcListeners grpc_{GetParam() == TransportKind::grpc || GetParam() == TransportKind::grpcs};
  std::vector<std::string> cli(const FerrydProcess& d) {
    std::vector<std::string> argv = {ferry_cli_path(), "-c", d.uri(GetParam()), "--progress", "none"};
    if (GetParam() == TransportKind::tls || GetParam() == TransportKind::grpcs) {
      const auto& m = test_tls_material();
      argv.insert(argv.end(), {"--tls-ca", m.ca.cert, "--tls-cert", m.client.cert, "--tls-key", m.client.key});
    }
    return argv;
  }
  ToolRun ferry(const FerrydProcess& d, const std::vector<std::string>& args) {
    auto argv = cli(d);
    argv.insert(argv.end(), args.begin(), args.end());
    return tool(argv);
  }
  // `ferry nbd-serve EXPORT --socket S` in the background; the URI once it
  // listens.
  std::string serve(const FerrydProcess& d, const std::string& export_name, std::vector<std::string> extra = {}) {
    const std::string socket = files_.path() + "/nbd" + std::to_string(bridges_.size()) + ".sock";
    auto argv = cli(d);
    argv.insert(argv.end(), {"nbd-serve", export_name, "--socket", socket});
    argv.insert(argv.end(), extra.begin(), extra.end());
    bridges_.push_back(std::make_unique<ChildProcess>(argv));
    EXPECT_TRUE(wait_for_path(socket)) << bridges_.back()->output();
    return nbd_unix_uri(socket);
  }
  ChildProcess& bridge(std::size_t i = 0) { return *bridges_.at(i); }
  std::string file(const std::string& name) const { return files_.path() + "/" + name; }

  TempDir files_;
  std::vector<std::unique_ptr<ChildProcess>> bridges_;
};

TEST_P(NbdBridgeTest, NbdinfoSeesSizeFlagsAndHoles) {
  REQUIRE_TOOLS("nbdinfo");
  FerrydProcess d;
  make_file(file("src.img"), 64 * MiB, {{1 * MiB, 1 * MiB}, {40 * MiB, 2 * MiB}}, 7);
  EXPECT_RUN_OK(ferry(d, {"vol-upload", "disk.img", file("src.img"), "--create"}));
  const std::string uri = serve(d, "default/disk.img");

  auto info = tool({"nbdinfo", "--json", uri});
  EXPECT_RUN_OK(info);
  EXPECT_NE(info.out.find("\"export-size\": 67108864"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("\"is_read_only\": false"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("\"can_multi_conn\": true"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("\"can_flush\": true"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("\"can_zero\": true"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("base:allocation"), std::string::npos) << info.out;

  // The map tells the uploaded extents from the holes around them.
  auto map = tool({"nbdinfo", "--map", uri});
  EXPECT_RUN_OK(map);
  std::vector<std::tuple<std::uint64_t, std::uint64_t, bool>> extents;  // offset, length, data
  std::istringstream lines(map.out);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream f(line);
    std::uint64_t off = 0, len = 0;
    unsigned type = 0;
    if (f >> off >> len >> type) extents.emplace_back(off, len, (type & 1) == 0);
  }
  std::uint64_t data = 0, covered = 0;
  for (auto [off, len, is_data] : extents) {
    EXPECT_EQ(off, covered) << map.out;
    covered += len;
    if (is_data) {
      data += len;
      const bool in_first = off >= 1 * MiB && off + len <= 2 * MiB;
      const bool in_second = off >= 40 * MiB && off + len <= 42 * MiB;
      EXPECT_TRUE(in_first || in_second) << "data reported outside the uploaded extents:\n" << map.out;
    }
  }
  EXPECT_EQ(covered, 64 * MiB) << map.out;
  EXPECT_EQ(data, 3 * MiB) << map.out;
}

TEST_P(NbdBridgeTest, QemuImgConvertIntoAndOutOfAVolume) {
  REQUIRE_TOOLS("qemu-img");
  FerrydProcess d;
  make_file(file("src.img"), 48 * MiB, {{0, 3 * MiB}, {20 * MiB, 5 * MiB}, {47 * MiB, 1 * MiB}}, 11);
  EXPECT_RUN_OK(ferry(d, {"vol-create", "disk.img", "48M"}));
  const std::string uri = serve(d, "disk.img");

  EXPECT_RUN_OK(tool({"qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", file("src.img"), uri}));
  EXPECT_EQ(file_hash(d.pool_dir() + "/disk.img"), file_hash(file("src.img")));
  EXPECT_RUN_OK(tool({"qemu-img", "compare", "-f", "raw", "-F", "raw", file("src.img"), uri}));
  EXPECT_RUN_OK(tool({"qemu-img", "convert", "-f", "raw", "-O", "raw", uri, file("out.img")}));
  EXPECT_EQ(file_hash(file("out.img")), file_hash(file("src.img")));
  EXPECT_EQ(size_of(file("out.img")), 48 * MiB);
  // Holes came across as holes.
  EXPECT_LT(allocated(file("out.img")), 16 * MiB);

  // A difference is found, through the same bridge.
  make_file(file("other.img"), 48 * MiB, {{0, 3 * MiB}}, 12);
  EXPECT_EQ(tool({"qemu-img", "compare", "-f", "raw", "-F", "raw", file("other.img"), uri}).rc, 1);
}

TEST_P(NbdBridgeTest, NbdcopyBothWaysWithManyRequestsAndConnections) {
  REQUIRE_TOOLS("nbdcopy");
  FerrydProcess d;
  make_file(file("src.img"), 96 * MiB, {{0, 96 * MiB}}, 21);
  EXPECT_RUN_OK(ferry(d, {"vol-create", "disk.img", "96M"}));
  const std::string uri = serve(d, "default/disk.img");
  const std::vector<std::string> many = {"--requests=64", "--connections=4", "--threads=4"};

  auto up = many;
  up.insert(up.begin(), "nbdcopy");
  up.insert(up.end(), {file("src.img"), uri});
  EXPECT_RUN_OK(tool(up));
  EXPECT_EQ(file_hash(d.pool_dir() + "/disk.img"), file_hash(file("src.img")));

  auto down = many;
  down.insert(down.begin(), "nbdcopy");
  down.insert(down.end(), {uri, file("out.img")});
  EXPECT_RUN_OK(tool(down));
  EXPECT_EQ(file_hash(file("out.img")), file_hash(file("src.img")));
}

TEST_P(NbdBridgeTest, ReadOnlyBridgeRefusesWrites) {
  REQUIRE_TOOLS("nbdinfo", "nbdcopy");
  FerrydProcess d;
  make_file(file("src.img"), 8 * MiB, {{0, 8 * MiB}}, 31);
  EXPECT_RUN_OK(ferry(d, {"vol-upload", "disk.img", file("src.img"), "--create"}));
  const std::string uri = serve(d, "disk.img", {"--read-only"});
  auto info = tool({"nbdinfo", "--json", uri});
  EXPECT_NE(info.out.find("\"is_read_only\": true"), std::string::npos) << info.out;
  make_file(file("other.img"), 8 * MiB, {{0, 8 * MiB}}, 32);
  EXPECT_NE(tool({"nbdcopy", file("other.img"), uri}).rc, 0);
  EXPECT_EQ(file_hash(d.pool_dir() + "/disk.img"), file_hash(file("src.img")));
}

TEST_P(NbdBridgeTest, MissingVolumeFailsAtStart) {
  FerrydProcess d;
  auto r = ferry(d, {"nbd-serve", "default/nope.img", "--socket", file("x.sock")});
  EXPECT_EQ(r.rc, 4) << r.out;
  EXPECT_NE(r.out.find("nope.img"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(file("x.sock")));
}

TEST_P(NbdBridgeTest, NbdWritersExcludeUploadsUntilTheyDisconnect) {
  REQUIRE_TOOLS("nbdsh");
  FerrydProcess d;
  EXPECT_RUN_OK(ferry(d, {"vol-create", "disk.img", "4M"}));
  const std::string uri = serve(d, "disk.img");
  make_file(file("src.img"), 4 * MiB, {{0, 4 * MiB}}, 41);
  // An NBD client that writes and then stays connected for a while.
  auto holder = background({python3_nbdsh(), "-m", "nbd", "-u", uri, "-c", "h.pwrite(b'x' * 4096, 0)\nimport time\ntime.sleep(30)"});
  // Once it holds the volume (vol-info says so), an upload is refused.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  ToolRun info;
  do {
    std::this_thread::sleep_for(50ms);
    info = ferry(d, {"--json", "vol-info", "disk.img"});
  } while (info.out.find("\"writing\":true") == std::string::npos && std::chrono::steady_clock::now() < deadline);
  ASSERT_NE(info.out.find("\"writing\":true"), std::string::npos) << info.out << holder->output();
  auto refused = ferry(d, {"vol-upload", "disk.img", file("src.img")});
  EXPECT_EQ(refused.rc, 6) << refused.out;
  EXPECT_NE(refused.out.find("NBD"), std::string::npos) << refused.out;

  // Killed without a goodbye: the daemon notices, releases the volume.
  holder->signal(SIGKILL);
  holder->wait();
  ToolRun accepted;
  const auto again = std::chrono::steady_clock::now() + 10s;
  do {
    std::this_thread::sleep_for(50ms);
    accepted = ferry(d, {"vol-upload", "disk.img", file("src.img")});
  } while (accepted.rc != 0 && std::chrono::steady_clock::now() < again);
  EXPECT_RUN_OK(accepted);
  EXPECT_EQ(file_hash(d.pool_dir() + "/disk.img"), file_hash(file("src.img")));
  EXPECT_RUN_OK(ferry(d, {"ping", "-n", "1"}));
}

TEST_P(NbdBridgeTest, OneClientKilledLeavesTheOthersAndTheConnection) {
  REQUIRE_TOOLS("nbdsh", "nbdcopy");
  FerrydProcess d;
  make_file(file("src.img"), 32 * MiB, {{0, 32 * MiB}}, 51);
  EXPECT_RUN_OK(ferry(d, {"vol-upload", "disk.img", file("src.img"), "--create"}));
  const std::string uri = serve(d, "disk.img");
  auto victim = background({python3_nbdsh(), "-m", "nbd", "-u", uri, "-c", "import time\ntime.sleep(30)"});
  std::this_thread::sleep_for(300ms);
  victim->signal(SIGKILL);
  victim->wait();
  // The bridge's connection still carries new NBD sessions.
  EXPECT_RUN_OK(tool({"nbdcopy", "--requests=16", uri, file("out.img")}));
  EXPECT_EQ(file_hash(file("out.img")), file_hash(file("src.img")));
  EXPECT_EQ(bridge().wait(0ms), -1) << "nbd-serve exited:\n" << bridge().output();
}

TEST_P(NbdBridgeTest, InterruptStopsTheBridgeAndTheDaemonServesOn) {
  REQUIRE_TOOLS("nbdcopy");
  FerrydProcess d({"--nbd-export", "slow=null:64G,delay=20ms"});
  const std::string uri = serve(d, "slow");
  // A copy into a slow export that would take minutes.
  auto copy = background({"nbdcopy", "--requests=8", "--", "[", "nbdkit", "--exit-with-parent", "pattern", "1G", "]", uri});
  std::this_thread::sleep_for(500ms);
  const auto t0 = std::chrono::steady_clock::now();
  bridge().signal(SIGINT);
  EXPECT_EQ(bridge().wait(10s), 130) << bridge().output();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_NE(copy->wait(10s), 0) << copy->output();
  EXPECT_RUN_OK(ferry(d, {"ping", "-n", "1"}));
  EXPECT_TRUE(d.running());
}

INSTANTIATE_TEST_SUITE_P(Transports, NbdBridgeTest,
                         ::testing::ValuesIn(all_transports()),
                         [](const auto& info) { return std::string(to_string(info.param)); });

// ---------------------------------------------------------------------------
// ferryd's plain NBD listener.

class NbdPlainTest : public ::testing::Test {
 protected:
  std::string file(const std::string& name) const { return files_.path() + "/" + name; }
  ToolRun ferry(const FerrydProcess& d, const std::vector<std::string>& args) {
    std::vector<std::string> argv = {ferry_cli_path(), "-c", d.unix_uri(), "--progress", "none"};
    argv.insert(argv.end(), args.begin(), args.end());
    return tool(argv);
  }
  TempDir files_;
};

TEST_F(NbdPlainTest, ServesVolumesByNameOnUnixAndTcp) {
  REQUIRE_TOOLS("nbdinfo", "nbdcopy");
  const std::string socket = files_.path() + "/plain.sock";
  FerrydProcess d({"--nbd-listen", "unix:" + socket, "--nbd-listen", "tcp:127.0.0.1:0"});
  ASSERT_NE(d.nbd_tcp_port(), 0);
  make_file(file("src.img"), 40 * MiB, {{0, 8 * MiB}, {30 * MiB, 10 * MiB}}, 61);
  EXPECT_RUN_OK(ferry(d, {"vol-create", "disk.img", "40M"}));
  const std::string over_unix = nbd_unix_uri(socket, "default/disk.img");
  const std::string over_tcp = "nbd://127.0.0.1:" + std::to_string(d.nbd_tcp_port()) + "/default/disk.img";

  EXPECT_RUN_OK(tool({"nbdcopy", "--requests=64", "--connections=2", "--threads=2", file("src.img"), over_unix}));
  EXPECT_EQ(file_hash(d.pool_dir() + "/disk.img"), file_hash(file("src.img")));
  EXPECT_RUN_OK(tool({"nbdcopy", "--requests=64", over_tcp, file("out.img")}));
  EXPECT_EQ(file_hash(file("out.img")), file_hash(file("src.img")));
  auto info = tool({"nbdinfo", "--json", over_tcp});
  EXPECT_NE(info.out.find("\"export-size\": 41943040"), std::string::npos) << info.out;

  // An export that does not exist is refused in the handshake; the daemon
  // goes on serving.
  auto missing = tool({"nbdinfo", nbd_unix_uri(socket, "default/nope.img")});
  EXPECT_NE(missing.rc, 0) << missing.out;
  auto traversal = tool({"nbdinfo", nbd_unix_uri(socket, "default/../../etc/passwd")});
  EXPECT_NE(traversal.rc, 0) << traversal.out;
  EXPECT_RUN_OK(tool({"nbdinfo", "--size", over_unix}));
}

TEST_F(NbdPlainTest, ASecondDaemonNeverTakesALiveSocketButReplacesADeadOne) {
  REQUIRE_TOOLS("nbdinfo");
  const std::string socket = files_.path() + "/plain.sock";
  const std::vector<std::string> args = {"--nbd-listen", "unix:" + socket, "--pool", "default=" + file("pool")};
  auto first = std::make_unique<FerrydProcess>(args);
  EXPECT_RUN_OK(ferry(*first, {"vol-create", "disk.img", "4M"}));
  try {
    FerrydProcess second(args);
    ADD_FAILURE() << "a second daemon started on a socket the first one serves";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("another server is already listening on " + socket), std::string::npos)
        << e.what();
  }
  EXPECT_RUN_OK(tool({"nbdinfo", "--size", nbd_unix_uri(socket, "default/disk.img")}));
  // SIGKILL leaves the socket file behind; the next daemon replaces it.
  first.reset();
  ASSERT_TRUE(fs::is_socket(socket));
  FerrydProcess third(args);
  EXPECT_RUN_OK(tool({"nbdinfo", "--size", nbd_unix_uri(socket, "default/disk.img")}));
}

TEST_F(NbdPlainTest, MemoryExportRoundTripWithQemuImg) {
  REQUIRE_TOOLS("qemu-img");
  const std::string socket = files_.path() + "/plain.sock";
  FerrydProcess d({"--nbd-listen", "unix:" + socket, "--nbd-export", "scratch=memory:32M"});
  make_file(file("src.img"), 32 * MiB, {{1 * MiB, 4 * MiB}, {16 * MiB, 1 * MiB}}, 71);
  const std::string uri = nbd_unix_uri(socket, "scratch");
  EXPECT_RUN_OK(tool({"qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", file("src.img"), uri}));
  EXPECT_RUN_OK(tool({"qemu-img", "compare", "-f", "raw", "-F", "raw", file("src.img"), uri}));
}

TEST_F(NbdPlainTest, NbdkitSourceThroughTheDaemon) {
  REQUIRE_TOOLS("nbdkit", "nbdcopy");
  const std::string kit = files_.path() + "/kit.sock";
  // Data nbdkit makes up (its pattern plugin: every 8 bytes their offset).
  auto nbdkit = background({"nbdkit", "-f", "-U", kit, "pattern", "24M"});
  ASSERT_TRUE(wait_for_path(kit)) << nbdkit->output();
  const std::string socket = files_.path() + "/plain.sock";
  FerrydProcess d({"--nbd-listen", "unix:" + socket, "--nbd-export", "src=nbd:" + nbd_unix_uri(kit)});
  EXPECT_RUN_OK(tool({"nbdcopy", nbd_unix_uri(kit), file("direct.img")}));
  EXPECT_RUN_OK(tool({"nbdcopy", "--requests=64", nbd_unix_uri(socket, "src"), file("via-ferryd.img")}));
  EXPECT_EQ(file_hash(file("via-ferryd.img")), file_hash(file("direct.img")));
  EXPECT_EQ(size_of(file("via-ferryd.img")), 24 * MiB);

  // And into a volume through a bridge, nbdkit -> ferryd -> ferry stream -> volume.
  std::vector<std::string> cli = {ferry_cli_path(), "-c", d.unix_uri(), "--progress", "none"};
  auto create = cli;
  create.insert(create.end(), {"vol-create", "copy.img", "24M"});
  EXPECT_RUN_OK(tool(create));
  auto serve = cli;
  serve.insert(serve.end(), {"nbd-serve", "copy.img", "--socket", file("bridge.sock"), "--run",
                             "nbdcopy --requests=32 " + nbd_unix_uri(socket, "src") + " \"$uri\""});
  EXPECT_RUN_OK(tool(serve));
  EXPECT_EQ(file_hash(d.pool_dir() + "/copy.img"), file_hash(file("direct.img")));
}

// ---------------------------------------------------------------------------
// The slow device: 64 ms per request, 128 KiB writes.

class NbdDelayTest : public ::testing::Test {
 protected:
  // Writes `bytes` of pattern data in 128 KiB requests, `depth` in flight
  // on one connection; returns nbdcopy's exit status.
  int write_at_depth(const std::string& uri, unsigned depth, std::uint64_t bytes) {
    const std::uint64_t request = 128 << 10;
    return tool({"nbdcopy", "--connections=1", "--threads=1", "--requests=" + std::to_string(depth),
                "--request-size=" + std::to_string(request),
                "--queue-size=" + std::to_string(std::max<std::uint64_t>(depth * request, 16 * MiB)), "--", "[",
                "nbdkit", "--exit-with-parent", "-t", "64", "pattern", std::to_string(bytes), "]", uri})
        .rc;
  }
  TempDir files_;
};

TEST_F(NbdDelayTest, ThreadCountDoesNotGrowWithRequestsInFlight) {
  REQUIRE_TOOLS("nbdcopy", "nbdkit");
  const std::string socket = files_.path() + "/plain.sock";
  FerrydProcess d({"--nbd-listen", "unix:" + socket, "--nbd-export", "slow=null:64G,delay=64ms"});
  const std::string uri = nbd_unix_uri(socket, "slow");
  const unsigned idle = d.threads();
  std::vector<unsigned> peak;
  for (auto [depth, bytes] : {std::pair<unsigned, std::uint64_t>{1, 2 * MiB}, {64, 64 * MiB}, {1024, 1024 * MiB}}) {
    Sampler sampler(d);
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(write_at_depth(uri, depth, bytes), 0) << "depth " << depth;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sampler.stop();
    peak.push_back(sampler.max_threads());
    std::printf("depth %u: %.1f MB/s, ferryd threads %u (idle %u)\n", depth, bytes / s / 1e6, peak.back(), idle);
  }
  // No thread per request: the same threads serve 1 and 1,024 in flight.
  EXPECT_EQ(peak[1], peak[0]);
  EXPECT_EQ(peak[2], peak[0]);
  EXPECT_LE(peak[2], idle + 1);
  EXPECT_TRUE(d.running());
}

TEST_F(NbdDelayTest, MemoryStaysUnderTheBufferBoundAt1024InFlight) {
  REQUIRE_TOOLS("nbdcopy", "nbdkit");
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "sanitizers keep freed memory in quarantine: the plain build checks the ceiling";
#endif
  const std::string socket = files_.path() + "/plain.sock";
  constexpr std::uint64_t bound = 32 * MiB;
  FerrydProcess d({"--nbd-listen", "unix:" + socket, "--nbd-export", "slow=null:64G,delay=64ms", "--nbd-buffer-bytes",
                   std::to_string(bound)});
  const std::uint64_t idle_rss = d.rss_bytes();
  Sampler sampler(d);
  // 1,024 requests of 128 KiB in flight would hold 128 MiB unbounded.
  EXPECT_EQ(write_at_depth(nbd_unix_uri(socket, "slow"), 1024, 512 * MiB), 0);
  sampler.stop();
  std::printf("ferryd RSS idle %.1f MiB, peak %.1f MiB (payload bound %.0f MiB)\n", idle_rss / 1048576.0,
              sampler.max_rss() / 1048576.0, bound / 1048576.0);
  // Payload in use is bounded by the budget; the shared buffer pool may
  // keep up to 64 MiB of idle buffers besides.
  EXPECT_LT(sampler.max_rss(), idle_rss + bound + 64 * MiB + 16 * MiB);
  EXPECT_NE(d.log().find("NBD"), std::string::npos);
}

}  // namespace
}  // namespace ferry::testing
