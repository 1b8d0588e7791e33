#include "rpc/fault_transport.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <asio/error.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include "rpc/error.h"

namespace ferry::rpc {

FaultTransport::FaultTransport(std::unique_ptr<Transport> inner, FaultOptions options)
    : inner_(std::move(inner)), options_(options), injector_(options) {
  peer_ = inner_->peer();
}

FaultTransport::~FaultTransport() = default;

asio::awaitable<void> FaultTransport::wait_delay() {
  if (options_.delay.count() <= 0) co_return;
  asio::steady_timer timer(inner_->get_executor(), options_.delay);
  co_await timer.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
}

asio::awaitable<IoResult> FaultTransport::read_some(asio::mutable_buffer buffer) {
  for (;;) {
    if (injector_.reset()) co_return IoResult{asio::error::connection_reset, 0};
    co_await wait_delay();
    auto [ec, n] = co_await inner_->read_some(buffer);
    if (ec || !options_.on_read) co_return IoResult{ec, n};
    const std::size_t kept = injector_.apply(static_cast<std::uint8_t*>(buffer.data()), n, read_);
    if (injector_.reset()) inner_->close();
    if (kept > 0) co_return IoResult{std::error_code{}, kept};
    if (injector_.reset()) co_return IoResult{asio::error::connection_reset, 0};
    // Every byte of this read was dropped: read again, as a short read
    // would have to.
  }
}

asio::awaitable<IoResult> FaultTransport::write_all(std::span<const asio::const_buffer> buffers) {
  if (injector_.reset()) co_return IoResult{asio::error::connection_reset, 0};
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
  const std::size_t kept = injector_.apply(copy.data(), copy.size(), write_);
  if (kept > 0) {
    const asio::const_buffer one(copy.data(), kept);
    auto [ec, n] = co_await inner_->write_all(std::span<const asio::const_buffer>(&one, 1));
    if (ec) co_return IoResult{ec, n};
  }
  if (injector_.reset()) {
    inner_->close();
    co_return IoResult{asio::error::connection_reset, kept};
  }
  // The caller's bytes all went (some of them altered or lost on purpose).
  co_return IoResult{std::error_code{}, total};
}

}  // namespace ferry::rpc
