// ferry: command-line client (docs/cli.md).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <functional>
#include <mutex>
#include <spdlog/spdlog.h>
#include <thread>

#include "client/cli/admin.h"
#include "client/cli/complete.h"
#include "client/cli/jobs.h"
#include "client/cli/output.h"
#include "client/nbd_bridge.h"
#include "client/session.h"
#include "daemon/default_paths.h"
#include "ferry/v1/control.ferry.h"
#include "ferry/v1/migration.ferry.h"
#include "ferry/v1/test.ferry.h"

namespace {

using namespace ferry::cli;
using ferry::Session;
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

struct Global {
  bool json = false;
  bool quiet = false;
  std::string progress = "auto";  // auto, bar, json, none
  int progress_fd = -1;           // --progress-fd: JSON lines to this descriptor
};

// Ctrl-C and SIGTERM: abort the running transfer (the daemon learns at
// once and keeps the volume consistent), stop following events, exit 130.
struct Interrupts {
  std::mutex mutex;
  std::condition_variable cv;
  bool fired = false;
  Session* session = nullptr;
  std::function<void()> on_interrupt;  // what else to stop (nbd-serve's bridge)
  std::thread thread;
  sigset_t set{};

  void start() {
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    thread = std::thread([this] {
      int sig = 0;
      while (sigwait(&set, &sig) != 0) {
      }
      {
        std::unique_lock lock(mutex);
        fired = true;
        if (session) session->abort_transfers(std::string("interrupted by ") + (sig == SIGINT ? "SIGINT" : "SIGTERM"));
        if (on_interrupt) on_interrupt();
        cv.notify_all();
      }
      // The main thread normally ends within moments (its next write or
      // read of the stream fails). If it is stuck on local input (a pipe
      // that never ends) or a second Ctrl-C comes, leave anyway: the abort
      // has reached the daemon by then.
      const timespec grace{3, 0};
      sigtimedwait(&set, nullptr, &grace);
      std::_Exit(Exit::interrupted);
    });
  }
  // The thread stays in sigwait until the process exits; it only needs to
  // stop reaching for the session.
  void stop() {
    std::lock_guard lock(mutex);
    session = nullptr;
    on_interrupt = nullptr;
    if (thread.joinable()) thread.detach();
  }
  bool was_fired() {
    std::lock_guard lock(mutex);
    return fired;
  }
};

Interrupts g_interrupts;

void print_line(const std::string& s) { std::printf("%s\n", s.c_str()); }

int run_ping(Session& session, unsigned count, const Global& g) {
  auto& client = session.rpc();
  ferry::v1::Ping ping;
  std::vector<double> rtts;
  for (unsigned i = 0; i < count; ++i) {
    ping.set_token(i);
    auto t = Clock::now();
    client.call_future<ferry::v1::Control::KeepalivePing>(ping, ferry::rpc::with_timeout(std::chrono::seconds(10)))
        .get();
    rtts.push_back(ms_since(t));
  }
  std::sort(rtts.begin(), rtts.end());
  if (g.json) {
    Json j;
    j.field("server", client.server().name)
        .field("address", client.peer().address)
        .field("count", static_cast<std::uint64_t>(count))
        .field("min_ms", rtts.front())
        .field("median_ms", rtts[rtts.size() / 2])
        .field("max_ms", rtts.back());
    print_line(j.str());
  } else {
    std::printf("%u pings to %s (%s): min %.3f ms, median %.3f ms, max %.3f ms\n", count, client.server().name.c_str(),
                client.peer().address.c_str(), rtts.front(), rtts[rtts.size() / 2], rtts.back());
  }
  return 0;
}

int run_echo(Session& session, const std::string& text, unsigned count, unsigned inflight) {
  using ferry::test::v1::Test;
  Test::Stub<ferry::rpc::Client> stub(session.rpc());
  ferry::test::v1::EchoCall call;
  call.set_payload(text);
  // Round trip first, so a missing test program fails with its own message.
  auto reply = stub.echo_future(call).get();
  std::printf("echo: %s\n", reply.payload().c_str());
  if (count <= 1) return 0;
  auto t = Clock::now();
  std::deque<std::future<ferry::test::v1::EchoReply>> window;
  for (unsigned i = 0; i < count; ++i) {
    if (window.size() >= inflight) {
      window.front().get();
      window.pop_front();
    }
    window.push_back(stub.echo_future(call));
  }
  while (!window.empty()) {
    window.front().get();
    window.pop_front();
  }
  double secs = ms_since(t) / 1000.0;
  std::printf("%u echo calls, %u in flight: %.0f calls/s\n", count, inflight, count / secs);
  return 0;
}

std::string pad(const std::string& s, std::size_t w) { return s.size() >= w ? s : s + std::string(w - s.size(), ' '); }
std::string lpad(const std::string& s, std::size_t w) { return s.size() >= w ? s : std::string(w - s.size(), ' ') + s; }

// nbd-serve: the bridge runs until Ctrl-C, the --run command's end, or
// (--once) its first client's.
int run_nbd_serve(Session& session, const ferry::NbdBridgeOptions& options, const std::string& run,
                  const Global& g) {
  ferry::NbdBridge bridge(session, options);
  const auto uris = bridge.uris();
  if (g.json) {
    Json j;
    j.field("export", options.export_name).field("size", bridge.export_size()).field("uri", uris.front());
    print_line(j.str());
  } else if (!g.quiet) {
    for (const auto& u : uris)
      std::fprintf(stderr, "serving %s (%s) on %s\n", options.export_name.c_str(), human_size(bridge.export_size()).c_str(),
                   u.c_str());
  }
  std::fflush(stdout);
  {
    std::lock_guard lock(g_interrupts.mutex);
    g_interrupts.on_interrupt = [&bridge] { bridge.stop("interrupted"); };
  }
  int rc = 0;
  std::thread waiter;
  if (!run.empty()) {
    const pid_t pid = ::fork();
    if (pid < 0) throw ferry::Error::from_errno(errno, "fork for --run");
    if (pid == 0) {
      sigset_t none;
      sigemptyset(&none);
      pthread_sigmask(SIG_SETMASK, &none, nullptr);
      ::setenv("uri", uris.front().c_str(), 1);
      ::setenv("nbd", uris.front().c_str(), 1);
      if (!options.socket_path.empty()) ::setenv("unixsocket", options.socket_path.c_str(), 1);
      ::execl("/bin/sh", "sh", "-c", run.c_str(), static_cast<char*>(nullptr));
      std::_Exit(127);
    }
    waiter = std::thread([pid, &rc, &bridge] {
      int status = 0;
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      bridge.stop("the --run command finished");
    });
  }
  const auto stats = bridge.run();
  if (waiter.joinable()) waiter.join();
  {
    std::lock_guard lock(g_interrupts.mutex);
    g_interrupts.on_interrupt = nullptr;
  }
  if (!g.quiet && !g.json)
    std::fprintf(stderr, "nbd-serve: %llu NBD connection(s), %s to the daemon, %s from it%s\n",
                 static_cast<unsigned long long>(stats.connections), human_size(stats.bytes_to_daemon).c_str(),
                 human_size(stats.bytes_from_daemon).c_str(),
                 stats.failed ? (", " + std::to_string(stats.failed) + " failed").c_str() : "");
  if (g_interrupts.was_fired()) return Exit::interrupted;
  return rc;
}

int run_pool_list(Session& session, const Global& g) {
  auto pools = session.pool_list();
  if (g.json) {
    std::vector<std::string> items;
    for (const auto& p : pools) items.push_back(pool_json(p).str());
    print_line(Json::array(items));
    return 0;
  }
  std::printf("%s %s %s %s  %s\n", pad("Name", 16).c_str(), lpad("Volumes", 7).c_str(), lpad("Allocation", 11).c_str(),
              lpad("Available", 11).c_str(), "Path");
  for (const auto& p : pools)
    std::printf("%s %s %s %s  %s%s\n", pad(p.name(), 16).c_str(), lpad(std::to_string(p.volumes()), 7).c_str(),
                lpad(human_size(p.allocation()), 11).c_str(), lpad(human_size(p.available()), 11).c_str(),
                p.path().c_str(), p.read_only() ? " (read-only)" : "");
  return 0;
}

std::string state_of(const ferry::v1::VolumeInfo& v) {
  if (!v.state().empty()) return v.state() + (v.writing() ? ", writing" : "");
  if (v.writing()) return "writing";
  if (v.readers()) return "reading(" + std::to_string(v.readers()) + ")";
  return "-";
}

int run_vol_list(Session& session, const std::string& pool, const Global& g) {
  auto volumes = session.vol_list(pool);
  if (g.json) {
    std::vector<std::string> items;
    for (const auto& v : volumes) items.push_back(volume_json(v).str());
    print_line(Json::array(items));
    return 0;
  }
  std::printf("%s %s %s  %s\n", pad("Name", 32).c_str(), lpad("Capacity", 11).c_str(), lpad("Allocation", 11).c_str(),
              "State");
  for (const auto& v : volumes)
    std::printf("%s %s %s  %s\n", pad(v.name(), 32).c_str(), lpad(human_size(v.capacity()), 11).c_str(),
                lpad(human_size(v.allocation()), 11).c_str(), state_of(v).c_str());
  return 0;
}

void print_volume(const ferry::v1::VolumeInfo& v, const Global& g) {
  if (g.json) {
    print_line(volume_json(v).str());
    return;
  }
  std::printf("Pool:       %s\nName:       %s\nCapacity:   %s (%llu bytes)\nAllocation: %s (%llu bytes)\nState:      %s\n",
              v.pool().c_str(), v.name().c_str(), human_size(v.capacity()).c_str(),
              static_cast<unsigned long long>(v.capacity()), human_size(v.allocation()).c_str(),
              static_cast<unsigned long long>(v.allocation()), state_of(v).c_str());
  if (!v.state_detail().empty()) std::printf("Detail:     %s\n", v.state_detail().c_str());
}

// --progress and --progress-fd (docs/cli.md): JSON lines are asked for
// explicitly, so --quiet does not silence them; the bar it does.
ProgressOutput progress_output(const Global& g) {
  ProgressOutput out;
  if (g.progress == "json" || g.progress_fd >= 0) {
    out.mode = ProgressOutput::Mode::json;
    out.fd = g.progress_fd >= 0 ? g.progress_fd : STDERR_FILENO;
  } else if (g.quiet || g.progress == "none") {
    out.mode = ProgressOutput::Mode::none;
  } else if (g.progress == "bar" || ::isatty(STDERR_FILENO) != 0) {
    out.mode = ProgressOutput::Mode::bar;
  }
  return out;
}

void print_transfer(const char* verb, const VolumeName& vol, const std::string& path,
                    const ferry::TransferResult& r, const Global& g) {
  const double secs = std::chrono::duration<double>(r.elapsed).count();
  const std::uint64_t total = r.data_bytes + r.hole_bytes;
  // A download to "-" has the volume's bytes on stdout: the summary goes
  // to stderr.
  std::FILE* out = std::string(verb) == "downloaded" && path == "-" ? stderr : stdout;
  if (g.json) {
    Json j;
    j.field("operation", verb)
        .field("pool", vol.pool)
        .field("name", vol.name)
        .field("file", path)
        .field("bytes", total)
        .field("data_bytes", r.data_bytes)
        .field("hole_bytes", r.hole_bytes)
        .field("seconds", secs)
        .field("bytes_per_second", secs > 0 ? static_cast<double>(total) / secs : 0.0);
    if (r.volume.capacity()) j.raw("volume", volume_json(r.volume).str());
    std::fprintf(out, "%s\n", j.str().c_str());
    return;
  }
  if (g.quiet) return;
  std::fprintf(out, "%s %s/%s %s %s: %s (%s data, %s holes) in %s, %s\n", verb, vol.pool.c_str(), vol.name.c_str(),
              std::string(verb) == "uploaded" ? "from" : "to", path.c_str(), human_size(total).c_str(),
              human_size(r.data_bytes).c_str(), human_size(r.hole_bytes).c_str(), human_duration(secs).c_str(),
              human_rate(secs > 0 ? static_cast<double>(total) / secs : 0).c_str());
}

int run_events(Session& session, const std::string& pool, unsigned count, double timeout_s, const Global& g) {
  std::mutex mutex;
  std::condition_variable cv;
  unsigned seen = 0;
  std::deque<ferry::v1::VolumeEvent> queue;
  std::deque<ferry::v1::JobStatus> jobs;
  // Job events too (vol-copy progress, jobs starting and ending).
  session.rpc().on_message<ferry::v1::Migration::JobEvent>([&](ferry::v1::JobUpdate u) {
    std::lock_guard lock(mutex);
    jobs.push_back(u.job());
    cv.notify_all();
  });
  struct Quiet {
    Session& s;
    ~Quiet() {
      s.rpc().on_message<ferry::v1::Migration::JobEvent>([](ferry::v1::JobUpdate) {});
    }
  } quiet{session};
  session.rpc().call_future<ferry::v1::Migration::JobSubscribe>(ferry::v1::JobSubscribeCall{}).get();
  session.subscribe(
      [&](const ferry::v1::VolumeEvent& e) {
        std::lock_guard lock(mutex);
        queue.push_back(e);
        cv.notify_all();
      },
      pool);
  if (!g.json && !g.quiet)
    std::fprintf(stderr, "following volume events%s%s (Ctrl-C to stop)\n", pool.empty() ? "" : " of pool ",
                 pool.c_str());
  const auto deadline = timeout_s > 0 ? Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                           std::chrono::duration<double>(timeout_s))
                                      : Clock::time_point::max();
  for (;;) {
    std::unique_lock lock(mutex);
    cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return !queue.empty() || !jobs.empty(); });
    while (!jobs.empty()) {
      auto j = jobs.front();
      jobs.pop_front();
      lock.unlock();
      if (g.json)
        print_line(Json().raw("job", ferry::cli::job_json(j).str()).str());
      else
        std::printf("%-8s %s\n", "job", ferry::cli::job_line(j).c_str());
      std::fflush(stdout);
      lock.lock();
      if (count && ++seen >= count) return 0;
    }
    while (!queue.empty()) {
      auto e = queue.front();
      queue.pop_front();
      lock.unlock();
      if (g.json) {
        print_line(event_json(e).str());
      } else {
        std::printf("%-8s %s/%s  %s\n", event_kind_name(e.kind()), e.volume().pool().c_str(),
                    e.volume().name().c_str(), e.detail().c_str());
      }
      std::fflush(stdout);
      lock.lock();
      if (count && ++seen >= count) return 0;
    }
    if (g_interrupts.was_fired()) return 0;  // asked to stop: a normal end for a follower
    if (!session.rpc().is_open())
      throw ferry::Error(ferry::Code::unavailable, "the connection to the daemon closed", "client");
    if (Clock::now() >= deadline) return 0;
  }
}

