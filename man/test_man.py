#!/usr/bin/python3
"""ctest man_pages: the generated pages render without warnings, ferry.1
names every verb (and admin sub-verb) the CLI lists, ferryd.conf.5 names
every configuration key ferryd knows.

  test_man.py FERRY FERRYD MANDIR
"""
import os
import re
import subprocess
import sys

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def run(argv):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def verbs(text):
    out, inside = [], False
    for line in text.splitlines():
        if not line.startswith(" "):
            inside = line == "Subcommands:"
        elif inside and re.match(r"^  \S", line):
            out.append(line.split()[0])
    return out


def rendered(page):
    """The page as text, and groff's warnings (-ww: all of them)."""
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-rLL=80n", page], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    text = re.sub(r".\x08", "", r.stdout)  # bold and underline overstrikes
    text = text.replace("\u2212", "-").replace("\u2010", "-")  # groff's minus and hyphen
    return text, r.returncode, r.stderr


def main():
    ferry, ferryd, mandir = sys.argv[1:4]
    pages = {name: os.path.join(mandir, name) for name in ("ferry.1", "ferryd.8", "ferryd.conf.5")}
    texts = {}
    for name, path in pages.items():
        check(os.path.isfile(path), name + " was generated")
        if not os.path.isfile(path):
            continue
        text, rc, warnings = rendered(path)
        check(rc == 0 and warnings == "", name + " renders without warnings" + (":\n" + warnings if warnings else ""))
        check(len(text.splitlines()) > 20, name + " has content")
        texts[name] = " ".join(text.split())

    ferry_text = texts.get("ferry.1", "")
    top = verbs(run([ferry, "--help"]).stdout)
    check(len(top) >= 10, "ferry --help lists verbs (%d)" % len(top))
    for verb in top:
        check("ferry " + verb in ferry_text, "ferry.1 describes ferry " + verb)
    admin = verbs(run([ferry, "admin", "--help"]).stdout)
    check(len(admin) >= 5, "ferry admin --help lists sub-verbs (%d)" % len(admin))
    for sub in admin:
        check("ferry admin " + sub in ferry_text, "ferry.1 describes ferry admin " + sub)
    check("--progress" in ferry_text and "json" in ferry_text, "ferry.1 describes --progress=json")

    ferryd_text = texts.get("ferryd.8", "")
    for option in ("--config", "--listen", "--help-config", "--print-config"):
        check(option in ferryd_text, "ferryd.8 describes " + option)

    conf_text = texts.get("ferryd.conf.5", "")
    rows = [line.split("\t") for line in run([ferryd, "--help-config=tsv"]).stdout.splitlines()[1:]]
    check(len(rows) > 50, "ferryd --help-config=tsv lists keys (%d)" % len(rows))
    sections = {}
    for row in rows:
        sections.setdefault(row[0], []).append(row[1])
    # Each key under its section's heading: the text from the heading to the
    # next one names it.
    heads = [m.start() for m in re.finditer(r"\[\[?[a-z.]+\]\]?", conf_text)]
    for section, keys in sections.items():
        at = conf_text.find(section)
        check(at >= 0, "ferryd.conf.5 has section " + section)
        if at < 0:
            continue
        end = min([h for h in heads if h > at] + [len(conf_text)])
        for key in keys:
            check(re.search(r"\b%s \(" % re.escape(key), conf_text[at:end]) is not None,
                  "ferryd.conf.5 describes %s %s" % (section, key))

    if failures:
        print("%d failure(s)" % len(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
