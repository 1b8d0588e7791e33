// Connection: one peer over one Transport, read and written at once.
//
// Design note. A connection runs one reader and one writer coroutine on the
// transport's strand, so a reply can be read while a request is being
// written (DESIGN.md problem 1). Any thread may queue frames: send() takes a
// short mutex and, if the writer sleeps, posts one wake-up to the strand; no
// lock is held across I/O. The writer takes everything queued (control
// frames first, bulk after, at most max_batch_bytes of bulk per write) and
// gathers it into one writev, so a thousand small replies cost a handful of
// syscalls, and a queued reply never waits behind more than one batch of
// bulk data (problem 3).
//
// The simpler design, a writer that holds a lock while it writes, lost
// because callers would then block on a slow peer; the half-duplex mode
// (ConnectionOptions::half_duplex) keeps that shape only as a measured
// baseline for the benchmark.
//
// Keepalive lives here too: if nothing arrives for keepalive_interval the
// connection sends a Ping MESSAGE; after keepalive_count unanswered probes
// the peer is declared unreachable and the connection closes, which fails
// everything pending on it through FrameHandler::on_close.
//
// Lifetime: the connection is shared (reader, writer and keepalive each pin
// it); the FrameHandler is held until on_close has run, then released, which
// breaks the handler <-> connection cycle.
#pragma once

#include <array>
#include <asio/awaitable.hpp>
#include <asio/steady_timer.hpp>
#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "rpc/buffer.h"
#include "rpc/error.h"
#include "rpc/frame.h"
#include "rpc/security_layer.h"
#include "rpc/transport.h"

namespace ferry::rpc {

// A frame waiting to be written. The prefix is encoded when queued; the body
// is owned by the frame until the write that carries it completes.
struct OutFrame {
  std::array<std::uint8_t, prefix_size> prefix{};
  Buffer body;                         // protobuf bytes or a small fixed body
  std::shared_ptr<const void> owner;   // keeps `payload` alive (bulk chunks)
  std::span<const std::uint8_t> payload;
  Serial serial = 0;
  FrameType type = FrameType::call;
  // Every byte written after this frame goes through this layer (SASL).
  std::shared_ptr<SecurityLayer> then_secure;
  bool marker = false;  // carries only then_secure: nothing of it is written

  std::size_t wire_size() const { return marker ? 0 : prefix_size + body.size() + payload.size(); }
};

enum class Lane {
  control,  // CALL, REPLY, MESSAGE, CREDIT, CANCEL, keepalive: always first
  bulk,     // DATA_CHUNK, STREAM_HOLE
};

// Receives what the reader decodes. Runs on the connection's strand; must
// not block (post long work elsewhere).
class FrameHandler {
 public:
  virtual ~FrameHandler() = default;
  virtual void on_frame(const Header& header, Buffer body) = 0;
  // Called once, when the connection ends for whatever reason.
  virtual void on_close(const Error& reason) = 0;
};

struct ConnectionOptions {
  FrameLimits limits;
  std::chrono::milliseconds keepalive_interval{5000};  // 0 disables probing
  unsigned keepalive_count = 3;
  bool half_duplex = false;                 // benchmark baseline only
  int socket_buffer_bytes = 0;              // SO_SNDBUF/SO_RCVBUF; 0 = kernel autotuning
  std::shared_ptr<BufferPool> pool;         // for large bodies; null: the connection makes its own
  std::size_t read_buffer_size = 64 << 10;
  std::size_t max_batch_bytes = 256 << 10;  // bulk bytes per write
  // Frames queued for a peer that does not read them: beyond this many
  // bytes the connection stops reading the peer's frames (so it can queue
  // no more replies) until the queue is down to half; 0: no bound.
  std::size_t max_queued_bytes = 0;
};

struct ConnectionStats {
  std::uint64_t bytes_in = 0;
  std::uint64_t bytes_out = 0;
  std::uint64_t frames_in = 0;
  std::uint64_t frames_out = 0;
  std::uint64_t writes = 0;  // gathered write calls (frames_out / writes = batching)
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(std::unique_ptr<Transport> transport, ConnectionOptions options);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Starts the reader, writer and keepalive. Call once.
  void start(std::shared_ptr<FrameHandler> handler);

  // Queues a frame. Thread-safe. Returns false if the connection is closed
  // (the frame is dropped; the caller learns why through on_close).
  bool send(const Header& header, Buffer body, Lane lane = Lane::control);
  bool send(OutFrame frame, Lane lane);

  // Removes a CALL that is still queued (not yet handed to the socket),
  // and with it every other frame queued under its serial: a stream's
  // chunks, holes or abort must not reach a peer that never saw the call
  // (it would take them for a protocol violation). Thread-safe, and atomic
  // with respect to the writer. True if it was removed: the peer will never
  // see the call.
  bool unqueue(Serial serial, FrameType type);
  // Drops every queued bulk frame (chunks, holes) of one stream, as an
  // abort must. Thread-safe. Returns how many were dropped.
  std::size_t drop_bulk(Serial serial);

  // Closes with a reason; safe to repeat and from any thread. Queued frames
  // are dropped.
  void close(Error reason);
  // Closes once everything queued so far has been written (a Goodbye, an
  // error reply) or after `deadline`, whichever is first.
  void close_after_flush(Error reason, std::chrono::milliseconds deadline = std::chrono::seconds(2));

