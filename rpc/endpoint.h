// Endpoint: where to listen or connect, parsed from the forms users type.
//   unix:/run/ferry/sock      ferry+unix:///run/ferry/sock     /run/ferry/sock
//   tcp:127.0.0.1:7000        ferry+tcp://127.0.0.1:7000       tcp:[::1]:7000
//   tls:host:16514            ferry+tls://host:16514
//   grpc:host:16515           ferry+grpc://host:16515      (ferry over a gRPC stream)
//   grpcs:host:16515          ferry+grpcs://host:16515     (the same with gRPC's TLS)
#pragma once

#include <cstdint>
#include <string>

namespace ferry::rpc {

struct Endpoint {
  enum class Kind { unix_socket, tcp, tls, grpc, grpcs };
  Kind kind = Kind::unix_socket;
  std::string path;  // unix
  std::string host;  // tcp, tls, grpc, grpcs
  std::uint16_t port = 0;

  // Throws ferry::Error(INVALID_ARGUMENT) naming what is wrong.
  static Endpoint parse(const std::string& text);
  static Endpoint unix_socket(std::string path);
  static Endpoint tcp(std::string host, std::uint16_t port);
  static Endpoint tls(std::string host, std::uint16_t port);
  static Endpoint grpc(std::string host, std::uint16_t port, bool secure = false);
  bool is_inet() const { return kind != Kind::unix_socket; }
  bool is_grpc() const { return kind == Kind::grpc || kind == Kind::grpcs; }
  // Encrypted with a certificate: tls and grpcs.
  bool is_secure() const { return kind == Kind::tls || kind == Kind::grpcs; }

  // Canonical "unix:/path" / "tcp:host:port" / "tls:host:port" /
  // "grpc:host:port" / "grpcs:host:port" form, for logs.
  std::string to_string() const;
  // "ferry+unix:///path" / "ferry+tcp://host:port" / "ferry+tls://host:port" /
  // "ferry+grpc://host:port" / "ferry+grpcs://host:port".
  std::string to_uri() const;
};

}  // namespace ferry::rpc
