// ferry-delay-relay: a TCP relay that adds a fixed one-way delay to every
// byte, for tests and benchmarks that need the round-trip latency of a long
// link between two ferryd daemons (the kernel here has no netem).
//
// It models a long link's latency, not loss, reordering or a bandwidth limit:
// bandwidth comes from a tc tbf qdisc on a veth pair (tests/integration/netlab.h).
// Each accepted connection gets its own upstream connection; every byte read
// from one side is written to the other no earlier than --delay after it was
// read. Reading goes on while earlier bytes wait, so like a long link the
// relay holds a pipe full of bytes in flight and the delay does not limit
// throughput; --buffer bounds the bytes in flight per direction (when full,
// that side is not read until the writer drains: TCP backpressure). An EOF is
// passed on (shutdown of the write side) after the bytes before it; an error
// or reset on one side resets the other.
//
// Faults (rpc/fault.h) can be added per direction: --fault-up applies to
// the bytes from the client to upstream, --fault-down to the bytes back;
// corrupted or dropped bytes are forwarded altered or not at all (so a TLS
// peer sees a bad record, the way it would a faulty middlebox), and a reset
// forwards the bytes before it and then resets both sides. SIGUSR1 makes
// the relay a black hole (it keeps both connections open but forwards
// nothing, like a partitioned link: bytes queue up to --buffer, then TCP
// backpressure holds the senders); SIGUSR2 lets the bytes flow again.
//
//   ferry-delay-relay --listen HOST:PORT --to HOST:PORT [--delay MS]
//                     [--buffer BYTES] [--fault-up SPEC] [--fault-down SPEC]
//                     [--ready-file PATH]
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <asio.hpp>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "rpc/error.h"
#include "rpc/fault.h"
#include "rpc/units.h"

namespace {

using Clock = std::chrono::steady_clock;
using asio::ip::tcp;

constexpr std::size_t kChunk = 256 * 1024;  // most bytes one read takes
constexpr std::size_t kMaxGather = 64;      // most chunks one gather write sends
constexpr std::size_t kSpareBuffers = 4;    // chunk buffers kept for reuse per direction

struct Options {
  tcp::endpoint listen;
  std::vector<tcp::endpoint> upstream;
  Clock::duration delay{};
  std::size_t buffer = 64u << 20;
  ferry::rpc::FaultOptions fault_up, fault_down;  // only their byte faults apply (delay is --delay)
};

// Set by SIGUSR1, cleared by SIGUSR2: forward nothing while set.
std::atomic<bool> black_hole{false};
constexpr auto black_hole_poll = std::chrono::milliseconds(10);

struct Chunk {
  Clock::time_point due;
  std::unique_ptr<char[]> data;
  std::size_t size = 0;
  std::size_t capacity = 0;
};

// One direction of a connection: bytes read from `from`, queued, written to `to`.
struct Direction {
  Direction(tcp::socket& f, tcp::socket& t, const asio::any_io_executor& ex, const ferry::rpc::FaultOptions& fault)
      : from(f), to(t), wake(ex), space(ex), injector(fault), faulty(fault.any()) {}
  tcp::socket& from;
  tcp::socket& to;
  std::deque<Chunk> queue;
  std::vector<Chunk> spare;     // full-size buffers to read into again
  std::size_t queued = 0;       // bytes in `queue`
  bool eof = false;             // `from` reached EOF (nothing more will be queued)
  bool done = false;            // EOF delivered: `to` was shut down for writing
  bool writer_idle = false;     // the writer waits on `wake` for data
  bool reader_blocked = false;  // the reader waits on `space`
  asio::steady_timer wake;      // the writer sleeps on it (until the head is due, or for data)
  asio::steady_timer space;     // the reader sleeps on it while the queue is full
  ferry::rpc::FaultInjector injector;
  ferry::rpc::FaultInjector::Direction position;
  bool faulty = false;
  bool reset = false;  // a fault reset: abort both sides once the queue is written
};

// Threads: the io_context runs on 2 threads and each connection has one
// strand on which all four of its coroutines (reader and writer of each
// direction) run. A connection's state (both queues, the flags) is then
// touched by one handler at a time without locks, and order within a
// direction is kept because one reader appends to the queue's tail and one
// writer sends from its head, one gather write at a time. The second thread
// lets different connections, and the reactor's socket work, run in
// parallel.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket client, const asio::any_io_executor& strand, const Options& options)
      : strand_(strand),
        options_(options),
        client_(std::move(client)),
        upstream_(strand),
        up_(client_, upstream_, strand, options.fault_up),
        down_(upstream_, client_, strand, options.fault_down) {}

