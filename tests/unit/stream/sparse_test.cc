// Sparse-file helpers: the extent map, the reader that turns a file into
// data chunks and holes, and the writer that replays them. Files live in a
// scratch directory under $TMPDIR or /tmp; what needs SEEK_HOLE or hole
// punching skips, saying why, when that filesystem lacks it.
#include "stream/sparse.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "rpc/error.h"

namespace ferry::stream {

// Readable failures instead of byte dumps; static, and outside the unnamed
// namespace, so argument-dependent lookup finds them.
static void PrintTo(const Extent& e, std::ostream* os) {
  *os << (e.hole ? "hole" : "data") << " [" << e.offset << ", +" << e.length << ")";
}
static void PrintTo(const SparseReader::Item& item, std::ostream* os) {
  *os << (item.hole ? "hole" : "data") << " [" << item.offset << ", +" << item.length << ")";
}

namespace {

using ::testing::HasSubstr;

constexpr std::uint64_t KiB = 1024;
constexpr std::uint64_t MiB = 1024 * KiB;
constexpr std::uint64_t GiB = 1024 * MiB;

// Owns one descriptor, so a failed assertion cannot leak it.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

std::vector<std::uint8_t> random_bytes(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint8_t> out(n);
  for (std::size_t i = 0; i < n; i += 8) {
    const std::uint64_t v = rng();
    std::memcpy(out.data() + i, &v, std::min<std::size_t>(8, n - i));
  }
  return out;
}

void write_at(int fd, std::uint64_t offset, const std::vector<std::uint8_t>& bytes) {
  ASSERT_EQ(::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset)),
            static_cast<ssize_t>(bytes.size()));
}

std::vector<std::uint8_t> read_at(int fd, std::uint64_t offset, std::uint64_t length) {
  std::vector<std::uint8_t> out(length);
  std::uint64_t done = 0;
  while (done < length) {
    const ssize_t n = ::pread(fd, out.data() + done, length - done, static_cast<off_t>(offset + done));
    if (n <= 0) break;
    done += static_cast<std::uint64_t>(n);
  }
  out.resize(done);
  return out;
}

std::uint64_t file_size(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0);
  return static_cast<std::uint64_t>(st.st_size);
}

// FNV-1a: enough to tell two megabytes apart in a failure message without
// printing them.
std::uint64_t checksum(const std::vector<std::uint8_t>& bytes) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::uint8_t b : bytes) h = (h ^ b) * 0x100000001b3ULL;
  return h;
}

// Every item a reader produces, with data items' bytes.
struct Drained {
  std::vector<SparseReader::Item> items;
  std::vector<std::vector<std::uint8_t>> data;  // parallel to items; empty for holes
};

Drained drain(SparseReader& reader, std::size_t chunk_size) {
  Drained out;
  std::vector<std::uint8_t> buffer(chunk_size);
  while (auto item = reader.next(buffer)) {
    out.items.push_back(*item);
    out.data.emplace_back();
    if (!item->hole) out.data.back().assign(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(item->length));
  }
  return out;
}

// Replays a reader into a writer, as a stream's two ends would.
void copy(SparseReader& reader, SparseWriter& writer, std::size_t chunk_size) {
  std::vector<std::uint8_t> buffer(chunk_size);
  while (auto item = reader.next(buffer)) {
    ASSERT_EQ(item->offset, writer.offset());
    if (item->hole) {
      writer.write_hole(item->length);
    } else {
      writer.write(std::span<const std::uint8_t>(buffer.data(), item->length));
    }
  }
  writer.finish(true);
}

MATCHER_P3(IsItem, hole, offset, length, "") {
  return arg.hole == hole && arg.offset == offset && arg.length == length;
}

class Sparse : public ::testing::Test {
 protected:
  void SetUp() override {
    // $TMPDIR lets the same tests run on another filesystem (tmpfs, xfs).
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/ferry-sparse-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr) << tmpl << ": " << std::strerror(errno);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  int open_file(const std::string& name, int flags = O_RDWR | O_CREAT | O_TRUNC) {
    const std::string path = (dir_ / name).string();
    const int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0600);
    EXPECT_GE(fd, 0) << path << ": " << std::strerror(errno);
    return fd;
  }

  // Does this filesystem report holes? A 1 MiB file that is all hole must
  // have no data, else SEEK_DATA is the generic "everything is data".
  bool seek_hole_works() {
    Fd probe(open_file("probe-seek"));
    if (::ftruncate(probe.get(), static_cast<off_t>(MiB)) != 0) return false;
    return ::lseek(probe.get(), 0, SEEK_DATA) < 0 && errno == ENXIO;
  }

  bool punch_works() {
    Fd probe(open_file("probe-punch"));
    write_at(probe.get(), 0, std::vector<std::uint8_t>(64 * KiB, 1));
    return ::fallocate(probe.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 64 * KiB) == 0;
  }

  std::filesystem::path dir_;
};

