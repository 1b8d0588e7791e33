#include "rpc/connection.h"

#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/dispatch.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>
#include <spdlog/spdlog.h>

#include "ferry/v1/control.ferry.h"

namespace ferry::rpc {

namespace {
constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);
using Control = ferry::v1::Control;

Error io_error(const std::error_code& ec, const PeerIdentity& peer) {
  if (ec == asio::error::eof) return Error(Code::unavailable, "connection closed by peer (" + peer.address + ")");
  if (ec == asio::error::operation_aborted) return Error(Code::unavailable, "connection closed");
  return Error(Code::unavailable, "connection to " + peer.address + " failed: " + ec.message());
}

template <class Fn>
void spawn(asio::any_io_executor ex, std::shared_ptr<Connection> self, Fn fn) {
  asio::co_spawn(ex, std::move(fn), [self](std::exception_ptr e) {
    if (!e) return;
    // The reader, writer and keepalive report their ends themselves; an
    // exception out of one of them is a fault in this program, not the peer's.
    Error reason = Error::from_exception(e);
    spdlog::error("connection with {} ({}): internal error, closing: {}", self->peer().address,
                  self->peer().transport, reason.message());
    self->close(std::move(reason));
  });
}
}  // namespace

Connection::Connection(std::unique_ptr<Transport> transport, ConnectionOptions options)
    : transport_(std::move(transport)),
      peer_(transport_->peer()),
      executor_(transport_->get_executor()),
      options_(options),
      pool_(options.pool ? options.pool : BufferPool::create()),
      read_buffer_(options.read_buffer_size),
      max_frame_(options.limits.max_frame),
      max_chunk_(options.limits.max_chunk),
      resume_(executor_),
      drained_(executor_),
      wake_(executor_),
      max_queued_bytes_(options.max_queued_bytes),
      keepalive_timer_(executor_),
      keepalive_ms_(options.keepalive_interval.count()),
      keepalive_count_(options.keepalive_count) {
  transport_->set_buffer_size(options.socket_buffer_bytes);
}

Connection::~Connection() = default;

void Connection::start(std::shared_ptr<FrameHandler> handler) {
  handler_ = std::move(handler);
  last_rx_ = std::chrono::steady_clock::now();
  auto self = shared_from_this();
  if (options_.half_duplex) {
    spawn(executor_, self, [self]() { return self->run_half_duplex(); });
  } else {
    spawn(executor_, self, [self]() { return self->run_reader(); });
    spawn(executor_, self, [self]() { return self->run_writer(); });
  }
  spawn(executor_, self, [self]() { return self->run_keepalive(); });
}

bool Connection::send(const Header& header, Buffer body, Lane lane) {
  OutFrame f;
  encode_prefix(header, body.size(), f.prefix.data());
  f.body = std::move(body);
  f.serial = header.serial;
  f.type = header.type;
  return send(std::move(f), lane);
}

bool Connection::send(OutFrame frame, Lane lane) {
  bool wake = false;
  {
    std::lock_guard lock(mutex_);
    if (closed_.load(std::memory_order_relaxed)) return false;
    queued_bytes_.fetch_add(frame.wire_size(), std::memory_order_relaxed);
    if (lane == Lane::control) {
      control_.push_back(std::move(frame));
    } else {
      auto& queue = bulk_[frame.serial];
      if (queue.empty()) bulk_turns_.push_back(frame.serial);
      queue.push_back(std::move(frame));
      ++bulk_frames_;
    }
    if (writer_idle_) {
      writer_idle_ = false;
      wake = true;
    }
  }
  if (wake) wake_writer();
  return true;
}

void Connection::wake_writer() {
  // dispatch, not post: from the connection's own thread (a reply finished
  // by a handler on the same io thread) the timer is cancelled inline,
  // saving a trip through the queue.
  asio::dispatch(executor_, [self = shared_from_this()] { self->wake_.cancel(); });
}

