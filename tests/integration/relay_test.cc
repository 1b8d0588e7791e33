// ferry-delay-relay and NetLab: the relay on loopback between a test client
// and a small TCP server in the test (delay, data intact, half-close, many
// connections, failures on either side, bounded memory, SIGTERM); NetLab's
// namespaces, links and relays with a real ferryd and the ferry CLI on either
// side of a rate-limited veth link.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#include "tests/integration/ferryd_process.h"
#include "tests/integration/netlab.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kMiB = 1024 * 1024;

void set_timeout(int fd, std::chrono::seconds t) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(t.count());
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

// A connected TCP socket to 127.0.0.1:port, reads and writes failing after
// 30 s (a stuck test fails instead of hanging).
class Conn {
 public:
  explicit Conn(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) throw std::runtime_error("socket failed");
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      throw std::runtime_error(std::string("connect failed: ") + std::strerror(errno));
    int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    set_timeout(fd_, 30s);
  }
  ~Conn() {
    if (fd_ >= 0) ::close(fd_);
  }
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

bool write_all(int fd, const void* data, std::size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

// Reads exactly n bytes; false on EOF, error or timeout.
bool read_exact(int fd, void* data, std::size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

// What the next read sees: "data", "eof", "reset" (or another error), "timeout".
std::string next_read(int fd) {
  char c;
  for (;;) {
    const ssize_t r = ::recv(fd, &c, 1, 0);
    if (r > 0) return "data";
    if (r == 0) return "eof";
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return "timeout";
    return errno == ECONNRESET ? "reset" : std::string("error: ") + std::strerror(errno);
  }
}

// Deterministic pseudo-random bytes (xorshift64), chunk by chunk.
class Pattern {
 public:
  explicit Pattern(std::uint64_t seed) : s_(seed | 1) {}
  void fill(char* p, std::size_t n) {
    for (std::size_t i = 0; i < n; i += 8) {
      s_ ^= s_ << 13;
      s_ ^= s_ >> 7;
      s_ ^= s_ << 17;
      std::memcpy(p + i, &s_, std::min<std::size_t>(8, n - i));
    }
  }

 private:
  std::uint64_t s_;
};

// FNV-1a, 64 bits.
struct Hash {
  std::uint64_t h = 1469598103934665603ull;
  void add(const char* p, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) h = (h ^ static_cast<unsigned char>(p[i])) * 1099511628211ull;
  }
};

// A TCP server on 127.0.0.1 running `handler` for each connection on its own
// thread. The handler must not close the descriptor (the server does, at the
// end); it may shut it down. `killed` tells a handler that waits on anything
// but its socket to return.
class TestServer {
 public:
  using Handler = std::function<void(int fd, const std::atomic<bool>& killed)>;
  explicit TestServer(Handler handler) : handler_(std::move(handler)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listen_fd_, 128) != 0 ||
        ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0)
      throw std::runtime_error("cannot listen");
    port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~TestServer() { kill(); }
  TestServer(const TestServer&) = delete;
  TestServer& operator=(const TestServer&) = delete;

  std::uint16_t port() const { return port_; }
  int accepted() const { return accepted_; }

  // Like a killed server: no more accepts, every connection aborted
  // (SO_LINGER 0: the close sends a reset).
  void kill() {
    std::vector<std::thread> threads;
    std::vector<int> fds;
    {
      std::lock_guard lock(mutex_);
      if (killed_) return;
      killed_ = true;
      ::shutdown(listen_fd_, SHUT_RDWR);
      for (int fd : fds_) {
        linger l{1, 0};
        ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
        ::shutdown(fd, SHUT_RDWR);  // wakes a handler blocked on it
      }
      threads.swap(threads_);
      fds.swap(fds_);
    }
    acceptor_.join();
    for (auto& t : threads) t.join();
    for (int fd : fds) ::close(fd);
    ::close(listen_fd_);
  }

 private:
  void accept_loop() {
    for (;;) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      std::lock_guard lock(mutex_);
      if (killed_) {
        if (fd >= 0) ::close(fd);
        return;
      }
      if (fd < 0) continue;
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      ++accepted_;
      fds_.push_back(fd);
      threads_.emplace_back([this, fd] { handler_(fd, killed_); });
    }
  }

  Handler handler_;
  int listen_fd_ = -1;
  std::uint16_t port_ = 0;
  std::thread acceptor_;
  std::mutex mutex_;
  std::atomic<bool> killed_{false};
  std::vector<int> fds_;
  std::vector<std::thread> threads_;
  std::atomic<int> accepted_{0};
};

