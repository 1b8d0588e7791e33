// A transport that misbehaves on purpose, wrapped around a real one: for
// tests of every error path, and for operators reproducing a field problem
// (ferryd's [fault] section). It can delay each read and write, flip bits,
// drop bytes, and reset the connection after a number of bytes, in the
// bytes this side reads (what the peer sent), writes, or both.
// The faults themselves are in rpc/fault.h.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "rpc/fault.h"
#include "rpc/transport.h"

namespace ferry::rpc {

class FaultTransport final : public Transport {
 public:
  FaultTransport(std::unique_ptr<Transport> inner, FaultOptions options);
  ~FaultTransport() override;

  asio::any_io_executor get_executor() override { return inner_->get_executor(); }
  asio::awaitable<IoResult> read_some(asio::mutable_buffer buffer) override;
  asio::awaitable<IoResult> write_all(std::span<const asio::const_buffer> buffers) override;
  asio::awaitable<std::error_code> wait_readable() override { return inner_->wait_readable(); }
  void set_buffer_size(int bytes) override { inner_->set_buffer_size(bytes); }
  void shutdown_send() override { inner_->shutdown_send(); }
  void close() override { inner_->close(); }

  FaultCounts counts() const { return injector_.counts(); }

 private:
  asio::awaitable<void> wait_delay();

  std::unique_ptr<Transport> inner_;
  FaultOptions options_;
  FaultInjector injector_;
  FaultInjector::Direction read_, write_;
};

}  // namespace ferry::rpc
