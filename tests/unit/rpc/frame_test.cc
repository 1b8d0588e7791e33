// Pins the v1 frame format byte for byte and every rule decode_prefix
// enforces. A peer written from docs/protocol.md must produce exactly these
// bytes, so a change that breaks one of these arrays breaks the wire.
#include "rpc/frame.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace ferry::rpc {
namespace {

using ::testing::HasSubstr;
using Bytes = std::vector<std::uint8_t>;

// Field values in wire order, so a prefix encode_prefix would never write
// (an unknown type, a short length) can still be built.
struct RawPrefix {
  std::uint32_t length = header_size;
  std::uint32_t program = 99;
  std::uint32_t version = 1;
  std::uint32_t procedure = 1;
  std::uint32_t type = 0;
  std::uint32_t serial = 1;
  std::uint32_t status = 0;
};

void put_be32(std::uint8_t* p, std::uint32_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 24);
  p[1] = static_cast<std::uint8_t>(v >> 16);
  p[2] = static_cast<std::uint8_t>(v >> 8);
  p[3] = static_cast<std::uint8_t>(v);
}

std::array<std::uint8_t, prefix_size> bytes_of(const RawPrefix& raw) {
  std::array<std::uint8_t, prefix_size> out{};
  put_be32(out.data(), raw.length);
  put_be32(out.data() + 4, raw.program);
  put_be32(out.data() + 8, raw.version);
  put_be32(out.data() + 12, raw.procedure);
  put_be32(out.data() + 16, raw.type);
  put_be32(out.data() + 20, raw.serial);
  put_be32(out.data() + 24, raw.status);
  return out;
}

PrefixResult decode(const RawPrefix& raw, const FrameLimits& limits = {}) {
  const auto bytes = bytes_of(raw);
  return decode_prefix(std::span<const std::uint8_t, prefix_size>(bytes), limits);
}

std::uint32_t length_for(std::uint32_t body_size) { return static_cast<std::uint32_t>(header_size) + body_size; }

std::uint32_t raw(FrameType type) { return static_cast<std::uint32_t>(type); }
std::uint32_t raw(FrameStatus status) { return static_cast<std::uint32_t>(status); }

// Refused, with a message containing `why`.
void expect_refused(const RawPrefix& prefix, const std::string& why, const FrameLimits& limits = {}) {
  const auto result = decode(prefix, limits);
  EXPECT_FALSE(result) << "accepted a frame that should be refused with '" << why << "'";
  EXPECT_FALSE(result.prefix.has_value());
  EXPECT_THAT(result.error.message, HasSubstr(why));
}

struct Pair {
  FrameType type;
  FrameStatus status;
  std::uint32_t body_size;  // a size decode_prefix accepts for the pair
};

// Every type/status pair the protocol allows, each with a legal body size.
const std::vector<Pair>& valid_pairs() {
  static const std::vector<Pair> pairs = {
      {FrameType::call, FrameStatus::ok, 17},
      {FrameType::reply, FrameStatus::ok, 17},
      {FrameType::reply, FrameStatus::error, 17},
      {FrameType::message, FrameStatus::ok, 17},
      {FrameType::data_chunk, FrameStatus::cont, 4096},
      {FrameType::data_chunk, FrameStatus::ok, 0},
      {FrameType::data_chunk, FrameStatus::error, 17},
      {FrameType::stream_hole, FrameStatus::ok, hole_body_size},
      {FrameType::stream_credit, FrameStatus::ok, credit_body_size},
      {FrameType::cancel, FrameStatus::ok, 0},
  };
  return pairs;
}

// The Hello CALL that Client::connect sends with default options: protocol
// version 1, max_frame 32 MiB, chunk 256 KiB, window 4 MiB, client name
// "libferry", keepalive every 5000 ms, 3 probes. docs/protocol.md shows the
// same bytes.
const Bytes hello_call_frame = {
    0x00, 0x00, 0x00, 0x37,  // length: 55 = 24-byte header + 31-byte body
    0x00, 0x00, 0x00, 0x00,  // program: 0 (connection control)
    0x00, 0x00, 0x00, 0x01,  // version: 1
    0x00, 0x00, 0x00, 0x01,  // procedure: 1 (Hello)
    0x00, 0x00, 0x00, 0x00,  // type: 0 (CALL)
    0x00, 0x00, 0x00, 0x01,  // serial: 1
    0x00, 0x00, 0x00, 0x00,  // status: 0 (OK)
    // body: ferry.v1.HelloCall
    0x08, 0x01,                    // 1 protocol_version: 1
    0x18, 0x80, 0x80, 0x80, 0x10,  // 3 max_frame: 33554432
    0x20, 0x80, 0x80, 0x10,        // 4 chunk_size: 262144
    0x28, 0x80, 0x80, 0x80, 0x02,  // 5 window: 4194304
    0x32, 0x08, 'l', 'i', 'b', 'f', 'e', 'r', 'r', 'y',  // 6 client_name
    0x38, 0x88, 0x27,  // 7 keepalive_interval_ms: 5000
    0x40, 0x03,        // 8 keepalive_count: 3
};

