"""Fixtures: a real ferryd per test (unix socket + TCP on 127.0.0.1, a
temporary pool), TLS certificates made with the openssl CLI, a sasldb made
with saslpasswd2. ctest passes FERRYD (the built daemon) and PYTHONPATH
(build/python)."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import ferry


def ferryd_path():
    path = os.environ.get("FERRYD")
    if not path or not os.path.exists(path):
        pytest.fail("set FERRYD to the built ferryd (ctest does)")
    return path


class Ferryd:
    """A ferryd process serving pool "default" from a temporary directory."""

    def __init__(self, workdir, extra_args=(), tcp_auth="none"):
        self.dir = workdir
        self.pool_dir = os.path.join(workdir, "pool")
        os.makedirs(self.pool_dir, exist_ok=True)
        self.socket = os.path.join(workdir, "ferryd.sock")
        ready = os.path.join(workdir, "ready")
        self.log_path = os.path.join(workdir, "ferryd.log")
        argv = [ferryd_path(), "--test-service", "--auth-tcp", tcp_auth,
                "--listen", "unix:" + self.socket, "--listen", "tcp:127.0.0.1:0",
                "--ready-file", ready, "--pool", "default=" + self.pool_dir] + list(extra_args)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise RuntimeError("ferryd exited during start-up:\n" + self.read_log())
            if time.monotonic() > deadline:
                raise RuntimeError("ferryd not ready in 10 s:\n" + self.read_log())
            time.sleep(0.005)
        self.ports = {}
        with open(ready) as f:
            for line in f:
                line = line.strip()
                kind, _, rest = line.partition(":")
                port = rest.rsplit(":", 1)[-1]
                if kind != "unix" and port.isdigit():
                    self.ports[kind] = int(port)

    @property
    def unix_uri(self):
        return "ferry+unix://" + self.socket

    @property
    def tcp_uri(self):
        return "ferry+tcp://127.0.0.1:%d" % self.ports["tcp"]

    def uri(self, kind):
        return "ferry+%s://127.0.0.1:%d" % (kind, self.ports[kind])

    def read_log(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="ferry-py-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(workdir):
    d = Ferryd(workdir)
    yield d
    assert d.alive(), "ferryd died during the test:\n" + d.read_log()
    d.stop()


@pytest.fixture
def session(daemon):
    with ferry.connect(daemon.unix_uri) as s:
        yield s


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def make_sparse_file(path, size, extents):
    """A file of `size` bytes, holes except for the (offset, length) extents,
    filled with a pattern that differs per extent."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, (off, n) in enumerate(extents):
            f.seek(off)
            pattern = hashlib.sha256(b"extent %d" % i).digest()
            f.write((pattern * (n // len(pattern) + 1))[:n])
    return path


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def make_tls_material(d):
    """CA, server certificate (127.0.0.1, localhost) and client certificate,
    made with the openssl CLI."""
    def run(*args):
        subprocess.run(["openssl"] + list(args), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    ca_key, ca = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/O=ferry tests/CN=ferry test CA")
    out = {"ca": ca}
    for who, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", None)):
        key, csr, cert = (os.path.join(d, who + ext) for ext in (".key", ".csr", ".pem"))
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", "/O=ferry tests/CN=" + who)
        ext = os.path.join(d, who + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\n")
            f.write("extendedKeyUsage=%s\n" % ("serverAuth" if who == "server" else "clientAuth"))
            if san:
                f.write(san + "\n")
        run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext)
        out[who + "_cert"], out[who + "_key"] = cert, key
    return out


def saslpasswd2():
    for p in ("/usr/sbin/saslpasswd2", "/usr/bin/saslpasswd2", shutil.which("saslpasswd2") or ""):
        if p and os.path.exists(p):
            return p
    pytest.fail("saslpasswd2 not found: install sasl2-bin")


def add_sasl_user(db, user, password, realm="ferry", app="ferry"):
    subprocess.run([saslpasswd2(), "-p", "-c", "-f", db, "-a", app, "-u", realm, user],
                   input=password.encode(), check=True)


def upload_with_retry(session, name, data, attempts=200):
    """Uploads `data` into default/`name`, retrying while the daemon still
    holds the writer lock of an aborted upload (FAILED_PRECONDITION)."""
    for _ in range(attempts):
        try:
            with session.open_upload("default", name) as up:
                up.write(data)
                return up.finish()
        except ferry.Error as e:
            if e.code_name != "FAILED_PRECONDITION":
                raise
            time.sleep(0.05)
    raise AssertionError("the writer lock was never released")
