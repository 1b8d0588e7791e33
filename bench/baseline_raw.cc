// Raw-socket baselines: the same bytes a ferry frame would carry, moved with
// the fewest syscalls a blocking program can manage.
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "bench/baselines.h"
#include "bench/harness.h"

namespace ferry::bench {
namespace {

constexpr uint32_t max_frame_bytes = 32u << 20;
constexpr uint32_t type_call = 0;
constexpr uint32_t type_data_chunk = 3;
constexpr uint32_t status_ok = 0;
constexpr uint32_t status_continue = 2;

// Fills a 28-byte length prefix + header as ferry's wire protocol v1 lays it
// out, so the baseline's bytes on the wire match a real frame's.
void fill_frame_head(unsigned char* out, std::size_t body, uint32_t type, uint32_t serial,
                     uint32_t status) {
  put_be32(out, static_cast<uint32_t>(24 + body));
  put_be32(out + 4, 1);    // program
  put_be32(out + 8, 1);    // version
  put_be32(out + 12, 1);   // procedure
  put_be32(out + 16, type);
  put_be32(out + 20, serial);
  put_be32(out + 24, status);
}

std::string server_address(const CaseOptions& options, const ScratchDir& dir,
                           const char* unix_name, bool tcp) {
  if (!options.addr.empty()) return options.addr;
  if (tcp) {
    if (!options.server_netns.empty()) {
      throw std::runtime_error("tcp across network namespaces needs --addr");
    }
    return "tcp:127.0.0.1:0";
  }
  return dir.unix_address(unix_name);
}

// Reads whatever is there and echoes every complete frame with one write,
// the way an efficient single-threaded server batches.
void echo_connection(Fd fd) {
  std::vector<unsigned char> buf(64 * 1024);
  std::size_t have = 0;
  for (;;) {
    ssize_t n = ::read(fd.get(), buf.data() + have, buf.size() - have);
    if (n == 0) return;
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    have += static_cast<std::size_t>(n);
    std::size_t complete = 0;
    std::size_t need = 0;
    while (have - complete >= 4) {
      uint32_t len = get_be32(buf.data() + complete);
      if (len > max_frame_bytes) return;
      if (have - complete < 4 + std::size_t{len}) {
        need = 4 + std::size_t{len};
        break;
      }
      complete += 4 + std::size_t{len};
    }
    if (complete > 0) {
      write_all(fd.get(), buf.data(), complete);
      std::memmove(buf.data(), buf.data() + complete, have - complete);
      have -= complete;
    }
    if (need > buf.size()) buf.resize(need);
  }
}

// Consumes requests of the form: u64 byte count, then that many bytes; each
// is acknowledged with one byte once the last of it has been read, so the
// client's clock covers delivery, not just buffering.
void sink_connection(Fd fd) {
  std::vector<unsigned char> buf(body_chunk_bytes);
  for (;;) {
    unsigned char head[8];
    if (!read_exact(fd.get(), head, sizeof head)) return;
    uint64_t left = get_be64(head);
    while (left > 0) {
      std::size_t want = left < buf.size() ? static_cast<std::size_t>(left) : buf.size();
      ssize_t n = ::read(fd.get(), buf.data(), want);
      if (n == 0) return;
      if (n < 0) {
        if (errno == EINTR) continue;
        return;
      }
      left -= static_cast<uint64_t>(n);
    }
    unsigned char ack = 1;
    write_all(fd.get(), &ack, 1);
  }
}

template <typename Handler>
int serve_forever(const std::string& listen, Handler handler) {
  Address address = Address::parse(listen);
  Fd listener = listen_on(address);
  signal_ready(address.str());
  for (;;) {
    Fd fd = accept_from(listener.get());
    std::thread([handler, fd = std::move(fd)]() mutable {
      try {
        handler(std::move(fd));
      } catch (const std::exception&) {
        // A client that vanished mid-message ends only its own connection.
      }
    }).detach();
  }
}

}  // namespace

int serve_raw_echo(const std::string& listen) { return serve_forever(listen, echo_connection); }

int serve_raw_sink(const std::string& listen) { return serve_forever(listen, sink_connection); }

// The reverse of the sink: read an 8-byte total, then write that many bytes
// as 256 KiB bodies with a 28-byte header each.
void source_connection(Fd fd) {
  std::vector<unsigned char> body(body_chunk_bytes);
  for (std::size_t i = 0; i < body.size(); ++i) body[i] = static_cast<unsigned char>(i * 131 + 7);
  unsigned char head[frame_overhead_bytes];
  for (;;) {
    unsigned char req[8];
    if (!read_exact(fd.get(), req, sizeof req)) return;
    uint64_t left = get_be64(req);
    while (left > 0) {
      std::size_t n = left < body.size() ? static_cast<std::size_t>(left) : body.size();
      fill_frame_head(head, n, type_data_chunk, 1, status_continue);
      iovec iov[2] = {{head, sizeof head}, {body.data(), n}};
      writev_all(fd.get(), iov, 2);
      left -= n;
    }
  }
}

int serve_raw_source(const std::string& listen) { return serve_forever(listen, source_connection); }

Measurement raw_echo_seq(const CaseOptions& options) {
  ScratchDir dir;
  std::string listen = server_address(options, dir, "echo.sock", false);
  ChildProcess server =
      spawn_server({self_exe(), "serve-raw-echo", "--listen", listen}, options.server_netns);
  Fd fd = connect_to(Address::parse(server.ready_info()));

  const std::size_t frame_bytes = frame_overhead_bytes + echo_payload_bytes;
  std::vector<unsigned char> request(frame_bytes, 0x5a);
  std::vector<unsigned char> reply(4096);
  uint32_t serial = 0;

  auto call = [&] {
    fill_frame_head(request.data(), echo_payload_bytes, type_call, ++serial, status_ok);
    write_all(fd.get(), request.data(), request.size());
    std::size_t have = 0;
    while (have < 4 || have < 4 + std::size_t{get_be32(reply.data())}) {
      ssize_t n = ::read(fd.get(), reply.data() + have, reply.size() - have);
      if (n == 0) throw std::runtime_error("echo server closed the connection");
      if (n < 0) {
        if (errno == EINTR) continue;
        throw std::runtime_error("read from echo server failed");
      }
      have += static_cast<std::size_t>(n);
    }
    if (have != frame_bytes || get_be32(reply.data() + 20) != serial) {
      throw std::runtime_error("echo server sent a malformed reply");
    }
  };

  auto run_for = [&](std::chrono::milliseconds window) {
    uint64_t calls = 0;
    auto start = Clock::now();
    auto end = start + window;
    // Reading the clock every call would cost a measurable share of a
    // microsecond-scale round trip.
    do {
      for (int i = 0; i < 64; ++i) call();
      calls += 64;
    } while (Clock::now() < end);
    return static_cast<double>(calls) / seconds_since(start);
  };

  run_for(warmup_window());
  double rate = run_for(measure_window(options.quick));
  server.stop();
  return {rate, "calls/s",
          "raw " + std::string(listen.starts_with("unix:") ? "unix" : "tcp") + " ping-pong, " +
              std::to_string(frame_bytes) + " B each way, blocking read/write"};
}

Measurement raw_body(const CaseOptions& options, bool tcp) { return raw_send(options, tcp, body_total_bytes(options.quick)); }

Measurement raw_download(const CaseOptions& options, bool tcp, uint64_t payload_total) {
  ScratchDir dir;
  std::string listen = server_address(options, dir, "source.sock", tcp);
  ChildProcess server = spawn_server({self_exe(), "serve-raw-source", "--listen", listen}, options.server_netns);
  Fd fd = connect_to(Address::parse(server.ready_info()));
  std::vector<unsigned char> buf(body_chunk_bytes + frame_overhead_bytes);
  auto start = Clock::now();
  unsigned char req[8];
  put_be64(req, payload_total);
  write_all(fd.get(), req, sizeof req);
  uint64_t left = payload_total + (payload_total + body_chunk_bytes - 1) / body_chunk_bytes * frame_overhead_bytes;
  while (left > 0) {
    ssize_t n = ::read(fd.get(), buf.data(), std::min<uint64_t>(left, buf.size()));
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      throw std::runtime_error("source closed early");
    }
    left -= static_cast<uint64_t>(n);
  }
  double elapsed = seconds_since(start);
  server.stop();
  return {static_cast<double>(payload_total) / 1e6 / elapsed, "MB/s",
          std::string(tcp ? "raw tcp" : "raw unix") + ", server writes 256 KiB bodies (+28 B header), client reads into a 256 KiB buffer"};
}

