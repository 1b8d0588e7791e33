// Sockets handed over already listening (systemd socket activation; see
// Server::adopt and docs/configuration.md).
#pragma once

#include <string>

namespace ferry::rpc {

// Checks that `fd` is a listening stream socket and returns its family
// (AF_UNIX, AF_INET or AF_INET6). Throws ferry::Error(INVALID_ARGUMENT)
// saying what the descriptor is instead (not a socket, a datagram socket,
// not listening, another family).
int listening_stream_family(int fd);

// "AF_UNIX", "AF_INET", "AF_INET6" or "address family N", for messages.
std::string socket_family_name(int family);

}  // namespace ferry::rpc
