// Raw OpenSSL TLS baselines: what a hand-written TLS 1.3 program moves
// with blocking sockets and no framework, with the settings ferry uses
// (the same ciphersuite, read-ahead with a 64 KiB buffer, 256 KiB bodies
// with a 28-byte header, so the same records cross the wire).
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <csignal>
#include <algorithm>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "bench/baselines.h"
#include "bench/harness.h"
#include "tests/material/tls_material.h"

namespace ferry::bench {

namespace {

constexpr std::size_t read_ahead_bytes = 64 * 1024;

std::string ssl_error(const std::string& what) {
  char buf[256] = "unknown";
  if (unsigned long e = ERR_get_error()) ERR_error_string_n(e, buf, sizeof buf);
  return what + ": " + buf;
}

struct CtxFree {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
struct SslFree {
  void operator()(SSL* s) const { SSL_free(s); }
};
using Ctx = std::unique_ptr<SSL_CTX, CtxFree>;
using Ssl = std::unique_ptr<SSL, SslFree>;

Ctx make_ctx(bool server, const std::string& cert, const std::string& key, const std::string& ca) {
  Ctx ctx(SSL_CTX_new(server ? TLS_server_method() : TLS_client_method()));
  if (!ctx) throw std::runtime_error(ssl_error("SSL_CTX_new"));
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_3_VERSION);
  SSL_CTX_set_ciphersuites(ctx.get(), tls_ciphersuite);
  SSL_CTX_set_read_ahead(ctx.get(), 1);
  SSL_CTX_set_default_read_buffer_len(ctx.get(), read_ahead_bytes);
  if (server) {
    if (SSL_CTX_use_certificate_chain_file(ctx.get(), cert.c_str()) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx.get(), key.c_str(), SSL_FILETYPE_PEM) != 1)
      throw std::runtime_error(ssl_error("loading " + cert));
  } else {
    if (SSL_CTX_load_verify_locations(ctx.get(), ca.c_str(), nullptr) != 1)
      throw std::runtime_error(ssl_error("loading " + ca));
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  }
  return ctx;
}

bool ssl_read_exact(SSL* ssl, unsigned char* p, std::size_t n) {
  while (n > 0) {
    std::size_t got = 0;
    if (SSL_read_ex(ssl, p, n, &got) != 1) return false;
    p += got;
    n -= got;
  }
  return true;
}

void ssl_write_all(SSL* ssl, const unsigned char* p, std::size_t n) {
  while (n > 0) {
    std::size_t put = 0;
    if (SSL_write_ex(ssl, p, n, &put) != 1) throw std::runtime_error(ssl_error("SSL_write"));
    p += put;
    n -= put;
  }
}

// One TLS connection on the server side: handshake, then `serve`.
template <class Serve>
int serve_tls_forever(const std::string& listen, const std::string& cert, const std::string& key, Serve serve) {
  Ctx ctx = make_ctx(true, cert, key, {});
  Address address = Address::parse(listen);
  Fd listener = listen_on(address);
  signal_ready(address.str());
  SSL_CTX* raw = ctx.get();
  for (;;) {
    Fd fd = accept_from(listener.get());
    std::thread([raw, serve, fd = std::move(fd)]() mutable {
      Ssl ssl(SSL_new(raw));
      SSL_set_fd(ssl.get(), fd.get());
      if (SSL_accept(ssl.get()) != 1) return;
      try {
        serve(ssl.get());
      } catch (const std::exception&) {
        // A client that vanished ends only its own connection.
      }
      SSL_shutdown(ssl.get());
    }).detach();
  }
}

// Client side: connects and handshakes, verifying the server as ferry does.
struct TlsClient {
  TlsClient(SSL_CTX* ctx, const std::string& address) : fd(connect_to(Address::parse(address))), ssl(SSL_new(ctx)) {
    SSL_set_fd(ssl.get(), fd.get());
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl.get()), "127.0.0.1");
    if (SSL_connect(ssl.get()) != 1) throw std::runtime_error(ssl_error("SSL_connect"));
  }
  Fd fd;
  Ssl ssl;
};

struct Material {
  ScratchDir dir;
  testing::TlsMaterial tls = testing::make_tls_material(dir.path().string());
};

}  // namespace

int serve_tls(const std::string& listen, const std::string& cert, const std::string& key, bool source) {
  // OpenSSL writes with write(): a close_notify to a client that has gone
  // must not kill the server.
  ::signal(SIGPIPE, SIG_IGN);
  if (!source) {
    // Sink: an 8-byte total, then that many bytes, then a 1-byte ack.
    return serve_tls_forever(listen, cert, key, [](SSL* ssl) {
      std::vector<unsigned char> buf(body_chunk_bytes);
      for (;;) {
        unsigned char head[8];
        if (!ssl_read_exact(ssl, head, sizeof head)) return;
        uint64_t left = get_be64(head);
        while (left > 0) {
          std::size_t got = 0;
          if (SSL_read_ex(ssl, buf.data(), std::min<uint64_t>(left, buf.size()), &got) != 1) return;
          left -= got;
        }
        unsigned char ack = 1;
        ssl_write_all(ssl, &ack, 1);
      }
    });
  }
  // Source: an 8-byte total, then 256 KiB bodies with a 28-byte header.
  return serve_tls_forever(listen, cert, key, [](SSL* ssl) {
    std::vector<unsigned char> frame(frame_overhead_bytes + body_chunk_bytes);
    for (std::size_t i = 0; i < frame.size(); ++i) frame[i] = static_cast<unsigned char>(i * 131 + 7);
    for (;;) {
      unsigned char req[8];
      if (!ssl_read_exact(ssl, req, sizeof req)) return;
      uint64_t left = get_be64(req);
      while (left > 0) {
        const std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(left, body_chunk_bytes));
        ssl_write_all(ssl, frame.data(), frame_overhead_bytes + n);
        left -= n;
      }
    }
  });
}

