// Extent digests for copies (docs/migration.md): XXH3-128 of an extent's
// logical bytes, big-endian, computed the same way at both ends of a copy,
// and one digest for a whole volume made from its extents' digests.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>

namespace ferry::stream {

using Digest = std::array<std::uint8_t, 16>;
std::string digest_hex(const Digest& d);
std::string digest_hex(std::span<const std::uint8_t> d);
// The same for a digest carried in a protobuf `bytes` field.
std::string digest_hex(std::string_view bytes);
// A digest from a `bytes` field: all zeros unless it is exactly 16 bytes.
Digest to_digest(std::string_view bytes);
std::string from_digest(const Digest& d);

// XXH3-128 of an extent's logical bytes, fed in order: data as it is, a
// hole as its zeros.
class ExtentHasher {
 public:
  ExtentHasher();
  ~ExtentHasher();
  ExtentHasher(const ExtentHasher&) = delete;
  ExtentHasher& operator=(const ExtentHasher&) = delete;
  void data(std::span<const std::uint8_t> bytes);
  void zeros(std::uint64_t length);
  Digest digest() const;

 private:
  void* state_;
};

// XXH3-128 over extent digests in order: one digest for a whole volume.
Digest combine_digests(const std::map<std::uint64_t, Digest>& extents);

}  // namespace ferry::stream
