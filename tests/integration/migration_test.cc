// Volume migration end to end: `ferry vol-copy` between real ferryd
// processes, over UNIX, TCP and TLS on this host and across network
// namespaces through a delay relay; checksums compared, the destination
// killed and resumed, cancels from the CLI, the source and the destination,
// a destination whose disk fills.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <thread>

#include "client/session.h"
#include "ferry/v1/migration.ferry.h"
#include "tests/integration/copy_helpers.h"
#include "tests/integration/ferryd_process.h"
#include "tests/integration/netlab.h"
#include "tests/integration/test_files.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
namespace v1 = ferry::v1;


class MigrationTest : public ::testing::TestWithParam<TransportKind> {
 protected:
  bool secure() const { return GetParam() == TransportKind::tls || GetParam() == TransportKind::grpcs; }
  // The destination as the source daemon reaches it, and the options the
  // source daemon needs for that (a client certificate over TLS and grpcs).
  std::vector<std::string> source_args() {
    if (!secure()) return {};
    const auto& m = test_tls_material();
    cfg_ = files_.path() + "/source.toml";
    std::ofstream(cfg_) << "[migration]\ntls_ca = \"" << m.ca.cert << "\"\ntls_cert = \"" << m.client.cert
                        << "\"\ntls_key = \"" << m.client.key << "\"\n[[pool]]\nname = \"default\"\npath = \""
                        << files_.path() << "/source-pool\"\n";
    return {"--config", cfg_};
  }
  std::string source_pool(const FerrydProcess& a) const {
    return secure() ? files_.path() + "/source-pool" : a.pool_dir();
  }
  FerrydProcess::GrpcListeners grpc_{GetParam() == TransportKind::grpc || GetParam() == TransportKind::grpcs};
  TempDir files_;
  std::string cfg_;
};

TEST_P(MigrationTest, CopiesASparseVolumeAndVerifiesIt) {
  FerrydProcess a(source_args());
  FerrydProcess b;
  const std::string src = source_pool(a) + "/v";
  make_volume(src, 256 * MiB, 7);
  const std::string dst_uri = b.uri(GetParam()) + "/default/copy";
  auto r = ferry_cli(a.unix_uri(), {"vol-copy", "default/v", dst_uri, "--extent-size", "16M"});
  ASSERT_EQ(r.rc, 0) << r.out << "\nsource log:\n" << a.log() << "\ndestination log:\n" << b.log();
  EXPECT_NE(r.out.find("verified: 16 extents"), std::string::npos) << r.out;
  const std::string dst = b.pool_dir() + "/copy";
  EXPECT_EQ(size_of(dst), size_of(src));
  EXPECT_EQ(file_hash(dst), file_hash(src)) << "the copy differs from the source";
  EXPECT_LE(allocated(dst), allocated(src)) << "holes (and the source's allocated zeros) arrive as holes";
  EXPECT_FALSE(fs::exists(b.pool_dir() + "/.ferry-copy.copy")) << "a finished copy leaves no copy state";
  r = ferry_cli(b.unix_uri(), {"--json", "vol-info", "copy"});
  EXPECT_CLI(r, 0);
  EXPECT_EQ(json_field(r.out, "state"), "ready") << r.out;

  // Both daemons keep the job, completed, with the same digest.
  const std::string out = job_of(a.unix_uri(), "copy-out");
  const std::string in = job_of(b.unix_uri(), "copy-in");
  EXPECT_EQ(json_field(out, "state"), "completed") << out;
  EXPECT_EQ(json_field(in, "state"), "completed") << in;
  EXPECT_FALSE(json_field(out, "digest").empty()) << out;
  EXPECT_EQ(json_field(out, "digest"), json_field(in, "digest"));
  const std::uint64_t data = std::stoull(json_field(out, "data_bytes"));
  EXPECT_GT(data, 0u) << out;
  EXPECT_LE(data, allocated(src)) << "only the data crossed, holes did not: " << out;
}

