#!/usr/bin/python3
"""bench/plots.py: the README's pictures, drawn from the committed result tables.

    make plots          (or /usr/bin/python3 bench/plots.py; needs python3-matplotlib from Debian)

Reads bench/results/sql.md, engine-cpu.md and cuda.md (the Markdown tables the benchmark scripts
write) and writes three PNG images under docs/img/:

  conversation-turn.png   time of a new conversation turn against history length: the state resumed
                          (cached in the worker, or its pages reloaded) against re-running the history
  decode-batch.png        decode tokens/s against batch size, measured and roofline
  prefill-length.png      prefill tokens/s against prompt length, measured and roofline

Each picture names the machine, model and date its table gives.  Nothing is measured here: rerun the
benchmark scripts to refresh a table, then this script to refresh the pictures.
"""
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
OUT = os.path.join(ROOT, "docs", "img")


# ------------------------------------------------------------------ reading the tables

def read(name):
    with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
        return f.read()


def tables(md):
    """Every Markdown table in md: a list of (section heading, column names, rows of cells)."""
    found, heading, lines = [], "", md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1]):
            cols = cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            found.append((heading, cols, rows))
            continue
        i += 1
    return found


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table(md, first_col, *, heading=None, has=None):
    """The table whose first column is first_col (and, optionally, under a heading containing
    `heading`, with a column named `has`)."""
    for h, cols, rows in tables(md):
        if cols[0] == first_col and (heading is None or heading in h) and (has is None or has in cols):
            return cols, rows
    sys.exit(f"plots.py: no table starting with column '{first_col}' (heading {heading!r}) in the results")


def column(cols, rows, name, conv=float):
    k = cols.index(name)
    return [conv(r[k]) for r in rows]


def number(s):
    """A number from a cell such as '88 ms', '2094 kB', '37%' or '4.12'."""
    m = re.search(r"-?[0-9]+(\.[0-9]+)?", s)
    if not m:
        raise ValueError(f"not a number: {s!r}")
    return float(m.group(0))


def search(pattern, text, what):
    m = re.search(pattern, text, re.S)
    if not m:
        sys.exit(f"plots.py: cannot find {what} in the results")
    return m


# ------------------------------------------------------------------ drawing

plt.rcParams.update({
    "figure.dpi": 100,
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "legend.fontsize": 10,
    "legend.framealpha": 0.9,
})
BLUE, ORANGE, GREEN, RED, PURPLE = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"


def thousands(x, _pos):
    """Token counts as the tables give them: 1024 -> 1k, 32768 -> 32k."""
    if x >= 1024 and x % 1024 == 0:
        return f"{int(x // 1024)}k"
    return f"{x:g}"


def log_axes(ax, xs, *, base=2, logy=True):
    ax.set_xscale("log", base=base)
    if logy:
        ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(FuncFormatter(thousands))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _p: f"{y:,.0f}" if y >= 1 else f"{y:g}"))


def label_points(ax, xs, ys, fmt, color, dy=6):
    for x, y in zip(xs, ys):
        ax.annotate(fmt(y), (x, y), textcoords="offset points", xytext=(0, dy), ha="center",
                    fontsize=9, color=color)


def save(fig, name, source):
    fig.text(0.995, 0.005, f"data: {source}; drawn by bench/plots.py", ha="right", va="bottom",
             fontsize=8, color="0.4")
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    # no creation software or date in the file: the same tables give the same bytes
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {os.path.relpath(path, ROOT)}")


# ------------------------------------------------------------------ 1. a conversation turn

