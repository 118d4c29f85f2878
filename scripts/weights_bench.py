#!/usr/bin/python3
"""Weights as stored: speed and resident memory of each quantized evaluation model against the F32
one, all in one run so that ratios share the machine's noise.

  1. bench/bench_engine over every model: prefill (one batch of ctx tokens from an empty cache) and
     decode (32 single-token steps ending at ctx) tokens/s, full fp16 cache, at 1 and 2 threads and
     contexts 128 / 512 / 1024, repetitions interleaved (--benchmark_enable_random_interleaving).
  2. The same at ctx 512 beside BUSY busy loops (a server's other slots, a shared CI runner).
  3. Resident memory against the file's size: the maximum RSS (os.wait4) of `dynakv info` (loads
     the model: maps the file and checks every block's scales), `dynakv generate` (64 tokens) and
     `dynakv perplexity -c 512` over 8 chunks of valid.txt, per model, and of the program alone
     (`dynakv generate --help`).
  Add --memory-only to redo only this part (it reuses the speed figures of summary.json).
  4. The evaluation model's v1 F32/F16 files at llama-bench's workloads (pp128, pp512; decode near
     ctx 128), for a rough comparison with the llama.cpp figures in the models' README (another run
     on another day: not a same-run ratio; llama.cpp is not installed here).

Writes results/weights/summary.json (read by scripts/report.py: docs/results.md, "Weights as
stored") and the raw Google Benchmark JSON beside it.

  scripts/weights_bench.py [--models DIR] [--reps 3] [--busy 2] [--quick]
Needs build/bench_engine and build/dynakv (release). DIR defaults to ../shared/models, else tests/data
(which has no F32 file of the v2 model; the F16 one is then the baseline).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ["f32", "f16", "q8_0", "q6_k", "q4_k_m", "q4_0"]


def atomic_write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def run_bench(models, ctx, threads, reps, out, busy=0, min_time=None):
    cmd = [os.path.join(ROOT, "build", "bench_engine"), "--model=" + ",".join(models), "--ctx=" + ",".join(map(str, ctx)),
           "--threads=" + ",".join(map(str, threads)), f"--benchmark_repetitions={reps}",
           "--benchmark_enable_random_interleaving=true", "--benchmark_report_aggregates_only=true",
           f"--benchmark_out={out}", "--benchmark_out_format=json"]
    if min_time:
        cmd.append(f"--benchmark_min_time={min_time}")
    loops = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(busy)]
    try:
        print("+ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
              + (f"   (beside {busy} busy loops)" if busy else ""), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    finally:
        for p in loops:
            p.kill()
            p.wait()
    relative_paths(out)
    return parse_bench(out), cmd


def relative_paths(path):
    """Google Benchmark records the executable's absolute path: keep results free of machine paths."""
    with open(path) as f:
        data = json.load(f)
    exe = data.get("context", {}).get("executable", "")
    if exe.startswith(ROOT + os.sep):
        data["context"]["executable"] = os.path.relpath(exe, ROOT)
        atomic_write(path, json.dumps(data, indent=2) + "\n")


def parse_bench(path):
    """{(phase, model, threads, ctx): {"mean": tok/s, "stddev": tok/s}} from aggregate rows."""
    rows = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("run_type") != "aggregate" or b.get("aggregate_name") not in ("mean", "stddev"):
            continue
        name = b["run_name"]  # prefill/<model>/full/threads:T/ctx:C/real_time
        parts = name.split("/")
        phase, model = parts[0], parts[1]
        threads = int(next(p for p in parts if p.startswith("threads:")).split(":")[1])
        ctx = int(next(p for p in parts if p.startswith("ctx:")).split(":")[1])
        rows.setdefault(f"{phase}|{model}|{threads}|{ctx}", {})[b["aggregate_name"]] = b["tok/s"]
    return rows


def llama_bench_readme(models_dir):
    """The llama-bench table of the models' README: {"<model>|<threads>": {"pp128", "pp512", "tg128"}}."""
    path = os.path.join(models_dir, "README.md")
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("brown-kjv") and cells[1].isdigit():
            try:
                out[f"{cells[0]}|{cells[1]}"] = {k: float(v.split("+/-")[0]) for k, v in
                                                 zip(("pp128", "pp512", "tg128"), cells[2:])}
            except ValueError:
                continue
    return out


def max_rss(cmd):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    err = p.stderr.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"weights_bench: {' '.join(cmd)} failed:\n{err}")
    return ru.ru_maxrss * 1024  # Linux: KiB


