#!/usr/bin/python3
"""Writes docs/results-v3.md from results/eval-llama-27M-v3/summary.json (scripts/results_v3.sh):
every method of the v3 evaluation with perplexity, KL and top-1 (3072 tokens compressed, 1024
scored), key retrieval among distractors and record lookups, with breakdowns by prompt length and
depth, the step times of results/v3-steps.txt, and the speed tables of results/speed-v3/ (v3 at
4k/16k/32k) and results/speed-l3-8b-q4_0/ (a Llama-3-8B-shaped random-weight model, 8 layers, q4_0
weights, at 8k/32k), both from `scripts/results_v3.sh`; and the rank x precision section (tc
latents) from results/eval-llama-27M-v3-tc/summary.json, whose full and q4_0-h runs are the same
runs as the main evaluation's (same configuration, reused), with the ablation against the main
evaluation's router variants.

  scripts/report_v3.py [--summary FILE] [--out FILE]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (the plot style, colours and axes of docs/results.md)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cell(row, task, key, fmt):
    v = row.get(task, {}).get(key)
    return "-" if v is None else fmt % v


def retrieval(row, task):
    r = row.get(task)
    return "-" if r is None else f"{r['correct']}/{r['n']} ({r['accuracy']:.3f})"


def breakdown(rows, task, key, title):
    keys = sorted({k for row in rows if task in row for k in row[task][key]}, key=float)
    if not keys:
        return []
    out = [f"**{title}** (accuracy)", "", "| method | " + " | ".join(keys) + " |",
           "|---|" + "---|" * len(keys)]
    for row in rows:
        if task in row:
            out.append(f"| {label(row)} | " + " | ".join(
                f"{row[task][key][k]:.2f}" if k in row[task][key] else "-" for k in keys) + " |")
    return out + [""]


def label(row):
    f = row["fraction"]
    return row["method"] + ("" if f < 0 else f"@{f:g}")


def speed_table(path, title, what):
    """Decode/prefill speed per method and context, as ratios to the full cache of the same run,
    with bytes read per decoded token against the machine's read bandwidth measured in that run."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        s = json.load(f)
    rows = [r for r in s["rows"] if "speed" in r]
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is None:
        return []
    base = {c["ctx"]: c for c in full["speed"]["contexts"]}
    bw = full["speed"]["machine_read_gb_per_s"]
    spec = s["spec"]
    fill = spec.get("speed_fill", 0)
    out = [f"### {title}", "",
           f"{what} `dynakv eval --tasks speed`, 2 threads; "
           + (f"each context filled by a {fill}-token prefill replayed through the cache (`--speed-fill {fill}`), "
              "prefill speed measured on those tokens; " if fill else "")
           + f"machine read bandwidth in the same run {bw:.1f} GB/s. Ratios are to the full fp16 cache of the same "
           "run; `read` is weights plus the cache as stored, per decoded token, and the rate that implies.", "",
           "| method | fraction | context | decode tok/s | x full | prefill tok/s | x full | read/token | GB/s (of bandwidth) | resident |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for c in r["speed"]["contexts"]:
            b = base.get(c["ctx"])
            if b is None:
                continue
            out.append(f"| {label(r)} | {c['kv_fraction']:.4f} | {c['ctx']} | {c['decode_tokens_per_s']:.2f} | "
                       f"{c['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f} | {c['prefill_tokens_per_s']:.0f} | "
                       f"{c['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f} | "
                       f"{c['bytes_read_per_token'] / 1e6:.0f} MB | {c['read_gb_per_s']:.1f} "
                       f"({100 * c['read_gb_per_s'] / bw:.0f} %) | {c['resident_bytes'] / 2**20:.0f} MiB |")
    return out + [""]


def speed_targets(path):
    """The issues' decode targets at 32k on the 8B shape, from the same run: DynaKV at 12.5 % at
    least 1.5x the full cache and no slower than the q4_0 cache (issue 15, each DynaKV method), rank
    x precision (tc) at 12.5 % no slower than q4_0 (issue 16)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [r for r in json.load(f)["rows"] if "speed" in r]

    def at(method, fraction, ctx=32768):
        for r in rows:
            if r["method"] == method and (fraction is None or abs(r["fraction"] - fraction) < 1e-9):
                for c in r["speed"]["contexts"]:
                    if c["ctx"] == ctx:
                        return c["decode_tokens_per_s"]
        return None

    full, q4 = at("full", None), at("q4_0", None)
    if full is None or q4 is None:
        return []
    out = ["**Decode targets at 32k** (same run; full cache %.2f tok/s, q4_0 cache %.2f):" % (full, q4), ""]
    for m in ("uniform", "tc"):
        v = at(m, 0.125)
        if v is not None:
            out.append(f"- {m}@0.125: {v:.2f} tok/s = {v / full:.2f}x full (target >= 1.5x), "
                       f"{v / q4:.2f}x q4_0 (target >= 1x)")
    return out + [""]


def plots(rows, plots_dir):
    """docs/plots/v3_quality.{png,svg}: KL from the full cache, key retrieval and record lookups
    against the measured cache fraction, one line per method over its fractions, the fixed-size
    methods as single points, the full cache's retrieval as a dashed line."""
    _, plt = report.mpl()
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.6))
    full = next((r for r in rows if r["method"] == "full"), None)
    methods = []
    for r in rows:
        if r["method"] != "full" and r["method"] not in methods:
            methods.append(r["method"])
    panels = [("perplexity", "kl", "KL from the full cache (log)"), ("keys", "accuracy", "keys among distractors"),
              ("records", "accuracy", "record lookups")]
    xs = []
    for ax, (task, key, title) in zip(axes, panels):
        ys = []
        for m in methods:
            pts = sorted((r["perplexity"]["kv_fraction_prompt"], r[task][key]) for r in rows
                         if r["method"] == m and task in r and "perplexity" in r)
            if not pts:
                continue
            colour, marker = report.style(m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour, label=m,
                    linestyle="-" if len(pts) > 1 else "none", markersize=6)
            xs += [p[0] for p in pts]
            ys += [p[1] for p in pts]
        if task != "perplexity" and full is not None and task in full:
            ax.axhline(full[task][key], color="black", linestyle="--", linewidth=1, label="full")
            ax.set_ylim(-0.03, 1.03)
        if task == "perplexity":
            report.log_y(ax, ys)
        report.fraction_axis(ax, xs)
        ax.set_xlabel("measured cache fraction (log)")
        ax.set_title(title)
    handles, labels = axes[2].get_legend_handles_labels()
    report.legend_outside(axes[2], handles, labels)
    fig.suptitle("eval-llama-27M-v3, held-out text: 3072 tokens compressed, 1024 scored; 60 retrievals per point")
    fig.tight_layout()
    report.save(fig, plots_dir, "v3_quality")