def conversation_turn():
    md = read("sql.md")
    cols, rows = table(md, "history (tokens)")
    hist = column(cols, rows, "history (tokens)", number)
    cached = column(cols, rows, "new turn, cached", number)
    reloaded = column(cols, rows, "new turn, pages reloaded", number)
    rerun = column(cols, rows, "re-running the history", number)
    m = search(r"on (\d{4}-\d{2}-\d{2}): ([^;\n]+);", md, "sql.md's machine and date")
    date, machine = m.group(1), m.group(2)

    fig, ax = plt.subplots(figsize=(8, 6.4))
    ax.plot(hist, rerun, "s-", color=RED, lw=2, label="re-running the history (chat with every message)")
    ax.plot(hist, reloaded, "^-", color=ORANGE, lw=2, label="say(): state resumed, MLA pages reloaded from the table")
    ax.plot(hist, cached, "o-", color=GREEN, lw=2, label="say(): state resumed, cached in the worker")
    label_points(ax, hist, rerun, lambda v: f"{v / 1000:.1f} s" if v >= 1000 else f"{v:.0f} ms", RED)
    label_points(ax, hist, reloaded, lambda v: f"{v:.0f} ms", ORANGE, dy=7)
    label_points(ax, hist, cached, lambda v: f"{v:.0f} ms", GREEN, dy=-15)
    log_axes(ax, hist)
    ax.set_xlim(hist[0] / 1.5, hist[-1] * 1.5)
    ax.set_ylim(min(cached) / 2, max(rerun) * 2.5)
    ax.set_xlabel("conversation history (tokens; 1k = 1024)")
    ax.set_ylabel("time of the next turn (ms, log scale)")
    ax.set_title("A new conversation turn costs the new tokens, not the history")
    ax.text(0.01, 0.98, f"pgdocs-kimi-18m on the CPU ({machine}), PostgreSQL 15, {date}\n"
            "next turn: 'And what happens next?', 16 tokens generated",
            transform=ax.transAxes, va="top", fontsize=9, color="0.25")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save(fig, "conversation-turn.png", "bench/results/sql.md")


# ------------------------------------------------------------------ 2. decode against batch size

def decode_batch():
    cuda = read("cuda.md")
    cols, rows = table(cuda, "decode", has="batch")
    rows = [r for r in rows if re.match(r"^[0-9.]+$", r[cols.index("tokens/s")])]  # skip the out-of-memory row
    gpu_m = search(r"Machine: (NVIDIA [A-Z0-9]+)[^,]*,? ?[^\n]*?(\d{4}-\d{2}-\d{2})", cuda, "cuda.md's machine")
    gpu, gpu_date = gpu_m.group(1), gpu_m.group(2)
    params = search(r"Model: \d+ layers, ([0-9.]+ B) parameters", cuda, "cuda.md's model").group(1)

    sql = read("sql.md")
    scols, srows = table(sql, "sessions")
    sessions = column(scols, srows, "sessions", number)
    sql_tps = column(scols, srows, "aggregate tokens/s", number)
    eng_tps = column(scols, srows, "engine alone, n sequences per step", number)
    m = search(r"on (\d{4}-\d{2}-\d{2}): ([^;\n]+);", sql, "sql.md's machine and date")
    cpu_date, cpu_machine = m.group(1), m.group(2)
    ecpu = read("engine-cpu.md")
    ecols, erows = table(ecpu, "phase", heading="pgdocs-kimi-18m")
    roof1 = next(number(r[ecols.index("roofline tokens/s")]) for r in erows
                 if r[0] == "decode" and number(r[1]) == 0)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5.2))
    # left: the 48B shape on the GPU
    for ctx, color, dy in ((4096, BLUE, 7), (32768, PURPLE, -15)):
        sel = [r for r in rows if number(r[cols.index("ctx")]) == ctx]
        b = [number(r[cols.index("batch")]) for r in sel]
        tps = [number(r[cols.index("tokens/s")]) for r in sel]
        roof = [bb * 1000.0 / number(r[cols.index("roofline ms")]) for bb, r in zip(b, sel)]
        k = f"{ctx // 1024}k"
        a1.plot(b, tps, "o-", color=color, lw=2, label=f"measured, context {k}")
        a1.plot(b, roof, "--", color=color, lw=1.5, alpha=0.8, label=f"roofline (bandwidth), context {k}")
        label_points(a1, b, tps, lambda v: f"{v:.0f}", color, dy=dy)
    log_axes(a1, [1, 8, 32, 64], logy=False)
    a1.set_ylim(0, None)
    a1.set_xlabel("batch size (sequences decoded together)")
    a1.set_ylabel("decode throughput (tokens/s, all sequences)")
    a1.set_title(f"Kimi-Linear-48B-A3B shape on one {gpu}")
    a1.text(0.02, 0.98, f"{params} parameters, random bf16 weights; {gpu_date}\n"
            "32k context at batch 64: out of GPU memory", transform=a1.transAxes, va="top",
            fontsize=9, color="0.25")
    a1.legend(loc="upper left", bbox_to_anchor=(0.0, 0.86))

    # right: the bundled model on the CPU
    a2.plot(sessions, eng_tps, "o-", color=GREEN, lw=2, label="engine alone (n sequences per step)")
    a2.plot(sessions, sql_tps, "s-", color=ORANGE, lw=2, label="through SQL (n sessions, continuous batching)")
    a2.plot([1], [roof1], "*", color="0.2", ms=12, label=f"roofline at batch 1, context 0 ({roof1:.0f})")
    label_points(a2, sessions, sql_tps, lambda v: f"{v:.0f}", ORANGE, dy=8)
    label_points(a2, sessions, eng_tps, lambda v: f"{v:.0f}", GREEN, dy=-14)
    log_axes(a2, [1, 2, 4, 8], logy=False)
    a2.set_ylim(0, 3000)
    a2.set_xlabel("batch size (sequences or sessions)")
    a2.set_ylabel("decode throughput (tokens/s, all sequences)")
    a2.set_title("pgdocs-kimi-18m (bundled) on the CPU")
    a2.text(0.02, 0.98, f"{cpu_machine}; {cpu_date}\n256 tokens per sequence after a 3-token prompt, greedy",
            transform=a2.transAxes, va="top", fontsize=9, color="0.25")
    a2.legend(loc="lower right")
    fig.suptitle("Decode throughput against batch size", fontsize=14)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save(fig, "decode-batch.png", "bench/results/cuda.md, sql.md, engine-cpu.md")


