#include "daemon/config.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "daemon/default_paths.h"
#include "rpc/error.h"

namespace ferry::daemon {

namespace {

Error bad(const std::string& source, const toml::source_region& where, const std::string& what) {
  return Error(Code::invalid_argument, source + ":" + std::to_string(where.begin.line) + ": " + what, "config");
}

// Strict access to one table: every key must be read by the caller's
// schema, or check_all_used() names the first one that was not.
class Section {
 public:
  Section(const toml::table& table, std::string name, const std::string& source)
      : table_(table), name_(std::move(name)), source_(source) {}

  const toml::node* get(const std::string& key) {
    used_.insert(key);
    return table_.get(key);
  }
  std::string key_name(const std::string& key) const { return name_.empty() ? key : name_ + "." + key; }

  void string(const std::string& key, std::string& out) {
    if (auto* n = get(key)) {
      auto v = n->value<std::string>();
      if (!v || !n->is_string()) throw bad(source_, n->source(), key_name(key) + " must be a string");
      out = *v;
    }
  }
  template <class Int>
  void integer(const std::string& key, Int& out, std::int64_t min, std::int64_t max) {
    if (auto* n = get(key)) {
      if (!n->is_integer()) throw bad(source_, n->source(), key_name(key) + " must be an integer");
      const std::int64_t v = *n->value<std::int64_t>();
      if (v < min || v > max)
        throw bad(source_, n->source(),
                  key_name(key) + " = " + std::to_string(v) + " is out of range (" + std::to_string(min) + " to " +
                      std::to_string(max) + ")");
      out = static_cast<Int>(v);
    }
  }
  void milliseconds(const std::string& key, std::chrono::milliseconds& out) {
    std::int64_t ms = out.count();
    integer(key, ms, 0, 24LL * 3600 * 1000);
    out = std::chrono::milliseconds(ms);
  }
  void boolean(const std::string& key, bool& out) {
    if (auto* n = get(key)) {
      if (!n->is_boolean()) throw bad(source_, n->source(), key_name(key) + " must be true or false");
      out = *n->value<bool>();
    }
  }
  void strings(const std::string& key, std::vector<std::string>& out) {
    if (auto* n = get(key)) {
      auto* arr = n->as_array();
      if (!arr) throw bad(source_, n->source(), key_name(key) + " must be a list of strings");
      out.clear();
      for (auto& e : *arr) {
        if (!e.is_string()) throw bad(source_, e.source(), key_name(key) + " must be a list of strings");
        out.push_back(*e.value<std::string>());
      }
    }
  }
  void auth(const std::string& key, rpc::AuthMode& out) {
    std::string text;
    string(key, text);
    if (text.empty()) return;
    if (text != "none" && text != "sasl")
      throw bad(source_, table_.get(key)->source(), key_name(key) + " must be \"none\" or \"sasl\", not \"" + text + "\"");
    out = rpc::parse_auth_mode(text);
  }
  void check_all_used() const {
    for (auto&& [key, node] : table_) {
      const std::string k(key.str());
      if (!used_.count(k)) throw bad(source_, node.source(), "unknown setting " + key_name(k));
    }
  }

