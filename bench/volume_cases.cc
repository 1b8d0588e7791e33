// The ferry side of the vol.* rows: the real `ferry` CLI against a real
// ferryd serving a pool in the same scratch directory as the CLI's files, so
// both sides of the row copy file to file on one filesystem.
#include <sys/wait.h>
#include <unistd.h>

#include <spawn.h>

#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "bench/ferry_cases.h"
#include "bench/harness.h"

extern char** environ;

namespace ferry::bench {

namespace {

std::string cli_path(const CaseOptions& options) {
  const auto path = std::filesystem::path(options.ferryd).parent_path().parent_path() / "client" / "ferry";
  if (!std::filesystem::exists(path)) throw std::runtime_error("ferry CLI not found at " + path.string());
  return path.string();
}

pid_t start(const std::vector<std::string>& argv) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, 2, 1);  // our stdout carries the JSON line
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot start " + argv[0] + ": " + std::strerror(rc));
  return pid;
}

void finish(pid_t pid, const std::string& what) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw std::runtime_error(what + " failed (status " + std::to_string(status) + ")");
}

void run(const std::vector<std::string>& argv, const std::string& what) { finish(start(argv), what); }

}  // namespace

Measurement ferry_volume_copy(const CaseOptions& options, const VolumeCopy& copy) {
  ScratchDir dir;
  const std::string pool = (dir.path() / "pool").string();
  std::filesystem::create_directories(pool);
  Ferryd ferryd(options, copy.tcp ? "tcp:127.0.0.1:0" : dir.unix_address("ferryd.sock"), dir,
                {"--pool", "default=" + pool});
  const std::vector<std::string> cli = {cli_path(options), "-c", ferryd.uri(), "--progress", "none", "--quiet"};
  auto with = [&](std::vector<std::string> args) {
    auto argv = cli;
    argv.insert(argv.end(), args.begin(), args.end());
    return argv;
  };

  // Set-up, not timed: the files to send or the volumes to fetch, synced.
  for (int i = 0; i < copy.width; ++i) {
    const std::string name = "f" + std::to_string(i);
    const std::string local = (dir.path() / name).string();
    make_bench_file(local, copy.size, copy.sparse);
    run(with({"vol-create", name, std::to_string(copy.size)}), "vol-create");
    if (!copy.upload) {
      run(with({"vol-upload", name, local}), "vol-upload (set-up)");
      std::filesystem::remove(local);
    }
  }
  ::sync();

  const auto begin = Clock::now();
  std::vector<pid_t> running;
  for (int i = 0; i < copy.width; ++i) {
    const std::string name = "f" + std::to_string(i);
    const std::string local = (dir.path() / name).string();
    running.push_back(start(copy.upload ? with({"vol-upload", "--no-sync", name, local})
                                        : with({"vol-download", name, local + ".out"})));
  }
  for (pid_t pid : running) finish(pid, copy.upload ? "ferry vol-upload" : "ferry vol-download");
  const double elapsed = seconds_since(begin);

  std::string note = std::string("ferry CLI ") + (copy.upload ? "vol-upload --no-sync" : "vol-download") + " over " +
                     (copy.tcp ? "tcp" : "unix") + ", " +
                     (copy.width > 1 ? std::to_string(copy.width) + " at once x " : "") +
                     std::to_string(copy.size >> 20) + " MiB" + (copy.sparse ? " sparse (1% data)" : "") +
                     ", process start and connect included";
  if (copy.sparse) {
    // The destination must stay sparse, or the row measures the wrong thing.
    const std::string dest = copy.upload ? pool + "/f0" : (dir.path() / "f0.out").string();
    const uint64_t allocated = allocated_bytes(dest);
    if (allocated > copy.size / 100 * 2)
      throw std::runtime_error("destination not sparse: " + std::to_string(allocated >> 20) + " MiB allocated");
    note += "; destination " + std::to_string(allocated >> 20) + " MiB allocated";
  }
  if (copy.seconds) return {elapsed, "s", note};
  return {static_cast<double>(copy.size) * copy.width / 1e6 / elapsed, "MB/s", note};
}

}  // namespace ferry::bench
