// The admin interface of a real ferryd: the admin socket and its program
// (server info, clients, disconnect, limits, log level, jobs), driven through
// the real `ferry admin` CLI and the client library, and the Prometheus
// endpoint, read over a plain TCP socket.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "ferry/v1/admin.ferry.h"
#include "ferry/v1/test.ferry.h"
#include "ferry/v1/volume.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "stream/service.h"
#include "tests/error_of.h"
#include "tests/integration/ferryd_process.h"
#include "tests/material/sasl_users.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
using rpc::Client;
using ::testing::HasSubstr;
using Admin = ferry::v1::Admin;
using TestSvc = test::v1::Test;
using Volume = ferry::v1::Volume;

// Waits (up to 10 s) until `f` holds.
template <class F>
bool eventually(F f) {
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (std::chrono::steady_clock::now() < until) {
    if (f()) return true;
    std::this_thread::sleep_for(20ms);
  }
  return f();
}

// The first number after "key": in a JSON text (the CLI's output); -1 if absent.
long long json_number(const std::string& json, const std::string& key, std::size_t from = 0) {
  const std::string k = "\"" + key + "\":";
  const auto at = json.find(k, from);
  if (at == std::string::npos) return -1;
  return std::stoll(json.substr(at + k.size()));
}

class AdminTest : public ::testing::Test {
 protected:
  static std::string admin_socket(const FerrydProcess& server) { return server.dir() + "/ferryd-admin.sock"; }

  Client connect(const std::string& uri, rpc::ClientOptions options = {}) {
    options.connect_timeout = 5s;
    return Client::connect_sync(io_.executor(), uri, options);
  }
  Client admin(const FerrydProcess& server) { return connect("ferry+unix://" + admin_socket(server)); }

  // Runs `ferry admin ARGS... --admin-socket S`; returns the exit status.
  static int cli(const FerrydProcess& server, std::vector<std::string> args, std::string* output) {
    std::vector<std::string> argv = {ferry_cli_path(), "admin", "--admin-socket", admin_socket(server)};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, output);
  }

  static void create_volume(Client& client, const std::string& name, std::uint64_t capacity) {
    ferry::v1::VolCreateCall call;
    call.mutable_volume()->set_pool("default");
    call.mutable_volume()->set_name(name);
    call.set_capacity(capacity);
    client.call_future<Volume::VolCreate>(call).get();
  }
  // An upload that has sent `bytes` and stays open (the caller finishes it).
  static stream::ClientStream<ferry::v1::VolUploadReply> start_upload(Client& client, const std::string& name,
                                                                      std::size_t bytes) {
    ferry::v1::VolUploadCall call;
    call.mutable_volume()->set_pool("default");
    call.mutable_volume()->set_name(name);
    auto up = stream::open<Volume::VolUpload>(client, call);
    rpc::Buffer b(bytes);
    std::memset(b.data(), 0x5a, bytes);
    up.stream->write_sync(std::move(b));
    return up;
  }
  // Uploads `bytes` into `name` once no earlier writer holds it: a writer
  // that was cancelled or disconnected keeps the lock until its writes in
  // flight have landed, a moment after its client saw the error. Returns
  // the bytes the daemon took (0 if it stayed busy for 10 s).
  static std::uint64_t upload_when_free(Client& client, const std::string& name, std::size_t bytes) {
    std::uint64_t written = 0;
    eventually([&] {
      try {
        auto up = start_upload(client, name, bytes);
        up.stream->finish_sync();
        written = up.reply_sync().data_bytes();
        return true;
      } catch (const Error& busy) {
        EXPECT_EQ(busy.code(), Code::failed_precondition) << busy.message();
        return busy.code() != Code::failed_precondition;
      }
    });
    return written;
  }
  static std::string echo(Client& client, const std::string& text) {
    test::v1::EchoCall call;
    call.set_payload(text);
    return TestSvc::Stub<Client>(client).echo_future(call).get().payload();
  }
  static ferry::v1::AdminClientList clients(Client& admin) {
    return admin.call_future<Admin::ClientList>(ferry::v1::AdminClientListCall{}).get();
  }
  static ferry::v1::AdminJobList jobs(Client& admin) {
    return admin.call_future<Admin::JobList>(ferry::v1::AdminJobListCall{}).get();
  }
  static std::uint64_t client_id_named(Client& admin, const std::string& name) {
    const auto list = clients(admin);
    for (const auto& c : list.clients())
      if (c.client_name() == name) return c.id();
    return 0;
  }

  rpc::IoThreads io_{2};
};

