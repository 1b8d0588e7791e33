#include "rpc/grpc_transport.h"

#include <grpc/grpc_security_constants.h>
#include <grpcpp/channel.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>

#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <mutex>
#include <optional>
#include <spdlog/spdlog.h>
#include <sstream>
#include <string>
#include <vector>

#include "rpc/error.h"

namespace ferry::rpc {

namespace {

using grpc::ByteBuffer;
using Clock = std::chrono::steady_clock;
constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);

// Received messages kept queued before the reader stops asking for more.
constexpr std::size_t kQueueBytes = 4u << 20;
// The one method of proto/ferry/v1/tunnel.proto. Messages are built and
// taken apart here rather than through the generated Frames class: a
// Frames message is only the tag of field 1 (0x0a), a varint length and
// the bytes, so they can go out as slices of pooled blocks and be read
// straight out of the slices gRPC received, with one copy each way and no
// message-sized allocation (which malloc trims and faults back in).
constexpr const char* kConnectMethod = "/ferry.v1.Tunnel/Connect";

// Fixed-size blocks for outgoing message bytes, shared by every gRPC
// transport in the process. gRPC gives a block back (any thread) when it
// has sent it; up to kIdleBlocks stay for reuse.
class BlockPool {
 public:
  static constexpr std::size_t kBlock = 64u << 10;
  static constexpr std::size_t kIdleBlocks = 256;

  static BlockPool& instance() {
    static BlockPool* const pool = new BlockPool;  // used by gRPC threads until exit
    return *pool;
  }
  char* get() {
    {
      std::lock_guard lock(mutex_);
      if (!idle_.empty()) {
        char* block = idle_.back();
        idle_.pop_back();
        return block;
      }
    }
    return new char[kBlock];
  }
  void put(char* block) {
    {
      std::lock_guard lock(mutex_);
      if (idle_.size() < kIdleBlocks) {
        idle_.push_back(block);
        return;
      }
    }
    delete[] block;
  }
  // A slice of `size` bytes of `block`, giving the block back when gRPC
  // and every copy of the slice are done with it.
  static grpc::Slice slice(char* block, std::size_t size) {
    return grpc::Slice(block, size, [](void* b) { instance().put(static_cast<char*>(b)); }, block);
  }

