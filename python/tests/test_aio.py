"""The asyncio interface: many calls at once, an async upload + download
round trip, events as an async iterator, cancellation of a task."""

import asyncio
import hashlib
import os

import pytest

import ferry
import ferry.aio
from conftest import make_sparse_file, sha256_of


def run(coro):
    return asyncio.run(coro)


def test_gather_of_many_calls(daemon):
    async def main():
        async with await ferry.aio.connect(daemon.unix_uri) as s:
            assert isinstance(s, ferry.aio.AsyncSession)
            created = await asyncio.gather(*(s.vol_create("default", "v%02d.img" % i, 4096 * (i + 1))
                                             for i in range(50)))
            assert [v.name for v in created] == ["v%02d.img" % i for i in range(50)]
            infos = await asyncio.gather(*(s.vol_info("default", "v%02d.img" % i) for i in range(50)))
            assert [v.capacity for v in infos] == [4096 * (i + 1) for i in range(50)]
            listed, pools = await asyncio.gather(s.vol_list("default"), s.pool_list())
            assert len(listed) == 50 and pools[0].name == "default"
            await s.vol_resize("default", "v00.img", 8192)
            assert (await s.vol_info("default", "v00.img")).capacity == 8192
            await asyncio.gather(*(s.vol_delete("default", "v%02d.img" % i) for i in range(50)))
            assert await s.vol_list("default") == []
            with pytest.raises(ferry.Error) as e:
                await s.vol_info("default", "v00.img")
            assert e.value.code_name == "NOT_FOUND"
    run(main())


def test_async_upload_and_download_round_trip(daemon, workdir):
    size = 32 << 20
    src = make_sparse_file(os.path.join(workdir, "src.raw"), size,
                           [(0, 1 << 20), (7 << 20, 123457), (size - 8192, 8192)])
    out = os.path.join(workdir, "out.raw")

    async def main():
        async with await ferry.aio.connect(daemon.tcp_uri) as s:
            up = await s.upload_file("default", "a.img", src, create=True)
            assert up.data_bytes + up.hole_bytes == size
            assert up.hole_bytes > size // 2
            down = await s.download_file("default", "a.img", out)
            assert down.data_bytes + down.hole_bytes == size

            # Raw async streams: bytes in, digest of the logical bytes out.
            payload = os.urandom(3 << 20)
            await s.vol_create("default", "r.img", len(payload) + 4096)
            async with s.open_upload("default", "r.img") as w:
                await w.write(payload[:1 << 20])
                await w.write(memoryview(payload)[1 << 20:])
                await w.write_hole(4096)
            h = hashlib.sha256()
            async with s.open_download("default", "r.img") as r:
                async for kind, data in r:
                    if kind == "data":
                        h.update(data)
                        data.release()
                    else:
                        h.update(bytes(data))
                reply = await r.finish()
            assert reply.data_bytes + reply.hole_bytes == len(payload) + 4096
            assert h.hexdigest() == hashlib.sha256(payload + bytes(4096)).hexdigest()
    run(main())
    assert sha256_of(out) == sha256_of(src)


def test_events_async_iterator_sees_created_and_deleted(daemon):
    async def main():
        async with await ferry.aio.connect(daemon.unix_uri) as s, \
                await ferry.aio.connect(daemon.unix_uri) as other:
            async with s.events("default") as events:
                await other.vol_create("default", "e.img", 4096)
                await other.vol_delete("default", "e.img")
                got = []
                async for e in events:
                    got.append(e)
                    if len(got) == 2:
                        break
            return got
    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert [e.kind for e in got] == [ferry.VolumeEventKind.CREATED, ferry.VolumeEventKind.DELETED]
    assert all(e.pool == "default" and e.name == "e.img" for e in got)


def test_cancelling_a_task_aborts_its_upload(daemon):
    async def main():
        async with await ferry.aio.connect(daemon.unix_uri) as s:
            await s.vol_create("default", "c.img", 1 << 40)
            w = s.open_upload("default", "c.img", no_sync=True)
            started = asyncio.Event()

            async def pump():
                block = bytes(1 << 20)
                while True:
                    await w.write(block)
                    started.set()

            task = asyncio.ensure_future(pump())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert w.finished
            # The writer lock goes once the daemon has seen the abort.
            for _ in range(200):
                try:
                    async with s.open_upload("default", "c.img") as again:
                        await again.write(b"ok")
                    break
                except ferry.Error as e:
                    if e.code_name != "FAILED_PRECONDITION":
                        raise
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("writer lock never released")
            assert (await s.vol_info("default", "c.img")).writing is False
    run(main())
