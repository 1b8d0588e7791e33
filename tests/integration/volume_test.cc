// Volumes end to end: the real `ferry` CLI (and libferry's Session) against
// a real ferryd over UNIX, TCP and TLS, with files on disk. Every verb, holes
// kept both ways, a 2 GiB round trip, a full disk, concurrent and competing
// writers, killed clients, a restarted daemon, bad names.
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <random>
#include <thread>

#include "client/session.h"
#include "tests/integration/ferryd_process.h"
#include "tests/integration/test_files.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;


struct CliResult {
  int rc = -1;
  std::string out;
};

class VolumeTest : public ::testing::TestWithParam<TransportKind> {
 protected:
  FerrydProcess::GrpcListeners grpc_{GetParam() == TransportKind::grpc || GetParam() == TransportKind::grpcs};
  std::vector<std::string> cli_args(const FerrydProcess& d, TransportKind kind) {
    std::vector<std::string> argv = {ferry_cli_path(), "-c", d.uri(kind), "--progress", "none"};
    if (kind == TransportKind::tls || kind == TransportKind::grpcs) {
      const auto& m = test_tls_material();
      argv.insert(argv.end(), {"--tls-ca", m.ca.cert, "--tls-cert", m.client.cert, "--tls-key", m.client.key});
    }
    return argv;
  }
  CliResult cli(const FerrydProcess& d, std::vector<std::string> args) { return cli_on(d, GetParam(), args); }
  CliResult cli_on(const FerrydProcess& d, TransportKind kind, const std::vector<std::string>& args) {
    auto argv = cli_args(d, kind);
    argv.insert(argv.end(), args.begin(), args.end());
    CliResult r;
    r.rc = run_command(argv, &r.out);
    return r;
  }
  Session session(const FerrydProcess& d) { return Session::connect(d.uri(GetParam()), client_options_for(GetParam())); }

  TempDir files_;
  std::string file(const std::string& name) const { return files_.path() + "/" + name; }
};

#define EXPECT_CLI(result, code)                                   \
  do {                                                             \
    const CliResult& r_ = (result);                                \
    EXPECT_EQ(r_.rc, code) << "ferry said:\n" << r_.out;           \
  } while (0)

TEST_P(VolumeTest, EveryVerbThroughTheCli) {
  FerrydProcess d;
  auto r = cli(d, {"--json", "pool-list"});
  EXPECT_CLI(r, 0);
  EXPECT_NE(r.out.find("\"name\":\"default\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"volumes\":0"), std::string::npos) << r.out;

  EXPECT_CLI(cli(d, {"vol-create", "default/disk", "16M"}), 0);
  r = cli(d, {"--json", "vol-info", "default/disk"});
  EXPECT_CLI(r, 0);
  EXPECT_NE(r.out.find("\"capacity\":16777216"), std::string::npos) << r.out;
  EXPECT_EQ(size_of(d.pool_dir() + "/disk"), 16 * MiB);
  EXPECT_LT(allocated(d.pool_dir() + "/disk"), 1 * MiB) << "a new volume is sparse";

  r = cli(d, {"vol-list"});
  EXPECT_CLI(r, 0);
  EXPECT_NE(r.out.find("disk"), std::string::npos);
  EXPECT_NE(r.out.find("16.0 MiB"), std::string::npos) << r.out;

  // Resize: grow, refuse to shrink unless told, shrink.
  EXPECT_CLI(cli(d, {"vol-resize", "disk", "+16M"}), 0);
  EXPECT_EQ(size_of(d.pool_dir() + "/disk"), 32 * MiB);
  r = cli(d, {"vol-resize", "disk", "8M"});
  EXPECT_CLI(r, 6);
  EXPECT_NE(r.out.find("--shrink"), std::string::npos) << r.out;
  EXPECT_EQ(size_of(d.pool_dir() + "/disk"), 32 * MiB);
  EXPECT_CLI(cli(d, {"vol-resize", "disk", "8M", "--shrink"}), 0);
  EXPECT_EQ(size_of(d.pool_dir() + "/disk"), 8 * MiB);

  // Upload and download.
  make_file(file("in"), 8 * MiB, {{0, 3 * MiB}, {5 * MiB, 1 * MiB}}, 7);
  r = cli(d, {"--json", "vol-upload", "disk", file("in")});
  EXPECT_CLI(r, 0);
  EXPECT_NE(r.out.find("\"data_bytes\":4194304"), std::string::npos) << r.out;
  EXPECT_CLI(cli(d, {"vol-download", "disk", file("out")}), 0);
  EXPECT_EQ(file_hash(file("out")), file_hash(file("in")));
  EXPECT_EQ(file_hash(d.pool_dir() + "/disk"), file_hash(file("in")));

  // Failures and their exit codes.
  r = cli(d, {"vol-create", "disk", "1M"});
  EXPECT_CLI(r, 5);
  EXPECT_NE(r.out.find("already exists"), std::string::npos) << r.out;
  r = cli(d, {"vol-info", "nosuch"});
  EXPECT_CLI(r, 4);
  EXPECT_NE(r.out.find("no volume 'nosuch' in pool 'default'"), std::string::npos) << r.out;
  r = cli(d, {"vol-list", "nopool"});
  EXPECT_CLI(r, 4);
  EXPECT_NE(r.out.find("no pool 'nopool'"), std::string::npos) << r.out;
  EXPECT_CLI(cli(d, {"vol-create", "x", "12Q"}), 2);
  EXPECT_CLI(cli(d, {"vol-create", "x", "0"}), 9);
  EXPECT_CLI(cli(d, {"vol-frobnicate"}), 2);
  r = cli(d, {"vol-download", "nosuch", file("keep")});
  EXPECT_CLI(r, 4);
  EXPECT_FALSE(fs::exists(file("keep"))) << "a failed lookup must not create the local file";

  EXPECT_CLI(cli(d, {"vol-delete", "disk"}), 0);
  EXPECT_FALSE(fs::exists(d.pool_dir() + "/disk"));
  EXPECT_CLI(cli(d, {"vol-delete", "disk"}), 4);
  EXPECT_CLI(cli(d, {"ping", "-n", "2"}), 0);
}

