#include "rpc/frame.h"

#include <cstring>

namespace ferry::rpc {

using detail::get_u32;
using detail::put_u32;

const char* to_string(FrameType type) {
  switch (type) {
    case FrameType::call: return "CALL";
    case FrameType::reply: return "REPLY";
    case FrameType::message: return "MESSAGE";
    case FrameType::data_chunk: return "DATA_CHUNK";
    case FrameType::stream_hole: return "STREAM_HOLE";
    case FrameType::stream_credit: return "STREAM_CREDIT";
    case FrameType::cancel: return "CANCEL";
  }
  return "UNKNOWN";
}

const char* to_string(FrameStatus status) {
  switch (status) {
    case FrameStatus::ok: return "OK";
    case FrameStatus::error: return "ERROR";
    case FrameStatus::cont: return "CONTINUE";
  }
  return "UNKNOWN";
}

void encode_prefix(const Header& h, std::size_t body_size, std::uint8_t* out) {
  put_u32(out, static_cast<std::uint32_t>(header_size + body_size));
  put_u32(out + 4, h.program);
  put_u32(out + 8, h.version);
  put_u32(out + 12, h.procedure);
  put_u32(out + 16, static_cast<std::uint32_t>(h.type));
  put_u32(out + 20, h.serial);
  put_u32(out + 24, static_cast<std::uint32_t>(h.status));
}

std::array<std::uint8_t, prefix_size> encode_prefix(const Header& header, std::size_t body_size) {
  std::array<std::uint8_t, prefix_size> out{};
  encode_prefix(header, body_size, out.data());
  return out;
}

std::vector<std::uint8_t> encode_frame(const Header& header, std::span<const std::uint8_t> body) {
  std::vector<std::uint8_t> out(prefix_size + body.size());
  encode_prefix(header, body.size(), out.data());
  if (!body.empty()) std::memcpy(out.data() + prefix_size, body.data(), body.size());
  return out;
}

namespace {
PrefixResult fail(std::string message) {
  PrefixResult r;
  r.error.message = std::move(message);
  return r;
}
}  // namespace

PrefixResult decode_prefix(std::span<const std::uint8_t, prefix_size> bytes, const FrameLimits& limits) {
  const std::uint32_t length = get_u32(bytes.data());
  if (length < header_size)
    return fail("frame length " + std::to_string(length) + " is shorter than the 24-byte header");
  const std::uint32_t body_size = length - static_cast<std::uint32_t>(header_size);
  const std::uint32_t raw_type = get_u32(bytes.data() + 16);
  const std::uint32_t raw_status = get_u32(bytes.data() + 24);
  if (raw_type > static_cast<std::uint32_t>(FrameType::cancel))
    return fail("unknown frame type " + std::to_string(raw_type));
  if (raw_status > static_cast<std::uint32_t>(FrameStatus::cont))
    return fail("unknown frame status " + std::to_string(raw_status));

  Prefix p;
  p.header.program = get_u32(bytes.data() + 4);
  p.header.version = get_u32(bytes.data() + 8);
  p.header.procedure = get_u32(bytes.data() + 12);
  p.header.type = static_cast<FrameType>(raw_type);
  p.header.serial = get_u32(bytes.data() + 20);
  p.header.status = static_cast<FrameStatus>(raw_status);
  p.body_size = body_size;

  const auto type = p.header.type;
  const auto status = p.header.status;
  const std::string what = std::string(to_string(type)) + "/" + to_string(status);
  switch (type) {
    case FrameType::call:
    case FrameType::message:
      if (status != FrameStatus::ok) return fail(what + " is not a valid type/status pair");
      [[fallthrough]];
    case FrameType::reply:
      if (type == FrameType::reply && status == FrameStatus::cont)
        return fail(what + " is not a valid type/status pair");
      if (body_size > limits.max_frame)
        return fail(what + " body of " + std::to_string(body_size) + " bytes exceeds the negotiated maximum of " +
                    std::to_string(limits.max_frame));
      break;
    case FrameType::data_chunk:
      if (status == FrameStatus::cont && body_size > limits.max_chunk)
        return fail("DATA_CHUNK of " + std::to_string(body_size) + " bytes exceeds the negotiated chunk size of " +
                    std::to_string(limits.max_chunk));
      if (status == FrameStatus::ok && body_size != 0) return fail("DATA_CHUNK/OK (end of stream) must have an empty body");
      if (status == FrameStatus::error && body_size > limits.max_frame)
        return fail("DATA_CHUNK/ERROR body of " + std::to_string(body_size) + " bytes exceeds the maximum frame size");
      break;
    case FrameType::stream_hole:
      if (status != FrameStatus::ok || body_size != hole_body_size)
        return fail(what + " with a " + std::to_string(body_size) + "-byte body; expected OK with 8 bytes");
      break;
    case FrameType::stream_credit:
      if (status != FrameStatus::ok || body_size != credit_body_size)
        return fail(what + " with a " + std::to_string(body_size) + "-byte body; expected OK with 4 bytes");
      break;
    case FrameType::cancel:
      if (status != FrameStatus::ok || body_size != 0)
        return fail(what + " with a " + std::to_string(body_size) + "-byte body; expected OK and empty");
      break;
  }
  PrefixResult r;
  r.prefix = p;
  return r;
}

std::array<std::uint8_t, hole_body_size> encode_hole(std::uint64_t length) {
  std::array<std::uint8_t, hole_body_size> out{};
  put_u32(out.data(), static_cast<std::uint32_t>(length >> 32));
  put_u32(out.data() + 4, static_cast<std::uint32_t>(length));
  return out;
}

std::uint64_t decode_hole(std::span<const std::uint8_t, hole_body_size> body) {
  return (std::uint64_t{get_u32(body.data())} << 32) | get_u32(body.data() + 4);
}

std::array<std::uint8_t, credit_body_size> encode_credit(std::uint32_t bytes) {
  std::array<std::uint8_t, credit_body_size> out{};
  put_u32(out.data(), bytes);
  return out;
}

std::uint32_t decode_credit(std::span<const std::uint8_t, credit_body_size> body) { return get_u32(body.data()); }

bool FrameDecoder::feed(std::span<const std::uint8_t> bytes, std::vector<Frame>& out) {
  if (failed_) return false;
  buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
  std::size_t pos = 0;
  while (buffer_.size() - pos >= prefix_size) {
    auto result = decode_prefix(std::span<const std::uint8_t, prefix_size>(buffer_.data() + pos, prefix_size), limits_);
    if (!result) {
      failed_ = true;
      error_ = result.error.message;
      buffer_.clear();
      return false;
    }
    const Prefix& p = *result.prefix;
    if (buffer_.size() - pos - prefix_size < p.body_size) break;
    Frame frame;
    frame.header = p.header;
    const auto* body = buffer_.data() + pos + prefix_size;
    frame.body.assign(body, body + p.body_size);
    out.push_back(std::move(frame));
    pos += prefix_size + p.body_size;
  }
  buffer_.erase(buffer_.begin(), buffer_.begin() + static_cast<std::ptrdiff_t>(pos));
  return true;
}

}  // namespace ferry::rpc
