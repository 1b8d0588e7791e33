// NBD export backends: the sparse memory disk, the null sink, the delay
// filter (timers, not threads), and the remote backend over libnbd against
// a real nbdkit.
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "nbd/delay_backend.h"
#include "nbd/memory_backend.h"
#include "nbd/remote_backend.h"
#include "rpc/error.h"
#include "rpc/io_threads.h"

namespace ferry::nbd {
namespace {

using namespace std::chrono_literals;
constexpr std::uint32_t hole = state_hole | state_zero;

// Runs `op` on `ex` and waits for it on this thread.
template <class T>
T run_on(const asio::any_io_executor& ex, asio::awaitable<T> op) {
  return asio::co_spawn(ex, std::move(op), asio::use_future).get();
}

// Runs `op` on a private io_context on this thread.
template <class T>
T run_here(asio::awaitable<T> op) {
  asio::io_context ctx;
  auto f = asio::co_spawn(ctx, std::move(op), asio::use_future);
  ctx.run();
  return f.get();
}

std::vector<std::uint8_t> pattern(std::size_t n, unsigned seed) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>((i * 131 + seed * 17 + 1) % 251 + 1);
  return v;
}

template <class F>
Error error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "expected a ferry::Error";
  return Error(Code::ok, "");
}

std::uint64_t total(const std::vector<Extent>& v) {
  std::uint64_t n = 0;
  for (const auto& e : v) n += e.length;
  return n;
}

int thread_count() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("Threads:", 0) == 0) return std::atoi(line.c_str() + 8);
  return -1;
}

// ---------------------------------------------------------------------------
// MemoryBackend

constexpr std::uint32_t kPage = 64u << 10;

TEST(MemoryBackendTest, WritesAndReadsBackAcrossPageBoundaries) {
  MemoryBackend m(16 * kPage);
  const auto data = pattern(3 * kPage + 1000, 1);
  const std::uint64_t at = kPage - 500;
  run_here([&]() -> asio::awaitable<void> {
    co_await m.write(data, at, false);
    std::vector<std::uint8_t> back(data.size());
    co_await m.read(back, at, nullptr);
    EXPECT_EQ(back, data);
    // A read wider than the write sees zeros around it.
    std::vector<std::uint8_t> wide(data.size() + 2000, 0xee);
    co_await m.read(wide, at - 1000, nullptr);
    EXPECT_TRUE(std::all_of(wide.begin(), wide.begin() + 1000, [](std::uint8_t b) { return b == 0; }));
    EXPECT_TRUE(std::equal(data.begin(), data.end(), wide.begin() + 1000));
    EXPECT_TRUE(std::all_of(wide.end() - 1000, wide.end(), [](std::uint8_t b) { return b == 0; }));
  }());
  // Pages 0..4 are touched by the write.
  EXPECT_EQ(m.allocated_bytes(), 5u * kPage);
}

TEST(MemoryBackendTest, UnwrittenPagesReadAsZerosAndMapAsHoles) {
  MemoryBackend m(8 * kPage);
  const auto data = pattern(kPage, 2);
  run_here([&]() -> asio::awaitable<void> {
    co_await m.write(data, 2 * kPage, false);
    std::vector<std::uint8_t> buf(4 * kPage, 0xaa);
    co_await m.read(buf, kPage, nullptr);
    EXPECT_TRUE(std::all_of(buf.begin(), buf.begin() + kPage, [](std::uint8_t b) { return b == 0; }));
    EXPECT_TRUE(std::equal(data.begin(), data.end(), buf.begin() + kPage));

    std::vector<Extent> map;
    std::fill(buf.begin(), buf.end(), 0xaa);
    co_await m.read(buf, kPage, &map);
    EXPECT_EQ(map, (std::vector<Extent>{{kPage, hole}, {kPage, 0}, {2 * kPage, hole}}));
    EXPECT_TRUE(std::equal(data.begin(), data.end(), buf.begin() + kPage)) << "data under the map is read";
    EXPECT_TRUE(std::all_of(buf.begin() + 2 * kPage, buf.end(), [](std::uint8_t b) { return b == 0; }))
        << "holes are zeroed even with a map";

    // All data: the map stays empty.
    std::vector<std::uint8_t> one(100);
    map.assign(3, Extent{1, 1});
    co_await m.read(one, 2 * kPage + 10, &map);
    EXPECT_TRUE(map.empty());
    EXPECT_TRUE(std::equal(one.begin(), one.end(), data.begin() + 10));
  }());
}

