#!/usr/bin/python3
"""Writes docs/results.md and docs/plots/ from the results of `dynakv eval`.

Reads <results>/<name>/summary.json (and config.json beside it; summary.json's "spec" when it is
missing), optionally the router training folders (--training results/train-router-*/: config.json
with "command" and "seconds", output.txt with "trained N steps ... calibrated fraction X",
log.jsonl with one {"step", "kl", "fraction", ...} per step) and <results>/calibrate/config.json.

Writes, each plot as PNG and SVG (deterministic: rerunning gives identical files):
  fraction_vs_ppl      perplexity against the measured cache fraction, one line per method
  fraction_vs_kl       KL from the full cache against the measured fraction (log scales)
  fraction_vs_passkey  passkey accuracy against the measured fraction
  passkey_heatmap      accuracy by key depth x haystack length, one panel per method
  training_curves      (with --training) KL and realised fraction against step per router
and the markdown page (configuration, quality table, who wins where, speed, training, plots).

Runs with Debian's python3 and python3-matplotlib (no network):
  scripts/report.py [--name brown-kjv-llama-6M-v2] [--training results/train-router-*/]
  scripts/report.py --check        # builds everything from synthetic data in a temporary folder
"""
import argparse
import glob
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import tempfile
import textwrap
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOTS = ["fraction_vs_ppl", "fraction_vs_kl", "fraction_vs_passkey", "passkey_heatmap"]
TRAINING_PLOT = "training_curves"
TICKS = [0.0625, 0.125, 0.25, 0.5, 1.0]
DPI = 130

# Colours (tab20 indices) and markers, fixed per method name so every plot and every report agrees.
# Related methods share a hue family: DynaKV policies red/blue/cyan, evictions orange/green/brown,
# quantized caches (fixed size) the light colours with their own markers; other names get a colour
# of tab20b chosen by a hash of the name.
_STYLE = {
    "full": (None, "o"),
    "uniform": (0, "o"),
    "energy": (18, "s"),
    "router": (6, "o"),
    "router-int8": (12, "^"),
    "router-int4": (9, "v"),
    "router+snapkv": (8, "D"),
    "snapkv": (2, "s"),
    "streamingllm": (4, "^"),
    "h2o": (10, "v"),
    "kivi2": (16, "P"),
    "kivi4": (17, "P"),
    "kivi2-h": (14, "X"),
    "kivi4-h": (15, "X"),
    "q8_0": (1, "*"),
    "q4_0": (3, "*"),
    "q8_0-h": (5, "h"),
    "q4_0-h": (7, "h"),
}
_SPARE_MARKERS = ["<", ">", "p", "d", "8", "H"]


# ----------------------------------------------------------------------------------------------
# Reading

def load_json(path):
    with open(path) as f:
        return json.load(f)


def num(d, *keys):
    """d[k0][k1]... as a float, or None when any step is missing or not a number."""
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    if isinstance(d, bool) or not isinstance(d, (int, float)) or (isinstance(d, float) and math.isnan(d)):
        return None
    return float(d)


def target(row):
    f = num(row, "fraction")
    return -1.0 if f is None or f < 0 else f


def fixed(row):
    return target(row) < 0


def is_full(row):
    return fixed(row) and row.get("kv", row.get("method")) == "full" and not row.get("evict")


def measured(row):
    """The cache fraction to plot and tabulate: after the compressed perplexity prompt, else the
    passkey mean, else the speed task's at its longest context."""
    for v in (num(row, "perplexity", "kv_fraction_prompt"), num(row, "perplexity", "kv_fraction"),
              num(row, "passkey", "kv_fraction"), num(row, "speed", "contexts", -1, "kv_fraction")):
        if v is not None:
            return v
    return None


def fkey(f):
    return round(f, 6)


class Data:
    def __init__(self, results, name):
        folder = os.path.join(results, name)
        self.folder = folder
        if not os.path.exists(os.path.join(folder, "summary.json")):
            raise SystemExit(f"report.py: {folder}/summary.json not found (run `dynakv eval` first, or pass "
                             "--results/--name)")
        self.summary = load_json(os.path.join(folder, "summary.json"))
        cfg = os.path.join(folder, "config.json")
        self.config = load_json(cfg) if os.path.exists(cfg) else self.summary.get("spec", {})
        self.rows = [r for r in self.summary.get("rows", []) if isinstance(r, dict) and "method" in r]
        if not self.rows:
            raise SystemExit(f"report.py: {folder}/summary.json has no rows")
        self.full = next((r for r in self.rows if is_full(r)), None) or \
            next((r for r in self.rows if r["method"] == "full"), None)
        self.methods = []
        for r in self.rows:
            if r["method"] not in self.methods:
                self.methods.append(r["method"])
        fr = [fkey(f) for f in self.config.get("fractions", []) if isinstance(f, (int, float))]
        fr += [fkey(target(r)) for r in self.rows if not fixed(r)]
        self.fractions = sorted(set(fr), reverse=True)

    def groups(self):
        """(label, rows): the full cache, each target fraction (largest first), the fixed-size methods."""
        out = []
        if self.full is not None:
            out.append(("reference", [self.full]))
        for f in self.fractions:
            rows = [r for r in self.rows if not fixed(r) and fkey(target(r)) == f]
            if rows:
                out.append((f"{f:g}", rows))
        rest = [r for r in self.rows if fixed(r) and r is not self.full]
        if rest:
            out.append(("fixed", rest))
        return out


def load_training(paths):
    runs = []
    for p in paths:
        p = p.rstrip("/")
        cfg = load_json(os.path.join(p, "config.json")) if os.path.exists(os.path.join(p, "config.json")) else {}
        text = open(os.path.join(p, "output.txt")).read() if os.path.exists(os.path.join(p, "output.txt")) else ""
        log = []
        if os.path.exists(os.path.join(p, "log.jsonl")):
            with open(os.path.join(p, "log.jsonl")) as f:
                log = [json.loads(line) for line in f if line.strip()]
        cmd = cfg.get("command", [])
        tgt = None
        if isinstance(cmd, list) and "--target" in cmd and cmd.index("--target") + 1 < len(cmd):
            try:
                tgt = float(cmd[cmd.index("--target") + 1])
            except ValueError:
                pass
        m = re.search(r"trained (\d+) steps", text)
        steps = int(m.group(1)) if m else (len(log) or None)
        m = re.search(r"calibrated fraction ([0-9.eE+-]+)", text)
        cal = float(m.group(1)) if m else None
        tail = [s["kl"] for s in log[-20:] if num(s, "kl") is not None]
        label = os.path.basename(p)
        label = label[len("train-router-"):] if label.startswith("train-router-") else label
        runs.append(dict(label=label, path=p, seconds=num(cfg, "seconds"), steps=steps, calibrated=cal, target=tgt,
                         final_kl=sum(tail) / len(tail) if tail else None, log=log))
    runs.sort(key=lambda r: (-(r["target"] or 0), r["label"]))
    return runs


