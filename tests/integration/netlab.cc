#include "tests/integration/netlab.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace ferry::testing {

namespace fs = std::filesystem;

std::string relay_path() { return FERRY_TEST_RELAY; }

namespace {

const std::string kIp = "/usr/sbin/ip";
const std::string kTc = "/usr/sbin/tc";

// Labs and links made by this process: namespace names and subnets stay
// unique across the labs of one test process.
std::atomic<int> g_labs{0};
std::atomic<int> g_links{0};

std::string join(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) out += (out.empty() ? "" : " ") + a;
  return out;
}

// Runs a command; throws with its output unless it exits 0.
std::string run(const std::vector<std::string>& argv) {
  std::string out;
  const int rc = run_command(argv, &out);
  if (rc != 0) throw std::runtime_error(join(argv) + ": exit " + std::to_string(rc) + ": " + out);
  return out;
}

// A tc rate ("100mbit", "1gbit", "12500kbps", a bare number: bit/s) in bytes/s.
double rate_bytes_per_second(const std::string& rate) {
  std::size_t used = 0;
  double n = 0;
  try {
    n = std::stod(rate, &used);
  } catch (const std::exception&) {
    throw std::invalid_argument("'" + rate + "' is not a tc rate");
  }
  std::string unit = rate.substr(used);
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
  static const std::map<std::string, double> bits = {{"", 1},
                                                     {"bit", 1},
                                                     {"kbit", 1e3},
                                                     {"mbit", 1e6},
                                                     {"gbit", 1e9},
                                                     {"tbit", 1e12},
                                                     {"kibit", 1024.0},
                                                     {"mibit", 1048576.0},
                                                     {"gibit", 1073741824.0},
                                                     {"bps", 8},
                                                     {"kbps", 8e3},
                                                     {"mbps", 8e6},
                                                     {"gbps", 8e9},
                                                     {"tbps", 8e12},
                                                     {"kibps", 8 * 1024.0},
                                                     {"mibps", 8 * 1048576.0},
                                                     {"gibps", 8 * 1073741824.0}};
  const auto it = bits.find(unit);
  if (it == bits.end() || !(n > 0)) throw std::invalid_argument("'" + rate + "' is not a tc rate");
  return n * it->second / 8;
}

// tbf on the root of `dev` in `ns`. The bucket holds 4 ms of the rate (at
// least 64 KiB: a GSO packet on a veth is up to 64 KiB and must fit), so high
// rates are not starved by a bucket too small for the timer's granularity;
// packets wait at most 50 ms in the queue.
void set_tbf(const std::string& ns, const std::string& dev, const std::string& rate) {
  const double bytes = rate_bytes_per_second(rate);
  const auto burst = std::max<std::uint64_t>(static_cast<std::uint64_t>(bytes / 250), 64 * 1024);
  run({kTc, "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", std::to_string(burst),
       "latency", "50ms"});
}

std::string host_port(const std::string& host, std::uint16_t port) {
  return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

std::vector<std::string> namespace_names() {
  std::string out;
  if (run_command({kIp, "netns", "list"}, &out) != 0) return {};
  std::vector<std::string> names;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string name;
    if (words >> name) names.push_back(name);
  }
  return names;
}

// Deletes "ferrytest-<pid>-*" namespaces whose test process is gone and in
// which nothing runs any more (a test process that was killed).
void remove_stale_namespaces() {
  static std::once_flag once;
  std::call_once(once, [] {
    const std::string prefix = "ferrytest-";
    for (const auto& name : namespace_names()) {
      if (name.rfind(prefix, 0) != 0) continue;
      const auto dash = name.find('-', prefix.size());
      if (dash == std::string::npos) continue;
      pid_t pid = 0;
      try {
        pid = static_cast<pid_t>(std::stol(name.substr(prefix.size(), dash - prefix.size())));
      } catch (const std::exception&) {
        continue;
      }
      if (pid <= 0 || pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;
      std::string pids;
      if (run_command({kIp, "netns", "pids", name}, &pids) != 0 || !pids.empty()) continue;
      run_command({kIp, "netns", "del", name}, nullptr);
    }
  });
}

}  // namespace

bool NetLab::available() {
  static const bool ok = [] {
    if (::geteuid() != 0) return false;
    if (::access(kIp.c_str(), X_OK) != 0 || ::access(kTc.c_str(), X_OK) != 0) return false;
    const std::string probe = "ferrytest-" + std::to_string(::getpid()) + "-probe";
    std::string out;
    if (run_command({kIp, "netns", "add", probe}, &out) != 0) return false;
    const bool lo = run_command({kIp, "-n", probe, "link", "set", "lo", "up"}, &out) == 0;
    run_command({kIp, "netns", "del", probe}, &out);
    return lo;
  }();
  return ok;
}

NetLab::NetLab() : prefix_("ferrytest-" + std::to_string(::getpid()) + "-" + std::to_string(++g_labs) + "-") {}

NetLab::~NetLab() {
  relays_.clear();  // ChildProcess: SIGKILL and reap
  for (auto it = namespaces_.rbegin(); it != namespaces_.rend(); ++it) run_command({kIp, "netns", "del", *it}, nullptr);
}

std::string NetLab::add_namespace(const std::string& short_name) {
  remove_stale_namespaces();
  const std::string name = prefix_ + short_name;
  run({kIp, "netns", "add", name});
  namespaces_.push_back(name);
  run({kIp, "-n", name, "link", "set", "lo", "up"});
  return name;
}

