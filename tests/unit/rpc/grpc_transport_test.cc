// The gRPC transport against a client built from the generated Tunnel
// stub, as another implementation (or a test tool) would talk to ferryd's
// grpc: listener: Frames messages from protobuf's own encoder, unknown
// fields included, arrive as one byte stream, and what the transport
// writes parses as Frames messages.
#if FERRY_HAVE_GRPC

#include "rpc/grpc_transport.h"

#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include <asio/co_spawn.hpp>
#include <asio/use_future.hpp>
#include <future>
#include <string>
#include <vector>

#include "ferry/v1/tunnel.grpc.pb.h"
#include "rpc/io_threads.h"

namespace ferry::rpc {
namespace {

std::string read_exactly(Transport& transport, std::size_t size) {
  return asio::co_spawn(
             transport.get_executor(),
             [&]() -> asio::awaitable<std::string> {
               std::string out(size, '\0');
               std::size_t got = 0;
               while (got < size) {
                 auto [error, n] = co_await transport.read_some(asio::buffer(out.data() + got, size - got));
                 if (error) throw std::system_error(error);
                 got += n;
               }
               co_return out;
             },
             asio::use_future)
      .get();
}

TEST(GrpcTransportTest, GeneratedStubMessagesCrossAsOneByteStreamBothWays) {
#if defined(__SANITIZE_THREAD__)
  // gRPC comes from Debian, not built with ThreadSanitizer, which then
  // reports races inside gRPC's own headers (see the integration tests).
  GTEST_SKIP() << "gRPC is not built with ThreadSanitizer";
#endif
  IoThreads io(1);
  std::promise<std::unique_ptr<Transport>> accepted;
  GrpcListener listener(
      Endpoint::grpc("127.0.0.1", 0), TlsOptions{}, [&] { return asio::any_io_executor(io.executor()); },
      [&](std::unique_ptr<Transport> t) { accepted.set_value(std::move(t)); });
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(listener.endpoint().port),
                                     grpc::InsecureChannelCredentials());
  auto stub = ferry::v1::Tunnel::NewStub(channel);
  grpc::ClientContext context;
  auto stream = stub->Connect(&context);

  ferry::v1::Frames first;
  first.set_data("hello, ");
  first.GetReflection()->MutableUnknownFields(&first)->AddVarint(7, 42);
  ASSERT_TRUE(stream->Write(first));
  ferry::v1::Frames second;
  second.GetReflection()->MutableUnknownFields(&second)->AddLengthDelimited(9, "not data");
  second.set_data("world");
  ASSERT_TRUE(stream->Write(second));
  auto transport = accepted.get_future().get();
  EXPECT_EQ(read_exactly(*transport, 12), "hello, world");

  // 300 KiB out: several of the transport's blocks in one message.
  std::string big(300 << 10, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 % 251);
  auto [write_error, written] = asio::co_spawn(
                   transport->get_executor(),
                   [&]() -> asio::awaitable<IoResult> {
                     std::vector<asio::const_buffer> parts{asio::buffer(big.data(), 1000),
                                                           asio::buffer(big.data() + 1000, big.size() - 1000)};
                     co_return co_await transport->write_all(parts);
                   },
                   asio::use_future)
                   .get();
  ASSERT_FALSE(write_error) << write_error.message();
  EXPECT_EQ(written, big.size());
  std::string received;
  ferry::v1::Frames in;
  while (received.size() < big.size() && stream->Read(&in)) received += in.data();
  EXPECT_EQ(received, big);

  // The client's end of writing is the transport's end of file.
  ASSERT_TRUE(stream->WritesDone());
  auto [end_error, end_bytes] = asio::co_spawn(
                 transport->get_executor(),
                 [&]() -> asio::awaitable<IoResult> {
                   char byte;
                   co_return co_await transport->read_some(asio::buffer(&byte, 1));
                 },
                 asio::use_future)
                 .get();
  EXPECT_EQ(end_error, asio::error::eof);
  EXPECT_EQ(end_bytes, 0u);
  transport->close();
  transport.reset();
  context.TryCancel();
  stream->Finish();
  listener.shutdown(std::chrono::milliseconds(0));
}

}  // namespace
}  // namespace ferry::rpc

#endif  // FERRY_HAVE_GRPC
