// Fault injection against a real ferryd: volume I/O that fails with a
// chosen errno (--fault-volume), connections reset or delayed on the
// daemon's side (--fault-transport) or the client's (ClientOptions::fault),
// and bytes corrupted, dropped or held on the wire by ferry-delay-relay.
// Each test checks the error the client sees, that nothing wrong reaches
// the volume, that what the failed operation held is freed, and that the
// daemon goes on serving.
#include <signal.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <libnbd.h>

#include <filesystem>
#include <memory>
#include <thread>
#include <vector>

#include "client/session.h"
#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "tests/integration/copy_helpers.h"
#include "tests/integration/ferryd_process.h"
#include "tests/integration/netlab.h"
#include "tests/integration/test_files.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
using ::testing::AnyOf;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kSeedOld = 0x01d, kSeedNew = 0x2e3;

// The error `fn` throws; fails the test if it throws none.
template <class F>
Error error_of(F fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "expected an error, the operation succeeded";
  return Error(Code::ok, "");
}

// Writes `size` bytes of pattern `seed` (no holes) to `path`.
void pattern_file(const std::string& path, std::uint64_t size, std::uint64_t seed) {
  make_file(path, size, {{0, size}}, seed);
}

// Pages of `path` equal to pattern `seed` at their offset, and pages equal
// to neither `seed_a` nor `seed_b`.
struct PageCensus {
  std::uint64_t a = 0, b = 0, other = 0;
};
PageCensus census(const std::string& path, std::uint64_t size, std::uint64_t seed_a, std::uint64_t seed_b) {
  PageCensus c;
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    ADD_FAILURE() << "cannot open " << path;
    return c;
  }
  std::vector<std::uint8_t> page(kPage), want(kPage);
  for (std::uint64_t off = 0; off < size; off += kPage) {
    if (::pread(fd, page.data(), kPage, static_cast<off_t>(off)) != static_cast<ssize_t>(kPage)) {
      ++c.other;
      continue;
    }
    fill(want.data(), kPage, seed_a, off);
    if (page == want) {
      ++c.a;
      continue;
    }
    fill(want.data(), kPage, seed_b, off);
    if (page == want)
      ++c.b;
    else
      ++c.other;
  }
  ::close(fd);
  return c;
}

// Uploads `src` into a volume, retrying while an earlier, failed writer's
// last writes are still landing (the volume's lock goes with them); returns
// the final error, or Code::ok on success.
Error upload_when_free(Session& s, const std::string& name, const std::string& src, UploadOptions options = {}) {
  const auto until = std::chrono::steady_clock::now() + 10s;
  for (;;) {
    try {
      s.upload_file("default", name, src, options);
      return Error(Code::ok, "");
    } catch (const Error& e) {
      if (e.code() != Code::failed_precondition || std::chrono::steady_clock::now() > until) return e;
    }
    std::this_thread::sleep_for(20ms);
  }
}

bool temporaries_left(const std::string& pool) {
  for (const auto& e : fs::directory_iterator(pool))
    if (e.path().filename().string().rfind(".ferry-upload.", 0) == 0) return true;
  return false;
}

class FaultInjection : public ::testing::Test {
 protected:
  TempDir dir_;
  std::string src(std::uint64_t size, std::uint64_t seed = kSeedNew) {
    const std::string path = dir_.path() + "/src-" + std::to_string(size) + "-" + std::to_string(seed);
    if (!fs::exists(path)) pattern_file(path, size, seed);
    return path;
  }
};

// --- volume I/O ------------------------------------------------------------

