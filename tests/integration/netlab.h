// Network namespaces, veth links with a bandwidth limit (tc tbf) and delay
// relays (ferry-delay-relay: the kernel here has no netem) for integration
// tests that need two hosts, a slow or long link, or a network failure.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tests/integration/ferryd_process.h"

namespace ferry::testing {

// Network namespaces, veth links and delay relays for one test, all removed
// on destruction. Namespace names start with "ferrytest-<pid>-<counter>-" so
// parallel test processes never collide.
class NetLab {
 public:
  // True when this process may make namespaces (root, `ip netns` works).
  // Tests GTEST_SKIP() otherwise.
  static bool available();
  // Runs no command: a lab used only for relays in this process's own
  // namespace (ns "") needs no privileges.
  NetLab();
  // Kills the relays it started, deletes its namespaces (their veth ends go
  // with them).
  ~NetLab();
  NetLab(const NetLab&) = delete;
  NetLab& operator=(const NetLab&) = delete;

  // A new namespace with loopback up; returns its full name. The first call
  // in a process also deletes "ferrytest-<pid>-*" namespaces left behind by
  // dead test processes.
  std::string add_namespace(const std::string& short_name);

  // addr_* are IPv4 addresses without prefix.
  struct Link {
    std::string ns_a, ns_b, dev_a, dev_b, addr_a, addr_b;
  };
  // Joins two of this lab's namespaces with a veth pair on a fresh /24
  // (10.<k>.<m>.1 on a, .2 on b), both ends up. `rate` (tc syntax, e.g.
  // "200mbit"): a tbf qdisc of that rate on both ends, so each direction is
  // limited on its own; empty: none.
  Link link(const std::string& ns_a, const std::string& ns_b, const std::string& rate = {});
  // Changes or adds the tbf on both ends; an empty rate removes it.
  void set_rate(const Link& link, const std::string& rate);
  // Sets both ends up or down (down: a partition; the routes go too, so a
  // connect fails at once with "network unreachable").
  void set_up(const Link& link, bool up);
  // {"/usr/sbin/ip", "netns", "exec", ns}: the prefix that runs a program
  // inside `ns` (FerrydProcess takes such a wrapper); {} for ns "".
  std::vector<std::string> wrapper(const std::string& ns) const;

  struct Relay {
    std::string host;
    std::uint16_t port = 0;
    int id = 0;
    pid_t pid = -1;  // the relay process (ip netns exec execs it)
  };
  // Starts ferry-delay-relay inside `ns` ("" for this process's namespace)
  // listening on listen_host:0, forwarding to to_host:to_port with `one_way`
  // delay in each direction and at most `buffer_bytes` queued per direction
  // per connection (0: the relay's default); waits up to 10 s for its ready
  // file (throws with the relay's output if it does not come). `extra`
  // goes on the relay's command line (--fault-up SPEC, --fault-down SPEC).
  Relay start_relay(const std::string& ns, const std::string& listen_host, const std::string& to_host,
                    std::uint16_t to_port, std::chrono::microseconds one_way = {}, std::uint64_t buffer_bytes = 0,
                    std::vector<std::string> extra = {});
  // Kills one relay (SIGKILL: every connection through it drops at once), a
  // network failure for tests.
  void kill_relay(const Relay& relay);
  // Starts another relay on the same host:port, delay and buffer as a killed
  // one (the network comes back); returns its handle (a new id).
  Relay restart_relay(const Relay& relay);

 private:
  struct RelayProcess {
    std::string ns, listen_host, to_host;
    std::uint16_t to_port = 0;
    std::chrono::microseconds one_way{};
    std::uint64_t buffer_bytes = 0;
    std::vector<std::string> extra;
    std::uint16_t port = 0;
    std::unique_ptr<ChildProcess> process;
  };
  Relay launch(RelayProcess spec, std::uint16_t listen_port);
  RelayProcess& relay_entry(const Relay& relay);

  std::string prefix_;  // "ferrytest-<pid>-<counter>-"
  std::vector<std::string> namespaces_;
  std::map<int, RelayProcess> relays_;
  int next_relay_ = 1;
  int links_ = 0;
  TempDir dir_;  // relays' ready files
};

// The built ferry-delay-relay (set by CMake).
std::string relay_path();

// `a` followed by `b`: a wrapper() prefix and the command it runs.
inline std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace ferry::testing

// In a test body: skips the test where this process cannot make namespaces.
#define REQUIRE_NETLAB()                                                                     \
  do {                                                                                       \
    if (!ferry::testing::NetLab::available())                                                \
      GTEST_SKIP() << "cannot make network namespaces (needs root)";                         \
  } while (0)

namespace ferry::testing {

}  // namespace ferry::testing