#define REQUIRE_SEEK_HOLE()                                                                   \
  do {                                                                                        \
    if (!seek_hole_works())                                                                   \
      GTEST_SKIP() << "the filesystem of " << dir_ << " reports no holes through SEEK_DATA"; \
  } while (0)

#define REQUIRE_PUNCH()                                                                           \
  do {                                                                                            \
    if (!punch_works())                                                                           \
      GTEST_SKIP() << "the filesystem of " << dir_ << " cannot punch holes: " << std::strerror(errno); \
  } while (0)

// The 10 GiB file with 10 MiB of data used by the big tests: one 1 MiB
// extent in each of the first ten GiB, at a different 4 KiB-aligned place in
// each so no pattern in the offsets can hide a bug.
struct BigFile {
  static constexpr std::uint64_t size = 10 * GiB;
  std::vector<std::uint64_t> offsets;
  std::vector<std::vector<std::uint8_t>> data;
};

BigFile make_big_file(int fd) {
  BigFile file;
  for (std::uint64_t i = 0; i < 10; ++i) {
    const std::uint64_t offset = i * GiB + (i * 37 * MiB + i * i * 12 * KiB) % (GiB - MiB);
    file.offsets.push_back(offset);
    file.data.push_back(random_bytes(MiB, 100 + i));
    write_at(fd, offset, file.data.back());
  }
  EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(BigFile::size)), 0);
  return file;
}

TEST(IsAllZero, FindsASingleNonZeroByteAtAnyPosition) {
  EXPECT_TRUE(is_all_zero({}));
  for (std::size_t size : {1u, 7u, 8u, 9u, 63u, 64u, 65u, 200u, 4096u}) {
    std::vector<std::uint8_t> bytes(size + 3, 0);
    // Start at an odd address too, since chunks need not be aligned.
    for (std::size_t skew : {0u, 3u}) {
      std::span<std::uint8_t> span(bytes.data() + skew, size);
      EXPECT_TRUE(is_all_zero(span)) << size;
      for (std::size_t i = 0; i < size; ++i) {
        span[i] = 0x80;
        EXPECT_FALSE(is_all_zero(span)) << "size " << size << " skew " << skew << " byte " << i;
        span[i] = 0;
      }
    }
  }
}

TEST_F(Sparse, MapExtentsListsDataHolesAndATrailingHole) {
  REQUIRE_SEEK_HOLE();
  Fd fd(open_file("mapped"));
  write_at(fd.get(), 0, random_bytes(64 * KiB, 1));
  write_at(fd.get(), MiB, random_bytes(64 * KiB, 2));
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(4 * MiB)), 0);

  EXPECT_THAT(map_extents(fd.get(), 0, 4 * MiB),
              ::testing::ElementsAre(Extent{0, 64 * KiB, false}, Extent{64 * KiB, MiB - 64 * KiB, true},
                                     Extent{MiB, 64 * KiB, false},
                                     Extent{MiB + 64 * KiB, 3 * MiB - 64 * KiB, true}));
}

TEST_F(Sparse, MapExtentsClipsExtentsToARangeStartingInsideOne) {
  REQUIRE_SEEK_HOLE();
  Fd fd(open_file("mapped"));
  write_at(fd.get(), 0, random_bytes(64 * KiB, 1));
  write_at(fd.get(), MiB, random_bytes(64 * KiB, 2));
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(4 * MiB)), 0);

  EXPECT_THAT(map_extents(fd.get(), 32 * KiB, MiB),
              ::testing::ElementsAre(Extent{32 * KiB, 32 * KiB, false}, Extent{64 * KiB, MiB - 64 * KiB, true},
                                     Extent{MiB, 32 * KiB, false}));
  EXPECT_THAT(map_extents(fd.get(), 100 * KiB, 10 * KiB), ::testing::ElementsAre(Extent{100 * KiB, 10 * KiB, true}));
  EXPECT_TRUE(map_extents(fd.get(), 0, 0).empty());
}

