#include "tests/material/tls_material.h"

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cstdio>
#include <memory>
#include <stdexcept>

namespace ferry::testing {

namespace {

template <auto Free>
struct Deleter {
  template <class T>
  void operator()(T* p) const {
    Free(p);
  }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using X509Ptr = std::unique_ptr<X509, Deleter<X509_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO_free_all>>;
using ExtPtr = std::unique_ptr<X509_EXTENSION, Deleter<X509_EXTENSION_free>>;

[[noreturn]] void fail(const std::string& what) {
  char buf[256] = "unknown error";
  if (unsigned long e = ERR_get_error()) ERR_error_string_n(e, buf, sizeof buf);
  ERR_clear_error();
  throw std::runtime_error("making test certificates: " + what + ": " + buf);
}

void check(int ok, const std::string& what) {
  if (ok != 1) fail(what);
}

// "CN=a,O=b" (most specific first) into an X509_NAME built top-down.
void set_name(X509_NAME* name, const std::string& rfc2253) {
  std::vector<std::pair<std::string, std::string>> parts;
  std::size_t pos = 0;
  while (pos < rfc2253.size()) {
    std::size_t comma = rfc2253.find(',', pos);
    if (comma == std::string::npos) comma = rfc2253.size();
    const std::string part = rfc2253.substr(pos, comma - pos);
    const std::size_t eq = part.find('=');
    if (eq == std::string::npos) throw std::runtime_error("bad subject '" + rfc2253 + "'");
    parts.emplace_back(part.substr(0, eq), part.substr(eq + 1));
    pos = comma + 1;
  }
  for (auto it = parts.rbegin(); it != parts.rend(); ++it)
    check(X509_NAME_add_entry_by_txt(name, it->first.c_str(), MBSTRING_UTF8,
                                     reinterpret_cast<const unsigned char*>(it->second.c_str()), -1, -1, 0),
          "subject entry " + it->first);
}

void add_ext(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  ExtPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
  if (!ext) fail("extension " + value);
  check(X509_add_ext(cert, ext.get(), -1), "add extension " + value);
}

std::string subject_of(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  X509_NAME_print_ex(bio.get(), X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(n));
}

std::string fingerprint_of(X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  check(X509_digest(cert, EVP_sha256(), md, &len), "digest");
  std::string out;
  char hex[3];
  for (unsigned i = 0; i < len; ++i) {
    std::snprintf(hex, sizeof hex, "%02x", md[i]);
    out += hex;
  }
  return out;
}

template <class Write>
void write_pem(const std::string& path, unsigned mode, Write write) {
  BioPtr bio(BIO_new_file(path.c_str(), "w"));
  if (!bio) fail("open " + path);
  check(write(bio.get()), "write " + path);
  bio.reset();
  ::chmod(path.c_str(), mode);
}

PkeyPtr read_key(const std::string& path) {
  BioPtr bio(BIO_new_file(path.c_str(), "r"));
  if (!bio) fail("open " + path);
  PkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) fail("read key " + path);
  return key;
}

X509Ptr read_cert(const std::string& path) {
  BioPtr bio(BIO_new_file(path.c_str(), "r"));
  if (!bio) fail("open " + path);
  X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) fail("read certificate " + path);
  return cert;
}

}  // namespace

