#include "daemon/test_service.h"

#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>

#include "ferry/v1/test.ferry.h"

namespace ferry::daemon {

using namespace ferry::test::v1;

ProcessUsage process_usage() {
  ProcessUsage usage;
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Threads:", 0) == 0) usage.threads = static_cast<unsigned>(std::stoul(line.substr(8)));
    if (line.rfind("VmRSS:", 0) == 0) usage.rss_bytes = std::stoull(line.substr(6)) * 1024;
  }
  return usage;
}

std::shared_ptr<rpc::Program> make_test_program(const rpc::Server& server) {
  auto program = rpc::Program::of<Test>();

  program->on<Test::Echo>([](const EchoCall& call, rpc::CallContext&) -> asio::awaitable<EchoReply> {
    EchoReply reply;
    reply.set_received(call.payload().size());
    if (call.reply_size() > 0)
      reply.mutable_payload()->assign(call.reply_size(), 'r');
    else if (!call.discard())
      reply.set_payload(call.payload());
    co_return reply;
  });

  // Sleeps on a timer: no thread is held while it waits, and a CANCEL
  // aborts the wait at once.
  program->on<Test::Sleep>([](const SleepCall& call, rpc::CallContext&) -> asio::awaitable<SleepReply> {
    asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::milliseconds(call.ms()));
    co_await timer.async_wait(asio::use_awaitable);
    SleepReply reply;
    reply.set_payload(call.payload());
    reply.set_tag(call.tag());
    co_return reply;
  });

  program->on<Test::Fail>([](const FailCall& call, rpc::ReplyToken<FailReply> token) {
    token.fail(Error(static_cast<Code>(call.code()), call.message(), "test", call.retryable()));
  });

  program->on<Test::Notify>([](const NotifyCall& call, rpc::CallContext& ctx) -> asio::awaitable<NotifyReply> {
    NotifyReply reply;
    for (std::uint32_t i = 0; i < call.count(); ++i) {
      Notice notice;
      notice.set_index(i);
      notice.set_text(call.text());
      if (ctx.send_message<Test::NoticeEvent>(notice)) reply.set_sent(reply.sent() + 1);
    }
    co_return reply;
  });

  // may_block: runs on the worker pool, so sleeping the thread is allowed.
  program->on<Test::BlockingSleep>([](const SleepCall& call, rpc::CallContext&) -> asio::awaitable<SleepReply> {
    std::this_thread::sleep_for(std::chrono::milliseconds(call.ms()));
    SleepReply reply;
    reply.set_payload(call.payload());
    reply.set_tag(call.tag());
    co_return reply;
  });

  program->on<Test::Stats>([&server](const StatsCall&, rpc::CallContext&) -> asio::awaitable<StatsReply> {
    auto usage = process_usage();
    auto stats = server.stats();
    StatsReply reply;
    reply.set_threads(usage.threads);
    reply.set_rss_bytes(usage.rss_bytes);
    reply.set_calls_in_flight(stats.calls_in_flight);
    reply.set_handlers_cancelled(stats.calls_cancelled);
    reply.set_clients(static_cast<std::uint32_t>(stats.clients));
    co_return reply;
  });

  return program;
}

}  // namespace ferry::daemon
