// The NBD server: serves exports (nbd/backend.h) to one NBD client over a
// Pipe (nbd/pipe.h), following the NBD protocol document (doc/proto.md of
// the NBD project), fixed newstyle only.
//
// Handshake: NBD_OPT_EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
// LIST_META_CONTEXT and SET_META_CONTEXT (base:allocation); anything else
// gets NBD_REP_ERR_UNSUP and the handshake goes on. Transmission: READ,
// WRITE, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), BLOCK_STATUS,
// CACHE, DISC; FUA; DF and REQ_ONE honoured.
//
// Concurrency (DESIGN.md problems 1 and 2): one reader coroutine reads the
// next request while earlier ones are served; each request runs as its own
// coroutine against the backend and its reply is queued as soon as it
// completes, in whatever order that is; one writer coroutine gathers queued
// replies into one write. No thread per request: everything runs on the
// pipe's executor, and the backend's I/O is asynchronous.
//
// Bounds: at most `max_in_flight` requests per connection; payload bytes
// held (WRITE data not yet written, READ data not yet sent) come from a
// ByteBudget shared by all connections; a request longer than
// `max_request` is refused with EINVAL (a WRITE that long closes the
// connection: its payload cannot be skipped safely).
//
// Bad input: a malformed handshake or request header (wrong magic, an
// option longer than max_option, a truncated request) ends that connection
// with a logged reason; nothing else is affected.
#pragma once

#include <asio/awaitable.hpp>
#include <cstdint>
#include <memory>
#include <string>

#include "nbd/backend.h"
#include "nbd/budget.h"
#include "nbd/pipe.h"

namespace ferry::nbd {

struct ServerOptions {
  unsigned max_in_flight = 4096;           // requests per connection
  std::uint32_t max_request = 32u << 20;   // bytes of one READ/WRITE (advertised as max block)
  std::uint32_t max_option = 64u << 10;    // bytes of one handshake option
  bool allow_list = true;                  // answer NBD_OPT_LIST
  std::shared_ptr<ByteBudget> budget;      // null: a private 256 MiB budget
  std::shared_ptr<rpc::BufferPool> buffers;  // null: plain allocation
};

// What one connection did, for logs and tests.
struct SessionStats {
  std::string export_name;
  std::uint64_t requests = 0;
  std::uint64_t bytes_read = 0;     // sent to the client by READ
  std::uint64_t bytes_written = 0;  // received by WRITE
  unsigned peak_in_flight = 0;
  bool structured_replies = false;
  bool clean_disconnect = false;    // ended with NBD_CMD_DISC or NBD_OPT_ABORT
};

// Serves one client until it disconnects, the pipe fails, or the handshake
// ends without an export, then closes the pipe. Nothing the peer does makes
// it throw: the reason a session ended is logged (spdlog) and it returns
// what the session did. Runs on pipe.get_executor(); `pipe` and `exports`
// must outlive it (`options` is copied at once); every request coroutine
// has finished when it returns. Options by reference: GCC 12 may destroy a
// by-value coroutine argument twice (docs/architecture.md, "Volume I/O").
asio::awaitable<SessionStats> serve(Pipe& pipe, ExportSource& exports, const ServerOptions& options);

}  // namespace ferry::nbd
