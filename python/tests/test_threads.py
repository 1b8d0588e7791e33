"""One session shared by 100 Python threads, each making calls at once."""

import threading

import ferry


def test_hundred_threads_on_one_session(session):
    for i in range(100):
        session.vol_create("default", "t%03d.img" % i, 4096 * (i + 1))
    results = [None] * 100
    errors = []
    start = threading.Barrier(100)

    def worker(i):
        try:
            start.wait()
            info = session.vol_info("default", "t%03d.img" % i)
            listed = session.vol_list("default")
            results[i] = (info.name, info.capacity, len(listed))
        except Exception as e:  # reported below
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, r in enumerate(results):
        assert r == ("t%03d.img" % i, 4096 * (i + 1), 100)


def test_close_from_another_thread_ends_waiting_calls(daemon):
    s = ferry.connect(daemon.unix_uri)
    s.vol_create("default", "c.img", 1 << 30)
    up = s.open_upload("default", "c.img", no_sync=True)
    failure = []

    def writer():
        try:
            while True:
                up.write(b"\0" * (1 << 20))
        except (ferry.Error, ValueError) as e:
            failure.append(e)

    t = threading.Thread(target=writer)
    t.start()
    import time
    time.sleep(0.2)
    s.close()
    t.join(30)
    assert not t.is_alive()
    assert failure
