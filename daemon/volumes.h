// The volume service (program 1, proto/ferry/v1/volume.proto): directory
// pools of raw, sparse volume files, served to ferry clients.
//
// What it promises (docs/volumes.md):
//  - Names are file names, never paths: validated, opened relative to the
//    pool's directory descriptor with O_NOFOLLOW, so neither "../x" nor a
//    symbolic link planted in the pool reaches outside it.
//  - One writer per volume: an upload holds the volume's writer lock from
//    its CALL until its last write has landed; a second upload, a delete or a
//    resize meanwhile is refused with FAILED_PRECONDITION (retryable), naming
//    who writes. Downloads run beside each other and beside a writer; a
//    delete aborts the running downloads of that volume.
//  - Uploads write in place (what was written stays if the stream fails) or,
//    with atomic, into a temporary file that replaces the volume only when
//    the stream has ended well and the data is synced; a failed atomic upload
//    leaves the old contents and no temporary file.
//  - File I/O goes through FileIo (io_uring or a thread pool) with a few
//    operations in flight per stream and pooled buffers, so a stream costs
//    no thread and at most depth x chunk bytes of memory beyond its window.
//  - Events (VolumeEvent MESSAGEs) go to every connection that subscribed,
//    for creates, deletes, resizes and finished (or failed) uploads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "daemon/config.h"
#include "daemon/file_io.h"
#include "daemon/volume_io.h"
#include "rpc/program.h"

namespace ferry::stream {
class Stream;
}

namespace ferry::v1 {
class VolumeEvent;
class VolumeInfo;
enum VolumeEventKind : int;
}

namespace ferry::daemon {

// Throws INVALID_ARGUMENT unless `name` is a plain volume file name.
void validate_volume_name(const std::string& name);

class VolumeService {
 public:
  // Opens (and creates, if missing) every pool's directory. Throws if one
  // cannot be used.
  VolumeService(const std::vector<PoolConfig>& pools, VolumeOptions options);
  ~VolumeService();
  VolumeService(const VolumeService&) = delete;
  VolumeService& operator=(const VolumeService&) = delete;

  std::shared_ptr<rpc::Program> program();

  // A volume opened for an NBD export (daemon/nbd_service.h): a descriptor
  // (owned by `keep`) and its size. Writable opens share the volume with
  // other NBD connections and exclude uploads, resizes and deletes until
  // `keep` is dropped. Throws NOT_FOUND, INVALID_ARGUMENT, or
  // FAILED_PRECONDITION (retryable) while an upload writes it.
  struct NbdVolume {
    std::string pool;
    std::string name;
    int fd = -1;
    std::uint64_t size = 0;
    bool read_only = false;
    std::shared_ptr<void> keep;
  };
  NbdVolume open_nbd(const std::string& pool, const std::string& name, bool read_only);
  FileIo& file_io() { return *io_; }
  unsigned io_depth() const { return std::max(1u, options_.io_depth); }
  std::string describe() const;

  struct Pool {
    std::string name;
    std::string path;
    bool read_only = false;
    int dirfd = -1;
  };

  // For migration (daemon/migration.h): the pool by name (NOT_FOUND), one
  // that may be written (FAILED_PRECONDITION if read-only), the writer lock
  // of "pool/name", a volume file opened safely, its info (with its copy
  // state), and events to subscribers.
  const Pool& find_pool(const std::string& name) const { return pool(name); }
  const Pool& writable_pool(const std::string& name, const char* what) const;
  std::shared_ptr<void> lock_writer(const std::string& pool, const std::string& name, const std::string& writer);
  std::shared_ptr<Fd> open_file(const Pool& pool, const std::string& name, int flags, struct stat* st);
  ferry::v1::VolumeInfo info(const Pool& pool, const std::string& name);
  void publish(ferry::v1::VolumeEventKind kind, const std::string& pool, const std::string& name,
               std::uint64_t capacity, const std::string& detail);

  // Who holds a volume, for the writer lock and for deletes.
  class Registry;
  class Events;

 private:
  const Pool& pool(const std::string& name) const;

  VolumeOptions options_;
  std::vector<Pool> pools_;
  std::unique_ptr<FileIo> io_;
  std::shared_ptr<Registry> registry_;
  std::shared_ptr<Events> events_;
};

}  // namespace ferry::daemon
