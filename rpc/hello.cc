#include "rpc/hello.h"

#include <algorithm>

#include "rpc/error.h"

namespace ferry::rpc {

HelloAccepted negotiate_hello(std::span<const std::uint8_t> body, const HelloOffer& server) {
  ferry::v1::HelloCall hello;
  if (!hello.ParseFromArray(body.data(), static_cast<int>(body.size())))
    throw Error(Code::invalid_argument, "malformed Hello body");
  if (hello.protocol_version() != 1)
    throw Error(Code::unimplemented, "protocol version " + std::to_string(hello.protocol_version()) +
                                         " is not supported; this server speaks version 1");
  const auto& lim = server.limits;
  HelloAccepted out;
  out.limits.max_frame = hello.max_frame() ? std::min(hello.max_frame(), lim.max_frame) : lim.max_frame;
  out.limits.max_frame = std::max<std::uint32_t>(out.limits.max_frame, 64u << 10);
  const std::uint32_t chunk = hello.chunk_size() ? std::min(hello.chunk_size(), lim.max_chunk) : lim.max_chunk;
  out.limits.max_chunk = std::clamp(chunk, FrameLimits::min_chunk, FrameLimits::max_chunk_ceiling);
  // A window smaller than one chunk could never carry a chunk: the stream
  // would stall with both sides waiting for credit.
  out.window = hello.window() ? std::min(hello.window(), server.window) : server.window;
  out.window = std::max(out.window, out.limits.max_chunk);
  out.client_name = hello.client_name().substr(0, 256);
  auto& reply = out.reply;
  reply.set_protocol_version(1);
  reply.set_max_frame(out.limits.max_frame);
  reply.set_chunk_size(out.limits.max_chunk);
  reply.set_window(out.window);
  reply.set_server_name(server.name);
  reply.set_keepalive_interval_ms(static_cast<std::uint32_t>(server.keepalive_interval.count()));
  reply.set_keepalive_count(server.keepalive_count);
  reply.set_auth_required(server.auth_required);
  return out;
}

}  // namespace ferry::rpc
