// Built by tests/package/package_test.sh against an unpacked libferry-dev
// (pkg-config ferry, or find_package(ferry) with consumer/CMakeLists.txt):
// connects to a ferryd, lists its pools, writes a volume through the
// blocking Session, reads its size back and deletes it.
//   consumer URI VOLUME
#include <cstdio>
#include <string>
#include <vector>

#include "client/session.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s URI VOLUME\n", argv[0]);
    return 2;
  }
  try {
    ferry::Session session = ferry::Session::connect(argv[1]);
    for (const auto& pool : session.pool_list()) std::printf("pool %s\n", pool.name().c_str());
    session.vol_create("default", argv[2], 1 << 20);
    ferry::v1::VolUploadCall call;
    call.mutable_volume()->set_pool("default");
    call.mutable_volume()->set_name(argv[2]);
    ferry::UploadStream up = session.open_upload(call);
    std::vector<std::uint8_t> data(65536, 'f');
    up.write(data);
    const auto reply = up.finish();
    const auto info = session.vol_info("default", argv[2]);
    std::printf("uploaded %llu bytes; %s capacity %llu\n", static_cast<unsigned long long>(reply.data_bytes()),
                argv[2], static_cast<unsigned long long>(info.capacity()));
    session.vol_delete("default", argv[2]);
    return reply.data_bytes() == data.size() ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
}