TEST(MemoryBackendTest, WritingZerosAllocatesNothing) {
  MemoryBackend m(8 * kPage);
  std::vector<std::uint8_t> zeros(3 * kPage);
  run_here(m.write(zeros, 0, false));
  EXPECT_EQ(m.allocated_bytes(), 0u);
  // ...but zeros written into an allocated page land there.
  const auto data = pattern(kPage, 3);
  run_here(m.write(data, 0, false));
  std::vector<std::uint8_t> some_zeros(100);
  run_here(m.write(some_zeros, 50, false));
  std::vector<std::uint8_t> back(kPage);
  run_here(m.read(back, 0, nullptr));
  EXPECT_TRUE(std::all_of(back.begin() + 50, back.begin() + 150, [](std::uint8_t b) { return b == 0; }));
  EXPECT_EQ(back[49], data[49]);
  EXPECT_EQ(back[150], data[150]);
  EXPECT_EQ(m.allocated_bytes(), kPage);
}

TEST(MemoryBackendTest, ExtentsMergeDataAndHoles) {
  MemoryBackend m(16 * kPage);
  const auto data = pattern(kPage, 4);
  run_here([&]() -> asio::awaitable<void> {
    co_await m.write(data, 2 * kPage, false);
    co_await m.write(data, 3 * kPage, false);
    co_await m.write(data, 7 * kPage + 5, false);  // pages 7 and 8
    auto all = co_await m.extents(0, 16 * kPage);
    EXPECT_EQ(all, (std::vector<Extent>{{2 * kPage, hole}, {2 * kPage, 0}, {3 * kPage, hole}, {2 * kPage, 0},
                                        {7 * kPage, hole}}));
    // Starts exactly at offset, ends at offset + length.
    auto part = co_await m.extents(kPage + 100, 2 * kPage);
    EXPECT_EQ(part, (std::vector<Extent>{{kPage - 100, hole}, {kPage + 100, 0}}));
    auto inside = co_await m.extents(2 * kPage + 7, 10);
    EXPECT_EQ(inside, (std::vector<Extent>{{10, 0}}));
  }());
}

TEST(MemoryBackendTest, TrimFreesWholePagesAndZeroesPartialOnes) {
  MemoryBackend m(8 * kPage);
  const auto data = pattern(4 * kPage, 5);
  run_here([&]() -> asio::awaitable<void> {
    co_await m.write(data, 0, false);
    EXPECT_EQ(m.allocated_bytes(), 4u * kPage);
    // From the middle of page 0 to the middle of page 3: pages 1 and 2 go.
    co_await m.trim(kPage / 2, 3 * kPage, false);
    EXPECT_EQ(m.allocated_bytes(), 2u * kPage);
    std::vector<std::uint8_t> back(4 * kPage);
    co_await m.read(back, 0, nullptr);
    EXPECT_TRUE(std::equal(data.begin(), data.begin() + kPage / 2, back.begin()));
    EXPECT_TRUE(std::all_of(back.begin() + kPage / 2, back.begin() + 3 * kPage + kPage / 2,
                            [](std::uint8_t b) { return b == 0; }));
    EXPECT_TRUE(std::equal(data.begin() + 3 * kPage + kPage / 2, data.end(), back.begin() + 3 * kPage + kPage / 2));
    auto e = co_await m.extents(0, 8 * kPage);
    EXPECT_EQ(e, (std::vector<Extent>{{kPage, 0}, {2 * kPage, hole}, {kPage, 0}, {4 * kPage, hole}}));
  }());
}

TEST(MemoryBackendTest, ZeroWithMayTrimFreesAndWithoutAllocates) {
  MemoryBackend m(8 * kPage);
  const auto data = pattern(2 * kPage, 6);
  run_here([&]() -> asio::awaitable<void> {
    co_await m.write(data, 0, false);
    co_await m.zero(0, 2 * kPage, ZeroFlags{.may_trim = true});
    EXPECT_EQ(m.allocated_bytes(), 0u);

    // NO_HOLE: the range is allocated (and reads zero), holes included.
    co_await m.write(data, 0, false);
    co_await m.zero(kPage / 2, 3 * kPage, ZeroFlags{.may_trim = false});
    EXPECT_EQ(m.allocated_bytes(), 4u * kPage);
    std::vector<std::uint8_t> back(4 * kPage);
    co_await m.read(back, 0, nullptr);
    EXPECT_TRUE(std::equal(data.begin(), data.begin() + kPage / 2, back.begin()));
    EXPECT_TRUE(std::all_of(back.begin() + kPage / 2, back.begin() + 3 * kPage + kPage / 2,
                            [](std::uint8_t b) { return b == 0; }));
    auto e = co_await m.extents(0, 8 * kPage);
    EXPECT_EQ(e, (std::vector<Extent>{{4 * kPage, 0}, {4 * kPage, hole}}));
  }());
}

TEST(MemoryBackendTest, LastPartialPageCountsOnlyItsBytes) {
  MemoryBackend m(kPage + 100);
  std::vector<std::uint8_t> one(1, 7);
  run_here(m.write(one, kPage + 99, false));
  EXPECT_EQ(m.allocated_bytes(), 100u);
  auto e = run_here(m.extents(0, kPage + 100));
  EXPECT_EQ(e, (std::vector<Extent>{{kPage, hole}, {100, 0}}));
  run_here(m.trim(kPage, 100, false));
  EXPECT_EQ(m.allocated_bytes(), 0u);
}

