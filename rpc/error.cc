#include "rpc/error.h"

#include <cstring>

#include "ferry/v1/error.pb.h"

namespace ferry {

const char* to_string(Code code) {
  switch (code) {
    case Code::ok: return "OK";
    case Code::cancelled: return "CANCELLED";
    case Code::unknown: return "UNKNOWN";
    case Code::invalid_argument: return "INVALID_ARGUMENT";
    case Code::deadline_exceeded: return "DEADLINE_EXCEEDED";
    case Code::not_found: return "NOT_FOUND";
    case Code::already_exists: return "ALREADY_EXISTS";
    case Code::permission_denied: return "PERMISSION_DENIED";
    case Code::resource_exhausted: return "RESOURCE_EXHAUSTED";
    case Code::failed_precondition: return "FAILED_PRECONDITION";
    case Code::aborted: return "ABORTED";
    case Code::out_of_range: return "OUT_OF_RANGE";
    case Code::unimplemented: return "UNIMPLEMENTED";
    case Code::internal: return "INTERNAL";
    case Code::unavailable: return "UNAVAILABLE";
    case Code::data_loss: return "DATA_LOSS";
    case Code::unauthenticated: return "UNAUTHENTICATED";
  }
  return "UNKNOWN";
}

bool default_retryable(Code code) {
  return code == Code::unavailable || code == Code::resource_exhausted || code == Code::aborted;
}

Error::Error(Code code, std::string message, std::string domain)
    : Error(code, std::move(message), std::move(domain), default_retryable(code)) {}

Error::Error(Code code, std::string message, std::string domain, bool retryable, int os_errno)
    : std::runtime_error(message),
      code_(code),
      message_(std::move(message)),
      domain_(std::move(domain)),
      retryable_(retryable),
      os_errno_(os_errno) {}

std::string Error::describe() const { return std::string(to_string(code_)) + ": " + message_; }

v1::Error Error::to_proto() const {
  v1::Error e;
  e.set_code(static_cast<v1::Code>(code_));
  e.set_message(message_);
  e.set_domain(domain_);
  e.set_retryable(retryable_);
  e.set_os_errno(os_errno_);
  return e;
}

Error Error::from_proto(const v1::Error& e) {
  auto raw = static_cast<std::uint32_t>(e.code());
  Code code = raw <= static_cast<std::uint32_t>(Code::unauthenticated) ? static_cast<Code>(raw) : Code::unknown;
  return Error(code, e.message(), e.domain().empty() ? "rpc" : e.domain(), e.retryable(), e.os_errno());
}

Error Error::from_errno(int err, const std::string& what, std::string domain) {
  Code code = Code::internal;
  switch (err) {
    case ENOENT: code = Code::not_found; break;
    case EEXIST: code = Code::already_exists; break;
    case EACCES:
    case EPERM: code = Code::permission_denied; break;
    case ENOSPC:
    case EDQUOT:
    case ENOMEM:
    case EMFILE:
    case ENFILE: code = Code::resource_exhausted; break;
    case EINVAL:
    case ENAMETOOLONG: code = Code::invalid_argument; break;
    case EROFS: code = Code::failed_precondition; break;
    case EBUSY:
    case EAGAIN: code = Code::unavailable; break;
    case ECONNRESET:
    case ECONNREFUSED:
    case EPIPE:
    case ETIMEDOUT: code = Code::unavailable; break;
    case EIO: code = Code::data_loss; break;
    case ECANCELED: code = Code::cancelled; break;
    default: break;
  }
  bool retryable = err == EAGAIN || err == EBUSY || err == ECONNRESET || err == ECONNREFUSED || err == ETIMEDOUT;
  return Error(code, what + ": " + std::strerror(err), std::move(domain), retryable, err);
}

Error Error::from_exception(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const Error& err) {
    return err;
  } catch (const std::exception& ex) {
    return Error(Code::internal, std::string("internal error: ") + ex.what());
  } catch (...) {
    return Error(Code::internal, "internal error: unknown exception");
  }
}

}  // namespace ferry
