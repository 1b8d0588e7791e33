// Addresses as users type them (CLI, config, libferry callers): every form
// ferryd and the client accept, and the message a mistyped one gets.
#include "rpc/endpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

#include <string>
#include <vector>

#include "rpc/error.h"

namespace ferry::rpc {
namespace {

using ::testing::HasSubstr;

void expect_unix(const std::string& text, const std::string& path) {
  SCOPED_TRACE(text);
  const Endpoint e = Endpoint::parse(text);
  EXPECT_EQ(e.kind, Endpoint::Kind::unix_socket);
  EXPECT_EQ(e.path, path);
  EXPECT_EQ(e.host, "");
  EXPECT_EQ(e.port, 0);
}

void expect_tcp(const std::string& text, const std::string& host, std::uint16_t port) {
  SCOPED_TRACE(text);
  const Endpoint e = Endpoint::parse(text);
  EXPECT_EQ(e.kind, Endpoint::Kind::tcp);
  EXPECT_EQ(e.host, host);
  EXPECT_EQ(e.port, port);
  EXPECT_EQ(e.path, "");
}

// The message parse() throws for `text`; fails the test if it parses.
std::string refusal(const std::string& text) {
  try {
    const Endpoint e = Endpoint::parse(text);
    ADD_FAILURE() << "'" << text << "' parsed as " << e.to_string();
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), Code::invalid_argument) << text;
    // Whatever is wrong, the user sees what they typed and what would work.
    EXPECT_THAT(error.message(), HasSubstr("bad address '" + text + "'"));
    EXPECT_THAT(error.message(), HasSubstr("expected unix:/path, tcp:host:port"));
    return error.message();
  }
  return {};
}

bool same(const Endpoint& a, const Endpoint& b) {
  return a.kind == b.kind && a.path == b.path && a.host == b.host && a.port == b.port;
}

// ---- accepted forms ----

TEST(Endpoint, ParsesUnixSchemeWithAbsolutePath) { expect_unix("unix:/run/ferry/sock", "/run/ferry/sock"); }

TEST(Endpoint, ParsesUnixSchemeWithRelativePath) {
  expect_unix("unix:./ferry.sock", "./ferry.sock");
  expect_unix("unix:ferry.sock", "ferry.sock");
}

TEST(Endpoint, ParsesFerryUnixUriWithThreeSlashes) { expect_unix("ferry+unix:///run/ferry/sock", "/run/ferry/sock"); }

TEST(Endpoint, IgnoresTheQueryOfAFerryUnixUri) {
  expect_unix("ferry+unix:///run/ferry/sock?mode=ro", "/run/ferry/sock");
}

TEST(Endpoint, TakesABareAbsolutePathAsAUnixSocket) { expect_unix("/run/ferry/sock", "/run/ferry/sock"); }

TEST(Endpoint, TakesADotRelativePathAsAUnixSocket) {
  expect_unix("./ferry.sock", "./ferry.sock");
  expect_unix("./run/ferry.sock", "./run/ferry.sock");
}

TEST(Endpoint, ParsesTcpSchemeWithHostAndPort) {
  expect_tcp("tcp:127.0.0.1:7000", "127.0.0.1", 7000);
  expect_tcp("tcp:localhost:7000", "localhost", 7000);
  expect_tcp("tcp:volumes.example.org:443", "volumes.example.org", 443);
}

TEST(Endpoint, ParsesFerryTcpUri) {
  expect_tcp("ferry+tcp://127.0.0.1:7000", "127.0.0.1", 7000);
  expect_tcp("ferry+tcp://volumes.example.org:7000", "volumes.example.org", 7000);
}

TEST(Endpoint, ParsesBracketedIpv6Host) {
  expect_tcp("tcp:[::1]:7000", "::1", 7000);
  expect_tcp("ferry+tcp://[fe80::1%eth0]:7000", "fe80::1%eth0", 7000);
  expect_tcp("tcp:[2001:db8::7]:1", "2001:db8::7", 1);
}

TEST(Endpoint, IgnoresTrailingSlashesAfterThePort) {
  expect_tcp("ferry+tcp://127.0.0.1:7000/", "127.0.0.1", 7000);
  expect_tcp("ferry+tcp://[::1]:7000/", "::1", 7000);
  expect_tcp("tcp:localhost:7000//", "localhost", 7000);
}