TEST_F(Sparse, MapExtentsLeavesOutTheRangePastEndOfFile) {
  Fd fd(open_file("short"));
  write_at(fd.get(), 0, random_bytes(10000, 3));

  EXPECT_THAT(map_extents(fd.get(), 0, MiB), ::testing::ElementsAre(Extent{0, 10000, false}));
  EXPECT_THAT(map_extents(fd.get(), 9000, MiB), ::testing::ElementsAre(Extent{9000, 1000, false}));
  EXPECT_TRUE(map_extents(fd.get(), 10000, 5).empty());
  EXPECT_TRUE(map_extents(fd.get(), 20000, 5).empty());
}

TEST_F(Sparse, MapExtentsRejectsARangePastTheLargestFileOffset) {
  Fd fd(open_file("any"));
  try {
    map_extents(fd.get(), std::uint64_t{1} << 62, std::uint64_t{1} << 62);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::invalid_argument);
    EXPECT_THAT(e.message(), HasSubstr("largest file offset"));
  }
}

TEST_F(Sparse, ReaderCrossesATenGibFileReadingOnlyItsTenMibOfData) {
  REQUIRE_SEEK_HOLE();
  Fd fd(open_file("big"));
  const BigFile file = make_big_file(fd.get());
  ASSERT_LT(allocated_bytes(fd.get()), 2 * 10 * MiB) << "the source itself is not sparse";

  constexpr std::size_t chunk = 256 * KiB;
  SparseReader reader(fd.get(), 0, BigFile::size, chunk);
  std::vector<std::uint8_t> buffer(chunk);
  std::uint64_t expect_offset = 0;
  std::size_t data_items = 0;
  while (auto item = reader.next(buffer)) {
    ASSERT_EQ(item->offset, expect_offset) << "items must tile the range";
    ASSERT_GT(item->length, 0u);
    expect_offset += item->length;
    if (item->hole) continue;
    ++data_items;
    ASSERT_LE(item->length, chunk);
    // Find the extent this chunk came from and compare bytes.
    bool matched = false;
    for (std::size_t i = 0; i < file.offsets.size(); ++i) {
      if (item->offset >= file.offsets[i] && item->offset + item->length <= file.offsets[i] + MiB) {
        const auto* want = file.data[i].data() + (item->offset - file.offsets[i]);
        ASSERT_EQ(std::memcmp(buffer.data(), want, item->length), 0) << "at " << item->offset;
        matched = true;
      }
    }
    ASSERT_TRUE(matched) << "data item at " << item->offset << " lies outside the written extents";
  }
  EXPECT_EQ(expect_offset, BigFile::size);
  EXPECT_EQ(data_items, 10 * MiB / chunk);
  EXPECT_EQ(reader.data_bytes(), 10 * MiB);
  EXPECT_EQ(reader.hole_bytes(), BigFile::size - 10 * MiB);
  EXPECT_EQ(reader.read_bytes(), 10 * MiB) << "holes must never be read";
  EXPECT_FALSE(reader.next(buffer).has_value()) << "the end stays the end";
}

TEST_F(Sparse, CopyIntoANewFileKeepsContentsSizeAndSparseness) {
  REQUIRE_SEEK_HOLE();
  Fd src(open_file("big"));
  const BigFile file = make_big_file(src.get());
  Fd dst(open_file("copy"));

  constexpr std::size_t chunk = MiB;
  SparseReader reader(src.get(), 0, BigFile::size, chunk);
  SparseWriter writer(dst.get(), 0, /*file_is_new=*/true);
  copy(reader, writer, chunk);

  EXPECT_EQ(file_size(dst.get()), BigFile::size);
  EXPECT_LT(allocated_bytes(dst.get()), 2 * 10 * MiB + MiB);
  for (std::size_t i = 0; i < file.offsets.size(); ++i) {
    EXPECT_EQ(checksum(read_at(dst.get(), file.offsets[i], MiB)), checksum(file.data[i]))
        << "extent at " << file.offsets[i];
  }
  // Data only where the source had it, so every other byte reads as zero...
  for (const Extent& e : map_extents(dst.get(), 0, BigFile::size)) {
    if (e.hole) continue;
    bool inside = false;
    for (std::uint64_t offset : file.offsets) inside |= e.offset >= offset && e.offset + e.length <= offset + MiB;
    EXPECT_TRUE(inside) << "destination has data at " << e.offset << " of " << e.length << " bytes";
  }
  // ...which a few reads in the gaps and at the very end confirm directly.
  const std::vector<std::uint8_t> zeros(4 * KiB, 0);
  for (std::uint64_t offset : file.offsets) {
    EXPECT_EQ(read_at(dst.get(), offset + MiB + 123, 4 * KiB), zeros) << "after " << offset;
  }
  EXPECT_EQ(read_at(dst.get(), BigFile::size - 4 * KiB, 4 * KiB), zeros);
}

