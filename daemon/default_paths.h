// Where ferryd listens when told nothing: $XDG_RUNTIME_DIR/ferry/ferryd.sock,
// or ./var/ferryd.sock when there is no runtime directory. The CLI uses the
// same rule, so `ferryd &` then `ferry ping` just works.
#pragma once

#include <cstdlib>
#include <string>

namespace ferry::daemon {

inline std::string default_socket_path() {
  if (const char* env = std::getenv("FERRY_SOCKET"); env && *env) return env;
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg && *xdg) return std::string(xdg) + "/ferry/ferryd.sock";
  return "./var/ferryd.sock";
}

}  // namespace ferry::daemon
