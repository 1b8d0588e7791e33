// RemoteBackend: an export whose storage is another NBD server, reached
// through libnbd's asynchronous API (nbd_aio_*). ferry then proxies NBD:
// clients of the ferry server read and write a disk served elsewhere
// (nbdkit, qemu-nbd, another ferryd), possibly over a ferry stream.
//
// One libnbd handle (one connection to the remote server) serves every
// client connection using the backend. All libnbd calls run on one strand of
// the executor given at connect time; the handle's socket is watched with an
// asio::posix::stream_descriptor (async_wait for read or write, as
// nbd_aio_get_direction() asks) and the state machine is advanced with
// nbd_aio_notify_read/write: no thread per request, no thread at all beyond
// the io threads. A Backend call from any thread posts its command(s) onto
// the strand and waits; the libnbd completion callback posts the result back
// to the awaiting coroutine's executor.
//
// Reads and writes longer than the remote's maximum block size are split
// into pieces sent at once; a read whose caller wants a hole map uses
// structured replies (nbd_aio_pread_structured) when the remote offers them
// and reports the hole chunks the remote sent. extents() asks for
// "base:allocation" (NBD_CMD_BLOCK_STATUS).
//
// Errors of the remote (the errno in its reply) become ferry::Error with
// that os_errno; errno values that are not NBD errors (a lost connection:
// ENOTCONN, ECONNRESET ...) become UNAVAILABLE with os_errno EIO. A lost
// connection is not re-established: every later call fails the same way.
//
// Destruction disconnects (NBD_CMD_DISC) and closes the handle on the
// strand; commands still in flight then fail with UNAVAILABLE, and no libnbd
// callback runs into freed memory (the connection state is reference
// counted by the handlers that may still run). The executor's context must
// outlive the backend's last use.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "nbd/backend.h"

namespace ferry::nbd {

struct RemoteOptions {
  // Connection and handshake must be done within this (0: no limit). Only
  // connect() honours it; connect_blocking() waits as long as libnbd does.
  std::chrono::milliseconds connect_timeout{30'000};
};

class RemoteBackend : public Backend {
 public:
  // Connects to `uri` (nbd://host[:port]/export, nbd+unix:///export?socket=
  // path, nbds:// for TLS: anything nbd_connect_uri(3) takes) and finishes
  // the handshake, asking for structured replies and "base:allocation".
  // The connection is driven on a strand of `executor` without blocking it
  // (nbd_aio_connect_uri), except that libnbd resolves a host name with
  // getaddrinfo; prefer an IP address or a UNIX socket where that matters.
  // Throws ferry::Error (UNAVAILABLE, os_errno of the failure) if the
  // remote cannot be reached or refuses the export.
  static asio::awaitable<std::shared_ptr<RemoteBackend>> connect(const asio::any_io_executor& executor,
                                                                 const std::string& uri,
                                                                 const RemoteOptions& options = {});
  // The same, blocking the calling thread in nbd_connect_uri (for startup
  // code and other places allowed to block; never on an io thread of
  // `executor`'s context while it is needed to run).
  static std::shared_ptr<RemoteBackend> connect_blocking(const asio::any_io_executor& executor,
                                                         const std::string& uri,
                                                         const RemoteOptions& options = {});
  ~RemoteBackend() override;
  RemoteBackend(const RemoteBackend&) = delete;
  RemoteBackend& operator=(const RemoteBackend&) = delete;

  std::uint64_t size() const override { return size_; }
  // From the remote: read-only, flush, FUA, trim, zero, fast zero, cache,
  // base:allocation, rotational, block sizes (max capped at 32 MiB).
  // can_multi_conn is always true: every client connection of this backend
  // shares its one remote connection, where a flush covers every write
  // completed before it.
  Capabilities capabilities() const override { return caps_; }
  std::string description() const override;  // "remote nbd+unix:///?socket=/run/x.sock 64 MiB"

  asio::awaitable<void> read(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map) override;
  asio::awaitable<void> write(std::span<const std::uint8_t> data, std::uint64_t offset, bool fua) override;
  asio::awaitable<void> flush() override;
  asio::awaitable<void> trim(std::uint64_t offset, std::uint64_t length, bool fua) override;
  asio::awaitable<void> zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override;
  asio::awaitable<std::vector<Extent>> extents(std::uint64_t offset, std::uint64_t length) override;
  asio::awaitable<void> cache(std::uint64_t offset, std::uint64_t length) override;

  const std::string& uri() const { return uri_; }
  // Whether the remote agreed to structured replies (read maps need them).
  bool structured_replies() const { return structured_replies_; }
  // Whether the remote connection still works (false once it was lost).
  bool connected() const;
  // The remote's own multi-conn flag, for people who open several
  // RemoteBackends to one server.
  bool remote_multi_conn() const { return remote_multi_conn_; }

  // Implementation types, public only so the source file's helpers can
  // name them.
  class Connection;
  struct Request;

 private:
  explicit RemoteBackend(std::shared_ptr<Connection> connection);
  asio::awaitable<void> run(Request& request);

  std::shared_ptr<Connection> connection_;
  std::string uri_;
  std::uint64_t size_ = 0;
  Capabilities caps_;
  bool structured_replies_ = false;
  bool remote_multi_conn_ = false;
};

}  // namespace ferry::nbd
