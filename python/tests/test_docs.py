"""The examples of docs/python.md run as written against a real ferryd
(their URI replaced by the test daemon's)."""

import os
import re
import subprocess
import sys

import pytest

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "python.md")
DOC_URI = "ferry+unix:///run/ferry/ferryd.sock"


def examples():
    with open(DOC) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_page_has_examples():
    assert len(examples()) >= 5


@pytest.mark.parametrize("index", range(len(examples())))
def test_example_runs(daemon, index):
    code = examples()[index]
    assert DOC_URI in code
    code = code.replace(DOC_URI, daemon.unix_uri)
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
