#include "stream/sparse.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <string>

#include "rpc/error.h"

namespace ferry::stream {

namespace {

constexpr std::uint64_t max_offset = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());

// Only for messages: a descriptor is all we are given, and "fd 7" tells an
// operator nothing. Failing to find the path must not hide the real error.
std::string fd_name(int fd) {
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  char path[4096];
  const ssize_t n = ::readlink(link.c_str(), path, sizeof path);
  if (n <= 0 || static_cast<std::size_t>(n) >= sizeof path) return "fd " + std::to_string(fd);
  return std::string(path, static_cast<std::size_t>(n));
}

// from_errno would call EBADF INTERNAL, but a descriptor that is not open,
// or open read-only for a writer, is the caller's mistake, not ours. The two
// read alike in strerror, so say which it was.
Error os_error(int err, const std::string& what, int fd) {
  if (err == EBADF) {
    const bool open = ::fcntl(fd, F_GETFD) != -1;
    const std::string detail = open ? fd_name(fd) + ": " + std::strerror(err) + " (not opened for this access)"
                                    : "fd " + std::to_string(fd) + ": " + std::strerror(err) + " (not an open file)";
    return Error(Code::invalid_argument, what + ": " + detail, "os", false, err);
  }
  return Error::from_errno(err, what + ": " + fd_name(fd));
}

struct stat fstat_or_throw(int fd, const char* who) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw os_error(errno, std::string(who) + ": fstat failed", fd);
  return st;
}

void require_range(std::uint64_t offset, std::uint64_t length, const char* who) {
  if (offset > max_offset || length > max_offset - offset) {
    throw Error(Code::invalid_argument, std::string(who) + ": range at " + std::to_string(offset) + " of " +
                                            std::to_string(length) + " bytes passes the largest file offset");
  }
}

// ABORTED: the bytes were changing under the copy, so neither side is to
// blame and the whole read is worth repeating.
Error shrunk(int fd, std::uint64_t at, std::uint64_t end) {
  return Error(Code::aborted, "file shrank to " + std::to_string(at) + " bytes while being read up to " +
                                  std::to_string(end) + ": " + fd_name(fd));
}

bool seek_unsupported(int err) { return err == EINVAL || err == EOPNOTSUPP || err == ENOTSUP; }

// The extent that starts at `pos` (< end), clipped to `end`. Asking one
// extent at a time keeps the reader's memory flat on fragmented files.
Extent extent_at(int fd, std::uint64_t pos, std::uint64_t end) {
  const off_t data = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
  if (data < 0) {
    const int err = errno;
    // ENXIO: no data from pos to end of file, so the rest is one hole.
    if (err == ENXIO) return {pos, end - pos, true};
    // Treating the range as data is always correct, just slower to copy.
    if (seek_unsupported(err)) return {pos, end - pos, false};
    throw os_error(err, "lseek(SEEK_DATA) at " + std::to_string(pos) + " failed", fd);
  }
  const auto data_at = static_cast<std::uint64_t>(data);
  if (data_at > pos) return {pos, std::min(data_at, end) - pos, true};

  const off_t hole = ::lseek(fd, static_cast<off_t>(pos), SEEK_HOLE);
  if (hole < 0) {
    const int err = errno;
    // ENXIO here means the file shrank since SEEK_DATA; calling it data
    // lets the read find out and fail, instead of sending zeros as if real.
    if (err == ENXIO || seek_unsupported(err)) return {pos, end - pos, false};
    throw os_error(err, "lseek(SEEK_HOLE) at " + std::to_string(pos) + " failed", fd);
  }
  const auto hole_at = static_cast<std::uint64_t>(hole);
  // A hole punched between the two calls could put hole_at at pos; data is
  // still a safe answer and guarantees progress.
  if (hole_at <= pos) return {pos, end - pos, false};
  return {pos, std::min(hole_at, end) - pos, false};
}

std::uint64_t load64(const std::uint8_t* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);  // unaligned-safe; compiles to one load
  return v;
}

}  // namespace