# ----------------------------------------------------------------------------------------------
# Plots

def mpl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matplotlib.rcParams.update({
        "svg.hashsalt": "dynakv-report", "font.size": 9, "axes.titlesize": 11, "axes.labelsize": 10,
        "legend.fontsize": 8, "xtick.labelsize": 8.5, "ytick.labelsize": 8.5, "axes.grid": True,
        "grid.alpha": 0.3, "grid.linewidth": 0.6, "figure.facecolor": "white", "savefig.facecolor": "white",
        "path.simplify": False,
    })
    return matplotlib, plt


def style(method):
    """(colour, marker) for a method: fixed for the known names, a stable hash for the others."""
    import matplotlib
    tab20 = matplotlib.colormaps["tab20"].colors
    if method in _STYLE:
        idx, marker = _STYLE[method]
        return ("black" if idx is None else tab20[idx]), marker
    h = zlib.crc32(method.encode())
    return matplotlib.colormaps["tab20b"].colors[h % 20], _SPARE_MARKERS[(h // 20) % len(_SPARE_MARKERS)]


def save(fig, plots, name):
    os.makedirs(plots, exist_ok=True)
    fig.savefig(os.path.join(plots, name + ".png"), dpi=DPI, metadata={"Software": None})
    fig.savefig(os.path.join(plots, name + ".svg"), metadata={"Date": None, "Creator": None})
    import matplotlib.pyplot as plt
    plt.close(fig)


def fraction_axis(ax, xs):
    from matplotlib.ticker import FixedLocator, FixedFormatter, NullLocator
    ax.set_xscale("log")
    lo = min([v for v in xs if v and v > 0] + [TICKS[0]])
    ax.set_xlim(lo / 1.25, 1.25)
    ax.xaxis.set_major_locator(FixedLocator(TICKS))
    ax.xaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in TICKS]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("measured cache fraction (bytes / fp16 full cache bytes, log scale)")


def log_y(ax, ys):
    """Log y axis with plain numbers (0.05, 0.1, 0.2, ...) as labels, denser when the range is small."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.set_yscale("log")
    ys = [y for y in ys if y > 0]
    decades = math.log10(max(ys) / min(ys)) if ys else 3
    subs = (1.0,) if decades > 3.5 else (1.0, 2.0, 5.0) if decades > 1 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def legend_outside(ax, handles, labels, title=None):
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False,
              title=title, ncol=1 if len(labels) <= 22 else 2, handlelength=2.2)


def fraction_plot(data, plots, name, task, metric, ylabel, title, logy=False, x_of=None, full_line=True,
                  ylim=None, note=None, jitter=False):
    """One line per method over its target fractions (x: measured fraction), fixed-size methods as
    single points, the full cache as a dashed horizontal line."""
    matplotlib, plt = mpl()
    x_of = x_of or measured
    fig, ax = plt.subplots(figsize=(9.6, 5.2))
    handles, labels, xs, ys = [], [], [], []
    series = []  # (method, line points, fixed-size points), points as [x, y, x drawn]
    for m in data.methods:
        rows = [r for r in data.rows if r["method"] == m and r is not data.full]
        pick = lambda fx: sorted([x_of(r), num(r, task, metric)] for r in rows if fixed(r) == fx
                                 and x_of(r) is not None and num(r, task, metric) is not None
                                 and (not logy or num(r, task, metric) > 0))
        pts, one = pick(False), pick(True)
        for p in pts + one:
            p.append(p[0])
        if pts or one:
            series.append((m, pts, one))
    if jitter:
        # Points at the same place (e.g. several methods at accuracy 1.0 and the same fraction) are
        # spread sideways, 4.5 % of the fraction apart, so that each stays visible.
        every = [p for _, pts, one in series for p in pts + one]
        done = set()
        for i, p in enumerate(every):
            if i in done:
                continue
            group = [j for j, q in enumerate(every) if j not in done and q[1] == p[1]
                     and abs(math.log(q[0] / p[0])) < 0.015]
            done.update(group)
            for k, j in enumerate(group):
                every[j][2] = every[j][0] * (1.0 + 0.045 * (k - (len(group) - 1) / 2.0))
    for m, pts, one in series:
        color, marker = style(m)
        if pts:
            h, = ax.plot([p[2] for p in pts], [p[1] for p in pts], color=color, marker=marker,
                         linewidth=1.6, markersize=6, markeredgecolor="0.15", markeredgewidth=0.5, zorder=3)
            handles.append(h)
            labels.append(m)
        if one:
            h = ax.scatter([p[2] for p in one], [p[1] for p in one], color=color, marker=marker, s=70,
                           edgecolors="0.15", linewidths=0.6, zorder=4)
            if not pts:
                handles.append(h)
                labels.append(m + " (fixed size)")
        xs += [p[0] for p in pts + one]
        ys += [p[1] for p in pts + one]
    full_y = num(data.full, task, metric) if data.full is not None else None
    if full_line and full_y is not None and (full_y > 0 or not logy):
        h = ax.axhline(full_y, color="black", linestyle="--", linewidth=1.2, zorder=2)
        handles.insert(0, h)
        labels.insert(0, f"full fp16 cache ({full_y:.3g})")
        ys.append(full_y)
    fraction_axis(ax, xs)
    if logy:
        log_y(ax, ys)
    elif ys and ylim is None and min(ys) > 0 and max(ys) / min(ys) > 3:
        log_y(ax, ys)
        ylabel += " (log scale)"
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if note:  # under the legend, outside the data
        ax.text(1.01, 0.0, textwrap.fill(note, 34), transform=ax.transAxes, fontsize=7.5, color="0.35",
                va="bottom", ha="left")
    if not handles:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.4")
    legend_outside(ax, handles, labels, title="method")
    fig.tight_layout()
    save(fig, plots, name)


def plot_ppl(data, plots):
    fraction_plot(data, plots, "fraction_vs_ppl", "perplexity", "ppl", "perplexity",
                  "Perplexity against cache size (lower is better)")


def plot_kl(data, plots):
    fraction_plot(data, plots, "fraction_vs_kl", "perplexity", "kl", "KL(full || method), nats per token (log scale)",
                  "KL divergence from the full cache against cache size (lower is better)", logy=True,
                  full_line=False, note="full cache: KL = 0 by definition (not drawn)")


def plot_passkey(data, plots):
    fraction_plot(data, plots, "fraction_vs_passkey", "passkey", "accuracy", "passkey accuracy",
                  "Passkey retrieval against cache size (higher is better)",
                  x_of=lambda r: num(r, "passkey", "kv_fraction"), ylim=(-0.04, 1.04),
                  note="points at the same place are spread sideways (4.5 % of the fraction apart) to stay visible",
                  jitter=True)


def passkey_grid(row):
    """{(depth, length): (correct, n)} from the row's passkey cases."""
    grid = {}
    for c in (row.get("passkey") or {}).get("cases", []):
        if not isinstance(c, list) or len(c) < 3:
            continue
        key = (fkey(float(c[1])), int(c[0]))
        ok, n = grid.get(key, (0, 0))
        grid[key] = (ok + (1 if c[2] else 0), n + 1)
    return grid


def heatmap_rows(data, which):
    """(panels, columns, description): the rows to draw in reading order (None: an empty slot)."""
    rows = [r for r in data.rows if passkey_grid(r)]
    fr = sorted({fkey(target(r)) for r in rows if not fixed(r)}, reverse=True)
    if which == "all" and len(fr) > 1:
        # One line of panels per method, a column per target fraction (largest first); the full cache
        # and the fixed-size methods fill the first lines.
        ncols = max(4, len(fr))
        head = [r for r in rows if fixed(r) and r is data.full] + [r for r in rows if fixed(r) and r is not data.full]
        panels = head + [None] * (-len(head) % ncols)
        for m in data.methods:
            line = [next((r for r in rows if r["method"] == m and not fixed(r) and fkey(target(r)) == f), None)
                    for f in fr]
            if any(line):
                panels += line + [None] * (ncols - len(line))
        return panels, ncols, "every run; a line per method, a column per fraction"
    if which == "all":
        n = max(1, len(rows))
        return rows, min(n, 5 if n > 8 else 4), "every run"
    want = fkey(float(which))
    have = sorted({fkey(target(r)) for r in rows if not fixed(r)})
    if have and want not in have:
        near = min(have, key=lambda f: abs(math.log(f / want)))
        print(f"report.py: no runs at fraction {want:g} for the passkey heatmap; using {near:g}", file=sys.stderr)
        want = near
    picked = [r for r in rows if fixed(r) and r is data.full] + \
             [r for r in rows if not fixed(r) and fkey(target(r)) == want] + \
             [r for r in rows if fixed(r) and r is not data.full]
    n = max(1, len(picked))
    return picked, min(n, 5 if n > 8 else 4), \
        (f"methods at fraction {want:g}; fixed-size ones at their own size" if have else "fixed-size methods")


def plot_heatmap(data, plots, which):
    matplotlib, plt = mpl()
    rows, ncols, what = heatmap_rows(data, which)
    depths = sorted({k[0] for r in rows if r for k in passkey_grid(r)})
    lengths = sorted({k[1] for r in rows if r for k in passkey_grid(r)})
    nrows = max(1, math.ceil(len(rows) / ncols))
    cell_w = 0.42 * max(3, len(lengths)) + 0.7
    cell_h = 0.34 * max(3, len(depths)) + 0.85
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell_w + 1.3, nrows * cell_h + 0.9), squeeze=False)
    cmap = matplotlib.colormaps["RdYlGn"]
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= len(rows) or rows[i] is None:
            ax.axis("off")
            continue
        r = rows[i]
        g = passkey_grid(r)
        import numpy as np
        z = np.full((len(depths), len(lengths)), np.nan)
        for (d, L), (ok, cnt) in g.items():
            z[depths.index(d), lengths.index(L)] = ok / cnt
        im = ax.imshow(z, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        for a in range(len(depths)):
            for b in range(len(lengths)):
                v = z[a, b]
                if np.isnan(v):
                    continue
                txt = f"{v:.0f}" if v in (0.0, 1.0) else f"{v:.2f}".lstrip("0")
                rgb = cmap(v)[:3]
                lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
                ax.text(b, a, txt, ha="center", va="center", fontsize=7, color="white" if lum < 0.45 else "black")
        ax.grid(False)
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)))
        left = i % ncols == 0 or rows[i - 1] is None
        ax.set_yticklabels([f"{d:g}" for d in depths] if left else [], fontsize=7)
        ax.tick_params(length=2, pad=1.5)
        for s in ax.spines.values():
            s.set_linewidth(0.5)
        acc, frac = num(r, "passkey", "accuracy"), num(r, "passkey", "kv_fraction")
        head = r["method"] if fixed(r) else f"{r['method']} @{target(r):g}"
        sub = []
        if acc is not None:
            sub.append(f"acc {acc:.2f}")
        if frac is not None:
            sub.append(f"f {frac:.3f}")
        # The method's colour, darkened so that the light ones stay legible as text.
        tc = "black" if r is data.full else tuple(0.62 * v for v in matplotlib.colors.to_rgb(style(r["method"])[0]))
        ax.set_title(head + "\n" + ", ".join(sub), fontsize=8, color=tc, pad=3)
        if left:
            ax.set_ylabel("key depth", fontsize=7.5)
        if i + ncols >= len(rows) or rows[i + ncols] is None:
            ax.set_xlabel("haystack length (words)", fontsize=7.5)
    H = fig.get_figheight()
    fig.suptitle(f"Passkey accuracy by key depth and haystack length ({what})", fontsize=10.5,
                 y=1 - 0.1 / H, va="top")
    fig.tight_layout(rect=(0, 0, 1 - 0.9 / fig.get_figwidth(), 1 - 0.32 / H))
    if im is not None:
        cax = fig.add_axes((1 - 0.75 / fig.get_figwidth(), 0.15, 0.18 / fig.get_figwidth(), 0.7))
        cax.grid(False)
        cb = fig.colorbar(im, cax=cax)
        cb.set_label("accuracy", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    else:
        fig.text(0.5, 0.5, "no passkey cases", ha="center", va="center", color="0.4")
    save(fig, plots, "passkey_heatmap")
    return what


def moving_average(v, w=10):
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x
        if i >= w:
            acc -= v[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot_training(runs, plots):
    matplotlib, plt = mpl()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    colors = matplotlib.colormaps["tab10"].colors
    handles, labels = [], []
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        log = [s for s in r["log"] if num(s, "step") is not None]
        steps = [s["step"] for s in log]
        for ax, key in ((a1, "kl"), (a2, "fraction")):
            pairs = [(s["step"], s[key]) for s in log if num(s, key) is not None]
            if not pairs:
                continue
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], color=c, linewidth=0.6, alpha=0.18)
            h, = ax.plot([p[0] for p in pairs], moving_average([p[1] for p in pairs]), color=c, linewidth=1.6)
            if ax is a1:
                handles.append(h)
                labels.append(r["label"])
        if r["target"] is not None and steps:
            a2.axhline(r["target"], color=c, linestyle=":", linewidth=1.0)
    log_y(a1, [s["kl"] for r in runs for s in r["log"] if num(s, "kl") is not None])
    from matplotlib.ticker import FixedLocator, FixedFormatter, NullLocator
    a2.set_yscale("log")
    lo, hi = a2.get_ylim()
    ticks = [t for t in TICKS if lo <= t <= hi] or TICKS
    a2.yaxis.set_major_locator(FixedLocator(ticks))
    a2.yaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
    a2.yaxis.set_minor_locator(NullLocator())
    a1.set_title("KL(full || router) during training")
    a1.set_ylabel("KL, nats per token (log scale)")
    a2.set_title("Realised cache fraction during training")
    a2.set_ylabel("cache fraction, log scale (dotted: target)")
    for ax in (a1, a2):
        ax.set_xlabel("step")
    if handles:
        a2.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="router")
    fig.suptitle("Router training (moving average of 10 steps; faint: every step)", fontsize=10.5)
    fig.tight_layout()
    save(fig, plots, TRAINING_PLOT)


