"""ferry.Error: every failure reported by libferry."""

# Names of ferry.v1.Code (the gRPC status numbers).
CODE_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


class Error(Exception):
    """A failure from libferry or the daemon.

    Attributes: ``code`` (int, ferry.v1.Code / gRPC status number),
    ``code_name`` (e.g. ``"NOT_FOUND"``), ``message`` (for people),
    ``domain`` (where it came from: ``"volume"``, ``"rpc"``, ``"os"``...)
    and ``retryable`` (whether repeating the request may succeed).
    """

    def __init__(self, code, message, domain="", retryable=False):
        super().__init__(code, message, domain, retryable)
        self.code = int(code)
        self.code_name = CODE_NAMES.get(self.code, str(self.code))
        self.message = message
        self.domain = domain
        self.retryable = bool(retryable)

    def __str__(self):
        return "%s: %s" % (self.code_name, self.message)

    def __repr__(self):
        return "ferry.Error(%s, %r, domain=%r, retryable=%r)" % (
            self.code_name, self.message, self.domain, self.retryable)

    def __reduce__(self):
        return (Error, (self.code, self.message, self.domain, self.retryable))
