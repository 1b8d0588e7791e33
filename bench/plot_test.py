#!/usr/bin/python3
"""Tests of `bench/run --plot DIR --from-json FILE` (run by ctest, label bench).

    bench/plot_test.py [--build DIR]

The chart tests draw from bench/testdata/plot-fixture.jsonl, a small result
file covering several row groups, and check that every expected chart is a
PNG of sane dimensions. With --build DIR, one more test runs a real
measurement of nbd.delay64.qd64 (--quick, one run per side) and checks that
its record carries every run's value and ferryd's thread count; it is
skipped when that row reports itself unavailable (no libnbd or nbdkit).
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.realpath(__file__))
RUN = os.path.join(HERE, "run")
FIXTURE = os.path.join(HERE, "testdata", "plot-fixture.jsonl")
BUILD = None

# The charts the fixture's rows must give, one per group and the three
# cross-group ones.
EXPECTED = [
    "group-rpc.png", "group-stream.png", "group-tls-sasl.png", "group-grpc.native.png",
    "group-grpc.tunnel.png", "group-vol.png", "group-nbd.png", "group-copy.png", "group-py.png",
    "throughput-per-transport.png", "latency-under-load.png", "nbd-delay64-queue-depth.png",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk; raises AssertionError if the
    file does not start like a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    assert head[:8] == PNG_SIGNATURE, "%s: no PNG signature" % path
    length, kind = struct.unpack(">I4s", head[8:16])
    assert kind == b"IHDR" and length == 13, "%s: first chunk is %r, not IHDR" % (path, kind)
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def png_ends(path):
    with open(path, "rb") as f:
        f.seek(-12, os.SEEK_END)
        return f.read(12)[4:8] == b"IEND"


def run(*args):
    return subprocess.run([RUN] + list(args), capture_output=True, text=True, timeout=300)


class PlotFromJson(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="ferry-plot-test.")
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_fixture_draws_every_expected_chart_as_a_sane_png(self):
        out = os.path.join(self.dir, "charts")
        r = run("--plot", out, "--from-json", FIXTURE)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(sorted(os.listdir(out)), sorted(EXPECTED))
        for name in EXPECTED:
            path = os.path.join(out, name)
            width, height = png_size(path)
            self.assertTrue(600 <= width <= 2000, "%s: width %d" % (name, width))
            self.assertTrue(200 <= height <= 2000, "%s: height %d" % (name, height))
            size = os.path.getsize(path)
            self.assertTrue(10_000 <= size <= 250_000, "%s: %d bytes" % (name, size))
            self.assertTrue(png_ends(path), "%s: no IEND chunk at the end" % name)
            self.assertIn("chart: " + path, r.stderr)

    def test_a_new_prefix_makes_a_new_group_chart(self):
        rows = [{"name": "zq.new.row", "value": 3.0, "unit": "s", "baseline": "x", "baseline_value": 2.0,
                 "ratio": 1.5, "higher_is_better": False, "runs": 1}]
        path = self.write("new.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        out = os.path.join(self.dir, "charts")
        r = run("--plot", out, "--from-json", path)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(os.listdir(out), ["group-zq.png"])
        png_size(os.path.join(out, "group-zq.png"))

    def test_patterns_select_rows_of_the_file(self):
        out = os.path.join(self.dir, "charts")
        r = run("--plot", out, "--from-json", FIXTURE, "nbd.delay64.")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(sorted(os.listdir(out)), ["group-nbd.png", "nbd-delay64-queue-depth.png"])

    def test_a_file_that_is_not_json_lines_is_a_clear_error(self):
        path = self.write("bad.jsonl", '{"name": "rpc.echo.seq", "unit": "calls/s", "value": 1}\n{not json\n')
        out = os.path.join(self.dir, "charts")
        r = run("--plot", out, "--from-json", path)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("%s line 2: not valid JSON" % path, r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        self.assertFalse(os.path.exists(out) and os.listdir(out), "charts drawn from a bad file")

    def test_a_record_without_a_unit_is_a_clear_error(self):
        path = self.write("nounit.jsonl", '{"name": "rpc.echo.seq", "value": 1}\n')
        r = run("--plot", os.path.join(self.dir, "charts"), "--from-json", path)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("line 1: field 'unit' missing", r.stderr)
        self.assertNotIn("Traceback", r.stderr)

    def test_an_empty_or_missing_file_is_a_clear_error(self):
        empty = self.write("empty.jsonl", "\n")
        r = run("--plot", os.path.join(self.dir, "charts"), "--from-json", empty)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("no rows", r.stderr)
        r = run("--plot", os.path.join(self.dir, "charts"), "--from-json", os.path.join(self.dir, "absent"))
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("No such file", r.stderr)
        self.assertNotIn("Traceback", r.stderr)

    def test_from_json_without_plot_is_a_usage_error(self):
        r = run("--from-json", FIXTURE)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--from-json needs --plot", r.stderr)


class RecordFields(unittest.TestCase):
    def test_delay_row_record_carries_runs_and_ferryd_threads(self):
        if not BUILD:
            self.skipTest("needs --build DIR")
        build = BUILD
        with tempfile.TemporaryDirectory(prefix="ferry-plot-test.") as tmp:
            out = os.path.join(tmp, "out.jsonl")
            r = run("--build", build, "--quick", "--runs", "1", "--json", out, "nbd.delay64.qd64")
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(out) as f:
                records = [json.loads(line) for line in f if line.strip()]
        self.assertEqual(len(records), 1)
        rec = records[0]
        self.assertNotIn("error", rec)
        if rec["value"] is None:  # an unavailable side is no error
            self.skipTest("nbd.delay64.qd64 unavailable here: " + r.stderr.strip().splitlines()[-1])
        self.assertEqual(len(rec["values"]), 1)
        self.assertEqual(rec["values"][0], rec["value"])
        self.assertIn("note", rec)
        # ferryd's own threads: at least its main thread, and its peak no
        # lower than where it started.
        self.assertGreaterEqual(rec["threads_before"], 1)
        self.assertGreaterEqual(rec["threads"], rec["threads_before"])
        if "baseline_values" in rec and rec["baseline_values"]:
            self.assertEqual(len(rec["baseline_values"]), 1)
            self.assertGreaterEqual(rec["baseline_threads"], 1)


if __name__ == "__main__":
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        print("plot_test: matplotlib not installed (python3-matplotlib); skipped", file=sys.stderr)
        sys.exit(77)
    if len(sys.argv) > 2 and sys.argv[1] == "--build":
        BUILD = sys.argv[2]
        del sys.argv[1:3]
    unittest.main(verbosity=2)
