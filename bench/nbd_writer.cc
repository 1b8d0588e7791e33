// The deep-queue NBD writer behind the nbd.delay64.* rows (nbd_writer.h).
// One libnbd handle, driven from the calling thread: requests are issued
// with nbd_aio_pwrite, nbd_poll runs the state machine in whichever
// direction it needs (sending requests and reading replies interleave), and
// the completion callback only records the outcome; refilling happens in
// the loop, since a callback must not call back into the same handle.
#include "bench/nbd_writer.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "bench/harness.h"

#if FERRY_BENCH_HAVE_LIBNBD
#include <libnbd.h>
#endif

namespace ferry::bench {

#if FERRY_BENCH_HAVE_LIBNBD

namespace {

struct Writer;

// One request in flight; its address is the completion callback's
// user_data, so slots never move once the loop has started.
struct Slot {
  Writer* writer = nullptr;
  int index = 0;
  Clock::time_point issued;
};

struct Writer {
  std::vector<Slot> slots;
  std::vector<int> free_slots;
  int in_flight = 0;
  std::uint64_t completed = 0;
  std::uint64_t failed = 0;
  int first_error = 0;
  Clock::time_point last_completion;
  std::vector<double> latencies_ms;
};

// Runs with the handle's lock held: records, never calls nbd_*. Returns 1
// so libnbd retires the command itself.
int on_write_done(void* user_data, int* error) {
  Slot& slot = *static_cast<Slot*>(user_data);
  Writer& w = *slot.writer;
  const auto now = Clock::now();
  if (*error != 0) {
    if (w.failed++ == 0) w.first_error = *error;
  } else {
    ++w.completed;
  }
  w.latencies_ms.push_back(std::chrono::duration<double, std::milli>(now - slot.issued).count());
  w.last_completion = now;
  --w.in_flight;
  w.free_slots.push_back(slot.index);
  return 1;
}

struct HandleCloser {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using Handle = std::unique_ptr<nbd_handle, HandleCloser>;

[[noreturn]] void fail(const std::string& what) {
  const char* why = nbd_get_error();
  throw std::runtime_error("libnbd writer: " + what + ": " + (why ? why : "unknown error"));
}

}  // namespace

NbdWriteResult nbd_deep_write(const std::string& socket, const std::string& export_name, int depth,
                              std::uint64_t request_bytes, std::uint64_t total_bytes) {
  if (depth < 1) throw std::invalid_argument("nbd_deep_write: depth must be at least 1");
  if (request_bytes == 0 || total_bytes == 0 || total_bytes % request_bytes != 0)
    throw std::invalid_argument("nbd_deep_write: total bytes must be a non-zero multiple of the request size");
  const std::uint64_t total_requests = total_bytes / request_bytes;

  // Declared before the handle: the handle is closed first, so nothing
  // libnbd still holds can point into freed slots.
  Writer w;
  w.slots.resize(static_cast<std::size_t>(depth));
  for (int i = depth - 1; i >= 0; --i) {
    w.slots[static_cast<std::size_t>(i)].writer = &w;
    w.slots[static_cast<std::size_t>(i)].index = i;
    w.free_slots.push_back(i);
  }
  w.latencies_ms.reserve(static_cast<std::size_t>(total_requests));

  // One buffer for every request: writes only read it. Non-zero bytes, so
  // no layer can take the data for zeroes.
  std::vector<unsigned char> buffer(static_cast<std::size_t>(request_bytes));
  for (std::size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<unsigned char>(1 + (i * 131 + 7) % 255);

  Handle h(nbd_create());
  if (!h) fail("nbd_create");
  if (nbd_set_export_name(h.get(), export_name.c_str()) == -1) fail("nbd_set_export_name");
  if (nbd_connect_unix(h.get(), socket.c_str()) == -1) fail("connect to " + socket);
  if (nbd_is_read_only(h.get()) == 1) throw std::runtime_error("libnbd writer: export is read-only");
  const std::int64_t size = nbd_get_size(h.get());
  if (size < 0) fail("nbd_get_size");
  if (static_cast<std::uint64_t>(size) < request_bytes)
    throw std::runtime_error("libnbd writer: export smaller than one request");
  // Offsets run 0, R, 2R, ... and wrap to 0 before a request would pass
  // the end of the export.
  const std::uint64_t wrap = static_cast<std::uint64_t>(size) - static_cast<std::uint64_t>(size) % request_bytes;

  NbdWriteResult result;
  std::uint64_t issued = 0;
  std::uint64_t offset = 0;
  const auto begin = Clock::now();
  w.last_completion = begin;
  for (;;) {
    while (w.failed == 0 && w.in_flight < depth && issued < total_requests) {
      Slot& slot = w.slots[static_cast<std::size_t>(w.free_slots.back())];
      w.free_slots.pop_back();
      // Counted before the call: libnbd may run the state machine, and so
      // complete earlier requests, inside nbd_aio_pwrite.
      ++w.in_flight;
      result.max_in_flight = std::max(result.max_in_flight, w.in_flight);
      slot.issued = Clock::now();
      const nbd_completion_callback done = {.callback = on_write_done, .user_data = &slot, .free = nullptr};
      if (nbd_aio_pwrite(h.get(), buffer.data(), buffer.size(), offset, done, 0) == -1) fail("nbd_aio_pwrite");
      ++issued;
      offset += request_bytes;
      if (offset >= wrap) offset = 0;
    }
    if (w.in_flight == 0) break;
    if (nbd_poll(h.get(), -1) == -1) fail("nbd_poll");
  }
  if (w.failed != 0)
    throw std::runtime_error("libnbd writer: " + std::to_string(w.failed) + " of " +
                             std::to_string(w.failed + w.completed) + " writes failed: " + std::strerror(w.first_error));
  if (w.completed != total_requests)
    throw std::runtime_error("libnbd writer: " + std::to_string(w.completed) + " of " +
                             std::to_string(total_requests) + " writes completed");
  result.seconds = std::chrono::duration<double>(w.last_completion - begin).count();
  result.requests = w.completed;
  result.bytes = w.completed * request_bytes;

  if (nbd_shutdown(h.get(), 0) == -1) fail("nbd_shutdown");
  h.reset();

  auto& lat = w.latencies_ms;
  std::sort(lat.begin(), lat.end());
  double sum = 0;
  for (double v : lat) sum += v;
  result.latency_min_ms = lat.front();
  result.latency_p50_ms = lat[lat.size() / 2];
  result.latency_max_ms = lat.back();
  result.latency_mean_ms = sum / static_cast<double>(lat.size());
  return result;
}

#else

NbdWriteResult nbd_deep_write(const std::string&, const std::string&, int, std::uint64_t, std::uint64_t) {
  throw Unavailable("ferry_bench built without libnbd (libnbd-dev)");
}

#endif

}  // namespace ferry::bench
