// StreamPipe: a Pipe over a ferry stream, so the NBD server can run on the
// daemon side of an Nbd.Connect stream (proto/ferry/v1/nbd.proto) exactly
// as it runs on a socket.
//
// Reading copies out of the received chunks (each chunk is released, and
// its credit returned, as soon as it has been consumed). Writing sends
// large buffers (READ payloads) as they are, without a copy, and gathers
// the small ones (reply headers, block status) into one chunk, so a burst
// of replies costs a few frames, not one frame per header.
#pragma once

#include <memory>

#include "nbd/pipe.h"
#include "stream/stream.h"

namespace ferry::nbd {

class StreamPipe : public Pipe {
 public:
  StreamPipe(std::shared_ptr<stream::Stream> stream, asio::any_io_executor ex,
             std::shared_ptr<rpc::BufferPool> buffers = nullptr);
  asio::any_io_executor get_executor() override { return ex_; }
  asio::awaitable<std::size_t> read_some(std::span<std::uint8_t> out) override;
  asio::awaitable<void> write(std::vector<rpc::Buffer>& buffers) override;
  // Ends our side of the stream (the NBD session is over).
  void close() override;
  std::string peer() const override;

 private:
  asio::awaitable<void> flush_staging();

  std::shared_ptr<stream::Stream> stream_;
  asio::any_io_executor ex_;
  std::shared_ptr<rpc::BufferPool> buffers_;
  stream::Chunk current_;
  std::size_t current_pos_ = 0;
  bool ended_ = false;
  std::vector<std::uint8_t> staging_;
  std::size_t staged_ = 0;
};

}  // namespace ferry::nbd
