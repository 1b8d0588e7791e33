// The baseline side of each bench/run row and the peer servers they start.
//
// Raw-socket baselines use blocking POSIX sockets: one syscall per message
// in each direction is the floor any framework on the same socket pays, so
// they stand for the physical limit. The gRPC baseline is a stock unary
// service written the way its documentation teaches, at default settings.
#pragma once

#include <cstdint>
#include <string>

#include "bench/ferry_cases.h"

namespace ferry::bench {

// rpc.echo.seq: one frame of 28 + 64 bytes out, the same back, then the next.
Measurement raw_echo_seq(const CaseOptions& options);
// rpc.body.unix / rpc.body.tcp: 256 KiB bodies with a 28-byte header each,
// written with writev, until the sink acknowledges the last byte.
Measurement raw_body(const CaseOptions& options, bool tcp);
// The same with a chosen number of payload bytes (rounded up to bodies).
Measurement raw_send(const CaseOptions& options, bool tcp, uint64_t payload_total);
// stream.download.*: the server writes 256 KiB bodies, the client reads.
Measurement raw_download(const CaseOptions& options, bool tcp, uint64_t payload_total);
// Seconds to send a dense file of `bytes` (pread + writev) to a raw sink.
Measurement raw_send_file_seconds(const CaseOptions& options, uint64_t bytes);
// rpc.echo.inflight128: gRPC unary Echo with `inflight` calls outstanding on
// one channel, over a unix socket (or TCP on loopback). Throws Unavailable
// when built without gRPC.
Measurement grpc_echo_inflight(const CaseOptions& options, int inflight, bool tcp = false);
// grpc.native.*: a plain gRPC service as a user writes the job by hand
// (bench/proto/bench_echo.proto): `total` bytes in 256 KiB bytes messages
// through a client-streaming Upload or a server-streaming Download (sync
// API, default arguments, TCP on loopback, optionally TLS), and the p99 of
// unary Echo calls, one a millisecond, on the channel of a saturating
// Download (a unix socket, like ferry's stream.call_p99_under_load).
// With `raised_malloc_thresholds`, both the client and the server process
// first raise glibc's mmap and trim thresholds (raise_malloc_thresholds),
// which takes away the spread gRPC's receive buffers otherwise show.
Measurement grpc_upload(const CaseOptions& options, bool tls, std::uint64_t total,
                        bool raised_malloc_thresholds = false);
Measurement grpc_download(const CaseOptions& options, bool tls, std::uint64_t total,
                          bool raised_malloc_thresholds = false);
Measurement grpc_call_p99(const CaseOptions& options);

// tls.stream.upload / tls.stream.download: the same bytes over a raw
// OpenSSL TLS 1.3 socket (bench/baseline_tls.cc); tls.handshake: median ms
// of a raw TLS connect.
Measurement raw_tls_send(const CaseOptions& options, uint64_t payload_total);
Measurement raw_tls_download(const CaseOptions& options, uint64_t payload_total);
Measurement raw_tls_handshake(const CaseOptions& options);

// vol.* rows: the same files copied through a raw socket by a file server
// (see baseline_raw.cc for the record format).
Measurement raw_file_copy(const CaseOptions& options, const VolumeCopy& copy);

// Server modes; each listens on `listen`, calls signal_ready() with the
// address a client should use, and serves until killed.
int serve_raw_echo(const std::string& listen);
int serve_raw_sink(const std::string& listen);
int serve_raw_source(const std::string& listen);
// Serves raw_file_copy requests for files in `dir`.
int serve_file(const std::string& listen, const std::string& dir);
// `listen` is "unix:PATH", "HOST:PORT" or "tcp:HOST:PORT"; port 0 picks one.
// With a certificate and key (PEM files), TLS with gRPC's SSL credentials.
int serve_grpc(const std::string& listen, const std::string& cert = {}, const std::string& key = {});
// mallopt: mmap threshold 32 MiB, trim threshold 256 MiB, for the whole
// process (the same as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:
// glibc.malloc.trim_threshold=268435456).
void raise_malloc_thresholds();
// TLS sink (source = false) or source, with this certificate and key.
int serve_tls(const std::string& listen, const std::string& cert, const std::string& key, bool source);

}  // namespace ferry::bench
