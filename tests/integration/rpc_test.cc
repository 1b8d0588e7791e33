// Integration tests of the RPC layer against a real ferryd process, over
// UNIX and TCP sockets, TLS and gRPC streams.
#include <gtest/gtest.h>

#include <asio/co_spawn.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_future.hpp>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "ferry/v1/control.ferry.h"
#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "tests/error_of.h"
#include "tests/integration/ferryd_process.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
using rpc::Client;
using TestSvc = test::v1::Test;

class RpcTest : public ::testing::TestWithParam<TransportKind> {
 protected:
  FerrydProcess::GrpcListeners grpc_{GetParam() == TransportKind::grpc || GetParam() == TransportKind::grpcs};
  Client connect(FerrydProcess& server, rpc::ClientOptions options = {}) {
    return Client::connect_sync(io_.executor(), server.uri(GetParam()), client_options_for(GetParam(), options));
  }
  test::v1::StatsReply stats(Client& client) {
    return client.call_future<TestSvc::Stats>(test::v1::StatsCall{}).get();
  }

  rpc::IoThreads io_{2};
};

TEST_P(RpcTest, EchoReturnsThePayloadAndNegotiatesHello) {
  FerrydProcess server;
  Client client = connect(server);
  EXPECT_EQ(client.server().name, "ferryd");
  EXPECT_EQ(client.server().protocol_version, 1u);
  EXPECT_EQ(client.server().limits.max_chunk, 256u << 10);
  test::v1::EchoCall call;
  call.set_payload(std::string(1000, 'x') + "end");
  TestSvc::Stub<Client> stub(client);
  auto reply = stub.echo_future(call).get();
  EXPECT_EQ(reply.payload(), call.payload());
  EXPECT_EQ(reply.received(), call.payload().size());
}

TEST_P(RpcTest, RepliesArriveOutOfOrderAsHandlersFinish) {
  FerrydProcess server;
  Client client = connect(server);
  std::mutex mutex;
  std::vector<std::uint64_t> order;
  std::vector<std::future<void>> done;
  // Tags 0..4 sleep 400, 300, 200, 100, 0 ms: issued in order, answered in reverse.
  for (std::uint64_t tag = 0; tag < 5; ++tag) {
    test::v1::SleepCall call;
    call.set_ms(static_cast<std::uint32_t>(400 - tag * 100));
    call.set_tag(tag);
    auto promise = std::make_shared<std::promise<void>>();
    done.push_back(promise->get_future());
    client.async_call<TestSvc::Sleep>(call, {}, [&, promise](std::exception_ptr e, test::v1::SleepReply reply) {
      if (!e) {
        std::lock_guard lock(mutex);
        order.push_back(reply.tag());
      }
      promise->set_value();
    });
  }
  for (auto& f : done) f.get();
  EXPECT_EQ(order, (std::vector<std::uint64_t>{4, 3, 2, 1, 0}));
}

TEST_P(RpcTest, TenThousandCallsInFlightCompleteWithConstantServerThreads) {
  FerrydProcess server({"--io-threads", "2", "--worker-threads", "2"});
  Client client = connect(server);
  const unsigned threads_before = stats(client).threads();
  constexpr int calls = 10000;
  std::atomic<int> ok{0}, failed{0};
  std::promise<void> all_done;
  std::atomic<int> remaining{calls};
  test::v1::SleepCall call;
  call.set_ms(50);
  for (int i = 0; i < calls; ++i) {
    client.async_call<TestSvc::Sleep>(call, {}, [&](std::exception_ptr e, test::v1::SleepReply) {
      (e ? failed : ok).fetch_add(1);
      if (remaining.fetch_sub(1) == 1) all_done.set_value();
    });
  }
  // While they are in flight, the server holds thousands of them on the same
  // threads it started with.
  auto during = stats(client);
  all_done.get_future().get();
  auto after = stats(client);
  EXPECT_EQ(ok.load(), calls);
  EXPECT_EQ(failed.load(), 0);
  // gRPC starts a thread or two of its own on demand (its callback
  // executor); ferry's own count must not move, and gRPC's is bounded.
  const bool grpc = GetParam() == TransportKind::grpc || GetParam() == TransportKind::grpcs;
  const unsigned slack = grpc ? 2 : 0;
  EXPECT_LE(during.threads(), threads_before + slack);
  EXPECT_LE(after.threads(), threads_before + slack);
  EXPECT_GE(during.threads(), threads_before);
  EXPECT_GT(during.calls_in_flight(), 100u) << "the server should hold many calls at once";
  RecordProperty("server_threads", static_cast<int>(during.threads()));
  RecordProperty("server_rss_kib_in_flight", static_cast<int>(during.rss_bytes() / 1024));
  std::printf("server threads %u, RSS %.1f MiB with %llu calls in flight\n", during.threads(),
              during.rss_bytes() / 1048576.0, static_cast<unsigned long long>(during.calls_in_flight()));
}