# ----------------------------------------------------------------------------------------------
# Markdown

def fmt(v, spec, dash="-"):
    return dash if v is None else format(v, spec)


def mib(b):
    if b is None:
        return "-"
    return f"{b / 2 ** 20:.2f}"


def words_list(v):
    v = [f"{x:g}" if isinstance(x, float) else str(x) for x in v]
    return ", ".join(v)


def passkey_cell(row):
    ok, n = num(row, "passkey", "correct"), num(row, "passkey", "n")
    return "-" if ok is None or not n else f"{ok:.0f}/{n:.0f}"


def configuration(data):
    c = data.config
    L = []
    model, text = c.get("model", "?"), c.get("text", "?")
    L.append(f"Model `{os.path.basename(model)}` (`{model}`); text `{os.path.basename(text)}` (`{text}`), which "
             "gives the perplexity chunks and the passkey haystacks.")
    tasks = c.get("tasks", ["perplexity", "passkey", "speed"])
    if "perplexity" in tasks:
        chunks = c.get("ppl_chunks", "?")
        done = {num(r, "perplexity", "chunks") for r in data.rows} - {None}
        if len(done) == 1 and done != {float(chunks) if isinstance(chunks, (int, float)) else None}:
            chunks = f"{chunks} requested, {done.pop():.0f} available"
        L.append(f"Perplexity: {chunks} chunks of {c.get('ppl_ctx', '?')} tokens; each chunk's first half is a "
                 "prompt, compressed when it ends (evictions and rank choices happen there), and its second half is "
                 f"scored, decoded in batches of {c.get('decode_batch', '?')}. KL is the mean per-token "
                 "KL(full fp16 cache || method) in nats, top-1 how often both caches' most likely next token agree.")
    if "passkey" in tasks:
        p = c.get("passkey", {})
        lens, deps, per = p.get("lengths", []), p.get("depths", []), p.get("per_cell", 1)
        n = len(lens) * len(deps) * per if lens and deps else "?"
        L.append(f"Passkey: {n} cases ({len(lens)} haystack lengths of {words_list(lens)} words x {len(deps)} key "
                 f"depths {words_list(deps)} x {per} per cell, seed {p.get('seed', '?')}); a case is correct when "
                 f"the greedy answer ({p.get('n_predict', '?')} tokens) holds the key.")
    if "speed" in tasks:
        L.append(f"Speed: prefill of {words_list(c.get('speed_ctx', []))} tokens (batches of 512), then "
                 f"{c.get('speed_decode', '?')} greedy decode steps timed; at fractions "
                 f"{words_list(c.get('speed_fractions', []))} and for the fixed-size methods.")
    methods = [m["name"] if isinstance(m, dict) else str(m) for m in c.get("methods", [])] or data.methods
    L.append(f"Methods: {', '.join(methods)}; target fractions {words_list(c.get('fractions', data.fractions))} of "
             "the fp16 full cache (fixed-size methods run once at their own size).")
    if c.get("profile"):
        L.append(f"Profile `{c['profile']}`" + (
            "; routers " + ", ".join(f"{k}: `{v}`" for k, v in
                                     sorted(c["routers"].items(), key=lambda kv: -float(kv[0])))
            if c.get("routers") else "") + ".")
    L.append("The measured fraction is the stored bytes over the fp16 full cache's: for perplexity after each "
             "compressed prompt (what the plots use), for passkey the mean over its cases.")
    return L


