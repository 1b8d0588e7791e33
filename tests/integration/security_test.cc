// TLS and SASL against a real ferryd, with certificates and a password
// database made at test time: the good client gets in, every bad one is
// refused with a message that says why, and the server keeps serving.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "ferry/v1/control.ferry.h"
#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "stream/checksum.h"
#include "stream/service.h"
#include "tests/error_of.h"
#include "tests/integration/ferryd_process.h"
#include "tests/integration/raw_socket.h"
#include "tests/material/sasl_users.h"
#include "tests/material/tls_material.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
using rpc::Client;
using ::testing::HasSubstr;
using TestSvc = test::v1::Test;
using Control = ferry::v1::Control;
namespace fs = std::filesystem;

// One set of certificates and users for the whole suite (making them takes
// a few milliseconds, but there is no reason to repeat it).
class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    tls_ = new TlsMaterial(make_tls_material(dir_->path()));
    sasldb_ = dir_->path() + "/sasldb";
    add_sasl_user(sasldb_, "ferry", "ferry", "alice", "alice-secret");
    add_sasl_user(sasldb_, "ferry", "ferry", "bob", "bob-secret");
  }
  static void TearDownTestSuite() {
    delete tls_;
    delete dir_;
  }

  // ferryd with a TLS listener on the good server certificate.
  static std::vector<std::string> tls_args(const CertFiles& cert, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--listen", "tls:127.0.0.1:0", "--tls-ca", tls_->ca.cert,
                                     "--tls-cert", cert.cert, "--tls-key", cert.key};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }
  static std::vector<std::string> sasl_args(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--sasl-db", sasldb_, "--sasl-realm", "ferry"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }
  static std::vector<std::string> join(std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  static rpc::ClientOptions client_with(const CertFiles* cert, const std::string& ca = tls_->ca.cert) {
    rpc::ClientOptions o;
    o.tls.ca_file = ca;
    if (cert) {
      o.tls.cert_file = cert->cert;
      o.tls.key_file = cert->key;
    }
    o.connect_timeout = 5s;
    return o;
  }
  static rpc::ClientOptions good_client() { return client_with(&tls_->client); }
  static rpc::ClientOptions sasl_client(const std::string& user, const std::string& password,
                                        rpc::ClientOptions o = {}) {
    o.sasl.username = user;
    o.sasl.password = password;
    o.sasl.realm = "ferry";
    o.connect_timeout = 5s;
    return o;
  }

  Client connect(const std::string& uri, const rpc::ClientOptions& options) {
    return Client::connect_sync(io_.executor(), uri, options);
  }
  static test::v1::WhoAmIReply who(Client& client) {
    return client.call_future<TestSvc::WhoAmI>(test::v1::WhoAmICall{}).get();
  }
  static std::string echo(Client& client, const std::string& text) {
    test::v1::EchoCall call;
    call.set_payload(text);
    return TestSvc::Stub<Client>(client).echo_future(call).get().payload();
  }
  // Uploads and downloads `size` bytes, checking the checksums both ways.
  static void round_trip(Client& client, std::size_t size) {
    auto up = stream::open<TestSvc::Upload>(client, test::v1::UploadCall{});
    stream::Checksum sent;
    std::size_t left = size;
    std::uint64_t x = 88172645463325252ull;
    while (left) {
      const std::size_t n = std::min<std::size_t>(left, 256 << 10);
      rpc::Buffer b(n);
      for (std::size_t i = 0; i < n; ++i) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        b.data()[i] = static_cast<std::uint8_t>(x);
      }
      sent.data(b.span());
      up.stream->write_sync(std::move(b));
      left -= n;
    }
    up.stream->finish_sync();
    auto reply = up.reply_sync();
    EXPECT_EQ(reply.data_bytes(), size);
    EXPECT_EQ(reply.checksum(), sent.value());

    test::v1::DownloadCall call;
    call.set_size(size);
    call.set_seed(3);
    auto down = stream::open<TestSvc::Download>(client, call);
    stream::Checksum got;
    std::uint64_t bytes = 0;
    for (;;) {
      auto item = down.stream->read_sync();
      if (item.kind == stream::Item::Kind::end) break;
      if (item.kind == stream::Item::Kind::hole) {
        got.hole(item.length);
        bytes += item.length;
      } else {
        got.data(item.data.bytes());
        bytes += item.data.size();
      }
    }
    auto dreply = down.reply_sync();
    EXPECT_EQ(bytes, size);
    EXPECT_EQ(got.value(), dreply.checksum());
  }

  static TempDir* dir_;
  static TlsMaterial* tls_;
  static std::string sasldb_;
  rpc::IoThreads io_{2};
};

