// Pipe: the byte stream an NBD server talks over. A socket (UNIX, TCP) for
// ferryd's plain NBD listener, or a ferry stream (nbd/stream_pipe.h) when
// NBD travels inside a ferry connection. The server reads requests and
// writes replies concurrently: one reader and one writer at a time.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/buffer.hpp>
#include <asio/read.hpp>
#include <asio/redirect_error.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <cstdint>
#include <span>
#include <system_error>
#include <vector>

#include "rpc/buffer.h"
#include "rpc/error.h"

namespace ferry::nbd {

class Pipe {
 public:
  virtual ~Pipe() = default;
  // The executor the server runs its coroutines on (a single-threaded
  // io_context or a strand: the server's own state is not locked).
  virtual asio::any_io_executor get_executor() = 0;
  // Reads at least one and at most out.size() bytes; 0 means the peer ended
  // its output. Throws ferry::Error on failure.
  virtual asio::awaitable<std::size_t> read_some(std::span<std::uint8_t> out) = 0;
  // Writes every buffer, in order. The pipe may take (move out) the
  // buffers: the caller must not use them afterwards. Throws on failure.
  virtual asio::awaitable<void> write(std::vector<rpc::Buffer>& buffers) = 0;
  // Closes both directions; a pending read returns 0 or throws.
  virtual void close() = 0;
  // For logs: "unix socket", "tcp 127.0.0.1:45678", "ferry stream 17".
  virtual std::string peer() const = 0;
};

// A Pipe over an Asio stream socket (asio::local::stream_protocol::socket,
// asio::ip::tcp::socket).
template <class Socket>
class SocketPipe : public Pipe {
 public:
  SocketPipe(Socket socket, std::string peer) : socket_(std::move(socket)), peer_(std::move(peer)) {}
  asio::any_io_executor get_executor() override { return socket_.get_executor(); }
  asio::awaitable<std::size_t> read_some(std::span<std::uint8_t> out) override {
    std::error_code ec;
    const std::size_t n =
        co_await socket_.async_read_some(asio::buffer(out.data(), out.size()), asio::redirect_error(asio::use_awaitable, ec));
    if (ec == asio::error::eof) co_return 0;
    if (ec) throw Error(Code::unavailable, "reading from " + peer_ + ": " + ec.message(), "nbd");
    co_return n;
  }
  asio::awaitable<void> write(std::vector<rpc::Buffer>& buffers) override {
    gather_.clear();
    for (const auto& b : buffers) gather_.emplace_back(b.data(), b.size());
    std::error_code ec;
    co_await asio::async_write(socket_, gather_, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) throw Error(Code::unavailable, "writing to " + peer_ + ": " + ec.message(), "nbd");
  }
  void close() override {
    std::error_code ignored;
    socket_.shutdown(Socket::shutdown_both, ignored);
    socket_.close(ignored);
  }
  std::string peer() const override { return peer_; }
  Socket& socket() { return socket_; }

 private:
  Socket socket_;
  std::string peer_;
  std::vector<asio::const_buffer> gather_;
};

}  // namespace ferry::nbd