std::size_t Connection::drop_bulk(Serial serial) {
  std::lock_guard lock(mutex_);
  auto it = bulk_.find(serial);
  if (it == bulk_.end()) return 0;
  const std::size_t n = it->second.size();
  std::size_t bytes = 0;
  for (const auto& f : it->second) bytes += f.wire_size();
  queued_bytes_.fetch_sub(bytes, std::memory_order_relaxed);
  bulk_frames_ -= n;
  bulk_.erase(it);
  std::erase(bulk_turns_, serial);
  return n;
}

bool Connection::unqueue(Serial serial, FrameType type) {
  std::lock_guard lock(mutex_);
  auto it = std::find_if(control_.begin(), control_.end(),
                         [&](const OutFrame& f) { return f.serial == serial && f.type == type; });
  if (it == control_.end()) return false;
  std::size_t bytes = 0;
  if (type == FrameType::call) {
    // The call's own frames can only follow it in the control queue; the
    // bulk queue holds the stream's data.
    for (auto f = it; f != control_.end();) {
      if (f->serial == serial) {
        bytes += f->wire_size();
        f = control_.erase(f);
      } else {
        ++f;
      }
    }
    if (auto b = bulk_.find(serial); b != bulk_.end()) {
      for (const auto& f : b->second) bytes += f.wire_size();
      bulk_frames_ -= b->second.size();
      bulk_.erase(b);
      std::erase(bulk_turns_, serial);
    }
  } else {
    bytes = it->wire_size();
    control_.erase(it);
  }
  queued_bytes_.fetch_sub(bytes, std::memory_order_relaxed);
  return true;
}

void Connection::close(Error reason) {
  asio::post(executor_, [self = shared_from_this(), reason = std::move(reason)]() mutable {
    self->close_on_strand(std::move(reason));
  });
}

void Connection::close_after_flush(Error reason, std::chrono::milliseconds deadline) {
  bool wake = false;
  {
    std::lock_guard lock(mutex_);
    if (closed_) return;
    flush_then_close_ = true;
    flush_close_reason_ = reason.message();
    flush_close_code_ = reason.code();
    if (writer_idle_) {
      writer_idle_ = false;
      wake = true;
    }
  }
  if (wake) wake_writer();
  auto timer = std::make_shared<asio::steady_timer>(executor_, deadline);
  timer->async_wait([self = shared_from_this(), timer, reason](std::error_code) mutable {
    self->close_on_strand(std::move(reason));
  });
}

void Connection::close_on_strand(Error reason) {
  if (close_handled_) return;
  close_handled_ = true;
  {
    std::lock_guard lock(mutex_);
    if (draining_ && !flush_close_reason_.empty()) reason = Error(flush_close_code_, flush_close_reason_);
    closed_.store(true, std::memory_order_release);
    control_.clear();
    bulk_.clear();
    bulk_turns_.clear();
    bulk_frames_ = 0;
    queued_bytes_.store(0, std::memory_order_relaxed);
  }
  transport_->close();
  wake_.cancel();
  drained_.cancel();
  resume_.cancel();
  keepalive_timer_.cancel();
  if (auto handler = std::move(handler_)) handler->on_close(reason);
}

LayeredTransport& Connection::layered() {
  if (!layered_) {
    // Coroutines suspended inside the old transport keep running on it: the
    // wrapper owns it, and both run on this strand.
    auto wrapper = std::make_unique<LayeredTransport>(std::move(transport_));
    layered_ = wrapper.get();
    transport_ = std::move(wrapper);
  }
  return *layered_;
}

void Connection::hold_reads() { hold_ = true; }

