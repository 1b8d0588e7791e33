#include "rpc/tls.h"

#include <fnmatch.h>
#include <sys/socket.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <cstring>

#include "rpc/error.h"

namespace ferry::rpc {

namespace {

constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);
// The largest TLS record payload: gathering writes into records of this
// size makes ferry's records the same as any bulk TLS writer's.
constexpr std::size_t record_size = 16384;
// One recv brings up to this much ciphertext (several records) into
// OpenSSL's buffer.
constexpr std::size_t read_ahead_bytes = 64 * 1024;

class TlsCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "tls"; }
  std::string message(int value) const override {
    const auto code = static_cast<unsigned long>(value);
    const char* reason = ERR_reason_error_string(code);
    std::string text = reason ? reason : "TLS error " + std::to_string(value);
    // The alerts a misconfigured client meets first, in words it can act on.
    switch (ERR_GET_REASON(code)) {
      case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
        return text + " (the server requires a client certificate: give one with its key)";
      case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
        return text + " (the server does not trust the CA that signed our certificate)";
      case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
        return text + " (the server says our certificate has expired)";
      case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
      case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
        return text + " (the server refused our certificate)";
      case SSL_R_WRONG_VERSION_NUMBER:
        return text + " (the peer does not speak TLS here)";
      default:
        return text;
    }
  }
};

// The newest queued OpenSSL error as an error_code, and the queue cleared.
std::error_code last_tls_error() {
  unsigned long e = ERR_peek_last_error();
  ERR_clear_error();
  if (ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) == SSL_R_UNEXPECTED_EOF_WHILE_READING)
    return asio::error::eof;  // the peer hung up without close_notify
  if (e == 0) return std::error_code(EPROTO, std::generic_category());
  return std::error_code(static_cast<int>(ERR_PACK(ERR_GET_LIB(e), 0, ERR_GET_REASON(e))), tls_category());
}

std::string openssl_reason(const std::string& fallback) {
  unsigned long e = ERR_peek_last_error();
  ERR_clear_error();
  if (e == 0) return fallback;
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  // "error:0A000086:SSL routines::certificate verify failed" -> the reason.
  const char* reason = ERR_reason_error_string(e);
  return reason ? reason : buf;
}

struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
using X509Ptr = std::unique_ptr<X509, X509Deleter>;

std::string subject_of(X509* cert) {
  BIO* bio = BIO_new(BIO_s_mem());
  if (!bio) return {};
  X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  std::string out(data, static_cast<std::size_t>(n > 0 ? n : 0));
  BIO_free(bio);
  return out;
}

std::string fingerprint_of(X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(cert, EVP_sha256(), md, &len) != 1) return {};
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

// A socket BIO that sends with MSG_NOSIGNAL. OpenSSL's own socket BIO uses
// write(), and a peer that has gone away would kill the whole process with
// SIGPIPE; a library must not do that to the program embedding it.
int bio_write(BIO* bio, const char* data, int len) {
  const int fd = static_cast<int>(reinterpret_cast<std::intptr_t>(BIO_get_data(bio)));
  BIO_clear_retry_flags(bio);
  if (fd < 0) {
    errno = EBADF;  // closed: never touch a descriptor number that may be reused
    return -1;
  }
  const ssize_t n = ::send(fd, data, static_cast<std::size_t>(len), MSG_NOSIGNAL);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(bio);
  return static_cast<int>(n);
}

int bio_read(BIO* bio, char* data, int len) {
  const int fd = static_cast<int>(reinterpret_cast<std::intptr_t>(BIO_get_data(bio)));
  BIO_clear_retry_flags(bio);
  if (fd < 0) {
    errno = EBADF;
    return -1;
  }
  const ssize_t n = ::recv(fd, data, static_cast<std::size_t>(len), 0);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_read(bio);
  return static_cast<int>(n);
}

long bio_ctrl(BIO* bio, int cmd, long, void* ptr) {
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      return 1;
    case BIO_C_GET_FD:
      if (ptr) *static_cast<int*>(ptr) = static_cast<int>(reinterpret_cast<std::intptr_t>(BIO_get_data(bio)));
      return static_cast<long>(reinterpret_cast<std::intptr_t>(BIO_get_data(bio)));
    default:
      return 0;
  }
}