TEST(Endpoint, AcceptsTheWholePortRange) {
  expect_tcp("tcp:localhost:0", "localhost", 0);  // listen: the kernel picks one
  expect_tcp("tcp:localhost:65535", "localhost", 65535);
}

// ---- refusals ----

TEST(Endpoint, RefusesTcpAddressWithoutPort) {
  EXPECT_THAT(refusal("tcp:localhost"), HasSubstr("missing port"));
  EXPECT_THAT(refusal("ferry+tcp://localhost"), HasSubstr("missing port"));
  EXPECT_THAT(refusal("tcp:[::1]"), HasSubstr("missing port"));
  EXPECT_THAT(refusal("tcp:[::1]7000"), HasSubstr("missing port"));
}

TEST(Endpoint, RefusesEmptyPort) { EXPECT_THAT(refusal("tcp:localhost:"), HasSubstr("port '' is not a number")); }

TEST(Endpoint, RefusesPortAbove65535) {
  EXPECT_THAT(refusal("tcp:localhost:70000"), HasSubstr("port '70000' is not a number from 0 to 65535"));
  EXPECT_THAT(refusal("tcp:localhost:65536"), HasSubstr("port '65536'"));
  EXPECT_THAT(refusal("tcp:localhost:99999999999999999999"), HasSubstr("not a number from 0 to 65535"));
}

TEST(Endpoint, RefusesNonNumericPort) {
  EXPECT_THAT(refusal("tcp:localhost:http"), HasSubstr("port 'http' is not a number"));
  EXPECT_THAT(refusal("tcp:localhost:7000x"), HasSubstr("port '7000x'"));
  EXPECT_THAT(refusal("tcp:localhost:-1"), HasSubstr("port '-1'"));
  EXPECT_THAT(refusal("tcp:localhost: 7000"), HasSubstr("port ' 7000'"));
}

TEST(Endpoint, RefusesMissingHost) {
  EXPECT_THAT(refusal("tcp::7000"), HasSubstr("missing host"));
  EXPECT_THAT(refusal("tcp:[]:7000"), HasSubstr("missing host"));
}

TEST(Endpoint, RefusesUnterminatedIpv6Bracket) {
  EXPECT_THAT(refusal("tcp:[::1:7000"), HasSubstr("unterminated '['"));
}

TEST(Endpoint, ParsesTls) {
  for (const char* text : {"tls:localhost:16514", "ferry+tls://localhost:16514"}) {
    Endpoint e = Endpoint::parse(text);
    EXPECT_EQ(e.kind, Endpoint::Kind::tls) << text;
    EXPECT_EQ(e.host, "localhost");
    EXPECT_EQ(e.port, 16514);
    EXPECT_EQ(e.to_string(), "tls:localhost:16514");
    EXPECT_EQ(e.to_uri(), "ferry+tls://localhost:16514");
  }
  EXPECT_EQ(Endpoint::parse("ferry+tls://[::1]:1").to_uri(), "ferry+tls://[::1]:1");
}

TEST(Endpoint, ParsesGrpc) {
  for (const char* text : {"grpc:localhost:16515", "ferry+grpc://localhost:16515"}) {
    Endpoint e = Endpoint::parse(text);
    EXPECT_EQ(e.kind, Endpoint::Kind::grpc) << text;
    EXPECT_EQ(e.host, "localhost");
    EXPECT_EQ(e.port, 16515);
    EXPECT_EQ(e.to_string(), "grpc:localhost:16515");
    EXPECT_EQ(e.to_uri(), "ferry+grpc://localhost:16515");
  }
  for (const char* text : {"grpcs:localhost:16515", "ferry+grpcs://localhost:16515"}) {
    Endpoint e = Endpoint::parse(text);
    EXPECT_EQ(e.kind, Endpoint::Kind::grpcs) << text;
    EXPECT_EQ(e.to_string(), "grpcs:localhost:16515");
    EXPECT_EQ(e.to_uri(), "ferry+grpcs://localhost:16515");
    EXPECT_TRUE(e.is_grpc());
    EXPECT_TRUE(e.is_secure());
  }
  EXPECT_EQ(Endpoint::parse("grpc:[::1]:0").to_uri(), "ferry+grpc://[::1]:0");
  EXPECT_THAT(refusal("grpc:localhost"), HasSubstr("missing port"));
}

