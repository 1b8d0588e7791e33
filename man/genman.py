#!/usr/bin/python3
"""Generates ferry's man pages from the built programs, so that they say
what --help says (docs/cli.md, "Man pages"):

  genman.py ferry  PROGRAM OUT VERSION   ferry(1): help2man, plus every verb's --help
  genman.py ferryd PROGRAM OUT VERSION   ferryd(8): help2man
  genman.py conf   PROGRAM OUT VERSION   ferryd.conf(5): from `ferryd --help-config=tsv`

The programs run with a fixed environment, so the defaults they print (the
socket path) do not depend on the machine that builds the pages.
"""
import os
import re
import subprocess
import sys
import tempfile

ENV = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
ENV.update({"XDG_RUNTIME_DIR": "/run/user/UID", "LC_ALL": "C", "COLUMNS": "80"})


def run(argv):
    return subprocess.run(argv, env=ENV, check=True, stdout=subprocess.PIPE, text=True).stdout


def roff(text):
    """Escapes text for a roff line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def parse_help(text):
    """CLI11's --help: (description lines, usage, {section: [(name, description)]}, section order)."""
    description, usage, sections, order = [], "", {}, []
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("Usage:"):
            usage = line[len("Usage:"):].strip()
        elif not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            sections[current] = []
            order.append(current)
        elif current is None:
            description.append(line.strip())
        elif re.match(r"^ {2}\S", line):
            m = re.match(r"^ {2}(\S.*?)(?: {2,}(.*))?$", line)
            sections[current].append([m.group(1), m.group(2) or ""])
        elif sections[current]:
            entry = sections[current][-1]
            entry[1] = (entry[1] + " " + line.strip()).strip()
    return description, usage, sections, order


def verbs_of(text):
    _, _, sections, _ = parse_help(text)
    return [name.split()[0] for name, _ in sections.get("Subcommands", [])]


def verb_section(program, words):
    """roff for `program WORDS... --help`."""
    description, usage, sections, order = parse_help(run([program] + words + ["--help"]))
    if usage.startswith(program):  # CLI11 prints argv[0]: the build's path
        usage = "ferry" + usage[len(program):]
    out = [".SS \"%s\"" % roff(" ".join(["ferry"] + words))]
    out += [roff(" ".join(description)), ".PP", ".B Usage:", roff(usage)]
    for name in order:
        entries = [e for e in sections[name] if not e[0].startswith("-h,--help")]
        if not entries or name == "Subcommands":
            continue
        out.append(".PP")
        out.append("%s:" % roff(name))
        for opt, desc in entries:
            out += [".TP", ".B %s" % roff(opt), roff(desc) if desc else ".br"]
    return out


def ferry_include(program):
    lines = ["[VERBS]"]
    lines.append("Each verb takes the global options above as well (before or after the verb).")
    top = run([program, "--help"])
    for verb in verbs_of(top):
        lines += verb_section(program, [verb])
        if verb == "admin":
            for sub in verbs_of(run([program, "admin", "--help"])):
                lines += verb_section(program, ["admin", sub])
    lines += [
        "[ENVIRONMENT]",
        ".TP", ".B FERRY_URI", "the daemon to talk to when \\-c is not given",
        ".TP", ".B FERRY_PASSWORD", "the SASL password, when \\-\\-sasl\\-password\\-file is not given",
        ".TP", ".B FERRY_ADMIN_SOCKET", "the admin socket of the admin verbs",
        ".TP", ".B XDG_RUNTIME_DIR",
        "the default socket is $XDG_RUNTIME_DIR/ferry/ferryd.sock (./var/ferryd.sock without it; "
        "the defaults above show /run/user/UID)",
        "[EXIT STATUS]",
        "0 success, 1 failure, 2 bad command line, 3 daemon unreachable, 4 not found, 5 already exists, "
        "6 busy or not allowed now, 7 no space or a limit, 8 denied, 9 invalid values, 130 interrupted.",
        "[SEE ALSO]",
        ".BR ferryd (8),",
        ".BR ferryd.conf (5),",
        ".BR nbdcopy (1),",
        ".BR qemu\\-img (1)",
        "",
        "docs/cli.md in the ferry sources describes the verbs with examples, the JSON output and "
        "\\-\\-progress=json.",
    ]
    return "\n".join(lines) + "\n"


