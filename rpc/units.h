// Sizes and durations as people write them in flags, configuration files
// and fault specs.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ferry {

// "10G", "512MiB", "4096", "1.5T", "2gb" -> bytes (binary multiples);
// nullopt if it is not a size or not a whole number of bytes.
std::optional<std::uint64_t> parse_size(std::string_view text);

// "64ms", "1s", "1.5s", "250us", "100ns", "1min", "0"; a bare number is
// seconds, and "64 ms" with a space is accepted too. Throws ferry::Error
// (INVALID_ARGUMENT, "bad <what> ...: why") on anything else, including
// negative values.
std::chrono::nanoseconds parse_duration(std::string_view text, std::string_view what = "duration");

// "64 ms", "1 s", "1.5 s", "250 us", "0": the inverse, for descriptions and logs.
std::string format_duration(std::chrono::nanoseconds d);

}  // namespace ferry