Measurement raw_send(const CaseOptions& options, bool tcp, uint64_t payload_total) {
  ScratchDir dir;
  std::string listen = server_address(options, dir, "sink.sock", tcp);
  ChildProcess server =
      spawn_server({self_exe(), "serve-raw-sink", "--listen", listen}, options.server_netns);
  Fd fd = connect_to(Address::parse(server.ready_info()));

  const uint64_t frames = (payload_total + body_chunk_bytes - 1) / body_chunk_bytes;
  std::vector<unsigned char> body(body_chunk_bytes);
  for (std::size_t i = 0; i < body.size(); ++i) body[i] = static_cast<unsigned char>(i * 131 + 7);
  unsigned char head[frame_overhead_bytes];

  auto start = Clock::now();
  unsigned char total[8];
  put_be64(total, frames * (frame_overhead_bytes + body_chunk_bytes));
  write_all(fd.get(), total, sizeof total);
  for (uint64_t i = 0; i < frames; ++i) {
    fill_frame_head(head, body_chunk_bytes, type_data_chunk, 1, status_continue);
    iovec iov[2] = {{head, sizeof head}, {body.data(), body.size()}};
    writev_all(fd.get(), iov, 2);
  }
  unsigned char ack = 0;
  if (!read_exact(fd.get(), &ack, 1)) throw std::runtime_error("sink closed before acknowledging");
  double elapsed = seconds_since(start);
  server.stop();

  return {static_cast<double>(payload_total) / 1e6 / elapsed, "MB/s",
          std::string(tcp ? "raw tcp" : "raw unix") + ", " + std::to_string(frames) +
              " x 256 KiB bodies (+28 B header) via writev, payload bytes counted, " +
              "default socket buffers"};
}

