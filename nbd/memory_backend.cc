#include "nbd/memory_backend.h"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstring>

#include "rpc/error.h"
#include "stream/sparse.h"

namespace ferry::nbd {

namespace {

constexpr std::uint32_t hole_flags = state_hole | state_zero;

// Appends `length` bytes of `flags` to `v`, merging with the last extent.
void push_extent(std::vector<Extent>& v, std::uint64_t length, std::uint32_t flags) {
  if (length == 0) return;
  if (!v.empty() && v.back().flags == flags)
    v.back().length += length;
  else
    v.push_back({length, flags});
}

Capabilities memory_like_capabilities(bool read_only) {
  Capabilities c;
  c.read_only = read_only;
  c.can_flush = true;
  c.can_fua = true;
  c.can_trim = true;
  c.can_zero = true;
  c.can_fast_zero = true;
  c.can_cache = true;
  c.can_extents = true;
  c.can_multi_conn = true;
  c.rotational = false;
  c.min_block = 1;
  c.preferred_block = 4096;
  c.max_block = 32u << 20;
  return c;
}

}  // namespace

std::string describe_size(std::uint64_t bytes) {
  static const char* const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  unsigned u = 0;
  while (u + 1 < std::size(units) && bytes >= (std::uint64_t{1} << (10 * (u + 1)))) ++u;
  const std::uint64_t unit = std::uint64_t{1} << (10 * u);
  char text[48];
  if (bytes % unit == 0)
    std::snprintf(text, sizeof text, "%llu %s", static_cast<unsigned long long>(bytes / unit), units[u]);
  else
    std::snprintf(text, sizeof text, "%.1f %s", static_cast<double>(bytes) / static_cast<double>(unit), units[u]);
  return text;
}

// ---------------------------------------------------------------------------
// MemoryBackend

MemoryBackend::MemoryBackend(std::uint64_t size, MemoryOptions options)
    : size_(size),
      read_only_(options.read_only),
      page_(options.page),
      page_shift_(static_cast<unsigned>(std::countr_zero(options.page))) {
  if (!std::has_single_bit(options.page) || options.page < 512 || options.page > (32u << 20))
    throw Error(Code::invalid_argument,
                "memory backend: page size " + std::to_string(options.page) +
                    " is not a power of two between 512 bytes and 32 MiB",
                "nbd");
}

MemoryBackend::~MemoryBackend() = default;

Capabilities MemoryBackend::capabilities() const { return memory_like_capabilities(read_only_); }

std::string MemoryBackend::description() const {
  return "memory " + describe_size(size_) + (read_only_ ? " (read-only)" : "");
}

std::uint64_t MemoryBackend::page_length(std::uint64_t index) const {
  const std::uint64_t start = index << page_shift_;
  return std::min<std::uint64_t>(page_, size_ - start);
}

std::unique_ptr<MemoryBackend::Page> MemoryBackend::new_page(std::uint64_t index) const {
  auto page = std::make_unique<Page>();
  page->bytes.reset(new std::uint8_t[page_length(index)]());  // zeroed
  return page;
}

void MemoryBackend::read_sync(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map) {
  if (map) map->clear();
  bool any_hole = false;
  std::shared_lock table(table_mutex_);
  std::uint64_t pos = offset;
  const std::uint64_t end = offset + out.size();
  auto it = pages_.lower_bound(offset >> page_shift_);
  while (pos < end) {
    const std::uint64_t index = pos >> page_shift_;
    const std::uint64_t in_page = pos - (index << page_shift_);
    const std::uint64_t n = std::min<std::uint64_t>(end - pos, page_ - in_page);
    std::uint8_t* dst = out.data() + (pos - offset);
    if (it != pages_.end() && it->first == index) {
      {
        std::lock_guard bytes(it->second->mutex);
        std::memcpy(dst, it->second->bytes.get() + in_page, n);
      }
      ++it;
      if (map) push_extent(*map, n, 0);
    } else {
      // Zeroed even when a map tells the caller it is a hole: a buffer that
      // is sent anyway never carries stale bytes.
      std::memset(dst, 0, n);
      if (map) {
        push_extent(*map, n, hole_flags);
        any_hole = true;
      }
    }
    pos += n;
  }
  if (map && !any_hole) map->clear();  // all data: an empty map says so
}

void MemoryBackend::write_sync(std::span<const std::uint8_t> data, std::uint64_t offset) {
  struct Missing {
    std::uint64_t index;
    std::uint64_t in_page;
    std::uint64_t length;
    const std::uint8_t* src;
    std::unique_ptr<Page> page;
  };
  std::vector<Missing> missing;
  const std::uint64_t end = offset + data.size();
  {
    // Pages that exist take their bytes under the shared table lock: other
    // readers and writers go on meanwhile.
    std::shared_lock table(table_mutex_);
    auto it = pages_.lower_bound(offset >> page_shift_);
    for (std::uint64_t pos = offset; pos < end;) {
      const std::uint64_t index = pos >> page_shift_;
      const std::uint64_t in_page = pos - (index << page_shift_);
      const std::uint64_t n = std::min<std::uint64_t>(end - pos, page_ - in_page);
      const std::uint8_t* src = data.data() + (pos - offset);
      if (it != pages_.end() && it->first == index) {
        std::lock_guard bytes(it->second->mutex);
        std::memcpy(it->second->bytes.get() + in_page, src, n);
        ++it;
      } else if (!stream::is_all_zero({src, n})) {
        missing.push_back({index, in_page, n, src, nullptr});
      }
      pos += n;
    }
  }
  if (missing.empty()) return;
  // New pages are filled with no lock held, then inserted.
  for (auto& m : missing) {
    m.page = new_page(m.index);
    std::memcpy(m.page->bytes.get() + m.in_page, m.src, m.length);
  }
  std::unique_lock table(table_mutex_);
  for (auto& m : missing) {
    auto [it, inserted] = pages_.try_emplace(m.index, nullptr);
    if (inserted) {
      it->second = std::move(m.page);
      allocated_.fetch_add(page_length(m.index), std::memory_order_relaxed);
    } else {
      // Another writer created it meanwhile: write our part into theirs.
      std::memcpy(it->second->bytes.get() + m.in_page, m.src, m.length);
    }
  }
}

void MemoryBackend::discard_sync(std::uint64_t offset, std::uint64_t length, bool keep_allocated) {
  const std::uint64_t end = offset + length;
  if (!keep_allocated) {
    std::vector<std::unique_ptr<Page>> freed;  // released after the lock
    {
      std::unique_lock table(table_mutex_);
      auto it = pages_.lower_bound(offset >> page_shift_);
      while (it != pages_.end()) {
        const std::uint64_t start = it->first << page_shift_;
        if (start >= end) break;
        const std::uint64_t page_end = start + page_length(it->first);
        const std::uint64_t from = std::max(start, offset);
        const std::uint64_t to = std::min(page_end, end);
        if (from == start && to == page_end) {
          allocated_.fetch_sub(page_end - start, std::memory_order_relaxed);
          freed.push_back(std::move(it->second));
          it = pages_.erase(it);
        } else {
          // The table lock is exclusive: nobody holds a page mutex now.
          std::memset(it->second->bytes.get() + (from - start), 0, to - from);
          ++it;
        }
      }
    }
    return;
  }

  // Zero and keep allocated: existing pages are zeroed in place, missing
  // ones are created (zeroed) and inserted.
  std::vector<std::uint64_t> missing;
  {
    std::shared_lock table(table_mutex_);
    auto it = pages_.lower_bound(offset >> page_shift_);
    for (std::uint64_t pos = offset; pos < end;) {
      const std::uint64_t index = pos >> page_shift_;
      const std::uint64_t in_page = pos - (index << page_shift_);
      const std::uint64_t n = std::min<std::uint64_t>(end - pos, page_ - in_page);
      if (it != pages_.end() && it->first == index) {
        std::lock_guard bytes(it->second->mutex);
        std::memset(it->second->bytes.get() + in_page, 0, n);
        ++it;
      } else {
        missing.push_back(index);
      }
      pos += n;
    }
  }
  if (missing.empty()) return;
  std::vector<std::unique_ptr<Page>> fresh;
  fresh.reserve(missing.size());
  for (std::uint64_t index : missing) fresh.push_back(new_page(index));
  std::unique_lock table(table_mutex_);
  for (std::size_t i = 0; i < missing.size(); ++i) {
    const std::uint64_t index = missing[i];
    auto [it, inserted] = pages_.try_emplace(index, nullptr);
    if (inserted) {
      it->second = std::move(fresh[i]);
      allocated_.fetch_add(page_length(index), std::memory_order_relaxed);
    } else {
      const std::uint64_t start = index << page_shift_;
      const std::uint64_t from = std::max(start, offset);
      const std::uint64_t to = std::min(start + page_length(index), end);
      std::memset(it->second->bytes.get() + (from - start), 0, to - from);
    }
  }
}

std::vector<Extent> MemoryBackend::extents_sync(std::uint64_t offset, std::uint64_t length) const {
  std::vector<Extent> out;
  const std::uint64_t end = std::min(offset + length, size_);
  std::shared_lock table(table_mutex_);
  auto it = pages_.lower_bound(offset >> page_shift_);
  std::uint64_t pos = offset;
  while (pos < end) {
    if (it == pages_.end() || (it->first << page_shift_) >= end) {
      push_extent(out, end - pos, hole_flags);
      break;
    }
    const std::uint64_t start = it->first << page_shift_;
    if (start > pos) {
      push_extent(out, start - pos, hole_flags);
      pos = start;
    }
    const std::uint64_t page_end = std::min(start + page_length(it->first), end);
    push_extent(out, page_end - pos, 0);
    pos = page_end;
    ++it;
  }
  return out;
}

asio::awaitable<void> MemoryBackend::read(std::span<std::uint8_t> out, std::uint64_t offset,
                                          std::vector<Extent>* map) {
  read_sync(out, offset, map);
  co_return;
}

asio::awaitable<void> MemoryBackend::write(std::span<const std::uint8_t> data, std::uint64_t offset, bool) {
  if (read_only_) throw Error(Code::permission_denied, "memory backend is read-only", "nbd", false, EPERM);
  write_sync(data, offset);
  co_return;
}

asio::awaitable<void> MemoryBackend::flush() { co_return; }

asio::awaitable<void> MemoryBackend::trim(std::uint64_t offset, std::uint64_t length, bool) {
  if (read_only_) throw Error(Code::permission_denied, "memory backend is read-only", "nbd", false, EPERM);
  discard_sync(offset, length, false);
  co_return;
}

asio::awaitable<void> MemoryBackend::zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) {
  if (read_only_) throw Error(Code::permission_denied, "memory backend is read-only", "nbd", false, EPERM);
  discard_sync(offset, length, !flags.may_trim);
  co_return;
}