TEST_F(Sparse, WriterPunchesHolesWhenOverwritingAFileFullOfData) {
  REQUIRE_SEEK_HOLE();
  REQUIRE_PUNCH();
  constexpr std::uint64_t size = 8 * MiB;
  Fd src(open_file("source"));
  const auto a = random_bytes(MiB, 4);
  const auto b = random_bytes(4 * KiB + 123, 5);
  write_at(src.get(), MiB, a);
  write_at(src.get(), 5 * MiB, b);
  ASSERT_EQ(::ftruncate(src.get(), static_cast<off_t>(size)), 0);

  Fd dst(open_file("target"));
  write_at(dst.get(), 0, std::vector<std::uint8_t>(size, 0xab));
  ASSERT_EQ(::fsync(dst.get()), 0);
  ASSERT_GE(allocated_bytes(dst.get()), size);

  constexpr std::size_t chunk = 256 * KiB;
  SparseReader reader(src.get(), 0, size, chunk);
  SparseWriter writer(dst.get(), 0, /*file_is_new=*/false);
  copy(reader, writer, chunk);

  EXPECT_TRUE(writer.punching());
  EXPECT_EQ(file_size(dst.get()), size);
  EXPECT_LT(allocated_bytes(dst.get()), 2 * MiB) << "the old data under the holes must be freed";
  std::vector<std::uint8_t> want(size, 0);
  std::copy(a.begin(), a.end(), want.begin() + static_cast<std::ptrdiff_t>(MiB));
  std::copy(b.begin(), b.end(), want.begin() + static_cast<std::ptrdiff_t>(5 * MiB));
  EXPECT_TRUE(read_at(dst.get(), 0, size) == want) << "holes must read as zero and data as the source";
}

TEST_F(Sparse, WriterClearsOnlyTheOldBytesWhenTheStreamOutgrowsTheFile) {
  REQUIRE_PUNCH();
  Fd dst(open_file("target"));
  write_at(dst.get(), 0, std::vector<std::uint8_t>(2 * MiB, 0xab));

  SparseWriter writer(dst.get(), 0, /*file_is_new=*/false);
  const auto tail = random_bytes(100, 6);
  writer.write_hole(7 * MiB);
  writer.write(tail);
  writer.finish(false);

  EXPECT_EQ(file_size(dst.get()), 7 * MiB + 100);
  EXPECT_EQ(read_at(dst.get(), 0, 7 * MiB), std::vector<std::uint8_t>(7 * MiB, 0));
  EXPECT_EQ(read_at(dst.get(), 7 * MiB, 100), tail);
}

TEST_F(Sparse, WriterExtendsTheFileOnFinishSoATrailingHoleExists) {
  Fd dst(open_file("target"));
  SparseWriter writer(dst.get(), 0, /*file_is_new=*/true);
  const auto head = random_bytes(4 * KiB, 7);
  writer.write(head);
  writer.write_hole(GiB);
  EXPECT_EQ(writer.offset(), 4 * KiB + GiB);
  EXPECT_EQ(file_size(dst.get()), 4 * KiB) << "a hole alone does not grow the file";
  writer.finish(true);

  EXPECT_EQ(file_size(dst.get()), 4 * KiB + GiB);
  EXPECT_LT(allocated_bytes(dst.get()), MiB);
  EXPECT_EQ(read_at(dst.get(), 0, 4 * KiB), head);
  EXPECT_EQ(read_at(dst.get(), GiB, 4 * KiB), std::vector<std::uint8_t>(4 * KiB, 0));
}

