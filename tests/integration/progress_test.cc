// `ferry --progress=json` (and --progress-fd) against a real ferryd: every
// line is a JSON object, bytes only grow, the last line is finished with
// bytes == total and data + holes == bytes, and a download to stdout keeps
// stdout to the volume's bytes alone.
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "tests/integration/ferryd_process.h"
#include "tests/integration/test_files.h"

namespace ferry::testing {
namespace {

using google::protobuf::Struct;
using google::protobuf::Value;

std::string sh_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

double number(const Struct& s, const std::string& key) {
  const auto it = s.fields().find(key);
  if (it == s.fields().end() || it->second.kind_case() != Value::kNumberValue) {
    ADD_FAILURE() << key << " is not a number";
    return -1;
  }
  return it->second.number_value();
}

class ProgressJsonTest : public ::testing::Test {
 protected:
  // Runs ferry with `args` after -c; stdout, stderr and (with `redirect`,
  // e.g. "3>FILE") other descriptors go to files.
  int ferry(const std::vector<std::string>& args, const std::string& redirect = {}) {
    std::string cmd = "exec " + sh_quote(ferry_cli_path()) + " -c " + sh_quote(d_.unix_uri());
    for (const auto& a : args) cmd += " " + sh_quote(a);
    cmd += " >" + sh_quote(out_path()) + " 2>" + sh_quote(err_path()) + " " + redirect;
    return run_command({"/bin/sh", "-c", cmd}, nullptr);
  }
  std::string out_path() const { return files_.path() + "/stdout"; }
  std::string err_path() const { return files_.path() + "/stderr"; }
  std::string file(const std::string& name) const { return files_.path() + "/" + name; }

  // Checks the JSON progress lines of one transfer; returns the last one.
  Struct check_lines(const std::string& text, const std::string& operation, const std::string& volume,
                     std::uint64_t expect_total) {
    const auto lines = lines_of(text);
    EXPECT_FALSE(lines.empty()) << "no progress lines";
    Struct last;
    double bytes_before = -1;
    for (std::size_t i = 0; i < lines.size(); ++i) {
      Struct s;
      const auto status = google::protobuf::util::JsonStringToMessage(lines[i], &s);
      EXPECT_TRUE(status.ok()) << "line " << i << " is not JSON: " << lines[i];
      if (!status.ok()) continue;
      for (const char* key : {"operation", "volume", "bytes", "total", "data_bytes", "hole_bytes", "percent", "rate",
                              "eta_seconds", "elapsed_seconds", "finished"})
        EXPECT_TRUE(s.fields().count(key)) << key << " missing in " << lines[i];
      EXPECT_EQ(s.fields().at("operation").string_value(), operation) << lines[i];
      EXPECT_EQ(s.fields().at("volume").string_value(), volume) << lines[i];
      const double bytes = number(s, "bytes");
      EXPECT_GE(bytes, bytes_before) << "bytes went down at line " << i << ": " << lines[i];
      bytes_before = bytes;
      EXPECT_EQ(number(s, "data_bytes") + number(s, "hole_bytes"), bytes) << lines[i];
      EXPECT_EQ(number(s, "total"), static_cast<double>(expect_total)) << lines[i];
      const bool final_line = i + 1 == lines.size();
      EXPECT_EQ(s.fields().at("finished").bool_value(), final_line) << lines[i];
      last = s;
    }
    EXPECT_EQ(number(last, "bytes"), static_cast<double>(expect_total)) << "final line: " << lines.back();
    EXPECT_EQ(number(last, "percent"), 100.0);
    EXPECT_EQ(number(last, "eta_seconds"), 0.0);
    return last;
  }

