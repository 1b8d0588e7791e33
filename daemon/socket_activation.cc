#include "daemon/socket_activation.h"

#include <sys/socket.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "rpc/error.h"
#include "rpc/socket_handover.h"
#include "rpc/socket_transport.h"

namespace ferry::daemon {

std::string to_string(HandedSocket::Role role) {
  switch (role) {
    case HandedSocket::Role::unix_socket: return "unix";
    case HandedSocket::Role::tcp: return "tcp";
    case HandedSocket::Role::tls: return "tls";
    case HandedSocket::Role::nbd: return "nbd";
  }
  return "?";
}

std::vector<HandedSocket> sockets_from_systemd() {
  char** names = nullptr;
  const int n = ::sd_listen_fds_with_names(1, &names);
  if (n < 0)
    throw Error(Code::invalid_argument,
                std::string("socket activation: LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES are not valid: ") + std::strerror(-n));
  std::vector<HandedSocket> out;
  for (int i = 0; i < n; ++i) {
    HandedSocket s;
    s.fd = SD_LISTEN_FDS_START + i;
    s.name = names && names[i] ? names[i] : "unknown";
    out.push_back(s);
  }
  if (names) {
    for (int i = 0; i < n; ++i) std::free(names[i]);
    std::free(names);
  }
  auto fail = [&out](const std::string& message) {
    for (const auto& s : out) ::close(s.fd);
    throw Error(Code::invalid_argument, "socket activation: " + message);
  };
  for (auto& s : out) {
    const std::string which = "socket " + std::to_string(s.fd) + " (named '" + s.name + "')";
    try {
      s.family = rpc::listening_stream_family(s.fd);
    } catch (const Error& e) {
      fail(which + ": " + e.message());
    }
    const bool is_unix = s.family == AF_UNIX;
    if (s.name == "unix") {
      s.role = HandedSocket::Role::unix_socket;
    } else if (s.name == "tcp") {
      s.role = HandedSocket::Role::tcp;
    } else if (s.name == "tls") {
      s.role = HandedSocket::Role::tls;
    } else if (s.name == "nbd") {
      s.role = HandedSocket::Role::nbd;
    } else if (s.name == "unknown") {
      s.role = is_unix ? HandedSocket::Role::unix_socket : HandedSocket::Role::tcp;
    } else {
      fail(which + ": unknown name; ferryd serves sockets named unix, tcp, tls and nbd (FileDescriptorName= in the "
                   ".socket unit, LISTEN_FDNAMES)");
    }
    if (s.role == HandedSocket::Role::unix_socket && !is_unix)
      fail(which + " is an " + rpc::socket_family_name(s.family) + " socket; 'unix' needs an AF_UNIX one");
    if ((s.role == HandedSocket::Role::tcp || s.role == HandedSocket::Role::tls) && is_unix)
      fail(which + " is an AF_UNIX socket; '" + s.name + "' needs an AF_INET or AF_INET6 one");
  }
  return out;
}

void notify_ready(const std::string& status) { ::sd_notify(0, ("READY=1\nSTATUS=" + status).c_str()); }

void notify_stopping() { ::sd_notify(0, "STOPPING=1\nSTATUS=shutting down"); }

}  // namespace ferry::daemon
