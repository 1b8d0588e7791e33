#include "rpc/security_layer.h"

#include <cstring>
#include <spdlog/spdlog.h>

#include "rpc/error.h"

namespace ferry::rpc {

LayeredTransport::LayeredTransport(std::unique_ptr<Transport> inner) : inner_(std::move(inner)) {
  peer_ = inner_->peer();
}

void LayeredTransport::start_reading(std::shared_ptr<SecurityLayer> layer,
                                     std::span<const std::uint8_t> already_read) {
  read_layer_ = std::move(layer);
  if (already_read.empty()) return;
  try {
    read_layer_->decode(already_read, plain_);
  } catch (const Error& e) {
    spdlog::warn("{} layer: cannot decode data from {}: {}", read_layer_->name(), peer_.address, e.message());
    decode_error_ = std::make_error_code(std::errc::bad_message);
  }
}

void LayeredTransport::start_writing(std::shared_ptr<SecurityLayer> layer) { write_layer_ = std::move(layer); }

asio::awaitable<IoResult> LayeredTransport::read_some(asio::mutable_buffer buffer) {
  if (!read_layer_) co_return co_await inner_->read_some(buffer);
  while (plain_begin_ == plain_.size()) {
    plain_.clear();
    plain_begin_ = 0;
    if (decode_error_) co_return IoResult{decode_error_, 0};
    raw_.resize(64 * 1024);
    auto [ec, n] = co_await inner_->read_some(asio::buffer(raw_));
    if (ec) co_return IoResult{ec, 0};
    try {
      read_layer_->decode(std::span<const std::uint8_t>(raw_.data(), n), plain_);
    } catch (const Error& e) {
      spdlog::warn("{} layer: cannot decode data from {}: {}", read_layer_->name(), peer_.address, e.message());
      co_return IoResult{std::make_error_code(std::errc::bad_message), 0};
    }
  }
  const std::size_t n = std::min(buffer.size(), plain_.size() - plain_begin_);
  std::memcpy(buffer.data(), plain_.data() + plain_begin_, n);
  plain_begin_ += n;
  co_return IoResult{std::error_code{}, n};
}

asio::awaitable<IoResult> LayeredTransport::write_all(std::span<const asio::const_buffer> buffers) {
  if (!write_layer_) co_return co_await inner_->write_all(buffers);
  // Gather the plaintext into pieces of at most max_input() bytes (a
  // frame prefix and its body usually share one packet), encode each, and
  // write the lot at once.
  const std::size_t max_in = write_layer_->max_input();
  std::vector<std::uint8_t> piece;
  piece.reserve(max_in);
  out_.clear();
  std::size_t total = 0;
  try {
    for (const auto& b : buffers) {
      auto* p = static_cast<const std::uint8_t*>(b.data());
      std::size_t n = b.size();
      total += n;
      while (n > 0) {
        const std::size_t take = std::min(n, max_in - piece.size());
        piece.insert(piece.end(), p, p + take);
        p += take;
        n -= take;
        if (piece.size() == max_in) {
          write_layer_->encode(piece, out_);
          piece.clear();
        }
      }
    }
    if (!piece.empty()) write_layer_->encode(piece, out_);
  } catch (const Error& e) {
    spdlog::error("{} layer: cannot encode data for {}: {}", write_layer_->name(), peer_.address, e.message());
    co_return IoResult{std::make_error_code(std::errc::bad_message), 0};
  }
  asio::const_buffer whole(out_.data(), out_.size());
  auto [ec, n] = co_await inner_->write_all(std::span<const asio::const_buffer>(&whole, 1));
  co_return IoResult{ec, ec ? 0 : total};
}

asio::awaitable<std::error_code> LayeredTransport::wait_readable() {
  if (plain_begin_ < plain_.size()) co_return std::error_code{};
  co_return co_await inner_->wait_readable();
}

}  // namespace ferry::rpc
