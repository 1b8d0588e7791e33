// Reconnecting (rpc::ReconnectOptions): a real ferryd killed (SIGKILL) and
// started again on the same socket, pool and TLS port while a Session with
// reconnecting on makes calls. Idempotent calls in flight are sent again and
// succeed; a call that is not idempotent fails with the not-replayed error
// and runs once; the attempts follow the backoff policy; with the daemon
// gone for good everything waiting fails naming the connect error; without
// the policy nothing changes. The C API and the CLI's --reconnect too.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "client/session.h"
#include "ferry/v1/test.ferry.h"
#include "stream/service.h"
#include "tests/error_of.h"
#include "tests/integration/ferryd_process.h"
#include "tests/integration/test_files.h"
#include "tests/material/sasl_users.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using TestProgram = test::v1::Test;
using Kind = rpc::ReconnectEvent::Kind;

std::uint16_t free_tcp_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

// A ferryd that can be killed and started again on the same UNIX socket,
// TLS port and pool.
class RestartableDaemon {
 public:
  explicit RestartableDaemon(const std::vector<std::string>& extra = {})
      : socket_(state_.path() + "/d.sock"), tls_port_(free_tcp_port()) {
    const auto& m = test_tls_material();
    args_ = {"--pool",   "default=" + state_.path() + "/pool",
             "--listen", "unix:" + socket_,
             "--listen", "tls:127.0.0.1:" + std::to_string(tls_port_),
             "--tls-ca", m.ca.cert,
             "--tls-cert", m.server.cert,
             "--tls-key", m.server.key};
    args_.insert(args_.end(), extra.begin(), extra.end());
    start();
  }
  void start() { process_ = std::make_unique<FerrydProcess>(args_); }
  void kill() { process_.reset(); }  // SIGKILL, then reaped
  std::string uri(TransportKind kind) const {
    return kind == TransportKind::tls ? "ferry+tls://127.0.0.1:" + std::to_string(tls_port_) : "ferry+unix://" + socket_;
  }
  std::string path(const std::string& name) const { return state_.path() + "/" + name; }
  FerrydProcess& process() { return *process_; }

 private:
  TempDir state_;
  std::string socket_;
  std::uint16_t tls_port_;
  std::vector<std::string> args_;
  std::unique_ptr<FerrydProcess> process_;
};

// Lines of the Tally journal equal to `tag`.
int runs_of(const std::string& journal, std::uint64_t tag) {
  std::ifstream in(journal);
  std::string line;
  int n = 0;
  while (std::getline(in, line))
    if (line == std::to_string(tag)) ++n;
  return n;
}

template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout = 20s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

// Collects what the reconnect hook reports.
struct Recorder {
  std::mutex mutex;
  std::vector<rpc::ReconnectEvent> events;
  void attach(rpc::ReconnectOptions& r) {
    r.on_event = [this](const rpc::ReconnectEvent& e) {
      std::lock_guard lock(mutex);
      events.push_back(e);
    };
  }
  std::vector<rpc::ReconnectEvent> snapshot() {
    std::lock_guard lock(mutex);
    return events;
  }
  std::size_t count(Kind kind) {
    std::size_t n = 0;
    for (const auto& e : snapshot()) n += e.kind == kind;
    return n;
  }
};

rpc::ClientOptions reconnecting(TransportKind kind, Recorder& recorder) {
  rpc::ClientOptions o = client_options_for(kind);
  o.reconnect.enabled = true;
  o.reconnect.initial_backoff = 50ms;
  o.reconnect.max_backoff = 400ms;
  o.reconnect.give_up_after = 30s;
  recorder.attach(o.reconnect);
  return o;
}

test::v1::TallyCall tally(const std::string& journal, std::uint64_t tag, std::uint32_t ms) {
  test::v1::TallyCall c;
  c.set_journal(journal);
  c.set_tag(tag);
  c.set_ms(ms);
  return c;
}

class ReconnectTest : public ::testing::TestWithParam<TransportKind> {};

