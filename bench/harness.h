// Process and socket plumbing shared by the baseline and ferry sides of the
// benchmark rows: addresses, blocking POSIX sockets, scratch directories and
// server child processes with a readiness handshake.
//
// Everything here is for the single-threaded `measure` driver and its server
// children; nothing keeps global state except the readiness fd a child
// inherits through FERRY_BENCH_READY_FD.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::bench {

// Thrown when a baseline's peer tool is not available in this build or on
// this machine; `measure` exits 77 and bench/run says so in the row's
// baseline field instead of counting a failure.
class Unavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "unix:PATH" or "tcp:HOST:PORT" ("tcp:[::1]:PORT" for IPv6 literals).
struct Address {
  enum class Kind { unix_socket, tcp } kind = Kind::unix_socket;
  std::string path;  // unix
  std::string host;  // tcp
  uint16_t port = 0;

  static Address parse(std::string_view text);
  std::string str() const;
};

// Owns one file descriptor; move-only.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(other.release()) {}
  Fd& operator=(Fd&& other) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }

  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);
  explicit operator bool() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// Blocking client socket; TCP sockets get TCP_NODELAY so a small request is
// never held back by Nagle waiting for the previous reply's ACK.
Fd connect_to(const Address& address);
// Retries connect_to until it succeeds or `timeout` passes, for servers that
// cannot take part in the readiness handshake (ferryd).
Fd connect_with_retry(const Address& address, std::chrono::milliseconds timeout);
// Listening socket. A tcp port 0 is replaced in `address` by the port the
// kernel chose, so the server can report where it really listens.
Fd listen_on(Address& address);
// accept() that retries on EINTR; TCP_NODELAY on the accepted socket.
Fd accept_from(int listen_fd);

// Loops over short transfers. read_exact returns false on EOF before the
// first byte and throws on EOF in the middle.
bool read_exact(int fd, void* data, std::size_t size);
void write_all(int fd, const void* data, std::size_t size);
void writev_all(int fd, iovec* iov, int count);

void put_be32(unsigned char* out, uint32_t value);
uint32_t get_be32(const unsigned char* in);
void put_be64(unsigned char* out, uint64_t value);
uint64_t get_be64(const unsigned char* in);

// A private directory under $TMPDIR (or /tmp), removed with its contents on
// destruction. Unix socket paths must stay under 108 bytes, so the name is
// short.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string unix_address(std::string_view name) const;

 private:
  std::filesystem::path path_;
};

// The running ferry_bench binary, resolved to a real path so that it still
// names the same file when re-executed through `ip netns exec`.
std::string self_exe();

// A server child process. Destruction (or stop()) sends SIGTERM, waits up to
// two seconds, then SIGKILLs and reaps, so no server outlives the case. The
// child also gets PR_SET_PDEATHSIG, so it dies if the spawning *thread*
// exits first: spawn servers from the thread that outlives them.
class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() { stop(); }

  pid_t pid() const { return pid_; }
  // Whatever the child passed to signal_ready(), e.g. its bound address.
  const std::string& ready_info() const { return ready_info_; }
  void stop();

 private:
  friend ChildProcess spawn_server(const std::vector<std::string>&, const std::string&,
                                   std::chrono::milliseconds, bool);
  pid_t pid_ = -1;
  std::string ready_info_;
};

// Starts argv[0] (searched in PATH) with stdout sent to our stderr, so the
// measuring process keeps stdout for its one JSON line. With a non-empty
// `netns` the command runs under `ip netns exec NETNS`.
//
// With wait_for_ready the call returns once the child has called
// signal_ready() (it inherits the pipe as FERRY_BENCH_READY_FD) and throws if
// the child exits or `timeout` passes first. Without it the call returns at
// once; pair it with connect_with_retry.
ChildProcess spawn_server(const std::vector<std::string>& argv, const std::string& netns,
                          std::chrono::milliseconds timeout = std::chrono::seconds(20),
                          bool wait_for_ready = true);

// Called by a server child once it accepts connections; `info` travels to
// the parent's ready_info(). Without FERRY_BENCH_READY_FD (started by hand)
// it prints "ready INFO" on stderr.
void signal_ready(std::string_view info);

// Moves the calling thread into the named network namespace
// (/run/netns/NAME, as made by `ip netns add`). Call before any thread starts.
void enter_netns(const std::string& name);

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Measuring window for time-bounded rows: long enough to average over
// scheduler noise, short enough that `bench/run --quick` stays under three
// minutes on two cores.
inline std::chrono::milliseconds measure_window(bool quick) {
  return quick ? std::chrono::milliseconds(2000) : std::chrono::milliseconds(5000);
}
inline std::chrono::milliseconds warmup_window() { return std::chrono::milliseconds(300); }

// Bytes of 256 KiB bodies moved by the rpc.body.* rows.
inline uint64_t body_total_bytes(bool quick) {
  return quick ? (uint64_t{512} << 20) : (uint64_t{4} << 30);
}
inline constexpr std::size_t body_chunk_bytes = 256 * 1024;
// Bytes one stream moves in the stream.* rows.
inline uint64_t stream_total_bytes(bool quick) { return quick ? (uint64_t{1} << 30) : (uint64_t{4} << 30); }
// sasl.stream.upload: the SASL layer runs at a fraction of TLS's speed.
inline uint64_t sasl_total_bytes(bool quick) { return quick ? (uint64_t{256} << 20) : (uint64_t{1} << 30); }
// Length prefix plus the 24-byte header of a ferry frame.
inline constexpr std::size_t frame_overhead_bytes = 4 + 24;
inline constexpr std::size_t echo_payload_bytes = 64;

}  // namespace ferry::bench

namespace ferry::bench {

// Files for the vol.* rows, made before the clock starts and synced so that
// write-back does not run during the measurement. Dense: `size` bytes of a
// non-zero pattern. Sparse: `size` bytes of which 1% is data, in 1 MiB
// extents spread evenly, the rest holes.
void make_bench_file(const std::string& path, uint64_t size, bool sparse);
// Bytes the file occupies on disk (st_blocks * 512).
uint64_t allocated_bytes(const std::string& path);
// Bytes one vol.* row moves: 4 GiB dense (1 GiB with --quick).
inline uint64_t volume_total_bytes(bool quick) { return quick ? (uint64_t{1} << 30) : (uint64_t{4} << 30); }
inline constexpr uint64_t sparse_volume_bytes = uint64_t{10} << 30;

}  // namespace ferry::bench
