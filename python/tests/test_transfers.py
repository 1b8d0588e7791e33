"""Uploads and downloads: upload_file/download_file and raw streams, on a
sparse file with holes, compared by sha256; abort() of raw streams."""

import mmap
import os

import pytest

import ferry
from conftest import allocated_bytes, make_sparse_file, sha256_of, upload_with_retry

SIZE = 64 << 20
EXTENTS = [(0, 1 << 20), (5 << 20, 300000), (20 << 20, 3 << 20), (SIZE - 4096, 4096)]


@pytest.fixture
def sparse(workdir):
    return make_sparse_file(os.path.join(workdir, "sparse.raw"), SIZE, EXTENTS)


def test_upload_file_and_download_file_keep_the_bytes_and_the_holes(session, daemon, sparse, workdir):
    session.vol_create("default", "disk.img", SIZE)
    progress = []
    result = session.upload_file("default", "disk.img", sparse, progress=progress.append)
    data = sum(n for _, n in EXTENTS)
    assert result.data_bytes + result.hole_bytes == SIZE
    assert result.data_bytes >= data and result.data_bytes < SIZE // 2  # holes went as holes
    assert result.volume.capacity == SIZE
    assert result.elapsed > 0
    assert progress and progress[-1].finished and progress[-1].done == SIZE
    assert "TransferResult(data_bytes=" in repr(result)
    volume_path = os.path.join(daemon.pool_dir, "disk.img")
    assert sha256_of(volume_path) == sha256_of(sparse)
    assert allocated_bytes(volume_path) < SIZE // 2

    out = os.path.join(workdir, "back.raw")
    got = session.download_file("default", "disk.img", out)
    assert got.data_bytes + got.hole_bytes == SIZE
    assert sha256_of(out) == sha256_of(sparse)
    assert allocated_bytes(out) < SIZE // 2


def test_upload_file_create_and_pathlike(session, sparse):
    import pathlib
    r = session.upload_file("default", "new.img", pathlib.Path(sparse), create=True, no_sync=True)
    assert r.volume.capacity == SIZE
    assert session.vol_info("default", "new.img").capacity == SIZE


def test_upload_file_of_a_missing_file_is_an_os_error(session, workdir):
    session.vol_create("default", "m.img", 4096)
    with pytest.raises(ferry.Error) as e:
        session.upload_file("default", "m.img", os.path.join(workdir, "absent"))
    assert e.value.code_name == "NOT_FOUND"
    assert "absent" in e.value.message


def test_download_of_a_missing_volume_is_not_found(session, workdir):
    with pytest.raises(ferry.Error) as e:
        session.download_file("default", "none.img", os.path.join(workdir, "o"))
    assert e.value.code_name == "NOT_FOUND"


def test_progress_callback_exception_stops_the_upload(session, sparse):
    session.vol_create("default", "p.img", SIZE)

    class Stop(Exception):
        pass

    def progress(p):
        raise Stop()

    with pytest.raises(Stop):
        session.upload_file("default", "p.img", sparse, progress=progress)
    assert session.vol_info("default", "p.img").writing is False


