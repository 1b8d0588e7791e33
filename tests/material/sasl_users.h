// A Cyrus sasldb made at test time with the real saslpasswd2.
#pragma once

#include <string>

namespace ferry::testing {

// Path of saslpasswd2; throws (saying to install sasl2-bin) if it is missing.
std::string saslpasswd2_path();

// Adds `user` in `realm` to the sasldb at `db_path` (created if needed) for
// the SASL service `app`: saslpasswd2 -p -c -f DB -a APP -u REALM USER with
// the password on stdin. Throws with saslpasswd2's output on failure.
void add_sasl_user(const std::string& db_path, const std::string& app, const std::string& realm,
                   const std::string& user, const std::string& password);

}  // namespace ferry::testing
