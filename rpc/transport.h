// Byte transports: a duplex pipe that also says who is at the other end.
//
// A Transport is owned by one Connection and used only from that
// connection's strand: one read and one write may be outstanding at the same
// time (full duplex), never two of the same kind. Security layers (TLS, SASL)
// wrap a Transport and return one with a fuller identity.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/buffer.hpp>
#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <tuple>

#include "rpc/endpoint.h"

namespace ferry::rpc {

struct PeerIdentity {
  std::string transport;  // "unix", "tcp", "tls"
  std::string address;    // remote address, for logs
  // UNIX sockets: SO_PEERCRED of the process that connected.
  std::optional<int> uid;
  std::optional<int> gid;
  std::optional<int> pid;
  // TLS: the session and the peer's certificate (if it showed one).
  std::string tls_version;      // "TLSv1.3"
  std::string tls_cipher;       // "TLS_AES_256_GCM_SHA384"
  int tls_bits = 0;             // symmetric key strength, the SSF TLS gives SASL
  std::string tls_subject;      // RFC 2253, "CN=client1,O=ferry tests"
  std::string tls_fingerprint;  // SHA-256 of the certificate, hex
  // SASL: who authenticated, how, and the strength of its security layer
  // (0: none; the transport's own protection applies).
  std::string user;
  std::string mechanism;
  unsigned ssf = 0;
};

using IoResult = std::tuple<std::error_code, std::size_t>;

class Transport {
 public:
  virtual ~Transport() = default;
  Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  // The strand every operation of this transport runs on.
  virtual asio::any_io_executor get_executor() = 0;

  // Reads at least one byte. EOF, reset and cancellation come back as values.
  virtual asio::awaitable<IoResult> read_some(asio::mutable_buffer buffer) = 0;
  // Reads at least one byte into `body`, and whatever else is waiting into
  // `tail` (one readv where the transport can): the rest of a large frame
  // goes straight where it belongs while the next frame's prefix still
  // arrives with it. The default reads into `body` alone.
  virtual asio::awaitable<IoResult> read_some_split(asio::mutable_buffer body, asio::mutable_buffer tail) {
    (void)tail;
    return read_some(body);
  }
  // Reads exactly buffer.size() bytes unless an error comes first. The
  // default loops on read_some.
  virtual asio::awaitable<IoResult> read_exact(asio::mutable_buffer buffer);
  // Writes every byte of the gathered buffers (one writev where it can).
  virtual asio::awaitable<IoResult> write_all(std::span<const asio::const_buffer> buffers) = 0;
  // Waits until a read would not block (used by the half-duplex mode only).
  virtual asio::awaitable<std::error_code> wait_readable() = 0;
  // Sets the kernel's send and receive buffer sizes (SO_SNDBUF/SO_RCVBUF);
  // 0 leaves the kernel's autotuning alone. Best effort.
  virtual void set_buffer_size(int bytes) { (void)bytes; }
  // Ends our sending direction (the peer reads EOF) while still reading.
  virtual void shutdown_send() = 0;
  // Cancels outstanding operations and closes; safe to repeat.
  virtual void close() = 0;

  const PeerIdentity& peer() const { return peer_; }

 protected:
  PeerIdentity peer_;
};

class TlsContext;

// Connects to `endpoint` on a new strand of `executor`; a tls: endpoint
// also runs the TLS handshake with `tls` (the system's CAs when null).
// Throws ferry::Error: UNAVAILABLE with the address and the system's
// reason, UNAUTHENTICATED when the server's certificate is refused.
asio::awaitable<std::unique_ptr<Transport>> connect_transport(
    asio::any_io_executor executor, const Endpoint& endpoint, std::shared_ptr<TlsContext> tls = nullptr,
    std::chrono::milliseconds timeout = std::chrono::seconds(10));

}  // namespace ferry::rpc