TEST(MemoryBackendTest, SmallPagesAndCapabilities) {
  MemoryBackend m(1 << 20, MemoryOptions{.read_only = false, .page = 4096});
  std::vector<std::uint8_t> data = pattern(10, 9);
  run_here(m.write(data, 5000, false));
  EXPECT_EQ(m.allocated_bytes(), 4096u);
  EXPECT_FALSE(m.capabilities().read_only);
  EXPECT_TRUE(m.capabilities().can_extents);
  EXPECT_EQ(m.description(), "memory 1 MiB");
  MemoryBackend ro(3ull << 30, MemoryOptions{.read_only = true});
  EXPECT_TRUE(ro.capabilities().read_only);
  EXPECT_EQ(ro.description(), "memory 3 GiB (read-only)");
  const Error e = error_of([&] { run_here(ro.write(data, 0, false)); });
  EXPECT_EQ(e.os_errno(), EPERM);
  EXPECT_EQ(error_of([] { MemoryBackend bad(1 << 20, MemoryOptions{.page = 1000}); }).code(), Code::invalid_argument);
}

TEST(MemoryBackendTest, ConcurrentWritersOnFourThreadsInterleavedInPages) {
  // Four threads write interleaved 4 KiB blocks, so every page is shared by
  // all of them and most pages are created by whichever comes first.
  constexpr std::uint64_t pages = 64;
  constexpr std::uint32_t block = 4096;
  MemoryBackend m(pages * kPage);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 4; ++t) {
    threads.emplace_back([&m, t] {
      asio::io_context ctx;
      asio::co_spawn(
          ctx,
          [&m, t]() -> asio::awaitable<void> {
            for (std::uint64_t off = t * block; off < pages * kPage; off += 4 * block) {
              std::vector<std::uint8_t> data(block, static_cast<std::uint8_t>(t + 1));
              data[0] = static_cast<std::uint8_t>(off / block);
              co_await m.write(data, off, false);
              std::vector<std::uint8_t> back(block);
              co_await m.read(back, off, nullptr);
              EXPECT_EQ(back, data);
            }
          },
          asio::detached);
      ctx.run();
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(m.allocated_bytes(), pages * kPage);
  std::vector<std::uint8_t> all(pages * kPage);
  run_here(m.read(all, 0, nullptr));
  for (std::uint64_t off = 0; off < all.size(); off += block) {
    const auto t = static_cast<std::uint8_t>((off / block) % 4 + 1);
    ASSERT_EQ(all[off], static_cast<std::uint8_t>(off / block)) << off;
    ASSERT_EQ(all[off + 1], t) << off;
    ASSERT_EQ(all[off + block - 1], t) << off;
  }
  auto e = run_here(m.extents(0, pages * kPage));
  EXPECT_EQ(e, (std::vector<Extent>{{pages * kPage, 0}}));
}

TEST(MemoryBackendTest, ConcurrentWritesAndTrimsKeepTheTableConsistent) {
  MemoryBackend m(32 * kPage);
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::uint8_t> data = pattern(kPage + 333, t);
      std::vector<std::uint8_t> back(kPage);
      std::vector<Extent> map;
      for (unsigned i = 0; i < 2000 && !stop; ++i) {
        const std::uint64_t off = ((i * 7 + t * 5) % 30) * kPage + (i % 3) * 1000;
        switch ((i + t) % 4) {
          case 0: m.write_sync(data, off); break;
          case 1: m.discard_sync(off, kPage + 7, false); break;
          case 2: m.discard_sync(off, 2 * kPage, true); break;
          case 3: m.read_sync(back, off, &map); break;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  // The counter matches the table.
  const auto e = m.extents_sync(0, 32 * kPage);
  std::uint64_t data_bytes = 0;
  for (const auto& x : e)
    if (x.flags == 0) data_bytes += x.length;
  EXPECT_EQ(data_bytes, m.allocated_bytes());
  EXPECT_EQ(total(e), 32u * kPage);
}

// ---------------------------------------------------------------------------
// NullBackend

TEST(NullBackendTest, ReadsZerosDiscardsWritesAndIsOneHole) {
  NullBackend n(1ull << 30);
  EXPECT_EQ(n.size(), 1ull << 30);
  EXPECT_EQ(n.description(), "null 1 GiB");
  run_here([&]() -> asio::awaitable<void> {
    std::vector<std::uint8_t> data = pattern(4096, 1);
    co_await n.write(data, 4096, true);
    co_await n.flush();
    co_await n.trim(0, 1 << 20, false);
    co_await n.zero(0, 1 << 20, ZeroFlags{});
    std::vector<std::uint8_t> back(4096, 0xff);
    co_await n.read(back, 4096, nullptr);
    EXPECT_TRUE(std::all_of(back.begin(), back.end(), [](std::uint8_t b) { return b == 0; }));
    std::vector<Extent> map;
    std::fill(back.begin(), back.end(), 0xff);
    co_await n.read(back, 4096, &map);
    EXPECT_EQ(map, (std::vector<Extent>{{4096, hole}}));
    EXPECT_TRUE(std::all_of(back.begin(), back.end(), [](std::uint8_t b) { return b == 0; }));
    auto e = co_await n.extents(100, 1 << 20);
    EXPECT_EQ(e, (std::vector<Extent>{{1 << 20, hole}}));
  }());
}

// ---------------------------------------------------------------------------
// DelayBackend

TEST(DelayBackendTest, ParsesDelays) {
  EXPECT_EQ(parse_delay("64ms"), 64ms);
  EXPECT_EQ(parse_delay("1s"), 1s);
  EXPECT_EQ(parse_delay("250us"), 250us);
  EXPECT_EQ(parse_delay("0"), 0ns);
  EXPECT_EQ(parse_delay("100ns"), 100ns);
  EXPECT_EQ(parse_delay("1.5s"), 1500ms);
  EXPECT_EQ(parse_delay("0.25ms"), 250us);
  EXPECT_EQ(parse_delay(" 64 ms "), 64ms);
  EXPECT_EQ(parse_delay("2"), 2s) << "a bare number is seconds";
  EXPECT_EQ(parse_delay("1min"), 60s);
  for (const char* bad : {"", "ms", "abc", "-1ms", "5parsecs", "1e3", "1..5s", "99999999999999999999s"}) {
    EXPECT_EQ(error_of([&] { parse_delay(bad); }).code(), Code::invalid_argument) << bad;
  }
  EXPECT_EQ(format_delay(64ms), "64 ms");
  EXPECT_EQ(format_delay(1s), "1 s");
  EXPECT_EQ(format_delay(1500ms), "1.5 s");
  EXPECT_EQ(format_delay(250us), "250 us");
  EXPECT_EQ(format_delay(0ns), "0");
}

TEST(DelayBackendTest, DescribesItselfAndForwards) {
  auto inner = std::make_shared<MemoryBackend>(1ull << 30);
  DelayBackend d(inner, DelayOptions::all(64ms));
  EXPECT_EQ(d.description(), "delay 64 ms over memory 1 GiB");
  EXPECT_EQ(d.size(), inner->size());
  EXPECT_EQ(d.capabilities().can_extents, inner->capabilities().can_extents);
  DelayOptions mixed;
  mixed.read = 10ms;
  mixed.write = 64ms;
  EXPECT_EQ(DelayBackend(inner, mixed).description(), "delay read 10 ms, write 64 ms over memory 1 GiB");

  DelayBackend fast(inner, DelayOptions::all(1ms));
  run_here([&]() -> asio::awaitable<void> {
    const auto data = pattern(kPage, 3);
    co_await fast.write(data, kPage, false);
    std::vector<std::uint8_t> back(2 * kPage);
    std::vector<Extent> map;
    co_await fast.read(back, 0, &map);
    EXPECT_EQ(map, (std::vector<Extent>{{kPage, hole}, {kPage, 0}}));
    EXPECT_TRUE(std::equal(data.begin(), data.end(), back.begin() + kPage));
    auto e = co_await fast.extents(0, 2 * kPage);
    EXPECT_EQ(e, map);
    co_await fast.trim(kPage, kPage, false);
    co_await fast.zero(0, kPage, ZeroFlags{});
    co_await fast.flush();
    co_await fast.cache(0, kPage);
  }());
  EXPECT_EQ(inner->allocated_bytes(), 0u);
}

TEST(DelayBackendTest, ThousandConcurrentDelayedWritesOnOneThreadTakeOneDelay) {
  auto inner = std::make_shared<MemoryBackend>(1ull << 30);
  DelayOptions o;
  o.write = 64ms;
  DelayBackend d(inner, o);
  constexpr unsigned n = 1024;
  const auto data = pattern(4096, 7);
  const int threads_before = thread_count();
  int threads_during = 0;

  asio::io_context ctx(1);
  unsigned done = 0;
  unsigned failed = 0;
  const auto start = std::chrono::steady_clock::now();
  for (unsigned i = 0; i < n; ++i) {
    const std::span<const std::uint8_t> bytes(data);
    asio::co_spawn(ctx, d.write(bytes, std::uint64_t{i} * 4096, false), [&](std::exception_ptr e) {
      if (e) ++failed;
      if (++done == 1) threads_during = thread_count();
    });
  }
  ctx.run();
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(done, n);
  EXPECT_EQ(failed, 0u);
  EXPECT_GE(elapsed, 64ms);
  EXPECT_LT(elapsed, 1s) << "the writes waited one after another";
  EXPECT_EQ(threads_during, threads_before) << "waiting took threads";
  EXPECT_EQ(thread_count(), threads_before);
  EXPECT_EQ(inner->allocated_bytes(), std::uint64_t{n} * 4096 / kPage * kPage);
}

TEST(DelayBackendTest, EachOperationWaitsItsOwnDelay) {
  auto inner = std::make_shared<MemoryBackend>(1 << 20);
  DelayOptions o;
  o.write = 80ms;
  DelayBackend d(inner, o);
  run_here([&]() -> asio::awaitable<void> {
    std::vector<std::uint8_t> buf(4096, 1);
    auto t0 = std::chrono::steady_clock::now();
    co_await d.read(buf, 0, nullptr);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 50ms) << "reads have no delay";
    t0 = std::chrono::steady_clock::now();
    co_await d.write(buf, 0, false);
    EXPECT_GE(std::chrono::steady_clock::now() - t0, 80ms);
  }());
}

// ---------------------------------------------------------------------------
// RemoteBackend against nbdkit

std::string find_nbdkit() {
  for (const char* p : {"/usr/sbin/nbdkit", "/usr/bin/nbdkit", "/usr/local/sbin/nbdkit", "/usr/local/bin/nbdkit"})
    if (::access(p, X_OK) == 0) return p;
  return {};
}

std::string find_qemu_nbd() {
  for (const char* p : {"/usr/bin/qemu-nbd", "/usr/local/bin/qemu-nbd"})
    if (::access(p, X_OK) == 0) return p;
  return {};
}

// An NBD server (nbdkit, or qemu-nbd) serving on a UNIX socket in a private
// directory, in the foreground, for as long as this object lives. It gets
// SIGKILL if the test process dies first.
class NbdServer {
 public:
  // nbdkit with `args` (plugin, its parameters, filters).
  static std::vector<std::string> nbdkit(const std::string& socket, const std::vector<std::string>& args) {
    std::vector<std::string> argv = {find_nbdkit(), "--exit-with-parent", "-f", "-U", socket};
    argv.insert(argv.end(), args.begin(), args.end());
    return argv;
  }

  // `make_argv(socket path, private directory)` gives the command line.
  template <class MakeArgv>
  explicit NbdServer(MakeArgv make_argv) {
    char tmpl[] = "/tmp/ferry-nbd-server-XXXXXX";
    if (!::mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    socket_ = dir_ + "/nbd.sock";
    std::vector<std::string> argv = make_argv(socket_, dir_);
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      ::execv(cargv[0], cargv.data());
      ::_exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < deadline) {
      if (listening(socket_)) return;
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error(argv[0] + " exited at start");
      }
      std::this_thread::sleep_for(5ms);
    }
    throw std::runtime_error(argv[0] + " did not create its socket");
  }
  ~NbdServer() {
    kill();
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  // SIGKILL: the server vanishes mid-connection. SIGTERM: nbdkit waits for
  // its clients to leave, then exits (SIGKILL after two seconds).
  void kill(int sig = SIGTERM) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    int status = 0;
    for (int i = 0; i < 400; ++i) {
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return;
      }
      std::this_thread::sleep_for(5ms);
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  std::string uri() const { return "nbd+unix:///?socket=" + socket_; }
  const std::string& dir() const { return dir_; }

 private:
  // Whether a UNIX socket is bound at `path` and listening: its file
  // appears at bind(), a moment before listen(), and connecting in between
  // is refused. /proc/net/unix tells without connecting (a probe would be a
  // client of its own).
  static bool listening(const std::string& path) {
    std::ifstream in("/proc/net/unix");
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      if (line.size() <= path.size() || line.compare(line.size() - path.size(), path.size(), path) != 0) continue;
      // "Num: RefCount Protocol Flags Type St Inode Path"; Flags has
      // __SO_ACCEPTCON (0x10000) once listen() is done.
      std::istringstream fields(line);
      std::string num, refcount, protocol, flags;
      fields >> num >> refcount >> protocol >> flags;
      if (std::strtoul(flags.c_str(), nullptr, 16) & 0x10000) return true;
    }
    return false;
  }

  std::string dir_;
  std::string socket_;
  pid_t pid_ = -1;
};

class RemoteBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (find_nbdkit().empty()) GTEST_SKIP() << "nbdkit is not installed";
  }
  void TearDown() override {
    backend_.reset();
    threads_.finish(2s);
  }
  // Starts nbdkit with `args` and connects to it.
  RemoteBackend& start(std::vector<std::string> args) {
    nbdkit_.emplace([&](const std::string& socket, const std::string&) { return NbdServer::nbdkit(socket, args); });
    const std::string uri = nbdkit_->uri();
    const asio::any_io_executor ex = threads_.executor();
    backend_ = run_on(threads_.executor(), RemoteBackend::connect(ex, uri));
    return *backend_;
  }
  template <class T>
  T run(asio::awaitable<T> op) {
    return run_on(threads_.executor(), std::move(op));
  }

  rpc::IoThreads threads_{2};
  std::optional<NbdServer> nbdkit_;
  std::shared_ptr<RemoteBackend> backend_;
};

