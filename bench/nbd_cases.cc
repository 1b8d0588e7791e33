// The nbd.* rows. Every side runs the same nbdcopy command line and times
// only that process (its start included); what differs is the server at the
// far end: ferryd's plain NBD listener, a `ferry nbd-serve` bridge, nbdkit
// or qemu-nbd. The nbd.delay64.* rows instead run the same in-process
// libnbd writer (nbd_writer.h) on both sides, since nbdcopy cannot keep
// 1,024 requests in flight. Data files are made and synced before the clock starts, so
// the page cache is warm and write-back of the set-up does not run during
// the copy. Each side owns its children through RAII (Proc, ChildProcess):
// they are stopped and reaped also when a measurement throws.
#include "bench/nbd_cases.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bench/harness.h"
#include "bench/nbd_writer.h"
#include "bench/tools.h"
#include "tests/material/tls_material.h"

namespace ferry::bench {
namespace {

namespace fs = std::filesystem;

// nbdcopy's settings for the bulk rows (DESIGN.md, "Benchmarks"): it clamps
// connections to its threads, so both are given, and the queue is raised
// to requests x request size so the depth is not silently capped.
const std::vector<std::string> bulk_flags = {"-C",           "4",      "-T",           "4",
                                             "--requests",   "64",     "--request-size", "262144",
                                             "--queue-size", "67108864"};
constexpr const char* bulk_flags_text = "nbdcopy -C 4 -T 4 --requests 64 --request-size 256K --queue-size 64M";

constexpr std::uint64_t delay_request_bytes = 128 * 1024;

// Threads of `pid` from /proc/PID/status; 0 once it is gone.
int threads_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("Threads:", 0) == 0) return std::atoi(line.c_str() + 8);
  return 0;
}

// Samples a server's thread count every 10 ms from a thread of its own,
// from construction to stop().
class ThreadPeak {
 public:
  explicit ThreadPeak(pid_t pid) : pid_(pid), idle_(threads_of(pid)), peak_(idle_) {
    sampler_ = std::thread([this] {
      while (!done_.load()) {
        const int n = threads_of(pid_);
        if (n > peak_.load()) peak_.store(n);
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    });
  }
  ThreadPeak(const ThreadPeak&) = delete;
  ThreadPeak& operator=(const ThreadPeak&) = delete;
  ~ThreadPeak() { stop(); }
  void stop() {
    done_.store(true);
    if (sampler_.joinable()) sampler_.join();
  }
  int idle() const { return idle_; }
  int peak() const { return peak_.load(); }
  std::string describe(const std::string& server) const {
    return server + " threads: " + std::to_string(idle_) + " before the run, peak " + std::to_string(peak()) +
           " during it" + (peak() == idle_ ? " (constant)" : "");
  }

 private:
  pid_t pid_;
  int idle_;
  std::atomic<int> peak_;
  std::atomic<bool> done_{false};
  std::thread sampler_;
};

std::string nbd_uri(const std::string& socket, const std::string& export_name) {
  return "nbd+unix:///" + export_name + "?socket=" + socket;
}

std::vector<std::string> bulk_copy(const std::string& nbdcopy, const std::string& from, const std::string& to) {
  std::vector<std::string> argv = {nbdcopy};
  argv.insert(argv.end(), bulk_flags.begin(), bulk_flags.end());
  argv.push_back(from);
  argv.push_back(to);
  return argv;
}

// Seconds one nbdcopy takes, process start included.
double timed_copy(const std::vector<std::string>& argv) {
  const auto begin = Clock::now();
  Proc copy(argv);
  copy.check("nbdcopy");
  return seconds_since(begin);
}

// The data of the bulk rows: a volume file in a pool directory (dense for
// reads, sparse and empty for writes) and, for writes, a dense source file.
struct BulkFiles {
  BulkFiles(ScratchDir& dir, std::uint64_t bytes, bool write, bool read_too = false) : size(bytes) {
    pool = (dir.path() / "pool").string();
    fs::create_directories(pool);
    volume = pool + "/vol";
    source = (dir.path() / "data").string();
    if (write) make_bench_file(source, size, false);
    if (write && !read_too)
      make_sparse_file(volume, size);
    else
      make_bench_file(volume, size, false);
    ::sync();
  }
  std::uint64_t size;
  std::string pool, volume, source;
};

// The ferry CLI's bridge: `ferry -c URI [TLS] nbd-serve default/vol --socket S`,
// ready once it prints "serving".
struct Bridge {
  Bridge(const CaseOptions& options, ScratchDir& dir, const Ferryd& ferryd, const std::vector<std::string>& tls) {
    socket = (dir.path() / "bridge.sock").string();
    log = (dir.path() / "bridge.log").string();
    std::vector<std::string> argv = {cli_path(options), "-c", ferryd.uri()};
    argv.insert(argv.end(), tls.begin(), tls.end());
    argv.insert(argv.end(), {"nbd-serve", "default/vol", "--socket", socket});
    proc = Proc(argv, log);
    wait_for_log(proc, log, "serving ");
  }
  std::string uri() const { return "nbd+unix:///?socket=" + socket; }
  // Stops the bridge; its closing summary line ("nbd-serve: N NBD
  // connection(s), ..."), or empty.
  std::string finish() {
    proc.stop();
    std::stringstream in(read_text(log));
    for (std::string line; std::getline(in, line);)
      if (line.rfind("nbd-serve:", 0) == 0) return line;
    return {};
  }
  std::string socket, log;
  Proc proc;
};

}  // namespace

