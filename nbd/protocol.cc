#include "nbd/protocol.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "nbd/backend.h"

namespace ferry::nbd {

namespace {

void append_be16(std::vector<std::uint8_t>& out, std::uint16_t v) {
  const std::size_t at = out.size();
  out.resize(at + 2);
  store_be16(out.data() + at, v);
}
void append_be32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  const std::size_t at = out.size();
  out.resize(at + 4);
  store_be32(out.data() + at, v);
}
void append_be64(std::vector<std::uint8_t>& out, std::uint64_t v) {
  const std::size_t at = out.size();
  out.resize(at + 8);
  store_be64(out.data() + at, v);
}
void append(std::vector<std::uint8_t>& out, std::string_view s) {
  const std::size_t at = out.size();
  out.resize(at + s.size());
  if (!s.empty()) std::memcpy(out.data() + at, s.data(), s.size());
}

// Reads big-endian fields off a span, remembering whether it ran short.
class Cursor {
 public:
  explicit Cursor(std::span<const std::uint8_t> data) : data_(data) {}
  bool u16(std::uint16_t& v) {
    if (left() < 2) return false;
    v = load_be16(data_.data() + pos_);
    pos_ += 2;
    return true;
  }
  bool u32(std::uint32_t& v) {
    if (left() < 4) return false;
    v = load_be32(data_.data() + pos_);
    pos_ += 4;
    return true;
  }
  bool string(std::size_t n, std::string& s) {
    if (left() < n) return false;
    s.assign(reinterpret_cast<const char*>(data_.data() + pos_), n);
    pos_ += n;
    return true;
  }
  std::size_t left() const { return data_.size() - pos_; }

 private:
  std::span<const std::uint8_t> data_;
  std::size_t pos_ = 0;
};

std::string unknown_name(const char* prefix, std::uint64_t value) {
  return std::string(prefix) + "?(" + std::to_string(value) + ")";
}

}  // namespace

std::optional<Request> parse_request(std::span<const std::uint8_t> bytes) {
  if (bytes.size() < request_size) return std::nullopt;
  const std::uint8_t* p = bytes.data();
  if (load_be32(p) != request_magic) return std::nullopt;
  Request r;
  r.flags = load_be16(p + 4);
  r.type = load_be16(p + 6);
  r.cookie = load_be64(p + 8);
  r.offset = load_be64(p + 16);
  r.length = load_be32(p + 24);
  return r;
}

std::array<std::uint8_t, request_size> encode_request(const Request& r) {
  std::array<std::uint8_t, request_size> out{};
  store_be32(out.data(), request_magic);
  store_be16(out.data() + 4, r.flags);
  store_be16(out.data() + 6, r.type);
  store_be64(out.data() + 8, r.cookie);
  store_be64(out.data() + 16, r.offset);
  store_be32(out.data() + 24, r.length);
  return out;
}

std::array<std::uint8_t, simple_reply_size> encode_simple_reply(std::uint32_t error, std::uint64_t cookie) {
  std::array<std::uint8_t, simple_reply_size> out{};
  store_be32(out.data(), simple_reply_magic);
  store_be32(out.data() + 4, error);
  store_be64(out.data() + 8, cookie);
  return out;
}

void encode_chunk_header(std::uint8_t* out, std::uint16_t flags, std::uint16_t type, std::uint64_t cookie,
                         std::uint32_t length) {
  store_be32(out, structured_reply_magic);
  store_be16(out + 4, flags);
  store_be16(out + 6, type);
  store_be64(out + 8, cookie);
  store_be32(out + 16, length);
}

std::array<std::uint8_t, chunk_header_size> encode_chunk_header(std::uint16_t flags, std::uint16_t type,
                                                                std::uint64_t cookie, std::uint32_t length) {
  std::array<std::uint8_t, chunk_header_size> out{};
  encode_chunk_header(out.data(), flags, type, cookie, length);
  return out;
}

