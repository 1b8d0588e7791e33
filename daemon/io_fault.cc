#include "daemon/io_fault.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "rpc/error.h"
#include "rpc/fault.h"
#include "rpc/units.h"

namespace ferry::daemon {

namespace {

// The errors a volume's file operations can meet in the field.
constexpr std::pair<const char*, int> errno_names[] = {
    {"EIO", EIO},       {"ENOSPC", ENOSPC}, {"EDQUOT", EDQUOT}, {"EROFS", EROFS}, {"EFBIG", EFBIG},
    {"EPERM", EPERM},   {"EACCES", EACCES}, {"ENOMEM", ENOMEM},
    {"EBADF", EBADF},   {"ENODEV", ENODEV}, {"ENXIO", ENXIO},   {"ESTALE", ESTALE}, {"EOPNOTSUPP", EOPNOTSUPP},
    {"ETIMEDOUT", ETIMEDOUT},
};

struct OpName {
  const char* name;
  IoFaultOptions::Op op;
};
constexpr OpName op_names[] = {{"read", IoFaultOptions::read},
                               {"write", IoFaultOptions::write},
                               {"punch", IoFaultOptions::punch},
                               {"datasync", IoFaultOptions::datasync}};

// The file name an open descriptor was opened as ("" if unknown).
std::string file_name(int fd) {
  char link[64];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  char target[4096];
  const ssize_t n = ::readlink(link, target, sizeof target - 1);
  if (n <= 0) return {};
  std::string path(target, static_cast<std::size_t>(n));
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

int errno_from_name(std::string_view name) {
  for (const auto& [n, e] : errno_names)
    if (name == n) return e;
  if (const auto v = parse_size(name); v && *v > 0 && *v < 4096) return static_cast<int>(*v);
  return 0;
}

std::string errno_name(int error) {
  for (const auto& [n, e] : errno_names)
    if (e == error) return n;
  return std::to_string(error);
}

IoFaultOptions IoFaultOptions::parse(std::string_view spec) {
  IoFaultOptions o;
  const std::string whole(spec);
  auto bad = [&](const std::string& why) {
    return Error(Code::invalid_argument, "bad volume fault spec \"" + whole + "\": " + why);
  };
  bool fails = false;  // errno, after, every or times given
  rpc::for_each_key_value(spec, [&](const std::string& key, std::string_view value) {
    auto count = [&]() {
      const auto n = parse_size(value);
      if (!n) throw bad(key + "=" + std::string(value) + " is not a count (like 3 or 8M)");
      fails = true;
      return *n;
    };
    if (key == "op") {
      o.ops = 0;
      std::string_view rest = value;
      while (!rest.empty()) {
        const std::size_t plus = rest.find('+');
        const std::string_view one = rest.substr(0, plus);
        rest = plus == std::string_view::npos ? std::string_view{} : rest.substr(plus + 1);
        bool known = false;
        for (const auto& n : op_names)
          if (one == n.name) o.ops |= n.op, known = true;
        if (one == "all") o.ops = all, known = true;
        if (!known) throw bad("op is read, write, punch, datasync or all (joined by '+'), not '" + std::string(one) + "'");
      }
      if (o.ops == 0) throw bad("op names no operation");
    } else if (key == "errno") {
      o.error = errno_from_name(value);
      if (o.error == 0) throw bad("errno=" + std::string(value) + " is not an errno name (EIO, ENOSPC, ...) or number");
    } else if (key == "after") {
      o.after = count();
    } else if (key == "every") {
      o.every = count();
      if (o.every == 0) throw bad("every=0 fails nothing; leave it out");
    } else if (key == "times") {
      o.times = count();
    } else if (key == "volume") {
      if (value.empty() || value.find('/') != std::string_view::npos) throw bad("volume is a volume's name");
      o.volume = std::string(value);
    } else if (key == "delay") {
      try {
        o.delay = std::chrono::duration_cast<std::chrono::microseconds>(parse_duration(value, "delay"));
      } catch (const Error& e) {
        throw bad(e.message());
      }
    } else {
      throw bad("unknown key '" + key + "' (op, errno, after, every, times, volume, delay)");
    }
  }, bad);
  if (fails && o.error == 0) o.error = EIO;
  return o;
}

std::string IoFaultOptions::describe() const {
  if (!any()) return "none";
  std::string out;
  auto add = [&](const std::string& part) { out += (out.empty() ? "" : ",") + part; };
  if (ops != all) {
    std::string names;
    for (const auto& n : op_names)
      if (ops & n.op) names += (names.empty() ? "" : "+") + std::string(n.name);
    add("op=" + names);
  }
  if (error) add("errno=" + errno_name(error));
  if (after) add("after=" + std::to_string(after));
  if (every) add("every=" + std::to_string(every));
  if (times) add("times=" + std::to_string(times));
  if (!volume.empty()) add("volume=" + volume);
  if (delay.count() > 0) add("delay=" + std::to_string(delay.count()) + "us");
  return out;
}

int IoFault::check(IoFaultOptions::Op op, int fd, std::uint64_t length) {
  if (options_.error == 0 || !(options_.ops & op)) return 0;
  if (!options_.volume.empty()) {
    const std::string name = file_name(fd);
    // An atomic upload writes ".ferry-upload.<volume>.<suffix>" first.
    const std::string temp = ".ferry-upload." + options_.volume + ".";
    if (name != options_.volume && name.rfind(temp, 0) != 0) return 0;
  }
  // Past `after` once the bytes asked of the chosen ops, this one
  // included, exceed it; an op that moves nothing (datasync) once they
  // reach it.
  const std::uint64_t before = bytes_.fetch_add(length);
  const bool past = length > 0 ? before + length > options_.after : before >= options_.after;
  if (!past) return 0;
  const std::uint64_t n = count_.fetch_add(1) + 1;
  if (options_.every != 0 && n % options_.every != 0) return 0;
  if (options_.times != 0) {
    std::uint64_t f = failed_.load();
    do {
      if (f >= options_.times) return 0;
    } while (!failed_.compare_exchange_weak(f, f + 1));
    return options_.error;
  }
  failed_.fetch_add(1);
  return options_.error;
}

}  // namespace ferry::daemon