Measurement ferry_nbd_plain(const CaseOptions& options, bool write) {
  const std::string nbdcopy = need_tool("nbdcopy", "libnbd-bin");
  ScratchDir dir;
  BulkFiles files(dir, nbd_total_bytes(options.quick), write);
  const std::string socket = (dir.path() / "nbd.sock").string();
  Ferryd ferryd(options, dir.unix_address("ferryd.sock"), dir,
                {"--pool", "default=" + files.pool, "--nbd-listen", "unix:" + socket});
  const std::string uri = nbd_uri(socket, "default/vol");
  const double secs = timed_copy(bulk_copy(nbdcopy, write ? files.source : uri, write ? uri : "null:"));
  return {mb_per_s(files.size, secs), "MB/s",
          std::string(bulk_flags_text) + (write ? " FILE nbd+unix:///default/vol?socket=S" : " nbd+unix:///default/vol?socket=S null:") +
              "; ferryd --pool default=DIR --nbd-listen unix:S; " + mib(files.size) +
              (write ? " dense into a new sparse volume" : " dense volume") + ", page cache warm"};
}

Measurement nbdkit_file_plain(const CaseOptions& options, bool write) {
  const std::string nbdcopy = need_tool("nbdcopy", "libnbd-bin");
  const std::string nbdkit = need_tool("nbdkit", "nbdkit");
  const std::string qemu_nbd = find_tool("qemu-nbd");
  ScratchDir dir;
  const std::uint64_t size = nbd_total_bytes(options.quick);
  const std::string data = (dir.path() / "data").string();
  make_bench_file(data, size, false);
  // Writes go into new sparse files of the same size, one per server.
  const std::string out_nbdkit = (dir.path() / "out-nbdkit").string();
  const std::string out_qemu = (dir.path() / "out-qemu").string();
  if (write) {
    make_sparse_file(out_nbdkit, size);
    if (!qemu_nbd.empty()) make_sparse_file(out_qemu, size);
  }
  ::sync();

  auto measure_server = [&](std::vector<std::string> server_argv, const std::string& socket) {
    Proc server(std::move(server_argv));
    wait_for_socket(server, socket);
    const std::string uri = nbd_uri(socket, "");
    return timed_copy(bulk_copy(nbdcopy, write ? data : uri, write ? uri : "null:"));
  };

  const std::string nbdkit_socket = (dir.path() / "nbdkit.sock").string();
  const double nbdkit_secs =
      measure_server({nbdkit, "-f", "-U", nbdkit_socket, "-t", "64", "file", write ? out_nbdkit : data}, nbdkit_socket);
  std::string qemu_note;
  if (qemu_nbd.empty()) {
    qemu_note = "qemu-nbd: not installed (qemu-utils)";
  } else {
    const std::string qemu_socket = (dir.path() / "qemu.sock").string();
    const double qemu_secs =
        measure_server({qemu_nbd, "-f", "raw", "-k", qemu_socket, "-e", "4", "-t", "--cache=writeback", "--aio=threads",
                        write ? out_qemu : data},
                       qemu_socket);
    qemu_note = "qemu-nbd: " + fixed(mb_per_s(size, qemu_secs)) +
                " MB/s (qemu-nbd -f raw -k S -e 4 -t --cache=writeback --aio=threads FILE)";
  }
  return {mb_per_s(size, nbdkit_secs), "MB/s",
          std::string(bulk_flags_text) + (write ? " FILE nbd+unix:///?socket=S" : " nbd+unix:///?socket=S null:") +
              "; nbdkit -f -U S -t 64 file FILE; " + mib(size) + (write ? " dense into a new sparse file" : " dense file") +
              ", page cache warm; " + qemu_note};
}

