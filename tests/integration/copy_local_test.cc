// `ferry vol-copy` with one end local to the CLI: a local file (absolute,
// ./ or ../ relative, or file:PATH) or an NBD export (nbdkit, qemu-nbd on a
// UNIX socket), the other end a volume on a real ferryd. Contents compared
// byte for byte, holes checked through st_blocks, Ctrl-C in the middle and
// --resume, the refusals (both ends local, a missing source, an existing
// destination, an NBD export too small).
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <regex>
#include <sstream>
#include <thread>

#include "tests/integration/copy_helpers.h"
#include "tests/integration/ferryd_process.h"
#include "tests/integration/test_files.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr std::uint64_t extent = 4 * MiB;

// Where make_source() puts a run of allocated zeros in a hole: extent
// aligned, so any zero detection finer than an extent finds it.
constexpr std::uint64_t zero_run_at = 20 * MiB;
constexpr std::uint64_t zero_run = 4 * MiB;

// make_volume()'s layout (25% data, the rest holes, some allocated zeros)
// plus a whole extent of allocated zeros at [20 MiB, 24 MiB), which lies in
// one of make_volume()'s holes.
void make_source(const std::string& path, std::uint64_t size, std::uint64_t seed) {
  ASSERT_GE(size, zero_run_at + zero_run);
  make_volume(path, size, seed);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0) << path;
  std::vector<char> zeros(zero_run);
  ASSERT_EQ(::pwrite(fd, zeros.data(), zeros.size(), static_cast<off_t>(zero_run_at)),
            static_cast<ssize_t>(zeros.size()));
  ::close(fd);
  ASSERT_GE(allocated(path), size / 4 + zero_run) << "the source has its allocated zeros";
}

std::size_t read_full(int fd, char* buf, std::size_t n, std::uint64_t at) {
  std::size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, buf + done, n - done, static_cast<off_t>(at + done));
    if (r <= 0) break;
    done += static_cast<std::size_t>(r);
  }
  return done;
}

// Whether the first `n` bytes of two files are equal (holes read as zeros);
// if not, where they first differ.
::testing::AssertionResult same_bytes(const std::string& a, const std::string& b, std::uint64_t n) {
  const int fa = ::open(a.c_str(), O_RDONLY | O_CLOEXEC);
  const int fb = ::open(b.c_str(), O_RDONLY | O_CLOEXEC);
  struct Close {
    int fd;
    ~Close() {
      if (fd >= 0) ::close(fd);
    }
  } ca{fa}, cb{fb};
  if (fa < 0) return ::testing::AssertionFailure() << "cannot open " << a;
  if (fb < 0) return ::testing::AssertionFailure() << "cannot open " << b;
  std::vector<char> ba(4 * MiB), bb(4 * MiB);
  for (std::uint64_t at = 0; at < n;) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(ba.size(), n - at));
    const std::size_t ra = read_full(fa, ba.data(), want, at);
    const std::size_t rb = read_full(fb, bb.data(), want, at);
    if (ra != want || rb != want)
      return ::testing::AssertionFailure() << (ra != want ? a : b) << " ends at " << at + std::min(ra, rb)
                                           << ", before " << n;
    if (std::memcmp(ba.data(), bb.data(), want) != 0) {
      std::size_t i = 0;
      while (ba[i] == bb[i]) ++i;
      return ::testing::AssertionFailure() << a << " and " << b << " differ at offset " << at + i << " (extent "
                                           << (at + i) / extent << ")";
    }
    at += want;
  }
  return ::testing::AssertionSuccess();
}

// Same size and same bytes.
::testing::AssertionResult same_file(const std::string& a, const std::string& b) {
  if (size_of(a) != size_of(b))
    return ::testing::AssertionFailure() << a << " is " << size_of(a) << " bytes, " << b << " " << size_of(b);
  return same_bytes(a, b, size_of(a));
}

// The line of `out` that starts with `prefix`, or "".
std::string line_starting(const std::string& out, const std::string& prefix) {
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);)
    if (line.rfind(prefix, 0) == 0) return line;
  return {};
}

