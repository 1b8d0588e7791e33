#include "tests/integration/ferryd_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace ferry::testing {

namespace fs = std::filesystem;

std::vector<TransportKind> all_transports() {
  std::vector<TransportKind> kinds = {TransportKind::unix_socket, TransportKind::tcp, TransportKind::tls};
  if (!kGrpcUnderTsan) kinds.insert(kinds.end(), {TransportKind::grpc, TransportKind::grpcs});
  return kinds;
}

const char* to_string(TransportKind kind) {
  switch (kind) {
    case TransportKind::unix_socket:
      return "unix";
    case TransportKind::tcp:
      return "tcp";
    case TransportKind::tls:
      return "tls";
    case TransportKind::grpc:
      return "grpc";
    case TransportKind::grpcs:
      return "grpcs";
  }
  return "?";
}

TempDir::TempDir() {
  std::string tmpl = (fs::temp_directory_path() / "ferry-test-XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

std::string ferryd_path() { return FERRY_TEST_FERRYD; }

namespace {
bool grpc_listeners = false;
}  // namespace

FerrydProcess::GrpcListeners::GrpcListeners(bool on) : was_(grpc_listeners) { grpc_listeners = on; }
FerrydProcess::GrpcListeners::~GrpcListeners() { grpc_listeners = was_; }
std::string ferry_cli_path() { return FERRY_TEST_FERRY_CLI; }

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

pid_t spawn(const std::vector<std::string>& argv, const std::string& out_path, bool merge_stdout) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 2, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (merge_stdout) posix_spawn_file_actions_adddup2(&actions, 2, 1);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot start " + argv[0] + ": " + std::strerror(rc));
  return pid;
}

unsigned long status_field(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::stoul(line.substr(key.size()));
  return 0;
}

}  // namespace

FerrydProcess::FerrydProcess(std::vector<std::string> extra_args, std::vector<std::string> wrapper) {
  socket_path_ = dir() + "/ferryd.sock";
  log_path_ = dir() + "/ferryd.log";
  const std::string ready = dir() + "/ready";
  std::vector<std::string> argv = {ferryd_path(),  "--test-service", "--auth-tcp", "none", "--listen", "unix:" + socket_path_,
                                   "--listen",     "tcp:127.0.0.1:0", "--ready-file", ready};
  bool own_tls = false;
  for (std::size_t i = 0; i + 1 < extra_args.size(); ++i)
    own_tls = own_tls || (extra_args[i] == "--listen" && extra_args[i + 1].rfind("tls:", 0) == 0);
  if (!own_tls) {
    const auto& m = test_tls_material();
    argv.insert(argv.end(), {"--listen", "tls:127.0.0.1:0", "--tls-ca", m.ca.cert, "--tls-cert", m.server.cert,
                             "--tls-key", m.server.key});
  }
  if (grpc_listeners) {
    // grpcs takes its certificate from the --tls-* options (ours above, or
    // those `extra_args` bring).
    argv.insert(argv.end(), {"--listen", "grpc:127.0.0.1:0"});
    if (!own_tls) argv.insert(argv.end(), {"--listen", "grpcs:127.0.0.1:0"});
  }
  bool own_pools = false;
  for (const auto& a : extra_args) own_pools = own_pools || a == "--pool" || a == "--config" || a.rfind("--pool=", 0) == 0;
  if (!own_pools) argv.insert(argv.end(), {"--pool", "default=" + pool_dir()});
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  argv.insert(argv.begin(), wrapper.begin(), wrapper.end());
  pid_ = spawn(argv, log_path_, false);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!fs::exists(ready)) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      throw std::runtime_error("ferryd exited during start-up:\n" + log());
    }
    if (std::chrono::steady_clock::now() > deadline) throw std::runtime_error("ferryd not ready in 10 s:\n" + log());
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::istringstream lines(read_file(ready));
  std::string line;
  while (std::getline(lines, line))
    if (line.rfind("tcp:", 0) == 0)
      tcp_port_ = static_cast<std::uint16_t>(std::stoi(line.substr(line.rfind(':') + 1)));
    else if (line.rfind("tls:", 0) == 0)
      tls_port_ = static_cast<std::uint16_t>(std::stoi(line.substr(line.rfind(':') + 1)));
    else if (line.rfind("grpc:", 0) == 0)
      grpc_port_ = static_cast<std::uint16_t>(std::stoi(line.substr(line.rfind(':') + 1)));
    else if (line.rfind("grpcs:", 0) == 0)
      grpcs_port_ = static_cast<std::uint16_t>(std::stoi(line.substr(line.rfind(':') + 1)));
    else if (line.rfind("nbd-tcp:", 0) == 0)
      nbd_tcp_port_ = static_cast<std::uint16_t>(std::stoi(line.substr(line.rfind(':') + 1)));
}

