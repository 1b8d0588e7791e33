// Buffer: owned, uninitialised bytes of one frame body, and BufferPool,
// which recycles the large ones.
//
// Move-only. A Buffer taken from a pool goes back to it when destroyed, on
// whatever thread drops it. The pool exists because a freed 256 KiB block
// is handed back to the kernel by the allocator's trimming and page-faulted
// in again on the next call: recycling keeps bulk bodies on warm pages.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string_view>
#include <vector>

#include <sys/mman.h>

#include <google/protobuf/message_lite.h>

namespace ferry::rpc {

class BufferPool;

class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t size) : data_(size ? new std::uint8_t[size] : nullptr), size_(size), capacity_(size) {}
  Buffer(Buffer&& other) noexcept
      : data_(other.data_), size_(other.size_), capacity_(other.capacity_), pool_(std::move(other.pool_)) {
    other.data_ = nullptr;
    other.size_ = other.capacity_ = 0;
  }
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = other.data_;
      size_ = other.size_;
      capacity_ = other.capacity_;
      pool_ = std::move(other.pool_);
      other.data_ = nullptr;
      other.size_ = other.capacity_ = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }

  static Buffer copy_of(std::string_view bytes) {
    return copy_of(std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()));
  }
  static Buffer copy_of(std::span<const std::uint8_t> bytes) {
    Buffer b(bytes.size());
    if (!bytes.empty()) std::memcpy(b.data(), bytes.data(), bytes.size());
    return b;
  }

  std::uint8_t* data() noexcept { return data_; }
  const std::uint8_t* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::size_t capacity() const noexcept { return capacity_; }
  bool empty() const noexcept { return size_ == 0; }
  std::span<const std::uint8_t> span() const noexcept { return {data_, size_}; }
  // Keeps only the first `size` bytes (a read that filled part of it).
  void shrink(std::size_t size) noexcept {
    if (size < size_) size_ = size;
  }
  std::string_view view() const noexcept { return {reinterpret_cast<const char*>(data_), size_}; }

 private:
  friend class BufferPool;
  inline void release();

  std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
  std::shared_ptr<BufferPool> pool_;
};

// Recycles buffers of 64 KiB and more in power-of-two size classes, keeping
// at most `max_cached_bytes` idle. Smaller buffers come from the allocator,
// which handles them well. Thread-safe.
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  static constexpr std::size_t min_pooled = 64u << 10;
  static constexpr std::size_t max_pooled = 32u << 20;

  static std::shared_ptr<BufferPool> create(std::size_t max_cached_bytes = 32u << 20) {
    return std::shared_ptr<BufferPool>(new BufferPool(max_cached_bytes));
  }
  ~BufferPool() {
    for (std::size_t cls = 0; cls < free_.size(); ++cls)
      for (auto* p : free_[cls]) deallocate(p, min_pooled << cls);
  }

  Buffer get(std::size_t size) {
    if (size < min_pooled || size > max_pooled) return Buffer(size);
    const std::size_t cls = size_class(size);
    const std::size_t capacity = min_pooled << cls;
    Buffer b;
    {
      std::lock_guard lock(mutex_);
      in_use_ += capacity;
      if (!free_[cls].empty()) {
        b.data_ = free_[cls].back();
        free_[cls].pop_back();
        cached_ -= capacity;
      }
    }
    if (!b.data_) b.data_ = allocate(capacity);
    b.size_ = size;
    b.capacity_ = capacity;
    b.pool_ = shared_from_this();
    return b;
  }

  std::size_t cached_bytes() const {
    std::lock_guard lock(mutex_);
    return cached_;
  }
  // Bytes of pooled buffers handed out and not yet given back: what frames
  // in flight, queued chunks and consumers hold right now.
  std::size_t in_use_bytes() const {
    std::lock_guard lock(mutex_);
    return in_use_;
  }

 private:
  explicit BufferPool(std::size_t max_cached_bytes) : max_cached_(max_cached_bytes) {}
  static std::size_t size_class(std::size_t size) {
    std::size_t cls = 0;
    while ((min_pooled << cls) < size) ++cls;
    return cls;
  }
  void put(std::uint8_t* data, std::size_t capacity) {
    {
      std::lock_guard lock(mutex_);
      in_use_ -= capacity;
      if (cached_ + capacity <= max_cached_) {
        free_[size_class(capacity)].push_back(data);
        cached_ += capacity;
        return;
      }
    }
    deallocate(data, capacity);
  }
  // Pooled buffers are mapped with their pages already present: touching a
  // fresh 256 KiB buffer page by page costs 64 faults, which on a virtual
  // machine took longer than filling it (0.8 ms against 20 us for a read
  // from the page cache into a warm one), and a new stream's first window
  // is nothing but fresh buffers.
  // Under AddressSanitizer they come from the allocator, so that overruns
  // are still caught.
  static std::uint8_t* allocate(std::size_t capacity) {
    if (sanitized) return new std::uint8_t[capacity];
    void* p = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return static_cast<std::uint8_t*>(p);
  }
  static void deallocate(std::uint8_t* data, std::size_t capacity) {
    if (sanitized)
      delete[] data;
    else
      ::munmap(data, capacity);
  }
#if defined(__SANITIZE_ADDRESS__)
  static constexpr bool sanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  static constexpr bool sanitized = true;
#else
  static constexpr bool sanitized = false;
#endif
#else
  static constexpr bool sanitized = false;
#endif
  friend class Buffer;

  mutable std::mutex mutex_;
  std::array<std::vector<std::uint8_t*>, 10> free_;  // 64 KiB .. 32 MiB
  std::size_t cached_ = 0;
  std::size_t in_use_ = 0;
  std::size_t max_cached_;
};

inline void Buffer::release() {
  if (!data_) return;
  if (pool_) {
    auto pool = std::move(pool_);
    pool->put(data_, capacity_);
  } else {
    delete[] data_;
  }
  data_ = nullptr;
  size_ = capacity_ = 0;
}

// Serializes a message into a Buffer sized exactly, without the zero fill
// std::string-based serialization pays (a 256 KiB body was spending more
// time in memset than in the socket).
inline Buffer serialize(const google::protobuf::MessageLite& message, BufferPool* pool = nullptr) {
  const std::size_t size = message.ByteSizeLong();
  Buffer out = pool ? pool->get(size) : Buffer(size);
  if (size) message.SerializeWithCachedSizesToArray(out.data());
  return out;
}

}  // namespace ferry::rpc