TEST_F(Sparse, WriterNeverShrinksALongerFile) {
  Fd dst(open_file("target"));
  const auto old = random_bytes(MiB, 8);
  write_at(dst.get(), 0, old);

  SparseWriter writer(dst.get(), 0, /*file_is_new=*/false);
  const auto head = random_bytes(KiB, 9);
  writer.write(head);
  writer.finish(false);

  EXPECT_EQ(file_size(dst.get()), MiB);
  EXPECT_EQ(read_at(dst.get(), 0, KiB), head);
  EXPECT_EQ(read_at(dst.get(), KiB, MiB - KiB), std::vector<std::uint8_t>(old.begin() + KiB, old.end()));
}

TEST_F(Sparse, WriterStartsAtItsOffsetAndLeavesBytesBeforeItAlone) {
  Fd dst(open_file("target"));
  const auto before = random_bytes(64 * KiB, 10);
  write_at(dst.get(), 0, before);

  SparseWriter writer(dst.get(), 64 * KiB, /*file_is_new=*/false);
  const auto data = random_bytes(1000, 11);
  writer.write(data);
  writer.write_hole(5000);
  writer.finish(false);

  EXPECT_EQ(file_size(dst.get()), 64 * KiB + 6000);
  EXPECT_EQ(read_at(dst.get(), 0, 64 * KiB), before);
  EXPECT_EQ(read_at(dst.get(), 64 * KiB, 1000), data);
  EXPECT_EQ(read_at(dst.get(), 64 * KiB + 1000, 5000), std::vector<std::uint8_t>(5000, 0));
}

// Layout: random [0,64K) | zeros written [64K,192K) | hole [192K,320K) |
// random [320K,384K) | trailing hole to 512K.
void write_zero_layout(int fd, std::vector<std::uint8_t>& a, std::vector<std::uint8_t>& b) {
  a = random_bytes(64 * KiB, 12);
  b = random_bytes(64 * KiB, 13);
  write_at(fd, 0, a);
  write_at(fd, 64 * KiB, std::vector<std::uint8_t>(128 * KiB, 0));
  write_at(fd, 320 * KiB, b);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(512 * KiB)), 0);
}

TEST_F(Sparse, DetectZerosTurnsWrittenZeroChunksAndTheHoleBesideThemIntoOneHole) {
  Fd fd(open_file("zeros"));
  std::vector<std::uint8_t> a, b;
  write_zero_layout(fd.get(), a, b);

  // Holds on a filesystem without SEEK_HOLE too: its holes read as zero chunks.
  constexpr std::size_t chunk = 64 * KiB;
  SparseReader reader(fd.get(), 0, 512 * KiB, chunk, /*detect_zeros=*/true);
  const Drained got = drain(reader, chunk);
  EXPECT_THAT(got.items, ::testing::ElementsAre(IsItem(false, 0u, 64 * KiB), IsItem(true, 64 * KiB, 256 * KiB),
                                                IsItem(false, 320 * KiB, 64 * KiB),
                                                IsItem(true, 384 * KiB, 128 * KiB)));
  ASSERT_EQ(got.data.size(), 4u);
  EXPECT_EQ(got.data[0], a);
  EXPECT_EQ(got.data[2], b);
  EXPECT_EQ(reader.data_bytes(), 128 * KiB);
  EXPECT_EQ(reader.hole_bytes(), 384 * KiB);
}

TEST_F(Sparse, WithoutDetectZerosWrittenZerosStayData) {
  REQUIRE_SEEK_HOLE();
  Fd fd(open_file("zeros"));
  std::vector<std::uint8_t> a, b;
  write_zero_layout(fd.get(), a, b);

  constexpr std::size_t chunk = 64 * KiB;
  SparseReader reader(fd.get(), 0, 512 * KiB, chunk);
  const Drained got = drain(reader, chunk);
  EXPECT_THAT(got.items, ::testing::ElementsAre(IsItem(false, 0u, 64 * KiB), IsItem(false, 64 * KiB, 64 * KiB),
                                                IsItem(false, 128 * KiB, 64 * KiB), IsItem(true, 192 * KiB, 128 * KiB),
                                                IsItem(false, 320 * KiB, 64 * KiB),
                                                IsItem(true, 384 * KiB, 128 * KiB)));
  EXPECT_EQ(reader.read_bytes(), 256 * KiB);
}

