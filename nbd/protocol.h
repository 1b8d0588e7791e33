// The NBD wire protocol (doc/proto.md of the NBD project): every constant
// the server uses, big-endian load/store, and pure functions that parse
// what a client sends and encode what the server answers. No I/O and no
// Asio here, so the fuzz target and the tests drive these directly.
//
// Layouts (all integers big-endian):
//   request            magic u32 | flags u16 | type u16 | cookie u64 | offset u64 | length u32   (28 bytes)
//   simple reply       magic u32 | error u32 | cookie u64                                        (16 bytes)
//   structured chunk   magic u32 | flags u16 | type u16 | cookie u64 | length u32               (20 bytes)
//   option request     IHAVEOPT u64 | option u32 | length u32                                   (16 bytes)
//   option reply       magic u64 | option u32 | type u32 | length u32                           (20 bytes)
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::nbd {

struct Extent;

// ---------------------------------------------------------------- magics
inline constexpr std::uint64_t nbd_magic = 0x4e42444d41474943ull;        // "NBDMAGIC"
inline constexpr std::uint64_t ihaveopt_magic = 0x49484156454F5054ull;   // "IHAVEOPT"
inline constexpr std::uint64_t option_reply_magic = 0x0003e889045565a9ull;
inline constexpr std::uint32_t request_magic = 0x25609513u;
inline constexpr std::uint32_t simple_reply_magic = 0x67446698u;
inline constexpr std::uint32_t structured_reply_magic = 0x668e33efu;
inline constexpr std::uint32_t extended_request_magic = 0x21e41c71u;  // not accepted: extended headers are refused

// ------------------------------------------------------ handshake flags
// Server (16 bits, after IHAVEOPT).
inline constexpr std::uint16_t flag_fixed_newstyle = 1u << 0;
inline constexpr std::uint16_t flag_no_zeroes = 1u << 1;
// Client (32 bits, the answer).
inline constexpr std::uint32_t flag_c_fixed_newstyle = 1u << 0;
inline constexpr std::uint32_t flag_c_no_zeroes = 1u << 1;

// --------------------------------------------------- transmission flags
inline constexpr std::uint16_t flag_has_flags = 1u << 0;
inline constexpr std::uint16_t flag_read_only = 1u << 1;
inline constexpr std::uint16_t flag_send_flush = 1u << 2;
inline constexpr std::uint16_t flag_send_fua = 1u << 3;
inline constexpr std::uint16_t flag_rotational = 1u << 4;
inline constexpr std::uint16_t flag_send_trim = 1u << 5;
inline constexpr std::uint16_t flag_send_write_zeroes = 1u << 6;
inline constexpr std::uint16_t flag_send_df = 1u << 7;
inline constexpr std::uint16_t flag_can_multi_conn = 1u << 8;
inline constexpr std::uint16_t flag_send_resize = 1u << 9;
inline constexpr std::uint16_t flag_send_cache = 1u << 10;
inline constexpr std::uint16_t flag_send_fast_zero = 1u << 11;
inline constexpr std::uint16_t flag_block_stat_payload = 1u << 12;

// --------------------------------------------------------------- options
inline constexpr std::uint32_t opt_export_name = 1;
inline constexpr std::uint32_t opt_abort = 2;
inline constexpr std::uint32_t opt_list = 3;
inline constexpr std::uint32_t opt_peek_export = 4;
inline constexpr std::uint32_t opt_starttls = 5;
inline constexpr std::uint32_t opt_info = 6;
inline constexpr std::uint32_t opt_go = 7;
inline constexpr std::uint32_t opt_structured_reply = 8;
inline constexpr std::uint32_t opt_list_meta_context = 9;
inline constexpr std::uint32_t opt_set_meta_context = 10;
inline constexpr std::uint32_t opt_extended_headers = 11;

// ---------------------------------------------------- option reply types
inline constexpr std::uint32_t rep_ack = 1;
inline constexpr std::uint32_t rep_server = 2;
inline constexpr std::uint32_t rep_info = 3;
inline constexpr std::uint32_t rep_meta_context = 4;
inline constexpr std::uint32_t rep_flag_error = 1u << 31;
inline constexpr std::uint32_t rep_err_unsup = rep_flag_error | 1;
inline constexpr std::uint32_t rep_err_policy = rep_flag_error | 2;
inline constexpr std::uint32_t rep_err_invalid = rep_flag_error | 3;
inline constexpr std::uint32_t rep_err_platform = rep_flag_error | 4;
inline constexpr std::uint32_t rep_err_tls_reqd = rep_flag_error | 5;
inline constexpr std::uint32_t rep_err_unknown = rep_flag_error | 6;
inline constexpr std::uint32_t rep_err_shutdown = rep_flag_error | 7;
inline constexpr std::uint32_t rep_err_block_size_reqd = rep_flag_error | 8;
inline constexpr std::uint32_t rep_err_too_big = rep_flag_error | 9;
inline constexpr std::uint32_t rep_err_ext_header_reqd = rep_flag_error | 10;

// ------------------------------------------- NBD_REP_INFO information types
inline constexpr std::uint16_t info_export = 0;
inline constexpr std::uint16_t info_name = 1;
inline constexpr std::uint16_t info_description = 2;
inline constexpr std::uint16_t info_block_size = 3;

// -------------------------------------------------------------- commands
inline constexpr std::uint16_t cmd_read = 0;
inline constexpr std::uint16_t cmd_write = 1;
inline constexpr std::uint16_t cmd_disc = 2;
inline constexpr std::uint16_t cmd_flush = 3;
inline constexpr std::uint16_t cmd_trim = 4;
inline constexpr std::uint16_t cmd_cache = 5;
inline constexpr std::uint16_t cmd_write_zeroes = 6;
inline constexpr std::uint16_t cmd_block_status = 7;
inline constexpr std::uint16_t cmd_resize = 8;

// --------------------------------------------------------- command flags
inline constexpr std::uint16_t cmd_flag_fua = 1u << 0;
inline constexpr std::uint16_t cmd_flag_no_hole = 1u << 1;
inline constexpr std::uint16_t cmd_flag_df = 1u << 2;
inline constexpr std::uint16_t cmd_flag_req_one = 1u << 3;
inline constexpr std::uint16_t cmd_flag_fast_zero = 1u << 4;
inline constexpr std::uint16_t cmd_flag_payload_len = 1u << 5;

// ----------------------------------------------------- structured replies
inline constexpr std::uint16_t reply_flag_done = 1u << 0;
inline constexpr std::uint16_t reply_type_none = 0;
inline constexpr std::uint16_t reply_type_offset_data = 1;
inline constexpr std::uint16_t reply_type_offset_hole = 2;
inline constexpr std::uint16_t reply_type_block_status = 5;
inline constexpr std::uint16_t reply_type_block_status_ext = 6;
inline constexpr std::uint16_t reply_type_flag_error = 1u << 15;
inline constexpr std::uint16_t reply_type_error = reply_type_flag_error | 1;
inline constexpr std::uint16_t reply_type_error_offset = reply_type_flag_error | 2;

// ------------------------------------------------------------ NBD errors
// The protocol's own numbers (Linux values), whatever the host's errno.
inline constexpr std::uint32_t nbd_eperm = 1;
inline constexpr std::uint32_t nbd_eio = 5;
inline constexpr std::uint32_t nbd_enomem = 12;
inline constexpr std::uint32_t nbd_einval = 22;
inline constexpr std::uint32_t nbd_enospc = 28;
inline constexpr std::uint32_t nbd_eoverflow = 75;
inline constexpr std::uint32_t nbd_enotsup = 95;
inline constexpr std::uint32_t nbd_eshutdown = 108;

// The one metadata context this server knows.
inline constexpr std::string_view meta_base_allocation = "base:allocation";

// ------------------------------------------------------------- sizes
inline constexpr std::size_t request_size = 28;
inline constexpr std::size_t simple_reply_size = 16;
inline constexpr std::size_t chunk_header_size = 20;
inline constexpr std::size_t option_header_size = 16;
inline constexpr std::size_t option_reply_header_size = 20;
inline constexpr std::size_t export_name_zeroes = 124;
// Longest string (export name, error message) the protocol allows.
inline constexpr std::size_t max_string = 4096;

// ------------------------------------------------- big-endian load/store
inline std::uint16_t load_be16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>((std::uint16_t{p[0]} << 8) | p[1]);
}
inline std::uint32_t load_be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
}
inline std::uint64_t load_be64(const std::uint8_t* p) {
  return (std::uint64_t{load_be32(p)} << 32) | load_be32(p + 4);
}
inline void store_be16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 8);
  p[1] = static_cast<std::uint8_t>(v);
}
inline void store_be32(std::uint8_t* p, std::uint32_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 24);
  p[1] = static_cast<std::uint8_t>(v >> 16);
  p[2] = static_cast<std::uint8_t>(v >> 8);
  p[3] = static_cast<std::uint8_t>(v);
}
inline void store_be64(std::uint8_t* p, std::uint64_t v) {
  store_be32(p, static_cast<std::uint32_t>(v >> 32));
  store_be32(p + 4, static_cast<std::uint32_t>(v));
}