// Echoes every byte; at EOF shuts its side down too.
void echo(int fd, const std::atomic<bool>& /*killed*/) {
  std::vector<char> buf(256 * 1024);
  for (;;) {
    const ssize_t r = ::recv(fd, buf.data(), buf.size(), 0);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) {
      ::shutdown(fd, SHUT_WR);
      return;
    }
    if (r < 0 || !write_all(fd, buf.data(), static_cast<std::size_t>(r))) return;
  }
}

std::uint64_t rss_bytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  return 0;
}

// One byte through and back; the time it took.
Clock::duration round_trip(int fd) {
  const char out = 'x';
  char in = 0;
  const auto start = Clock::now();
  EXPECT_TRUE(write_all(fd, &out, 1));
  EXPECT_TRUE(read_exact(fd, &in, 1));
  const auto took = Clock::now() - start;
  EXPECT_EQ(in, out);
  return took;
}

TEST(Relay, RoundTripTakesTwiceTheDelay) {
  TestServer server(echo);
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", server.port(), 20ms);
  EXPECT_EQ(relay.host, "127.0.0.1");
  EXPECT_NE(relay.port, 0);
  Conn c(relay.port);
  for (int i = 0; i < 5; ++i) {
    const auto took = round_trip(c.fd());
    EXPECT_GE(took, 40ms) << "round trip " << i << " took "
                          << std::chrono::duration_cast<std::chrono::microseconds>(took).count() << " us";
  }
  // Fractional delays: 2.5 ms one way.
  const auto fine = lab.start_relay("", "127.0.0.1", "127.0.0.1", server.port(), 2500us);
  Conn f(fine.port);
  for (int i = 0; i < 5; ++i) EXPECT_GE(round_trip(f.fd()), 5ms);
}

// 64 MiB out and echoed back, written while read (a full pipe in flight both
// ways), hashed on both sides.
TEST(Relay, BulkDataArrivesIntactBothWays) {
  TestServer server(echo);
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", server.port(), 20ms);
  Conn c(relay.port);
  constexpr std::uint64_t total = 64 * kMiB;
  Hash sent;
  std::atomic<bool> write_ok{false};
  std::thread writer([&] {
    Pattern pattern(42);
    std::vector<char> buf(1 * kMiB);
    for (std::uint64_t done = 0; done < total; done += buf.size()) {
      pattern.fill(buf.data(), buf.size());
      sent.add(buf.data(), buf.size());
      if (!write_all(c.fd(), buf.data(), buf.size())) return;
    }
    ::shutdown(c.fd(), SHUT_WR);
    write_ok = true;
  });
  Hash received;
  std::uint64_t got = 0;
  std::vector<char> buf(256 * 1024);
  for (;;) {
    const ssize_t r = ::recv(c.fd(), buf.data(), buf.size(), 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      EXPECT_EQ(r, 0) << std::strerror(errno);
      break;
    }
    received.add(buf.data(), static_cast<std::size_t>(r));
    got += static_cast<std::uint64_t>(r);
  }
  writer.join();
  EXPECT_TRUE(write_ok);
  EXPECT_EQ(got, total);
  EXPECT_EQ(received.h, sent.h);
}

TEST(Relay, HalfClosePropagates) {
  std::atomic<bool> server_saw_eof{false};
  TestServer server([&](int fd, const std::atomic<bool>&) {
    // Reads to EOF, then answers and shuts its side down.
    std::uint64_t n = 0;
    char buf[4096];
    ssize_t r;
    while ((r = ::recv(fd, buf, sizeof buf, 0)) > 0) n += static_cast<std::uint64_t>(r);
    if (r != 0) return;
    server_saw_eof = true;
    const std::string reply = "got " + std::to_string(n) + " bytes";
    write_all(fd, reply.data(), reply.size());
    ::shutdown(fd, SHUT_WR);
  });
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", server.port(), 20ms);
  Conn c(relay.port);
  ASSERT_TRUE(write_all(c.fd(), "hello", 5));
  ASSERT_EQ(::shutdown(c.fd(), SHUT_WR), 0);
  const std::string expected = "got 5 bytes";
  std::string reply(expected.size(), '\0');
  ASSERT_TRUE(read_exact(c.fd(), reply.data(), reply.size()));
  EXPECT_EQ(reply, expected);
  EXPECT_TRUE(server_saw_eof);
  EXPECT_EQ(next_read(c.fd()), "eof");
}

