// The CLI's sizes, volume names, JSON and exit codes.
#include "client/cli/output.h"

#include <gtest/gtest.h>

namespace ferry::cli {
namespace {

TEST(ParseSize, BinaryUnitsAndPlainBytes) {
  EXPECT_EQ(parse_size("4096"), 4096u);
  EXPECT_EQ(parse_size("1K"), 1024u);
  EXPECT_EQ(parse_size("10G"), 10ull << 30);
  EXPECT_EQ(parse_size("512MiB"), 512ull << 20);
  EXPECT_EQ(parse_size("2gb"), 2ull << 30);
  EXPECT_EQ(parse_size("1.5G"), 3ull << 29);
  EXPECT_EQ(parse_size("1T"), 1ull << 40);
  EXPECT_EQ(parse_size("0"), 0u);
}

TEST(ParseSize, RefusesWhatIsNotASize) {
  for (const char* bad : {"", "G", "12Q", "-1", "1.3B", "1e9", "99999999999999999999", "9000000P", "0x10"})
    EXPECT_FALSE(parse_size(bad).has_value()) << bad;
}

TEST(HumanSize, ReadsNaturally) {
  EXPECT_EQ(human_size(0), "0 B");
  EXPECT_EQ(human_size(1023), "1023 B");
  EXPECT_EQ(human_size(1536), "1.5 KiB");
  EXPECT_EQ(human_size(10ull << 30), "10.0 GiB");
  EXPECT_EQ(human_duration(65), "1:05");
  EXPECT_EQ(human_duration(3725), "1:02:05");
}

TEST(VolumeName, PoolDefaultsToDefault) {
  EXPECT_EQ(parse_volume("disk").pool, "default");
  EXPECT_EQ(parse_volume("disk").name, "disk");
  EXPECT_EQ(parse_volume("images/base.raw").pool, "images");
  EXPECT_EQ(parse_volume("images/base.raw").name, "base.raw");
  EXPECT_EQ(parse_volume("a/b/c").name, "b/c") << "the daemon refuses it, naming the volume";
}

TEST(Json, EscapesAndNumbers) {
  Json j;
  j.field("s", std::string("a\"b\\c\n\x01")).field("n", std::uint64_t{18446744073709551615ull}).field("b", true);
  EXPECT_EQ(j.str(), R"({"s":"a\"b\\c\n\u0001","n":18446744073709551615,"b":true})");
  EXPECT_EQ(Json::array({}), "[]");
}

TEST(ExitCodes, OnePerKindOfFailure) {
  EXPECT_EQ(exit_code_for(Code::not_found), Exit::not_found);
  EXPECT_EQ(exit_code_for(Code::already_exists), Exit::exists);
  EXPECT_EQ(exit_code_for(Code::failed_precondition), Exit::busy);
  EXPECT_EQ(exit_code_for(Code::resource_exhausted), Exit::no_space);
  EXPECT_EQ(exit_code_for(Code::unavailable), Exit::unreachable);
  EXPECT_EQ(exit_code_for(Code::unauthenticated), Exit::denied);
  EXPECT_EQ(exit_code_for(Code::out_of_range), Exit::invalid);
  EXPECT_EQ(exit_code_for(Code::cancelled), Exit::interrupted);
  EXPECT_EQ(exit_code_for(Code::internal), Exit::failed);
}

}  // namespace
}  // namespace ferry::cli
