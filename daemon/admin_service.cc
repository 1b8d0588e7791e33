#include "daemon/admin_service.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <spdlog/spdlog.h>

#include "daemon/migration.h"
#include "ferry/v1/admin.ferry.h"
#include "ferry/v1/migration.pb.h"
#include "rpc/server.h"

#ifndef FERRY_VERSION
#define FERRY_VERSION "unknown"
#endif

namespace ferry::daemon {

namespace {

using v1::Admin;
constexpr const char* transports[] = {"unix", "tcp", "tls", "grpc", "grpcs"};
const std::string admin_cancel = "cancelled by the administrator";
const std::string admin_disconnect = "disconnected by the administrator";

std::int64_t wall_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

v1::AdminLimits to_proto(const rpc::ServerLimits& l) {
  v1::AdminLimits out;
  out.set_max_clients(l.max_clients);
  out.set_max_unauthenticated_clients(l.max_unauthenticated_clients);
  out.set_max_calls(l.max_calls);
  out.set_max_streams(l.max_streams);
  out.set_max_calls_per_client(l.max_calls_per_client);
  out.set_max_streams_per_client(l.max_streams_per_client);
  out.set_max_buffered_bytes_per_client(l.max_buffered_bytes_per_client);
  out.set_max_buffered_bytes(l.max_buffered_bytes);
  out.set_auth_timeout_ms(static_cast<std::uint64_t>(l.auth_timeout.count()));
  out.set_idle_timeout_ms(static_cast<std::uint64_t>(l.idle_timeout.count()));
  return out;
}

v1::AdminClient to_proto(const rpc::ClientInfo& c) {
  v1::AdminClient out;
  out.set_id(c.id);
  out.set_transport(c.peer.transport);
  out.set_address(c.peer.address);
  if (c.peer.uid) out.set_uid(*c.peer.uid);
  if (c.peer.pid) out.set_pid(*c.peer.pid);
  if (c.peer.gid) out.set_gid(*c.peer.gid);
  out.set_tls_subject(c.peer.tls_subject);
  out.set_tls_version(c.peer.tls_version);
  out.set_sasl_user(c.peer.user);
  out.set_sasl_mechanism(c.peer.mechanism);
  out.set_sasl_ssf(c.peer.ssf);
  out.set_client_name(c.client_name);
  out.set_authenticated(c.authenticated);
  out.set_admin(c.admin);
  out.set_connected_ns(c.connected_ns);
  out.set_bytes_received(c.bytes_in);
  out.set_bytes_sent(c.bytes_out);
  out.set_calls_in_flight(c.calls_in_flight);
  out.set_streams_in_flight(c.streams_in_flight);
  return out;
}

// "Volume.VolUpload" -> "upload".
std::string stream_kind(const std::string& procedure) {
  if (procedure == "Volume.VolUpload") return "upload";
  if (procedure == "Volume.VolDownload") return "download";
  if (procedure == "Migration.CopyWrite") return "copy-extent";
  if (procedure.rfind("Nbd.", 0) == 0) return "nbd";
  return "stream";
}

void split_volume(const std::string& ref, v1::AdminJob& job) {
  const auto slash = ref.find('/');
  if (slash == std::string::npos) return;
  job.set_pool(ref.substr(0, slash));
  job.set_volume(ref.substr(slash + 1));
}

// "ferry.v1.Volume.VolUpload" -> "Volume.VolUpload".
std::string short_procedure(const std::string& full) {
  const auto last = full.rfind('.');
  if (last == std::string::npos || last == 0) return full;
  const auto before = full.rfind('.', last - 1);
  return before == std::string::npos ? full : full.substr(before + 1);
}

v1::AdminJob to_proto(const rpc::StreamJob& stream_job) {
  rpc::StreamJob j = stream_job;
  j.procedure = short_procedure(j.procedure);
  v1::AdminJob out;
  out.set_id(std::to_string(j.id));
  out.set_kind(stream_kind(j.procedure));
  out.set_client_id(j.client_id);
  out.set_subject(j.subject);
  if (out.kind() != "nbd") split_volume(j.subject, out);
  out.set_bytes_done(j.bytes);
  out.set_started_ns(j.started_ns);
  out.set_procedure(j.procedure);
  out.set_state("running");
  return out;
}

v1::AdminJob to_proto(const v1::JobStatus& j) {
  v1::AdminJob out;
  out.set_id(j.id());
  out.set_kind(j.kind());
  // The volume on this daemon: the source of a copy-out, the destination
  // of a copy-in.
  const std::string& local = j.kind() == "copy-in" ? j.destination() : j.source();
  out.set_subject(j.source() + " -> " + j.destination());
  split_volume(local, out);
  out.set_bytes_done(j.done_bytes());
  out.set_bytes_total(j.total_bytes());
  out.set_started_ns(j.started_ns());
  out.set_procedure("Migration.CopyStart");
  out.set_state("running");
  return out;
}

bool all_digits(const std::string& s) {
  return !s.empty() && s.size() < 20 && s.find_first_not_of("0123456789") == std::string::npos;
}

std::string who(const rpc::PeerIdentity& peer) {
  return peer.uid ? "uid " + std::to_string(*peer.uid) + (peer.pid ? " pid " + std::to_string(*peer.pid) : "")
                  : peer.address;
}

}  // namespace

unsigned process_threads() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("Threads:", 0) == 0) return static_cast<unsigned>(std::strtoul(line.c_str() + 8, nullptr, 10));
  return 0;
}

