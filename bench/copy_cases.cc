// The copy.rtt* rows (see copy_cases.h and bench/README.md). Set-up is not
// timed: the source volume is generated and synced, servers and the relay
// are started and answering, then the clock runs around exactly one copy
// command. Every side owns its children through RAII (Proc, Ferryd), so
// they are stopped and reaped also when a measurement throws.
#include "bench/copy_cases.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/harness.h"
#include "bench/tools.h"

namespace ferry::bench {
namespace {

namespace fs = std::filesystem;

constexpr std::uint64_t KiB = 1024;
constexpr std::uint64_t MiB = 1024 * KiB;
constexpr std::uint64_t group_bytes = 16 * MiB;

// nbdcopy's settings, the best of those tried on this 2-core machine
// (bench/README.md lists them with their rates): one connection and one
// thread (-C 2 -T 2 and -C 4 -T 4 were slower: nbdcopy, two qemu-nbd and
// the relay share the cores), 64 requests of 256 KiB in flight with a queue
// of requests x request size (larger requests were slower), and
// --destination-is-zero, true of the new sparse destination, so nbdcopy
// skips the holes instead of zeroing them.
const std::vector<std::string> nbdcopy_flags = {"-C",           "1",        "-T",           "1",
                                                "--requests",   "64",       "--request-size", "262144",
                                                "--queue-size", "16777216", "--destination-is-zero"};
constexpr const char* nbdcopy_flags_text =
    "nbdcopy -C 1 -T 1 --requests 64 --request-size 256K --queue-size 16M --destination-is-zero";

// qemu-nbd's settings on both ends: multi-conn for up to 16 clients,
// persistent, page cache (writeback) with thread-pool I/O; the destination
// punches holes for zero writes (--discard=unmap) so it stays sparse.
constexpr const char* qemu_nbd_text = "qemu-nbd -f raw -t --shared=16 --cache=writeback --aio=threads";

std::string format_ms(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", ms);
  return buf;
}

// Where the relay listens: B's veth address from --addr (its port is not
// used; the relay picks one), or loopback without the namespaces.
std::string relay_host(const CaseOptions& options) {
  if (options.addr.empty()) return "127.0.0.1";
  const Address address = Address::parse(options.addr);
  if (address.kind != Address::Kind::tcp) throw std::runtime_error("copy rows need a tcp: --addr");
  return address.host;
}

std::string host_port(const std::string& host, std::uint16_t port) {
  return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

// The source volume: the extents of copy_volume_extents filled from one
// splitmix64 stream with a fixed seed, so every process writes the same
// bytes; synced before it is used.
void make_copy_volume(const std::string& path, std::uint64_t size) {
  Fd file(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!file) throw std::runtime_error("create " + path + ": " + std::strerror(errno));
  if (::ftruncate(file.get(), static_cast<off_t>(size)) != 0)
    throw std::runtime_error("size " + path + ": " + std::strerror(errno));
  std::uint64_t state = 0x6665727279636f70;  // fixed seed
  std::vector<std::uint64_t> block(MiB / sizeof(std::uint64_t));
  for (const Extent& e : copy_volume_extents(size)) {
    for (std::uint64_t done = 0; done < e.length;) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(MiB, e.length - done));
      for (std::size_t i = 0; i < n / sizeof(std::uint64_t); ++i) {
        std::uint64_t z = (state += 0x9e3779b97f4a7c15);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9;
        z = (z ^ (z >> 27)) * 0x94d049bb133111eb;
        block[i] = z ^ (z >> 31);
      }
      if (::pwrite(file.get(), block.data(), n, static_cast<off_t>(e.offset + done)) != static_cast<ssize_t>(n))
        throw std::runtime_error("write " + path + ": " + std::strerror(errno));
      done += n;
    }
  }
  if (::fsync(file.get()) != 0) throw std::runtime_error("fsync " + path + ": " + std::strerror(errno));
}

// Throws unless `copy` holds exactly the bytes of `source`.
void check_same(const std::string& source, const std::string& copy) {
  if (!fs::exists(copy)) throw std::runtime_error("no destination after the copy: " + copy);
  const std::uint64_t size = fs::file_size(source);
  if (fs::file_size(copy) != size)
    throw std::runtime_error("destination is " + std::to_string(fs::file_size(copy)) + " bytes, the source " +
                             std::to_string(size));
  Fd a(::open(source.c_str(), O_RDONLY | O_CLOEXEC));
  Fd b(::open(copy.c_str(), O_RDONLY | O_CLOEXEC));
  if (!a || !b) throw std::runtime_error("cannot open " + (a ? copy : source) + " to compare");
  std::vector<char> x(4 * MiB), y(4 * MiB);
  for (std::uint64_t at = 0; at < size;) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(x.size(), size - at));
    if (::pread(a.get(), x.data(), n, static_cast<off_t>(at)) != static_cast<ssize_t>(n) ||
        ::pread(b.get(), y.data(), n, static_cast<off_t>(at)) != static_cast<ssize_t>(n))
      throw std::runtime_error("short read comparing " + copy + " at " + std::to_string(at));
    if (std::memcmp(x.data(), y.data(), n) != 0) {
      std::size_t i = 0;
      while (x[i] == y[i]) ++i;
      throw std::runtime_error("destination differs from the source at byte " + std::to_string(at + i) +
                               ": the copy is wrong");
    }
    at += n;
  }
}

