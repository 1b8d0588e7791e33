#include "daemon/copy_state.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <sstream>
#include <vector>

#include "rpc/error.h"

namespace ferry::daemon {

namespace {

bool parse_hex(const std::string& text, Digest& out) {
  if (text.size() != 32) return false;
  for (std::size_t i = 0; i < 16; ++i) {
    unsigned v = 0;
    if (std::sscanf(text.c_str() + 2 * i, "%2x", &v) != 1) return false;
    out[i] = static_cast<std::uint8_t>(v);
  }
  return true;
}

void write_all(int fd, const std::string& text, const std::string& what) {
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error::from_errno(errno, what);
    }
    done += static_cast<std::size_t>(n);
  }
}

}  // namespace

std::string CopyState::summary() const {
  return "copy from " + (source.empty() ? std::string("an unnamed source") : source) + ": " +
         std::to_string(committed.size()) + " of " + std::to_string(extents()) + " extents committed";
}

std::string copy_state_file(const std::string& volume_name) { return ".ferry-copy." + volume_name; }

std::optional<CopyState> read_copy_state(int dirfd, const std::string& volume_name) {
  const std::string file = copy_state_file(volume_name);
  const int fd = ::openat(dirfd, file.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::nullopt;
    throw Error::from_errno(errno, "open the copy state of " + volume_name);
  }
  std::string text;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  CopyState state;
  std::istringstream in(text);
  std::string line;
  auto bad = [&](const std::string& why) {
    return Error(Code::data_loss, "the copy state of " + volume_name + " (" + file + ") is unreadable: " + why, "volume");
  };
  if (!std::getline(in, line) || in.eof()) throw bad("no header");
  unsigned long long capacity = 0, extent = 0;
  long long started = 0;
  if (std::sscanf(line.c_str(), "ferry-copy 1 capacity=%llu extent=%llu started=%lld", &capacity, &extent, &started) != 3 ||
      extent == 0)
    throw bad("header '" + line + "'");
  state.capacity = capacity;
  state.extent_size = extent;
  state.started_ns = started;
  if (!std::getline(in, line) || in.eof() || line.rfind("source ", 0) != 0) throw bad("no source line");
  state.source = line.substr(7);
  // Extent lines; the last one counts only if its newline made it to disk.
  while (std::getline(in, line)) {
    if (in.eof()) break;  // no newline after it: cut short
    const auto space = line.find(' ');
    if (space == std::string::npos) continue;
    Digest d;
    if (!parse_hex(line.substr(space + 1), d)) continue;
    char* end = nullptr;
    const unsigned long long index = std::strtoull(line.c_str(), &end, 10);
    if (end != line.c_str() + space || index >= state.extents()) continue;
    state.committed[index] = d;
  }
  return state;
}

void create_copy_state(int dirfd, const std::string& volume_name, const CopyState& state) {
  const std::string file = copy_state_file(volume_name);
  const int fd = ::openat(dirfd, file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) throw Error::from_errno(errno, "create the copy state of " + volume_name);
  try {
    std::string source = state.source;
    for (char& c : source)
      if (c == '\n' || c == '\r') c = ' ';
    write_all(fd,
              "ferry-copy 1 capacity=" + std::to_string(state.capacity) + " extent=" + std::to_string(state.extent_size) +
                  " started=" + std::to_string(state.started_ns) + "\nsource " + source + "\n",
              "write the copy state of " + volume_name);
    for (const auto& [index, d] : state.committed)
      write_all(fd, std::to_string(index) + " " + digest_hex(d) + "\n", "write the copy state of " + volume_name);
    if (::fdatasync(fd) != 0) throw Error::from_errno(errno, "sync the copy state of " + volume_name);
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  ::fsync(dirfd);
}

void append_committed(int dirfd, const std::string& volume_name, std::uint64_t index, const Digest& digest,
                      bool sync) {
  const std::string file = copy_state_file(volume_name);
  const int fd = ::openat(dirfd, file.c_str(), O_WRONLY | O_APPEND | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) throw Error::from_errno(errno, "open the copy state of " + volume_name);
  try {
    write_all(fd, std::to_string(index) + " " + digest_hex(digest) + "\n", "record extent " + std::to_string(index) +
                                                                                " in the copy state of " + volume_name);
    if (sync && ::fdatasync(fd) != 0) throw Error::from_errno(errno, "sync the copy state of " + volume_name);
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
}

void remove_copy_state(int dirfd, const std::string& volume_name) {
  if (::unlinkat(dirfd, copy_state_file(volume_name).c_str(), 0) != 0 && errno != ENOENT)
    throw Error::from_errno(errno, "remove the copy state of " + volume_name);
  ::fsync(dirfd);
}

}  // namespace ferry::daemon
