"""PNG charts of bench/run results (`bench/run --plot DIR`).

Input: the records bench/run writes with --json, one JSON object per row
(bench/README.md lists the fields). Older files without the per-run
`values` lists still plot, without the run spread.

Charts:
- group-PREFIX.png, one per row group. The group is the row name's first
  part (rpc, stream, vol, ...), its first two parts under `grpc` (grpc.native,
  grpc.tunnel), and sasl.* rows go with tls.*; a row with a new prefix makes
  a new chart. Rows are drawn in panels by unit, each bar beside its
  baseline(s), with the run spread (min..max) as error bars and the ratio
  ferry / baseline written beside each baseline bar.
- throughput-per-transport.png: the one-stream upload and download rows over
  each transport (stream.{upload,download}.{unix,tcp}, tls.stream.*,
  sasl.stream.*, grpc.tunnel.*).
- latency-under-load.png: the rows measured in ms (the *call_p99_under_load
  rows and tls.handshake); lower is better.
- nbd-delay64-queue-depth.png: the nbd.delay64.qdN rows, MB/s against
  requests in flight (log scale), with the servers' peak thread counts on a
  second axis.

matplotlib is imported by draw_all(), so load_records() works without it.
"""

import json
import math
import os
import re

# Groups whose charts take the first two parts of the name, and prefixes
# drawn with another group.
TWO_PART_PREFIXES = ("grpc",)
GROUP_WITH = {"sasl": "tls"}

FERRY_COLOR = "#1f5fa8"
BASELINE_COLORS = ("#d9822b", "#8c8c8c")
SIDES = (("ferry", ""), ("baseline", "baseline_"), ("baseline2", "baseline2_"))

DPI = 100


# ---------------------------------------------------------------- records

def load_records(path):
    """The row records of a --json file (JSON lines; a JSON array is taken
    too). Raises ValueError with the file and line on anything else."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ValueError("cannot read %s: %s" % (path, e.strerror)) from None
    except UnicodeDecodeError:
        raise ValueError("%s: not a text file (expected JSON lines as written by bench/run --json)"
                         % path) from None
    records = []
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except ValueError as e:
            raise ValueError("%s: not valid JSON: %s" % (path, e)) from None
        items = [(i + 1, r) for i, r in enumerate(data)]
        where = "item"
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((n, json.loads(line)))
            except ValueError as e:
                raise ValueError("%s line %d: not valid JSON (%s); expected one object per line "
                                 "as written by bench/run --json" % (path, n, e)) from None
        where = "line"
    for n, r in items:
        check_record(r, "%s %s %d" % (path, where, n))
        records.append(r)
    if not records:
        raise ValueError("%s: no rows (expected one JSON object per line as written by bench/run --json)"
                         % path)
    return records


def check_record(r, where):
    if not isinstance(r, dict):
        raise ValueError("%s: expected a JSON object, got %s" % (where, type(r).__name__))
    for key, kinds in (("name", str), ("unit", str)):
        if not isinstance(r.get(key), kinds) or not r.get(key):
            raise ValueError("%s: field %r missing or not a string" % (where, key))
    for key in ("value", "baseline_value", "baseline2_value", "ratio", "ratio2"):
        if key in r and r[key] is not None and not is_number(r[key]):
            raise ValueError("%s (%s): field %r is not a number" % (where, r["name"], key))
    for key in ("values", "baseline_values", "baseline2_values"):
        if key in r and (not isinstance(r[key], list) or not all(is_number(v) for v in r[key])):
            raise ValueError("%s (%s): field %r is not a list of numbers" % (where, r["name"], key))


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def higher_is_better(r):
    if isinstance(r.get("higher_is_better"), bool):
        return r["higher_is_better"]
    return r["unit"] not in ("s", "ms")


def prefix_of(name):
    """rpc for rpc.echo.seq, grpc.native for grpc.native.upload."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in TWO_PART_PREFIXES and len(parts) > 2 else parts[0]


def group_of(name):
    key = prefix_of(name)
    return GROUP_WITH.get(key, key)


def groups(records):
    """[(group, [records])] in the order the groups first appear."""
    out = {}
    for r in records:
        out.setdefault(group_of(r["name"]), []).append(r)
    return list(out.items())