std::string allocation_note(const std::string& copy) {
  return "destination allocated " + mib(allocated_bytes(copy)) + ", compared byte for byte with the source";
}

// ferry-delay-relay in the destination's namespace: HOST:0 (a port of its
// choosing) -> 127.0.0.1:to_port there, `one_way_ms` each way.
struct DelayRelay {
  DelayRelay(const CaseOptions& options, ScratchDir& dir, std::uint16_t to_port, double one_way_ms) {
    if (options.relay.empty() || !fs::exists(options.relay))
      throw std::runtime_error("ferry-delay-relay not found at '" + options.relay +
                               "' (pass --relay; it is built with the tests, target ferry-delay-relay)");
    host = relay_host(options);
    const std::string ready = (dir.path() / "relay.port").string();
    log = (dir.path() / "relay.log").string();
    proc = Proc(in_netns(options.server_netns,
                         {options.relay, "--listen", host_port(host, 0), "--to", host_port("127.0.0.1", to_port),
                          "--delay", format_ms(one_way_ms), "--ready-file", ready}),
                log);
    const std::string text = wait_for_file(proc, ready);
    const unsigned long value = std::strtoul(text.c_str(), nullptr, 10);
    if (value == 0 || value > 65535) throw std::runtime_error("relay wrote a bad port: '" + text + "'");
    port = static_cast<std::uint16_t>(value);
  }
  std::string address() const { return host_port(host, port); }
  // Throws with the relay's last words if it died during the copy.
  void check_alive() {
    if (proc.exited())
      throw std::runtime_error("ferry-delay-relay exited (" + describe_status(proc.status()) +
                               "): " + last_line(read_text(log)));
  }
  std::string host, log;
  std::uint16_t port = 0;
  Proc proc;
};

std::string link_note(const CaseOptions& options, double rtt_ms) {
  return "rtt " + format_ms(rtt_ms) + " ms (ferry-delay-relay --delay " + format_ms(rtt_ms / 2) + " in " +
         (options.server_netns.empty() ? "the same namespace, loopback" : options.server_netns) + ")";
}

// Runs `argv` to completion with its output in `log`; seconds it took.
// Throws with the command's last line when it fails.
double timed_run(const std::vector<std::string>& argv, const std::string& log, const std::string& what) {
  const auto begin = Clock::now();
  Proc proc(argv, log);
  const int status = proc.wait();
  const double secs = seconds_since(begin);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    const std::string last = last_line(read_text(log));
    throw std::runtime_error(what + " failed (" + describe_status(status) + ")" + (last.empty() ? "" : ": " + last));
  }
  return secs;
}