TEST_F(RemoteBackendTest, ConnectsAndReportsTheRemotesCapabilities) {
  RemoteBackend& r = start({"memory", "64M"});
  EXPECT_EQ(r.size(), 64u << 20);
  const Capabilities c = r.capabilities();
  EXPECT_FALSE(c.read_only);
  EXPECT_TRUE(c.can_flush);
  EXPECT_TRUE(c.can_fua);
  EXPECT_TRUE(c.can_trim);
  EXPECT_TRUE(c.can_zero);
  EXPECT_TRUE(c.can_extents);
  EXPECT_TRUE(c.can_multi_conn);
  EXPECT_TRUE(r.structured_replies());
  EXPECT_TRUE(r.connected());
  EXPECT_LE(c.max_block, 32u << 20);
  EXPECT_GE(c.min_block, 1u);
  EXPECT_EQ(r.description(), "remote " + nbdkit_->uri() + " 64 MiB");
}

TEST_F(RemoteBackendTest, WritesAndReadsBackWithFuaAndFlush) {
  RemoteBackend& r = start({"memory", "64M"});
  const auto data = pattern(1 << 20, 1);
  run([&]() -> asio::awaitable<void> {
    co_await r.write(data, 3 << 20, false);
    const std::span<const std::uint8_t> head(data.data(), 4096);
    co_await r.write(head, 10 << 20, true);
    co_await r.flush();
    std::vector<std::uint8_t> back(data.size());
    co_await r.read(back, 3 << 20, nullptr);
    EXPECT_EQ(back, data);
    std::vector<std::uint8_t> small(4096);
    co_await r.read(small, 10 << 20, nullptr);
    EXPECT_TRUE(std::equal(small.begin(), small.end(), data.begin()));
    co_await r.cache(0, 1 << 20);
  }());
}

