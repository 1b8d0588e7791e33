// The security layer switch: two real Connections over a socket pair switch
// to a (test) layer at a frame boundary while frames keep flowing, and the
// bytes after the switch are really transformed. Plus the small pure pieces
// around authentication: the DN allow-list and the Hello negotiation.
#include "rpc/security_layer.h"

#include <gtest/gtest.h>

#include <asio/local/connect_pair.hpp>
#include <asio/strand.hpp>
#include <condition_variable>
#include <mutex>

#include "ferry/v1/control.pb.h"
#include "rpc/connection.h"
#include "rpc/hello.h"
#include "rpc/io_threads.h"
#include "rpc/socket_transport.h"
#include "rpc/tls.h"
#include "tests/error_of.h"

namespace ferry::rpc {
namespace {

using namespace std::chrono_literals;

// A toy layer: each packet is a 2-byte length and the bytes XORed with a
// key. Enough to prove every byte after the switch went through it.
class XorLayer final : public SecurityLayer {
 public:
  explicit XorLayer(std::uint8_t key) : key_(key) {}
  void encode(std::span<const std::uint8_t> in, std::vector<std::uint8_t>& out) override {
    out.push_back(static_cast<std::uint8_t>(in.size() >> 8));
    out.push_back(static_cast<std::uint8_t>(in.size()));
    for (auto b : in) out.push_back(b ^ key_);
    encoded_ += in.size();
  }
  void decode(std::span<const std::uint8_t> in, std::vector<std::uint8_t>& out) override {
    pending_.insert(pending_.end(), in.begin(), in.end());
    std::size_t pos = 0;
    while (pending_.size() - pos >= 2) {
      const std::size_t n = (std::size_t{pending_[pos]} << 8) | pending_[pos + 1];
      if (pending_.size() - pos - 2 < n) break;
      for (std::size_t i = 0; i < n; ++i) out.push_back(pending_[pos + 2 + i] ^ key_);
      pos += 2 + n;
      decoded_ += n;
    }
    pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(pos));
  }
  std::size_t max_input() const override { return 1000; }  // small: frames span packets
  const char* name() const override { return "xor"; }
  std::atomic<std::size_t> encoded_{0}, decoded_{0};

 private:
  std::uint8_t key_;
  std::vector<std::uint8_t> pending_;
};

class Recorder : public FrameHandler {
 public:
  std::function<void(const Header&)> on_each;
  void on_frame(const Header& header, Buffer body) override {
    if (on_each) on_each(header);
    std::lock_guard lock(mutex_);
    bodies_.push_back(std::string(body.data(), body.data() + body.size()));
    serials_.push_back(header.serial);
    cv_.notify_all();
  }
  void on_close(const Error& reason) override {
    std::lock_guard lock(mutex_);
    closed_ = reason.message();
    cv_.notify_all();
  }
  bool wait(std::size_t n) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, 5s, [&] { return bodies_.size() >= n || !closed_.empty(); }) && bodies_.size() >= n;
  }
  std::vector<std::string> bodies() {
    std::lock_guard lock(mutex_);
    return bodies_;
  }
  std::string closed() {
    std::lock_guard lock(mutex_);
    return closed_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::string> bodies_;
  std::vector<Serial> serials_;
  std::string closed_;
};