def test_raw_streams_round_trip_with_holes(session, daemon, sparse, workdir):
    session.vol_create("default", "raw.img", SIZE)
    with open(sparse, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        with session.open_upload("default", "raw.img") as up:
            pos = 0
            for off, n in EXTENTS:
                if off > pos:
                    up.write_hole(off - pos)
                # different buffer kinds: mmap slices via memoryview, bytes, bytearray
                view = memoryview(m)[off:off + n]
                up.write(view if off % 2 == 0 else bytearray(view))
                view.release()
                pos = off + n
            if pos < SIZE:
                up.write_hole(SIZE - pos)
            reply = up.finish()
    assert isinstance(reply, ferry.UploadReply)
    assert reply.data_bytes == sum(n for _, n in EXTENTS)
    assert reply.hole_bytes == SIZE - reply.data_bytes
    assert reply.volume.name == "raw.img"
    assert sha256_of(os.path.join(daemon.pool_dir, "raw.img")) == sha256_of(sparse)

    # read(): pieces as (kind, payload), payload a memoryview over the chunk
    out = os.path.join(workdir, "raw-back.raw")
    with open(out, "wb") as f, session.open_download("default", "raw.img", digest=True) as down:
        kinds = set()
        for kind, payload in down:
            kinds.add(kind)
            if kind == "data":
                assert isinstance(payload, memoryview) and payload.readonly
                f.write(payload)
                payload.release()
            else:
                f.seek(payload, os.SEEK_CUR)
        f.truncate()
        reply = down.finish()
    assert kinds == {"data", "hole"}
    assert reply.capacity == SIZE and len(reply.digest) == 16
    assert sha256_of(out) == sha256_of(sparse)


def test_readinto_gives_the_logical_bytes(session, sparse, workdir):
    session.upload_file("default", "ri.img", sparse, create=True)
    import hashlib
    h = hashlib.sha256()
    buf = bytearray(100000)  # not a multiple of the chunk size
    total = 0
    with session.open_download("default", "ri.img") as down:
        while True:
            n = down.readinto(buf)
            if n == 0:
                break
            h.update(memoryview(buf)[:n])
            total += n
        down.finish()
    assert total == SIZE
    assert h.hexdigest() == sha256_of(sparse)


def test_numpy_buffer_uploads_without_conversion(session, daemon):
    np = pytest.importorskip("numpy")
    a = np.arange(1 << 18, dtype=np.uint32)
    session.vol_create("default", "np.img", a.nbytes)
    with session.open_upload("default", "np.img") as up:
        up.write(a)
    with open(os.path.join(daemon.pool_dir, "np.img"), "rb") as f:
        assert f.read() == a.tobytes()


def test_write_rejects_non_buffers(session):
    session.vol_create("default", "nb.img", 4096)
    with session.open_upload("default", "nb.img") as up:
        with pytest.raises(TypeError):
            up.write("text is not bytes")
        with pytest.raises(ValueError):
            up.write_hole(-1)
        up.abort()


def test_abort_of_an_upload_reaches_the_daemon_and_the_volume_is_free(session):
    session.vol_create("default", "ab.img", 8 << 20)
    up = session.open_upload("default", "ab.img")
    up.write(b"x" * (1 << 20))
    up.abort("changed my mind")
    assert up.finished
    with pytest.raises(ValueError):
        up.write(b"more")
    # The writer lock goes once the daemon has seen the abort.
    r = upload_with_retry(session, "ab.img", b"y" * 4096)
    assert r.data_bytes == 4096
    assert session.vol_info("default", "ab.img").writing is False


def test_upload_context_manager_aborts_on_exception(session):
    session.vol_create("default", "cm.img", 1 << 20)
    with pytest.raises(RuntimeError):
        with session.open_upload("default", "cm.img") as up:
            up.write(b"z" * 65536)
            raise RuntimeError("boom")
    r = upload_with_retry(session, "cm.img", b"w" * 10)
    assert r.data_bytes == 10


def test_abort_of_a_download_leaves_the_session_usable(session, sparse):
    session.upload_file("default", "d.img", sparse, create=True)
    down = session.open_download("default", "d.img")
    kind, _ = down.read()
    assert kind in ("data", "hole")
    down.abort("enough")
    assert down.finished
    assert down.read() == ("end", None)
    assert session.vol_info("default", "d.img").capacity == SIZE
    with session.open_download("default", "d.img", offset=0, length=4096) as again:
        assert sum(len(p) if k == "data" else p for k, p in again) == 4096


def test_finish_before_the_end_of_a_download_is_refused(session):
    session.vol_create("default", "f.img", 1 << 20)
    with session.open_download("default", "f.img") as down:
        with pytest.raises(ValueError):
            down.finish()