 private:
  std::mutex mutex_;
  std::vector<char*> idle_;
};

// glibc hands a thread arena's free top back to the kernel whenever it
// exceeds the trim threshold, which stays at 128 KiB until the process
// frees its first block above the mmap threshold. gRPC reads on its own
// threads into fresh buffers of up to a few hundred KiB; with the low
// threshold every read faulted its pages in again, and a stream ran at
// a fifth of its speed. Freeing one 4 MiB block makes glibc raise both
// thresholds to that size (mmap) and twice it (trim) as it would by itself
// after the first large free, so arenas keep a few MiB for reuse.
void settle_malloc_thresholds() {
#ifdef __GLIBC__
  static std::once_flag once;
  std::call_once(once, [] {
    void* block = std::malloc(4u << 20);
    if (!block) return;
    static_cast<volatile char*>(block)[0] = 0;  // a block really allocated and freed
    std::free(block);
  });
#endif
}

// One Frames message of `bytes` bytes held in `blocks` (each with the
// count of bytes used), which the message's slices then own.
ByteBuffer build_message(std::vector<std::pair<char*, std::size_t>>& blocks, std::size_t bytes) {
  std::vector<grpc::Slice> slices;
  slices.reserve(1 + blocks.size());
  unsigned char header[11];
  std::size_t n = 0;
  header[n++] = 0x0a;  // field 1, length-delimited
  for (std::uint64_t v = bytes;; v >>= 7) {
    header[n++] = static_cast<unsigned char>((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
    if (v <= 0x7f) break;
  }
  slices.emplace_back(header, n);
  for (auto& [block, used] : blocks) slices.push_back(BlockPool::slice(block, used));
  blocks.clear();
  return ByteBuffer(slices.data(), slices.size());
}

// Received bytes not yet read: a range of a slice gRPC received.
struct Piece {
  grpc::Slice slice;
  std::size_t begin;
  std::size_t end;
};

// Takes a received Frames message apart into the pieces of its `data`
// field; false when it is not a valid Frames message. Unknown fields are
// skipped and, as protobuf does, a repeated field 1 keeps the last value.
bool parse_message(const ByteBuffer& message, std::vector<Piece>& out) {
  std::vector<grpc::Slice> slices;
  if (!message.Dump(&slices).ok()) return false;
  std::size_t i = 0, at = 0;
  auto next_byte = [&](std::uint8_t& b) {
    while (i < slices.size() && at == slices[i].size()) {
      ++i;
      at = 0;
    }
    if (i == slices.size()) return false;
    b = slices[i].begin()[at++];
    return true;
  };
  auto varint = [&](std::uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      std::uint8_t b;
      if (!next_byte(b)) return false;
      v |= std::uint64_t{b & 0x7fu} << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  };
  // Walks `length` bytes, keeping them as pieces when `keep`.
  auto take = [&](std::uint64_t length, bool keep) {
    while (length > 0) {
      if (i < slices.size() && at == slices[i].size()) {
        ++i;
        at = 0;
        continue;
      }
      if (i == slices.size()) return false;
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(length, slices[i].size() - at));
      if (keep) out.push_back(Piece{slices[i], at, at + n});
      at += n;
      length -= n;
    }
    return true;
  };
  out.clear();
  for (;;) {
    std::uint8_t first;
    if (!next_byte(first)) return true;  // the end, between fields
    at--;  // re-read it as part of the tag varint
    std::uint64_t tag, value;
    if (!varint(tag)) return false;
    switch (tag & 7) {
      case 0:
        if (!varint(value)) return false;
        break;
      case 1:
        if (!take(8, false)) return false;
        break;
      case 5:
        if (!take(4, false)) return false;
        break;
      case 2:
        if (!varint(value)) return false;
        if (tag >> 3 == 1) out.clear();
        if (!take(value, tag >> 3 == 1)) return false;
        break;
      default:
        return false;
    }
  }
}

// What the transport asks of the reactor (client or server side). Called
// only under Shared::mutex and only while Shared::ops points at it.
struct StreamOps {
  virtual ~StreamOps() = default;
  virtual void start_read(ByteBuffer* message) = 0;
  virtual void start_write(const ByteBuffer* message) = 0;
  // Ends our sending direction; false when that ended the whole stream
  // (server: Finish), after which no operation may be started.
  virtual bool end_writes() = 0;
  // Cancels the stream and gives the reactor up: no operation may be
  // started afterwards, and the reactor may delete itself once gRPC is
  // done with it.
  virtual void release() = 0;
};

// The timers the transport's coroutines wait on: live on the strand,
// owned by the transport; gRPC's threads reach them only through a
// weak_ptr posted to the strand.
struct Wakers {
  explicit Wakers(const asio::any_io_executor& ex) : read(ex), write(ex) {}
  asio::steady_timer read;
  asio::steady_timer write;
};

// State shared by the transport (strand) and its reactor (gRPC threads).
struct Shared : std::enable_shared_from_this<Shared> {
  std::mutex mutex;
  std::condition_variable done_cv;  // done became true
  StreamOps* ops = nullptr;  // null once released or done
  asio::any_io_executor strand;
  std::weak_ptr<Wakers> wakers;

  // Read side.
  ByteBuffer read_message;
  bool read_outstanding = false;
  std::deque<Piece> queue;
  std::size_t queue_bytes = 0;
  bool ended = false;  // the peer finished or the stream failed: EOF after the queue
  bool malformed = false;  // the peer sent something that is not a Frames message

  // Write side. write_all copies into `pending` and returns (as send()
  // returns once the kernel has the bytes); whatever gathers while a
  // message is in flight goes out as the next one, started by the gRPC
  // thread that saw the last one sent, so a busy sender costs no wake-up
  // of the strand per message. A failure shows on the next write.
  ByteBuffer write_message;  // the one gRPC is sending
  std::vector<std::pair<char*, std::size_t>> pending;  // blocks and the bytes used in each
  std::size_t pending_bytes = 0;
  bool write_outstanding = false;
  bool write_failed = false;
  bool writes_ended = false;      // shutdown_send ran
  bool end_after_write = false;   // ...while bytes were still going out: end after them

  // Set by a coroutine (under the mutex) just before it waits; a reaction
  // wakes it only then, so that messages arriving or leaving while nobody
  // waits cost no post to the strand.
  bool reader_waiting = false;
  bool writer_waiting = false;

  // Client start-up: the server's initial metadata (1), or failure (-1).
  int started = 0;
  bool done = false;  // OnDone ran
  std::string final_status;
  bool closed = false;  // close() ran: no more wake-ups

  ~Shared() {
    for (auto& [block, used] : pending) BlockPool::instance().put(block);
  }

  // Wakes the reader and/or writer if it waits on the strand. Any thread,
  // under the mutex.
  void wake_locked(bool reader, bool writer) {
    reader = reader && reader_waiting;
    writer = writer && writer_waiting;
    if (closed || (!reader && !writer)) return;
    if (reader) reader_waiting = false;
    if (writer) writer_waiting = false;
    asio::post(strand, [w = wakers, reader, writer] {
      if (auto wakers = w.lock()) {
        if (reader) wakers->read.cancel();
        if (writer) wakers->write.cancel();
      }
    });
  }
  void wake_both_locked() { wake_locked(true, true); }

  // Copies up to `limit` bytes from (it, offset), advancing them, into the
  // pending blocks; returns the count.
  std::size_t append_locked(std::span<const asio::const_buffer>::iterator& it, std::size_t& offset,
                            std::size_t limit) {
    std::size_t copied = 0;
    while (copied < limit) {
      if (pending.empty() || pending.back().second == BlockPool::kBlock)
        pending.emplace_back(BlockPool::instance().get(), 0);
      auto& [block, used] = pending.back();
      const std::size_t n = std::min({it->size() - offset, limit - copied, BlockPool::kBlock - used});
      std::memcpy(block + used, static_cast<const char*>(it->data()) + offset, n);
      used += n;
      copied += n;
      offset += n;
      if (offset == it->size()) {
        ++it;
        offset = 0;
      }
    }
    pending_bytes += copied;
    return copied;
  }

  // Sends what is pending as one message (nothing may be in flight).
  void start_pending_locked() {
    ByteBuffer message = build_message(pending, pending_bytes);
    write_message.Swap(&message);
    pending_bytes = 0;
    write_outstanding = true;
    ops->start_write(&write_message);
  }

  // Asks gRPC for the next message if none is pending and the queue has room.
  void maybe_read_locked() {
    if (!ops || read_outstanding || ended || queue_bytes >= kQueueBytes) return;
    read_outstanding = true;
    read_message.Clear();
    ops->start_read(&read_message);
  }

  // Reactions (gRPC threads).
  void on_read_done(bool ok) {
    std::lock_guard lock(mutex);
    read_outstanding = false;
    if (ok) {
      std::vector<Piece> pieces;
      if (parse_message(read_message, pieces)) {
        for (auto& piece : pieces) {
          queue_bytes += piece.end - piece.begin;
          queue.push_back(std::move(piece));
        }
        read_message.Clear();
        maybe_read_locked();
      } else {
        spdlog::warn("gRPC transport: a message on the stream is not a ferry.v1.Frames message; closing it");
        malformed = true;
        ended = true;
        if (ops) {
          ops->release();
          ops = nullptr;
        }
      }
    } else {
      ended = true;
    }
    wake_locked(true, false);
  }
  void on_write_done(bool ok) {
    std::lock_guard lock(mutex);
    write_outstanding = false;
    if (!ok) {
      write_failed = true;
    } else if (ops && pending_bytes > 0) {
      start_pending_locked();
    } else if (end_after_write) {
      end_after_write = false;
      if (ops && !ops->end_writes()) ops = nullptr;
    }
    wake_locked(false, true);
  }
  void on_started(bool ok) {
    std::lock_guard lock(mutex);
    started = ok ? 1 : -1;
    wake_both_locked();
  }
  void on_cancel() {
    std::lock_guard lock(mutex);
    ended = true;
    write_failed = true;
    if (ops) {
      ops->release();
      ops = nullptr;
    }
    wake_both_locked();
  }
  void on_done(const grpc::Status& status) {
    std::lock_guard lock(mutex);
    ops = nullptr;
    done = true;
    ended = true;
    if (write_outstanding) write_failed = true;
    if (!status.ok())
      final_status = status.error_message().empty() ? "gRPC status " + std::to_string(status.error_code())
                                                    : status.error_message();
    wake_both_locked();
    done_cv.notify_all();
  }

  // Copies queued bytes into `buffers` in turn; returns the count.
  std::size_t take_locked(std::initializer_list<asio::mutable_buffer> buffers) {
    std::size_t total = 0;
    for (asio::mutable_buffer b : buffers) {
      while (b.size() > 0 && !queue.empty()) {
        Piece& front = queue.front();
        const std::size_t n = std::min(b.size(), front.end - front.begin);
        std::memcpy(b.data(), front.slice.begin() + front.begin, n);
        b += n;
        total += n;
        front.begin += n;
        queue_bytes -= n;
        if (front.begin == front.end) queue.pop_front();
      }
    }
    return total;
  }
};

// The client's reactor. It holds neither the channel nor the stub: the
// transport owns the channel and lets it go, on its own thread, once the
// call is over (OnDone). In gRPC 1.51 the last grpc::Channel going away
// shuts down the callback queue all client reactions run on; destroyed
// inside a reaction, or while a call on it is still in flight, that aborts
// the process ("assertion failed: prior > 0" in grpc_cq_internal_unref).
class ClientStream final : public grpc::ClientBidiReactor<ByteBuffer, ByteBuffer>, public StreamOps {
 public:
  explicit ClientStream(std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {}

  // Under shared->mutex.
  void begin(grpc::GenericStub& stub) {
    stub.PrepareBidiStreamingCall(&context_, kConnectMethod, grpc::StubOptions(), this);
    AddHold();  // OnDone waits for release(): we may still start operations until then
    shared_->ops = this;
    shared_->maybe_read_locked();
    StartCall();
  }

  void start_read(ByteBuffer* message) override { StartRead(message); }
  void start_write(const ByteBuffer* message) override { StartWrite(message); }
  bool end_writes() override {
    StartWritesDone();
    return true;
  }
  void release() override {
    context_.TryCancel();
    RemoveHold();
  }

  void OnReadInitialMetadataDone(bool ok) override { shared_->on_started(ok); }
  void OnReadDone(bool ok) override { shared_->on_read_done(ok); }
  void OnWriteDone(bool ok) override { shared_->on_write_done(ok); }
  void OnWritesDoneDone(bool) override {}
  void OnDone(const grpc::Status& status) override {
    shared_->on_done(status);
    delete this;
  }

 private:
  std::shared_ptr<Shared> shared_;
  grpc::ClientContext context_;
};

class ServerStream final : public grpc::ServerGenericBidiReactor, public StreamOps {
 public:
  ServerStream(grpc::CallbackServerContext* context, std::shared_ptr<Shared> shared)
      : context_(context), shared_(std::move(shared)) {
    // The client waits for this before it calls the stream connected.
    StartSendInitialMetadata();
    std::lock_guard lock(shared_->mutex);
    shared_->ops = this;
    shared_->maybe_read_locked();
  }

  void start_read(ByteBuffer* message) override { StartRead(message); }
  void start_write(const ByteBuffer* message) override { StartWrite(message); }
  bool end_writes() override {
    finish(grpc::Status::OK);
    return false;
  }
  void release() override {
    context_->TryCancel();
    finish(grpc::Status(grpc::StatusCode::CANCELLED, "connection closed"));
  }

  void OnSendInitialMetadataDone(bool) override {}
  void OnReadDone(bool ok) override { shared_->on_read_done(ok); }
  void OnWriteDone(bool ok) override { shared_->on_write_done(ok); }
  void OnCancel() override { shared_->on_cancel(); }
  void OnDone() override {
    shared_->on_done(grpc::Status::OK);
    delete this;
  }

 private:
  void finish(grpc::Status status) {
    if (finished_) return;
    finished_ = true;
    Finish(std::move(status));
  }
  grpc::CallbackServerContext* context_;
  std::shared_ptr<Shared> shared_;
  bool finished_ = false;  // under shared_->mutex
};

// Channels whose call did not end in time: destroying one would abort
// (see ClientStream), so they stay, reachable, until the process exits.
void keep_forever(std::shared_ptr<grpc::Channel> channel) {
  static std::mutex mutex;
  static auto* const kept = new std::vector<std::shared_ptr<grpc::Channel>>;
  std::lock_guard lock(mutex);
  kept->push_back(std::move(channel));
}

class GrpcTransport final : public Transport {
 public:
  GrpcTransport(asio::any_io_executor strand, std::shared_ptr<Shared> shared, PeerIdentity peer,
                std::shared_ptr<grpc::Channel> channel = nullptr)
      : strand_(std::move(strand)),
        shared_(std::move(shared)),
        wakers_(std::make_shared<Wakers>(strand_)),
        channel_(std::move(channel)) {
    peer_ = std::move(peer);
    std::lock_guard lock(shared_->mutex);
    shared_->wakers = wakers_;
  }
  ~GrpcTransport() override {
    release();
    if (channel_) {
      // The call was cancelled just now (if it was still up); gRPC ends
      // it within moments. The channel may only go after that (see
      // ClientStream).
      std::unique_lock lock(shared_->mutex);
      if (!shared_->done_cv.wait_for(lock, std::chrono::seconds(10), [&] { return shared_->done; })) {
        spdlog::warn("gRPC stream to {} did not end within 10 s of its cancellation; keeping its channel",
                     peer_.address);
        keep_forever(std::move(channel_));  // destroying it now would abort
      }
    }
    channel_.reset();
  }

  asio::any_io_executor get_executor() override { return strand_; }

  asio::awaitable<IoResult> read_some(asio::mutable_buffer buffer) override {
    co_return co_await read_into(buffer, asio::mutable_buffer());
  }
  asio::awaitable<IoResult> read_some_split(asio::mutable_buffer body, asio::mutable_buffer tail) override {
    co_return co_await read_into(body, tail);
  }

  asio::awaitable<IoResult> write_all(std::span<const asio::const_buffer> buffers) override {
    std::size_t total = 0;
    for (const auto& b : buffers) total += b.size();
    std::size_t written = 0;
    auto it = buffers.begin();
    std::size_t offset = 0;  // into *it
    while (written < total) {
      {
        std::lock_guard lock(shared_->mutex);
        if (closed_) co_return IoResult{asio::error::operation_aborted, written};
        if (shared_->write_failed) co_return IoResult{asio::error::connection_reset, written};
        if (!shared_->ops || shared_->writes_ended) co_return IoResult{asio::error::broken_pipe, written};
        if (shared_->pending_bytes < kGrpcMaxWrite) {
          written += shared_->append_locked(it, offset, std::min(total - written, kGrpcMaxWrite - shared_->pending_bytes));
          if (!shared_->write_outstanding) shared_->start_pending_locked();
          continue;
        }
        shared_->writer_waiting = true;  // a full message waits: until it is started
      }
      co_await wait(wakers_->write);
    }
    co_return IoResult{std::error_code{}, written};
  }

  asio::awaitable<std::error_code> wait_readable() override {
    for (;;) {
      {
        std::lock_guard lock(shared_->mutex);
        if (closed_) co_return asio::error::operation_aborted;
        if (!shared_->queue.empty() || shared_->ended) co_return std::error_code{};
        shared_->maybe_read_locked();
        shared_->reader_waiting = true;
      }
      co_await wait(wakers_->read);
    }
  }

  void shutdown_send() override {
    std::lock_guard lock(shared_->mutex);
    if (shared_->writes_ended) return;
    shared_->writes_ended = true;
    if (shared_->write_outstanding) {
      shared_->end_after_write = true;  // after the last bytes, not beside them
      return;
    }
    if (shared_->ops && !shared_->ops->end_writes()) shared_->ops = nullptr;
  }

  void close() override {
    release();
    wakers_->read.cancel();
    wakers_->write.cancel();
  }

  // For the client's start-up: waits (run it on the strand) until the server's
  // initial metadata arrived; on failure, the reason.
  asio::awaitable<std::optional<Error>> wait_started(Clock::time_point deadline, const std::string& what) {
    for (;;) {
      {
        std::lock_guard lock(shared_->mutex);
        if (shared_->started > 0) co_return std::nullopt;
        if (shared_->done)
          co_return Error(Code::unavailable, "cannot connect to " + what + ": " +
                                                 (shared_->final_status.empty() ? std::string("stream refused")
                                                                                : shared_->final_status));
        if (shared_->started < 0 && shared_->ops) {
          // Failed: end the call to learn why (OnDone brings the status).
          shared_->ops->release();
          shared_->ops = nullptr;
        }
        if (Clock::now() >= deadline) {
          if (shared_->ops) {
            shared_->ops->release();
            shared_->ops = nullptr;
          }
          co_return Error(Code::deadline_exceeded, "cannot connect to " + what + ": timed out");
        }
        shared_->reader_waiting = true;
      }
      wakers_->read.expires_at(deadline);
      co_await wakers_->read.async_wait(use_tuple);
    }
  }

 private:
  asio::awaitable<IoResult> read_into(asio::mutable_buffer first, asio::mutable_buffer second) {
    if (first.size() == 0 && second.size() == 0) co_return IoResult{std::error_code{}, 0};
    for (;;) {
      {
        std::lock_guard lock(shared_->mutex);
        if (closed_) co_return IoResult{asio::error::operation_aborted, 0};
        if (!shared_->queue.empty()) {
          const std::size_t n = shared_->take_locked({first, second});
          shared_->maybe_read_locked();
          co_return IoResult{std::error_code{}, n};
        }
        if (shared_->malformed) co_return IoResult{std::make_error_code(std::errc::bad_message), 0};
        if (shared_->ended) co_return IoResult{asio::error::eof, 0};
        shared_->maybe_read_locked();
        shared_->reader_waiting = true;
      }
      co_await wait(wakers_->read);
    }
  }

  static asio::awaitable<void> wait(asio::steady_timer& timer) {
    timer.expires_at(asio::steady_timer::time_point::max());
    co_await timer.async_wait(use_tuple);
  }

  void release() {
    std::lock_guard lock(shared_->mutex);
    closed_ = true;
    shared_->closed = true;
    // The reactor may outlive the transport and, in a process that is
    // ending, the io_context: the last reference to Shared can go on a
    // gRPC thread after the io_context is gone, so Shared must not keep a
    // handle to the strand past this point.
    shared_->strand = asio::any_io_executor();
    if (shared_->ops) {
      shared_->ops->release();
      shared_->ops = nullptr;
    }
  }

  asio::any_io_executor strand_;
  std::shared_ptr<Shared> shared_;
  std::shared_ptr<Wakers> wakers_;
  std::shared_ptr<grpc::Channel> channel_;  // client side
  bool closed_ = false;  // under shared_->mutex
};

std::string read_pem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(Code::invalid_argument, std::string("cannot read ") + what + " '" + path + "'", "tls");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string host_port(const Endpoint& endpoint) {
  if (endpoint.host.find(':') != std::string::npos)
    return "[" + endpoint.host + "]:" + std::to_string(endpoint.port);
  return endpoint.host + ":" + std::to_string(endpoint.port);
}

// "ipv4:127.0.0.1:5000" -> "127.0.0.1:5000"; "ipv6:[::1]:5000" -> "[::1]:5000".
std::string peer_address(std::string peer) {
  for (const char* prefix : {"ipv4:", "ipv6:"})
    if (peer.rfind(prefix, 0) == 0) return peer.substr(std::strlen(prefix));
  return peer;
}

// Percent-decodes what gRPC's peer() escapes ("[" as %5B in ipv6 forms).
std::string unescape(const std::string& text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%' && i + 2 < text.size() && std::isxdigit(static_cast<unsigned char>(text[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(text[i + 2]))) {
      out.push_back(static_cast<char>(std::stoi(text.substr(i + 1, 2), nullptr, 16)));
      i += 2;
    } else {
      out.push_back(text[i]);
    }
  }
  return out;
}

// gRPC 1.51 runs every client reaction on one process-wide callback queue
// that lives while some grpc::Channel uses it, and shuts it down (joining
// its threads) when the last such channel goes. That shutdown races with
// the reactor of the call that just ended, still unwinding on one of those
// threads, and aborts the process. A channel that holds the queue for the
// life of the process (never connected, never freed) keeps it up.
void hold_callback_queue() {
  struct Idle final : grpc::ClientBidiReactor<ByteBuffer, ByteBuffer> {
    void OnDone(const grpc::Status&) override {}
  };
  struct Held {
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<grpc::GenericStub> stub;
    grpc::ClientContext context;
    Idle reactor;
  };
  // Reachable from this static for the life of the process (so leak
  // checkers see a singleton, not a leak); never destroyed, because
  // destroying it is what shuts the queue down.
  static Held* const held = [] {
    auto* h = new Held;
    h->channel = grpc::CreateChannel("unix:/nonexistent/ferry-callback-queue", grpc::InsecureChannelCredentials());
    h->stub = std::make_unique<grpc::GenericStub>(h->channel);
    // Creating the call (never started) makes the channel take the queue.
    h->stub->PrepareBidiStreamingCall(&h->context, kConnectMethod, grpc::StubOptions(), &h->reactor);
    return h;
  }();
  (void)held;
}

}  // namespace