TempDir* SecurityTest::dir_ = nullptr;
TlsMaterial* SecurityTest::tls_ = nullptr;
std::string SecurityTest::sasldb_;

// ---- TLS ----

TEST_F(SecurityTest, TlsClientWithGoodCertificateIsServedAndIdentified) {
  FerrydProcess server(tls_args(tls_->server));
  Client client = connect(server.tls_uri(), good_client());
  EXPECT_EQ(client.peer().transport, "tls");
  EXPECT_EQ(client.peer().tls_fingerprint, tls_->server.sha256_fingerprint);
  EXPECT_EQ(client.peer().tls_version, "TLSv1.3");
  auto me = who(client);
  EXPECT_EQ(me.transport(), "tls");
  EXPECT_EQ(me.tls_version(), "TLSv1.3");
  EXPECT_EQ(me.tls_subject(), "CN=client1,O=ferry tests");
  EXPECT_EQ(me.tls_fingerprint(), tls_->client.sha256_fingerprint);
  EXPECT_EQ(echo(client, "over tls"), "over tls");
  round_trip(client, (24u << 20) + 12345);
}

TEST_F(SecurityTest, ServerCertificateFromAnotherCaIsRefused) {
  FerrydProcess server(tls_args(tls_->server_other_ca));
  auto error = error_of([&] { connect(server.tls_uri(), good_client()); });
  EXPECT_EQ(error.code(), Code::unauthenticated);
  EXPECT_THAT(error.message(), HasSubstr("certificate verify failed"));
  // The client trusting the other CA gets in: the CA was the only problem
  // (the server still checks client certificates against its own CA).
  rpc::ClientOptions trusting = client_with(&tls_->client, tls_->other_ca.cert);
  EXPECT_NO_THROW(connect(server.tls_uri(), trusting));
}

TEST_F(SecurityTest, ExpiredServerCertificateIsRefused) {
  FerrydProcess server(tls_args(tls_->server_expired));
  auto error = error_of([&] { connect(server.tls_uri(), good_client()); });
  EXPECT_EQ(error.code(), Code::unauthenticated);
  EXPECT_THAT(error.message(), HasSubstr("certificate has expired"));
}

TEST_F(SecurityTest, ServerCertificateForAnotherHostIsRefused) {
  FerrydProcess server(tls_args(tls_->server_wrong_host));
  auto error = error_of([&] { connect(server.tls_uri(), good_client()); });
  EXPECT_EQ(error.code(), Code::unauthenticated);
  EXPECT_THAT(error.message(), HasSubstr("not for '127.0.0.1'"));
  // Expecting the name the certificate does carry works.
  rpc::ClientOptions named = good_client();
  named.tls.server_name = "wrong.example";
  EXPECT_NO_THROW(connect(server.tls_uri(), named));
}

TEST_F(SecurityTest, ClientWithoutCertificateIsRefusedWhenOneIsRequired) {
  FerrydProcess server(tls_args(tls_->server));
  auto error = error_of([&] { connect(server.tls_uri(), client_with(nullptr)); });
  EXPECT_THAT(error.message(), HasSubstr("requires a client certificate"));
  EXPECT_TRUE(server.wait_for_log("peer did not return a certificate"));
  EXPECT_NO_THROW(connect(server.tls_uri(), good_client()));
}

