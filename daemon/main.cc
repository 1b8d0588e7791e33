// ferryd: the ferry daemon.
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "daemon/admin_service.h"
#include "daemon/config.h"
#include "daemon/default_paths.h"
#include "daemon/metrics_http.h"
#include "daemon/migration.h"
#include "daemon/nbd_service.h"
#include "daemon/socket_activation.h"
#include "daemon/test_service.h"
#include "daemon/volumes.h"
#include "rpc/server.h"

namespace {

// One address per line: the ferry listeners first, then plain NBD ones
// prefixed "nbd-" (nbd-unix:/path, nbd-tcp:host:port).
void write_ready_file(const std::string& path, const std::vector<ferry::rpc::Endpoint>& endpoints,
                      std::size_t ferry_count) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    for (std::size_t i = 0; i < endpoints.size(); ++i)
      out << (i < ferry_count ? "" : "nbd-") << endpoints[i].to_string() << '\n';
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace

namespace {

// --config FILE (or --config=FILE) is read before the other options, which
// then override what it says.
std::string config_path_from(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--config" && i + 1 < argc) return argv[i + 1];
    if (arg.rfind("--config=", 0) == 0) return arg.substr(9);
  }
  return {};
}

// How this daemon connects to migration destinations.
ferry::daemon::MigrationOptions migration_options(const ferry::daemon::MigrationConfig& c) {
  ferry::daemon::MigrationOptions o;
  o.extent_size = c.extent_size;
  o.parallel = c.parallel;
  o.client.window = c.window;
  o.client.tls.ca_file = c.tls_ca;
  o.client.tls.cert_file = c.tls_cert;
  o.client.tls.key_file = c.tls_key;
  o.client.sasl.username = c.sasl_user;
  if (!c.sasl_password_file.empty()) {
    std::ifstream in(c.sasl_password_file);
    if (!in)
      throw ferry::Error(ferry::Code::invalid_argument,
                         "migration.sasl_password_file: cannot read " + c.sasl_password_file);
    std::getline(in, o.client.sasl.password);
    while (!o.client.sasl.password.empty() &&
           (o.client.sasl.password.back() == '\r' || o.client.sasl.password.back() == '\n'))
      o.client.sasl.password.pop_back();
  }
  return o;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& x : v) out += (out.empty() ? "" : ",") + x;
  return out;
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  for (std::size_t pos = 0; pos <= text.size();) {
    auto comma = text.find(',', pos);
    if (comma == std::string::npos) comma = text.size();
    if (comma > pos) out.push_back(text.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string config_path = config_path_from(argc, argv);
  ferry::daemon::DaemonConfig config;
  try {
    config = config_path.empty() ? ferry::daemon::default_config() : ferry::daemon::load_config(config_path);
  } catch (const ferry::Error& e) {
    std::fprintf(stderr, "ferryd: %s\n", e.message().c_str());
    return 2;
  }

  CLI::App app{"ferryd: serves ferry programs over UNIX, TCP and TLS sockets.\n"
               "Settings come from --config FILE (TOML, see docs/configuration.md) or the embedded default;\n"
               "the options below override them (their defaults shown are the configuration's values)."};
  // A later occurrence of an option overrides an earlier one (scripts add
  // to a base command line).
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  std::string config_flag;
  app.add_option("--config", config_flag, "TOML configuration file (default: the embedded default)");
  bool print_config = false;
  app.add_flag("--print-config", print_config, "print the effective configuration as TOML and exit");
  std::string help_config;
  auto* help_config_opt =
      app.add_option("--help-config", help_config,
                     "print every configuration key with its type, default and meaning and exit; FORMAT text "
                     "(default), tsv, or toml (every key set to an example value)")
          ->expected(0, 1)
          ->type_name("FORMAT");
  std::vector<std::string> listen;
  bool& test_service = config.test_service;
  std::string& log_level = config.log_level;
  std::string ready_file;
  unsigned& shutdown_grace_ms = config.shutdown_grace_ms;
  ferry::rpc::ServerOptions& options = config.server;
  unsigned keepalive_ms = static_cast<unsigned>(options.keepalive_interval.count());

  app.add_option("-l,--listen", listen,
                 "address to listen on, repeatable, replacing the configuration's: unix:/path, tcp:host:port, "
                 "tls:host:port, grpc:host:port or grpcs:host:port (now: " + join(config.listen) + ")");
  app.add_flag("--test-service", test_service, "serve the test program (99) used by tests and benchmarks");
  app.add_option("--io-threads", options.io_threads, "io threads (0 = one per core)")->capture_default_str();
  app.add_option("--worker-threads", options.worker_threads, "threads for handlers that block")
      ->capture_default_str();
  app.add_flag("--calls-before-streams,!--no-calls-before-streams", options.calls_before_streams,
               "stream handlers' work waits while calls are ready on their io thread")
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
  // Security (docs/security.md).
  std::string auth_unix = ferry::rpc::to_string(options.auth_unix), auth_tcp = ferry::rpc::to_string(options.auth_tcp),
              auth_tls = ferry::rpc::to_string(options.auth_tls);
  app.add_option("--auth-unix", auth_unix, "authentication on unix: listeners: none (peer credentials) or sasl")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "sasl"}));
  app.add_option("--auth-tcp", auth_tcp, "authentication on plain tcp: (and grpc:) listeners: sasl or none")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "sasl"}));
  app.add_option("--auth-tls", auth_tls, "authentication on tls: (and grpcs:) listeners beyond the client certificate: none or sasl")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "sasl"}));
  auto& tls = options.tls;
  bool tls_no_verify_client = false;
  app.add_option("--tls-ca", tls.ca_file, "PEM file of the CAs client certificates must chain to");
  app.add_option("--tls-cert", tls.cert_file, "PEM server certificate (and chain) for tls: and grpcs: listeners");
  app.add_option("--tls-key", tls.key_file, "PEM private key of --tls-cert");
  app.add_flag("--tls-no-verify-client", tls_no_verify_client,
                "do not ask clients for certificates (then use --auth-tls sasl)");
  app.add_option("--tls-allowed-dn", tls.allowed_dn,
                 "glob a client certificate subject (RFC 2253, e.g. 'CN=*,O=Example') must match; repeatable");
  app.add_option("--tls-min-version", tls.min_version, "1.3 or 1.2")->capture_default_str()->check(
      CLI::IsMember({"1.2", "1.3"}));
  auto& sasl = options.sasl;
  std::string sasl_mechanisms = join(sasl.mechanisms);
  app.add_option("--sasl-mechanisms", sasl_mechanisms,
                 "comma-separated SASL mechanisms to offer (PLAIN and LOGIN only ever over TLS)")
      ->capture_default_str();
  app.add_option("--sasl-db", sasl.sasldb_path, "sasldb file made with saslpasswd2 (default: Cyrus's /etc/sasldb2)");
  app.add_option("--sasl-realm", sasl.realm, "realm the users were added under (saslpasswd2 -u)");
  app.add_option("--sasl-allowed-user", sasl.allowed_users, "glob an authenticated user name must match; repeatable");
  app.add_option("--sasl-min-ssf", sasl.min_ssf,
                 "least SASL protection without TLS (0: authentication only; 56+: require a security layer)")
      ->capture_default_str();
  char mode_text[8];
  std::snprintf(mode_text, sizeof mode_text, "0%o", options.unix_socket_mode);
  std::string unix_mode = mode_text;
  app.add_option("--unix-socket-mode", unix_mode, "permissions of unix: sockets (octal)")->capture_default_str();
  app.add_option("--unix-socket-group", options.unix_socket_group, "group owning unix: sockets");
  app.add_option("--unix-allowed-user", options.unix_allowed_users,
                 "user (name or uid) allowed on unix: sockets; repeatable (default: whoever can open the socket)");
  app.add_option("--max-unauthenticated-clients", options.max_unauthenticated_clients,
                 "connections allowed at once before they finish authenticating")
      ->capture_default_str();
  app.add_option("--max-streams-per-client", options.max_streams_per_client, "streams open at once per connection")
      ->capture_default_str();
  app.add_option("--max-calls", options.max_calls, "calls in flight across all connections")->capture_default_str();
  app.add_option("--max-streams", options.max_streams, "streams open at once across all connections")
      ->capture_default_str();
  app.add_option("--max-buffered-bytes-per-client", options.max_buffered_bytes_per_client,
                 "bytes queued for a client that does not read them before its reading stops (0 = no bound)")
      ->capture_default_str();
  app.add_option("--max-buffered-bytes", options.max_buffered_bytes,
                 "frame buffer bytes held across all clients before new calls are refused (0 = no bound)")
      ->capture_default_str();
  unsigned auth_timeout_ms = static_cast<unsigned>(options.auth_timeout.count());
  unsigned idle_timeout_ms = static_cast<unsigned>(options.idle_timeout.count());
  app.add_option("--auth-timeout", auth_timeout_ms, "ms from accept to the end of TLS + Hello + SASL")
      ->capture_default_str();
  app.add_option("--idle-timeout", idle_timeout_ms, "ms a connection may sit with nothing in flight (0 = forever)")
      ->capture_default_str();
  std::vector<std::string> pool_flags;
  app.add_option("--pool", pool_flags,
                 "NAME=DIR[:ro] storage pool, repeatable, replacing the configuration's (default: a pool 'default' "
                 "beside the socket)");
  app.add_option("--file-io", config.volumes.file_io, "volume file I/O: io_uring or threads")
      ->capture_default_str()
      ->check(CLI::IsMember({"io_uring", "threads"}));
  std::vector<std::string> nbd_listen, nbd_exports;
  app.add_option("--nbd-listen", nbd_listen,
                 "plain NBD listener, repeatable, replacing the configuration's: unix:/path or tcp:host:port "
                 "(no authentication: keep it local)");
  app.add_option("--nbd-export", nbd_exports,
                 "NAME=BACKEND NBD export, repeatable, added to the configuration's: memory:SIZE, null:SIZE, nbd:URI "
                 "or volume:POOL/NAME, then optionally ,delay=64ms and ,ro");
  app.add_option("--nbd-buffer-bytes", config.nbd.buffer_bytes,
                 "payload bytes all NBD connections may hold at once")
      ->capture_default_str();
  app.add_option("--nbd-max-in-flight", config.nbd.max_in_flight, "NBD requests in flight per connection")
      ->capture_default_str();
  app.add_option("--shutdown-grace", shutdown_grace_ms, "ms calls in flight get to finish on SIGTERM")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical, off")->capture_default_str();
  app.add_option("--fault-transport", config.fault.transport,
                 "inject faults into every accepted connection, e.g. delay=5ms,corrupt_every=1M,reset_after=10M "
                 "(docs/operations.md); for reproducing problems, never in production");
  app.add_option("--fault-volume", config.fault.volume,
                 "inject volume I/O faults, e.g. op=write,errno=ENOSPC,after=8M (docs/operations.md)");
  app.add_option("--admin-socket", config.admin.socket,
                 "admin socket path (mode 0600; default: ferryd-admin.sock beside the first unix: listener)");
  app.add_flag("--no-admin", [&config](std::int64_t) { config.admin.enabled = false; }, "serve no admin socket");
  app.add_option("--metrics-listen", config.admin.metrics_listen,
                 "HOST:PORT for the Prometheus endpoint (GET /metrics), e.g. 127.0.0.1:9470 (default: off)");
  app.add_option("--ready-file", ready_file, "write the bound addresses here, one per line, once listening");
  CLI11_PARSE(app, argc, argv);
  if (help_config_opt->count()) {
    try {
      std::fputs(ferry::daemon::config_reference_text(help_config.empty() ? "text" : help_config).c_str(), stdout);
    } catch (const ferry::Error& e) {
      std::fprintf(stderr, "ferryd: %s\n", e.message().c_str());
      return 2;
    }
    return 0;
  }

  auto logger = spdlog::stderr_color_mt("ferryd");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
  options.keepalive_interval = std::chrono::milliseconds(keepalive_ms);
  options.auth_timeout = std::chrono::milliseconds(auth_timeout_ms);
  options.idle_timeout = std::chrono::milliseconds(idle_timeout_ms);
  options.auth_unix = ferry::rpc::parse_auth_mode(auth_unix);
  options.auth_tcp = ferry::rpc::parse_auth_mode(auth_tcp);
  options.auth_tls = ferry::rpc::parse_auth_mode(auth_tls);
  if (tls_no_verify_client) tls.verify_peer = false;
  sasl.mechanisms = split_commas(sasl_mechanisms);
  if (!listen.empty()) config.listen = listen;
  if (!pool_flags.empty()) {
    config.pools.clear();
    for (const auto& flag : pool_flags) {
      const auto eq = flag.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == flag.size()) {
        std::fprintf(stderr, "ferryd: --pool '%s': expected NAME=DIR or NAME=DIR:ro\n", flag.c_str());
        return 2;
      }
      ferry::daemon::PoolConfig pool{flag.substr(0, eq), flag.substr(eq + 1), false};
      if (pool.path.size() > 3 && pool.path.compare(pool.path.size() - 3, 3, ":ro") == 0) {
        pool.read_only = true;
        pool.path.resize(pool.path.size() - 3);
      }
      config.pools.push_back(pool);
    }
  }
  if (!nbd_listen.empty()) config.nbd.listen = nbd_listen;
  for (const auto& flag : nbd_exports) {
    const auto eq = flag.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == flag.size()) {
      std::fprintf(stderr, "ferryd: --nbd-export '%s': expected NAME=BACKEND, e.g. slow=null:16G,delay=64ms\n",
                   flag.c_str());
      return 2;
    }
    std::erase_if(config.nbd.exports, [&](const auto& e) { return e.name == flag.substr(0, eq); });
    config.nbd.exports.push_back({flag.substr(0, eq), flag.substr(eq + 1)});
  }
  try {
    options.fault = ferry::rpc::FaultOptions::parse(config.fault.transport);
    config.volumes.fault = ferry::daemon::IoFaultOptions::parse(config.fault.volume);
  } catch (const ferry::Error& e) {
    std::fprintf(stderr, "ferryd: %s\n", e.message().c_str());
    return 2;
  }
  try {
    options.unix_socket_mode = static_cast<unsigned>(std::stoul(unix_mode, nullptr, 8));
  } catch (const std::exception&) {
    std::fprintf(stderr, "--unix-socket-mode: '%s' is not an octal mode\n", unix_mode.c_str());
    return 2;
  }
  if (print_config) {
    std::fputs(ferry::daemon::to_toml(config).c_str(), stdout);
    return 0;
  }

  // Sockets systemd passed (socket activation): they replace daemon.listen
  // (unix, tcp, tls) and nbd.listen (nbd). Taken while this is the only
  // thread, as it edits the environment.
  std::vector<ferry::daemon::HandedSocket> handed;
  try {
    handed = ferry::daemon::sockets_from_systemd();
  } catch (const ferry::Error& e) {
    std::fprintf(stderr, "ferryd: %s\n", e.message().c_str());
    return 2;
  }
  using Role = ferry::daemon::HandedSocket::Role;
  const bool handed_ferry = std::any_of(handed.begin(), handed.end(), [](const auto& h) { return h.role != Role::nbd; });
  const bool handed_nbd = std::any_of(handed.begin(), handed.end(), [](const auto& h) { return h.role == Role::nbd; });

  // Signals are taken synchronously by the main thread only; block them
  // before any other thread exists so they all inherit the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  // Every client is a descriptor: take the hard limit (the soft one is
  // often 1024), so max_clients, not EMFILE, is what turns clients away.
  if (struct rlimit rl{}; ::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }

  try {
    // Outlives the server, whose handlers use it.
    ferry::daemon::VolumeService volumes(config.pools, config.volumes);
    ferry::daemon::NbdService nbd(volumes, config.nbd);
    ferry::rpc::Server server(options);
    ferry::daemon::Migration migration(volumes, server, migration_options(config.migration));
    server.add_program(volumes.program());
    server.add_program(nbd.program());
    server.add_program(migration.program());
    if (test_service) server.add_program(ferry::daemon::make_test_program(server));
    ferry::daemon::AdminService admin(server, &migration);
    if (config.admin.enabled) server.add_admin_program(admin.program());
    spdlog::info("configuration: {}", config.source);
    spdlog::info("volumes: {}", volumes.describe());
    if (options.fault.any())
      spdlog::warn("fault injection on every connection: {}", options.fault.describe());
    if (config.volumes.fault.any())
      spdlog::warn("fault injection on volume I/O: {}", config.volumes.fault.describe());
    std::vector<ferry::rpc::Endpoint> bound;
    std::vector<ferry::rpc::Endpoint> nbd_bound;
    if (!handed.empty()) {
      std::string names;
      for (const auto& h : handed) names += (names.empty() ? "" : ", ") + std::to_string(h.fd) + "=" + to_string(h.role);
      spdlog::info("socket activation: systemd passed {} socket(s) ({}){}{}", handed.size(), names,
                   handed_ferry ? "; daemon.listen is not bound" : "", handed_nbd ? "; nbd.listen is not bound" : "");
    }
    for (const auto& h : handed) {
      switch (h.role) {
        case Role::unix_socket: bound.push_back(server.adopt(h.fd, ferry::rpc::Endpoint::Kind::unix_socket)); break;
        case Role::tcp: bound.push_back(server.adopt(h.fd, ferry::rpc::Endpoint::Kind::tcp)); break;
        case Role::tls: bound.push_back(server.adopt(h.fd, ferry::rpc::Endpoint::Kind::tls)); break;
        case Role::nbd: nbd_bound.push_back(nbd.adopt(server, h.fd)); break;
      }
    }
    if (!handed_ferry)
      for (const auto& l : config.listen) bound.push_back(server.listen(ferry::rpc::Endpoint::parse(l)));
    const std::size_t ferry_count = bound.size();
    if (config.admin.enabled) {
      std::string path = config.admin.socket;
      if (path.empty()) {
        path = ferry::daemon::default_admin_socket_path();
        for (const auto& e : bound)
          if (e.kind == ferry::rpc::Endpoint::Kind::unix_socket && !e.path.empty() && e.path.front() != '@') {
            path = ferry::daemon::admin_socket_beside(e.path);
            break;
          }
      }
      server.listen_admin(path);
    }
    std::unique_ptr<ferry::daemon::MetricsServer> metrics;
    if (!config.admin.metrics_listen.empty())
      metrics = std::make_unique<ferry::daemon::MetricsServer>(server.io_context(), config.admin.metrics_listen,
                                                               [&admin] { return admin.metrics_text(); });
    if (!handed_nbd)
      for (const auto& l : config.nbd.listen) nbd_bound.push_back(nbd.listen(server, ferry::rpc::Endpoint::parse(l)));
    server.start();
    if (metrics) metrics->start();
    nbd.open_exports(server);
    spdlog::info("NBD: {}", nbd.describe());
    // The ready file lists the ferry listeners, then the plain NBD ones.
    for (auto& e : nbd_bound) bound.push_back(e);
    if (!ready_file.empty()) write_ready_file(ready_file, bound, ferry_count);
    spdlog::info("ferryd ready ({} io threads{})", options.io_threads ? options.io_threads : std::thread::hardware_concurrency(),
                 test_service ? ", test program enabled" : "");
    {
      std::string listening;
      for (std::size_t i = 0; i < bound.size(); ++i)
        listening += (listening.empty() ? "" : " ") + std::string(i < ferry_count ? "" : "nbd-") + bound[i].to_string();
      ferry::daemon::notify_ready("serving " + listening);
    }
    int sig = 0;
    for (;;) {
      sigwait(&signals, &sig);
      if (sig != SIGHUP) break;
      // SIGHUP: new certificates for new connections; nothing is dropped.
      try {
        server.reload_tls();
      } catch (const ferry::Error& e) {
        spdlog::error("TLS reload failed, keeping the current certificate: {}", e.message());
      }
    }
    spdlog::info("received {}, shutting down (grace {} ms)", sig == SIGTERM ? "SIGTERM" : "SIGINT", shutdown_grace_ms);
    ferry::daemon::notify_stopping();
    if (metrics) metrics->stop();
    nbd.shutdown(std::chrono::milliseconds(shutdown_grace_ms));
    migration.shutdown(std::chrono::milliseconds(std::min(shutdown_grace_ms, 2000u)));
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
