// The ferry side of the rpc.* rows: a real ferryd process (with the test
// program) and the libferry client, measured exactly as an embedding
// program would use them.
#include "bench/ferry_cases.h"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/use_future.hpp>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include "bench/harness.h"
#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"

namespace ferry::bench {

namespace {

using TestSvc = ferry::test::v1::Test;
using ferry::rpc::Client;

// A ferryd child process serving the test program at `address`.
struct Ferryd {
  Ferryd(const CaseOptions& options, const std::string& address, ScratchDir& dir,
         std::vector<std::string> extra = {}) {
    if (options.ferryd.empty() || !std::filesystem::exists(options.ferryd))
      throw std::runtime_error("ferryd not found at '" + options.ferryd + "' (pass --ferryd)");
    ready_file = (dir.path() / "ready").string();
    std::vector<std::string> argv = {options.ferryd, "--test-service", "--listen", address, "--ready-file",
                                     ready_file, "--log-level", "warn", "--max-calls-per-client", "100000"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    child = spawn_server(argv, options.server_netns, std::chrono::seconds(20), false);
    auto deadline = Clock::now() + std::chrono::seconds(20);
    while (!std::filesystem::exists(ready_file)) {
      if (Clock::now() > deadline) throw std::runtime_error("ferryd did not become ready");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::ifstream in(ready_file);
    std::getline(in, bound);
  }
  std::string uri() const {
    if (bound.rfind("unix:", 0) == 0) return "ferry+unix://" + bound.substr(5);
    return "ferry+tcp://" + bound.substr(4);
  }
  std::string ready_file;
  std::string bound;
  ChildProcess child;
};

std::string listen_address(const CaseOptions& options, ScratchDir& dir, bool tcp) {
  if (!options.addr.empty()) return options.addr;
  return tcp ? "tcp:127.0.0.1:0" : dir.unix_address("ferryd.sock");
}

// Runs `concurrency` coroutines that each issue `call()` back to back until
// the window closes; returns completed calls per second after a warm-up.
template <class MakeCall>
double run_closed_loop(Client& client, rpc::IoThreads& io, int concurrency, bool quick, MakeCall make_call,
                       std::uint64_t* bytes_out = nullptr, std::uint64_t bytes_per_call = 0) {
  std::atomic<bool> measuring{false}, stop{false};
  std::atomic<std::uint64_t> done{0};
  std::vector<std::future<void>> loops;
  for (int i = 0; i < concurrency; ++i) {
    loops.push_back(asio::co_spawn(
        io.executor(),
        [&]() -> asio::awaitable<void> {
          while (!stop.load(std::memory_order_relaxed)) {
            co_await make_call(client);
            if (measuring.load(std::memory_order_relaxed)) done.fetch_add(1, std::memory_order_relaxed);
          }
        },
        asio::use_future));
  }
  std::this_thread::sleep_for(warmup_window());
  measuring = true;
  auto start = Clock::now();
  std::this_thread::sleep_for(measure_window(quick));
  const std::uint64_t count = done.load();
  const double secs = seconds_since(start);
  measuring = false;
  stop = true;
  for (auto& f : loops) f.get();
  if (bytes_out) *bytes_out = count * bytes_per_call;
  return count / secs;
}

}  // namespace

Measurement ferry_echo_seq(const CaseOptions& options) {
  ScratchDir dir;
  Ferryd server(options, listen_address(options, dir, false), dir);
  rpc::IoThreads io(1);
  Client client = Client::connect_sync(io.executor(), server.uri());
  ferry::test::v1::EchoCall call;
  call.set_payload(std::string(echo_payload_bytes, 'e'));
  double rate = run_closed_loop(client, io, 1, options.quick, [&](Client& c) -> asio::awaitable<void> {
    co_await c.call<TestSvc::Echo>(call);
  });
  return {rate, "calls/s", "64-byte echo, one call at a time, coroutine client"};
}

Measurement ferry_echo_inflight(const CaseOptions& options, int inflight) {
  ScratchDir dir;
  Ferryd server(options, listen_address(options, dir, false), dir);
  rpc::IoThreads io(1);
  Client client = Client::connect_sync(io.executor(), server.uri());
  ferry::test::v1::EchoCall call;
  call.set_payload(std::string(echo_payload_bytes, 'e'));
  double rate = run_closed_loop(client, io, inflight, options.quick, [&](Client& c) -> asio::awaitable<void> {
    co_await c.call<TestSvc::Echo>(call);
  });
  return {rate, "calls/s", std::to_string(inflight) + " calls in flight on one connection, one client io thread"};
}

Measurement ferry_body(const CaseOptions& options, bool tcp) {
  ScratchDir dir;
  Ferryd server(options, listen_address(options, dir, tcp), dir);
  rpc::IoThreads io(1);
  Client client = Client::connect_sync(io.executor(), server.uri());
  ferry::test::v1::EchoCall call;
  call.set_payload(std::string(body_chunk_bytes, 'b'));
  call.set_discard(true);
  const std::uint64_t total = body_total_bytes(options.quick);
  const std::uint64_t calls = total / body_chunk_bytes;
  // A few calls in flight keep the socket busy while replies return; more
  // (16, 64) measured slower: 256 KiB buffers cycling through more memory
  // than the caches hold make each copy a trip to DRAM.
  constexpr int window = 4;
  std::atomic<std::uint64_t> issued{0};
  std::atomic<std::uint64_t> received{0};
  auto start = Clock::now();
  std::vector<std::future<void>> loops;
  for (int i = 0; i < window; ++i) {
    loops.push_back(asio::co_spawn(
        io.executor(),
        [&]() -> asio::awaitable<void> {
          while (issued.fetch_add(1) < calls) {
            auto reply = co_await client.call<TestSvc::Echo>(call);
            received.fetch_add(reply.received());
          }
        },
        asio::use_future));
  }
  for (auto& f : loops) f.get();
  const double secs = seconds_since(start);
  if (received.load() != calls * body_chunk_bytes) throw std::runtime_error("server did not see every byte");
  return {static_cast<double>(total) / secs / 1e6, "MB/s",
          "256 KiB CALL bodies (protobuf bytes field), 4 in flight, server acknowledges each"};
}

Measurement ferry_duplex(const CaseOptions& options, bool half_duplex) {
  // Socket buffers are held to 256 KiB on both ends so that the link, not
  // megabytes of kernel buffering, decides whether the two directions
  // overlap: with autotuned buffers (4-6 MiB here) a client that takes
  // turns still finds its replies waiting in the kernel.
  constexpr int socket_buffer = 256 << 10;
  ScratchDir dir;
  Ferryd server(options, listen_address(options, dir, true), dir, {"--socket-buffer", std::to_string(socket_buffer)});
  rpc::IoThreads io(1);
  rpc::ClientOptions copts;
  copts.connection.half_duplex = half_duplex;
  copts.connection.socket_buffer_bytes = socket_buffer;
  Client client = Client::connect_sync(io.executor(), server.uri(), copts);
  // Mixed traffic, as a block device sees it: half the calls write data
  // up (small reply), half read data down (small request), each kind
  // with 8 in flight, so both directions of the link are wanted at once.
  // Requests of 2 MiB (qemu-img convert's buffer size) are eight times the socket buffer, so writing one
  // takes a while on the link, as large NBD writes do on a real network.
  constexpr std::size_t io_size = 2 << 20;
  ferry::test::v1::EchoCall up;
  up.set_payload(std::string(io_size, 'w'));
  up.set_discard(true);
  ferry::test::v1::EchoCall down;
  down.set_reply_size(static_cast<std::uint32_t>(io_size));
  std::atomic<std::uint64_t> turn{0};
  std::uint64_t bytes = 0;
  double rate = run_closed_loop(
      client, io, 16, options.quick,
      [&](Client& c) -> asio::awaitable<void> {
        co_await c.call<TestSvc::Echo>(turn.fetch_add(1) % 2 ? up : down);
      },
      &bytes, io_size);
  const double secs = rate > 0 ? static_cast<double>(bytes) / io_size / rate : 1.0;
  return {static_cast<double>(bytes) / secs / 1e6, "MB/s",
          std::string(half_duplex ? "half duplex" : "full duplex") +
              ": 2 MiB writes and 2 MiB reads mixed, 16 in flight, 256 KiB socket buffers, payload bytes"};
}

}  // namespace ferry::bench
