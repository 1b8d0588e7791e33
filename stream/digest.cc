#include "stream/digest.h"

#include <xxhash.h>

#include <cstdio>
#include <cstring>
#include <new>
#include <vector>

namespace ferry::stream {

namespace {

constexpr std::size_t zero_block = 1u << 20;

const std::uint8_t* zero_bytes() {
  static const std::vector<std::uint8_t> zeros(zero_block);
  return zeros.data();
}

Digest canonical(XXH128_hash_t h) {
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, h);
  Digest d;
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = c.digest[i];
  return d;
}

}  // namespace

std::string digest_hex(std::span<const std::uint8_t> d) {
  std::string out;
  char two[3];
  for (std::uint8_t b : d) {
    std::snprintf(two, sizeof two, "%02x", b);
    out += two;
  }
  return out;
}
std::string digest_hex(std::string_view bytes) {
  return digest_hex(std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()));
}

Digest to_digest(std::string_view bytes) {
  Digest d{};
  if (bytes.size() == d.size()) std::memcpy(d.data(), bytes.data(), d.size());
  return d;
}
std::string from_digest(const Digest& d) { return std::string(d.begin(), d.end()); }

std::string digest_hex(const Digest& d) { return digest_hex(std::span<const std::uint8_t>(d.data(), d.size())); }

ExtentHasher::ExtentHasher() : state_(XXH3_createState()) {
  if (!state_) throw std::bad_alloc();
  XXH3_128bits_reset(static_cast<XXH3_state_t*>(state_));
}
ExtentHasher::~ExtentHasher() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }

void ExtentHasher::data(std::span<const std::uint8_t> bytes) {
  XXH3_128bits_update(static_cast<XXH3_state_t*>(state_), bytes.data(), bytes.size());
}

void ExtentHasher::zeros(std::uint64_t length) {
  while (length) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(length, zero_block));
    XXH3_128bits_update(static_cast<XXH3_state_t*>(state_), zero_bytes(), n);
    length -= n;
  }
}

Digest ExtentHasher::digest() const { return canonical(XXH3_128bits_digest(static_cast<XXH3_state_t*>(state_))); }

Digest combine_digests(const std::map<std::uint64_t, Digest>& extents) {
  ExtentHasher h;
  for (const auto& [index, d] : extents) h.data(d);
  return h.digest();
}

}  // namespace ferry::stream