BIO_METHOD* nosignal_socket_method() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR, "ferry socket");
    BIO_meth_set_write(m, bio_write);
    BIO_meth_set_read(m, bio_read);
    BIO_meth_set_ctrl(m, bio_ctrl);
    BIO_meth_set_create(m, [](BIO* b) {
      BIO_set_init(b, 1);
      return 1;
    });
    return m;
  }();
  return method;
}

Error config_error(const std::string& what, const std::string& file) {
  return Error(Code::invalid_argument, what + " '" + file + "': " + openssl_reason("unknown OpenSSL error"), "tls");
}

bool is_ip_literal(const std::string& host) {
  std::error_code ec;
  asio::ip::make_address(host, ec);
  return !ec;
}

}  // namespace

const std::error_category& tls_category() {
  static const TlsCategory category;
  return category;
}

bool dn_allowed(const std::string& subject, const std::vector<std::string>& patterns) {
  if (patterns.empty()) return true;
  for (const auto& p : patterns)
    if (::fnmatch(p.c_str(), subject.c_str(), 0) == 0) return true;
  return false;
}

// ---- TlsContext ----

TlsContext::TlsContext(const TlsOptions& options, bool server) : options_(options), server_(server) {
  ctx_ = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (!ctx_) throw Error(Code::internal, "SSL_CTX_new failed: " + openssl_reason("out of memory"), "tls");
  auto version = [](const std::string& text, int fallback) {
    if (text.empty()) return fallback;
    if (text == "1.2") return TLS1_2_VERSION;
    if (text == "1.3") return TLS1_3_VERSION;
    throw Error(Code::invalid_argument, "TLS version '" + text + "' is not supported (use 1.2 or 1.3)", "tls");
  };
  SSL_CTX_set_min_proto_version(ctx_, version(options.min_version, TLS1_3_VERSION));
  SSL_CTX_set_max_proto_version(ctx_, version(options.max_version, 0));
  SSL_CTX_set_options(ctx_, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
  SSL_CTX_set_mode(ctx_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_read_ahead(ctx_, 1);
  SSL_CTX_set_default_read_buffer_len(ctx_, read_ahead_bytes);
  if (!options.ciphersuites.empty() && SSL_CTX_set_ciphersuites(ctx_, options.ciphersuites.c_str()) != 1)
    throw config_error("bad TLS 1.3 ciphersuites", options.ciphersuites);
  if (!options.cipher_list.empty() && SSL_CTX_set_cipher_list(ctx_, options.cipher_list.c_str()) != 1)
    throw config_error("bad TLS 1.2 cipher list", options.cipher_list);

  if (!options.cert_file.empty()) {
    if (SSL_CTX_use_certificate_chain_file(ctx_, options.cert_file.c_str()) != 1)
      throw config_error("cannot load certificate", options.cert_file);
    const std::string& key = options.key_file.empty() ? options.cert_file : options.key_file;
    if (SSL_CTX_use_PrivateKey_file(ctx_, key.c_str(), SSL_FILETYPE_PEM) != 1)
      throw config_error("cannot load private key", key);
    if (SSL_CTX_check_private_key(ctx_) != 1)
      throw config_error("private key does not match the certificate", options.cert_file);
    if (X509* own = SSL_CTX_get0_certificate(ctx_)) fingerprint_ = fingerprint_of(own);
  } else if (server) {
    throw Error(Code::invalid_argument, "a TLS listener needs a certificate and key (tls cert_file/key_file)", "tls");
  }

  if (!options.ca_file.empty()) {
    if (SSL_CTX_load_verify_locations(ctx_, options.ca_file.c_str(), nullptr) != 1)
      throw config_error("cannot load CA certificates", options.ca_file);
  } else if (!server) {
    SSL_CTX_set_default_verify_paths(ctx_);
  }

  if (server) {
    // Sessions must not be resumed across contexts that verify differently.
    static const unsigned char sid[] = "ferryd";
    SSL_CTX_set_session_id_context(ctx_, sid, sizeof sid - 1);
    if (options.verify_peer) {
      if (options.ca_file.empty())
        throw Error(Code::invalid_argument,
                    "requiring client certificates needs a CA file to check them against (tls ca_file)", "tls");
      SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
      if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(options.ca_file.c_str()))
        SSL_CTX_set_client_CA_list(ctx_, names);
    } else {
      SSL_CTX_set_verify(ctx_, SSL_VERIFY_NONE, nullptr);
    }
  } else {
    SSL_CTX_set_verify(ctx_, options.verify_peer ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, nullptr);
  }
}

TlsContext::~TlsContext() { SSL_CTX_free(ctx_); }

std::shared_ptr<TlsContext> TlsContext::server(const TlsOptions& options) {
  return std::shared_ptr<TlsContext>(new TlsContext(options, true));
}

std::shared_ptr<TlsContext> TlsContext::client(const TlsOptions& options) {
  return std::shared_ptr<TlsContext>(new TlsContext(options, false));
}

// ---- TlsTransport ----

TlsTransport::TlsTransport(asio::ip::tcp::socket socket, std::shared_ptr<TlsContext> context)
    : socket_(std::move(socket)), context_(std::move(context)) {
  std::error_code ec;
  socket_.set_option(asio::ip::tcp::no_delay(true), ec);
  socket_.non_blocking(true, ec);
  socket_.native_non_blocking(true, ec);
  ssl_ = SSL_new(context_->native());
  if (!ssl_) throw Error(Code::internal, "SSL_new failed: " + openssl_reason("out of memory"), "tls");
  BIO* bio = BIO_new(nosignal_socket_method());
  if (!bio) throw Error(Code::internal, "BIO_new failed: " + openssl_reason("out of memory"), "tls");
  BIO_set_data(bio, reinterpret_cast<void*>(static_cast<std::intptr_t>(socket_.native_handle())));
  SSL_set_bio(ssl_, bio, bio);  // the SSL owns it; the socket stays ours
  stage_.reserve(record_size);
  peer_.transport = "tls";
  auto ep = socket_.remote_endpoint(ec);
  peer_.address = ec ? "tls peer" : ep.address().to_string() + ":" + std::to_string(ep.port());
}

TlsTransport::~TlsTransport() {
  if (BIO* bio = SSL_get_rbio(ssl_)) BIO_set_data(bio, reinterpret_cast<void*>(std::intptr_t{-1}));
  SSL_free(ssl_);
  std::error_code ec;
  socket_.close(ec);
}

void TlsTransport::fill_identity() {
  peer_.tls_version = SSL_get_version(ssl_);
  peer_.tls_cipher = SSL_get_cipher_name(ssl_);
  peer_.tls_bits = SSL_get_cipher_bits(ssl_, nullptr);
  if (X509Ptr cert{SSL_get1_peer_certificate(ssl_)}) {
    peer_.tls_subject = subject_of(cert.get());
    peer_.tls_fingerprint = fingerprint_of(cert.get());
  }
}

asio::awaitable<std::error_code> TlsTransport::wait_for(int ssl_error, int ret) {
  switch (ssl_error) {
    case SSL_ERROR_WANT_READ: {
      ERR_clear_error();
      auto [ec] = co_await socket_.async_wait(asio::ip::tcp::socket::wait_read, use_tuple);
      co_return ec;
    }
    case SSL_ERROR_WANT_WRITE: {
      ERR_clear_error();
      auto [ec] = co_await socket_.async_wait(asio::ip::tcp::socket::wait_write, use_tuple);
      co_return ec;
    }
    case SSL_ERROR_ZERO_RETURN:
      ERR_clear_error();
      co_return asio::error::eof;
    case SSL_ERROR_SYSCALL:
      if (ERR_peek_last_error() == 0) {
        ERR_clear_error();
        const int err = errno;
        co_return ret == 0 || err == 0 ? std::error_code(asio::error::eof)
                                       : std::error_code(err, std::system_category());
      }
      co_return last_tls_error();
    default:
      co_return last_tls_error();
  }
}

asio::awaitable<std::error_code> TlsTransport::handshake(std::chrono::milliseconds timeout, std::string& why) {
  using namespace asio::experimental::awaitable_operators;
  asio::steady_timer deadline(socket_.get_executor(), timeout);
  for (;;) {
    ERR_clear_error();
    const int r = SSL_do_handshake(ssl_);
    if (r == 1) break;
    const int err = SSL_get_error(ssl_, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      ERR_clear_error();
      const auto what = err == SSL_ERROR_WANT_READ ? asio::ip::tcp::socket::wait_read
                                                   : asio::ip::tcp::socket::wait_write;
      auto which = co_await (socket_.async_wait(what, use_tuple) || deadline.async_wait(use_tuple));
      if (which.index() == 1) {
        why = "TLS handshake not finished within " + std::to_string(timeout.count()) + " ms";
        co_return asio::error::timed_out;
      }
      auto [ec] = std::get<0>(which);
      if (ec) {
        why = ec.message();
        co_return ec;
      }
      continue;
    }
    const long verify = SSL_get_verify_result(ssl_);
    std::error_code ec = co_await wait_for(err, r);
    if (verify != X509_V_OK) {
      why = std::string("certificate verify failed: ") + X509_verify_cert_error_string(verify);
      co_return std::error_code(EACCES, std::generic_category());
    }
    why = ec == asio::error::eof ? std::string("connection closed by the peer during the TLS handshake")
                                 : ec.message();
    co_return ec ? ec : std::error_code(EPROTO, std::generic_category());
  }
  fill_identity();
  co_return std::error_code{};
}

asio::awaitable<std::unique_ptr<Transport>> TlsTransport::accept(asio::ip::tcp::socket socket,
                                                                 std::shared_ptr<TlsContext> context,
                                                                 std::chrono::milliseconds timeout) {
  std::unique_ptr<TlsTransport> t(new TlsTransport(std::move(socket), std::move(context)));
  SSL_set_accept_state(t->ssl_);
  std::string why;
  auto ec = co_await asio::co_spawn(t->socket_.get_executor(), t->handshake(timeout, why), asio::use_awaitable);
  if (ec) {
    const Code code = ec == asio::error::timed_out ? Code::deadline_exceeded
                      : ec.value() == EACCES && ec.category() == std::generic_category() ? Code::unauthenticated
                                                                                        : Code::unavailable;
    throw Error(code, "TLS handshake with " + t->peer_.address + " failed: " + why, "tls");
  }
  co_return t;
}

asio::awaitable<std::unique_ptr<Transport>> TlsTransport::connect(asio::ip::tcp::socket socket,
                                                                  std::shared_ptr<TlsContext> context,
                                                                  const std::string& host,
                                                                  std::chrono::milliseconds timeout) {
  std::unique_ptr<TlsTransport> t(new TlsTransport(std::move(socket), context));
  const std::string name = context->options().server_name.empty() ? host : context->options().server_name;
  if (context->options().verify_peer) {
    if (is_ip_literal(name)) {
      X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl_), name.c_str());
    } else {
      SSL_set1_host(t->ssl_, name.c_str());
    }
  }
  if (!is_ip_literal(name)) SSL_set_tlsext_host_name(t->ssl_, name.c_str());
  SSL_set_connect_state(t->ssl_);
  std::string why;
  // On the socket's strand: the caller's executor may be a multi-threaded
  // pool, and the two waits raced in handshake() (socket || deadline) must
  // not complete on two threads at once.
  auto ec = co_await asio::co_spawn(t->socket_.get_executor(), t->handshake(timeout, why), asio::use_awaitable);
  if (ec) {
    if (SSL_get_verify_result(t->ssl_) == X509_V_ERR_HOSTNAME_MISMATCH ||
        SSL_get_verify_result(t->ssl_) == X509_V_ERR_IP_ADDRESS_MISMATCH)
      why += " (the server's certificate is not for '" + name + "')";
    const Code code = ec == asio::error::timed_out ? Code::deadline_exceeded
                      : ec.value() == EACCES && ec.category() == std::generic_category() ? Code::unauthenticated
                                                                                        : Code::unavailable;
    throw Error(code, "TLS handshake with " + t->peer_.address + " failed: " + why, "tls");
  }
  co_return t;
}

