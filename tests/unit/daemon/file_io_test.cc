// FileIo: the same reads, writes, hole punches and syncs through io_uring
// and through the thread pool, errors mapped from errno, and volume names.
#include "daemon/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/use_future.hpp>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <vector>

#include "daemon/volumes.h"
#include "rpc/error.h"
#include "rpc/io_threads.h"

namespace ferry::daemon {
namespace {

class FileIoTest : public ::testing::TestWithParam<FileIo::Engine> {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ferry-fileio-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    fd_ = ::open((dir_ + "/f").c_str(), O_RDWR | O_CREAT, 0600);
    ASSERT_GE(fd_, 0);
    FileIo::Options o;
    o.engine = GetParam();
    io_ = std::make_unique<FileIo>(o);
  }
  void TearDown() override {
    io_.reset();
    ::close(fd_);
    std::filesystem::remove_all(dir_);
  }
  template <class T>
  T run(asio::awaitable<T> op) {
    return asio::co_spawn(threads_.executor(), std::move(op), asio::use_future).get();
  }

  rpc::IoThreads threads_{1};
  std::unique_ptr<FileIo> io_;
  std::string dir_;
  int fd_ = -1;
};

TEST_P(FileIoTest, UsesTheEngineAskedForOrSaysWhyNot) {
  if (GetParam() == FileIo::Engine::threads) {
    EXPECT_EQ(io_->engine(), FileIo::Engine::threads);
    EXPECT_NE(io_->describe().find("configured"), std::string::npos);
  } else if (io_->engine() == FileIo::Engine::threads) {
    EXPECT_NE(io_->describe().find("io_uring"), std::string::npos) << "the fallback names the reason";
  } else {
    EXPECT_NE(io_->describe().find("io_uring ("), std::string::npos) << io_->describe();
  }
}

TEST_P(FileIoTest, WritesAndReadsBackAtOffsets) {
  std::vector<std::uint8_t> data(3 << 20);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::uint8_t>(i * 7 + 3);
  auto* io = io_.get();
  const int fd = fd_;
  run([&]() -> asio::awaitable<int> {
    co_await io->write(fd, data, 1 << 20);
    co_return 0;
  }());
  std::vector<std::uint8_t> back(data.size() + 4096);
  const std::size_t n = run([&]() -> asio::awaitable<std::size_t> {
    co_return co_await io->read(fd, back, 1 << 20);
  }());
  EXPECT_EQ(n, data.size()) << "a read past the end stops at the end";
  back.resize(n);
  EXPECT_EQ(back, data);
  EXPECT_EQ(io->in_flight(), 0u);
}

TEST_P(FileIoTest, PunchesHolesAndSyncs) {
  std::vector<std::uint8_t> data(4 << 20, 0xee);
  auto* io = io_.get();
  const int fd = fd_;
  const bool punched = run([&]() -> asio::awaitable<bool> {
    co_await io->write(fd, data, 0);
    co_await io->datasync(fd);
    co_return co_await io->punch_hole(fd, 1 << 20, 2 << 20);
  }());
  ASSERT_TRUE(punched) << "this filesystem cannot punch holes";
  struct stat st {};
  ::fstat(fd, &st);
  EXPECT_EQ(st.st_size, 4 << 20);
  EXPECT_LE(st.st_blocks * 512, 2 << 20) << "the punched range is still allocated";
  std::vector<std::uint8_t> mid(4096, 1);
  run([&]() -> asio::awaitable<std::size_t> { co_return co_await io->read(fd, mid, 2 << 20); }());
  EXPECT_EQ(mid, std::vector<std::uint8_t>(4096, 0));
}

TEST_P(FileIoTest, ErrorsComeBackAsFerryErrors) {
  auto* io = io_.get();
  const int ro = ::open((dir_ + "/f").c_str(), O_RDONLY);
  std::vector<std::uint8_t> data(4096, 1);
  try {
    run([&]() -> asio::awaitable<int> {
      co_await io->write(ro, data, 0);
      co_return 0;
    }());
    FAIL() << "a write to a read-only descriptor succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.os_errno(), EBADF) << e.describe();
    EXPECT_NE(e.message().find(dir_ + "/f"), std::string::npos) << "the message names the file: " << e.message();
  }
  ::close(ro);
  EXPECT_EQ(io->in_flight(), 0u);
}

TEST_P(FileIoTest, RunsBlockingWorkOnThePool) {
  auto* io = io_.get();
  const auto caller = std::this_thread::get_id();
  const auto worker = run([&]() -> asio::awaitable<std::thread::id> {
    co_return co_await io->run([] { return std::this_thread::get_id(); });
  }());
  EXPECT_NE(worker, caller);
  EXPECT_THROW(run([&]() -> asio::awaitable<int> {
                 co_return co_await io->run([]() -> int { throw Error(Code::not_found, "gone"); });
               }()),
               Error);
}

INSTANTIATE_TEST_SUITE_P(Engines, FileIoTest, ::testing::Values(FileIo::Engine::io_uring, FileIo::Engine::threads),
                         [](const auto& info) { return info.param == FileIo::Engine::io_uring ? "io_uring" : "threads"; });

TEST(VolumeNames, PlainFileNamesOnly) {
  for (const char* ok : {"disk.img", "a", "vm-01_root+snap.raw", "X.Y.Z"}) EXPECT_NO_THROW(validate_volume_name(ok)) << ok;
  for (const std::string& bad : std::vector<std::string>{"", ".", "..", "../x", "a/b", ".hidden", "sp ace", "tab\t", "uni\xc3\xa9", std::string(256, 'a')}) {
    try {
      validate_volume_name(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::invalid_argument) << bad;
      EXPECT_NE(e.message().find("volume name"), std::string::npos) << e.message();
    }
  }
  EXPECT_NO_THROW(validate_volume_name(std::string(255, 'a')));
}

}  // namespace
}  // namespace ferry::daemon
