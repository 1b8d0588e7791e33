"""asyncio interface of ferry (docs/python.md, "asyncio").

    import asyncio, ferry.aio

    async def main():
        async with await ferry.aio.connect("ferry+unix:///run/ferry/ferryd.sock") as s:
            print(await s.vol_info("default", "disk.img"))

    asyncio.run(main())

Every call is started on libferry's io thread (rpc::Client::async_call, the
stream coroutines) and its result handed to the event loop with
loop.call_soon_threadsafe: no polling and no thread per call. Cancelling the
awaiting task cancels the call (the daemon sees a CANCEL) or aborts the
stream.
"""

import asyncio
import os
import time

import ferry
from ferry import _ferry

_CHUNK = 1 << 20


def _resolve(future, value, exc):
    """Runs on the loop: completes `future` unless it was cancelled meanwhile."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


async def _await_op(start, *args):
    """Starts one operation with a new future and waits for it; cancelling
    the awaiting task cancels the operation (`start` may return a handle
    with cancel())."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    handle = start(future, *args)
    try:
        return await future
    except asyncio.CancelledError:
        if handle is not None:
            handle.cancel()
        raise


async def _stream_op(raw, reason, start, *args):
    """_await_op on a stream: cancelling the awaiting task also aborts the
    stream, telling the daemon `reason`."""
    try:
        return await _await_op(start, *args)
    except asyncio.CancelledError:
        raw.abort(reason)
        raise


async def connect(uri, **kwargs):
    """Connects (same arguments as ferry.connect) and returns an AsyncSession.

    The connection handshake runs once in the loop's default executor; every
    call after that completes from libferry's io thread."""
    loop = asyncio.get_running_loop()
    session = await loop.run_in_executor(None, lambda: ferry.connect(uri, **kwargs))
    return AsyncSession(session)


class AsyncUploadStream:
    """A raw upload for asyncio (AsyncSession.open_upload)."""

    def __init__(self, raw):
        self._raw = raw

    async def write(self, data):
        """Sends the bytes of any buffer; returns once they are queued
        (within the stream's credit window)."""
        await _stream_op(self._raw, "upload cancelled", self._raw.write, data)

    async def write_hole(self, length):
        await _stream_op(self._raw, "upload cancelled", self._raw.write_hole, length)

    async def finish(self):
        """Ends the upload; returns the daemon's UploadReply."""
        return await _stream_op(self._raw, "upload cancelled", self._raw.finish)

    def abort(self, reason="aborted by the client"):
        self._raw.abort(reason)

    @property
    def bytes_sent(self):
        return self._raw.bytes_sent

    @property
    def finished(self):
        return self._raw.finished

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort("upload stopped by %s" % exc_type.__name__)
        elif not self.finished:
            await self.finish()
        return False


class AsyncDownloadStream:
    """A raw download for asyncio (AsyncSession.open_download). Iterate with
    `async for kind, payload in stream`."""

    def __init__(self, raw):
        self._raw = raw

    async def read(self):
        """Next piece: ("data", memoryview), ("hole", length) or ("end", None)."""
        return await _stream_op(self._raw, "download cancelled", self._raw.read)

    async def finish(self):
        return await _await_op(self._raw.finish)

    def abort(self, reason="aborted by the client"):
        self._raw.abort(reason)

    @property
    def ended(self):
        return self._raw.ended

    @property
    def finished(self):
        return self._raw.finished

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, payload = await self.read()
        if kind == "end":
            raise StopAsyncIteration
        return kind, payload

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        if not self.finished:
            if exc_type is None and self.ended:
                await self.finish()
            else:
                self.abort("download stopped by %s" % (exc_type.__name__ if exc_type else "the client"))
        return False