def quality_table(data):
    full_ppl = num(data.full, "perplexity", "ppl") if data.full is not None else None
    L = ["| method | target fraction | measured fraction | PPL | PPL/full | KL | top-1 | passkey (correct/n) |",
         "|---|---|---|---|---|---|---|---|"]
    for label, rows in data.groups():
        kls = [num(r, "perplexity", "kl") for r in rows]
        best = min([k for k in kls if k is not None], default=None) if label != "reference" else None
        for r, kl in zip(rows, kls):
            bold = best is not None and kl is not None and kl == best and len(rows) > 1
            b = (lambda s: f"**{s}**") if bold else (lambda s: s)
            ppl = num(r, "perplexity", "ppl")
            rel = ppl / full_ppl if ppl is not None and full_ppl else None
            tgt = "-" if label == "reference" else ("fixed" if fixed(r) else f"{target(r):g}")
            L.append(f"| {b(r['method'])} | {tgt} | {fmt(measured(r), '.4f')} | {fmt(ppl, '.3f')} | "
                     f"{fmt(rel, '.3f')} | {b(fmt(kl, '.4f'))} | {fmt(num(r, 'perplexity', 'top1'), '.4f')} | "
                     f"{passkey_cell(r)} |")
    return L


def names(rows, k=3):
    n = [r["method"] for r in rows]
    return ", ".join(n) if len(n) <= k else ", ".join(n[:k]) + f" and {len(n) - k} more"