std::vector<Extent> map_extents(int fd, std::uint64_t offset, std::uint64_t length) {
  require_range(offset, length, "map_extents");
  const auto size = static_cast<std::uint64_t>(fstat_or_throw(fd, "map_extents").st_size);
  const std::uint64_t end = std::min(offset + length, size);
  std::vector<Extent> extents;
  for (std::uint64_t pos = offset; pos < end;) {
    Extent e = extent_at(fd, pos, end);
    // Two pieces of one kind meet only when a writer races us (a hole filled
    // between two lseeks); callers still want maximal runs.
    if (!extents.empty() && extents.back().hole == e.hole) {
      extents.back().length += e.length;
    } else {
      extents.push_back(e);
    }
    pos += e.length;
  }
  return extents;
}

bool is_all_zero(std::span<const std::uint8_t> bytes) noexcept {
  const std::uint8_t* p = bytes.data();
  std::size_t n = bytes.size();
  // Eight words per test: few branches, and random data still fails on the
  // first 64 bytes, so the common non-zero case costs almost nothing.
  while (n >= 64) {
    const std::uint64_t any = load64(p) | load64(p + 8) | load64(p + 16) | load64(p + 24) | load64(p + 32) |
                              load64(p + 40) | load64(p + 48) | load64(p + 56);
    if (any != 0) return false;
    p += 64;
    n -= 64;
  }
  while (n >= 8) {
    if (load64(p) != 0) return false;
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    if (*p != 0) return false;
    ++p;
    --n;
  }
  return true;
}

SparseReader::SparseReader(int fd, std::uint64_t offset, std::uint64_t length, std::size_t chunk_size,
                           bool detect_zeros)
    : fd_(fd), pos_(offset), end_(offset), chunk_size_(chunk_size), detect_zeros_(detect_zeros) {
  FERRY_REQUIRE(chunk_size > 0, "SparseReader: chunk_size must be positive");
  require_range(offset, length, "SparseReader");
  const auto size = static_cast<std::uint64_t>(fstat_or_throw(fd, "SparseReader").st_size);
  end_ = std::max(offset, std::min(offset + length, size));
  extent_end_ = offset;
}

void SparseReader::read_fully(std::uint8_t* out, std::uint64_t offset, std::uint64_t length) {
  while (length > 0) {
    const ssize_t n = ::pread(fd_, out, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw os_error(errno, "pread at " + std::to_string(offset) + " failed", fd_);
    }
    if (n == 0) throw shrunk(fd_, offset, end_);
    const auto got = static_cast<std::uint64_t>(n);
    read_bytes_ += got;
    out += got;
    offset += got;
    length -= got;
  }
}

void SparseReader::check_size() {
  const auto size = static_cast<std::uint64_t>(fstat_or_throw(fd_, "SparseReader").st_size);
  if (size < end_) throw shrunk(fd_, size, end_);
}

std::optional<SparseReader::Item> SparseReader::next(std::span<std::uint8_t> buffer) {
  if (pos_ >= end_) return std::nullopt;
  FERRY_REQUIRE(buffer.size() >= chunk_size_, "SparseReader::next: buffer of " + std::to_string(buffer.size()) +
                                                  " bytes is smaller than the chunk size " +
                                                  std::to_string(chunk_size_));
  // Walk forward from pos_ while the bytes are holes (or zero chunks), so a
  // hole item covers the whole run; [pos_, cur) is that run.
  std::uint64_t cur = pos_;
  while (cur < end_) {
    if (cur >= extent_end_) {
      const Extent e = extent_at(fd_, cur, end_);
      extent_end_ = e.offset + e.length;
      extent_hole_ = e.hole;
    }
    if (extent_hole_) {
      // SEEK_DATA cannot tell a trailing hole from a file cut short since
      // the reader was made; only the size can, and it is asked once.
      if (extent_end_ == end_) check_size();
      cur = extent_end_;
      continue;
    }
    // Without zero detection, data always ends a pending hole; stop before
    // reading so the data is read once, on the next call.
    if (cur > pos_ && !detect_zeros_) break;
    const std::uint64_t n = std::min<std::uint64_t>(chunk_size_, extent_end_ - cur);
    read_fully(buffer.data(), cur, n);
    if (detect_zeros_ && is_all_zero(buffer.first(n))) {
      cur += n;
      continue;
    }
    // Non-zero data after a zero run: the run goes out first and this chunk
    // is read again next time, since the caller may reuse the buffer meanwhile.
    if (cur > pos_) break;
    pos_ += n;
    data_bytes_ += n;
    return Item{false, cur, n};
  }
  FERRY_ASSERT(cur > pos_);
  const Item hole{true, pos_, cur - pos_};
  hole_bytes_ += hole.length;
  pos_ = cur;
  return hole;
}