class AsyncSession:
    """The procedures of ferry.Session as coroutines."""

    def __init__(self, session):
        self._s = session
        self._events = None

    @property
    def session(self):
        """The underlying blocking ferry.Session (same connection)."""
        return self._s

    @property
    def closed(self):
        return self._s.closed

    async def close(self):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._s.close)

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        await self.close()
        return False

    def __repr__(self):
        return "<ferry.aio.AsyncSession %s>" % ("closed" if self.closed else "open")

    async def pool_list(self):
        return await _await_op(self._s._pool_list_async)

    async def vol_list(self, pool):
        return await _await_op(self._s._vol_list_async, pool)

    async def vol_info(self, pool, name):
        return await _await_op(self._s._vol_info_async, pool, name)

    async def vol_create(self, pool, name, capacity, preallocate=False):
        return await _await_op(self._s._vol_create_async, pool, name, capacity, preallocate)

    async def vol_delete(self, pool, name):
        return await _await_op(self._s._vol_delete_async, pool, name)

    async def vol_resize(self, pool, name, capacity, allow_shrink=False):
        return await _await_op(self._s._vol_resize_async, pool, name, capacity, allow_shrink)

    def open_upload(self, pool, name, *, offset=0, length=None, atomic=False,
                    keep_capacity=False, no_sync=False):
        return AsyncUploadStream(self._s._open_upload_async(
            pool, name, offset, length, atomic, keep_capacity, no_sync))

    def open_download(self, pool, name, *, offset=0, length=None, dense=False,
                      detect_zeros=False, digest=False):
        return AsyncDownloadStream(self._s._open_download_async(
            pool, name, offset, length, dense, detect_zeros, digest))

    async def upload_file(self, pool, name, path, *, offset=0, length=None, atomic=False,
                          keep_capacity=False, no_sync=False, create=False, progress=None):
        """Sends a local file into a volume, its holes as holes (found with
        SEEK_DATA/SEEK_HOLE). Returns a TransferResult-like
        (data_bytes, hole_bytes, elapsed, volume) object."""
        start = time.monotonic()
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if length is None:
                length = size
            elif length > size:
                raise ferry.Error(11, "%s has %d bytes, fewer than the %d asked for" % (path, size, length),
                                  "client")
            if create:
                try:
                    await self.vol_info(pool, name)
                except ferry.Error as e:
                    if e.code_name != "NOT_FOUND":
                        raise
                    await self.vol_create(pool, name, max(1, offset + length))
            done = 0
            async with self.open_upload(pool, name, offset=offset, length=length, atomic=atomic,
                                        keep_capacity=keep_capacity, no_sync=no_sync) as up:
                for pos, n, is_hole in _extents(fd, length):
                    if is_hole:
                        await up.write_hole(n)
                    else:
                        end = pos + n
                        while pos < end:
                            data = os.pread(fd, min(_CHUNK, end - pos), pos)
                            if not data:
                                raise ferry.Error(10, "%s shrank while it was being sent" % path, "client")
                            await up.write(data)
                            pos += len(data)
                    done += n
                    if progress is not None:
                        progress(done, length)
                reply = await up.finish()
        finally:
            os.close(fd)
        return AsyncTransferResult(reply.data_bytes, reply.hole_bytes, time.monotonic() - start, reply.volume)

    async def download_file(self, pool, name, path, *, offset=0, length=None, detect_zeros=False,
                            progress=None):
        """Writes a volume into a local file (created or truncated), holes
        left unallocated."""
        start = time.monotonic()
        info = await self.vol_info(pool, name)
        total = info.capacity - offset if length is None else length
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            pos = 0
            async with self.open_download(pool, name, offset=offset, length=length,
                                          detect_zeros=detect_zeros) as down:
                async for kind, payload in down:
                    if kind == "data":
                        view = payload
                        written = 0
                        while written < len(view):
                            written += os.pwrite(fd, view[written:], pos + written)
                        pos += len(view)
                        view.release()
                    else:
                        pos += payload
                    if progress is not None:
                        progress(pos, total)
                reply = await down.finish()
            os.ftruncate(fd, pos)
        finally:
            os.close(fd)
        return AsyncTransferResult(reply.data_bytes, reply.hole_bytes, time.monotonic() - start, info)

    async def subscribe(self, callback, pool=""):
        """Calls callback(event) on the event loop for each volume event."""
        loop = asyncio.get_running_loop()

        def on_event(event):  # io thread, with the GIL
            loop.call_soon_threadsafe(callback, event)

        await _await_op(self._s._event_subscribe_async, on_event, pool)

    async def unsubscribe(self):
        await _await_op(self._s._event_unsubscribe_async)

    def events(self, pool=""):
        """Volume events as an async iterator (all pools, or one):

            async with session.events("default") as events:   # subscribed here
                async for event in events: ...

        `async for event in session.events()` alone subscribes at the first
        iteration. Leaving the `async with` (or aclose()) unsubscribes."""
        return EventStream(self, pool)


class EventStream:
    """AsyncSession.events(): an async iterator of VolumeEvent."""

    def __init__(self, session, pool):
        self._session = session
        self._pool = pool
        self._queue = None

    async def subscribe(self):
        if self._queue is None:
            self._queue = asyncio.Queue()
            await self._session.subscribe(self._queue.put_nowait, self._pool)

    async def aclose(self):
        if self._queue is not None and not self._session.closed:
            self._queue = None
            try:
                await self._session.unsubscribe()
            except ferry.Error:
                pass

    def __aiter__(self):
        return self

    async def __anext__(self):
        await self.subscribe()
        return await self._queue.get()

    async def __aenter__(self):
        await self.subscribe()
        return self

    async def __aexit__(self, exc_type, exc, tb):
        await self.aclose()
        return False


class AsyncTransferResult:
    """What AsyncSession.upload_file/download_file moved."""

    __slots__ = ("data_bytes", "hole_bytes", "elapsed", "volume")

    def __init__(self, data_bytes, hole_bytes, elapsed, volume):
        self.data_bytes = data_bytes
        self.hole_bytes = hole_bytes
        self.elapsed = elapsed
        self.volume = volume

    def __repr__(self):
        return "TransferResult(data_bytes=%d, hole_bytes=%d, elapsed=%.3f, volume=%r)" % (
            self.data_bytes, self.hole_bytes, self.elapsed, self.volume)


def _extents(fd, length):
    """(position, length, is_hole) runs of the file's first `length` bytes."""
    pos = 0
    while pos < length:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            data = length  # no data after pos
        data = min(data, length)
        if data > pos:
            yield pos, data - pos, True
            pos = data
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = length
        hole = min(hole, length)
        yield pos, hole - pos, False
        pos = hole
