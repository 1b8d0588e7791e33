// Helpers for the tests that drive `ferry vol-copy` (migration_test.cc,
// copy_local_test.cc): the CLI as a process, test volumes, JSON fields, jobs.
#pragma once

#include <chrono>
#include <cstdint>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/integration/ferryd_process.h"
#include "tests/integration/test_files.h"

namespace ferry::testing {

using namespace std::chrono_literals;
using CopyClock = std::chrono::steady_clock;

struct CliResult {
  int rc = -1;
  std::string out;
};

inline CliResult ferry_cli(const std::string& uri, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {ferry_cli_path(), "-c", uri, "--progress", "none"};
  argv.insert(argv.end(), args.begin(), args.end());
  CliResult r;
  r.rc = run_command(argv, &r.out);
  return r;
}

#define EXPECT_CLI(result, code)                         \
  do {                                                   \
    const CliResult& r_ = (result);                      \
    EXPECT_EQ(r_.rc, code) << "ferry said:\n" << r_.out; \
  } while (0)

// A volume with 25% data in extents of mixed sizes, the rest holes, and
// some allocated zeros (which must arrive as holes).
inline void make_volume(const std::string& path, std::uint64_t size, std::uint64_t seed) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> data;
  const std::uint64_t lens[] = {MiB / 4, MiB, 2 * MiB, 4 * MiB};
  std::uint64_t at = 0;
  for (int i = 0; at < size; ++i) {
    const std::uint64_t len = std::min(lens[i % 4], size - at);
    data.push_back({at, len});
    at += len * 4;
  }
  make_file(path, size, data, seed);
  // Allocated zeros in a hole.
  std::ofstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  std::vector<char> zeros(MiB);
  f.seekp(static_cast<std::streamoff>(size / 2 + MiB / 2));
  f.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
}

// The value of a "key":"value" or "key":number field in a JSON line.
inline std::string json_field(const std::string& json, const std::string& key) {
  std::smatch m;
  if (std::regex_search(json, m, std::regex("\"" + key + "\":\"?([^\",}]*)\"?"))) return m[1];
  return {};
}

// The first job of `kind` on the daemon at `uri`, as its JSON line.
inline std::string job_of(const std::string& uri, const std::string& kind) {
  auto r = ferry_cli(uri, {"--json", "job-list"});
  std::istringstream in(r.out);
  for (std::string line; std::getline(in, line);)
    if (json_field(line, "kind") == kind) return line;
  return {};
}

// Waits until `pred` holds or `timeout` passes; returns whether it held.
template <class F>
inline bool eventually(F pred, std::chrono::milliseconds timeout = 20s) {
  const auto until = CopyClock::now() + timeout;
  while (CopyClock::now() < until) {
    if (pred()) return true;
    std::this_thread::sleep_for(20ms);
  }
  return pred();
}

// Lines in a destination volume's copy state: extents committed so far.
inline std::size_t committed_extents(const std::string& pool_dir, const std::string& name) {
  std::ifstream in(pool_dir + "/.ferry-copy." + name);
  std::size_t lines = 0;
  for (std::string line; std::getline(in, line);) ++lines;
  return lines > 2 ? lines - 2 : 0;
}

}  // namespace ferry::testing