def tc_section(main_rows, path, plots_dir):
    """Rank x precision: every tc run, the ablation at each fraction (rank-only router, router +
    int8, router + int4, router + SnapKV, uniform tc, router tc, router tc + SnapKV) and the issue's
    targets checked against the same runs' full cache and q4_0-h."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        tc_rows = json.load(f)["rows"]
    by = {label(r): r for r in main_rows}
    by.update({label(r): r for r in tc_rows})
    full, q4 = by.get("full"), by.get("q4_0-h")
    out = ["## Rank x precision (`--kv-dtype tc`)", "",
           "Transform-coded latents (docs/method.md section 7, layout in docs/kv_layout.md): a token's level "
           "is a number of coordinates and a width per group of 32, the least-distortion code at its bytes "
           "per layer; `tc` is uniform rank with tc storage, `router-tc` the router trained with tc latents "
           "(`train-router` default), `router-tc+snapkv` that router with SnapKV keeping sqrt(F) of the "
           "tokens at sqrt(F) of the bytes. Same protocol as above; from "
           "`results/eval-llama-27M-v3-tc/summary.json`.", "",
           "| method | measured fraction | PPL | KL | top-1 | keys | records |", "|---|---|---|---|---|---|---|"]
    order = ["router", "router-int8", "router-int4", "router+snapkv", "tc", "router-tc", "router-tc+snapkv"]
    fractions = sorted({r["fraction"] for r in tc_rows if r["fraction"] > 0}, reverse=True)
    fixed = [r for r in (full, q4) if r is not None]
    for row in fixed + [by[f"{m}@{f:g}"] for f in fractions for m in order if f"{m}@{f:g}" in by]:
        lines_row = (f"| {label(row)} | {cell(row, 'perplexity', 'kv_fraction_prompt', '%.4f')} | "
                     f"{cell(row, 'perplexity', 'ppl', '%.3f')} | {cell(row, 'perplexity', 'kl', '%.4f')} | "
                     f"{cell(row, 'perplexity', 'top1', '%.4f')} | {retrieval(row, 'keys')} | "
                     f"{retrieval(row, 'records')} |")
        out.append(lines_row)
    out.append("")
    if full is not None and q4 is not None:
        kq = q4["perplexity"]["kl"]
        out += [f"**Targets** (q4_0-h: KL {kq:.4f} at {q4['perplexity']['kv_fraction_prompt']:.4f}; full: keys "
                f"{full['keys']['correct']}/60, records {full['records']['correct']}/60, PPL "
                f"{full['perplexity']['ppl']:.3f}); the best tc method at each fraction:", ""]
        goals = {0.25: (1.0, 1.0, None), 0.125: (2.0, 0.95, None), 0.0625: (None, 0.94, 1.10)}
        for f in fractions:
            cands = [by[f"{m}@{f:g}"] for m in ("tc", "router-tc", "router-tc+snapkv") if f"{m}@{f:g}" in by]
            if not cands:
                continue
            kl_mult, keep, ppl_mult = goals.get(f, (None, None, None))
            best = min(cands, key=lambda r: r["perplexity"]["kl"])
            ret = max(cands, key=lambda r: r["keys"]["accuracy"] + r["records"]["accuracy"])
            parts = [f"KL {best['perplexity']['kl']:.4f} ({label(best)}, {best['perplexity']['kl'] / kq:.2f}x q4_0-h"
                     + (f"; target <= {kl_mult:g}x" if kl_mult else "") + ")"]
            parts.append(f"retrieval {ret['keys']['correct']}/{full['keys']['correct']} keys and "
                         f"{ret['records']['correct']}/{full['records']['correct']} records of the full cache's "
                         f"({label(ret)}" + (f"; target >= {keep:.0%}" if keep else "") + ")")
            pp = min(cands, key=lambda r: r["perplexity"]["ppl"])
            parts.append(f"PPL {pp['perplexity']['ppl'] / full['perplexity']['ppl']:.3f}x full ({label(pp)}"
                         + (f"; target <= {ppl_mult:.2f}x" if ppl_mult else "") + ")")
            out.append(f"- {f:g}: " + "; ".join(parts))
        out.append("")
    logs = [(float(f), os.path.join(ROOT, f"results/v3-train-router-tc-{f}.jsonl")) for f in ("0.25", "0.125", "0.0625")]
    logs = [(t, p) for t, p in logs if os.path.exists(p)]
    if logs:
        training_plot(logs, plots_dir, "v3_training_tc", "Router training with tc latents on v3")
        out += ["![router training, tc latents](plots/v3_training_tc.png)", ""]
    return out


def training_plot(paths, plots_dir, name="v3_training", title="Router training on v3 (calib-v3.txt + calib-recall-v3.txt)"):
    """docs/plots/v3_training.{png,svg}: each router's training KL per step (and its running mean)."""
    _, plt = report.mpl()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for target, path in paths:
        with open(path) as f:
            steps = [json.loads(line) for line in f if line.strip()]
        if not steps:
            continue
        kl = [st["kl"] for st in steps]
        mean = [sum(kl[max(0, i - 9):i + 1]) / len(kl[max(0, i - 9):i + 1]) for i in range(len(kl))]
        line, = ax.plot([st["step"] for st in steps], kl, alpha=0.3, linewidth=0.8)
        ax.plot([st["step"] for st in steps], mean, color=line.get_color(), label=f"target {target:g} (mean of 10)")
    ax.set_yscale("log")
    ax.set_xlabel("step (1 sequence of 1024 tokens)")
    ax.set_ylabel("KL from the full cache (training batch)")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    report.save(fig, plots_dir, name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", default=os.path.join(ROOT, "results/eval-llama-27M-v3/summary.json"))
    ap.add_argument("--tc-summary", default=os.path.join(ROOT, "results/eval-llama-27M-v3-tc/summary.json"))
    ap.add_argument("--steps", default=os.path.join(ROOT, "results/v3-steps.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/results-v3.md"))
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and fail unless the page equals docs/results-v3.md "
                         "(the committed page is current with results/)")
    a = ap.parse_args()
    if a.check:
        import subprocess
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "results-v3.md")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--summary", a.summary, "--tc-summary",
                            a.tc_summary, "--steps", a.steps, "--out", out], check=True, stdout=subprocess.DEVNULL)
            with open(out) as f1, open(os.path.join(ROOT, "docs/results-v3.md")) as f2:
                new, old = f1.read().splitlines(), f2.read().splitlines()
        if new != old:
            diff = [f"line {i + 1}:\n  committed: {o}\n  from results/: {n}"
                    for i, (n, o) in enumerate(zip(new, old)) if n != o][:5]
            sys.exit("docs/results-v3.md is not what results/ gives (run scripts/report_v3.py):\n" + "\n".join(diff)
                     + (f"\n({len(new)} lines against {len(old)})" if len(new) != len(old) else ""))
        print("docs/results-v3.md is current")
        return
    with open(a.summary) as f:
        s = json.load(f)
    spec, rows = s["spec"], s["rows"]
    lines = ["# Results on eval-llama-27M-v3 (head size 128, 4k context)", "",
             "Generated by `scripts/report_v3.py` from `results/eval-llama-27M-v3/summary.json`, which "
             "`scripts/results_v3.sh` made (`dynakv eval`, 2 threads, this 2-core machine). Model "
             f"`{spec['model']}`, held-out text `{spec['text']}`.", "",
             f"- Perplexity, KL from the full cache and top-1 agreement: {spec['ppl_chunks']} chunks of "
             f"{spec['ppl_ctx']} tokens, the first {spec['ppl_prompt']} of each a prompt compressed when it ends, "
             f"the last {spec['ppl_ctx'] - spec['ppl_prompt']} scored (decoded in batches of {spec['decode_batch']}).",
             "- keys: a key among 0-2 distractor keys (4 number phrases, and word keys under \"secret word\"); "
             f"haystacks of {', '.join(map(str, spec['keys']['lengths']))} words, depths "
             f"{', '.join(map(str, spec['keys']['depths']))}, {spec['keys']['per_cell']} per cell.",
             "- records: a number looked up among 20-60 records after a haystack of "
             f"{', '.join(map(str, spec['records']['lengths']))} words; the depth is the asked record's place "
             "in the block.", "",
             "| method | measured fraction | PPL | KL | top-1 | keys | records |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        frac = cell(row, "perplexity", "kv_fraction_prompt", "%.4f")
        lines.append(f"| {label(row)} | {frac} | {cell(row, 'perplexity', 'ppl', '%.3f')} | "
                     f"{cell(row, 'perplexity', 'kl', '%.4f')} | {cell(row, 'perplexity', 'top1', '%.4f')} | "
                     f"{retrieval(row, 'keys')} | {retrieval(row, 'records')} |")
    lines.append("")
    lines += breakdown(rows, "keys", "by_tokens", "keys by prompt tokens (bucket upper end)")
    lines += breakdown(rows, "keys", "by_depth", "keys by depth")
    lines += breakdown(rows, "keys", "by_distractors", "keys by distractor count")
    lines += breakdown(rows, "records", "by_tokens", "records by prompt tokens (bucket upper end)")
    lines += breakdown(rows, "records", "by_depth", "records by the asked record's place in the block")
    if os.path.exists(a.steps):
        lines += ["**Calibration and router training** (wall seconds, from results/v3-steps.txt)", ""]
        last = {}  # the latest run of each step
        with open(a.steps) as f:
            for line in f:
                name, secs = line.split()[:2]
                last[name] = (float(secs), line.split(": ", 1)[1].strip())
        for name, (secs, cmd) in last.items():
            lines.append(f"- {name}: {secs:.0f} s (`{cmd}`)")
        if "calibrate" in last:
            for name, (secs, _) in last.items():
                if name.startswith("train-router"):
                    lines.append(f"- calibration + {name}: {(last['calibrate'][0] + secs) / 60:.1f} min")
        lines.append("")
    plots_dir = os.path.join(os.path.dirname(a.out), "plots")
    plots(rows, plots_dir)
    lines += ["![quality against measured fraction](plots/v3_quality.png)", ""]
    logs = [(float(f), os.path.join(ROOT, f"results/v3-train-router-{f}.jsonl")) for f in ("0.25", "0.125", "0.0625")]
    logs = [(t, p) for t, p in logs if os.path.exists(p)]
    if logs:
        training_plot(logs, plots_dir)
        lines += ["![router training](plots/v3_training.png)", ""]
    lines += tc_section(rows, a.tc_summary, plots_dir)
    speed = speed_table(os.path.join(ROOT, "results/speed-l3-8b-q4_0/summary.json"),
                        "Llama-3-8B shape (random weights, 8 of 32 layers, q4_0), 8k and 32k",
                        "`dynakv make-gguf --shape llama3-8b --type q4_0 --layers 8 --ctx 32768`, a profile calibrated on it "
                        "(2 chunks of 512 tokens), then") + \
        speed_targets(os.path.join(ROOT, "results/speed-l3-8b-q4_0/summary.json")) + \
        speed_table(os.path.join(ROOT, "results/speed-v3/summary.json"), "v3 at 4k, 16k and 32k",
                    "v3 (f16 weights; 16k and 32k are past its 4k training context, for speed only),")
    if speed:
        lines += ["## Speed", ""] + speed
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
