// Endpoint: where to listen or connect, parsed from the forms users type.
//   unix:/run/ferry/sock      ferry+unix:///run/ferry/sock     /run/ferry/sock
//   tcp:127.0.0.1:7000        ferry+tcp://127.0.0.1:7000       tcp:[::1]:7000
#pragma once

#include <cstdint>
#include <string>

namespace ferry::rpc {

struct Endpoint {
  enum class Kind { unix_socket, tcp };
  Kind kind = Kind::unix_socket;
  std::string path;  // unix
  std::string host;  // tcp
  std::uint16_t port = 0;

  // Throws ferry::Error(INVALID_ARGUMENT) naming what is wrong.
  static Endpoint parse(const std::string& text);
  static Endpoint unix_socket(std::string path);
  static Endpoint tcp(std::string host, std::uint16_t port);

  // Canonical "unix:/path" / "tcp:host:port" form, for logs.
  std::string to_string() const;
  // "ferry+unix:///path" / "ferry+tcp://host:port".
  std::string to_uri() const;
};

}  // namespace ferry::rpc
