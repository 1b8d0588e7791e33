// A plain blocking socket for sending hand-made (and broken) bytes to a
// server, the way a buggy or hostile peer would.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "ferry/v1/error.pb.h"
#include "rpc/frame.h"

namespace ferry::testing {

class RawSocket {
 public:
  static RawSocket connect_unix(const std::string& path);
  static RawSocket connect_tcp(std::uint16_t port);
  RawSocket(RawSocket&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  ~RawSocket();

  void send(std::span<const std::uint8_t> bytes);
  void send_frame(const rpc::Header& header, const std::string& body);
  // Says Hello and reads the reply; throws on failure.
  void hello();
  // Reads one whole frame; false on EOF/timeout.
  bool read_frame(rpc::Header& header, std::vector<std::uint8_t>& body,
                  std::chrono::milliseconds timeout = std::chrono::seconds(5));
  // True if the peer closes the connection within `timeout` (frames that
  // arrive first are skipped and appended to `seen` if given).
  bool wait_closed(std::chrono::milliseconds timeout = std::chrono::seconds(5),
                   std::vector<rpc::Header>* seen = nullptr);
  // Reads frames until the server's Goodbye MESSAGE; returns its reason, or
  // nullopt if none came within `timeout` (or the connection ended without one).
  std::optional<std::string> read_goodbye(std::chrono::milliseconds timeout = std::chrono::seconds(5));
  // Reads the next frame, which must be an ERROR reply; returns its error
  // (throws if the frame is something else or does not come).
  ferry::v1::Error read_error(std::chrono::milliseconds timeout = std::chrono::seconds(5));
  int fd() const { return fd_; }

 private:
  explicit RawSocket(int fd) : fd_(fd) {}
  bool read_exact(std::uint8_t* p, std::size_t n, std::chrono::steady_clock::time_point deadline);
  int fd_ = -1;
};

}  // namespace ferry::testing