TEST_F(Sparse, DetectZerosKeepsAChunkWithOneNonZeroByteAsData) {
  Fd fd(open_file("almost"));
  std::vector<std::uint8_t> bytes(128 * KiB, 0);
  bytes[128 * KiB - 1] = 1;
  write_at(fd.get(), 0, bytes);

  SparseReader reader(fd.get(), 0, 128 * KiB, 64 * KiB, /*detect_zeros=*/true);
  const Drained got = drain(reader, 64 * KiB);
  EXPECT_THAT(got.items,
              ::testing::ElementsAre(IsItem(true, 0u, 64 * KiB), IsItem(false, 64 * KiB, 64 * KiB)));
  ASSERT_EQ(got.data.size(), 2u);
  EXPECT_EQ(got.data[1].back(), 1);
  EXPECT_EQ(reader.read_bytes(), 192 * KiB) << "the chunk after the zero run is read twice";
}

TEST_F(Sparse, ReaderSplitsDataIntoChunksWhenSizesAreNotMultiples) {
  Fd fd(open_file("odd"));
  const auto bytes = random_bytes(100000, 14);
  write_at(fd.get(), 0, bytes);

  constexpr std::size_t chunk = 4096;
  SparseReader reader(fd.get(), 0, bytes.size(), chunk);
  const Drained got = drain(reader, chunk);
  ASSERT_EQ(got.items.size(), 25u);  // 24 full chunks and 1696 bytes
  std::vector<std::uint8_t> joined;
  for (std::size_t i = 0; i < got.items.size(); ++i) {
    EXPECT_FALSE(got.items[i].hole);
    EXPECT_EQ(got.items[i].offset, i * chunk);
    EXPECT_EQ(got.items[i].length, i + 1 < got.items.size() ? chunk : 100000 % chunk);
    joined.insert(joined.end(), got.data[i].begin(), got.data[i].end());
  }
  EXPECT_EQ(joined, bytes);
}

TEST_F(Sparse, ReaderCopiesAnUnalignedSubrangeToTheSameOffsets) {
  REQUIRE_SEEK_HOLE();
  Fd src(open_file("source"));
  const auto a = random_bytes(64 * KiB, 15);
  const auto b = random_bytes(64 * KiB, 16);
  write_at(src.get(), 0, a);
  write_at(src.get(), MiB, b);
  ASSERT_EQ(::ftruncate(src.get(), static_cast<off_t>(2 * MiB)), 0);

  const std::uint64_t offset = 1000;
  const std::uint64_t length = MiB + 7000 - offset;
  SparseReader reader(src.get(), offset, length, 16 * KiB);
  EXPECT_EQ(reader.end(), offset + length);
  Fd dst(open_file("target"));
  SparseWriter writer(dst.get(), offset, /*file_is_new=*/true);
  copy(reader, writer, 16 * KiB);

  EXPECT_EQ(reader.data_bytes(), 64 * KiB - offset + 7000);
  EXPECT_EQ(file_size(dst.get()), offset + length);
  EXPECT_EQ(read_at(dst.get(), 0, offset), std::vector<std::uint8_t>(offset, 0));
  EXPECT_EQ(read_at(dst.get(), offset, 64 * KiB - offset), std::vector<std::uint8_t>(a.begin() + offset, a.end()));
  EXPECT_EQ(read_at(dst.get(), MiB, 7000), std::vector<std::uint8_t>(b.begin(), b.begin() + 7000));
}

TEST_F(Sparse, EmptyFileGivesNoItemsAndCopiesAsEmpty) {
  Fd src(open_file("empty"));
  SparseReader reader(src.get(), 0, MiB, 64 * KiB);
  EXPECT_EQ(reader.end(), 0u);
  Fd dst(open_file("target"));
  SparseWriter writer(dst.get(), 0, /*file_is_new=*/true);
  copy(reader, writer, 64 * KiB);

  EXPECT_EQ(reader.data_bytes() + reader.hole_bytes(), 0u);
  EXPECT_EQ(file_size(dst.get()), 0u);
}

TEST_F(Sparse, OneByteFileGivesOneDataItemAndCopiesExactly) {
  Fd src(open_file("one"));
  write_at(src.get(), 0, {0x5a});
  SparseReader reader(src.get(), 0, 1, 64 * KiB);
  Fd dst(open_file("target"));
  SparseWriter writer(dst.get(), 0, /*file_is_new=*/true);
  copy(reader, writer, 64 * KiB);

  EXPECT_EQ(reader.data_bytes(), 1u);
  EXPECT_EQ(file_size(dst.get()), 1u);
  EXPECT_EQ(read_at(dst.get(), 0, 1), std::vector<std::uint8_t>{0x5a});
}