Buffer text(const std::string& s) {
  Buffer b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

TEST(SecurityLayerSwitch, BothSidesSwitchAtTheFrameBoundaryWhileFramesFlow) {
  IoThreads io(2);
  asio::local::stream_protocol::socket a(asio::make_strand(io.executor()));
  asio::local::stream_protocol::socket b(asio::make_strand(io.executor()));
  asio::local::connect_pair(a, b);
  auto client = std::make_shared<Connection>(std::make_unique<UnixTransport>(std::move(a)), ConnectionOptions{});
  auto server = std::make_shared<Connection>(std::make_unique<UnixTransport>(std::move(b)), ConnectionOptions{});
  auto client_layer = std::make_shared<XorLayer>(0x5a);
  auto server_layer = std::make_shared<XorLayer>(0x5a);
  auto on_client = std::make_shared<Recorder>();
  auto on_server = std::make_shared<Recorder>();

  // The server switches when it sees the CALL with serial 1 (as after the
  // last SASL step): reads from the next byte, writes after its reply.
  on_server->on_each = [&](const Header& h) {
    if (h.serial != 1) return;
    server->hold_reads();
    Header reply = h;
    reply.type = FrameType::reply;
    server->send(reply, text("switching"));
    server->secure_writes(server_layer);
    server->resume_reads(server_layer);
  };
  // The client holds on that reply and switches its reads there.
  on_client->on_each = [&](const Header& h) {
    if (h.serial == 1 && h.type == FrameType::reply) client->hold_reads();
  };
  client->start(on_client);
  server->start(on_server);

  Header call{99, 1, 1, FrameType::call, 1, FrameStatus::ok};
  client->send(call, text("last plaintext frame"));
  // Without waiting for the reply, the client switches its writes and
  // keeps sending: those bytes may reach the server in the same read as
  // the call above, before it knows about the layer.
  client->secure_writes(client_layer);
  const std::string big(5000, 'p');  // spans several layer packets
  for (Serial s = 2; s <= 50; ++s)
    client->send(Header{99, 1, 1, FrameType::call, s, FrameStatus::ok}, text(s % 10 ? "after " + std::to_string(s) : big));
  ASSERT_TRUE(on_client->wait(1));
  client->resume_reads(client_layer);
  for (Serial s = 2; s <= 50; ++s)
    server->send(Header{99, 1, 1, FrameType::reply, s, FrameStatus::ok}, text("reply " + std::to_string(s)));

  ASSERT_TRUE(on_server->wait(50)) << on_server->closed();
  ASSERT_TRUE(on_client->wait(50)) << on_client->closed();
  auto got = on_server->bodies();
  EXPECT_EQ(got[0], "last plaintext frame");
  for (Serial s = 2; s <= 50; ++s) EXPECT_EQ(got[s - 1], s % 10 ? "after " + std::to_string(s) : big);
  auto replies = on_client->bodies();
  EXPECT_EQ(replies[0], "switching");
  for (Serial s = 2; s <= 50; ++s) EXPECT_EQ(replies[s - 1], "reply " + std::to_string(s));
  // Everything after the switch went through the layers, both ways.
  EXPECT_GT(client_layer->encoded_.load(), 49u * 28);
  EXPECT_EQ(server_layer->decoded_.load(), client_layer->encoded_.load());
  EXPECT_GT(server_layer->encoded_.load(), 49u * 28);
  EXPECT_EQ(client_layer->decoded_.load(), server_layer->encoded_.load());
  client->close(Error(Code::unavailable, "done"));
  server->close(Error(Code::unavailable, "done"));
}

TEST(DnAllowList, GlobsMatchTheWholeSubject) {
  EXPECT_TRUE(dn_allowed("CN=anything", {}));
  const std::vector<std::string> list = {"CN=*,O=ferry tests", "CN=admin,O=ops"};
  EXPECT_TRUE(dn_allowed("CN=client1,O=ferry tests", list));
  EXPECT_TRUE(dn_allowed("CN=admin,O=ops", list));
  EXPECT_FALSE(dn_allowed("CN=mallory,O=elsewhere", list));
  EXPECT_FALSE(dn_allowed("CN=client1,O=ferry tests,OU=x", list));  // no partial match
  EXPECT_FALSE(dn_allowed("", list));
}

TEST(HelloNegotiation, TakesTheSmallerLimitsAndNeverAWindowBelowAChunk) {
  HelloOffer offer;
  offer.auth_required = true;
  ferry::v1::HelloCall hello;
  hello.set_protocol_version(1);
  hello.set_max_frame(1);        // raised to 64 KiB
  hello.set_chunk_size(1 << 30);  // cut to the server's
  hello.set_window(1);            // raised to one chunk
  hello.set_client_name(std::string(10000, 'n'));
  const std::string body = hello.SerializeAsString();
  auto out = negotiate_hello({reinterpret_cast<const std::uint8_t*>(body.data()), body.size()}, offer);
  EXPECT_EQ(out.limits.max_frame, 64u << 10);
  EXPECT_EQ(out.limits.max_chunk, offer.limits.max_chunk);
  EXPECT_EQ(out.window, out.limits.max_chunk);
  EXPECT_TRUE(out.reply.auth_required());
  EXPECT_EQ(out.client_name.size(), 256u);

  hello.set_protocol_version(2);
  const std::string v2 = hello.SerializeAsString();
  auto error = ferry::testing::error_of(
      [&] { negotiate_hello({reinterpret_cast<const std::uint8_t*>(v2.data()), v2.size()}, offer); });
  EXPECT_EQ(error.code(), Code::unimplemented);
  const std::uint8_t junk[] = {0xff, 0xff, 0xff};
  EXPECT_EQ(ferry::testing::error_of([&] { negotiate_hello(junk, offer); }).code(), Code::invalid_argument);
}

}  // namespace
}  // namespace ferry::rpc