// (a) and (f): idempotent calls, in flight at the kill and made during the
// outage, all succeed; the one in flight ran once before and once after.
TEST_P(ReconnectTest, IdempotentCallsSurviveADaemonRestart) {
  RestartableDaemon d;
  Recorder recorder;
  Session s = Session::connect(d.uri(GetParam()), reconnecting(GetParam(), recorder));
  s.vol_create("default", "v", 1 * MiB);
  const std::string journal = d.path("journal");

  auto in_flight = s.rpc().call_future<TestProgram::TallyIdempotent>(tally(journal, 1, 1000));
  rpc::CallOptions cancellable;
  cancellable.cancel = std::make_shared<rpc::CancelSource>();
  auto to_cancel = s.rpc().call_future<TestProgram::TallyIdempotent>(tally(journal, 2, 60000), cancellable);
  ASSERT_TRUE(eventually([&] { return runs_of(journal, 1) == 1 && runs_of(journal, 2) == 1; }))
      << "the calls never reached the daemon";

  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::string first_failure;
  std::mutex failure_mutex;
  std::thread caller([&] {
    for (int i = 0; !stop.load() || i < 5; ++i) {
      try {
        test::v1::EchoCall echo;
        echo.set_payload("echo " + std::to_string(i));
        const auto reply = s.rpc().call_future<TestProgram::Echo>(echo).get();
        const auto info = s.vol_info("default", "v");
        if (reply.payload() == echo.payload() && info.capacity() == 1 * MiB)
          ++ok;
        else
          ++failed;
      } catch (const Error& e) {
        ++failed;
        std::lock_guard lock(failure_mutex);
        if (first_failure.empty()) first_failure = e.describe();
      }
      std::this_thread::sleep_for(20ms);
    }
  });
  std::this_thread::sleep_for(100ms);
  d.kill();
  std::this_thread::sleep_for(500ms);
  d.start();
  const auto reply = in_flight.get();
  EXPECT_EQ(reply.tag(), 1u);
  stop = true;
  caller.join();
  EXPECT_EQ(failed.load(), 0) << first_failure;
  EXPECT_GE(ok.load(), 5);
  EXPECT_EQ(runs_of(journal, 1), 2) << "ran before the kill and once more after it, never more";
  // A replayed call can still be cancelled.
  ASSERT_TRUE(eventually([&] { return runs_of(journal, 2) == 2; })) << "the second call was not sent again";
  cancellable.cancel->cancel();
  const Error cancelled = error_of([&] { to_cancel.get(); });
  EXPECT_EQ(cancelled.code(), Code::cancelled) << cancelled.describe();

  const auto stats = s.rpc().reconnect_stats();
  EXPECT_EQ(stats.connections_lost, 1u);
  EXPECT_EQ(stats.reconnects, 1u);
  EXPECT_GE(stats.calls_replayed, 1u);
  EXPECT_EQ(stats.calls_failed_not_idempotent, 0u);
  const auto events = recorder.snapshot();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.front().kind, Kind::lost);
  EXPECT_GE(events.front().replaying, 1u);
  EXPECT_EQ(events.back().kind, Kind::reconnected);
  EXPECT_TRUE(s.rpc().is_connected());
  if (GetParam() == TransportKind::tls) {
    test::v1::WhoAmICall who;
    EXPECT_EQ(s.rpc().call_future<TestProgram::WhoAmI>(who).get().transport(), "tls");
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, ReconnectTest, ::testing::Values(TransportKind::unix_socket, TransportKind::tls),
                         [](const auto& info) { return std::string(to_string(info.param)); });

// TLS and SASL are done again with the same credentials.
TEST(Reconnect, AuthenticatesAgainWithSasl) {
  TempDir users;
  const std::string sasldb = users.path() + "/sasldb";
  add_sasl_user(sasldb, "ferry", "ferry", "alice", "alice-secret");
  RestartableDaemon d({"--auth-tls", "sasl", "--sasl-db", sasldb, "--sasl-realm", "ferry"});
  Recorder recorder;
  rpc::ClientOptions o = reconnecting(TransportKind::tls, recorder);
  o.sasl.username = "alice";
  o.sasl.password = "alice-secret";
  o.sasl.realm = "ferry";
  Session s = Session::connect(d.uri(TransportKind::tls), o);
  const test::v1::WhoAmICall who;
  EXPECT_EQ(s.rpc().call_future<TestProgram::WhoAmI>(who).get().user(), "alice");
  d.kill();
  d.start();
  const auto me = s.rpc().call_future<TestProgram::WhoAmI>(who).get();
  EXPECT_EQ(me.user(), "alice");
  EXPECT_EQ(me.transport(), "tls");
  EXPECT_EQ(me.tls_subject(), "CN=client1,O=ferry tests");
  EXPECT_EQ(s.rpc().server().user, "alice");
  EXPECT_EQ(s.rpc().reconnect_stats().reconnects, 1u);
}

