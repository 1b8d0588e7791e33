// Endpoint: where to listen or connect, parsed from the forms users type.
//   unix:/run/ferry/sock      ferry+unix:///run/ferry/sock     /run/ferry/sock
//   tcp:127.0.0.1:7000        ferry+tcp://127.0.0.1:7000       tcp:[::1]:7000
//   tls:host:16514            ferry+tls://host:16514
#pragma once

#include <cstdint>
#include <string>

namespace ferry::rpc {

struct Endpoint {
  enum class Kind { unix_socket, tcp, tls };
  Kind kind = Kind::unix_socket;
  std::string path;  // unix
  std::string host;  // tcp, tls
  std::uint16_t port = 0;

  // Throws ferry::Error(INVALID_ARGUMENT) naming what is wrong.
  static Endpoint parse(const std::string& text);
  static Endpoint unix_socket(std::string path);
  static Endpoint tcp(std::string host, std::uint16_t port);
  static Endpoint tls(std::string host, std::uint16_t port);
  bool is_inet() const { return kind != Kind::unix_socket; }

  // Canonical "unix:/path" / "tcp:host:port" / "tls:host:port" form, for logs.
  std::string to_string() const;
  // "ferry+unix:///path" / "ferry+tcp://host:port" / "ferry+tls://host:port".
  std::string to_uri() const;
};

}  // namespace ferry::rpc
