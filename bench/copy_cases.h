// The copy.rtt* rows: one volume moved from a source side (A) to a
// destination side (B) across an emulated link with 0, 10 or 50 ms of
// round-trip time. Every side uses the same link: bench/run's copy link
// (namespaces joined by a rate-limited veth pair; the measuring process runs
// in A and gets --server-netns B and --addr tcp:B_ADDR:0), and a delay relay
// (ferry-delay-relay, --relay) running in B on B_ADDR that forwards to the
// destination server on B's loopback after rtt/2 each way, so everything
// from A reaches the destination only through the relay. Without the
// namespaces everything runs on loopback, still through the relay.
//
// The volume is the same for every side (copy_volume_extents): 2 GiB
// (512 MiB with --quick), a quarter of it pseudo-random data in extents of
// 256 KiB to 4 MiB, the rest holes. Each side times the one copy command,
// process start included, then compares the destination with the source
// byte for byte: a copy that differs fails the measurement.
#pragma once

#include <cstdint>
#include <vector>

#include "bench/ferry_cases.h"

namespace ferry::bench {

inline std::uint64_t copy_volume_bytes(bool quick) {
  return quick ? (std::uint64_t{512} << 20) : (std::uint64_t{2} << 30);
}

// The data extents of a copy.* volume of `size` bytes (a multiple of
// 16 MiB): in every 16 MiB group, extents of one of four mixes of sizes
// (4 MiB; 4 x 1 MiB; 2 MiB + 1 MiB + 512 KiB + 2 x 256 KiB;
// 4 x 256 KiB + 2 x 512 KiB + 2 MiB), each followed by a hole three times
// its size: exactly 25% data.
struct Extent {
  std::uint64_t offset;
  std::uint64_t length;
};
std::vector<Extent> copy_volume_extents(std::uint64_t size);

// copy.rtt*: `ferry -q vol-copy ferry+unix://SRC/default/v
// ferry+tcp://B_ADDR:RELAY/default/v`, a source ferryd in A and a
// destination ferryd in B behind the relay.
Measurement ferry_vol_copy(const CaseOptions&, double rtt_ms);
// The baseline: nbdcopy in A from qemu-nbd serving the source file in A to
// qemu-nbd serving a new sparse file in B, behind the relay.
Measurement nbdcopy_volume_copy(const CaseOptions&, double rtt_ms);
// The second baseline: `qemu-img convert -n -f raw -O raw` between the same
// two qemu-nbd servers.
Measurement qemu_img_volume_copy(const CaseOptions&, double rtt_ms);

}  // namespace ferry::bench