asio::awaitable<std::unique_ptr<Transport>> connect_grpc(asio::any_io_executor strand, const Endpoint& endpoint,
                                                         const TlsOptions* tls, std::chrono::milliseconds timeout) {
  const bool secure = endpoint.kind == Endpoint::Kind::grpcs;
  hold_callback_queue();
  settle_malloc_thresholds();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kGrpcMaxMessage);
  args.SetMaxSendMessageSize(kGrpcMaxMessage);
  // Each ferry connection is a channel (one HTTP/2 connection) of its own,
  // never shared with another: two connections to one daemon are
  // independent, as over TCP.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (secure) {
    grpc::SslCredentialsOptions ssl;
    if (tls) {
      if (!tls->ca_file.empty()) ssl.pem_root_certs = read_pem(tls->ca_file, "CA file");
      if (!tls->cert_file.empty()) ssl.pem_cert_chain = read_pem(tls->cert_file, "certificate file");
      if (!tls->key_file.empty()) ssl.pem_private_key = read_pem(tls->key_file, "key file");
      if (!tls->server_name.empty()) args.SetSslTargetNameOverride(tls->server_name);
    }
    credentials = grpc::SslCredentials(ssl);
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  const std::string target = host_port(endpoint);
  auto channel = grpc::CreateCustomChannel(target, credentials, args);

  auto shared = std::make_shared<Shared>();
  shared->strand = strand;
  PeerIdentity peer;
  peer.transport = secure ? "grpcs" : "grpc";
  peer.address = target;
  if (secure) {
    peer.tls_version = "TLS (gRPC)";
    peer.tls_bits = 128;
  }
  auto stub = std::make_unique<grpc::GenericStub>(channel);
  auto transport = std::make_unique<GrpcTransport>(strand, shared, std::move(peer), std::move(channel));
  {
    std::lock_guard lock(shared->mutex);
    auto* stream = new ClientStream(shared);  // deletes itself in OnDone
    stream->begin(*stub);
  }
  stub.reset();
  // On the transport's strand, where gRPC's wake-ups arrive (the caller
  // runs on whatever executor it was given).
  auto failure = co_await asio::co_spawn(
      strand, transport->wait_started(Clock::now() + timeout, endpoint.to_string()), asio::use_awaitable);
  if (failure) throw *failure;
  co_return transport;
}

