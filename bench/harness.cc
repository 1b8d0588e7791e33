#include "bench/harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <system_error>
#include <thread>

extern char** environ;

namespace ferry::bench {
namespace {

constexpr const char* ready_fd_env = "FERRY_BENCH_READY_FD";

[[noreturn]] void throw_errno(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

sockaddr_un unix_sockaddr(const std::string& path) {
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  if (path.size() >= sizeof sun.sun_path) {
    throw std::runtime_error("unix socket path too long: " + path);
  }
  std::memcpy(sun.sun_path, path.c_str(), path.size() + 1);
  return sun;
}

struct AddrInfo {
  addrinfo* list = nullptr;
  ~AddrInfo() {
    if (list) ::freeaddrinfo(list);
  }
};

void resolve(const Address& address, bool passive, AddrInfo& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  std::string port = std::to_string(address.port);
  int rc = ::getaddrinfo(address.host.empty() ? nullptr : address.host.c_str(), port.c_str(),
                         &hints, &out.list);
  if (rc != 0) {
    throw std::runtime_error("cannot resolve " + address.str() + ": " + ::gai_strerror(rc));
  }
}

}  // namespace

Address Address::parse(std::string_view text) {
  Address address;
  if (text.starts_with("unix:")) {
    address.kind = Kind::unix_socket;
    address.path = std::string(text.substr(5));
    if (address.path.empty()) throw std::runtime_error("empty unix socket path");
    return address;
  }
  if (!text.starts_with("tcp:")) {
    throw std::runtime_error("address must be unix:PATH or tcp:HOST:PORT: " + std::string(text));
  }
  std::string_view rest = text.substr(4);
  std::size_t colon = rest.rfind(':');
  if (colon == std::string_view::npos) {
    throw std::runtime_error("tcp address needs a port: " + std::string(text));
  }
  std::string_view host = rest.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  address.kind = Kind::tcp;
  address.host = std::string(host);
  std::string port(rest.substr(colon + 1));
  char* end = nullptr;
  unsigned long value = std::strtoul(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || value > 65535) {
    throw std::runtime_error("bad tcp port in " + std::string(text));
  }
  address.port = static_cast<uint16_t>(value);
  return address;
}

std::string Address::str() const {
  if (kind == Kind::unix_socket) return "unix:" + path;
  bool v6 = host.find(':') != std::string::npos;
  return "tcp:" + (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

Fd& Fd::operator=(Fd&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Fd connect_to(const Address& address) {
  if (address.kind == Address::Kind::unix_socket) {
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) throw_errno("socket");
    sockaddr_un sun = unix_sockaddr(address.path);
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0) {
      throw_errno("connect " + address.str());
    }
    return fd;
  }
  AddrInfo ai;
  resolve(address, false, ai);
  int last_errno = 0;
  for (addrinfo* p = ai.list; p; p = p->ai_next) {
    Fd fd(::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol));
    if (!fd) {
      last_errno = errno;
      continue;
    }
    if (::connect(fd.get(), p->ai_addr, p->ai_addrlen) == 0) {
      set_nodelay(fd.get());
      return fd;
    }
    last_errno = errno;
  }
  errno = last_errno;
  throw_errno("connect " + address.str());
}

Fd connect_with_retry(const Address& address, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    try {
      return connect_to(address);
    } catch (const std::system_error&) {
      if (Clock::now() >= deadline) throw;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Fd listen_on(Address& address) {
  if (address.kind == Address::Kind::unix_socket) {
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) throw_errno("socket");
    sockaddr_un sun = unix_sockaddr(address.path);
    ::unlink(address.path.c_str());
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0) {
      throw_errno("bind " + address.str());
    }
    if (::listen(fd.get(), 64) != 0) throw_errno("listen");
    return fd;
  }
  AddrInfo ai;
  resolve(address, true, ai);
  for (addrinfo* p = ai.list; p; p = p->ai_next) {
    Fd fd(::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol));
    if (!fd) continue;
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd.get(), p->ai_addr, p->ai_addrlen) != 0) continue;
    if (::listen(fd.get(), 64) != 0) throw_errno("listen");
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
      if (bound.ss_family == AF_INET) {
        address.port = ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
      } else if (bound.ss_family == AF_INET6) {
        address.port = ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
      }
    }
    return fd;
  }
  throw_errno("bind " + address.str());
}