TEST(Endpoint, RefusesUnknownScheme) {
  EXPECT_THAT(refusal("http://localhost:7000"), HasSubstr("unknown scheme"));
  EXPECT_THAT(refusal("ferry+ssh://localhost:7000"), HasSubstr("unknown scheme"));
  EXPECT_THAT(refusal("localhost:7000"), HasSubstr("unknown scheme"));
  EXPECT_THAT(refusal("ferry.sock"), HasSubstr("unknown scheme"));
  EXPECT_THAT(refusal(""), HasSubstr("unknown scheme"));
}

TEST(Endpoint, RefusesRelativePathInFerryUnixUri) {
  // ferry+unix://run/sock would read "run" as a host in any URI parser.
  EXPECT_THAT(refusal("ferry+unix://run/ferry/sock"), HasSubstr("the socket path must be absolute"));
  EXPECT_THAT(refusal("ferry+unix://"), HasSubstr("the socket path must be absolute"));
}

TEST(Endpoint, RefusesEmptyUnixPath) { EXPECT_THAT(refusal("unix:"), HasSubstr("empty socket path")); }

// ---- printing and round trips ----

TEST(Endpoint, PrintsCanonicalForms) {
  EXPECT_EQ(Endpoint::unix_socket("/run/ferry/sock").to_string(), "unix:/run/ferry/sock");
  EXPECT_EQ(Endpoint::unix_socket("/run/ferry/sock").to_uri(), "ferry+unix:///run/ferry/sock");
  EXPECT_EQ(Endpoint::tcp("127.0.0.1", 7000).to_string(), "tcp:127.0.0.1:7000");
  EXPECT_EQ(Endpoint::tcp("127.0.0.1", 7000).to_uri(), "ferry+tcp://127.0.0.1:7000");
  EXPECT_EQ(Endpoint::tcp("::1", 7000).to_string(), "tcp:[::1]:7000");
  EXPECT_EQ(Endpoint::tcp("::1", 7000).to_uri(), "ferry+tcp://[::1]:7000");
}

TEST(Endpoint, ParsesBackWhatItPrints) {
  const std::vector<Endpoint> endpoints = {
      Endpoint::unix_socket("/run/ferry/sock"),   Endpoint::unix_socket("/tmp/a b/ferry.sock"),
      Endpoint::tcp("127.0.0.1", 7000),           Endpoint::tcp("localhost", 0),
      Endpoint::tcp("volumes.example.org", 65535), Endpoint::tcp("::1", 7000),
      Endpoint::tcp("fe80::1%eth0", 7000),
  };
  for (const auto& e : endpoints) {
    SCOPED_TRACE(e.to_string());
    EXPECT_TRUE(same(Endpoint::parse(e.to_string()), e)) << Endpoint::parse(e.to_string()).to_string();
    EXPECT_TRUE(same(Endpoint::parse(e.to_uri()), e)) << Endpoint::parse(e.to_uri()).to_string();
  }
}

TEST(Endpoint, ParsesBackTheStringOfARelativeUnixPath) {
  const Endpoint e = Endpoint::unix_socket("./ferry.sock");
  EXPECT_TRUE(same(Endpoint::parse(e.to_string()), e));
}

TEST(Endpoint, ParsesBackTheUriOfARelativeUnixPath) {
  // to_uri() must print something parse() takes back, for every endpoint
  // parse() can produce; "unix:./ferry.sock" is one.
  const Endpoint e = Endpoint::parse("unix:./ferry.sock");
  Endpoint back;
  EXPECT_NO_THROW(back = Endpoint::parse(e.to_uri())) << "to_uri() printed '" << e.to_uri() << "'";
  // The URI names the same socket by its absolute path.
  EXPECT_EQ(back.kind, Endpoint::Kind::unix_socket);
  EXPECT_EQ(back.path, std::filesystem::absolute("ferry.sock").lexically_normal().string());
}

}  // namespace
}  // namespace ferry::rpc