def side_bars(r):
    """(side, label, median, run values) of each side the record has."""
    bars = []
    for side, prefix in SIDES:
        if side != "ferry" and side not in r:
            continue
        median = r.get("value" if side == "ferry" else side + "_value")
        label = "ferry" if side == "ferry" else r[side]
        bars.append((side, label, median, r.get(prefix + "values") or []))
    return bars


def ratio_of(r, side):
    key = "ratio" if side == "baseline" else "ratio2"
    if is_number(r.get(key)):
        return r[key]
    ferry = r.get("value")
    other = r.get(side + "_value")
    if is_number(ferry) and is_number(other) and other:
        return ferry / other
    return None


def fmt(v):
    if v is None:
        return "-"
    a = abs(v)
    if a >= 10000:
        return "{:,.0f}".format(v)
    if a >= 100:
        return "%.0f" % v
    if a >= 10:
        return "%.1f" % v
    return "%.3g" % v


def fmt_ratio(ratio):
    if ratio is None:
        return "-"
    return "%.2f" % ratio if ratio < 10 else "%.1f" % ratio


def unit_label(unit, hib):
    text = {"MB/s": "MB/s (10^6 bytes/s)"}.get(unit, unit)
    return "%s, %s is better" % (text, "higher" if hib else "lower")


def shorten(text, width):
    return text if len(text) <= width else text[:width - 1] + "\u2026"


# ---------------------------------------------------------------- drawing

def draw_all(records, out_dir):
    """Draws every chart the records allow into out_dir; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for group, rows in groups(records):
        names = [group]
        for r in rows:
            if prefix_of(r["name"]) not in names:
                names.append(prefix_of(r["name"]))
        title = "%s rows: ferry against its baselines" % " and ".join(n + ".*" for n in names)
        path = os.path.join(out_dir, "group-%s.png" % "-".join(names))
        clusters = [(r["name"], r) for r in rows]
        paths.append(draw_bar_chart(path, title, clusters))
    transport = transport_rows(records)
    if transport:
        path = os.path.join(out_dir, "throughput-per-transport.png")
        paths.append(draw_bar_chart(path, "One stream's throughput per transport: ferry against the "
                                          "same transfer done by hand", transport))
    latency = [(r["name"], r) for r in records if r["unit"] == "ms"]
    if latency:
        path = os.path.join(out_dir, "latency-under-load.png")
        paths.append(draw_bar_chart(path, "Latency: calls beside a saturating stream, and connecting "
                                          "(ms, lower is better)", latency))
    qd = queue_depth_rows(records)
    if qd:
        paths.append(draw_queue_depth(os.path.join(out_dir, "nbd-delay64-queue-depth.png"), qd))
    return paths


TRANSPORT_RE = re.compile(r"^(?:(?P<layer>[a-z0-9]+)\.)?stream\.(?P<dir>upload|download)(?:\.(?P<tr>[a-z0-9]+))?$")
TUNNEL_RE = re.compile(r"^grpc\.tunnel\.(?P<dir>upload|download)$")


def transport_rows(records):
    """(label, record) of the one-stream upload/download rows, uploads
    first, each direction in the order unix, tcp, tls, sasl, grpc, others.
    Client layers (py.*) are not transports and stay out."""
    found = []
    for r in records:
        m = TRANSPORT_RE.match(r["name"])
        if m:
            layer, tr = m.group("layer"), m.group("tr")
            if layer and tr:
                continue
            if layer in ("tls", "sasl"):
                transport = layer
            elif layer is None and tr:
                transport = tr
            else:
                continue
        else:
            m = TUNNEL_RE.match(r["name"])
            if not m:
                continue
            transport = "grpc"
        found.append((m.group("dir"), transport, r))
    order = ["unix", "tcp", "tls", "sasl", "grpc"]
    found.sort(key=lambda t: (t[0] != "upload", order.index(t[1]) if t[1] in order else len(order)))
    return [("%s over %s (%s)" % (d, t, r["name"]), r) for d, t, r in found]


QD_RE = re.compile(r"^nbd\.delay64\.qd(\d+)$")


def queue_depth_rows(records):
    rows = []
    for r in records:
        m = QD_RE.match(r["name"])
        if m:
            rows.append((int(m.group(1)), r))
    return sorted(rows)


def spread(median, values):
    """Error bar lengths (below, above) from the runs' min and max."""
    if median is None or not values:
        return 0.0, 0.0
    return max(0.0, median - min(values)), max(0.0, max(values) - median)