TEST_F(SecurityTest, ClientCertificateFromAnotherCaOrExpiredIsRefused) {
  FerrydProcess server(tls_args(tls_->server));
  auto other = error_of([&] { connect(server.tls_uri(), client_with(&tls_->client_other_ca)); });
  EXPECT_THAT(other.message(), HasSubstr("unknown ca"));
  auto expired = error_of([&] { connect(server.tls_uri(), client_with(&tls_->client_expired)); });
  EXPECT_THAT(expired.message(), HasSubstr("certificate expired"));
  EXPECT_NO_THROW(connect(server.tls_uri(), good_client()));
}

TEST_F(SecurityTest, ClientDnOutsideTheAllowedListIsRefused) {
  FerrydProcess server(tls_args(tls_->server, {"--tls-allowed-dn", "CN=*,O=ferry tests"}));
  auto error = error_of([&] { connect(server.tls_uri(), client_with(&tls_->client_mallory)); });
  EXPECT_EQ(error.code(), Code::permission_denied);
  EXPECT_THAT(error.message(), HasSubstr("client certificate 'CN=mallory,O=elsewhere' is not in the allowed DN list"));
  Client good = connect(server.tls_uri(), good_client());
  EXPECT_EQ(who(good).tls_subject(), "CN=client1,O=ferry tests");
}

// ---- gRPC (grpcs: takes the same certificates through gRPC's own TLS) ----

TEST_F(SecurityTest, GrpcsClientWithGoodCertificateIsServedAndIdentified) {
  FERRY_SKIP_GRPC_UNDER_TSAN();
  FerrydProcess server(tls_args(tls_->server, {"--listen", "grpcs:127.0.0.1:0"}));
  Client client = connect(server.uri(TransportKind::grpcs), good_client());
  EXPECT_EQ(client.peer().transport, "grpcs");
  auto me = who(client);
  EXPECT_EQ(me.transport(), "grpcs");
  EXPECT_EQ(me.tls_subject(), "CN=client1,O=ferry tests");
  EXPECT_EQ(echo(client, "over grpcs"), "over grpcs");
  round_trip(client, (24u << 20) + 12345);
}

TEST_F(SecurityTest, GrpcsClientWithoutCertificateOrFromAnotherCaIsRefused) {
  FERRY_SKIP_GRPC_UNDER_TSAN();
  FerrydProcess server(tls_args(tls_->server, {"--listen", "grpcs:127.0.0.1:0"}));
  auto none = error_of([&] { connect(server.uri(TransportKind::grpcs), client_with(nullptr)); });
  EXPECT_EQ(none.code(), Code::unavailable) << none.describe();
  auto other = error_of([&] { connect(server.uri(TransportKind::grpcs), client_with(&tls_->client_other_ca)); });
  EXPECT_EQ(other.code(), Code::unavailable) << other.describe();
  EXPECT_NO_THROW(connect(server.uri(TransportKind::grpcs), good_client()));
}

TEST_F(SecurityTest, GrpcsServerCertificateFromAnotherCaIsRefused) {
  FERRY_SKIP_GRPC_UNDER_TSAN();
  FerrydProcess server(tls_args(tls_->server_other_ca, {"--listen", "grpcs:127.0.0.1:0"}));
  auto error = error_of([&] { connect(server.uri(TransportKind::grpcs), good_client()); });
  EXPECT_EQ(error.code(), Code::unavailable) << error.describe();
}

TEST_F(SecurityTest, GrpcsClientDnOutsideTheAllowedListIsRefused) {
  FERRY_SKIP_GRPC_UNDER_TSAN();
  FerrydProcess server(
      tls_args(tls_->server, {"--listen", "grpcs:127.0.0.1:0", "--tls-allowed-dn", "CN=*,O=ferry tests"}));
  auto error = error_of([&] { connect(server.uri(TransportKind::grpcs), client_with(&tls_->client_mallory)); });
  EXPECT_EQ(error.code(), Code::permission_denied);
  EXPECT_THAT(error.message(), HasSubstr("client certificate 'CN=mallory,O=elsewhere' is not in the allowed DN list"));
  Client good = connect(server.uri(TransportKind::grpcs), good_client());
  EXPECT_EQ(who(good).tls_subject(), "CN=client1,O=ferry tests");
}