struct GrpcListener::Impl {
  class Service final : public grpc::CallbackGenericService {
   public:
    Service(bool secure, ExecutorFor executor_for, Accept accept)
        : secure_(secure), executor_for_(std::move(executor_for)), accept_(std::move(accept)) {}

    grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* context) override {
      if (context->method() != kConnectMethod) return grpc::CallbackGenericService::CreateReactor(context);
      auto shared = std::make_shared<Shared>();
      shared->strand = asio::make_strand(executor_for_());
      PeerIdentity peer;
      peer.transport = secure_ ? "grpcs" : "grpc";
      peer.address = unescape(peer_address(context->peer()));
      if (secure_) {
        peer.tls_version = "TLS (gRPC)";
        peer.tls_bits = 128;
        if (auto auth = context->auth_context()) {
          auto subject = auth->FindPropertyValues(GRPC_X509_SUBJECT_PROPERTY_NAME);
          if (!subject.empty()) peer.tls_subject = std::string(subject.front().data(), subject.front().size());
        }
      }
      auto transport = std::make_unique<GrpcTransport>(shared->strand, shared, std::move(peer));
      auto* stream = new ServerStream(context, shared);  // deletes itself in OnDone
      accept_(std::move(transport));
      return stream;
    }

   private:
    bool secure_;
    ExecutorFor executor_for_;
    Accept accept_;
  };

  Endpoint bound;
  std::unique_ptr<Service> service;
  std::unique_ptr<grpc::Server> server;
  std::mutex mutex;
  bool stopped = false;
};