// The text summary: "copied ...", then "verified: N extents ... volume digest HEX".
void expect_text_summary(const CliResult& r, std::uint64_t extents) {
  EXPECT_FALSE(line_starting(r.out, "copied ").empty()) << r.out;
  const std::string verified = line_starting(r.out, "verified: ");
  EXPECT_EQ(verified.rfind("verified: " + std::to_string(extents) + " extents", 0), 0u) << r.out;
  EXPECT_NE(verified.find("volume digest"), std::string::npos) << r.out;
}

std::uint64_t json_number(const std::string& json, const std::string& key) {
  const std::string v = json_field(json, key);
  if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos) {
    ADD_FAILURE() << "no number \"" << key << "\" in: " << json;
    return 0;
  }
  return std::stoull(v);
}

// The --json summary of a completed fresh copy of `size` bytes whose
// source has `source_allocated` bytes allocated.
void expect_json_summary(const CliResult& r, std::uint64_t size, std::uint64_t source_allocated) {
  EXPECT_EQ(json_field(r.out, "state"), "completed") << r.out;
  EXPECT_EQ(json_number(r.out, "total_bytes"), size) << r.out;
  EXPECT_EQ(json_number(r.out, "extents_total"), (size + extent - 1) / extent) << r.out;
  EXPECT_EQ(json_number(r.out, "skipped_bytes"), 0u) << r.out;
  const std::uint64_t data = json_number(r.out, "data_bytes");
  EXPECT_GT(data, 0u) << r.out;
  EXPECT_LE(data, source_allocated) << "only data crosses, holes do not: " << r.out;
  EXPECT_GT(json_number(r.out, "hole_bytes"), 0u) << r.out;
  EXPECT_TRUE(std::regex_match(json_field(r.out, "digest"), std::regex("[0-9a-f]{8,}"))) << r.out;
}

// A copy of `source` (the size `size`, `source` allocated) holds its holes:
// far less allocated than its size, and no more than the source.
void expect_sparse(const std::string& copy, const std::string& source, std::uint64_t size) {
  EXPECT_LT(allocated(copy), size / 2) << "holes arrive as holes: " << copy << " has " << allocated(copy)
                                       << " bytes allocated of " << size;
  EXPECT_LE(allocated(copy), allocated(source)) << copy << " allocates more than its source";
}

// ... and the extent of allocated zeros in the source arrived as a hole.
void expect_zeros_became_holes(const std::string& copy, const std::string& source) {
  EXPECT_LE(allocated(copy) + zero_run - MiB, allocated(source))
      << "all-zero chunks arrive as holes: the copy allocates " << allocated(copy) << " bytes, the source "
      << allocated(source) << " of which " << zero_run << " are an extent of zeros";
}

// Bytes in the extents of `path` (its first `size` bytes) that are all zeros.
std::uint64_t zero_extent_bytes(const std::string& path, std::uint64_t size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  std::vector<char> buf(extent);
  std::uint64_t zeros = 0;
  for (std::uint64_t at = 0; at < size; at += extent) {
    const std::size_t n = read_full(fd, buf.data(), static_cast<std::size_t>(std::min(extent, size - at)), at);
    if (std::all_of(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(n), [](char c) { return c == 0; }))
      zeros += n;
  }
  ::close(fd);
  return zeros;
}

// The size in a line like "resumed: 24.0 MiB was already ..." (the CLI's
// human_size: "%llu B" or "%.1f KiB", MiB, ...), in bytes; 0 if none.
std::uint64_t human_bytes(const std::string& line) {
  std::smatch m;
  if (!std::regex_search(line, m, std::regex(R"(([0-9]+(\.[0-9]+)?) (B|KiB|MiB|GiB|TiB)\b)"))) return 0;
  double scale = 1;
  for (const char* unit : {"KiB", "MiB", "GiB", "TiB"}) {
    if (m[3] == "B") break;
    scale *= 1024;
    if (m[3] == unit) break;
  }
  return static_cast<std::uint64_t>(std::stod(m[1]) * scale);
}