  void start() {
    auto self = shared_from_this();
    asio::co_spawn(
        strand_, [self]() -> asio::awaitable<void> { co_await self->run(); }, asio::detached);
  }

 private:
  asio::awaitable<void> run() {
    std::error_code ec;
    co_await asio::async_connect(upstream_, options_.upstream, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      std::fprintf(stderr, "ferry-delay-relay: cannot connect upstream: %s\n", ec.message().c_str());
      abort();
      co_return;
    }
    client_.set_option(tcp::no_delay(true), ec);
    upstream_.set_option(tcp::no_delay(true), ec);
    auto self = shared_from_this();
    for (Direction* d : {&up_, &down_}) {
      asio::co_spawn(
          strand_, [self, d]() -> asio::awaitable<void> { co_await self->read_loop(*d); }, asio::detached);
      asio::co_spawn(
          strand_, [self, d]() -> asio::awaitable<void> { co_await self->write_loop(*d); }, asio::detached);
    }
  }

  asio::awaitable<void> read_loop(Direction& d) {
    for (;;) {
      while (!closed_ && d.queued >= options_.buffer) {
        d.reader_blocked = true;
        d.space.expires_at(Clock::time_point::max());
        std::error_code ignored;
        co_await d.space.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
        d.reader_blocked = false;
      }
      if (closed_) co_return;
      Chunk chunk;
      if (!d.spare.empty()) {
        chunk = std::move(d.spare.back());
        d.spare.pop_back();
      } else {
        chunk.data = std::make_unique_for_overwrite<char[]>(kChunk);
        chunk.capacity = kChunk;
      }
      const std::size_t want = std::min(chunk.capacity, options_.buffer - d.queued);
      std::error_code ec;
      std::size_t n = co_await d.from.async_read_some(asio::buffer(chunk.data.get(), want),
                                                            asio::redirect_error(asio::use_awaitable, ec));
      if (closed_) co_return;
      if (ec == asio::error::eof) {
        d.eof = true;
        wake_writer(d);
        co_return;
      }
      if (ec) {
        abort();
        co_return;
      }
      chunk.due = Clock::now() + options_.delay;
      chunk.size = d.faulty ? d.injector.apply(reinterpret_cast<std::uint8_t*>(chunk.data.get()), n, d.position) : n;
      if (d.injector.reset()) {
        d.reset = true;
        d.eof = true;  // nothing more is read; the writer resets once the rest is out
      }
      n = chunk.size;
      if (n < chunk.capacity / 2) {
        // A short read: queue a copy of the right size (memory stays within
        // twice the bytes queued) and keep the large buffer for the next read.
        Chunk small;
        small.due = chunk.due;
        small.data = std::make_unique_for_overwrite<char[]>(n);
        small.size = small.capacity = n;
        std::copy_n(chunk.data.get(), n, small.data.get());
        d.spare.push_back(std::move(chunk));
        chunk = std::move(small);
      }
      d.queued += n;
      if (n > 0) d.queue.push_back(std::move(chunk));
      wake_writer(d);
      if (d.reset) co_return;
    }
  }

