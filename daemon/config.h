// ferryd's configuration: a TOML file (docs/configuration.md), an embedded
// default used when there is none, and command-line options that override
// either. Unknown keys and wrong types are errors that name the key and the
// line, so a typo never silently falls back to a default.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "daemon/io_fault.h"
#include "rpc/server.h"

namespace ferry::daemon {

struct PoolConfig {
  std::string name;
  std::string path;
  bool read_only = false;
};

// [volumes]: how volume files are read and written.
struct VolumeOptions {
  std::string file_io = "io_uring";  // or "threads" (also the fallback where io_uring is refused)
  unsigned file_io_threads = 4;      // pool for blocking file work
  unsigned io_depth = 8;             // file operations in flight per stream
  IoFaultOptions fault;              // from [fault] volume
};

// [nbd] and [[nbd.export]]: NBD service (docs/nbd.md).
struct NbdExportConfig {
  std::string name;
  // KIND:ARG[,delay=DURATION][,ro] with KIND one of memory:SIZE, null:SIZE,
  // nbd:URI (a remote NBD server), volume:POOL/NAME.
  std::string backend;
};
struct NbdConfig {
  std::vector<std::string> listen;          // plain NBD listeners: unix:/path, tcp:host:port
  unsigned max_in_flight = 4096;            // NBD requests per connection
  std::uint64_t buffer_bytes = 256u << 20;  // payload bytes held at once, all NBD connections together
  std::uint32_t max_request = 32u << 20;    // largest READ/WRITE
  std::vector<NbdExportConfig> exports;
};

// Volume migration (daemon/migration.h): how copies are cut and how this
// daemon connects to destination daemons.
struct MigrationConfig {
  std::uint64_t extent_size = 64u << 20;  // commit, verify and resume unit
  unsigned parallel = 8;                  // extents in flight per copy
  std::uint32_t window = 4u << 20;        // stream window proposed to destinations
  std::string tls_ca;                     // PEM CAs for destination certificates (default: system)
  std::string tls_cert;                   // client certificate shown to destinations
  std::string tls_key;
  std::string sasl_user;                  // for destinations that ask for SASL
  std::string sasl_password_file;         // first line: the password
};

// [fault]: faults injected on purpose, for reproducing field problems
// (docs/operations.md, "Fault injection"). Empty: none, the default.
struct FaultConfig {
  std::string transport;  // rpc::FaultOptions spec, on every accepted connection
  std::string volume;     // IoFaultOptions spec (daemon/io_fault.h), on volume file I/O
};

// [admin]: the admin socket and the metrics endpoint (docs/operations.md).
struct AdminConfig {
  bool enabled = true;
  std::string socket;          // empty: ferryd-admin.sock beside the first unix: listener
  std::string metrics_listen;  // HOST:PORT of the Prometheus endpoint; empty: off
};

struct DaemonConfig {
  rpc::ServerOptions server;
  std::vector<std::string> listen;  // addresses; empty: the default unix socket
  std::vector<PoolConfig> pools;    // the `default` pool when none is given
  VolumeOptions volumes;
  NbdConfig nbd;
  MigrationConfig migration;
  FaultConfig fault;
  AdminConfig admin;
  std::string log_level = "info";
  unsigned shutdown_grace_ms = 5000;
  bool test_service = false;
  std::string source = "embedded default";  // where it came from, for the log
};

// What ferryd uses with no configuration file: a unix socket under
// $XDG_RUNTIME_DIR/ferry (or ./var), a `default` pool next to it.
DaemonConfig default_config();

// Reads a TOML file over the defaults. Throws ferry::Error
// (INVALID_ARGUMENT) with "FILE:LINE: what is wrong".
DaemonConfig load_config(const std::string& path);
DaemonConfig parse_config(const std::string& toml_text, const std::string& source_name);

// The effective configuration as TOML (ferryd --print-config); parsing it
// again gives the same configuration.
std::string to_toml(const DaemonConfig& config);

// The configuration reference (ferryd --help-config, the ferryd.conf(5) man
// page, docs/configuration.md): every key parse_config() accepts, one entry
// each. Tests check it against the parser and against to_toml().
struct ConfigKey {
  const char* section;       // "daemon", "limits" ...; "pool", "nbd.export" are arrays of tables
  const char* key;
  const char* type;          // string, integer, boolean, list of strings
  const char* default_toml;  // the default as a TOML value; "" when it depends on the machine or there is none
  const char* default_note;  // what the default means, or what it is when default_toml is ""
  const char* meaning;       // what it does, and the ferryd option that overrides it
  const char* example;       // a TOML value parse_config() accepts ("": default_toml)
};
const std::vector<ConfigKey>& config_reference();
bool is_table_array(const std::string& section);  // [[pool]], [[nbd.export]]

// The reference printed as `format`: "text" (people), "tsv" (section, key,
// type, default, meaning; one key per line, for the man page generator) or
// "toml" (a configuration setting every key to its example value).
// Throws ferry::Error (INVALID_ARGUMENT) for another format.
std::string config_reference_text(const std::string& format);

}  // namespace ferry::daemon