std::uint64_t size_arg(const std::string& text, const char* what) {
  auto v = parse_size(text);
  if (!v) throw CLI::ValidationError(what, "'" + text + "' is not a size (bytes, or with K, M, G, T, P)");
  return *v;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ferry: move virtual-machine volumes to and from a ferryd.\n"
               "Volumes are named POOL/NAME (or NAME, in pool 'default'). Exit codes: docs/cli.md."};
  app.require_subcommand(1);
  app.fallthrough();  // global options may also come after the verb
  app.option_defaults()->always_capture_default();
  std::string uri = "ferry+unix://" + std::filesystem::absolute(ferry::daemon::client_socket_path()).lexically_normal().string();
  if (const char* env = std::getenv("FERRY_URI"); env && *env) uri = env;
  app.add_option("-c,--connect", uri,
                 "daemon URI: ferry+unix:///path, ferry+tcp://host:port, ferry+tls://host:port, ferry+grpc://host:port "
                 "or ferry+grpcs://host:port ($FERRY_URI)");
  Global g;
  app.add_flag("--json", g.json, "print results as JSON (one object per line for events)");
  app.add_flag("-q,--quiet", g.quiet, "print nothing on success");
  app.add_option("--progress", g.progress,
                 "transfer progress: auto (a bar on stderr when it is a terminal), bar, json (one JSON object per "
                 "line on stderr, about ten a second and a final one), none")
      ->check(CLI::IsMember({"auto", "bar", "json", "none"}));
  app.add_option("--progress-fd", g.progress_fd,
                 "write the JSON progress lines to this open file descriptor instead of stderr (implies "
                 "--progress=json)")
      ->check(CLI::NonNegativeNumber)
      ->default_str("");  // none: no default to show
  ferry::rpc::ClientOptions options;
  options.name = "ferry-cli";
  app.add_option("--tls-ca", options.tls.ca_file, "PEM CAs to check the server's certificate against (default: system)");
  app.add_option("--tls-cert", options.tls.cert_file, "PEM client certificate to show the server");
  app.add_option("--tls-key", options.tls.key_file, "PEM private key of --tls-cert");
  app.add_option("--tls-server-name", options.tls.server_name,
                 "name the server's certificate must carry (default: the URI's host)");
  std::string password_file;
  app.add_option("--sasl-user", options.sasl.username, "SASL user name, for servers that ask (password: "
                                                        "$FERRY_PASSWORD or --sasl-password-file)");
  app.add_option("--sasl-password-file", password_file, "file whose first line is the SASL password");
  app.add_option("--sasl-mech", options.sasl.mechanisms, "acceptable SASL mechanism(s) (default: the server's choice)");
  unsigned keepalive_ms = static_cast<unsigned>(options.connection.keepalive_interval.count());
  app.add_option("--keepalive-interval", keepalive_ms,
                 "ms of silence from the daemon before a keepalive probe (0 = off)")
      ->capture_default_str();
  app.add_option("--keepalive-count", options.connection.keepalive_count,
                 "unanswered probes before the daemon is declared unreachable and the command fails")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1000u));
  std::string fault_spec;
  app.add_option("--fault-transport", fault_spec,
                 "inject faults into this connection's bytes, e.g. delay=5ms,reset_after=10M "
                 "(for reproducing problems; docs/operations.md)");

  bool reconnect = false;
  double reconnect_max_wait = 60;
  app.add_flag("--reconnect", reconnect,
               "if the connection is lost, connect again and carry on (pool-list, vol-list, vol-info, vol-download, "
               "events only: their calls are safe to repeat)");
  app.add_option("--reconnect-max-wait", reconnect_max_wait,
                 "with --reconnect: seconds to keep trying after a loss before failing")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  unsigned ping_count = 5;
  auto* ping = app.add_subcommand("ping", "measure round trips to the daemon");
  ping->add_option("-n,--count", ping_count, "pings to send");

  std::string text = "hello";
  unsigned echo_count = 1, echo_inflight = 128;
  auto* echo = app.add_subcommand("echo", "echo text through the test program (ferryd --test-service)");
  echo->add_option("text", text, "what to send");
  echo->add_option("-n,--count", echo_count, "calls to make (more than 1 prints calls/s)");
  echo->add_option("--inflight", echo_inflight, "calls in flight at once");

  auto* pool_list = app.add_subcommand("pool-list", "list the daemon's storage pools");

  std::string list_pool = "default";
  auto* vol_list = app.add_subcommand("vol-list", "list the volumes of a pool");
  vol_list->add_option("pool", list_pool, "pool name");

  std::string volume_arg;
  auto* vol_info = app.add_subcommand("vol-info", "show a volume's capacity, allocation and state");
  vol_info->add_option("volume", volume_arg, "POOL/NAME")->required();

  std::string size_text;
  bool preallocate = false;
  auto* vol_create = app.add_subcommand("vol-create", "create a sparse volume of the given size");
  vol_create->add_option("volume", volume_arg, "POOL/NAME")->required();
  vol_create->add_option("size", size_text, "capacity: bytes, or with K, M, G, T (binary)")->required();
  vol_create->add_flag("--preallocate", preallocate, "allocate every block now instead of sparse");

  auto* vol_delete = app.add_subcommand("vol-delete", "delete a volume (running downloads of it are aborted)");
  vol_delete->add_option("volume", volume_arg, "POOL/NAME")->required();

  bool shrink = false;
  auto* vol_resize = app.add_subcommand("vol-resize", "change a volume's capacity");
  vol_resize->add_option("volume", volume_arg, "POOL/NAME")->required();
  vol_resize->add_option("size", size_text, "new capacity, or +SIZE to grow by that much")->required();
  vol_resize->add_flag("--shrink", shrink, "allow a smaller capacity (drops the data past it)");

  std::string file_arg, offset_text = "0", length_text;
  bool sparse = false, dense = false, atomic = false, create = false, no_sync = false, keep_capacity = false;
  auto* vol_upload = app.add_subcommand("vol-upload", "send a local file (or - for stdin) into a volume");
  vol_upload->add_option("volume", volume_arg, "POOL/NAME")->required();
  vol_upload->add_option("file", file_arg, "local file, or - for standard input")->required();
  vol_upload->add_option("--offset", offset_text, "where in the volume the file's first byte goes");
  vol_upload->add_option("--length", length_text, "bytes of the file to send (default: all)");
  vol_upload->add_flag("--sparse", sparse, "also send all-zero chunks as holes (holes in the file always are)");
  vol_upload->add_flag("--dense", dense, "send every byte, holes as zeros");
  vol_upload->add_flag("--atomic", atomic,
                       "write a temporary copy and replace the volume only when all of it arrived; on failure "
                       "the volume keeps its old contents");
  vol_upload->add_flag("--keep-capacity", keep_capacity, "with --atomic: keep the volume's size if the file is shorter");
  vol_upload->add_flag("--create", create, "create the volume, sized to the file, if it does not exist");
  vol_upload->add_flag("--no-sync", no_sync, "do not wait for the daemon to sync the data to disk");
  vol_upload->get_option("--sparse")->excludes("--dense");

  auto* vol_download = app.add_subcommand("vol-download", "write a volume into a local file (or - for stdout)");
  vol_download->add_option("volume", volume_arg, "POOL/NAME")->required();
  vol_download->add_option("file", file_arg, "local file (created or truncated), or - for standard output")->required();
  vol_download->add_option("--offset", offset_text, "first byte of the volume to fetch");
  vol_download->add_option("--length", length_text, "bytes to fetch (default: to the end)");
  vol_download->add_flag("--sparse", sparse, "also turn all-zero chunks into holes (holes always stay holes)");
  vol_download->add_flag("--dense", dense, "write every byte, holes as zeros");
  vol_download->get_option("--sparse")->excludes("--dense");

  ferry::NbdBridgeOptions nbd_options;
  std::string nbd_run;
  auto* nbd_serve = app.add_subcommand(
      "nbd-serve",
      "serve a volume to local NBD clients (qemu-img, nbdcopy, nbdinfo, nbdfuse); each NBD connection becomes a "
      "stream on this one ferry connection");
  nbd_serve->add_option("export", nbd_options.export_name,
                        "POOL/NAME, NAME (pool default), or the name of an NBD export ferryd declares")
      ->required();
  nbd_serve->add_option("--socket", nbd_options.socket_path, "listen on this UNIX socket (mode 0600)");
  nbd_serve->add_option("--tcp", nbd_options.tcp, "listen on HOST:PORT (port 0: any); no authentication, keep it local");
  nbd_serve->add_flag("-r,--read-only", nbd_options.read_only, "serve read-only");
  nbd_serve->add_flag("--once", nbd_options.once, "exit when the first NBD client disconnects");
  nbd_serve->add_option("--run", nbd_run,
                        "run this shell command once listening, with $uri (and $nbd) set to the NBD URI, then exit "
                        "with its status (like nbdkit --run)");
  nbd_serve->add_option("--max-connections", nbd_options.max_connections, "NBD clients at once")->capture_default_str();

  std::string copy_src, copy_dst, copy_bandwidth, copy_extent;
  ferry::cli::CopyRequest copy;
  auto* vol_copy = app.add_subcommand(
      "vol-copy",
      "copy a volume from one daemon to another, directly between the daemons (the source daemon connects to the "
      "destination with its own credentials), or between a volume and a local file or NBD export (ferry moves the "
      "data itself); sparse, verified per extent, resumable");
  vol_copy->add_option("source", copy_src,
                       "ferry+unix:///SOCKET/POOL/NAME, ferry+tcp://HOST:PORT/POOL/NAME, ferry+tls://HOST:PORT/POOL/NAME, "
                       "POOL/NAME on the -c daemon; or a local file (/PATH, ./PATH, file:PATH) or NBD URI "
                       "(nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH) when the other end is a volume")
      ->required();
  vol_copy->add_option("destination", copy_dst,
                       "the same forms; a daemon's address must be reachable from the source daemon; a local file is "
                       "created (--overwrite replaces one, --resume continues into one), an NBD export must be at least "
                       "the volume's size")
      ->required();
  vol_copy->add_flag("--resume", copy.resume,
                     "continue an incomplete copy: extents the destination committed are checked against the source "
                     "and not sent again");
  vol_copy->add_flag("--overwrite", copy.overwrite, "replace an existing destination volume (or incomplete copy)");
  vol_copy->add_option("--bandwidth", copy_bandwidth, "cap the data rate, bytes per second (K, M, G: 100M)");
  vol_copy->add_option("--extent-size", copy_extent, "commit/verify/resume unit (default: the daemon's, 64M)");
  vol_copy->add_option("--parallel", copy.parallel, "extents in flight (default: the daemon's, 8)");
  vol_copy->add_flag("--no-sync", copy.no_sync,
                     "the destination commits extents without fdatasync (benchmarks, scratch data; a host crash "
                     "there may lose committed extents)");
  vol_copy->add_flag("--detach", copy.detach, "start the job and return; follow it with job-info or events");

  auto* job_list = app.add_subcommand("job-list", "list the daemon's jobs (copies out and in), running and recent");
  std::string job_id;
  auto* job_info = app.add_subcommand("job-info", "show one job: state, progress, rate, ETA, error, digest");
  job_info->add_option("id", job_id, "job id (from job-list)")->required();
  auto* job_cancel = app.add_subcommand("job-cancel",
                                        "cancel a running job; both daemons stop and report the same error");
  job_cancel->add_option("id", job_id, "job id (from job-list)")->required();

  std::string events_pool;
  unsigned events_count = 0;
  double events_timeout = 0;
  auto* events = app.add_subcommand("events", "follow volume events (created, deleted, resized, written)");
  events->add_option("--pool", events_pool, "only this pool's events");
  events->add_option("-n,--count", events_count, "stop after this many events (0: never)");
  events->add_option("--timeout", events_timeout, "stop after this many seconds (0: never)");

  // Admin verbs: on the daemon's admin socket, not -c (docs/operations.md).
  ferry::cli::AdminRequest admin_req;
  admin_req.socket = ferry::daemon::client_admin_socket_path();
  auto* admin = app.add_subcommand("admin", "administer the daemon over its admin socket (root or the daemon's uid)");
  admin->add_option("--admin-socket", admin_req.socket, "the daemon's admin socket ($FERRY_ADMIN_SOCKET)")
      ->capture_default_str();
  admin->require_subcommand(1);
  using AV = ferry::cli::AdminRequest::Verb;
  std::map<CLI::App*, AV> admin_verbs;
  admin_verbs[admin->add_subcommand("info", "the daemon's version, uptime, threads, connections, calls, bytes, limits")] =
      AV::info;
  auto* admin_clients = admin->add_subcommand("clients", "list connected clients with their identity and traffic");
  admin_clients->add_flag("--all", admin_req.include_admin, "list admin-socket connections too");
  admin_verbs[admin_clients] = AV::clients;
  auto* admin_client = admin->add_subcommand("client", "show one client");
  admin_client->add_option("id", admin_req.id, "client id (from admin clients)")->required();
  admin_verbs[admin_client] = AV::client;
  auto* admin_disconnect = admin->add_subcommand("disconnect", "close a client's connection; what it held is freed");
  admin_disconnect->add_option("id", admin_req.id, "client id (from admin clients)")->required();
  admin_disconnect->add_option("--reason", admin_req.reason, "added to what the client is told");
  admin_verbs[admin_disconnect] = AV::disconnect;
  auto* admin_limits = admin->add_subcommand("limits", "show the limits, or change them at run time with --set");
  admin_limits->add_option("--set", admin_req.set, "NAME=VALUE, repeatable (e.g. max_calls=100)");
  admin_verbs[admin_limits] = AV::limits;
  auto* admin_log = admin->add_subcommand("log-level", "show the daemon's log level, or set it");
  admin_log->add_option("level", admin_req.level, "trace, debug, info, warn, error, critical, off");
  admin_verbs[admin_log] = AV::log_level;
  admin_verbs[admin->add_subcommand("jobs", "list running jobs: uploads, downloads, NBD sessions, copies")] = AV::jobs;
  auto* admin_cancel = admin->add_subcommand("cancel", "cancel a running job; its client sees why at once");
  admin_cancel->add_option("job", admin_req.id, "job id (from admin jobs)")->required();
  admin_cancel->add_option("--reason", admin_req.reason, "added to what the client is told");
  admin_verbs[admin_cancel] = AV::cancel;

  if (argc >= 2 && std::string(argv[1]) == ferry::cli::kCompleteVerb) {
    if (argc < 4) {
      std::fprintf(stderr, "usage: ferry %s CUR LINE (for shell completion)\n", ferry::cli::kCompleteVerb);
      return Exit::usage;
    }
    for (const auto& c : ferry::cli::complete(app, argv[2], argv[3], uri)) std::printf("%s\n", c.c_str());
    return 0;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : Exit::usage;
  }
  spdlog::set_level(spdlog::level::warn);
  if (g.progress_fd >= 0) {
    if (g.progress == "bar" || g.progress == "none") {
      std::fprintf(stderr, "ferry: --progress-fd writes JSON lines; it goes with --progress=json (or no --progress)\n");
      return Exit::usage;
    }
    if (::fcntl(g.progress_fd, F_GETFL) < 0) {
      std::fprintf(stderr, "ferry: --progress-fd %d: not an open file descriptor\n", g.progress_fd);
      return Exit::usage;
    }
    if (g.progress_fd == STDOUT_FILENO && *vol_download && file_arg == "-") {
      std::fprintf(stderr, "ferry: --progress-fd 1: standard output carries the volume's data\n");
      return Exit::usage;
    }
  }
  options.connection.keepalive_interval = std::chrono::milliseconds(keepalive_ms);
  try {
    options.fault = ferry::rpc::FaultOptions::parse(fault_spec);
  } catch (const ferry::Error& e) {
    std::fprintf(stderr, "ferry: --fault-transport: %s\n", e.message().c_str());
    return Exit::usage;
  }

  if (!password_file.empty()) {
    std::FILE* f = std::fopen(password_file.c_str(), "r");
    if (!f) {
      std::fprintf(stderr, "ferry: cannot read %s\n", password_file.c_str());
      return Exit::usage;
    }
    char line[1024] = {};
    if (std::fgets(line, sizeof line, f)) options.sasl.password = line;
    std::fclose(f);
    while (!options.sasl.password.empty() &&
           (options.sasl.password.back() == '\n' || options.sasl.password.back() == '\r'))
      options.sasl.password.pop_back();
  } else if (const char* pw = std::getenv("FERRY_PASSWORD")) {
    options.sasl.password = pw;
  }

  std::uint64_t offset = 0;
  std::optional<std::uint64_t> length;
  std::uint64_t size = 0;
  bool grow = false;
  try {
    offset = size_arg(offset_text, "--offset");
    if (!length_text.empty()) length = size_arg(length_text, "--length");
    if (!size_text.empty()) {
      grow = size_text[0] == '+';
      size = size_arg(grow ? size_text.substr(1) : size_text, "size");
    }
  } catch (const CLI::ValidationError& e) {
    std::fprintf(stderr, "ferry: %s\n", e.what());
    return Exit::usage;
  }
  const VolumeName vol = parse_volume(volume_arg);
  if (*vol_copy) {
    try {
      copy.source = ferry::cli::parse_copy_end(copy_src, uri);
      copy.destination = ferry::cli::parse_copy_end(copy_dst, uri);
      if (!copy_bandwidth.empty()) copy.bandwidth = size_arg(copy_bandwidth, "--bandwidth");
      if (!copy_extent.empty()) copy.extent_size = size_arg(copy_extent, "--extent-size");
    } catch (const ferry::Error& e) {
      std::fprintf(stderr, "ferry: %s\n", e.message().c_str());
      return Exit::usage;
    } catch (const CLI::ValidationError& e) {
      std::fprintf(stderr, "ferry: %s\n", e.what());
      return Exit::usage;
    }
    // The job runs on the source daemon; with a local end, this process
    // talks to the volume's daemon.
    if (copy.source.local() && copy.destination.local()) {
      std::fprintf(stderr,
                   "ferry: both ends of this copy are local; one end of vol-copy must be a volume on a ferryd "
                   "(nbdcopy or qemu-img convert copy between local disks)\n");
      return Exit::usage;
    }
    uri = copy.source.local() ? copy.destination.uri : copy.source.uri;
  }

  if (reconnect) {
    if (!(*pool_list || *vol_list || *vol_info || *vol_download || *events)) {
      std::fprintf(stderr, "ferry: --reconnect applies to pool-list, vol-list, vol-info, vol-download and events, "
                           "whose calls are safe to repeat\n");
      return Exit::usage;
    }
    options.reconnect.enabled = true;
    options.reconnect.give_up_after =
        std::chrono::milliseconds(static_cast<std::int64_t>(reconnect_max_wait * 1000));
    options.reconnect.on_event = [quiet = g.quiet](const ferry::rpc::ReconnectEvent& e) {
      using Kind = ferry::rpc::ReconnectEvent::Kind;
      if (quiet) return;
      if (e.kind == Kind::lost)
        std::fprintf(stderr, "ferry: connection lost (%s); reconnecting\n", e.error ? e.error->message().c_str() : "");
      else if (e.kind == Kind::reconnected)
        std::fprintf(stderr, "ferry: reconnected after %u attempt%s\n", e.attempt, e.attempt == 1 ? "" : "s");
    };
  }
  if (*admin) {
    for (auto& [sub, verb] : admin_verbs)
      if (*sub) admin_req.verb = verb;
    admin_req.json = g.json;
    admin_req.quiet = g.quiet;
    try {
      return ferry::cli::run_admin(admin_req, options);
    } catch (const ferry::Error& e) {
      if (g.json) {
        Json j;
        j.field("error", ferry::to_string(e.code())).field("message", e.message()).field("retryable", e.retryable());
        std::fprintf(stderr, "%s\n", j.str().c_str());
      } else {
        std::fprintf(stderr, "ferry: %s\n", e.describe().c_str());
      }
      return exit_code_for(e.code());
    }
  }

  g_interrupts.start();
  int rc = 0;
  try {
    Session session = Session::connect(uri, options);
    {
      std::lock_guard lock(g_interrupts.mutex);
      g_interrupts.session = &session;
    }
    if (*ping) rc = run_ping(session, std::max(1u, ping_count), g);
    if (*echo) rc = run_echo(session, text, echo_count, std::max(1u, echo_inflight));
    if (*pool_list) rc = run_pool_list(session, g);
    if (*vol_list) rc = run_vol_list(session, list_pool, g);
    if (*vol_info) print_volume(session.vol_info(vol.pool, vol.name), g);
    if (*vol_create) {
      auto info = session.vol_create(vol.pool, vol.name, size, preallocate);
      if (g.json) print_volume(info, g);
      else if (!g.quiet) std::printf("created %s/%s, %s\n", vol.pool.c_str(), vol.name.c_str(), human_size(size).c_str());
    }
    if (*vol_delete) {
      session.vol_delete(vol.pool, vol.name);
      if (g.json) print_line(Json().field("deleted", vol.pool + "/" + vol.name).str());
      else if (!g.quiet) std::printf("deleted %s/%s\n", vol.pool.c_str(), vol.name.c_str());
    }
    if (*vol_resize) {
      std::uint64_t target = size;
      if (grow) target = session.vol_info(vol.pool, vol.name).capacity() + size;
      auto info = session.vol_resize(vol.pool, vol.name, target, shrink);
      if (g.json) print_volume(info, g);
      else if (!g.quiet)
        std::printf("resized %s/%s to %s\n", vol.pool.c_str(), vol.name.c_str(), human_size(info.capacity()).c_str());
    }
    if (*vol_upload || *vol_download) {
      ProgressBar bar(progress_output(g), *vol_upload ? "upload" : "download", vol.pool + "/" + vol.name);
      ferry::TransferResult result;
      try {
        if (*vol_upload) {
          ferry::UploadOptions o;
          o.offset = offset;
          o.length = length;
          o.detect_zeros = sparse;
          o.dense = dense;
          o.atomic = atomic;
          o.keep_capacity = keep_capacity;
          o.create = create;
          o.no_sync = no_sync;
          result = session.upload_file(vol.pool, vol.name, file_arg, o, [&](const ferry::Progress& p) { bar.update(p); });
        } else {
          ferry::DownloadOptions o;
          o.offset = offset;
          o.length = length;
          o.detect_zeros = sparse;
          o.dense = dense;
          result =
              session.download_file(vol.pool, vol.name, file_arg, o, [&](const ferry::Progress& p) { bar.update(p); });
        }
      } catch (...) {
        bar.fail();
        throw;
      }
      // The final report (the session made it already unless the range was empty).
      ferry::Progress end;
      end.done = end.total = result.data_bytes + result.hole_bytes;
      end.data_bytes = result.data_bytes;
      end.hole_bytes = result.hole_bytes;
      end.elapsed = result.elapsed;
      end.finished = true;
      bar.finish(end);
      print_transfer(*vol_upload ? "uploaded" : "downloaded", vol, file_arg, result, g);
    }
    ferry::cli::JobOutput job_out;
    job_out.json = g.json;
    job_out.quiet = g.quiet;
    job_out.progress = progress_output(g);
    job_out.interrupted = [] { return g_interrupts.was_fired(); };
    if (*vol_copy) rc = ferry::cli::run_vol_copy(session, copy, job_out);
    if (*job_list) rc = ferry::cli::run_job_list(session, job_out);
    if (*job_info) rc = ferry::cli::run_job_info(session, job_id, job_out);
    if (*job_cancel) rc = ferry::cli::run_job_cancel(session, job_id, job_out);
    if (*events) rc = run_events(session, events_pool, events_count, events_timeout, g);
    if (*nbd_serve) rc = run_nbd_serve(session, nbd_options, nbd_run, g);
    {
      std::lock_guard lock(g_interrupts.mutex);
      g_interrupts.session = nullptr;
    }
    session.close();
  } catch (const ferry::Error& e) {
    {
      std::lock_guard lock(g_interrupts.mutex);
      g_interrupts.session = nullptr;
    }
    if (g.json) {
      Json j;
      j.field("error", ferry::to_string(e.code())).field("message", e.message()).field("retryable", e.retryable());
      std::fprintf(stderr, "%s\n", j.str().c_str());
    } else {
      std::fprintf(stderr, "ferry: %s\n", e.describe().c_str());
    }
    rc = g_interrupts.was_fired() ? Exit::interrupted : exit_code_for(e.code());
  }
  g_interrupts.stop();
  std::fflush(stdout);
  return rc;
}
