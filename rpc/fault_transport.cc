#include "rpc/fault_transport.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <asio/error.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

namespace ferry::rpc {

namespace {

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

bool hits(std::uint64_t position, std::uint64_t every) { return every != 0 && (position + 1) % every == 0; }

}  // namespace

FaultTransport::FaultTransport(std::unique_ptr<Transport> inner, FaultOptions options)
    : inner_(std::move(inner)), options_(options) {
  peer_ = inner_->peer();
}

FaultTransport::~FaultTransport() = default;

asio::awaitable<void> FaultTransport::wait_delay() {
  if (options_.delay.count() <= 0) co_return;
  asio::steady_timer timer(inner_->get_executor(), options_.delay);
  co_await timer.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
}

std::size_t FaultTransport::apply(std::uint8_t* data, std::size_t n, Direction& dir) {
  if (options_.reset_after != 0) {
    const std::uint64_t left = options_.reset_after > dir.position ? options_.reset_after - dir.position : 0;
    if (n >= left) {
      n = static_cast<std::size_t>(left);
      counts_.reset = true;
    }
  }
  std::size_t out = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t at = dir.position + i;
    if (hits(at, options_.drop_every)) {
      ++counts_.dropped;
      continue;
    }
    std::uint8_t byte = data[i];
    if (hits(at, options_.corrupt_every)) {
      byte ^= static_cast<std::uint8_t>(1u << (mix(options_.seed ^ at) & 7));
      ++counts_.corrupted;
    }
    data[out++] = byte;
  }
  dir.position += n;
  return out;
}

asio::awaitable<IoResult> FaultTransport::read_some(asio::mutable_buffer buffer) {
  for (;;) {
    if (counts_.reset) co_return IoResult{asio::error::connection_reset, 0};
    co_await wait_delay();
    auto [ec, n] = co_await inner_->read_some(buffer);
    if (ec || !options_.on_read) co_return IoResult{ec, n};
    const std::size_t kept = apply(static_cast<std::uint8_t*>(buffer.data()), n, read_);
    if (counts_.reset) inner_->close();
    if (kept > 0) co_return IoResult{std::error_code{}, kept};
    if (counts_.reset) co_return IoResult{asio::error::connection_reset, 0};
    // Every byte of this read was dropped: read again, as a short read
    // would have to.
  }
}

asio::awaitable<IoResult> FaultTransport::write_all(std::span<const asio::const_buffer> buffers) {
  if (counts_.reset) co_return IoResult{asio::error::connection_reset, 0};
  co_await wait_delay();
  if (!options_.on_write || (options_.corrupt_every == 0 && options_.drop_every == 0 && options_.reset_after == 0))
    co_return co_await inner_->write_all(buffers);
  std::size_t total = 0;
  for (const auto& b : buffers) total += b.size();
  std::vector<std::uint8_t> copy(total);
  std::size_t at = 0;
  for (const auto& b : buffers) {
    std::memcpy(copy.data() + at, b.data(), b.size());
    at += b.size();
  }
  const std::size_t kept = apply(copy.data(), copy.size(), write_);
  if (kept > 0) {
    const asio::const_buffer one(copy.data(), kept);
    auto [ec, n] = co_await inner_->write_all(std::span<const asio::const_buffer>(&one, 1));
    if (ec) co_return IoResult{ec, n};
  }
  if (counts_.reset) {
    inner_->close();
    co_return IoResult{asio::error::connection_reset, kept};
  }
  // The caller's bytes all went (some of them altered or lost on purpose).
  co_return IoResult{std::error_code{}, total};
}

}  // namespace ferry::rpc