TEST_P(VolumeTest, SparseRoundTripKeepsHolesBothWays) {
  FerrydProcess d;
  const std::uint64_t size = 256 * MiB;
  make_file(file("in"), size, {{1 * MiB, 2 * MiB}, {100 * MiB, 1 * MiB}, {255 * MiB, 1 * MiB}}, 11);
  ASSERT_LT(allocated(file("in")), 8 * MiB);
  EXPECT_CLI(cli(d, {"vol-upload", "--create", "sparse", file("in")}), 0);
  const std::string vol = d.pool_dir() + "/sparse";
  EXPECT_EQ(size_of(vol), size);
  EXPECT_LT(allocated(vol), 8 * MiB) << "the volume must stay sparse";
  EXPECT_EQ(file_hash(vol), file_hash(file("in")));

  auto r = cli(d, {"--json", "vol-download", "sparse", file("out")});
  EXPECT_CLI(r, 0);
  EXPECT_NE(r.out.find("\"data_bytes\":4194304"), std::string::npos) << "only data crosses as data: " << r.out;
  EXPECT_EQ(size_of(file("out")), size);
  EXPECT_LT(allocated(file("out")), 8 * MiB) << "the download must stay sparse";
  EXPECT_EQ(file_hash(file("out")), file_hash(file("in")));

  // Zeros written out in full become holes with --sparse.
  {
    std::ofstream dense(file("zeros"), std::ios::binary);
    std::vector<char> z(MiB, 0);
    for (int i = 0; i < 32; ++i) dense.write(z.data(), static_cast<std::streamsize>(z.size()));
  }
  ASSERT_GE(allocated(file("zeros")), 32 * MiB);
  EXPECT_CLI(cli(d, {"vol-upload", "--create", "--sparse", "zeros", file("zeros")}), 0);
  EXPECT_LT(allocated(d.pool_dir() + "/zeros"), 1 * MiB);
  // And --dense writes every byte.
  EXPECT_CLI(cli(d, {"vol-download", "--dense", "sparse", file("dense")}), 0);
  EXPECT_GE(allocated(file("dense")), size);
  EXPECT_EQ(file_hash(file("dense")), file_hash(file("in")));
}