AdminService::AdminService(rpc::Server& server, Migration* migration)
    : server_(server), migration_(migration), started_ns_(wall_ns()) {}

v1::AdminServerInfo AdminService::server_info() const {
  const rpc::ServerStats s = server_.stats();
  v1::AdminServerInfo out;
  out.set_version(FERRY_VERSION);
  out.set_pid(static_cast<std::uint32_t>(::getpid()));
  out.set_uptime_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
  out.set_started_ns(started_ns_);
  out.set_io_threads(s.io_threads);
  out.set_worker_threads(s.worker_threads);
  out.set_process_threads(process_threads());
  out.set_connections(s.clients);
  for (const char* t : transports) {
    auto* c = out.add_connections_by_transport();
    c->set_transport(t);
    auto it = s.clients_by_transport.find(t);
    c->set_connections(it == s.clients_by_transport.end() ? 0 : it->second);
  }
  out.set_admin_connections(s.admin_clients);
  out.set_connections_accepted(s.clients_total);
  out.set_connections_refused(s.clients_refused);
  out.set_unauthenticated_connections(s.clients_unauthenticated);
  out.set_calls_in_flight(s.calls_in_flight);
  out.set_streams_in_flight(s.streams_in_flight);
  out.set_calls_total(s.calls_total);
  out.set_calls_cancelled(s.calls_cancelled);
  out.set_calls_overloaded(s.calls_overloaded);
  out.set_protocol_errors(s.protocol_errors);
  out.set_auth_failures(s.auth_failures);
  out.set_bytes_received(s.bytes_in);
  out.set_bytes_sent(s.bytes_out);
  out.set_buffer_bytes_in_use(s.buffer_bytes_in_use);
  *out.mutable_limits() = to_proto(server_.limits());
  const auto level = spdlog::level::to_string_view(spdlog::get_level());
  out.set_log_level(std::string(level.data(), level.size()));
  out.set_jobs(static_cast<std::uint64_t>(jobs().jobs_size()));
  return out;
}

v1::AdminJobList AdminService::jobs() const {
  v1::AdminJobList out;
  for (const auto& j : server_.stream_jobs()) *out.add_jobs() = to_proto(j);
  if (migration_) {
    for (const auto& j : migration_->jobs())
      if (j.state() == v1::JOB_RUNNING) *out.add_jobs() = to_proto(j);
  }
  return out;
}

