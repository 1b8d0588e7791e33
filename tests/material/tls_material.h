// Certificates made at test time with the OpenSSL API: a CA, a second CA,
// and server and client certificates good and bad in every way the tests
// need (expired, wrong host, other CA, a DN outside the allowed list).
#pragma once

#include <string>
#include <vector>

namespace ferry::testing {

struct CertSpec {
  std::string subject;                    // RFC 2253 order, most specific first: "CN=localhost,O=ferry tests"
  std::vector<std::string> dns_names;     // subjectAltName DNS entries
  std::vector<std::string> ip_addresses;  // subjectAltName IP entries
  bool is_ca = false;
  bool server = true;  // extendedKeyUsage serverAuth
  bool client = false; // extendedKeyUsage clientAuth
  long not_before_offset_s = -3600;  // relative to now
  long not_after_offset_s = 30L * 24 * 3600;
};

struct CertFiles {
  std::string cert;             // PEM certificate
  std::string key;              // PEM private key (mode 0600)
  std::string subject_rfc2253;  // as `openssl x509 -noout -subject -nameopt RFC2253` prints it
  std::string sha256_fingerprint;  // lowercase hex, no separators
};

// Issues a certificate (EC P-256, SHA-256) signed by `issuer`, or
// self-signed when it is null, into <dir>/<name>.pem and <dir>/<name>-key.pem.
// Throws std::runtime_error with OpenSSL's reason.
CertFiles make_cert(const std::string& dir, const std::string& name, const CertSpec& spec, const CertFiles* issuer);

struct TlsMaterial {
  std::string dir;
  CertFiles ca, other_ca;
  CertFiles server;             // localhost, 127.0.0.1, ::1; signed by ca
  CertFiles server_renewed;     // the same names, a new key and serial
  CertFiles server_wrong_host;  // wrong.example only
  CertFiles server_expired;     // valid from two days ago to yesterday
  CertFiles server_other_ca;    // localhost, signed by other_ca
  CertFiles client;             // CN=client1,O=ferry tests
  CertFiles client_mallory;     // CN=mallory,O=elsewhere, signed by ca
  CertFiles client_expired;     // CN=client1,O=ferry tests, expired
  CertFiles client_other_ca;    // CN=client1,O=ferry tests, signed by other_ca
};

TlsMaterial make_tls_material(const std::string& dir);

}  // namespace ferry::testing
