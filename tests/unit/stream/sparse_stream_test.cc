// A sparse file crossing a stream: SparseReader on the sending side,
// STREAM_HOLE frames on the wire, SparseWriter on the receiving side, with
// an in-process server over a real UNIX socket.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "rpc/server.h"
#include "stream/service.h"
#include "stream/sparse.h"

namespace ferry::stream {
namespace {

using TestSvc = ferry::test::v1::Test;
namespace fs = std::filesystem;

struct ScratchDir {
  ScratchDir() {
    std::string t = (fs::temp_directory_path() / "ferry-sparse-stream-XXXXXX").string();
    path = ::mkdtemp(t.data());
  }
  ~ScratchDir() { fs::remove_all(path); }
  std::string path;
};

TEST(SparseStream, TenGibFileWithTenMibOfDataCrossesAsDataPlusHolesAndStaysSparse) {
  ScratchDir dir;
  const std::string src_path = dir.path + "/src.img";
  const std::string dst_path = dir.path + "/dst.img";
  const std::uint64_t size = std::uint64_t{10} << 30;
  int src = ::open(src_path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(src, 0);
  ASSERT_EQ(::ftruncate(src, static_cast<off_t>(size)), 0);
  std::vector<std::uint8_t> block(1 << 20);
  std::mt19937_64 rng(5);
  for (auto& b : block) b = static_cast<std::uint8_t>(rng());
  for (int i = 0; i < 10; ++i)
    ASSERT_EQ(::pwrite(src, block.data(), block.size(), static_cast<off_t>((size / 10) * i + i * 65536)),
              static_cast<ssize_t>(block.size()));

  // Server: writes what it receives into dst, holes as holes.
  int dst = ::open(dst_path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(dst, 0);
  auto program = rpc::Program::of<TestSvc>();
  on<TestSvc::Upload>(*program, [dst](const ferry::test::v1::UploadCall&, Stream& s,
                                      rpc::CallContext&) -> asio::awaitable<ferry::test::v1::UploadReply> {
    SparseWriter writer(dst, 0, true);
    ferry::test::v1::UploadReply reply;
    for (;;) {
      Item item = co_await s.read();
      if (item.kind == Item::Kind::end) break;
      if (item.kind == Item::Kind::hole) {
        writer.write_hole(item.length);
        reply.set_hole_bytes(reply.hole_bytes() + item.length);
      } else {
        writer.write(item.data.bytes());
        reply.set_data_bytes(reply.data_bytes() + item.length);
      }
    }
    writer.finish(true);
    co_return reply;
  });
  rpc::ServerOptions options;
  options.io_threads = 1;
  rpc::Server server(options);
  server.add_program(program);
  server.listen(rpc::Endpoint::unix_socket(dir.path + "/s.sock"));
  server.start();

  rpc::IoThreads io(1);
  auto client = rpc::Client::connect_sync(io.executor(), "unix:" + dir.path + "/s.sock");
  auto up = open<TestSvc::Upload>(client, ferry::test::v1::UploadCall{});
  const std::size_t chunk = client.stream_limits().chunk_size;
  SparseReader reader(src, 0, size, chunk);
  std::uint64_t hole_frames = 0;
  for (;;) {
    rpc::Buffer buffer(chunk);
    auto item = reader.next({buffer.data(), buffer.size()});
    if (!item) break;
    if (item->hole) {
      up.stream->write_hole_sync(item->length);
      ++hole_frames;
    } else {
      up.stream->write_sync(rpc::Buffer::copy_of(std::span<const std::uint8_t>(buffer.data(), item->length)));
    }
  }
  up.stream->finish_sync();
  auto reply = up.reply_sync();
  EXPECT_EQ(reply.data_bytes(), 10u << 20);
  EXPECT_EQ(reply.data_bytes() + reply.hole_bytes(), size);
  EXPECT_EQ(reader.read_bytes(), 10u << 20) << "holes must never be read";
  EXPECT_LE(client.stats().bytes_out, (10u << 20) + (1u << 20)) << "holes must never be sent as bytes";
  EXPECT_GT(hole_frames, 0u);

  struct stat st {};
  ASSERT_EQ(::fstat(dst, &st), 0);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), size);
  EXPECT_LE(static_cast<std::uint64_t>(st.st_blocks) * 512, (20u << 20) + (1u << 20)) << "destination must stay sparse";
  std::vector<std::uint8_t> back(block.size());
  for (int i = 0; i < 10; ++i) {
    ASSERT_EQ(::pread(dst, back.data(), back.size(), static_cast<off_t>((size / 10) * i + i * 65536)),
              static_cast<ssize_t>(back.size()));
    EXPECT_EQ(back, block) << "extent " << i;
  }
  client.close();
  server.shutdown(std::chrono::seconds(1));
  ::close(src);
  ::close(dst);
}

}  // namespace
}  // namespace ferry::stream
