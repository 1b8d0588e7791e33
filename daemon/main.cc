// ferryd: the ferry daemon.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "daemon/default_paths.h"
#include "daemon/test_service.h"
#include "rpc/server.h"

namespace {

void write_ready_file(const std::string& path, const std::vector<ferry::rpc::Endpoint>& endpoints) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    for (const auto& e : endpoints) out << e.to_string() << '\n';
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ferryd: serves ferry programs over UNIX and TCP sockets"};
  std::vector<std::string> listen;
  bool test_service = false;
  std::string log_level = "info";
  std::string ready_file;
  unsigned shutdown_grace_ms = 5000;
  ferry::rpc::ServerOptions options;
  unsigned keepalive_ms = static_cast<unsigned>(options.keepalive_interval.count());

  app.add_option("-l,--listen", listen,
                 "address to listen on, repeatable: unix:/path or tcp:host:port (default: unix:" +
                     ferry::daemon::default_socket_path() + ")");
  app.add_flag("--test-service", test_service, "serve the test program (99) used by tests and benchmarks");
  app.add_option("--io-threads", options.io_threads, "io threads (0 = one per core)")->capture_default_str();
  app.add_option("--worker-threads", options.worker_threads, "threads for handlers that block")
      ->capture_default_str();
  app.add_option("--max-clients", options.max_clients, "connected clients allowed at once")->capture_default_str();
  app.add_option("--max-calls-per-client", options.max_calls_per_client, "calls in flight per connection")
      ->capture_default_str();
  app.add_option("--max-frame", options.limits.max_frame, "largest CALL/REPLY/MESSAGE body, bytes")
      ->capture_default_str()
      ->check(CLI::Range(64u << 10, ferry::rpc::FrameLimits::max_frame_ceiling));
  app.add_option("--keepalive-interval", keepalive_ms, "ms of silence before a keepalive probe (0 = off)")
      ->capture_default_str();
  app.add_option("--keepalive-count", options.keepalive_count, "unanswered probes before a peer is dead")
      ->capture_default_str();
  app.add_option("--socket-buffer", options.socket_buffer_bytes,
                 "SO_SNDBUF/SO_RCVBUF per connection in bytes (0 = kernel autotuning)")
      ->capture_default_str();
  app.add_option("--shutdown-grace", shutdown_grace_ms, "ms calls in flight get to finish on SIGTERM")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical, off")->capture_default_str();
  app.add_option("--ready-file", ready_file, "write the bound addresses here, one per line, once listening");
  CLI11_PARSE(app, argc, argv);

  auto logger = spdlog::stderr_color_mt("ferryd");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
  options.keepalive_interval = std::chrono::milliseconds(keepalive_ms);

  // Signals are taken synchronously by the main thread only; block them
  // before any other thread exists so they all inherit the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  try {
    ferry::rpc::Server server(options);
    if (test_service) server.add_program(ferry::daemon::make_test_program(server));
    if (listen.empty()) listen.push_back("unix:" + ferry::daemon::default_socket_path());
    std::vector<ferry::rpc::Endpoint> bound;
    for (const auto& l : listen) bound.push_back(server.listen(ferry::rpc::Endpoint::parse(l)));
    server.start();
    if (!ready_file.empty()) write_ready_file(ready_file, bound);
    spdlog::info("ferryd ready ({} io threads{})", options.io_threads ? options.io_threads : std::thread::hardware_concurrency(),
                 test_service ? ", test program enabled" : "");
    int sig = 0;
    sigwait(&signals, &sig);
    spdlog::info("received {}, shutting down (grace {} ms)", sig == SIGTERM ? "SIGTERM" : "SIGINT", shutdown_grace_ms);
    server.shutdown(std::chrono::milliseconds(shutdown_grace_ms));
    spdlog::info("ferryd stopped");
    return 0;
  } catch (const ferry::Error& e) {
    spdlog::critical("{}", e.message());
    return 1;
  } catch (const std::exception& e) {
    spdlog::critical("{}", e.what());
    return 1;
  }
}
