// TLS (OpenSSL) under the frame codec.
//
// A TlsTransport is a Transport over a TCP socket with an OpenSSL session on
// its file descriptor: the socket is non-blocking, SSL_read/SSL_write run on
// the connection's strand and, when OpenSSL wants the socket, the coroutine
// waits for readiness through Asio's reactor. The reader and the writer use
// the one SSL object in turn (the strand is single-threaded at any moment),
// so a connection stays full duplex over TLS.
//
// Records: writes are gathered into full 16 KiB records (small frames are
// coalesced into one record, large bodies are handed to SSL_write whole),
// reads use OpenSSL's read-ahead with a 64 KiB buffer so one recv brings
// several records.
//
// Contexts: a TlsContext is an SSL_CTX made from a TlsOptions. A server
// keeps the current one behind a shared_ptr and swaps it on reload (SIGHUP):
// sessions already made keep the context they started with, new ones get
// the new certificate.
#pragma once

#include <asio/ip/tcp.hpp>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "rpc/transport.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace ferry::rpc {

struct TlsOptions {
  std::string ca_file;    // PEM CAs to trust; empty: the system's store (client) / none (server)
  std::string cert_file;  // PEM certificate, optionally followed by its chain
  std::string key_file;   // PEM private key
  // Client: verify the server's certificate and name (leave on outside tests).
  // Server: ask every client for a certificate and refuse those without a
  // valid one (needs ca_file).
  bool verify_peer = true;
  // Server: glob patterns (fnmatch) a client certificate's subject must
  // match, as printed by `openssl x509 -noout -subject -nameopt RFC2253`,
  // e.g. "CN=*,O=ferry tests". Empty: any certificate the CA signed.
  std::vector<std::string> allowed_dn;
  // Client: the name the server's certificate must carry (and SNI); empty:
  // the host of the address connected to.
  std::string server_name;
  std::string min_version = "1.3";  // "1.2" or "1.3"
  std::string max_version;          // "1.2", "1.3" or empty (the newest OpenSSL has)
  std::string ciphersuites;         // TLS 1.3 suites; empty: OpenSSL's defaults
  std::string cipher_list;          // TLS 1.2 ciphers; empty: OpenSSL's defaults
};

class TlsContext {
 public:
  // Load certificates and keys now; throw ferry::Error (INVALID_ARGUMENT)
  // naming the file and OpenSSL's reason.
  static std::shared_ptr<TlsContext> server(const TlsOptions& options);
  static std::shared_ptr<TlsContext> client(const TlsOptions& options);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  SSL_CTX* native() const { return ctx_; }
  const TlsOptions& options() const { return options_; }
  bool is_server() const { return server_; }
  // SHA-256 of our own certificate (hex), for logs and reload checks.
  const std::string& fingerprint() const { return fingerprint_; }

 private:
  TlsContext(const TlsOptions& options, bool server);
  SSL_CTX* ctx_ = nullptr;
  TlsOptions options_;
  bool server_;
  std::string fingerprint_;
};

// Does `subject` (RFC 2253) match one of the glob patterns? Empty list: yes.
bool dn_allowed(const std::string& subject, const std::vector<std::string>& patterns);

class TlsTransport final : public Transport {
 public:
  // Runs the server side of the handshake on an accepted socket. Throws
  // ferry::Error (UNAUTHENTICATED for certificate problems, UNAVAILABLE for
  // a peer that hung up or spoke something else, DEADLINE_EXCEEDED when
  // `timeout` passes first).
  static asio::awaitable<std::unique_ptr<Transport>> accept(asio::ip::tcp::socket socket,
                                                            std::shared_ptr<TlsContext> context,
                                                            std::chrono::milliseconds timeout);
  // Client side: verifies the server's certificate against `host` (or
  // options().server_name).
  static asio::awaitable<std::unique_ptr<Transport>> connect(asio::ip::tcp::socket socket,
                                                             std::shared_ptr<TlsContext> context,
                                                             const std::string& host,
                                                             std::chrono::milliseconds timeout);
  ~TlsTransport() override;

  asio::any_io_executor get_executor() override { return socket_.get_executor(); }
  asio::awaitable<IoResult> read_some(asio::mutable_buffer buffer) override;
  asio::awaitable<IoResult> write_all(std::span<const asio::const_buffer> buffers) override;
  asio::awaitable<std::error_code> wait_readable() override;
  void set_buffer_size(int bytes) override;
  void shutdown_send() override;
  void close() override;

 private:
  TlsTransport(asio::ip::tcp::socket socket, std::shared_ptr<TlsContext> context);
  asio::awaitable<std::error_code> handshake(std::chrono::milliseconds timeout, std::string& why);
  // Writes exactly `size` bytes through SSL_write_ex, waiting as OpenSSL asks.
  asio::awaitable<std::error_code> write_bytes(const std::uint8_t* data, std::size_t size);
  // SSL_get_error's answer turned into "wait for this" or a final error.
  asio::awaitable<std::error_code> wait_for(int ssl_error, int ret);
  void fill_identity();

  asio::ip::tcp::socket socket_;
  std::shared_ptr<TlsContext> context_;
  SSL* ssl_ = nullptr;
  std::vector<std::uint8_t> stage_;  // small frames gathered into one record
  bool sent_close_notify_ = false;
  std::error_code read_error_;  // met after bytes already returned; the next read_some says it
};

// The error category of TLS failures (OpenSSL's reason strings).
const std::error_category& tls_category();

}  // namespace ferry::rpc