void Connection::resume_reads(std::shared_ptr<SecurityLayer> layer) {
  asio::dispatch(executor_, [self = shared_from_this(), layer = std::move(layer)]() mutable {
    if (self->close_handled_) return;
    if (layer) {
      // Bytes already in the read buffer arrived after the switch point:
      // they are protected too.
      std::span<const std::uint8_t> rest(self->read_buffer_.data() + self->read_begin_,
                                         self->read_end_ - self->read_begin_);
      self->layered().start_reading(std::move(layer), rest);
      self->read_begin_ = self->read_end_ = 0;
    }
    self->hold_ = false;
    self->last_rx_ = std::chrono::steady_clock::now();
    self->resume_.cancel();
  });
}

bool Connection::secure_writes(std::shared_ptr<SecurityLayer> layer) {
  OutFrame marker;
  marker.marker = true;
  marker.then_secure = std::move(layer);
  return send(std::move(marker), Lane::control);
}

void Connection::set_peer_auth(std::string user, std::string mechanism, unsigned ssf) {
  peer_.user = std::move(user);
  peer_.mechanism = std::move(mechanism);
  peer_.ssf = ssf;
}

std::string Connection::tls_mismatch_hint() const {
  // A TLS record starts with content type 0x15 (alert) or 0x16 (handshake)
  // and version major 3.
  if (frames_in_.load(std::memory_order_relaxed) != 0 || peer_.transport == "tls" || layered_) return {};
  if (read_end_ - read_begin_ < 2) return {};
  const std::uint8_t* p = read_buffer_.data() + read_begin_;
  if ((p[0] == 0x15 || p[0] == 0x16) && p[1] == 0x03)
    return "the peer speaks TLS on this plaintext connection (use a tls: listener / ferry+tls:// address)";
  return {};
}

void Connection::set_limits(FrameLimits limits) {
  max_frame_.store(limits.max_frame);
  max_chunk_.store(limits.max_chunk);
}

void Connection::set_keepalive(std::chrono::milliseconds interval, unsigned count) {
  keepalive_ms_.store(interval.count());
  keepalive_count_.store(count);
  asio::post(executor_, [self = shared_from_this()] { self->keepalive_timer_.cancel(); });
}

ConnectionStats Connection::stats() const {
  ConnectionStats s;
  s.bytes_in = bytes_in_.load(std::memory_order_relaxed);
  s.bytes_out = bytes_out_.load(std::memory_order_relaxed);
  s.frames_in = frames_in_.load(std::memory_order_relaxed);
  s.frames_out = frames_out_.load(std::memory_order_relaxed);
  s.writes = writes_.load(std::memory_order_relaxed);
  return s;
}

std::size_t Connection::queued_frames() const {
  std::lock_guard lock(mutex_);
  return control_.size() + bulk_frames_;
}

// ---- read side ----

bool Connection::buffered_frame_ready() const {
  const std::size_t avail = read_end_ - read_begin_;
  if (avail < prefix_size) return false;
  const std::uint32_t length = detail::get_u32(read_buffer_.data() + read_begin_);
  return avail - length_size >= length;
}

