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

namespace ferry::daemon {

// One line per key parse_config() reads; the unit tests fail when the two
// lists differ, or when a default here is not the one default_config() has.
const std::vector<ConfigKey>& config_reference() {
  static const std::vector<ConfigKey> keys = {
      {"daemon", "listen", "list of strings", "", "one unix: socket, $XDG_RUNTIME_DIR/ferry/ferryd.sock (or ./var/ferryd.sock)",
       "addresses to listen on: unix:/path, tcp:host:port, tls:host:port, grpc:host:port, grpcs:host:port "
       "(--listen, repeatable, replaces the list)",
       "[\"unix:/run/ferry/ferryd.sock\", \"tcp:127.0.0.1:16509\"]"},
      {"daemon", "log_level", "string", "\"info\"", "", "trace, debug, info, warn, error, critical or off (--log-level)", ""},
      {"daemon", "io_threads", "integer", "0", "one per core",
       "threads running every connection and coroutine handler (--io-threads)", ""},
      {"daemon", "worker_threads", "integer", "4", "", "threads for handlers that may block (--worker-threads)", ""},
      {"daemon", "calls_before_streams", "boolean", "true", "",
       "stream handlers' work waits while calls and frames are ready on their io thread (--no-calls-before-streams "
       "turns it off)",
       ""},
      {"daemon", "shutdown_grace_ms", "integer", "5000", "",
       "milliseconds calls in flight may take to finish after SIGTERM (--shutdown-grace)", ""},
      {"daemon", "test_service", "boolean", "false", "", "serve the test program 99 (--test-service)", ""},

      {"unix", "socket_mode", "string", "\"0600\"", "", "permissions of unix: sockets, octal (--unix-socket-mode)", ""},
      {"unix", "socket_group", "string", "\"\"", "ferryd's group", "group owning unix: sockets (--unix-socket-group)",
       "\"ferry\""},
      {"unix", "allowed_users", "list of strings", "[]", "anyone who can open the socket",
       "user names or uids let in, checked with SO_PEERCRED (--unix-allowed-user)", "[\"root\", \"1000\"]"},
      {"unix", "auth", "string", "\"none\"", "", "none (peer credentials) or sasl, on unix: listeners (--auth-unix)", ""},

      {"tcp", "auth", "string", "\"sasl\"", "", "sasl or none, on tcp: and grpc: listeners (--auth-tcp)", ""},

      {"tls", "auth", "string", "\"none\"", "",
       "none or sasl, on tls: and grpcs: listeners, beyond the client certificate (--auth-tls)", ""},
      {"tls", "ca_file", "string", "\"\"", "", "PEM file of the CAs client certificates must chain to (--tls-ca)",
       "\"/etc/ferry/ca.pem\""},
      {"tls", "cert_file", "string", "\"\"", "",
       "PEM server certificate (and chain); tls: and grpcs: listeners need it (--tls-cert)", "\"/etc/ferry/server.pem\""},
      {"tls", "key_file", "string", "\"\"", "", "PEM private key of cert_file (--tls-key)", "\"/etc/ferry/server.key\""},
      {"tls", "verify_client", "boolean", "true", "",
       "require a client certificate signed by ca_file (--tls-no-verify-client turns it off)", ""},
      {"tls", "allowed_dn", "list of strings", "[]", "any certificate the CA signed",
       "globs over the client certificate's subject in RFC 2253 form (--tls-allowed-dn)", "[\"CN=backup*,O=example\"]"},
      {"tls", "min_version", "string", "\"1.3\"", "", "1.2 admits TLS 1.2 clients too (--tls-min-version)", ""},
      {"tls", "ciphersuites", "string", "\"\"", "OpenSSL's", "TLS 1.3 cipher suites, in OpenSSL's syntax", ""},

      {"sasl", "mechanisms", "list of strings", "[\"SCRAM-SHA-256\"]", "",
       "mechanisms offered, if installed; PLAIN and LOGIN only ever over TLS (--sasl-mechanisms)", ""},
      {"sasl", "db", "string", "\"\"", "Cyrus's /etc/sasldb2", "the sasldb made with saslpasswd2 (--sasl-db)",
       "\"/etc/ferry/sasldb2\""},
      {"sasl", "realm", "string", "\"\"", "the host name", "realm the users were added under (--sasl-realm)", ""},
      {"sasl", "allowed_users", "list of strings", "[]", "anyone in the database",
       "globs over the authenticated user name (--sasl-allowed-user)", "[\"backup-*\"]"},
      {"sasl", "min_ssf", "integer", "0", "",
       "without TLS, the least protection a mechanism must give; 56 or more demands a security layer (--sasl-min-ssf)",
       ""},

      {"limits", "max_clients", "integer", "1024", "", "connections at once (--max-clients)", ""},
      {"limits", "max_unauthenticated_clients", "integer", "64", "",
       "connections still in the TLS handshake, Hello or SASL (--max-unauthenticated-clients)", ""},
      {"limits", "max_calls_per_client", "integer", "16384", "", "calls in flight per connection (--max-calls-per-client)",
       ""},
      {"limits", "max_streams_per_client", "integer", "64", "", "streams open per connection (--max-streams-per-client)",
       ""},
      {"limits", "max_calls", "integer", "65536", "", "calls in flight across all connections (--max-calls)", ""},
      {"limits", "max_streams", "integer", "1024", "", "streams open across all connections (--max-streams)", ""},
      {"limits", "max_buffered_bytes_per_client", "integer", "67108864", "64 MiB",
       "bytes queued for a client that does not read them before the daemon stops reading from it; 0: no bound "
       "(--max-buffered-bytes-per-client)",
       ""},
      {"limits", "max_buffered_bytes", "integer", "1073741824", "1 GiB",
       "pooled frame buffers held across all clients before new calls are refused as overloaded; 0: no bound "
       "(--max-buffered-bytes)",
       ""},
      {"limits", "max_frame", "integer", "33554432", "32 MiB",
       "largest CALL, REPLY or MESSAGE body, 64 KiB up to the protocol's ceiling (--max-frame)", ""},
      {"limits", "auth_timeout_ms", "integer", "10000", "",
       "milliseconds from accept to the end of authentication (--auth-timeout)", ""},
      {"limits", "idle_timeout_ms", "integer", "0", "never",
       "milliseconds a connection may sit with nothing in flight before it is closed (--idle-timeout)", ""},

      {"keepalive", "interval_ms", "integer", "5000", "",
       "milliseconds of silence before a keepalive probe; 0: off (--keepalive-interval)", ""},
      {"keepalive", "count", "integer", "3", "",
       "unanswered probes before a peer is declared dead (--keepalive-count)", ""},

      {"volumes", "file_io", "string", "\"io_uring\"", "",
       "io_uring, or threads to do volume I/O on a thread pool; io_uring falls back to threads by itself where the "
       "kernel refuses it (--file-io)",
       ""},
      {"volumes", "file_io_threads", "integer", "4", "",
       "threads for blocking file work (opening, hole maps, truncation; all I/O with threads)", ""},
      {"volumes", "io_depth", "integer", "8", "",
       "file operations in flight per stream (read-ahead of downloads, writes behind of uploads)", ""},

      {"fault", "transport", "string", "\"\"", "none",
       "faults injected into every accepted connection's bytes: delay, corrupt_every, drop_every, reset_after, "
       "direction, seed; for reproducing problems, never in production (--fault-transport)",
       "\"delay=1ms\""},
      {"fault", "volume", "string", "\"\"", "none",
       "volume file operations failed with an errno or delayed: op, errno, after, every, times, volume, delay "
       "(--fault-volume)",
       "\"op=write,errno=EIO,after=100\""},

      {"migration", "extent_size", "integer", "67108864", "64 MiB",
       "a copy's unit of commit, verification and resume; a multiple of 4096", ""},
      {"migration", "parallel", "integer", "8", "", "extents in flight per copy, each an upload stream to the destination",
       ""},
      {"migration", "window", "integer", "4194304", "4 MiB",
       "stream credit window this daemon proposes to destinations (they may grant less)", ""},
      {"migration", "tls_ca", "string", "\"\"", "the system's CAs",
       "PEM CAs this daemon, as a copy's source, checks destinations' certificates against", "\"/etc/ferry/ca.pem\""},
      {"migration", "tls_cert", "string", "\"\"", "", "client certificate shown to destinations",
       "\"/etc/ferry/client.pem\""},
      {"migration", "tls_key", "string", "\"\"", "", "private key of tls_cert", "\"/etc/ferry/client.key\""},
      {"migration", "sasl_user", "string", "\"\"", "", "SASL user name for destinations that ask", "\"migrator\""},
      {"migration", "sasl_password_file", "string", "\"\"", "", "file whose first line is the SASL password",
       "\"/etc/ferry/migrator.password\""},

      {"admin", "enabled", "boolean", "true", "", "serve the admin socket (--no-admin turns it off)", ""},
      {"admin", "socket", "string", "\"\"", "ferryd-admin.sock beside the first unix: listener",
       "the admin socket, mode 0600, for uid 0 and ferryd's own uid only (--admin-socket)",
       "\"/run/ferry/ferryd-admin.sock\""},
      {"admin", "metrics_listen", "string", "\"\"", "off",
       "HOST:PORT of the Prometheus endpoint, GET /metrics (--metrics-listen)", "\"127.0.0.1:9109\""},

      {"nbd", "listen", "list of strings", "[]", "",
       "plain NBD listeners, unix:/path (mode 0600) or tcp:host:port; NBD has no authentication, so prefer ferry "
       "nbd-serve across machines (--nbd-listen, repeatable, replaces the list)",
       "[\"unix:/run/ferry/nbd.sock\"]"},
      {"nbd", "max_in_flight", "integer", "4096", "", "NBD requests in flight per NBD connection (--nbd-max-in-flight)",
       ""},
      {"nbd", "buffer_bytes", "integer", "268435456", "256 MiB",
       "payload bytes all NBD connections hold at once; beyond it ferryd stops reading requests until replies go out "
       "(--nbd-buffer-bytes)",
       ""},
      {"nbd", "max_request", "integer", "33554432", "32 MiB",
       "largest NBD READ or WRITE, advertised as the maximum block size", ""},

      {"nbd.export", "name", "string", "", "none: no extra exports",
       "an extra NBD export beside the volumes: its name (--nbd-export NAME=BACKEND, repeatable, adds to the list)",
       "\"scratch\""},
      {"nbd.export", "backend", "string", "", "",
       "memory:SIZE, null:SIZE, nbd:URI (a remote NBD server such as qemu-nbd or nbdkit) or volume:POOL/NAME, "
       "optionally followed by ,delay=DURATION and ,ro",
       "\"memory:1G\""},

      {"pool", "name", "string", "", "one pool, default, beside the socket",
       "a storage pool's name: a directory of volume files; it may not contain / or start with . (--pool "
       "NAME=DIR[:ro], repeatable, replaces the list)",
       "\"default\""},
      {"pool", "path", "string", "", "", "the pool's directory, created if missing", "\"/var/lib/ferry/default\""},
      {"pool", "read_only", "boolean", "false", "", "serve the pool's volumes read-only", ""},
  };
  return keys;
}

bool is_table_array(const std::string& section) { return section == "pool" || section == "nbd.export"; }

namespace {

std::string section_header(const std::string& section) {
  return is_table_array(section) ? "[[" + section + "]]" : "[" + section + "]";
}
std::string example_of(const ConfigKey& k) { return *k.example ? k.example : k.default_toml; }

}  // namespace

std::string config_reference_text(const std::string& format) {
  const auto& keys = config_reference();
  std::string out;
  if (format == "tsv") {
    out = "section\tkey\ttype\tdefault\tdefault_note\tmeaning\n";
    for (const auto& k : keys)
      out += section_header(k.section) + "\t" + k.key + "\t" + k.type + "\t" + k.default_toml + "\t" + k.default_note +
             "\t" + k.meaning + "\n";
    return out;
  }
  if (format == "toml") {
    out = "# Every ferryd setting, each set to an example value (ferryd --help-config=toml).\n";
    std::string current;
    for (const auto& k : keys) {
      if (k.section != current) {
        current = k.section;
        out += "\n" + section_header(current) + "\n";
      }
      out += std::string(k.key) + " = " + example_of(k) + "\n";
    }
    return out;
  }
  if (format == "text") {
    out = "ferryd configuration keys (TOML; docs/configuration.md, ferryd.conf(5)):\n";
    std::string current;
    for (const auto& k : keys) {
      if (k.section != current) {
        current = k.section;
        out += "\n" + section_header(current) + "\n";
      }
      std::string def = *k.default_toml ? k.default_toml : "";
      if (*k.default_note) def += std::string(def.empty() ? "" : " (") + k.default_note + (def.empty() ? "" : ")");
      out += "  " + std::string(k.key) + " (" + k.type + (def.empty() ? "" : ", default " + def) + ")\n      " +
             k.meaning + "\n";
    }
    return out;
  }
  throw Error(Code::invalid_argument, "--help-config: unknown format \"" + format + "\" (text, tsv or toml)", "config");
}

}  // namespace ferry::daemon