bool can_connect(const std::string& socket_path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path.c_str(), sizeof addr.sun_path - 1);
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

constexpr const char* nbdkit_path = "/usr/bin/nbdkit";
constexpr const char* qemu_nbd_path = "/usr/bin/qemu-nbd";

#define REQUIRE_PROGRAM(path)                                                   \
  do {                                                                          \
    if (::access(path, X_OK) != 0) GTEST_SKIP() << path << " is not installed"; \
  } while (0)

// An NBD server on a UNIX socket, killed (SIGKILL, then reaped) when the
// guard goes, whatever the test's assertions did.
class NbdServer {
 public:
  NbdServer(const std::vector<std::string>& argv, std::string socket)
      : socket_(std::move(socket)), process_(std::make_unique<ChildProcess>(argv)) {}
  // nbdkit's file plugin serving `file` (read-only unless `writable`).
  static std::unique_ptr<NbdServer> nbdkit(const std::string& socket, const std::string& file, bool writable) {
    std::vector<std::string> argv = {nbdkit_path, "--exit-with-parent", "-f", "-U", socket};
    if (!writable) argv.push_back("-r");
    argv.insert(argv.end(), {"file", "file=" + file});
    return std::make_unique<NbdServer>(argv, socket);
  }
  // qemu-nbd serving the raw `file`, persistent, several clients at once.
  static std::unique_ptr<NbdServer> qemu_nbd(const std::string& socket, const std::string& file) {
    return std::make_unique<NbdServer>(
        std::vector<std::string>{qemu_nbd_path, "-f", "raw", "-k", socket, "-t", "-e", "16", file}, socket);
  }
  ::testing::AssertionResult ready() {
    if (eventually([&] { return can_connect(socket_); }, 10s)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "the NBD server is not listening on " << socket_ << ":\n"
                                         << process_->output();
  }
  std::string uri() const { return "nbd+unix:///?socket=" + socket_; }
  std::string output() const { return process_->output(); }

 private:
  std::string socket_;
  std::unique_ptr<ChildProcess> process_;
};

// ---------------------------------------------------------------------------
// Local file -> volume, over the destination daemon's UNIX socket and TCP.

// Plain tests, not TEST_P, so that every name starts with CopyLocal.
void copies_a_sparse_file_into_a_volume(TransportKind transport) {
  TempDir files;
  FerrydProcess b;
  const std::uint64_t size = 128 * MiB;
  const std::string src = files.path() + "/disk.img";
  ASSERT_NO_FATAL_FAILURE(make_source(src, size, 7));

  // Text output.
  auto r = ferry_cli(b.unix_uri(), {"vol-copy", src, b.uri(transport) + "/default/v", "--extent-size", "4M",
                                    "--parallel", "4"});
  ASSERT_EQ(r.rc, 0) << r.out << "\ndestination log:\n" << b.log();
  expect_text_summary(r, size / extent);
  const std::string dst = b.pool_dir() + "/v";
  EXPECT_TRUE(same_file(dst, src));
  expect_sparse(dst, src, size);
  expect_zeros_became_holes(dst, src);
  EXPECT_FALSE(fs::exists(b.pool_dir() + "/.ferry-copy.v")) << "a finished copy leaves no copy state";
  r = ferry_cli(b.unix_uri(), {"--json", "vol-info", "v"});
  EXPECT_CLI(r, 0);
  EXPECT_EQ(json_field(r.out, "state"), "ready") << r.out;
  EXPECT_EQ(json_field(job_of(b.unix_uri(), "copy-in"), "state"), "completed") << job_of(b.unix_uri(), "copy-in");

  // --json, into a second volume.
  r = ferry_cli(b.unix_uri(), {"--json", "vol-copy", src, b.uri(transport) + "/default/w", "--extent-size", "4M"});
  ASSERT_EQ(r.rc, 0) << r.out << "\ndestination log:\n" << b.log();
  expect_json_summary(r, size, allocated(src));
  EXPECT_TRUE(same_file(b.pool_dir() + "/w", src));
  expect_sparse(b.pool_dir() + "/w", src, size);
  // The destination daemon verified the same digest.
  bool found = false;
  auto jobs = ferry_cli(b.unix_uri(), {"--json", "job-list"});
  std::istringstream in(jobs.out);
  for (std::string line; std::getline(in, line);)
    if (json_field(line, "kind") == "copy-in" && json_field(line, "digest") == json_field(r.out, "digest"))
      found = json_field(line, "state") == "completed";
  EXPECT_TRUE(found) << "no completed copy-in job with digest " << json_field(r.out, "digest") << ":\n" << jobs.out;
}

TEST(CopyLocalFileToVolume, OverUnix) { copies_a_sparse_file_into_a_volume(TransportKind::unix_socket); }
TEST(CopyLocalFileToVolume, OverTcp) { copies_a_sparse_file_into_a_volume(TransportKind::tcp); }
TEST(CopyLocalFileToVolume, OverGrpc) {
  FERRY_SKIP_GRPC_UNDER_TSAN();
  FerrydProcess::GrpcListeners grpc;
  copies_a_sparse_file_into_a_volume(TransportKind::grpc);
}

// ---------------------------------------------------------------------------
// Volume -> local file.

TEST(CopyLocalVolumeToFile, CopiesAVolumeIntoASparseFile) {
  TempDir files;
  FerrydProcess a;
  const std::uint64_t size = 128 * MiB;
  const std::string src = a.pool_dir() + "/v";
  ASSERT_NO_FATAL_FAILURE(make_source(src, size, 11));
  const std::string dst = files.path() + "/copy.img";

  // The source as POOL/NAME on the -c daemon.
  auto r = ferry_cli(a.unix_uri(), {"vol-copy", "default/v", dst, "--extent-size", "4M"});
  ASSERT_EQ(r.rc, 0) << r.out << "\nsource log:\n" << a.log();
  expect_text_summary(r, size / extent);
  EXPECT_TRUE(same_file(dst, src));
  expect_sparse(dst, src, size);
  EXPECT_FALSE(fs::exists(dst + ".ferry-copy")) << "a verified copy leaves no sidecar";

  // --json, as a full ferry+unix URI; then the file back into a volume:
  // both directions verify the same digest.
  const std::string dst2 = files.path() + "/copy2.img";
  r = ferry_cli(a.unix_uri(), {"--json", "vol-copy", a.unix_uri() + "/default/v", dst2, "--extent-size", "4M"});
  ASSERT_EQ(r.rc, 0) << r.out << "\nsource log:\n" << a.log();
  expect_json_summary(r, size, allocated(src));
  EXPECT_TRUE(same_file(dst2, src));
  expect_sparse(dst2, src, size);
  EXPECT_FALSE(fs::exists(dst2 + ".ferry-copy"));
  auto back = ferry_cli(a.unix_uri(), {"--json", "vol-copy", dst2, "default/back", "--extent-size", "4M"});
  ASSERT_EQ(back.rc, 0) << back.out;
  EXPECT_EQ(json_field(back.out, "digest"), json_field(r.out, "digest")) << "same data, same extents, same digest";
  EXPECT_TRUE(same_file(a.pool_dir() + "/back", src));
}

// ---------------------------------------------------------------------------
// NBD ends.

TEST(CopyLocalNbd, NbdkitSourceIntoAVolume) {
  REQUIRE_PROGRAM(nbdkit_path);
  TempDir files;
  FerrydProcess b;
  const std::uint64_t size = 128 * MiB;
  const std::string src = files.path() + "/disk.img";
  ASSERT_NO_FATAL_FAILURE(make_source(src, size, 13));
  auto server = NbdServer::nbdkit(files.path() + "/kit.sock", src, false);
  ASSERT_TRUE(server->ready());

  // The destination as POOL/NAME on the -c daemon; the destination commits without fdatasync.
  auto r = ferry_cli(b.unix_uri(), {"vol-copy", server->uri(), "default/v", "--extent-size", "4M", "--no-sync"});
  ASSERT_EQ(r.rc, 0) << r.out << "\nnbdkit:\n" << server->output() << "\ndestination log:\n" << b.log();
  expect_text_summary(r, size / extent);
  const std::string dst = b.pool_dir() + "/v";
  EXPECT_EQ(size_of(dst), size) << "the volume has the export's size";
  EXPECT_TRUE(same_file(dst, src));
  expect_sparse(dst, src, size);
  expect_zeros_became_holes(dst, src);
  EXPECT_FALSE(fs::exists(b.pool_dir() + "/.ferry-copy.v"));
}

TEST(CopyLocalNbd, VolumeIntoAQemuNbdExport) {
  REQUIRE_PROGRAM(qemu_nbd_path);
  TempDir files;
  FerrydProcess a;
  const std::uint64_t size = 64 * MiB;
  const std::string src = a.pool_dir() + "/v";
  ASSERT_NO_FATAL_FAILURE(make_source(src, size, 17));
  // A larger target, full of other data: the volume's holes must land as zeros.
  const std::string target = files.path() + "/target.img";
  make_file(target, size + 8 * MiB, {{0, size + 8 * MiB}}, 99);
  ASSERT_FALSE(same_bytes(target, src, size));
  auto server = NbdServer::qemu_nbd(files.path() + "/qemu.sock", target);
  ASSERT_TRUE(server->ready());

  auto r = ferry_cli(a.unix_uri(), {"vol-copy", a.tcp_uri() + "/default/v", server->uri(), "--extent-size", "4M"});
  ASSERT_EQ(r.rc, 0) << r.out << "\nqemu-nbd:\n" << server->output() << "\nsource log:\n" << a.log();
  expect_text_summary(r, size / extent);
  EXPECT_TRUE(same_bytes(target, src, size)) << "the export's first " << size << " bytes are the volume";
  EXPECT_EQ(size_of(target), size + 8 * MiB) << "the export keeps its size";
}

TEST(CopyLocalNbd, ExportSmallerThanTheVolumeIsRefused) {
  REQUIRE_PROGRAM(nbdkit_path);
  TempDir files;
  FerrydProcess a;
  const std::uint64_t size = 64 * MiB;
  ASSERT_NO_FATAL_FAILURE(make_source(a.pool_dir() + "/v", size, 19));
  const std::string target = files.path() + "/small.img";
  make_file(target, 60 * MiB, {{0, 60 * MiB}}, 98);
  const std::uint64_t before = file_hash(target);
  auto server = NbdServer::nbdkit(files.path() + "/kit.sock", target, true);
  ASSERT_TRUE(server->ready());

  auto r = ferry_cli(a.unix_uri(), {"vol-copy", "default/v", server->uri(), "--extent-size", "4M"});
  EXPECT_NE(r.rc, 0) << r.out;
  auto mentions = [&](std::initializer_list<const char*> forms) {
    for (const char* f : forms)
      if (r.out.find(f) != std::string::npos) return true;
    return false;
  };
  const bool names_volume = mentions({"67108864", "64.0 MiB", "64 MiB", "64M"});
  const bool names_export = mentions({"62914560", "60.0 MiB", "60 MiB", "60M"});
  EXPECT_TRUE(names_volume && names_export) << "the message gives both sizes:\n" << r.out;
  EXPECT_EQ(file_hash(target), before) << "a refused copy wrote to the export";
}

// ---------------------------------------------------------------------------
// Ctrl-C in the middle, then --resume.

TEST(CopyLocalResume, CtrlCOnFileToVolumeThenResume) {
  TempDir files;
  FerrydProcess b;
  const std::uint64_t size = 128 * MiB;
  const std::string src = files.path() + "/disk.img";
  ASSERT_NO_FATAL_FAILURE(make_source(src, size, 23));
  const std::string dst_uri = b.unix_uri() + "/default/v";
  ChildProcess cli({ferry_cli_path(), "-c", b.unix_uri(), "--progress", "none", "vol-copy", src, dst_uri,
                    "--extent-size", "4M", "--bandwidth", "4M", "--parallel", "2"});
  ASSERT_TRUE(eventually([&] { return committed_extents(b.pool_dir(), "v") >= 4; }))
      << cli.output() << "\ndestination log:\n" << b.log();
  const std::string job = job_of(b.unix_uri(), "copy-in");
  ASSERT_EQ(json_field(job, "state"), "running") << "the destination runs a copy-in job: " << job;

  cli.signal(SIGINT);
  const int rc = cli.wait(15s);
  EXPECT_NE(rc, -1) << "the CLI is still running 15 s after Ctrl-C:\n" << cli.output();
  EXPECT_NE(rc, 0) << cli.output();
  EXPECT_TRUE(eventually([&] { return json_field(job_of(b.unix_uri(), "copy-in"), "state") != "running"; }, 5s))
      << "the destination still runs the copy-in job: " << job_of(b.unix_uri(), "copy-in");
  auto r = ferry_cli(b.unix_uri(), {"--json", "vol-info", "v"});
  EXPECT_CLI(r, 0);
  EXPECT_EQ(json_field(r.out, "state"), "incomplete") << r.out;
  const std::size_t committed = committed_extents(b.pool_dir(), "v");
  EXPECT_GE(committed, 4u);
  EXPECT_LT(committed, size / extent) << "the copy was interrupted before its end";

  // Resumed in text mode: "resumed: N MiB was already at the destination ...".
  r = ferry_cli(b.unix_uri(), {"vol-copy", src, dst_uri, "--extent-size", "4M", "--resume"});
  ASSERT_EQ(r.rc, 0) << r.out << "\ndestination log:\n" << b.log();
  expect_text_summary(r, size / extent);
  const std::string resumed = line_starting(r.out, "resumed: ");
  const std::uint64_t skipped = human_bytes(resumed);
  EXPECT_GT(skipped, 0u) << "work was skipped, and said so:\n" << r.out;
  EXPECT_GE(skipped, committed * extent) << "committed extents were sent again:\n" << r.out;
  std::printf("file -> volume, Ctrl-C: %zu of %llu extents committed; %s\n", committed,
              static_cast<unsigned long long>(size / extent), resumed.c_str());
  // The destination's job for the resumed copy counts the same.
  bool found = false;
  auto jobs = ferry_cli(b.unix_uri(), {"--json", "job-list"});
  std::istringstream in(jobs.out);
  for (std::string line; std::getline(in, line);)
    if (json_field(line, "kind") == "copy-in" && json_field(line, "state") == "completed")
      found = json_number(line, "skipped_bytes") >= committed * extent;
  EXPECT_TRUE(found) << "no completed copy-in job that skipped the committed extents:\n" << jobs.out;
  EXPECT_TRUE(same_file(b.pool_dir() + "/v", src));
  expect_sparse(b.pool_dir() + "/v", src, size);
  EXPECT_FALSE(fs::exists(b.pool_dir() + "/.ferry-copy.v"));
  r = ferry_cli(b.unix_uri(), {"--json", "vol-info", "v"});
  EXPECT_EQ(json_field(r.out, "state"), "ready") << r.out;
}

TEST(CopyLocalResume, CtrlCOnVolumeToFileThenResume) {
  TempDir files;
  FerrydProcess a;
  const std::uint64_t size = 128 * MiB;
  const std::string src = a.pool_dir() + "/v";
  ASSERT_NO_FATAL_FAILURE(make_source(src, size, 29));
  const std::string dst = files.path() + "/copy.img";
  const std::string sidecar = dst + ".ferry-copy";
  ChildProcess cli({ferry_cli_path(), "-c", a.unix_uri(), "--progress", "none", "vol-copy", "default/v", dst,
                    "--extent-size", "4M", "--bandwidth", "4M", "--parallel", "2"});
  // Some extents' data written (about 3 s at 4 MB/s).
  ASSERT_TRUE(eventually([&] { return fs::exists(dst) && allocated(dst) >= 12 * MiB; }))
      << cli.output() << "\nsource log:\n" << a.log();
  EXPECT_EQ(size_of(dst), size) << "the file is created with the volume's size";
  EXPECT_TRUE(fs::exists(sidecar)) << "an unfinished copy has its sidecar";

  cli.signal(SIGINT);
  const int rc = cli.wait(15s);
  EXPECT_NE(rc, -1) << "the CLI is still running 15 s after Ctrl-C:\n" << cli.output();
  EXPECT_NE(rc, 0) << cli.output();
  EXPECT_TRUE(fs::exists(sidecar)) << "an interrupted copy keeps its sidecar:\n" << cli.output();
  ASSERT_TRUE(fs::exists(dst));
  EXPECT_FALSE(same_bytes(dst, src, size)) << "the copy was interrupted before its end";
  const std::uint64_t written = allocated(dst);

  // A plain copy does not clobber the partial file.
  const std::uint64_t partial = file_hash(dst);
  auto r = ferry_cli(a.unix_uri(), {"vol-copy", "default/v", dst, "--extent-size", "4M"});
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_EQ(file_hash(dst), partial);

  r = ferry_cli(a.unix_uri(), {"--json", "vol-copy", "default/v", dst, "--extent-size", "4M", "--resume"});
  ASSERT_EQ(r.rc, 0) << r.out << "\nsource log:\n" << a.log();
  EXPECT_EQ(json_field(r.out, "state"), "completed") << r.out;
  EXPECT_EQ(json_number(r.out, "total_bytes"), size) << r.out;
  const std::uint64_t skipped = json_number(r.out, "skipped_bytes");
  EXPECT_GT(skipped, 0u) << r.out;
  // Extents that are all zeros in the volume match the fresh file's holes
  // anyway; the resume must also keep data written before Ctrl-C.
  const std::uint64_t zero_extents = zero_extent_bytes(src, size);
  EXPECT_GT(skipped, zero_extents) << "only the volume's all-zero extents (" << zero_extents
                                   << " bytes) were kept, none of the data written before Ctrl-C:\n"
                                   << r.out;
  std::printf("volume -> file, Ctrl-C after %llu bytes allocated; resume skipped %llu bytes (%llu in all-zero "
              "extents)\n",
              static_cast<unsigned long long>(written), static_cast<unsigned long long>(skipped),
              static_cast<unsigned long long>(zero_extents));
  EXPECT_FALSE(fs::exists(sidecar)) << "the verified copy's sidecar is gone";
  EXPECT_TRUE(same_file(dst, src));
  expect_sparse(dst, src, size);
}

// ---------------------------------------------------------------------------
// The rules.

TEST(CopyLocalRules, BothEndsLocalAreRefused) {
  TempDir files;
  FerrydProcess a;
  const std::string src = files.path() + "/src.img";
  make_file(src, 8 * MiB, {{0, MiB}}, 1);
  const std::string dst = files.path() + "/dst.img";
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {src, dst},
      {"file:" + src, "nbd+unix:///?socket=" + files.path() + "/none.sock"},
      {"nbd://127.0.0.1:9", "file:" + dst},
      {"nbds+unix:///?socket=" + files.path() + "/none.sock", dst},
  };
  for (const auto& [s, d] : pairs) {
    auto r = ferry_cli(a.unix_uri(), {"vol-copy", s, d});
    EXPECT_NE(r.rc, 0) << s << " -> " << d << ":\n" << r.out;
    EXPECT_NE(r.out.find("a volume on a ferryd"), std::string::npos) << s << " -> " << d << ":\n" << r.out;
  }
  EXPECT_FALSE(fs::exists(dst)) << "a refused copy created its destination";
}