TEST_F(RemoteBackendTest, ServesManyConcurrentRequestsFromSeveralThreads) {
  RemoteBackend& r = start({"memory", "64M"});
  constexpr unsigned n = 256;
  constexpr std::size_t block = 16384;
  std::vector<std::vector<std::uint8_t>> blocks;
  for (unsigned i = 0; i < n; ++i) blocks.push_back(pattern(block, i));
  std::vector<std::future<void>> writes;
  for (unsigned i = 0; i < n; ++i) {
    const std::span<const std::uint8_t> bytes(blocks[i]);
    writes.push_back(asio::co_spawn(threads_.executor(), r.write(bytes, std::uint64_t{i} * block, false), asio::use_future));
  }
  for (auto& f : writes) f.get();
  std::vector<std::vector<std::uint8_t>> backs(n, std::vector<std::uint8_t>(block));
  std::vector<std::future<void>> reads;
  for (unsigned i = 0; i < n; ++i) {
    const std::span<std::uint8_t> bytes(backs[i]);
    reads.push_back(asio::co_spawn(threads_.executor(), r.read(bytes, std::uint64_t{i} * block, nullptr), asio::use_future));
  }
  for (auto& f : reads) f.get();
  for (unsigned i = 0; i < n; ++i) ASSERT_EQ(backs[i], blocks[i]) << i;
}