asio::awaitable<IoResult> TlsTransport::read_some(asio::mutable_buffer buffer) {
  auto* data = static_cast<std::uint8_t*>(buffer.data());
  const std::size_t size = buffer.size();
  if (read_error_) co_return IoResult{std::exchange(read_error_, {}), 0};
  for (;;) {
    ERR_clear_error();
    std::size_t n = 0;
    const int r = SSL_read_ex(ssl_, data, size, &n);
    if (r == 1) {
      // Hand over what OpenSSL already holds (decrypted, or read ahead)
      // without asking the socket again.
      std::size_t total = n;
      while (total < size && SSL_has_pending(ssl_)) {
        std::size_t m = 0;
        const int more = SSL_read_ex(ssl_, data + total, size - total, &m);
        if (more != 1) {
          const int why = SSL_get_error(ssl_, more);
          if (why == SSL_ERROR_WANT_READ || why == SSL_ERROR_WANT_WRITE) {
            ERR_clear_error();  // a partial record; the next read waits for it
          } else {
            // A record that failed (a bad MAC: bytes damaged on the way)
            // or the peer's close: said by the next read, after these bytes.
            // After a fatal error OpenSSL only answers "shut down", so the
            // reason must be kept now.
            read_error_ = why == SSL_ERROR_ZERO_RETURN ? std::error_code(asio::error::eof) : last_tls_error();
          }
          break;
        }
        total += m;
      }
      co_return IoResult{std::error_code{}, total};
    }
    auto ec = co_await wait_for(SSL_get_error(ssl_, r), r);
    if (ec) co_return IoResult{ec, 0};
  }
}

