// Faults on purpose in a byte stream: what to do (FaultOptions, parsed from
// a spec like "delay=5ms,corrupt_every=1M,reset_after=10M,direction=read")
// and the byte arithmetic that does it (FaultInjector). FaultTransport
// (rpc/fault_transport.h) applies them to a connection; ferry-delay-relay
// applies them to the bytes it forwards.
//
// Byte positions count from the start of the connection in each direction
// separately, so a fault lands at the same place in every run: "corrupt
// every 1,000,000th byte read" flips one bit of bytes 999,999, 1,999,999,
// ... of what the peer sent.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace ferry::rpc {

struct FaultOptions {
  bool on_read = true;   // faults in the bytes read from the peer
  bool on_write = true;  // faults in the bytes written to the peer
  // Each read and write completes this much later.
  std::chrono::microseconds delay{0};
  // One bit flipped in every Nth byte (0: never).
  std::uint64_t corrupt_every = 0;
  // Every Nth byte vanishes (0: never).
  std::uint64_t drop_every = 0;
  // After this many bytes in a faulted direction the connection is reset:
  // the bytes before go through, then reads and writes fail with
  // connection_reset and the inner transport is closed (0: never).
  std::uint64_t reset_after = 0;
  // Which bit a corruption flips, chosen from this seed and the position.
  std::uint64_t seed = 1;

  bool any() const {
    return delay.count() > 0 || corrupt_every > 0 || drop_every > 0 || reset_after > 0;
  }

  // "delay=5ms,corrupt_every=1M,drop_every=4096,reset_after=10M,direction=read,seed=7":
  // any subset, in any order; counts take sizes (1M = 1048576), direction
  // is read, write or both (the default). Throws ferry::Error
  // (INVALID_ARGUMENT) naming the part it cannot read.
  static FaultOptions parse(std::string_view spec);
  // The same form, for logs; "none" without faults.
  std::string describe() const;
};

// Faults counted so far, for tests and logs.
struct FaultCounts {
  std::uint64_t corrupted = 0;
  std::uint64_t dropped = 0;
  bool reset = false;
};

// The byte faults alone, for anything that moves bytes (FaultTransport,
// ferry-delay-relay): apply() alters, drops or cuts short a run of bytes
// seen at the current position of one direction.
class FaultInjector {
 public:
  explicit FaultInjector(FaultOptions options) : options_(options) {}
  struct Direction {
    std::uint64_t position = 0;  // bytes seen so far in this direction
  };
  // Applies the faults to `n` bytes at `data` seen at `dir.position`;
  // returns how many remain (drops shrink them, a reset cuts them short,
  // after which reset() is true).
  std::size_t apply(std::uint8_t* data, std::size_t n, Direction& dir);
  bool reset() const { return counts_.reset; }
  const FaultOptions& options() const { return options_; }
  FaultCounts counts() const { return counts_; }

 private:
  FaultOptions options_;
  FaultCounts counts_;
};

// Walks a fault spec "key=value,key=value" (empty parts skipped), calling
// fn(key, value) for each pair; a part without '=' is thrown as
// bad("'part' is not key=value"). Shared by the transport and volume specs.
template <class Fn, class Bad>
void for_each_key_value(std::string_view spec, Fn&& fn, Bad&& bad) {
  while (!spec.empty()) {
    const std::size_t comma = spec.find(',');
    const std::string_view part = spec.substr(0, comma);
    spec = comma == std::string_view::npos ? std::string_view{} : spec.substr(comma + 1);
    if (part.empty()) continue;
    const std::size_t eq = part.find('=');
    if (eq == std::string_view::npos) throw bad("'" + std::string(part) + "' is not key=value");
    fn(std::string(part.substr(0, eq)), part.substr(eq + 1));
  }
}

}  // namespace ferry::rpc