TEST_P(VolumeTest, OffsetAndLengthBothWays) {
  FerrydProcess d;
  make_file(file("base"), 8 * MiB, {{0, 8 * MiB}}, 1);
  make_file(file("patch"), 1 * MiB, {{0, 1 * MiB}}, 2);
  EXPECT_CLI(cli(d, {"vol-upload", "--create", "v", file("base")}), 0);
  EXPECT_CLI(cli(d, {"vol-upload", "--offset", "3M", "v", file("patch")}), 0);
  // Expected: base with the patch at 3 MiB.
  {
    std::fstream f(file("base"), std::ios::in | std::ios::out | std::ios::binary);
    std::vector<char> p(MiB);
    std::ifstream(file("patch"), std::ios::binary).read(p.data(), static_cast<std::streamsize>(p.size()));
    f.seekp(3 * MiB);
    f.write(p.data(), static_cast<std::streamsize>(p.size()));
  }
  EXPECT_EQ(file_hash(d.pool_dir() + "/v"), file_hash(file("base")));
  EXPECT_CLI(cli(d, {"vol-download", "--offset", "3M", "--length", "1M", "v", file("range")}), 0);
  EXPECT_EQ(file_hash(file("range")), file_hash(file("patch")));
  // Past the end: refused before any byte moves.
  auto r = cli(d, {"vol-upload", "--offset", "7680K", "v", file("patch")});
  EXPECT_CLI(r, 9);
  EXPECT_NE(r.out.find("passes the end"), std::string::npos) << r.out;
  EXPECT_EQ(file_hash(d.pool_dir() + "/v"), file_hash(file("base")));
  EXPECT_CLI(cli(d, {"vol-download", "--offset", "9M", "v", file("x")}), 9);
}

