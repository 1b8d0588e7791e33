#include "rpc/fault_transport.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <asio/error.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include "rpc/error.h"
#include "rpc/units.h"

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

FaultOptions FaultOptions::parse(std::string_view spec) {
  FaultOptions o;
  const std::string whole(spec);
  auto bad = [&](const std::string& why) {
    return Error(Code::invalid_argument, "bad fault spec \"" + whole + "\": " + why);
  };
  while (!spec.empty()) {
    const std::size_t comma = spec.find(',');
    const std::string_view part = spec.substr(0, comma);
    spec = comma == std::string_view::npos ? std::string_view{} : spec.substr(comma + 1);
    if (part.empty()) continue;
    const std::size_t eq = part.find('=');
    if (eq == std::string_view::npos) throw bad("'" + std::string(part) + "' is not key=value");
    const std::string key(part.substr(0, eq));
    const std::string_view value = part.substr(eq + 1);
    auto count = [&]() {
      const auto n = parse_size(value);
      if (!n) throw bad(key + "=" + std::string(value) + " is not a count (like 4096 or 1M)");
      return *n;
    };
    if (key == "delay") {
      try {
        o.delay = std::chrono::duration_cast<std::chrono::microseconds>(parse_duration(value, "delay"));
      } catch (const Error& e) {
        throw bad(e.message());
      }
    } else if (key == "corrupt_every") {
      o.corrupt_every = count();
    } else if (key == "drop_every") {
      o.drop_every = count();
    } else if (key == "reset_after") {
      o.reset_after = count();
    } else if (key == "seed") {
      o.seed = count();
    } else if (key == "direction") {
      if (value == "read") {
        o.on_read = true, o.on_write = false;
      } else if (value == "write") {
        o.on_read = false, o.on_write = true;
      } else if (value == "both") {
        o.on_read = o.on_write = true;
      } else {
        throw bad("direction is read, write or both, not '" + std::string(value) + "'");
      }
    } else {
      throw bad("unknown key '" + key + "' (delay, corrupt_every, drop_every, reset_after, direction, seed)");
    }
  }
  return o;
}

std::string FaultOptions::describe() const {
  if (!any()) return "none";
  std::string out;
  auto add = [&](const std::string& part) { out += (out.empty() ? "" : ",") + part; };
  if (delay.count() > 0) add("delay=" + std::to_string(delay.count()) + "us");
  if (corrupt_every) add("corrupt_every=" + std::to_string(corrupt_every));
  if (drop_every) add("drop_every=" + std::to_string(drop_every));
  if (reset_after) add("reset_after=" + std::to_string(reset_after));
  add(std::string("direction=") + (on_read && on_write ? "both" : on_read ? "read" : "write"));
  return out;
}

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