TEST(CopyLocalRules, MissingSourceFileIsNamed) {
  TempDir files;
  FerrydProcess b;
  const std::string missing = files.path() + "/no-such.img";
  auto r = ferry_cli(b.unix_uri(), {"vol-copy", missing, "default/v"});
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find(missing), std::string::npos) << "the message names the path:\n" << r.out;
  EXPECT_FALSE(fs::exists(b.pool_dir() + "/v")) << "no volume made from a missing file";
  EXPECT_CLI(ferry_cli(b.unix_uri(), {"ping", "-n", "1"}), 0);
}

TEST(CopyLocalRules, ExistingFileIsRefusedUnlessOverwritten) {
  TempDir files;
  FerrydProcess a;
  ASSERT_NO_FATAL_FAILURE(make_source(a.pool_dir() + "/v", 32 * MiB, 3));
  const std::string dst = files.path() + "/existing.img";
  make_file(dst, 8 * MiB, {{0, 8 * MiB}}, 4);
  const std::uint64_t before = file_hash(dst);

  auto r = ferry_cli(a.unix_uri(), {"vol-copy", "default/v", dst, "--extent-size", "4M"});
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_EQ(file_hash(dst), before) << "a refused copy wrote";
  EXPECT_EQ(size_of(dst), 8 * MiB);

  r = ferry_cli(a.unix_uri(), {"vol-copy", "default/v", dst, "--extent-size", "4M", "--overwrite"});
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_TRUE(same_file(dst, a.pool_dir() + "/v"));
  expect_sparse(dst, a.pool_dir() + "/v", 32 * MiB);
  EXPECT_FALSE(fs::exists(dst + ".ferry-copy"));
}

