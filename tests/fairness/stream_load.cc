// A client that streams at full speed, for fairness_test.cc: UPLOADS
// uploads and DOWNLOADS downloads of the test program on one connection,
// as fast as the daemon takes and gives them, until SIGTERM; then prints
// the bytes moved and the seconds it ran, and exits 0.
//
//   ferry_stream_load URI [UPLOADS DOWNLOADS [NICE]]
//
// It runs as its own process so that the test can give it the share of the
// machine another host would have: its own CPU work (filling and reading
// 1 MiB blocks) is not the daemon's, and must not be counted against it.
#include <signal.h>
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "stream/service.h"

namespace {

std::atomic<bool> stopping{false};

void on_term(int) { stopping.store(true); }

}  // namespace

int main(int argc, char** argv) {
  using namespace ferry;
  using TestSvc = test::v1::Test;
  if (argc != 2 && argc != 4 && argc != 5) {
    std::fprintf(stderr, "usage: ferry_stream_load URI [UPLOADS DOWNLOADS [NICE]]\n");
    return 2;
  }
  const int uploads = argc >= 4 ? std::atoi(argv[2]) : 2;
  const int downloads = argc >= 4 ? std::atoi(argv[3]) : 2;
  if (argc == 5 && ::setpriority(PRIO_PROCESS, 0, std::atoi(argv[4])) != 0) {
    std::perror("setpriority");
    return 1;
  }
  struct sigaction sa {};
  sa.sa_handler = on_term;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  try {
    rpc::IoThreads io(1);
    rpc::Client client = rpc::Client::connect_sync(io.executor(), argv[1]);
    std::atomic<std::uint64_t> moved{0};
    std::atomic<int> failures{0};
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> streams;
    for (int i = 0; i < uploads; ++i) {
      streams.emplace_back([&] {
        try {
          test::v1::UploadCall call;
          call.set_discard(true);
          auto up = stream::open<TestSvc::Upload>(client, call);
          while (!stopping.load()) {
            rpc::Buffer block(1 << 20);
            std::fill(block.data(), block.data() + block.size(), std::uint8_t{0x5a});
            up.stream->write_sync(std::move(block));
            moved += 1 << 20;
          }
          up.stream->finish_sync();
          up.reply_sync();
        } catch (const std::exception& e) {
          std::fprintf(stderr, "upload: %s\n", e.what());
          ++failures;
        }
      });
    }
    for (int i = 0; i < downloads; ++i) {
      streams.emplace_back([&] {
        try {
          test::v1::DownloadCall call;
          call.set_size(std::uint64_t{1} << 50);
          // Not `fast`: each block is made and checksummed by the daemon, CPU
          // work per chunk as a volume download's digest is.
          auto down = stream::open<TestSvc::Download>(client, call);
          while (!stopping.load()) {
            auto item = down.stream->read_sync();
            if (item.kind == stream::Item::Kind::end) break;
            moved += item.length;
          }
          down.stream->abort(Error(Code::cancelled, "enough"));
        } catch (const std::exception& e) {
          std::fprintf(stderr, "download: %s\n", e.what());
          ++failures;
        }
      });
    }
    for (auto& t : streams) t.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("moved %llu bytes in %.3f s\n", static_cast<unsigned long long>(moved.load()), seconds);
    return failures.load() == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry_stream_load: %s\n", e.what());
    return 1;
  }
}
