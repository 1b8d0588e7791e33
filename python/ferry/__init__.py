"""ferry: Python binding of libferry, the client library of ferryd.

    import ferry
    with ferry.connect("ferry+unix:///run/ferry/ferryd.sock") as s:
        s.vol_create("default", "disk.img", 10 << 30)
        s.upload_file("default", "disk.img", "disk.raw")

See docs/python.md. asyncio: ferry.aio.
"""

import atexit as _atexit
import weakref as _weakref

from ferry._error import Error, CODE_NAMES
from ferry import _ferry

PoolInfo = _ferry.PoolInfo
VolumeInfo = _ferry.VolumeInfo
VolumeEvent = _ferry.VolumeEvent
VolumeEventKind = _ferry.VolumeEventKind
UploadReply = _ferry.UploadReply
DownloadReply = _ferry.DownloadReply
TransferResult = _ferry.TransferResult
Progress = _ferry.Progress
UploadStream = _ferry.UploadStream
DownloadStream = _ferry.DownloadStream

# Sessions still open, closed at interpreter exit (their io threads must not
# outlive the interpreter).
_open_sessions = _weakref.WeakSet()


@_atexit.register
def _close_all():
    for s in list(_open_sessions):
        try:
            s.close()
        except Exception:
            pass


def _session_enter(self):
    return self


def _session_exit(self, exc_type, exc, tb):
    self.close()
    return False


def _session_repr(self):
    return "<ferry.Session %s>" % ("closed" if self.closed else "open")


Session = _ferry.Session
Session.__enter__ = _session_enter
Session.__exit__ = _session_exit
Session.__repr__ = _session_repr


def _upload_enter(self):
    return self


def _upload_exit(self, exc_type, exc, tb):
    if exc_type is not None:
        self.abort("upload stopped by %s" % exc_type.__name__)
    elif not self.finished:
        self.finish()
    return False


UploadStream.__enter__ = _upload_enter
UploadStream.__exit__ = _upload_exit


def _download_enter(self):
    return self


def _download_exit(self, exc_type, exc, tb):
    if not self.finished:
        if exc_type is None and self.ended:
            self.finish()
        else:
            self.abort("download stopped by %s" % (exc_type.__name__ if exc_type else "the client"))
    return False


def _download_iter(self):
    while True:
        kind, payload = self.read()
        if kind == "end":
            return
        yield kind, payload


DownloadStream.__enter__ = _download_enter
DownloadStream.__exit__ = _download_exit
DownloadStream.__iter__ = _download_iter


def connect(uri, *, tls_ca=None, tls_cert=None, tls_key=None, tls_server_name=None,
            sasl_user=None, sasl_password=None, sasl_realm=None, sasl_mechanisms=None,
            client_name=None, reconnect=False, timeout=None):
    """Connects to a ferryd and returns a Session.

    uri: ferry+unix:///path, ferry+tcp://host:port, ferry+tls://host:port,
    ferry+grpc://host:port or ferry+grpcs://host:port (also the short forms
    unix:/path, tcp:host:port, ...). TLS: tls_ca (PEM CAs to trust; default
    the system's), tls_cert and tls_key (a client certificate),
    tls_server_name (the name the server certificate must carry). SASL:
    sasl_user, sasl_password, sasl_realm, sasl_mechanisms (list). timeout:
    seconds for connecting and for each call (default: 10 s to connect,
    calls unbounded). reconnect: survive a lost connection
    (docs/libferry.md, "Reconnecting").
    """
    if not isinstance(uri, str):
        raise TypeError("uri must be a str, not %s" % type(uri).__name__)
    s = _ferry.connect(uri, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                       tls_server_name=tls_server_name, sasl_user=sasl_user,
                       sasl_password=sasl_password, sasl_realm=sasl_realm,
                       sasl_mechanisms=sasl_mechanisms, client_name=client_name,
                       reconnect=reconnect, timeout=timeout)
    _open_sessions.add(s)
    return s


__all__ = [
    "connect", "Error", "CODE_NAMES", "Session", "PoolInfo", "VolumeInfo", "VolumeEvent",
    "VolumeEventKind", "UploadReply", "DownloadReply", "TransferResult", "Progress",
    "UploadStream", "DownloadStream",
]
