// ferry::Error and its wire form ferry.v1.Error: the one error vocabulary
// shared by the native wire, the gRPC adapter and the NBD bridge.
#include "rpc/error.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

#include "ferry/v1/error.pb.h"

namespace ferry {
namespace {

using ::testing::HasSubstr;

constexpr Code all_codes[] = {
    Code::ok,        Code::cancelled,          Code::unknown,        Code::invalid_argument, Code::deadline_exceeded,
    Code::not_found, Code::already_exists,     Code::permission_denied, Code::resource_exhausted,
    Code::failed_precondition, Code::aborted,  Code::out_of_range,   Code::unimplemented,    Code::internal,
    Code::unavailable, Code::data_loss,        Code::unauthenticated,
};

TEST(Error, CodesFollowGrpcStatusNumbers) {
  // The gRPC adapter maps codes by number; these must never move.
  EXPECT_EQ(static_cast<int>(Code::ok), 0);
  EXPECT_EQ(static_cast<int>(Code::cancelled), 1);
  EXPECT_EQ(static_cast<int>(Code::unknown), 2);
  EXPECT_EQ(static_cast<int>(Code::invalid_argument), 3);
  EXPECT_EQ(static_cast<int>(Code::deadline_exceeded), 4);
  EXPECT_EQ(static_cast<int>(Code::not_found), 5);
  EXPECT_EQ(static_cast<int>(Code::already_exists), 6);
  EXPECT_EQ(static_cast<int>(Code::permission_denied), 7);
  EXPECT_EQ(static_cast<int>(Code::resource_exhausted), 8);
  EXPECT_EQ(static_cast<int>(Code::failed_precondition), 9);
  EXPECT_EQ(static_cast<int>(Code::aborted), 10);
  EXPECT_EQ(static_cast<int>(Code::out_of_range), 11);
  EXPECT_EQ(static_cast<int>(Code::unimplemented), 12);
  EXPECT_EQ(static_cast<int>(Code::internal), 13);
  EXPECT_EQ(static_cast<int>(Code::unavailable), 14);
  EXPECT_EQ(static_cast<int>(Code::data_loss), 15);
  EXPECT_EQ(static_cast<int>(Code::unauthenticated), 16);
}

TEST(Error, CodeNamesMatchTheProtoEnum) {
  for (Code code : all_codes) {
    const auto wire = static_cast<v1::Code>(code);
    ASSERT_TRUE(v1::Code_IsValid(wire));
    EXPECT_EQ(to_string(code), v1::Code_Name(wire));
  }
  EXPECT_STREQ(to_string(static_cast<Code>(99)), "UNKNOWN");
}

TEST(Error, RoundTripsThroughTheWireFormWithEveryField) {
  for (Code code : all_codes) {
    SCOPED_TRACE(to_string(code));
    for (bool retryable : {false, true}) {
      const Error original(code, "volume 'disk1' is busy", "volume", retryable, EBUSY);
      const v1::Error wire = original.to_proto();
      EXPECT_EQ(static_cast<int>(wire.code()), static_cast<int>(code));
      EXPECT_EQ(wire.message(), "volume 'disk1' is busy");
      EXPECT_EQ(wire.domain(), "volume");
      EXPECT_EQ(wire.retryable(), retryable);
      EXPECT_EQ(wire.os_errno(), EBUSY);

      // Through bytes, as a peer sees it.
      v1::Error parsed;
      ASSERT_TRUE(parsed.ParseFromString(wire.SerializeAsString()));
      const Error back = Error::from_proto(parsed);
      EXPECT_EQ(back.code(), code);
      EXPECT_EQ(back.message(), original.message());
      EXPECT_EQ(back.domain(), original.domain());
      EXPECT_EQ(back.retryable(), retryable);
      EXPECT_EQ(back.os_errno(), EBUSY);
      EXPECT_STREQ(back.what(), "volume 'disk1' is busy");
    }
  }
}

TEST(Error, FromProtoMapsAnUnknownCodeNumberToUnknown) {
  // A newer peer may send a code this side does not know: field 1 = 42.
  v1::Error wire;
  ASSERT_TRUE(wire.ParseFromString(std::string("\x08\x2a\x12\x04oops", 8)));
  const Error error = Error::from_proto(wire);
  EXPECT_EQ(error.code(), Code::unknown);
  EXPECT_EQ(error.message(), "oops");
}

TEST(Error, FromProtoMapsANegativeCodeNumberToUnknown) {
  // -1 as a 10-byte varint: open proto3 enums keep it as is.
  v1::Error wire;
  ASSERT_TRUE(wire.ParseFromString(std::string("\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 11)));
  EXPECT_EQ(Error::from_proto(wire).code(), Code::unknown);
}

TEST(Error, FromProtoFillsAnEmptyDomainWithRpc) {
  v1::Error wire;
  wire.set_code(v1::NOT_FOUND);
  wire.set_message("no such volume");
  const Error error = Error::from_proto(wire);
  EXPECT_EQ(error.code(), Code::not_found);
  EXPECT_EQ(error.domain(), "rpc");
  EXPECT_FALSE(error.retryable());
  EXPECT_EQ(error.os_errno(), 0);
}

TEST(Error, FromProtoTakesRetryableFromTheWireNotFromTheCode) {
  v1::Error wire;
  wire.set_code(v1::UNAVAILABLE);  // retryable by default...
  wire.set_retryable(false);       // ...but the sender knows better
  EXPECT_FALSE(Error::from_proto(wire).retryable());
  wire.set_code(v1::INTERNAL);
  wire.set_retryable(true);
  EXPECT_TRUE(Error::from_proto(wire).retryable());
}

TEST(Error, DefaultRetryableHoldsForOverloadAndLostLinksOnly) {
  for (Code code : all_codes) {
    const bool expected = code == Code::unavailable || code == Code::resource_exhausted || code == Code::aborted;
    EXPECT_EQ(default_retryable(code), expected) << to_string(code);
    EXPECT_EQ(Error(code, "x").retryable(), expected) << to_string(code);
  }
}

TEST(Error, ShortConstructorDefaultsDomainToRpcAndErrnoToZero) {
  const Error error(Code::invalid_argument, "bad size");
  EXPECT_EQ(error.domain(), "rpc");
  EXPECT_EQ(error.os_errno(), 0);
  EXPECT_FALSE(error.retryable());
}

TEST(Error, DescribesItselfAsCodeThenMessage) {
  EXPECT_EQ(Error(Code::not_found, "no volume 'disk1' in pool 'default'").describe(),
            "NOT_FOUND: no volume 'disk1' in pool 'default'");
}

TEST(Error, FromErrnoMapsEnospcToResourceExhaustedWithStrerrorText) {
  const Error error = Error::from_errno(ENOSPC, "writing volume 'disk1'");
  EXPECT_EQ(error.code(), Code::resource_exhausted);
  EXPECT_EQ(error.message(), std::string("writing volume 'disk1': ") + std::strerror(ENOSPC));
  EXPECT_EQ(error.domain(), "os");
  EXPECT_EQ(error.os_errno(), ENOSPC);
  // A full disk stays full: unlike an overloaded server, repeating the
  // write will not help.
  EXPECT_FALSE(error.retryable());
}

TEST(Error, FromErrnoMapsTheCommonErrnoValues) {
  struct Case {
    int err;
    Code code;
    bool retryable;
  };
  for (const Case& c : {Case{ENOENT, Code::not_found, false}, Case{EEXIST, Code::already_exists, false},
                        Case{EACCES, Code::permission_denied, false}, Case{EPERM, Code::permission_denied, false},
                        Case{EDQUOT, Code::resource_exhausted, false}, Case{EMFILE, Code::resource_exhausted, false},
                        Case{EINVAL, Code::invalid_argument, false}, Case{EROFS, Code::failed_precondition, false},
                        Case{EAGAIN, Code::unavailable, true}, Case{EBUSY, Code::unavailable, true},
                        Case{ECONNRESET, Code::unavailable, true}, Case{ECONNREFUSED, Code::unavailable, true},
                        Case{ETIMEDOUT, Code::unavailable, true}, Case{EPIPE, Code::unavailable, false},
                        Case{EIO, Code::data_loss, false}, Case{ECANCELED, Code::cancelled, false},
                        Case{EXDEV, Code::internal, false}}) {
    SCOPED_TRACE(std::strerror(c.err));
    const Error error = Error::from_errno(c.err, "op", "volume");
    EXPECT_EQ(error.code(), c.code);
    EXPECT_EQ(error.retryable(), c.retryable);
    EXPECT_EQ(error.os_errno(), c.err);
    EXPECT_EQ(error.domain(), "volume");
    EXPECT_THAT(error.message(), HasSubstr(std::strerror(c.err)));
  }
}

TEST(Error, FromExceptionPassesAFerryErrorThrough) {
  const Error thrown(Code::permission_denied, "volume.write needed", "access", true, EACCES);
  const Error error = Error::from_exception(std::make_exception_ptr(thrown));
  EXPECT_EQ(error.code(), Code::permission_denied);
  EXPECT_EQ(error.message(), "volume.write needed");
  EXPECT_EQ(error.domain(), "access");
  EXPECT_TRUE(error.retryable());
  EXPECT_EQ(error.os_errno(), EACCES);
}

TEST(Error, FromExceptionTurnsAStdExceptionIntoInternalCarryingWhat) {
  const Error error = Error::from_exception(std::make_exception_ptr(std::runtime_error("vector too long")));
  EXPECT_EQ(error.code(), Code::internal);
  EXPECT_THAT(error.message(), HasSubstr("vector too long"));
  EXPECT_FALSE(error.retryable());
  EXPECT_EQ(error.domain(), "rpc");
}

TEST(Error, FromExceptionTurnsANonStdExceptionIntoInternal) {
  const Error error = Error::from_exception(std::make_exception_ptr(42));
  EXPECT_EQ(error.code(), Code::internal);
  EXPECT_THAT(error.message(), HasSubstr("unknown exception"));
  EXPECT_FALSE(error.retryable());
}

TEST(Error, IsCaughtAsAStdRuntimeError) {
  try {
    throw Error(Code::unavailable, "server is shutting down");
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "server is shutting down");
  }
}

TEST(Error, RequireThrowsInvalidArgument) {
  try {
    FERRY_REQUIRE(1 + 1 == 3, "size must be a multiple of 512");
    FAIL() << "FERRY_REQUIRE did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::invalid_argument);
    EXPECT_EQ(e.message(), "size must be a multiple of 512");
  }
  EXPECT_NO_THROW(FERRY_REQUIRE(true, "unused"));
}

TEST(Error, AssertThrowsInternalNamingTheConditionAndPlace) {
  try {
    FERRY_ASSERT(2 + 2 == 5);
    FAIL() << "FERRY_ASSERT did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::internal);
    EXPECT_THAT(e.message(), HasSubstr("2 + 2 == 5"));
    EXPECT_THAT(e.message(), HasSubstr("error_test.cc"));
  }
  EXPECT_NO_THROW(FERRY_ASSERT(true));
}

}  // namespace
}  // namespace ferry