asio::awaitable<std::error_code> TlsTransport::write_bytes(const std::uint8_t* data, std::size_t size) {
  while (size > 0) {
    ERR_clear_error();
    std::size_t n = 0;
    const int r = SSL_write_ex(ssl_, data, size, &n);
    if (r == 1) {
      data += n;
      size -= n;
      continue;
    }
    auto ec = co_await wait_for(SSL_get_error(ssl_, r), r);
    if (ec) co_return ec;
  }
  co_return std::error_code{};
}

asio::awaitable<IoResult> TlsTransport::write_all(std::span<const asio::const_buffer> buffers) {
  // Small pieces (frame prefixes, replies) are gathered into the stage until
  // it holds a full record; a large body goes to SSL_write directly in
  // whole records once the stage is empty. Every record but the batch's
  // last is full, which costs at most one 16 KiB copy per large body.
  std::size_t total = 0;
  for (const auto& b : buffers) {
    auto* p = static_cast<const std::uint8_t*>(b.data());
    std::size_t n = b.size();
    total += n;
    while (n > 0) {
      if (stage_.empty() && n >= record_size) {
        const std::size_t direct = n - n % record_size;
        if (auto ec = co_await write_bytes(p, direct)) co_return IoResult{ec, 0};
        p += direct;
        n -= direct;
        continue;
      }
      const std::size_t take = std::min(n, record_size - stage_.size());
      stage_.insert(stage_.end(), p, p + take);
      p += take;
      n -= take;
      if (stage_.size() == record_size) {
        auto ec = co_await write_bytes(stage_.data(), stage_.size());
        stage_.clear();
        if (ec) co_return IoResult{ec, 0};
      }
    }
  }
  if (!stage_.empty()) {
    auto ec = co_await write_bytes(stage_.data(), stage_.size());
    stage_.clear();
    if (ec) co_return IoResult{ec, 0};
  }
  co_return IoResult{std::error_code{}, total};
}

