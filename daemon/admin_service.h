// The admin program (program 4, proto/ferry/v1/admin.proto) and what the
// metrics endpoint exports: a view of the running daemon for its
// administrator (docs/operations.md, "Admin interface" and "Metrics").
//
// Served on the admin socket only (rpc::Server::listen_admin). Everything
// here reads the server's counters and registries, or changes the limits
// and the log level; nothing is on the call path of ordinary clients.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "rpc/program.h"

namespace ferry::rpc {
class Server;
}

namespace ferry::v1 {
class AdminServerInfo;
class AdminJobList;
}

namespace ferry::daemon {

class Migration;

class AdminService {
 public:
  // `migration` may be null (no copy jobs then).
  AdminService(rpc::Server& server, Migration* migration);
  std::shared_ptr<rpc::Program> program();

  // What ServerInfo answers (and the metrics endpoint exports).
  v1::AdminServerInfo server_info() const;
  v1::AdminJobList jobs() const;
  // The Prometheus text exposition (format 0.0.4) of server_info().
  std::string metrics_text() const;

 private:
  rpc::Server& server_;
  Migration* migration_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  std::int64_t started_ns_;
};

// Threads of this process (/proc/self/status); 0 if unknown.
unsigned process_threads();

}  // namespace ferry::daemon
