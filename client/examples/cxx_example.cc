// libferry from C++, both ways:
//  1. blocking: ferry::Session (client/session.h), from any thread;
//  2. coroutines: rpc::Client with the generated Volume stub and
//     stream::open, on an io_context the program runs itself.
//
//   cxx_example URI
#include <asio/co_spawn.hpp>
#include <asio/use_future.hpp>
#include <cstdio>
#include <cstring>

#include "client/session.h"
#include "ferry/v1/volume.ferry.h"
#include "rpc/io_threads.h"
#include "stream/service.h"

using ferry::v1::Volume;

// The coroutine form: thousands of these can run on one io thread.
asio::awaitable<std::uint64_t> upload_pattern(ferry::rpc::Client& client, std::string name, std::size_t size) {
  Volume::Stub<ferry::rpc::Client> volumes(client);
  ferry::v1::VolCreateCall create;
  create.mutable_volume()->set_pool("default");
  create.mutable_volume()->set_name(name);
  create.set_capacity(size);
  co_await volumes.vol_create(create);

  ferry::v1::VolUploadCall call;
  *call.mutable_volume() = create.volume();
  auto up = ferry::stream::open<Volume::VolUpload>(client, call);
  for (std::size_t done = 0; done < size;) {
    const std::size_t n = std::min<std::size_t>(256 << 10, size - done);
    ferry::rpc::Buffer chunk(n);
    for (std::size_t i = 0; i < n; ++i) chunk.data()[i] = static_cast<std::uint8_t>((done + i) * 7);
    co_await up.stream->write(std::move(chunk));  // waits for credit, never blocks a thread
    done += n;
  }
  co_await up.stream->finish();
  ferry::v1::VolUploadReply reply = co_await up.reply();
  co_return reply.data_bytes();
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s URI\n", argv[0]);
    return 2;
  }
  try {
    // 1. Blocking.
    ferry::Session session = ferry::Session::connect(argv[1]);
    for (const auto& pool : session.pool_list())
      std::printf("pool %s at %s: %u volumes\n", pool.name().c_str(), pool.path().c_str(), pool.volumes());
    session.vol_create("default", "cxx-blocking", 1 << 20);
    {
      ferry::v1::VolUploadCall call;
      call.mutable_volume()->set_pool("default");
      call.mutable_volume()->set_name("cxx-blocking");
      ferry::UploadStream up = session.open_upload(call);
      std::vector<std::uint8_t> hello(4096, 'x');
      up.write(hello);
      up.write_hole(512 << 10);  // a hole costs a frame, not 512 KiB
      auto reply = up.finish();
      std::printf("blocking upload: %llu data bytes, %llu hole bytes\n",
                  static_cast<unsigned long long>(reply.data_bytes()),
                  static_cast<unsigned long long>(reply.hole_bytes()));
    }

    // 2. Coroutines, on our own io thread.
    ferry::rpc::IoThreads io(1);
    auto client = ferry::rpc::Client::connect_sync(io.executor(), argv[1]);
    const std::size_t size = 3 << 20;
    auto sent = asio::co_spawn(io.executor(), upload_pattern(client, "cxx-coroutine", size), asio::use_future).get();
    std::printf("coroutine upload: %llu bytes\n", static_cast<unsigned long long>(sent));

    // Read the coroutine's volume back with the blocking API and check it.
    ferry::v1::VolDownloadCall call;
    call.mutable_volume()->set_pool("default");
    call.mutable_volume()->set_name("cxx-coroutine");
    ferry::DownloadStream down = session.open_download(call);
    std::size_t offset = 0, wrong = 0;
    for (;;) {
      auto piece = down.read();
      if (piece.kind == ferry::DownloadStream::Piece::Kind::end) break;
      if (piece.kind == ferry::DownloadStream::Piece::Kind::data)
        for (std::size_t i = 0; i < piece.length; ++i)
          wrong += piece.data.bytes()[i] != static_cast<std::uint8_t>((offset + i) * 7);
      offset += piece.length;
    }
    down.finish();
    std::printf("read back %zu bytes, %zu wrong\n", offset, wrong);
    session.vol_delete("default", "cxx-blocking");
    session.vol_delete("default", "cxx-coroutine");
    // Close, then let the io thread finish the connection's last handlers
    // before it stops, so nothing the connection owns is left unreleased.
    client.close();
    io.finish(std::chrono::seconds(2));
    return offset == size && wrong == 0 ? 0 : 1;
  } catch (const ferry::Error& e) {
    std::fprintf(stderr, "cxx_example: %s\n", e.describe().c_str());
    return 1;
  }
}