TEST_F(SecurityTest, SaslOverGrpcAndPlainOnlyOverGrpcs) {
  FERRY_SKIP_GRPC_UNDER_TSAN();
  FerrydProcess server(join(tls_args(tls_->server, {"--listen", "grpcs:127.0.0.1:0", "--listen", "grpc:127.0.0.1:0",
                                                    "--auth-tls", "sasl", "--auth-tcp", "sasl"}),
                            sasl_args({"--sasl-mechanisms", "PLAIN,SCRAM-SHA-256"})));
  Client scram = connect(server.uri(TransportKind::grpc), sasl_client("alice", "alice-secret"));
  EXPECT_EQ(scram.server().mechanism, "SCRAM-SHA-256");
  EXPECT_EQ(who(scram).user(), "alice");
  rpc::ClientOptions plain = sasl_client("bob", "bob-secret", good_client());
  plain.sasl.mechanisms = {"PLAIN"};
  Client over_grpcs = connect(server.uri(TransportKind::grpcs), plain);
  EXPECT_EQ(who(over_grpcs).mechanism(), "PLAIN");
  rpc::ClientOptions plain_clear = sasl_client("bob", "bob-secret");
  plain_clear.sasl.mechanisms = {"PLAIN"};
  auto error = error_of([&] { connect(server.uri(TransportKind::grpc), plain_clear); });
  EXPECT_THAT(error.message(), HasSubstr("PLAIN and LOGIN are only used over TLS"));
}

TEST_F(SecurityTest, PlaintextClientToTlsPortIsToldToUseTls) {
  FerrydProcess server(tls_args(tls_->server));
  auto error = error_of([&] { connect("ferry+tcp://127.0.0.1:" + std::to_string(server.tls_port()), {}); });
  EXPECT_EQ(error.code(), Code::unavailable);
  EXPECT_THAT(error.message(), HasSubstr("ferry+tls://"));
  EXPECT_NO_THROW(connect(server.tls_uri(), good_client()));
}

TEST_F(SecurityTest, TlsClientToPlaintextPortFailsAndIsLogged) {
  FerrydProcess server(tls_args(tls_->server));
  auto error = error_of([&] { connect("ferry+tls://127.0.0.1:" + std::to_string(server.tcp_port()), good_client()); });
  EXPECT_THAT(error.message(), HasSubstr("TLS handshake"));
  EXPECT_TRUE(server.wait_for_log("speaks TLS on this plaintext connection"));
}

TEST_F(SecurityTest, TlsHandshakeThatNeverFinishesIsDroppedAtTheAuthTimeout) {
  FerrydProcess server(tls_args(tls_->server, {"--auth-timeout", "500"}));
  const auto start = std::chrono::steady_clock::now();
  RawSocket silent = RawSocket::connect_tcp(server.tls_port());
  RawSocket partial = RawSocket::connect_tcp(server.tls_port());
  const std::uint8_t record_start[] = {0x16, 0x03, 0x01, 0x02, 0x00, 0x01};  // half a ClientHello
  partial.send(record_start);
  EXPECT_TRUE(silent.wait_closed(5s));
  EXPECT_TRUE(partial.wait_closed(5s));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 450ms);
  EXPECT_TRUE(server.wait_for_log("TLS handshake not finished within 500 ms"));
  EXPECT_NO_THROW(connect(server.tls_uri(), good_client()));
}

