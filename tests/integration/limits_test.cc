// Limits and access rules of a real ferryd, tested the way a careless or
// hostile client would meet them: a flood of connections, connections that
// never finish their handshake, idle connections, too many streams, and
// UNIX socket permissions and peer credentials.
#include <gtest/gtest.h>
#include <gmock/gmock.h>

#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <optional>
#include <thread>

#include "ferry/v1/admin.ferry.h"
#include "ferry/v1/control.ferry.h"
#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "stream/service.h"
#include "tests/error_of.h"
#include "tests/integration/copy_helpers.h"
#include "tests/integration/ferryd_process.h"
#include "tests/integration/raw_socket.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
using rpc::Client;
using ::testing::HasSubstr;
using TestSvc = test::v1::Test;
using Control = ferry::v1::Control;

class LimitsTest : public ::testing::Test {
 protected:
  Client connect(const std::string& uri, rpc::ClientOptions options = {}) {
    return Client::connect_sync(io_.executor(), uri, options);
  }
  test::v1::StatsReply stats(Client& client) {
    return client.call_future<TestSvc::Stats>(test::v1::StatsCall{}).get();
  }
  rpc::IoThreads io_{2};
};

void raise_fd_limit() {
  struct rlimit rl {};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &rl);
}

TEST_F(LimitsTest, ThousandConnectionsAtOnceAgainstAMaxOfHundred) {
  raise_fd_limit();
  FerrydProcess server({"--max-clients", "100", "--max-unauthenticated-clients", "100", "--auth-timeout", "60000",
                        "--io-threads", "2", "--worker-threads", "2"});
  const unsigned threads_before = server.threads();
  const std::uint64_t rss_before = server.rss_bytes();
  std::vector<RawSocket> sockets;
  sockets.reserve(1000);
  for (int i = 0; i < 1000; ++i) sockets.push_back(RawSocket::connect_unix(server.socket_path()));

  // The refused hear why and are closed; the admitted hear nothing (they
  // have not said Hello, and the auth timeout is a minute away).
  std::vector<bool> done(sockets.size(), false);
  unsigned refused = 0;
  std::string reason;
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (refused < 900 && std::chrono::steady_clock::now() < deadline) {
    std::vector<pollfd> fds;
    std::vector<std::size_t> index;
    for (std::size_t i = 0; i < sockets.size(); ++i)
      if (!done[i]) {
        fds.push_back({sockets[i].fd(), POLLIN, 0});
        index.push_back(i);
      }
    if (::poll(fds.data(), fds.size(), 200) <= 0) continue;
    for (std::size_t k = 0; k < fds.size(); ++k) {
      if (!(fds[k].revents & (POLLIN | POLLHUP))) continue;
      auto bye = sockets[index[k]].read_goodbye(2s);
      done[index[k]] = true;
      ASSERT_TRUE(bye.has_value()) << "a refused connection closed without a Goodbye";
      reason = *bye;
      ++refused;
    }
  }
  EXPECT_EQ(refused, 900u);
  EXPECT_THAT(reason, HasSubstr("too many clients (max_clients 100)"));
  const unsigned threads_during = server.threads();
  const std::uint64_t rss_during = server.rss_bytes();
  std::printf("flood: %u of 1000 refused; ferryd %u threads (before %u), RSS %.1f MiB (before %.1f MiB)\n", refused,
              threads_during, threads_before, static_cast<double>(rss_during) / (1 << 20),
              static_cast<double>(rss_before) / (1 << 20));
  EXPECT_EQ(threads_during, threads_before);
  // A connection costs a socket, a session and a 64 KiB read buffer: a
  // hundred held and nine hundred turned away stay well under 64 MiB more
  // (sanitizer builds included).
  EXPECT_LT(rss_during - rss_before, 64u << 20);
  // The hundred admitted are still open: nothing was said to them.
  for (std::size_t i = 0; i < sockets.size(); ++i) {
    if (done[i]) continue;
    pollfd p{sockets[i].fd(), POLLIN, 0};
    EXPECT_EQ(::poll(&p, 1, 0), 0) << "admitted connection " << i << " was closed";
  }

  // Freed slots are usable again and the server serves as before.
  sockets.clear();
  Client client;
  for (int attempt = 0; attempt < 100; ++attempt) {
    try {
      client = connect(server.unix_uri());
      break;
    } catch (const Error&) {
      std::this_thread::sleep_for(50ms);  // the server has not seen every close yet
    }
  }
  ASSERT_TRUE(client.is_open());
  test::v1::EchoCall call;
  call.set_payload("after the flood");
  EXPECT_EQ(TestSvc::Stub<Client>(client).echo_future(call).get().payload(), "after the flood");
}

