#include "nbd/stream_pipe.h"

#include <cstring>

namespace ferry::nbd {

namespace {
// Buffers at least this large go out as their own chunks; smaller ones are
// copied together.
constexpr std::size_t send_as_is = 16u << 10;
constexpr std::size_t staging_size = 256u << 10;
}  // namespace

StreamPipe::StreamPipe(std::shared_ptr<stream::Stream> stream, asio::any_io_executor ex,
                       std::shared_ptr<rpc::BufferPool> buffers)
    : stream_(std::move(stream)), ex_(std::move(ex)), buffers_(std::move(buffers)) {}

asio::awaitable<std::size_t> StreamPipe::read_some(std::span<std::uint8_t> out) {
  if (out.empty()) co_return 0;
  while (current_pos_ >= current_.size()) {
    if (ended_) co_return 0;
    current_ = stream::Chunk();  // gives the consumed chunk's credit back first
    current_pos_ = 0;
    stream::Item item = co_await stream_->read();
    if (item.kind == stream::Item::Kind::end) {
      ended_ = true;
      co_return 0;
    }
    if (item.kind == stream::Item::Kind::hole)
      throw Error(Code::invalid_argument, "an NBD stream carries bytes only; the peer sent a hole", "nbd");
    current_ = std::move(item.data);
  }
  const std::size_t n = std::min(out.size(), current_.size() - current_pos_);
  std::memcpy(out.data(), current_.bytes().data() + current_pos_, n);
  current_pos_ += n;
  co_return n;
}

asio::awaitable<void> StreamPipe::flush_staging() {
  if (staged_ == 0) co_return;
  rpc::Buffer out = buffers_ ? buffers_->get(staged_) : rpc::Buffer(staged_);
  std::memcpy(out.data(), staging_.data(), staged_);
  staged_ = 0;
  co_await stream_->write(std::move(out));
}

asio::awaitable<void> StreamPipe::write(std::vector<rpc::Buffer>& buffers) {
  for (auto& b : buffers) {
    if (b.size() >= send_as_is) {
      co_await flush_staging();
      co_await stream_->write(std::move(b));
      continue;
    }
    if (staged_ + b.size() > staging_size) co_await flush_staging();
    if (staging_.size() < staging_size) staging_.resize(staging_size);
    std::memcpy(staging_.data() + staged_, b.data(), b.size());
    staged_ += b.size();
  }
  co_await flush_staging();
  buffers.clear();
}

void StreamPipe::close() {
  if (!stream_->error()) stream_->end();
}

std::string StreamPipe::peer() const { return "ferry stream " + std::to_string(stream_->serial()); }

}  // namespace ferry::nbd