Fd accept_from(int listen_fd) {
  for (;;) {
    int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) {
      sockaddr_storage peer{};
      socklen_t len = sizeof peer;
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&peer), &len) == 0 &&
          (peer.ss_family == AF_INET || peer.ss_family == AF_INET6)) {
        set_nodelay(fd);
      }
      return Fd(fd);
    }
    if (errno != EINTR && errno != ECONNABORTED) throw_errno("accept");
  }
}

bool read_exact(int fd, void* data, std::size_t size) {
  auto* p = static_cast<unsigned char*>(data);
  std::size_t done = 0;
  while (done < size) {
    ssize_t n = ::read(fd, p + done, size - done);
    if (n > 0) {
      done += static_cast<std::size_t>(n);
    } else if (n == 0) {
      if (done == 0) return false;
      throw std::runtime_error("connection closed mid-message");
    } else if (errno != EINTR) {
      throw_errno("read");
    }
  }
  return true;
}

void write_all(int fd, const void* data, std::size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n >= 0) {
      p += n;
      size -= static_cast<std::size_t>(n);
    } else if (errno != EINTR) {
      throw_errno("write");
    }
  }
}

void writev_all(int fd, iovec* iov, int count) {
  while (count > 0) {
    ssize_t n = ::writev(fd, iov, count);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("writev");
    }
    auto left = static_cast<std::size_t>(n);
    while (count > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --count;
    }
    if (count > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
}

void put_be32(unsigned char* out, uint32_t value) {
  out[0] = static_cast<unsigned char>(value >> 24);
  out[1] = static_cast<unsigned char>(value >> 16);
  out[2] = static_cast<unsigned char>(value >> 8);
  out[3] = static_cast<unsigned char>(value);
}

uint32_t get_be32(const unsigned char* in) {
  return (uint32_t{in[0]} << 24) | (uint32_t{in[1]} << 16) | (uint32_t{in[2]} << 8) |
         uint32_t{in[3]};
}

void put_be64(unsigned char* out, uint64_t value) {
  put_be32(out, static_cast<uint32_t>(value >> 32));
  put_be32(out + 4, static_cast<uint32_t>(value));
}

uint64_t get_be64(const unsigned char* in) {
  return (uint64_t{get_be32(in)} << 32) | get_be32(in + 4);
}

ScratchDir::ScratchDir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string base = (tmp && *tmp) ? tmp : "/tmp";
  std::string pattern = base + "/ferrybench.XXXXXX";
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  if (!::mkdtemp(buf.data())) throw_errno("mkdtemp " + pattern);
  path_ = buf.data();
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string ScratchDir::unix_address(std::string_view name) const {
  return "unix:" + (path_ / name).string();
}

std::string self_exe() {
  std::error_code ec;
  auto path = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error("cannot resolve /proc/self/exe: " + ec.message());
  return path.string();
}

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(other.pid_), ready_info_(std::move(other.ready_info_)) {
  other.pid_ = -1;
}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    stop();
    pid_ = other.pid_;
    ready_info_ = std::move(other.ready_info_);
    other.pid_ = -1;
  }
  return *this;
}

void ChildProcess::stop() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  auto deadline = Clock::now() + std::chrono::seconds(2);
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_ || (r < 0 && errno != EINTR)) break;
    if (Clock::now() >= deadline) {
      ::kill(pid_, SIGKILL);
      while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  pid_ = -1;
}