TEST_F(FaultInjection, AWriteErrorFailsTheUploadWithItsErrnoFreesTheVolumeAndTheDaemonServesOn) {
  FerrydProcess d({"--fault-volume", "op=write,errno=ENOSPC,after=4M,volume=victim.img"});
  ASSERT_TRUE(d.wait_for_log("fault injection on volume I/O: op=write,errno=ENOSPC"));
  Session s = Session::connect(d.unix_uri());
  s.vol_create("default", "victim.img", 16 * MiB);
  s.vol_create("default", "other.img", 16 * MiB);
  const std::string data = src(16 * MiB);

  const Error e = error_of([&] { s.upload_file("default", "victim.img", data); });
  EXPECT_EQ(e.code(), Code::resource_exhausted) << e.message();
  EXPECT_THAT(e.message(), HasSubstr("No space left on device"));
  EXPECT_THAT(e.message(), HasSubstr("victim.img"));

  // The same connection goes on, and another volume takes the same data.
  s.upload_file("default", "other.img", data);
  EXPECT_EQ(file_hash(d.pool_dir() + "/other.img"), file_hash(data));
  // The failed upload's lock is gone: the next writer of victim.img is let
  // in, and meets the disk's error, not a busy volume.
  const Error again = upload_when_free(s, "victim.img", data);
  EXPECT_EQ(again.code(), Code::resource_exhausted) << again.message();
  EXPECT_TRUE(d.wait_for_log("No space left on device")) << d.log();
  EXPECT_TRUE(d.running());
}

TEST_F(FaultInjection, AnAtomicUploadThatMeetsAWriteErrorLeavesTheOldVolumeAndNoTemporary) {
  FerrydProcess d({"--fault-volume", "op=write,errno=EIO,after=2M,volume=victim.img"});
  pattern_file(d.pool_dir() + "/victim.img", 8 * MiB, kSeedOld);
  const std::uint64_t old_hash = file_hash(d.pool_dir() + "/victim.img");
  Session s = Session::connect(d.unix_uri());
  UploadOptions atomic;
  atomic.atomic = true;

  const Error e = error_of([&] { s.upload_file("default", "victim.img", src(8 * MiB), atomic); });
  EXPECT_EQ(e.code(), Code::data_loss) << e.message();
  EXPECT_THAT(e.message(), HasSubstr("Input/output error"));
  EXPECT_EQ(file_hash(d.pool_dir() + "/victim.img"), old_hash);
  EXPECT_TRUE(eventually([&] { return !temporaries_left(d.pool_dir()); }, 10s));
  EXPECT_EQ(s.vol_info("default", "victim.img").capacity(), 8 * MiB);
}

TEST_F(FaultInjection, AFailedFdatasyncIsNeverAcknowledged) {
  FerrydProcess d({"--fault-volume", "op=datasync,errno=EIO,volume=victim.img"});
  Session s = Session::connect(d.unix_uri());
  s.vol_create("default", "victim.img", 4 * MiB);
  s.vol_create("default", "other.img", 4 * MiB);

  const Error e = error_of([&] { s.upload_file("default", "victim.img", src(4 * MiB)); });
  EXPECT_EQ(e.code(), Code::data_loss) << e.message();
  EXPECT_THAT(e.message(), HasSubstr("fdatasync"));
  // Only the chosen volume is faulted.
  s.upload_file("default", "other.img", src(4 * MiB));
  EXPECT_EQ(file_hash(d.pool_dir() + "/other.img"), file_hash(src(4 * MiB)));
  // Asked not to sync, the upload does not meet the fault and succeeds.
  UploadOptions no_sync;
  no_sync.no_sync = true;
  EXPECT_EQ(upload_when_free(s, "victim.img", src(4 * MiB), no_sync).code(), Code::ok);
}

