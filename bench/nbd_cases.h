// The nbd.* rows: nbdcopy (libnbd-bin) as the NBD client against ferryd's
// plain NBD listener, against `ferry nbd-serve` bridges, and against nbdkit
// and qemu-nbd as baselines; the delay rows use an in-process libnbd writer
// instead. Both sides of a row run the same client with the same settings;
// only the server differs. See bench/README.md for each row.
#pragma once

#include <cstdint>

#include "bench/ferry_cases.h"

namespace ferry::bench {

// Bytes one nbd.* copy moves: 2 GiB of non-zero data (512 MiB with --quick).
inline std::uint64_t nbd_total_bytes(bool quick) { return quick ? (std::uint64_t{512} << 20) : (std::uint64_t{2} << 30); }

// nbd.read.plain / nbd.write.plain: nbdcopy against ferryd's plain NBD
// listener (export default/vol).
Measurement ferry_nbd_plain(const CaseOptions&, bool write);
// Their baseline: the same nbdcopy against `nbdkit file` (the value) and
// `qemu-nbd -e 4` (in the note) serving the same kind of file.
Measurement nbdkit_file_plain(const CaseOptions&, bool write);

// nbd.{read,write}.bridge.{unix,tls}: nbdcopy through `ferry nbd-serve`
// connected to ferryd over unix or TLS (client certificate); with
// via_bridge = false (the baseline) the same nbdcopy goes to the same
// ferryd's plain NBD listener instead.
Measurement ferry_nbd_bridge(const CaseOptions&, bool write, bool tls, bool via_bridge);

// nbd.delay64.qd*: 128 KiB writes at queue depth `depth` into a null export
// that delays every write by 64 ms; ferryd's delay export, or (baseline)
// `nbdkit --filter=delay null` with a thread per request in flight. Both
// sides write with the same libnbd client (nbd_deep_write, nbd_writer.h),
// not nbdcopy.
Measurement ferry_nbd_delay(const CaseOptions&, int depth);
Measurement nbdkit_nbd_delay(const CaseOptions&, int depth);

// nbd.mixed: a read and a write nbdcopy through one `ferry nbd-serve` bridge
// at the same time; with serialized = true (the baseline) one after the
// other through the same kind of bridge.
Measurement ferry_nbd_mixed(const CaseOptions&, bool serialized);

}  // namespace ferry::bench
