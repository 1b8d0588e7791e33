// The NBD wire helpers (nbd/protocol.h): byte layouts checked against
// literal bytes written out field by field from the protocol document.
#include "nbd/protocol.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <vector>

#include "nbd/backend.h"

namespace ferry::nbd {
namespace {

using Bytes = std::vector<std::uint8_t>;

template <std::size_t N>
Bytes bytes_of(const std::array<std::uint8_t, N>& a) {
  return Bytes(a.begin(), a.end());
}

TEST(NbdProtocol, ConstantsHaveTheProtocolsValues) {
  EXPECT_EQ(nbd_magic, 0x4e42444d41474943ull);
  EXPECT_EQ(ihaveopt_magic, 0x49484156454F5054ull);
  EXPECT_EQ(option_reply_magic, 0x3e889045565a9ull);
  EXPECT_EQ(request_magic, 0x25609513u);
  EXPECT_EQ(simple_reply_magic, 0x67446698u);
  EXPECT_EQ(structured_reply_magic, 0x668e33efu);
  EXPECT_EQ(opt_go, 7u);
  EXPECT_EQ(opt_structured_reply, 8u);
  EXPECT_EQ(opt_list_meta_context, 9u);
  EXPECT_EQ(opt_set_meta_context, 10u);
  EXPECT_EQ(opt_extended_headers, 11u);
  EXPECT_EQ(rep_err_unsup, 0x80000001u);
  EXPECT_EQ(rep_err_unknown, 0x80000006u);
  EXPECT_EQ(cmd_block_status, 7);
  EXPECT_EQ(flag_send_fast_zero, 1u << 11);
  EXPECT_EQ(reply_type_error, 0x8001);
  EXPECT_EQ(reply_type_block_status, 5);
}

TEST(NbdProtocol, BigEndianLoadsAndStoresRoundTrip) {
  std::uint8_t b[8];
  store_be16(b, 0x1234);
  EXPECT_EQ(b[0], 0x12);
  EXPECT_EQ(b[1], 0x34);
  EXPECT_EQ(load_be16(b), 0x1234);
  store_be32(b, 0xdeadbeef);
  EXPECT_EQ(Bytes(b, b + 4), (Bytes{0xde, 0xad, 0xbe, 0xef}));
  EXPECT_EQ(load_be32(b), 0xdeadbeefu);
  store_be64(b, 0x0102030405060708ull);
  EXPECT_EQ(Bytes(b, b + 8), (Bytes{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(load_be64(b), 0x0102030405060708ull);
}

TEST(NbdProtocol, RequestHeaderParsesEveryField) {
  const Bytes header = {
      0x25, 0x60, 0x95, 0x13,                          // NBD_REQUEST_MAGIC
      0x00, 0x05,                                      // flags: FUA | DF
      0x00, 0x01,                                      // type: NBD_CMD_WRITE
      0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,  // cookie
      0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x02, 0x00,  // offset 4 GiB + 512
      0x00, 0x02, 0x00, 0x00,                          // length 128 KiB
  };
  const auto r = parse_request(header);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->flags, cmd_flag_fua | cmd_flag_df);
  EXPECT_EQ(r->type, cmd_write);
  EXPECT_EQ(r->cookie, 0x1122334455667788ull);
  EXPECT_EQ(r->offset, (std::uint64_t{1} << 32) + 512);
  EXPECT_EQ(r->length, 128u << 10);
  EXPECT_EQ(bytes_of(encode_request(*r)), header);
}

TEST(NbdProtocol, RequestWithWrongMagicOrTooShortIsRefused) {
  Bytes header(28, 0);
  EXPECT_FALSE(parse_request(header));
  store_be32(header.data(), request_magic);
  EXPECT_TRUE(parse_request(header));
  EXPECT_FALSE(parse_request(std::span<const std::uint8_t>(header.data(), 27)));
  store_be32(header.data(), extended_request_magic);
  EXPECT_FALSE(parse_request(header));
}

TEST(NbdProtocol, SimpleReplyIsMagicErrorCookie) {
  EXPECT_EQ(bytes_of(encode_simple_reply(nbd_einval, 0x0102030405060708ull)),
            (Bytes{0x67, 0x44, 0x66, 0x98,                            // NBD_SIMPLE_REPLY_MAGIC
                   0x00, 0x00, 0x00, 0x16,                            // error 22
                   0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08}));  // cookie
}

TEST(NbdProtocol, StructuredChunkHeaderIsMagicFlagsTypeCookieLength) {
  EXPECT_EQ(bytes_of(encode_chunk_header(reply_flag_done, reply_type_offset_data, 7, 0x10008)),
            (Bytes{0x66, 0x8e, 0x33, 0xef,                    // NBD_STRUCTURED_REPLY_MAGIC
                   0x00, 0x01,                                // NBD_REPLY_FLAG_DONE
                   0x00, 0x01,                                // NBD_REPLY_TYPE_OFFSET_DATA
                   0, 0, 0, 0, 0, 0, 0, 7,                    // cookie
                   0x00, 0x01, 0x00, 0x08}));                 // length
}

TEST(NbdProtocol, ErrorChunkCarriesErrorAndMessage) {
  EXPECT_EQ(encode_error_chunk(reply_flag_done, 3, nbd_eperm, "ro"),
            (Bytes{0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x80, 0x01,  // magic, DONE, NBD_REPLY_TYPE_ERROR
                   0, 0, 0, 0, 0, 0, 0, 3,                          // cookie
                   0, 0, 0, 8,                                      // length: 4 + 2 + 2
                   0, 0, 0, 1,                                      // EPERM
                   0, 2, 'r', 'o'}));                               // message
}

TEST(NbdProtocol, BlockStatusChunkListsDescriptorsAfterTheContextId) {
  const std::vector<Extent> extents = {{4096, 0}, {8192, state_hole | state_zero}};
  EXPECT_EQ(encode_block_status_chunk(reply_flag_done, 9, 1, extents),
            (Bytes{0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x05,  // magic, DONE, BLOCK_STATUS
                   0, 0, 0, 0, 0, 0, 0, 9,                          // cookie
                   0, 0, 0, 20,                                     // length: 4 + 2 * 8
                   0, 0, 0, 1,                                      // context id
                   0, 0, 0x10, 0, 0, 0, 0, 0,                       // 4096, data
                   0, 0, 0x20, 0, 0, 0, 0, 3}));                    // 8192, hole | zero
}

TEST(NbdProtocol, OptionReplyHeaderAndPayload) {
  EXPECT_EQ(encode_option_reply(opt_go, rep_err_unknown, std::string_view("no")),
            (Bytes{0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,  // option reply magic
                   0, 0, 0, 7,                                      // NBD_OPT_GO
                   0x80, 0, 0, 6,                                   // NBD_REP_ERR_UNKNOWN
                   0, 0, 0, 2,                                      // length
                   'n', 'o'}));
  EXPECT_EQ(encode_option_reply(opt_abort, rep_ack).size(), 20u);
}

TEST(NbdProtocol, GreetingIsNbdmagicIhaveoptFlags) {
  EXPECT_EQ(bytes_of(encode_greeting(flag_fixed_newstyle | flag_no_zeroes)),
            (Bytes{'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C', 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 3}));
}

TEST(NbdProtocol, OptionHeaderNeedsIhaveopt) {
  auto h = encode_option_header(opt_list, 0);
  const auto parsed = parse_option_header(h);
  ASSERT_TRUE(parsed);
  EXPECT_EQ(parsed->option, opt_list);
  EXPECT_EQ(parsed->length, 0u);
  h[0] ^= 1;
  EXPECT_FALSE(parse_option_header(h));
}

TEST(NbdProtocol, InfoRequestParsesNameAndRequests) {
  const Bytes data = {0, 0, 0, 3, 'd', 'i', 's',  // name
                      0, 2,                       // two requests
                      0, 1, 0, 3};                // NAME, BLOCK_SIZE
  const auto r = parse_info_request(data);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->name, "dis");
  EXPECT_EQ(r->requests, (std::vector<std::uint16_t>{info_name, info_block_size}));
  // Lengths that do not add up.
  EXPECT_FALSE(parse_info_request(Bytes{0, 0, 0, 9, 'd'}));
  EXPECT_FALSE(parse_info_request(Bytes{0, 0, 0, 0, 0, 2, 0, 1}));
  EXPECT_FALSE(parse_info_request(Bytes{0, 0, 0, 0, 0, 0, 0xff}));
}

TEST(NbdProtocol, MetaContextRequestParsesExportAndQueries) {
  Bytes data = {0, 0, 0, 1, 'x', 0, 0, 0, 2};
  auto add = [&](std::string_view q) {
    std::uint8_t n[4];
    store_be32(n, static_cast<std::uint32_t>(q.size()));
    data.insert(data.end(), n, n + 4);
    data.insert(data.end(), q.begin(), q.end());
  };
  add("base:allocation");
  add("qemu:dirty-bitmap:a");
  const auto r = parse_meta_context_request(data);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->export_name, "x");
  EXPECT_EQ(r->queries, (std::vector<std::string>{"base:allocation", "qemu:dirty-bitmap:a"}));
  data.push_back(0);  // trailing garbage
  EXPECT_FALSE(parse_meta_context_request(data));
  // A count the data cannot hold.
  EXPECT_FALSE(parse_meta_context_request(Bytes{0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}));
}

TEST(NbdProtocol, InfoPayloadsAndExportNameReply) {
  EXPECT_EQ(encode_info_export(0x100000, 0x0103),
            (Bytes{0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x03}));
  EXPECT_EQ(encode_info_block_size(1, 4096, 32u << 20),
            (Bytes{0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0}));
  EXPECT_EQ(encode_info_string(info_name, "ab"), (Bytes{0, 1, 'a', 'b'}));
  EXPECT_EQ(encode_rep_server("ab", "c"), (Bytes{0, 0, 0, 2, 'a', 'b', 'c'}));
  EXPECT_EQ(encode_rep_meta_context(1, "base:"), (Bytes{0, 0, 0, 1, 'b', 'a', 's', 'e', ':'}));
  const auto full = encode_export_name_reply(512, flag_has_flags, false);
  ASSERT_EQ(full.size(), 8u + 2u + 124u);
  EXPECT_EQ(Bytes(full.begin(), full.begin() + 10), (Bytes{0, 0, 0, 0, 0, 0, 2, 0, 0, 1}));
  EXPECT_EQ(Bytes(full.begin() + 10, full.end()), Bytes(124, 0));
  EXPECT_EQ(encode_export_name_reply(512, flag_has_flags, true).size(), 10u);
}

TEST(NbdProtocol, TrimExtentsCutsMergesAndHonoursReqOne) {
  const std::vector<Extent> in = {{100, 0}, {0, 3}, {50, 0}, {200, 3}, {1000, 0}};
  EXPECT_EQ(trim_extents(in, 400, false), (std::vector<Extent>{{150, 0}, {200, 3}, {50, 0}}));
  EXPECT_EQ(trim_extents(in, 400, true), (std::vector<Extent>{{150, 0}}));
  EXPECT_EQ(trim_extents(in, 120, false), (std::vector<Extent>{{120, 0}}));
  EXPECT_EQ(trim_extents(in, 10000, false, 2), (std::vector<Extent>{{150, 0}, {200, 3}}));
  EXPECT_TRUE(trim_extents({}, 10, false).empty());
}

TEST(NbdProtocol, ErrnoMapsToNbdErrors) {
  EXPECT_EQ(nbd_error_from_errno(EPERM), nbd_eperm);
  EXPECT_EQ(nbd_error_from_errno(EIO), nbd_eio);
  EXPECT_EQ(nbd_error_from_errno(ENOMEM), nbd_enomem);
  EXPECT_EQ(nbd_error_from_errno(EINVAL), nbd_einval);
  EXPECT_EQ(nbd_error_from_errno(ENOSPC), nbd_enospc);
  EXPECT_EQ(nbd_error_from_errno(EOVERFLOW), nbd_eoverflow);
  EXPECT_EQ(nbd_error_from_errno(ENOTSUP), nbd_enotsup);
  EXPECT_EQ(nbd_error_from_errno(EOPNOTSUPP), nbd_enotsup);
  EXPECT_EQ(nbd_error_from_errno(ESHUTDOWN), nbd_eshutdown);
  EXPECT_EQ(nbd_error_from_errno(0), nbd_eio);
  EXPECT_EQ(nbd_error_from_errno(EACCES), nbd_eio);
  EXPECT_EQ(nbd_error_from_errno(EDQUOT), nbd_eio);
}

TEST(NbdProtocol, NamesForLogs) {
  EXPECT_EQ(command_name(cmd_block_status), "NBD_CMD_BLOCK_STATUS");
  EXPECT_EQ(command_name(42), "NBD_CMD_?(42)");
  EXPECT_EQ(option_name(opt_go), "NBD_OPT_GO");
  EXPECT_EQ(option_name(99), "NBD_OPT_?(99)");
  EXPECT_EQ(option_reply_name(rep_err_policy), "NBD_REP_ERR_POLICY");
  EXPECT_EQ(error_name(nbd_enospc), "NBD_ENOSPC");
}

}  // namespace
}  // namespace ferry::nbd