  FerrydProcess d_;
  TempDir files_;
};

// 48 MiB: data in a third of it, the rest holes.
constexpr std::uint64_t kSize = 48 * MiB;
const std::vector<std::pair<std::uint64_t, std::uint64_t>> kExtents = {{0, 4 * MiB}, {12 * MiB, 8 * MiB},
                                                                       {40 * MiB, 4 * MiB}};

TEST_F(ProgressJsonTest, UploadPrintsJsonLinesEndingFinished) {
  make_file(file("disk.img"), kSize, kExtents, 7);
  ASSERT_EQ(ferry({"--progress=json", "vol-upload", "--create", "default/up", file("disk.img")}), 0)
      << slurp(err_path());
  const Struct last = check_lines(slurp(err_path()), "upload", "default/up", kSize);
  EXPECT_EQ(number(last, "data_bytes"), static_cast<double>(16 * MiB)) << "the data extents, sent as data";
  EXPECT_NE(slurp(out_path()).find("uploaded default/up"), std::string::npos) << "the summary stays on stdout";
  EXPECT_EQ(file_hash(d_.pool_dir() + "/up"), file_hash(file("disk.img")));
}

TEST_F(ProgressJsonTest, DownloadToStdoutKeepsStdoutToTheData) {
  make_file(file("disk.img"), kSize, kExtents, 8);
  ASSERT_EQ(ferry({"--progress=none", "vol-upload", "--create", "default/down", file("disk.img")}), 0);
  ASSERT_EQ(ferry({"--progress=json", "vol-download", "default/down", "-"}), 0) << slurp(err_path());
  // stdout is the volume's bytes and nothing else.
  EXPECT_EQ(size_of(out_path()), kSize);
  EXPECT_EQ(file_hash(out_path()), file_hash(file("disk.img")));
  // stderr: the progress lines, then the summary that stdout could not take.
  std::string err = slurp(err_path());
  const auto summary = err.rfind("downloaded default/down to -: ");
  ASSERT_NE(summary, std::string::npos) << err;
  EXPECT_EQ(err.find('\n', summary), err.size() - 1) << "the summary is the last line:\n" << err;
  err.resize(summary);
  check_lines(err, "download", "default/down", kSize);
}

TEST_F(ProgressJsonTest, ProgressFdTakesTheLinesAwayFromStderr) {
  make_file(file("disk.img"), kSize, kExtents, 9);
  ASSERT_EQ(ferry({"--progress-fd=3", "--quiet", "vol-upload", "--create", "default/fd", file("disk.img")},
                  "3>" + sh_quote(file("progress.jsonl"))),
            0)
      << slurp(err_path());
  check_lines(slurp(file("progress.jsonl")), "upload", "default/fd", kSize);
  EXPECT_EQ(slurp(err_path()), "") << "--progress-fd: nothing on stderr";
  EXPECT_EQ(slurp(out_path()), "") << "--quiet: no summary; JSON progress was asked for, so it is still written";
  ASSERT_EQ(ferry({"--progress-fd", "3", "vol-download", "default/fd", file("back.img")},
                  "3>" + sh_quote(file("progress2.jsonl"))),
            0)
      << slurp(err_path());
  check_lines(slurp(file("progress2.jsonl")), "download", "default/fd", kSize);
}

TEST_F(ProgressJsonTest, CopyToALocalFileReportsProgress) {
  make_file(file("disk.img"), kSize, kExtents, 10);
  ASSERT_EQ(ferry({"--progress=none", "vol-upload", "--create", "default/src", file("disk.img")}), 0);
  ASSERT_EQ(ferry({"--progress=json", "vol-copy", "default/src", file("copy.img")}), 0) << slurp(err_path());
  check_lines(slurp(err_path()), "copy-from-volume", "default/src", kSize);
  EXPECT_EQ(file_hash(file("copy.img")), file_hash(file("disk.img")));
}

TEST_F(ProgressJsonTest, CopyJobBetweenDaemonsReportsProgress) {
  make_file(file("disk.img"), kSize, kExtents, 11);
  ASSERT_EQ(ferry({"--progress=none", "vol-upload", "--create", "default/from", file("disk.img")}), 0);
  // The daemon copies to itself: the job runs as it would between two.
  ASSERT_EQ(ferry({"--progress=json", "vol-copy", "default/from", d_.unix_uri() + "/default/to"}), 0)
      << slurp(err_path());
  check_lines(slurp(err_path()), "copy", "default/from", kSize);
  EXPECT_EQ(file_hash(d_.pool_dir() + "/to"), file_hash(file("disk.img")));
}

TEST_F(ProgressJsonTest, UploadFromStdinHasNoTotalUntilTheEnd) {
  make_file(file("disk.img"), kSize, kExtents, 12);
  ASSERT_EQ(ferry({"vol-create", "default/pipe", std::to_string(kSize)}), 0) << slurp(err_path());
  // Through a pipe: no size to find out beforehand.
  ASSERT_EQ(run_command({"/bin/sh", "-c",
                         "cat " + sh_quote(file("disk.img")) + " | " + sh_quote(ferry_cli_path()) + " -c " +
                             sh_quote(d_.unix_uri()) +
                             " --progress=json vol-upload default/pipe - >" + sh_quote(out_path()) +
                             " 2>" + sh_quote(err_path())},
                        nullptr),
            0)
      << slurp(err_path());
  const auto lines = lines_of(slurp(err_path()));
  ASSERT_FALSE(lines.empty());
  double bytes_before = -1;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    Struct s;
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(lines[i], &s).ok()) << lines[i];
    const bool final_line = i + 1 == lines.size();
    EXPECT_EQ(s.fields().at("finished").bool_value(), final_line) << lines[i];
    EXPECT_GE(number(s, "bytes"), bytes_before) << lines[i];
    bytes_before = number(s, "bytes");
    EXPECT_EQ(number(s, "data_bytes") + number(s, "hole_bytes"), bytes_before) << lines[i];
    if (final_line) {
      EXPECT_EQ(number(s, "total"), static_cast<double>(kSize)) << lines[i];
      EXPECT_EQ(number(s, "bytes"), static_cast<double>(kSize)) << lines[i];
    } else {
      EXPECT_EQ(s.fields().at("total").kind_case(), Value::kNullValue) << "total unknown while reading: " << lines[i];
    }
  }
}

TEST_F(ProgressJsonTest, BadProgressFdIsAUsageError) {
  EXPECT_EQ(ferry({"--progress-fd=9", "pool-list"}), 2);
  EXPECT_NE(slurp(err_path()).find("--progress-fd 9: not an open file descriptor"), std::string::npos)
      << slurp(err_path());
  EXPECT_EQ(ferry({"--progress=bar", "--progress-fd=3", "pool-list"}, "3>/dev/null"), 2);
  EXPECT_NE(slurp(err_path()).find("--progress-fd writes JSON lines"), std::string::npos) << slurp(err_path());
  EXPECT_EQ(ferry({"--progress=xml", "pool-list"}), 2);
}

}  // namespace
}  // namespace ferry::testing
