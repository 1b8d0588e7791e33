// Transports over plain sockets: UNIX (with peer credentials) and TCP.
#pragma once

#include <asio/ip/tcp.hpp>
#include <asio/local/stream_protocol.hpp>

#include <string>

#include "rpc/transport.h"

namespace ferry::rpc {

template <class Protocol>
class SocketTransport final : public Transport {
 public:
  using Socket = typename Protocol::socket;
  explicit SocketTransport(Socket socket);
  ~SocketTransport() override;

  asio::any_io_executor get_executor() override { return socket_.get_executor(); }
  asio::awaitable<IoResult> read_some(asio::mutable_buffer buffer) override;
  asio::awaitable<IoResult> read_some_split(asio::mutable_buffer body, asio::mutable_buffer tail) override;
  asio::awaitable<IoResult> read_exact(asio::mutable_buffer buffer) override;
  asio::awaitable<IoResult> write_all(std::span<const asio::const_buffer> buffers) override;
  asio::awaitable<std::error_code> wait_readable() override;
  void shutdown_send() override;
  void set_buffer_size(int bytes) override;
  void close() override;

  Socket& socket() { return socket_; }

 private:
  Socket socket_;
};

using UnixTransport = SocketTransport<asio::local::stream_protocol>;
using TcpTransport = SocketTransport<asio::ip::tcp>;

extern template class SocketTransport<asio::local::stream_protocol>;
extern template class SocketTransport<asio::ip::tcp>;

// Before a UNIX listener binds `path`: removes a socket left there by a
// server that died (nothing answers on it), creates the parent directory,
// and throws ALREADY_EXISTS if a live server answers there, so that a
// second daemon never steals the first one's socket.
void prepare_unix_listen_path(const std::string& path);

}  // namespace ferry::rpc
