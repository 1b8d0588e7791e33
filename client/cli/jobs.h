// The ferry CLI's migration verbs: vol-copy, job-list, job-info, job-cancel
// (docs/cli.md, docs/migration.md).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "client/cli/output.h"
#include "client/session.h"
#include "ferry/v1/migration.pb.h"

namespace ferry::cli {

// One end of a copy: a volume on a daemon,
//   ferry+unix:///run/ferry/ferryd.sock/POOL/NAME   (the socket path, then pool and name)
//   ferry+tcp://host:port/POOL/NAME, ferry+tls://host:port/POOL/NAME
//   POOL/NAME or NAME                               (on the -c daemon)
// or, for one of the two ends, a disk local to the CLI:
//   /path/file, ./file, ../file, file:PATH          (a regular file)
//   nbd://..., nbds://..., nbd+unix://..., nbds+unix://...  (an NBD export)
struct CopyEnd {
  enum class Kind { volume, file, nbd };
  Kind kind = Kind::volume;
  std::string uri;  // the daemon (volume), the path (file) or the NBD URI
  VolumeName volume;
  bool local() const { return kind != Kind::volume; }
};
// Throws ferry::Error(INVALID_ARGUMENT) naming what is wrong.
CopyEnd parse_copy_end(const std::string& text, const std::string& default_uri);

struct CopyRequest {
  CopyEnd source;
  CopyEnd destination;
  bool resume = false;
  bool overwrite = false;
  std::uint64_t bandwidth = 0;  // bytes/s, 0: unlimited
  std::uint64_t extent_size = 0;
  unsigned parallel = 0;
  bool no_sync = false;         // the destination commits without fdatasync
  bool detach = false;          // print the job and return
};

struct JobOutput {
  bool json = false;
  bool quiet = false;
  ProgressOutput progress;
  std::function<bool()> interrupted;  // Ctrl-C: cancel the job
};

// `session` is connected to the source daemon, or to the daemon of the
// volume end when the other end is local.
int run_vol_copy(Session& session, const CopyRequest& request, const JobOutput& out);
int run_job_list(Session& session, const JobOutput& out);
int run_job_info(Session& session, const std::string& id, const JobOutput& out);
int run_job_cancel(Session& session, const std::string& id, const JobOutput& out);

Json job_json(const v1::JobStatus& job);
const char* job_state_name(v1::JobState state);
// "copy-1a2b3c  copy-out  running  42%  1.2 GiB / 2.0 GiB  310 MiB/s  ETA 0:03  default/v -> ferry+tcp://..."
std::string job_line(const v1::JobStatus& job);

}  // namespace ferry::cli
