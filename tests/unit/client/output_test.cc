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

// --progress=json lines (docs/cli.md): what a wrapper reads at each stage.
TEST(ProgressJson, KnownTotalGivesPercentRateAndEta) {
  ProgressBar bar({ProgressOutput::Mode::json, 2}, "upload", "default/v");
  Progress p;
  p.total = 1000;
  p.done = 250;
  p.data_bytes = 200;
  p.hole_bytes = 50;
  p.elapsed = std::chrono::seconds(1);
  EXPECT_EQ(bar.json_line(p, false),
            "{\"operation\":\"upload\",\"volume\":\"default/v\",\"bytes\":250,\"total\":1000,\"data_bytes\":200,"
            "\"hole_bytes\":50,\"percent\":25,\"rate\":250,\"eta_seconds\":3,\"elapsed_seconds\":1,"
            "\"finished\":false}");
}

TEST(ProgressJson, UnknownTotalIsNullUntilTheEnd) {
  ProgressBar bar({ProgressOutput::Mode::json, 2}, "upload", "default/v");
  Progress p;
  p.done = p.data_bytes = 4096;
  p.elapsed = std::chrono::seconds(2);
  const std::string running = bar.json_line(p, false);
  EXPECT_NE(running.find("\"total\":null"), std::string::npos) << running;
  EXPECT_NE(running.find("\"percent\":null"), std::string::npos) << running;
  EXPECT_NE(running.find("\"eta_seconds\":null"), std::string::npos) << running;
  p.finished = true;
  const std::string done = bar.json_line(p, false);
  EXPECT_NE(done.find("\"total\":4096"), std::string::npos) << done;
  EXPECT_NE(done.find("\"percent\":100"), std::string::npos) << done;
  EXPECT_NE(done.find("\"finished\":true"), std::string::npos) << done;
}

TEST(ProgressJson, FailedTransferEndsWithFailedNotFinished) {
  ProgressBar bar({ProgressOutput::Mode::json, 2}, "download", "default/v");
  Progress p;
  p.total = 100;
  p.done = p.hole_bytes = 40;
  p.elapsed = std::chrono::seconds(1);
  const std::string line = bar.json_line(p, true);
  EXPECT_NE(line.find("\"finished\":false"), std::string::npos) << line;
  EXPECT_NE(line.find("\"failed\":true"), std::string::npos) << line;
  EXPECT_NE(line.find("\"bytes\":40"), std::string::npos) << line;
}

TEST(ProgressJson, ResumedCopyCountsSkippedBytes) {
  ProgressBar bar({ProgressOutput::Mode::json, 2}, "copy", "default/v");
  Progress p;
  p.total = p.done = 300;
  p.data_bytes = 100;
  p.hole_bytes = 50;
  p.finished = true;
  const std::string line = bar.json_line(p, false);
  EXPECT_NE(line.find("\"skipped_bytes\":150"), std::string::npos) << line;
}

}  // namespace
}  // namespace ferry::cli