TEST_F(FaultInjection, AReadErrorFailsTheDownloadNotTheConnection) {
  FerrydProcess d({"--fault-volume", "op=read,errno=EIO,after=3M,volume=victim.img"});
  pattern_file(d.pool_dir() + "/victim.img", 8 * MiB, kSeedOld);
  pattern_file(d.pool_dir() + "/other.img", 8 * MiB, kSeedOld);
  Session s = Session::connect(d.unix_uri());

  const std::string out = dir_.path() + "/out.raw";
  const Error e = error_of([&] { s.download_file("default", "victim.img", out); });
  EXPECT_EQ(e.code(), Code::data_loss) << e.message();
  EXPECT_THAT(e.message(), HasSubstr("Input/output error"));
  EXPECT_EQ(s.vol_info("default", "victim.img").capacity(), 8 * MiB);
  s.download_file("default", "other.img", out);
  EXPECT_EQ(file_hash(out), file_hash(d.pool_dir() + "/other.img"));
}

TEST_F(FaultInjection, ATransientWriteErrorFailsOneUploadAndTheRetrySucceeds) {
  FerrydProcess d({"--fault-volume", "op=write,errno=EIO,times=1"});
  Session s = Session::connect(d.unix_uri());
  s.vol_create("default", "disk.img", 8 * MiB);
  const Error e = error_of([&] { s.upload_file("default", "disk.img", src(8 * MiB)); });
  EXPECT_EQ(e.code(), Code::data_loss) << e.message();
  EXPECT_EQ(upload_when_free(s, "disk.img", src(8 * MiB)).code(), Code::ok);
  EXPECT_EQ(file_hash(d.pool_dir() + "/disk.img"), file_hash(src(8 * MiB)));
}