Measurement ferry_nbd_bridge(const CaseOptions& options, bool write, bool tls, bool via_bridge) {
  const std::string nbdcopy = need_tool("nbdcopy", "libnbd-bin");
  ScratchDir dir;
  BulkFiles files(dir, nbd_total_bytes(options.quick), write);
  const std::string socket = (dir.path() / "nbd.sock").string();
  std::vector<std::string> extra = {"--pool", "default=" + files.pool, "--nbd-listen", "unix:" + socket};
  std::vector<std::string> cli_tls;
  std::string address = dir.unix_address("ferryd.sock");
  if (tls) {
    // The client shows a certificate; no SASL on top.
    const auto material = testing::make_tls_material(dir.path().string());
    address = "tls:127.0.0.1:0";
    extra.insert(extra.end(), {"--tls-ca", material.ca.cert, "--tls-cert", material.server.cert, "--tls-key",
                               material.server.key});
    cli_tls = {"--tls-ca", material.ca.cert, "--tls-cert", material.client.cert, "--tls-key", material.client.key};
  }
  Ferryd ferryd(options, address, dir, extra);
  std::optional<Bridge> bridge;
  std::string uri = nbd_uri(socket, "default/vol");
  if (via_bridge) {
    bridge.emplace(options, dir, ferryd, cli_tls);
    uri = bridge->uri();
  }
  const double secs = timed_copy(bulk_copy(nbdcopy, write ? files.source : uri, write ? uri : "null:"));

  std::string note = std::string(bulk_flags_text) + (write ? " FILE URI" : " URI null:") + ", URI = ";
  if (via_bridge) {
    const std::string summary = bridge->finish();
    note += "nbd+unix:///?socket=B of `ferry -c " + std::string(tls ? "ferry+tls://127.0.0.1:P --tls-ca/--tls-cert/--tls-key"
                                                                     : "ferry+unix:///F") +
            " nbd-serve default/vol --socket B`";
    if (!summary.empty()) note += " (" + summary + ")";
  } else {
    note += "nbd+unix:///default/vol?socket=S (ferryd --nbd-listen unix:S)";
  }
  note += "; ferryd --pool default=DIR --nbd-listen unix:S --listen " +
          std::string(tls ? "tls:127.0.0.1:0 --tls-ca/--tls-cert/--tls-key (client certificate)" : "unix:F") + "; " +
          mib(files.size) + (write ? " dense into a new sparse volume" : " dense volume") + ", page cache warm";
  return {mb_per_s(files.size, secs), "MB/s", note};
}

namespace {

// nbd.delay64.*: bytes a run writes: ~1-2 s at the ideal rate of QD x
// 128 KiB per 64 ms (2, 128 and 2048 MB/s), half that with --quick, longer
// when the server falls short of it.
std::uint64_t delay_bytes(int depth, bool quick) {
  const std::uint64_t one_mib = std::uint64_t{1} << 20;
  if (depth <= 1) return (quick ? 2 : 4) * one_mib;
  if (depth <= 64) return (quick ? 128 : 256) * one_mib;
  return (quick ? 1024 : 2048) * one_mib;
}

// Runs the deep-queue writer against `socket` while `threads` samples the
// server; the row's value and the client's half of the note.
Measurement delay_write(const std::string& socket, const std::string& export_name, int depth, std::uint64_t bytes,
                        ThreadPeak& threads) {
  const NbdWriteResult r = nbd_deep_write(socket, export_name, depth, delay_request_bytes, bytes);
  threads.stop();
  const double rate = mb_per_s(r.bytes, r.seconds);
  // Little's law with a 64 ms service time: the mean number of requests
  // the server held in its delay at once.
  const double server_depth = static_cast<double>(r.bytes) / r.seconds * 0.064 / static_cast<double>(delay_request_bytes);
  return {rate, "MB/s",
          "client: libnbd aio writer (bench/nbd_writer.cc), " + std::to_string(depth) +
              " x 128 KiB nbd_aio_pwrite in flight on one connection (client peak " + std::to_string(r.max_in_flight) +
              "), one non-zero buffer, sequential offsets, " + mib(r.bytes) + " in " + std::to_string(r.requests) +
              " requests; value = bytes / (first request -> last completion) = " + fixed(r.seconds, 2) +
              " s, connection set-up excluded; request latency min/p50/mean/max " + fixed(r.latency_min_ms, 1) + "/" +
              fixed(r.latency_p50_ms, 1) + "/" + fixed(r.latency_mean_ms, 1) + "/" + fixed(r.latency_max_ms, 1) +
              " ms; requests held by the server at once (rate x 64 ms / 128 KiB) " + fixed(server_depth) + " of " +
              std::to_string(depth)};
}

}  // namespace