std::vector<std::uint8_t> encode_error_chunk(std::uint16_t flags, std::uint64_t cookie, std::uint32_t error,
                                             std::string_view message) {
  if (message.size() > max_string) message = message.substr(0, max_string);
  const auto payload = static_cast<std::uint32_t>(4 + 2 + message.size());
  std::vector<std::uint8_t> out(chunk_header_size);
  out.reserve(chunk_header_size + payload);
  encode_chunk_header(out.data(), flags, reply_type_error, cookie, payload);
  append_be32(out, error);
  append_be16(out, static_cast<std::uint16_t>(message.size()));
  append(out, message);
  return out;
}

std::vector<std::uint8_t> encode_block_status_chunk(std::uint16_t flags, std::uint64_t cookie,
                                                    std::uint32_t context_id, std::span<const Extent> extents) {
  const auto payload = static_cast<std::uint32_t>(4 + 8 * extents.size());
  std::vector<std::uint8_t> out(chunk_header_size + payload);
  encode_chunk_header(out.data(), flags, reply_type_block_status, cookie, payload);
  std::uint8_t* p = out.data() + chunk_header_size;
  store_be32(p, context_id);
  p += 4;
  for (const auto& e : extents) {
    store_be32(p, static_cast<std::uint32_t>(std::min<std::uint64_t>(e.length, 0xffffffffu)));
    store_be32(p + 4, e.flags);
    p += 8;
  }
  return out;
}

std::vector<Extent> trim_extents(std::span<const Extent> extents, std::uint64_t length, bool req_one,
                                 std::size_t max_count) {
  std::vector<Extent> out;
  std::uint64_t total = 0;
  // A descriptor's length is 32 bits: a longer run is cut into pieces
  // (only ever the case for a length near 4 GiB, the request maximum).
  constexpr std::uint64_t max_piece = 0xffffffffull & ~std::uint64_t{0xfff};
  for (const auto& e : extents) {
    if (total >= length) break;
    if (e.length == 0) continue;
    std::uint64_t n = std::min(e.length, length - total);
    total += n;
    if (!out.empty() && out.back().flags == e.flags && out.back().length + n <= max_piece) {
      out.back().length += n;
      continue;
    }
    while (n > max_piece) {
      if (out.size() >= max_count) return out;
      out.push_back({max_piece, e.flags});
      n -= max_piece;
    }
    if (out.size() >= max_count) return out;
    out.push_back({n, e.flags});
  }
  if (req_one && out.size() > 1) out.resize(1);
  return out;
}

std::optional<OptionHeader> parse_option_header(std::span<const std::uint8_t> bytes) {
  if (bytes.size() < option_header_size) return std::nullopt;
  if (load_be64(bytes.data()) != ihaveopt_magic) return std::nullopt;
  return OptionHeader{load_be32(bytes.data() + 8), load_be32(bytes.data() + 12)};
}

std::array<std::uint8_t, option_header_size> encode_option_header(std::uint32_t option, std::uint32_t length) {
  std::array<std::uint8_t, option_header_size> out{};
  store_be64(out.data(), ihaveopt_magic);
  store_be32(out.data() + 8, option);
  store_be32(out.data() + 12, length);
  return out;
}

std::array<std::uint8_t, option_reply_header_size> encode_option_reply_header(std::uint32_t option,
                                                                              std::uint32_t type,
                                                                              std::uint32_t length) {
  std::array<std::uint8_t, option_reply_header_size> out{};
  store_be64(out.data(), option_reply_magic);
  store_be32(out.data() + 8, option);
  store_be32(out.data() + 12, type);
  store_be32(out.data() + 16, length);
  return out;
}

std::vector<std::uint8_t> encode_option_reply(std::uint32_t option, std::uint32_t type,
                                              std::span<const std::uint8_t> payload) {
  std::vector<std::uint8_t> out(option_reply_header_size + payload.size());
  store_be64(out.data(), option_reply_magic);
  store_be32(out.data() + 8, option);
  store_be32(out.data() + 12, type);
  store_be32(out.data() + 16, static_cast<std::uint32_t>(payload.size()));
  if (!payload.empty()) std::memcpy(out.data() + option_reply_header_size, payload.data(), payload.size());
  return out;
}