// NBD clients see the errno of a failed write, flush or read in the reply,
// and the connection goes on.
TEST_F(FaultInjection, NbdWriteFlushAndReadErrorsReachTheClientAsTheirErrno) {
  const std::string sock = dir_.path() + "/nbd.sock";
  FerrydProcess d({"--nbd-listen", "unix:" + sock, "--fault-volume",
                   "op=write+datasync,errno=EIO,after=1M,volume=nbd.img"});
  Session s = Session::connect(d.unix_uri());
  s.vol_create("default", "nbd.img", 8 * MiB);

  std::unique_ptr<nbd_handle, decltype(&nbd_close)> h(nbd_create(), &nbd_close);
  ASSERT_NE(nbd_set_export_name(h.get(), "default/nbd.img"), -1);
  ASSERT_NE(nbd_connect_unix(h.get(), sock.c_str()), -1) << nbd_get_error();
  std::vector<std::uint8_t> buf(1 * MiB), back(64 << 10);
  fill(buf.data(), buf.size(), kSeedNew, 0);
  // Below the threshold: written and flushed.
  ASSERT_NE(nbd_pwrite(h.get(), buf.data(), 64 << 10, 0, 0), -1) << nbd_get_error();
  ASSERT_NE(nbd_flush(h.get(), 0), -1) << nbd_get_error();
  // Crossing it: the write fails with EIO, then every flush does.
  EXPECT_EQ(nbd_pwrite(h.get(), buf.data(), buf.size(), 1 * MiB, LIBNBD_CMD_FLAG_FUA), -1);
  EXPECT_EQ(nbd_get_errno(), EIO) << nbd_get_error();
  EXPECT_EQ(nbd_flush(h.get(), 0), -1);
  EXPECT_EQ(nbd_get_errno(), EIO) << nbd_get_error();
  // Reads are not faulted; the connection still serves them, and what was
  // acknowledged is there.
  ASSERT_NE(nbd_pread(h.get(), back.data(), back.size(), 0, 0), -1) << nbd_get_error();
  EXPECT_TRUE(std::equal(back.begin(), back.end(), buf.begin()));
  h.reset();

  // A read fault on another daemon: reads fail, writes go on.
  const std::string sock2 = dir_.path() + "/nbd2.sock";
  FerrydProcess r({"--nbd-listen", "unix:" + sock2, "--fault-volume", "op=read,errno=EIO,volume=nbd.img"});
  Session s2 = Session::connect(r.unix_uri());
  s2.vol_create("default", "nbd.img", 8 * MiB);
  std::unique_ptr<nbd_handle, decltype(&nbd_close)> h2(nbd_create(), &nbd_close);
  ASSERT_NE(nbd_set_export_name(h2.get(), "default/nbd.img"), -1);
  ASSERT_NE(nbd_connect_unix(h2.get(), sock2.c_str()), -1) << nbd_get_error();
  // (Data first: a hole is answered without reading the file.)
  EXPECT_NE(nbd_pwrite(h2.get(), buf.data(), 64 << 10, 0, LIBNBD_CMD_FLAG_FUA), -1) << nbd_get_error();
  EXPECT_EQ(nbd_pread(h2.get(), back.data(), back.size(), 0, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EIO) << nbd_get_error();
  EXPECT_NE(nbd_pwrite(h2.get(), buf.data(), 64 << 10, 64 << 10, 0), -1) << nbd_get_error();
}

// --- transport ---------------------------------------------------------------

TEST_F(FaultInjection, ADaemonSideResetMidUploadFailsItAndFreesTheVolume) {
  FerrydProcess d({"--fault-transport", "reset_after=3M,direction=read"});
  ASSERT_TRUE(d.wait_for_log("fault injection on every connection: reset_after=3145728,direction=read"));
  {
    Session s = Session::connect(d.unix_uri());
    s.vol_create("default", "disk.img", 8 * MiB);
    const Error e = error_of([&] { s.upload_file("default", "disk.img", src(8 * MiB)); });
    EXPECT_EQ(e.code(), Code::unavailable) << e.message();
  }
  // Each connection has its own count: a new one uploads 1 MiB to the same
  // volume once the failed upload's writes have landed.
  Session s = Session::connect(d.unix_uri());
  EXPECT_EQ(upload_when_free(s, "disk.img", src(1 * MiB)).code(), Code::ok);
  EXPECT_TRUE(d.running());
}

TEST_F(FaultInjection, AClientSideResetDuringADownloadFreesTheDaemonsStream) {
  FerrydProcess d;
  pattern_file(d.pool_dir() + "/disk.img", 16 * MiB, kSeedOld);
  rpc::ClientOptions faulty;
  faulty.fault = rpc::FaultOptions::parse("reset_after=2M,direction=read");
  {
    Session s = Session::connect(d.unix_uri(), faulty);
    const Error e = error_of([&] { s.download_file("default", "disk.img", dir_.path() + "/out.raw"); });
    EXPECT_EQ(e.code(), Code::unavailable) << e.message();
  }
  rpc::IoThreads io(1);
  auto probe = rpc::Client::connect_sync(io.executor(), d.unix_uri());
  test::v1::StatsReply stats;
  EXPECT_TRUE(eventually([&] {
    stats = probe.call_future<test::v1::Test::Stats>(test::v1::StatsCall{}).get();
    return stats.streams_open() == 0 && stats.clients() == 1;
  }, 10s)) << stats.DebugString();
  // The close runs on the io thread: let it, before the thread stops
  // (IoThreads::stop drops what is still queued).
  probe.close();
  io.finish(std::chrono::seconds(2));
}

TEST_F(FaultInjection, DelayedBytesOnlySlowATransfer) {
  FerrydProcess d({"--fault-transport", "delay=2ms"});
  Session s = Session::connect(d.unix_uri());
  s.vol_create("default", "disk.img", 4 * MiB);
  s.upload_file("default", "disk.img", src(4 * MiB));
  const std::string out = dir_.path() + "/out.raw";
  s.download_file("default", "disk.img", out);
  EXPECT_EQ(file_hash(out), file_hash(src(4 * MiB)));
}

// Bytes altered or lost between a TLS client and ferryd (the relay stands in
// for a faulty link or middlebox): TLS refuses the damaged record, so the
// upload fails, and the volume holds, page by page, either its old contents
// or what the client sent, never anything else.
class WireFault : public FaultInjection, public ::testing::WithParamInterface<const char*> {};

TEST_P(WireFault, IsCaughtByTlsAndNothingDamagedIsWritten) {
  FerrydProcess d;
  const std::string volume = d.pool_dir() + "/disk.img";
  pattern_file(volume, 8 * MiB, kSeedOld);
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", d.tls_port(), {}, 0, {"--fault-up", GetParam()});
  const std::string uri = "ferry+tls://127.0.0.1:" + std::to_string(relay.port);
  {
    Session s = Session::connect(uri, client_options_for(TransportKind::tls));
    const Error e = error_of([&] { s.upload_file("default", "disk.img", src(8 * MiB)); });
    EXPECT_EQ(e.code(), Code::unavailable) << e.message();
    // The daemon's alert, or (if the client was still writing when the
    // daemon closed) the closed connection.
    EXPECT_THAT(e.message(), AnyOf(HasSubstr("bad record mac"), HasSubstr("closed by peer"), HasSubstr("reset")));
  }
  // The daemon saw the damage as a TLS failure of that connection, and let
  // go of the stream once its last writes landed.
  EXPECT_TRUE(d.wait_for_log("decryption failed or bad record mac", 10s)) << d.log();
  rpc::IoThreads io(1);
  auto probe = rpc::Client::connect_sync(io.executor(), d.unix_uri());
  EXPECT_TRUE(eventually([&] {
    return probe.call_future<test::v1::Test::Stats>(test::v1::StatsCall{}).get().streams_open() == 0;
  }, 10s));
  probe.close();
  io.finish(std::chrono::seconds(2));
  const PageCensus c = census(volume, 8 * MiB, kSeedOld, kSeedNew);
  EXPECT_EQ(c.other, 0u) << c.a << " old pages, " << c.b << " new";
  EXPECT_GT(c.a, 0u);  // the fault came before the end
  EXPECT_EQ(c.a + c.b, 8 * MiB / kPage);
}

INSTANTIATE_TEST_SUITE_P(Relay, WireFault, ::testing::Values("corrupt_every=3M", "drop_every=3M"),
                         [](const auto& info) { return std::string(info.index == 0 ? "Corrupted" : "Dropped"); });

// A relay that forwards nothing (a partition the hosts cannot see):
// keepalive finds it, the upload fails "peer unreachable", the daemon frees
// what the connection held; when bytes flow again new connections work.
TEST_F(FaultInjection, ABlackHoledLinkIsFoundByKeepaliveAndEverythingIsFreed) {
  FerrydProcess d({"--keepalive-interval", "250", "--keepalive-count", "2"});
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", d.tls_port());
  const std::string uri = "ferry+tls://127.0.0.1:" + std::to_string(relay.port);
  rpc::ClientOptions options = client_options_for(TransportKind::tls);
  options.connection.keepalive_interval = 250ms;
  options.connection.keepalive_count = 2;
  Session s = Session::connect(uri, options);
  s.vol_create("default", "disk.img", 64 * MiB);
  v1::VolUploadCall call;
  call.mutable_volume()->set_pool("default");
  call.mutable_volume()->set_name("disk.img");
  UploadStream up = s.open_upload(call);
  std::vector<std::uint8_t> chunk(256 << 10);
  fill(chunk.data(), chunk.size(), kSeedNew, 0);
  up.write(chunk);
  ::kill(relay.pid, SIGUSR1);
  const Error e = error_of([&] {
    for (int i = 0; i < 256; ++i) up.write(chunk);
    up.finish();
  });
  EXPECT_EQ(e.code(), Code::unavailable) << e.message();
  EXPECT_THAT(e.message(), HasSubstr("peer unreachable"));
  EXPECT_TRUE(d.wait_for_log("unreachable", 10s)) << d.log();
  ::kill(relay.pid, SIGUSR2);
  Session again = Session::connect(uri, options);
  EXPECT_EQ(upload_when_free(again, "disk.img", src(1 * MiB)).code(), Code::ok);
}

}  // namespace
}  // namespace ferry::testing
