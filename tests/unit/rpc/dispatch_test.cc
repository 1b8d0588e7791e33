// Dispatch: handler shapes, reply tokens and error mapping, with a server
// and a client in one process over a real UNIX socket.
#include <gtest/gtest.h>

#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <filesystem>
#include <thread>

#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "rpc/server.h"
#include "tests/error_of.h"

namespace ferry::rpc {
namespace {

using namespace std::chrono_literals;
using TestSvc = ferry::test::v1::Test;
using ferry::testing::error_of;
using ferry::test::v1::EchoCall;
using ferry::test::v1::EchoReply;
using ferry::test::v1::SleepCall;
using ferry::test::v1::SleepReply;

class DispatchTest : public ::testing::Test {
 protected:
  void start(std::shared_ptr<Program> program) {
    path_ = (std::filesystem::temp_directory_path() / ("ferry-dispatch-" + std::to_string(::getpid()) + ".sock")).string();
    ServerOptions options;
    options.io_threads = 2;
    server_ = std::make_unique<Server>(options);
    server_->add_program(std::move(program));
    server_->listen(Endpoint::unix_socket(path_));
    server_->start();
    client_ = Client::connect_sync(io_.executor(), "unix:" + path_);
  }
  void TearDown() override {
    client_.close();
    if (server_) server_->shutdown(1s);
  }

  IoThreads io_{1};
  std::string path_;
  std::unique_ptr<Server> server_;
  Client client_;
};

TEST_F(DispatchTest, AbandonedReplyTokenAnswersInternalSoNoCallerWaitsForever) {
  auto program = Program::of<TestSvc>();
  program->on<TestSvc::Echo>([](const EchoCall&, ReplyToken<EchoReply>) { /* drops the token */ });
  start(program);
  auto err = error_of([&] { client_.call_future<TestSvc::Echo>(EchoCall{}).get(); });
  EXPECT_EQ(err.code(), Code::internal);
  EXPECT_NE(err.message().find("abandoned"), std::string::npos) << err.message();
}

TEST_F(DispatchTest, ReplyTokenMayBeCompletedLaterFromAnotherThread) {
  auto program = Program::of<TestSvc>();
  std::vector<std::thread> threads;
  std::mutex mutex;
  program->on<TestSvc::Echo>([&](const EchoCall& call, ReplyToken<EchoReply> token) {
    std::lock_guard lock(mutex);
    threads.emplace_back([call, token = std::move(token)]() mutable {
      std::this_thread::sleep_for(20ms);
      EchoReply reply;
      reply.set_payload("later:" + call.payload());
      token.reply(reply);
    });
  });
  start(program);
  EchoCall call;
  call.set_payload("x");
  EXPECT_EQ(client_.call_future<TestSvc::Echo>(call).get().payload(), "later:x");
  std::lock_guard lock(mutex);
  for (auto& t : threads) t.join();
}

TEST_F(DispatchTest, SecondAnswerOnATokenIsIgnored) {
  auto program = Program::of<TestSvc>();
  std::atomic<bool> second_accepted{true};
  program->on<TestSvc::Echo>([&](const EchoCall&, ReplyToken<EchoReply> token) {
    EchoReply r;
    r.set_payload("first");
    token.reply(r);
    second_accepted = token.fail(Error(Code::internal, "second"));
  });
  start(program);
  EXPECT_EQ(client_.call_future<TestSvc::Echo>(EchoCall{}).get().payload(), "first");
  EXPECT_FALSE(second_accepted.load());
}

TEST_F(DispatchTest, RequireFailureAnswersInvalidArgumentAndTheConnectionLives) {
  auto program = Program::of<TestSvc>();
  program->on<TestSvc::Echo>([](const EchoCall& call, CallContext&) -> asio::awaitable<EchoReply> {
    FERRY_REQUIRE(!call.payload().empty(), "payload must not be empty");
    EchoReply r;
    r.set_payload(call.payload());
    co_return r;
  });
  start(program);
  auto err = error_of([&] { client_.call_future<TestSvc::Echo>(EchoCall{}).get(); });
  EXPECT_EQ(err.code(), Code::invalid_argument);
  EXPECT_EQ(err.message(), "payload must not be empty");
  EchoCall ok;
  ok.set_payload("fine");
  EXPECT_EQ(client_.call_future<TestSvc::Echo>(ok).get().payload(), "fine");
}

TEST_F(DispatchTest, ForeignExceptionBecomesInternalWithItsText) {
  auto program = Program::of<TestSvc>();
  program->on<TestSvc::Echo>([](const EchoCall&, CallContext&) -> asio::awaitable<EchoReply> {
    throw std::out_of_range("vector index 7");
    co_return EchoReply{};
  });
  start(program);
  auto err = error_of([&] { client_.call_future<TestSvc::Echo>(EchoCall{}).get(); });
  EXPECT_EQ(err.code(), Code::internal);
  EXPECT_NE(err.message().find("vector index 7"), std::string::npos);
}

TEST_F(DispatchTest, CancelReachesTheTokenAndDroppingItAnswersCancelled) {
  auto program = Program::of<TestSvc>();
  std::atomic<bool> saw_cancel{false};
  auto parked = std::make_shared<std::optional<ReplyToken<SleepReply>>>();
  std::mutex mutex;
  program->on<TestSvc::Sleep>([&, parked](const SleepCall&, ReplyToken<SleepReply> token) {
    token.on_cancel([&, parked] {
      saw_cancel = true;
      std::lock_guard lock(mutex);
      parked->reset();  // let go: the client hears CANCELLED
    });
    std::lock_guard lock(mutex);
    if (!token.cancelled()) parked->emplace(std::move(token));
  });
  start(program);
  auto source = std::make_shared<CancelSource>();
  CallOptions options;
  options.cancel = source;
  auto future = client_.call_future<TestSvc::Sleep>(SleepCall{}, options);
  while (server_->stats().calls_in_flight == 0) std::this_thread::sleep_for(1ms);
  source->cancel();
  auto err = error_of([&] { future.get(); });
  EXPECT_EQ(err.code(), Code::cancelled);
  EXPECT_TRUE(saw_cancel.load());
  EXPECT_EQ(server_->stats().calls_cancelled, 1u);
}

TEST_F(DispatchTest, CoroutineHandlerSeesCancellationAsAnAbortedWait) {
  auto program = Program::of<TestSvc>();
  std::atomic<bool> unwound{false};
  program->on<TestSvc::Sleep>([&](const SleepCall&, CallContext& ctx) -> asio::awaitable<SleepReply> {
    struct Guard {
      std::atomic<bool>& flag;
      ~Guard() { flag = true; }
    } guard{unwound};
    asio::steady_timer timer(ctx.executor(), 60s);
    co_await timer.async_wait(asio::use_awaitable);
    co_return SleepReply{};
  });
  start(program);
  auto err = error_of([&] { client_.call_future<TestSvc::Sleep>(SleepCall{}, with_timeout(50ms)).get(); });
  EXPECT_EQ(err.code(), Code::deadline_exceeded);
  // The frame unwinds first; the CANCELLED answer (which ends the call's
  // accounting) leaves only after that.
  for (int i = 0; i < 200 && !(unwound && server_->stats().calls_in_flight == 0); ++i)
    std::this_thread::sleep_for(5ms);
  EXPECT_TRUE(unwound.load()) << "the handler's frame must be destroyed after the CANCEL";
  EXPECT_EQ(server_->stats().calls_in_flight, 0u);
  EXPECT_EQ(server_->stats().calls_cancelled, 1u);
}

}  // namespace
}  // namespace ferry::rpc