TEST_P(VolumeTest, AtomicUploadReplacesOrKeepsTheOldContents) {
  FerrydProcess d;
  make_file(file("old"), 4 * MiB, {{0, 4 * MiB}}, 3);
  make_file(file("new"), 6 * MiB, {{0, 6 * MiB}}, 4);
  EXPECT_CLI(cli(d, {"vol-upload", "--create", "v", file("old")}), 0);
  // Longer than the volume: only --atomic may change its size.
  EXPECT_CLI(cli(d, {"vol-upload", "v", file("new")}), 9);
  EXPECT_CLI(cli(d, {"vol-upload", "--atomic", "v", file("new")}), 0);
  EXPECT_EQ(file_hash(d.pool_dir() + "/v"), file_hash(file("new")));

  // A client interrupted mid-way: the volume keeps what it had.
  Session s = session(d);
  v1::VolUploadCall call;
  call.mutable_volume()->set_pool("default");
  call.mutable_volume()->set_name("v");
  call.set_atomic(true);
  {
    UploadStream up = s.open_upload(call);
    std::vector<std::uint8_t> junk(MiB, 0xab);
    up.write(junk);
    up.write(junk);
    up.abort("changed my mind");
  }
  for (int i = 0; i < 200 && s.vol_info("default", "v").writing(); ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(file_hash(d.pool_dir() + "/v"), file_hash(file("new")));
  for (const auto& e : fs::directory_iterator(d.pool_dir()))
    EXPECT_EQ(e.path().filename().string().rfind(".ferry-upload", 0), std::string::npos)
        << "temporary file left behind: " << e.path();
}

TEST_P(VolumeTest, TwoWritersOnOneVolumeAreRefused) {
  FerrydProcess d;
  EXPECT_CLI(cli(d, {"vol-create", "v", "8M"}), 0);
  make_file(file("in"), 1 * MiB, {{0, MiB}}, 5);
  Session s = session(d);
  v1::VolUploadCall call;
  call.mutable_volume()->set_pool("default");
  call.mutable_volume()->set_name("v");
  UploadStream first = s.open_upload(call);
  std::vector<std::uint8_t> data(MiB, 1);
  first.write(data);
  // The writer lock is held as soon as the first upload's CALL is served.
  for (int i = 0; i < 200 && !s.vol_info("default", "v").writing(); ++i) std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(s.vol_info("default", "v").writing());

  auto r = cli(d, {"vol-upload", "v", file("in")});
  EXPECT_CLI(r, 6);
  EXPECT_NE(r.out.find("in use by an upload"), std::string::npos) << r.out;
  EXPECT_CLI(cli(d, {"vol-delete", "v"}), 6);
  EXPECT_CLI(cli(d, {"vol-resize", "v", "16M"}), 6);
  // Readers are welcome meanwhile.
  EXPECT_CLI(cli(d, {"vol-download", "v", file("copy")}), 0);

  auto reply = first.finish();
  EXPECT_EQ(reply.data_bytes(), MiB);
  EXPECT_CLI(cli(d, {"vol-upload", "v", file("in")}), 0);
}

TEST_P(VolumeTest, AnUploadRightAfterAnAcknowledgedOneFindsTheVolumeFree) {
  // The reply to an upload is the writer's release: the next writer, sent
  // the moment it arrives, must never be told the volume is in use.
  FerrydProcess d;
  EXPECT_CLI(cli(d, {"vol-create", "v", "1M"}), 0);
  Session s = session(d);
  v1::VolUploadCall call;
  call.mutable_volume()->set_pool("default");
  call.mutable_volume()->set_name("v");
  call.set_no_sync(true);
  std::vector<std::uint8_t> data(64 * 1024);
  for (int i = 0; i < 300; ++i) {
    std::fill(data.begin(), data.end(), static_cast<std::uint8_t>(i));
    call.set_atomic(i % 2 == 1);
    try {
      UploadStream up = s.open_upload(call);
      up.write(data);
      EXPECT_EQ(up.finish().data_bytes(), data.size());
    } catch (const Error& e) {
      ADD_FAILURE() << "upload " << i << " right after an acknowledged one: " << e.describe();
      break;
    }
  }
}

TEST_P(VolumeTest, CancellingOneFileTransferLeavesTheSessionsOtherTransfersRunning) {
  // Two uploads on one session, each fed from a pipe we control, so both
  // are surely running when one of them is cancelled.
  FerrydProcess d;
  EXPECT_CLI(cli(d, {"vol-create", "a", "64M"}), 0);
  EXPECT_CLI(cli(d, {"vol-create", "b", "64M"}), 0);
  Session s = session(d);
  const std::string fifo_a = file("fifo-a"), fifo_b = file("fifo-b");
  ASSERT_EQ(::mkfifo(fifo_a.c_str(), 0600), 0);
  ASSERT_EQ(::mkfifo(fifo_b.c_str(), 0600), 0);
  // Opened read-write first, so neither side blocks opening them.
  int wa = ::open(fifo_a.c_str(), O_RDWR | O_CLOEXEC);
  int wb = ::open(fifo_b.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(wa, 0);
  ASSERT_GE(wb, 0);
  auto cancel_a = std::make_shared<rpc::CancelSource>();
  UploadOptions options_a;
  options_a.cancel = cancel_a;
  std::promise<std::optional<Code>> result_a;
  std::promise<std::uint64_t> result_b;
  std::thread ta([&] {
    try {
      s.upload_file("default", "a", fifo_a, options_a);
      result_a.set_value(std::nullopt);
    } catch (const Error& e) {
      result_a.set_value(e.code());
    }
  });
  std::thread tb([&] {
    try {
      result_b.set_value(s.upload_file("default", "b", fifo_b).data_bytes);
    } catch (...) {
      result_b.set_exception(std::current_exception());
    }
  });
  auto fa = result_a.get_future();
  auto fb = result_b.get_future();
  std::vector<std::uint8_t> data(MiB, 0x3c);
  ASSERT_EQ(::write(wa, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  ASSERT_EQ(::write(wb, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  for (int i = 0; i < 500 && !(s.vol_info("default", "a").writing() && s.vol_info("default", "b").writing()); ++i)
    std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(s.vol_info("default", "a").writing());
  ASSERT_TRUE(s.vol_info("default", "b").writing());

  cancel_a->cancel();
  ::close(wa);  // the end of a's input, so its reading loop runs on and sees the cancel
  ASSERT_EQ(fa.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(fa.get(), std::optional<Code>(Code::cancelled));
  // b runs on: more data, then its end, and it is acknowledged whole.
  EXPECT_EQ(fb.wait_for(0s), std::future_status::timeout);
  std::fill(data.begin(), data.end(), 0x7e);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(::write(wb, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  ::close(wb);
  ASSERT_EQ(fb.wait_for(20s), std::future_status::ready);
  EXPECT_EQ(fb.get(), 4 * MiB);
  ta.join();
  tb.join();

  // The cancelled upload let go of a's writer lock, and the session works.
  bool a_free = false;
  for (int i = 0; i < 200 && !a_free; ++i) {
    try {
      v1::VolUploadCall call;
      call.mutable_volume()->set_pool("default");
      call.mutable_volume()->set_name("a");
      UploadStream up = s.open_upload(call);
      up.write(data);
      up.finish();
      a_free = true;
    } catch (const Error& e) {
      if (e.code() != Code::failed_precondition) throw;
      std::this_thread::sleep_for(10ms);
    }
  }
  EXPECT_TRUE(a_free) << "a's writer lock is still held after its upload was cancelled";
  // b holds exactly what was sent: 1 MiB of 0x3c, 3 MiB of 0x7e, zeros.
  const std::string expected = file("expected-b");
  {
    std::ofstream out(expected, std::ios::binary);
    out << std::string(MiB, '\x3c') << std::string(3 * MiB, '\x7e');
  }
  std::filesystem::resize_file(expected, 64 * MiB);
  EXPECT_EQ(file_hash(d.pool_dir() + "/b"), file_hash(expected));
}

TEST_P(VolumeTest, ConcurrentUploadsToDifferentVolumes) {
  FerrydProcess d;
  constexpr int n = 4;
  std::vector<std::unique_ptr<ChildProcess>> uploads;
  for (int i = 0; i < n; ++i) {
    make_file(file("in" + std::to_string(i)), 32 * MiB, {{0, 32 * MiB}}, 100 + i);
    auto argv = cli_args(d, GetParam());
    argv.insert(argv.end(), {"vol-upload", "--create", "v" + std::to_string(i), file("in" + std::to_string(i))});
    uploads.push_back(std::make_unique<ChildProcess>(argv));
  }
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(uploads[i]->wait(), 0) << uploads[i]->output();
    EXPECT_EQ(file_hash(d.pool_dir() + "/v" + std::to_string(i)), file_hash(file("in" + std::to_string(i))));
  }
}

TEST_P(VolumeTest, KilledClientLeavesTheDaemonHealthyAndTheLockFree) {
  FerrydProcess d;
  EXPECT_CLI(cli(d, {"vol-create", "v", "64M"}), 0);
  // The CLI reads its data from a pipe we feed, so it is mid-upload when killed.
  const std::string fifo = file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto argv = cli_args(d, GetParam());
  argv.insert(argv.end(), {"vol-upload", "v", "-"});
  // Opened read-write first, so neither side blocks opening it.
  const int w = ::open(fifo.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(w, 0);
  ChildProcess upload(argv, fifo);
  std::vector<std::uint8_t> data(MiB, 0x5a);
  for (int i = 0; i < 4; ++i) ASSERT_EQ(::write(w, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  Session s = session(d);
  for (int i = 0; i < 500 && !s.vol_info("default", "v").writing(); ++i) std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(s.vol_info("default", "v").writing());
  upload.signal(SIGKILL);
  EXPECT_EQ(upload.wait(), 128 + SIGKILL);
  ::close(w);
  for (int i = 0; i < 500 && s.vol_info("default", "v").writing(); ++i) std::this_thread::sleep_for(10ms);
  EXPECT_FALSE(s.vol_info("default", "v").writing()) << "the writer lock outlived its client";
  EXPECT_TRUE(d.wait_for_log("failed after")) << d.log();
  make_file(file("in"), 1 * MiB, {{0, MiB}}, 9);
  EXPECT_CLI(cli(d, {"vol-upload", "v", file("in")}), 0);
  EXPECT_TRUE(d.running());
}

TEST_P(VolumeTest, InterruptedCliAbortsTheUpload) {
  FerrydProcess d;
  EXPECT_CLI(cli(d, {"vol-create", "v", "64M"}), 0);
  const std::string fifo = file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto argv = cli_args(d, GetParam());
  argv.insert(argv.end(), {"vol-upload", "v", "-"});
  // Opened read-write first, so neither side blocks opening it.
  const int w = ::open(fifo.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(w, 0);
  ChildProcess upload(argv, fifo);
  std::vector<std::uint8_t> data(MiB, 0x5a);
  ASSERT_EQ(::write(w, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  Session s = session(d);
  for (int i = 0; i < 500 && !s.vol_info("default", "v").writing(); ++i) std::this_thread::sleep_for(10ms);
  upload.signal(SIGINT);
  // The CLI is blocked reading the pipe; the abort reaches the daemon anyway.
  EXPECT_TRUE(d.wait_for_log("interrupted by SIGINT")) << d.log();
  ::close(w);
  EXPECT_EQ(upload.wait(), 130) << upload.output();
  for (int i = 0; i < 500 && s.vol_info("default", "v").writing(); ++i) std::this_thread::sleep_for(10ms);
  EXPECT_FALSE(s.vol_info("default", "v").writing());
}

TEST_P(VolumeTest, BadNamesAndLinksAreRefused) {
  FerrydProcess d;
  for (const std::string& name : std::vector<std::string>{"../escape", "a/b", ".hidden", "sp ace", std::string(256, 'x')}) {
    auto r = cli(d, {"vol-create", "default/" + name, "1M"});
    EXPECT_CLI(r, 9);
    EXPECT_NE(r.out.find("volume name"), std::string::npos) << r.out;
  }
  EXPECT_FALSE(fs::exists(d.dir() + "/escape"));
  // A link planted in the pool leads nowhere.
  make_file(file("secret"), 4096, {{0, 4096}}, 1);
  fs::create_symlink(file("secret"), d.pool_dir() + "/link");
  auto r = cli(d, {"vol-download", "link", file("got")});
  EXPECT_CLI(r, 6);
  EXPECT_NE(r.out.find("symbolic link"), std::string::npos) << r.out;
  EXPECT_CLI(cli(d, {"vol-info", "link"}), 6);
  make_file(file("in"), 4096, {{0, 4096}}, 2);
  EXPECT_CLI(cli(d, {"vol-upload", "link", file("in")}), 6);
  EXPECT_EQ(file_hash(file("secret")), [&] {
    make_file(file("secret2"), 4096, {{0, 4096}}, 1);
    return file_hash(file("secret2"));
  }());
  r = cli(d, {"vol-list"});
  EXPECT_EQ(r.out.find("link"), std::string::npos) << "links are not listed as volumes: " << r.out;
}

TEST_P(VolumeTest, ReadOnlyPool) {
  TempDir ro;
  make_file(ro.path() + "/image", 2 * MiB, {{0, MiB}}, 3);
  FerrydProcess d({"--pool", "default=" + ro.path() + ":ro"});
  auto r = cli(d, {"vol-create", "x", "1M"});
  EXPECT_CLI(r, 6);
  EXPECT_NE(r.out.find("read-only"), std::string::npos) << r.out;
  make_file(file("in"), MiB, {{0, MiB}}, 4);
  EXPECT_CLI(cli(d, {"vol-upload", "image", file("in")}), 6);
  EXPECT_CLI(cli(d, {"vol-delete", "image"}), 6);
  EXPECT_CLI(cli(d, {"vol-download", "image", file("out")}), 0);
  EXPECT_EQ(file_hash(file("out")), file_hash(ro.path() + "/image"));
}

TEST_P(VolumeTest, EventsReachSubscribers) {
  FerrydProcess d;
  auto argv = cli_args(d, GetParam());
  argv.insert(argv.end(), {"events", "--count", "4", "--timeout", "60"});
  ChildProcess follower(argv);
  Session s = session(d);
  std::mutex m;
  std::vector<v1::VolumeEvent> seen;
  s.subscribe([&](const v1::VolumeEvent& e) {
    std::lock_guard lock(m);
    seen.push_back(e);
  });
  // It says so once it has subscribed: events from then on reach it.
  for (int i = 0; i < 1000 && follower.output().find("following volume events") == std::string::npos; ++i)
    std::this_thread::sleep_for(10ms);
  make_file(file("in"), MiB, {{0, MiB}}, 1);
  EXPECT_CLI(cli(d, {"vol-create", "e", "1M"}), 0);
  EXPECT_CLI(cli(d, {"vol-upload", "e", file("in")}), 0);
  EXPECT_CLI(cli(d, {"vol-resize", "e", "2M"}), 0);
  EXPECT_CLI(cli(d, {"vol-delete", "e"}), 0);
  EXPECT_EQ(follower.wait(30s), 0) << follower.output();
  const std::string out = follower.output();
  for (const char* line : {"created  default/e", "written  default/e", "resized  default/e", "deleted  default/e"})
    EXPECT_NE(out.find(line), std::string::npos) << out;
  for (int i = 0; i < 200; ++i) {
    {
      std::lock_guard lock(m);
      if (seen.size() >= 4) break;
    }
    std::this_thread::sleep_for(10ms);
  }
  std::lock_guard lock(m);
  ASSERT_EQ(seen.size(), 4u);
  EXPECT_EQ(seen[0].kind(), v1::VOLUME_CREATED);
  EXPECT_EQ(seen[1].kind(), v1::VOLUME_WRITTEN);
  EXPECT_EQ(seen[2].kind(), v1::VOLUME_RESIZED);
  EXPECT_EQ(seen[2].capacity(), 2 * MiB);
  EXPECT_EQ(seen[3].kind(), v1::VOLUME_DELETED);
}

TEST_P(VolumeTest, DeleteAbortsRunningDownloads) {
  FerrydProcess d;
  make_file(file("in"), 64 * MiB, {{0, 64 * MiB}}, 8);
  EXPECT_CLI(cli(d, {"vol-upload", "--create", "v", file("in")}), 0);
  Session s = session(d);
  v1::VolDownloadCall call;
  call.mutable_volume()->set_pool("default");
  call.mutable_volume()->set_name("v");
  DownloadStream down = s.open_download(call);
  auto piece = down.read();
  ASSERT_EQ(piece.kind, DownloadStream::Piece::Kind::data);
  EXPECT_CLI(cli(d, {"vol-delete", "v"}), 0);
  try {
    for (;;) {
      auto p = down.read();
      if (p.kind == DownloadStream::Piece::Kind::end) break;
    }
    down.finish();
    FAIL() << "the download went on after its volume was deleted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::aborted) << e.describe();
    EXPECT_NE(e.message().find("deleted"), std::string::npos) << e.describe();
  }
  EXPECT_CLI(cli(d, {"ping", "-n", "1"}), 0);
}

TEST_P(VolumeTest, DaemonRestartAndReconnect) {
  TempDir state;
  const std::string sock = state.path() + "/d.sock";
  const std::vector<std::string> args = {"--pool", "default=" + state.path() + "/pool", "--listen", "unix:" + sock};
  make_file(file("in"), 16 * MiB, {{0, 4 * MiB}, {12 * MiB, 4 * MiB}}, 12);
  auto first = std::make_unique<FerrydProcess>(args);
  Session s = Session::connect("ferry+unix://" + sock);
  s.vol_create("default", "v", 16 * MiB);
  s.upload_file("default", "v", file("in"));
  EXPECT_EQ(first->terminate(), 0);
  first.reset();
  EXPECT_THROW(s.vol_info("default", "v"), Error) << "the old connection is gone";
  FerrydProcess second(args);
  Session again = Session::connect("ferry+unix://" + sock);
  EXPECT_EQ(again.vol_info("default", "v").capacity(), 16 * MiB);
  again.download_file("default", "v", file("out"));
  EXPECT_EQ(file_hash(file("out")), file_hash(file("in")));
}

INSTANTIATE_TEST_SUITE_P(Transports, VolumeTest,
                         ::testing::ValuesIn(all_transports()),
                         [](const auto& info) { return std::string(to_string(info.param)); });

// ---------------------------------------------------------------------------
// Heavier cases, on one transport each.

class VolumeLargeTest : public VolumeTest {};

TEST_P(VolumeLargeTest, TwoGibRoundTripChecksum) {
  FerrydProcess d(GetParam() == TransportKind::unix_socket ? std::vector<std::string>{}
                                                           : std::vector<std::string>{"--file-io", "threads"});
  const std::uint64_t size = 2048 * MiB;
  make_file(file("big"), size, {{0, size}}, 42);
  const auto want = file_hash(file("big"));
  auto r = cli(d, {"--json", "vol-upload", "--create", "big", file("big")});
  EXPECT_CLI(r, 0);
  EXPECT_EQ(file_hash(d.pool_dir() + "/big"), want);
  fs::remove(file("big"));
  r = cli(d, {"--json", "vol-download", "big", file("back")});
  EXPECT_CLI(r, 0);
  EXPECT_EQ(size_of(file("back")), size);
  EXPECT_EQ(file_hash(file("back")), want);
}

// The daemon's pool on a 24 MiB tmpfs of its own (a private mount namespace,
// so nothing is left mounted if the test dies).
TEST_P(VolumeLargeTest, DiskFullDuringUpload) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to mount a small tmpfs (runs as root in CI)";
  TempDir pool;
  const std::string small = pool.path() + "/small";
  fs::create_directories(small);
  FerrydProcess d({"--pool", "default=" + small},
                  {"/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c",
                   "mount -t tmpfs -o size=24m ferry-enospc \"$0\" && exec \"$@\"", small});
  const std::string inside = "/proc/" + std::to_string(d.pid()) + "/root" + small;
  ASSERT_TRUE(d.wait_for_log("ferryd ready"));

  make_file(file("old"), 8 * MiB, {{0, 8 * MiB}}, 1);
  make_file(file("big"), 64 * MiB, {{0, 64 * MiB}}, 2);
  EXPECT_CLI(cli(d, {"vol-create", "v", "64M"}), 0);
  EXPECT_CLI(cli(d, {"vol-upload", "v", file("old"), "--length", "8M"}), 0);
  const auto old_hash = file_hash(inside + "/v");

  // --atomic: the copy fills the disk; the volume keeps its old contents.
  auto r = cli(d, {"vol-upload", "--atomic", "v", file("big")});
  EXPECT_CLI(r, 7);
  EXPECT_NE(r.out.find("No space left on device"), std::string::npos) << r.out;
  EXPECT_EQ(file_hash(inside + "/v"), old_hash) << "a failed atomic upload changed the volume";
  for (const auto& e : fs::directory_iterator(inside))
    EXPECT_EQ(e.path().filename().string().rfind(".ferry-upload", 0), std::string::npos) << e.path();

  // In place: the bytes written so far stay, the rest is untouched; the
  // lock is released and the daemon serves on.
  r = cli(d, {"vol-upload", "v", file("big")});
  EXPECT_CLI(r, 7);
  EXPECT_NE(r.out.find("No space left on device"), std::string::npos) << r.out;
  EXPECT_NE(d.log().find("the bytes written so far stay"), std::string::npos) << d.log();
  {
    std::vector<std::uint8_t> head(MiB), want(MiB);
    std::ifstream(inside + "/v", std::ios::binary).read(reinterpret_cast<char*>(head.data()), MiB);
    std::ifstream(file("big"), std::ios::binary).read(reinterpret_cast<char*>(want.data()), MiB);
    EXPECT_EQ(head, want) << "the bytes written before the disk filled are not there";
  }
  EXPECT_CLI(cli(d, {"vol-resize", "v", "8M", "--shrink"}), 0);  // frees space, and needs the lock
  EXPECT_CLI(cli(d, {"vol-upload", "v", file("old")}), 0);
  EXPECT_EQ(file_hash(inside + "/v"), file_hash(file("old")));
  EXPECT_CLI(cli(d, {"ping", "-n", "1"}), 0);
}

// Eight uploads at once: no thread per transfer, memory bounded by windows
// and file operations in flight, not by the data.
TEST_P(VolumeLargeTest, EightUploadsKeepThreadsAndMemoryBounded) {
  FerrydProcess d;
  ASSERT_TRUE(d.wait_for_log("ferryd ready"));
  const unsigned threads_idle = d.threads();
  constexpr int n = 8;
  std::vector<std::unique_ptr<ChildProcess>> uploads;
  for (int i = 0; i < n; ++i) {
    make_file(file("in" + std::to_string(i)), 256 * MiB, {{0, 256 * MiB}}, 200 + i);
    EXPECT_CLI(cli(d, {"vol-create", "v" + std::to_string(i), "256M"}), 0);
  }
  for (int i = 0; i < n; ++i) {
    auto argv = cli_args(d, GetParam());
    argv.insert(argv.end(), {"vol-upload", "--no-sync", "v" + std::to_string(i), file("in" + std::to_string(i))});
    uploads.push_back(std::make_unique<ChildProcess>(argv));
  }
  unsigned max_threads = 0;
  std::uint64_t max_rss = 0;
  for (bool running = true; running;) {
    max_threads = std::max(max_threads, d.threads());
    max_rss = std::max(max_rss, d.rss_bytes());
    running = false;
    for (auto& u : uploads) running = running || u->wait(0ms) < 0;
    std::this_thread::sleep_for(5ms);
  }
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(uploads[i]->wait(), 0) << uploads[i]->output();
    EXPECT_EQ(file_hash(d.pool_dir() + "/v" + std::to_string(i)), file_hash(file("in" + std::to_string(i))));
  }
  // io_uring's kernel workers count as ferryd's threads (started on demand,
  // capped by ferryd at file_io_threads (4) + 1). A thread per transfer
  // would add eight, a thread per write in flight sixty-four.
  EXPECT_LE(max_threads, threads_idle + 5) << "ferryd's threads grew with the transfers";
  // Eight 4 MiB windows and 8 x 256 KiB writes in flight each, plus the
  // daemon itself: far below the 2 GiB that moved.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // Sanitizers keep freed memory in quarantine and shadow every byte: the
  // plain build checks the ceiling.
#else
  EXPECT_LT(max_rss, 256 * MiB) << "ferryd's memory grew with the data";
#endif
  std::printf("ferryd during %d uploads: %u threads (idle %u), peak RSS %.1f MiB\n", n, max_threads, threads_idle,
              static_cast<double>(max_rss) / MiB);
}

INSTANTIATE_TEST_SUITE_P(Transports, VolumeLargeTest, ::testing::Values(TransportKind::unix_socket, TransportKind::tcp),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace ferry::testing