def winners(data, combo):
    L = []
    for label, rows in data.groups():
        if label == "reference":
            continue
        where = "Fixed-size methods" if label == "fixed" else f"At {label}"
        parts = []
        kl = sorted([(num(r, "perplexity", "kl"), r) for r in rows if num(r, "perplexity", "kl") is not None],
                    key=lambda p: p[0])
        if kl:
            s = f"lowest KL **{kl[0][1]['method']}** ({kl[0][0]:.4f}"
            if len(kl) > 1:
                s += f"; next {kl[1][1]['method']} {kl[1][0]:.4f}"
            parts.append(s + ")")
        pk = [(num(r, "passkey", "accuracy"), r) for r in rows if num(r, "passkey", "accuracy") is not None]
        if pk:
            top = max(a for a, _ in pk)
            best = [r for a, r in pk if a == top]
            if top == 0:
                parts.append("no method retrieves any passkey")
            elif len(best) == len(pk) and len(pk) > 1:
                parts.append(f"passkey tied across all {len(pk)} methods ({passkey_cell(best[0])})")
            else:
                parts.append(f"best passkey **{names(best)}** ({passkey_cell(best[0])})")
        if parts:
            L.append(f"- {where}: " + "; ".join(parts) + ".")
    near = math.log(1.5)  # "near 6 %": measured between 4 % and 9 %
    pts = [(abs(math.log(measured(r) / 0.06)), r) for r in data.rows if measured(r) and r is not data.full]
    pts = [p for p in pts if p[0] <= near]
    if not pts:
        L.append("- No run measured near 6 % of the full cache (between 4 % and 9 %).")
    else:
        _, r = min(pts, key=lambda p: p[0])
        ppl, kl = num(r, "perplexity", "ppl"), num(r, "perplexity", "kl")
        L.append(f"- Closest measured point to 6 % of the full cache: {r['method']}"
                 + ("" if fixed(r) else f" @{target(r):g}") + f" at {measured(r):.4f}"
                 + (f" (PPL {ppl:.3f}, KL {kl:.4f})" if ppl is not None and kl is not None else "") + ".")
    cpts = [(abs(math.log(measured(r) / 0.06)), r) for r in data.rows if r["method"] == combo and measured(r)]
    cpts = [p for p in cpts if p[0] <= near]
    if cpts:
        _, r = min(cpts, key=lambda p: p[0])
        s = f"- {combo} nearest 6 %: " + ("" if fixed(r) else f"target {target(r):g}, ") + f"measured {measured(r):.4f}"
        ppl, kl = num(r, "perplexity", "ppl"), num(r, "perplexity", "kl")
        fppl = num(data.full, "perplexity", "ppl") if data.full is not None else None
        if ppl is not None:
            s += f"; PPL {ppl:.3f}" + (f" = {ppl / fppl:.3f}x the full cache's {fppl:.3f}" if fppl else "")
        if kl is not None:
            s += f"; KL {kl:.4f}"
        acc = num(r, "passkey", "accuracy")
        facc = num(data.full, "passkey", "accuracy") if data.full is not None else None
        if acc is not None:
            s += f"; passkey {passkey_cell(r)}"
            if facc is not None:
                s += f" against the full cache's {passkey_cell(data.full)}"
                if facc > 0:
                    s += f" ({100 * acc / facc:.0f} % of it)"
        L.append(s + ".")
    return L


def speed_table(data):
    base = {}
    if data.full is not None:
        for c in (data.full.get("speed") or {}).get("contexts", []):
            if num(c, "ctx") is not None:
                base[int(c["ctx"])] = num(c, "decode_tokens_per_s")
    entries = []
    for i, r in enumerate(data.rows):
        for c in (r.get("speed") or {}).get("contexts", []):
            if num(c, "ctx") is not None:
                entries.append((int(c["ctx"]), i, r, c))
    if not entries:
        return []
    entries.sort(key=lambda e: (e[0], e[1]))
    L = ["| method | fraction | ctx | prefill tok/s | decode tok/s | decode / full | KV MiB | reserved MiB |",
         "|---|---|---|---|---|---|---|---|"]
    for ctx, _, r, c in entries:
        dec = num(c, "decode_tokens_per_s")
        ratio = dec / base[ctx] if dec is not None and base.get(ctx) else None
        f = num(c, "kv_fraction")
        frac = (f"fixed ({f:.4f})" if f is not None else "fixed") if fixed(r) else f"{target(r):g}"
        if r is data.full:
            frac = "full"
        L.append(f"| {r['method']} | {frac} | {ctx} | {fmt(num(c, 'prefill_tokens_per_s'), '.0f')} | "
                 f"{fmt(dec, '.0f')} | {fmt(ratio, '.2f')} | {mib(num(c, 'kv_bytes'))} | "
                 f"{mib(num(c, 'kv_bytes_reserved'))} |")
    return L


def training_section(runs, calibration):
    L = ["## Router training", ""]
    if calibration is not None:
        L += [f"Profile calibration (`dynakv calibrate`): {calibration:.0f} s.", ""]
    L += ["| router | seconds | steps | final KL (mean of last 20 steps) | calibrated fraction |",
          "|---|---|---|---|---|"]
    for r in runs:
        L.append(f"| {r['label']} | {fmt(r['seconds'], '.0f')} | {fmt(r['steps'], 'd')} | {fmt(r['final_kl'], '.4f')} "
                 f"| {fmt(r['calibrated'], '.4f')} |")
    return L + [""]