TEST_F(RemoteBackendTest, ExtentsFollowWritesAndTrims) {
  RemoteBackend& r = start({"memory", "64M"});
  run([&]() -> asio::awaitable<void> {
    auto before = co_await r.extents(0, 64 << 20);
    EXPECT_FALSE(before.empty());
    if (before.empty()) co_return;
    EXPECT_EQ(before.front().flags & state_hole, state_hole) << "a fresh memory disk is a hole";

    const auto data = pattern(2 << 20, 2);
    co_await r.write(data, 4 << 20, false);  // [4 MiB, 6 MiB)
    auto e = co_await r.extents(0, 8 << 20);
    EXPECT_GE(e.size(), 2u);
    if (e.size() < 2) co_return;
    EXPECT_EQ(e[0], (Extent{4 << 20, hole}));
    EXPECT_EQ(e[1], (Extent{2 << 20, 0}));

    co_await r.trim(4 << 20, 1 << 20, false);  // [4, 5) becomes a hole again
    e = co_await r.extents(4 << 20, 2 << 20);
    EXPECT_GE(e.size(), 2u);
    if (e.size() < 2) co_return;
    EXPECT_EQ(e[0], (Extent{1 << 20, hole}));
    EXPECT_EQ(e[1].flags, 0u);
    std::vector<std::uint8_t> back(1 << 20, 0xee);
    co_await r.read(back, 4 << 20, nullptr);
    EXPECT_TRUE(std::all_of(back.begin(), back.end(), [](std::uint8_t b) { return b == 0; }));

    // A read with a map: whatever the remote reports covers the range, and
    // the data parts are right.
    std::vector<std::uint8_t> wide(4 << 20);
    std::vector<Extent> map;
    co_await r.read(wide, 3 << 20, &map);
    if (!map.empty()) {
      EXPECT_EQ(total(map), wide.size());
    }
    EXPECT_TRUE(std::equal(data.begin() + (1 << 20), data.end(), wide.begin() + (2 << 20)));
  }());
}