// (b): a call that is not idempotent, in flight at the kill, fails with the
// not-replayed error and has run once; a stream in flight fails too.
TEST(Reconnect, NotIdempotentCallInFlightFailsAndRunsOnce) {
  RestartableDaemon d;
  Recorder recorder;
  Session s = Session::connect(d.uri(TransportKind::unix_socket), reconnecting(TransportKind::unix_socket, recorder));
  const std::string journal = d.path("journal");

  test::v1::DownloadCall big;
  big.set_size(1ull << 40);
  auto download = stream::open<TestProgram::Download>(s.rpc(), big);
  ASSERT_EQ(download.stream->read_sync().kind, stream::Item::Kind::data);

  auto in_flight = s.rpc().call_future<TestProgram::Tally>(tally(journal, 7, 5000));
  ASSERT_TRUE(eventually([&] { return runs_of(journal, 7) == 1; })) << "the call never reached the daemon";
  d.kill();
  const Error e = error_of([&] { in_flight.get(); });
  EXPECT_EQ(e.code(), Code::unavailable) << e.describe();
  EXPECT_NE(e.message().find("not replayed because Tally is not idempotent"), std::string::npos) << e.describe();
  EXPECT_TRUE(rpc::lost_with_reconnect(e));

  const Error se = error_of([&] {
    for (;;)
      if (download.stream->read_sync().kind == stream::Item::Kind::end) break;
  });
  EXPECT_EQ(se.code(), Code::unavailable) << se.describe();
  EXPECT_NE(se.message().find("Download stream"), std::string::npos) << se.describe();

  d.start();
  // Once this has run, anything sent again would have reached the daemon.
  EXPECT_EQ(s.rpc().call_future<TestProgram::TallyIdempotent>(tally(journal, 8, 0)).get().tag(), 8u);
  EXPECT_EQ(runs_of(journal, 7), 1) << "the non-idempotent call ran again";
  EXPECT_EQ(runs_of(journal, 8), 1);
  const auto stats = s.rpc().reconnect_stats();
  EXPECT_EQ(stats.calls_failed_not_idempotent, 1u);
  EXPECT_EQ(stats.streams_failed, 1u);
  EXPECT_EQ(stats.reconnects, 1u);
  const auto events = recorder.snapshot();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.front().failed_not_idempotent, 1u);
  EXPECT_EQ(events.front().streams_failed, 1u);
}

// (c): with the daemon down for 1.5 s the attempts follow the policy, as
// the hook reports them; calls made meanwhile wait, time out or are
// cancelled as asked.
TEST(Reconnect, AttemptsFollowTheBackoffPolicy) {
  RestartableDaemon d;
  Recorder recorder;
  rpc::ClientOptions o = reconnecting(TransportKind::unix_socket, recorder);
  o.reconnect.initial_backoff = 100ms;
  o.reconnect.max_backoff = 400ms;
  o.reconnect.multiplier = 2;
  o.reconnect.jitter = 0.2;
  const auto policy = o.reconnect;
  Session s = Session::connect(d.uri(TransportKind::unix_socket), o);
  d.kill();
  ASSERT_TRUE(eventually([&] { return recorder.count(Kind::attempt_failed) >= 1; }));

  // Made while reconnecting: one waits and succeeds, one times out, one is cancelled.
  test::v1::EchoCall echo;
  echo.set_payload("after");
  auto waits = s.rpc().call_future<TestProgram::Echo>(echo);
  auto times_out = s.rpc().call_future<TestProgram::Echo>(echo, rpc::with_timeout(200ms));
  rpc::CallOptions cancellable;
  cancellable.cancel = std::make_shared<rpc::CancelSource>();
  auto cancelled = s.rpc().call_future<TestProgram::Echo>(echo, cancellable);
  cancellable.cancel->cancel();
  const Error c = error_of([&] { cancelled.get(); });
  EXPECT_EQ(c.code(), Code::cancelled) << c.describe();
  const Error t = error_of([&] { times_out.get(); });
  EXPECT_EQ(t.code(), Code::deadline_exceeded) << t.describe();
  EXPECT_NE(t.message().find("waiting for the connection"), std::string::npos) << t.describe();

  std::this_thread::sleep_for(1500ms);
  d.start();
  EXPECT_EQ(waits.get().payload(), "after");
  ASSERT_TRUE(eventually([&] { return recorder.count(Kind::reconnected) == 1; }));

  std::vector<rpc::ReconnectEvent> failed;
  rpc::ReconnectEvent done;
  for (const auto& e : recorder.snapshot()) {
    if (e.kind == Kind::attempt_failed) failed.push_back(e);
    if (e.kind == Kind::reconnected) done = e;
  }
  // 1.5 s of outage: with delays of at most 120, 240, 400 ms at least four
  // attempts start before the daemon is back (three failed is the floor
  // even on a slow machine).
  ASSERT_GE(failed.size(), 3u);
  std::chrono::milliseconds expected = policy.initial_backoff;
  double min_total = 0;
  std::size_t allowed = 1;  // attempts the policy allows within done.elapsed
  for (std::size_t i = 0; i < failed.size(); ++i) {
    const auto& e = failed[i];
    SCOPED_TRACE("attempt " + std::to_string(e.attempt));
    EXPECT_EQ(e.attempt, i + 1);
    EXPECT_EQ(e.backoff, expected) << "backoff grows by the multiplier up to max_backoff";
    EXPECT_LE(e.backoff, policy.max_backoff);
    if (i > 0) {
      EXPECT_GE(e.backoff, failed[i - 1].backoff) << "non-decreasing";
      EXPECT_GE(e.elapsed - failed[i - 1].elapsed, failed[i - 1].delay - 2ms) << "waited the delay before trying again";
    }
    const double low = static_cast<double>(e.backoff.count()) * (1 - policy.jitter) - 1;
    const double high = std::min(static_cast<double>(e.backoff.count()) * (1 + policy.jitter),
                                 static_cast<double>(policy.max_backoff.count())) + 1;
    EXPECT_GE(static_cast<double>(e.delay.count()), low);
    EXPECT_LE(static_cast<double>(e.delay.count()), high);
    EXPECT_TRUE(e.error.has_value());
    expected = std::min(policy.max_backoff, expected * 2);
  }
  for (std::chrono::milliseconds b = policy.initial_backoff;; b = std::min(policy.max_backoff, b * 2)) {
    min_total += static_cast<double>(b.count()) * (1 - policy.jitter);
    if (min_total > static_cast<double>(done.elapsed.count()) + 1) break;
    ++allowed;
  }
  EXPECT_EQ(done.attempt, failed.size() + 1);
  EXPECT_LE(done.attempt, allowed) << "more attempts than the backoff allows in " << done.elapsed.count() << " ms";
  const auto stats = s.rpc().reconnect_stats();
  EXPECT_EQ(stats.attempts, done.attempt);
  EXPECT_EQ(stats.reconnects, 1u);
}

