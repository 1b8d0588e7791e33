// Fuzz target for the frame codec (rpc/frame.cc) and the program 0 bodies
// a peer can send before it has authenticated: the first bytes any
// stranger on the socket gets to feed us.
//
// The input is a raw byte stream as it would arrive on a socket, so the
// seeds in corpus/frame/ are plain wire bytes and a crash reproducer can be
// replayed against a live ferryd with nc. Each run:
//  - feeds the stream to one FrameDecoder in pieces whose sizes come from
//    the stream itself, and to a second one in a single piece; where the
//    bytes are split must not change what comes out;
//  - checks that every frame re-encodes to exactly the bytes it came from
//    and respects the limits;
//  - parses each program 0 CALL/REPLY/MESSAGE body as the message its
//    procedure carries, every ERROR body as ferry.v1.Error, and the fixed
//    hole and credit bodies.
// A broken invariant aborts, so libFuzzer records it like a crash.
//
//   build-fuzz/tests/fuzz/frame_decoder_fuzz -max_total_time=60 /tmp/frame-corpus tests/fuzz/corpus/frame
// (the first directory collects new inputs; keep it out of the source tree).
#include <google/protobuf/stubs/logging.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "ferry/v1/control.ferry.h"
#include "ferry/v1/error.pb.h"
#include "rpc/error.h"
#include "rpc/frame.h"

namespace {

using namespace ferry::rpc;
using Control = ferry::v1::Control;
using Frames = std::vector<FrameDecoder::Frame>;

// assert() is compiled out in RelWithDebInfo; these checks must not be.
void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "frame_decoder_fuzz: invariant broken: %s\n", what);
  std::abort();
}

// The smallest limits Hello can negotiate, so that inputs of a few KiB
// reach the size checks as well as the 4 GiB ones.
FrameLimits fuzz_limits() {
  FrameLimits limits;
  limits.max_frame = 64u << 10;
  limits.max_chunk = FrameLimits::min_chunk;
  return limits;
}

template <class Message>
void parse_as(const std::vector<std::uint8_t>& body) {
  Message message;
  if (!message.ParseFromArray(body.data(), static_cast<int>(body.size()))) return;
  // What parsed once must survive a trip through our own encoder, or a
  // relaying peer could turn valid input into a protocol error.
  Message again;
  require(again.ParseFromString(message.SerializeAsString()), "a parsed body re-serializes to bytes that parse");
}

void parse_error_body(const std::vector<std::uint8_t>& body) {
  ferry::v1::Error wire;
  if (!wire.ParseFromArray(body.data(), static_cast<int>(body.size()))) return;
  const ferry::Error error = ferry::Error::from_proto(wire);
  require(ferry::to_string(error.code()) != nullptr, "every code has a name");
  (void)error.describe();
  const ferry::v1::Error back = error.to_proto();
  require(static_cast<std::uint32_t>(back.code()) <= static_cast<std::uint32_t>(ferry::Code::unauthenticated),
          "from_proto yields a known code");
}

void parse_control_body(const FrameDecoder::Frame& frame) {
  const Header& h = frame.header;
  const auto& body = frame.body;
  switch (h.type) {
    case FrameType::call:
      switch (h.procedure) {
        case Control::Hello::number: parse_as<Control::Hello::Call>(body); break;
        case Control::AuthList::number: parse_as<Control::AuthList::Call>(body); break;
        case Control::SaslStart::number: parse_as<Control::SaslStart::Call>(body); break;
        case Control::SaslStep::number: parse_as<Control::SaslStep::Call>(body); break;
        case Control::KeepalivePing::number: parse_as<Control::KeepalivePing::Call>(body); break;
        default: break;  // answered UNIMPLEMENTED without looking at the body
      }
      break;
    case FrameType::reply:
      if (h.status != FrameStatus::ok) break;  // ERROR bodies are handled for every program
      switch (h.procedure) {
        case Control::Hello::number: parse_as<Control::Hello::Reply>(body); break;
        case Control::AuthList::number: parse_as<Control::AuthList::Reply>(body); break;
        case Control::SaslStart::number: parse_as<Control::SaslStart::Reply>(body); break;
        case Control::SaslStep::number: parse_as<Control::SaslStep::Reply>(body); break;
        case Control::KeepalivePing::number: parse_as<Control::KeepalivePing::Reply>(body); break;
        default: break;
      }
      break;
    case FrameType::message:
      switch (h.procedure) {
        case Control::KeepalivePing::number: parse_as<Control::KeepalivePing::Call>(body); break;
        case Control::KeepalivePong::number: parse_as<Control::KeepalivePong::Call>(body); break;
        case Control::Goodbye::number: {
          Control::Goodbye::Call bye;
          if (bye.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
            // The client turns the code into a ferry::Code as is; any
            // number must still print.
            require(ferry::to_string(static_cast<ferry::Code>(bye.code())) != nullptr, "Goodbye code has a name");
          }
          break;
        }
        default: break;
      }
      break;
    default: break;
  }
}