GrpcListener::GrpcListener(const Endpoint& endpoint, const TlsOptions& tls, ExecutorFor executor_for, Accept accept)
    : impl_(std::make_unique<Impl>()) {
  const bool secure = endpoint.kind == Endpoint::Kind::grpcs;
  settle_malloc_thresholds();
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (secure) {
    if (tls.cert_file.empty() || tls.key_file.empty())
      throw Error(Code::invalid_argument, "a grpcs listener needs a certificate and key (tls cert_file/key_file)",
                  "tls");
    const bool require_client = tls.verify_peer && !tls.ca_file.empty();
    grpc::SslServerCredentialsOptions ssl(require_client ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                                         : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    if (!tls.ca_file.empty()) ssl.pem_root_certs = read_pem(tls.ca_file, "CA file");
    ssl.pem_key_cert_pairs.push_back({read_pem(tls.key_file, "key file"), read_pem(tls.cert_file, "certificate file")});
    credentials = grpc::SslServerCredentials(ssl);
  } else {
    credentials = grpc::InsecureServerCredentials();
  }
  impl_->service = std::make_unique<Impl::Service>(secure, std::move(executor_for), std::move(accept));
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(kGrpcMaxMessage);
  builder.SetMaxSendMessageSize(kGrpcMaxMessage);
  // Two daemons must not share a port silently (gRPC sets SO_REUSEPORT).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  int port = 0;
  builder.AddListeningPort(host_port(endpoint), credentials, &port);
  builder.RegisterCallbackGenericService(impl_->service.get());
  impl_->server = builder.BuildAndStart();
  if (!impl_->server || port == 0)
    throw Error(Code::unavailable, "cannot listen on " + endpoint.to_string() + ": gRPC could not bind the address");
  impl_->bound = Endpoint::grpc(endpoint.host, static_cast<std::uint16_t>(port), secure);
}

GrpcListener::~GrpcListener() { shutdown(std::chrono::milliseconds(0)); }

const Endpoint& GrpcListener::endpoint() const { return impl_->bound; }

void GrpcListener::shutdown(std::chrono::milliseconds grace) {
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->stopped) return;
    impl_->stopped = true;
  }
  if (impl_->server) {
    impl_->server->Shutdown(std::chrono::system_clock::now() + grace);
    impl_->server->Wait();
  }
}

}  // namespace ferry::rpc
