#!/usr/bin/env bash
# The v3 evaluation (head size 128, 4k context): calibrate a profile on calib-v3.txt, train a
# router at 25 %, 12.5 % and 6.25 %, then `dynakv eval` with the long-context tasks
# (perplexity/KL/top-1 with 3072 tokens compressed and 1024 scored, keys among distractors, record
# lookups; 60 cases per run) for the methods below. Each step's time goes to results/v3-steps.txt;
# finished eval tasks are skipped when run again (results/eval-llama-27M-v3/).
#   scripts/results_v3.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
M=../shared/models/eval-llama-27M-v3-f16.gguf
D=../shared/data
P=results/profiles
mkdir -p $P results
log=results/v3-steps.txt
step() {  # name, command...: runs it unless its output exists, appends "name seconds" to the log
  local name=$1 out=$2; shift 2
  if [ -e "$out" ]; then return; fi
  local t0=$(date +%s.%N)
  "$@"
  echo "$name $(echo "$(date +%s.%N) - $t0" | bc) s: $*" >>$log
}
step calibrate $P/v3.dkv build/dynakv calibrate -m $M -f $D/calib-v3.txt -c 4096 --chunks 16 -o $P/v3.dkv -t $T -q
for F in 0.25 0.125 0.0625; do
  step train-router-$F $P/v3-router-$F.dkv build/dynakv train-router -m $M --profile $P/v3.dkv -f $D/calib-v3.txt \
    --docs $D/calib-recall-v3.txt --target $F --steps ${STEPS:-150} -o $P/v3-router-$F.dkv -t $T -q \
    --log results/v3-train-router-$F.jsonl --kv-dtype f16
done
# Rank x precision: routers trained with tc latents (train-router's default).
for F in 0.25 0.125 0.0625; do
  step train-router-tc-$F $P/v3-router-tc-$F.dkv build/dynakv train-router -m $M --profile $P/v3.dkv -f $D/calib-v3.txt \
    --docs $D/calib-recall-v3.txt --target $F --steps ${STEPS:-150} -o $P/v3-router-tc-$F.dkv -t $T -q \
    --log results/v3-train-router-tc-$F.jsonl
done
R=0.25=$P/v3-router-0.25.dkv,0.125=$P/v3-router-0.125.dkv,0.0625=$P/v3-router-0.0625.dkv
build/dynakv eval -m $M -f $D/valid-v3.txt --profile $P/v3.dkv --routers $R \
  --methods ${METHODS:-full,uniform,energy,router,router-int8,router-int4,router+snapkv,q4_0-h,kivi2,snapkv} --fractions ${FRACTIONS:-0.25,0.125,0.0625} \
  --tasks perplexity,keys,records -c 4096 --ppl-prompt 3072 --chunks 8 --name eval-llama-27M-v3 -t $T
# The tc methods with the tc routers (full and q4_0-h are the same runs as above: copied, then reused).
RT=0.25=$P/v3-router-tc-0.25.dkv,0.125=$P/v3-router-tc-0.125.dkv,0.0625=$P/v3-router-tc-0.0625.dkv
mkdir -p results/eval-llama-27M-v3-tc/runs
for m in full q4_0-h; do
  [ -e results/eval-llama-27M-v3-tc/runs/$m ] || cp -r results/eval-llama-27M-v3/runs/$m results/eval-llama-27M-v3-tc/runs/
done
build/dynakv eval -m $M -f $D/valid-v3.txt --profile $P/v3.dkv --routers $RT \
  --methods full,q4_0-h,tc,router-tc,router-tc+snapkv --fractions ${FRACTIONS:-0.25,0.125,0.0625} \
  --tasks perplexity,keys,records -c 4096 --ppl-prompt 3072 --chunks 8 --name eval-llama-27M-v3-tc -t $T
# Speed: v3 at 4k/16k/32k, and a Llama-3-8B-shaped random-weight model (8 layers, q4_0 weights) at
# 8k/32k; each context filled by a short real prefill replayed through the cache (--speed-fill).
build/dynakv eval -m $M -f $D/valid-v3.txt --profile $P/v3.dkv --routers $RT \
  --methods full,q8_0,q4_0,q4_0-h,kivi2,uniform,tc,router-tc --fractions 0.25,0.125 --speed-fractions 0.25,0.125 \
  --tasks speed --speed-ctx 4096,16384,32768 --speed-fill 1024 --name speed-v3 -t $T
# The 8B-shaped model (1.6 GB) and its profile stay outside the repository, in $TMPDIR (results/ name
# them l3-8b-q4_0.gguf and l3-8b.dkv, without the folder).
L8=${TMPDIR:-/tmp}/l3-8b-q4_0.gguf
L8P=${TMPDIR:-/tmp}/l3-8b.dkv
[ -e $L8 ] || build/dynakv make-gguf --shape llama3-8b --type q4_0 --layers 8 --ctx 32768 -o $L8
[ -e $L8P ] || build/dynakv calibrate -m $L8 -f $D/calib-v3.txt -c 512 --chunks 2 -o $L8P -t $T -q
build/dynakv eval -m $L8 -f $D/valid-v3.txt --profile $L8P --methods full,q8_0,q4_0,uniform,tc \
  --fractions 0.25,0.125 --speed-fractions 0.25,0.125 --tasks speed --speed-ctx 8192,32768 --speed-fill 512 \
  --name speed-l3-8b-q4_0 -t $T
scripts/report_v3.py