TEST_F(RemoteBackendTest, ZeroesWithAndWithoutNoHole) {
  RemoteBackend& r = start({"memory", "64M"});
  run([&]() -> asio::awaitable<void> {
    const auto data = pattern(1 << 20, 3);
    co_await r.write(data, 0, false);
    co_await r.write(data, 1 << 20, false);
    co_await r.zero(0, 1 << 20, ZeroFlags{.may_trim = true});
    co_await r.zero(1 << 20, 1 << 20, ZeroFlags{.may_trim = false, .fua = true});
    std::vector<std::uint8_t> back(2 << 20, 0xee);
    co_await r.read(back, 0, nullptr);
    EXPECT_TRUE(std::all_of(back.begin(), back.end(), [](std::uint8_t b) { return b == 0; }));
    auto e = co_await r.extents(0, 2 << 20);
    EXPECT_FALSE(e.empty());
    if (e.empty()) co_return;
    EXPECT_EQ(e[0].flags & state_zero, state_zero);
    if (r.capabilities().can_fast_zero) co_await r.zero(0, 4096, ZeroFlags{.fast = true});
  }());
}

TEST_F(RemoteBackendTest, SplitsReadsAndWritesLargerThanTheRemotesMaximum) {
  RemoteBackend& r = start({"--filter=blocksize-policy", "memory", "64M", "blocksize-maximum=64K",
                            "blocksize-error-policy=error"});
  EXPECT_EQ(r.capabilities().max_block, 64u << 10);
  const auto data = pattern((1 << 20) + 4096, 4);
  run([&]() -> asio::awaitable<void> {
    co_await r.write(data, 4096, false);
    std::vector<std::uint8_t> back(data.size());
    co_await r.read(back, 4096, nullptr);
    EXPECT_EQ(back, data);
    std::vector<Extent> map;
    co_await r.read(back, 4096, &map);
    EXPECT_EQ(back, data);
  }());
}

TEST_F(RemoteBackendTest, RemoteErrorsKeepTheirErrno) {
  RemoteBackend& r = start({"--filter=error", "memory", "64M", "error-pwrite=EIO", "error-pwrite-rate=100%",
                            "error-trim=ENOSPC", "error-trim-rate=100%"});
  const auto data = pattern(4096, 5);
  const Error w = error_of([&] { run(r.write(data, 0, false)); });
  EXPECT_EQ(w.os_errno(), EIO);
  EXPECT_EQ(w.code(), Code::data_loss);
  EXPECT_NE(w.message().find("write 4096 bytes at offset 0"), std::string::npos) << w.message();
  const Error t = error_of([&] { run(r.trim(0, 4096, false)); });
  EXPECT_EQ(t.os_errno(), ENOSPC);
  EXPECT_EQ(t.code(), Code::resource_exhausted);
  // Reads are not affected, and the connection survives errors.
  std::vector<std::uint8_t> back(4096, 1);
  run(r.read(back, 0, nullptr));
  EXPECT_TRUE(r.connected());
}

TEST_F(RemoteBackendTest, ReadOnlyRemoteSaysSo) {
  RemoteBackend& r = start({"-r", "memory", "64M"});
  EXPECT_TRUE(r.capabilities().read_only);
  EXPECT_NE(r.description().find("(read-only)"), std::string::npos);
  const auto data = pattern(4096, 6);
  const Error e = error_of([&] { run(r.write(data, 0, false)); });
  EXPECT_EQ(e.os_errno(), EPERM) << e.message();
}

TEST_F(RemoteBackendTest, ConnectFailsCleanlyWithoutAServer) {
  const asio::any_io_executor ex = threads_.executor();
  const std::string uri = "nbd+unix:///?socket=/tmp/ferry-no-such-dir/nbd.sock";
  const Error e = error_of([&] { run(RemoteBackend::connect(ex, uri)); });
  EXPECT_EQ(e.code(), Code::unavailable) << e.describe();
  EXPECT_NE(e.message().find("ferry-no-such-dir"), std::string::npos) << e.message();
  const Error b = error_of([&] { RemoteBackend::connect_blocking(ex, uri); });
  EXPECT_NE(b.message().find("ferry-no-such-dir"), std::string::npos) << b.message();
}