TEST(CopyLocalRules, ExistingVolumeIsRefusedUnlessOverwritten) {
  TempDir files;
  FerrydProcess b;
  const std::string src = files.path() + "/disk.img";
  ASSERT_NO_FATAL_FAILURE(make_source(src, 32 * MiB, 5));
  make_file(b.pool_dir() + "/v", 8 * MiB, {{0, 8 * MiB}}, 6);
  const std::uint64_t before = file_hash(b.pool_dir() + "/v");

  auto r = ferry_cli(b.unix_uri(), {"vol-copy", src, "default/v", "--extent-size", "4M"});
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("--overwrite"), std::string::npos) << r.out;
  EXPECT_EQ(file_hash(b.pool_dir() + "/v"), before) << "a refused copy wrote";
  EXPECT_EQ(size_of(b.pool_dir() + "/v"), 8 * MiB);

  r = ferry_cli(b.unix_uri(), {"vol-copy", src, "default/v", "--extent-size", "4M", "--overwrite"});
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_TRUE(same_file(b.pool_dir() + "/v", src));
  expect_sparse(b.pool_dir() + "/v", src, 32 * MiB);
}

// file:PATH, ./PATH and ../PATH are local files too (the relative ones from
// the CLI's working directory).
TEST(CopyLocalRules, FileColonAndRelativePathsAreLocalFiles) {
  TempDir files;
  FerrydProcess b;
  const std::string src = files.path() + "/disk.img";
  ASSERT_NO_FATAL_FAILURE(make_source(src, 32 * MiB, 8));
  fs::create_directories(files.path() + "/sub");
  auto in_dir = [&](const std::string& dir, const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"/bin/sh", "-c", "cd \"$0\" && exec \"$@\"", dir,
                                     ferry_cli_path(), "-c", b.unix_uri(), "--progress", "none"};
    argv.insert(argv.end(), args.begin(), args.end());
    CliResult r;
    r.rc = run_command(argv, &r.out);
    return r;
  };

  auto r = ferry_cli(b.unix_uri(), {"vol-copy", "file:" + src, "default/a"});
  EXPECT_CLI(r, 0);
  EXPECT_TRUE(same_file(b.pool_dir() + "/a", src));

  r = in_dir(files.path(), {"vol-copy", "./disk.img", "default/b"});
  EXPECT_CLI(r, 0);
  EXPECT_TRUE(same_file(b.pool_dir() + "/b", src));

  r = in_dir(files.path() + "/sub", {"vol-copy", "../disk.img", "default/c"});
  EXPECT_CLI(r, 0);
  EXPECT_TRUE(same_file(b.pool_dir() + "/c", src));

  // And the other way, into a relative path.
  r = in_dir(files.path() + "/sub", {"vol-copy", "default/a", "./back.img"});
  EXPECT_CLI(r, 0);
  EXPECT_TRUE(same_file(files.path() + "/sub/back.img", src));
}

}  // namespace
}  // namespace ferry::testing
