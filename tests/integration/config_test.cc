// ferryd reading a TOML configuration file, with command-line options
// overriding it, against a real process.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <fstream>

#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "tests/error_of.h"
#include "tests/integration/ferryd_process.h"

namespace ferry::testing {
namespace {

using ::testing::HasSubstr;

std::string write_file(const TempDir& dir, const std::string& name, const std::string& text) {
  const std::string path = dir.path() + "/" + name;
  std::ofstream(path) << text;
  return path;
}

TEST(FerrydConfig, FileSettingsApplyAndOptionsOverrideThem) {
  TempDir dir;
  const std::string config = write_file(dir, "ferryd.toml", R"(
[unix]
socket_mode = "0660"

[limits]
max_clients = 1
idle_timeout_ms = 60000
)");
  rpc::IoThreads io(1);
  {
    FerrydProcess server({"--config", config});
    struct stat st {};
    ASSERT_EQ(::stat(server.socket_path().c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0660u);
    rpc::Client first = rpc::Client::connect_sync(io.executor(), server.unix_uri());
    auto error = error_of([&] { rpc::Client::connect_sync(io.executor(), server.unix_uri()); });
    EXPECT_THAT(error.message(), HasSubstr("max_clients 1"));
    EXPECT_TRUE(server.wait_for_log("configuration: " + config));
  }
  // The command line wins over the file.
  FerrydProcess server({"--config", config, "--max-clients", "2"});
  rpc::Client a = rpc::Client::connect_sync(io.executor(), server.unix_uri());
  EXPECT_NO_THROW(rpc::Client::connect_sync(io.executor(), server.unix_uri()));
}

TEST(FerrydConfig, BadFileStopsTheDaemonWithTheLine) {
  TempDir dir;
  const std::string config = write_file(dir, "bad.toml", "[limits]\nmax_clients = 10\nmax_clinets = 3\n");
  std::string out;
  EXPECT_EQ(run_command({ferryd_path(), "--config", config}, &out), 2);
  EXPECT_THAT(out, HasSubstr(config + ":3: unknown setting limits.max_clinets"));
}

TEST(FerrydConfig, PrintConfigShowsTheEffectiveSettings) {
  std::string out;
  ASSERT_EQ(run_command({ferryd_path(), "--print-config", "--max-clients", "7", "--auth-tcp", "none"}, &out), 0);
  EXPECT_THAT(out, HasSubstr("max_clients = 7"));
  EXPECT_THAT(out, HasSubstr("[tcp]\nauth = 'none'"));
  EXPECT_THAT(out, HasSubstr("name = 'default'"));
}

}  // namespace
}  // namespace ferry::testing