TEST(Relay, TwentyConnectionsAtOnce) {
  TestServer server(echo);
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", server.port(), 20ms);
  constexpr int kConns = 20;
  std::vector<std::unique_ptr<Conn>> conns;
  for (int i = 0; i < kConns; ++i) conns.push_back(std::make_unique<Conn>(relay.port));
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kConns; ++i)
    threads.emplace_back([&, i] {
      const int fd = conns[static_cast<std::size_t>(i)]->fd();
      std::vector<char> out(2 * kMiB), in(out.size());
      Pattern(static_cast<std::uint64_t>(i) + 1).fill(out.data(), out.size());
      std::thread w([&] { write_all(fd, out.data(), out.size()); });
      const bool read = read_exact(fd, in.data(), in.size());
      w.join();
      if (read && in == out) ++ok;
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok, kConns);
  EXPECT_EQ(server.accepted(), kConns);
}

TEST(Relay, KilledUpstreamClosesTheClient) {
  TestServer server(echo);
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", server.port(), 20ms);
  Conn c(relay.port);
  round_trip(c.fd());
  server.kill();
  const auto outcome = next_read(c.fd());
  EXPECT_TRUE(outcome == "eof" || outcome == "reset") << outcome;
}

TEST(Relay, RefusedUpstreamClosesTheClient) {
  // A bound socket that does not listen: connections to it are refused.
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", ntohs(a.sin_port), 20ms);
  Conn c(relay.port);
  const auto outcome = next_read(c.fd());
  EXPECT_TRUE(outcome == "eof" || outcome == "reset") << outcome;
  ::close(fd);
}

// A killed relay drops its connections at once; a restarted one serves the
// same port again.
TEST(Relay, KillAndRestart) {
  TestServer server(echo);
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", server.port(), 5ms);
  Conn c(relay.port);
  round_trip(c.fd());
  lab.kill_relay(relay);
  const auto outcome = next_read(c.fd());
  EXPECT_TRUE(outcome == "eof" || outcome == "reset") << outcome;
  EXPECT_THROW(Conn{relay.port}, std::runtime_error);  // nothing listens now

  const auto again = lab.restart_relay(relay);
  EXPECT_EQ(again.port, relay.port);
  EXPECT_EQ(again.host, relay.host);
  EXPECT_NE(again.id, relay.id);
  Conn d(again.port);
  EXPECT_GE(round_trip(d.fd()), 10ms);
}

// The receiver stops reading: the relay queues at most --buffer bytes per
// direction and stops reading the sender (backpressure), so its memory
// stays bounded; then the receiver drains and all 1 GiB arrives.
TEST(Relay, BufferBoundsMemory) {
  constexpr std::uint64_t buffer = 16 * kMiB;
  constexpr std::uint64_t total = 1024 * kMiB;
  std::atomic<bool> drain{false};
  std::atomic<std::uint64_t> received{0};
  std::atomic<bool> received_eof{false};
  TestServer server([&](int fd, const std::atomic<bool>& killed) {
    while (!drain && !killed) std::this_thread::sleep_for(10ms);
    std::vector<char> buf(256 * 1024);
    ssize_t r;
    while ((r = ::recv(fd, buf.data(), buf.size(), 0)) > 0) received += static_cast<std::uint64_t>(r);
    received_eof = r == 0;
  });
  NetLab lab;
  const auto relay = lab.start_relay("", "127.0.0.1", "127.0.0.1", server.port(), 5ms, buffer);
  ASSERT_GT(relay.pid, 0);
  Conn c(relay.port);
  set_timeout(c.fd(), 120s);
  std::atomic<std::uint64_t> pushed{0};
  std::atomic<bool> push_ok{false};
  std::thread sender([&] {
    std::vector<char> buf(1 * kMiB, 'z');
    while (pushed < total) {
      if (!write_all(c.fd(), buf.data(), buf.size())) return;
      pushed += buf.size();
    }
    ::shutdown(c.fd(), SHUT_WR);
    push_ok = true;
  });
  std::uint64_t max_rss = 0;
  auto sample = [&] { max_rss = std::max(max_rss, rss_bytes(relay.pid)); };

  // Until the sender has made no progress for two seconds.
  std::uint64_t last = 0;
  auto last_change = Clock::now();
  const auto give_up = Clock::now() + 60s;
  while (Clock::now() - last_change < 2s && Clock::now() < give_up) {
    sample();
    std::this_thread::sleep_for(20ms);
    if (pushed != last) {
      last = pushed;
      last_change = Clock::now();
    }
  }
  const std::uint64_t stalled_at = pushed;
  EXPECT_LT(stalled_at, total / 2) << "the sender was not held back";
  EXPECT_GE(stalled_at, buffer) << "the relay did not queue up to its buffer";

  drain = true;
  const auto deadline = Clock::now() + 240s;
  while (!received_eof && Clock::now() < deadline) {
    sample();
    std::this_thread::sleep_for(20ms);
  }
  sender.join();
  EXPECT_TRUE(push_ok);
  EXPECT_EQ(received, total);
  EXPECT_TRUE(received_eof);
  EXPECT_GT(max_rss, 0u);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // Sanitizers keep freed memory in quarantine and shadow every byte: the
  // plain build checks the ceiling; here the stall above shows the bound.
#else
  EXPECT_LT(max_rss, buffer * 2 + 64 * kMiB) << "relay RSS " << max_rss / kMiB << " MiB";
#endif
  std::printf("relay: stalled after %llu MiB, max RSS %llu MiB\n", static_cast<unsigned long long>(stalled_at / kMiB),
              static_cast<unsigned long long>(max_rss / kMiB));
}

