// Test helper: runs `f`, which must throw a ferry::Error, and returns that
// error for the test to examine. A call that does not throw fails the test.
#pragma once

#include <gtest/gtest.h>

#include "rpc/error.h"

namespace ferry::testing {

template <class F>
Error error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "expected a ferry::Error";
  return Error(Code::ok, "");
}

}  // namespace ferry::testing