asio::awaitable<bool> Connection::read_frame(Header& header, Buffer& body) {
  // Collect the 28-byte prefix, reading as much as the socket offers so that
  // a burst of small frames costs one read.
  while (read_end_ - read_begin_ < prefix_size) {
    if (read_begin_ > 0) {
      const std::size_t n = read_end_ - read_begin_;
      if (n) std::memmove(read_buffer_.data(), read_buffer_.data() + read_begin_, n);
      read_begin_ = 0;
      read_end_ = n;
    }
    // Right after a large body the next frame is most likely another chunk:
    // read only a little ahead, so its body is not pulled through this buffer.
    std::size_t room = read_buffer_.size() - read_end_;
    if (after_large_body_) room = std::min(room, large_body_tail);
    auto [ec, n] = co_await transport_->read_some(asio::buffer(read_buffer_.data() + read_end_, room));
    if (ec) {
      if (auto hint = tls_mismatch_hint(); !hint.empty()) {
        spdlog::warn("{} from {}: {}", peer().transport, peer().address, hint);
        close_on_strand(Error(Code::unavailable, "connection closed: " + hint));
      } else {
        close_on_strand(io_error(ec, peer()));
      }
      co_return false;
    }
    read_end_ += n;
    bytes_in_.fetch_add(n, std::memory_order_relaxed);
    last_rx_ = std::chrono::steady_clock::now();
    missed_pings_ = 0;
  }
  FrameLimits limits;
  limits.max_frame = max_frame_.load(std::memory_order_relaxed);
  limits.max_chunk = max_chunk_.load(std::memory_order_relaxed);
  auto result = decode_prefix(
      std::span<const std::uint8_t, prefix_size>(read_buffer_.data() + read_begin_, prefix_size), limits);
  if (!result) {
    std::string why = tls_mismatch_hint();
    if (why.empty()) why = result.error.message;
    spdlog::warn("protocol error from {} ({}): {}; closing the connection", peer().address, peer().transport, why);
    close_on_strand(Error(Code::unavailable, "protocol error: " + why));
    co_return false;
  }
  read_begin_ += prefix_size;
  header = result.prefix->header;
  const std::size_t size = result.prefix->body_size;
  body = pool_->get(size);
  const std::size_t have = std::min(size, read_end_ - read_begin_);
  if (have) std::memcpy(body.data(), read_buffer_.data() + read_begin_, have);
  read_begin_ += have;
  if (read_begin_ == read_end_) read_begin_ = read_end_ = 0;
  after_large_body_ = have < size;
  if (have < size) {
    // A large body goes straight from the socket into its own buffer; the
    // same read brings the next frame's prefix (and at most a few KiB of
    // what follows it) into the read buffer, which is empty here.
    std::size_t got = have;
    while (got < size) {
      auto [ec, n] = co_await transport_->read_some_split(
          asio::buffer(body.data() + got, size - got),
          asio::buffer(read_buffer_.data(), std::min(read_buffer_.size(), large_body_tail)));
      if (ec) {
        if (ec == asio::error::eof) {
          const std::string why = "connection closed by peer " + peer().address + " in the middle of a " +
                                  to_string(header.type) + " frame (" + std::to_string(got) + " of " +
                                  std::to_string(size) + " body bytes)";
          spdlog::warn("{}", why);
          close_on_strand(Error(Code::unavailable, why));
        } else {
          close_on_strand(io_error(ec, peer()));
        }
        co_return false;
      }
      const std::size_t to_body = std::min(n, size - got);
      got += to_body;
      read_end_ = n - to_body;
      bytes_in_.fetch_add(n, std::memory_order_relaxed);
      last_rx_ = std::chrono::steady_clock::now();
      missed_pings_ = 0;
    }
  }
  frames_in_.fetch_add(1, std::memory_order_relaxed);
  co_return true;
}

void Connection::dispatch(const Header& header, Buffer body) {
  if (draining_) return;
  if (header.program == Control::program && header.type == FrameType::message) {
    if (header.procedure == Control::KeepalivePing::number) {
      ferry::v1::Ping ping;
      ferry::v1::Pong pong;
      if (ping.ParseFromArray(body.data(), static_cast<int>(body.size()))) pong.set_token(ping.token());
      Header h{Control::program, Control::version, Control::KeepalivePong::number, FrameType::message, 0,
               FrameStatus::ok};
      send(h, serialize(pong));
      return;
    }
    if (header.procedure == Control::KeepalivePong::number) return;  // last_rx_ already updated
  }
  if (handler_) handler_->on_frame(header, std::move(body));
}

