#!/usr/bin/env bash
# The v3 evaluation (head size 128, 4k context) as far as it has been run: calibrate a profile on
# calib-v3.txt, train the router at 25 %, then `dynakv eval` with the long-context tasks
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
step train-router-0.25 $P/v3-router-0.25.dkv build/dynakv train-router -m $M --profile $P/v3.dkv -f $D/calib-v3.txt \
  --docs $D/calib-recall-v3.txt --target 0.25 --steps ${STEPS:-150} -o $P/v3-router-0.25.dkv -t $T -q \
  --log results/v3-train-router-0.25.jsonl
build/dynakv eval -m $M -f $D/valid-v3.txt --profile $P/v3.dkv --routers 0.25=$P/v3-router-0.25.dkv \
  --methods ${METHODS:-full,uniform,energy,router,q4_0-h,kivi2,snapkv} --fractions 0.25 \
  --tasks perplexity,keys,records -c 4096 --ppl-prompt 3072 --chunks 8 --name eval-llama-27M-v3 -t $T
scripts/report_v3.py