def draw_bar_chart(path, title, clusters):
    """Horizontal bars, one cluster per (label, record): ferry on top, then
    its baseline(s). One panel per unit, stacked."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    panels = {}
    for label, r in clusters:
        panels.setdefault((r["unit"], higher_is_better(r)), []).append((label, r))
    panels = list(panels.items())
    bar_counts = [sum(len(side_bars(r)) for _, r in rows) for _, rows in panels]
    heights = [0.9 + 0.3 * n + 0.28 * len(rows) for n, (_, rows) in zip(bar_counts, panels)]
    fig_h = sum(heights) + 1.2
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, fig_h),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, ((unit, hib), rows) in zip(axes[:, 0], panels):
        draw_panel(ax, unit, hib, rows)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    handles = [Patch(color=FERRY_COLOR, label="ferry"),
               Patch(color=BASELINE_COLORS[0], label="baseline"),
               Patch(color=BASELINE_COLORS[1], label="second baseline"),
               Line2D([], [], color="black", marker="|", linestyle="-", label="min..max of the runs"),
               Patch(color="white", label="ratio = ferry / that baseline (median of the runs)")]
    if not any("baseline2" in r for _, r in clusters):
        handles.pop(2)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / fig_h, 0.97, 1 - 0.3 / fig_h))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_panel(ax, unit, hib, rows):
    bar_h = 0.8
    y = 0.0
    ticks, tick_labels, tick_colors = [], [], []
    all_values = []
    row_tops = []
    for label, r in rows:
        bars = side_bars(r)
        row_tops.append((y - 0.65, label, r))
        for i, (side, name, median, values) in enumerate(bars):
            color = FERRY_COLOR if side == "ferry" else BASELINE_COLORS[min(i - 1, 1)]
            ticks.append(y)
            tick_labels.append(shorten(name, 48))
            tick_colors.append("black" if side == "ferry" else "#444444")
            if is_number(median):
                lo, hi = spread(median, values)
                ax.barh(y, median, height=bar_h, color=color,
                        xerr=[[lo], [hi]] if values else None,
                        error_kw={"ecolor": "black", "capsize": 3, "elinewidth": 1})
                all_values.append(median)
                all_values.extend(values)
                ax.annotate(fmt(median), xy=(max([median] + values), y), xytext=(4, 0),
                            textcoords="offset points", va="center", fontsize=8)
            else:
                why = r.get("error") or "no value"
                ax.annotate("no value: " + shorten(why, 70), xy=(0, y), xytext=(4, 0),
                            textcoords="offset points", va="center", fontsize=8, color="#a00000")
            if side != "ferry":
                ratio = ratio_of(r, side)
                ax.annotate("ratio " + fmt_ratio(ratio),
                            xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(6, 0),
                            textcoords="offset points", va="center", fontsize=9, fontweight="bold",
                            color=FERRY_COLOR)
            y += 1
        y += 1.2  # room for the next row's name
    positive = [v for v in all_values if v > 0]
    log = bool(positive) and max(positive) / min(positive) > 50
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
        ax.set_xscale("log")
        ax.set_xlim(min(positive) / 2, max(positive) * 3)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "{:,.0f}".format(v) if v >= 1 else "%g" % v))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(0, (max(all_values) if all_values else 1) * 1.18)
    for top, label, r in row_tops:
        ax.text(0.0, top, label, transform=ax.get_yaxis_transform(), fontsize=9, fontweight="bold",
                va="bottom", ha="left")
    ax.annotate("ferry / baseline\n(%s 1: ferry ahead)" % (">" if hib else "<"), xy=(1.0, 1.0),
                xycoords="axes fraction", xytext=(6, 0), textcoords="offset points", va="top",
                fontsize=7, color="#444444")
    ax.set_yticks(ticks)
    ax.set_yticklabels(tick_labels, fontsize=8)
    for t, c in zip(ax.get_yticklabels(), tick_colors):
        t.set_color(c)
    ax.set_ylim(y - 1.2 + 0.1, -1.6)  # first row at the top
    ax.set_xlabel(unit_label(unit, hib) + (" (log scale)" if log else ""), fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def draw_queue_depth(path, rows):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(10, 5.8))
    depths = [qd for qd, _ in rows]
    for side, prefix, color, marker, what in (
            ("ferry", "", FERRY_COLOR, "o", "ferryd"),
            ("baseline", "baseline_", BASELINE_COLORS[0], "s", None)):
        xs, ys, lo, hi = [], [], [], []
        for qd, r in rows:
            median = r.get("value" if side == "ferry" else "baseline_value")
            if is_number(median):
                xs.append(qd)
                ys.append(median)
                a, b = spread(median, r.get(prefix + "values") or [])
                lo.append(a)
                hi.append(b)
        label = "ferry (ferryd)" if side == "ferry" else "baseline: " + rows[0][1].get("baseline", "?")
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, linewidth=2, capsize=4,
                        label=label + ", MB/s")
            for x, v in zip(xs, ys):
                ferry_side = side == "ferry"
                ax.annotate(fmt(v), xy=(x, v), xytext=(-8, 6) if ferry_side else (8, -13),
                            ha="right" if ferry_side else "left", textcoords="offset points",
                            fontsize=8, color=color)
    # Ratio under each depth.
    for qd, r in rows:
        ratio = ratio_of(r, "baseline")
        if ratio is not None:
            ax.annotate("ratio " + fmt_ratio(ratio), xy=(qd, 0), xycoords=("data", "axes fraction"),
                        xytext=(0, 6), textcoords="offset points", ha="center", fontsize=9,
                        fontweight="bold", color=FERRY_COLOR)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(depths))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    # Thread counts spelled out under each depth, where no line crosses them.
    labels = []
    for qd, r in rows:
        parts = ["%d" % qd]
        if is_number(r.get("threads")):
            parts.append("ferryd %d threads" % r["threads"])
        if is_number(r.get("baseline_threads")):
            parts.append("baseline %d" % r["baseline_threads"])
        labels.append("\n".join(parts))
    ax.set_xticklabels(labels)
    ax.set_xlim(min(depths) / 2, max(depths) * 2)
    ax.set_xlabel("requests in flight (128 KiB writes, 64 ms each in the backend; log scale)", fontsize=9)
    ax.set_ylabel(unit_label("MB/s", True) + ", log scale", fontsize=9)
    ax.grid(color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ymin, ymax = ax.get_ylim()
    ax.set_ylim(ymin / 3, ymax * 1.5)

    # Peak thread counts on a second axis.
    ax2 = ax.twinx()
    have_threads = False
    for prefix, color, label in (("", FERRY_COLOR, "ferryd threads (peak)"),
                                 ("baseline_", BASELINE_COLORS[0], "baseline server threads (peak)")):
        pts = [(qd, r[prefix + "threads"]) for qd, r in rows if is_number(r.get(prefix + "threads"))]
        if pts:
            have_threads = True
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle="--", marker="x",
                     linewidth=1.2, label=label)
    if have_threads:
        ax2.set_yscale("log")
        lo2, hi2 = ax2.get_ylim()
        ax2.set_ylim(max(0.5, lo2 / 5), hi2 * 3)  # thread lines below the rate labels
        ax2.set_ylabel("server threads, peak during the run (log scale)", fontsize=9)
        ax2.tick_params(axis="y", labelsize=8)
    else:
        ax2.set_yticks([])
        ax2.set_ylabel("server threads: not in this result file", fontsize=9)
    ax.set_title("NBD writes into a backend delaying each by 64 ms: throughput against requests in "
                 "flight\n(higher is better; ideal = requests x 128 KiB / 64 ms)", fontsize=11,
                 fontweight="bold")
    ideal = [qd * 128 * 1024 / 0.064 / 1e6 for qd in depths]
    ax.plot(depths, ideal, color="#999999", linestyle=":", linewidth=1, label="ideal")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path