TEST_F(LimitsTest, ClientThatNeverSaysHelloIsDroppedAtTheAuthTimeout) {
  FerrydProcess server({"--auth-timeout", "500"});
  Client client = connect(server.tcp_uri());  // a good client, served throughout
  {
    auto start = std::chrono::steady_clock::now();
    RawSocket silent_unix = RawSocket::connect_unix(server.socket_path());
    RawSocket silent_tcp = RawSocket::connect_tcp(server.tcp_port());
    // A slow client: one byte of a frame prefix, then nothing.
    RawSocket dribble = RawSocket::connect_tcp(server.tcp_port());
    const std::uint8_t one = 0;
    dribble.send({&one, 1});
    auto seen = std::chrono::steady_clock::now() + 2s;  // accepted by now, or soon
    while (stats(client).clients() != 4u && std::chrono::steady_clock::now() < seen) std::this_thread::sleep_for(5ms);
    EXPECT_EQ(stats(client).clients(), 4u);
    for (RawSocket* s : {&silent_unix, &silent_tcp, &dribble}) {
      auto bye = s->read_goodbye(5s);
      ASSERT_TRUE(bye.has_value());
      EXPECT_THAT(*bye, HasSubstr("Hello not completed within 500 ms (auth_timeout)"));
      EXPECT_TRUE(s->wait_closed(5s));
    }
    const auto waited = std::chrono::steady_clock::now() - start;
    EXPECT_GE(waited, 450ms);
  }
  // The slow ones are gone and freed; the good one carries on.
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (stats(client).clients() != 1u && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(20ms);
  EXPECT_EQ(stats(client).clients(), 1u);
}

TEST_F(LimitsTest, ClientThatStopsAfterHelloIsDroppedWhenSaslIsRequired) {
  FerrydProcess server({"--auth-unix", "sasl", "--auth-timeout", "500"});
  RawSocket s = RawSocket::connect_unix(server.socket_path());
  s.hello();
  auto bye = s.read_goodbye(5s);
  ASSERT_TRUE(bye.has_value());
  EXPECT_THAT(*bye, HasSubstr("authentication not completed within 500 ms (auth_timeout)"));
}

TEST_F(LimitsTest, OnlyProgramZeroIsServedBeforeAuthentication) {
  FerrydProcess server({"--auth-unix", "sasl"});
  RawSocket s = RawSocket::connect_unix(server.socket_path());
  s.hello();
  test::v1::EchoCall echo;
  echo.set_payload("x");
  s.send_frame({TestSvc::program, TestSvc::version, TestSvc::Echo::number, rpc::FrameType::call, 2,
                rpc::FrameStatus::ok},
               echo.SerializeAsString());
  const ferry::v1::Error e = s.read_error();
  EXPECT_EQ(e.code(), ferry::v1::UNAUTHENTICATED);
  EXPECT_THAT(e.message(), HasSubstr("authentication required"));
  // Program 0 still answers: the mechanisms on offer.
  s.send_frame({Control::program, Control::version, Control::AuthList::number, rpc::FrameType::call, 3,
                rpc::FrameStatus::ok},
               "");
  rpc::Header h;
  std::vector<std::uint8_t> body;
  ASSERT_TRUE(s.read_frame(h, body));
  ASSERT_EQ(h.status, rpc::FrameStatus::ok);
  ferry::v1::AuthListReply list;
  ASSERT_TRUE(list.ParseFromArray(body.data(), static_cast<int>(body.size())));
  EXPECT_THAT(std::vector<std::string>(list.mechanisms().begin(), list.mechanisms().end()),
              ::testing::Contains("SCRAM-SHA-256"));
  // And a library client without credentials is told what is missing.
  auto error = error_of([&] { connect(server.unix_uri()); });
  EXPECT_EQ(error.code(), Code::unauthenticated);
  EXPECT_THAT(error.message(), HasSubstr("requires SASL authentication; give a user name and password"));
}

TEST_F(LimitsTest, UnauthenticatedConnectionsAreCappedAndFreedByHello) {
  FerrydProcess server({"--max-unauthenticated-clients", "2"});
  RawSocket a = RawSocket::connect_unix(server.socket_path());
  RawSocket b = RawSocket::connect_unix(server.socket_path());
  RawSocket c = RawSocket::connect_unix(server.socket_path());
  auto bye = c.read_goodbye(5s);
  ASSERT_TRUE(bye.has_value());
  EXPECT_THAT(*bye, HasSubstr("too many connections still authenticating (max_unauthenticated_clients 2)"));
  // Hello ends a's unauthenticated state; a new client fits again.
  a.hello();
  RawSocket d = RawSocket::connect_unix(server.socket_path());
  d.hello();
  // A full client library connection works as well once b is gone.
  b.hello();
  Client client = connect(server.unix_uri());
  EXPECT_GE(stats(client).clients(), 3u);
}

TEST_F(LimitsTest, IdleConnectionsAreClosedButBusyOnesAreNot) {
  FerrydProcess server({"--idle-timeout", "400"});
  Client idle = connect(server.unix_uri());
  Client busy = connect(server.unix_uri());
  test::v1::SleepCall sleep;
  sleep.set_ms(1200);
  auto long_call = busy.call_future<TestSvc::Sleep>(sleep);
  std::this_thread::sleep_for(900ms);
  EXPECT_FALSE(idle.is_open()) << "an idle connection outlived --idle-timeout";
  auto error = error_of([&] { stats(idle); });
  EXPECT_THAT(error.message(), HasSubstr("idle for 400 ms"));
  EXPECT_NO_THROW(long_call.get());
  EXPECT_TRUE(busy.is_open());
  EXPECT_NO_THROW(stats(busy));
}

TEST_F(LimitsTest, StreamsPerClientAreCapped) {
  FerrydProcess server({"--max-streams-per-client", "2"});
  Client client = connect(server.unix_uri());
  auto first = stream::open<TestSvc::Upload>(client, test::v1::UploadCall{});
  auto second = stream::open<TestSvc::Upload>(client, test::v1::UploadCall{});
  auto third = stream::open<TestSvc::Upload>(client, test::v1::UploadCall{});
  auto error = error_of([&] { third.reply_sync(); });
  EXPECT_EQ(error.code(), Code::resource_exhausted);
  EXPECT_THAT(error.message(), HasSubstr("too many streams open on this connection (limit 2"));
  EXPECT_TRUE(error.retryable());
  // Plain calls are not streams and still go through.
  EXPECT_NO_THROW(stats(client));
  first.stream->finish_sync();
  first.reply_sync();
  auto fourth = stream::open<TestSvc::Upload>(client, test::v1::UploadCall{});
  fourth.stream->finish_sync();
  EXPECT_NO_THROW(fourth.reply_sync());
  second.stream->finish_sync();
  EXPECT_NO_THROW(second.reply_sync());
}

TEST_F(LimitsTest, GlobalLimitsRefuseNewCallsAndStreamsAsOverloadedAndRecover) {
  FerrydProcess server({"--max-calls", "8", "--max-streams", "2"});
  Client a = connect(server.unix_uri());
  Client b = connect(server.unix_uri());
  // Two streams from a fill the daemon's stream slots: b's stream is
  // refused at once, with a retryable error that says why.
  auto first = stream::open<TestSvc::Upload>(a, test::v1::UploadCall{});
  auto second = stream::open<TestSvc::Upload>(a, test::v1::UploadCall{});
  // (a's calls and b's arrive on different connections: let a's in first.)
  for (int i = 0; i < 500 && stats(a).streams_open() < 2; ++i) std::this_thread::sleep_for(10ms);
  auto refused = stream::open<TestSvc::Upload>(b, test::v1::UploadCall{});
  auto error = error_of([&] { refused.reply_sync(); });
  EXPECT_EQ(error.code(), Code::resource_exhausted);
  EXPECT_THAT(error.message(), HasSubstr("overloaded: 2 streams open across all clients (max_streams)"));
  EXPECT_TRUE(error.retryable());
  EXPECT_NO_THROW(stats(b)) << "plain calls are under max_calls and go through";

  // Six sleeping calls from a: with its two streams, 8 calls are in flight,
  // and b's next call is refused the same way, not queued.
  std::vector<std::future<test::v1::SleepReply>> sleeping;
  test::v1::SleepCall sleep;
  sleep.set_ms(60000);
  for (int i = 0; i < 6; ++i) sleeping.push_back(a.call_future<TestSvc::Sleep>(sleep));
  // (The sleeping calls are in flight once b is refused; until then b's
  // calls go through.)
  std::optional<Error> call_error;
  auto refusal_took = std::chrono::steady_clock::duration{};
  for (int i = 0; i < 500 && !call_error; ++i) {
    // A sleeping call that reached the daemon while b's probe held the last
    // slot was refused (retryable): send it again, as a client would.
    for (auto& f : sleeping) {
      if (f.wait_for(0s) != std::future_status::ready) continue;
      EXPECT_EQ(error_of([&] { f.get(); }).code(), Code::resource_exhausted);
      f = a.call_future<TestSvc::Sleep>(sleep);
    }
    const auto start = std::chrono::steady_clock::now();
    try {
      stats(b);
      std::this_thread::sleep_for(10ms);
    } catch (const Error& e) {
      call_error = e;
      refusal_took = std::chrono::steady_clock::now() - start;
    }
  }
  ASSERT_TRUE(call_error.has_value()) << "b was never refused with 8 calls in flight";
  EXPECT_LT(refusal_took, 2s) << "a refusal must not wait";
  EXPECT_EQ(call_error->code(), Code::resource_exhausted);
  EXPECT_THAT(call_error->message(), HasSubstr("overloaded: 8 calls in flight across all clients (max_calls)"));
  EXPECT_TRUE(call_error->retryable());

  // As a's work ends, b gets through again.
  a.close();
  for (auto& f : sleeping) EXPECT_ANY_THROW(f.get());
  bool served = false;
  for (int i = 0; i < 200 && !served; ++i) {
    try {
      stats(b);
      served = true;
    } catch (const Error&) {
      std::this_thread::sleep_for(10ms);
    }
  }
  EXPECT_TRUE(served) << "the daemon never let b in again";
  auto later = stream::open<TestSvc::Upload>(b, test::v1::UploadCall{});
  later.stream->finish_sync();
  EXPECT_NO_THROW(later.reply_sync());
}

TEST_F(LimitsTest, UnixSocketIsPrivateByDefaultAndTakesModeAndGroup) {
  {
    FerrydProcess server;
    struct stat st {};
    ASSERT_EQ(::stat(server.socket_path().c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  }
  const std::string gid = std::to_string(::getgid());
  FerrydProcess server({"--unix-socket-mode", "0660", "--unix-socket-group", gid});
  struct stat st {};
  ASSERT_EQ(::stat(server.socket_path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_EQ(st.st_gid, ::getgid());
}

TEST_F(LimitsTest, HandlersSeeThePeerCredentials) {
  FerrydProcess server;
  Client client = connect(server.unix_uri());
  auto who = client.call_future<TestSvc::WhoAmI>(test::v1::WhoAmICall{}).get();
  EXPECT_EQ(who.transport(), "unix");
  EXPECT_EQ(who.uid(), static_cast<int>(::getuid()));
  EXPECT_EQ(who.gid(), static_cast<int>(::getgid()));
  EXPECT_EQ(who.pid(), static_cast<int>(::getpid()));
  Client tcp = connect(server.tcp_uri());
  auto who_tcp = tcp.call_future<TestSvc::WhoAmI>(test::v1::WhoAmICall{}).get();
  EXPECT_EQ(who_tcp.transport(), "tcp");
  EXPECT_EQ(who_tcp.uid(), -1);
}

TEST_F(LimitsTest, UnixAccessRuleRefusesOtherUids) {
  // Allow only a uid that is not ours.
  const std::string other = std::to_string(::getuid() + 4242);
  FerrydProcess server({"--unix-allowed-user", other});
  auto error = error_of([&] { connect(server.unix_uri()); });
  EXPECT_EQ(error.code(), Code::permission_denied);
  EXPECT_THAT(error.message(), HasSubstr("uid " + std::to_string(::getuid()) + " is not allowed to use this socket"));
  // TCP is not governed by the UNIX rule.
  EXPECT_NO_THROW(connect(server.tcp_uri()));
}

}  // namespace
}  // namespace ferry::testing

namespace ferry::testing {
namespace {

// Sends `count` Echo calls asking for `reply_size` bytes each on `s`, from
// a thread (the daemon may stop reading, so the sends may block until the
// socket is shut down).
std::thread ask_and_never_read(RawSocket& s, int count, std::uint32_t reply_size) {
  return std::thread([&s, count, reply_size] {
    test::v1::EchoCall echo;
    echo.set_reply_size(reply_size);
    const std::string body = echo.SerializeAsString();
    try {
      for (int i = 0; i < count; ++i)
        s.send_frame({TestSvc::program, TestSvc::version, TestSvc::Echo::number, rpc::FrameType::call,
                      static_cast<rpc::Serial>(10 + i), rpc::FrameStatus::ok},
                     body);
    } catch (const std::exception&) {
      // The socket was shut down under a blocked send: the test is over.
    }
  });
}

// A client that asks for a gigabyte of replies and reads none: the daemon
// stops reading it once max_buffered_bytes_per_client is queued, so what it
// holds stays near that bound, and everyone else is served.
TEST_F(LimitsTest, AClientThatAsksButNeverReadsCannotGrowTheDaemonsMemory) {
  FerrydProcess server({"--max-buffered-bytes-per-client", std::to_string(16 << 20)});
  Client probe = connect(server.unix_uri());
  const std::uint64_t rss_before = server.rss_bytes();
  RawSocket s = RawSocket::connect_unix(server.socket_path());
  s.hello();
  std::thread sender = ask_and_never_read(s, 1024, 1u << 20);
  test::v1::StatsReply st;
  EXPECT_TRUE(eventually([&] { return (st = stats(probe)).read_pauses() >= 1; }, 10s)) << st.DebugString();
  std::this_thread::sleep_for(500ms);
  st = stats(probe);
  // 16 MiB queued, plus what the handlers of the last few calls read before
  // the pause made (at most 32 replies) and one batch being written.
  EXPECT_LT(st.buffer_bytes_in_use(), 64u << 20) << st.DebugString();
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  EXPECT_LT(server.rss_bytes(), rss_before + (160u << 20));  // sanitizers keep freed memory in quarantine
#else
  (void)rss_before;
#endif
  // Others are served meanwhile.
  test::v1::EchoCall echo;
  echo.set_payload("still here");
  EXPECT_EQ(probe.call_future<TestSvc::Echo>(echo).get().payload(), "still here");
  ::shutdown(s.fd(), SHUT_RDWR);
  sender.join();
  EXPECT_TRUE(eventually([&] { return stats(probe).buffer_bytes_in_use() < (4u << 20); }, 10s));
}

// Both buffered-bytes bounds change at run time through the admin socket;
// the per-client one reaches clients already connected.
TEST_F(LimitsTest, BufferedBytesLimitsChangeAtRunTimeEvenForConnectedClients) {
  using Admin = ferry::v1::Admin;
  FerrydProcess server;  // 64 MiB per client, 1 GiB in all
  Client probe = connect(server.unix_uri());
  Client admin = connect("ferry+unix://" + server.dir() + "/ferryd-admin.sock");
  RawSocket s = RawSocket::connect_unix(server.socket_path());
  s.hello();  // connected under the old bound

  ferry::v1::AdminLimits set;
  set.set_max_buffered_bytes_per_client(8u << 20);
  auto now = admin.call_future<Admin::LimitsSet>(set).get();
  EXPECT_EQ(now.max_buffered_bytes_per_client(), 8u << 20);
  EXPECT_EQ(now.max_buffered_bytes(), 1u << 30);

  std::thread sender = ask_and_never_read(s, 1024, 256u << 10);
  test::v1::StatsReply st;
  EXPECT_TRUE(eventually([&] { return (st = stats(probe)).read_pauses() >= 1; }, 10s)) << st.DebugString();
  std::this_thread::sleep_for(500ms);
  st = stats(probe);
  // 8 MiB queued plus the replies of the last 32 requests read; under the
  // old bound the queue would have passed 64 MiB.
  EXPECT_LT(st.buffer_bytes_in_use(), 32u << 20) << st.DebugString();

  // The global bound, lowered under what is held: new calls are refused...
  ferry::v1::AdminLimits global;
  global.set_max_buffered_bytes(4u << 20);
  EXPECT_EQ(admin.call_future<Admin::LimitsSet>(global).get().max_buffered_bytes(), 4u << 20);
  test::v1::EchoCall echo;
  echo.set_payload("x");
  auto e = error_of([&] { probe.call_future<TestSvc::Echo>(echo).get(); });
  EXPECT_EQ(e.code(), Code::resource_exhausted);
  EXPECT_THAT(e.message(), HasSubstr("max_buffered_bytes"));
  // ...and taken away (0: no bound), they are served again.
  global.set_max_buffered_bytes(0);
  EXPECT_EQ(admin.call_future<Admin::LimitsSet>(global).get().max_buffered_bytes(), 0u);
  EXPECT_EQ(probe.call_future<TestSvc::Echo>(echo).get().payload(), "x");
  EXPECT_TRUE(server.wait_for_log("limits set: max_buffered_bytes_per_client=8388608"));

  ::shutdown(s.fd(), SHUT_RDWR);
  sender.join();
}

// Past max_buffered_bytes across all clients, a new call is refused at once
// as overloaded (retryable), and accepted again once the bytes are freed.
TEST_F(LimitsTest, NewCallsAreRefusedAsOverloadedWhileTheDaemonHoldsMaxBufferedBytes) {
  FerrydProcess server(
      {"--max-buffered-bytes-per-client", std::to_string(32 << 20), "--max-buffered-bytes", std::to_string(8 << 20)});
  Client probe = connect(server.unix_uri());
  auto s = std::make_unique<RawSocket>(RawSocket::connect_unix(server.socket_path()));
  s->hello();
  std::thread sender = ask_and_never_read(*s, 256, 1u << 20);
  test::v1::EchoCall echo;
  echo.set_payload("x");
  Error refused(Code::ok, "");
  EXPECT_TRUE(eventually([&] {
    try {
      probe.call_future<TestSvc::Echo>(echo).get();
      return false;
    } catch (const Error& e) {
      refused = e;
      return true;
    }
  }, 10s));
  EXPECT_EQ(refused.code(), Code::resource_exhausted);
  EXPECT_TRUE(refused.retryable());
  EXPECT_THAT(refused.message(), HasSubstr("max_buffered_bytes"));
  ::shutdown(s->fd(), SHUT_RDWR);
  sender.join();
  s.reset();
  EXPECT_TRUE(eventually([&] {
    try {
      return probe.call_future<TestSvc::Echo>(echo).get().payload() == "x";
    } catch (const Error&) {
      return false;
    }
  }, 10s));
}

}  // namespace
}  // namespace ferry::testing
