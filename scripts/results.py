#!/usr/bin/env python3
"""Regenerates docs/results.md: DynaKV's learned router against the uniform and energy rank
policies on the evaluation model, at equal measured cache bytes.

Steps (each one's command, configuration and raw output are kept under results/<name>/, with
paths relative to the repository; a step whose saved command is unchanged is skipped, so a
rerun only re-tabulates unless --force):
  1. calibrate a profile on ../shared/data/calib.txt (timed);
  2. train a router per target fraction (0.5, 0.25, 0.125, 0.0625) on calib.txt plus the
     retrieval documents of calib-recall.txt (timed), and one with --train-bases at 0.25;
  3. perplexity, KL from the full cache and top-1 agreement on held-out valid.txt (-c 512,
     100 chunks) for full, uniform, energy and router at each fraction (--kv-budget F);
  4. passkey retrieval (30 haystacks of valid.txt, 150-500 words, depths 0.1-0.9) at each fraction;
  5. a rank map of a paragraph of valid.txt (docs/rankmap.html).

  scripts/results.py [--threads 2] [--force] [--only NAME,...]
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DYNAKV = "build/dynakv"
MODEL = "../shared/models/brown-kjv-llama-6M-v2-f32.gguf"
CALIB = "../shared/data/calib.txt"
RECALL = "../shared/data/calib-recall.txt"
VALID = "../shared/data/valid.txt"
PROFILES = "results/profiles"
BASE = f"{PROFILES}/brown-kjv-llama-6M-v2.dkv"
FRACTIONS = [0.5, 0.25, 0.125, 0.0625]
POLICIES = ["uniform", "energy", "router"]


def atomic_write(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Runner:
    def __init__(self, force, only):
        self.force, self.only = force, only

    def run(self, name, cmd, outputs=()):
        """Runs cmd (relative paths, cwd = repository) unless results/<name>/ holds the same command
        and its outputs exist. Returns (stdout, seconds)."""
        folder = os.path.join(ROOT, "results", name)
        saved = os.path.join(folder, "config.json")
        skip = not self.force and (self.only is None or name not in self.only)
        if skip and os.path.exists(saved) and all(os.path.exists(os.path.join(ROOT, o)) for o in outputs):
            with open(saved) as f:
                old = json.load(f)
            if old.get("command") == cmd:
                with open(os.path.join(folder, "output.txt")) as f:
                    return f.read(), old["seconds"]
        print(f"[results] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.time()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        secs = time.time() - t0
        if p.returncode != 0:
            sys.exit(f"results.py: {name} failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, "output.txt"), p.stdout)
        atomic_write(saved, json.dumps({"command": cmd, "seconds": round(secs, 2),
                                        "date": datetime.date.today().isoformat()}, indent=2) + "\n")
        return p.stdout, secs


def grab(pattern, text, what):
    m = re.search(pattern, text, re.M)
    if not m:
        sys.exit(f"results.py: '{pattern}' not found in the output of {what}")
    return [float(g) for g in m.groups()]


def perplexity(r, name, extra, threads):
    cmd = [DYNAKV, "perplexity", "-m", MODEL, "-f", VALID, "-c", "512", "--chunks", "100", "-t", str(threads), "-q",
           "--kl-divergence"] + extra
    out, _ = r.run(name, cmd)
    ppl, err = grab(r"^PPL = ([\d.]+) \+/- ([\d.]+)", out, name)
    kl, kl_err = grab(r"^KL = ([\d.]+) \+/- ([\d.]+)", out, name)
    top1, = grab(r"^same top-1 = ([\d.]+)", out, name)
    frac, = grab(r"^KV fraction = ([\d.]+)", out, name)
    tps, = grab(r"^tokens/s = ([\d.]+)", out, name)
    return dict(ppl=ppl, ppl_err=err, kl=kl, kl_err=kl_err, top1=top1, fraction=frac, tps=tps)


def passkey(r, name, extra, threads):
    cmd = [DYNAKV, "passkey", "-m", MODEL, "-f", VALID, "-t", str(threads), "-q", "--json",
           f"results/{name}/passkey.json"] + extra
    os.makedirs(os.path.join(ROOT, "results", name), exist_ok=True)
    out, _ = r.run(name, cmd, outputs=[f"results/{name}/passkey.json"])
    acc, right, total = grab(r"^accuracy = ([\d.]+) \((\d+) of (\d+)\)", out, name)
    frac, = grab(r"^KV fraction = ([\d.]+)", out, name)
    return dict(acc=acc, right=int(right), total=int(total), fraction=frac)


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


def kv_flags(policy, frac, profile):
    return ["--kv", "dynakv", "--profile", profile, "--rank-policy", policy, "--kv-budget", str(frac)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300, help="router training steps")
    ap.add_argument("--force", action="store_true", help="rerun every step")
    ap.add_argument("--only", default=None, help="comma-separated step names to rerun")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results.md"))
    a = ap.parse_args()
    for path in (MODEL, CALIB, RECALL, VALID, DYNAKV):
        if not os.path.exists(os.path.join(ROOT, path)):
            sys.exit(f"results.py: {path} not found (run from a checkout beside ../shared, after the build)")
    os.makedirs(os.path.join(ROOT, PROFILES), exist_ok=True)
    r = Runner(a.force, None if a.only is None else set(a.only.split(",")))
    t = str(a.threads)

    _, calib_secs = r.run("calibrate", [DYNAKV, "calibrate", "-m", MODEL, "-f", CALIB, "-c", "512", "-o", BASE,
                                        "-t", t, "-q"], outputs=[BASE])
    train = {}
    routers = {}
    for frac, bases in [(f, False) for f in FRACTIONS] + [(0.25, True)]:
        tag = f"{frac}" + ("-bases" if bases else "")
        out_profile = f"{PROFILES}/router-{tag}.dkv"
        cmd = [DYNAKV, "train-router", "-m", MODEL, "--profile", BASE, "-f", CALIB, "--docs", RECALL, "--target",
               str(frac), "--steps", str(a.steps), "-o", out_profile, "-t", t, "-q", "--log",
               f"results/train-router-{tag}/log.jsonl"] + (["--train-bases"] if bases else [])
        os.makedirs(os.path.join(ROOT, "results", f"train-router-{tag}"), exist_ok=True)
        out, secs = r.run(f"train-router-{tag}", cmd, outputs=[out_profile])
        train[tag] = dict(seconds=secs, out=out)
        routers[tag] = out_profile

    rows = {"full": perplexity(r, "ppl-full", [], a.threads)}
    keys = {"full": passkey(r, "passkey-full", [], a.threads)}
    for frac in FRACTIONS:
        for policy in POLICIES:
            profile = routers[f"{frac}"] if policy == "router" else BASE
            name = f"{policy}-{frac}"
            rows[name] = perplexity(r, f"ppl-{name}", kv_flags(policy, frac, profile), a.threads)
            keys[name] = passkey(r, f"passkey-{name}", kv_flags(policy, frac, profile), a.threads)
    rows["router-0.25-bases"] = perplexity(r, "ppl-router-0.25-bases", kv_flags("router", 0.25, routers["0.25-bases"]),
                                           a.threads)
    keys["router-0.25-bases"] = passkey(r, "passkey-router-0.25-bases",
                                        kv_flags("router", 0.25, routers["0.25-bases"]), a.threads)
    rankmap_out, _ = r.run("rankmap", [DYNAKV, "rankmap", "-m", MODEL, "--profile", routers["0.25"], "-f", VALID,
                                       "--offset", "200000", "-n", "360", "-o", "docs/rankmap.html", "-t", t],
                           outputs=["docs/rankmap.html"])

    full = rows["full"]
    L = ["# Results", "",
         "Generated by `scripts/results.py` (do not edit by hand); every command, its configuration and raw output "
         "are under `results/<step>/`. Model: `brown-kjv-llama-6M-v2-f32.gguf` (the evaluation model); profile "
         "calibrated on `calib.txt`; routers trained on `calib.txt` plus the retrieval documents of "
         "`calib-recall.txt`; everything measured on held-out `valid.txt`.", "",
         "## Quality at equal cache bytes", "",
         "Perplexity with -c 512 over the first 100 chunks (the second half of each chunk scored, as llama.cpp's "
         "perplexity tool), KL(full fp16 cache || tested cache) per token in nats, and how often both caches' most "
         "likely next token agree. Every compressed row runs with `--kv-budget F` (uniform: its rank; energy: tau "
         "bisected per batch; router: the router trained at F, steered by its budget table); the fraction is "
         "measured: stored bytes (latents and metadata) over the fp16 full cache's.", "",
         "| policy | target | measured fraction | PPL | PPL / full | KL (nats) | top-1 agree |",
         "|---|---|---|---|---|---|---|",
         f"| full (fp16) | - | 1.0000 | {full['ppl']:.3f} +/- {full['ppl_err']:.3f} | 1.000 | 0 | 1.0000 |"]
    for frac in FRACTIONS:
        for policy in POLICIES:
            x = rows[f"{policy}-{frac}"]
            L.append(f"| {policy} | {frac:g} | {x['fraction']:.4f} | {x['ppl']:.3f} +/- {x['ppl_err']:.3f} | "
                     f"{x['ppl'] / full['ppl']:.3f} | {x['kl']:.4f} +/- {x['kl_err']:.4f} | {x['top1']:.4f} |")
    x = rows["router-0.25-bases"]
    L += ["", "Trained bases (`train-router --train-bases`: the router and a Cayley rotation of each PCA basis, with "
          "the means), at 0.25:", "",
          "| policy | target | measured fraction | PPL | PPL / full | KL (nats) | top-1 agree |", "|---|---|---|---|---|---|---|",
          f"| router + trained bases | 0.25 | {x['fraction']:.4f} | {x['ppl']:.3f} +/- {x['ppl_err']:.3f} | "
          f"{x['ppl'] / full['ppl']:.3f} | {x['kl']:.4f} +/- {x['kl_err']:.4f} | {x['top1']:.4f} |"]
    L += ["", "## Passkey retrieval", "",
          "Greedy answers to a key hidden in haystacks of valid.txt (`dynakv passkey`: 150, 300 and 500 words, the "
          "key at depths 0.1, 0.3, 0.5, 0.7, 0.9, 2 haystacks each: 30 cases; exact match of the digits). The "
          "fraction is measured after the prompt.", "",
          "| policy | " + " | ".join(f"{f:g}" for f in FRACTIONS) + " |", "|---|" + "---|" * len(FRACTIONS),
          f"| full | " + " | ".join(f"{keys['full']['right']}/{keys['full']['total']}" for _ in FRACTIONS) + " |"]
    for policy in POLICIES:
        L.append(f"| {policy} | " + " | ".join(
            f"{keys[f'{policy}-{f}']['right']}/{keys[f'{policy}-{f}']['total']} ({keys[f'{policy}-{f}']['fraction']:.3f})"
            for f in FRACTIONS) + " |")
    k = keys["router-0.25-bases"]
    L += [f"| router + trained bases | - | {k['right']}/{k['total']} ({k['fraction']:.3f}) | - | - |"]
    L += ["", "## Cost of calibration and training", "",
          f"On this machine ({os.cpu_count()} cores, -t {a.threads}): calibration {calib_secs:.0f} s "
          f"(`calibrate -c 512` over calib.txt).", "",
          "| router | training wall time | steps | final KL (mean of the last 20 steps) | calibrated fraction |",
          "|---|---|---|---|---|"]
    for tag, tr in train.items():
        log = [json.loads(l) for l in open(os.path.join(ROOT, "results", f"train-router-{tag}", "log.jsonl"))]
        kl = sum(s["kl"] for s in log[-20:]) / min(20, len(log))
        cal, = grab(r"calibrated fraction ([\d.]+)", tr["out"], f"train-router-{tag}")
        L.append(f"| {tag} | {tr['seconds']:.0f} s | {len(log)} | {kl:.4f} | {cal:.4f} |")
    L += ["", "## Rank map", "",
          "`docs/rankmap.html` (open it in a browser; no network needed): a paragraph of valid.txt coloured by the "
          "ranks the router trained at 0.25 gives each token. Its summary:", "", "```", rankmap_out.strip(), "```", "",
          f"Regenerate: `scripts/results.py --threads {a.threads}` (add `--force` to rerun every step).", ""]
    for name in ("bench-engine.json", "bench-dynakv.json"):
        path = os.path.join(ROOT, "results", name)
        if os.path.exists(path):
            L += bench_table(path)
    atomic_write(a.out, "\n".join(L))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