def weights_section(results):
    """'Weights as stored' from <results>/weights/summary.json (scripts/weights_bench.py), or []."""
    path = os.path.join(results, "weights", "summary.json")
    if not os.path.exists(path):
        return []
    w = load_json(path)
    models, base = w["models"], w["baseline"]
    order = [t for t in ["f32", "f16", "q8_0", "q6_k", "q4_k_m", "q4_0"] if t in models]

    def cell(rows, phase, t, threads, ctx):
        r = rows.get(f"{phase}|{models[t]}|{threads}|{ctx}")
        b = rows.get(f"{phase}|{models[base]}|{threads}|{ctx}")
        if not r:
            return "-"
        txt = f"{r['mean']:.0f}"
        if t != base and b:
            txt += f" ({r['mean'] / b['mean']:.2f}x)"
        return txt

    L = ["## Weights as stored", "",
         f"Each llama.cpp-quantized file of the evaluation model against the {base.upper()} one, measured in one run of "
         f"`{w['command']}` ({w['date']}, {w['cpu']}, {w['cores']} cores; mean of {w['reps']} interleaved "
         "repetitions). Prefill: one batch of ctx tokens from an empty cache; decode: 32 single-token steps ending "
         f"at ctx; full fp16 cache. Tokens/s, and in brackets the ratio to {base.upper()} at the same threads and "
         "context. Quantized products: 8-bit activations and integer dot products (AVX-512 VNNI where the CPU has "
         "it) up to 8 rows, dequantized tiles + sgemm for prefill batches (docs/architecture.md, Weights as stored).",
         ""]
    ctxs = sorted({int(k.split("|")[3]) for k in w["idle"]})
    for phase in ("prefill", "decode"):
        head = [f"{t} thr, ctx {c}" for t in (1, 2) for c in ctxs]
        L += [f"{phase.capitalize()} tokens/s, idle machine:", "", "| weights | " + " | ".join(head) + " |",
              "|---|" + "---|" * len(head)]
        for t in order:
            L.append(f"| {t} | " + " | ".join(cell(w["idle"], phase, t, th, c) for th in (1, 2) for c in ctxs) + " |")
        L.append("")
    if w.get("loaded"):
        L += [f"Beside {w['busy']} busy loops on the {w['cores']} cores (ctx 512; ratios to {base.upper()} under the same "
              "load):", "", "| weights | prefill 1 thr | prefill 2 thr | decode 1 thr | decode 2 thr |", "|---|---|---|---|---|"]
        for t in order:
            L.append(f"| {t} | " + " | ".join(cell(w["loaded"], ph, t, th, 512) for ph in ("prefill", "decode")
                                               for th in (1, 2)) + " |")
        L.append("")
    mem = w.get("memory", {})
    prog = w.get("program_rss_bytes")
    if mem:
        L += ["Resident memory (maximum RSS, MiB) against the file's size. The program alone (`dynakv generate "
              f"--help`, its libraries): {mib(prog)} MiB. `info` loads the model (maps the file and checks every "
              "block's scales, so every page is touched once); `generate` runs 64 tokens; `perplexity` adds "
              f"512-token batches and their logits. KV cache: {w.get('kv_bytes_per_token')} bytes per token (fp16).",
              "", "| weights | file | info (load) | generate | generate - program - file | perplexity -c 512 |",
              "|---|---|---|---|---|---|"]
        for t in order:
            m = mem.get(t)
            if m:
                rest = m["generate_rss_bytes"] - prog - m["file_bytes"] if prog else None
                L.append(f"| {t} | {mib(m['file_bytes'])} | {mib(m.get('load_rss_bytes'))} | "
                         f"{mib(m['generate_rss_bytes'])} | {mib(rest)} | {mib(m['perplexity_rss_bytes'])} |")
        L += ["", "Commands: " + "; ".join(f"`{c}`" for c in w.get("rss_commands", {}).values()), ""]
    v1 = w.get("v1") or {}
    if v1:
        L += ["The v1 files at llama-bench's workloads, beside the llama.cpp figures the models' README gives for "
              "this machine type (`llama-bench -p 128,512 -n 128 -r 5`, another run on another day, so only a rough "
              "comparison; llama.cpp is not installed here to measure both in one run). llama-bench's tg128 "
              "averages decode over contexts 0 to 128; ours is the 32 steps before context 128.", "",
              "Each cell: ours / llama.cpp's (README) = ratio.", "",
              "| model | threads | prefill 128 | prefill 512 | decode near 128 |", "|---|---|---|---|---|"]
        readme = w.get("llama_bench_readme") or {}
        for m in sorted({k.split("|")[1] for k in v1}):
            for th in (1, 2):
                theirs = readme.get(f"{m}|{th}", {})

                def vs(ph, c, key, m=m, th=th, theirs=theirs):
                    ours = v1.get(f"{ph}|{m}|{th}|{c}", {}).get("mean")
                    if ours is None:
                        return "-"
                    t = theirs.get(key)
                    return f"{ours:.0f}" + (f" / {t:.0f} = {ours / t:.2f}x" if t else "")
                L.append(f"| {m} | {th} | {vs('prefill', 128, 'pp128')} | {vs('prefill', 512, 'pp512')} | "
                         f"{vs('decode', 128, 'tg128')} |")
        L.append("")
    return L


def markdown(data, args, runs, calibration, plots_rel, command, heatmap_what):
    rel = lambda p: os.path.relpath(p, ROOT) if os.path.abspath(p).startswith(ROOT + os.sep) else p
    L = ["# Results", "",
         f"Generated by scripts/report.py from {rel(data.folder)}/ (do not edit by hand).", "",
         "## Configuration", ""]
    L += [" ".join(configuration(data)), "", "## Quality", "",
          "Grouped by target fraction (the full cache first, fixed-size methods last); the lowest KL of each group "
          "in bold. PPL/full is the perplexity over the full cache's; passkey counts correct retrievals.", ""]
    L += quality_table(data) + ["", "## Who wins where", ""] + winners(data, args.combo) + [""]
    sp = speed_table(data)
    if sp:
        L += ["## Speed", "",
              "Prefill and decode tokens/s after a prompt of ctx tokens; decode / full is the decode rate over the "
              "full cache's at the same ctx; KV MiB is the resident cache after the prompt, reserved MiB what it "
              "allocated.", ""] + sp + [""]
    L += weights_section(args.results)
    if runs:
        L += training_section(runs, calibration)
    caps = {
        "fraction_vs_ppl": "Perplexity against the measured cache fraction (after the compressed prompt); dashed: "
                           "the full fp16 cache.",
        "fraction_vs_kl": "KL from the full cache against the measured cache fraction (both axes log).",
        "fraction_vs_passkey": "Passkey accuracy against the mean measured cache fraction; dashed: the full cache.",
        "passkey_heatmap": "Passkey accuracy per key depth (rows) and haystack length (columns) for each method "
                           f"({heatmap_what}).",
        TRAINING_PLOT: "Router training: KL and realised cache fraction against step (moving average of 10).",
    }
    L += ["## Plots", ""]
    for p in PLOTS + ([TRAINING_PLOT] if runs else []):
        L += [f"![{p}]({plots_rel}/{p}.png)", "", f"*{caps[p]}*", ""]
    rankmap = os.path.join(args.results, "rankmap", "output.txt")
    if os.path.exists(rankmap):  # scripts/results.py's rank map step (dynakv rankmap's summary)
        with open(rankmap) as f:
            summary = f.read().strip()
        L += ["## Rank map", "",
              "[rankmap.html](rankmap.html) (open it in a browser; no network needed) colours a paragraph of "
              "valid.txt by the ranks the router trained at 0.25 gives each token, per layer or averaged, "
              "with a histogram of ranks per layer. Its summary (`dynakv rankmap`):", "", "```", summary, "```", ""]
    L += [f"Regenerate: `{command}` (the whole page and every result behind it: `scripts/results.py --threads 2`; "
          "finished steps are skipped, `--force` reruns them)", ""]
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------

