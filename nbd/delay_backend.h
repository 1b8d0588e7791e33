// DelayBackend: a filter that makes another backend slow, like nbdkit's
// delay filter: each operation first waits its configured delay, then runs
// on the inner backend. For tests and benchmarks of latency (a remote disk
// 64 ms away) without a real network.
//
// The wait is an asio::steady_timer on the awaiting coroutine's own
// executor: no thread is held while waiting, so any number of delayed
// operations wait at once on one io thread (1,024 concurrent 64 ms writes
// take about 64 ms, not 64 s).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "nbd/backend.h"
#include "rpc/units.h"

namespace ferry::nbd {

struct DelayOptions {
  std::chrono::nanoseconds read{0};
  std::chrono::nanoseconds write{0};
  std::chrono::nanoseconds zero{0};
  std::chrono::nanoseconds trim{0};
  std::chrono::nanoseconds flush{0};
  std::chrono::nanoseconds extents{0};
  std::chrono::nanoseconds cache{0};

  // Every operation waits `d`.
  static DelayOptions all(std::chrono::nanoseconds d) { return {d, d, d, d, d, d, d}; }
};

class DelayBackend : public Backend {
 public:
  DelayBackend(std::shared_ptr<Backend> inner, DelayOptions delays);

  std::uint64_t size() const override { return inner_->size(); }
  Capabilities capabilities() const override { return inner_->capabilities(); }
  // "delay 64 ms over memory 1 GiB"; "delay read 10 ms, write 64 ms over ..."
  // when the delays differ.
  std::string description() const override;

  asio::awaitable<void> read(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map) override;
  asio::awaitable<void> write(std::span<const std::uint8_t> data, std::uint64_t offset, bool fua) override;
  asio::awaitable<void> flush() override;
  asio::awaitable<void> trim(std::uint64_t offset, std::uint64_t length, bool fua) override;
  asio::awaitable<void> zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override;
  asio::awaitable<std::vector<Extent>> extents(std::uint64_t offset, std::uint64_t length) override;
  asio::awaitable<void> cache(std::uint64_t offset, std::uint64_t length) override;

  const std::shared_ptr<Backend>& inner() const { return inner_; }
  const DelayOptions& delays() const { return delays_; }

 private:
  const std::shared_ptr<Backend> inner_;
  const DelayOptions delays_;
};

// Waits `d` on the calling coroutine's executor (a steady_timer); returns at
// once for d <= 0. Throws ferry::Error (CANCELLED, ESHUTDOWN) if the wait is
// cancelled.
asio::awaitable<void> delay_for(std::chrono::nanoseconds d);

// A delay as an export spec writes it (",delay=64ms"): parse_duration;
// errors say "bad delay".
inline std::chrono::nanoseconds parse_delay(std::string_view text) { return parse_duration(text, "delay"); }
inline std::string format_delay(std::chrono::nanoseconds d) { return format_duration(d); }

}  // namespace ferry::nbd
