// The ferry side of the rpc.* rows: a real ferryd process (with the test
// program) and the libferry client, measured exactly as an embedding
// program would use them.
#include "bench/ferry_cases.h"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/use_future.hpp>
#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include <fcntl.h>
#include <unistd.h>

#include "bench/baselines.h"
#include "bench/harness.h"
#include "stream/service.h"
#include "stream/sparse.h"
#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "tests/material/sasl_users.h"
#include "tests/material/tls_material.h"

namespace ferry::bench {

namespace {

using TestSvc = ferry::test::v1::Test;
using ferry::rpc::Client;

std::string listen_address(const CaseOptions& options, ScratchDir& dir, bool tcp) {
  if (!options.addr.empty()) return options.addr;
  return tcp ? "tcp:127.0.0.1:0" : dir.unix_address("ferryd.sock");
}

// A ferryd reached over `wire`, and the client options that reach it:
// certificates and a sasldb are made in the scratch directory.
struct Secured {
  Secured(const CaseOptions& options, Wire wire) {
    std::vector<std::string> extra;
    std::string address;
    if (wire == Wire::unix_socket || wire == Wire::tcp) {
      address = listen_address(options, dir, wire == Wire::tcp);
    } else if (wire == Wire::sasl_layer) {
      address = "tcp:127.0.0.1:0";
    } else if (wire == Wire::grpc) {
      address = "grpc:127.0.0.1:0";
    } else {
      address = "tls:127.0.0.1:0";
    }
    if (wire == Wire::tls || wire == Wire::tls_scram) {
      const auto material = testing::make_tls_material(dir.path().string());
      extra = {"--tls-cert", material.server.cert, "--tls-key", material.server.key, "--tls-no-verify-client"};
      client.tls.ca_file = material.ca.cert;
      client.tls.ciphersuites = tls_ciphersuite;
    }
    if (wire == Wire::sasl_layer || wire == Wire::tls_scram) {
      const std::string db = (dir.path() / "sasldb").string();
      testing::add_sasl_user(db, "ferry", "ferry", "bench", "bench-password");
      const std::string mech = wire == Wire::sasl_layer ? "DIGEST-MD5" : "SCRAM-SHA-256";
      extra.insert(extra.end(), {"--sasl-db", db, "--sasl-realm", "ferry", "--sasl-mechanisms", mech,
                                 wire == Wire::sasl_layer ? "--auth-tcp" : "--auth-tls", "sasl"});
      client.sasl.username = "bench";
      client.sasl.password = "bench-password";
      client.sasl.realm = "ferry";
      client.sasl.mechanisms = {mech};
    }
    server = std::make_unique<Ferryd>(options, address, dir, extra);
    client.tls_context = client.tls.ca_file.empty() ? nullptr : rpc::TlsContext::client(client.tls);
  }
  Client connect(rpc::IoThreads& io) const { return Client::connect_sync(io.executor(), server->uri(), client); }

