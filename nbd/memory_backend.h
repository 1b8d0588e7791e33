// Backends that keep nothing on disk: MemoryBackend, a sparse RAM disk,
// and NullBackend, a sink that reads as zeros (nbdkit's null plugin).
//
// MemoryBackend holds its contents in pages (64 KiB by default) allocated
// on the first write of non-zero data; a page never written, or trimmed
// whole, reads as zeros and is reported as a hole (state_hole |
// state_zero) by extents() and by read() maps (the bytes under a reported
// hole are zeroed too). Trim, and zero with
// may_trim, free the pages they cover entirely and zero the parts they
// cover partly; zero without may_trim leaves every page it touches
// allocated (and zero). Nothing is ever lost to a "crash", so flush, FUA
// and cache do nothing.
//
// Thread-safe: a shared_mutex guards the page table (taken exclusively only
// to insert or remove pages) and each page has its own mutex for its bytes,
// so reads and writes of different pages from many connections on many
// threads proceed in parallel; copies into new pages are prepared outside
// the table lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <vector>

#include "nbd/backend.h"

namespace ferry::nbd {

struct MemoryOptions {
  bool read_only = false;
  std::uint32_t page = 64u << 10;  // allocation unit in bytes, a power of two >= 512
};

class MemoryBackend : public Backend {
 public:
  // Throws ferry::Error (INVALID_ARGUMENT) for a page size that is not a
  // power of two between 512 bytes and 32 MiB.
  explicit MemoryBackend(std::uint64_t size, MemoryOptions options = {});
  ~MemoryBackend() override;

  std::uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;
  std::string description() const override;  // "memory 1 GiB"

  asio::awaitable<void> read(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map) override;
  asio::awaitable<void> write(std::span<const std::uint8_t> data, std::uint64_t offset, bool fua) override;
  asio::awaitable<void> flush() override;
  asio::awaitable<void> trim(std::uint64_t offset, std::uint64_t length, bool fua) override;
  asio::awaitable<void> zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override;
  asio::awaitable<std::vector<Extent>> extents(std::uint64_t offset, std::uint64_t length) override;
  asio::awaitable<void> cache(std::uint64_t offset, std::uint64_t length) override;

  // Bytes held in allocated pages (the last page counts only up to size()).
  std::uint64_t allocated_bytes() const { return allocated_.load(std::memory_order_relaxed); }
  std::uint32_t page_size() const { return page_; }

  // The same operations without a coroutine, for callers on plain threads
  // (the coroutines above are these plus nothing: memory never waits).
  void read_sync(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map);
  void write_sync(std::span<const std::uint8_t> data, std::uint64_t offset);
  void discard_sync(std::uint64_t offset, std::uint64_t length, bool keep_allocated);
  std::vector<Extent> extents_sync(std::uint64_t offset, std::uint64_t length) const;

 private:
  struct Page {
    std::mutex mutex;  // guards bytes (not the pointer, which the table lock guards)
    std::unique_ptr<std::uint8_t[]> bytes;
  };
  using Table = std::map<std::uint64_t, std::unique_ptr<Page>>;  // page index -> page

  std::uint64_t page_length(std::uint64_t index) const;
  std::unique_ptr<Page> new_page(std::uint64_t index) const;

  const std::uint64_t size_;
  const bool read_only_;
  const std::uint32_t page_;
  const unsigned page_shift_;
  mutable std::shared_mutex table_mutex_;
  Table pages_;
  std::atomic<std::uint64_t> allocated_{0};
};

// Writes vanish, reads return zeros, the whole device is one hole.
class NullBackend : public Backend {
 public:
  explicit NullBackend(std::uint64_t size) : size_(size) {}

  std::uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;
  std::string description() const override;  // "null 1 GiB"

  asio::awaitable<void> read(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map) override;
  asio::awaitable<void> write(std::span<const std::uint8_t> data, std::uint64_t offset, bool fua) override;
  asio::awaitable<void> flush() override;
  asio::awaitable<void> trim(std::uint64_t offset, std::uint64_t length, bool fua) override;
  asio::awaitable<void> zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override;
  asio::awaitable<std::vector<Extent>> extents(std::uint64_t offset, std::uint64_t length) override;

 private:
  const std::uint64_t size_;
};

// "1 GiB", "64 MiB", "1.5 GiB", "100 B": sizes in descriptions.
std::string describe_size(std::uint64_t bytes);

}  // namespace ferry::nbd
