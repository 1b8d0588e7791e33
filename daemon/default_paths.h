// Where ferryd listens when told nothing: $XDG_RUNTIME_DIR/ferry/ferryd.sock,
// or ./var/ferryd.sock when there is no runtime directory. The CLI uses the
// same rule, so `ferryd &` then `ferry ping` just works.
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

}  // namespace ferry::daemon
