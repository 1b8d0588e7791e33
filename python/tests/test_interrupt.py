"""KeyboardInterrupt (a real SIGINT) during a blocking transfer: it is
raised in the main thread, the transfer is aborted, and the daemon and the
session stay usable."""

import os
import signal
import threading
import time

import pytest

import ferry
from conftest import upload_with_retry


def _sigint_when(event):
    """A thread that sends this process SIGINT once `event` is set."""
    def run():
        event.wait(30)
        os.kill(os.getpid(), signal.SIGINT)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _endless_pipe(path, stop):
    """Feeds the FIFO at `path` with bytes until `stop` is set or the reader
    goes away."""
    def run():
        block = b"\xab" * (1 << 20)
        try:
            with open(path, "wb") as f:
                while not stop.is_set():
                    f.write(block)
        except (BrokenPipeError, OSError):
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t




def _daemon_is_healthy(session, daemon, name):
    reply = upload_with_retry(session, name, b"after" * 1000)
    assert reply.data_bytes == 5000
    assert session.vol_info("default", name).writing is False
    with ferry.connect(daemon.unix_uri) as fresh:
        assert fresh.vol_info("default", name).name == name
        assert [p.name for p in fresh.pool_list()] == ["default"]
    assert daemon.alive()


def test_keyboard_interrupt_aborts_upload_file(session, daemon, workdir):
    session.vol_create("default", "big.img", 1 << 40)
    fifo = os.path.join(workdir, "fifo")
    os.mkfifo(fifo)
    stop = threading.Event()
    feeder = _endless_pipe(fifo, stop)
    moving = threading.Event()

    def progress(p):
        if p.done >= 8 << 20:
            moving.set()

    _sigint_when(moving)
    try:
        with pytest.raises(KeyboardInterrupt):
            session.upload_file("default", "big.img", fifo, progress=progress, no_sync=True)
    finally:
        stop.set()
        # Unblock a feeder stuck on a full pipe nobody reads any more.
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            while os.read(fd, 1 << 20):
                pass
            os.close(fd)
        except (BlockingIOError, OSError):
            pass
        feeder.join(10)
    assert moving.is_set()
    _daemon_is_healthy(session, daemon, "big.img")


def test_keyboard_interrupt_aborts_a_raw_stream_write_loop(session, daemon):
    session.vol_create("default", "loop.img", 1 << 40)
    moving = threading.Event()
    _sigint_when(moving)
    block = bytearray(b"\x5a" * (1 << 20))
    written = 0
    # The interrupt lands either inside write() (which aborts the stream) or
    # between two writes in Python code; the with block aborts it then.
    with pytest.raises(KeyboardInterrupt):
        with session.open_upload("default", "loop.img", no_sync=True) as up:
            while True:
                up.write(block)
                written += len(block)
                if written >= 8 << 20:
                    moving.set()
    assert up.finished
    with pytest.raises(ValueError):
        up.write(block)
    _daemon_is_healthy(session, daemon, "loop.img")


def test_keyboard_interrupt_aborts_download_file(session, daemon, workdir):
    session.vol_create("default", "dl.img", 64 << 20)
    with session.open_upload("default", "dl.img", no_sync=True) as up:
        block = b"\x11" * (4 << 20)
        for _ in range(16):
            up.write(block)
    moving = threading.Event()

    def progress(p):
        if not moving.is_set() and not p.finished:
            moving.set()
            # Hold the transfer until the interrupt has surely been seen
            # (the waiting thread looks for signals every 100 ms).
            time.sleep(2)

    _sigint_when(moving)
    with pytest.raises(KeyboardInterrupt):
        session.download_file("default", "dl.img", os.path.join(workdir, "out"), progress=progress)
    assert moving.is_set()
    _daemon_is_healthy(session, daemon, "dl.img")
