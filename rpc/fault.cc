#include "rpc/fault.h"

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
  for_each_key_value(spec, [&](const std::string& key, std::string_view value) {
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
  }, bad);
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

std::size_t FaultInjector::apply(std::uint8_t* data, std::size_t n, Direction& dir) {
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

}  // namespace ferry::rpc
