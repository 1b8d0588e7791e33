// Server: listeners, per-client sessions, program registry and dispatch.
//
// Threads: a fixed pool of io threads (default one per core) runs every
// connection's reader and writer and every coroutine handler; a fixed
// worker pool runs handlers flagged may_block. Nothing else is started, so
// the thread count does not move with load: ten thousand calls in flight
// are ten thousand small state objects, not threads (DESIGN.md problem 2).
//
// Each CALL is read, checked (Hello done, program, version, procedure,
// limits) and handed to its handler at once; the reader goes straight on to
// the next frame, and the reply is queued whenever the handler finishes.
// Errors the caller made are answered and the connection lives; protocol
// violations close that connection only, with the reason logged.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "rpc/buffer.h"
#include "rpc/endpoint.h"
#include "rpc/fault_transport.h"
#include "rpc/frame.h"
#include "rpc/program.h"
#include "rpc/sasl.h"
#include "rpc/tls.h"

namespace asio {
class io_context;
}

namespace ferry::rpc {

// How clients of a listener prove who they are. `none` still has the
// transport's own checks: UNIX peer credentials and socket mode, TLS client
// certificates and the allowed DN list.
enum class AuthMode { none, sasl };
const char* to_string(AuthMode mode);
AuthMode parse_auth_mode(const std::string& text);  // "none" | "sasl"; throws INVALID_ARGUMENT

struct ServerOptions {
  unsigned io_threads = 0;      // 0: one per core
  unsigned worker_threads = 4;  // for may_block handlers
  // Stream handlers' work waits while calls and frames are ready on their io
  // thread, so small calls are not stuck behind bulk data (bulk_queue.h).
  // Off: they take turns with everything else in the io thread's queue.
  bool calls_before_streams = true;
  std::size_t max_clients = 1024;
  // Connected but not yet through Hello (and SASL where required),
  // including TLS handshakes in progress.
  std::size_t max_unauthenticated_clients = 64;
  std::size_t max_calls_per_client = 16384;
  std::size_t max_streams_per_client = 64;
  // Across all connections. Beyond either, a new call is refused with a
  // retryable RESOURCE_EXHAUSTED "overloaded" error; nothing queues.
  std::size_t max_calls = 65536;
  std::size_t max_streams = 1024;
  // Bytes queued for one client that is not reading them (replies, chunks):
  // beyond this the daemon stops reading that client's frames until the
  // queue is down to half, so a client that asks and never reads cannot
  // grow the daemon's memory. 0: no bound.
  std::size_t max_buffered_bytes_per_client = 64u << 20;
  // Pooled frame buffers held across all connections: beyond this a new
  // call is refused with a retryable RESOURCE_EXHAUSTED "overloaded".
  std::size_t max_buffered_bytes = 1u << 30;
  // From accept to the end of authentication (TLS handshake, Hello, SASL).
  std::chrono::milliseconds auth_timeout{10000};
  // A connection with no call or stream in flight for this long is closed
  // (with a Goodbye saying so); 0: never.
  std::chrono::milliseconds idle_timeout{0};
  FrameLimits limits;
  std::uint32_t window = 4u << 20;
  std::chrono::milliseconds keepalive_interval{5000};  // 0 disables probing
  unsigned keepalive_count = 3;
  std::string name = "ferryd";
  unsigned unix_socket_mode = 0600;
  std::string unix_socket_group;              // chgrp the socket to this group (name or number); empty: ours
  std::vector<std::string> unix_allowed_users;  // peer uids (names or numbers) let in; empty: anyone who can open it
  TlsOptions tls;                             // for tls: listeners
  SaslServerOptions sasl;                     // for listeners with AuthMode::sasl
  AuthMode auth_unix = AuthMode::none;
  AuthMode auth_tcp = AuthMode::none;
  AuthMode auth_tls = AuthMode::none;
  int socket_buffer_bytes = 0;  // SO_SNDBUF/SO_RCVBUF per connection; 0 = kernel autotuning
  // Faults injected into every accepted connection's bytes ([fault]
  // transport; off unless set). On tls: listeners they act above TLS, on
  // the bytes the connection reads and writes in clear.
  FaultOptions fault;
};

struct ServerStats {
  std::size_t clients = 0;
  std::uint64_t calls_in_flight = 0;
  std::uint64_t streams_in_flight = 0;
  std::uint64_t calls_overloaded = 0;  // refused over max_calls / max_streams / max_buffered_bytes (global or per client)
  std::uint64_t read_pauses = 0;       // times a client's reading stopped at max_buffered_bytes_per_client
  std::uint64_t calls_total = 0;
  std::uint64_t calls_cancelled = 0;
  std::uint64_t protocol_errors = 0;
  std::uint64_t clients_refused = 0;        // over max_clients / max_unauthenticated_clients, or shutting down
  std::size_t clients_unauthenticated = 0;
  std::uint64_t auth_failures = 0;          // TLS handshakes and SASL exchanges that failed, auth timeouts
  std::uint64_t buffer_bytes_in_use = 0;  // pooled frame buffers held anywhere in the server
  // Connections listed now by transport ("unix", "tcp", "tls", "grpc",
  // "grpcs"; "admin" for the admin socket, which `clients` leaves out).
  std::map<std::string, std::size_t> clients_by_transport;
  std::size_t admin_clients = 0;
  std::uint64_t clients_total = 0;  // accepted since start (refused ones included)
  // Bytes read and written on every connection since start, the admin
  // socket's included.
  std::uint64_t bytes_in = 0;
  std::uint64_t bytes_out = 0;
  unsigned io_threads = 0;
  unsigned worker_threads = 0;
};

// The limits an administrator may change while the server runs
// (Server::set_limits). New values apply to new work at once: lowering one
// below what is in use refuses new connections, calls or streams until use
// falls under it, and never ends what runs.
struct ServerLimits {
  std::size_t max_clients = 0;
  std::size_t max_unauthenticated_clients = 0;
  std::size_t max_calls = 0;
  std::size_t max_streams = 0;
  std::size_t max_calls_per_client = 0;
  std::size_t max_streams_per_client = 0;
  std::size_t max_buffered_bytes_per_client = 0;  // 0: no bound; applies to connected clients too
  std::size_t max_buffered_bytes = 0;             // 0: no bound
  std::chrono::milliseconds auth_timeout{0};  // for connections accepted from now on
  std::chrono::milliseconds idle_timeout{0};  // checked by connections whose idle timer runs; new ones arm it
};

// One connection, as the admin interface shows it.
struct ClientInfo {
  std::uint64_t id = 0;     // assigned at accept, never reused while the server runs
  bool admin = false;       // on the admin socket
  PeerIdentity peer;        // transport, address, uid/pid (unix), TLS subject, SASL user and mechanism
  std::string client_name;  // what it said in Hello
  bool authenticated = false;
  std::int64_t connected_ns = 0;  // wall clock, since the epoch
  std::uint64_t bytes_in = 0;
  std::uint64_t bytes_out = 0;
  std::uint64_t calls_in_flight = 0;
  std::uint64_t streams_in_flight = 0;
};

// A stream in flight (an upload, a download, an NBD session, a copy
// extent): what the admin interface lists as a job.
struct StreamJob {
  std::uint64_t id = 0;  // assigned when the stream opens
  std::uint64_t client_id = 0;
  std::string procedure;  // "Volume.VolUpload"
  std::string subject;    // what the handler said it works on ("pool/volume")
  std::uint64_t bytes = 0;  // data bytes sent plus received so far
  std::int64_t started_ns = 0;
};

class Server {
 public:
  explicit Server(ServerOptions options = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Before start(). A second program with the same id replaces the first.
  void add_program(std::shared_ptr<Program> program);

  // Binds and listens; returns the bound endpoint (a TCP port of 0 becomes
  // the real one). A stale UNIX socket file is replaced. Throws ferry::Error.
  Endpoint listen(const Endpoint& endpoint);

  // Before start(). Serves a socket that is already bound and listening
  // (systemd socket activation, docs/configuration.md): `kind` says how
  // (unix_socket, tcp or tls, with that kind's auth mode, as listen()
  // would). The server owns `fd` from then on (even when this throws) and
  // never unlinks a UNIX socket's path, which belongs to whoever bound it;
  // the socket's mode and group are left as they are. Throws
  // ferry::Error(INVALID_ARGUMENT) when `fd` is not a listening stream
  // socket of the family `kind` needs. Returns the endpoint it listens on.
  Endpoint adopt(int fd, Endpoint::Kind kind);

  // Before start(). A program served only on the admin socket; a call to it
  // on any other listener is refused with PERMISSION_DENIED.
  void add_admin_program(std::shared_ptr<Program> program);

  // The admin socket: a UNIX socket of mode 0600 that serves the admin
  // programs only, to peers whose uid is 0 or the server's own (others get
  // a PERMISSION_DENIED Goodbye). Not counted against max_clients nor the
  // call and stream limits, so it answers when the server is full. A live
  // socket at `path` is never replaced (ALREADY_EXISTS).
  Endpoint listen_admin(const std::string& path);

  // Starts the io and worker threads and begins accepting.
  void start();

  // Loads the TLS certificate, key and CAs again (ServerOptions::tls) for
  // connections accepted from now on; those already up keep theirs. On a
  // bad file the old context stays and ferry::Error says why.
  void reload_tls();

  // Graceful shutdown: stop accepting, answer new calls UNAVAILABLE, give
  // calls in flight `grace` to finish, cancel the rest, answer whatever is
  // still open UNAVAILABLE, say Goodbye, close, join the threads. Blocks;
  // safe to call from any thread but an io thread, and to repeat.
  void shutdown(std::chrono::milliseconds grace = std::chrono::seconds(5));

  // Blocks until shutdown() has completed.
  void wait();

  ServerStats stats() const;

  // Admin interface (thread-safe; none of it is on the call path).
  ServerLimits limits() const;
  void set_limits(const ServerLimits& limits);
  std::vector<ClientInfo> clients() const;
  std::optional<ClientInfo> client(std::uint64_t id) const;
  // Says Goodbye (ABORTED, `reason`) to the client and closes it; its calls
  // and streams are cancelled and what they held is freed. False if no such
  // client.
  bool disconnect(std::uint64_t id, const std::string& reason);
  std::vector<StreamJob> stream_jobs() const;
  // Aborts the stream with `error` (the client sees it at once), cancels its
  // handler and marks the call cancelled by the administrator. False if no
  // such stream is open.
  bool cancel_stream_job(std::uint64_t id, const Error& error);
  asio::io_context& io_context();
  // The io threads' contexts in turn, for other services (plain NBD) that
  // spread their connections over the same threads.
  asio::io_context& next_io_context();
  // The buffer pool every connection shares.
  std::shared_ptr<BufferPool> buffer_pool();

 private:
  class Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace ferry::rpc
