#include "rpc/socket_transport.h"

#include <sys/socket.h>

#include <array>
#include <filesystem>
#include <cstdint>
#include <limits>

#include <asio/connect.hpp>
#include <asio/io_context.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/read.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include "rpc/error.h"
#include "rpc/tls.h"
#if FERRY_HAVE_GRPC
#include "rpc/grpc_transport.h"
#endif

namespace ferry::rpc {

namespace {
constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);

void fill_identity(PeerIdentity& peer, asio::local::stream_protocol::socket& s) {
  peer.transport = "unix";
  struct ucred cred {};
  socklen_t len = sizeof cred;
  if (::getsockopt(s.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
    peer.uid = static_cast<int>(cred.uid);
    peer.gid = static_cast<int>(cred.gid);
    peer.pid = static_cast<int>(cred.pid);
    peer.address = "pid " + std::to_string(cred.pid) + " uid " + std::to_string(cred.uid);
  } else {
    peer.address = "unix peer";
  }
}

void fill_identity(PeerIdentity& peer, asio::ip::tcp::socket& s) {
  peer.transport = "tcp";
  std::error_code ec;
  auto ep = s.remote_endpoint(ec);
  if (!ec) {
    peer.address = ep.address().to_string() + ":" + std::to_string(ep.port());
  } else {
    peer.address = "tcp peer";
  }
  s.set_option(asio::ip::tcp::no_delay(true), ec);
}
}  // namespace

template <class Protocol>
SocketTransport<Protocol>::SocketTransport(Socket socket) : socket_(std::move(socket)) {
  fill_identity(peer_, socket_);
}

template <class Protocol>
SocketTransport<Protocol>::~SocketTransport() {
  std::error_code ec;
  socket_.close(ec);
}

template <class Protocol>
asio::awaitable<IoResult> SocketTransport<Protocol>::read_some(asio::mutable_buffer buffer) {
  auto [ec, n] = co_await socket_.async_read_some(buffer, use_tuple);
  co_return IoResult{ec, n};
}

template <class Protocol>
asio::awaitable<IoResult> SocketTransport<Protocol>::read_some_split(asio::mutable_buffer body,
                                                                      asio::mutable_buffer tail) {
  std::array<asio::mutable_buffer, 2> buffers{body, tail};
  auto [ec, n] = co_await socket_.async_read_some(buffers, use_tuple);
  co_return IoResult{ec, n};
}

template <class Protocol>
asio::awaitable<IoResult> SocketTransport<Protocol>::read_exact(asio::mutable_buffer buffer) {
  auto [ec, n] = co_await asio::async_read(socket_, buffer, use_tuple);
  co_return IoResult{ec, n};
}

template <class Protocol>
asio::awaitable<IoResult> SocketTransport<Protocol>::write_all(std::span<const asio::const_buffer> buffers) {
  // asio::transfer_all() hands the kernel at most 64 KiB per sendmsg; a
  // batch of bulk chunks would then cost four system calls (and as many
  // waits for the peer) per 256 KiB. Offer everything in one writev.
  auto whole_batch = [](const std::error_code& ec, std::size_t) -> std::size_t {
    return ec ? 0 : std::numeric_limits<std::uint32_t>::max();
  };
  auto [ec, n] = co_await asio::async_write(socket_, buffers, whole_batch, use_tuple);
  co_return IoResult{ec, n};
}

template <class Protocol>
asio::awaitable<std::error_code> SocketTransport<Protocol>::wait_readable() {
  auto [ec] = co_await socket_.async_wait(Socket::wait_read, use_tuple);
  co_return ec;
}

template <class Protocol>
void SocketTransport<Protocol>::set_buffer_size(int bytes) {
  if (bytes <= 0) return;
  std::error_code ec;
  socket_.set_option(asio::socket_base::send_buffer_size(bytes), ec);
  socket_.set_option(asio::socket_base::receive_buffer_size(bytes), ec);
}

template <class Protocol>
void SocketTransport<Protocol>::shutdown_send() {
  std::error_code ec;
  socket_.shutdown(Socket::shutdown_send, ec);
}

template <class Protocol>
void SocketTransport<Protocol>::close() {
  std::error_code ec;
  socket_.shutdown(Socket::shutdown_both, ec);
  socket_.close(ec);
}

asio::awaitable<IoResult> Transport::read_exact(asio::mutable_buffer buffer) {
  std::size_t got = 0;
  while (got < buffer.size()) {
    auto [ec, n] = co_await read_some(buffer + got);
    got += n;
    if (ec) co_return IoResult{ec, got};
  }
  co_return IoResult{std::error_code{}, got};
}

template class SocketTransport<asio::local::stream_protocol>;
template class SocketTransport<asio::ip::tcp>;

asio::awaitable<std::unique_ptr<Transport>> connect_transport(asio::any_io_executor executor,
                                                              const Endpoint& endpoint,
                                                              std::shared_ptr<TlsContext> tls,
                                                              std::chrono::milliseconds timeout) {
  auto strand = asio::make_strand(executor);
  if (endpoint.is_grpc()) {
#if FERRY_HAVE_GRPC
    co_return co_await connect_grpc(strand, endpoint, tls ? &tls->options() : nullptr, timeout);
#else
    throw Error(Code::unimplemented, "cannot connect to " + endpoint.to_string() + ": ferry was built without gRPC");
#endif
  }
  if (endpoint.kind == Endpoint::Kind::unix_socket) {
    asio::local::stream_protocol::socket socket(strand);
    auto [ec] = co_await socket.async_connect(asio::local::stream_protocol::endpoint(endpoint.path), use_tuple);
    if (ec)
      throw Error(Code::unavailable, "cannot connect to " + endpoint.to_string() + ": " + ec.message() +
                                         (ec == asio::error::not_found || ec == asio::error::connection_refused
                                              ? " (is ferryd running?)"
                                              : ""));
    co_return std::make_unique<UnixTransport>(std::move(socket));
  }
  asio::ip::tcp::resolver resolver(strand);
  auto [rec, results] = co_await resolver.async_resolve(endpoint.host, std::to_string(endpoint.port), use_tuple);
  if (rec) throw Error(Code::unavailable, "cannot resolve " + endpoint.host + ": " + rec.message());
  asio::ip::tcp::socket socket(strand);
  auto [ec, ep] = co_await asio::async_connect(socket, results, use_tuple);
  if (ec) throw Error(Code::unavailable, "cannot connect to " + endpoint.to_string() + ": " + ec.message());
  if (endpoint.kind == Endpoint::Kind::tls) {
    if (!tls) tls = TlsContext::client(TlsOptions{});
    co_return co_await TlsTransport::connect(std::move(socket), std::move(tls), endpoint.host, timeout);
  }
  co_return std::make_unique<TcpTransport>(std::move(socket));
}

void prepare_unix_listen_path(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_socket(path, ec)) {
    asio::io_context probe_io;
    asio::local::stream_protocol::socket probe(probe_io);
    std::error_code connect_ec;
    probe.connect(asio::local::stream_protocol::endpoint(path), connect_ec);
    if (!connect_ec) throw Error(Code::already_exists, "another server is already listening on " + path);
    fs::remove(path, ec);
  }
  if (auto parent = fs::path(path).parent_path(); !parent.empty()) fs::create_directories(parent, ec);
}

}  // namespace ferry::rpc
