#include "daemon/volume_io.h"

#include <algorithm>

#include "rpc/error.h"

namespace ferry::daemon {

struct RangeReader::Slot {
  bool hole = false;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  rpc::Buffer buffer;
  bool done = false;
  std::size_t got = 0;
  std::exception_ptr error;
};

struct RangeReader::Shared {
  explicit Shared(asio::any_io_executor e) : waker(e) {}
  rpc::Waker waker;
};

RangeReader::RangeReader(asio::any_io_executor ex, FileIo* io, std::shared_ptr<Fd> file, std::uint64_t offset,
                         std::uint64_t end, Options options, rpc::BufferPool* pool, std::string what)
    : ex_(ex),
      io_(io),
      file_(std::move(file)),
      end_(end),
      options_(options),
      pool_(pool),
      what_(std::move(what)),
      shared_(std::make_shared<Shared>(ex)),
      planned_(offset) {
  options_.depth = std::max(1u, options_.depth);
  options_.chunk = std::max<std::uint64_t>(4096, options_.chunk);
}

// Reads still in flight own their slot, buffer and descriptor: nothing to
// wait for here.
RangeReader::~RangeReader() = default;

// Plans and starts reads up to `depth` ahead.
asio::awaitable<void> RangeReader::plan() {
  while (planned_ < end_ && reads_in_flight_ < options_.depth) {
    if (next_extent_ == extents_.size()) {
      const std::uint64_t window = std::min<std::uint64_t>(end_ - planned_, 1ull << 30);
      if (options_.dense) {
        extents_ = {stream::Extent{planned_, window, false}};
      } else {
        const int fd = file_->fd;
        const std::uint64_t at = planned_;
        extents_ = co_await io_->run([fd, at, window] { return stream::map_extents(fd, at, window); });
      }
      next_extent_ = 0;
      if (extents_.empty())
        throw Error(Code::aborted, what_ + " shrank to less than " + std::to_string(planned_) + " bytes while being read",
                    "volume");
    }
    stream::Extent& e = extents_[next_extent_];
    auto slot = std::make_shared<Slot>();
    slot->offset = planned_;
    if (e.hole) {
      slot->hole = true;
      slot->length = e.offset + e.length - planned_;
      slot->done = true;
    } else {
      slot->length = std::min<std::uint64_t>(options_.chunk, e.offset + e.length - planned_);
      slot->buffer = pool_->get(slot->length);
      ++reads_in_flight_;
      auto shared = shared_;
      asio::co_spawn(
          ex_,
          [io = io_, file = file_, slot]() -> asio::awaitable<void> {
            slot->got = co_await io->read(file->fd, {slot->buffer.data(), slot->length}, slot->offset);
          },
          asio::bind_executor(ex_, [slot, shared](std::exception_ptr e) {
            slot->error = e;
            slot->done = true;
            shared->waker.wake();
          }));
    }
    planned_ += slot->length;
    if (planned_ == e.offset + e.length) ++next_extent_;
    ahead_.push_back(std::move(slot));
  }
}

asio::awaitable<RangeReader::Piece> RangeReader::next() {
  if (held_.kind == Piece::Kind::data) {  // came right after the hole handed out last
    Piece out = std::move(held_);
    held_ = Piece{};
    co_return out;
  }
  for (;;) {
    co_await plan();
    if (ahead_.empty()) {
      Piece out = std::move(held_);
      held_ = Piece{};
      co_return out;  // the last hole, or end
    }
    auto slot = ahead_.front();
    while (!slot->done) co_await shared_->waker.wait();
    ahead_.pop_front();
    if (!slot->hole) --reads_in_flight_;
    if (slot->error) std::rethrow_exception(slot->error);
    bool hole = slot->hole;
    if (!hole) {
      if (slot->got < slot->length)
        throw Error(Code::aborted,
                    what_ + " shrank while being read (short read at offset " + std::to_string(slot->offset + slot->got) +
                        ")",
                    "volume");
      hole = options_.detect_zeros && stream::is_all_zero(slot->buffer.span());
    }
    if (hole) {
      if (held_.kind == Piece::Kind::hole) {
        held_.length += slot->length;
      } else {
        held_.kind = Piece::Kind::hole;
        held_.offset = slot->offset;
        held_.length = slot->length;
      }
      continue;
    }
    Piece data;
    data.kind = Piece::Kind::data;
    data.offset = slot->offset;
    data.length = slot->length;
    data.data = std::move(slot->buffer);
    if (held_.kind == Piece::Kind::hole) {
      // Hand out the hole first; the data comes next time.
      Piece out = std::move(held_);
      held_ = std::move(data);
      co_return out;
    }
    co_return data;
  }
}

}  // namespace ferry::daemon
