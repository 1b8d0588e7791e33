// Test data on disk for the integration tests: deterministic patterns,
// sparse files with data in chosen extents, content hashes that read holes
// as zeros, allocation.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace ferry::testing {

inline constexpr std::uint64_t MiB = 1ull << 20;

// Fast deterministic data: one 64-bit mix per word.
inline void fill(std::uint8_t* out, std::size_t n, std::uint64_t seed, std::uint64_t offset) {
  for (std::size_t i = 0; i < n; i += 8) {
    std::uint64_t x = seed ^ ((offset + i) * 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 31)) * 0xbf58476d1ce4e5b9ull;
    x ^= x >> 29;
    std::memcpy(out + i, &x, std::min<std::size_t>(8, n - i));
  }
}

// A file of `size` bytes with data (seeded pattern) only in `extents`.
inline void make_file(const std::string& path, std::uint64_t size,
               const std::vector<std::pair<std::uint64_t, std::uint64_t>>& extents, std::uint64_t seed) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
  std::vector<std::uint8_t> buf(4 * MiB);
  for (auto [off, len] : extents) {
    for (std::uint64_t done = 0; done < len;) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), len - done));
      fill(buf.data(), n, seed, off + done);
      ASSERT_EQ(::pwrite(fd, buf.data(), n, static_cast<off_t>(off + done)), static_cast<ssize_t>(n));
      done += n;
    }
  }
  ::close(fd);
}

// A content hash of a whole file (holes read as zeros).
inline std::uint64_t file_hash(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return 0;
  std::vector<std::uint8_t> buf(4 * MiB);
  std::uint64_t h = 0x243f6a8885a308d3ull, total = 0;
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n <= 0) break;
    for (ssize_t i = 0; i < n; i += 8) {
      std::uint64_t w = 0;
      std::memcpy(&w, buf.data() + i, std::min<std::size_t>(8, static_cast<std::size_t>(n - i)));
      h = (h ^ w) * 0x100000001b3ull;
      h ^= h >> 32;
    }
    total += static_cast<std::uint64_t>(n);
  }
  ::close(fd);
  return h ^ total;
}

inline std::uint64_t allocated(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return ~0ull;
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}
inline std::uint64_t size_of(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return ~0ull;
  return static_cast<std::uint64_t>(st.st_size);
}

}  // namespace ferry::testing
