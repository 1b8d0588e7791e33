#include "rpc/socket_handover.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "rpc/error.h"

namespace ferry::rpc {

std::string socket_family_name(int family) {
  switch (family) {
    case AF_UNIX: return "AF_UNIX";
    case AF_INET: return "AF_INET";
    case AF_INET6: return "AF_INET6";
    default: return "address family " + std::to_string(family);
  }
}

int listening_stream_family(int fd) {
  const std::string which = "descriptor " + std::to_string(fd);
  auto option = [&](int name, const char* what) {
    int value = 0;
    socklen_t len = sizeof value;
    if (::getsockopt(fd, SOL_SOCKET, name, &value, &len) != 0)
      throw Error(Code::invalid_argument,
                  which + " is not a socket (" + what + ": " + std::strerror(errno) + ")");
    return value;
  };
  const int type = option(SO_TYPE, "SO_TYPE");
  const int family = option(SO_DOMAIN, "SO_DOMAIN");
  const int listening = option(SO_ACCEPTCONN, "SO_ACCEPTCONN");
  if (type != SOCK_STREAM)
    throw Error(Code::invalid_argument,
                which + " is not a stream socket: its type is " +
                    (type == SOCK_DGRAM       ? std::string("SOCK_DGRAM")
                     : type == SOCK_SEQPACKET ? std::string("SOCK_SEQPACKET")
                                              : std::to_string(type)) +
                    ", ferry needs SOCK_STREAM");
  if (family != AF_UNIX && family != AF_INET && family != AF_INET6)
    throw Error(Code::invalid_argument, which + " is an " + socket_family_name(family) +
                                            " socket; ferry serves AF_UNIX, AF_INET and AF_INET6 ones");
  if (!listening) throw Error(Code::invalid_argument, which + " is a socket that is not listening (no listen() on it)");
  return family;
}

}  // namespace ferry::rpc
