// ferryd's TOML configuration: every section read, typos and wrong types
// refused with the file and line, and the printed form reads back the same.
#include "daemon/config.h"

#include <cerrno>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/error_of.h"

namespace ferry::daemon {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ferry::testing::error_of;

const char* full = R"(
[daemon]
log_level = "debug"
listen = ["unix:/run/ferry/ferryd.sock", "tls:0.0.0.0:16514"]
io_threads = 2
worker_threads = 3
shutdown_grace_ms = 1500

[unix]
socket_mode = "0660"
socket_group = "ferry"
allowed_users = ["root", "1000"]

[tcp]
auth = "none"

[tls]
auth = "sasl"
ca_file = "/etc/ferry/ca.pem"
cert_file = "/etc/ferry/server.pem"
key_file = "/etc/ferry/server-key.pem"
verify_client = false
allowed_dn = ["CN=*,O=Example"]
min_version = "1.2"

[sasl]
mechanisms = ["SCRAM-SHA-256", "PLAIN"]
db = "/etc/ferry/sasldb"
realm = "example"
allowed_users = ["alice", "ops-*"]
min_ssf = 56

[limits]
max_clients = 100
max_unauthenticated_clients = 10
max_calls_per_client = 500
max_streams_per_client = 8
max_frame = 1048576
auth_timeout_ms = 3000
idle_timeout_ms = 600000

[keepalive]
interval_ms = 2000
count = 5

[volumes]
file_io = "threads"
file_io_threads = 2
io_depth = 16

[[pool]]
name = "images"
path = "/srv/images"

[[pool]]
name = "golden"
path = "/srv/golden"
read_only = true
)";

TEST(DaemonConfig, ReadsEverySection) {
  DaemonConfig c = parse_config(full, "ferryd.toml");
  const auto& s = c.server;
  EXPECT_EQ(c.log_level, "debug");
  EXPECT_EQ(c.listen, (std::vector<std::string>{"unix:/run/ferry/ferryd.sock", "tls:0.0.0.0:16514"}));
  EXPECT_EQ(s.io_threads, 2u);
  EXPECT_EQ(s.worker_threads, 3u);
  EXPECT_EQ(c.shutdown_grace_ms, 1500u);
  EXPECT_EQ(s.unix_socket_mode, 0660u);
  EXPECT_EQ(s.unix_socket_group, "ferry");
  EXPECT_EQ(s.unix_allowed_users.size(), 2u);
  EXPECT_EQ(s.auth_tcp, rpc::AuthMode::none);
  EXPECT_EQ(s.auth_tls, rpc::AuthMode::sasl);
  EXPECT_EQ(s.tls.cert_file, "/etc/ferry/server.pem");
  EXPECT_FALSE(s.tls.verify_peer);
  EXPECT_EQ(s.tls.allowed_dn, (std::vector<std::string>{"CN=*,O=Example"}));
  EXPECT_EQ(s.tls.min_version, "1.2");
  EXPECT_EQ(s.sasl.mechanisms.size(), 2u);
  EXPECT_EQ(s.sasl.sasldb_path, "/etc/ferry/sasldb");
  EXPECT_EQ(s.sasl.realm, "example");
  EXPECT_EQ(s.sasl.min_ssf, 56u);
  EXPECT_EQ(s.max_clients, 100u);
  EXPECT_EQ(s.max_unauthenticated_clients, 10u);
  EXPECT_EQ(s.max_calls_per_client, 500u);
  EXPECT_EQ(s.max_streams_per_client, 8u);
  EXPECT_EQ(s.limits.max_frame, 1048576u);
  EXPECT_EQ(s.auth_timeout, std::chrono::milliseconds(3000));
  EXPECT_EQ(s.idle_timeout, std::chrono::milliseconds(600000));
  EXPECT_EQ(s.keepalive_interval, std::chrono::milliseconds(2000));
  EXPECT_EQ(s.keepalive_count, 5u);
  EXPECT_EQ(c.volumes.file_io, "threads");
  EXPECT_EQ(c.volumes.file_io_threads, 2u);
  EXPECT_EQ(c.volumes.io_depth, 16u);
  ASSERT_EQ(c.pools.size(), 2u);
  EXPECT_EQ(c.pools[1].name, "golden");
  EXPECT_TRUE(c.pools[1].read_only);
}

