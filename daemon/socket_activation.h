// systemd socket activation and readiness for ferryd (docs/configuration.md,
// "Socket activation").
//
// systemd passes listening sockets from descriptor 3 on, with LISTEN_PID,
// LISTEN_FDS and LISTEN_FDNAMES in the environment. ferryd serves each one
// according to its name (FileDescriptorName= in the .socket unit):
//   unix  a ferry listener on an AF_UNIX socket        ([unix] auth)
//   tcp   a ferry listener on an AF_INET/AF_INET6 one  ([tcp] auth)
//   tls   a ferry listener with TLS on an AF_INET/6 one ([tls] settings)
//   nbd   a plain NBD listener, UNIX or TCP
// A socket without a name (LISTEN_FDNAMES unset) is `unix` or `tcp` by its
// family. Any other name, or a socket of the wrong type or family, stops
// ferryd with a message that names the descriptor.
#pragma once

#include <string>
#include <vector>

namespace ferry::daemon {

struct HandedSocket {
  enum class Role { unix_socket, tcp, tls, nbd };
  int fd = -1;
  std::string name;  // as systemd passed it ("unknown" without LISTEN_FDNAMES)
  Role role = Role::unix_socket;
  int family = 0;    // AF_UNIX, AF_INET or AF_INET6
};

// The sockets systemd passed to this process, checked, in descriptor
// order; empty when ferryd was not socket-activated (LISTEN_PID is not this
// process). Unsets LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES so children
// do not see them. Call before any other thread exists. Throws
// ferry::Error(INVALID_ARGUMENT) for an unknown name or a socket that does
// not fit its name.
std::vector<HandedSocket> sockets_from_systemd();

std::string to_string(HandedSocket::Role role);

// sd_notify: READY=1 (with a STATUS= line) once ferryd serves, STOPPING=1
// when it begins to shut down. No-ops unless NOTIFY_SOCKET is set
// (Type=notify units).
void notify_ready(const std::string& status);
void notify_stopping();

}  // namespace ferry::daemon
