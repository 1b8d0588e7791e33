#include "stream/stream.h"

#include <atomic>

#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/co_spawn.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>
#include <spdlog/spdlog.h>

#include "ferry/v1/error.pb.h"

namespace ferry::stream {

using rpc::FrameStatus;
using rpc::FrameType;

Chunk& Chunk::operator=(Chunk&& other) noexcept {
  if (this != &other) {
    release();
    buffer_ = std::move(other.buffer_);
    stream_ = std::move(other.stream_);
  }
  return *this;
}

void Chunk::release() {
  const std::size_t n = buffer_.size();
  buffer_ = rpc::Buffer();
  if (auto s = stream_.lock(); s && n) s->released(n);
  stream_.reset();
}

namespace {
std::atomic<std::uint64_t> live_streams{0};
}

Stream::Stream(std::shared_ptr<rpc::Connection> connection, const rpc::Header& call, rpc::StreamLimits limits)
    : connection_(std::move(connection)), call_(call), limits_(limits) {
  live_streams.fetch_add(1, std::memory_order_relaxed);
}

Stream::~Stream() { live_streams.fetch_sub(1, std::memory_order_relaxed); }

std::uint64_t Stream::live_count() { return live_streams.load(std::memory_order_relaxed); }

rpc::Header Stream::header(FrameType type, FrameStatus status) const {
  rpc::Header h = call_;
  h.type = type;
  h.status = status;
  return h;
}

void Stream::send(FrameType type, FrameStatus status, rpc::Buffer body, rpc::Lane lane) {
  connection_->send(header(type, status), std::move(body), lane);
}

void Stream::throw_if_failed() const {
  if (error_) throw *error_;
}

void Stream::wake(Waiter& slot) {
  Waiter w = std::move(slot);
  slot = nullptr;
  if (w) w();
}

void Stream::wake_all() {
  Waiter r, w;
  {
    std::lock_guard lock(mutex_);
    r = std::move(read_waiter_);
    w = std::move(write_waiter_);
    read_waiter_ = nullptr;
    write_waiter_ = nullptr;
  }
  if (r) r();
  if (w) w();
}

asio::awaitable<void> Stream::wait_until(Waiter& slot, std::function<bool()> ready) {
  // The check and the registration happen under one lock, so a wake-up
  // between them cannot be lost.
  co_await asio::async_initiate<decltype(asio::use_awaitable), void()>(
      [this, &slot, &ready](auto handler) {
        using Handler = decltype(handler);
        auto h = std::make_shared<Handler>(std::move(handler));
        auto resume = [h] {
          auto ex = asio::get_associated_executor(*h);
          asio::post(ex, [h]() mutable { std::move(*h)(); });
        };
        {
          std::lock_guard lock(mutex_);
          if (!ready()) {
            slot = std::move(resume);
            return;
          }
        }
        resume();
      },
      asio::use_awaitable);
}

asio::awaitable<void> Stream::write(rpc::Buffer data) {
  // One owner for every chunk cut from the caller's buffer: the writer keeps
  // it alive until the last piece is on the socket.
  co_await write(std::shared_ptr<const rpc::Buffer>(std::make_shared<rpc::Buffer>(std::move(data))));
}

asio::awaitable<void> Stream::write(std::shared_ptr<const rpc::Buffer> owner) {
  const std::size_t total = owner->size();
  std::size_t offset = 0;
  while (offset < total) {
    const std::size_t n = std::min<std::size_t>(limits_.chunk_size, total - offset);
    co_await wait_until(write_waiter_, [this, n] {
      return error_ || send_finished_ || unacked_ == 0 || unacked_ + n <= limits_.window;
    });
    {
      std::lock_guard lock(mutex_);
      throw_if_failed();
      if (send_finished_) throw Error(Code::failed_precondition, "write after finish on the stream");
      unacked_ += n;
      sent_ += n;
      rpc::OutFrame f;
      rpc::encode_prefix(header(FrameType::data_chunk, FrameStatus::cont), n, f.prefix.data());
      f.owner = owner;
      f.payload = std::span<const std::uint8_t>(owner->data() + offset, n);
      f.serial = call_.serial;
      f.type = FrameType::data_chunk;
      connection_->send(std::move(f), rpc::Lane::bulk);
    }
    offset += n;
  }
}

asio::awaitable<void> Stream::write_hole(std::uint64_t length) {
  if (length == 0) co_return;
  co_await wait_until(write_waiter_, [this] {
    return error_ || send_finished_ || unacked_ == 0 || unacked_ + hole_credit <= limits_.window;
  });
  std::lock_guard lock(mutex_);
  throw_if_failed();
  if (send_finished_) throw Error(Code::failed_precondition, "write after finish on the stream");
  unacked_ += hole_credit;
  auto body = rpc::encode_hole(length);
  send(FrameType::stream_hole, FrameStatus::ok, rpc::Buffer::copy_of(std::span<const std::uint8_t>(body)),
       rpc::Lane::bulk);
}

asio::awaitable<void> Stream::finish() {
  {
    std::lock_guard lock(mutex_);
    throw_if_failed();
  }
  end();
  co_return;
}

void Stream::end() {
  std::lock_guard lock(mutex_);
  if (send_finished_ || error_) return;
  send_finished_ = true;
  // Bulk lane: end of stream must follow the data queued before it.
  send(FrameType::data_chunk, FrameStatus::ok, rpc::Buffer(), rpc::Lane::bulk);
}

asio::awaitable<Item> Stream::read() {
  co_await wait_until(read_waiter_, [this] { return error_ || !queue_.empty() || recv_ended_; });
  std::lock_guard lock(mutex_);
  if (!queue_.empty()) {
    Item item = std::move(queue_.front());
    queue_.pop_front();
    // A hole is consumed as soon as it is read.
    if (item.kind == Item::Kind::hole) grant_locked(hole_credit);
    co_return item;
  }
  if (recv_ended_) co_return Item{};
  throw *error_;
}

void Stream::released(std::size_t bytes) {
  std::lock_guard lock(mutex_);
  grant_locked(bytes);
}

void Stream::grant_locked(std::uint64_t bytes) {
  held_ -= std::min<std::uint64_t>(held_, bytes);
  if (recv_ended_ || error_) return;
  credit_owed_ += bytes;
  // Batch credit: a fast consumer costs its peer one small frame per
  // quarter window (1 MiB by default), not one per chunk. A sender stops
  // only when its next piece (at most one chunk) would overflow the window,
  // so it is then waiting on more than window - chunk bytes, all of which
  // this side owes once the consumer catches up: a threshold no higher than
  // that never leaves it waiting.
  const std::uint64_t window = limits_.window, chunk = limits_.chunk_size;
  const std::uint64_t threshold = window > chunk ? std::min(window / 4, window - chunk + 1) : 1;
  if (credit_owed_ >= threshold) {
    auto body = rpc::encode_credit(static_cast<std::uint32_t>(credit_owed_));
    credit_owed_ = 0;
    send(FrameType::stream_credit, FrameStatus::ok, rpc::Buffer::copy_of(std::span<const std::uint8_t>(body)),
         rpc::Lane::control);
  }
}

void Stream::abort(const Error& error) {
  // Dropped items are destroyed outside the lock: a Chunk's destructor
  // calls back into released().
  std::deque<Item> dropped;
  {
    std::lock_guard lock(mutex_);
    if (error_) return;
    if (send_finished_ && recv_ended_) return;
    error_ = error;
    send_finished_ = true;
    dropped.swap(queue_);
    held_ = 0;
  }
  connection_->drop_bulk(call_.serial);
  send(FrameType::data_chunk, FrameStatus::error, rpc::serialize(error.to_proto()), rpc::Lane::control);
  wake_all();
}

void Stream::fail(const Error& error) {
  std::deque<Item> dropped;
  {
    std::lock_guard lock(mutex_);
    if (error_) return;
    error_ = error;
    dropped.swap(queue_);
    held_ = 0;
  }
  connection_->drop_bulk(call_.serial);
  wake_all();
}

std::optional<Error> Stream::error() const {
  std::lock_guard lock(mutex_);
  return error_;
}

bool Stream::finished_sending() const {
  std::lock_guard lock(mutex_);
  return send_finished_;
}

std::uint64_t Stream::bytes_sent() const {
  std::lock_guard lock(mutex_);
  return sent_;
}

std::uint64_t Stream::bytes_received() const {
  std::lock_guard lock(mutex_);
  return received_;
}

std::uint64_t Stream::bytes_held() const {
  std::lock_guard lock(mutex_);
  return held_;
}

void Stream::on_stream_frame(const rpc::Header& h, rpc::Buffer body) {
  Waiter to_wake;
  bool violated = false;
  std::deque<Item> dropped;
  {
    std::lock_guard lock(mutex_);
    switch (h.type) {
      case FrameType::data_chunk:
        if (h.status == FrameStatus::cont) {
          if (error_ || recv_ended_) return;
          const std::size_t n = body.size();
          if (held_ + n > std::uint64_t{limits_.window} + limits_.chunk_size) {
            violated = true;
            break;
          }
          held_ += n;
          received_ += n;
          Item item;
          item.kind = Item::Kind::data;
          item.length = n;
          item.data = Chunk(std::move(body), weak_from_this());
          queue_.push_back(std::move(item));
          to_wake = std::move(read_waiter_);
          read_waiter_ = nullptr;
        } else if (h.status == FrameStatus::ok) {
          if (error_) return;
          recv_ended_ = true;
          to_wake = std::move(read_waiter_);
          read_waiter_ = nullptr;
        } else {
          ferry::v1::Error e;
          Error why = e.ParseFromArray(body.data(), static_cast<int>(body.size()))
                          ? Error::from_proto(e)
                          : Error(Code::aborted, "peer aborted the stream (unreadable reason)");
          if (error_) return;
          error_ = why;
          failed_by_peer_ = true;
          send_finished_ = true;
          dropped.swap(queue_);
          held_ = 0;
        }
        break;
      case FrameType::stream_hole: {
        if (error_ || recv_ended_) return;
        if (held_ + hole_credit > std::uint64_t{limits_.window} + limits_.chunk_size) {
          violated = true;
          break;
        }
        Item item;
        item.kind = Item::Kind::hole;
        item.length = rpc::decode_hole(std::span<const std::uint8_t, rpc::hole_body_size>(body.data(), rpc::hole_body_size));
        held_ += hole_credit;
        queue_.push_back(std::move(item));
        to_wake = std::move(read_waiter_);
        read_waiter_ = nullptr;
        break;
      }
      case FrameType::stream_credit: {
        const std::uint32_t n =
            rpc::decode_credit(std::span<const std::uint8_t, rpc::credit_body_size>(body.data(), rpc::credit_body_size));
        unacked_ -= std::min<std::uint64_t>(unacked_, n);
        to_wake = std::move(write_waiter_);
        write_waiter_ = nullptr;
        break;
      }
      default:
        return;
    }
  }
  if (violated) {
    spdlog::warn("stream {} from {}: peer sent beyond the credit window of {} bytes; aborting the stream",
                 call_.serial, connection_->peer().address, limits_.window);
    abort(Error(Code::data_loss, "peer exceeded the stream's credit window of " + std::to_string(limits_.window) +
                                     " bytes"));
    return;
  }
  if (to_wake) {
    to_wake();
  } else if (h.type == FrameType::data_chunk && h.status == FrameStatus::error) {
    connection_->drop_bulk(call_.serial);
    wake_all();
    notify_peer_failure();
  }
}

void Stream::notify_peer_failure() {
  std::function<void()> fn;
  {
    std::lock_guard lock(mutex_);
    fn = std::move(on_peer_failure_);
    on_peer_failure_ = nullptr;
  }
  if (fn) fn();
}

void Stream::on_peer_failure(std::function<void()> fn) {
  std::lock_guard lock(mutex_);
  on_peer_failure_ = std::move(fn);
}

bool Stream::failed_by_peer() const {
  std::lock_guard lock(mutex_);
  return failed_by_peer_;
}

void Stream::on_connection_closed(const Error& reason) { fail(reason); }

void Stream::on_call_cancelled() {
  {
    std::lock_guard lock(mutex_);
    if (!error_) failed_by_peer_ = true;
  }
  fail(Error(Code::cancelled, "call cancelled by the client"));
}

// Blocking forms: run the coroutine on the connection's executor and wait.
namespace {
template <class T>
T run_sync(asio::any_io_executor ex, asio::awaitable<T> op) {
  return asio::co_spawn(ex, std::move(op), asio::use_future).get();
}
}  // namespace

void Stream::write_sync(rpc::Buffer data) { run_sync(connection_->get_executor(), write(std::move(data))); }
void Stream::write_hole_sync(std::uint64_t length) { run_sync(connection_->get_executor(), write_hole(length)); }
void Stream::finish_sync() { run_sync(connection_->get_executor(), finish()); }
Item Stream::read_sync() { return run_sync(connection_->get_executor(), read()); }

}  // namespace ferry::stream
