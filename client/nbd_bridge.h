// NbdBridge: `ferry nbd-serve`. Listens on a local UNIX socket (and/or a
// TCP address) for NBD clients (qemu-img, nbdcopy, nbdinfo, nbdfuse) and
// turns each of their connections into one Nbd.Connect stream on the
// session's ferry connection; the daemon runs the NBD server on the export
// at the far end. The bridge relays bytes both ways at once and never parses
// them, so every NBD feature the daemon speaks reaches the client unchanged,
// and many NBD connections share one authenticated (TLS, SASL) ferry
// connection.
//
// Ending: an NBD client that disconnects ends its stream; a stream the
// daemon ends or aborts closes its NBD client's socket; stop() (Ctrl-C)
// aborts every stream (the daemon stops serving at once) and closes every
// socket. The ferry connection stays usable throughout.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "client/session.h"

namespace ferry {

struct NbdBridgeOptions {
  std::string export_name;      // "POOL/NAME", "NAME" (pool default) or a configured export
  bool read_only = false;
  std::string socket_path;      // listen here (UNIX socket, mode 0600)
  std::string tcp;              // and/or here: "host:port" (port 0: any free port)
  std::size_t max_connections = 256;
  bool once = false;            // stop when the first NBD client has gone
};

struct NbdBridgeStats {
  std::uint64_t connections = 0;
  std::uint64_t bytes_to_daemon = 0;
  std::uint64_t bytes_from_daemon = 0;
  std::uint64_t failed = 0;     // connections that ended with an error
};

class NbdBridge {
 public:
  // Checks the export with the daemon (a missing one fails here, as
  // NOT_FOUND) and binds the listeners. Throws ferry::Error.
  NbdBridge(Session& session, NbdBridgeOptions options);
  ~NbdBridge();
  NbdBridge(const NbdBridge&) = delete;
  NbdBridge& operator=(const NbdBridge&) = delete;

  // NBD URIs clients can use: nbd+unix:///?socket=PATH, nbd://host:port.
  std::vector<std::string> uris() const;
  // The export's size, as the daemon reported it.
  std::uint64_t export_size() const;

  // Serves until stop() (or, with once, until the first client is gone and
  // its stream has ended). Blocks the calling thread (not the session's io
  // thread).
  NbdBridgeStats run();
  // From any thread (a signal handler's thread): closes the listeners,
  // aborts every stream with `reason` and closes every NBD socket.
  void stop(const std::string& reason);

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace ferry
