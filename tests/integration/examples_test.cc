// The libferry examples (client/examples) against a real ferryd: they are
// documentation, so they must keep working.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <vector>

#include "tests/integration/ferryd_process.h"

namespace ferry::testing {
namespace {

TEST(Examples, CApiExampleRoundTripsAFile) {
  FerrydProcess d;
  TempDir files;
  const std::string path = files.path() + "/disk.raw";
  {
    // 3 MiB with a hole in the middle.
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    std::vector<unsigned char> data(1 << 20);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<unsigned char>(i * 13 + 1);
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 2 << 20), static_cast<ssize_t>(data.size()));
    ::close(fd);
  }
  std::string out;
  const int rc = run_command({FERRY_TEST_C_EXAMPLE, d.unix_uri(), path}, &out);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("identical"), std::string::npos) << out;
  EXPECT_NE(out.find("1048576 holes"), std::string::npos) << "the hole came back as a hole: " << out;
  EXPECT_NE(out.find("NOT_FOUND"), std::string::npos) << out;
}

TEST(Examples, CxxExampleBlockingAndCoroutine) {
  FerrydProcess d;
  std::string out;
  const int rc = run_command({FERRY_TEST_CXX_EXAMPLE, d.tcp_uri()}, &out);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("read back 3145728 bytes, 0 wrong"), std::string::npos) << out;
  EXPECT_NE(out.find("blocking upload: 4096 data bytes, 524288 hole bytes"), std::string::npos) << out;
}

}  // namespace
}  // namespace ferry::testing