// --------------------------------------------------------- transmission
struct Request {
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint64_t cookie = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  bool operator==(const Request&) const = default;
};

// The request header at the start of `bytes`: nothing if fewer than 28
// bytes are given or the magic is not NBD_REQUEST_MAGIC.
std::optional<Request> parse_request(std::span<const std::uint8_t> bytes);
// The inverse, for clients (tests, the fuzz seeds).
std::array<std::uint8_t, request_size> encode_request(const Request& r);

std::array<std::uint8_t, simple_reply_size> encode_simple_reply(std::uint32_t error, std::uint64_t cookie);
// Writes the 20-byte chunk header at `out`.
void encode_chunk_header(std::uint8_t* out, std::uint16_t flags, std::uint16_t type, std::uint64_t cookie,
                         std::uint32_t length);
std::array<std::uint8_t, chunk_header_size> encode_chunk_header(std::uint16_t flags, std::uint16_t type,
                                                                std::uint64_t cookie, std::uint32_t length);
// A whole NBD_REPLY_TYPE_ERROR chunk (header, error, message; the message
// cut to max_string bytes).
std::vector<std::uint8_t> encode_error_chunk(std::uint16_t flags, std::uint64_t cookie, std::uint32_t error,
                                             std::string_view message);
// A whole NBD_REPLY_TYPE_BLOCK_STATUS chunk for one context.
std::vector<std::uint8_t> encode_block_status_chunk(std::uint16_t flags, std::uint64_t cookie,
                                                    std::uint32_t context_id, std::span<const Extent> extents);

