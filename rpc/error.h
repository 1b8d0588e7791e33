// ferry::Error: the one error type of ferry. A code from a short fixed list
// (gRPC's status numbers, so the gRPC transport maps 1:1), a message a
// person can act on, the domain it came from, and whether repeating the
// request may succeed. Its wire form is ferry.v1.Error (error.proto).
#pragma once

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>

namespace ferry::v1 {
class Error;
}

namespace ferry {

enum class Code : std::uint32_t {
  ok = 0,
  cancelled = 1,
  unknown = 2,
  invalid_argument = 3,
  deadline_exceeded = 4,
  not_found = 5,
  already_exists = 6,
  permission_denied = 7,
  resource_exhausted = 8,
  failed_precondition = 9,
  aborted = 10,
  out_of_range = 11,
  unimplemented = 12,
  internal = 13,
  unavailable = 14,
  data_loss = 15,
  unauthenticated = 16,
};

const char* to_string(Code code);

// Whether a failure of this kind is worth repeating: overloaded, or the
// link went away (reconnect and repeat). Callers may override per error.
bool default_retryable(Code code);

class Error : public std::runtime_error {
 public:
  Error(Code code, std::string message, std::string domain = "rpc");
  Error(Code code, std::string message, std::string domain, bool retryable, int os_errno = 0);

  Code code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }
  const std::string& domain() const noexcept { return domain_; }
  bool retryable() const noexcept { return retryable_; }
  int os_errno() const noexcept { return os_errno_; }

  // "CODE: message" for logs and CLI output.
  std::string describe() const;

  v1::Error to_proto() const;
  static Error from_proto(const v1::Error& e);
  // From an errno value, with the strerror text appended to `what`.
  static Error from_errno(int err, const std::string& what, std::string domain = "os");
  // Any exception_ptr into an Error: ferry::Error passes through, other
  // exceptions become INTERNAL carrying their what().
  static Error from_exception(std::exception_ptr e);

 private:
  Code code_;
  std::string message_;
  std::string domain_;
  bool retryable_;
  int os_errno_;
};

}  // namespace ferry

// FERRY_REQUIRE: the caller's fault; becomes INVALID_ARGUMENT and the
// connection lives. FERRY_ASSERT: our bug; becomes INTERNAL, logged loudly.
#define FERRY_REQUIRE(cond, msg)                                        \
  do {                                                                  \
    if (!(cond)) throw ::ferry::Error(::ferry::Code::invalid_argument, (msg)); \
  } while (0)
#define FERRY_ASSERT(cond)                                                                      \
  do {                                                                                          \
    if (!(cond))                                                                                \
      throw ::ferry::Error(::ferry::Code::internal,                                             \
                           std::string("internal error: assertion failed: " #cond " at ") + __FILE__ + \
                               ":" + std::to_string(__LINE__));                                 \
  } while (0)
