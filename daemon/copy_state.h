// A volume's copy state: what makes a half-copied volume "incomplete" and
// lets a broken copy resume (docs/migration.md).
//
// It lives beside the volume as `.ferry-copy.NAME` in the pool's directory
// (never a volume name: those cannot start with '.'), a text file:
//
//   ferry-copy 1 capacity=2147483648 extent=67108864 started=1764...
//   source ferry+tcp://a:7000/default/vm1
//   7 5f0c...(32 hex digits)
//   0 a1b2...
//
// a header, where the data comes from, then one line per committed extent
// (index, XXH3-128 digest), appended and synced after the extent's data is
// synced. A line cut short by a crash is ignored, so the extent is copied
// again. The file goes away (and the directory is synced) only when the
// copy is verified to its end.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "stream/digest.h"

namespace ferry::daemon {

using stream::combine_digests;
using stream::Digest;
using stream::digest_hex;
using stream::ExtentHasher;

struct CopyState {
  std::uint64_t capacity = 0;
  std::uint64_t extent_size = 0;
  std::int64_t started_ns = 0;
  std::string source;
  std::map<std::uint64_t, Digest> committed;

  std::uint64_t extents() const { return extent_size ? (capacity + extent_size - 1) / extent_size : 0; }
  // "copy from SOURCE: 12 of 32 extents committed"
  std::string summary() const;
};

std::string copy_state_file(const std::string& volume_name);

// Reads the copy state of `volume_name` in the directory `dirfd`; nullopt
// if the volume has none (it is complete). Throws DATA_LOSS if the file
// exists but its header cannot be read.
std::optional<CopyState> read_copy_state(int dirfd, const std::string& volume_name);

// Writes a fresh copy state (header, no extents), synced with its directory.
void create_copy_state(int dirfd, const std::string& volume_name, const CopyState& state);

// Appends one committed extent and syncs (unless !sync). Thread-safe per file only if the
// caller serializes (the copy session does).
void append_committed(int dirfd, const std::string& volume_name, std::uint64_t index, const Digest& digest,
                      bool sync = true);

// Removes the copy state and syncs the directory: the volume is complete.
void remove_copy_state(int dirfd, const std::string& volume_name);

}  // namespace ferry::daemon
