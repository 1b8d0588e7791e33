// The volume I/O fault filter: spec parsing and which operations fail.
#include "daemon/io_fault.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <string>

#include "rpc/error.h"

namespace ferry::daemon {
namespace {

using ::testing::HasSubstr;
using Op = IoFaultOptions;

TEST(IoFaultOptions, ParsesEveryKeyAndDescribesItTheSameWay) {
  const auto o = IoFaultOptions::parse("op=write+datasync,errno=ENOSPC,after=8M,every=3,times=2,volume=a.img,delay=5ms");
  EXPECT_EQ(o.ops, unsigned{Op::write | Op::datasync});
  EXPECT_EQ(o.error, ENOSPC);
  EXPECT_EQ(o.after, 8u << 20);
  EXPECT_EQ(o.every, 3u);
  EXPECT_EQ(o.times, 2u);
  EXPECT_EQ(o.volume, "a.img");
  EXPECT_EQ(o.delay, std::chrono::milliseconds(5));
  EXPECT_EQ(o.describe(), "op=write+datasync,errno=ENOSPC,after=8388608,every=3,times=2,volume=a.img,delay=5000us");
  const auto again = IoFaultOptions::parse(o.describe());
  EXPECT_EQ(again.describe(), o.describe());
}

TEST(IoFaultOptions, EmptyIsNoFaultAndACountAloneMeansEio) {
  EXPECT_FALSE(IoFaultOptions::parse("").any());
  EXPECT_EQ(IoFaultOptions::parse("").describe(), "none");
  EXPECT_EQ(IoFaultOptions::parse("times=1").error, EIO);
  EXPECT_EQ(IoFaultOptions::parse("errno=28").error, 28);
  // A delay alone fails nothing.
  const auto slow = IoFaultOptions::parse("op=read,delay=1ms");
  EXPECT_TRUE(slow.any());
  EXPECT_EQ(slow.error, 0);
}

TEST(IoFaultOptions, BadSpecsAreRefusedNamingThePart) {
  auto message = [](const char* spec) {
    try {
      IoFaultOptions::parse(spec);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::invalid_argument);
      return e.message();
    }
    return std::string("accepted");
  };
  EXPECT_THAT(message("op=scribble"), HasSubstr("'scribble'"));
  EXPECT_THAT(message("errno=EWHATEVER"), HasSubstr("errno=EWHATEVER"));
  EXPECT_THAT(message("after=lots"), HasSubstr("after=lots"));
  EXPECT_THAT(message("every=0"), HasSubstr("every=0"));
  EXPECT_THAT(message("volume=../x"), HasSubstr("volume"));
  EXPECT_THAT(message("colour=red"), HasSubstr("unknown key 'colour'"));
  EXPECT_THAT(message("errno"), HasSubstr("not key=value"));
}

TEST(IoFault, FailsOnlyTheChosenOpsOncePastAfter) {
  IoFault f(IoFaultOptions::parse("op=write,errno=EIO,after=100"));
  EXPECT_EQ(f.check(Op::write, -1, 60), 0);
  EXPECT_EQ(f.check(Op::read, -1, 1000), 0);  // not a chosen op, not counted
  EXPECT_EQ(f.check(Op::write, -1, 40), 0);   // exactly 100
  EXPECT_EQ(f.check(Op::write, -1, 1), EIO);  // crosses it
  EXPECT_EQ(f.check(Op::write, -1, 1), EIO);  // and every later one
  EXPECT_EQ(f.failed(), 2u);
}

TEST(IoFault, EveryAndTimesPickWhichFail) {
  IoFault f(IoFaultOptions::parse("op=read,errno=EIO,every=3,times=2"));
  std::string pattern;
  for (int i = 0; i < 12; ++i) pattern += f.check(Op::read, -1, 10) ? 'x' : '.';
  EXPECT_EQ(pattern, "..x..x......");
}

TEST(IoFault, ADatasyncFailsOnceTheBytesBeforeItReachAfter) {
  IoFault f(IoFaultOptions::parse("op=write+datasync,errno=EIO,after=10"));
  EXPECT_EQ(f.check(Op::datasync, -1, 0), 0);
  EXPECT_EQ(f.check(Op::write, -1, 10), 0);
  EXPECT_EQ(f.check(Op::datasync, -1, 0), EIO);
  IoFault always(IoFaultOptions::parse("op=datasync,errno=EIO"));
  EXPECT_EQ(always.check(Op::datasync, -1, 0), EIO);
}

TEST(IoFault, AVolumeFilterMatchesTheVolumeAndItsAtomicTemporaryOnly) {
  char dir[] = "/tmp/ferry-io-fault-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  auto open_in = [&](const std::string& name) {
    return ::open((std::string(dir) + "/" + name).c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
  };
  const int vol = open_in("a.img"), temp = open_in(".ferry-upload.a.img.x1"), other = open_in("b.img");
  IoFault f(IoFaultOptions::parse("op=write,errno=ENOSPC,volume=a.img"));
  EXPECT_EQ(f.check(Op::write, vol, 1), ENOSPC);
  EXPECT_EQ(f.check(Op::write, temp, 1), ENOSPC);
  EXPECT_EQ(f.check(Op::write, other, 1), 0);
  for (int fd : {vol, temp, other}) ::close(fd);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ferry::daemon