// ---- encoding: golden bytes ----

TEST(Frame, EncodesCallPrefixAsLengthAndSixBigEndianWords) {
  const Header header{99, 1, 2, FrameType::call, 0x01020304, FrameStatus::ok};
  const std::array<std::uint8_t, prefix_size> expected = {
      0x00, 0x00, 0x00, 0x1d,  // length: 29 = 24-byte header + 5-byte body
      0x00, 0x00, 0x00, 0x63,  // program: 99 (test)
      0x00, 0x00, 0x00, 0x01,  // version: 1
      0x00, 0x00, 0x00, 0x02,  // procedure: 2 (Sleep)
      0x00, 0x00, 0x00, 0x00,  // type: 0 (CALL)
      0x01, 0x02, 0x03, 0x04,  // serial: 0x01020304, most significant byte first
      0x00, 0x00, 0x00, 0x00,  // status: 0 (OK)
  };
  EXPECT_EQ(encode_prefix(header, 5), expected);

  std::array<std::uint8_t, prefix_size> out{};
  encode_prefix(header, 5, out.data());
  EXPECT_EQ(out, expected);
}

TEST(Frame, EncodesHelloCallFrameByteForByte) {
  const Header header{0, 1, 1, FrameType::call, 1, FrameStatus::ok};
  const std::span<const std::uint8_t> body(hello_call_frame.data() + prefix_size, hello_call_frame.size() - prefix_size);
  EXPECT_EQ(encode_frame(header, body), hello_call_frame);
}

TEST(Frame, EncodesErrorReplyWithTheCallsHeaderAndStatusError) {
  const Header header{99, 1, 3, FrameType::reply, 7, FrameStatus::error};
  const std::array<std::uint8_t, prefix_size> expected = {
      0x00, 0x00, 0x00, 0x20,  // length: 32 = 24 + 8-byte ferry.v1.Error body
      0x00, 0x00, 0x00, 0x63,  // program: 99
      0x00, 0x00, 0x00, 0x01,  // version: 1
      0x00, 0x00, 0x00, 0x03,  // procedure: 3 (Fail)
      0x00, 0x00, 0x00, 0x01,  // type: 1 (REPLY)
      0x00, 0x00, 0x00, 0x07,  // serial: 7, the CALL's
      0x00, 0x00, 0x00, 0x01,  // status: 1 (ERROR)
  };
  EXPECT_EQ(encode_prefix(header, 8), expected);
}

