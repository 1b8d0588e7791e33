// Frame codec: the bottom layer of ferry's wire protocol (DESIGN.md "Wire
// protocol v1"). It turns bytes into a header and back, checking length,
// type, status and size against the negotiated limits. It knows nothing of
// sockets or Asio, so a fuzzer can drive it and byte strings pin it.
//
// A frame is a 4-byte big-endian length (bytes that follow it), a 24-byte
// header of six big-endian u32 fields, then the body.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace ferry::rpc {

enum class FrameType : std::uint32_t {
  call = 0,
  reply = 1,
  message = 2,
  data_chunk = 3,
  stream_hole = 4,
  stream_credit = 5,
  cancel = 6,
};

enum class FrameStatus : std::uint32_t {
  ok = 0,
  error = 1,
  cont = 2,  // CONTINUE: a DATA_CHUNK carrying raw bytes
};

const char* to_string(FrameType type);
const char* to_string(FrameStatus status);

using Serial = std::uint32_t;

struct Header {
  std::uint32_t program = 0;
  std::uint32_t version = 0;
  std::uint32_t procedure = 0;
  FrameType type = FrameType::call;
  Serial serial = 0;
  FrameStatus status = FrameStatus::ok;

  friend bool operator==(const Header&, const Header&) = default;
};

inline constexpr std::size_t length_size = 4;
inline constexpr std::size_t header_size = 24;
inline constexpr std::size_t prefix_size = length_size + header_size;  // 28

// Body sizes fixed by the protocol.
inline constexpr std::size_t hole_body_size = 8;    // u64 run of zeros
inline constexpr std::size_t credit_body_size = 4;  // u32 bytes consumed

// Negotiated in Hello; these are the protocol defaults and hard ceilings.
struct FrameLimits {
  std::uint32_t max_frame = 32u << 20;   // CALL/REPLY/MESSAGE body, default 32 MiB
  std::uint32_t max_chunk = 256u << 10;  // DATA_CHUNK CONTINUE body, default 256 KiB
  static constexpr std::uint32_t max_frame_ceiling = 256u << 20;
  static constexpr std::uint32_t max_chunk_ceiling = 16u << 20;
  static constexpr std::uint32_t min_chunk = 4u << 10;
};

// Writes the 28-byte prefix (length + header) for a body of `body_size` bytes.
void encode_prefix(const Header& header, std::size_t body_size, std::uint8_t* out);
std::array<std::uint8_t, prefix_size> encode_prefix(const Header& header, std::size_t body_size);

// Encodes a whole frame into one contiguous buffer (tests, small frames).
std::vector<std::uint8_t> encode_frame(const Header& header, std::span<const std::uint8_t> body);

struct Prefix {
  Header header;
  std::uint32_t body_size = 0;
};

// Why a prefix was refused. The message names the field and the limit so the
// log line tells an operator what the peer did wrong.
struct DecodeError {
  std::string message;
};

// Decodes and validates a 28-byte prefix. Returns the header and body size,
// or the reason the frame is a protocol error.
struct PrefixResult {
  std::optional<Prefix> prefix;
  DecodeError error;
  explicit operator bool() const { return prefix.has_value(); }
};
PrefixResult decode_prefix(std::span<const std::uint8_t, prefix_size> bytes, const FrameLimits& limits);

// Body helpers for the fixed-size frames.
std::array<std::uint8_t, hole_body_size> encode_hole(std::uint64_t length);
std::uint64_t decode_hole(std::span<const std::uint8_t, hole_body_size> body);
std::array<std::uint8_t, credit_body_size> encode_credit(std::uint32_t bytes);
std::uint32_t decode_credit(std::span<const std::uint8_t, credit_body_size> body);

// Incremental decoder over an arbitrary byte sequence: feed() bytes as they
// arrive, frames come out whole. The connection's reader uses the same
// validation (decode_prefix) but reads large bodies straight into their
// destination; this form exists for tests and fuzzing.
class FrameDecoder {
 public:
  struct Frame {
    Header header;
    std::vector<std::uint8_t> body;
  };

  explicit FrameDecoder(FrameLimits limits = {}) : limits_(limits) {}

  // Appends bytes; decoded frames are appended to `out`. Returns false (and
  // stays failed) on a protocol error, whose reason error() gives.
  bool feed(std::span<const std::uint8_t> bytes, std::vector<Frame>& out);
  bool failed() const { return failed_; }
  const std::string& error() const { return error_; }
  std::size_t buffered() const { return buffer_.size(); }

 private:
  FrameLimits limits_;
  std::vector<std::uint8_t> buffer_;
  bool failed_ = false;
  std::string error_;
};

namespace detail {
inline void put_u32(std::uint8_t* p, std::uint32_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 24);
  p[1] = static_cast<std::uint8_t>(v >> 16);
  p[2] = static_cast<std::uint8_t>(v >> 8);
  p[3] = static_cast<std::uint8_t>(v);
}
inline std::uint32_t get_u32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
         std::uint32_t{p[3]};
}
}  // namespace detail

}  // namespace ferry::rpc
