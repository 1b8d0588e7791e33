#include "nbd/delay_backend.h"

#include <asio/redirect_error.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <limits>

#include "rpc/error.h"

namespace ferry::nbd {

using std::chrono::nanoseconds;

asio::awaitable<void> delay_for(nanoseconds d) {
  if (d <= nanoseconds::zero()) co_return;
  auto executor = co_await asio::this_coro::executor;
  asio::steady_timer timer(executor, d);
  std::error_code ec;
  co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  if (ec) throw Error(Code::cancelled, "delay cancelled: " + ec.message(), "nbd", false, ESHUTDOWN);
}

DelayBackend::DelayBackend(std::shared_ptr<Backend> inner, DelayOptions delays)
    : inner_(std::move(inner)), delays_(delays) {
  if (!inner_) throw Error(Code::invalid_argument, "delay backend: no inner backend", "nbd");
}

std::string DelayBackend::description() const {
  const DelayOptions& d = delays_;
  std::string what;
  if (d.read == d.write && d.write == d.zero && d.zero == d.trim && d.trim == d.flush && d.flush == d.extents &&
      d.extents == d.cache) {
    what = format_delay(d.read);
  } else {
    const std::pair<const char*, nanoseconds> parts[] = {{"read", d.read},   {"write", d.write},
                                                         {"zero", d.zero},   {"trim", d.trim},
                                                         {"flush", d.flush}, {"extents", d.extents},
                                                         {"cache", d.cache}};
    for (const auto& [name, value] : parts) {
      if (value <= nanoseconds::zero()) continue;
      if (!what.empty()) what += ", ";
      what += std::string(name) + " " + format_delay(value);
    }
    if (what.empty()) what = "0";
  }
  return "delay " + what + " over " + inner_->description();
}

asio::awaitable<void> DelayBackend::read(std::span<std::uint8_t> out, std::uint64_t offset,
                                         std::vector<Extent>* map) {
  co_await delay_for(delays_.read);
  co_await inner_->read(out, offset, map);
}

asio::awaitable<void> DelayBackend::write(std::span<const std::uint8_t> data, std::uint64_t offset, bool fua) {
  co_await delay_for(delays_.write);
  co_await inner_->write(data, offset, fua);
}

asio::awaitable<void> DelayBackend::flush() {
  co_await delay_for(delays_.flush);
  co_await inner_->flush();
}

asio::awaitable<void> DelayBackend::trim(std::uint64_t offset, std::uint64_t length, bool fua) {
  co_await delay_for(delays_.trim);
  co_await inner_->trim(offset, length, fua);
}

asio::awaitable<void> DelayBackend::zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) {
  co_await delay_for(delays_.zero);
  co_await inner_->zero(offset, length, flags);
}

asio::awaitable<std::vector<Extent>> DelayBackend::extents(std::uint64_t offset, std::uint64_t length) {
  co_await delay_for(delays_.extents);
  co_return co_await inner_->extents(offset, length);
}

asio::awaitable<void> DelayBackend::cache(std::uint64_t offset, std::uint64_t length) {
  co_await delay_for(delays_.cache);
  co_await inner_->cache(offset, length);
}



}  // namespace ferry::nbd
