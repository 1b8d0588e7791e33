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

nanoseconds parse_delay(std::string_view text) {
  const std::string original(text);
  auto bad = [&](const char* why) {
    return Error(Code::invalid_argument, "bad delay \"" + original + "\": " + why, "nbd");
  };
  auto trim = [](std::string_view s) {
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
    return s;
  };
  text = trim(text);
  if (text.empty()) throw bad("empty");
  if (text.front() == '-') throw bad("negative");
  if (text.front() == '+') text.remove_prefix(1);

  // Number: digits, optionally a fraction.
  constexpr std::uint64_t max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  std::uint64_t whole = 0;
  std::uint64_t frac = 0;
  std::uint64_t frac_scale = 1;
  std::size_t i = 0;
  bool digits = false;
  for (; i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); ++i) {
    digits = true;
    if (whole > max / 10) throw bad("too large");
    whole = whole * 10 + static_cast<std::uint64_t>(text[i] - '0');
  }
  if (i < text.size() && text[i] == '.') {
    ++i;
    for (; i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); ++i) {
      digits = true;
      if (frac_scale < 1'000'000'000'000ULL) {  // finer than a picosecond is noise
        frac = frac * 10 + static_cast<std::uint64_t>(text[i] - '0');
        frac_scale *= 10;
      }
    }
  }
  if (!digits) throw bad("no number");

  const std::string_view unit = trim(text.substr(i));
  std::uint64_t ns_per_unit = 0;
  if (unit.empty() || unit == "s" || unit == "sec")
    ns_per_unit = 1'000'000'000ULL;
  else if (unit == "ms")
    ns_per_unit = 1'000'000ULL;
  else if (unit == "us" || unit == "\xc2\xb5s")  // "µs"
    ns_per_unit = 1'000ULL;
  else if (unit == "ns")
    ns_per_unit = 1ULL;
  else if (unit == "min")
    ns_per_unit = 60'000'000'000ULL;
  else
    throw bad("unknown unit (use ns, us, ms, s or min)");

  if (whole > max / ns_per_unit) throw bad("too large");
  std::uint64_t ns = whole * ns_per_unit;
  // frac / frac_scale of a unit, rounded to the nearest nanosecond (in
  // long double: frac * ns_per_unit may not fit 64 bits).
  const long double part = static_cast<long double>(frac) / static_cast<long double>(frac_scale) *
                           static_cast<long double>(ns_per_unit);
  const std::uint64_t extra = static_cast<std::uint64_t>(part + 0.5L);
  if (extra > max - ns) throw bad("too large");
  ns += extra;
  return nanoseconds(static_cast<std::int64_t>(ns));
}

std::string format_delay(nanoseconds d) {
  const std::int64_t ns = d.count();
  if (ns <= 0) return "0";
  struct Unit {
    std::int64_t ns;
    const char* name;
  };
  static constexpr Unit units[] = {{1'000'000'000, "s"}, {1'000'000, "ms"}, {1'000, "us"}, {1, "ns"}};
  for (const Unit& u : units) {
    if (ns < u.ns) continue;
    char text[48];
    if (ns % u.ns == 0)
      std::snprintf(text, sizeof text, "%lld %s", static_cast<long long>(ns / u.ns), u.name);
    else {
      // Up to three decimals, trailing zeros dropped: "1.5 s", "1.234 ms".
      std::snprintf(text, sizeof text, "%.3f", static_cast<double>(ns) / static_cast<double>(u.ns));
      std::string number(text);
      while (number.back() == '0') number.pop_back();
      if (number.back() == '.') number.pop_back();
      return number + " " + u.name;
    }
    return text;
  }
  return "0";
}

}  // namespace ferry::nbd
