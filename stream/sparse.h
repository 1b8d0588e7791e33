// Sparse files for data streams: the helpers that let a stream move a 10 GiB
// file holding 10 MiB of data in time proportional to the data, and leave
// the destination as sparse as the source.
//
// map_extents asks the filesystem where the data is (lseek SEEK_DATA and
// SEEK_HOLE), SparseReader turns that into the items a stream sender puts
// on the wire (data chunks and holes), and SparseWriter replays them into a
// file without allocating the holes. None of them owns the descriptor: the
// caller opens it, keeps it open for the object's lifetime and closes it.
// They do blocking file I/O, so run them on a worker thread, never an io
// thread's strand. An object is used by one thread at a time; separate
// objects may share a descriptor because all I/O is positional (pread,
// pwrite), though lseek(SEEK_DATA/SEEK_HOLE) moves the shared file position,
// so nobody may rely on it.
//
// Failures throw ferry::Error: a descriptor that is not open, or not open
// for the access needed, is INVALID_ARGUMENT; other OS errors map through
// Error::from_errno (EIO is DATA_LOSS, ENOSPC is RESOURCE_EXHAUSTED ...); a
// file that shrinks while being read is ABORTED. Messages name the file by
// path when /proc can tell it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace ferry::stream {

// One run of a file: data bytes at [offset, offset+length) or a hole (reads as zeros).
struct Extent {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  bool hole = false;

  friend bool operator==(const Extent&, const Extent&) = default;
};

// Lists the data and hole extents of `fd` in [offset, offset+length), in
// order, adjacent, none empty. A filesystem that cannot tell holes reports
// the whole range as data, which is slower to copy but never wrong.
// The part of the range past end of file is not listed: the caller decides
// whether that is an error, a short read or zeros. Data extents are as the
// filesystem sees them, so data may include zeros and, on filesystems that
// track allocation in blocks, a few bytes either side of what was written.
// Throws INVALID_ARGUMENT when offset+length passes 2^63-1.
std::vector<Extent> map_extents(int fd, std::uint64_t offset, std::uint64_t length);

// True if every byte is zero (and for an empty span).
bool is_all_zero(std::span<const std::uint8_t> bytes) noexcept;

// Reads [offset, offset+length) of a file as a stream sender's items: data
// pieces of at most `chunk_size` bytes, read with pread into the caller's
// buffer, and holes, which carry only a length and are never read.
//
// With detect_zeros, each data chunk read is checked and, if all zeros,
// sent as a hole, so a file whose zeros were written out (a raw image copied
// with cp --sparse=never) becomes sparse at the destination. The check is per
// chunk, so zero runs shorter than a chunk stay data.
//
// Consecutive holes (a hole extent next to zero chunks, or several zero
// chunks) come out as one item, because each item costs a frame on the wire
// and a fallocate at the writer. The price is that the chunk read just after
// a run of zero chunks is read twice.
//
// The range is clipped to the file's size when the reader is made; the items
// then stop at end(), which the caller compares with what it asked for. A file
// changed while being read gives no consistent copy; a data read that finds
// the file shorter than its map throws ABORTED rather than inventing zeros.
class SparseReader {
 public:
  // Throws INVALID_ARGUMENT for chunk_size 0 or a range past 2^63-1, and an
  // OS error if `fd` cannot be examined.
  SparseReader(int fd, std::uint64_t offset, std::uint64_t length, std::size_t chunk_size,
               bool detect_zeros = false);
  SparseReader(const SparseReader&) = delete;
  SparseReader& operator=(const SparseReader&) = delete;

  struct Item {
    bool hole = false;
    std::uint64_t offset = 0;
    std::uint64_t length = 0;  // data: 1..chunk_size; hole: any positive length
  };

  // Next item, or nullopt at the end. For a data item the first `length`
  // bytes of `buffer` hold the data until the next call; `buffer` must hold at
  // least chunk_size bytes (INVALID_ARGUMENT otherwise) and is scribbled on
  // even when a hole comes back. After a throw the reader is unusable.
  std::optional<Item> next(std::span<std::uint8_t> buffer);

  // Bytes handed out so far as data and as holes; at the end they add up to
  // end() minus the starting offset.
  std::uint64_t data_bytes() const noexcept { return data_bytes_; }
  std::uint64_t hole_bytes() const noexcept { return hole_bytes_; }
  // Bytes actually read from the file: data_bytes() plus re-reads after zero
  // runs. Holes never count here, which is what makes a sparse copy cheap.
  std::uint64_t read_bytes() const noexcept { return read_bytes_; }
  // Where the next item starts, and where the items stop (the requested end,
  // or the file's size if that was smaller).
  std::uint64_t position() const noexcept { return pos_; }
  std::uint64_t end() const noexcept { return end_; }

 private:
  void read_fully(std::uint8_t* out, std::uint64_t offset, std::uint64_t length);
  void check_size();

  int fd_;
  std::uint64_t pos_;
  std::uint64_t end_;
  std::size_t chunk_size_;
  bool detect_zeros_;
  // The extent holding pos_, found lazily so a heavily fragmented file never
  // needs its whole map in memory.
  std::uint64_t extent_end_ = 0;
  bool extent_hole_ = false;
  std::uint64_t data_bytes_ = 0;
  std::uint64_t hole_bytes_ = 0;
  std::uint64_t read_bytes_ = 0;
};

// Writes a stream's items into a file from `offset` on, in order, leaving
// holes unallocated. Data goes out with pwrite at the running offset. A hole
// only advances the offset where the file is known to hold nothing there;
// over bytes that existed when the writer was made it is punched with
// fallocate(PUNCH_HOLE | KEEP_SIZE), or, where the filesystem cannot punch,
// overwritten with zeros, so the result reads right either way.
//
// The writer assumes it is the only one writing the range: bytes past the
// size the file had at construction count as zeros until it writes them.
class SparseWriter {
 public:
  // file_is_new: nothing at or past `offset` holds data (a file just created
  // or truncated), so holes need no punching. Throws an OS error if `fd`
  // cannot be examined.
  SparseWriter(int fd, std::uint64_t offset, bool file_is_new);
  SparseWriter(const SparseWriter&) = delete;
  SparseWriter& operator=(const SparseWriter&) = delete;

  void write(std::span<const std::uint8_t> data);
  void write_hole(std::uint64_t length);
  // Extends the file to offset() if it is shorter, so a trailing hole is part
  // of the file; never shrinks it, since whether bytes past the stream's end
  // stay is the caller's choice. With `sync`, fdatasync makes data and size
  // durable before it returns.
  void finish(bool sync);

  std::uint64_t offset() const noexcept { return pos_; }
  // False once punching failed as unsupported and holes fell back to zeros.
  bool punching() const noexcept { return punch_supported_; }

 private:
  void write_zeros(std::uint64_t offset, std::uint64_t length);
  void pwrite_fully(const std::uint8_t* data, std::uint64_t offset, std::uint64_t length);

  int fd_;
  std::uint64_t pos_;
  // Past this, the file held no data when the writer was made.
  std::uint64_t old_size_;
  bool punch_supported_ = true;
  std::vector<std::uint8_t> zeros_;  // only for the no-punch fallback
};

// Allocated bytes of a file (st_blocks * 512): how sparse it really is.
std::uint64_t allocated_bytes(int fd);

}  // namespace ferry::stream