asio::awaitable<void> Connection::run_reader() {
  auto self = shared_from_this();
  Header header;
  Buffer body;
  while (!close_handled_) {
    if (!co_await read_frame(header, body)) co_return;
    dispatch(header, std::move(body));
    while (hold_ && !close_handled_) {
      resume_.expires_at(asio::steady_timer::time_point::max());
      co_await resume_.async_wait(use_tuple);
    }
    if (max_queued_bytes() == 0) continue;
    // Handlers start once the reader gives the strand up; every few frames
    // it does, so that what they queue is counted before it reads on.
    if (++frames_since_yield_ >= 32) {
      frames_since_yield_ = 0;
      co_await asio::post(executor_, asio::use_awaitable);
    }
    // A peer that does not read what it asked for gets no more read from
    // it (and so no more replies queued for it) until the queue drains.
    if (queued_bytes() > max_queued_bytes() && !close_handled_) {
      read_pauses_.fetch_add(1, std::memory_order_relaxed);
      queue_full_ = true;
      // (The bound is read again each time: an administrator may change it.)
      while (max_queued_bytes() != 0 && queued_bytes() > max_queued_bytes() / 2 && !close_handled_) {
        drained_.expires_after(std::chrono::milliseconds(100));
        co_await drained_.async_wait(use_tuple);
      }
      queue_full_ = false;
    }
  }
}

// ---- write side ----

bool Connection::take_batch(std::vector<OutFrame>& batch) {
  std::lock_guard lock(mutex_);
  // Control frames are small and never wait behind bulk ones.
  std::size_t taken = 0;
  const auto done = [&] {
    queued_bytes_.fetch_sub(taken, std::memory_order_relaxed);
    // The reader waits for the queue to drain to half its bound.
    if (queue_full_ && queued_bytes_.load(std::memory_order_relaxed) <= max_queued_bytes() / 2)
      drained_.cancel();
  };
  // (Small frames as they come; large replies a batch's worth at a time,
  // so a batch never holds more than max_batch_bytes beyond its first.)
  while (!control_.empty() && batch.size() < 512 && (batch.empty() || taken < options_.max_batch_bytes)) {
    taken += control_.front().wire_size();
    batch.push_back(std::move(control_.front()));
    control_.pop_front();
    // A layer switch ends the batch: what follows is written through it.
    if (batch.back().then_secure) {
      done();
      return true;
    }
  }
  // Then bulk frames, one per stream in turn, once no control frame waits:
  // a stream's CALL (queued before its chunks) must reach the wire first.
  std::size_t bulk_bytes = 0;
  while (control_.empty() && !bulk_turns_.empty() && batch.size() < 512 && bulk_bytes < options_.max_batch_bytes) {
    const Serial serial = bulk_turns_.front();
    bulk_turns_.pop_front();
    auto it = bulk_.find(serial);
    auto& queue = it->second;
    bulk_bytes += queue.front().wire_size();
    taken += queue.front().wire_size();
    batch.push_back(std::move(queue.front()));
    queue.pop_front();
    --bulk_frames_;
    if (queue.empty())
      bulk_.erase(it);
    else
      bulk_turns_.push_back(serial);
  }
  done();
  if (batch.empty()) writer_idle_ = true;
  return !batch.empty();
}

asio::awaitable<bool> Connection::write_batch(std::vector<OutFrame>& batch) {
  std::vector<asio::const_buffer> iov;
  iov.reserve(batch.size() * 3);
  std::size_t total = 0;
  for (auto& f : batch) {
    if (f.marker) continue;
    iov.emplace_back(f.prefix.data(), f.prefix.size());
    if (!f.body.empty()) iov.emplace_back(f.body.data(), f.body.size());
    if (!f.payload.empty()) iov.emplace_back(f.payload.data(), f.payload.size());
    total += f.wire_size();
  }
  if (iov.empty()) {
    if (!batch.empty() && batch.back().then_secure) layered().start_writing(std::move(batch.back().then_secure));
    batch.clear();
    co_return true;
  }
  auto [ec, n] = co_await transport_->write_all(iov);
  if (ec) {
    close_on_strand(io_error(ec, peer()));
    co_return false;
  }
  bytes_out_.fetch_add(total, std::memory_order_relaxed);
  frames_out_.fetch_add(batch.size(), std::memory_order_relaxed);
  writes_.fetch_add(1, std::memory_order_relaxed);
  if (!batch.empty() && batch.back().then_secure) layered().start_writing(std::move(batch.back().then_secure));
  batch.clear();
  co_return true;
}