Measurement raw_send_file_seconds(const CaseOptions& options, uint64_t bytes) {
  // A dense file of `bytes`, read with pread into one 256 KiB buffer and
  // written to a raw unix socket: the work a sparse upload cannot avoid.
  ScratchDir dir;
  const std::string path = (dir.path() / "dense.img").string();
  Fd file(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600));
  if (file.get() < 0) throw std::runtime_error("cannot create " + path);
  std::vector<unsigned char> body(body_chunk_bytes);
  for (std::size_t i = 0; i < body.size(); ++i) body[i] = static_cast<unsigned char>(i * 131 + 7);
  for (uint64_t at = 0; at < bytes; at += body.size()) {
    const std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(body.size(), bytes - at));
    if (::pwrite(file.get(), body.data(), n, static_cast<off_t>(at)) != static_cast<ssize_t>(n))
      throw std::runtime_error("pwrite failed");
  }
  ::fsync(file.get());
  std::string listen = server_address(options, dir, "sink.sock", false);
  ChildProcess server = spawn_server({self_exe(), "serve-raw-sink", "--listen", listen}, options.server_netns);
  Fd fd = connect_to(Address::parse(server.ready_info()));
  const uint64_t frames = (bytes + body_chunk_bytes - 1) / body_chunk_bytes;
  unsigned char head[frame_overhead_bytes];
  auto start = Clock::now();
  unsigned char total[8];
  put_be64(total, frames * frame_overhead_bytes + bytes);
  write_all(fd.get(), total, sizeof total);
  for (uint64_t at = 0; at < bytes; at += body.size()) {
    const std::size_t want = static_cast<std::size_t>(std::min<uint64_t>(body.size(), bytes - at));
    if (::pread(file.get(), body.data(), want, static_cast<off_t>(at)) != static_cast<ssize_t>(want))
      throw std::runtime_error("pread failed");
    fill_frame_head(head, want, type_data_chunk, 1, status_continue);
    iovec iov[2] = {{head, sizeof head}, {body.data(), want}};
    writev_all(fd.get(), iov, 2);
  }
  unsigned char ack = 0;
  if (!read_exact(fd.get(), &ack, 1)) throw std::runtime_error("sink closed before acknowledging");
  const double elapsed = seconds_since(start);
  server.stop();
  return {elapsed, "s", "raw unix socket sending a dense " + std::to_string(bytes >> 20) +
                            " MiB file (pread 256 KiB, writev), the sparse file's data alone"};
}