TEST_F(RemoteBackendTest, ConnectTimesOutWhenTheServerSaysNothing) {
  // A listening socket nobody accepts from: the handshake never starts.
  nbdkit_.reset();
  char tmpl[] = "/tmp/ferry-silent-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  asio::io_context other;
  asio::local::stream_protocol::acceptor acceptor(other, asio::local::stream_protocol::endpoint(dir + "/s"));
  const asio::any_io_executor ex = threads_.executor();
  const std::string uri = "nbd+unix:///?socket=" + dir + "/s";
  RemoteOptions o;
  o.connect_timeout = 200ms;
  const auto t0 = std::chrono::steady_clock::now();
  const Error e = error_of([&] { run(RemoteBackend::connect(ex, uri, o)); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_EQ(e.code(), Code::unavailable) << e.describe();
  std::filesystem::remove_all(dir);
}

TEST_F(RemoteBackendTest, BlockingConnectWorksToo) {
  nbdkit_.emplace([](const std::string& socket, const std::string&) {
    return NbdServer::nbdkit(socket, {"memory", "16M"});
  });
  const asio::any_io_executor ex = threads_.executor();
  backend_ = RemoteBackend::connect_blocking(ex, nbdkit_->uri());
  EXPECT_EQ(backend_->size(), 16u << 20);
  const auto data = pattern(8192, 8);
  run(backend_->write(data, 8192, false));
  std::vector<std::uint8_t> back(8192);
  run(backend_->read(back, 8192, nullptr));
  EXPECT_EQ(back, data);
}

TEST_F(RemoteBackendTest, LostConnectionFailsLaterCalls) {
  RemoteBackend& r = start({"memory", "64M"});
  std::vector<std::uint8_t> back(4096);
  run(r.read(back, 0, nullptr));
  nbdkit_->kill(SIGKILL);
  // The first call may or may not notice; within a few, every call fails.
  std::optional<Error> failure;
  for (int i = 0; i < 50 && !failure; ++i) {
    try {
      run(r.read(back, 0, nullptr));
      std::this_thread::sleep_for(10ms);
    } catch (const Error& e) {
      failure = e;
    }
  }
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(failure->code(), Code::unavailable) << failure->describe();
  EXPECT_EQ(failure->os_errno(), EIO);
  EXPECT_FALSE(r.connected());
  EXPECT_EQ(error_of([&] { run(r.read(back, 0, nullptr)); }).code(), Code::unavailable);
}

TEST_F(RemoteBackendTest, DestroyingWithCommandsInFlightFailsThem) {
  start({"--filter=delay", "memory", "64M", "rdelay=5"});
  RemoteBackend* r = backend_.get();
  std::vector<std::uint8_t> back(4096);
  const std::span<std::uint8_t> bytes(back);
  auto pending = asio::co_spawn(threads_.executor(), r->read(bytes, 0, nullptr), asio::use_future);
  std::this_thread::sleep_for(100ms);
  const auto t0 = std::chrono::steady_clock::now();
  backend_.reset();
  ASSERT_EQ(pending.wait_for(3s), std::future_status::ready) << "a pending read outlived its backend";
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  const Error e = error_of([&] { pending.get(); });
  EXPECT_EQ(e.code(), Code::unavailable) << e.describe();
}

TEST_F(RemoteBackendTest, ReadMapShowsTheHolesTheRemoteSends) {
  // qemu-nbd answers reads of a sparse file with hole chunks (nbdkit sends
  // data chunks only), and reports its holes in base:allocation.
  const std::string qemu = find_qemu_nbd();
  if (qemu.empty()) GTEST_SKIP() << "qemu-nbd is not installed";
  const auto data = pattern(4096, 11);
  nbdkit_.emplace([&](const std::string& socket, const std::string& dir) {
    const std::string file = dir + "/disk.raw";
    {
      std::ofstream out(file, std::ios::binary);
      out.seekp(1 << 20);
      out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
    }
    std::filesystem::resize_file(file, 4 << 20);
    return std::vector<std::string>{qemu, "-f", "raw", "-k", socket, file};
  });
  const std::string uri = nbdkit_->uri();
  const asio::any_io_executor ex = threads_.executor();
  backend_ = run(RemoteBackend::connect(ex, uri));
  RemoteBackend& r = *backend_;
  ASSERT_TRUE(r.structured_replies());
  run([&]() -> asio::awaitable<void> {
    std::vector<std::uint8_t> all(4 << 20, 0xee);
    std::vector<Extent> map;
    co_await r.read(all, 0, &map);
    EXPECT_EQ(map, (std::vector<Extent>{{1 << 20, hole}, {4096, 0}, {(3 << 20) - 4096, hole}}));
    EXPECT_TRUE(std::equal(data.begin(), data.end(), all.begin() + (1 << 20)));
    // Without a map the same bytes come back, holes as zeros.
    std::vector<std::uint8_t> plain(4 << 20, 0xee);
    co_await r.read(plain, 0, nullptr);
    EXPECT_TRUE(std::all_of(plain.begin(), plain.begin() + (1 << 20), [](std::uint8_t b) { return b == 0; }));
    EXPECT_TRUE(std::equal(data.begin(), data.end(), plain.begin() + (1 << 20)));
    auto e = co_await r.extents(0, 4 << 20);
    EXPECT_FALSE(e.empty());
    if (!e.empty()) {
      EXPECT_EQ(e[0], (Extent{1 << 20, hole}));
    }
    // A read of data only leaves the map empty.
    std::vector<std::uint8_t> small(4096);
    co_await r.read(small, 1 << 20, &map);
    EXPECT_TRUE(map.empty());
    EXPECT_EQ(small, data);
  }());
}

}  // namespace
}  // namespace ferry::nbd
