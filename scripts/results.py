#!/usr/bin/env python3
"""Regenerates docs/results.md: DynaKV quality and memory on the evaluation model.

Calibrates a profile on training-domain text (if missing), then for each rank policy and cache
fraction runs `dynakv perplexity --kl-divergence` on held-out text and tabulates perplexity,
KL divergence from the fp16 full cache, top-1 agreement and measured bytes per token. Every
run's configuration and raw output are saved under results/<config>/ (config.json, output.txt).

  scripts/results.py [--model M] [--calib T] [--valid T] [--ctx 512] [--chunks 100] [--threads 2]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRACTIONS = [1.0, 0.5, 0.25, 0.125, 0.0625]
POLICIES = ["uniform", "energy"]


def atomic_write(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(cmd):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"results.py: command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    return p.stdout, time.time() - t0


def grab(pattern, text):
    m = re.search(pattern, text, re.M)
    if not m:
        sys.exit(f"results.py: '{pattern}' not found in output:\n{text}")
    return [float(g) for g in m.groups()]


def bench_table(path):
    """Markdown table of a Google Benchmark JSON (mean of repetitions), with the ratio to the full cache."""
    with open(path) as f:
        data = json.load(f)
    means = [b for b in data["benchmarks"] if b.get("aggregate_name", "mean") == "mean"]
    rows, base = [], {}
    for b in means:
        name = b["run_name"] if "run_name" in b else b["name"]
        kind, spec, rest = name.split("/", 2)
        args = dict(p.split(":") for p in rest.split("/") if ":" in p)
        key = (kind, args.get("threads"), args.get("ctx"))
        if spec == "full":
            base[key] = b["tok/s"]
        rows.append((kind, spec, args.get("threads"), args.get("ctx"), b["tok/s"], b["attn_us/tok"], b["kv_B/tok"], key))
    ctx = data.get("context", {})
    out = ["", f"## Speed: `{os.path.basename(path)}`", "",
           f"`scripts/bench.sh` on {ctx.get('num_cpus', '?')} CPUs at {ctx.get('mhz_per_cpu', '?')} MHz, "
           f"{ctx.get('date', '')}; mean of the repetitions. Ratio = tokens/s over the full fp16 cache's "
           "in the same run, same phase, threads and context.", "",
           "| phase | cache | threads | ctx | tokens/s | ratio vs full | attention us/token | KV bytes/token |",
           "|---|---|---|---|---|---|---|---|"]
    for kind, spec, th, cx, tps, attn, bpt, key in rows:
        ratio = tps / base[key] if key in base else float("nan")
        out.append(f"| {kind} | {spec} | {th} | {cx} | {tps:.0f} | {ratio:.2f} | {attn:.1f} | {bpt:.0f} |")
    return out + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dynakv", default=os.path.join(ROOT, "build", "dynakv"))
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", "data", "brown-kjv-llama-6M-f32.gguf"))
    ap.add_argument("--calib", default=os.path.join(ROOT, "..", "shared", "data", "calib.txt"))
    ap.add_argument("--valid", default=os.path.join(ROOT, "..", "shared", "data", "valid.txt"))
    ap.add_argument("--profile", default=os.path.join(ROOT, "results", "brown-kjv-llama-6M.dkv"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=100, help="chunks of valid text scored (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse results/<config>/config.json when its command is unchanged (re-tabulate only)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results.md"))
    ap.add_argument("--bench", nargs="*", default=[os.path.join(ROOT, "results", f) for f in
                                                   ("bench-engine.json", "bench-dynakv.json")],
                    help="Google Benchmark JSON files from scripts/bench.sh to tabulate (skipped if missing)")
    a = ap.parse_args()
    for path in (a.calib, a.valid, a.model, a.dynakv):
        if not os.path.exists(path):
            sys.exit(f"results.py: {path} not found")
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)

    calib_cmd = [a.dynakv, "calibrate", "-m", a.model, "-f", a.calib, "-c", str(a.ctx), "-o", a.profile,
                 "-t", str(a.threads)]
    if not os.path.exists(a.profile):
        _, secs = run(calib_cmd)
        print(f"calibrated {a.profile} in {secs:.0f} s", file=sys.stderr)

    base = [a.dynakv, "perplexity", "-m", a.model, "-f", a.valid, "-c", str(a.ctx), "-t", str(a.threads), "-q"]
    if a.chunks > 0:
        base += ["--chunks", str(a.chunks)]
    rows = []
    configs = [("full (fp16)", [], "full-f16", None)]
    for policy in POLICIES:
        for frac in FRACTIONS:
            configs.append((policy, ["--kv", "dynakv", "--profile", a.profile, "--rank-policy", policy,
                                     "--kv-budget", str(frac), "--kl-divergence"], f"dynakv-{policy}-{frac}", frac))
    for label, extra, name, frac in configs:
        cmd = base + extra
        folder = os.path.join(ROOT, "results", name)
        saved = os.path.join(folder, "config.json")
        if a.reuse and os.path.exists(saved):
            with open(saved) as f:
                old = json.load(f)
            if old.get("command") == cmd:
                rows.append({k: v for k, v in old.items() if k != "command"})
                continue
        out, secs = run(cmd)
        ppl, err = grab(r"^PPL = ([\d.]+) \+/- ([\d.]+)", out)
        kv_frac, = grab(r"^KV fraction = ([\d.]+)", out)
        bpt, = grab(r"^KV bytes/token = ([\d.]+)", out)
        kl, kl_err, top1 = (grab(r"^KL = ([\d.]+) \+/- ([\d.]+)", out) + grab(r"^same top-1 = ([\d.]+)", out)
                            if "--kl-divergence" in extra else (0.0, 0.0, 1.0))
        rows.append(dict(label=label, target=frac, ppl=ppl, ppl_err=err, kl=kl, kl_err=kl_err, top1=top1,
                         fraction=kv_frac, bytes_per_token=bpt, seconds=secs))
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, "config.json"), json.dumps({"command": cmd, **rows[-1]}, indent=2) + "\n")
        atomic_write(os.path.join(folder, "output.txt"), out)
        print(f"{name}: PPL {ppl:.3f} KL {kl:.4f} fraction {kv_frac:.4f} ({secs:.0f} s)", file=sys.stderr)

    chunks = "all" if a.chunks == 0 else str(a.chunks)
    lines = [
        "# Results",
        "",
        "Generated by `scripts/results.py` (do not edit by hand). Model: "
        f"`{os.path.basename(a.model)}`; profile calibrated with `{' '.join(os.path.basename(x) if os.sep in x else x for x in calib_cmd[1:])}` "
        f"on training-domain text; measured on held-out `{os.path.basename(a.valid)}` with -c {a.ctx}, "
        f"{chunks} chunks (second half of each chunk scored, as llama.cpp's perplexity tool).",
        "",
        "KL is the mean per-token KL(full fp16 cache || tested cache) in nats, with its standard error; "
        "top-1 is how often both caches' most likely next token agree. The fraction is measured: "
        "stored bytes (latents and per-token metadata) / fp16 full-cache bytes; bytes/token counts all layers.",
        "",
        "| policy | target fraction | measured fraction | bytes/token | PPL | KL (nats) | top-1 agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']:g}"
        lines.append(f"| {r['label']} | {target} | {r['fraction']:.4f} | {r['bytes_per_token']:.1f} | "
                     f"{r['ppl']:.3f} +/- {r['ppl_err']:.3f} | {r['kl']:.4f} +/- {r['kl_err']:.4f} | {r['top1']:.4f} |")
    lines += ["", f"Regenerate: `scripts/results.py --ctx {a.ctx} --chunks {a.chunks} --threads {a.threads}`", ""]
    for path in a.bench:
        if os.path.exists(path):
            lines += bench_table(path)
    atomic_write(a.out, "\n".join(lines))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
