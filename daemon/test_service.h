// The test program (ferry.test.v1.Test, program 99): echo, sleep without
// holding a thread, fail with a chosen error, push MESSAGEs, block on the
// worker pool, report the process's threads and memory. ferryd serves it
// with --test-service, for tests and benchmarks, as libvirt has its test
// driver.
#pragma once

#include <memory>

#include "rpc/program.h"
#include "rpc/server.h"

namespace ferry::daemon {

// `server` is read by the Stats procedure; it must outlive the program.
std::shared_ptr<rpc::Program> make_test_program(const rpc::Server& server);

// Threads and resident bytes of this process, from /proc/self/status.
struct ProcessUsage {
  unsigned threads = 0;
  std::uint64_t rss_bytes = 0;
};
ProcessUsage process_usage();

}  // namespace ferry::daemon
