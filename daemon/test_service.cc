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
#include "stream/checksum.h"
#include "stream/service.h"

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
    reply.set_streams_open(stream::Stream::live_count());
    reply.set_buffer_bytes_in_use(stats.buffer_bytes_in_use);
    reply.set_read_pauses(stats.read_pauses);
    reply.set_calls_overloaded(stats.calls_overloaded);
    co_return reply;
  });

  auto tally = [](const TallyCall& call, rpc::CallContext&) -> asio::awaitable<TallyReply> {
    {
      std::ofstream journal(call.journal(), std::ios::app);
      journal << call.tag() << '\n';
      if (!journal.flush()) throw Error(Code::internal, "cannot append to " + call.journal(), "test");
    }
    asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::milliseconds(call.ms()));
    co_await timer.async_wait(asio::use_awaitable);
    TallyReply reply;
    reply.set_tag(call.tag());
    co_return reply;
  };
  program->on<Test::Tally>(tally);
  program->on<Test::TallyIdempotent>(tally);

  program->on<Test::WhoAmI>([](const WhoAmICall&, rpc::CallContext& ctx) -> asio::awaitable<WhoAmIReply> {
    const rpc::PeerIdentity& peer = ctx.peer();
    WhoAmIReply reply;
    reply.set_transport(peer.transport);
    reply.set_address(peer.address);
    reply.set_uid(peer.uid.value_or(-1));
    reply.set_gid(peer.gid.value_or(-1));
    reply.set_pid(peer.pid.value_or(-1));
    reply.set_tls_version(peer.tls_version);
    reply.set_tls_cipher(peer.tls_cipher);
    reply.set_tls_subject(peer.tls_subject);
    reply.set_tls_fingerprint(peer.tls_fingerprint);
    reply.set_user(peer.user);
    reply.set_mechanism(peer.mechanism);
    reply.set_ssf(peer.ssf);
    co_return reply;
  });

  stream::on<Test::Upload>(*program, [](const UploadCall& call, stream::Stream& s,
                                         rpc::CallContext& ctx) -> asio::awaitable<UploadReply> {
    if (call.stall_ms()) {
      // A reader that does not read: the sender must stop at the window.
      asio::steady_timer timer(ctx.executor(), std::chrono::milliseconds(call.stall_ms()));
      co_await timer.async_wait(asio::use_awaitable);
    }
    stream::Checksum sum;
    UploadReply reply;
    for (;;) {
      stream::Item item = co_await s.read();
      if (item.kind == stream::Item::Kind::end) break;
      if (item.kind == stream::Item::Kind::hole) {
        sum.hole(item.length);
      } else {
        if (call.discard())
          reply.set_data_bytes(reply.data_bytes() + item.length);
        else
          sum.data(item.data.bytes());
        reply.set_chunks(reply.chunks() + 1);
      }
      if (call.fail_after() && sum.data_bytes() + sum.hole_bytes() >= call.fail_after())
        throw Error(static_cast<Code>(call.fail_code() ? call.fail_code() : ferry::v1::RESOURCE_EXHAUSTED),
                    "simulated failure after " + std::to_string(call.fail_after()) + " bytes", "test");
    }
    if (!call.discard()) reply.set_data_bytes(sum.data_bytes());
    reply.set_hole_bytes(sum.hole_bytes());
    reply.set_checksum(sum.value());
    co_return reply;
  });

  stream::on<Test::Mirror>(*program, [](const UploadCall&, stream::Stream& s,
                                         rpc::CallContext&) -> asio::awaitable<UploadReply> {
    stream::Checksum sum;
    for (;;) {
      stream::Item item = co_await s.read();
      if (item.kind == stream::Item::Kind::end) break;
      if (item.kind == stream::Item::Kind::hole) {
        sum.hole(item.length);
        co_await s.write_hole(item.length);
      } else {
        sum.data(item.data.bytes());
        co_await s.write(rpc::Buffer::copy_of(item.data.bytes()));
      }
    }
    UploadReply reply;
    reply.set_data_bytes(sum.data_bytes());
    reply.set_hole_bytes(sum.hole_bytes());
    reply.set_checksum(sum.value());
    co_return reply;
  });

  stream::on<Test::Download>(*program, [](const DownloadCall& call, stream::Stream& s,
                                           rpc::CallContext& ctx) -> asio::awaitable<DownloadReply> {
    const std::uint64_t block = call.block() ? call.block() : 256u << 10;
    stream::Checksum sum;
    std::uint64_t offset = 0;
    std::uint64_t index = 0;
    auto& pool = ctx.pool();
    if (call.fast()) {
      // Memory to memory at full speed: one block, sent by reference.
      auto shared = std::make_shared<rpc::Buffer>(block);
      stream::fill_pattern({shared->data(), shared->size()}, call.seed(), 0);
      std::shared_ptr<const rpc::Buffer> block_buffer = shared;
      while (offset < call.size()) {
        const std::uint64_t n = std::min(block, call.size() - offset);
        if (n == block) {
          co_await s.write(block_buffer);
        } else {
          co_await s.write(rpc::Buffer::copy_of(std::span<const std::uint8_t>(shared->data(), n)));
        }
        offset += n;
      }
      DownloadReply reply;
      reply.set_data_bytes(offset);
      co_return reply;
    }
    while (offset < call.size()) {
      const std::uint64_t n = std::min(block, call.size() - offset);
      if (call.fail_after() && offset >= call.fail_after())
        throw Error(static_cast<Code>(call.fail_code() ? call.fail_code() : ferry::v1::RESOURCE_EXHAUSTED),
                    "simulated failure after " + std::to_string(call.fail_after()) + " bytes", "test");
      if (call.hole_every() && index % call.hole_every() == call.hole_every() - 1) {
        co_await s.write_hole(n);
        sum.hole(n);
      } else {
        rpc::Buffer buffer = pool.get(n);
        stream::fill_pattern({buffer.data(), buffer.size()}, call.seed(), offset);
        sum.data(buffer.span());
        co_await s.write(std::move(buffer));
      }
      offset += n;
      ++index;
    }
    DownloadReply reply;
    reply.set_data_bytes(sum.data_bytes());
    reply.set_hole_bytes(sum.hole_bytes());
    reply.set_checksum(sum.value());
    co_return reply;
  });

  return program;
}

}  // namespace ferry::daemon