Measurement raw_tls_send(const CaseOptions& options, uint64_t payload_total) {
  Material m;
  ChildProcess server = spawn_server({self_exe(), "serve-tls-sink", "--listen", "tcp:127.0.0.1:0", "--cert",
                                      m.tls.server.cert, "--key", m.tls.server.key},
                                     options.server_netns);
  Ctx ctx = make_ctx(false, {}, {}, m.tls.ca.cert);
  TlsClient client(ctx.get(), server.ready_info());
  const uint64_t frames = (payload_total + body_chunk_bytes - 1) / body_chunk_bytes;
  // Header and body in one buffer, one SSL_write each: the records ferry
  // writes (it gathers a prefix into the first record of its body).
  std::vector<unsigned char> frame(frame_overhead_bytes + body_chunk_bytes);
  for (std::size_t i = 0; i < frame.size(); ++i) frame[i] = static_cast<unsigned char>(i * 131 + 7);
  auto start = Clock::now();
  unsigned char total[8];
  put_be64(total, frames * frame.size());
  ssl_write_all(client.ssl.get(), total, sizeof total);
  for (uint64_t i = 0; i < frames; ++i) ssl_write_all(client.ssl.get(), frame.data(), frame.size());
  unsigned char ack = 0;
  if (!ssl_read_exact(client.ssl.get(), &ack, 1)) throw std::runtime_error("TLS sink closed before acknowledging");
  const double elapsed = seconds_since(start);
  server.stop();
  return {static_cast<double>(payload_total) / 1e6 / elapsed, "MB/s",
          std::string("raw OpenSSL TLS 1.3 ") + tls_ciphersuite + ", blocking socket, " + std::to_string(frames) +
              " x (28 B header + 256 KiB body) per SSL_write, read-ahead 64 KiB"};
}

Measurement raw_tls_download(const CaseOptions& options, uint64_t payload_total) {
  Material m;
  ChildProcess server = spawn_server({self_exe(), "serve-tls-source", "--listen", "tcp:127.0.0.1:0", "--cert",
                                      m.tls.server.cert, "--key", m.tls.server.key},
                                     options.server_netns);
  Ctx ctx = make_ctx(false, {}, {}, m.tls.ca.cert);
  TlsClient client(ctx.get(), server.ready_info());
  std::vector<unsigned char> buf(body_chunk_bytes);
  auto start = Clock::now();
  unsigned char req[8];
  put_be64(req, payload_total);
  ssl_write_all(client.ssl.get(), req, sizeof req);
  uint64_t left =
      payload_total + (payload_total + body_chunk_bytes - 1) / body_chunk_bytes * frame_overhead_bytes;
  while (left > 0) {
    std::size_t got = 0;
    if (SSL_read_ex(client.ssl.get(), buf.data(), std::min<uint64_t>(left, buf.size()), &got) != 1)
      throw std::runtime_error(ssl_error("TLS source closed early"));
    left -= got;
  }
  const double elapsed = seconds_since(start);
  server.stop();
  return {static_cast<double>(payload_total) / 1e6 / elapsed, "MB/s",
          std::string("raw OpenSSL TLS 1.3 ") + tls_ciphersuite +
              ", server SSL_writes 256 KiB bodies (+28 B header), client SSL_reads into a 256 KiB buffer"};
}

Measurement raw_tls_handshake(const CaseOptions& options) {
  Material m;
  // The sink answers nothing until it has 8 bytes; a client that only
  // handshakes and leaves costs it one thread, briefly.
  ChildProcess server = spawn_server({self_exe(), "serve-tls-sink", "--listen", "tcp:127.0.0.1:0", "--cert",
                                      m.tls.server.cert, "--key", m.tls.server.key},
                                     options.server_netns);
  Ctx ctx = make_ctx(false, {}, {}, m.tls.ca.cert);
  const int connects = options.quick ? 50 : 200;
  std::vector<double> ms;
  for (int i = 0; i < connects + 5; ++i) {
    auto start = Clock::now();
    {
      TlsClient client(ctx.get(), server.ready_info());
      SSL_shutdown(client.ssl.get());  // close_notify; nothing is waited for
    }
    const double took = seconds_since(start) * 1000.0;
    if (i >= 5) ms.push_back(took);
  }
  server.stop();
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], "ms",
          "median of " + std::to_string(connects) +
              " raw OpenSSL connects: TCP + TLS 1.3 handshake, server certificate verified"};
}

}  // namespace ferry::bench
