// An FNV-1a 64 checksum of a stream's contents: data bytes are folded in
// one by one (so how the data was cut into chunks does not matter) and each
// hole as a marker and its length, so its zeros are never hashed. Both
// ends compute it over what they sent or received.
#pragma once

#include <cstdint>
#include <span>

namespace ferry::stream {

class Checksum {
 public:
  void data(std::span<const std::uint8_t> bytes) {
    for (std::uint8_t b : bytes) mix(b);
    offset_ += bytes.size();
    data_bytes_ += bytes.size();
  }
  void hole(std::uint64_t length) {
    mix(0xff);
    mix_u64(length);
    offset_ += length;
    hole_bytes_ += length;
  }
  std::uint64_t value() const { return hash_; }
  std::uint64_t data_bytes() const { return data_bytes_; }
  std::uint64_t hole_bytes() const { return hole_bytes_; }

 private:
  void mix(std::uint8_t b) { hash_ = (hash_ ^ b) * 0x100000001b3ull; }
  void mix_u64(std::uint64_t v) {
    for (int i = 0; i < 8; ++i) mix(static_cast<std::uint8_t>(v >> (8 * i)));
  }
  std::uint64_t hash_ = 0xcbf29ce484222325ull;
  std::uint64_t offset_ = 0;
  std::uint64_t data_bytes_ = 0;
  std::uint64_t hole_bytes_ = 0;
};

// Deterministic bytes for tests and benchmarks: the same (seed, offset)
// always gives the same data, so neither side has to store it.
inline void fill_pattern(std::span<std::uint8_t> out, std::uint64_t seed, std::uint64_t offset) {
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::uint64_t x = seed + ((offset + i) >> 3) * 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    x ^= x >> 31;
    out[i] = static_cast<std::uint8_t>(x >> (8 * ((offset + i) & 7)));
  }
}

}  // namespace ferry::stream