 private:
  const toml::table& table_;
  std::string name_;
  const std::string& source_;
  std::set<std::string> used_;
};

const toml::table& table_or_empty(Section& parent, const std::string& key, const std::string& source) {
  static const toml::table empty;
  const toml::node* n = parent.get(key);
  if (!n) return empty;
  if (!n->is_table()) throw bad(source, n->source(), "[" + key + "] must be a table");
  return *n->as_table();
}

std::string octal(unsigned mode) {
  std::ostringstream out;
  out << '0' << std::oct << mode;
  return out.str();
}

}  // namespace

DaemonConfig default_config() {
  DaemonConfig c;
  c.server.auth_tcp = rpc::AuthMode::sasl;  // plain TCP asks for a password unless told otherwise
  const std::filesystem::path socket = default_socket_path();
  c.listen = {"unix:" + socket.string()};
  c.pools = {PoolConfig{"default", (socket.parent_path() / "pools" / "default").string(), false}};
  return c;
}

DaemonConfig parse_config(const std::string& text, const std::string& source) {
  toml::table root;
  try {
    root = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    throw Error(Code::invalid_argument,
                source + ":" + std::to_string(e.source().begin.line) + ": " + std::string(e.description()), "config");
  }
  DaemonConfig c = default_config();
  c.source = source;
  auto& s = c.server;
  Section top(root, "", source);

  const auto& daemon_table = table_or_empty(top, "daemon", source);
  Section daemon(daemon_table, "daemon", source);
  daemon.string("log_level", c.log_level);
  static const std::set<std::string> levels = {"trace", "debug", "info", "warn", "error", "critical", "off"};
  if (!levels.count(c.log_level))
    throw bad(source, daemon_table.get("log_level")->source(), "daemon.log_level must be one of trace, debug, info, warn, error, critical, off");
  daemon.integer("shutdown_grace_ms", c.shutdown_grace_ms, 0, 3600 * 1000);
  daemon.integer("io_threads", s.io_threads, 0, 1024);
  daemon.integer("worker_threads", s.worker_threads, 1, 1024);
  daemon.boolean("calls_before_streams", s.calls_before_streams);
  daemon.boolean("test_service", c.test_service);
  daemon.strings("listen", c.listen);
  for (const auto& l : c.listen) {
    try {
      rpc::Endpoint::parse(l);
    } catch (const Error& e) {
      throw bad(source, daemon_table.get("listen")->source(), "daemon.listen: " + e.message());
    }
  }
  daemon.check_all_used();

  Section unix_s(table_or_empty(top, "unix", source), "unix", source);
  std::string mode = octal(s.unix_socket_mode);
  unix_s.string("socket_mode", mode);
  try {
    std::size_t used = 0;
    s.unix_socket_mode = static_cast<unsigned>(std::stoul(mode, &used, 8));
    if (used != mode.size() || s.unix_socket_mode > 0777) throw std::invalid_argument(mode);
  } catch (const std::exception&) {
    throw Error(Code::invalid_argument, source + ": unix.socket_mode \"" + mode + "\" is not an octal mode like \"0660\"",
                "config");
  }
  unix_s.string("socket_group", s.unix_socket_group);
  unix_s.strings("allowed_users", s.unix_allowed_users);
  unix_s.auth("auth", s.auth_unix);
  unix_s.check_all_used();

  Section tcp(table_or_empty(top, "tcp", source), "tcp", source);
  tcp.auth("auth", s.auth_tcp);
  tcp.check_all_used();

  Section tls(table_or_empty(top, "tls", source), "tls", source);
  tls.auth("auth", s.auth_tls);
  tls.string("ca_file", s.tls.ca_file);
  tls.string("cert_file", s.tls.cert_file);
  tls.string("key_file", s.tls.key_file);
  tls.boolean("verify_client", s.tls.verify_peer);
  tls.strings("allowed_dn", s.tls.allowed_dn);
  tls.string("min_version", s.tls.min_version);
  tls.string("ciphersuites", s.tls.ciphersuites);
  tls.check_all_used();

  Section sasl(table_or_empty(top, "sasl", source), "sasl", source);
  sasl.strings("mechanisms", s.sasl.mechanisms);
  sasl.string("db", s.sasl.sasldb_path);
  sasl.string("realm", s.sasl.realm);
  sasl.strings("allowed_users", s.sasl.allowed_users);
  sasl.integer("min_ssf", s.sasl.min_ssf, 0, 256);
  sasl.check_all_used();

  Section limits(table_or_empty(top, "limits", source), "limits", source);
  limits.integer("max_clients", s.max_clients, 1, 1 << 20);
  limits.integer("max_unauthenticated_clients", s.max_unauthenticated_clients, 1, 1 << 20);
  limits.integer("max_calls_per_client", s.max_calls_per_client, 1, 1 << 24);
  limits.integer("max_streams_per_client", s.max_streams_per_client, 1, 1 << 20);
  limits.integer("max_calls", s.max_calls, 1, 1 << 26);
  limits.integer("max_streams", s.max_streams, 1, 1 << 20);
  limits.integer("max_buffered_bytes_per_client", s.max_buffered_bytes_per_client, 0, std::int64_t{1} << 40);
  limits.integer("max_buffered_bytes", s.max_buffered_bytes, 0, std::int64_t{1} << 44);
  limits.integer("max_frame", s.limits.max_frame, 64 << 10, rpc::FrameLimits::max_frame_ceiling);
  limits.milliseconds("auth_timeout_ms", s.auth_timeout);
  limits.milliseconds("idle_timeout_ms", s.idle_timeout);
  limits.check_all_used();

  Section keepalive(table_or_empty(top, "keepalive", source), "keepalive", source);
  keepalive.milliseconds("interval_ms", s.keepalive_interval);
  keepalive.integer("count", s.keepalive_count, 1, 1000);
  keepalive.check_all_used();

  const auto& volumes_table = table_or_empty(top, "volumes", source);
  Section volumes(volumes_table, "volumes", source);
  volumes.string("file_io", c.volumes.file_io);
  if (c.volumes.file_io != "io_uring" && c.volumes.file_io != "threads")
    throw bad(source, volumes_table.get("file_io")->source(), "volumes.file_io must be \"io_uring\" or \"threads\"");
  volumes.integer("file_io_threads", c.volumes.file_io_threads, 1, 256);
  volumes.integer("io_depth", c.volumes.io_depth, 1, 256);
  volumes.check_all_used();

  const auto& fault_table = table_or_empty(top, "fault", source);
  Section fault(fault_table, "fault", source);
  fault.string("transport", c.fault.transport);
  fault.string("volume", c.fault.volume);
  fault.check_all_used();
  try {
    s.fault = rpc::FaultOptions::parse(c.fault.transport);
  } catch (const Error& e) {
    throw bad(source, fault_table.get("transport")->source(), "fault.transport: " + e.message());
  }
  try {
    c.volumes.fault = IoFaultOptions::parse(c.fault.volume);
  } catch (const Error& e) {
    throw bad(source, fault_table.get("volume")->source(), "fault.volume: " + e.message());
  }

  const auto& migration_table = table_or_empty(top, "migration", source);
  Section migration(migration_table, "migration", source);
  migration.integer("extent_size", c.migration.extent_size, 1 << 20, std::int64_t{1} << 34);
  if (c.migration.extent_size % 4096)
    throw bad(source, migration_table.get("extent_size")->source(),
              "migration.extent_size must be a multiple of 4096");
  migration.integer("parallel", c.migration.parallel, 1, 256);
  migration.integer("window", c.migration.window, 64 << 10, std::int64_t{1} << 30);
  migration.string("tls_ca", c.migration.tls_ca);
  migration.string("tls_cert", c.migration.tls_cert);
  migration.string("tls_key", c.migration.tls_key);
  migration.string("sasl_user", c.migration.sasl_user);
  migration.string("sasl_password_file", c.migration.sasl_password_file);
  migration.check_all_used();

  Section admin(table_or_empty(top, "admin", source), "admin", source);
  admin.boolean("enabled", c.admin.enabled);
  admin.string("socket", c.admin.socket);
  admin.string("metrics_listen", c.admin.metrics_listen);
  admin.check_all_used();

  const auto& nbd_table = table_or_empty(top, "nbd", source);
  Section nbd(nbd_table, "nbd", source);
  nbd.strings("listen", c.nbd.listen);
  nbd.integer("max_in_flight", c.nbd.max_in_flight, 1, 1 << 20);
  nbd.integer("buffer_bytes", c.nbd.buffer_bytes, 1 << 20, std::int64_t{1} << 40);
  nbd.integer("max_request", c.nbd.max_request, 4096, 32 << 20);
  if (const toml::node* exports = nbd.get("export")) {
    auto* arr = exports->as_array();
    if (!arr) throw bad(source, exports->source(), "NBD exports are written [[nbd.export]] with name and backend");
    c.nbd.exports.clear();
    std::set<std::string> names;
    for (auto& e : *arr) {
      if (!e.is_table()) throw bad(source, e.source(), "each [[nbd.export]] is a table with name and backend");
      Section ex(*e.as_table(), "nbd.export", source);
      NbdExportConfig ec;
      ex.string("name", ec.name);
      ex.string("backend", ec.backend);
      ex.check_all_used();
      if (ec.name.empty() || ec.backend.empty()) throw bad(source, e.source(), "an [[nbd.export]] needs a name and a backend");
      if (!names.insert(ec.name).second) throw bad(source, e.source(), "NBD export \"" + ec.name + "\" is defined twice");
      c.nbd.exports.push_back(ec);
    }
  }
  nbd.check_all_used();

  if (const toml::node* pools = top.get("pool")) {
    auto* arr = pools->as_array();
    if (!arr) throw bad(source, pools->source(), "pools are written [[pool]] with name and path");
    c.pools.clear();
    std::set<std::string> names;
    for (auto& p : *arr) {
      if (!p.is_table()) throw bad(source, p.source(), "each [[pool]] is a table with name and path");
      Section pool(*p.as_table(), "pool", source);
      PoolConfig pc;
      pool.string("name", pc.name);
      pool.string("path", pc.path);
      pool.boolean("read_only", pc.read_only);
      pool.check_all_used();
      if (pc.name.empty() || pc.path.empty()) throw bad(source, p.source(), "a [[pool]] needs a name and a path");
      if (pc.name.find_first_of("/\\") != std::string::npos || pc.name.front() == '.')
        throw bad(source, p.source(), "pool name \"" + pc.name + "\" may not contain '/' or start with '.'");
      if (!names.insert(pc.name).second) throw bad(source, p.source(), "pool \"" + pc.name + "\" is defined twice");
      c.pools.push_back(pc);
    }
  }
  top.check_all_used();
  return c;
}

DaemonConfig load_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(Code::invalid_argument, "cannot read config file " + path, "config");
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path);
}