  ScratchDir dir;
  std::unique_ptr<Ferryd> server;
  rpc::ClientOptions client;
};

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

Measurement ferry_echo_inflight(const CaseOptions& options, int inflight, Wire wire) {
  Secured setup(options, wire);
  rpc::IoThreads io(1);
  Client client = setup.connect(io);
  ferry::test::v1::EchoCall call;
  call.set_payload(std::string(echo_payload_bytes, 'e'));
  double rate = run_closed_loop(client, io, inflight, options.quick, [&](Client& c) -> asio::awaitable<void> {
    co_await c.call<TestSvc::Echo>(call);
  });
  return {rate, "calls/s",
          std::to_string(inflight) + " calls in flight on one connection, one client io thread, over " + to_string(wire)};
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

namespace {

std::shared_ptr<const rpc::Buffer> pattern_block(std::size_t size) {
  auto b = std::make_shared<rpc::Buffer>(size);
  for (std::size_t i = 0; i < size; ++i) b->data()[i] = static_cast<std::uint8_t>(i * 131 + 7);
  return b;
}

}  // namespace

Measurement ferry_stream_upload(const CaseOptions& options, bool tcp, int streams) {
  return ferry_stream_upload(options, tcp ? Wire::tcp : Wire::unix_socket, streams, stream_total_bytes(options.quick));
}

Measurement ferry_stream_upload(const CaseOptions& options, Wire wire, int streams, std::uint64_t total) {
  Secured setup(options, wire);
  rpc::IoThreads io(1);
  Client client = setup.connect(io);
  const std::uint64_t per_stream = total / streams;
  // The caller's buffer is sent by reference, 1 MiB at a time.
  auto block = pattern_block(1 << 20);
  ferry::test::v1::UploadCall call;
  call.set_discard(true);
  std::atomic<std::uint64_t> acknowledged{0};
  auto start = Clock::now();
  std::vector<std::future<void>> done;
  for (int i = 0; i < streams; ++i) {
    done.push_back(asio::co_spawn(
        io.executor(),
        [&]() -> asio::awaitable<void> {
          auto up = stream::open<TestSvc::Upload>(client, call);
          for (std::uint64_t sent = 0; sent < per_stream; sent += block->size()) co_await up.stream->write(block);
          co_await up.stream->finish();
          auto reply = co_await up.reply();
          acknowledged += reply.data_bytes();
        },
        asio::use_future));
  }
  for (auto& f : done) f.get();
  const double secs = seconds_since(start);
  if (acknowledged.load() < total)
    throw std::runtime_error("server acknowledged " + std::to_string(acknowledged.load()) + " of " + std::to_string(total) + " bytes");
  return {static_cast<double>(acknowledged.load()) / secs / 1e6, "MB/s",
          std::to_string(streams) + " upload stream(s) on one connection over " + to_string(wire) +
              ", 1 MiB writes by reference, 256 KiB chunks, server counts and drops"};
}

Measurement ferry_stream_download(const CaseOptions& options, bool tcp) {
  return ferry_stream_download(options, tcp ? Wire::tcp : Wire::unix_socket);
}

Measurement ferry_stream_download(const CaseOptions& options, Wire wire) {
  Secured setup(options, wire);
  rpc::IoThreads io(1);
  Client client = setup.connect(io);
  ferry::test::v1::DownloadCall call;
  call.set_size(stream_total_bytes(options.quick));
  call.set_fast(true);
  call.set_block(1 << 20);
  std::uint64_t got = 0;
  auto start = Clock::now();
  asio::co_spawn(
      io.executor(),
      [&]() -> asio::awaitable<void> {
        auto down = stream::open<TestSvc::Download>(client, call);
        for (;;) {
          stream::Item item = co_await down.stream->read();
          if (item.kind == stream::Item::Kind::end) break;
          got += item.length;  // the chunk goes back to the pool here
        }
        co_await down.reply();
      },
      asio::use_future)
      .get();
  const double secs = seconds_since(start);
  if (got != call.size()) throw std::runtime_error("short download");
  return {static_cast<double>(got) / secs / 1e6, "MB/s",
          std::string("one download stream over ") + to_string(wire) +
              ", server sends a 1 MiB block by reference, client reads and drops 256 KiB chunks"};
}

Measurement ferry_call_p99(const CaseOptions& options, bool loaded) {
  ScratchDir dir;
  Ferryd server(options, listen_address(options, dir, false), dir);
  rpc::IoThreads io(1);
  Client client = Client::connect_sync(io.executor(), server.uri());
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> streamed{0};
  std::future<void> load;
  if (loaded) {
    ferry::test::v1::DownloadCall call;
    call.set_size(std::uint64_t{1} << 40);  // until we stop it
    call.set_fast(true);
    call.set_block(1 << 20);
    load = asio::co_spawn(
        io.executor(),
        [&, call]() -> asio::awaitable<void> {
          auto down = stream::open<TestSvc::Download>(client, call);
          while (!stop.load()) {
            stream::Item item = co_await down.stream->read();
            streamed += item.length;
          }
          down.stream->abort(Error(Code::cancelled, "benchmark over"));
          try {
            co_await down.reply();
          } catch (const Error&) {
          }
        },
        asio::use_future);
    std::this_thread::sleep_for(warmup_window());
  }
  // The stream alone first, for the share of its throughput it keeps below.
  double alone_mbs = 0;
  if (loaded) {
    const std::uint64_t before = streamed.load();
    const auto t0 = Clock::now();
    std::this_thread::sleep_for(measure_window(options.quick));
    alone_mbs = static_cast<double>(streamed.load() - before) / seconds_since(t0) / 1e6;
  }
  // One small call every millisecond, each timed from issue to reply.
  std::vector<double> latencies;
  ferry::test::v1::EchoCall echo;
  echo.set_payload(std::string(echo_payload_bytes, 'p'));
  const auto window = measure_window(options.quick);
  const std::uint64_t streamed_before = streamed.load();
  const auto start = Clock::now();
  while (Clock::now() - start < window) {
    auto t = Clock::now();
    client.call_future<TestSvc::Echo>(echo).get();
    latencies.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
    std::this_thread::sleep_until(t + std::chrono::milliseconds(1));
  }
  const double secs = seconds_since(start);
  const double stream_mbs = static_cast<double>(streamed.load() - streamed_before) / secs / 1e6;
  stop = true;
  if (load.valid()) load.get();
  std::sort(latencies.begin(), latencies.end());
  auto pct = [&](double p) { return latencies[static_cast<std::size_t>(p * (latencies.size() - 1))]; };
  char note[200];
  std::snprintf(note, sizeof note, "%zu echo calls, p50 %.3f ms, p99 %.3f ms%s", latencies.size(), pct(0.5), pct(0.99),
                loaded ? "" : ", idle connection");
  std::string n = note;
  if (loaded) {
    std::snprintf(note, sizeof note, ", next to a download stream at %.0f MB/s (%.0f MB/s alone: %.2f kept)",
                  stream_mbs, alone_mbs, alone_mbs > 0 ? stream_mbs / alone_mbs : 0.0);
    n += note;
  }
  return {pct(0.99), "ms", n};
}

Measurement ferry_sparse_upload(const CaseOptions& options) {
  ScratchDir dir;
  // 10 GiB, ten 1 MiB extents of data spread across it, the rest a hole.
  const std::string path = (dir.path() / "sparse.img").string();
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) throw std::runtime_error("cannot create " + path);
  const std::uint64_t size = std::uint64_t{10} << 30;
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) throw std::runtime_error("ftruncate failed");
  auto block = pattern_block(1 << 20);
  for (int i = 0; i < 10; ++i) {
    const off_t at = static_cast<off_t>((size / 10) * i + (i * 4096));
    if (::pwrite(fd, block->data(), block->size(), at) != static_cast<ssize_t>(block->size()))
      throw std::runtime_error("pwrite failed");
  }
  ::fsync(fd);
  Ferryd server(options, listen_address(options, dir, false), dir);
  rpc::IoThreads io(1);
  Client client = Client::connect_sync(io.executor(), server.uri());
  ferry::test::v1::UploadCall call;
  call.set_discard(true);
  const std::size_t chunk = client.stream_limits().chunk_size;
  auto start = Clock::now();
  ferry::test::v1::UploadReply reply;
  asio::co_spawn(
      io.executor(),
      [&]() -> asio::awaitable<void> {
        auto up = stream::open<TestSvc::Upload>(client, call);
        stream::SparseReader reader(fd, 0, size, chunk);
        for (;;) {
          rpc::Buffer buffer = client.connection()->pool().get(chunk);
          auto item = reader.next({buffer.data(), buffer.size()});
          if (!item) break;
          if (item->hole) {
            co_await up.stream->write_hole(item->length);
          } else {
            rpc::Buffer piece = std::move(buffer);
            if (item->length < piece.size()) piece = rpc::Buffer::copy_of(std::span<const std::uint8_t>(piece.data(), item->length));
            co_await up.stream->write(std::move(piece));
          }
        }
        co_await up.stream->finish();
        reply = co_await up.reply();
      },
      asio::use_future)
      .get();
  const double secs = seconds_since(start);
  ::close(fd);
  if (reply.data_bytes() + reply.hole_bytes() != size) throw std::runtime_error("sparse upload lost bytes");
  return {secs, "s",
          "10 GiB file, 10 MiB of data in 1 MiB extents: SEEK_DATA/SEEK_HOLE reader, holes as STREAM_HOLE frames"};
}


const char* to_string(Wire wire) {
  switch (wire) {
    case Wire::unix_socket:
      return "unix";
    case Wire::tcp:
      return "tcp";
    case Wire::tls:
      return "TLS 1.3 (AES-256-GCM)";
    case Wire::sasl_layer:
      return "tcp with a SASL DIGEST-MD5 security layer";
    case Wire::tls_scram:
      return "TLS 1.3 (AES-256-GCM) + SASL SCRAM-SHA-256";
    case Wire::grpc:
      return "the gRPC transport (one Tunnel.Connect stream, plaintext)";
  }
  return "?";
}

Measurement ferry_tls_handshake(const CaseOptions& options) {
  Secured setup(options, Wire::tls_scram);
  rpc::IoThreads io(1);
  const int connects = options.quick ? 50 : 200;
  std::vector<double> ms;
  for (int i = 0; i < connects + 5; ++i) {
    auto start = Clock::now();
    Client client = setup.connect(io);
    const double took = seconds_since(start) * 1000.0;
    client.close();
    if (i >= 5) ms.push_back(took);  // the first few warm the caches
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], "ms",
          "median of " + std::to_string(connects) +
              " connects: TCP + TLS 1.3 handshake (server certificate verified) + Hello + SCRAM-SHA-256"};
}

}  // namespace ferry::bench