asio::awaitable<std::error_code> TlsTransport::wait_readable() {
  if (SSL_has_pending(ssl_)) co_return std::error_code{};
  auto [ec] = co_await socket_.async_wait(asio::ip::tcp::socket::wait_read, use_tuple);
  co_return ec;
}

void TlsTransport::set_buffer_size(int bytes) {
  if (bytes <= 0) return;
  std::error_code ec;
  socket_.set_option(asio::socket_base::send_buffer_size(bytes), ec);
  socket_.set_option(asio::socket_base::receive_buffer_size(bytes), ec);
}

void TlsTransport::shutdown_send() {
  if (!sent_close_notify_) {
    sent_close_notify_ = true;
    ERR_clear_error();
    SSL_shutdown(ssl_);  // best effort: one close_notify record, never waits
    ERR_clear_error();
  }
  std::error_code ec;
  socket_.shutdown(asio::ip::tcp::socket::shutdown_send, ec);
}

void TlsTransport::close() {
  // From here on OpenSSL sees a dead descriptor, whatever number the
  // kernel hands out next.
  if (BIO* bio = SSL_get_rbio(ssl_)) BIO_set_data(bio, reinterpret_cast<void*>(std::intptr_t{-1}));
  std::error_code ec;
  socket_.shutdown(asio::ip::tcp::socket::shutdown_both, ec);
  socket_.close(ec);
}

}  // namespace ferry::rpc