ChildProcess spawn_server(const std::vector<std::string>& argv, const std::string& netns,
                          std::chrono::milliseconds timeout, bool wait_for_ready) {
  if (argv.empty()) throw std::invalid_argument("spawn_server: empty argv");

  std::vector<std::string> full;
  if (!netns.empty()) full = {"ip", "netns", "exec", netns};
  full.insert(full.end(), argv.begin(), argv.end());

  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) throw_errno("pipe2");
  Fd read_end(pipe_fds[0]);
  Fd write_end(pipe_fds[1]);

  // Everything the child needs is built before fork(): between fork and exec
  // only async-signal-safe calls are allowed, and the parent may have threads.
  std::vector<char*> args;
  for (auto& a : full) args.push_back(a.data());
  args.push_back(nullptr);
  std::string ready_var = std::string(ready_fd_env) + "=" + std::to_string(write_end.get());
  std::vector<std::string> env_store;
  for (char** e = environ; *e; ++e) {
    std::string_view entry(*e);
    if (!entry.starts_with(std::string(ready_fd_env) + "=")) env_store.emplace_back(entry);
  }
  env_store.push_back(ready_var);
  std::vector<char*> envp;
  for (auto& e : env_store) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t parent = ::getpid();

  pid_t pid = ::fork();
  if (pid < 0) throw_errno("fork");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    ::dup2(STDERR_FILENO, STDOUT_FILENO);
    ::fcntl(write_end.get(), F_SETFD, 0);
    ::execvpe(args[0], args.data(), envp.data());
    const char msg[] = "ferry_bench: exec of server failed\n";
    ssize_t ignored = ::write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)ignored;
    ::_exit(127);
  }
  write_end.reset();

  ChildProcess child;
  child.pid_ = pid;
  if (!wait_for_ready) return child;

  std::string line;
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      throw std::runtime_error("server did not become ready within " +
                               std::to_string(timeout.count()) + " ms: " + full[0]);
    }
    pollfd pfd{read_end.get(), POLLIN, 0};
    int rc = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) throw_errno("poll");
    if (rc == 0) continue;
    char buf[256];
    ssize_t n = ::read(read_end.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int status = 0;
      std::string why = "server exited before it was ready";
      if (::waitpid(pid, &status, 0) == pid) {
        child.pid_ = -1;
        if (WIFEXITED(status)) why += " (exit " + std::to_string(WEXITSTATUS(status)) + ")";
        if (WIFSIGNALED(status)) why += " (signal " + std::to_string(WTERMSIG(status)) + ")";
      }
      throw std::runtime_error(why + ": " + argv[0] + " " + (argv.size() > 1 ? argv[1] : ""));
    }
    line.append(buf, static_cast<std::size_t>(n));
    std::size_t nl = line.find('\n');
    if (nl != std::string::npos) {
      line.resize(nl);
      if (!line.starts_with("ready")) throw std::runtime_error("bad readiness line: " + line);
      child.ready_info_ = line.size() > 6 ? line.substr(6) : std::string();
      return child;
    }
  }
}

void signal_ready(std::string_view info) {
  std::string line("ready");
  if (!info.empty()) line.append(1, ' ').append(info);
  line.push_back('\n');
  const char* env = std::getenv(ready_fd_env);
  if (!env) {
    std::fputs(line.c_str(), stderr);
    return;
  }
  int fd = std::atoi(env);
  try {
    write_all(fd, line.data(), line.size());
  } catch (const std::exception&) {
    // A parent that stopped waiting will kill us anyway; keep serving.
  }
  ::close(fd);
  ::unsetenv(ready_fd_env);
}

void enter_netns(const std::string& name) {
  std::string path = "/run/netns/" + name;
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw_errno("open " + path);
  if (::setns(fd.get(), CLONE_NEWNET) != 0) throw_errno("setns " + path);
}

}  // namespace ferry::bench

namespace ferry::bench {

void make_bench_file(const std::string& path, uint64_t size, bool sparse) {
  Fd file(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
  if (!file) throw_errno("create " + path);
  if (::ftruncate(file.get(), static_cast<off_t>(size)) != 0) throw_errno("size " + path);
  std::vector<unsigned char> body(uint64_t{1} << 20);
  for (std::size_t i = 0; i < body.size(); ++i) body[i] = static_cast<unsigned char>(i * 131 + 7);
  auto put = [&](uint64_t at, uint64_t length) {
    for (uint64_t done = 0; done < length;) {
      const std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(body.size(), length - done));
      body[0] = static_cast<unsigned char>((at + done) >> 20);  // no two MiB alike
      if (::pwrite(file.get(), body.data(), n, static_cast<off_t>(at + done)) != static_cast<ssize_t>(n))
        throw_errno("write " + path);
      done += n;
    }
  };
  if (!sparse) {
    put(0, size);
  } else {
    const uint64_t extent = uint64_t{1} << 20;
    const uint64_t count = std::max<uint64_t>(1, size / 100 / extent);
    const uint64_t stride = size / count;
    for (uint64_t i = 0; i < count; ++i) put((i * stride + stride / 2) / extent * extent, extent);
  }
  if (::fsync(file.get()) != 0) throw_errno("fsync " + path);
}

uint64_t allocated_bytes(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw_errno("stat " + path);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

}  // namespace ferry::bench