TEST(DaemonConfig, EmptyFileIsTheEmbeddedDefault) {
  DaemonConfig c = parse_config("", "empty.toml");
  DaemonConfig d = default_config();
  EXPECT_EQ(c.listen, d.listen);
  EXPECT_EQ(c.server.auth_tcp, rpc::AuthMode::sasl);
  EXPECT_EQ(c.server.unix_socket_mode, 0600u);
  ASSERT_EQ(c.pools.size(), 1u);
  EXPECT_EQ(c.pools[0].name, "default");
}

TEST(DaemonConfig, PrintedFormReadsBackTheSame) {
  DaemonConfig c = parse_config(full, "ferryd.toml");
  const std::string once = to_toml(c);
  DaemonConfig again = parse_config(once, "printed");
  again.source = c.source;
  EXPECT_EQ(to_toml(again), once);
}

TEST(DaemonConfig, MistakesNameTheKeyAndTheLine) {
  auto error = [](const char* text) { return error_of([&] { parse_config(text, "f.toml"); }).message(); };
  EXPECT_THAT(error("[limits]\nmax_clints = 3\n"), HasSubstr("f.toml:2: unknown setting limits.max_clints"));
  EXPECT_THAT(error("[limit]\n"), HasSubstr("f.toml:1: unknown setting limit"));
  EXPECT_THAT(error("[limits]\nmax_clients = \"many\"\n"), HasSubstr("f.toml:2: limits.max_clients must be an integer"));
  EXPECT_THAT(error("[limits]\nmax_clients = 0\n"), HasSubstr("out of range"));
  EXPECT_THAT(error("[limits]\nmax_frame = 10\n"), HasSubstr("limits.max_frame = 10 is out of range"));
  EXPECT_THAT(error("[tcp]\nauth = \"password\"\n"), HasSubstr("tcp.auth must be \"none\" or \"sasl\""));
  EXPECT_THAT(error("[unix]\nsocket_mode = \"rw\"\n"), HasSubstr("not an octal mode"));
  EXPECT_THAT(error("[daemon]\nlisten = [\"http://x\"]\n"), HasSubstr("daemon.listen: bad address"));
  EXPECT_THAT(error("[daemon]\nlog_level = \"loud\"\n"), HasSubstr("daemon.log_level must be one of"));
  EXPECT_THAT(error("[[pool]]\nname = \"../x\"\npath = \"/p\"\n"), HasSubstr("may not contain '/'"));
  EXPECT_THAT(error("[[pool]]\nname = \"a\"\npath = \"/p\"\n[[pool]]\nname = \"a\"\npath = \"/q\"\n"),
              HasSubstr("pool \"a\" is defined twice"));
  EXPECT_THAT(error("[volumes]\nfile_io = \"aio\"\n"), HasSubstr("volumes.file_io must be"));
  EXPECT_THAT(error("[volumes]\nio_depth = 0\n"), HasSubstr("volumes.io_depth = 0 is out of range"));
  EXPECT_THAT(error("[limits\n"), HasSubstr("f.toml:1:"));
  EXPECT_THAT(error("[fault]\ntransport = \"delay=soon\"\n"), HasSubstr("f.toml:2: fault.transport: bad fault spec"));
  EXPECT_THAT(error("[fault]\nvolume = \"op=chew\"\n"), HasSubstr("f.toml:2: fault.volume: bad volume fault spec"));
  EXPECT_THAT(error("[fault]\nnetwork = \"x\"\n"), HasSubstr("unknown setting fault.network"));
}

TEST(DaemonConfig, FaultSectionSetsTransportAndVolumeFaultsAndPrintsBack) {
  DaemonConfig c = parse_config("[fault]\ntransport = \"delay=5ms,direction=write\"\nvolume = \"op=write,errno=ENOSPC\"\n", "f.toml");
  EXPECT_EQ(c.server.fault.delay, std::chrono::milliseconds(5));
  EXPECT_FALSE(c.server.fault.on_read);
  EXPECT_EQ(c.volumes.fault.error, ENOSPC);
  EXPECT_THAT(to_toml(c), HasSubstr("[fault]"));
  EXPECT_FALSE(parse_config("", "f.toml").server.fault.any());
  EXPECT_THAT(to_toml(parse_config("", "f.toml")), Not(HasSubstr("[fault]")));
}

}  // namespace
}  // namespace ferry::daemon
