// SASL (Cyrus libsasl2) authentication for connection start, and its
// security layer.
//
// The exchange (DESIGN.md "Connection start", as libvirt's
// REMOTE_PROC_AUTH_SASL_*): after Hello says auth_required, the client asks
// AuthList for the mechanisms on offer, sends SaslStart with the one it
// picked and its first token, then SaslStep until the server says complete.
// Tokens travel as opaque bytes; Cyrus does the mechanism work on both sides.
//
// Policy lives here, not in Cyrus's config files: which mechanisms are
// offered, where the password database is, the user allow-list, and the
// rule that mechanisms sending the password in the clear (PLAIN, LOGIN) are
// refused unless the connection is TLS.
//
// A mechanism that negotiates a security layer (SSF > 0, e.g. DIGEST-MD5
// with auth-conf) protects every byte after authentication through
// sasl_encode/sasl_decode, unless TLS already protects the connection, in
// which case no layer is negotiated (max_ssf 0).
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "rpc/security_layer.h"
#include "rpc/transport.h"

typedef struct sasl_conn sasl_conn_t;

namespace ferry::rpc {

struct SaslServerOptions {
  std::string service = "ferry";                         // the SASL service (app) name
  std::vector<std::string> mechanisms{"SCRAM-SHA-256"};  // offered, if installed
  // fnmatch globs over the authenticated user name (as given, and as
  // user@realm); empty: any user the database knows.
  std::vector<std::string> allowed_users;
  std::string sasldb_path;  // empty: Cyrus's default (/etc/sasldb2)
  std::string realm;        // the realm users were added under (saslpasswd2 -u); empty: host name
  // Without TLS: the least protection a mechanism must offer (0 allows
  // SCRAM, which authenticates but does not encrypt; 56 forces a layer).
  unsigned min_ssf = 0;
  unsigned max_ssf = 256;
};

struct SaslClientOptions {
  std::string username;
  std::string password;
  std::string authzid;                  // act as another user (if the server allows); empty: none
  std::vector<std::string> mechanisms;  // acceptable, in no order; empty: whatever the server offers
  std::string service = "ferry";
  std::string realm;                    // empty: the server's
  unsigned min_ssf = 0;
  unsigned max_ssf = 256;
  bool enabled() const { return !username.empty(); }
};

using SaslToken = std::optional<std::string>;  // an empty token differs from none

struct SaslResult {
  bool complete = false;
  SaslToken data;
  unsigned ssf = 0;
  std::string user;  // when complete
};

// Process-wide Cyrus initialisation; safe to call repeatedly.
void sasl_global_init();

// One authentication exchange on the server side (may be restarted with
// start() after a failure). Not thread-safe; one caller at a time.
class SaslServer {
 public:
  SaslServer(const SaslServerOptions& options, const PeerIdentity& peer, const std::string& local_address,
             const std::string& remote_address);
  ~SaslServer();
  SaslServer(const SaslServer&) = delete;
  SaslServer& operator=(const SaslServer&) = delete;

  // Mechanisms offered on this connection (installed ∩ allowed, minus the
  // plaintext ones without TLS).
  std::vector<std::string> mechanisms();
  // Throws ferry::Error: UNAUTHENTICATED (wrong password, unknown user),
  // PERMISSION_DENIED (user not allowed, PLAIN without TLS),
  // INVALID_ARGUMENT (mechanism not offered, malformed token).
  SaslResult start(const std::string& mechanism, const SaslToken& data);
  SaslResult step(const SaslToken& data);
  // After a complete exchange with ssf > 0: the layer for the connection.
  std::shared_ptr<SecurityLayer> layer();
  const std::string& mechanism() const { return mechanism_; }

 private:
  SaslResult finish(int rc, const char* out, unsigned outlen);
  void reset();
  struct Callbacks;
  SaslServerOptions options_;
  bool over_tls_;
  int tls_bits_;
  std::string local_, remote_, peer_address_;
  std::string mechanism_;
  std::shared_ptr<sasl_conn_t> conn_;
  std::unique_ptr<Callbacks> callbacks_;
};

// The client side.
class SaslClient {
 public:
  SaslClient(const SaslClientOptions& options, const std::string& server_host, const PeerIdentity& peer);
  ~SaslClient();
  SaslClient(const SaslClient&) = delete;
  SaslClient& operator=(const SaslClient&) = delete;

  // Picks a mechanism among the server's; returns it and the first token.
  std::pair<std::string, SaslToken> start(const std::vector<std::string>& offered);
  // Answers a server token; nullopt when there is nothing to send.
  SaslToken step(const SaslToken& server_data);
  unsigned ssf() const;
  std::shared_ptr<SecurityLayer> layer();

 private:
  struct Callbacks;
  SaslClientOptions options_;
  bool over_tls_;
  std::shared_ptr<sasl_conn_t> conn_;
  std::unique_ptr<Callbacks> callbacks_;
};

}  // namespace ferry::rpc