std::string to_toml(const DaemonConfig& c) {
  const auto& s = c.server;
  auto list = [](const std::vector<std::string>& v) {
    toml::array a;
    for (const auto& x : v) a.push_back(x);
    return a;
  };
  toml::table root;
  root.insert("daemon", toml::table{{"log_level", c.log_level},
                                    {"shutdown_grace_ms", static_cast<std::int64_t>(c.shutdown_grace_ms)},
                                    {"io_threads", static_cast<std::int64_t>(s.io_threads)},
                                    {"worker_threads", static_cast<std::int64_t>(s.worker_threads)},
                                    {"calls_before_streams", s.calls_before_streams},
                                    {"test_service", c.test_service},
                                    {"listen", list(c.listen)}});
  root.insert("unix", toml::table{{"socket_mode", octal(s.unix_socket_mode)},
                                  {"socket_group", s.unix_socket_group},
                                  {"allowed_users", list(s.unix_allowed_users)},
                                  {"auth", rpc::to_string(s.auth_unix)}});
  root.insert("tcp", toml::table{{"auth", rpc::to_string(s.auth_tcp)}});
  root.insert("tls", toml::table{{"auth", rpc::to_string(s.auth_tls)},
                                 {"ca_file", s.tls.ca_file},
                                 {"cert_file", s.tls.cert_file},
                                 {"key_file", s.tls.key_file},
                                 {"verify_client", s.tls.verify_peer},
                                 {"allowed_dn", list(s.tls.allowed_dn)},
                                 {"min_version", s.tls.min_version},
                                 {"ciphersuites", s.tls.ciphersuites}});
  root.insert("sasl", toml::table{{"mechanisms", list(s.sasl.mechanisms)},
                                  {"db", s.sasl.sasldb_path},
                                  {"realm", s.sasl.realm},
                                  {"allowed_users", list(s.sasl.allowed_users)},
                                  {"min_ssf", static_cast<std::int64_t>(s.sasl.min_ssf)}});
  root.insert("limits", toml::table{{"max_clients", static_cast<std::int64_t>(s.max_clients)},
                                    {"max_unauthenticated_clients", static_cast<std::int64_t>(s.max_unauthenticated_clients)},
                                    {"max_calls_per_client", static_cast<std::int64_t>(s.max_calls_per_client)},
                                    {"max_streams_per_client", static_cast<std::int64_t>(s.max_streams_per_client)},
                                    {"max_calls", static_cast<std::int64_t>(s.max_calls)},
                                    {"max_streams", static_cast<std::int64_t>(s.max_streams)},
                                    {"max_buffered_bytes_per_client", static_cast<std::int64_t>(s.max_buffered_bytes_per_client)},
                                    {"max_buffered_bytes", static_cast<std::int64_t>(s.max_buffered_bytes)},
                                    {"max_frame", static_cast<std::int64_t>(s.limits.max_frame)},
                                    {"auth_timeout_ms", static_cast<std::int64_t>(s.auth_timeout.count())},
                                    {"idle_timeout_ms", static_cast<std::int64_t>(s.idle_timeout.count())}});
  root.insert("keepalive", toml::table{{"interval_ms", static_cast<std::int64_t>(s.keepalive_interval.count())},
                                       {"count", static_cast<std::int64_t>(s.keepalive_count)}});
  root.insert("volumes", toml::table{{"file_io", c.volumes.file_io},
                                     {"file_io_threads", static_cast<std::int64_t>(c.volumes.file_io_threads)},
                                     {"io_depth", static_cast<std::int64_t>(c.volumes.io_depth)}});
  toml::array nbd_exports;
  for (const auto& e : c.nbd.exports) nbd_exports.push_back(toml::table{{"name", e.name}, {"backend", e.backend}});
  toml::table nbd{{"listen", list(c.nbd.listen)},
                  {"max_in_flight", static_cast<std::int64_t>(c.nbd.max_in_flight)},
                  {"buffer_bytes", static_cast<std::int64_t>(c.nbd.buffer_bytes)},
                  {"max_request", static_cast<std::int64_t>(c.nbd.max_request)}};
  if (!nbd_exports.empty()) nbd.insert("export", nbd_exports);
  root.insert("nbd", nbd);
  const auto& m = c.migration;
  root.insert("migration", toml::table{{"extent_size", static_cast<std::int64_t>(m.extent_size)},
                                       {"parallel", static_cast<std::int64_t>(m.parallel)},
                                       {"window", static_cast<std::int64_t>(m.window)},
                                       {"tls_ca", m.tls_ca},
                                       {"tls_cert", m.tls_cert},
                                       {"tls_key", m.tls_key},
                                       {"sasl_user", m.sasl_user},
                                       {"sasl_password_file", m.sasl_password_file}});
  if (!c.fault.transport.empty() || !c.fault.volume.empty())
    root.insert("fault", toml::table{{"transport", c.fault.transport}, {"volume", c.fault.volume}});
  root.insert("admin", toml::table{{"enabled", c.admin.enabled},
                                   {"socket", c.admin.socket},
                                   {"metrics_listen", c.admin.metrics_listen}});
  toml::array pools;
  for (const auto& p : c.pools) pools.push_back(toml::table{{"name", p.name}, {"path", p.path}, {"read_only", p.read_only}});
  root.insert("pool", pools);
  std::ostringstream out;
  out << "# ferryd configuration (" << c.source << ")\n" << root << "\n";
  return out.str();
}

}  // namespace ferry::daemon
