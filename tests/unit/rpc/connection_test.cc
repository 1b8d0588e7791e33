// Connection, driven in-process over a socket pair: one end is a real
// Connection, the other a plain socket the test reads and writes.
#include "rpc/connection.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <asio/local/connect_pair.hpp>
#include <asio/strand.hpp>
#include <condition_variable>
#include <mutex>

#include "ferry/v1/control.ferry.h"
#include "rpc/io_threads.h"
#include "rpc/socket_transport.h"

namespace ferry::rpc {
namespace {

using namespace std::chrono_literals;

class RecordingHandler : public FrameHandler {
 public:
  void on_frame(const Header& header, Buffer body) override {
    std::lock_guard lock(mutex_);
    frames_.emplace_back(header, std::move(body));
    cv_.notify_all();
  }
  void on_close(const Error& reason) override {
    std::lock_guard lock(mutex_);
    closes_++;
    reason_ = reason.message();
    cv_.notify_all();
  }
  bool wait_frames(std::size_t n, std::chrono::milliseconds timeout = 5s) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return frames_.size() >= n; });
  }
  bool wait_closed(std::chrono::milliseconds timeout = 5s) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return closes_ > 0; });
  }
  std::size_t frame_count() {
    std::lock_guard lock(mutex_);
    return frames_.size();
  }
  int closes() {
    std::lock_guard lock(mutex_);
    return closes_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::pair<Header, Buffer>> frames_;
  int closes_ = 0;
  std::string reason_;
};

// A Connection on one end of a UNIX socket pair; the test holds the other
// end as a raw file descriptor.
struct Pair {
  explicit Pair(IoThreads& io, ConnectionOptions options = {}) {
    asio::local::stream_protocol::socket a(asio::make_strand(io.executor()));
    asio::local::stream_protocol::socket b(io.context());
    asio::local::connect_pair(a, b);
    peer_fd = b.release();
    connection = std::make_shared<Connection>(std::make_unique<UnixTransport>(std::move(a)), options);
    handler = std::make_shared<RecordingHandler>();
  }
  ~Pair() {
    connection->close(Error(Code::unavailable, "test over"));
    if (peer_fd >= 0) ::close(peer_fd);
  }

  // Reads whole frames from the raw end until `n` have arrived.
  std::vector<FrameDecoder::Frame> read_frames(std::size_t n, std::chrono::milliseconds timeout = 5s) {
    FrameLimits limits;
    limits.max_chunk = FrameLimits::max_chunk_ceiling;
    FrameDecoder decoder(limits);
    std::vector<FrameDecoder::Frame> frames;
    std::vector<std::uint8_t> buf(1 << 20);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (frames.size() < n && std::chrono::steady_clock::now() < deadline) {
      pollfd pfd{peer_fd, POLLIN, 0};
      if (::poll(&pfd, 1, 100) <= 0) continue;
      ssize_t r = ::read(peer_fd, buf.data(), buf.size());
      if (r <= 0) break;
      decoder.feed({buf.data(), static_cast<std::size_t>(r)}, frames);
    }
    return frames;
  }

