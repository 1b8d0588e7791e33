// Network faults between two network namespaces joined by a veth link
// (NetLab): a partition found by keepalive on both sides, with the
// transfer failing "peer unreachable" and the volume freed; and a link that
// stalls for seconds and comes back, under which a transfer completes
// intact. The CLI runs in one namespace, ferryd in the other.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "tests/integration/copy_helpers.h"
#include "tests/integration/ferryd_process.h"
#include "tests/integration/netlab.h"
#include "tests/integration/test_files.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

// Bytes allocated to the volume once it exists (allocated() reads a
// missing file as ~0).
std::uint64_t volume_allocated(const std::string& path) { return fs::exists(path) ? allocated(path) : 0; }

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// ferryd in namespace b, listening on the link's b end; the CLI in a.
struct TwoHosts {
  explicit TwoHosts(const std::string& rate, std::vector<std::string> daemon_args = {}) {
    ns_a = lab.add_namespace("cli");
    ns_b = lab.add_namespace("daemon");
    link = lab.link(ns_a, ns_b, rate);
    daemon_args.insert(daemon_args.begin(), {"--listen", "tcp:" + link.addr_b + ":7400"});
    daemon = std::make_unique<FerrydProcess>(daemon_args, lab.wrapper(ns_b));
    uri = "ferry+tcp://" + link.addr_b + ":7400";
  }
  std::vector<std::string> cli(const std::vector<std::string>& args) const {
    return concat(concat(lab.wrapper(ns_a), {ferry_cli_path(), "-c", uri, "--progress", "none"}), args);
  }
  NetLab lab;
  std::string ns_a, ns_b, uri;
  NetLab::Link link;
  std::unique_ptr<FerrydProcess> daemon;
};

TEST(NetworkFault, PartitionIsFoundByKeepaliveOnBothSidesAndTheVolumeIsFreed) {
  REQUIRE_NETLAB();
  TwoHosts hosts("40mbit", {"--keepalive-interval", "250", "--keepalive-count", "2"});
  TempDir files;
  const std::string src = files.path() + "/src.img";
  make_file(src, 96 * MiB, {{0, 96 * MiB}}, 41);
  const std::string volume = hosts.daemon->pool_dir() + "/disk.img";
  ChildProcess upload(hosts.cli({"--keepalive-interval", "250", "--keepalive-count", "2", "vol-upload", "--create",
                                 "disk.img", src}));
  ASSERT_TRUE(eventually([&] { return volume_allocated(volume) >= 8 * MiB; }, 20s)) << upload.output();

  hosts.lab.set_up(hosts.link, false);
  const auto cut = Clock::now();
  const int rc = upload.wait(20s);
  const double cli_ms = ms_since(cut);
  EXPECT_EQ(rc, 3) << upload.output();
  EXPECT_NE(upload.output().find("peer unreachable"), std::string::npos) << upload.output();
  ASSERT_TRUE(hosts.daemon->wait_for_log("unreachable", 10s)) << hosts.daemon->log();
  const double daemon_ms = ms_since(cut);
  // 250 ms of silence, then two unanswered probes 250 ms apart: well under
  // two seconds on either side, even on a loaded machine.
  EXPECT_LT(cli_ms, 2500) << upload.output();
  EXPECT_LT(daemon_ms, 2500) << hosts.daemon->log();

  // The daemon let go of the volume: over its unix socket (the partition
  // does not touch it), the same upload now runs to the end.
  std::string out;
  EXPECT_EQ(run_command({ferry_cli_path(), "-c", hosts.daemon->unix_uri(), "--progress", "none", "vol-upload", "disk.img",
                         src},
                        &out),
            0)
      << out;
  EXPECT_EQ(file_hash(volume), file_hash(src));
  std::printf("partition: CLI failed %.0f ms and the daemon %.0f ms after the link went down (keepalive 250 ms x 2)\n",
              cli_ms, daemon_ms);
}

TEST(NetworkFault, ALinkThatStallsForSecondsThenResumesCompletesTheTransfer) {
  REQUIRE_NETLAB();
  TwoHosts hosts("100mbit");
  TempDir files;
  const std::string src = files.path() + "/src.img";
  make_file(src, 64 * MiB, {{0, 24 * MiB}, {32 * MiB, 32 * MiB}}, 42);
  const std::string volume = hosts.daemon->pool_dir() + "/disk.img";
  ChildProcess upload(hosts.cli({"vol-upload", "--create", "disk.img", src}));
  ASSERT_TRUE(eventually([&] { return volume_allocated(volume) >= 4 * MiB; }, 20s)) << upload.output();

  hosts.lab.set_up(hosts.link, false);
  std::this_thread::sleep_for(3s);
  const std::uint64_t before = volume_allocated(volume);
  hosts.lab.set_up(hosts.link, true);
  const auto back = Clock::now();
  // Progress resumes once TCP's next retransmission finds the link.
  ASSERT_TRUE(eventually([&] { return volume_allocated(volume) > before; }, 20s)) << upload.output();
  const double resume_ms = ms_since(back);
  EXPECT_EQ(upload.wait(60s), 0) << upload.output();
  EXPECT_EQ(file_hash(volume), file_hash(src));
  std::printf("stall: link down 3 s; data flowed again %.0f ms after it came back; upload completed intact\n",
              resume_ms);
}

}  // namespace
}  // namespace ferry::testing
