#include "bench/tools.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <utility>

extern char** environ;

namespace ferry::bench {

namespace fs = std::filesystem;

std::string find_tool(const std::string& name) {
  std::string dirs = std::getenv("PATH") ? std::getenv("PATH") : "";
  dirs += ":/usr/bin:/usr/sbin:/bin:/sbin:/usr/local/bin:/usr/local/sbin";
  std::stringstream in(dirs);
  for (std::string dir; std::getline(in, dir, ':');) {
    if (dir.empty()) continue;
    const std::string path = dir + "/" + name;
    if (::access(path.c_str(), X_OK) == 0) return path;
  }
  return {};
}

std::string need_tool(const std::string& name, const std::string& package) {
  std::string path = find_tool(name);
  if (path.empty()) throw Unavailable(name + " not installed (" + package + ")");
  return path;
}

std::string cli_path(const CaseOptions& options) {
  if (options.ferryd.empty()) throw std::runtime_error("ferryd path not given (pass --ferryd)");
  const auto path = fs::path(options.ferryd).parent_path().parent_path() / "client" / "ferry";
  if (!fs::exists(path)) throw std::runtime_error("ferry CLI not found at " + path.string());
  return path.string();
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by ") + ::strsignal(WTERMSIG(status));
  return "wait status " + std::to_string(status);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string last_line(const std::string& text) {
  std::string last;
  std::stringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) last = line;
  return last;
}

std::vector<std::string> in_netns(const std::string& netns, std::vector<std::string> argv) {
  if (netns.empty()) return argv;
  std::vector<std::string> full = {need_tool("ip", "iproute2"), "netns", "exec", netns};
  full.insert(full.end(), std::make_move_iterator(argv.begin()), std::make_move_iterator(argv.end()));
  return full;
}

Proc::Proc(std::vector<std::string> argv, const std::string& log) : name_(fs::path(argv.at(0)).filename()) {
  // A command under `ip netns exec NS` is named after the command.
  if (name_ == "ip" && argv.size() > 4 && argv[1] == "netns" && argv[2] == "exec")
    name_ = fs::path(argv[4]).filename();
  // Built before fork(): between fork and exec only async-signal-safe
  // calls are allowed, and this process may have threads.
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork: " + std::string(std::strerror(errno)));
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    if (log.empty()) {
      ::dup2(STDERR_FILENO, STDOUT_FILENO);
    } else {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0) ::_exit(127);
      ::dup2(fd, STDOUT_FILENO);
      ::dup2(fd, STDERR_FILENO);
    }
    ::execve(args[0], args.data(), environ);
    const char msg[] = "ferry_bench: exec failed\n";
    ssize_t ignored = ::write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)ignored;
    ::_exit(127);
  }
  pid_ = pid;
}

Proc::Proc(Proc&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)), status_(other.status_), name_(std::move(other.name_)) {}

Proc& Proc::operator=(Proc&& other) noexcept {
  if (this != &other) {
    stop();
    pid_ = std::exchange(other.pid_, -1);
    status_ = other.status_;
    name_ = std::move(other.name_);
  }
  return *this;
}

bool Proc::exited() {
  if (pid_ < 0) return true;
  int status = 0;
  const pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    status_ = status;
    pid_ = -1;
    return true;
  }
  return false;
}

int Proc::wait() {
  if (pid_ < 0) return status_;
  int status = 0;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  status_ = status;
  pid_ = -1;
  return status_;
}

void Proc::check(const std::string& what) {
  const int status = wait();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw std::runtime_error(what + " failed (" + describe_status(status) + ")");
}

void Proc::stop() {
  if (pid_ < 0) return;
  ::kill(pid_, SIGTERM);
  const auto deadline = Clock::now() + std::chrono::seconds(2);
  while (!exited()) {
    if (Clock::now() >= deadline) {
      ::kill(pid_, SIGKILL);
      wait();
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void run_in_netns(const std::string& netns, const std::function<void()>& fn) {
  if (netns.empty()) return fn();
  std::exception_ptr failure;
  std::thread worker([&] {
    try {
      enter_netns(netns);
      fn();
    } catch (...) {
      failure = std::current_exception();
    }
  });
  worker.join();
  if (failure) std::rethrow_exception(failure);
}

std::uint16_t free_tcp_port(const std::string& netns) {
  std::uint16_t port = 0;
  run_in_netns(netns, [&] {
    Address address = Address::parse("tcp:127.0.0.1:0");
    Fd listener = listen_on(address);
    port = address.port;
  });
  return port;
}

void wait_for_nbd(Proc& server, const Address& address, const std::string& netns) {
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  for (;;) {
    if (server.exited())
      throw std::runtime_error(server.name() + " exited (" + describe_status(server.status()) +
                               ") before listening on " + address.str());
    bool up = false;
    run_in_netns(netns, [&] {
      if (address.kind == Address::Kind::unix_socket && !fs::exists(address.path)) return;
      try {
        Fd probe = connect_to(address);
        up = true;
        // A well-behaved client that leaves at once (fixed newstyle,
        // NBD_OPT_ABORT), so the server logs no broken handshake.
        unsigned char greeting[18];
        if (read_exact(probe.get(), greeting, sizeof greeting)) {
          unsigned char abort[20];
          put_be32(abort, 3);  // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
          std::memcpy(abort + 4, "IHAVEOPT", 8);
          put_be32(abort + 12, 2);  // NBD_OPT_ABORT
          put_be32(abort + 16, 0);
          // MSG_NOSIGNAL: a server gone meanwhile is an error, not SIGPIPE.
          if (::send(probe.get(), abort, sizeof abort, MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof abort)) {
            unsigned char reply[20];
            read_exact(probe.get(), reply, sizeof reply);  // the server's ACK, if it sends one
          }
        }
      } catch (const std::exception&) {
      }
    });
    if (up) return;
    if (Clock::now() > deadline)
      throw std::runtime_error(server.name() + " did not listen on " + address.str() + " in 20 s");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void wait_for_socket(Proc& server, const std::string& path) { wait_for_nbd(server, Address::parse("unix:" + path)); }

void wait_for_log(Proc& proc, const std::string& log, const std::string& text) {
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  for (;;) {
    if (read_text(log).find(text) != std::string::npos) return;
    if (proc.exited())
      throw std::runtime_error(proc.name() + " exited (" + describe_status(proc.status()) + "): " +
                               last_line(read_text(log)));
    if (Clock::now() > deadline)
      throw std::runtime_error(proc.name() + " did not print '" + text + "' in 20 s: " + last_line(read_text(log)));
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::string wait_for_file(Proc& proc, const std::string& path) {
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  for (;;) {
    if (fs::exists(path)) {
      std::ifstream in(path);
      std::string line;
      std::getline(in, line);
      return line;
    }
    if (proc.exited())
      throw std::runtime_error(proc.name() + " exited (" + describe_status(proc.status()) + ") before writing " + path);
    if (Clock::now() > deadline) throw std::runtime_error(proc.name() + " did not write " + path + " in 20 s");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void make_sparse_file(const std::string& path, std::uint64_t size) {
  { std::ofstream out(path, std::ios::trunc); }
  fs::resize_file(path, size);
}

double mb_per_s(std::uint64_t bytes, double seconds) { return static_cast<double>(bytes) / 1e6 / seconds; }

std::string mib(std::uint64_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

std::string fixed(double v, int decimals) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

}  // namespace ferry::bench
