// FaultTransport: each fault lands where its options say, in both
// directions, and the transport passes everything else through untouched.
#include "rpc/fault_transport.h"

#include <gtest/gtest.h>

#include <asio/co_spawn.hpp>
#include <asio/local/connect_pair.hpp>
#include <asio/strand.hpp>
#include <asio/use_future.hpp>
#include <chrono>
#include <future>
#include <numeric>
#include <vector>

#include "rpc/error.h"
#include "rpc/io_threads.h"
#include "rpc/socket_transport.h"

namespace ferry::rpc {
namespace {

using namespace std::chrono_literals;

struct Pair {
  explicit Pair(FaultOptions options) {
    asio::local::stream_protocol::socket a(asio::make_strand(io.executor()));
    asio::local::stream_protocol::socket b(asio::make_strand(io.executor()));
    asio::local::connect_pair(a, b);
    faulty = std::make_unique<FaultTransport>(std::make_unique<UnixTransport>(std::move(a)), options);
    plain = std::make_unique<UnixTransport>(std::move(b));
  }
  template <class F>
  auto run(Transport& t, F f) {
    return asio::co_spawn(t.get_executor(), f(), asio::use_future).get();
  }
  IoThreads io{1};
  std::unique_ptr<FaultTransport> faulty;
  std::unique_ptr<Transport> plain;
};

std::vector<std::uint8_t> counting(std::size_t n) {
  std::vector<std::uint8_t> v(n);
  std::iota(v.begin(), v.end(), std::uint8_t{0});
  return v;
}

// Writes `data` through `from`, then closes its sending side; runs while
// the caller reads (a socket pair holds only so much).
std::future<void> send(Transport& from, const std::vector<std::uint8_t>& data) {
  return asio::co_spawn(
      from.get_executor(),
      [&from, &data]() -> asio::awaitable<void> {
        const asio::const_buffer b(data.data(), data.size());
        co_await from.write_all(std::span<const asio::const_buffer>(&b, 1));
        from.shutdown_send();
      },
      asio::use_future);
}

// Reads `into` until end of stream or an error; returns the error.
std::error_code receive(Pair& p, Transport& at, std::vector<std::uint8_t>& into) {
  return p.run(at, [&]() -> asio::awaitable<std::error_code> {
    std::uint8_t buf[4096];
    for (;;) {
      auto [ec, n] = co_await at.read_some(asio::buffer(buf));
      into.insert(into.end(), buf, buf + n);
      if (ec) co_return ec;
    }
  });
}

TEST(FaultTransport, CorruptsOneBitOfEveryNthByteReadAndNothingElse) {
  FaultOptions o;
  o.on_write = false;
  o.corrupt_every = 1000;
  Pair p(o);
  const auto sent = counting(100'000);
  auto sending = send(*p.plain, sent);
  std::vector<std::uint8_t> got;
  EXPECT_EQ(receive(p, *p.faulty, got), asio::error::eof);
  sending.get();
  ASSERT_EQ(got.size(), sent.size());
  for (std::size_t i = 0; i < sent.size(); ++i) {
    const unsigned diff = sent[i] ^ got[i];
    if ((i + 1) % 1000 == 0) {
      EXPECT_EQ(__builtin_popcount(diff), 1) << "byte " << i;
    } else {
      EXPECT_EQ(diff, 0u) << "byte " << i;
    }
  }
  EXPECT_EQ(p.faulty->counts().corrupted, 100u);
}

TEST(FaultTransport, DropsEveryNthByteWritten) {
  FaultOptions o;
  o.on_read = false;
  o.drop_every = 10;
  Pair p(o);
  const auto sent = counting(10'000);
  auto sending = send(*p.faulty, sent);
  std::vector<std::uint8_t> got;
  EXPECT_EQ(receive(p, *p.plain, got), asio::error::eof);
  sending.get();
  std::vector<std::uint8_t> expected;
  for (std::size_t i = 0; i < sent.size(); ++i)
    if ((i + 1) % 10 != 0) expected.push_back(sent[i]);
  EXPECT_EQ(got, expected);
  EXPECT_EQ(p.faulty->counts().dropped, 1000u);
}

TEST(FaultTransport, ResetsAfterNBytesAndFailsEverythingAfter) {
  FaultOptions o;
  o.reset_after = 12'345;
  Pair p(o);
  const auto sent = counting(100'000);
  auto sending = send(*p.plain, sent);
  std::vector<std::uint8_t> got;
  EXPECT_EQ(receive(p, *p.faulty, got), asio::error::connection_reset);
  sending.wait();  // the peer's write fails once the reset closed our socket
  EXPECT_EQ(got.size(), 12'345u);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), sent.begin()));
  EXPECT_TRUE(p.faulty->counts().reset);
  // Writes fail too, and the peer sees the connection gone.
  auto [ec, n] = p.run(*p.faulty, [&]() -> asio::awaitable<IoResult> {
    const std::uint8_t byte = 1;
    const asio::const_buffer b(&byte, 1);
    co_return co_await p.faulty->write_all(std::span<const asio::const_buffer>(&b, 1));
  });
  EXPECT_EQ(ec, asio::error::connection_reset);
  EXPECT_EQ(n, 0u);
}

TEST(FaultTransport, DelaysEachOperation) {
  FaultOptions o;
  o.delay = 50ms;
  Pair p(o);
  const auto sent = counting(10);
  const auto start = std::chrono::steady_clock::now();
  send(*p.faulty, sent).get();
  EXPECT_GE(std::chrono::steady_clock::now() - start, 50ms);
  std::vector<std::uint8_t> got;
  EXPECT_EQ(receive(p, *p.plain, got), asio::error::eof);
  EXPECT_EQ(got, sent);
}

TEST(FaultTransport, WithoutFaultsPassesBytesThroughBothWays) {
  Pair p(FaultOptions{});
  EXPECT_FALSE(FaultOptions{}.any());
  const auto sent = counting(300'000);
  auto sending = send(*p.faulty, sent);
  std::vector<std::uint8_t> got;
  EXPECT_EQ(receive(p, *p.plain, got), asio::error::eof);
  sending.get();
  EXPECT_EQ(got, sent);
}

TEST(FaultOptions, ParsesSpecsAndSaysWhatIsWrong) {
  const auto o = FaultOptions::parse("delay=5ms,corrupt_every=1M,drop_every=4096,reset_after=10M,direction=read,seed=7");
  EXPECT_EQ(o.delay, 5ms);
  EXPECT_EQ(o.corrupt_every, 1u << 20);
  EXPECT_EQ(o.drop_every, 4096u);
  EXPECT_EQ(o.reset_after, 10u << 20);
  EXPECT_TRUE(o.on_read);
  EXPECT_FALSE(o.on_write);
  EXPECT_EQ(o.seed, 7u);
  EXPECT_EQ(o.describe(), "delay=5000us,corrupt_every=1048576,drop_every=4096,reset_after=10485760,direction=read");
  EXPECT_EQ(FaultOptions::parse("").describe(), "none");
  EXPECT_EQ(FaultOptions::parse(o.describe()).describe(), o.describe());
  for (const char* bad : {"delay", "delay=fast", "corrupt_every=-1", "direction=sideways", "flip=1"}) {
    try {
      FaultOptions::parse(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::invalid_argument) << bad;
      EXPECT_NE(e.message().find("bad fault spec"), std::string::npos) << e.message();
    }
  }
}

}  // namespace
}  // namespace ferry::rpc
