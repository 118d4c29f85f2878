#!/usr/bin/python3
"""Regenerates docs/results.md and docs/plots/: every KV method on the evaluation model at equal
cache fractions, DynaKV's learned router among them.

Steps (each one's command, configuration and raw output are kept under results/, with paths
relative to the repository; a step whose saved command is unchanged is skipped, so a rerun only
re-tabulates unless --force):
  1. calibrate a DynaKV profile on ../shared/data/calib.txt (timed);
  2. train a router per target fraction (0.5, 0.25, 0.125, 0.0625) on calib.txt plus the
     retrieval documents of calib-recall.txt (timed), and one with --train-bases at 0.25;
  3. `dynakv eval --config results/eval-spec.json`: perplexity, KL and top-1 agreement on held-out
     valid.txt, passkey retrieval (150 haystacks of valid.txt), speed up to 32k tokens, for every
     method in the spec (its own skip-if-done: results/brown-kjv-llama-6M-v2/);
  4. a rank map of a paragraph of valid.txt (docs/rankmap.html);
  5. scripts/report.py: docs/results.md (with the rank map's summary) and docs/plots/.

  scripts/results.py [--threads 2] [--force] [--only STEP,...] [--steps 300]
"""
import argparse
import datetime
import json
import os
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
NAME = "brown-kjv-llama-6M-v2"
METHODS = ["full", "uniform", "energy", "router", "router-int8", "router-int4", "kivi2", "kivi4", "kivi2-h",
           "kivi4-h", "q8_0", "q4_0", "q8_0-h", "q4_0-h", "snapkv", "streamingllm", "h2o", "router+snapkv"]
# Timed up to 32k tokens. H2O is left out: it accumulates every query's attention weights over the
# whole prompt, O(T^2) work in prefill that makes a 32k prompt take hours on two cores.
SPEED_METHODS = ["full", "uniform", "router", "router-int8", "kivi2", "kivi4", "q8_0", "q4_0", "q4_0-h", "snapkv",
                 "streamingllm", "router+snapkv"]


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
        rerun = self.force or (self.only is not None and name in self.only)
        if not rerun and os.path.exists(saved) and all(os.path.exists(os.path.join(ROOT, o)) for o in outputs):
            with open(saved) as f:
                old = json.load(f)
            if old.get("command") == cmd:
                with open(os.path.join(folder, "output.txt")) as f:
                    return f.read(), old["seconds"]
        print(f"[results] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        os.makedirs(folder, exist_ok=True)
        t0 = time.time()
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        secs = time.time() - t0
        if p.returncode != 0:
            sys.exit(f"results.py: {name} failed ({p.returncode}): {' '.join(cmd)}")
        atomic_write(os.path.join(folder, "output.txt"), p.stdout)
        atomic_write(saved, json.dumps({"command": cmd, "seconds": round(secs, 2),
                                        "date": datetime.date.today().isoformat()}, indent=2) + "\n")
        return p.stdout, secs


def eval_spec(routers, tasks, speed_ctx):
    return {
        "name": NAME, "model": MODEL, "text": VALID, "profile": BASE,
        "routers": {f"{f:g}": path for f, path in routers.items()},
        "fractions": FRACTIONS,
        "methods": METHODS + [{
            # The router trained together with its bases (Cayley rotations of the PCA bases), at 0.25.
            "name": "router-bases", "kv": "dynakv", "fractions": [0.25],
            "flags": {"--profile": f"{PROFILES}/router-0.25-bases.dkv", "--rank-policy": "router",
                      "--kv-budget": "{fraction}"}}],
        "tasks": tasks,
        "ppl_ctx": 512, "ppl_chunks": 100, "decode_batch": 16,
        "passkey": {"lengths": [150, 300, 500], "depths": [0.1, 0.3, 0.5, 0.7, 0.9], "per_cell": 10},
        "speed_ctx": speed_ctx, "speed_fractions": [0.25], "speed_methods": SPEED_METHODS,
        "speed_decode": 64,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300, help="router training steps")
    ap.add_argument("--force", action="store_true", help="rerun every step")
    ap.add_argument("--only", default=None, help="comma-separated step names to rerun")
    ap.add_argument("--tasks", default="perplexity,passkey,speed",
                    help="eval tasks to run now (finished ones are kept: run speed last, on a quiet machine)")
    ap.add_argument("--speed-ctx", default="1024,4096,16384,32768",
                    help="context lengths of the speed task (a 32k prefill takes minutes per method on 2 cores)")
    a = ap.parse_args()
    for path in (MODEL, CALIB, RECALL, VALID, DYNAKV):
        if not os.path.exists(os.path.join(ROOT, path)):
            sys.exit(f"results.py: {path} not found (run from a checkout beside ../shared, after the build)")
    os.makedirs(os.path.join(ROOT, PROFILES), exist_ok=True)
    r = Runner(a.force, None if a.only is None else set(a.only.split(",")))
    t = str(a.threads)

    r.run("calibrate", [DYNAKV, "calibrate", "-m", MODEL, "-f", CALIB, "-c", "512", "-o", BASE, "-t", t, "-q"],
          outputs=[BASE])
    routers = {}
    for frac, bases in [(f, False) for f in FRACTIONS] + [(0.25, True)]:
        tag = f"{frac}" + ("-bases" if bases else "")
        out_profile = f"{PROFILES}/router-{tag}.dkv"
        cmd = [DYNAKV, "train-router", "-m", MODEL, "--profile", BASE, "-f", CALIB, "--docs", RECALL, "--target",
               str(frac), "--steps", str(a.steps), "-o", out_profile, "-t", t, "-q", "--log",
               f"results/train-router-{tag}/log.jsonl"] + (["--train-bases"] if bases else [])
        os.makedirs(os.path.join(ROOT, "results", f"train-router-{tag}"), exist_ok=True)
        r.run(f"train-router-{tag}", cmd, outputs=[out_profile])
        if not bases:
            routers[frac] = out_profile

    spec_path = "results/eval-spec.json"
    atomic_write(os.path.join(ROOT, spec_path), json.dumps(eval_spec(routers, a.tasks.split(","), [int(c) for c in a.speed_ctx.split(",")]), indent=2) + "\n")
    eval_cmd = [DYNAKV, "eval", "--config", spec_path, "-t", t] + (["--force"] if a.force else [])
    print(f"[results] eval: {' '.join(eval_cmd)}", file=sys.stderr, flush=True)
    if subprocess.run(eval_cmd, cwd=ROOT).returncode != 0:
        sys.exit("results.py: dynakv eval failed")

    r.run("rankmap", [DYNAKV, "rankmap", "-m", MODEL, "--profile", routers[0.25], "-f", VALID,
                                       "--offset", "200000", "-n", "360", "-o", "docs/rankmap.html", "-t", t],
                           outputs=["docs/rankmap.html"])
    report = ["scripts/report.py", "--name", NAME, "--training", "results/train-router-*/"]
    if subprocess.run(report, cwd=ROOT).returncode != 0:
        sys.exit("results.py: scripts/report.py failed")
    print("wrote docs/results.md", file=sys.stderr)


if __name__ == "__main__":
    main()