def expand_training(paths):
    out = []
    for p in paths:
        hits = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        out += [h for h in hits if os.path.isdir(h)]
        if not hits or not all(os.path.isdir(h) for h in hits):
            raise SystemExit(f"report.py: --training {p}: not a folder")
    return out


def atomic_write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def report(args, command):
    data = Data(args.results, args.name)
    runs = load_training(expand_training(args.training)) if args.training else []
    calibration = None
    if runs:
        cal = args.calibration or os.path.join(args.results, "calibrate")
        if os.path.exists(os.path.join(cal, "config.json")):
            calibration = num(load_json(os.path.join(cal, "config.json")), "seconds")
    plot_ppl(data, args.plots)
    plot_kl(data, args.plots)
    plot_passkey(data, args.plots)
    heatmap_what = plot_heatmap(data, args.plots, args.heatmap_fraction)
    if runs:
        plot_training(runs, args.plots)
    plots_rel = os.path.relpath(os.path.abspath(args.plots), os.path.dirname(os.path.abspath(args.out)))
    atomic_write(args.out, markdown(data, args, runs, calibration, plots_rel, command, heatmap_what))
    return PLOTS + ([TRAINING_PLOT] if runs else [])


# ----------------------------------------------------------------------------------------------
# Synthetic data for --check (and for looking at crowded plots: --check --keep DIR)

def synthetic(root, rich=True):
    """Writes <root>/synthetic/{summary,config}.json (and, rich, training and calibration folders)."""
    rnd = random.Random(7)
    fractions = [0.5, 0.25, 0.125, 0.0625] if rich else [0.25]
    per = ["uniform", "energy", "router", "router-int8", "router-int4", "snapkv", "streamingllm", "h2o",
           "router+snapkv"] if rich else ["uniform", "router", "snapkv", "router+snapkv"]
    fixed_m = {"kivi2": 0.15, "kivi4": 0.28, "q8_0": 0.53, "q4_0": 0.28, "kivi2-h": 0.15, "q4_0-h": 0.28,
               "q8_0-h": 0.53, "my-custom": 0.4} if rich else {}
    lengths = [150, 300, 500, 800, 1200] if rich else [150, 300, 500]
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    ctxs = [1024, 4096, 16384, 32768] if rich else [512, 2048]
    full_ppl = 52.57
    quality = {"uniform": 1.0, "energy": 0.85, "router": 0.6, "router-int8": 0.45, "router-int4": 0.5, "snapkv": 0.7,
               "streamingllm": 1.4, "h2o": 0.9, "router+snapkv": 0.4, "kivi2": 0.8, "kivi4": 0.2, "q8_0": 0.01,
               "q4_0": 0.3, "kivi2-h": 0.6, "q4_0-h": 0.15, "q8_0-h": 0.008, "my-custom": 0.5}

    def row(method, f, frac):
        r = {"method": method, "fraction": f, "kv": "full" if method == "full" else "dynakv", "evict": "",
             "flags": {}, "folder": method if f < 0 else f"{method}@{f:g}"}
        kl = 1e-9 if method == "full" else quality[method] * 0.25 * (1 / frac - 1) ** 0.9 * (1 + 0.05 * rnd.random())
        r["perplexity"] = {"ppl": full_ppl * math.exp(kl * 0.9), "ppl_err": 3.1, "kl": kl, "kl_err": kl * 0.03,
                           "top1": max(0.2, 1 - kl * 0.6), "kv_fraction": frac * 1.02, "kv_fraction_prompt": frac,
                           "bytes_per_token": 3072 * frac, "tokens_per_s": 400.0, "chunks": 100, "scored": 25600}
        cases = []
        for L in lengths:
            for d in depths:
                for _ in range(2 if rich else 1):
                    p = max(0.0, min(1.0, 1.0 - kl * (0.6 + L / 1000) * (1.2 - d)))
                    cases.append([L, d, 1 if rnd.random() < p else 0, frac])
        ok = sum(c[2] for c in cases)
        r["passkey"] = {"accuracy": ok / len(cases), "correct": ok, "n": len(cases), "kv_fraction": frac,
                        "by_length": {}, "by_depth": {}, "cases": cases}
        if f < 0 or f == 0.25:
            r["speed"] = {"contexts": [
                {"ctx": c, "prefill_tokens_per_s": 2000.0 / (1 + c / 8192) * (0.8 + 0.4 * rnd.random()),
                 "decode_tokens_per_s": 400.0 / (1 + frac * c / 4096), "kv_bytes": int(3072 * frac * c),
                 "kv_fraction": frac, "kv_bytes_reserved": int(3072 * frac * c * 1.05)} for c in ctxs]}
        return r

    rows = [row("full", -1.0, 1.0)]
    for m in per:
        for f in fractions:
            rows.append(row(m, f, f * (1.0 + 0.01 * rnd.random())))
    for m, f in fixed_m.items():
        rows.append(row(m, -1.0, f))
    if rich:  # a task may be missing from a row
        del rows[3]["passkey"]
        del rows[-1]["perplexity"]
    spec = {"name": "synthetic", "model": "../shared/models/synthetic-f32.gguf", "text": "../shared/data/valid.txt",
            "profile": "results/profiles/synthetic.dkv", "routers": {f"{f:g}": f"results/profiles/router-{f:g}.dkv"
                                                                       for f in fractions},
            "fractions": fractions, "methods": ["full"] + per + list(fixed_m),
            "tasks": ["perplexity", "passkey", "speed"],
            "ppl_ctx": 512, "ppl_chunks": 100, "decode_batch": 16,
            "passkey": {"lengths": lengths, "depths": depths, "per_cell": 2 if rich else 1, "seed": 1, "n_predict": 8},
            "speed_ctx": ctxs, "speed_fractions": [0.25], "speed_decode": 32}
    folder = os.path.join(root, "synthetic")
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "summary.json"), json.dumps({"spec": spec, "rows": rows}, indent=1))
    atomic_write(os.path.join(folder, "config.json"), json.dumps(spec, indent=1))
    training = []
    if rich:
        for tag, tgt in [("0.5", 0.5), ("0.25", 0.25), ("0.25-bases", 0.25), ("0.125", 0.125), ("0.0625", 0.0625)]:
            d = os.path.join(root, f"train-router-{tag}")
            os.makedirs(d, exist_ok=True)
            cmd = ["build/dynakv", "train-router", "--target", f"{tgt:g}", "--steps", "300"]
            atomic_write(os.path.join(d, "config.json"), json.dumps({"command": cmd, "seconds": 400 + 50 * tgt}))
            atomic_write(os.path.join(d, "output.txt"),
                         f"trained 300 steps (from step 0) in 400.0 s; calibrated fraction {tgt:.4f} "
                         f"(target {tgt:g})\n")
            log = []
            for s in range(300):
                kl = (0.25 / tgt) * (0.4 + 0.6 * math.exp(-s / 60)) * (1 + 0.3 * rnd.gauss(0, 1) ** 2)
                fr = tgt * (1 + 0.15 * math.exp(-s / 40)) + 0.01 * tgt * rnd.gauss(0, 1)
                log.append(json.dumps({"step": s, "loss": kl + 0.5, "kl": kl, "fraction": fr}))
            atomic_write(os.path.join(d, "log.jsonl"), "\n".join(log) + "\n")
            training.append(d)
        os.makedirs(os.path.join(root, "calibrate"), exist_ok=True)
        atomic_write(os.path.join(root, "calibrate", "config.json"), json.dumps({"command": [], "seconds": 44.9}))
        # scripts/weights_bench.py's summary: two weight types, one of them missing a row.
        names = {"f32": "m-f32", "q4_k_m": "m-q4_k_m"}
        idle = {f"{ph}|{names[t]}|{th}|{c}": {"mean": 1000.0 * th * (2 if t == "q4_k_m" else 1), "stddev": 5.0}
                for ph in ("prefill", "decode") for t in names for th in (1, 2) for c in (128, 512)}
        del idle["decode|m-q4_k_m|2|512"]
        mem = {t: {"file_bytes": b, "load_rss_bytes": (16 << 20) + b, "generate_rss_bytes": (17 << 20) + b,
                   "perplexity_rss_bytes": (50 << 20) + b} for t, b in (("f32", 27 << 20), ("q4_k_m", 4 << 20))}
        os.makedirs(os.path.join(root, "weights"), exist_ok=True)
        atomic_write(os.path.join(root, "weights", "summary.json"), json.dumps({
            "models": names, "baseline": "f32", "command": "scripts/weights_bench.py", "date": "today", "cpu": "cpu",
            "cores": 2, "reps": 3, "busy": 2, "idle": idle, "loaded": {k: v for k, v in idle.items() if "|512" in k},
            "v1": {"decode|v1-f32|1|128": {"mean": 700.0}}, "memory": mem,
            "llama_bench_readme": {"v1-f32|1": {"pp128": 4000.0, "pp512": 3000.0, "tg128": 350.0}},
            "program_rss_bytes": 16 << 20, "kv_bytes_per_token": 3072,
            "rss_commands": {"generate": "dynakv generate"}}))
    return training