SparseWriter::SparseWriter(int fd, std::uint64_t offset, bool file_is_new) : fd_(fd), pos_(offset), old_size_(0) {
  require_range(offset, 0, "SparseWriter");
  const auto size = static_cast<std::uint64_t>(fstat_or_throw(fd, "SparseWriter").st_size);
  if (!file_is_new) old_size_ = size;
}

void SparseWriter::pwrite_fully(const std::uint8_t* data, std::uint64_t offset, std::uint64_t length) {
  while (length > 0) {
    const ssize_t n = ::pwrite(fd_, data, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw os_error(errno, "pwrite at " + std::to_string(offset) + " failed", fd_);
    }
    // A regular file never accepts zero bytes without an errno; looping
    // again would spin forever, so call it an I/O error.
    if (n == 0) throw os_error(EIO, "pwrite at " + std::to_string(offset) + " wrote nothing", fd_);
    const auto put = static_cast<std::uint64_t>(n);
    data += put;
    offset += put;
    length -= put;
  }
}

void SparseWriter::write(std::span<const std::uint8_t> data) {
  require_range(pos_, data.size(), "SparseWriter::write");
  pwrite_fully(data.data(), pos_, data.size());
  pos_ += data.size();
}

void SparseWriter::write_zeros(std::uint64_t offset, std::uint64_t length) {
  constexpr std::uint64_t max_zeros = 1 << 20;
  if (zeros_.size() < std::min(length, max_zeros)) zeros_.resize(std::min(length, max_zeros));
  while (length > 0) {
    const std::uint64_t n = std::min<std::uint64_t>(length, zeros_.size());
    pwrite_fully(zeros_.data(), offset, n);
    offset += n;
    length -= n;
  }
}

void SparseWriter::write_hole(std::uint64_t length) {
  require_range(pos_, length, "SparseWriter::write_hole");
  // Past the old size nothing was ever written (we write in order), so only
  // the part over old bytes needs clearing.
  const std::uint64_t clear_end = std::min(pos_ + length, old_size_);
  if (clear_end > pos_) {
    const std::uint64_t clear = clear_end - pos_;
    bool cleared = false;
    while (punch_supported_ && !cleared) {
      if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(pos_),
                      static_cast<off_t>(clear)) == 0) {
        cleared = true;
      } else if (errno == EOPNOTSUPP || errno == ENOSYS) {
        punch_supported_ = false;  // remembered: one failed call per writer, not per hole
      } else if (errno != EINTR) {
        throw os_error(errno, "fallocate(PUNCH_HOLE) at " + std::to_string(pos_) + " failed", fd_);
      }
    }
    if (!cleared) write_zeros(pos_, clear);
  }
  pos_ += length;
}

void SparseWriter::finish(bool sync) {
  const auto size = static_cast<std::uint64_t>(fstat_or_throw(fd_, "SparseWriter::finish").st_size);
  if (size < pos_) {
    while (::ftruncate(fd_, static_cast<off_t>(pos_)) != 0) {
      if (errno != EINTR) throw os_error(errno, "ftruncate to " + std::to_string(pos_) + " failed", fd_);
    }
  }
  if (sync) {
    while (::fdatasync(fd_) != 0) {
      if (errno != EINTR) throw os_error(errno, "fdatasync failed", fd_);
    }
  }
}

std::uint64_t allocated_bytes(int fd) {
  return static_cast<std::uint64_t>(fstat_or_throw(fd, "allocated_bytes").st_blocks) * 512;
}

}  // namespace ferry::stream