TEST_F(SecurityTest, FloodOfUnfinishedTlsHandshakesIsBoundedAndDrained) {
  FerrydProcess server(tls_args(tls_->server, {"--max-unauthenticated-clients", "50", "--auth-timeout", "3000",
                                               "--io-threads", "2", "--worker-threads", "2"}));
  const unsigned threads_before = server.threads();
  std::vector<RawSocket> sockets;
  for (int i = 0; i < 300; ++i) sockets.push_back(RawSocket::connect_tcp(server.tls_port()));
  // Beyond the 50 handshakes allowed at once, connections are closed at once.
  unsigned closed_fast = 0;
  for (auto& s : sockets) closed_fast += s.wait_closed(20ms) ? 1 : 0;
  EXPECT_GE(closed_fast, 240u);
  EXPECT_LE(closed_fast, 250u);
  EXPECT_EQ(server.threads(), threads_before);
  // The 50 that hold a slot are dropped at the auth timeout, and then a
  // good client gets in.
  unsigned closed_later = 0;
  for (auto& s : sockets) closed_later += s.wait_closed(8s) ? 1 : 0;
  EXPECT_EQ(closed_later, 300u);
  Client client = connect(server.tls_uri(), good_client());
  EXPECT_EQ(echo(client, "after the flood"), "after the flood");
  EXPECT_TRUE(server.wait_for_log("max_unauthenticated_clients (50) reached"));
}

TEST_F(SecurityTest, Tls12OnlyWhenConfigured) {
  rpc::ClientOptions old_client = good_client();
  old_client.tls.min_version = "1.2";
  old_client.tls.max_version = "1.2";
  {
    FerrydProcess server(tls_args(tls_->server));
    auto error = error_of([&] { connect(server.tls_uri(), old_client); });
    EXPECT_THAT(error.message(), HasSubstr("TLS handshake"));
  }
  FerrydProcess server(tls_args(tls_->server, {"--tls-min-version", "1.2"}));
  Client client = connect(server.tls_uri(), old_client);
  EXPECT_EQ(who(client).tls_version(), "TLSv1.2");
}

TEST_F(SecurityTest, SighupReloadsTheCertificateWithoutDroppingConnections) {
  TempDir live;
  const std::string cert = live.path() + "/server.pem", key = live.path() + "/server-key.pem";
  fs::copy_file(tls_->server.cert, cert);
  fs::copy_file(tls_->server.key, key);
  FerrydProcess server(tls_args(CertFiles{cert, key, {}, {}}));
  Client before = connect(server.tls_uri(), good_client());
  EXPECT_EQ(before.peer().tls_fingerprint, tls_->server.sha256_fingerprint);

  fs::copy_file(tls_->server_renewed.cert, cert, fs::copy_options::overwrite_existing);
  fs::copy_file(tls_->server_renewed.key, key, fs::copy_options::overwrite_existing);
  ASSERT_EQ(::kill(server.pid(), SIGHUP), 0);
  ASSERT_TRUE(server.wait_for_log("TLS certificate reloaded"));
  Client after = connect(server.tls_uri(), good_client());
  EXPECT_EQ(after.peer().tls_fingerprint, tls_->server_renewed.sha256_fingerprint);
  EXPECT_EQ(echo(before, "still here"), "still here");

  // A broken file is refused and the renewed certificate stays in use.
  { std::ofstream(key, std::ios::trunc) << "not a key\n"; }
  ASSERT_EQ(::kill(server.pid(), SIGHUP), 0);
  ASSERT_TRUE(server.wait_for_log("TLS reload failed, keeping the current certificate"));
  Client third = connect(server.tls_uri(), good_client());
  EXPECT_EQ(third.peer().tls_fingerprint, tls_->server_renewed.sha256_fingerprint);
  EXPECT_EQ(echo(before, "and still"), "and still");
}

// ---- SASL ----

TEST_F(SecurityTest, ScramOverTcpAndOverTls) {
  FerrydProcess server(join(tls_args(tls_->server, {"--auth-tls", "sasl", "--auth-tcp", "sasl"}), sasl_args()));
  Client tcp = connect(server.tcp_uri(), sasl_client("alice", "alice-secret"));
  EXPECT_EQ(tcp.server().mechanism, "SCRAM-SHA-256");
  EXPECT_EQ(tcp.server().ssf, 0u);
  auto me = who(tcp);
  EXPECT_EQ(me.user(), "alice");
  EXPECT_EQ(me.mechanism(), "SCRAM-SHA-256");
  EXPECT_EQ(me.ssf(), 0u);
  Client tls = connect(server.tls_uri(), sasl_client("bob", "bob-secret", good_client()));
  auto bob = who(tls);
  EXPECT_EQ(bob.user(), "bob");
  EXPECT_EQ(bob.tls_subject(), "CN=client1,O=ferry tests");
  EXPECT_EQ(echo(tls, "both"), "both");
}