asio::awaitable<void> Connection::run_writer() {
  auto self = shared_from_this();
  std::vector<OutFrame> batch;
  while (!close_handled_) {
    if (take_batch(batch)) {
      if (!co_await write_batch(batch)) co_return;
      continue;
    }
    {
      std::unique_lock lock(mutex_);
      if (flush_then_close_) {
        // Everything is written: half-close so the peer reads our last
        // frames and then EOF, and keep reading (and dropping) until it
        // hangs up or the deadline passes. Closing outright could reset the
        // connection before the peer has read what we said.
        lock.unlock();
        draining_ = true;
        transport_->shutdown_send();
        co_return;
      }
    }
    wake_.expires_at(asio::steady_timer::time_point::max());
    co_await wake_.async_wait(use_tuple);
  }
}

asio::awaitable<void> Connection::run_half_duplex() {
  // One direction at a time, as a client with a single state machine does:
  // write everything queued, else wait for either a reply or new work, and
  // read a whole frame before writing again.
  using namespace asio::experimental::awaitable_operators;
  auto self = shared_from_this();
  std::vector<OutFrame> batch;
  Header header;
  Buffer body;
  while (!close_handled_) {
    if (buffered_frame_ready()) {
      if (!co_await read_frame(header, body)) co_return;
      dispatch(header, std::move(body));
      continue;
    }
    if (take_batch(batch)) {
      if (!co_await write_batch(batch)) co_return;
      continue;
    }
    wake_.expires_at(asio::steady_timer::time_point::max());
    auto which = co_await (transport_->wait_readable() || wake_.async_wait(use_tuple));
    if (which.index() == 0) {
      {
        std::lock_guard lock(mutex_);
        writer_idle_ = false;
      }
      if (!co_await read_frame(header, body)) co_return;
      dispatch(header, std::move(body));
    }
  }
}

// ---- keepalive ----

asio::awaitable<void> Connection::run_keepalive() {
  auto self = shared_from_this();
  while (!close_handled_) {
    const auto interval = std::chrono::milliseconds(keepalive_ms_.load());
    if (interval.count() <= 0) {
      keepalive_timer_.expires_at(asio::steady_timer::time_point::max());
      co_await keepalive_timer_.async_wait(use_tuple);
      continue;
    }
    keepalive_timer_.expires_after(interval);
    auto [ec] = co_await keepalive_timer_.async_wait(use_tuple);
    if (close_handled_) co_return;
    if (ec) continue;  // settings changed
    if (std::chrono::steady_clock::now() - last_rx_ < interval) continue;
    // While the reader waits for a full queue to drain, the peer's bytes
    // are not read; the writer getting bytes out is then the sign of life.
    if (queue_full_) {
      const std::uint64_t out = bytes_out_.load(std::memory_order_relaxed);
      if (out != bytes_out_at_probe_) {
        bytes_out_at_probe_ = out;
        missed_pings_ = 0;
        continue;
      }
    }
    if (missed_pings_ >= keepalive_count_.load()) {
      auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - last_rx_);
      spdlog::warn("peer {} unreachable: nothing received for {} ms; {} keepalive probes unanswered",
                   peer().address, silent.count(), missed_pings_);
      close_on_strand(Error(Code::unavailable, "peer unreachable: nothing received for " +
                                                   std::to_string(silent.count()) + " ms (" +
                                                   std::to_string(missed_pings_) + " keepalive probes unanswered)"));
      co_return;
    }
    ++missed_pings_;
    ferry::v1::Ping ping;
    ping.set_token(++ping_token_);
    Header h{Control::program, Control::version, Control::KeepalivePing::number, FrameType::message, 0,
             FrameStatus::ok};
    send(h, serialize(ping));
  }
}

}  // namespace ferry::rpc