  asio::awaitable<void> write_loop(Direction& d) {
    std::vector<asio::const_buffer> buffers;
    buffers.reserve(kMaxGather);
    for (;;) {
      if (closed_) co_return;
      if (black_hole.load()) {
        d.wake.expires_after(black_hole_poll);
        std::error_code ignored;
        co_await d.wake.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
        continue;
      }
      if (d.queue.empty()) {
        if (d.reset) {
          abort();
          co_return;
        }
        if (d.eof) {
          std::error_code ignored;
          d.to.shutdown(tcp::socket::shutdown_send, ignored);
          d.done = true;
          if (up_.done && down_.done) close();
          co_return;
        }
        d.writer_idle = true;
        d.wake.expires_at(Clock::time_point::max());
        std::error_code ignored;
        co_await d.wake.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
        d.writer_idle = false;
        continue;
      }
      const auto now = Clock::now();
      if (d.queue.front().due > now) {
        d.wake.expires_at(d.queue.front().due);
        std::error_code ignored;
        co_await d.wake.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
        continue;
      }
      buffers.clear();
      for (const auto& c : d.queue) {
        if (c.due > now || buffers.size() == kMaxGather) break;
        buffers.emplace_back(c.data.get(), c.size);
      }
      std::error_code ec;
      co_await asio::async_write(d.to, buffers, asio::redirect_error(asio::use_awaitable, ec));
      if (closed_) co_return;
      if (ec) {
        abort();
        co_return;
      }
      for (std::size_t i = 0; i < buffers.size(); ++i) {
        Chunk& c = d.queue.front();
        d.queued -= c.size;
        if (c.capacity == kChunk && d.spare.size() < kSpareBuffers) d.spare.push_back(std::move(c));
        d.queue.pop_front();
      }
      if (d.reader_blocked) d.space.cancel();
    }
  }

  void wake_writer(Direction& d) {
    if (d.writer_idle) d.wake.cancel();
  }

  void cancel_timers() {
    for (Direction* d : {&up_, &down_}) {
      d->wake.cancel();
      d->space.cancel();
    }
  }

  // Both directions delivered their EOF: an orderly close.
  void close() {
    if (closed_) return;
    closed_ = true;
    std::error_code ignored;
    client_.close(ignored);
    upstream_.close(ignored);
    cancel_timers();
  }

  // An error on either side: reset both (SO_LINGER 0 makes close send RST),
  // so a peer sees the failure as its own connection failing.
  void abort() {
    if (closed_) return;
    closed_ = true;
    std::error_code ignored;
    for (tcp::socket* s : {&client_, &upstream_}) {
      if (!s->is_open()) continue;
      s->set_option(asio::socket_base::linger(true, 0), ignored);
      s->close(ignored);
    }
    cancel_timers();
  }

  asio::any_io_executor strand_;
  const Options& options_;
  tcp::socket client_;
  tcp::socket upstream_;
  Direction up_;    // client -> upstream
  Direction down_;  // upstream -> client
  bool closed_ = false;
};

asio::awaitable<void> accept_loop(asio::io_context& io, tcp::acceptor& acceptor, const Options& options) {
  for (;;) {
    std::error_code ec;
    tcp::socket socket = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (ec == asio::error::operation_aborted) co_return;
    if (ec) {
      // Out of descriptors or the like: say so, wait a little, go on.
      std::fprintf(stderr, "ferry-delay-relay: accept: %s\n", ec.message().c_str());
      asio::steady_timer pause(acceptor.get_executor(), std::chrono::milliseconds(50));
      co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      continue;
    }
    std::make_shared<Connection>(std::move(socket), asio::make_strand(io), options)->start();
  }
}

// HOST:PORT, HOST may be [v6]; returns {host, port}.
std::pair<std::string, std::string> split_host_port(const std::string& text) {
  std::string host, port;
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':')
      throw std::invalid_argument("'" + text + "' is not HOST:PORT");
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string::npos) throw std::invalid_argument("'" + text + "' is not HOST:PORT");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  if (host.empty() || port.empty() ||
      !std::all_of(port.begin(), port.end(), [](unsigned char c) { return std::isdigit(c); }))
    throw std::invalid_argument("'" + text + "' is not HOST:PORT");
  return {host, port};
}

