"""Every volume procedure through the blocking Session, and its errors."""

import pytest

import ferry
from conftest import Ferryd


def test_pool_list_reports_the_pool(session, daemon):
    pools = session.pool_list()
    assert [p.name for p in pools] == ["default"]
    p = pools[0]
    assert p.path == daemon.pool_dir
    assert p.read_only is False
    assert p.capacity > 0 and p.available > 0
    assert p.volumes == 0
    assert "PoolInfo(name='default'" in repr(p)


def test_create_list_info_resize_delete(session):
    created = session.vol_create("default", "a.img", 1 << 20)
    assert (created.pool, created.name, created.capacity) == ("default", "a.img", 1 << 20)
    assert created.writing is False and created.readers == 0
    assert created.modified_ns > 0
    assert created.state == "" and created.state_detail == ""
    session.vol_create("default", "b.img", 4096, preallocate=True)
    assert session.vol_info("default", "b.img").allocation >= 4096

    names = sorted(v.name for v in session.vol_list("default"))
    assert names == ["a.img", "b.img"]
    assert session.pool_list()[0].volumes == 2

    info = session.vol_info("default", "a.img")
    assert info.capacity == 1 << 20
    assert repr(info).startswith("VolumeInfo(pool='default', name='a.img', capacity=1048576")

    grown = session.vol_resize("default", "a.img", 2 << 20)
    assert grown.capacity == 2 << 20
    shrunk = session.vol_resize("default", "a.img", 1 << 19, allow_shrink=True)
    assert shrunk.capacity == 1 << 19

    session.vol_delete("default", "a.img")
    assert [v.name for v in session.vol_list("default")] == ["b.img"]


def test_missing_volume_is_not_found(session):
    with pytest.raises(ferry.Error) as e:
        session.vol_info("default", "nope.img")
    assert e.value.code == 5
    assert e.value.code_name == "NOT_FOUND"
    assert "nope.img" in e.value.message
    assert e.value.retryable is False
    assert str(e.value).startswith("NOT_FOUND: ")
    with pytest.raises(ferry.Error) as e:
        session.vol_delete("default", "nope.img")
    assert e.value.code_name == "NOT_FOUND"
    with pytest.raises(ferry.Error) as e:
        session.vol_list("nopool")
    assert e.value.code_name == "NOT_FOUND"


def test_existing_volume_is_already_exists(session):
    session.vol_create("default", "dup.img", 4096)
    with pytest.raises(ferry.Error) as e:
        session.vol_create("default", "dup.img", 4096)
    assert e.value.code == 6 and e.value.code_name == "ALREADY_EXISTS"


def test_shrinking_without_allow_shrink_is_refused(session):
    session.vol_create("default", "s.img", 8192)
    with pytest.raises(ferry.Error) as e:
        session.vol_resize("default", "s.img", 4096)
    assert e.value.code_name in ("FAILED_PRECONDITION", "INVALID_ARGUMENT")
    assert session.vol_info("default", "s.img").capacity == 8192


def test_bad_names_are_refused_by_the_daemon(session):
    with pytest.raises(ferry.Error) as e:
        session.vol_create("default", "../escape", 4096)
    assert e.value.code_name == "INVALID_ARGUMENT"


def test_bad_arguments_raise_type_and_value_errors(session):
    with pytest.raises(TypeError):
        session.vol_create("default", "x.img", "big")
    with pytest.raises(TypeError):
        session.vol_create("default", "x.img", 1.5)
    with pytest.raises(ValueError):
        session.vol_create("default", "x.img", -1)
    with pytest.raises(ValueError):
        session.vol_create("default", "", 4096)
    with pytest.raises(TypeError):
        session.vol_info("default", 7)
    with pytest.raises(TypeError):
        ferry.connect(42)
    with pytest.raises(ValueError):
        ferry.connect("ferry+unix:///x", tls_cert="/c.pem")
    with pytest.raises(ValueError):
        ferry.connect("ferry+unix:///x", timeout=-1)


def test_unreachable_daemon_is_unavailable(workdir):
    with pytest.raises(ferry.Error) as e:
        ferry.connect("ferry+unix://" + workdir + "/no.sock")
    assert e.value.code_name == "UNAVAILABLE"
    with pytest.raises(ferry.Error) as e:
        ferry.connect("nonsense://")
    assert e.value.code_name == "INVALID_ARGUMENT"


def test_tcp_uri_and_closed_session(daemon):
    s = ferry.connect(daemon.tcp_uri, client_name="pytest", timeout=5)
    assert s.pool_list()[0].name == "default"
    assert not s.closed
    s.close()
    assert s.closed
    with pytest.raises(ValueError):
        s.pool_list()
    s.close()  # again: nothing happens


def test_grpc_uri(workdir):
    # The daemon fixture does not listen for gRPC: start one that does.
    g = Ferryd(workdir, ["--listen", "grpc:127.0.0.1:0"])
    try:
        with ferry.connect(g.uri("grpc")) as s:
            s.vol_create("default", "g.img", 4096)
            assert s.vol_info("default", "g.img").capacity == 4096
    finally:
        g.stop()


def test_event_callback_sees_created_resized_deleted(session, daemon):
    import threading
    seen = []
    got = threading.Condition()

    def on_event(e):
        with got:
            seen.append(e)
            got.notify_all()

    session.subscribe(on_event, pool="default")
    with ferry.connect(daemon.unix_uri) as other:
        other.vol_create("default", "ev.img", 4096)
        other.vol_resize("default", "ev.img", 8192)
        other.vol_delete("default", "ev.img")
    with got:
        assert got.wait_for(lambda: len(seen) >= 3, timeout=10), seen
    kinds = [e.kind for e in seen[:3]]
    assert kinds == [ferry.VolumeEventKind.CREATED, ferry.VolumeEventKind.RESIZED,
                     ferry.VolumeEventKind.DELETED]
    assert all(e.pool == "default" and e.name == "ev.img" for e in seen[:3])
    assert seen[1].capacity == 8192
    assert seen[0].time_ns > 0
    assert "VolumeEvent(kind=CREATED" in repr(seen[0])
    session.unsubscribe()