// The CLI has the vol-copy verb: its help names it.
void require_vol_copy(const std::string& cli, ScratchDir& dir) {
  const std::string log = (dir.path() / "help.txt").string();
  Proc help({cli, "vol-copy", "--help"}, log);
  const int status = help.wait();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || read_text(log).find("vol-copy") == std::string::npos)
    throw std::runtime_error("vol-copy not available");
}

// One qemu-nbd baseline: qemu-nbd on the source file in A and on a new
// sparse file in B, the relay in front of the destination, then `copy`
// (built from the two NBD URIs) timed.
template <class MakeCommand>
Measurement qemu_nbd_copy(const CaseOptions& options, double rtt_ms, const std::string& tool,
                          const std::string& command_text, MakeCommand make_command) {
  const std::string qemu_nbd = need_tool("qemu-nbd", "qemu-utils");
  ScratchDir dir;
  const std::uint64_t size = copy_volume_bytes(options.quick);
  const std::string source = (dir.path() / "source.img").string();
  const std::string dest = (dir.path() / "dest.img").string();
  make_copy_volume(source, size);
  make_sparse_file(dest, size);
  ::sync();

  auto serve = [&](const std::string& netns, const std::string& file, bool read_only, const std::string& log) {
    const std::uint16_t port = free_tcp_port(netns);
    std::vector<std::string> argv = {qemu_nbd,    "-f",   "raw", "-t", "--shared=16", "-b", "127.0.0.1", "-p",
                                     std::to_string(port), "--cache=writeback", "--aio=threads"};
    if (read_only)
      argv.push_back("-r");
    else
      argv.push_back("--discard=unmap");
    argv.push_back(file);
    Proc proc(in_netns(netns, argv), log);
    wait_for_nbd(proc, Address::parse("tcp:127.0.0.1:" + std::to_string(port)), netns);
    return std::make_pair(std::move(proc), port);
  };
  auto [source_server, source_port] = serve("", source, true, (dir.path() / "qemu-nbd-source.log").string());
  auto [dest_server, dest_port] =
      serve(options.server_netns, dest, false, (dir.path() / "qemu-nbd-dest.log").string());
  DelayRelay relay(options, dir, dest_port, rtt_ms / 2);

  const std::string from = "nbd://127.0.0.1:" + std::to_string(source_port);
  const std::string to = "nbd://" + relay.address();
  const double secs = timed_run(make_command(from, to), (dir.path() / (tool + ".log")).string(), tool);
  relay.check_alive();
  // Both servers close their files before the comparison.
  source_server.stop();
  dest_server.stop();
  check_same(source, dest);
  return {mb_per_s(size, secs), "MB/s",
          command_text + " nbd://127.0.0.1:SRC nbd://B_ADDR:RELAY; " + qemu_nbd_text +
              " -b 127.0.0.1 -p PORT (source -r in A, destination --discard=unmap in B); " + link_note(options, rtt_ms) +
              "; " + mib(size) + " volume, 25% data; " + allocation_note(dest)};
}

}  // namespace

std::vector<Extent> copy_volume_extents(std::uint64_t size) {
  static const std::vector<std::vector<std::uint64_t>> mixes = {
      {4 * MiB},
      {MiB, MiB, MiB, MiB},
      {2 * MiB, MiB, 512 * KiB, 256 * KiB, 256 * KiB},
      {256 * KiB, 256 * KiB, 256 * KiB, 256 * KiB, 512 * KiB, 512 * KiB, 2 * MiB},
  };
  std::vector<Extent> out;
  for (std::uint64_t group = 0; (group + 1) * group_bytes <= size; ++group) {
    std::uint64_t at = group * group_bytes;
    for (std::uint64_t length : mixes[group % mixes.size()]) {
      out.push_back({at, length});
      at += 4 * length;  // the extent and a hole three times its size
    }
  }
  return out;
}

