// The ferry CLI's admin verbs (`ferry admin ...`, docs/cli.md): talk to the
// daemon's admin socket (docs/operations.md, "Admin interface").
#pragma once

#include <string>
#include <vector>

#include "client/cli/output.h"
#include "rpc/client.h"

namespace google::protobuf {
class Message;
}

namespace ferry::cli {

struct AdminRequest {
  enum class Verb { info, clients, client, disconnect, limits, log_level, jobs, cancel };
  Verb verb = Verb::info;
  std::string socket;              // the admin socket
  std::string id;                  // client or job id
  std::string reason;              // disconnect, cancel
  std::vector<std::string> set;    // limits --set NAME=VALUE
  std::string level;               // log-level LEVEL (empty: show)
  bool include_admin = false;      // clients --all
  bool json = false;
  bool quiet = false;
};

// Throws ferry::Error; returns the exit code.
int run_admin(const AdminRequest& request, rpc::ClientOptions options);

// Any message as one JSON object: field names as in the .proto, 64-bit
// numbers as JSON numbers, unset optional fields left out.
std::string message_json(const google::protobuf::Message& message);

}  // namespace ferry::cli