TEST_F(Sparse, ReaderStopsAtEndOfFileWhenAskedForMore) {
  Fd fd(open_file("short"));
  const auto bytes = random_bytes(10000, 17);
  write_at(fd.get(), 0, bytes);

  SparseReader past_end(fd.get(), 6000, MiB, 4096);
  EXPECT_EQ(past_end.end(), 10000u) << "the caller learns the range was cut short";
  const Drained got = drain(past_end, 4096);
  EXPECT_THAT(got.items, ::testing::ElementsAre(IsItem(false, 6000u, 4000u)));
  EXPECT_EQ(past_end.position(), 10000u);

  SparseReader beyond(fd.get(), 20000, 100, 4096);
  EXPECT_EQ(beyond.end(), 20000u);
  EXPECT_TRUE(drain(beyond, 4096).items.empty());
}

TEST_F(Sparse, ReaderFailsAbortedWhenTheFileShrinksUnderIt) {
  Fd fd(open_file("shrinking"));
  write_at(fd.get(), 0, random_bytes(MiB, 18));

  SparseReader reader(fd.get(), 0, MiB, 64 * KiB);
  std::vector<std::uint8_t> buffer(64 * KiB);
  ASSERT_TRUE(reader.next(buffer).has_value());
  ASSERT_EQ(::ftruncate(fd.get(), 100 * KiB), 0);
  try {
    while (reader.next(buffer)) {
    }
    FAIL() << "a shrunk file read to the end as if whole";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::aborted);
    EXPECT_THAT(e.message(), HasSubstr("shrank"));
    EXPECT_THAT(e.message(), HasSubstr("shrinking"));
  }
}

TEST_F(Sparse, ReaderFailsAbortedWhenTheFileWasCutBeforeTheFirstRead) {
  Fd fd(open_file("cut"));
  write_at(fd.get(), 0, random_bytes(MiB, 19));

  SparseReader reader(fd.get(), 0, MiB, 64 * KiB);
  ASSERT_EQ(::ftruncate(fd.get(), 0), 0);
  std::vector<std::uint8_t> buffer(64 * KiB);
  try {
    reader.next(buffer);
    FAIL() << "a cut file read as one big hole";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::aborted);
  }
}

TEST_F(Sparse, BadDescriptorGivesInvalidArgumentNamingTheDescriptor) {
  for (int bad : {-1, 1000000}) {
    SCOPED_TRACE(bad);
    try {
      map_extents(bad, 0, 10);
      FAIL() << "no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::invalid_argument);
      EXPECT_EQ(e.os_errno(), EBADF);
      EXPECT_THAT(e.message(), HasSubstr("fd " + std::to_string(bad)));
      EXPECT_THAT(e.message(), HasSubstr("not an open file"));
    }
    EXPECT_THROW(SparseReader(bad, 0, 10, 4096), Error);
    EXPECT_THROW(SparseWriter(bad, 0, true), Error);
    EXPECT_THROW(allocated_bytes(bad), Error);
  }
}

TEST_F(Sparse, ReadOnlyDescriptorGivesAWriteErrorNamingThePath) {
  { Fd create(open_file("readonly")); }
  Fd fd(open_file("readonly", O_RDONLY));
  SparseWriter writer(fd.get(), 0, /*file_is_new=*/false);
  try {
    writer.write(random_bytes(10, 20));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::invalid_argument);
    EXPECT_THAT(e.message(), HasSubstr("pwrite"));
    EXPECT_THAT(e.message(), HasSubstr((dir_ / "readonly").string()));
    EXPECT_THAT(e.message(), HasSubstr("not opened for this access"));
  }
}

TEST_F(Sparse, ReaderRejectsAZeroChunkSizeAndABufferSmallerThanAChunk) {
  Fd fd(open_file("any"));
  write_at(fd.get(), 0, random_bytes(100, 21));
  try {
    SparseReader reader(fd.get(), 0, 100, 0);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::invalid_argument);
  }
  SparseReader reader(fd.get(), 0, 100, 4096);
  std::vector<std::uint8_t> small(100);
  try {
    reader.next(small);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::invalid_argument);
    EXPECT_THAT(e.message(), HasSubstr("smaller than the chunk size"));
  }
}

}  // namespace
}  // namespace ferry::stream