std::string AdminService::metrics_text() const {
  const v1::AdminServerInfo i = server_info();
  std::string out;
  auto metric = [&out](const char* name, const char* type, const char* help) {
    out += "# HELP ";
    out += name;
    out += ' ';
    out += help;
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
  };
  auto value = [&out](const std::string& series, std::uint64_t v) { out += series + ' ' + std::to_string(v) + '\n'; };
  auto one = [&](const char* name, const char* type, const char* help, std::uint64_t v) {
    metric(name, type, help);
    value(name, v);
  };
  one("ferry_up", "gauge", "1 when the daemon answers the scrape.", 1);
  metric("ferry_info", "gauge", "The daemon's version, as a label; always 1.");
  value("ferry_info{version=\"" + i.version() + "\"}", 1);
  metric("ferry_uptime_seconds", "gauge", "Seconds since the daemon started.");
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3f", i.uptime_seconds());
  out += std::string("ferry_uptime_seconds ") + buf + "\n";
  metric("ferry_start_time_seconds", "gauge", "When the daemon started, seconds since the Unix epoch.");
  std::snprintf(buf, sizeof buf, "%.3f", static_cast<double>(i.started_ns()) / 1e9);
  out += std::string("ferry_start_time_seconds ") + buf + "\n";
  one("ferry_threads", "gauge", "Threads of the daemon process.", i.process_threads());
  one("ferry_io_threads", "gauge", "io threads running connections and coroutine handlers.", i.io_threads());
  one("ferry_worker_threads", "gauge", "Threads for handlers that may block.", i.worker_threads());
  metric("ferry_connections", "gauge", "Client connections open now, by transport (the admin socket's left out).");
  for (const auto& c : i.connections_by_transport())
    value("ferry_connections{transport=\"" + c.transport() + "\"}", c.connections());
  one("ferry_admin_connections", "gauge", "Connections open on the admin socket.", i.admin_connections());
  one("ferry_unauthenticated_connections", "gauge", "Connections not yet through Hello and authentication.",
      i.unauthenticated_connections());
  one("ferry_connections_accepted_total", "counter", "Connections accepted since start (refused ones included).",
      i.connections_accepted());
  one("ferry_connections_refused_total", "counter", "Connections refused: limits, permissions, shutdown.",
      i.connections_refused());
  one("ferry_calls_in_flight", "gauge", "Calls being handled now.", i.calls_in_flight());
  one("ferry_streams_in_flight", "gauge", "Streams open now.", i.streams_in_flight());
  one("ferry_calls_total", "counter", "Calls dispatched to handlers since start.", i.calls_total());
  one("ferry_calls_cancelled_total", "counter", "Calls cancelled (by their client or the administrator).",
      i.calls_cancelled());
  one("ferry_calls_overloaded_total", "counter", "Calls refused over a call or stream limit.", i.calls_overloaded());
  one("ferry_protocol_errors_total", "counter", "Connections closed for a protocol violation.", i.protocol_errors());
  one("ferry_auth_failures_total", "counter", "Failed TLS handshakes, SASL exchanges, refused peers, auth timeouts.",
      i.auth_failures());
  one("ferry_bytes_received_total", "counter", "Bytes read on every connection since start.", i.bytes_received());
  one("ferry_bytes_sent_total", "counter", "Bytes written on every connection since start.", i.bytes_sent());
  one("ferry_buffer_bytes_in_use", "gauge", "Bytes of pooled frame buffers held now.", i.buffer_bytes_in_use());
  one("ferry_jobs", "gauge", "Jobs running now (streams and copies).", i.jobs());
  metric("ferry_limit", "gauge", "The limits in force, by name.");
  const auto& l = i.limits();
  value("ferry_limit{name=\"max_clients\"}", l.max_clients());
  value("ferry_limit{name=\"max_unauthenticated_clients\"}", l.max_unauthenticated_clients());
  value("ferry_limit{name=\"max_calls\"}", l.max_calls());
  value("ferry_limit{name=\"max_streams\"}", l.max_streams());
  value("ferry_limit{name=\"max_calls_per_client\"}", l.max_calls_per_client());
  value("ferry_limit{name=\"max_streams_per_client\"}", l.max_streams_per_client());
  value("ferry_limit{name=\"max_buffered_bytes_per_client\"}", l.max_buffered_bytes_per_client());
  value("ferry_limit{name=\"max_buffered_bytes\"}", l.max_buffered_bytes());
  return out;
}