TEST(Frame, EncodesStreamFramesByteForByte) {
  const Bytes chunk = encode_frame({42, 1, 12, FrameType::data_chunk, 9, FrameStatus::cont}, Bytes{0xde, 0xad, 0xbe});
  const Bytes expected_chunk = {
      0x00, 0x00, 0x00, 0x1b,  // length: 27 = 24 + 3 raw bytes
      0x00, 0x00, 0x00, 0x2a,  // program: 42
      0x00, 0x00, 0x00, 0x01,  // version: 1
      0x00, 0x00, 0x00, 0x0c,  // procedure: 12
      0x00, 0x00, 0x00, 0x03,  // type: 3 (DATA_CHUNK)
      0x00, 0x00, 0x00, 0x09,  // serial: 9
      0x00, 0x00, 0x00, 0x02,  // status: 2 (CONTINUE)
      0xde, 0xad, 0xbe,        // body: raw bytes, never serialized
  };
  EXPECT_EQ(chunk, expected_chunk);

  const Bytes end = encode_frame({42, 1, 12, FrameType::data_chunk, 9, FrameStatus::ok}, {});
  const Bytes expected_end = {
      0x00, 0x00, 0x00, 0x18,  // length: 24, no body
      0x00, 0x00, 0x00, 0x2a,  // program: 42
      0x00, 0x00, 0x00, 0x01,  // version: 1
      0x00, 0x00, 0x00, 0x0c,  // procedure: 12
      0x00, 0x00, 0x00, 0x03,  // type: 3 (DATA_CHUNK)
      0x00, 0x00, 0x00, 0x09,  // serial: 9
      0x00, 0x00, 0x00, 0x00,  // status: 0 (OK): end of stream
  };
  EXPECT_EQ(end, expected_end);

  const auto hole_body = encode_hole(5ull << 30);
  const Bytes hole = encode_frame({42, 1, 12, FrameType::stream_hole, 9, FrameStatus::ok}, hole_body);
  const Bytes expected_hole = {
      0x00, 0x00, 0x00, 0x20,  // length: 32 = 24 + 8
      0x00, 0x00, 0x00, 0x2a,  // program: 42
      0x00, 0x00, 0x00, 0x01,  // version: 1
      0x00, 0x00, 0x00, 0x0c,  // procedure: 12
      0x00, 0x00, 0x00, 0x04,  // type: 4 (STREAM_HOLE)
      0x00, 0x00, 0x00, 0x09,  // serial: 9
      0x00, 0x00, 0x00, 0x00,  // status: 0 (OK)
      0x00, 0x00, 0x00, 0x01,  // body: u64 hole length 5 GiB, high word
      0x40, 0x00, 0x00, 0x00,  //       low word
  };
  EXPECT_EQ(hole, expected_hole);

  const auto credit_body = encode_credit(256u << 10);
  const Bytes credit = encode_frame({42, 1, 12, FrameType::stream_credit, 9, FrameStatus::ok}, credit_body);
  const Bytes expected_credit = {
      0x00, 0x00, 0x00, 0x1c,  // length: 28 = 24 + 4
      0x00, 0x00, 0x00, 0x2a,  // program: 42
      0x00, 0x00, 0x00, 0x01,  // version: 1
      0x00, 0x00, 0x00, 0x0c,  // procedure: 12
      0x00, 0x00, 0x00, 0x05,  // type: 5 (STREAM_CREDIT)
      0x00, 0x00, 0x00, 0x09,  // serial: 9
      0x00, 0x00, 0x00, 0x00,  // status: 0 (OK)
      0x00, 0x04, 0x00, 0x00,  // body: u32 bytes consumed, 262144
  };
  EXPECT_EQ(credit, expected_credit);

  const Bytes cancel = encode_frame({99, 1, 2, FrameType::cancel, 9, FrameStatus::ok}, {});
  const Bytes expected_cancel = {
      0x00, 0x00, 0x00, 0x18,  // length: 24, no body
      0x00, 0x00, 0x00, 0x63,  // program: 99, the call's
      0x00, 0x00, 0x00, 0x01,  // version: 1, the call's
      0x00, 0x00, 0x00, 0x02,  // procedure: 2, the call's
      0x00, 0x00, 0x00, 0x06,  // type: 6 (CANCEL)
      0x00, 0x00, 0x00, 0x09,  // serial: 9, the call's
      0x00, 0x00, 0x00, 0x00,  // status: 0 (OK)
  };
  EXPECT_EQ(cancel, expected_cancel);
}

TEST(Frame, EncodeFrameIsThePrefixFollowedByTheBody) {
  const Header header{7, 3, 5, FrameType::message, 0, FrameStatus::ok};
  const Bytes body = {1, 2, 3, 4, 5, 6};
  const Bytes frame = encode_frame(header, body);
  ASSERT_EQ(frame.size(), prefix_size + body.size());
  const auto prefix = encode_prefix(header, body.size());
  EXPECT_TRUE(std::equal(prefix.begin(), prefix.end(), frame.begin()));
  EXPECT_TRUE(std::equal(body.begin(), body.end(), frame.begin() + prefix_size));
}

// ---- decoding: what is accepted ----

TEST(Frame, DecodesTheHelloCallPrefix) {
  const auto result = decode_prefix(std::span<const std::uint8_t, prefix_size>(hello_call_frame.data(), prefix_size), {});
  ASSERT_TRUE(result) << result.error.message;
  EXPECT_EQ(result.prefix->header, (Header{0, 1, 1, FrameType::call, 1, FrameStatus::ok}));
  EXPECT_EQ(result.prefix->body_size, 31u);
}

TEST(Frame, RoundTripsEveryValidTypeStatusPair) {
  for (const auto& pair : valid_pairs()) {
    SCOPED_TRACE(std::string(to_string(pair.type)) + "/" + to_string(pair.status));
    // Extreme values in the fields the codec does not interpret.
    const Header header{0xffffffff, 0x80000001, 0xfffffffe, pair.type, 0xffffffff, pair.status};
    const auto bytes = encode_prefix(header, pair.body_size);
    const auto result = decode_prefix(std::span<const std::uint8_t, prefix_size>(bytes), {});
    ASSERT_TRUE(result) << result.error.message;
    EXPECT_EQ(result.prefix->header, header);
    EXPECT_EQ(result.prefix->body_size, pair.body_size);
  }
}