def check(keep):
    """Builds every plot and the markdown from synthetic data (a rich case and a minimal one);
    returns the list of problems."""
    problems = []
    base = keep or tempfile.mkdtemp(prefix="dynakv-report-check-")
    try:
        for rich in (True, False):
            root = os.path.join(base, "rich" if rich else "minimal")
            if os.path.exists(root):
                shutil.rmtree(root)
            training = synthetic(root, rich)
            a = parse([
                "--results", root, "--name", "synthetic", "--out", os.path.join(root, "docs", "results.md"),
                "--plots", os.path.join(root, "docs", "plots")] + (["--training"] + training if training else []))
            names_ = report(a, "scripts/report.py --check")
            svgs = {}
            for n in names_:
                for ext in ("png", "svg"):
                    p = os.path.join(a.plots, f"{n}.{ext}")
                    if not os.path.exists(p) or os.path.getsize(p) < 1000:
                        problems.append(f"{p}: missing or empty")
                    elif ext == "svg":
                        svgs[p] = open(p, "rb").read()
            if rich and TRAINING_PLOT not in names_:
                problems.append("training_curves not made")
            md = open(a.out).read() if os.path.exists(a.out) else ""
            for want in ["# Results", "Generated by scripts/report.py from", "## Quality", "## Who wins where",
                         "Regenerate: `"] + (["## Speed", "## Router training", "**", "## Weights as stored",
                                             "| q4_k_m | 4.00 |", "2000 (2.00x)", "700 / 350 = 2.00x"] if rich else []):
                if want not in md:
                    problems.append(f"{a.out}: '{want}' missing")
            for img in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
                if not os.path.exists(os.path.join(os.path.dirname(a.out), img)):
                    problems.append(f"{a.out}: image {img} not found")
            if rich:  # deterministic output: a second run writes the same SVGs
                report(a, "scripts/report.py --check")
                for p, old in svgs.items():
                    if open(p, "rb").read() != old:
                        problems.append(f"{p}: differs between two runs")
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return problems


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="brown-kjv-llama-6M-v2", help="results/<name>/summary.json (default %(default)s)")
    ap.add_argument("--results", default=None, help="folder of the eval results (default results)")
    ap.add_argument("--training", nargs="+", default=None, metavar="DIR",
                    help="router training folders (results/train-router-*/); a quoted glob is expanded")
    ap.add_argument("--calibration", default=None, metavar="DIR",
                    help="calibration folder with config.json (default <results>/calibrate, if present)")
    ap.add_argument("--heatmap-fraction", default="0.25",
                    help="target fraction of the passkey heatmap's methods (default 0.25; 'all': every run)")
    ap.add_argument("--combo", default="router+snapkv", help="method described near 6 %% (default %(default)s)")
    ap.add_argument("--out", default=None, help="markdown page (default docs/results.md)")
    ap.add_argument("--plots", default=None, help="plot folder (default docs/plots)")
    ap.add_argument("--check", action="store_true", help="self-check on synthetic data in a temporary folder")
    ap.add_argument("--keep", default=None, metavar="DIR", help="with --check: write into DIR and keep it")
    a = ap.parse_args(argv)
    a.results = a.results or os.path.join(ROOT, "results")
    a.out = a.out or os.path.join(ROOT, "docs", "results.md")
    a.plots = a.plots or os.path.join(ROOT, "docs", "plots")
    if a.heatmap_fraction != "all":
        try:
            if not float(a.heatmap_fraction) > 0:
                raise ValueError
        except ValueError:
            ap.error("--heatmap-fraction: a positive fraction or 'all'")
    return a


def main():
    args = parse(sys.argv[1:])
    if args.check:
        problems = check(args.keep)
        for p in problems:
            print(f"report.py --check: {p}", file=sys.stderr)
        print("report.py --check: " + ("FAILED" if problems else "ok"), file=sys.stderr)
        return 1 if problems else 0
    command = shlex.join(["scripts/report.py"] + sys.argv[1:])
    made = report(args, command)
    print(f"wrote {args.out} and {len(made)} plots (PNG and SVG) in {args.plots}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
