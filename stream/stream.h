// Stream: one data stream on a ferry connection, opened by a CALL and then
// carrying DATA_CHUNK (raw bytes, end, abort), STREAM_HOLE and
// STREAM_CREDIT frames under the call's serial (DESIGN.md "Wire protocol").
//
// Design note. Both ends use the same object: it sends what the local side
// writes and queues what the peer sends, and either side may do both
// (bidirectional procedures). The guarantees:
//  - Credit: the sender never has more than `window` unacknowledged bytes
//    in flight; write() waits for credit. The receiver grants credit when
//    the consumer drops a Chunk, not when a frame arrives, so a reader that
//    stops reading holds at most one window of memory and stalls nothing
//    else on the connection. A hole costs hole_credit bytes, not its length.
//  - Zero copy on the wire path: a received chunk's bytes were read from
//    the socket straight into a pooled buffer that the consumer gets as a
//    Chunk; write() sends from the caller's Buffer, kept alive until the
//    writer has put it on the socket.
//  - A failed stream stays failed: after an abort (either side), a lost
//    connection or a cancel, every read/write/finish throws the first error,
//    the peer's code and message when it was the peer. Queued chunks for the
//    stream are dropped at once.
//
// Threading: every method may be called from any thread, but each stream
// has at most one reader and one writer at a time. Coroutine methods resume
// on the awaiting coroutine's executor. Frames arrive on the connection's
// strand and never block it.
#pragma once

#include <asio/awaitable.hpp>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>

#include "rpc/buffer.h"
#include "rpc/connection.h"
#include "rpc/error.h"
#include "rpc/stream_sink.h"

namespace ferry::stream {

class Stream;

// Received bytes. Dropping it returns the buffer to the pool and the
// credit to the sender.
class Chunk {
 public:
  Chunk() = default;
  Chunk(rpc::Buffer buffer, std::weak_ptr<Stream> stream) : buffer_(std::move(buffer)), stream_(std::move(stream)) {}
  Chunk(Chunk&&) noexcept = default;
  Chunk& operator=(Chunk&& other) noexcept;
  Chunk(const Chunk&) = delete;
  Chunk& operator=(const Chunk&) = delete;
  ~Chunk() { release(); }

  std::span<const std::uint8_t> bytes() const { return buffer_.span(); }
  std::size_t size() const { return buffer_.size(); }

 private:
  void release();
  rpc::Buffer buffer_;
  std::weak_ptr<Stream> stream_;
};

struct Item {
  enum class Kind { data, hole, end };
  Kind kind = Kind::end;
  Chunk data;                // Kind::data
  std::uint64_t length = 0;  // bytes of data, or of the hole
};

class Stream : public rpc::StreamSink, public std::enable_shared_from_this<Stream> {
 public:
  // Credit a hole costs, whatever its length: sparse data crosses at the
  // pace of its metadata.
  static constexpr std::uint32_t hole_credit = 64;

  Stream(std::shared_ptr<rpc::Connection> connection, const rpc::Header& call, rpc::StreamLimits limits);
  ~Stream() override;
  // Streams alive in this process (for tests and statistics).
  static std::uint64_t live_count();

  // Sends `data` (any size; split into chunks). Waits for credit. Throws the
  // stream's error once it has failed.
  asio::awaitable<void> write(rpc::Buffer data);
  // The same from a shared buffer, which may be sent again (or be owned
  // elsewhere): it stays alive until its last chunk is written.
  asio::awaitable<void> write(std::shared_ptr<const rpc::Buffer> data);
  asio::awaitable<void> write_hole(std::uint64_t length);
  // Sends end of stream after everything written so far.
  asio::awaitable<void> finish();
  // The same without waiting (end of stream needs no credit). Idempotent.
  void end();
  // Next item: data, a hole, or end (after which read() keeps returning end).
  asio::awaitable<Item> read();
  // Aborts: the peer sees `error` at once; queued outgoing chunks are
  // dropped. Idempotent; a no-op once the stream has failed or both ends
  // have finished.
  void abort(const Error& error);

  // Blocking forms for threads that are not running the connection's
  // io_context.
  void write_sync(rpc::Buffer data);
  void write_hole_sync(std::uint64_t length);
  void finish_sync();
  Item read_sync();

  // Fails the stream locally (no frame sent): connection loss, a cancel, a
  // rejected call. Wakes any waiting reader or writer.
  void fail(const Error& error);
  // Runs once when the peer ends the stream abnormally (an ERROR chunk, a
  // CANCEL of the opening call), from the connection's strand: the server
  // uses it to cancel the handler at once, even if it is not reading.
  void on_peer_failure(std::function<void()> fn);
  // True if the stream failed because of the peer (its abort or cancel).
  bool failed_by_peer() const;
  std::optional<Error> error() const;
  bool finished_sending() const;

  rpc::Serial serial() const { return call_.serial; }
  const rpc::StreamLimits& limits() const { return limits_; }
  std::uint64_t bytes_sent() const;
  std::uint64_t bytes_received() const;
  // Bytes received and not yet released by the consumer (memory held).
  std::uint64_t bytes_held() const;

  // rpc::StreamSink
  void on_stream_frame(const rpc::Header& header, rpc::Buffer body) override;
  void on_connection_closed(const Error& reason) override;
  void on_call_cancelled() override;
  void abort_by_server(const Error& error) override { abort(error); }
  std::uint64_t bytes_transferred() const override { return bytes_sent() + bytes_received(); }

 private:
  friend class Chunk;
  using Waiter = std::function<void()>;

  void released(std::size_t bytes);
  // The consumer is done with `bytes` (a released chunk, a read hole):
  // return them to the sender, batched. Caller holds mutex_.
  void grant_locked(std::uint64_t bytes);
  void notify_peer_failure();
  // Suspends until `ready()` (checked under the mutex) holds.
  asio::awaitable<void> wait_until(Waiter& slot, std::function<bool()> ready);
  void wake(Waiter& slot);
  void wake_all();
  void send(rpc::FrameType type, rpc::FrameStatus status, rpc::Buffer body, rpc::Lane lane);
  rpc::Header header(rpc::FrameType type, rpc::FrameStatus status) const;
  void throw_if_failed() const;

  std::shared_ptr<rpc::Connection> connection_;
  rpc::Header call_;
  rpc::StreamLimits limits_;

  mutable std::mutex mutex_;
  std::optional<Error> error_;
  // send side
  std::uint64_t unacked_ = 0;
  std::uint64_t sent_ = 0;
  bool send_finished_ = false;
  Waiter write_waiter_;
  // receive side
  std::deque<Item> queue_;
  std::uint64_t held_ = 0;  // received, not yet released (queued or in Chunks)
  std::uint64_t received_ = 0;
  std::uint64_t credit_owed_ = 0;
  bool recv_ended_ = false;
  Waiter read_waiter_;
  bool failed_by_peer_ = false;
  std::function<void()> on_peer_failure_;
};

}  // namespace ferry::stream