TEST(Frame, AcceptsEmptyBodiesWhereTheProtocolAllowsThem) {
  for (auto [type, status] : {std::pair{FrameType::call, FrameStatus::ok}, std::pair{FrameType::reply, FrameStatus::ok},
                              std::pair{FrameType::reply, FrameStatus::error},
                              std::pair{FrameType::message, FrameStatus::ok},
                              std::pair{FrameType::data_chunk, FrameStatus::cont},
                              std::pair{FrameType::data_chunk, FrameStatus::ok},
                              std::pair{FrameType::data_chunk, FrameStatus::error},
                              std::pair{FrameType::cancel, FrameStatus::ok}}) {
    SCOPED_TRACE(std::string(to_string(type)) + "/" + to_string(status));
    const auto result = decode({.length = length_for(0), .type = raw(type), .status = raw(status)});
    ASSERT_TRUE(result) << result.error.message;
    EXPECT_EQ(result.prefix->body_size, 0u);
  }
}

TEST(Frame, AcceptsBodiesOfExactlyTheNegotiatedLimits) {
  FrameLimits limits;
  limits.max_frame = 64u << 10;
  limits.max_chunk = 4u << 10;
  for (auto [type, status] : {std::pair{FrameType::call, FrameStatus::ok}, std::pair{FrameType::reply, FrameStatus::ok},
                              std::pair{FrameType::reply, FrameStatus::error},
                              std::pair{FrameType::message, FrameStatus::ok},
                              std::pair{FrameType::data_chunk, FrameStatus::error}}) {
    SCOPED_TRACE(std::string(to_string(type)) + "/" + to_string(status));
    const auto result = decode({.length = length_for(limits.max_frame), .type = raw(type), .status = raw(status)}, limits);
    ASSERT_TRUE(result) << result.error.message;
    EXPECT_EQ(result.prefix->body_size, limits.max_frame);
  }
  const auto chunk = decode({.length = length_for(limits.max_chunk), .type = raw(FrameType::data_chunk),
                             .status = raw(FrameStatus::cont)},
                            limits);
  ASSERT_TRUE(chunk) << chunk.error.message;
  EXPECT_EQ(chunk.prefix->body_size, limits.max_chunk);
}

TEST(Frame, DefaultLimitsAreTheProtocolDefaults) {
  const FrameLimits limits;
  EXPECT_EQ(limits.max_frame, 32u << 20);
  EXPECT_EQ(limits.max_chunk, 256u << 10);
  EXPECT_EQ(FrameLimits::min_chunk, 4u << 10);
  EXPECT_EQ(FrameLimits::max_chunk_ceiling, 16u << 20);
  EXPECT_EQ(prefix_size, 28u);
}

// ---- decoding: every refusal, and that it says why ----

TEST(Frame, RefusesLengthShorterThanTheHeader) {
  for (std::uint32_t length : {0u, 1u, 4u, 23u}) {
    SCOPED_TRACE(length);
    expect_refused({.length = length},
                   "frame length " + std::to_string(length) + " is shorter than the 24-byte header");
  }
}

TEST(Frame, RefusesUnknownFrameType) {
  expect_refused({.type = 7}, "unknown frame type 7");
  expect_refused({.type = 0xffffffff}, "unknown frame type 4294967295");
}

TEST(Frame, RefusesUnknownFrameStatus) {
  expect_refused({.status = 3}, "unknown frame status 3");
  expect_refused({.status = 0xffffffff}, "unknown frame status 4294967295");
}

TEST(Frame, RefusesCallAndMessageWithAnyStatusButOk) {
  expect_refused({.type = raw(FrameType::call), .status = raw(FrameStatus::error)},
                 "CALL/ERROR is not a valid type/status pair");
  expect_refused({.type = raw(FrameType::call), .status = raw(FrameStatus::cont)},
                 "CALL/CONTINUE is not a valid type/status pair");
  expect_refused({.type = raw(FrameType::message), .status = raw(FrameStatus::error)},
                 "MESSAGE/ERROR is not a valid type/status pair");
  expect_refused({.type = raw(FrameType::message), .status = raw(FrameStatus::cont)},
                 "MESSAGE/CONTINUE is not a valid type/status pair");
}

