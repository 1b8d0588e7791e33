// Copies between a volume on a ferryd and a disk local to the caller: a
// file or an NBD export (docs/migration.md, "Local ends").
//
// `ferry vol-copy` between two daemons asks the source daemon to run the
// copy. When one end is here instead, this process drives it with the same
// procedures and the same guarantees:
//
//   to a volume     CopyOpen on the destination daemon, one CopyWrite
//                   stream per extent (several at once), CopyFinish with
//                   every extent's digest; the volume stays "incomplete"
//                   until then and a broken copy resumes from the extents
//                   the daemon committed, each checked against this end.
//   from a volume   a VolDownload per extent (several at once) written into
//                   the disk, checked against the digest the daemon made of
//                   what it sent; a file being written has a
//                   `FILE.ferry-copy` marker beside it until the copy is
//                   verified, and --resume keeps every extent whose
//                   contents already match the daemon's ExtentDigests.
//
// Holes go as holes both ways (SEEK_DATA/SEEK_HOLE for files,
// base:allocation block status for NBD, and all-zero chunks), every extent
// is verified with XXH3-128, and the whole copy with the digest of the
// extent digests, as between daemons.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "client/session.h"

namespace ferry {

// One local disk: read or written by extent, from several threads at once.
class LocalDisk {
 public:
  struct Item {
    bool hole = false;
    std::uint64_t length = 0;  // data: the bytes in the buffer given to next()
  };
  // Reads [offset, offset + length) as data pieces of at most `chunk`
  // bytes and holes (all-zero chunks included).
  class Reader {
   public:
    virtual ~Reader() = default;
    virtual std::optional<Item> next(std::span<std::uint8_t> buffer) = 0;
  };
  // Writes from an offset on, in order; holes read back as zeros.
  class Writer {
   public:
    virtual ~Writer() = default;
    virtual void write(std::span<const std::uint8_t> data) = 0;
    virtual void write_hole(std::uint64_t length) = 0;
  };

  virtual ~LocalDisk() = default;
  virtual std::uint64_t size() const = 0;
  // "file /srv/vm1.raw", "NBD nbd+unix:///?socket=/run/x.sock"
  virtual std::string description() const = 0;
  virtual std::unique_ptr<Reader> reader(std::uint64_t offset, std::uint64_t length, std::size_t chunk) = 0;
  virtual std::unique_ptr<Writer> writer(std::uint64_t offset) = 0;
  // What was written is on stable storage.
  virtual void flush() = 0;
  // A copy into this disk is verified complete (a file drops its marker).
  virtual void complete() {}
};

// A file to read (it must exist).
std::unique_ptr<LocalDisk> open_file_source(const std::string& path);
// A file to write `capacity` bytes into. A missing file is created; an
// existing one is refused unless `overwrite` (truncated first) or `resume`
// (kept, to be compared extent by extent). Until complete(), the file has a
// marker `PATH.ferry-copy` beside it naming the source.
std::unique_ptr<LocalDisk> open_file_destination(const std::string& path, std::uint64_t capacity,
                                                 const std::string& source, bool overwrite, bool resume);
// An NBD export (any URI nbd_connect_uri(3) takes: nbd://host:port/export,
// nbd+unix:///export?socket=PATH, nbds:// ...). A destination must be
// writable and at least `capacity` bytes (0: a source).
std::unique_ptr<LocalDisk> open_nbd_disk(const std::string& uri, bool writable, std::uint64_t capacity = 0);

struct LocalCopyOptions {
  bool resume = false;
  bool overwrite = false;           // to a volume: replace an existing one
  std::uint64_t bandwidth = 0;      // bytes/s of data; 0: unlimited
  std::uint64_t extent_size = 0;    // 0: 64 MiB
  unsigned parallel = 0;            // extents in flight; 0: 8
  bool no_sync = false;             // to a volume: the daemon commits without fdatasync
  std::string source_text;          // for the destination's job and logs
  std::function<bool()> interrupted;  // polled ~10 times a second: true cancels the copy
};

struct LocalCopyResult {
  std::uint64_t total_bytes = 0;
  std::uint64_t data_bytes = 0;     // crossed the link as data
  std::uint64_t hole_bytes = 0;     // crossed as holes
  std::uint64_t skipped_bytes = 0;  // already there and verified (resume)
  std::uint64_t extents = 0;
  std::string digest;               // XXH3-128 of the extent digests, 16 bytes
  std::string job;                  // to a volume: the destination daemon's job id
  std::chrono::steady_clock::duration elapsed{};
};

// `session` is connected to the daemon holding the volume. Throws
// ferry::Error; an interruption is CANCELLED, and the daemon's side is
// ended (to a volume: CopyAbort, the volume left incomplete and resumable).
LocalCopyResult copy_to_volume(Session& session, LocalDisk& source, const std::string& pool, const std::string& name,
                               const LocalCopyOptions& options, ProgressFn progress = {});
LocalCopyResult copy_from_volume(Session& session, const std::string& pool, const std::string& name,
                                 LocalDisk& destination, const LocalCopyOptions& options, ProgressFn progress = {});

}  // namespace ferry