TEST(Relay, ExitsOnSigtermWithConnectionsOpen) {
  TestServer server(echo);
  TempDir dir;
  const std::string ready = dir.path() + "/port";
  ChildProcess relay({relay_path(), "--listen", "127.0.0.1:0", "--to", "127.0.0.1:" + std::to_string(server.port()),
                      "--delay", "50", "--buffer", "4M", "--ready-file", ready});
  const auto deadline = Clock::now() + 10s;
  while (!std::filesystem::exists(ready) && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
  std::ifstream in(ready);
  unsigned port = 0;
  ASSERT_TRUE(in >> port) << relay.output();
  Conn c(static_cast<std::uint16_t>(port));
  round_trip(c.fd());
  std::vector<char> some(1 * kMiB, 'q');
  ASSERT_TRUE(write_all(c.fd(), some.data(), some.size()));  // in flight when the signal comes
  relay.signal(SIGTERM);
  EXPECT_EQ(relay.wait(10s), 0) << relay.output();
  EXPECT_NE(relay.output().find("listening on 127.0.0.1:" + std::to_string(port)), std::string::npos) << relay.output();
  const auto outcome = next_read(c.fd());
  EXPECT_TRUE(outcome == "eof" || outcome == "reset" || outcome == "data") << outcome;
}

TEST(Relay, RejectsBadArguments) {
  std::string out;
  EXPECT_NE(run_command({relay_path(), "--listen", "127.0.0.1", "--to", "127.0.0.1:1"}, &out), 0);
  EXPECT_NE(run_command({relay_path(), "--listen", "127.0.0.1:0", "--to", "127.0.0.1:1", "--buffer", "12Q"}, &out), 0);
  EXPECT_NE(out.find("--buffer"), std::string::npos) << out;
  EXPECT_NE(run_command({relay_path(), "--listen", "127.0.0.1:0", "--to", "127.0.0.1:1", "--delay", "-1"}, &out), 0);
}

// ---------------------------------------------------------------- NetLab

// Runs `argv`; its exit status (-1 after 60 s) and output.
std::pair<int, std::string> run_bounded(const std::vector<std::string>& argv, std::chrono::seconds limit = 60s) {
  ChildProcess p(argv);
  const int rc = p.wait(limit);
  return {rc, p.output()};
}

std::vector<std::string> namespaces_of_this_process() {
  std::string out;
  run_command({"/usr/sbin/ip", "netns", "list"}, &out);
  const std::string prefix = "ferrytest-" + std::to_string(::getpid()) + "-";
  std::vector<std::string> mine;
  std::istringstream lines(out);
  std::string name;
  while (lines >> name)
    if (name.rfind(prefix, 0) == 0) mine.push_back(name);
  return mine;
}

std::string qdisc(const std::string& ns, const std::string& dev) {
  std::string out;
  run_command({"/usr/sbin/tc", "-n", ns, "qdisc", "show", "dev", dev}, &out);
  return out;
}

// The CLI in one namespace reaches a ferryd in another across the link, then
// through a delay relay; a link set down is a partition, set up it heals.
TEST(NetLab, FerrydAcrossALinkAndThroughARelay) {
  REQUIRE_NETLAB();
  NetLab lab;
  const auto a = lab.add_namespace("a");
  const auto b = lab.add_namespace("b");
  const auto link = lab.link(a, b, "100mbit");
  EXPECT_EQ(link.ns_a, a);
  EXPECT_EQ(link.ns_b, b);
  EXPECT_NE(qdisc(a, link.dev_a).find("tbf"), std::string::npos) << qdisc(a, link.dev_a);
  EXPECT_NE(qdisc(b, link.dev_b).find("tbf"), std::string::npos) << qdisc(b, link.dev_b);

  FerrydProcess d({"--listen", "tcp:" + link.addr_b + ":7400"}, lab.wrapper(b));
  const auto ping = [&](const std::string& host, std::uint16_t port, int count) {
    return run_bounded(
        concat(lab.wrapper(a), {ferry_cli_path(), "-c", "ferry+tcp://" + host + ":" + std::to_string(port), "ping",
                                "-n", std::to_string(count)}));
  };
  {
    const auto [rc, out] = ping(link.addr_b, 7400, 1);
    EXPECT_EQ(rc, 0) << out;
  }

  const auto relay = lab.start_relay(b, link.addr_b, link.addr_b, 7400, 10ms);
  EXPECT_EQ(relay.host, link.addr_b);
  {
    const auto [rc, out] = ping(relay.host, relay.port, 3);
    ASSERT_EQ(rc, 0) << out;
    std::smatch m;
    ASSERT_TRUE(std::regex_search(out, m, std::regex("min ([0-9.]+) ms"))) << out;
    EXPECT_GE(std::stod(m[1]), 20.0) << out;  // each ping crosses the relay both ways
  }

  lab.set_up(link, false);
  {
    const auto [rc, out] = ping(link.addr_b, 7400, 1);
    EXPECT_NE(rc, 0) << out;
    EXPECT_NE(rc, -1) << "the ping did not end within 60 s";
  }
  lab.set_up(link, true);
  int rc = -1;
  std::string out;
  for (auto until = Clock::now() + 20s; Clock::now() < until;) {
    std::tie(rc, out) = ping(link.addr_b, 7400, 1);
    if (rc == 0) break;
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_EQ(rc, 0) << out;
}

TEST(NetLab, SetRateChangesTheQdisc) {
  REQUIRE_NETLAB();
  NetLab lab;
  const auto a = lab.add_namespace("a");
  const auto b = lab.add_namespace("b");
  const auto link = lab.link(a, b);
  EXPECT_EQ(qdisc(a, link.dev_a).find("tbf"), std::string::npos) << qdisc(a, link.dev_a);
  lab.set_rate(link, "200mbit");
  EXPECT_NE(qdisc(a, link.dev_a).find("rate 200Mbit"), std::string::npos) << qdisc(a, link.dev_a);
  EXPECT_NE(qdisc(b, link.dev_b).find("rate 200Mbit"), std::string::npos) << qdisc(b, link.dev_b);
  lab.set_rate(link, "10gbit");
  EXPECT_NE(qdisc(a, link.dev_a).find("rate 10Gbit"), std::string::npos) << qdisc(a, link.dev_a);
  lab.set_rate(link, "");
  EXPECT_EQ(qdisc(a, link.dev_a).find("tbf"), std::string::npos) << qdisc(a, link.dev_a);
  EXPECT_EQ(qdisc(b, link.dev_b).find("tbf"), std::string::npos) << qdisc(b, link.dev_b);
  // Links get distinct subnets.
  const auto c = lab.add_namespace("c");
  const auto second = lab.link(a, c, "1gbit");
  EXPECT_NE(second.addr_a, link.addr_a);
  EXPECT_NE(second.dev_a, link.dev_a);
  const auto [rc, out] = run_bounded(concat(lab.wrapper(c), {"/usr/sbin/ip", "-4", "addr", "show"}));
  EXPECT_EQ(rc, 0);
  EXPECT_NE(out.find(second.addr_b + "/24"), std::string::npos) << out;
}

TEST(NetLab, DestructorLeavesNothingBehind) {
  REQUIRE_NETLAB();
  EXPECT_TRUE(namespaces_of_this_process().empty());
  pid_t relay_pid = -1;
  {
    NetLab lab;
    const auto a = lab.add_namespace("a");
    const auto b = lab.add_namespace("b");
    const auto link = lab.link(a, b, "100mbit");
    const auto relay = lab.start_relay(b, link.addr_b, link.addr_b, 7400, 1ms);
    relay_pid = relay.pid;
    EXPECT_EQ(::kill(relay_pid, 0), 0);
    EXPECT_EQ(namespaces_of_this_process().size(), 2u);
  }
  EXPECT_TRUE(namespaces_of_this_process().empty());
  EXPECT_EQ(::kill(relay_pid, 0), -1);
  EXPECT_EQ(errno, ESRCH);
}

}  // namespace
}  // namespace ferry::testing