std::vector<std::uint8_t> encode_option_reply(std::uint32_t option, std::uint32_t type, std::string_view payload) {
  return encode_option_reply(
      option, type, std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(payload.data()), payload.size()));
}

std::array<std::uint8_t, 18> encode_greeting(std::uint16_t handshake_flags) {
  std::array<std::uint8_t, 18> out{};
  store_be64(out.data(), nbd_magic);
  store_be64(out.data() + 8, ihaveopt_magic);
  store_be16(out.data() + 16, handshake_flags);
  return out;
}

std::optional<InfoRequest> parse_info_request(std::span<const std::uint8_t> data) {
  Cursor c(data);
  InfoRequest r;
  std::uint32_t name_length = 0;
  std::uint16_t count = 0;
  if (!c.u32(name_length) || name_length > max_string || !c.string(name_length, r.name) || !c.u16(count))
    return std::nullopt;
  if (c.left() != std::size_t{count} * 2) return std::nullopt;
  r.requests.resize(count);
  for (auto& type : r.requests) c.u16(type);
  return r;
}

std::optional<MetaContextRequest> parse_meta_context_request(std::span<const std::uint8_t> data) {
  Cursor c(data);
  MetaContextRequest r;
  std::uint32_t name_length = 0;
  std::uint32_t count = 0;
  if (!c.u32(name_length) || name_length > max_string || !c.string(name_length, r.export_name) || !c.u32(count))
    return std::nullopt;
  // Each query takes at least its 4-byte length: a count larger than the
  // rest allows is a lie, refused before anything is reserved for it.
  if (count > c.left() / 4) return std::nullopt;
  r.queries.reserve(count);
  for (std::uint32_t i = 0; i < count; ++i) {
    std::uint32_t n = 0;
    std::string q;
    if (!c.u32(n) || n > max_string || !c.string(n, q)) return std::nullopt;
    r.queries.push_back(std::move(q));
  }
  if (c.left() != 0) return std::nullopt;
  return r;
}

std::vector<std::uint8_t> encode_info_export(std::uint64_t size, std::uint16_t transmission_flags) {
  std::vector<std::uint8_t> out;
  out.reserve(12);
  append_be16(out, info_export);
  append_be64(out, size);
  append_be16(out, transmission_flags);
  return out;
}

std::vector<std::uint8_t> encode_info_string(std::uint16_t type, std::string_view text) {
  if (text.size() > max_string) text = text.substr(0, max_string);
  std::vector<std::uint8_t> out;
  out.reserve(2 + text.size());
  append_be16(out, type);
  append(out, text);
  return out;
}

std::vector<std::uint8_t> encode_info_block_size(std::uint32_t minimum, std::uint32_t preferred,
                                                 std::uint32_t maximum) {
  std::vector<std::uint8_t> out;
  out.reserve(14);
  append_be16(out, info_block_size);
  append_be32(out, minimum);
  append_be32(out, preferred);
  append_be32(out, maximum);
  return out;
}

std::vector<std::uint8_t> encode_rep_server(std::string_view name, std::string_view description) {
  if (name.size() > max_string) name = name.substr(0, max_string);
  if (description.size() > max_string) description = description.substr(0, max_string);
  std::vector<std::uint8_t> out;
  out.reserve(4 + name.size() + description.size());
  append_be32(out, static_cast<std::uint32_t>(name.size()));
  append(out, name);
  append(out, description);
  return out;
}

std::vector<std::uint8_t> encode_rep_meta_context(std::uint32_t id, std::string_view name) {
  std::vector<std::uint8_t> out;
  out.reserve(4 + name.size());
  append_be32(out, id);
  append(out, name);
  return out;
}

std::vector<std::uint8_t> encode_export_name_reply(std::uint64_t size, std::uint16_t transmission_flags,
                                                   bool no_zeroes) {
  std::vector<std::uint8_t> out;
  out.reserve(10 + export_name_zeroes);
  append_be64(out, size);
  append_be16(out, transmission_flags);
  if (!no_zeroes) out.resize(out.size() + export_name_zeroes, 0);
  return out;
}

