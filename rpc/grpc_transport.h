// The gRPC transport: ferry's byte stream over one bidirectional gRPC
// stream (proto/ferry/v1/tunnel.proto, Tunnel.Connect), for networks where
// only HTTP/2 gets through. Frames are not changed in any way: written
// bytes go out as Frames messages (a write_all while the stream is idle at
// once; whatever is written while a message is in flight gathered into
// the next, up to kGrpcMaxWrite), and the reader sees the messages as one
// continuous stream, so the Connection, Hello, SASL and every service work
// unchanged on top.
//
// gRPC's callback API runs its reactions on gRPC's own threads; they only
// queue what arrived (or note that a write finished) and wake the
// transport's strand, where the Connection's reader and writer wait. One
// read and one write are outstanding at a time, as the Transport contract
// says; the reader keeps at most a few MiB of received messages queued and
// stops asking gRPC for more until the Connection consumes them, so a slow
// reader backs up into HTTP/2 flow control as a slow socket reader would.
//
// Mapping of the Transport operations:
//   shutdown_send  client: WritesDone (the server reads EOF, replies still
//                  arrive); server: Finish(OK), which ends the whole stream
//                  (gRPC has no half-close from the server side).
//   close          client: TryCancel; server: TryCancel and Finish(CANCELLED).
//   peer's end     read_some returns asio::error::eof once the queue is empty.
//
// PeerIdentity: transport "grpc" or "grpcs"; address from the server
// context's peer() (without the "ipv4:"/"ipv6:" prefix) or the target;
// grpcs: the client certificate's subject when the client showed one.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

#include "rpc/endpoint.h"
#include "rpc/tls.h"
#include "rpc/transport.h"

namespace ferry::rpc {

// Largest gRPC message either side accepts, and the most bytes one
// message carries (and write_all holds back while one is in flight: small
// frames written behind bulk data wait for at most this much).
inline constexpr int kGrpcMaxMessage = 64 << 20;
inline constexpr std::size_t kGrpcMaxWrite = 1u << 20;

// Client side: a new channel to `endpoint` (grpc: or grpcs:) and a Connect
// stream on it, the transport running on `strand`. grpcs: takes the CA,
// client certificate and key from `tls` (the system's CAs when null or
// empty) and tls->server_name as the name to check. Waits for the server's
// initial metadata, so a refused or failed connection throws here:
// ferry::Error UNAVAILABLE ("cannot connect to grpc:host:port: why"),
// DEADLINE_EXCEEDED after `timeout`, INVALID_ARGUMENT for unreadable files.
asio::awaitable<std::unique_ptr<Transport>> connect_grpc(asio::any_io_executor strand, const Endpoint& endpoint,
                                                         const TlsOptions* tls, std::chrono::milliseconds timeout);

// Server side: a grpc::Server bound to `endpoint` serving Tunnel; every
// Connect stream becomes a Transport on the strand `executor_for()` makes,
// handed to `accept` (called on a gRPC thread). grpcs: uses tls.cert_file,
// tls.key_file and, with verify_peer and a ca_file, requires and checks
// client certificates.
class GrpcListener {
 public:
  using Accept = std::function<void(std::unique_ptr<Transport>)>;
  using ExecutorFor = std::function<asio::any_io_executor()>;

  // Binds and starts serving; throws ferry::Error (UNAVAILABLE when the
  // address cannot be bound, INVALID_ARGUMENT for unreadable files).
  GrpcListener(const Endpoint& endpoint, const TlsOptions& tls, ExecutorFor executor_for, Accept accept);
  ~GrpcListener();
  GrpcListener(const GrpcListener&) = delete;
  GrpcListener& operator=(const GrpcListener&) = delete;

  // The bound address (a port of 0 becomes the real one).
  const Endpoint& endpoint() const;
  // Stops taking new streams; streams still open after `grace` are
  // cancelled. Blocks until gRPC is done with them. Safe to repeat.
  void shutdown(std::chrono::milliseconds grace);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry::rpc
