// A peer that sends garbage must lose only its own connection: the server
// logs why, closes that connection, and goes on serving everyone else.
#include <gtest/gtest.h>

#include "ferry/v1/control.ferry.h"
#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "tests/integration/ferryd_process.h"
#include "tests/integration/raw_socket.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
using rpc::FrameStatus;
using rpc::FrameType;
using rpc::Header;
using TestSvc = test::v1::Test;

class BadInputTest : public ::testing::TestWithParam<TransportKind> {
 protected:
  void SetUp() override {
    server_ = std::make_unique<FerrydProcess>();
    bystander_ = rpc::Client::connect_sync(io_.executor(), server_->uri(GetParam()));
  }

  RawSocket raw() {
    return GetParam() == TransportKind::unix_socket ? RawSocket::connect_unix(server_->socket_path())
                                                    : RawSocket::connect_tcp(server_->tcp_port());
  }

  // The well-behaved client on the same server still gets answers.
  void expect_bystander_served() {
    test::v1::EchoCall call;
    call.set_payload("unaffected");
    EXPECT_EQ(bystander_.call_future<TestSvc::Echo>(call).get().payload(), "unaffected");
    EXPECT_TRUE(server_->running());
  }

  void expect_closed_with_log(RawSocket& sock, const std::string& reason) {
    EXPECT_TRUE(sock.wait_closed()) << "server should close the offending connection";
    EXPECT_TRUE(server_->wait_for_log(reason)) << "log lacks '" << reason << "':\n" << server_->log();
    expect_bystander_served();
  }

  rpc::IoThreads io_{1};
  std::unique_ptr<FerrydProcess> server_;
  rpc::Client bystander_;
};

