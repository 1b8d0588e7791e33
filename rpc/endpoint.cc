#include "rpc/endpoint.h"

#include <charconv>
#include <filesystem>
#include <string>
#include <string_view>

#include "rpc/error.h"

namespace ferry::rpc {

namespace {

Error bad(const std::string& text, const std::string& why) {
  return Error(Code::invalid_argument,
               "bad address '" + text + "': " + why +
                   " (expected unix:/path, tcp:host:port, tls:host:port, grpc:host:port, grpcs:host:port, "
                   "ferry+unix:///path, ferry+tcp://host:port, ferry+tls://host:port, ferry+grpc://host:port "
                   "or ferry+grpcs://host:port)");
}

Endpoint parse_host_port(const std::string& text, const std::string& hp) {
  std::string host;
  std::string port;
  if (!hp.empty() && hp.front() == '[') {
    auto close = hp.find(']');
    if (close == std::string::npos) throw bad(text, "unterminated '[' in IPv6 address");
    host = hp.substr(1, close - 1);
    if (close + 1 >= hp.size() || hp[close + 1] != ':') throw bad(text, "missing port");
    port = hp.substr(close + 2);
  } else {
    auto colon = hp.rfind(':');
    if (colon == std::string::npos) throw bad(text, "missing port");
    host = hp.substr(0, colon);
    port = hp.substr(colon + 1);
  }
  while (!port.empty() && port.back() == '/') port.pop_back();
  if (host.empty()) throw bad(text, "missing host");
  unsigned value = 0;
  auto [ptr, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || ptr != port.data() + port.size() || value > 65535 || port.empty())
    throw bad(text, "port '" + port + "' is not a number from 0 to 65535");
  return Endpoint::tcp(host, static_cast<std::uint16_t>(value));
}

}  // namespace

Endpoint Endpoint::unix_socket(std::string path) {
  Endpoint e;
  e.kind = Kind::unix_socket;
  e.path = std::move(path);
  return e;
}

Endpoint Endpoint::tcp(std::string host, std::uint16_t port) {
  Endpoint e;
  e.kind = Kind::tcp;
  e.host = std::move(host);
  e.port = port;
  return e;
}

Endpoint Endpoint::tls(std::string host, std::uint16_t port) {
  Endpoint e = tcp(std::move(host), port);
  e.kind = Kind::tls;
  return e;
}

Endpoint Endpoint::grpc(std::string host, std::uint16_t port, bool secure) {
  Endpoint e = tcp(std::move(host), port);
  e.kind = secure ? Kind::grpcs : Kind::grpc;
  return e;
}

Endpoint Endpoint::parse(const std::string& text) {
  auto starts = [&](const char* p) { return text.rfind(p, 0) == 0; };
  if (starts("ferry+unix://")) {
    std::string path = text.substr(13);
    auto q = path.find('?');
    if (q != std::string::npos) path = path.substr(0, q);
    if (path.empty() || path.front() != '/') throw bad(text, "the socket path must be absolute");
    return unix_socket(path);
  }
  if (starts("unix:")) {
    std::string path = text.substr(5);
    if (path.empty()) throw bad(text, "empty socket path");
    return unix_socket(path);
  }
  if (starts("ferry+tcp://")) return parse_host_port(text, text.substr(12));
  if (starts("tcp:")) return parse_host_port(text, text.substr(4));
  if (starts("ferry+tls://") || starts("tls:")) {
    Endpoint e = parse_host_port(text, text.substr(starts("tls:") ? 4 : 12));
    e.kind = Kind::tls;
    return e;
  }
  for (const char* scheme : {"ferry+grpcs://", "grpcs:", "ferry+grpc://", "grpc:"}) {
    if (!starts(scheme)) continue;
    Endpoint e = parse_host_port(text, text.substr(std::char_traits<char>::length(scheme)));
    e.kind = std::string_view(scheme).find("grpcs") != std::string_view::npos ? Kind::grpcs : Kind::grpc;
    return e;
  }
  if (starts("/") || starts("./")) return unix_socket(text);
  throw bad(text, "unknown scheme");
}

namespace {
const char* scheme_name(Endpoint::Kind kind) {
  switch (kind) {
    case Endpoint::Kind::unix_socket: return "unix";
    case Endpoint::Kind::tcp: return "tcp";
    case Endpoint::Kind::tls: return "tls";
    case Endpoint::Kind::grpc: return "grpc";
    case Endpoint::Kind::grpcs: return "grpcs";
  }
  return "tcp";
}
}  // namespace

std::string Endpoint::to_string() const {
  if (kind == Kind::unix_socket) return "unix:" + path;
  const std::string scheme = std::string(scheme_name(kind)) + ":";
  if (host.find(':') != std::string::npos) return scheme + "[" + host + "]:" + std::to_string(port);
  return scheme + host + ":" + std::to_string(port);
}

std::string Endpoint::to_uri() const {
  if (kind == Kind::unix_socket) {
    // The URI form only carries absolute paths.
    std::error_code ec;
    auto abs = std::filesystem::absolute(path, ec);
    return "ferry+unix://" + (ec ? path : abs.lexically_normal().string());
  }
  const std::string scheme = std::string("ferry+") + scheme_name(kind) + "://";
  if (host.find(':') != std::string::npos) return scheme + "[" + host + "]:" + std::to_string(port);
  return scheme + host + ":" + std::to_string(port);
}

}  // namespace ferry::rpc
