// ferryd's NBD service (docs/nbd.md): the exports ferryd offers over NBD,
// the Nbd program (program 2: NBD carried inside a ferry stream, the far
// end of `ferry nbd-serve`), and plain NBD listeners for NBD clients that
// connect directly.
//
// Exports:
//  - every volume, as "POOL/NAME" (or "NAME" for pool "default"), through
//    VolumeBackend: io_uring (or thread pool) file I/O on the volume file,
//    holes found with SEEK_DATA/SEEK_HOLE, trims and zeros as hole punches;
//  - the exports the configuration declares ([[nbd.export]], --nbd-export):
//    memory:SIZE, null:SIZE, nbd:URI (a remote NBD server through libnbd),
//    volume:POOL/NAME, each optionally behind a delay (",delay=64ms") and
//    read-only (",ro").
// All NBD connections of the daemon share one payload budget
// ([nbd] buffer_bytes) and run on the server's io threads.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "daemon/config.h"
#include "daemon/volumes.h"
#include "nbd/backend.h"
#include "nbd/server.h"
#include "rpc/endpoint.h"
#include "rpc/program.h"
#include "rpc/server.h"

namespace ferry::daemon {

// A volume as an NBD backend.
std::shared_ptr<nbd::Backend> make_volume_backend(FileIo& io, VolumeService::NbdVolume volume);

class NbdService {
 public:
  NbdService(VolumeService& volumes, const NbdConfig& config);
  ~NbdService();
  NbdService(const NbdService&) = delete;
  NbdService& operator=(const NbdService&) = delete;

  // Opens the configured exports; remote (nbd:) exports connect now, on
  // `server`'s io threads, so call this after server.start(). Throws if an
  // export cannot be opened.
  void open_exports(rpc::Server& server);

  std::shared_ptr<rpc::Program> program();

  // Plain NBD: binds `endpoint` (unix: or tcp:); connections are accepted
  // once start_listening() runs. Returns the bound endpoint.
  rpc::Endpoint listen(rpc::Server& server, const rpc::Endpoint& endpoint);
  // The same for a socket already listening (systemd socket activation):
  // an AF_UNIX or AF_INET/AF_INET6 stream socket, owned from then on (even
  // when this throws) and never unlinked. Throws ferry::Error naming what
  // the descriptor is when it is not such a socket.
  rpc::Endpoint adopt(rpc::Server& server, int fd);
  // Closes the listeners and every plain NBD connection, then waits up to
  // `grace` for their sessions to end. Call before server.shutdown().
  void shutdown(std::chrono::milliseconds grace);

  nbd::ExportSource& exports();
  std::string describe() const;

  class Exports;
  class Listener;

 private:
  nbd::ServerOptions server_options() const;

  VolumeService& volumes_;
  NbdConfig config_;
  std::shared_ptr<nbd::ByteBudget> budget_;
  // Payload buffers of every NBD connection. It may keep as many idle bytes
  // as the budget lets connections hold: at a deep queue every buffer is
  // reused, never unmapped and faulted in again.
  std::shared_ptr<rpc::BufferPool> buffers_;
  std::shared_ptr<Exports> exports_;
  std::unique_ptr<Listener> listener_;
};

}  // namespace ferry::daemon