# ------------------------------------------------------------------ 3. prefill against prompt length

def prefill_length():
    ecpu = read("engine-cpu.md")
    cpu_m = search(r"Machine: ([^,]+), (\d+) threads[^;]*; (\d{4}-\d{2}-\d{2})", ecpu, "engine-cpu.md's machine")
    cpu_desc = f"{cpu_m.group(1)}, {cpu_m.group(2)} cores, {cpu_m.group(3)}"
    series = []
    for heading, label, color in (("pgdocs-kimi-18m", "pgdocs-kimi-18m, CPU", GREEN),
                                  ("kimi-linear-500m-moe", "500M MoE shape, CPU", ORANGE)):
        cols, rows = table(ecpu, "phase", heading=heading)
        sel = [r for r in rows if r[0] == "prefill"]
        n = [number(r[cols.index("context")]) for r in sel]
        tps = [number(r[cols.index("tokens/s")]) for r in sel]
        roof = [number(r[cols.index("roofline tokens/s")]) for r in sel]
        series.append((label, color, n, tps, roof))
    cuda = read("cuda.md")
    cols, rows = table(cuda, "prefill", has="tokens")
    gpu_m = search(r"Machine: (NVIDIA [A-Z0-9]+)[^\n]*?(\d{4}-\d{2}-\d{2})", cuda, "cuda.md's machine")
    n = [number(r[cols.index("tokens")]) for r in rows]
    tps = [number(r[cols.index("tokens/s")]) for r in rows]
    roof = [t / number(r[cols.index("roofline s")]) for t, r in zip(n, rows)]
    series.append((f"48B-A3B shape, {gpu_m.group(1)}", BLUE, n, tps, roof))

    fig, ax = plt.subplots(figsize=(8.5, 7))
    for label, color, n, tps, roof in series:
        ax.plot(n, tps, "o-", color=color, lw=2, label=f"{label}: measured")
        ax.plot(n, roof, "--", color=color, lw=1.5, alpha=0.8, label=f"{label}: roofline (FLOPs / GEMM rate)")
        label_points(ax, n, tps, lambda v: f"{v:.0f}", color, dy=7 if color == BLUE else -15)
    xs = sorted({x for s in series for x in s[2]})
    log_axes(ax, xs)
    ax.set_xlim(xs[0] / 1.5, xs[-1] * 1.5)
    ax.set_ylim(100, 5e5)
    ax.set_xlabel("prompt length (tokens, one call from an empty state)")
    ax.set_ylabel("prefill throughput (tokens/s, log scale)")
    ax.set_title("Prefill throughput against prompt length")
    ax.text(0.01, 0.98, f"CPU: {cpu_desc}, fp32 math on bf16 weights\n"
            f"GPU: one {gpu_m.group(1)}, {gpu_m.group(2)}, random bf16 weights",
            transform=ax.transAxes, va="top", fontsize=9, color="0.25")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save(fig, "prefill-length.png", "bench/results/engine-cpu.md, cuda.md")


if __name__ == "__main__":
    conversation_turn()
    decode_batch()
    prefill_length()