TEST(Frame, RefusesReplyWithStatusContinue) {
  expect_refused({.type = raw(FrameType::reply), .status = raw(FrameStatus::cont)},
                 "REPLY/CONTINUE is not a valid type/status pair");
}

TEST(Frame, RefusesCallReplyOrMessageBodyLargerThanMaxFrame) {
  FrameLimits limits;
  limits.max_frame = 64u << 10;
  const std::uint32_t body = limits.max_frame + 1;
  expect_refused({.length = length_for(body), .type = raw(FrameType::call)},
                 "CALL/OK body of 65537 bytes exceeds the negotiated maximum of 65536", limits);
  expect_refused({.length = length_for(body), .type = raw(FrameType::reply)},
                 "REPLY/OK body of 65537 bytes exceeds the negotiated maximum of 65536", limits);
  expect_refused({.length = length_for(body), .type = raw(FrameType::reply), .status = raw(FrameStatus::error)},
                 "REPLY/ERROR body of 65537 bytes exceeds the negotiated maximum of 65536", limits);
  expect_refused({.length = length_for(body), .type = raw(FrameType::message)},
                 "MESSAGE/OK body of 65537 bytes exceeds the negotiated maximum of 65536", limits);
}

TEST(Frame, RefusesCallBodyLargerThanTheDefaultMaxFrame) {
  expect_refused({.length = length_for((32u << 20) + 1), .type = raw(FrameType::call)},
                 "body of 33554433 bytes exceeds the negotiated maximum of 33554432");
}

TEST(Frame, RefusesDataChunkLargerThanMaxChunk) {
  FrameLimits limits;
  limits.max_chunk = 4u << 10;
  expect_refused({.length = length_for(limits.max_chunk + 1), .type = raw(FrameType::data_chunk),
                  .status = raw(FrameStatus::cont)},
                 "DATA_CHUNK of 4097 bytes exceeds the negotiated chunk size of 4096", limits);
}

TEST(Frame, RefusesDataChunkLargerThanMaxChunkEvenWhenMaxFrameIsLarger) {
  // Chunks have their own, smaller limit: a chunk the size of a CALL is
  // still refused.
  expect_refused({.length = length_for((256u << 10) + 1), .type = raw(FrameType::data_chunk),
                  .status = raw(FrameStatus::cont)},
                 "DATA_CHUNK of 262145 bytes exceeds the negotiated chunk size of 262144");
}

TEST(Frame, RefusesEndOfStreamChunkWithABody) {
  expect_refused({.length = length_for(1), .type = raw(FrameType::data_chunk), .status = raw(FrameStatus::ok)},
                 "DATA_CHUNK/OK (end of stream) must have an empty body");
}

TEST(Frame, RefusesDataChunkErrorLargerThanMaxFrame) {
  FrameLimits limits;
  limits.max_frame = 64u << 10;
  expect_refused({.length = length_for(limits.max_frame + 1), .type = raw(FrameType::data_chunk),
                  .status = raw(FrameStatus::error)},
                 "DATA_CHUNK/ERROR body of 65537 bytes exceeds the maximum frame size", limits);
}

TEST(Frame, RefusesStreamHoleWithoutExactlyEightBytes) {
  for (std::uint32_t size : {0u, 4u, 7u, 9u, 16u}) {
    SCOPED_TRACE(size);
    expect_refused({.length = length_for(size), .type = raw(FrameType::stream_hole)},
                   "STREAM_HOLE/OK with a " + std::to_string(size) + "-byte body; expected OK with 8 bytes");
  }
}

TEST(Frame, RefusesStreamHoleWithAStatusOtherThanOk) {
  expect_refused({.length = length_for(8), .type = raw(FrameType::stream_hole), .status = raw(FrameStatus::error)},
                 "STREAM_HOLE/ERROR with a 8-byte body; expected OK with 8 bytes");
  expect_refused({.length = length_for(8), .type = raw(FrameType::stream_hole), .status = raw(FrameStatus::cont)},
                 "STREAM_HOLE/CONTINUE");
}

TEST(Frame, RefusesStreamCreditWithoutExactlyFourBytes) {
  for (std::uint32_t size : {0u, 3u, 5u, 8u}) {
    SCOPED_TRACE(size);
    expect_refused({.length = length_for(size), .type = raw(FrameType::stream_credit)},
                   "STREAM_CREDIT/OK with a " + std::to_string(size) + "-byte body; expected OK with 4 bytes");
  }
  expect_refused({.length = length_for(4), .type = raw(FrameType::stream_credit), .status = raw(FrameStatus::cont)},
                 "STREAM_CREDIT/CONTINUE with a 4-byte body; expected OK with 4 bytes");
}