FERRYD_INCLUDE = r"""[FILES]
.TP
.I /etc/ferry/ferryd.toml
the configuration file given with \-\-config; every key is in
.BR ferryd.conf (5)
[ENVIRONMENT]
.TP
.B XDG_RUNTIME_DIR
the default socket is $XDG_RUNTIME_DIR/ferry/ferryd.sock (./var/ferryd.sock without it;
the defaults above show /run/user/UID)
.TP
.B FERRY_SOCKET
the default socket's path, overriding the rule above
[SEE ALSO]
.BR ferry (1),
.BR ferryd.conf (5)
"""


def help2man(program, out, version, section, include_text, name):
    with tempfile.NamedTemporaryFile("w", suffix=".h2m", delete=False) as inc:
        inc.write(include_text)
    try:
        subprocess.run(["help2man", "--no-info", "--no-discard-stderr", "--section", section,
                        "--version-string", version, "--name", name, "--include", inc.name,
                        "--output", out, program], env=ENV, check=True)
    finally:
        os.unlink(inc.name)


def conf_page(program, out, version):
    rows = [line.split("\t") for line in run([program, "--help-config=tsv"]).splitlines()[1:]]
    lines = [
        '.TH FERRYD.CONF 5 "" "ferry %s" "File Formats"' % roff(version),
        ".SH NAME",
        "ferryd.conf \\- ferryd configuration file",
        ".SH SYNOPSIS",
        ".B ferryd \\-\\-config",
        ".I /etc/ferry/ferryd.toml",
        ".SH DESCRIPTION",
        "ferryd reads one TOML file, given with \\-\\-config; without it, it runs on an embedded "
        "default. Command\\-line options override the file (each key below names its option).",
        "Every key is checked: an unknown key, a wrong type or a value out of range stops ferryd at "
        "start with the file, the line and the key (exit status 2).",
        "SIGHUP reloads the TLS certificate and key only; other changes need a restart.",
        ".PP",
        ".B ferryd \\-\\-print\\-config",
        "prints the effective configuration as TOML;",
        ".B ferryd \\-\\-help\\-config",
        "prints this reference, and",
        ".B ferryd \\-\\-help\\-config=toml",
        "a file that sets every key. This page is generated from the same table.",
        ".SH KEYS",
    ]
    current = None
    for section, key, type_, default, note, meaning in rows:
        if section != current:
            current = section
            lines.append(".SS \"%s\"" % roff(section))
            if section.startswith("[["):
                lines.append("An array of tables: repeat the header for each entry.")
        text = type_
        if default and note:
            text += ", default " + default + " (" + note + ")"
        elif default:
            text += ", default " + default
        elif note:
            text += ", default: " + note
        lines += [".TP", "\\fB%s\\fR (%s)" % (roff(key), roff(text)), roff(meaning)]
    lines += [
        ".SH EXAMPLE",
        ".nf",
        ".ft CR",
        "[daemon]",
        "listen = [\"unix:/run/ferry/ferryd.sock\", \"tls:0.0.0.0:16514\"]",
        "",
        "[tls]",
        "cert_file = \"/etc/ferry/server.pem\"",
        "key_file = \"/etc/ferry/server.key\"",
        "ca_file = \"/etc/ferry/ca.pem\"",
        "",
        "[[pool]]",
        "name = \"default\"",
        "path = \"/var/lib/ferry/default\"",
        ".ft",
        ".fi",
        ".SH SEE ALSO",
        ".BR ferryd (8),",
        ".BR ferry (1)",
    ]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    if len(sys.argv) != 5:
        sys.exit("usage: genman.py ferry|ferryd|conf PROGRAM OUT VERSION")
    what, program, out, version = sys.argv[1:]
    if what == "ferry":
        help2man(program, out, version, "1", ferry_include(program),
                 "move virtual-machine volumes to and from a ferryd")
    elif what == "ferryd":
        help2man(program, out, version, "8", FERRYD_INCLUDE, "serve storage volumes to ferry clients")
    elif what == "conf":
        conf_page(program, out, version)
    else:
        sys.exit("genman.py: unknown page " + what)


if __name__ == "__main__":
    main()