// (d): the daemon never comes back: after give_up_after everything waiting
// fails with UNAVAILABLE naming the connect error, and the client is closed.
TEST(Reconnect, GivesUpAndFailsWhatWaits) {
  RestartableDaemon d;
  Recorder recorder;
  rpc::ClientOptions o = reconnecting(TransportKind::unix_socket, recorder);
  o.reconnect.give_up_after = 800ms;
  Session s = Session::connect(d.uri(TransportKind::unix_socket), o);
  const std::string journal = d.path("journal");
  auto in_flight = s.rpc().call_future<TestProgram::TallyIdempotent>(tally(journal, 3, 10000));
  ASSERT_TRUE(eventually([&] { return runs_of(journal, 3) == 1; }));
  d.kill();
  auto waiting = s.rpc().call_future<TestProgram::Echo>(test::v1::EchoCall{});
  for (auto* f : {&waiting}) {
    const Error e = error_of([&] { f->get(); });
    EXPECT_EQ(e.code(), Code::unavailable) << e.describe();
    EXPECT_NE(e.message().find("gave up reconnecting to"), std::string::npos) << e.describe();
    EXPECT_NE(e.message().find("last error: "), std::string::npos) << e.describe();
    EXPECT_NE(e.message().find("d.sock"), std::string::npos) << e.describe();
  }
  const Error replayed = error_of([&] { in_flight.get(); });
  EXPECT_EQ(replayed.code(), Code::unavailable) << replayed.describe();
  EXPECT_NE(replayed.message().find("gave up reconnecting"), std::string::npos) << replayed.describe();
  EXPECT_FALSE(s.rpc().is_open());
  EXPECT_EQ(recorder.count(Kind::gave_up), 1u);
  EXPECT_EQ(s.rpc().reconnect_stats().gave_up, 1u);
  const Error after = error_of([&] { s.vol_list("default"); });
  EXPECT_EQ(after.code(), Code::unavailable) << after.describe();
}

