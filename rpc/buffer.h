// Buffer: owned, uninitialised bytes of one frame body. Move-only; the
// reader allocates one per body and hands it to whoever consumes the frame.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string_view>

namespace ferry::rpc {

class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t size)
      : data_(size ? std::make_unique_for_overwrite<std::uint8_t[]>(size) : nullptr), size_(size) {}
  static Buffer copy_of(std::span<const std::uint8_t> bytes) {
    Buffer b(bytes.size());
    if (!bytes.empty()) std::memcpy(b.data(), bytes.data(), bytes.size());
    return b;
  }

  std::uint8_t* data() noexcept { return data_.get(); }
  const std::uint8_t* data() const noexcept { return data_.get(); }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  std::span<const std::uint8_t> span() const noexcept { return {data_.get(), size_}; }
  std::string_view view() const noexcept { return {reinterpret_cast<const char*>(data_.get()), size_}; }

 private:
  std::unique_ptr<std::uint8_t[]> data_;
  std::size_t size_ = 0;
};

}  // namespace ferry::rpc
