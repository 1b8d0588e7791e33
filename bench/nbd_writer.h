// A deep-queue NBD write client on libnbd's asynchronous API: it keeps
// exactly `depth` writes of `request_bytes` in flight on one connection
// until `total_bytes` have completed. The nbd.delay64.* rows use it on both
// sides instead of nbdcopy, whose effective depth is capped well below
// 1,024 requests (see bench/README.md).
#pragma once

#include <cstdint>
#include <string>

namespace ferry::bench {

struct NbdWriteResult {
  std::uint64_t bytes = 0;     // bytes written (every request completed without error)
  std::uint64_t requests = 0;  // requests completed
  double seconds = 0;          // first request issued -> last completion; connecting excluded
  int max_in_flight = 0;       // most requests the client had outstanding at once
  // Issue-to-completion time of the requests, in ms.
  double latency_min_ms = 0, latency_p50_ms = 0, latency_mean_ms = 0, latency_max_ms = 0;
};

// Connects to the NBD server on the unix socket `socket` (export
// `export_name`, "" for the default), then writes `total_bytes` (a multiple
// of `request_bytes`) with `depth` requests in flight: offsets advance
// sequentially from 0, wrapping before the end of the export, and every
// request sends the same preallocated buffer of non-zero bytes. Throws on a
// failed connection, a failed request or a dead connection; throws
// Unavailable when ferry_bench was built without libnbd.
NbdWriteResult nbd_deep_write(const std::string& socket, const std::string& export_name, int depth,
                              std::uint64_t request_bytes, std::uint64_t total_bytes);

}  // namespace ferry::bench
