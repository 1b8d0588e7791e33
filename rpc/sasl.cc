#include "rpc/sasl.h"

#include <fnmatch.h>
#include <pthread.h>
#include <sasl/sasl.h>
#include <strings.h>

#include <cstring>
#include <mutex>
#include <spdlog/spdlog.h>

#include "rpc/error.h"

#if defined(__SANITIZE_ADDRESS__)
#define FERRY_HAVE_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FERRY_HAVE_LSAN 1
#endif
#endif
#ifdef FERRY_HAVE_LSAN
#include <sanitizer/lsan_interface.h>
#endif

namespace ferry::rpc {

namespace {

// Cyrus's DIGEST-MD5 plugin (2.1.28) loses OpenSSL cipher contexts it
// makes during the exchange, whatever the caller does; leak checking is
// paused around calls into a mechanism so the sanitizer runs report
// ferry's leaks, not the plugin's. Nothing in release builds.
struct PluginCall {
#ifdef FERRY_HAVE_LSAN
  PluginCall() { __lsan_disable(); }
  ~PluginCall() { __lsan_enable(); }
#endif
};

int log_cb(void*, int level, const char* message) {
  if (!message) return SASL_OK;
  if (level <= SASL_LOG_ERR)
    spdlog::warn("sasl: {}", message);
  else if (level <= SASL_LOG_NOTE)
    spdlog::info("sasl: {}", message);
  else
    spdlog::debug("sasl: {}", message);
  return SASL_OK;
}

using sasl_cb_fn = int (*)();
template <class F>
sasl_cb_fn cb(F f) {
  // Cyrus stores every callback as int(*)(void); the cast goes through
  // void(*)(void), the documented escape from -Wcast-function-type.
  return reinterpret_cast<sasl_cb_fn>(reinterpret_cast<void (*)()>(f));
}

// Cyrus calls these for its internal locks; it needs real ones once
// sessions run on several threads.
void* mutex_alloc() {
  auto* m = new pthread_mutex_t;
  pthread_mutex_init(m, nullptr);
  return m;
}
int mutex_lock(void* m) { return pthread_mutex_lock(static_cast<pthread_mutex_t*>(m)); }
int mutex_unlock(void* m) { return pthread_mutex_unlock(static_cast<pthread_mutex_t*>(m)); }
void mutex_free(void* m) {
  pthread_mutex_destroy(static_cast<pthread_mutex_t*>(m));
  delete static_cast<pthread_mutex_t*>(m);
}

bool same_mech(const std::string& a, const std::string& b) { return ::strcasecmp(a.c_str(), b.c_str()) == 0; }
bool sends_password_in_clear(const std::string& mech) { return same_mech(mech, "PLAIN") || same_mech(mech, "LOGIN"); }

std::vector<std::string> split(const char* list) {
  std::vector<std::string> out;
  std::string cur;
  for (const char* p = list ? list : ""; *p; ++p) {
    if (*p == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += *p;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

std::string detail(sasl_conn_t* conn, int rc) {
  const char* d = conn ? sasl_errdetail(conn) : nullptr;
  return d ? d : sasl_errstring(rc, nullptr, nullptr);
}

// For failures caused by the peer's data on the server: Cyrus's CRAM-MD5
// plugin can leave its error text without a terminating NUL, so
// sasl_errdetail would read past it (found by fuzzing); the fixed text for
// the result code says enough to the log and nothing to the peer.
std::string peer_failure_detail(int rc) { return sasl_errstring(rc, nullptr, nullptr); }

std::shared_ptr<sasl_conn_t> own(sasl_conn_t* conn) {
  return std::shared_ptr<sasl_conn_t>(conn, [](sasl_conn_t* c) { sasl_dispose(&c); });
}

void set_security(sasl_conn_t* conn, bool over_tls, int tls_bits, unsigned min_ssf, unsigned max_ssf) {
  sasl_security_properties_t props{};
  // Over TLS no second layer is negotiated: TLS already protects the bytes.
  props.min_ssf = over_tls ? 0 : min_ssf;
  props.max_ssf = over_tls ? 0 : max_ssf;
  props.maxbufsize = 65536;
  props.security_flags = SASL_SEC_NOANONYMOUS | (over_tls ? 0 : SASL_SEC_NOPLAINTEXT);
  sasl_setprop(conn, SASL_SEC_PROPS, &props);
  if (over_tls) {
    sasl_ssf_t external = static_cast<sasl_ssf_t>(tls_bits);
    sasl_setprop(conn, SASL_SSF_EXTERNAL, &external);
  }
}

unsigned ssf_of(sasl_conn_t* conn) {
  const void* v = nullptr;
  if (sasl_getprop(conn, SASL_SSF, &v) != SASL_OK || !v) return 0;
  return *static_cast<const sasl_ssf_t*>(v);
}

class SaslLayer final : public SecurityLayer {
 public:
  explicit SaslLayer(std::shared_ptr<sasl_conn_t> conn) : conn_(std::move(conn)) {
    const void* v = nullptr;
    if (sasl_getprop(conn_.get(), SASL_MAXOUTBUF, &v) == SASL_OK && v) max_ = *static_cast<const unsigned*>(v);
    if (max_ == 0) max_ = 4096;
  }
  void encode(std::span<const std::uint8_t> in, std::vector<std::uint8_t>& out) override {
    const char* enc = nullptr;
    unsigned len = 0;
    int rc = sasl_encode(conn_.get(), reinterpret_cast<const char*>(in.data()), static_cast<unsigned>(in.size()), &enc,
                         &len);
    if (rc != SASL_OK) throw Error(Code::data_loss, "sasl_encode failed: " + detail(conn_.get(), rc), "sasl");
    out.insert(out.end(), enc, enc + len);
  }
  void decode(std::span<const std::uint8_t> in, std::vector<std::uint8_t>& out) override {
    // Cyrus keeps partial packets itself; feed it in bounded pieces.
    while (!in.empty()) {
      const std::size_t n = std::min<std::size_t>(in.size(), 65536);
      const char* dec = nullptr;
      unsigned len = 0;
      int rc = sasl_decode(conn_.get(), reinterpret_cast<const char*>(in.data()), static_cast<unsigned>(n), &dec, &len);
      if (rc != SASL_OK)
        throw Error(Code::data_loss, "sasl_decode failed (corrupt or forged data): " + detail(conn_.get(), rc), "sasl");
      if (len) out.insert(out.end(), dec, dec + len);
      in = in.subspan(n);
    }
  }
  std::size_t max_input() const override { return max_; }
  const char* name() const override { return "SASL"; }

 private:
  std::shared_ptr<sasl_conn_t> conn_;
  unsigned max_ = 0;
};

std::string address_for_sasl(const std::string& address) {
  // Cyrus wants "ip;port"; UNIX peers have none.
  auto colon = address.rfind(':');
  if (colon == std::string::npos || address.find(' ') != std::string::npos) return {};
  return address.substr(0, colon) + ";" + address.substr(colon + 1);
}

}  // namespace

void sasl_global_init() {
  static std::once_flag once;
  static int server_rc = SASL_OK, client_rc = SASL_OK;
  std::call_once(once, [] {
    static sasl_callback_t global[] = {
        {SASL_CB_LOG, cb(&log_cb), nullptr},
        {SASL_CB_LIST_END, nullptr, nullptr},
    };
    sasl_set_mutex(&mutex_alloc, &mutex_lock, &mutex_unlock, &mutex_free);
    server_rc = sasl_server_init(global, "ferry");
    client_rc = sasl_client_init(global);
  });
  if (server_rc != SASL_OK)
    throw Error(Code::internal, std::string("cannot initialise SASL (server): ") + sasl_errstring(server_rc, nullptr, nullptr),
                "sasl");
  if (client_rc != SASL_OK)
    throw Error(Code::internal, std::string("cannot initialise SASL (client): ") + sasl_errstring(client_rc, nullptr, nullptr),
                "sasl");
}

// ---- server ----

struct SaslServer::Callbacks {
  std::string sasldb_path;
  std::string mech_list;
  sasl_callback_t list[3];

  static int getopt(void* context, const char*, const char* option, const char** result, unsigned* len) {
    auto* self = static_cast<Callbacks*>(context);
    const std::string* value = nullptr;
    static const std::string auxprop = "sasldb", pwcheck = "auxprop";
    if (std::strcmp(option, "sasldb_path") == 0 && !self->sasldb_path.empty()) value = &self->sasldb_path;
    else if (std::strcmp(option, "auxprop_plugin") == 0) value = &auxprop;
    else if (std::strcmp(option, "pwcheck_method") == 0) value = &pwcheck;
    else if (std::strcmp(option, "mech_list") == 0 && !self->mech_list.empty()) value = &self->mech_list;
    if (!value) return SASL_FAIL;
    *result = value->c_str();
    if (len) *len = static_cast<unsigned>(value->size());
    return SASL_OK;
  }
};

SaslServer::SaslServer(const SaslServerOptions& options, const PeerIdentity& peer, const std::string& local_address,
                       const std::string& remote_address)
    : options_(options),
      over_tls_(peer.transport == "tls" || peer.transport == "grpcs"),
      tls_bits_(peer.tls_bits),
      local_(address_for_sasl(local_address)),
      remote_(address_for_sasl(remote_address)),
      peer_address_(peer.address),
      callbacks_(std::make_unique<Callbacks>()) {
  sasl_global_init();
  callbacks_->sasldb_path = options_.sasldb_path;
  for (const auto& m : options_.mechanisms) callbacks_->mech_list += (callbacks_->mech_list.empty() ? "" : " ") + m;
  callbacks_->list[0] = {SASL_CB_GETOPT, cb(&Callbacks::getopt), callbacks_.get()};
  callbacks_->list[1] = {SASL_CB_LOG, cb(&log_cb), nullptr};
  callbacks_->list[2] = {SASL_CB_LIST_END, nullptr, nullptr};
  reset();
}

SaslServer::~SaslServer() = default;

void SaslServer::reset() {
  conn_.reset();
  sasl_conn_t* c = nullptr;
  int rc = sasl_server_new(options_.service.c_str(), nullptr, options_.realm.empty() ? nullptr : options_.realm.c_str(),
                           local_.empty() ? nullptr : local_.c_str(), remote_.empty() ? nullptr : remote_.c_str(),
                           callbacks_->list, SASL_SUCCESS_DATA, &c);
  if (rc != SASL_OK) {
    if (c) sasl_dispose(&c);
    throw Error(Code::internal, std::string("cannot start a SASL session: ") + sasl_errstring(rc, nullptr, nullptr),
                "sasl");
  }
  conn_ = own(c);
  set_security(c, over_tls_, tls_bits_, options_.min_ssf, options_.max_ssf);
  mechanism_.clear();
}

std::vector<std::string> SaslServer::mechanisms() {
  const char* list = nullptr;
  int rc = sasl_listmech(conn_.get(), nullptr, "", " ", "", &list, nullptr, nullptr);
  std::vector<std::string> out;
  if (rc != SASL_OK) return out;
  for (auto& m : split(list)) {
    bool allowed = false;
    for (const auto& a : options_.mechanisms) allowed = allowed || same_mech(a, m);
    if (allowed && (over_tls_ || !sends_password_in_clear(m))) out.push_back(m);
  }
  return out;
}

SaslResult SaslServer::start(const std::string& mechanism, const SaslToken& data) {
  if (!mechanism_.empty()) reset();  // a new attempt on the same connection
  if (!over_tls_ && sends_password_in_clear(mechanism))
    throw Error(Code::permission_denied,
                "SASL mechanism " + mechanism + " sends the password in the clear; it is only allowed over TLS", "sasl");
  bool offered = false;
  for (const auto& m : mechanisms()) offered = offered || same_mech(m, mechanism);
  if (!offered) {
    std::string list;
    for (const auto& m : mechanisms()) list += (list.empty() ? "" : ", ") + m;
    throw Error(Code::invalid_argument,
                "SASL mechanism '" + mechanism + "' is not offered here (offered: " + (list.empty() ? "none" : list) + ")",
                "sasl");
  }
  mechanism_ = mechanism;
  const char* out = nullptr;
  unsigned outlen = 0;
  [[maybe_unused]] PluginCall plugin;
  int rc = sasl_server_start(conn_.get(), mechanism.c_str(), data ? data->data() : nullptr,
                             data ? static_cast<unsigned>(data->size()) : 0, &out, &outlen);
  return finish(rc, out, outlen);
}

SaslResult SaslServer::step(const SaslToken& data) {
  if (mechanism_.empty())
    throw Error(Code::failed_precondition, "SaslStep before SaslStart", "sasl");
  const char* out = nullptr;
  unsigned outlen = 0;
  [[maybe_unused]] PluginCall plugin;
  int rc = sasl_server_step(conn_.get(), data ? data->data() : nullptr, data ? static_cast<unsigned>(data->size()) : 0,
                            &out, &outlen);
  return finish(rc, out, outlen);
}

SaslResult SaslServer::finish(int rc, const char* out, unsigned outlen) {
  SaslResult result;
  if (rc == SASL_CONTINUE || rc == SASL_OK) {
    if (out) result.data = std::string(out, outlen);
  }
  if (rc == SASL_CONTINUE) return result;
  if (rc != SASL_OK) {
    const std::string why = peer_failure_detail(rc);
    const std::string mech = mechanism_;
    reset();
    spdlog::warn("SASL {} authentication from {} failed: {}", mech, peer_address_, why);
    if (rc == SASL_BADPROT || rc == SASL_BADPARAM)
      throw Error(Code::invalid_argument, "malformed SASL " + mech + " token: " + why, "sasl");
    if (rc == SASL_TOOWEAK || rc == SASL_ENCRYPT)
      throw Error(Code::permission_denied, "SASL " + mech + " is too weak for this connection: " + why, "sasl");
    // Wrong password and unknown user read the same to the peer.
    throw Error(Code::unauthenticated, "authentication failed (" + mech + "): wrong user name or password", "sasl");
  }
  const void* v = nullptr;
  if (sasl_getprop(conn_.get(), SASL_USERNAME, &v) == SASL_OK && v) result.user = static_cast<const char*>(v);
  // Cyrus qualifies the name with the realm; in the server's own realm the
  // plain name is what users and the allow-list speak of.
  const std::string suffix = "@" + options_.realm;
  std::string qualified = result.user;
  if (!options_.realm.empty()) {
    if (result.user.size() > suffix.size() && result.user.ends_with(suffix))
      result.user.resize(result.user.size() - suffix.size());
    else if (result.user.find('@') == std::string::npos)
      qualified = result.user + suffix;
  }
  if (!options_.allowed_users.empty()) {
    bool allowed = false;
    for (const auto& pattern : options_.allowed_users)
      allowed = allowed || ::fnmatch(pattern.c_str(), result.user.c_str(), 0) == 0 ||
                ::fnmatch(pattern.c_str(), qualified.c_str(), 0) == 0;
    if (!allowed) {
      spdlog::warn("SASL user '{}' from {} authenticated but is not in allowed_users; refused", result.user,
                   peer_address_);
      const std::string user = result.user;
      reset();
      throw Error(Code::permission_denied, "user '" + user + "' is not allowed to connect to this server", "sasl");
    }
  }
  result.complete = true;
  result.ssf = ssf_of(conn_.get());
  return result;
}

std::shared_ptr<SecurityLayer> SaslServer::layer() {
  if (ssf_of(conn_.get()) == 0) return nullptr;
  return std::make_shared<SaslLayer>(conn_);
}

// ---- client ----

struct SaslClient::Callbacks {
  SaslClientOptions options;
  std::vector<unsigned char> secret;  // sasl_secret_t: length, then bytes
  sasl_callback_t list[6];

  static int simple(void* context, int id, const char** result, unsigned* len) {
    auto* self = static_cast<Callbacks*>(context);
    const std::string* v = nullptr;
    if (id == SASL_CB_AUTHNAME) v = &self->options.username;
    else if (id == SASL_CB_USER) v = &self->options.authzid;
    if (!v) return SASL_FAIL;
    *result = v->c_str();
    if (len) *len = static_cast<unsigned>(v->size());
    return SASL_OK;
  }
  static int pass(sasl_conn_t*, void* context, int id, sasl_secret_t** psecret) {
    auto* self = static_cast<Callbacks*>(context);
    if (id != SASL_CB_PASS) return SASL_FAIL;
    const auto& pw = self->options.password;
    self->secret.assign(sizeof(sasl_secret_t) + pw.size() + 1, 0);
    auto* s = reinterpret_cast<sasl_secret_t*>(self->secret.data());
    s->len = pw.size();
    std::memcpy(s->data, pw.data(), pw.size());
    *psecret = s;
    return SASL_OK;
  }
  static int realm(void* context, int, const char** available, const char** result) {
    auto* self = static_cast<Callbacks*>(context);
    if (!self->options.realm.empty())
      *result = self->options.realm.c_str();
    else
      *result = available && available[0] ? available[0] : nullptr;
    return SASL_OK;
  }
};

SaslClient::SaslClient(const SaslClientOptions& options, const std::string& server_host, const PeerIdentity& peer)
    : options_(options), over_tls_(peer.transport == "tls" || peer.transport == "grpcs"), callbacks_(std::make_unique<Callbacks>()) {
  sasl_global_init();
  callbacks_->options = options;
  callbacks_->list[0] = {SASL_CB_AUTHNAME, cb(&Callbacks::simple), callbacks_.get()};
  callbacks_->list[1] = {SASL_CB_USER, cb(&Callbacks::simple), callbacks_.get()};
  callbacks_->list[2] = {SASL_CB_PASS, cb(&Callbacks::pass), callbacks_.get()};
  callbacks_->list[3] = {SASL_CB_GETREALM, cb(&Callbacks::realm), callbacks_.get()};
  callbacks_->list[4] = {SASL_CB_LOG, cb(&log_cb), nullptr};
  callbacks_->list[5] = {SASL_CB_LIST_END, nullptr, nullptr};
  const std::string remote = address_for_sasl(peer.address);
  sasl_conn_t* c = nullptr;
  int rc = sasl_client_new(options.service.c_str(), server_host.c_str(), nullptr,
                           remote.empty() ? nullptr : remote.c_str(), callbacks_->list, SASL_SUCCESS_DATA, &c);
  if (rc != SASL_OK) {
    if (c) sasl_dispose(&c);
    throw Error(Code::internal, std::string("cannot start a SASL client session: ") + sasl_errstring(rc, nullptr, nullptr),
                "sasl");
  }
  conn_ = own(c);
  set_security(c, over_tls_, peer.tls_bits, options.min_ssf, options.max_ssf);
}

SaslClient::~SaslClient() = default;

std::pair<std::string, SaslToken> SaslClient::start(const std::vector<std::string>& offered) {
  std::string list;
  std::string all;
  for (const auto& m : offered) {
    all += (all.empty() ? "" : ", ") + m;
    bool wanted = options_.mechanisms.empty();
    for (const auto& w : options_.mechanisms) wanted = wanted || same_mech(w, m);
    // Never send a password in the clear, whatever the server offers.
    if (!over_tls_ && sends_password_in_clear(m)) wanted = false;
    if (wanted) list += (list.empty() ? "" : " ") + m;
  }
  if (list.empty())
    throw Error(Code::unauthenticated,
                "no acceptable SASL mechanism: the server offers " + (all.empty() ? std::string("none") : all) +
                    (over_tls_ ? "" : " (PLAIN and LOGIN are only used over TLS)"),
                "sasl");
  const char* out = nullptr;
  unsigned outlen = 0;
  const char* mech = nullptr;
  sasl_interact_t* interact = nullptr;
  [[maybe_unused]] PluginCall plugin;
  int rc = sasl_client_start(conn_.get(), list.c_str(), &interact, &out, &outlen, &mech);
  if (rc != SASL_OK && rc != SASL_CONTINUE)
    throw Error(Code::unauthenticated,
                "cannot start SASL with any of " + list + ": " + detail(conn_.get(), rc), "sasl");
  SaslToken token;
  if (out) token = std::string(out, outlen);
  return {mech ? mech : "", token};
}

SaslToken SaslClient::step(const SaslToken& server_data) {
  const char* out = nullptr;
  unsigned outlen = 0;
  sasl_interact_t* interact = nullptr;
  [[maybe_unused]] PluginCall plugin;
  int rc = sasl_client_step(conn_.get(), server_data ? server_data->data() : nullptr,
                            server_data ? static_cast<unsigned>(server_data->size()) : 0, &interact, &out, &outlen);
  if (rc != SASL_OK && rc != SASL_CONTINUE)
    throw Error(Code::unauthenticated, "SASL exchange failed: " + detail(conn_.get(), rc), "sasl");
  if (!out) return std::nullopt;
  return std::string(out, outlen);
}

unsigned SaslClient::ssf() const { return ssf_of(conn_.get()); }

std::shared_ptr<SecurityLayer> SaslClient::layer() {
  if (ssf() == 0) return nullptr;
  return std::make_shared<SaslLayer>(conn_);
}

}  // namespace ferry::rpc