TEST(Frame, RefusesCancelWithABodyOrAStatusOtherThanOk) {
  expect_refused({.length = length_for(1), .type = raw(FrameType::cancel)},
                 "CANCEL/OK with a 1-byte body; expected OK and empty");
  expect_refused({.length = length_for(0), .type = raw(FrameType::cancel), .status = raw(FrameStatus::error)},
                 "CANCEL/ERROR with a 0-byte body; expected OK and empty");
}

TEST(Frame, RefusesFourGibLengthWhateverTheTypeAndStatus) {
  // The length field alone must condemn the frame: no allocation of ~4 GiB
  // may follow from it.
  for (const auto& pair : valid_pairs()) {
    SCOPED_TRACE(std::string(to_string(pair.type)) + "/" + to_string(pair.status));
    const auto result = decode({.length = 0xffffffff, .type = raw(pair.type), .status = raw(pair.status)});
    EXPECT_FALSE(result);
    EXPECT_FALSE(result.error.message.empty());
  }
  // Even with the largest limits the protocol lets a peer negotiate.
  FrameLimits widest;
  widest.max_frame = FrameLimits::max_frame_ceiling;
  widest.max_chunk = FrameLimits::max_chunk_ceiling;
  expect_refused({.length = 0xffffffff, .type = raw(FrameType::call)},
                 "CALL/OK body of 4294967271 bytes exceeds the negotiated maximum of 268435456", widest);
}

TEST(Frame, JudgesSizesAgainstTheLimitsItIsGiven) {
  const RawPrefix call{.length = length_for(100 << 10), .type = raw(FrameType::call)};
  FrameLimits small;
  small.max_frame = 64u << 10;
  EXPECT_FALSE(decode(call, small));
  EXPECT_TRUE(decode(call, FrameLimits{}));
}

TEST(Frame, NamesTypesAndStatusesAsTheProtocolDoes) {
  EXPECT_STREQ(to_string(FrameType::call), "CALL");
  EXPECT_STREQ(to_string(FrameType::reply), "REPLY");
  EXPECT_STREQ(to_string(FrameType::message), "MESSAGE");
  EXPECT_STREQ(to_string(FrameType::data_chunk), "DATA_CHUNK");
  EXPECT_STREQ(to_string(FrameType::stream_hole), "STREAM_HOLE");
  EXPECT_STREQ(to_string(FrameType::stream_credit), "STREAM_CREDIT");
  EXPECT_STREQ(to_string(FrameType::cancel), "CANCEL");
  EXPECT_STREQ(to_string(static_cast<FrameType>(7)), "UNKNOWN");
  EXPECT_STREQ(to_string(FrameStatus::ok), "OK");
  EXPECT_STREQ(to_string(FrameStatus::error), "ERROR");
  EXPECT_STREQ(to_string(FrameStatus::cont), "CONTINUE");
  EXPECT_STREQ(to_string(static_cast<FrameStatus>(3)), "UNKNOWN");
}

// ---- fixed bodies: hole and credit ----

TEST(Frame, EncodesHoleLengthAsBigEndianU64) {
  const std::array<std::uint8_t, hole_body_size> expected = {0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef};
  EXPECT_EQ(encode_hole(0x0123456789abcdefull), expected);
}

TEST(Frame, RoundTripsHoleLengthsBeyondFourGib) {
  for (std::uint64_t length : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{0xffffffff}, std::uint64_t{1} << 32,
                               (std::uint64_t{1} << 32) + 1, std::uint64_t{5} << 30, std::uint64_t{1} << 40,
                               std::numeric_limits<std::uint64_t>::max()}) {
    SCOPED_TRACE(length);
    const auto body = encode_hole(length);
    EXPECT_EQ(decode_hole(std::span<const std::uint8_t, hole_body_size>(body)), length);
  }
}

TEST(Frame, EncodesCreditAsBigEndianU32) {
  const std::array<std::uint8_t, credit_body_size> expected = {0x89, 0xab, 0xcd, 0xef};
  EXPECT_EQ(encode_credit(0x89abcdefu), expected);
}

TEST(Frame, RoundTripsCreditValues) {
  for (std::uint32_t bytes : {0u, 1u, 4096u, 4u << 20, 0x80000000u, 0xffffffffu}) {
    SCOPED_TRACE(bytes);
    const auto body = encode_credit(bytes);
    EXPECT_EQ(decode_credit(std::span<const std::uint8_t, credit_body_size>(body)), bytes);
  }
}

// ---- FrameDecoder ----