std::vector<tcp::endpoint> resolve(asio::io_context& io, const std::string& text) {
  const auto [host, port] = split_host_port(text);
  tcp::resolver resolver(io);
  std::vector<tcp::endpoint> out;
  for (const auto& entry : resolver.resolve(host, port, tcp::resolver::numeric_service))
    out.push_back(entry.endpoint());
  if (out.empty()) throw std::invalid_argument("'" + text + "' resolves to nothing");
  return out;
}

void write_ready_file(const std::string& path, std::uint16_t port) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << port << '\n';
    if (!out.flush()) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp + " to " + path);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "ferry-delay-relay: forward TCP connections to an upstream address, delaying the bytes of each "
      "direction by a fixed one-way delay (a long link's latency) with bounded buffering"};
  std::string listen_text, to_text, buffer_text = "64M", ready_file;
  double delay_ms = 0;
  app.add_option("--listen", listen_text, "HOST:PORT to accept on (PORT 0: any free port)")->required();
  app.add_option("--to", to_text, "upstream HOST:PORT each connection is forwarded to")->required();
  app.add_option("--delay", delay_ms, "one-way delay in milliseconds, each direction (fractions allowed)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--buffer", buffer_text, "most bytes queued per direction per connection (K, M, G suffixes)")
      ->capture_default_str();
  std::string fault_up, fault_down;
  app.add_option("--fault-up", fault_up,
                 "faults in the bytes from the client to upstream: corrupt_every=N, drop_every=N, reset_after=N, seed=N");
  app.add_option("--fault-down", fault_down, "the same for the bytes from upstream back to the client");
  app.add_option("--ready-file", ready_file, "once listening, write the bound port here (one decimal line)");
  CLI11_PARSE(app, argc, argv);

  try {
    Options options;
    try {
      options.fault_up = ferry::rpc::FaultOptions::parse(fault_up);
      options.fault_down = ferry::rpc::FaultOptions::parse(fault_down);
    } catch (const ferry::Error& e) {
      throw std::invalid_argument(e.message());
    }
    for (auto* f : {&options.fault_up, &options.fault_down}) {
      f->delay = {};
      f->on_read = f->on_write = true;
    }
    const auto buffer = ferry::parse_size(buffer_text);
    if (!buffer || *buffer == 0) throw std::invalid_argument("--buffer '" + buffer_text + "' is not a size");
    options.buffer = static_cast<std::size_t>(*buffer);
    if (!std::isfinite(delay_ms)) throw std::invalid_argument("--delay must be finite");
    options.delay = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(delay_ms));

    ::signal(SIGPIPE, SIG_IGN);
    asio::io_context io(2);
    options.upstream = resolve(io, to_text);
    options.listen = resolve(io, listen_text).front();

    tcp::acceptor acceptor(io);
    acceptor.open(options.listen.protocol());
    acceptor.set_option(tcp::acceptor::reuse_address(true));
    acceptor.bind(options.listen);
    acceptor.listen(asio::socket_base::max_listen_connections);
    const auto bound = acceptor.local_endpoint();

    asio::signal_set signals(io, SIGTERM, SIGINT);
    signals.async_wait([&io](const std::error_code& ec, int) {
      if (!ec) io.stop();
    });
    asio::signal_set toggles(io, SIGUSR1, SIGUSR2);
    std::function<void(const std::error_code&, int)> on_toggle = [&](const std::error_code& ec, int sig) {
      if (ec) return;
      black_hole.store(sig == SIGUSR1);
      toggles.async_wait(on_toggle);
    };
    toggles.async_wait(on_toggle);
    asio::co_spawn(asio::make_strand(io), accept_loop(io, acceptor, options), asio::detached);

    if (!ready_file.empty()) write_ready_file(ready_file, bound.port());
    const std::string host =
        bound.address().is_v6() ? "[" + bound.address().to_string() + "]" : bound.address().to_string();
    std::printf("listening on %s:%u\n", host.c_str(), static_cast<unsigned>(bound.port()));
    std::fflush(stdout);

    std::thread second([&io] { io.run(); });
    io.run();
    io.stop();
    toggles.cancel();
    second.join();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry-delay-relay: %s\n", e.what());
    return 1;
  }
}