CertFiles make_cert(const std::string& dir, const std::string& name, const CertSpec& spec, const CertFiles* issuer) {
  PkeyPtr key(EVP_EC_gen("P-256"));
  if (!key) fail("EC key");
  X509Ptr cert(X509_new());
  if (!cert) fail("X509_new");
  check(X509_set_version(cert.get(), 2), "version");
  // A random 64-bit serial: every certificate differs, renewed ones too.
  unsigned char serial_bytes[8];
  check(RAND_bytes(serial_bytes, sizeof serial_bytes), "serial");
  serial_bytes[0] &= 0x7f;
  std::unique_ptr<BIGNUM, Deleter<BN_free>> bn(BN_bin2bn(serial_bytes, sizeof serial_bytes, nullptr));
  if (!bn || !BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert.get()))) fail("serial");
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), spec.not_before_offset_s);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), spec.not_after_offset_s);
  set_name(X509_get_subject_name(cert.get()), spec.subject);
  check(X509_set_pubkey(cert.get(), key.get()), "public key");

  X509Ptr issuer_cert;
  PkeyPtr issuer_key;
  X509* signer_cert = cert.get();
  EVP_PKEY* signer_key = key.get();
  if (issuer) {
    issuer_cert = read_cert(issuer->cert);
    issuer_key = read_key(issuer->key);
    signer_cert = issuer_cert.get();
    signer_key = issuer_key.get();
  }
  check(X509_set_issuer_name(cert.get(), X509_get_subject_name(signer_cert)), "issuer");

  if (spec.is_ca) {
    add_ext(cert.get(), signer_cert, NID_basic_constraints, "critical,CA:TRUE");
    add_ext(cert.get(), signer_cert, NID_key_usage, "critical,keyCertSign,cRLSign");
  } else {
    add_ext(cert.get(), signer_cert, NID_basic_constraints, "critical,CA:FALSE");
    add_ext(cert.get(), signer_cert, NID_key_usage, "critical,digitalSignature,keyAgreement");
    std::string eku;
    if (spec.server) eku = "serverAuth";
    if (spec.client) eku += std::string(eku.empty() ? "" : ",") + "clientAuth";
    if (!eku.empty()) add_ext(cert.get(), signer_cert, NID_ext_key_usage, eku);
  }
  std::string san;
  for (const auto& d : spec.dns_names) san += (san.empty() ? "" : ",") + std::string("DNS:") + d;
  for (const auto& ip : spec.ip_addresses) san += (san.empty() ? "" : ",") + std::string("IP:") + ip;
  if (!san.empty()) add_ext(cert.get(), signer_cert, NID_subject_alt_name, san);
  add_ext(cert.get(), signer_cert, NID_subject_key_identifier, "hash");
  if (issuer) add_ext(cert.get(), signer_cert, NID_authority_key_identifier, "keyid:always");

  if (X509_sign(cert.get(), signer_key, EVP_sha256()) <= 0) fail("sign " + name);

  CertFiles out;
  out.cert = dir + "/" + name + ".pem";
  out.key = dir + "/" + name + "-key.pem";
  write_pem(out.cert, 0644, [&](BIO* b) { return PEM_write_bio_X509(b, cert.get()); });
  write_pem(out.key, 0600, [&](BIO* b) {
    return PEM_write_bio_PrivateKey(b, key.get(), nullptr, nullptr, 0, nullptr, nullptr);
  });
  out.subject_rfc2253 = subject_of(cert.get());
  out.sha256_fingerprint = fingerprint_of(cert.get());
  return out;
}

TlsMaterial make_tls_material(const std::string& dir) {
  TlsMaterial m;
  m.dir = dir;
  const long day = 24 * 3600;
  CertSpec ca{"CN=ferry test CA,O=ferry tests", {}, {}, true, false, false, -3600, 30 * day};
  m.ca = make_cert(dir, "ca", ca, nullptr);
  ca.subject = "CN=another CA,O=elsewhere";
  m.other_ca = make_cert(dir, "other-ca", ca, nullptr);

  CertSpec server{"CN=localhost,O=ferry tests", {"localhost"}, {"127.0.0.1", "::1"}, false, true, false,
                  -3600, 30 * day};
  m.server = make_cert(dir, "server", server, &m.ca);
  m.server_renewed = make_cert(dir, "server-renewed", server, &m.ca);
  m.server_other_ca = make_cert(dir, "server-other-ca", server, &m.other_ca);
  CertSpec expired = server;
  expired.not_before_offset_s = -2 * day;
  expired.not_after_offset_s = -day;
  m.server_expired = make_cert(dir, "server-expired", expired, &m.ca);
  CertSpec wrong{"CN=wrong.example,O=ferry tests", {"wrong.example"}, {}, false, true, false, -3600, 30 * day};
  m.server_wrong_host = make_cert(dir, "server-wrong-host", wrong, &m.ca);

  CertSpec client{"CN=client1,O=ferry tests", {}, {}, false, false, true, -3600, 30 * day};
  m.client = make_cert(dir, "client", client, &m.ca);
  m.client_other_ca = make_cert(dir, "client-other-ca", client, &m.other_ca);
  CertSpec client_expired = client;
  client_expired.not_before_offset_s = -2 * day;
  client_expired.not_after_offset_s = -day;
  m.client_expired = make_cert(dir, "client-expired", client_expired, &m.ca);
  CertSpec mallory{"CN=mallory,O=elsewhere", {}, {}, false, false, true, -3600, 30 * day};
  m.client_mallory = make_cert(dir, "client-mallory", mallory, &m.ca);
  return m;
}

}  // namespace ferry::testing
