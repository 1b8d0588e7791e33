// Hello: the first call on every connection settles its parameters. Kept
// apart from the server so the negotiation, which any peer can reach before
// authenticating, is one pure function with a fuzz target of its own.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>

#include "ferry/v1/control.pb.h"
#include "rpc/frame.h"

namespace ferry::rpc {

// What the server is willing to do.
struct HelloOffer {
  FrameLimits limits;
  std::uint32_t window = 4u << 20;
  std::string name = "ferryd";
  std::chrono::milliseconds keepalive_interval{5000};
  unsigned keepalive_count = 3;
  bool auth_required = false;
};

struct HelloAccepted {
  ferry::v1::HelloReply reply;
  FrameLimits limits;  // for this connection: the smaller of both sides, within ferry's bounds
  std::uint32_t window = 0;
  std::string client_name;
};

// Parses a Hello CALL body and settles the connection's limits. Throws
// ferry::Error: INVALID_ARGUMENT for a body that does not parse,
// UNIMPLEMENTED for another protocol version.
HelloAccepted negotiate_hello(std::span<const std::uint8_t> body, const HelloOffer& server);

}  // namespace ferry::rpc