// (e): without the policy a lost connection fails the call and the client
// stays closed, as before.
TEST(Reconnect, OffByDefault) {
  RestartableDaemon d;
  Session s = Session::connect(d.uri(TransportKind::unix_socket));
  test::v1::SleepCall sleep;
  sleep.set_ms(5000);
  auto in_flight = s.rpc().call_future<TestProgram::Sleep>(sleep);
  std::this_thread::sleep_for(100ms);
  d.kill();
  const Error e = error_of([&] { in_flight.get(); });
  EXPECT_EQ(e.code(), Code::unavailable) << e.describe();
  EXPECT_FALSE(rpc::lost_with_reconnect(e));
  d.start();
  const Error after = error_of([&] { s.vol_list("default"); });
  EXPECT_EQ(after.code(), Code::unavailable) << after.describe();
  EXPECT_FALSE(s.rpc().is_open());
  EXPECT_EQ(s.rpc().reconnect_stats().attempts, 0u);
}

// download_file resumes from where the lost connection cut it.
TEST(Reconnect, DownloadResumesAfterARestart) {
  RestartableDaemon d;
  Recorder recorder;
  Session s = Session::connect(d.uri(TransportKind::unix_socket), reconnecting(TransportKind::unix_socket, recorder));
  const std::string in = d.path("in"), out = d.path("out");
  make_file(in, 64 * MiB, {{0, 20 * MiB}, {40 * MiB, 24 * MiB}}, 5);
  UploadOptions create;
  create.create = true;
  s.upload_file("default", "v", in, create);
  bool restarted = false;
  const auto r = s.download_file("default", "v", out, {}, [&](const Progress& p) {
    if (!restarted && !p.finished && p.done > 0) {
      restarted = true;
      d.kill();
      d.start();
    }
  });
  EXPECT_TRUE(restarted);
  EXPECT_EQ(file_hash(out), file_hash(in));
  EXPECT_EQ(s.rpc().reconnect_stats().reconnects, 1u);
  EXPECT_EQ(s.rpc().reconnect_stats().streams_failed, 1u);
  EXPECT_EQ(r.data_bytes + r.hole_bytes, 64 * MiB) << "every byte counted once over both streams";
}

// (g) the C API: a session made with ferry_connect_reconnecting carries on
// across a restart (tests/integration/c_reconnect.c makes the calls).
TEST(Reconnect, CApi) {
  RestartableDaemon d;
  {
    Session s = Session::connect(d.uri(TransportKind::unix_socket));
    s.vol_create("default", "v", 2 * MiB);
  }
  const std::string go = d.path("go");
  ChildProcess program({FERRY_TEST_C_RECONNECT, d.uri(TransportKind::unix_socket), go});
  ASSERT_TRUE(eventually([&] { return program.output().find("first call done") != std::string::npos; }))
      << program.output();
  d.kill();
  std::ofstream(go).put('\n');
  std::this_thread::sleep_for(300ms);
  d.start();
  EXPECT_EQ(program.wait(30s), 0) << program.output();
  EXPECT_NE(program.output().find("capacity 2097152"), std::string::npos) << program.output();
  EXPECT_NE(program.output().find("reconnects 1"), std::string::npos) << program.output();
}

// (g) the CLI: `ferry --reconnect events` follows events across a restart
// (the subscription is made again); --reconnect on a verb that is not safe
// to repeat is a usage error.
TEST(Reconnect, CliEventsAcrossARestart) {
  RestartableDaemon d;
  ChildProcess events({ferry_cli_path(), "--reconnect", "-c", d.uri(TransportKind::unix_socket), "events", "--count",
                       "1", "--timeout", "30"});
  ASSERT_TRUE(eventually([&] { return events.output().find("following volume events") != std::string::npos; }))
      << events.output();
  d.kill();
  std::this_thread::sleep_for(300ms);
  d.start();
  ASSERT_TRUE(eventually([&] { return events.output().find("reconnected") != std::string::npos; })) << events.output();
  Session s = Session::connect(d.uri(TransportKind::unix_socket));
  // The subscription is renewed right after the reconnect; make volumes
  // until one is seen (the first may come before it is in place).
  int made = 0;
  while (events.wait(300ms) == -1 && made < 20) s.vol_create("default", "after-" + std::to_string(made++), MiB);
  EXPECT_EQ(events.wait(1s), 0) << events.output();
  EXPECT_NE(events.output().find("created"), std::string::npos) << events.output();

  std::string out;
  EXPECT_EQ(run_command({ferry_cli_path(), "--reconnect", "-c", d.uri(TransportKind::unix_socket), "vol-create",
                         "default/x", "1M"},
                        &out),
            2)
      << out;
  EXPECT_NE(out.find("--reconnect applies to"), std::string::npos) << out;
}

}  // namespace
}  // namespace ferry::testing
