// Fuzz target for the program 0 bodies a peer sends before it is
// authenticated, and what the server does with them: the Hello negotiation
// (rpc/hello.cc) and the AuthList/SaslStart/SaslStep bodies.
//
// Input: the first byte picks the body (0 Hello, 1 AuthList, 2 SaslStart,
// 3 SaslStep, others Hello with auth required); the rest is the body as it
// arrives in a CALL. A Hello that negotiates must give limits within
// ferry's bounds; a body that parses must survive a serialize/parse round
// trip unchanged. ferry::Error from negotiate_hello is an expected answer;
// anything else that escapes, or a broken invariant, aborts.
//
//   build-fuzz/tests/fuzz/control_body_fuzz -max_total_time=60 /tmp/cb-corpus tests/fuzz/corpus/control_body
#include <google/protobuf/stubs/logging.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <span>

#include "ferry/v1/control.pb.h"
#include "rpc/error.h"
#include "rpc/hello.h"

namespace {

void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "control_body_fuzz: invariant broken: %s\n", what);
  std::abort();
}

template <class Message>
void round_trip(std::span<const std::uint8_t> body) {
  Message m;
  if (!m.ParseFromArray(body.data(), static_cast<int>(body.size()))) return;
  const std::string again = m.SerializeAsString();
  Message n;
  require(n.ParseFromString(again), "a parsed body re-serializes to bytes that parse");
  require(n.SerializeAsString() == again, "serialization is stable");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // protobuf logs every string field that is not UTF-8; that is an answer
  // (the body does not parse), not news.
  static const bool quiet = (google::protobuf::SetLogHandler(nullptr), true);
  (void)quiet;
  if (size == 0) return 0;
  const std::uint8_t which = data[0];
  const std::span<const std::uint8_t> body(data + 1, size - 1);
  switch (which) {
    case 1:
      round_trip<ferry::v1::AuthListCall>(body);
      return 0;
    case 2: {
      round_trip<ferry::v1::SaslStartCall>(body);
      return 0;
    }
    case 3:
      round_trip<ferry::v1::SaslStepCall>(body);
      return 0;
    default:
      break;
  }
  ferry::rpc::HelloOffer offer;
  offer.auth_required = which != 0;
  try {
    auto out = ferry::rpc::negotiate_hello(body, offer);
    require(out.limits.max_frame >= (64u << 10), "max_frame at least 64 KiB");
    require(out.limits.max_frame <= offer.limits.max_frame, "max_frame at most the server's");
    require(out.limits.max_chunk >= ferry::rpc::FrameLimits::min_chunk, "chunk at least the minimum");
    require(out.limits.max_chunk <= ferry::rpc::FrameLimits::max_chunk_ceiling, "chunk at most the ceiling");
    require(out.limits.max_chunk <= offer.limits.max_chunk ||
                offer.limits.max_chunk < ferry::rpc::FrameLimits::min_chunk,
            "chunk at most the server's");
    require(out.window >= out.limits.max_chunk, "window holds at least one chunk");
    require(out.window <= std::max(offer.window, out.limits.max_chunk), "window at most the server's");
    require(out.client_name.size() <= 256, "client name bounded");
    require(out.reply.auth_required() == offer.auth_required, "auth_required as offered");
    require(out.reply.max_frame() == out.limits.max_frame && out.reply.chunk_size() == out.limits.max_chunk &&
                out.reply.window() == out.window,
            "the reply says what was settled");
  } catch (const ferry::Error& e) {
    require(e.code() == ferry::Code::invalid_argument || e.code() == ferry::Code::unimplemented,
            "Hello fails only as malformed or another version");
  }
  return 0;
}