  // Security layer switch points (see security_layer.h). hold_reads() is
  // called on the strand from within FrameHandler::on_frame: no frame after
  // the current one is read or dispatched until resume_reads(), which any
  // thread may call; with a layer, everything from the next byte on is
  // decoded through it. secure_writes() queues the switch behind every
  // control frame queued so far.
  void hold_reads();
  void resume_reads(std::shared_ptr<SecurityLayer> layer = nullptr);
  bool secure_writes(std::shared_ptr<SecurityLayer> layer);
  // Who the peer turned out to be after authentication. Strand only, before
  // any call of the authenticated peer is dispatched.
  void set_peer_auth(std::string user, std::string mechanism, unsigned ssf);

  // New limits after Hello. Thread-safe.
  void set_limits(FrameLimits limits);
  // A new bound on bytes queued for the peer (max_queued_bytes); a reader
  // stopped at the old one looks again within 100 ms. Thread-safe.
  void set_max_queued_bytes(std::size_t bytes) { max_queued_bytes_.store(bytes, std::memory_order_relaxed); }
  std::size_t max_queued_bytes() const { return max_queued_bytes_.load(std::memory_order_relaxed); }
  void set_keepalive(std::chrono::milliseconds interval, unsigned count);

  bool closed() const { return closed_.load(std::memory_order_acquire); }
  const PeerIdentity& peer() const { return peer_; }
  asio::any_io_executor get_executor() { return executor_; }
  // Recycles large bodies (read and written); shared with whoever made it.
  BufferPool& pool() { return *pool_; }
  ConnectionStats stats() const;
  std::size_t queued_frames() const;
  // Bytes of the frames queued and not yet taken by the writer.
  std::size_t queued_bytes() const { return queued_bytes_.load(std::memory_order_relaxed); }
  // Times the reader stopped because max_queued_bytes was reached.
  std::uint64_t read_pauses() const { return read_pauses_.load(std::memory_order_relaxed); }

 private:
  asio::awaitable<void> run_reader();
  asio::awaitable<void> run_writer();
  asio::awaitable<void> run_half_duplex();
  asio::awaitable<void> run_keepalive();
  // Reads one frame into `header`/`body`. Returns false on EOF/error (the
  // connection has been closed with the reason).
  asio::awaitable<bool> read_frame(Header& header, Buffer& body);
  bool buffered_frame_ready() const;
  void dispatch(const Header& header, Buffer body);
  // Moves the next batch out of the queues; empty if nothing is queued (and
  // then marks the writer idle).
  bool take_batch(std::vector<OutFrame>& batch);
  asio::awaitable<bool> write_batch(std::vector<OutFrame>& batch);
  void close_on_strand(Error reason);
  void wake_writer();
  LayeredTransport& layered();
  // A clearer reason when the peer speaks TLS on a plaintext connection.
  std::string tls_mismatch_hint() const;

  std::unique_ptr<Transport> transport_;
  LayeredTransport* layered_ = nullptr;  // transport_, once a layer was asked for
  PeerIdentity peer_;
  asio::any_io_executor executor_;
  ConnectionOptions options_;
  std::shared_ptr<FrameHandler> handler_;
  std::shared_ptr<BufferPool> pool_;

  // Read side (strand only).
  Buffer read_buffer_;
  // How far past a large body one read may reach into the read buffer.
  static constexpr std::size_t large_body_tail = 4096;
  bool after_large_body_ = false;
  std::size_t read_begin_ = 0;
  std::size_t read_end_ = 0;
  std::atomic<std::uint32_t> max_frame_;
  std::atomic<std::uint32_t> max_chunk_;
  std::chrono::steady_clock::time_point last_rx_;
  unsigned missed_pings_ = 0;
  std::uint64_t ping_token_ = 0;
  bool hold_ = false;  // strand only
  asio::steady_timer resume_;
  bool queue_full_ = false;  // strand only: the reader waits for the writer to drain
  unsigned frames_since_yield_ = 0;  // strand only
  asio::steady_timer drained_;
  std::atomic<std::size_t> queued_bytes_{0};
  std::atomic<std::uint64_t> read_pauses_{0};
  std::uint64_t bytes_out_at_probe_ = 0;  // strand only: writer progress seen by keepalive

  // Write side.
  mutable std::mutex mutex_;
  std::deque<OutFrame> control_;
  // Bulk frames per stream (by serial), served round-robin so one busy
  // stream cannot hold back another.
  std::map<Serial, std::deque<OutFrame>> bulk_;
  std::deque<Serial> bulk_turns_;
  std::size_t bulk_frames_ = 0;
  bool writer_idle_ = false;
  bool flush_then_close_ = false;
  std::string flush_close_reason_;
  Code flush_close_code_ = Code::unavailable;
  asio::steady_timer wake_;
  std::atomic<std::size_t> max_queued_bytes_;
  asio::steady_timer keepalive_timer_;
  std::atomic<std::int64_t> keepalive_ms_;
  std::atomic<unsigned> keepalive_count_;

  std::atomic<bool> closed_{false};
  bool close_handled_ = false;  // strand only
  bool draining_ = false;       // strand only: flushed and half-closed
  std::atomic<std::uint64_t> bytes_in_{0}, bytes_out_{0}, frames_in_{0}, frames_out_{0}, writes_{0};
};

}  // namespace ferry::rpc