def measure_memory(models):
    text = os.path.join(ROOT, "tests", "data", "valid.txt")
    memory = {}
    dk = os.path.join(ROOT, "build", "dynakv")
    program_rss = max_rss([dk, "generate", "--help"])  # the program and its libraries, no model
    for t, p in models.items():
        memory[t] = {
            "file_bytes": os.path.getsize(p),
            "load_rss_bytes": max_rss([dk, "info", "-m", p]),  # load: maps the file, checks every scale
            "generate_rss_bytes": max_rss([dk, "generate", "-m", p, "-p", "In the beginning", "-n", "64", "-t", "2"]),
            "perplexity_rss_bytes": max_rss([dk, "perplexity", "-m", p, "-f", text, "-c", "512", "--chunks", "8",
                                             "-t", "2"]),
        }
    return memory, program_rss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = os.path.join(os.path.dirname(ROOT), "shared", "models")
    ap.add_argument("--models", default=shared if os.path.isdir(shared) else os.path.join(ROOT, "tests", "data"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--busy", type=int, default=2, help="busy loops in the loaded run (0: skip it)")
    ap.add_argument("--quick", action="store_true", help="two repetitions, short minimum time (a smoke run)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "weights"))
    ap.add_argument("--memory-only", action="store_true", help="redo the resident memory part only")
    a = ap.parse_args()
    reps = 2 if a.quick else a.reps
    min_time = 0.05 if a.quick else None
    models = {t: os.path.join(a.models, f"brown-kjv-llama-6M-v2-{t}.gguf") for t in TYPES}
    models = {t: p for t, p in models.items() if os.path.exists(p)}
    if "f32" in models:
        models.pop("f16", None)  # the baseline is F32; F16 only stands in where F32 is missing
    if len(models) < 2:
        raise SystemExit(f"weights_bench: fewer than two evaluation model files in {a.models}")
    for exe in ("bench_engine", "dynakv"):
        if not os.access(os.path.join(ROOT, "build", exe), os.X_OK):
            raise SystemExit(f"weights_bench: build/{exe} missing (ninja -C build)")
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    paths = list(models.values())
    summary_path = os.path.join(a.out, "summary.json")
    if a.memory_only:
        old = json.load(open(summary_path))
        old["memory"], old["program_rss_bytes"] = measure_memory(models)
        old["memory_date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        atomic_write(summary_path, json.dumps(old, indent=1, sort_keys=True) + "\n")
        print(f"updated the memory figures of {os.path.relpath(summary_path, ROOT)}", file=sys.stderr)
        return 0
    idle, idle_cmd = run_bench(paths, [128, 512, 1024], [1, 2], reps, os.path.join(a.out, "bench-idle.json"),
                               min_time=min_time)
    loaded, loaded_cmd = ({}, None)
    if a.busy > 0:
        loaded, loaded_cmd = run_bench(paths, [512], [1, 2], reps, os.path.join(a.out, "bench-loaded.json"),
                                       busy=a.busy, min_time=min_time)
    v1 = [os.path.join(a.models, f"brown-kjv-llama-6M-{t}.gguf") for t in ("f32", "f16")]
    v1 = [p for p in v1 if os.path.exists(p)]
    llama_like = {}
    if v1:
        llama_like, _ = run_bench(v1, [128, 512], [1, 2], reps, os.path.join(a.out, "bench-v1.json"), min_time=min_time)
    memory, program_rss = measure_memory(models)
    info = subprocess.run([os.path.join(ROOT, "build", "dynakv"), "info", "-m", models[next(iter(models))]],
                          capture_output=True, text=True).stdout
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "command": "scripts/weights_bench.py" + (" --quick" if a.quick else "") +
                   (f" --reps {a.reps}" if a.reps != 3 and not a.quick else "") + (f" --busy {a.busy}" if a.busy != 2 else ""),
        "models": {t: os.path.basename(p).removesuffix(".gguf") for t, p in models.items()},
        "baseline": "f32" if "f32" in models else "f16",
        "reps": reps, "busy": a.busy, "idle": idle, "loaded": loaded, "v1": llama_like, "memory": memory,
        "llama_bench_readme": llama_bench_readme(a.models), "program_rss_bytes": program_rss,
        "rss_commands": {"generate": "dynakv generate -m M -p 'In the beginning' -n 64 -t 2",
                         "perplexity": "dynakv perplexity -m M -f tests/data/valid.txt -c 512 --chunks 8 -t 2"},
        "kv_bytes_per_token": next((int(l.split()[2]) for l in info.splitlines() if l.startswith("kv bytes/token")), None),
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write(os.path.join(a.out, "summary.json"), json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"wrote {os.path.relpath(os.path.join(a.out, 'summary.json'), ROOT)} in {summary['seconds']} s; "
          "scripts/report.py puts it in docs/results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