// ---------------------------------------------------------------------------
// vol.*: file -> socket -> file, the copy a person would write by hand with
// the same 256 KiB buffer as ferry's chunks.
//
// Request: u32 name length, the name, u8 op (0: the server receives into the
// file, 1: it sends the file), u8 sparse, u64 size. Then records
// [u64 offset][u64 length][bytes] flow (length 0 ends): from the client for
// op 0, after which the server acknowledges one byte once every record is
// written; from the server for op 1, every 256 KiB of the file or, sparse,
// the data extents alone (found with SEEK_DATA / SEEK_HOLE).

namespace {

void send_records(int sock, int file, uint64_t size, bool sparse, std::vector<unsigned char>& buf) {
  unsigned char head[16];
  uint64_t pos = 0;
  while (pos < size) {
    uint64_t data = pos, end = size;
    if (sparse) {
      const off_t d = ::lseek(file, static_cast<off_t>(pos), SEEK_DATA);
      if (d < 0) break;  // only holes remain
      data = static_cast<uint64_t>(d);
      end = std::min<uint64_t>(size, static_cast<uint64_t>(::lseek(file, d, SEEK_HOLE)));
    }
    for (uint64_t at = data; at < end;) {
      const std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(buf.size(), end - at));
      if (::pread(file, buf.data(), n, static_cast<off_t>(at)) != static_cast<ssize_t>(n))
        throw std::runtime_error("pread failed");
      put_be64(head, at);
      put_be64(head + 8, n);
      iovec iov[2] = {{head, sizeof head}, {buf.data(), n}};
      writev_all(sock, iov, 2);
      at += n;
    }
    pos = end;
  }
  put_be64(head, 0);
  put_be64(head + 8, 0);
  write_all(sock, head, sizeof head);
}

void receive_records(int sock, int file, std::vector<unsigned char>& buf) {
  unsigned char head[16];
  for (;;) {
    if (!read_exact(sock, head, sizeof head)) throw std::runtime_error("peer closed mid-copy");
    const uint64_t at = get_be64(head);
    uint64_t left = get_be64(head + 8);
    if (left == 0) return;
    for (uint64_t done = 0; left > 0;) {
      const std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(buf.size(), left));
      read_exact(sock, buf.data(), n);
      if (::pwrite(file, buf.data(), n, static_cast<off_t>(at + done)) != static_cast<ssize_t>(n))
        throw std::runtime_error("pwrite failed");
      done += n;
      left -= n;
    }
  }
}

void file_connection(const std::string& dir, Fd sock) {
  unsigned char len[4];
  if (!read_exact(sock.get(), len, sizeof len)) return;
  std::string name(get_be32(len), '\0');
  read_exact(sock.get(), name.data(), name.size());
  unsigned char rest[10];
  read_exact(sock.get(), rest, sizeof rest);
  const bool send = rest[0] == 1, sparse = rest[1] != 0;
  const uint64_t size = get_be64(rest + 2);
  const std::string path = dir + "/" + name;
  std::vector<unsigned char> buf(body_chunk_bytes);
  if (send) {
    Fd file(::open(path.c_str(), O_RDONLY));
    if (!file) throw std::runtime_error("cannot open " + path);
    send_records(sock.get(), file.get(), size, sparse, buf);
  } else {
    Fd file(::open(path.c_str(), O_RDWR | O_CREAT, 0644));
    if (!file) throw std::runtime_error("cannot open " + path);
    if (::ftruncate(file.get(), static_cast<off_t>(size)) != 0) throw std::runtime_error("ftruncate failed");
    receive_records(sock.get(), file.get(), buf);
    const unsigned char ack = 1;
    write_all(sock.get(), &ack, 1);
  }
}

}  // namespace