TEST_F(AdminTest, InfoCountsConnectionsCallsStreamsAndJobs) {
  FerrydProcess server;
  Client a = connect(server.unix_uri());
  Client b = connect(server.unix_uri());
  Client c = connect(server.unix_uri());
  Client t = connect(server.tcp_uri());
  create_volume(a, "v", 64 << 20);
  auto up = start_upload(a, "v", 1 << 20);
  // A sleeping call: one call in flight besides the upload.
  test::v1::SleepCall sleep;
  sleep.set_ms(60000);
  auto sleeping = b.call_future<TestSvc::Sleep>(sleep);
  Client adm = admin(server);
  ASSERT_TRUE(eventually([&] {
    auto i = adm.call_future<Admin::ServerInfo>(ferry::v1::AdminServerInfoCall{}).get();
    return i.calls_in_flight() == 2 && i.streams_in_flight() == 1;
  }));

  std::string out;
  ASSERT_EQ(cli(server, {"info", "--json"}, &out), 0) << out;
  EXPECT_EQ(json_number(out, "pid"), server.pid());
  EXPECT_EQ(json_number(out, "connections"), 4) << out;
  EXPECT_EQ(json_number(out, "connections", out.find("\"transport\":\"unix\"")), 3) << out;
  EXPECT_EQ(json_number(out, "connections", out.find("\"transport\":\"tcp\"")), 1) << out;
  EXPECT_EQ(json_number(out, "connections", out.find("\"transport\":\"tls\"")), 0) << out;
  EXPECT_EQ(json_number(out, "admin_connections"), 2) << out;  // the library's and the CLI's
  EXPECT_EQ(json_number(out, "calls_in_flight"), 2) << out;
  EXPECT_EQ(json_number(out, "streams_in_flight"), 1) << out;
  EXPECT_EQ(json_number(out, "jobs"), 1) << out;
  EXPECT_GE(json_number(out, "calls_total"), 3) << out;  // VolCreate, the upload, the sleep (Hello is not a call)
  EXPECT_GE(json_number(out, "bytes_received"), 1 << 20) << out;
  EXPECT_EQ(json_number(out, "io_threads"), static_cast<long long>(std::thread::hardware_concurrency())) << out;
  EXPECT_EQ(json_number(out, "process_threads"), server.threads()) << out;
  EXPECT_THAT(out, HasSubstr("\"version\":\"0.1.0\""));
  EXPECT_THAT(out, HasSubstr("\"log_level\":\"info\""));

  // The human form carries the same numbers.
  ASSERT_EQ(cli(server, {"info"}, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("connections        4 (unix 3, tcp 1, tls 0, grpc 0, grpcs 0)"));
  EXPECT_THAT(out, HasSubstr("streams in flight  1"));
  up.stream->finish_sync();
  EXPECT_EQ(up.reply_sync().data_bytes(), 1u << 20);
}

TEST_F(AdminTest, ClientListShowsUnixUidTlsSubjectAndSaslUser) {
  TempDir dir;
  const std::string db = dir.path() + "/sasldb";
  add_sasl_user(db, "ferry", "ferry", "alice", "alice-secret");
  FerrydProcess server({"--auth-tcp", "sasl", "--sasl-db", db, "--sasl-realm", "ferry"});
  rpc::ClientOptions named;
  named.name = "by-unix";
  Client u = connect(server.unix_uri(), named);
  rpc::ClientOptions tls = client_options_for(TransportKind::tls);
  tls.name = "by-tls";
  Client t = connect(server.tls_uri(), tls);
  rpc::ClientOptions sasl;
  sasl.name = "by-sasl";
  sasl.sasl.username = "alice";
  sasl.sasl.password = "alice-secret";
  sasl.sasl.realm = "ferry";
  Client s = connect(server.tcp_uri(), sasl);

  Client adm = admin(server);
  std::map<std::string, ferry::v1::AdminClient> by_name;
  const auto list = clients(adm);
  for (const auto& c : list.clients()) by_name[c.client_name()] = c;
  ASSERT_EQ(by_name.size(), 3u);  // the admin connection is left out
  const auto& cu = by_name["by-unix"];
  EXPECT_EQ(cu.transport(), "unix");
  ASSERT_TRUE(cu.has_uid());
  EXPECT_EQ(cu.uid(), static_cast<int>(::getuid()));
  EXPECT_EQ(cu.pid(), static_cast<int>(::getpid()));
  EXPECT_TRUE(cu.authenticated());
  const auto& ct = by_name["by-tls"];
  EXPECT_EQ(ct.transport(), "tls");
  EXPECT_EQ(ct.tls_subject(), "CN=client1,O=ferry tests");
  EXPECT_FALSE(ct.has_uid());
  const auto& cs = by_name["by-sasl"];
  EXPECT_EQ(cs.transport(), "tcp");
  EXPECT_EQ(cs.sasl_user(), "alice");
  EXPECT_EQ(cs.sasl_mechanism(), "SCRAM-SHA-256");
  EXPECT_LT(cu.id(), ct.id());
  EXPECT_LT(ct.id(), cs.id());

  // ClientInfo by id; the CLI's table and JSON say the same.
  ferry::v1::AdminClientRef ref;
  ref.set_id(cs.id());
  EXPECT_EQ(adm.call_future<Admin::ClientInfo>(ref).get().sasl_user(), "alice");
  std::string out;
  ASSERT_EQ(cli(server, {"clients"}, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("CN=client1,O=ferry tests"));
  EXPECT_THAT(out, HasSubstr("sasl alice (SCRAM-SHA-256)"));
  EXPECT_THAT(out, HasSubstr("uid " + std::to_string(::getuid())));
  ASSERT_EQ(cli(server, {"client", std::to_string(ct.id()), "--json"}, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("\"tls_subject\":\"CN=client1,O=ferry tests\""));
  EXPECT_EQ(cli(server, {"client", "999999"}, &out), 4) << out;  // NOT_FOUND
  EXPECT_THAT(out, HasSubstr("no client 999999"));
}

TEST_F(AdminTest, DisconnectClosesThatClientAndFreesItsVolumeLock) {
  FerrydProcess server;
  rpc::ClientOptions victim_options;
  victim_options.name = "victim";
  Client victim = connect(server.unix_uri(), victim_options);
  Client other = connect(server.unix_uri());
  create_volume(other, "v", 16 << 20);
  auto up = start_upload(victim, "v", 256 << 10);
  Client adm = admin(server);
  ASSERT_TRUE(eventually([&] { return jobs(adm).jobs_size() == 1; }));
  // The victim's upload holds the volume: another writer is refused.
  {
    auto second = start_upload(other, "v", 4096);
    auto e = error_of([&] { second.reply_sync(); });
    EXPECT_EQ(e.code(), Code::failed_precondition) << e.message();
  }
  const std::uint64_t id = client_id_named(adm, "victim");
  ASSERT_NE(id, 0u);

  std::string out;
  ASSERT_EQ(cli(server, {"disconnect", std::to_string(id)}, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("disconnected client " + std::to_string(id)));
  auto e = error_of([&] { up.reply_sync(); });
  EXPECT_THAT(e.message(), HasSubstr("disconnected by the administrator"));
  auto later = error_of([&] { echo(victim, "still there?"); });
  EXPECT_NE(later.code(), Code::ok);
  EXPECT_TRUE(server.wait_for_log("disconnected by the administrator"));

  // The other client is untouched and may write the volume now.
  EXPECT_EQ(echo(other, "fine"), "fine");
  ASSERT_TRUE(eventually([&] { return client_id_named(adm, "victim") == 0; }));
  EXPECT_EQ(upload_when_free(other, "v", 4096), 4096u);
  EXPECT_EQ(cli(server, {"disconnect", std::to_string(id)}, &out), 4) << out;
}

TEST_F(AdminTest, LimitsSetAtRunTimeApplyToNewCalls) {
  FerrydProcess server;
  Client a = connect(server.unix_uri());
  Client b = connect(server.unix_uri());
  test::v1::SleepCall sleep;
  sleep.set_ms(60000);
  auto sleeping = a.call_future<TestSvc::Sleep>(sleep);
  Client adm = admin(server);
  ASSERT_TRUE(eventually(
      [&] { return adm.call_future<Admin::ServerInfo>(ferry::v1::AdminServerInfoCall{}).get().calls_in_flight() == 1; }));

  std::string out;
  ASSERT_EQ(cli(server, {"limits", "--set", "max_calls=1", "--set", "max_streams=5"}, &out), 0) << out;
  EXPECT_THAT(out, ::testing::ContainsRegex("max_calls +1\n"));
  auto e = error_of([&] { echo(b, "over"); });
  EXPECT_EQ(e.code(), Code::resource_exhausted);
  EXPECT_THAT(e.message(), HasSubstr("overloaded"));
  EXPECT_THAT(e.message(), HasSubstr("max_calls"));
  // The call in flight is not touched; the admin socket still answers.
  ASSERT_EQ(cli(server, {"limits", "--json"}, &out), 0) << out;
  EXPECT_EQ(json_number(out, "max_calls"), 1);
  EXPECT_EQ(json_number(out, "max_streams"), 5);
  EXPECT_EQ(json_number(out, "calls_in_flight"), -1);
  ASSERT_EQ(cli(server, {"info", "--json"}, &out), 0) << out;
  EXPECT_EQ(json_number(out, "calls_in_flight"), 1);
  EXPECT_GE(json_number(out, "calls_overloaded"), 1);

  ASSERT_EQ(cli(server, {"limits", "--set", "max_calls=100"}, &out), 0) << out;
  EXPECT_EQ(echo(b, "room again"), "room again");
  EXPECT_EQ(cli(server, {"limits", "--set", "max_calls=0"}, &out), 9) << out;  // INVALID_ARGUMENT
  EXPECT_EQ(cli(server, {"limits", "--set", "no_such_limit=3"}, &out), 9) << out;
  // Byte limits take sizes.
  ASSERT_EQ(cli(server, {"limits", "--set", "max_buffered_bytes=2G", "--set", "max_buffered_bytes_per_client=32M"}, &out), 0)
      << out;
  EXPECT_THAT(out, ::testing::ContainsRegex("max_buffered_bytes +2147483648 \\(2(\\.0)? GiB\\)"));
  EXPECT_THAT(out, ::testing::ContainsRegex("max_buffered_bytes_per_client +33554432 "));
  EXPECT_EQ(cli(server, {"limits", "--set", "max_buffered_bytes=lots"}, &out), 9) << out;
  EXPECT_TRUE(server.wait_for_log("limits set: max_calls=100"));
}

TEST_F(AdminTest, LogLevelChangesAtRunTime) {
  FerrydProcess server;
  std::string out;
  ASSERT_EQ(cli(server, {"log-level"}, &out), 0) << out;
  EXPECT_EQ(out, "info\n");
  {
    rpc::ClientOptions o;
    o.name = "quiet-one";
    Client c = connect(server.unix_uri(), o);
    EXPECT_EQ(echo(c, "x"), "x");
  }
  EXPECT_THAT(server.log(), ::testing::Not(HasSubstr("said hello as 'quiet-one'")));
  ASSERT_EQ(cli(server, {"log-level", "debug"}, &out), 0) << out;
  EXPECT_EQ(out, "debug\n");
  {
    rpc::ClientOptions o;
    o.name = "loud-one";
    Client c = connect(server.unix_uri(), o);
    EXPECT_EQ(echo(c, "y"), "y");
  }
  EXPECT_TRUE(server.wait_for_log("said hello as 'loud-one'")) << server.log();
  ASSERT_EQ(cli(server, {"log-level", "--json"}, &out), 0) << out;
  EXPECT_EQ(out, "{\"level\":\"debug\"}\n");
  EXPECT_EQ(cli(server, {"log-level", "chatty"}, &out), 9) << out;
  EXPECT_THAT(out, HasSubstr("unknown log level 'chatty'"));
}

TEST_F(AdminTest, JobListShowsAnUploadAndCancelStopsIt) {
  FerrydProcess server;
  Client c = connect(server.unix_uri());
  create_volume(c, "busy", 16 << 20);
  auto up = start_upload(c, "busy", 512 << 10);
  Client adm = admin(server);
  ferry::v1::AdminJob job;
  ASSERT_TRUE(eventually([&] {
    auto list = jobs(adm);
    if (list.jobs_size() != 1) return false;
    job = list.jobs(0);
    return job.bytes_done() >= (512u << 10);
  }));
  EXPECT_EQ(job.kind(), "upload");
  EXPECT_EQ(job.pool(), "default");
  EXPECT_EQ(job.volume(), "busy");
  EXPECT_EQ(job.procedure(), "Volume.VolUpload");
  EXPECT_GT(job.started_ns(), 0);
  EXPECT_NE(job.client_id(), 0u);

  std::string out;
  ASSERT_EQ(cli(server, {"jobs"}, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("default/busy"));
  EXPECT_THAT(out, HasSubstr("512.0 KiB"));
  ASSERT_EQ(cli(server, {"cancel", job.id()}, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("cancelled job " + job.id() + " (upload)"));

  // The uploader learns at once: its next write (or the reply) fails with
  // the administrator's cancel.
  auto e = error_of([&] {
    for (int i = 0; i < 1000; ++i) {
      rpc::Buffer b(64 << 10);
      std::memset(b.data(), 1, b.size());
      up.stream->write_sync(std::move(b));
    }
  });
  EXPECT_EQ(e.code(), Code::cancelled);
  EXPECT_THAT(e.message(), HasSubstr("cancelled by the administrator"));
  auto r = error_of([&] { up.reply_sync(); });
  EXPECT_EQ(r.code(), Code::cancelled);
  EXPECT_THAT(r.message(), HasSubstr("cancelled by the administrator"));

  // The connection stays usable and the volume is free for a new writer.
  EXPECT_EQ(echo(c, "still here"), "still here");
  ASSERT_TRUE(eventually([&] { return jobs(adm).jobs_size() == 0; }));
  EXPECT_EQ(upload_when_free(c, "busy", 8192), 8192u);
  EXPECT_EQ(cli(server, {"cancel", job.id()}, &out), 4) << out;
  ASSERT_EQ(cli(server, {"info", "--json"}, &out), 0) << out;
  EXPECT_GE(json_number(out, "calls_cancelled"), 1);
}

TEST_F(AdminTest, AdminProgramIsRefusedOnOrdinaryListenersAndOnlyItIsServedOnTheAdminSocket) {
  FerrydProcess server;
  for (const std::string& uri : {server.unix_uri(), server.tcp_uri()}) {
    Client c = connect(uri);
    auto e = error_of([&] { c.call_future<Admin::ServerInfo>(ferry::v1::AdminServerInfoCall{}).get(); });
    EXPECT_EQ(e.code(), Code::permission_denied) << uri;
    EXPECT_THAT(e.message(), HasSubstr("only on the daemon's admin socket")) << uri;
    EXPECT_EQ(echo(c, "ordinary calls still work"), "ordinary calls still work");
  }
  {
    Client t = connect(server.tls_uri(), client_options_for(TransportKind::tls));
    auto e = error_of([&] { t.call_future<Admin::LimitsSet>(ferry::v1::AdminLimits{}).get(); });
    EXPECT_EQ(e.code(), Code::permission_denied);
  }
  EXPECT_TRUE(server.wait_for_log("Admin program on an ordinary listener; refused"));
  Client adm = admin(server);
  auto e = error_of([&] { echo(adm, "not here"); });
  EXPECT_EQ(e.code(), Code::permission_denied);
  EXPECT_THAT(e.message(), HasSubstr("serves only the admin program"));

  struct stat st {};
  ASSERT_EQ(::stat(admin_socket(server).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

// Runs `ferry admin info` as uid/gid 65534 (nobody); returns its exit status.
int run_as_nobody(const std::string& socket, std::string* output, const std::string& out_path) {
  const int fd = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return -1;
  const std::string cli_path = ferry_cli_path();
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    if (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(120);
    ::execl(cli_path.c_str(), cli_path.c_str(), "admin", "--admin-socket", socket.c_str(), "info",
            static_cast<char*>(nullptr));
    ::_exit(121);
  }
  ::close(fd);
  int status = 0;
  ::waitpid(pid, &status, 0);
  std::ifstream in(out_path);
  std::stringstream text;
  text << in.rdbuf();
  *output = text.str();
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST_F(AdminTest, PeerWithAnotherUidIsRefusedOnTheAdminSocket) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to act as another uid";
  FerrydProcess server;
  TempDir outdir;
  const std::string socket = admin_socket(server);
  std::string out;
  // Mode 0600: the kernel turns the other uid away at connect().
  ::chmod(server.dir().c_str(), 0755);
  int rc = run_as_nobody(socket, &out, outdir.path() + "/out1");
  EXPECT_EQ(rc, 3) << out;  // unreachable
  EXPECT_THAT(out, HasSubstr("ermission denied"));
  // Opened to everyone, the daemon's own check refuses by SO_PEERCRED.
  ASSERT_EQ(::chmod(socket.c_str(), 0666), 0);
  rc = run_as_nobody(socket, &out, outdir.path() + "/out2");
  EXPECT_EQ(rc, 8) << out;  // denied
  EXPECT_THAT(out, HasSubstr("uid 65534 may not use the admin socket"));
  EXPECT_TRUE(server.wait_for_log("uid 65534 may not use the admin socket"));
  // Root still gets in.
  ASSERT_EQ(cli(server, {"info"}, &out), 0) << out;
}

// ---- metrics ----

std::uint16_t metrics_port(const FerrydProcess& server) {
  std::smatch m;
  const std::string log = server.log();
  static const std::regex re("metrics on http://127\\.0\\.0\\.1:([0-9]+)/metrics");
  if (!std::regex_search(log, m, re)) return 0;
  return static_cast<std::uint16_t>(std::stoi(m[1]));
}

int tcp_connect(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

std::string read_all(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

std::string http(std::uint16_t port, const std::string& request) {
  const int fd = tcp_connect(port);
  if (fd < 0) return {};
  (void)!::write(fd, request.data(), request.size());
  return read_all(fd);
}

std::string get(std::uint16_t port, const std::string& path) {
  return http(port, "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
}

// name{labels} -> value; checks the exposition rules on the way.
std::map<std::string, double> parse_exposition(const std::string& body) {
  std::map<std::string, double> samples;
  std::map<std::string, std::string> types;
  std::set<std::string> helped;
  std::istringstream in(body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line.rfind("# HELP ", 0) == 0) {
      helped.insert(line.substr(7, line.find(' ', 7) - 7));
      continue;
    }
    if (line.rfind("# TYPE ", 0) == 0) {
      const auto sp = line.find(' ', 7);
      types[line.substr(7, sp - 7)] = line.substr(sp + 1);
      continue;
    }
    EXPECT_NE(line[0], '#') << line;
    const auto sp = line.rfind(' ');
    const std::string series = line.substr(0, sp);
    const std::string name = series.substr(0, series.find('{'));
    EXPECT_TRUE(std::regex_match(name, std::regex("[a-zA-Z_:][a-zA-Z0-9_:]*"))) << line;
    EXPECT_TRUE(types.count(name)) << "no TYPE for " << name;
    EXPECT_TRUE(helped.count(name)) << "no HELP for " << name;
    if (types[name] == "counter") {
      EXPECT_TRUE(name.size() > 6 && name.compare(name.size() - 6, 6, "_total") == 0) << name;
    }
    std::size_t used = 0;
    samples[series] = std::stod(line.substr(sp + 1), &used);
    EXPECT_EQ(used, line.size() - sp - 1) << line;
  }
  return samples;
}

TEST_F(AdminTest, MetricsEndpointAgreesWithAdminInfo) {
  FerrydProcess server({"--metrics-listen", "127.0.0.1:0"});
  const std::uint16_t port = metrics_port(server);
  ASSERT_NE(port, 0) << server.log();
  Client a = connect(server.unix_uri());
  Client b = connect(server.unix_uri());
  Client t = connect(server.tcp_uri());
  for (int i = 0; i < 5; ++i) EXPECT_EQ(echo(a, "m"), "m");

  std::string info;
  ASSERT_EQ(cli(server, {"info", "--json"}, &info), 0) << info;
  const std::string response = get(port, "/metrics");
  ASSERT_THAT(response, HasSubstr("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(response, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  const std::string body = response.substr(response.find("\r\n\r\n") + 4);
  auto m = parse_exposition(body);
  EXPECT_EQ(m["ferry_up"], 1);
  EXPECT_EQ(m["ferry_calls_total"], json_number(info, "calls_total"));
  EXPECT_EQ(m["ferry_calls_total"], 5);
  EXPECT_EQ(m["ferry_calls_in_flight"], 0);
  EXPECT_EQ(m["ferry_connections{transport=\"unix\"}"], 2);
  EXPECT_EQ(m["ferry_connections{transport=\"tcp\"}"], 1);
  EXPECT_EQ(m["ferry_connections{transport=\"tls\"}"], 0);
  EXPECT_EQ(m["ferry_calls_overloaded_total"], json_number(info, "calls_overloaded"));
  EXPECT_EQ(m["ferry_auth_failures_total"], json_number(info, "auth_failures"));
  EXPECT_EQ(m["ferry_protocol_errors_total"], json_number(info, "protocol_errors"));
  EXPECT_EQ(m["ferry_limit{name=\"max_calls\"}"], json_number(info, "max_calls"));
  EXPECT_EQ(m["ferry_io_threads"], json_number(info, "io_threads"));
  // Bytes and uptime only grow between the two readings.
  EXPECT_GE(m["ferry_bytes_received_total"], json_number(info, "bytes_received"));
  EXPECT_GE(m["ferry_bytes_sent_total"], json_number(info, "bytes_sent"));
  EXPECT_GE(m["ferry_uptime_seconds"], 0);
  EXPECT_GT(m["ferry_threads"], 0);
  EXPECT_TRUE(m.count("ferry_buffer_bytes_in_use"));
  EXPECT_TRUE(m.count("ferry_streams_in_flight"));
  EXPECT_TRUE(m.count("ferry_calls_cancelled_total"));
  EXPECT_TRUE(m.count("ferry_info{version=\"0.1.0\"}"));

  // Other paths are 404, other methods 405, garbage 400 or just closed;
  // none of it stops the endpoint.
  EXPECT_THAT(get(port, "/"), HasSubstr("HTTP/1.1 404 Not Found"));
  EXPECT_THAT(get(port, "/metricsX"), HasSubstr("HTTP/1.1 404 Not Found"));
  EXPECT_THAT(http(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), HasSubstr("405"));
  EXPECT_THAT(http(port, std::string("\x16\x03\x01\x02\x00garbage\r\n\r\n", 16)), HasSubstr("HTTP/1.1 400"));
  EXPECT_THAT(http(port, std::string(20000, 'A')), HasSubstr("HTTP/1.1 431"));
  {
    const int idle = tcp_connect(port);  // says nothing, then goes
    ASSERT_GE(idle, 0);
    ::close(idle);
  }
  // Several scrapers at once.
  std::vector<int> fds;
  for (int i = 0; i < 8; ++i) fds.push_back(tcp_connect(port));
  const std::string req = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  for (int fd : fds) {
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  }
  for (int fd : fds) EXPECT_THAT(read_all(fd), HasSubstr("ferry_calls_total 5\n"));
  EXPECT_EQ(echo(b, "daemon fine"), "daemon fine");
}

TEST_F(AdminTest, AdminSocketAndMetricsAreConfigurable) {
  TempDir dir;
  const std::string path = dir.path() + "/elsewhere/admin.sock";
  const std::string conf = dir.path() + "/ferryd.toml";
  {
    std::ofstream out(conf);
    out << "[admin]\nsocket = \"" << path << "\"\nmetrics_listen = \"127.0.0.1:0\"\n";
  }
  FerrydProcess server({"--config", conf});
  std::string out;
  EXPECT_EQ(run_command({ferry_cli_path(), "admin", "--admin-socket", path, "info"}, &out), 0) << out;
  EXPECT_NE(metrics_port(server), 0);
  EXPECT_FALSE(std::filesystem::exists(admin_socket(server)));
  // --print-config shows the [admin] keys; an unknown one is an error.
  EXPECT_EQ(run_command({ferryd_path(), "--config", conf, "--print-config"}, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("[admin]"));
  EXPECT_THAT(out, HasSubstr("socket = '" + path + "'"));
  {
    std::ofstream bad(conf);
    bad << "[admin]\nsokcet = \"/x\"\n";
  }
  EXPECT_NE(run_command({ferryd_path(), "--config", conf, "--print-config"}, &out), 0);
  EXPECT_THAT(out, HasSubstr("unknown setting admin.sokcet"));
  // Switched off: no socket.
  FerrydProcess off({"--no-admin"});
  EXPECT_FALSE(std::filesystem::exists(admin_socket(off)));
}

}  // namespace
}  // namespace ferry::testing