TEST_P(RpcTest, CallsFromManyThreadsAndCoroutinesShareOneConnection) {
  FerrydProcess server;
  Client client = connect(server);
  TestSvc::Stub<Client> stub(client);
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) {
        test::v1::EchoCall call;
        call.set_payload("t" + std::to_string(t) + "-" + std::to_string(i));
        if (stub.echo_future(call).get().payload() != call.payload()) mismatches++;
      }
    });
  }
  // And coroutines on the client's io threads at the same time.
  std::vector<std::future<void>> coros;
  for (int c = 0; c < 4; ++c) {
    coros.push_back(asio::co_spawn(
        io_.executor(),
        [&, c]() -> asio::awaitable<void> {
          for (int i = 0; i < 500; ++i) {
            test::v1::EchoCall call;
            call.set_payload("c" + std::to_string(c) + "-" + std::to_string(i));
            auto reply = co_await stub.echo(call);
            if (reply.payload() != call.payload()) mismatches++;
          }
        },
        asio::use_future));
  }
  for (auto& t : threads) t.join();
  for (auto& f : coros) f.get();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST_P(RpcTest, DeadlineFailsTheCallAndStopsTheServerHandler) {
  FerrydProcess server;
  Client client = connect(server);
  test::v1::SleepCall call;
  call.set_ms(60000);
  auto err = error_of([&] { client.call_future<TestSvc::Sleep>(call, rpc::with_timeout(100ms)).get(); });
  EXPECT_EQ(err.code(), Code::deadline_exceeded);
  EXPECT_NE(err.message().find("100 ms"), std::string::npos) << err.message();
  // The server hears the CANCEL and lets go of the handler.
  test::v1::StatsReply s;
  for (int i = 0; i < 200; ++i) {
    s = stats(client);
    if (s.calls_in_flight() == 1 && s.handlers_cancelled() == 1) break;
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(s.calls_in_flight(), 1u) << "only the Stats call itself";
  EXPECT_EQ(s.handlers_cancelled(), 1u);
}

TEST_P(RpcTest, CancelEndsACallInFlightWithCancelledAfterTheServerLetsGo) {
  FerrydProcess server;
  Client client = connect(server);
  auto source = std::make_shared<rpc::CancelSource>();
  rpc::CallOptions options;
  options.cancel = source;
  test::v1::SleepCall call;
  call.set_ms(60000);
  auto future = client.call_future<TestSvc::Sleep>(call, options);
  // Wait until the server runs the handler, then cancel.
  for (int i = 0; i < 200 && stats(client).calls_in_flight() < 2; ++i) std::this_thread::sleep_for(5ms);
  source->cancel();
  auto err = error_of([&] { future.get(); });
  EXPECT_EQ(err.code(), Code::cancelled);
  // The reply came from the server after its handler ended: nothing is left.
  auto s = stats(client);
  EXPECT_EQ(s.calls_in_flight(), 1u);
  EXPECT_EQ(s.handlers_cancelled(), 1u);
  // The connection keeps working.
  test::v1::EchoCall echo;
  echo.set_payload("still here");
  EXPECT_EQ(client.call_future<TestSvc::Echo>(echo).get().payload(), "still here");
}

TEST_P(RpcTest, CancelBeforeTheCallIsSentMeansItIsNeverSent) {
  FerrydProcess server;
  Client client = connect(server);
  auto source = std::make_shared<rpc::CancelSource>();
  source->cancel();
  rpc::CallOptions options;
  options.cancel = source;
  test::v1::SleepCall call;
  call.set_ms(60000);
  auto err = error_of([&] { client.call_future<TestSvc::Sleep>(call, options).get(); });
  EXPECT_EQ(err.code(), Code::cancelled);
  auto s = stats(client);
  EXPECT_EQ(s.handlers_cancelled(), 0u) << "the server never saw the call";
  EXPECT_EQ(s.calls_in_flight(), 1u);
}

TEST_P(RpcTest, CancelAfterTheReplyIsANoOp) {
  FerrydProcess server;
  Client client = connect(server);
  auto source = std::make_shared<rpc::CancelSource>();
  rpc::CallOptions options;
  options.cancel = source;
  test::v1::EchoCall call;
  call.set_payload("done");
  EXPECT_EQ(client.call_future<TestSvc::Echo>(call, options).get().payload(), "done");
  source->cancel();
  EXPECT_EQ(stats(client).handlers_cancelled(), 0u);
}

TEST_P(RpcTest, AsioCancellationOfAnAwaitedCallSendsCancel) {
  using namespace asio::experimental::awaitable_operators;
  FerrydProcess server;
  Client client = connect(server);
  auto result = asio::co_spawn(
                    io_.executor(),
                    [&]() -> asio::awaitable<int> {
                      test::v1::SleepCall call;
                      call.set_ms(60000);
                      asio::steady_timer timer(co_await asio::this_coro::executor, 100ms);
                      try {
                        auto r = co_await (client.call<TestSvc::Sleep>(call) || timer.async_wait(asio::use_awaitable));
                        co_return static_cast<int>(r.index());
                      } catch (const Error& e) {
                        co_return e.code() == Code::cancelled ? 2 : 3;
                      }
                    },
                    asio::use_future)
                    .get();
  EXPECT_EQ(result, 1) << "the timer wins and the call is cancelled";
  test::v1::StatsReply s;
  for (int i = 0; i < 200; ++i) {
    s = stats(client);
    if (s.handlers_cancelled() == 1 && s.calls_in_flight() == 1) break;
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(s.handlers_cancelled(), 1u);
  EXPECT_EQ(s.calls_in_flight(), 1u);
}

TEST_P(RpcTest, HandlerErrorsArriveWithCodeMessageAndRetryable) {
  FerrydProcess server;
  Client client = connect(server);
  test::v1::FailCall call;
  call.set_code(ferry::v1::RESOURCE_EXHAUSTED);
  call.set_message("pool 'default' is full");
  call.set_retryable(true);
  auto err = error_of([&] { client.call_future<TestSvc::Fail>(call).get(); });
  EXPECT_EQ(err.code(), Code::resource_exhausted);
  EXPECT_EQ(err.message(), "pool 'default' is full");
  EXPECT_EQ(err.domain(), "test");
  EXPECT_TRUE(err.retryable());
}

TEST_P(RpcTest, ServerPushedMessagesReachTheRegisteredCallback) {
  FerrydProcess server;
  Client client = connect(server);
  std::mutex mutex;
  std::vector<std::uint32_t> seen;
  client.on_message<TestSvc::NoticeEvent>([&](test::v1::Notice n) {
    std::lock_guard lock(mutex);
    if (n.text() == "volume changed") seen.push_back(n.index());
  });
  test::v1::NotifyCall call;
  call.set_count(5);
  call.set_text("volume changed");
  auto reply = client.call_future<TestSvc::Notify>(call).get();
  EXPECT_EQ(reply.sent(), 5u);
  // MESSAGEs were queued before the reply on the same connection, so they
  // were delivered before it.
  std::lock_guard lock(mutex);
  EXPECT_EQ(seen, (std::vector<std::uint32_t>{0, 1, 2, 3, 4}));
}

TEST_P(RpcTest, ReplacingAMessageHandlerWaitsForTheRunningOne) {
  // A caller detaches a handler that captures its locals before they go
  // (the CLI's vol-copy does): the detach must not return while the old
  // handler still runs on the connection's strand.
  FerrydProcess server;
  Client client = connect(server);
  std::atomic<bool> entered{false}, left{false};
  client.on_message<TestSvc::NoticeEvent>([&](test::v1::Notice) {
    entered = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    left = true;
  });
  test::v1::NotifyCall call;
  call.set_count(1);
  call.set_text("slow handler");
  auto reply = client.call_future<TestSvc::Notify>(call);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!entered && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_TRUE(entered.load());
  client.on_message<TestSvc::NoticeEvent>([](test::v1::Notice) {});
  EXPECT_TRUE(left.load()) << "on_message returned while the handler it replaced was still running";
  EXPECT_EQ(reply.get().sent(), 1u);
}

TEST_P(RpcTest, UnknownProgramProcedureAndVersionAreUnimplementedAndTheConnectionLives) {
  FerrydProcess server;
  Client client = connect(server);
  auto raw_call = [&](std::uint32_t program, std::uint32_t version, std::uint32_t procedure) {
    return error_of([&] {
      struct Raw final : rpc::detail::CallCompletion {
        std::promise<rpc::detail::RawResult> p;
        void complete(rpc::detail::RawResult r) override { p.set_value(std::move(r)); }
      };
      auto raw = std::make_unique<Raw>();
      auto fut = raw->p.get_future();
      client.start_call(program, version, procedure, rpc::Buffer{}, {}, std::move(raw));
      auto r = fut.get();
      if (r.error) throw *r.error;
    });
  };
  auto e1 = raw_call(4242, 1, 1);
  EXPECT_EQ(e1.code(), Code::unimplemented);
  EXPECT_NE(e1.message().find("unknown program 4242"), std::string::npos) << e1.message();
  auto e2 = raw_call(TestSvc::program, TestSvc::version, 999);
  EXPECT_EQ(e2.code(), Code::unimplemented);
  EXPECT_NE(e2.message().find("no procedure 999"), std::string::npos) << e2.message();
  auto e3 = raw_call(TestSvc::program, 7, TestSvc::Echo::number);
  EXPECT_EQ(e3.code(), Code::unimplemented);
  EXPECT_NE(e3.message().find("version 7"), std::string::npos) << e3.message();
  EXPECT_TRUE(client.is_open());
}

TEST_P(RpcTest, TooManyCallsInFlightAreRefusedAsRetryableOverload) {
  FerrydProcess server({"--max-calls-per-client", "10"});
  Client client = connect(server);
  test::v1::SleepCall call;
  call.set_ms(300);
  std::vector<std::future<test::v1::SleepReply>> futures;
  for (int i = 0; i < 20; ++i) futures.push_back(client.call_future<TestSvc::Sleep>(call));
  int ok = 0, refused = 0;
  for (auto& f : futures) {
    try {
      f.get();
      ok++;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::resource_exhausted);
      EXPECT_TRUE(e.retryable());
      EXPECT_NE(e.message().find("limit 10"), std::string::npos) << e.message();
      refused++;
    }
  }
  EXPECT_EQ(ok, 10);
  EXPECT_EQ(refused, 10);
}

TEST_P(RpcTest, TooManyClientsAreTurnedAwayWithTheReason) {
  FerrydProcess server({"--max-clients", "2"});
  Client a = connect(server);
  Client b = connect(server);
  auto err = error_of([&] { connect(server); });
  EXPECT_EQ(err.code(), Code::resource_exhausted);
  EXPECT_NE(err.message().find("too many clients"), std::string::npos) << err.message();
  // The two admitted clients are unaffected, and a slot frees on close.
  test::v1::EchoCall call;
  call.set_payload("a");
  EXPECT_EQ(a.call_future<TestSvc::Echo>(call).get().payload(), "a");
  b.close();
  Client c;
  for (int i = 0; i < 100 && !c.is_open(); ++i) {
    try {
      c = connect(server);
    } catch (const Error&) {
      std::this_thread::sleep_for(10ms);
    }
  }
  EXPECT_TRUE(c.is_open());
}

TEST_P(RpcTest, FramesLargerThanOneGrpcMessageArriveWhole) {
  // 20 MiB: under the 32 MiB frame limit, over the 1 MiB the gRPC
  // transport puts in one message, so a frame spans twenty of them there.
  FerrydProcess server;
  Client client = connect(server);
  test::v1::EchoCall call;
  std::string payload(20u << 20, '\0');
  for (std::size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>((i * 7919u) >> 5);
  call.set_payload(payload);
  auto reply = client.call_future<TestSvc::Echo>(call).get();
  EXPECT_EQ(reply.received(), payload.size());
  EXPECT_TRUE(reply.payload() == payload);
  call.set_payload("small");
  EXPECT_EQ(client.call_future<TestSvc::Echo>(call).get().payload(), "small");
}

TEST_P(RpcTest, OversizedRequestFailsLocallyAndTheConnectionLives) {
  FerrydProcess server({"--max-frame", "65536"});
  Client client = connect(server);
  EXPECT_EQ(client.server().limits.max_frame, 65536u);
  test::v1::EchoCall call;
  call.set_payload(std::string(100000, 'x'));
  auto err = error_of([&] { client.call_future<TestSvc::Echo>(call).get(); });
  EXPECT_EQ(err.code(), Code::invalid_argument);
  EXPECT_NE(err.message().find("maximum frame size of 65536"), std::string::npos) << err.message();
  call.set_payload("small");
  EXPECT_EQ(client.call_future<TestSvc::Echo>(call).get().payload(), "small");
}

TEST_P(RpcTest, OversizedReplyFailsThatCallOnlyAndTheConnectionLives) {
  FerrydProcess server({"--max-frame", "65536"});
  Client client = connect(server);
  // The request fits; the echo adds a few bytes and the reply does not.
  test::v1::EchoCall call;
  call.set_payload(std::string(65530, 'r'));
  auto err = error_of([&] { client.call_future<TestSvc::Echo>(call).get(); });
  EXPECT_EQ(err.code(), Code::resource_exhausted);
  EXPECT_NE(err.message().find("reply of"), std::string::npos) << err.message();
  EXPECT_TRUE(client.is_open());
  call.set_payload("small");
  EXPECT_EQ(client.call_future<TestSvc::Echo>(call).get().payload(), "small");
}

TEST_P(RpcTest, BlockingHandlersRunOnTheWorkerPoolWithoutStallingOtherCalls) {
  FerrydProcess server({"--io-threads", "1", "--worker-threads", "2"});
  Client client = connect(server);
  test::v1::SleepCall slow;
  slow.set_ms(1500);
  auto b1 = client.call_future<TestSvc::BlockingSleep>(slow);
  auto b2 = client.call_future<TestSvc::BlockingSleep>(slow);
  // With the only io thread free, a plain call is answered while both
  // workers sleep.
  test::v1::EchoCall call;
  call.set_payload("quick");
  auto echo = client.call_future<TestSvc::Echo>(call);
  EXPECT_EQ(echo.get().payload(), "quick");
  EXPECT_EQ(b1.wait_for(0ms), std::future_status::timeout) << "echo must not have waited for the blocking calls";
  b1.get();
  b2.get();
}

TEST_P(RpcTest, KeepaliveDeclaresAFrozenServerUnreachableAndFailsPendingCalls) {
  FerrydProcess server;
  rpc::ClientOptions options;
  options.connection.keepalive_interval = 100ms;
  options.connection.keepalive_count = 3;
  Client client = connect(server, options);
  test::v1::SleepCall call;
  call.set_ms(60000);
  auto pending = client.call_future<TestSvc::Sleep>(call);
  std::this_thread::sleep_for(50ms);
  server.pause_process();
  auto err = error_of([&] { pending.get(); });
  server.resume_process();
  EXPECT_EQ(err.code(), Code::unavailable);
  EXPECT_NE(err.message().find("peer unreachable"), std::string::npos) << err.message();
  EXPECT_FALSE(client.is_open());
}

TEST_P(RpcTest, GracefulShutdownAnswersEveryCallInFlight) {
  FerrydProcess server({"--shutdown-grace", "5000"});
  Client client = connect(server);
  test::v1::SleepCall call;
  call.set_ms(300);
  std::vector<std::future<test::v1::SleepReply>> futures;
  for (int i = 0; i < 100; ++i) futures.push_back(client.call_future<TestSvc::Sleep>(call));
  while (stats(client).calls_in_flight() < 101) std::this_thread::sleep_for(5ms);
  std::thread stopper([&] { EXPECT_EQ(server.terminate(), 0); });
  int ok = 0;
  for (auto& f : futures) {
    f.get();
    ok++;
  }
  stopper.join();
  EXPECT_EQ(ok, 100);
}

TEST_P(RpcTest, ShutdownPastTheGraceCancelsLongCallsAndSaysWhy) {
  FerrydProcess server({"--shutdown-grace", "200"});
  Client client = connect(server);
  test::v1::SleepCall call;
  call.set_ms(60000);
  auto pending = client.call_future<TestSvc::Sleep>(call);
  while (stats(client).calls_in_flight() < 2) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(server.terminate(), 0);
  auto err = error_of([&] { pending.get(); });
  EXPECT_TRUE(err.code() == Code::cancelled || err.code() == Code::unavailable) << err.describe();
  auto after = error_of([&] { client.call_future<TestSvc::Echo>(test::v1::EchoCall{}).get(); });
  EXPECT_EQ(after.code(), Code::unavailable);
  EXPECT_NE(after.message().find("shutting down"), std::string::npos) << after.message();
}

TEST_P(RpcTest, ConnectingToNothingSaysSoClearly) {
  TempDir dir;
  std::string uri = GetParam() == TransportKind::unix_socket ? "ferry+unix://" + dir.path() + "/none.sock"
                    : GetParam() == TransportKind::tls       ? "ferry+tls://127.0.0.1:1"
                    : GetParam() == TransportKind::grpc      ? "ferry+grpc://127.0.0.1:1"
                    : GetParam() == TransportKind::grpcs     ? "ferry+grpcs://127.0.0.1:1"
                                                             : "ferry+tcp://127.0.0.1:1";
  auto err = error_of([&] { Client::connect_sync(io_.executor(), uri); });
  EXPECT_EQ(err.code(), Code::unavailable);
  EXPECT_NE(err.message().find("cannot connect"), std::string::npos) << err.message();
}

INSTANTIATE_TEST_SUITE_P(Transports, RpcTest,
                         ::testing::ValuesIn(all_transports()),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace ferry::testing