using Frame = FrameDecoder::Frame;

Bytes bytes_of_frames(const std::vector<Frame>& frames) {
  Bytes out;
  for (const auto& f : frames) {
    const Bytes one = encode_frame(f.header, f.body);
    out.insert(out.end(), one.begin(), one.end());
  }
  return out;
}

// One frame of every valid type/status pair, with bodies of assorted sizes
// (including empty ones back to back).
std::vector<Frame> sample_frames() {
  std::vector<Frame> frames;
  Serial serial = 1;
  for (const auto& pair : valid_pairs()) {
    Frame f;
    f.header = Header{99, 1, serial % 7, pair.type, serial, pair.status};
    f.body.resize(pair.body_size);
    for (std::size_t i = 0; i < f.body.size(); ++i) f.body[i] = static_cast<std::uint8_t>(serial * 31 + i);
    frames.push_back(std::move(f));
    ++serial;
  }
  Frame hello;
  hello.header = Header{0, 1, 1, FrameType::call, serial, FrameStatus::ok};
  hello.body.assign(hello_call_frame.begin() + prefix_size, hello_call_frame.end());
  frames.push_back(std::move(hello));
  return frames;
}

void expect_same_frames(const std::vector<Frame>& got, const std::vector<Frame>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(got[i].header, want[i].header);
    EXPECT_EQ(got[i].body, want[i].body);
  }
}

TEST(FrameDecoder, DecodesFramesFedOneByteAtATime) {
  const auto frames = sample_frames();
  FrameDecoder decoder;
  std::vector<Frame> out;
  std::size_t frame_index = 0;
  std::size_t frame_end = prefix_size + frames[0].body.size();
  const Bytes stream = bytes_of_frames(frames);
  for (std::size_t i = 0; i < stream.size(); ++i) {
    ASSERT_TRUE(decoder.feed(std::span(&stream[i], 1), out)) << decoder.error();
    // A frame comes out exactly when its last byte arrives, not before.
    if (i + 1 == frame_end) {
      ++frame_index;
      if (frame_index < frames.size()) frame_end += prefix_size + frames[frame_index].body.size();
    }
    ASSERT_EQ(out.size(), frame_index) << "after byte " << i;
  }
  expect_same_frames(out, frames);
  EXPECT_EQ(decoder.buffered(), 0u);
  EXPECT_FALSE(decoder.failed());
}

TEST(FrameDecoder, DecodesTheSameFramesWhereverTheBytesAreSplit) {
  const auto frames = sample_frames();
  const Bytes stream = bytes_of_frames(frames);
  std::mt19937 rng(20240601);  // fixed: a failure must be reproducible
  for (int round = 0; round < 500; ++round) {
    SCOPED_TRACE(round);
    const std::size_t max_piece = 1 + rng() % 64;
    FrameDecoder decoder;
    std::vector<Frame> out;
    std::size_t pos = 0;
    while (pos < stream.size()) {
      const std::size_t n = std::min(stream.size() - pos, 1 + rng() % max_piece);
      ASSERT_TRUE(decoder.feed(std::span(stream.data() + pos, n), out)) << decoder.error();
      pos += n;
    }
    expect_same_frames(out, frames);
    EXPECT_EQ(decoder.buffered(), 0u);
  }
}

TEST(FrameDecoder, DecodesSeveralFramesFromOneFeed) {
  const auto frames = sample_frames();
  const Bytes stream = bytes_of_frames(frames);
  FrameDecoder decoder;
  std::vector<Frame> out;
  ASSERT_TRUE(decoder.feed(stream, out)) << decoder.error();
  expect_same_frames(out, frames);
  EXPECT_EQ(decoder.buffered(), 0u);
}

TEST(FrameDecoder, KeepsAPartialFrameUntilTheRestArrives) {
  const Bytes stream = bytes_of_frames(sample_frames());
  const Bytes first(hello_call_frame.begin(), hello_call_frame.end());
  FrameDecoder decoder;
  std::vector<Frame> out;
  // 27 bytes: not even a whole prefix.
  ASSERT_TRUE(decoder.feed(std::span(first.data(), prefix_size - 1), out));
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(decoder.buffered(), prefix_size - 1);
  // The prefix and part of the body.
  ASSERT_TRUE(decoder.feed(std::span(first.data() + prefix_size - 1, 10), out));
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(decoder.buffered(), prefix_size + 9);
  // The rest of the body plus the first byte of another frame.
  Bytes rest(first.begin() + prefix_size + 9, first.end());
  rest.push_back(0x00);
  ASSERT_TRUE(decoder.feed(rest, out));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].header, (Header{0, 1, 1, FrameType::call, 1, FrameStatus::ok}));
  EXPECT_EQ(out[0].body, Bytes(first.begin() + prefix_size, first.end()));
  EXPECT_EQ(decoder.buffered(), 1u);
}

