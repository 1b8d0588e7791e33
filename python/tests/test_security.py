"""TLS with certificates made by the openssl CLI, and SASL with users in a
sasldb made by saslpasswd2, through ferry.connect's keyword arguments."""

import os

import pytest

import ferry
from conftest import Ferryd, add_sasl_user, make_tls_material


@pytest.fixture
def tls(workdir):
    d = os.path.join(workdir, "tls")
    os.makedirs(d)
    return make_tls_material(d)


@pytest.fixture
def tls_daemon(workdir, tls):
    f = Ferryd(os.path.join(workdir, "d"),
               ["--listen", "tls:127.0.0.1:0", "--listen", "grpcs:127.0.0.1:0", "--tls-ca", tls["ca"],
                "--tls-cert", tls["server_cert"], "--tls-key", tls["server_key"]])
    yield f
    f.stop()


def test_tls_with_client_certificate(tls_daemon, tls):
    with ferry.connect(tls_daemon.uri("tls"), tls_ca=tls["ca"], tls_cert=tls["client_cert"],
                       tls_key=tls["client_key"], tls_server_name="localhost") as s:
        s.vol_create("default", "tls.img", 4096)
        assert s.vol_info("default", "tls.img").capacity == 4096
        with s.open_upload("default", "tls.img") as up:
            up.write(b"secret" * 100)
        assert s.vol_info("default", "tls.img").capacity == 4096


def test_grpcs_with_client_certificate(tls_daemon, tls):
    with ferry.connect(tls_daemon.uri("grpcs"), tls_ca=tls["ca"], tls_cert=tls["client_cert"],
                       tls_key=tls["client_key"]) as s:
        assert s.pool_list()[0].name == "default"


def test_tls_without_the_ca_is_refused(tls_daemon, tls):
    with pytest.raises(ferry.Error) as e:
        ferry.connect(tls_daemon.uri("tls"), tls_cert=tls["client_cert"], tls_key=tls["client_key"],
                      timeout=5)
    assert e.value.code_name in ("UNAVAILABLE", "UNAUTHENTICATED")


def test_tls_missing_certificate_file_is_invalid_argument(tls_daemon, tls, workdir):
    with pytest.raises(ferry.Error) as e:
        ferry.connect(tls_daemon.uri("tls"), tls_ca=os.path.join(workdir, "absent.pem"), timeout=5)
    assert e.value.code_name == "INVALID_ARGUMENT"


@pytest.fixture
def sasl_daemon(workdir):
    db = os.path.join(workdir, "sasldb")
    add_sasl_user(db, "alice", "alice-secret")
    f = Ferryd(os.path.join(workdir, "d"), ["--sasl-db", db, "--sasl-realm", "ferry"], tcp_auth="sasl")
    yield f
    f.stop()


def test_sasl_user_and_password(sasl_daemon):
    with ferry.connect(sasl_daemon.tcp_uri, sasl_user="alice", sasl_password="alice-secret",
                       sasl_realm="ferry", sasl_mechanisms=["SCRAM-SHA-256"], timeout=5) as s:
        s.vol_create("default", "sasl.img", 4096)
        assert [v.name for v in s.vol_list("default")] == ["sasl.img"]


def test_sasl_wrong_password_is_unauthenticated(sasl_daemon):
    with pytest.raises(ferry.Error) as e:
        ferry.connect(sasl_daemon.tcp_uri, sasl_user="alice", sasl_password="guess", sasl_realm="ferry",
                      timeout=5)
    assert e.value.code == 16 and e.value.code_name == "UNAUTHENTICATED"


def test_sasl_required_without_credentials_fails(sasl_daemon):
    with pytest.raises(ferry.Error) as e:
        ferry.connect(sasl_daemon.tcp_uri, timeout=5)
    assert e.value.code_name in ("UNAUTHENTICATED", "PERMISSION_DENIED", "UNAVAILABLE")
