// A real ferryd process for integration tests: started on a scratch UNIX
// socket and a loopback TCP port, its log captured, stopped with SIGTERM
// (or killed) when the test is done.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "rpc/client.h"
#include "tests/material/tls_material.h"

namespace ferry::testing {

// grpc / grpcs: ferry over a gRPC stream (rpc/grpc_transport.h); ferryd
// listens on them only when a test asks (FerrydProcess::GrpcListeners).
enum class TransportKind { unix_socket, tcp, tls, grpc, grpcs };
const char* to_string(TransportKind kind);

// gRPC comes from Debian, not built with ThreadSanitizer: TSan cannot see
// the ordering gRPC's own threads and atomics give, and reports races inside
// gRPC's headers and libraries. A TSan build therefore leaves the grpc and
// grpcs transports out; the plain and ASan builds run them.
#if defined(__SANITIZE_THREAD__)
inline constexpr bool kGrpcUnderTsan = true;
#define FERRY_SKIP_GRPC_UNDER_TSAN() GTEST_SKIP() << "gRPC is not built with ThreadSanitizer"
#else
inline constexpr bool kGrpcUnderTsan = false;
#define FERRY_SKIP_GRPC_UNDER_TSAN() static_cast<void>(0)
#endif
// Every transport, for INSTANTIATE_TEST_SUITE_P(..., ValuesIn(all_transports())).
std::vector<TransportKind> all_transports();

// A scratch directory removed (recursively) on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class FerrydProcess {
 public:
  // Starts ferryd with --test-service plus `extra_args`, listening on
  // unix:<dir>/ferryd.sock, tcp:127.0.0.1:0 and (unless `extra_args` bring
  // their own tls: listener) tls:127.0.0.1:0 with the test certificates,
  // client certificates required. Throws if it is not ready within 10 s
  // (with its log in the message).
  // Unless `extra_args` name pools (--pool, --config), the `default` pool is
  // pool_dir(). `wrapper` goes before the ferryd command (e.g. unshare to
  // give it a mount namespace with a small tmpfs).
  explicit FerrydProcess(std::vector<std::string> extra_args = {}, std::vector<std::string> wrapper = {});
  ~FerrydProcess();
  FerrydProcess(const FerrydProcess&) = delete;
  FerrydProcess& operator=(const FerrydProcess&) = delete;

  std::string uri(TransportKind kind) const;
  std::string unix_uri() const { return uri(TransportKind::unix_socket); }
  std::string tcp_uri() const { return uri(TransportKind::tcp); }
  // ferry+tls://127.0.0.1:PORT, when started with --listen tls:127.0.0.1:0.
  std::string tls_uri() const { return uri(TransportKind::tls); }

  // While one of these lives, every FerrydProcess started also listens on
  // grpc:127.0.0.1:0 and grpcs:127.0.0.1:0 (the test certificates, client
  // certificates required). A fixture parameterised on the transport sets
  // it for the grpc kinds only, so that the other runs (and their thread
  // counts) see no gRPC server.
  class GrpcListeners {
   public:
    explicit GrpcListeners(bool on = true);
    ~GrpcListeners();
    GrpcListeners(const GrpcListeners&) = delete;
    GrpcListeners& operator=(const GrpcListeners&) = delete;

   private:
    bool was_;
  };
  std::uint16_t tls_port() const { return tls_port_; }
  const std::string& socket_path() const { return socket_path_; }
  std::uint16_t tcp_port() const { return tcp_port_; }
  // The plain NBD listener's port, when started with --nbd-listen tcp:127.0.0.1:0.
  std::uint16_t nbd_tcp_port() const { return nbd_tcp_port_; }
  pid_t pid() const { return pid_; }
  const std::string& dir() const { return dir_.path(); }
  std::string pool_dir() const { return dir_.path() + "/pool"; }

  // SIGTERM, then waits; returns the exit status (-1 on timeout, after
  // which the process is killed).
  int terminate(std::chrono::milliseconds timeout = std::chrono::seconds(15));
  // True while the process exists (not reaped).
  bool running();
  void pause_process();   // SIGSTOP: a peer that stops answering
  void resume_process();  // SIGCONT

  std::string log() const;
  // Waits until the log contains `text`; false on timeout.
  bool wait_for_log(const std::string& text, std::chrono::milliseconds timeout = std::chrono::seconds(5)) const;
  unsigned threads() const;
  std::uint64_t rss_bytes() const;

 private:
  TempDir dir_;
  std::string socket_path_;
  std::string log_path_;
  std::uint16_t tcp_port_ = 0;
  std::uint16_t tls_port_ = 0;
  std::uint16_t grpc_port_ = 0;
  std::uint16_t grpcs_port_ = 0;
  std::uint16_t nbd_tcp_port_ = 0;
  pid_t pid_ = -1;
};

// Certificates for this test process, made on first use (a CA, good and
// bad server and client certificates; see tests/material/tls_material.h).
const TlsMaterial& test_tls_material();
// Client options for `kind`: over TLS, the test CA and client certificate.
rpc::ClientOptions client_options_for(TransportKind kind, rpc::ClientOptions base = {});

// Path of a built program (set by CMake).
std::string ferryd_path();
std::string ferry_cli_path();

// A command running in the background, stdout+stderr captured (stdin from
// `stdin_path`, /dev/null by default); killed on destruction.
class ChildProcess {
 public:
  explicit ChildProcess(const std::vector<std::string>& argv, const std::string& stdin_path = {});
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  pid_t pid() const { return pid_; }
  void signal(int sig);
  // Exit status (128 + signal when killed); -1 if still running at the timeout.
  int wait(std::chrono::milliseconds timeout = std::chrono::seconds(60));
  std::string output() const;

 private:
  TempDir dir_;
  std::string output_path_;
  pid_t pid_ = -1;
  int status_ = -1;
};

// Runs a command, capturing stdout+stderr; returns the exit status.
int run_command(const std::vector<std::string>& argv, std::string* output);

}  // namespace ferry::testing
