#include "tests/integration/raw_socket.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>

#include "ferry/v1/control.ferry.h"

namespace ferry::testing {

RawSocket RawSocket::connect_unix(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    throw std::runtime_error("connect " + path + ": " + std::strerror(errno));
  }
  return RawSocket(fd);
}

RawSocket RawSocket::connect_tcp(std::uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    throw std::runtime_error("connect 127.0.0.1:" + std::to_string(port) + ": " + std::strerror(errno));
  }
  return RawSocket(fd);
}

RawSocket::~RawSocket() {
  if (fd_ >= 0) ::close(fd_);
}

void RawSocket::send(std::span<const std::uint8_t> bytes) {
  std::size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
    if (n <= 0) throw std::runtime_error(std::string("send: ") + std::strerror(errno));
    off += static_cast<std::size_t>(n);
  }
}

void RawSocket::send_frame(const rpc::Header& header, const std::string& body) {
  auto bytes = rpc::encode_frame(header, {reinterpret_cast<const std::uint8_t*>(body.data()), body.size()});
  send(bytes);
}

void RawSocket::hello() {
  using Control = ferry::v1::Control;
  ferry::v1::HelloCall hello;
  hello.set_protocol_version(1);
  send_frame({Control::program, Control::version, Control::Hello::number, rpc::FrameType::call, 1,
              rpc::FrameStatus::ok},
             hello.SerializeAsString());
  rpc::Header h;
  std::vector<std::uint8_t> body;
  if (!read_frame(h, body) || h.type != rpc::FrameType::reply || h.status != rpc::FrameStatus::ok)
    throw std::runtime_error("Hello failed");
}

bool RawSocket::read_exact(std::uint8_t* p, std::size_t n, std::chrono::steady_clock::time_point deadline) {
  std::size_t got = 0;
  while (got < n) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd pfd{fd_, POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) return false;
    ssize_t r = ::recv(fd_, p + got, n - got, 0);
    if (r <= 0) return false;
    got += static_cast<std::size_t>(r);
  }
  return true;
}

bool RawSocket::read_frame(rpc::Header& header, std::vector<std::uint8_t>& body, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  std::uint8_t prefix[rpc::prefix_size];
  if (!read_exact(prefix, sizeof prefix, deadline)) return false;
  rpc::FrameLimits limits;
  limits.max_frame = rpc::FrameLimits::max_frame_ceiling;
  auto r = rpc::decode_prefix(std::span<const std::uint8_t, rpc::prefix_size>(prefix, rpc::prefix_size), limits);
  if (!r) return false;
  header = r.prefix->header;
  body.resize(r.prefix->body_size);
  return body.empty() || read_exact(body.data(), body.size(), deadline);
}

ferry::v1::Error RawSocket::read_error(std::chrono::milliseconds timeout) {
  rpc::Header h;
  std::vector<std::uint8_t> body;
  if (!read_frame(h, body, timeout)) throw std::runtime_error("no reply within the timeout");
  ferry::v1::Error e;
  if (h.type != rpc::FrameType::reply || h.status != rpc::FrameStatus::error ||
      !e.ParseFromArray(body.data(), static_cast<int>(body.size())))
    throw std::runtime_error("expected an ERROR reply");
  return e;
}

std::optional<std::string> RawSocket::read_goodbye(std::chrono::milliseconds timeout) {
  using Control = ferry::v1::Control;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return std::nullopt;
    rpc::Header h;
    std::vector<std::uint8_t> body;
    if (!read_frame(h, body, left)) return std::nullopt;
    if (h.type == rpc::FrameType::message && h.program == Control::program && h.procedure == Control::Goodbye::number) {
      ferry::v1::GoodbyeNotice bye;
      if (!bye.ParseFromArray(body.data(), static_cast<int>(body.size()))) return std::string("(unparsable Goodbye)");
      return bye.reason();
    }
  }
}

bool RawSocket::wait_closed(std::chrono::milliseconds timeout, std::vector<rpc::Header>* seen) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  std::uint8_t buf[4096];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd pfd{fd_, POLLIN, 0};
    int pr = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (pr <= 0) return false;
    ssize_t r = ::recv(fd_, buf, sizeof buf, 0);
    if (r == 0) return true;
    if (r < 0) return errno == ECONNRESET;
    if (seen && r >= static_cast<ssize_t>(rpc::prefix_size)) {
      rpc::FrameDecoder d;
      std::vector<rpc::FrameDecoder::Frame> frames;
      d.feed({buf, static_cast<std::size_t>(r)}, frames);
      for (auto& f : frames) seen->push_back(f.header);
    }
  }
}

}  // namespace ferry::testing
