// Volume I/O faults on purpose: a filter in FileIo that fails chosen file
// operations with a chosen errno, or delays them, so that tests (and
// operators reproducing a field problem, through ferryd's [fault] volume)
// can drive every error path of uploads, downloads, NBD and copies with a
// real disk underneath.
//
//   op=write,errno=ENOSPC,after=8M        every write once 8 MiB were written
//   op=read,errno=EIO,every=3,times=2      the 3rd and 6th read, then no more
//   op=datasync,errno=EIO,volume=disk.img  every fdatasync of disk.img
//   op=write,delay=20ms                    each write 20 ms late, none failed
//
// `op` is read, write, punch (hole punching and zeroing), datasync, or a
// list joined by '+' (default: all). `after` counts bytes moved by the
// chosen ops on the chosen volume(s) since the daemon started; an op that
// would cross it fails. `every` fails each Nth chosen op (once past
// `after`); without it every op past `after` fails. `times` caps how many
// fail in all (0: no cap). `volume` limits the filter to files of that name
// in any pool. Nothing fails unless errno, every, after or times is given.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

namespace ferry::daemon {

struct IoFaultOptions {
  enum Op : unsigned { read = 1, write = 2, punch = 4, datasync = 8, all = 15 };
  unsigned ops = all;
  int error = 0;  // errno to fail with; 0: fail nothing (delay only)
  std::uint64_t after = 0;
  std::uint64_t every = 0;
  std::uint64_t times = 0;
  std::string volume;
  std::chrono::microseconds delay{0};

  bool any() const { return error != 0 || delay.count() > 0; }
  // Throws ferry::Error (INVALID_ARGUMENT) naming the part it cannot read.
  static IoFaultOptions parse(std::string_view spec);
  std::string describe() const;
};

// The filter's state: thread-safe, consulted before each file operation.
class IoFault {
 public:
  explicit IoFault(IoFaultOptions options) : options_(std::move(options)) {}
  // What to do with one operation of `op` moving `length` bytes on `fd`:
  // 0 to let it run, or the errno it fails with.
  int check(IoFaultOptions::Op op, int fd, std::uint64_t length);
  std::chrono::microseconds delay(IoFaultOptions::Op op) const {
    return (options_.ops & op) ? options_.delay : std::chrono::microseconds{0};
  }
  std::uint64_t failed() const { return failed_.load(); }
  const IoFaultOptions& options() const { return options_; }

 private:
  IoFaultOptions options_;
  std::atomic<std::uint64_t> bytes_{0};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<std::uint64_t> failed_{0};
};

// "EIO" -> 5, "28" -> 28; 0 if it is neither a known name nor a number.
// (EINTR and EAGAIN are not offered: FileIo retries those.)
int errno_from_name(std::string_view name);
std::string errno_name(int error);

}  // namespace ferry::daemon
