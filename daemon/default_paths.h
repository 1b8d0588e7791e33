// Where ferryd listens when told nothing: $XDG_RUNTIME_DIR/ferry/ferryd.sock,
// or ./var/ferryd.sock when there is no runtime directory. The CLI uses the
// same rule, so `ferryd &` then `ferry ping` just works; when no daemon of
// the user's own is there, it falls back to the packaged system daemon's
// socket (client_socket_path).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace ferry::daemon {

inline std::string default_socket_path() {
  if (const char* env = std::getenv("FERRY_SOCKET"); env && *env) return env;
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg && *xdg) return std::string(xdg) + "/ferry/ferryd.sock";
  return "./var/ferryd.sock";
}

// The socket of the ferryd installed from the packages (systemd's
// ferryd.socket, /etc/ferry/ferryd.toml).
inline constexpr const char* system_socket_path = "/run/ferry/ferryd.sock";

// The CLI's default: $FERRY_SOCKET, else the user's own daemon's socket if
// it exists, else the system daemon's if that exists, else the user's (so
// the error names the path a user's own ferryd would use).
inline std::string client_socket_path() {
  if (const char* env = std::getenv("FERRY_SOCKET"); env && *env) return env;
  std::string own = default_socket_path();
  std::error_code ec;
  if (!std::filesystem::exists(own, ec) && std::filesystem::exists(system_socket_path, ec)) return system_socket_path;
  return own;
}

// The admin socket (docs/operations.md, "Admin interface"): beside the main
// socket, $FERRY_ADMIN_SOCKET overriding. ferryd itself puts it beside its
// first unix: listener when [admin] socket is not set.
inline std::string admin_socket_beside(const std::string& main_socket) {
  const std::filesystem::path dir = std::filesystem::path(main_socket).parent_path();
  return (dir.empty() ? std::filesystem::path(".") : dir).string() + "/ferryd-admin.sock";
}

inline std::string default_admin_socket_path() {
  if (const char* env = std::getenv("FERRY_ADMIN_SOCKET"); env && *env) return env;
  return admin_socket_beside(default_socket_path());
}

// The CLI's admin socket: beside the socket client_socket_path() picks.
inline std::string client_admin_socket_path() {
  if (const char* env = std::getenv("FERRY_ADMIN_SOCKET"); env && *env) return env;
  return admin_socket_beside(client_socket_path());
}

}  // namespace ferry::daemon