// The extents of [offset, offset + length) out of what a backend returned
// for it (starting at offset, perhaps longer or shorter): empty ones
// dropped, neighbours with the same flags merged, the total cut at
// `length`, only the first kept with `req_one`, at most `max_count`.
std::vector<Extent> trim_extents(std::span<const Extent> extents, std::uint64_t length, bool req_one,
                                 std::size_t max_count = 1u << 16);

// ------------------------------------------------------------ handshake
struct OptionHeader {
  std::uint32_t option = 0;
  std::uint32_t length = 0;
};
// The 16-byte option header: nothing without the IHAVEOPT magic.
std::optional<OptionHeader> parse_option_header(std::span<const std::uint8_t> bytes);
std::array<std::uint8_t, option_header_size> encode_option_header(std::uint32_t option, std::uint32_t length);

std::array<std::uint8_t, option_reply_header_size> encode_option_reply_header(std::uint32_t option,
                                                                              std::uint32_t type,
                                                                              std::uint32_t length);
// A whole option reply: header and payload.
std::vector<std::uint8_t> encode_option_reply(std::uint32_t option, std::uint32_t type,
                                              std::span<const std::uint8_t> payload = {});
std::vector<std::uint8_t> encode_option_reply(std::uint32_t option, std::uint32_t type, std::string_view payload);

// The server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
std::array<std::uint8_t, 18> encode_greeting(std::uint16_t handshake_flags);

// NBD_OPT_INFO / NBD_OPT_GO data: export name and the information asked
// for. Nothing if the lengths do not add up.
struct InfoRequest {
  std::string name;
  std::vector<std::uint16_t> requests;
};
std::optional<InfoRequest> parse_info_request(std::span<const std::uint8_t> data);

// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data.
struct MetaContextRequest {
  std::string export_name;
  std::vector<std::string> queries;
};
std::optional<MetaContextRequest> parse_meta_context_request(std::span<const std::uint8_t> data);

// NBD_REP_INFO payloads.
std::vector<std::uint8_t> encode_info_export(std::uint64_t size, std::uint16_t transmission_flags);
std::vector<std::uint8_t> encode_info_string(std::uint16_t type, std::string_view text);
std::vector<std::uint8_t> encode_info_block_size(std::uint32_t minimum, std::uint32_t preferred,
                                                 std::uint32_t maximum);
// NBD_REP_SERVER payload: name, then a description for people.
std::vector<std::uint8_t> encode_rep_server(std::string_view name, std::string_view description);
// NBD_REP_META_CONTEXT payload.
std::vector<std::uint8_t> encode_rep_meta_context(std::uint32_t id, std::string_view name);
// The NBD_OPT_EXPORT_NAME answer: size, transmission flags, and 124 zero
// bytes unless the client asked for none.
std::vector<std::uint8_t> encode_export_name_reply(std::uint64_t size, std::uint16_t transmission_flags,
                                                   bool no_zeroes);

// ---------------------------------------------------------------- misc
// errno -> NBD error: EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW,
// ENOTSUP (and EOPNOTSUPP), ESHUTDOWN; anything else (0 included) is EIO.
std::uint32_t nbd_error_from_errno(int err);

// For logs: "NBD_CMD_READ", "NBD_OPT_GO", "NBD_REP_ERR_UNSUP",
// "NBD_EINVAL"; unknown values as "NBD_CMD_?(42)".
std::string command_name(std::uint16_t type);
std::string option_name(std::uint32_t option);
std::string option_reply_name(std::uint32_t type);
std::string error_name(std::uint32_t error);

}  // namespace ferry::nbd
