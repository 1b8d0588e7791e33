// Peer tools and child processes for the rows that run real programs
// (nbd.*, copy.*): finding a tool, a child process owned through RAII,
// waiting for a server to listen or to log a line, and small formatting
// helpers for notes. For the measuring process only, like harness.h.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bench/ferry_cases.h"
#include "bench/harness.h"

namespace ferry::bench {

// A tool from PATH, or from the sbin directories PATH may lack; empty when
// it is not installed.
std::string find_tool(const std::string& name);
// The same; throws Unavailable naming `package` when it is not installed.
std::string need_tool(const std::string& name, const std::string& package);
// The ferry CLI beside --ferryd (build/client/ferry); throws if absent.
std::string cli_path(const CaseOptions& options);

// "exit status N", "killed by SIGNAME", for a wait status.
std::string describe_status(int status);
// A whole file (empty if it cannot be read), and a text's last non-empty line.
std::string read_text(const std::string& path);
std::string last_line(const std::string& text);

// `argv` run under `ip netns exec NETNS` when `netns` is not empty.
std::vector<std::string> in_netns(const std::string& netns, std::vector<std::string> argv);

// A child process: started with fork/exec, argv[0] an absolute path. Its
// stdout goes to our stderr (our stdout carries the JSON line), or its
// stdout and stderr both go to `log`. It gets PR_SET_PDEATHSIG, like
// spawn_server's children. Destruction (or stop()) sends SIGTERM, waits up
// to two seconds, then SIGKILLs and reaps.
class Proc {
 public:
  Proc() = default;
  explicit Proc(std::vector<std::string> argv, const std::string& log = {});
  Proc(Proc&& other) noexcept;
  Proc& operator=(Proc&& other) noexcept;
  Proc(const Proc&) = delete;
  Proc& operator=(const Proc&) = delete;
  ~Proc() { stop(); }

  pid_t pid() const { return pid_; }
  const std::string& name() const { return name_; }
  int status() const { return status_; }

  // Reaps the child if it has ended; true once it has.
  bool exited();
  // Blocks until the child ends; its wait status.
  int wait();
  // Waits and throws unless the child exited with status 0.
  void check(const std::string& what);
  void stop();

 private:
  pid_t pid_ = -1;
  int status_ = 0;
  std::string name_;
};

// Runs `fn` on a thread of its own that first enters network namespace
// `netns` (the caller's namespace when empty), so a socket it makes lives
// there; exceptions propagate to the caller.
void run_in_netns(const std::string& netns, const std::function<void()>& fn);
// A TCP port on 127.0.0.1 nobody listens on at the moment, in `netns`.
std::uint16_t free_tcp_port(const std::string& netns = {});

// Returns once `server` accepts NBD connections at `address` (reached from
// network namespace `netns`); the probe leaves politely (NBD_OPT_ABORT).
// Throws if the server exits first or takes longer than 20 s.
void wait_for_nbd(Proc& server, const Address& address, const std::string& netns = {});
// The same for a unix socket path.
void wait_for_socket(Proc& server, const std::string& path);
// Returns once `text` appears in `log`, which `proc` writes; throws with the
// log's last line if the process exits first or 20 s pass.
void wait_for_log(Proc& proc, const std::string& log, const std::string& text);
// Returns the first line of `path` once the file exists (servers that write
// a ready file atomically); throws if `proc` exits first or 20 s pass.
std::string wait_for_file(Proc& proc, const std::string& path);

// A new sparse file of `size` bytes (no data).
void make_sparse_file(const std::string& path, std::uint64_t size);

double mb_per_s(std::uint64_t bytes, double seconds);
std::string mib(std::uint64_t bytes);
std::string fixed(double v, int decimals = 0);

}  // namespace ferry::bench