void check_frame(const FrameDecoder::Frame& frame, const FrameLimits& limits) {
  const Header& h = frame.header;
  const auto& body = frame.body;
  switch (h.type) {
    case FrameType::call:
    case FrameType::reply:
    case FrameType::message:
      require(body.size() <= limits.max_frame, "CALL/REPLY/MESSAGE body within max_frame");
      break;
    case FrameType::data_chunk:
      if (h.status == FrameStatus::cont) require(body.size() <= limits.max_chunk, "chunk within max_chunk");
      if (h.status == FrameStatus::ok) require(body.empty(), "end of stream has no body");
      break;
    case FrameType::stream_hole: {
      require(body.size() == hole_body_size, "hole body is 8 bytes");
      const auto bytes = std::span<const std::uint8_t, hole_body_size>(body.data(), hole_body_size);
      const auto again = encode_hole(decode_hole(bytes));
      require(std::equal(again.begin(), again.end(), body.begin()), "hole body round-trips");
      break;
    }
    case FrameType::stream_credit: {
      require(body.size() == credit_body_size, "credit body is 4 bytes");
      const auto bytes = std::span<const std::uint8_t, credit_body_size>(body.data(), credit_body_size);
      const auto again = encode_credit(decode_credit(bytes));
      require(std::equal(again.begin(), again.end(), body.begin()), "credit body round-trips");
      break;
    }
    case FrameType::cancel:
      require(body.empty(), "CANCEL has no body");
      break;
  }
  if (h.status == FrameStatus::error && (h.type == FrameType::reply || h.type == FrameType::data_chunk))
    parse_error_body(body);
  if (h.program == Control::program) parse_control_body(frame);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // proto3 logs every string field with invalid UTF-8; at thousands of
  // runs a second that noise drowns the fuzzer's own output.
  static const bool quiet = (google::protobuf::SetLogHandler(nullptr), true);
  (void)quiet;

  const FrameLimits limits = fuzz_limits();
  const std::span<const std::uint8_t> input(data, size);

  FrameDecoder pieces(limits);
  Frames from_pieces;
  std::size_t pos = 0;
  while (pos < size) {
    const std::size_t n = std::min<std::size_t>(size - pos, 1 + input[pos] % 61);
    const bool ok = pieces.feed(input.subspan(pos, n), from_pieces);
    require(ok == !pieces.failed(), "feed() returns false exactly when the decoder has failed");
    pos += n;
  }

  FrameDecoder whole(limits);
  Frames from_whole;
  whole.feed(input, from_whole);

  require(pieces.failed() == whole.failed(), "split points do not change whether the stream fails");
  require(pieces.error() == whole.error(), "split points do not change the error");
  require(from_pieces.size() == from_whole.size(), "split points do not change the number of frames");
  if (pieces.failed()) {
    require(!pieces.error().empty(), "a failure says why");
    require(pieces.buffered() == 0, "a failed decoder holds no bytes");
  } else {
    require(pieces.buffered() == whole.buffered(), "split points do not change what is buffered");
  }

  // Frames come out in order and each one is exactly the bytes it was
  // decoded from.
  std::size_t offset = 0;
  for (std::size_t i = 0; i < from_pieces.size(); ++i) {
    const auto& frame = from_pieces[i];
    require(frame.header == from_whole[i].header && frame.body == from_whole[i].body,
            "split points do not change a frame");
    const std::vector<std::uint8_t> encoded = encode_frame(frame.header, frame.body);
    require(offset + encoded.size() <= size, "a frame lies within the input");
    require(std::equal(encoded.begin(), encoded.end(), data + offset), "a frame re-encodes to its input bytes");
    offset += encoded.size();
    check_frame(frame, limits);
  }
  if (!pieces.failed()) require(offset + pieces.buffered() == size, "every byte is either decoded or buffered");
  return 0;
}