std::shared_ptr<rpc::Program> AdminService::program() {
  auto program = rpc::Program::of<Admin>();
  program->on<Admin::ServerInfo>(
      [this](const v1::AdminServerInfoCall&, rpc::CallContext&) -> asio::awaitable<v1::AdminServerInfo> {
        co_return server_info();
      });
  program->on<Admin::ClientList>(
      [this](const v1::AdminClientListCall& call, rpc::CallContext&) -> asio::awaitable<v1::AdminClientList> {
        v1::AdminClientList out;
        for (const auto& c : server_.clients())
          if (!c.admin || call.include_admin()) *out.add_clients() = to_proto(c);
        co_return out;
      });
  program->on<Admin::ClientInfo>(
      [this](const v1::AdminClientRef& ref, rpc::CallContext&) -> asio::awaitable<v1::AdminClient> {
        auto c = server_.client(ref.id());
        if (!c) throw Error(Code::not_found, "no client " + std::to_string(ref.id()) + " is connected", "admin");
        co_return to_proto(*c);
      });
  program->on<Admin::ClientDisconnect>(
      [this](const v1::AdminClientRef& ref, rpc::CallContext& ctx) -> asio::awaitable<v1::Empty> {
        const std::string reason = ref.reason().empty() ? admin_disconnect : admin_disconnect + ": " + ref.reason();
        spdlog::info("admin ({}): disconnect client {}", who(ctx.peer()), ref.id());
        if (!server_.disconnect(ref.id(), reason))
          throw Error(Code::not_found, "no client " + std::to_string(ref.id()) + " is connected", "admin");
        co_return v1::Empty{};
      });
  program->on<Admin::LimitsGet>([this](const v1::AdminLimitsGetCall&,
                                       rpc::CallContext&) -> asio::awaitable<v1::AdminLimits> {
    co_return to_proto(server_.limits());
  });
  program->on<Admin::LimitsSet>([this](const v1::AdminLimits& call,
                                       rpc::CallContext& ctx) -> asio::awaitable<v1::AdminLimits> {
    rpc::ServerLimits l = server_.limits();
    std::string changed;
    auto set = [&changed](const char* name, bool has, std::uint64_t v, auto& field) {
      if (!has) return;
      changed += (changed.empty() ? "" : ", ") + std::string(name) + "=" + std::to_string(v);
      using T = std::decay_t<decltype(field)>;
      if constexpr (std::is_same_v<T, std::chrono::milliseconds>)
        field = std::chrono::milliseconds(static_cast<std::int64_t>(std::min<std::uint64_t>(v, 24ull * 3600 * 1000)));
      else
        field = static_cast<T>(v);
    };
    set("max_clients", call.has_max_clients(), call.max_clients(), l.max_clients);
    set("max_unauthenticated_clients", call.has_max_unauthenticated_clients(), call.max_unauthenticated_clients(),
        l.max_unauthenticated_clients);
    set("max_calls", call.has_max_calls(), call.max_calls(), l.max_calls);
    set("max_streams", call.has_max_streams(), call.max_streams(), l.max_streams);
    set("max_calls_per_client", call.has_max_calls_per_client(), call.max_calls_per_client(), l.max_calls_per_client);
    set("max_streams_per_client", call.has_max_streams_per_client(), call.max_streams_per_client(),
        l.max_streams_per_client);
    set("max_buffered_bytes_per_client", call.has_max_buffered_bytes_per_client(),
        call.max_buffered_bytes_per_client(), l.max_buffered_bytes_per_client);
    set("max_buffered_bytes", call.has_max_buffered_bytes(), call.max_buffered_bytes(), l.max_buffered_bytes);
    set("auth_timeout_ms", call.has_auth_timeout_ms(), call.auth_timeout_ms(), l.auth_timeout);
    set("idle_timeout_ms", call.has_idle_timeout_ms(), call.idle_timeout_ms(), l.idle_timeout);
    server_.set_limits(l);  // throws INVALID_ARGUMENT, changing nothing
    if (!changed.empty()) spdlog::info("admin ({}): limits set: {}", who(ctx.peer()), changed);
    co_return to_proto(server_.limits());
  });
  program->on<Admin::LogLevelGet>([](const v1::AdminLogLevelGetCall&,
                                     rpc::CallContext&) -> asio::awaitable<v1::AdminLogLevel> {
    v1::AdminLogLevel out;
    const auto level = spdlog::level::to_string_view(spdlog::get_level());
    out.set_level(std::string(level.data(), level.size()));
    co_return out;
  });
  program->on<Admin::LogLevelSet>([](const v1::AdminLogLevel& call,
                                     rpc::CallContext& ctx) -> asio::awaitable<v1::AdminLogLevel> {
    static const char* names[] = {"trace", "debug", "info", "warn", "error", "critical", "off"};
    std::string level = call.level();
    if (level == "warning") level = "warn";
    if (level == "err") level = "error";
    if (std::find(std::begin(names), std::end(names), level) == std::end(names))
      throw Error(Code::invalid_argument,
                  "unknown log level '" + call.level() + "' (expected trace, debug, info, warn, error, critical or off)",
                  "admin");
    const auto old = spdlog::level::to_string_view(spdlog::get_level());
    spdlog::set_level(spdlog::level::from_str(level));
    // Said at the level that is in force afterwards, unless that is off.
    spdlog::log(spdlog::get_level() == spdlog::level::off ? spdlog::level::critical : spdlog::get_level(),
                "admin ({}): log level set to {} (was {})", who(ctx.peer()), level,
                std::string(old.data(), old.size()));
    v1::AdminLogLevel out;
    out.set_level(level);
    co_return out;
  });
  program->on<Admin::JobList>([this](const v1::AdminJobListCall&,
                                     rpc::CallContext&) -> asio::awaitable<v1::AdminJobList> { co_return jobs(); });
  program->on<Admin::JobCancel>([this](const v1::AdminJobRef& ref,
                                       rpc::CallContext& ctx) -> asio::awaitable<v1::AdminJob> {
    const std::string reason = ref.reason().empty() ? admin_cancel : admin_cancel + ": " + ref.reason();
    spdlog::info("admin ({}): cancel job {}", who(ctx.peer()), ref.id());
    if (all_digits(ref.id())) {
      const std::uint64_t id = std::stoull(ref.id());
      for (const auto& j : server_.stream_jobs()) {
        if (j.id != id) continue;
        v1::AdminJob out = to_proto(j);
        if (server_.cancel_stream_job(id, Error(Code::cancelled, reason, "admin"))) {
          out.set_state("cancelled");
          co_return out;
        }
      }
    } else if (migration_) {
      const v1::JobStatus status = migration_->cancel_job(ref.id(), reason);  // NOT_FOUND if none
      v1::AdminJob out = to_proto(status);
      out.set_state(status.state() == v1::JOB_RUNNING ? "cancelling" : "finished");
      co_return out;
    }
    throw Error(Code::not_found, "no running job '" + ref.id() + "' on this daemon", "admin");
  });
  return program;
}

}  // namespace ferry::daemon
