// Security layers: protection negotiated after the connection is up (the
// SASL security layer). Every byte after the switch point goes through
// encode() on the way out and decode() on the way in.
//
// The switch happens at a frame boundary on each side (DESIGN.md
// "Connection start"): the server decodes from the first byte after the
// CALL that completed authentication and encodes from the first byte after
// its REPLY; the client does the reverse. Connection does the switching
// (hold_reads / resume_reads / send with a layer); LayeredTransport does
// the coding.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "rpc/transport.h"

namespace ferry::rpc {

class SecurityLayer {
 public:
  virtual ~SecurityLayer() = default;
  // Appends the protected form of `in` to `out`. `in` is at most
  // max_input() bytes. Throws ferry::Error.
  virtual void encode(std::span<const std::uint8_t> in, std::vector<std::uint8_t>& out) = 0;
  // Appends whatever plaintext `in` completes to `out` (possibly none: a
  // packet may span reads). Throws ferry::Error (DATA_LOSS) on bad input.
  virtual void decode(std::span<const std::uint8_t> in, std::vector<std::uint8_t>& out) = 0;
  virtual std::size_t max_input() const = 0;
  virtual const char* name() const = 0;
};

// A Transport whose reads and writes go through a SecurityLayer once each
// direction has been switched on. Owns the transport underneath.
class LayeredTransport final : public Transport {
 public:
  explicit LayeredTransport(std::unique_ptr<Transport> inner);

  // From now on reads are decoded; `already_read` holds protected bytes
  // that arrived before the switch was known.
  void start_reading(std::shared_ptr<SecurityLayer> layer, std::span<const std::uint8_t> already_read);
  void start_writing(std::shared_ptr<SecurityLayer> layer);

  asio::any_io_executor get_executor() override { return inner_->get_executor(); }
  asio::awaitable<IoResult> read_some(asio::mutable_buffer buffer) override;
  asio::awaitable<IoResult> write_all(std::span<const asio::const_buffer> buffers) override;
  asio::awaitable<std::error_code> wait_readable() override;
  void set_buffer_size(int bytes) override { inner_->set_buffer_size(bytes); }
  void shutdown_send() override { inner_->shutdown_send(); }
  void close() override { inner_->close(); }

 private:
  std::unique_ptr<Transport> inner_;
  std::shared_ptr<SecurityLayer> read_layer_;
  std::shared_ptr<SecurityLayer> write_layer_;
  std::vector<std::uint8_t> raw_;    // protected bytes read, not yet decoded
  std::vector<std::uint8_t> plain_;  // decoded, not yet handed out
  std::size_t plain_begin_ = 0;
  std::vector<std::uint8_t> out_;
  std::error_code decode_error_;
};

}  // namespace ferry::rpc