int serve_file(const std::string& listen, const std::string& dir) {
  return serve_forever(listen, [dir](Fd fd) { file_connection(dir, std::move(fd)); });
}

Measurement raw_file_copy(const CaseOptions& options, const VolumeCopy& copy) {
  // Both ends' files live in one scratch directory, as ferry's pool and the
  // CLI's file do.
  ScratchDir dir;
  const std::string server_dir = (dir.path() / "server").string();
  std::filesystem::create_directories(server_dir);
  for (int i = 0; i < copy.width; ++i) {
    const std::string name = "f" + std::to_string(i);
    make_bench_file(copy.upload ? (dir.path() / name).string() : server_dir + "/" + name, copy.size, copy.sparse);
  }
  ::sync();  // as the ferry side: no write-back of the set-up during the copy
  const std::string listen = server_address(options, dir, "file.sock", copy.tcp);
  ChildProcess server =
      spawn_server({self_exe(), "serve-file", "--listen", listen, "--dir", server_dir}, options.server_netns);
  const Address address = Address::parse(server.ready_info());

  auto one = [&](int i) {
    const std::string name = "f" + std::to_string(i);
    const std::string local = (dir.path() / (copy.upload ? name : name + ".out")).string();
    Fd sock = connect_to(address);
    std::vector<unsigned char> request(4 + name.size() + 10);
    put_be32(request.data(), static_cast<uint32_t>(name.size()));
    std::memcpy(request.data() + 4, name.data(), name.size());
    request[4 + name.size()] = copy.upload ? 0 : 1;
    request[5 + name.size()] = copy.sparse ? 1 : 0;
    put_be64(request.data() + 6 + name.size(), copy.size);
    write_all(sock.get(), request.data(), request.size());
    std::vector<unsigned char> buf(body_chunk_bytes);
    if (copy.upload) {
      Fd file(::open(local.c_str(), O_RDONLY));
      send_records(sock.get(), file.get(), copy.size, copy.sparse, buf);
      unsigned char ack = 0;
      if (!read_exact(sock.get(), &ack, 1)) throw std::runtime_error("server closed before acknowledging");
    } else {
      Fd file(::open(local.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
      if (::ftruncate(file.get(), static_cast<off_t>(copy.size)) != 0) throw std::runtime_error("ftruncate failed");
      receive_records(sock.get(), file.get(), buf);
    }
  };
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  std::exception_ptr failure;
  std::mutex failure_mutex;
  for (int i = 0; i < copy.width; ++i)
    threads.emplace_back([&, i] {
      try {
        one(i);
      } catch (...) {
        std::lock_guard lock(failure_mutex);
        if (!failure) failure = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  const double elapsed = seconds_since(start);
  server.stop();
  if (failure) std::rethrow_exception(failure);
  const std::string what = std::string(copy.tcp ? "raw tcp" : "raw unix") + ", " +
                           (copy.width > 1 ? std::to_string(copy.width) + " connections x " : "") +
                           std::to_string(copy.size >> 20) + " MiB file " + (copy.upload ? "to" : "from") +
                           " a file server (pread/pwrite 256 KiB" + (copy.sparse ? ", data extents only" : "") +
                           ", no fdatasync)";
  if (copy.seconds) return {elapsed, "s", what};
  return {static_cast<double>(copy.size) * copy.width / 1e6 / elapsed, "MB/s", what};
}

}  // namespace ferry::bench