TEST_F(SecurityTest, WrongPasswordAndUnknownUserAreRefusedAlike) {
  FerrydProcess server(sasl_args({"--auth-tcp", "sasl"}));
  auto wrong = error_of([&] { connect(server.tcp_uri(), sasl_client("alice", "guess")); });
  EXPECT_EQ(wrong.code(), Code::unauthenticated);
  EXPECT_THAT(wrong.message(), HasSubstr("wrong user name or password"));
  auto unknown = error_of([&] { connect(server.tcp_uri(), sasl_client("mallory", "guess")); });
  EXPECT_EQ(unknown.code(), Code::unauthenticated);
  EXPECT_THAT(unknown.message(), HasSubstr("wrong user name or password"));
  Client alice = connect(server.tcp_uri(), sasl_client("alice", "alice-secret"));
  EXPECT_EQ(echo(alice, "fine"), "fine");
}

TEST_F(SecurityTest, UserOutsideTheAllowedListIsRefused) {
  FerrydProcess server(sasl_args({"--auth-tcp", "sasl", "--sasl-allowed-user", "ali*"}));
  auto error = error_of([&] { connect(server.tcp_uri(), sasl_client("bob", "bob-secret")); });
  EXPECT_EQ(error.code(), Code::permission_denied);
  EXPECT_THAT(error.message(), HasSubstr("user 'bob' is not allowed"));
  EXPECT_NO_THROW(connect(server.tcp_uri(), sasl_client("alice", "alice-secret")));
}

TEST_F(SecurityTest, PlainIsOnlyAllowedOverTls) {
  FerrydProcess server(join(tls_args(tls_->server, {"--auth-tls", "sasl", "--auth-tcp", "sasl"}),
                            sasl_args({"--sasl-mechanisms", "PLAIN,SCRAM-SHA-256"})));
  rpc::ClientOptions plain_tls = sasl_client("alice", "alice-secret", good_client());
  plain_tls.sasl.mechanisms = {"PLAIN"};
  Client client = connect(server.tls_uri(), plain_tls);
  EXPECT_EQ(who(client).mechanism(), "PLAIN");

  // The library will not send a password in the clear...
  rpc::ClientOptions plain_tcp = sasl_client("alice", "alice-secret");
  plain_tcp.sasl.mechanisms = {"PLAIN"};
  auto error = error_of([&] { connect(server.tcp_uri(), plain_tcp); });
  EXPECT_THAT(error.message(), HasSubstr("PLAIN and LOGIN are only used over TLS"));

  // ...and the server refuses a hand-made one that tries.
  RawSocket raw = RawSocket::connect_tcp(server.tcp_port());
  raw.hello();
  ferry::v1::SaslStartCall start;
  start.set_mechanism("PLAIN");
  start.set_data(std::string("\0alice\0alice-secret", 19));
  start.set_has_data(true);
  raw.send_frame({Control::program, Control::version, Control::SaslStart::number, rpc::FrameType::call, 2,
                  rpc::FrameStatus::ok},
                 start.SerializeAsString());
  const ferry::v1::Error e = raw.read_error();
  EXPECT_EQ(e.code(), ferry::v1::PERMISSION_DENIED);
  EXPECT_THAT(e.message(), HasSubstr("only allowed over TLS"));
}