NetLab::Link NetLab::link(const std::string& ns_a, const std::string& ns_b, const std::string& rate) {
  // Each lab's namespaces see only their own links, so the subnets only need
  // to differ within one namespace; they are made unique across test
  // processes anyway (pid and a per-process counter), which keeps logs and
  // packet captures unambiguous.
  const int k = ++g_links;
  const unsigned v = ((static_cast<unsigned>(::getpid()) % 512u) << 6) | (static_cast<unsigned>(k) % 64u);
  const std::string net = "10." + std::to_string(128 + (v >> 8)) + "." + std::to_string(v & 255u) + ".";
  Link l;
  l.ns_a = ns_a;
  l.ns_b = ns_b;
  // Device names live in their namespaces only (at most 15 characters).
  const int n = ++links_;
  l.dev_a = "fv" + std::to_string(n) + "a";
  l.dev_b = "fv" + std::to_string(n) + "b";
  l.addr_a = net + "1";
  l.addr_b = net + "2";
  run({kIp, "-n", ns_a, "link", "add", l.dev_a, "type", "veth", "peer", "name", l.dev_b, "netns", ns_b});
  run({kIp, "-n", ns_a, "addr", "add", l.addr_a + "/24", "dev", l.dev_a});
  run({kIp, "-n", ns_b, "addr", "add", l.addr_b + "/24", "dev", l.dev_b});
  if (!rate.empty()) set_rate(l, rate);
  set_up(l, true);
  return l;
}

void NetLab::set_rate(const Link& link, const std::string& rate) {
  for (const auto& [ns, dev] : {std::pair{link.ns_a, link.dev_a}, std::pair{link.ns_b, link.dev_b}}) {
    if (rate.empty())
      run_command({kTc, "-n", ns, "qdisc", "del", "dev", dev, "root"}, nullptr);  // none there: fine
    else
      set_tbf(ns, dev, rate);
  }
}

void NetLab::set_up(const Link& link, bool up) {
  for (const auto& [ns, dev] : {std::pair{link.ns_a, link.dev_a}, std::pair{link.ns_b, link.dev_b}})
    run({kIp, "-n", ns, "link", "set", "dev", dev, up ? "up" : "down"});
}

std::vector<std::string> NetLab::wrapper(const std::string& ns) const {
  if (ns.empty()) return {};
  return {kIp, "netns", "exec", ns};
}

NetLab::Relay NetLab::start_relay(const std::string& ns, const std::string& listen_host, const std::string& to_host,
                                  std::uint16_t to_port, std::chrono::microseconds one_way,
                                  std::uint64_t buffer_bytes, std::vector<std::string> extra) {
  RelayProcess spec;
  spec.ns = ns;
  spec.listen_host = listen_host;
  spec.to_host = to_host;
  spec.to_port = to_port;
  spec.one_way = one_way;
  spec.buffer_bytes = buffer_bytes;
  spec.extra = std::move(extra);
  return launch(std::move(spec), 0);
}

NetLab::Relay NetLab::launch(RelayProcess spec, std::uint16_t listen_port) {
  const int id = next_relay_++;
  const std::string ready = dir_.path() + "/relay-" + std::to_string(id) + ".port";
  char delay[64];
  std::snprintf(delay, sizeof delay, "%.3f", static_cast<double>(spec.one_way.count()) / 1000.0);
  std::vector<std::string> argv = wrapper(spec.ns);
  argv.insert(argv.end(), {relay_path(), "--listen", host_port(spec.listen_host, listen_port), "--to",
                           host_port(spec.to_host, spec.to_port), "--delay", delay, "--ready-file", ready});
  if (spec.buffer_bytes) argv.insert(argv.end(), {"--buffer", std::to_string(spec.buffer_bytes)});
  argv.insert(argv.end(), spec.extra.begin(), spec.extra.end());
  spec.process = std::make_unique<ChildProcess>(argv);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!fs::exists(ready)) {
    if (spec.process->wait(std::chrono::milliseconds(0)) != -1)
      throw std::runtime_error(join(argv) + " exited during start-up: " + spec.process->output());
    if (std::chrono::steady_clock::now() > deadline)
      throw std::runtime_error(join(argv) + " not ready in 10 s: " + spec.process->output());
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::ifstream in(ready);
  unsigned port = 0;
  if (!(in >> port) || port == 0 || port > 65535) throw std::runtime_error("bad ready file " + ready);
  spec.port = static_cast<std::uint16_t>(port);
  Relay relay;
  relay.host = spec.listen_host;
  relay.port = spec.port;
  relay.id = id;
  relay.pid = spec.process->pid();
  relays_.emplace(id, std::move(spec));
  return relay;
}

NetLab::RelayProcess& NetLab::relay_entry(const Relay& relay) {
  const auto it = relays_.find(relay.id);
  if (it == relays_.end()) throw std::invalid_argument("no relay " + std::to_string(relay.id) + " in this lab");
  return it->second;
}

void NetLab::kill_relay(const Relay& relay) {
  auto& entry = relay_entry(relay);
  if (!entry.process) return;
  entry.process->signal(SIGKILL);
  entry.process->wait(std::chrono::seconds(10));
  entry.process.reset();
}

NetLab::Relay NetLab::restart_relay(const Relay& relay) {
  kill_relay(relay);  // if it still runs
  RelayProcess spec = std::move(relay_entry(relay));
  relays_.erase(relay.id);
  const std::uint16_t port = spec.port;
  return launch(std::move(spec), port);
}

}  // namespace ferry::testing