asio::awaitable<std::vector<Extent>> MemoryBackend::extents(std::uint64_t offset, std::uint64_t length) {
  co_return extents_sync(offset, length);
}

asio::awaitable<void> MemoryBackend::cache(std::uint64_t, std::uint64_t) { co_return; }

// ---------------------------------------------------------------------------
// NullBackend

Capabilities NullBackend::capabilities() const { return memory_like_capabilities(false); }

std::string NullBackend::description() const { return "null " + describe_size(size_); }

asio::awaitable<void> NullBackend::read(std::span<std::uint8_t> out, std::uint64_t, std::vector<Extent>* map) {
  std::memset(out.data(), 0, out.size());
  if (map) map->assign(1, Extent{out.size(), hole_flags});
  co_return;
}

asio::awaitable<void> NullBackend::write(std::span<const std::uint8_t>, std::uint64_t, bool) { co_return; }

asio::awaitable<void> NullBackend::flush() { co_return; }

asio::awaitable<void> NullBackend::trim(std::uint64_t, std::uint64_t, bool) { co_return; }

asio::awaitable<void> NullBackend::zero(std::uint64_t, std::uint64_t, ZeroFlags) { co_return; }

asio::awaitable<std::vector<Extent>> NullBackend::extents(std::uint64_t offset, std::uint64_t length) {
  std::vector<Extent> out;
  const std::uint64_t end = std::min(offset + length, size_);
  if (end > offset) out.push_back({end - offset, hole_flags});
  co_return out;
}

}  // namespace ferry::nbd