std::uint32_t nbd_error_from_errno(int err) {
  switch (err) {
    case EPERM:
      return nbd_eperm;
    case EIO:
      return nbd_eio;
    case ENOMEM:
      return nbd_enomem;
    case EINVAL:
      return nbd_einval;
    case ENOSPC:
      return nbd_enospc;
    case EOVERFLOW:
      return nbd_eoverflow;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
      return nbd_enotsup;
    case ESHUTDOWN:
      return nbd_eshutdown;
    default:
      return nbd_eio;
  }
}

std::string command_name(std::uint16_t type) {
  switch (type) {
    case cmd_read: return "NBD_CMD_READ";
    case cmd_write: return "NBD_CMD_WRITE";
    case cmd_disc: return "NBD_CMD_DISC";
    case cmd_flush: return "NBD_CMD_FLUSH";
    case cmd_trim: return "NBD_CMD_TRIM";
    case cmd_cache: return "NBD_CMD_CACHE";
    case cmd_write_zeroes: return "NBD_CMD_WRITE_ZEROES";
    case cmd_block_status: return "NBD_CMD_BLOCK_STATUS";
    case cmd_resize: return "NBD_CMD_RESIZE";
    default: return unknown_name("NBD_CMD_", type);
  }
}

std::string option_name(std::uint32_t option) {
  switch (option) {
    case opt_export_name: return "NBD_OPT_EXPORT_NAME";
    case opt_abort: return "NBD_OPT_ABORT";
    case opt_list: return "NBD_OPT_LIST";
    case opt_peek_export: return "NBD_OPT_PEEK_EXPORT";
    case opt_starttls: return "NBD_OPT_STARTTLS";
    case opt_info: return "NBD_OPT_INFO";
    case opt_go: return "NBD_OPT_GO";
    case opt_structured_reply: return "NBD_OPT_STRUCTURED_REPLY";
    case opt_list_meta_context: return "NBD_OPT_LIST_META_CONTEXT";
    case opt_set_meta_context: return "NBD_OPT_SET_META_CONTEXT";
    case opt_extended_headers: return "NBD_OPT_EXTENDED_HEADERS";
    default: return unknown_name("NBD_OPT_", option);
  }
}

std::string option_reply_name(std::uint32_t type) {
  switch (type) {
    case rep_ack: return "NBD_REP_ACK";
    case rep_server: return "NBD_REP_SERVER";
    case rep_info: return "NBD_REP_INFO";
    case rep_meta_context: return "NBD_REP_META_CONTEXT";
    case rep_err_unsup: return "NBD_REP_ERR_UNSUP";
    case rep_err_policy: return "NBD_REP_ERR_POLICY";
    case rep_err_invalid: return "NBD_REP_ERR_INVALID";
    case rep_err_platform: return "NBD_REP_ERR_PLATFORM";
    case rep_err_tls_reqd: return "NBD_REP_ERR_TLS_REQD";
    case rep_err_unknown: return "NBD_REP_ERR_UNKNOWN";
    case rep_err_shutdown: return "NBD_REP_ERR_SHUTDOWN";
    case rep_err_block_size_reqd: return "NBD_REP_ERR_BLOCK_SIZE_REQD";
    case rep_err_too_big: return "NBD_REP_ERR_TOO_BIG";
    case rep_err_ext_header_reqd: return "NBD_REP_ERR_EXT_HEADER_REQD";
    default: return unknown_name("NBD_REP_", type);
  }
}

std::string error_name(std::uint32_t error) {
  switch (error) {
    case 0: return "OK";
    case nbd_eperm: return "NBD_EPERM";
    case nbd_eio: return "NBD_EIO";
    case nbd_enomem: return "NBD_ENOMEM";
    case nbd_einval: return "NBD_EINVAL";
    case nbd_enospc: return "NBD_ENOSPC";
    case nbd_eoverflow: return "NBD_EOVERFLOW";
    case nbd_enotsup: return "NBD_ENOTSUP";
    case nbd_eshutdown: return "NBD_ESHUTDOWN";
    default: return unknown_name("NBD_E", error);
  }
}

}  // namespace ferry::nbd