Measurement ferry_vol_copy(const CaseOptions& options, double rtt_ms) {
  const std::string cli = cli_path(options);
  ScratchDir dir;
  require_vol_copy(cli, dir);
  const std::uint64_t size = copy_volume_bytes(options.quick);
  const std::string source_pool = (dir.path() / "source-pool").string();
  const std::string dest_pool = (dir.path() / "dest-pool").string();
  fs::create_directories(source_pool);
  fs::create_directories(dest_pool);
  const std::string source = source_pool + "/v";
  make_copy_volume(source, size);
  ::sync();

  // The source daemon runs here, in A; the destination in B with a TCP
  // listener on B's loopback, which only the relay reaches.
  CaseOptions in_a = options;
  in_a.server_netns.clear();
  const std::string source_socket = (dir.path() / "src.sock").string();
  // Both daemons' unix sockets share `dir`, where each would put its admin
  // socket by default (ferryd-admin.sock beside the first unix listener):
  // the measurement needs neither.
  Ferryd source_daemon(in_a, "unix:" + source_socket, dir, {"--pool", "default=" + source_pool, "--no-admin"},
                       "src.ready");
  Ferryd dest_daemon(options, dir.unix_address("dst.sock"), dir,
                     {"--pool", "default=" + dest_pool, "--listen", "tcp:127.0.0.1:0", "--no-admin"}, "dst.ready");
  std::uint16_t dest_port = 0;
  {
    std::ifstream in(dest_daemon.ready_file);
    for (std::string line; std::getline(in, line);)
      if (line.rfind("tcp:", 0) == 0) dest_port = Address::parse(line).port;
  }
  if (dest_port == 0) throw std::runtime_error("destination ferryd did not report a tcp listener");
  DelayRelay relay(options, dir, dest_port, rtt_ms / 2);

  const std::string from = "ferry+unix://" + source_socket + "/default/v";
  const std::string to = "ferry+tcp://" + relay.address() + "/default/v";
  const double secs =
      timed_run({cli, "-q", "vol-copy", from, to}, (dir.path() / "vol-copy.log").string(), "ferry vol-copy");
  relay.check_alive();
  const std::string dest = dest_pool + "/v";
  check_same(source, dest);
  return {mb_per_s(size, secs), "MB/s",
          "ferry -q vol-copy ferry+unix://SRC/default/v ferry+tcp://B_ADDR:RELAY/default/v; source ferryd --pool default=DIR --listen unix:SRC in A, destination ferryd --pool default=DIR "
              "--listen unix:S --listen tcp:127.0.0.1:0 in B; " +
              link_note(options, rtt_ms) + "; " + mib(size) + " volume, 25% data; " + allocation_note(dest)};
}

Measurement nbdcopy_volume_copy(const CaseOptions& options, double rtt_ms) {
  const std::string nbdcopy = need_tool("nbdcopy", "libnbd-bin");
  return qemu_nbd_copy(options, rtt_ms, "nbdcopy", nbdcopy_flags_text,
                       [&](const std::string& from, const std::string& to) {
                         std::vector<std::string> argv = {nbdcopy};
                         argv.insert(argv.end(), nbdcopy_flags.begin(), nbdcopy_flags.end());
                         argv.push_back(from);
                         argv.push_back(to);
                         return argv;
                       });
}

Measurement qemu_img_volume_copy(const CaseOptions& options, double rtt_ms) {
  const std::string qemu_img = need_tool("qemu-img", "qemu-utils");
  return qemu_nbd_copy(options, rtt_ms, "qemu-img", "qemu-img convert -n -f raw -O raw",
                       [&](const std::string& from, const std::string& to) {
                         return std::vector<std::string>{qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", from, to};
                       });
}

}  // namespace ferry::bench