TEST_P(BadInputTest, GarbageBytesCloseOnlyThatConnection) {
  auto sock = raw();
  std::vector<std::uint8_t> garbage(64);
  for (std::size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<std::uint8_t>(i * 37 + 11);
  // First word 0x0b30557a: a length far above the limit.
  sock.send(garbage);
  expect_closed_with_log(sock, "protocol error");
}

TEST_P(BadInputTest, FourGibLengthIsRefusedWithoutAllocatingIt) {
  auto sock = raw();
  sock.hello();
  std::vector<std::uint8_t> bytes = rpc::encode_frame(
      {TestSvc::program, TestSvc::version, TestSvc::Echo::number, FrameType::call, 5, FrameStatus::ok}, {});
  bytes[0] = bytes[1] = bytes[2] = bytes[3] = 0xff;  // length 0xffffffff
  sock.send(bytes);
  expect_closed_with_log(sock, "exceeds the negotiated maximum");
  EXPECT_LT(server_->rss_bytes(), 512ull << 20);
}

TEST_P(BadInputTest, UnknownFrameTypeIsAProtocolError) {
  auto sock = raw();
  sock.hello();
  auto bytes = rpc::encode_frame({TestSvc::program, TestSvc::version, 1, FrameType::call, 2, FrameStatus::ok}, {});
  bytes[19] = 9;  // type 9 does not exist
  sock.send(bytes);
  expect_closed_with_log(sock, "unknown frame type 9");
}

TEST_P(BadInputTest, UnknownStatusIsAProtocolError) {
  auto sock = raw();
  sock.hello();
  auto bytes = rpc::encode_frame({TestSvc::program, TestSvc::version, 1, FrameType::call, 2, FrameStatus::ok}, {});
  bytes[27] = 7;  // status 7 does not exist
  sock.send(bytes);
  expect_closed_with_log(sock, "unknown frame status 7");
}

TEST_P(BadInputTest, TruncatedFrameThenHangUpLeavesTheServerServing) {
  auto sock = raw();
  sock.hello();
  test::v1::EchoCall call;
  call.set_payload(std::string(1000, 'z'));
  auto bytes = rpc::encode_frame({TestSvc::program, TestSvc::version, TestSvc::Echo::number, FrameType::call, 3, FrameStatus::ok},
                                 {reinterpret_cast<const std::uint8_t*>(call.SerializeAsString().data()),
                                  call.ByteSizeLong()});
  bytes.resize(bytes.size() / 2);
  sock.send(bytes);
  { RawSocket gone = std::move(sock); }  // hang up mid-frame
  EXPECT_TRUE(server_->wait_for_log("in the middle of a CALL frame")) << server_->log();
  expect_bystander_served();
}

TEST_P(BadInputTest, MalformedBodyIsAnsweredThenTheConnectionCloses) {
  auto sock = raw();
  sock.hello();
  std::string junk = "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff";  // not a protobuf message
  sock.send_frame({TestSvc::program, TestSvc::version, TestSvc::Echo::number, FrameType::call, 4, FrameStatus::ok}, junk);
  Header h;
  std::vector<std::uint8_t> body;
  ASSERT_TRUE(sock.read_frame(h, body));
  EXPECT_EQ(h.type, FrameType::reply);
  EXPECT_EQ(h.status, FrameStatus::error);
  EXPECT_EQ(h.serial, 4u);
  ferry::v1::Error e;
  ASSERT_TRUE(e.ParseFromArray(body.data(), static_cast<int>(body.size())));
  EXPECT_EQ(e.code(), ferry::v1::INVALID_ARGUMENT);
  EXPECT_NE(e.message().find("malformed CALL body"), std::string::npos) << e.message();
  expect_closed_with_log(sock, "malformed CALL body");
}

TEST_P(BadInputTest, CallsBeforeHelloAreRefusedAndTheConnectionLives) {
  auto sock = raw();
  sock.send_frame({TestSvc::program, TestSvc::version, TestSvc::Echo::number, FrameType::call, 1, FrameStatus::ok}, "");
  Header h;
  std::vector<std::uint8_t> body;
  ASSERT_TRUE(sock.read_frame(h, body));
  EXPECT_EQ(h.status, FrameStatus::error);
  ferry::v1::Error e;
  ASSERT_TRUE(e.ParseFromArray(body.data(), static_cast<int>(body.size())));
  EXPECT_EQ(e.code(), ferry::v1::FAILED_PRECONDITION);
  EXPECT_NE(e.message().find("Hello"), std::string::npos);
  sock.hello();  // and then everything works
  sock.send_frame({TestSvc::program, TestSvc::version, TestSvc::Echo::number, FrameType::call, 2, FrameStatus::ok}, "");
  ASSERT_TRUE(sock.read_frame(h, body));
  EXPECT_EQ(h.status, FrameStatus::ok);
  EXPECT_EQ(h.serial, 2u);
}

TEST_P(BadInputTest, ReusedSerialInFlightIsAProtocolError) {
  auto sock = raw();
  sock.hello();
  test::v1::SleepCall call;
  call.set_ms(5000);
  Header h{TestSvc::program, TestSvc::version, TestSvc::Sleep::number, FrameType::call, 9, FrameStatus::ok};
  sock.send_frame(h, call.SerializeAsString());
  sock.send_frame(h, call.SerializeAsString());
  expect_closed_with_log(sock, "serial 9 reused");
}

TEST_P(BadInputTest, StreamFramesWithoutAStreamAreAProtocolError) {
  auto sock = raw();
  sock.hello();
  auto credit = rpc::encode_credit(4096);
  sock.send(rpc::encode_frame({TestSvc::program, TestSvc::version, 1, FrameType::stream_credit, 77, FrameStatus::ok}, credit));
  expect_closed_with_log(sock, "opened no stream");
}

TEST_P(BadInputTest, SilentPeerIsDroppedByKeepalive) {
  server_.reset();
  server_ = std::make_unique<FerrydProcess>(std::vector<std::string>{"--keepalive-interval", "100", "--keepalive-count", "2"});
  bystander_ = rpc::Client::connect_sync(io_.executor(), server_->uri(GetParam()));
  auto sock = raw();
  sock.hello();
  // Never answers the server's Ping MESSAGEs.
  std::vector<Header> seen;
  EXPECT_TRUE(sock.wait_closed(5s, &seen));
  EXPECT_TRUE(server_->wait_for_log("unreachable")) << server_->log();
  bool pinged = false;
  for (auto& h : seen)
    if (h.type == FrameType::message && h.procedure == ferry::v1::Control::KeepalivePing::number) pinged = true;
  EXPECT_TRUE(pinged) << "the server should have probed before giving up";
  expect_bystander_served();
}

INSTANTIATE_TEST_SUITE_P(Transports, BadInputTest, ::testing::Values(TransportKind::unix_socket, TransportKind::tcp),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace ferry::testing
