// StreamSink: where the rpc layer delivers the stream frames (DATA_CHUNK,
// STREAM_HOLE, STREAM_CREDIT) of one serial. The rpc layer routes them by
// serial and never looks inside; stream/ implements the semantics.
#pragma once

#include "rpc/buffer.h"
#include "rpc/error.h"
#include "rpc/frame.h"

namespace ferry::rpc {

class StreamSink {
 public:
  virtual ~StreamSink() = default;
  // On the connection's strand; must not block.
  virtual void on_stream_frame(const Header& header, Buffer body) = 0;
  // The connection ended; the stream fails with `reason`.
  virtual void on_connection_closed(const Error& reason) = 0;
  // Server side: the client sent CANCEL for the opening call.
  virtual void on_call_cancelled() {}
  // Server side: the server ends the stream (the admin cancelled it); the
  // peer sees `error` at once.
  virtual void abort_by_server(const Error& error) { on_connection_closed(error); }
  // Data bytes sent plus received so far, for the admin job list.
  virtual std::uint64_t bytes_transferred() const { return 0; }
};

// What Hello negotiated for streams on a connection.
struct StreamLimits {
  std::uint32_t window = 4u << 20;
  std::uint32_t chunk_size = 256u << 10;
};

}  // namespace ferry::rpc