TEST(FrameDecoder, AppendsToTheOutputWithoutClearingIt) {
  FrameDecoder decoder;
  std::vector<Frame> out(2);
  ASSERT_TRUE(decoder.feed(hello_call_frame, out));
  EXPECT_EQ(out.size(), 3u);
}

TEST(FrameDecoder, AcceptsAnEmptyFeed) {
  FrameDecoder decoder;
  std::vector<Frame> out;
  EXPECT_TRUE(decoder.feed({}, out));
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(decoder.buffered(), 0u);
}

TEST(FrameDecoder, RefusesAnOversizedFrameBeforeItsBodyArrives) {
  FrameLimits limits;
  limits.max_frame = 64u << 10;
  FrameDecoder decoder(limits);
  std::vector<Frame> out;
  const auto prefix = bytes_of({.length = length_for(limits.max_frame + 1), .type = raw(FrameType::call)});
  EXPECT_FALSE(decoder.feed(prefix, out));
  EXPECT_TRUE(decoder.failed());
  EXPECT_THAT(decoder.error(), HasSubstr("exceeds the negotiated maximum of 65536"));
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(decoder.buffered(), 0u);
}

TEST(FrameDecoder, RefusesAFourGibLengthWithoutWaitingForIt) {
  FrameDecoder decoder;
  std::vector<Frame> out;
  EXPECT_FALSE(decoder.feed(bytes_of({.length = 0xffffffff}), out));
  EXPECT_THAT(decoder.error(), HasSubstr("4294967271"));
  EXPECT_EQ(decoder.buffered(), 0u);
}

TEST(FrameDecoder, DeliversTheFramesBeforeABadOneThenFails) {
  const auto frames = sample_frames();
  Bytes stream = bytes_of_frames(frames);
  const auto bad = bytes_of({.type = 7});
  stream.insert(stream.end(), bad.begin(), bad.end());
  FrameDecoder decoder;
  std::vector<Frame> out;
  EXPECT_FALSE(decoder.feed(stream, out));
  expect_same_frames(out, frames);
  EXPECT_EQ(decoder.error(), "unknown frame type 7");
}

TEST(FrameDecoder, StaysFailedAfterAnError) {
  FrameDecoder decoder;
  std::vector<Frame> out;
  ASSERT_FALSE(decoder.feed(bytes_of({.status = 3}), out));
  const std::string first_error = decoder.error();
  EXPECT_EQ(first_error, "unknown frame status 3");
  // A perfectly good frame afterwards is not decoded: after a protocol
  // error the byte stream is out of step and nothing in it can be trusted.
  EXPECT_FALSE(decoder.feed(hello_call_frame, out));
  EXPECT_FALSE(decoder.feed(hello_call_frame, out));
  EXPECT_TRUE(out.empty());
  EXPECT_TRUE(decoder.failed());
  EXPECT_EQ(decoder.error(), first_error);
  EXPECT_EQ(decoder.buffered(), 0u);
}

TEST(FrameDecoder, FailsOnABadPrefixSplitAcrossFeeds) {
  const auto bad = bytes_of({.type = raw(FrameType::reply), .status = raw(FrameStatus::cont)});
  FrameDecoder decoder;
  std::vector<Frame> out;
  for (std::size_t i = 0; i + 1 < bad.size(); ++i) ASSERT_TRUE(decoder.feed(std::span(&bad[i], 1), out));
  EXPECT_FALSE(decoder.feed(std::span(&bad[bad.size() - 1], 1), out));
  EXPECT_THAT(decoder.error(), HasSubstr("REPLY/CONTINUE"));
}

TEST(FrameDecoder, AppliesTheLimitsItWasBuiltWith) {
  FrameLimits limits;
  limits.max_chunk = 4u << 10;
  const Bytes chunk = encode_frame({1, 1, 1, FrameType::data_chunk, 1, FrameStatus::cont}, Bytes((4u << 10) + 1, 0xaa));
  FrameDecoder strict(limits);
  FrameDecoder lenient;
  std::vector<Frame> out;
  EXPECT_FALSE(strict.feed(chunk, out));
  EXPECT_TRUE(lenient.feed(chunk, out)) << lenient.error();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].body.size(), (4u << 10) + 1);
}

}  // namespace
}  // namespace ferry::rpc
