// Per-call options and explicit cancellation for the client.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace ferry::rpc {

// A thread-safe "give up" switch that any number of calls may watch, like
// gRPC's ClientContext::TryCancel. Cancelling before a call is sent keeps it
// from ever being sent; during the call it sends CANCEL and the call ends
// with CANCELLED once the server has let go (or with its reply, if that won
// the race); after the reply it does nothing.
class CancelSource {
 public:
  void cancel();
  bool cancelled() const;
  // Runs `fn` on cancel (at once if already cancelled). Returns an id for
  // forget(). `fn` runs on the cancelling thread and must not block.
  std::size_t watch(std::function<void()> fn);
  void forget(std::size_t id);

 private:
  mutable std::mutex mutex_;
  bool cancelled_ = false;
  std::size_t next_id_ = 1;
  std::vector<std::pair<std::size_t, std::function<void()>>> watchers_;
};

struct CallOptions {
  // Time allowed for the whole call. On expiry the call fails at once with
  // DEADLINE_EXCEEDED and a CANCEL is sent so the server stops working on it.
  std::optional<std::chrono::steady_clock::duration> timeout;
  std::shared_ptr<CancelSource> cancel;
};

inline CallOptions with_timeout(std::chrono::steady_clock::duration d) {
  CallOptions o;
  o.timeout = d;
  return o;
}

}  // namespace ferry::rpc