Measurement ferry_nbd_delay(const CaseOptions& options, int depth) {
  ScratchDir dir;
  const std::uint64_t bytes = delay_bytes(depth, options.quick);
  const std::string socket = (dir.path() / "nbd.sock").string();
  Ferryd ferryd(options, dir.unix_address("ferryd.sock"), dir,
                {"--nbd-listen", "unix:" + socket, "--nbd-export", "slow=null:64G,delay=64ms", "--nbd-buffer-bytes",
                 "268435456"});
  ThreadPeak threads(ferryd.child.pid());
  Measurement m = delay_write(socket, "slow", depth, bytes, threads);
  m.note += "; server: ferryd --nbd-listen unix:S --nbd-export slow=null:64G,delay=64ms --nbd-buffer-bytes 268435456, export slow; " +
            threads.describe("ferryd");
  m.threads_before = threads.idle();
  m.threads = threads.peak();
  return m;
}

Measurement nbdkit_nbd_delay(const CaseOptions& options, int depth) {
  const std::string nbdkit = need_tool("nbdkit", "nbdkit");
  ScratchDir dir;
  const std::uint64_t bytes = delay_bytes(depth, options.quick);
  const std::string socket = (dir.path() / "nbdkit.sock").string();
  // nbdkit serves at most -t requests at once per connection: one thread
  // per request in flight is its best setting at this depth.
  const std::string threads_flag = std::to_string(std::max(16, depth));
  Proc server({nbdkit, "-f", "-U", socket, "-t", threads_flag, "--filter=delay", "null", "64G", "delay-write=64ms"});
  wait_for_socket(server, socket);
  ThreadPeak threads(server.pid());
  Measurement m = delay_write(socket, "", depth, bytes, threads);
  m.note += "; server: nbdkit -f -U S -t " + threads_flag + " --filter=delay null 64G delay-write=64ms; " +
            threads.describe("nbdkit");
  m.threads_before = threads.idle();
  m.threads = threads.peak();
  return m;
}

Measurement ferry_nbd_mixed(const CaseOptions& options, bool serialized) {
  const std::string nbdcopy = need_tool("nbdcopy", "libnbd-bin");
  ScratchDir dir;
  // A dense volume to read and a dense file to write into the same volume.
  BulkFiles files(dir, nbd_total_bytes(options.quick), true, true);
  Ferryd ferryd(options, dir.unix_address("ferryd.sock"), dir, {"--pool", "default=" + files.pool});
  Bridge bridge(options, dir, ferryd, {});
  const auto read = bulk_copy(nbdcopy, bridge.uri(), "null:");
  const auto write = bulk_copy(nbdcopy, files.source, bridge.uri());

  const auto begin = Clock::now();
  double read_secs = 0, write_secs = 0;
  if (serialized) {
    timed_copy(read);
    read_secs = seconds_since(begin);
    timed_copy(write);
    write_secs = seconds_since(begin) - read_secs;
  } else {
    Proc reader(read), writer(write);
    bool read_done = false, write_done = false;
    while (!read_done || !write_done) {
      if (!read_done && reader.exited()) {
        read_done = true;
        read_secs = seconds_since(begin);
        reader.check("nbdcopy (read)");
      }
      if (!write_done && writer.exited()) {
        write_done = true;
        write_secs = seconds_since(begin);
        writer.check("nbdcopy (write)");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  const double secs = seconds_since(begin);
  const std::string summary = bridge.finish();
  return {mb_per_s(2 * files.size, secs), "MB/s",
          std::string(serialized ? "one after the other" : "at once") + " through one `ferry -c ferry+unix:///F nbd-serve default/vol --socket B`: " +
              bulk_flags_text + " nbd+unix:///?socket=B null: (" + fixed(read_secs, 2) + " s) and " + bulk_flags_text +
              " FILE nbd+unix:///?socket=B (" + fixed(write_secs, 2) + " s" + (serialized ? "" : ", both from the start") +
              "); " + mib(files.size) + " each way, dense, page cache warm; value = bytes both ways / wall time" +
              (summary.empty() ? "" : "; " + summary)};
}

}  // namespace ferry::bench