// Forwards bytes between a client and the server and keeps a copy of what
// the client sent, to see what an eavesdropper would.
class Tap {
 public:
  explicit Tap(std::uint16_t target) : target_(target) {
    listener_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    ::listen(listener_, 4);
    socklen_t len = sizeof addr;
    ::getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { run(); });
  }
  ~Tap() {
    stop_ = true;
    thread_.join();
    ::close(listener_);
  }
  std::uint16_t port() const { return port_; }
  std::string seen() {
    std::lock_guard lock(mutex_);
    return seen_;
  }

 private:
  void run() {
    pollfd lp{listener_, POLLIN, 0};
    while (!stop_ && ::poll(&lp, 1, 50) <= 0) {
    }
    if (stop_) return;
    int client = ::accept(listener_, nullptr, nullptr);
    int server = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(target_);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::connect(server, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    char buf[65536];
    while (!stop_) {
      pollfd fds[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
      if (::poll(fds, 2, 50) <= 0) continue;
      bool done = false;
      for (int i = 0; i < 2; ++i) {
        if (!(fds[i].revents & (POLLIN | POLLHUP))) continue;
        ssize_t n = ::recv(fds[i].fd, buf, sizeof buf, 0);
        if (n <= 0) {
          done = true;
          break;
        }
        if (i == 0) {
          std::lock_guard lock(mutex_);
          seen_.append(buf, static_cast<std::size_t>(n));
        }
        ::send(i == 0 ? server : client, buf, static_cast<std::size_t>(n), MSG_NOSIGNAL);
      }
      if (done) break;
    }
    ::close(client);
    ::close(server);
  }
  std::uint16_t target_;
  int listener_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::mutex mutex_;
  std::string seen_;
};

TEST_F(SecurityTest, SaslSecurityLayerProtectsEveryByteAfterAuthentication) {
  FerrydProcess server(sasl_args({"--auth-tcp", "sasl", "--sasl-mechanisms", "DIGEST-MD5,SCRAM-SHA-256"}));
  const std::string secret = "payload-an-eavesdropper-must-not-read";
  {
    Tap tap(server.tcp_port());
    rpc::ClientOptions o = sasl_client("alice", "alice-secret");
    o.sasl.mechanisms = {"DIGEST-MD5"};
    Client client = connect("ferry+tcp://127.0.0.1:" + std::to_string(tap.port()), o);
    EXPECT_EQ(client.server().mechanism, "DIGEST-MD5");
    EXPECT_GT(client.server().ssf, 0u);
    auto me = who(client);
    EXPECT_EQ(me.mechanism(), "DIGEST-MD5");
    EXPECT_EQ(me.ssf(), client.server().ssf);
    EXPECT_EQ(echo(client, secret), secret);
    round_trip(client, 4u << 20);
    EXPECT_EQ(tap.seen().find(secret), std::string::npos) << "the payload crossed the wire in the clear";
  }
  {
    // The same tap sees it without a layer: the check above can fail.
    Tap tap(server.tcp_port());
    rpc::ClientOptions o = sasl_client("alice", "alice-secret");
    o.sasl.mechanisms = {"SCRAM-SHA-256"};
    Client client = connect("ferry+tcp://127.0.0.1:" + std::to_string(tap.port()), o);
    EXPECT_EQ(client.server().ssf, 0u);
    EXPECT_EQ(echo(client, secret), secret);
    EXPECT_NE(tap.seen().find(secret), std::string::npos);
  }
}

TEST_F(SecurityTest, MinimumSsfRefusesMechanismsWithoutALayer) {
  FerrydProcess server(sasl_args({"--auth-tcp", "sasl", "--sasl-mechanisms", "DIGEST-MD5,SCRAM-SHA-256",
                                  "--sasl-min-ssf", "56"}));
  rpc::ClientOptions scram = sasl_client("alice", "alice-secret");
  scram.sasl.mechanisms = {"SCRAM-SHA-256"};
  auto error = error_of([&] { connect(server.tcp_uri(), scram); });
  EXPECT_EQ(error.code(), Code::unauthenticated);
  Client layered = connect(server.tcp_uri(), sasl_client("alice", "alice-secret"));
  EXPECT_EQ(layered.server().mechanism, "DIGEST-MD5");
  EXPECT_GE(layered.server().ssf, 56u);
}

}  // namespace
}  // namespace ferry::testing