FerrydProcess::~FerrydProcess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGCONT);
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }
}

const TlsMaterial& test_tls_material() {
  // Made once per test process and kept until it exits.
  static TempDir* dir = new TempDir();
  static const TlsMaterial material = make_tls_material(dir->path());
  return material;
}

rpc::ClientOptions client_options_for(TransportKind kind, rpc::ClientOptions base) {
  if (kind == TransportKind::tls || kind == TransportKind::grpcs) {
    const auto& m = test_tls_material();
    if (base.tls.ca_file.empty()) base.tls.ca_file = m.ca.cert;
    if (base.tls.cert_file.empty()) {
      base.tls.cert_file = m.client.cert;
      base.tls.key_file = m.client.key;
    }
  }
  return base;
}

std::string FerrydProcess::uri(TransportKind kind) const {
  if (kind == TransportKind::unix_socket) return "ferry+unix://" + socket_path_;
  if (kind == TransportKind::grpc || kind == TransportKind::grpcs) {
    const bool secure = kind == TransportKind::grpcs;
    const std::uint16_t port = secure ? grpcs_port_ : grpc_port_;
    if (!port) throw std::runtime_error(std::string("ferryd was not started with a ") + to_string(kind) +
                                        ": listener (FerrydProcess::GrpcListeners)");
    return std::string(secure ? "ferry+grpcs" : "ferry+grpc") + "://127.0.0.1:" + std::to_string(port);
  }
  if (kind == TransportKind::tls) {
    if (!tls_port_) throw std::runtime_error("ferryd was not started with a tls: listener");
    return "ferry+tls://127.0.0.1:" + std::to_string(tls_port_);
  }
  return "ferry+tcp://127.0.0.1:" + std::to_string(tcp_port_);
}

int FerrydProcess::terminate(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
      pid_ = -1;
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

bool FerrydProcess::running() {
  if (pid_ <= 0) return false;
  int status = 0;
  if (::waitpid(pid_, &status, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

void FerrydProcess::pause_process() { ::kill(pid_, SIGSTOP); }
void FerrydProcess::resume_process() { ::kill(pid_, SIGCONT); }

std::string FerrydProcess::log() const { return read_file(log_path_); }

bool FerrydProcess::wait_for_log(const std::string& text, std::chrono::milliseconds timeout) const {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (log().find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return log().find(text) != std::string::npos;
}

unsigned FerrydProcess::threads() const { return static_cast<unsigned>(status_field(pid_, "Threads:")); }
std::uint64_t FerrydProcess::rss_bytes() const { return status_field(pid_, "VmRSS:") * 1024; }

ChildProcess::ChildProcess(const std::vector<std::string>& argv, const std::string& stdin_path) {
  output_path_ = dir_.path() + "/out";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, output_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  posix_spawn_file_actions_addopen(&actions, 0, stdin_path.empty() ? "/dev/null" : stdin_path.c_str(), O_RDONLY, 0);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const int rc = posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot start " + argv[0] + ": " + std::strerror(rc));
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }
}

void ChildProcess::signal(int sig) {
  if (pid_ > 0) ::kill(pid_, sig);
}

int ChildProcess::wait(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (pid_ > 0) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      break;
    }
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return status_;
}

std::string ChildProcess::output() const { return read_file(output_path_); }

int run_command(const std::vector<std::string>& argv, std::string* output) {
  TempDir dir;
  const std::string out = dir.path() + "/out";
  pid_t pid = spawn(argv, out, true);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (output) *output = read_file(out);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace ferry::testing
