#!/usr/bin/python3
"""The ferry side of the py.stream.upload row: one upload through the Python
binding, like `ferry vol-upload --no-sync NAME FILE` (the row's baseline).

    py_upload.py URI POOL NAME FILE

Run with PYTHONPATH=BUILD/python (bench/volume_cases.cc does)."""

import sys

import ferry


def main():
    if len(sys.argv) != 5:
        sys.stderr.write("usage: py_upload.py URI POOL NAME FILE\n")
        return 2
    uri, pool, name, path = sys.argv[1:]
    with ferry.connect(uri) as session:
        session.upload_file(pool, name, path, no_sync=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
