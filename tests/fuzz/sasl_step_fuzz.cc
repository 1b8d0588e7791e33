// Fuzz target for the server side of SASL (rpc/sasl.cc): whatever tokens a
// peer sends in SaslStart and SaslStep, over TLS or not, the exchange ends
// in a result or a ferry::Error, never a crash, and PLAIN/LOGIN never
// succeed without TLS.
//
// Input: byte 0 picks the mechanism (low 2 bits: SCRAM-SHA-256,
// DIGEST-MD5, PLAIN, CRAM-MD5) and whether the connection is TLS (bit 2);
// the rest is up to 8 tokens, each a 2-byte little-endian length and its
// bytes, a length of 0xffff meaning "no token" (as has_data false). The
// first token goes with SaslStart, the others with SaslStep.
//
// A real Cyrus server session with a real sasldb (made once with
// saslpasswd2; user alice, password pw, realm ferry) answers. Cyrus is not
// built for coverage; the fuzzer steers by ferry's code around it.
//
//   build-fuzz/tests/fuzz/sasl_step_fuzz -max_total_time=60 /tmp/ss-corpus tests/fuzz/corpus/sasl_step
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "rpc/error.h"
#include "rpc/sasl.h"

namespace {

void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "sasl_step_fuzz: invariant broken: %s\n", what);
  std::abort();
}

std::string scratch_dir;

std::string make_sasldb() {
  char dir[] = "/tmp/ferry-sasl-fuzz-XXXXXX";
  require(::mkdtemp(dir) != nullptr, "mkdtemp");
  scratch_dir = dir;
  std::atexit([] { std::filesystem::remove_all(scratch_dir); });
  const std::string db = std::string(dir) + "/sasldb";
  const std::string cmd = "echo pw | saslpasswd2 -p -c -f '" + db + "' -a ferry -u ferry alice 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  require(p != nullptr, "popen saslpasswd2");
  char line[256];
  while (std::fgets(line, sizeof line, p)) std::fputs(line, stderr);
  const int status = ::pclose(p);
  if (status != 0) {
    std::fprintf(stderr, "sasl_step_fuzz: saslpasswd2 failed (install sasl2-bin)\n");
    std::abort();
  }
  return db;
}

const ferry::rpc::SaslServerOptions& options() {
  static const ferry::rpc::SaslServerOptions opts = [] {
    spdlog::set_level(spdlog::level::off);
    ferry::rpc::SaslServerOptions o;
    o.mechanisms = {"SCRAM-SHA-256", "DIGEST-MD5", "PLAIN", "CRAM-MD5"};
    o.sasldb_path = make_sasldb();
    o.realm = "ferry";
    return o;
  }();
  return opts;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  static const char* mechanisms[] = {"SCRAM-SHA-256", "DIGEST-MD5", "PLAIN", "CRAM-MD5"};
  const std::string mechanism = mechanisms[data[0] & 3];
  ferry::rpc::PeerIdentity peer;
  peer.transport = (data[0] & 4) ? "tls" : "tcp";
  peer.tls_bits = (data[0] & 4) ? 256 : 0;
  peer.address = "127.0.0.1:40000";

  std::vector<ferry::rpc::SaslToken> tokens;
  std::size_t pos = 1;
  while (pos + 2 <= size && tokens.size() < 8) {
    const std::size_t n = data[pos] | (std::size_t{data[pos + 1]} << 8);
    pos += 2;
    if (n == 0xffff) {
      tokens.emplace_back(std::nullopt);
      continue;
    }
    const std::size_t take = std::min(n, size - pos);
    tokens.emplace_back(std::string(reinterpret_cast<const char*>(data + pos), take));
    pos += take;
  }
  if (tokens.empty()) tokens.emplace_back(std::nullopt);

  ferry::rpc::SaslServer server(options(), peer, std::string(), peer.address);
  try {
    auto result = server.start(mechanism, tokens[0]);
    for (std::size_t i = 1; i < tokens.size() && !result.complete; ++i) result = server.step(tokens[i]);
    if (result.complete) {
      require(peer.transport == "tls" || (mechanism != "PLAIN"), "PLAIN never succeeds without TLS");
      require(!result.user.empty(), "a completed exchange names its user");
      if (peer.transport == "tls") require(server.layer() == nullptr, "no security layer over TLS");
    }
  } catch (const ferry::Error& e) {
    require(e.code() == ferry::Code::unauthenticated || e.code() == ferry::Code::permission_denied ||
                e.code() == ferry::Code::invalid_argument || e.code() == ferry::Code::failed_precondition,
            "SASL fails with an authentication kind of error");
    if (peer.transport != "tls" && mechanism == "PLAIN")
      require(e.code() == ferry::Code::permission_denied, "PLAIN without TLS is refused as such");
  }
  return 0;
}
