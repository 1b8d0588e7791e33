// Volume migration between daemons (program 3, proto/ferry/v1/migration.proto;
// docs/migration.md).
//
// On the source, CopyStart starts a job that connects to the destination
// daemon with this daemon's own client credentials ([migration] in the
// configuration) and copies the volume extent by extent, `parallel`
// extents at once, each extent one upload stream, holes skipped (SEEK_DATA
// and all-zero chunks), an optional bandwidth cap shared by the streams.
// On the destination, a copy session holds the volume's writer lock,
// commits each extent (data synced, digest recorded in the copy state)
// before answering its stream, and marks the volume complete only when
// CopyFinish has compared every extent's digest with the source's.
//
// Jobs exist on both sides ("copy-out", "copy-in"); either can be cancelled
// (JobCancel), and the other side stops with the same error: the source
// aborts its streams and tells the destination (CopyAbort); the destination
// aborts the streams of its session, which fail on the source. A session
// whose source connection is gone ends within a second, its lock released.
// Progress goes to subscribed connections as JobEvent MESSAGEs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rpc/client.h"
#include "rpc/program.h"

namespace ferry::rpc {
class Server;
}

namespace ferry::v1 {
class JobStatus;
}

namespace ferry::daemon {

class VolumeService;

struct MigrationOptions {
  std::uint64_t extent_size = 64u << 20;  // bytes per extent (commit and resume unit)
  unsigned parallel = 4;                  // extents in flight per copy
  unsigned depth = 8;                     // file reads in flight per extent
  // How this daemon connects to destinations: TLS CA/certificate/key and
  // SASL credentials (rpc::ClientOptions), window and timeouts.
  rpc::ClientOptions client;
  unsigned keep_jobs = 64;                // finished jobs kept for job-list/job-info
};

class Migration {
 public:
  Migration(VolumeService& volumes, rpc::Server& server, MigrationOptions options);
  ~Migration();
  Migration(const Migration&) = delete;
  Migration& operator=(const Migration&) = delete;

  std::shared_ptr<rpc::Program> program();
  // Cancels running jobs and sessions ("the daemon is shutting down") and
  // waits up to `grace` for them to end.
  void shutdown(std::chrono::milliseconds grace);

  // For the admin interface: the jobs (running and recently finished) and a
  // cancel by id, as job-list and job-cancel do. cancel_job throws
  // NOT_FOUND; a finished job is left as it is.
  std::vector<v1::JobStatus> jobs() const;
  v1::JobStatus cancel_job(const std::string& id, const std::string& reason);

  class Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace ferry::daemon