  void write_frame(const Header& h, const std::string& body) {
    auto bytes = encode_frame(h, {reinterpret_cast<const std::uint8_t*>(body.data()), body.size()});
    ASSERT_EQ(::write(peer_fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  }

  int peer_fd = -1;
  std::shared_ptr<Connection> connection;
  std::shared_ptr<RecordingHandler> handler;
};

OutFrame bulk_frame(Serial serial, std::size_t size) {
  OutFrame f;
  Header h{99, 1, 1, FrameType::data_chunk, serial, FrameStatus::cont};
  auto payload = std::make_shared<std::vector<std::uint8_t>>(size, 0xab);
  encode_prefix(h, size, f.prefix.data());
  f.owner = payload;
  f.payload = *payload;
  f.serial = serial;
  f.type = h.type;
  return f;
}

TEST(Connection, WriterSendsControlFramesAheadOfQueuedBulkData) {
  IoThreads io(1);
  Pair pair(io);
  for (int i = 0; i < 8; ++i) pair.connection->send(bulk_frame(1, 64 << 10), Lane::bulk);
  pair.connection->send({99, 1, 1, FrameType::reply, 2, FrameStatus::ok}, Buffer::copy_of("reply"), Lane::control);
  pair.connection->start(pair.handler);
  auto frames = pair.read_frames(9);
  ASSERT_EQ(frames.size(), 9u);
  EXPECT_EQ(frames[0].header.type, FrameType::reply) << "the reply was queued last but must go first";
  for (std::size_t i = 1; i < frames.size(); ++i) EXPECT_EQ(frames[i].header.type, FrameType::data_chunk);
}

TEST(Connection, WriterTakesBulkFramesFromStreamsInTurn) {
  IoThreads io(1);
  Pair pair(io);
  for (int i = 0; i < 4; ++i) pair.connection->send(bulk_frame(1, 1024), Lane::bulk);
  for (int i = 0; i < 4; ++i) pair.connection->send(bulk_frame(3, 1024), Lane::bulk);
  pair.connection->start(pair.handler);
  auto frames = pair.read_frames(8);
  ASSERT_EQ(frames.size(), 8u);
  std::vector<Serial> order;
  for (auto& f : frames) order.push_back(f.header.serial);
  EXPECT_EQ(order, (std::vector<Serial>{1, 3, 1, 3, 1, 3, 1, 3}));
}

TEST(Connection, DroppingAStreamRemovesOnlyItsQueuedFrames) {
  IoThreads io(1);
  Pair pair(io);
  for (int i = 0; i < 4; ++i) pair.connection->send(bulk_frame(1, 1024), Lane::bulk);
  for (int i = 0; i < 2; ++i) pair.connection->send(bulk_frame(3, 1024), Lane::bulk);
  EXPECT_EQ(pair.connection->drop_bulk(1), 4u);
  EXPECT_EQ(pair.connection->drop_bulk(1), 0u);
  EXPECT_EQ(pair.connection->queued_frames(), 2u);
  pair.connection->start(pair.handler);
  auto frames = pair.read_frames(2);
  ASSERT_EQ(frames.size(), 2u);
  EXPECT_EQ(frames[0].header.serial, 3u);
  EXPECT_EQ(frames[1].header.serial, 3u);
  EXPECT_EQ(pair.read_frames(1, 200ms).size(), 0u);
}

TEST(Connection, UnqueueingACallTakesItsStreamFramesWithIt) {
  IoThreads io(1);
  Pair pair(io);
  // A stream call not yet written: its CALL, two chunks and an abort (an
  // error chunk on the control lane); another call's frames around it.
  pair.connection->send({99, 1, 1, FrameType::call, 5, FrameStatus::ok}, Buffer::copy_of("call 5"), Lane::control);
  pair.connection->send({99, 1, 1, FrameType::call, 7, FrameStatus::ok}, Buffer::copy_of("call 7"), Lane::control);
  pair.connection->send(bulk_frame(5, 1024), Lane::bulk);
  pair.connection->send(bulk_frame(7, 1024), Lane::bulk);
  pair.connection->send(bulk_frame(5, 1024), Lane::bulk);
  pair.connection->send({99, 1, 1, FrameType::data_chunk, 5, FrameStatus::error}, Buffer::copy_of("abort"),
                        Lane::control);
  EXPECT_TRUE(pair.connection->unqueue(5, FrameType::call));
  EXPECT_FALSE(pair.connection->unqueue(5, FrameType::call));
  EXPECT_EQ(pair.connection->queued_frames(), 2u) << "only call 7 and its chunk stay";
  pair.connection->start(pair.handler);
  auto frames = pair.read_frames(2);
  ASSERT_EQ(frames.size(), 2u);
  EXPECT_EQ(frames[0].header.serial, 7u);
  EXPECT_EQ(frames[0].header.type, FrameType::call);
  EXPECT_EQ(frames[1].header.serial, 7u);
  EXPECT_EQ(frames[1].header.type, FrameType::data_chunk);
  EXPECT_EQ(pair.read_frames(1, 200ms).size(), 0u) << "a frame of the unqueued call went out";
}

TEST(Connection, NoChunkOvertakesItsCallWhenManyControlFramesWait) {
  IoThreads io(1);
  Pair pair(io);
  // More control bytes than one batch takes (large replies), the stream's
  // CALL last; its chunk must still come after it.
  constexpr int kControl = 200;
  const std::string large(64 << 10, 'r');
  for (int i = 0; i < kControl; ++i)
    pair.connection->send({99, 1, 1, FrameType::reply, static_cast<Serial>(1000 + i), FrameStatus::ok},
                          Buffer::copy_of(large), Lane::control);
  pair.connection->send({99, 1, 1, FrameType::call, 5, FrameStatus::ok}, Buffer::copy_of("call"), Lane::control);
  pair.connection->send(bulk_frame(5, 1024), Lane::bulk);
  pair.connection->start(pair.handler);
  auto frames = pair.read_frames(kControl + 2);
  ASSERT_EQ(frames.size(), static_cast<std::size_t>(kControl + 2));
  EXPECT_EQ(frames[kControl].header.type, FrameType::call);
  EXPECT_EQ(frames[kControl + 1].header.type, FrameType::data_chunk);
}

TEST(Connection, WriterGathersManyQueuedFramesIntoFewWrites) {
  IoThreads io(1);
  Pair pair(io);
  for (Serial s = 1; s <= 1000; ++s)
    pair.connection->send({99, 1, 1, FrameType::reply, s, FrameStatus::ok}, Buffer::copy_of("small reply body"));
  pair.connection->start(pair.handler);
  auto frames = pair.read_frames(1000);
  ASSERT_EQ(frames.size(), 1000u);
  for (Serial s = 1; s <= 1000; ++s) EXPECT_EQ(frames[s - 1].header.serial, s);
  auto stats = pair.connection->stats();
  EXPECT_EQ(stats.frames_out, 1000u);
  EXPECT_LE(stats.writes, 4u) << "1000 queued frames should leave in a handful of gathered writes";
}

TEST(Connection, ReadsWhileItsWriterIsBlockedOnAFullSocket) {
  IoThreads io(1);
  Pair pair(io);
  pair.connection->start(pair.handler);
  // The peer reads nothing, so these 64 MiB fill the socket buffers and the
  // writer blocks mid-write.
  for (int i = 0; i < 256; ++i) pair.connection->send(bulk_frame(1, 256 << 10), Lane::bulk);
  std::this_thread::sleep_for(100ms);
  ASSERT_GT(pair.connection->queued_frames(), 0u) << "the writer should still be stuck";
  pair.write_frame({99, 1, 1, FrameType::call, 7, FrameStatus::ok}, "");
  EXPECT_TRUE(pair.handler->wait_frames(1, 2s)) << "full duplex: a frame is read while the writer is blocked";
}

TEST(Connection, HalfDuplexModeDoesNotReadWhileWriting) {
  // The benchmark's baseline must really be half duplex.
  IoThreads io(1);
  ConnectionOptions options;
  options.half_duplex = true;
  Pair pair(io, options);
  pair.connection->start(pair.handler);
  for (int i = 0; i < 256; ++i) pair.connection->send(bulk_frame(1, 256 << 10), Lane::bulk);
  std::this_thread::sleep_for(100ms);
  pair.write_frame({99, 1, 1, FrameType::call, 7, FrameStatus::ok}, "");
  EXPECT_FALSE(pair.handler->wait_frames(1, 300ms));
  // Once the peer drains what was written, the frame is read.
  auto frames = pair.read_frames(256, 10s);
  EXPECT_EQ(frames.size(), 256u);
  EXPECT_TRUE(pair.handler->wait_frames(1, 2s));
}

TEST(Connection, AnswersKeepalivePingWithPongCarryingTheToken) {
  IoThreads io(1);
  Pair pair(io);
  pair.connection->start(pair.handler);
  using Control = ferry::v1::Control;
  ferry::v1::Ping ping;
  ping.set_token(42);
  pair.write_frame({Control::program, Control::version, Control::KeepalivePing::number, FrameType::message, 0,
                    FrameStatus::ok},
                   ping.SerializeAsString());
  auto frames = pair.read_frames(1);
  ASSERT_EQ(frames.size(), 1u);
  EXPECT_EQ(frames[0].header.procedure, Control::KeepalivePong::number);
  ferry::v1::Pong pong;
  ASSERT_TRUE(pong.ParseFromArray(frames[0].body.data(), static_cast<int>(frames[0].body.size())));
  EXPECT_EQ(pong.token(), 42u);
  EXPECT_EQ(pair.handler->frame_count(), 0u) << "keepalive never reaches the handler";
}

TEST(Connection, ProtocolErrorClosesOnceAndDropsQueuedFrames) {
  IoThreads io(1);
  Pair pair(io);
  pair.connection->start(pair.handler);
  std::vector<std::uint8_t> bad(28, 0);
  bad[3] = 4;  // length 4: shorter than a header
  ASSERT_EQ(::write(pair.peer_fd, bad.data(), bad.size()), 28);
  EXPECT_TRUE(pair.handler->wait_closed());
  pair.connection->close(Error(Code::unavailable, "again"));
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(pair.handler->closes(), 1);
  EXPECT_FALSE(pair.connection->send({99, 1, 1, FrameType::reply, 1, FrameStatus::ok}, Buffer::copy_of("x")));
  EXPECT_TRUE(pair.connection->closed());
}

}  // namespace
}  // namespace ferry::rpc
