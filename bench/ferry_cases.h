// The ferry side of each bench/run row. `ferry_bench measure ROW --side ferry`
// calls exactly one of these in a fresh process and prints its Measurement
// as one JSON line; the baseline side of the same row is measured the same
// way, so both see a cold process and the same machine state.
//
// A case that needs a server starts it as a separate process (see
// bench/harness.h: spawn_server, signal_ready) and must stop and reap it
// before returning, also when it throws. A thrown exception fails this side
// of the row only; bench/run reports its message and goes on.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/harness.h"

namespace ferry::bench {

// How a case's client reaches ferryd.
enum class Wire {
  unix_socket,
  tcp,
  tls,         // TLS 1.3, tls_ciphersuite, server certificate verified, no client certificate
  sasl_layer,  // plain TCP, SASL DIGEST-MD5 with its security layer on every byte
  tls_scram,   // TLS as above, then SASL SCRAM-SHA-256
  grpc,        // ferry's frames over one gRPC stream (rpc/grpc_transport.h), plaintext HTTP/2 on loopback
};
const char* to_string(Wire wire);
// The suite both ferry and the raw OpenSSL baseline use (AES-GCM).
inline constexpr const char* tls_ciphersuite = "TLS_AES_256_GCM_SHA384";

struct CaseOptions {
  // Smaller sizes and shorter windows, for `bench/run --quick`: a quick
  // measurement should take 2-4 s including server start.
  bool quick = false;
  // Path to the server binary (build/daemon/ferryd); may not exist yet.
  std::string ferryd;
  // Listen address override, "unix:PATH" or "tcp:HOST:PORT". Set for
  // rpc.duplex (e.g. "tcp:10.231.0.1:7000" on the emulated link, or a free
  // loopback port when namespaces are unavailable); empty means the case
  // picks its own scratch address.
  std::string addr;
  // Run only the server half of the case and block until killed; used when
  // a case re-executes `ferry_bench measure ROW --side ferry --serve-only`
  // as its server child. Signal readiness with signal_ready().
  bool serve_only = false;
  // Network namespace the server child must run in (spawn_server takes it);
  // empty means the caller's namespace. The measuring (client) process is
  // already inside the client namespace when the case runs.
  std::string server_netns;
  // Path to the delay relay (build/tests/relay/ferry-delay-relay) for the
  // copy.* rows; may not exist (a build without the tests).
  std::string relay;
};

struct Measurement {
  double value;
  std::string unit;  // "calls/s", "MB/s" (1e6 bytes), "ms" or "s"
  std::string note;
  // The server's thread count when the case samples it (the nbd.delay64
  // rows): before the run and its peak during it; -1 when not sampled.
  int threads_before = -1;
  int threads = -1;
};

// A ferryd child process serving the test program (and the volume service)
// at `address`; `extra` options go after the defaults. It runs in
// options.server_netns and writes its bound addresses to `ready_name` in
// `dir` (one file per daemon when a case starts several).
struct Ferryd {
  inline Ferryd(const CaseOptions& options, const std::string& address, ScratchDir& dir,
         std::vector<std::string> extra = {}, const std::string& ready_name = "ready") {
    if (options.ferryd.empty() || !std::filesystem::exists(options.ferryd))
      throw std::runtime_error("ferryd not found at '" + options.ferryd + "' (pass --ferryd)");
    ready_file = (dir.path() / ready_name).string();
    std::vector<std::string> argv = {options.ferryd, "--test-service", "--auth-tcp", "none", "--listen", address, "--ready-file",
                                     ready_file, "--log-level", "warn", "--max-calls-per-client", "100000"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    child = spawn_server(argv, options.server_netns, std::chrono::seconds(20), false);
    auto deadline = Clock::now() + std::chrono::seconds(20);
    while (!std::filesystem::exists(ready_file)) {
      if (Clock::now() > deadline) throw std::runtime_error("ferryd did not become ready");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::ifstream in(ready_file);
    std::getline(in, bound);
  }
  std::string uri() const {
    if (bound.rfind("unix:", 0) == 0) return "ferry+unix://" + bound.substr(5);
    if (bound.rfind("tls:", 0) == 0) return "ferry+tls://" + bound.substr(4);
    if (bound.rfind("grpc:", 0) == 0) return "ferry+grpc://" + bound.substr(5);
    return "ferry+tcp://" + bound.substr(4);
  }
  std::string ready_file;
  std::string bound;
  ChildProcess child;
};

// rpc.echo.seq: sequential 64-byte echo calls on one unix connection.
Measurement ferry_echo_seq(const CaseOptions&);
// rpc.echo.inflight128: echo calls/s with `inflight` calls outstanding on one
// connection.
Measurement ferry_echo_inflight(const CaseOptions&, int inflight, Wire wire = Wire::unix_socket);
// rpc.body.unix / rpc.body.tcp: one-way MB/s of 256 KiB bodies, 4 GiB
// (512 MiB quick), complete when the server has consumed the last byte.
Measurement ferry_body(const CaseOptions&, bool tcp);
// rpc.duplex: MB/s of mixed traffic; the baseline side of the row is this
// same function with half_duplex = true.
Measurement ferry_duplex(const CaseOptions&, bool half_duplex);
// stream.upload.* / stream.upload4.unix: `streams` concurrent upload streams
// on one connection, memory to memory, aggregate MB/s.
Measurement ferry_stream_upload(const CaseOptions&, bool tcp, int streams);
Measurement ferry_stream_upload(const CaseOptions&, Wire wire, int streams, std::uint64_t total);
// stream.download.*: one download stream, memory to memory, MB/s.
Measurement ferry_stream_download(const CaseOptions&, bool tcp);
Measurement ferry_stream_download(const CaseOptions&, Wire wire);
// tls.handshake: median ms to connect over TLS and authenticate with SCRAM.
Measurement ferry_tls_handshake(const CaseOptions&);
// stream.call_p99_under_load: p99 ms of small echo calls, with one download
// stream saturating the connection (loaded) or not (the baseline).
Measurement ferry_call_p99(const CaseOptions&, bool loaded);
// stream.sparse10g: seconds to upload a 10 GiB file holding 10 MiB of data.
Measurement ferry_sparse_upload(const CaseOptions&);

// vol.*: the real `ferry` CLI (found beside ferryd: build/client/ferry)
// moving files into and out of volumes of a real ferryd; see FileCopy in
// bench/baselines.h for the matching baseline.
struct VolumeCopy {
  bool upload = true;
  bool tcp = false;
  bool sparse = false;
  std::uint64_t size = 0;
  int width = 1;
  bool seconds = false;
  // Upload through the Python binding (bench/py_upload.py) instead of the
  // CLI: the ferry side of py.stream.upload. Unavailable (Unavailable) when
  // the build has no binding.
  bool python = false;
};
Measurement ferry_volume_copy(const CaseOptions&, const VolumeCopy&);
// Its baseline (baselines.h): seconds to send a dense file of the 10 MiB alone.

}  // namespace ferry::bench
