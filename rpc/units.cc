#include "rpc/units.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "rpc/error.h"

namespace ferry {

using std::chrono::nanoseconds;

std::optional<std::uint64_t> parse_size(std::string_view view) {
  const std::string text(view);
  if (text.empty()) return std::nullopt;
  std::size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) return std::nullopt;
  const std::string number = text.substr(0, i);
  std::string unit = text.substr(i);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (unit.size() > 1 && unit.back() == 'B') unit.pop_back();  // "GB", "GIB" -> "G", "GI"
  if (unit.size() > 1 && unit.back() == 'I') unit.pop_back();
  unsigned shift = 0;
  if (unit.empty() || unit == "B") shift = 0;
  else if (unit == "K") shift = 10;
  else if (unit == "M") shift = 20;
  else if (unit == "G") shift = 30;
  else if (unit == "T") shift = 40;
  else if (unit == "P") shift = 50;
  else return std::nullopt;
  if (number.find('.') != std::string::npos) {
    char* end = nullptr;
    const double v = std::strtod(number.c_str(), &end);
    if (*end || v < 0) return std::nullopt;
    const double bytes = v * std::ldexp(1.0, static_cast<int>(shift));
    if (bytes >= 9.2e18 || bytes != std::floor(bytes)) return std::nullopt;
    return static_cast<std::uint64_t>(bytes);
  }
  if (number.size() > 19) return std::nullopt;
  const std::uint64_t v = std::stoull(number);
  if (shift && v > ((1ull << 63) - 1) >> shift) return std::nullopt;
  return v << shift;
}

nanoseconds parse_duration(std::string_view text, std::string_view what) {
  const std::string original(text);
  auto bad = [&](const char* why) {
    return Error(Code::invalid_argument, "bad " + std::string(what) + " \"" + original + "\": " + why, "rpc");
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

std::string format_duration(nanoseconds d) {
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

}  // namespace ferry
