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

// The Python upload of py.stream.upload: /usr/bin/python3 running
// build/bench/py_upload.py with PYTHONPATH=build/python.
std::vector<std::string> python_upload_command(const CaseOptions& options) {
  const auto build = std::filesystem::path(options.ferryd).parent_path().parent_path();
  const auto package = build / "python" / "ferry";
  bool have_module = false;
  if (std::filesystem::exists(package / "__init__.py"))
    for (const auto& e : std::filesystem::directory_iterator(package))
      have_module = have_module || e.path().filename().string().rfind("_ferry", 0) == 0;
  if (!have_module) throw Unavailable("the Python binding is not built (" + package.string() + "; FERRY_PYTHON=ON)");
  if (!std::filesystem::exists("/usr/bin/python3")) throw Unavailable("/usr/bin/python3 not found");
  const auto script = build / "bench" / "py_upload.py";
  if (!std::filesystem::exists(script)) throw Unavailable(script.string() + " not found");
  ::setenv("PYTHONPATH", (build / "python").c_str(), 1);
  return {"/usr/bin/python3", script.string()};
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
  const std::vector<std::string> python = copy.python ? python_upload_command(options) : std::vector<std::string>{};
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
    if (copy.python) {
      auto argv = python;
      argv.insert(argv.end(), {ferryd.uri(), "default", name, local});
      running.push_back(start(argv));
      continue;
    }
    running.push_back(start(copy.upload ? with({"vol-upload", "--no-sync", name, local})
                                        : with({"vol-download", name, local + ".out"})));
  }
  for (pid_t pid : running)
    finish(pid, copy.python ? "py_upload.py" : copy.upload ? "ferry vol-upload" : "ferry vol-download");
  const double elapsed = seconds_since(begin);

  std::string note = std::string(copy.python ? "Python binding Session.upload_file(no_sync=True)"
                                 : copy.upload ? "ferry CLI vol-upload --no-sync"
                                               : "ferry CLI vol-download") +
                     " over " +
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