INSTANTIATE_TEST_SUITE_P(Transports, MigrationTest,
                         ::testing::ValuesIn(all_transports()),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(MigrationRules, RefusesAnExistingVolumeUnlessOverwritten) {
  FerrydProcess a, b;
  make_volume(a.pool_dir() + "/v", 32 * MiB, 1);
  make_file(b.pool_dir() + "/v", 8 * MiB, {{0, 8 * MiB}}, 2);
  const std::string dst = b.tcp_uri() + "/default/v";
  auto r = ferry_cli(a.unix_uri(), {"vol-copy", "v", dst});
  EXPECT_CLI(r, 5);
  EXPECT_NE(r.out.find("--overwrite"), std::string::npos) << r.out;
  EXPECT_NE(file_hash(b.pool_dir() + "/v"), file_hash(a.pool_dir() + "/v")) << "a refused copy wrote";
  EXPECT_CLI(ferry_cli(a.unix_uri(), {"vol-copy", "v", dst, "--overwrite"}), 0);
  EXPECT_EQ(file_hash(b.pool_dir() + "/v"), file_hash(a.pool_dir() + "/v"));
  EXPECT_EQ(size_of(b.pool_dir() + "/v"), 32 * MiB);
}

TEST(MigrationRules, BadEndsGetClearErrors) {
  FerrydProcess a;
  make_volume(a.pool_dir() + "/v", 8 * MiB, 1);
  auto r = ferry_cli(a.unix_uri(), {"vol-copy", "v", "gopher://x/default/v"});
  EXPECT_CLI(r, 2);
  EXPECT_NE(r.out.find("unknown scheme"), std::string::npos) << r.out;
  r = ferry_cli(a.unix_uri(), {"vol-copy", "nope", "ferry+tcp://127.0.0.1:9/default/v"});
  EXPECT_CLI(r, 4);
  EXPECT_NE(r.out.find("no volume 'nope'"), std::string::npos) << r.out;
  const auto t = Clock::now();
  r = ferry_cli(a.unix_uri(), {"vol-copy", "v", "ferry+tcp://127.0.0.1:9/default/v"});
  EXPECT_CLI(r, 3);
  EXPECT_NE(r.out.find("cannot connect"), std::string::npos) << r.out;
  EXPECT_LT(Clock::now() - t, 15s);
  EXPECT_CLI(ferry_cli(a.unix_uri(), {"ping", "-n", "1"}), 0);
}

// The destination daemon is killed mid-copy: the volume there stays
// incomplete (vol-info says so), a plain copy refuses to clobber it, and
// --resume sends only what was not committed.
TEST(MigrationResume, DestinationKilledThenResumed) {
  TempDir pools;
  const std::string pool_b = pools.path() + "/b";
  fs::create_directories(pool_b);
  FerrydProcess a;
  make_volume(a.pool_dir() + "/v", 128 * MiB, 3);
  auto b = std::make_unique<FerrydProcess>(std::vector<std::string>{"--pool", "default=" + pool_b});
  const std::string dst = b->tcp_uri() + "/default/v";
  ChildProcess copy({ferry_cli_path(), "-c", a.unix_uri(), "--progress", "none", "vol-copy", "v", dst, "--extent-size",
                     "4M", "--bandwidth", "24M", "--parallel", "2"});
  ASSERT_TRUE(eventually([&] { return committed_extents(pool_b, "v") >= 8; })) << copy.output();
  ::kill(b->pid(), SIGKILL);
  EXPECT_EQ(copy.wait(), 3) << "a lost destination is 'unreachable': " << copy.output();
  b.reset();
  const std::size_t committed = committed_extents(pool_b, "v");
  ASSERT_GE(committed, 8u);

  FerrydProcess b2({"--pool", "default=" + pool_b});
  auto r = ferry_cli(b2.unix_uri(), {"vol-info", "v"});
  EXPECT_CLI(r, 0);
  EXPECT_NE(r.out.find("incomplete"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("of 32 extents committed"), std::string::npos) << r.out;
  r = ferry_cli(b2.unix_uri(), {"--json", "vol-list"});
  EXPECT_NE(r.out.find("\"state\":\"incomplete\""), std::string::npos) << r.out;

  const std::string dst2 = b2.tcp_uri() + "/default/v";
  r = ferry_cli(a.unix_uri(), {"vol-copy", "v", dst2, "--extent-size", "4M"});
  EXPECT_CLI(r, 6);
  EXPECT_NE(r.out.find("--resume"), std::string::npos) << r.out;

  const auto t = Clock::now();
  r = ferry_cli(a.unix_uri(), {"--json", "vol-copy", "v", dst2, "--extent-size", "4M", "--resume"});
  const double seconds = std::chrono::duration<double>(Clock::now() - t).count();
  ASSERT_EQ(r.rc, 0) << r.out << "\n" << b2.log();
  EXPECT_EQ(json_field(r.out, "resumed"), "true") << r.out;
  const std::uint64_t skipped = std::stoull(json_field(r.out, "skipped_bytes"));
  EXPECT_GE(skipped, committed * 4 * MiB) << "committed extents were sent again: " << r.out;
  EXPECT_EQ(file_hash(pool_b + "/v"), file_hash(a.pool_dir() + "/v"));
  EXPECT_FALSE(fs::exists(pool_b + "/.ferry-copy.v"));
  std::printf("resume: %zu of 32 extents kept, %s bytes skipped, %s bytes of data re-sent, resumed copy took %.2f s\n",
              committed, json_field(r.out, "skipped_bytes").c_str(), json_field(r.out, "data_bytes").c_str(), seconds);
  r = ferry_cli(b2.unix_uri(), {"--json", "vol-info", "v"});
  EXPECT_EQ(json_field(r.out, "state"), "ready") << r.out;
}

// How long both daemons may take to stop after a cancel. The bound is one
// second; sanitizer builds run both daemons several times slower, so they
// get three.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr double stop_bound_s = 3.0;
#else
constexpr double stop_bound_s = 1.0;
#endif

// A copy slow enough to be caught in the middle.
struct SlowCopy {
  TempDir pools;
  FerrydProcess a;
  FerrydProcess b;
  std::unique_ptr<ChildProcess> cli;

  SlowCopy() {
    make_volume(a.pool_dir() + "/v", 256 * MiB, 5);
    cli = std::make_unique<ChildProcess>(std::vector<std::string>{ferry_cli_path(), "-c", a.unix_uri(), "--progress",
                                                                  "none", "vol-copy", "v", b.tcp_uri() + "/default/v",
                                                                  "--extent-size", "4M", "--bandwidth", "4M"});
  }
  bool both_running() {
    return json_field(job_of(a.unix_uri(), "copy-out"), "state") == "running" &&
           json_field(job_of(b.unix_uri(), "copy-in"), "state") == "running" && committed_extents(b.pool_dir(), "v") > 0;
  }
  // Time from now until neither daemon has the job running, polled through
  // libferry (no process per poll).
  double seconds_until_both_stop(Session& on_a, Session& on_b) {
    auto running = [](Session& s, const std::string& kind) {
      const auto reply = s.rpc().call_future<v1::Migration::JobList>(v1::JobListCall{}).get();
      for (const auto& j : reply.jobs())
        if (j.kind() == kind && j.state() == v1::JOB_RUNNING) return true;
      return false;
    };
    const auto t = Clock::now();
    EXPECT_TRUE(eventually([&] { return !running(on_a, "copy-out") && !running(on_b, "copy-in"); }, 10s));
    return std::chrono::duration<double>(Clock::now() - t).count();
  }
  double seconds_until_both_stop() {
    Session on_a = Session::connect(a.unix_uri());
    Session on_b = Session::connect(b.unix_uri());
    return seconds_until_both_stop(on_a, on_b);
  }
  void expect_same_error(const std::string& state, const std::string& text) {
    const std::string out = job_of(a.unix_uri(), "copy-out");
    const std::string in = job_of(b.unix_uri(), "copy-in");
    EXPECT_EQ(json_field(out, "state"), state) << out;
    EXPECT_EQ(json_field(in, "state"), state) << in;
    EXPECT_NE(json_field(out, "message").find(text), std::string::npos) << out;
    EXPECT_EQ(json_field(out, "message"), json_field(in, "message")) << "both ends report the same error";
  }
  // The destination's lock and buffers are gone: the copy can go on.
  void expect_resumable() {
    auto r = ferry_cli(b.unix_uri(), {"--json", "vol-info", "v"});
    EXPECT_EQ(json_field(r.out, "writing"), "false") << r.out;
    EXPECT_EQ(json_field(r.out, "state"), "incomplete") << r.out;
    r = ferry_cli(a.unix_uri(), {"vol-copy", "v", b.tcp_uri() + "/default/v", "--extent-size", "4M", "--resume"});
    EXPECT_CLI(r, 0);
    EXPECT_EQ(file_hash(b.pool_dir() + "/v"), file_hash(a.pool_dir() + "/v"));
  }
};

TEST(MigrationCancel, FromTheSourceStopsBothEnds) {
  SlowCopy c;
  ASSERT_TRUE(eventually([&] { return c.both_running(); })) << c.cli->output();
  const std::string id = json_field(job_of(c.a.unix_uri(), "copy-out"), "id");
  Session on_a = Session::connect(c.a.unix_uri());
  Session on_b = Session::connect(c.b.unix_uri());
  auto r = ferry_cli(c.a.unix_uri(), {"job-cancel", id});
  EXPECT_CLI(r, 0);
  EXPECT_NE(r.out.find("cancelled"), std::string::npos) << r.out;
  const double s = c.seconds_until_both_stop(on_a, on_b);
  EXPECT_LT(s, stop_bound_s) << "both daemons stop within a second";
  std::printf("cancel on the source: both ends idle %.3f s after ferry job-cancel returned\n", s);
  EXPECT_NE(c.cli->wait(), 0);
  EXPECT_NE(c.cli->output().find("cancelled by job-cancel"), std::string::npos) << c.cli->output();
  c.expect_same_error("cancelled", "cancelled by job-cancel on");
  c.expect_resumable();
}

TEST(MigrationCancel, FromTheDestinationStopsBothEnds) {
  SlowCopy c;
  ASSERT_TRUE(eventually([&] { return c.both_running(); })) << c.cli->output();
  const std::string id = json_field(job_of(c.b.unix_uri(), "copy-in"), "id");
  Session on_a = Session::connect(c.a.unix_uri());
  Session on_b = Session::connect(c.b.unix_uri());
  auto r = ferry_cli(c.b.unix_uri(), {"job-cancel", id});  // returns when the job there has stopped
  EXPECT_CLI(r, 0);
  EXPECT_NE(r.out.find("cancelled"), std::string::npos) << r.out;
  const double s = c.seconds_until_both_stop(on_a, on_b);
  EXPECT_LT(s, stop_bound_s) << "both daemons stop within a second";
  std::printf("cancel on the destination: both ends idle %.3f s after ferry job-cancel returned\n", s);
  EXPECT_NE(c.cli->wait(), 0);
  c.expect_same_error("cancelled", "cancelled by job-cancel on");
  c.expect_resumable();
}

TEST(MigrationCancel, CtrlCOnTheCliCancelsTheJob) {
  SlowCopy c;
  ASSERT_TRUE(eventually([&] { return c.both_running(); })) << c.cli->output();
  c.cli->signal(SIGINT);
  EXPECT_EQ(c.cli->wait(), 130) << c.cli->output();
  c.seconds_until_both_stop();
  c.expect_same_error("cancelled", "interrupted on the ferry client");
  c.expect_resumable();
}

// The destination's disk fills: the copy fails with ENOSPC on both ends,
// nothing hangs, the destination serves on.
TEST(MigrationFailure, DestinationDiskFull) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to mount a small tmpfs (runs as root in CI)";
  TempDir pool;
  const std::string small = pool.path() + "/small";
  fs::create_directories(small);
  FerrydProcess a;
  FerrydProcess b({"--pool", "default=" + small},
                  {"/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c",
                   "mount -t tmpfs -o size=24m ferry-enospc \"$0\" && exec \"$@\"", small});
  ASSERT_TRUE(b.wait_for_log("ferryd ready"));
  make_file(a.pool_dir() + "/v", 64 * MiB, {{0, 64 * MiB}}, 9);
  auto r = ferry_cli(a.unix_uri(), {"vol-copy", "v", b.tcp_uri() + "/default/v", "--extent-size", "4M"});
  EXPECT_CLI(r, 7);
  EXPECT_NE(r.out.find("No space left on device"), std::string::npos) << r.out;
  const std::string out = job_of(a.unix_uri(), "copy-out");
  const std::string in = job_of(b.unix_uri(), "copy-in");
  EXPECT_EQ(json_field(out, "state"), "failed") << out;
  EXPECT_EQ(json_field(in, "state"), "failed") << in;
  EXPECT_EQ(json_field(out, "message"), json_field(in, "message"));
  EXPECT_CLI(ferry_cli(b.unix_uri(), {"ping", "-n", "1"}), 0);
  r = ferry_cli(b.unix_uri(), {"--json", "vol-info", "v"});
  EXPECT_EQ(json_field(r.out, "writing"), "false") << "the lock was released: " << r.out;
}

// Two hosts: each daemon in its own network namespace, a 1 Gbit/s link, a
// 10 ms round trip through the delay relay. A 2 GiB volume with 25% data;
// the network drops mid-copy (the relay is killed), comes back, and the
// copy resumes; the checksums match.
TEST(MigrationNetwork, AcrossNamespacesWithLatencyAndADroppedLink) {
  if (!NetLab::available()) GTEST_SKIP() << "needs root and ip netns";
  NetLab lab;
  const std::string ns_a = lab.add_namespace("src");
  const std::string ns_b = lab.add_namespace("dst");
  const NetLab::Link link = lab.link(ns_a, ns_b, "1gbit");
  FerrydProcess a({}, lab.wrapper(ns_a));
  FerrydProcess b({}, lab.wrapper(ns_b));
  ASSERT_TRUE(a.wait_for_log("ferryd ready"));
  ASSERT_TRUE(b.wait_for_log("ferryd ready"));
  make_volume(a.pool_dir() + "/v", 2048 * MiB, 11);
  auto relay = lab.start_relay(ns_b, link.addr_b, "127.0.0.1", b.tcp_port(), 5ms);
  const std::string dst = "ferry+tcp://" + link.addr_b + ":" + std::to_string(relay.port) + "/default/v";

  ChildProcess copy({ferry_cli_path(), "-c", a.unix_uri(), "--progress", "none", "vol-copy", "v", dst});
  ASSERT_TRUE(eventually([&] { return committed_extents(b.pool_dir(), "v") >= 4; }, 60s)) << copy.output();
  lab.kill_relay(relay);
  EXPECT_EQ(copy.wait(), 3) << copy.output();
  EXPECT_NE(job_of(a.unix_uri(), "copy-out").find("\"state\":\"failed\""), std::string::npos);
  // The destination noticed too, and let go of the volume.
  EXPECT_TRUE(eventually([&] { return json_field(job_of(b.unix_uri(), "copy-in"), "state") == "failed"; }, 5s))
      << job_of(b.unix_uri(), "copy-in");

  relay = lab.restart_relay(relay);
  const auto t = Clock::now();
  auto r = ferry_cli(a.unix_uri(), {"--json", "vol-copy", "v", dst, "--resume"});
  ASSERT_EQ(r.rc, 0) << r.out << "\n" << a.log() << "\n" << b.log();
  std::printf("across namespaces (1 Gbit/s, 10 ms RTT): resumed in %.2f s, %s bytes skipped\n",
              std::chrono::duration<double>(Clock::now() - t).count(), json_field(r.out, "skipped_bytes").c_str());
  EXPECT_NE(json_field(r.out, "skipped_bytes"), "0") << r.out;
  EXPECT_EQ(file_hash(b.pool_dir() + "/v"), file_hash(a.pool_dir() + "/v"));
  EXPECT_LE(allocated(b.pool_dir() + "/v"), allocated(a.pool_dir() + "/v"));
}

}  // namespace
}  // namespace ferry::testing
