#!/usr/bin/env bash
# Reruns the bad inputs of the code review ("No input crashes it or hangs it", docs/architecture.md,
# section Errors) against a dynakv binary: pipes, folders and devices given as files, huge sizes,
# crafted GGUFs and profiles (NaN/Inf weights, a 16M-element metadata array, a profile for another
# model or with control characters in its name, values that overflow fp32), outputs that cannot be
# written, a kill -9 while a profile is written, -c above the training context, -t 1 against -t 2.
# Each case runs under a timeout and is checked for its exit code and a piece of its message; any
# sanitizer report fails it. One line per case; the exit status is the number of failures (capped).
#
#   tests/bad_inputs.sh [path/to/dynakv]    (default: build-asan/dynakv if present, else build/dynakv)
#   TIMEOUT=60 tests/bad_inputs.sh ...      (seconds per case, default 30)
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA="$ROOT/tests/data"
BIN=${1:-}
if [ -z "$BIN" ]; then
  if [ -x "$ROOT/build-asan/dynakv" ]; then BIN="$ROOT/build-asan/dynakv"; else BIN="$ROOT/build/dynakv"; fi
fi
if [ ! -x "$BIN" ]; then
  echo "bad_inputs.sh: no dynakv binary at '$BIN' (give its path as the argument)" >&2
  exit 2
fi
TMO=${TIMEOUT:-30}
T=$(mktemp -d "${TMPDIR:-/tmp}/dk_bad_inputs.XXXXXX")
cleanup() { rm -rf "$T"; }
trap cleanup EXIT
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

S="$DATA/stories260K.gguf"       # tiny llama, n_ctx_train 2048, F32
B="$DATA/brown-kjv-llama-6M-f32.gguf"
B16="$DATA/brown-kjv-llama-6M-f16.gguf"
PROF="$DATA/stories260K-v1.dkv"  # a profile calibrated for stories260K
TEXT="$DATA/valid.txt"
DKV=(--kv dynakv --rank-policy uniform --rank 8)

failures=0
passes=0
OUT="$T/case.out"
ERR="$T/case.err"

# Lines of a case's output worth showing when it fails.
show() { tr -d '\000' <"$ERR" | grep -v '^ *-\|^usage\|^  ' | head -n 2 | cut -c1-200 | tr '\n' ' '; }

report() {  # report PASS|FAIL NAME DETAIL
  if [ "$1" = PASS ]; then passes=$((passes + 1)); else failures=$((failures + 1)); fi
  printf '%s  %-46s %s\n' "$1" "$2" "$3"
}

sanitizer_report() { grep -qE 'runtime error|AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer' "$ERR"; }

# expect NAME RC NEEDLE -- command...   (NEEDLE: a fixed string looked for in stdout + stderr;
# empty: anything). RC is the exit code wanted.
expect() {
  local name=$1 want=$2 needle=$3
  shift 4
  timeout -k 5 "$TMO" "$@" >"$OUT" 2>"$ERR" </dev/null
  local rc=$?
  local got="rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && got="rc=$rc (hung: killed after ${TMO}s)"
  if sanitizer_report; then
    report FAIL "$name" "expected rc=$want '$needle'; got $got with a sanitizer report: $(grep -m1 -E 'runtime error|Sanitizer' "$ERR" | cut -c1-160)"
  elif [ "$rc" -ne "$want" ]; then
    report FAIL "$name" "expected rc=$want '$needle'; got $got: $(show)"
  elif [ -n "$needle" ] && ! cat "$OUT" "$ERR" | tr -d '\000' | grep -qF -- "$needle"; then
    report FAIL "$name" "expected rc=$want '$needle'; got $got without it: $(show)"
  else
    report PASS "$name" "rc=$rc '$needle'"
  fi
}

# An extra condition on the last case's output: check NAME DESCRIPTION test-command...
check() {
  local name=$1 what=$2
  shift 2
  if "$@"; then report PASS "$name" "$what"; else report FAIL "$name" "$what: no; $(show)"; fi
}

# ---------------------------------------------------------------------------------------------
# Crafted inputs
mkfifo "$T/fifo"
mkdir -p "$T/folder" "$T/out"
head -c 9000 "$TEXT" >"$T/short.txt"  # about 2,100 tokens
python3 - "$T" "$S" "$B16" "$PROF" <<'PY' || { echo "bad_inputs.sh: python3 failed to craft the inputs" >&2; exit 2; }
import struct, sys, zlib
T, S, B16, PROF = sys.argv[1:5]

def parse_gguf(b):
    """Tensor name -> (type, absolute data offset, element count), and the alignment."""
    pos = 24
    n_tensors, n_kv = struct.unpack_from('<QQ', b, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    align = 32
    def value(t, pos):
        if t == 8:
            n = struct.unpack_from('<Q', b, pos)[0]
            return pos + 8 + n, b[pos + 8:pos + 8 + n]
        if t == 9:
            et, n = struct.unpack_from('<IQ', b, pos)
            pos += 12
            for _ in range(n):
                pos, _v = value(et, pos)
            return pos, None
        v = b[pos:pos + sizes[t]]
        return pos + sizes[t], v
    for _ in range(n_kv):
        n = struct.unpack_from('<Q', b, pos)[0]
        key = b[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        t = struct.unpack_from('<I', b, pos)[0]
        pos, v = value(t, pos + 4)
        if key == 'general.alignment':
            align = struct.unpack('<I', v)[0]
    tensors = {}
    for _ in range(n_tensors):
        n = struct.unpack_from('<Q', b, pos)[0]
        name = b[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        nd = struct.unpack_from('<I', b, pos)[0]
        dims = struct.unpack_from('<%dQ' % nd, b, pos + 4)
        pos += 4 + 8 * nd
        t, off = struct.unpack_from('<IQ', b, pos)
        pos += 12
        count = 1
        for d in dims:
            count *= d
        tensors[name] = (t, off, count)
    data = (pos + align - 1) // align * align
    return {k: (t, data + off, c) for k, (t, off, c) in tensors.items()}, align

s = bytearray(open(S, 'rb').read())
ts, align = parse_gguf(s)
assert all(t == 0 for t, _, _ in ts.values()), 'stories260K is expected to be all F32'

def f32_model(path, edits):
    b = bytearray(s)
    for name, index, value in edits:
        t, off, count = ts[name]
        for i in (range(count) if index is None else [index]):
            struct.pack_into('<f', b, off + 4 * i, value)
    open(path, 'wb').write(b)

f32_model(T + '/nan.gguf', [('blk.1.attn_q.weight', 5, float('nan'))])
f32_model(T + '/inf.gguf', [('output_norm.weight', 3, float('-inf'))])
# Finite weights whose products overflow fp32 in layer 2.
f32_model(T + '/overflow.gguf', [('blk.2.ffn_norm.weight', None, 3e38)])

# F16 model with an infinity (fp16 0x7c00) in one weight.
b16 = bytearray(open(B16, 'rb').read())
ts16, _ = parse_gguf(b16)
t, off, count = ts16['blk.0.ffn_up.weight']
assert t == 1, 'expected an F16 tensor'
struct.pack_into('<H', b16, off + 2 * 7, 0x7C00)
open(T + '/inf16.gguf', 'wb').write(b16)

# One metadata array of 16M u8 inserted before the others: 24 + 8 + 16M bytes, a multiple of the
# alignment, so the tensor data stays aligned.
key = b'big.arr1'
n = 1 << 24
kv = struct.pack('<Q', len(key)) + key + struct.pack('<IIQ', 9, 0, n) + bytes(n)
assert len(kv) % align == 0
big = s[:16] + struct.pack('<Q', struct.unpack_from('<Q', s, 16)[0] + 1) + kv + s[24:]
open(T + '/big-array.gguf', 'wb').write(big)

# Profiles (format version 1, see docs/profile_format.md): CRC-32 over [12, end - 4).
p = bytearray(open(PROF, 'rb').read())
assert struct.unpack_from('<I', p, 8)[0] == 1
def with_crc(b):
    b = bytearray(b)
    struct.pack_into('<I', b, len(b) - 4, zlib.crc32(bytes(b[12:-4])))
    return b
name_len = struct.unpack_from('<I', p, 20)[0]
n_layer, n_head_kv, head_dim, n_levels = struct.unpack_from('<IIII', p, 24 + name_len)
D = n_head_kv * head_dim
bases = 48 + name_len + 4 * n_levels
# A name with a newline, an escape sequence and a NUL.
name = b'evil\nmodel\x1b[31mRED\x00tail'
renamed = p[:20] + struct.pack('<I', len(name)) + name + p[24 + name_len:]
open(T + '/evil-name.dkv', 'wb').write(with_crc(renamed))
# Layer 0's key basis all 3e38: finite, but the latents overflow.
huge = bytearray(p)
struct.pack_into('<%df' % (D * D), huge, bases, *([3e38] * (D * D)))
open(T + '/huge.dkv', 'wb').write(with_crc(huge))
# A NaN in layer 0's key mean.
nanp = bytearray(p)
struct.pack_into('<f', nanp, bases + 4 * D * D + 4, float('nan'))
open(T + '/nan.dkv', 'wb').write(with_crc(nanp))
PY

# ---------------------------------------------------------------------------------------------
echo "bad inputs against $BIN (timeout ${TMO}s per case)"

# Sizes from flags, checked before anything is allocated.
expect "perplexity -c 16777216" 1 "at least 2 * n_ctx" -- "$BIN" perplexity -m "$B" -f "$TEXT" -c 16777216
expect "generate -c 16777216" 1 "-c 16777216" -- "$BIN" generate -m "$B" -p hi -n 1 -c 16777216
expect "perplexity -c 1000000, 2,100-token text" 1 "at least 2 * n_ctx" -- \
  "$BIN" perplexity -m "$S" -f "$T/short.txt" -c 1000000

# Files that are not regular files: refused at once, never read or waited on.
expect "perplexity -f /dev/zero" 1 "not a regular file" -- "$BIN" perplexity -m "$S" -f /dev/zero
expect "generate -f /dev/zero" 1 "not a regular file" -- "$BIN" generate -m "$S" -f /dev/zero -n 1
expect "perplexity -f FOLDER" 1 "not a regular file" -- "$BIN" perplexity -m "$S" -f "$T/folder"
expect "generate -f FOLDER" 1 "not a regular file" -- "$BIN" generate -m "$S" -f "$T/folder" -n 1
expect "info -m FOLDER" 1 "not a regular file" -- "$BIN" info -m "$T/folder"
expect "info -m /dev/zero" 1 "not a regular file" -- "$BIN" info -m /dev/zero
expect "info -m FIFO" 1 "not a regular file" -- "$BIN" info -m "$T/fifo"
expect "perplexity -f FIFO" 1 "not a regular file" -- "$BIN" perplexity -m "$S" -f "$T/fifo"
expect "generate -f FIFO" 1 "not a regular file" -- "$BIN" generate -m "$S" -f "$T/fifo" -n 1
expect "calibrate -f FIFO" 1 "not a regular file" -- "$BIN" calibrate -m "$S" -f "$T/fifo" -o "$T/out/x.dkv"
expect "perplexity --profile FIFO" 1 "not a regular file" -- \
  "$BIN" perplexity -m "$S" -f "$TEXT" -c 64 --chunks 1 "${DKV[@]}" --profile "$T/fifo"

# A 16M-element metadata array: memory proportional to the file (18 MB), not 1.4 GB.
python3 - "$T/rss" "$BIN" info -m "$T/big-array.gguf" <<'PY' >"$OUT" 2>"$ERR"
import resource, subprocess, sys
rc = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
sys.stderr.buffer.write(rc.stderr)
open(sys.argv[1], 'w').write('%d %d\n' % (rc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
PY
read -r big_rc big_kb <"$T/rss" 2>/dev/null || { big_rc=-1; big_kb=0; }
if [ "$big_rc" -eq 0 ] && [ "$big_kb" -lt 400000 ] && ! sanitizer_report; then
  report PASS "info -m GGUF with a 16M-element u8 array" "rc=0, max RSS $((big_kb / 1024)) MiB (< 390 MiB)"
else
  report FAIL "info -m GGUF with a 16M-element u8 array" "expected rc=0 and max RSS < 390 MiB; got rc=$big_rc, $((big_kb / 1024)) MiB: $(show)"
fi

# Profiles: another model's (exit 1 everywhere), names escaped, non-finite and overflowing numbers.
expect "perplexity, profile for another model" 1 "calibrated for model" -- \
  "$BIN" perplexity -m "$B" -f "$TEXT" -c 64 --chunks 1 "${DKV[@]}" --profile "$PROF"
expect "generate, profile for another model" 1 "calibrated for model" -- \
  "$BIN" generate -m "$B" -p hi -n 1 "${DKV[@]}" --profile "$PROF"
expect "info, profile for another model" 1 "calibrated for model" -- "$BIN" info -m "$B" --profile "$PROF"
expect "profile name with \\n, ESC, NUL" 1 'evil\x0amodel\x1b[31mRED\x00tail' -- \
  "$BIN" info -m "$B" --profile "$T/evil-name.dkv"
check "  ...printed escaped" "no raw ESC or newline from the name" bash -c "! grep -q \$'\\x1b' '$ERR' && ! grep -qx 'model.*' '$ERR'"
expect "profile with a NaN" 1 "is not finite" -- \
  "$BIN" perplexity -m "$S" -f "$TEXT" -c 64 --chunks 1 "${DKV[@]}" --profile "$T/nan.dkv"
expect "profile with 3e38 values: perplexity" 1 "non-finite value" -- \
  "$BIN" perplexity -m "$S" -f "$TEXT" -c 64 --chunks 2 "${DKV[@]}" --profile "$T/huge.dkv"
check "  ...no PPL = nan" "no PPL line" bash -c "! grep -q 'PPL' '$OUT'"
expect "profile with 3e38 values: generate" 1 "non-finite value" -- \
  "$BIN" generate -m "$S" -p "Once upon a time" -n 4 "${DKV[@]}" --profile "$T/huge.dkv"

# Weights: NaN/Inf refused at load with the tensor's name; overflow stops at the layer.
expect "NaN weight (F32)" 1 "tensor 'blk.1.attn_q.weight': element 5 is nan" -- \
  "$BIN" perplexity -m "$T/nan.gguf" -f "$TEXT" -c 64 --chunks 1
expect "-inf weight (F32), info" 1 "tensor 'output_norm.weight': element 3 is -inf" -- "$BIN" info -m "$T/inf.gguf"
expect "inf weight (F16)" 1 "tensor 'blk.0.ffn_up.weight': element 7 is inf" -- \
  "$BIN" generate -m "$T/inf16.gguf" -p hi -n 1
expect "weights that overflow: perplexity" 1 "layer 2 output: non-finite" -- \
  "$BIN" perplexity -m "$T/overflow.gguf" -f "$TEXT" -c 64 --chunks 2
check "  ...no PPL = nan" "no PPL line" bash -c "! grep -q 'PPL' '$OUT'"
expect "weights that overflow: generate" 1 "layer 2 output: non-finite" -- \
  "$BIN" generate -m "$T/overflow.gguf" -p hi -n 4
expect "weights that overflow: calibrate" 1 "layer 2 output: non-finite" -- \
  "$BIN" calibrate -m "$T/overflow.gguf" -f "$TEXT" -c 64 --chunks 1 -q -o "$T/out/o.dkv"

# Outputs that cannot be written: refused before the work, naming the flag and the path.
expect "calibrate -o MISSING/x.dkv" 2 "-o: $T/missing/x.dkv: folder '$T/missing' does not exist" -- \
  "$BIN" calibrate -m "$S" -f "$TEXT" -o "$T/missing/x.dkv"
check "  ...before calibrating" "no calibration ran" bash -c "! grep -q 'calibrated on' '$OUT'"
expect "calibrate -o /sys/x.dkv" 2 "-o: /sys/x.dkv: cannot write in folder '/sys'" -- \
  "$BIN" calibrate -m "$S" -f "$TEXT" -o /sys/x.dkv
expect "calibrate -o FOLDER" 2 "-o: $T/folder: is a folder" -- "$BIN" calibrate -m "$S" -f "$TEXT" -o "$T/folder"
expect "calibrate -o /dev/null" 2 "-o: /dev/null: exists and is not a regular file" -- \
  "$BIN" calibrate -m "$S" -f "$TEXT" -o /dev/null
expect "train-router --log MISSING/log" 2 "--log: $T/missing/log.jsonl: folder" -- \
  "$BIN" train-router -m "$S" --profile "$PROF" -f "$TEXT" -o "$T/out/r.dkv" --log "$T/missing/log.jsonl"
expect "passkey --json /sys/x.json" 2 "--json: /sys/x.json: cannot write" -- \
  "$BIN" passkey -m "$S" -f "$TEXT" --json /sys/x.json
expect "rankmap -o FOLDER" 2 "-o: $T/folder: is a folder" -- \
  "$BIN" rankmap -m "$S" -f "$TEXT" "${DKV[@]}" --profile "$PROF" -o "$T/folder"
expect "eval --write-config MISSING/c.json" 2 "--write-config: $T/missing/c.json: folder" -- \
  "$BIN" eval -m "$S" -f "$TEXT" --profile "$PROF" --write-config "$T/missing/c.json"
expect "eval --results /sys" 2 "--results: /sys/" -- "$BIN" eval -m "$S" -f "$TEXT" --profile "$PROF" --results /sys
expect "export-profile -o /sys" 2 "-o: /sys/dynakv.safetensors: cannot write in folder '/sys'" -- \
  "$BIN" export-profile "$PROF" -o /sys

# kill -9 while calibrate writes its profile: the old profile stays whole (or is replaced by a
# whole new one), and no temporary file is left.
mkdir -p "$T/kill"
cp "$PROF" "$T/kill/p.dkv"
for delay in 0.2 0.5 1.0 2.0; do
  "$BIN" calibrate -m "$S" -f "$TEXT" -c 128 --chunks 40 -q -o "$T/kill/p.dkv" >/dev/null 2>"$ERR" &
  pid=$!
  sleep "$delay"
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
done
leftover=$(find "$T/kill" -mindepth 1 ! -name p.dkv | wc -l)
if [ "$leftover" -eq 0 ] && timeout -k 5 "$TMO" "$BIN" info -m "$S" --profile "$T/kill/p.dkv" >"$OUT" 2>"$ERR"; then
  report PASS "kill -9 during calibrate -o" "profile whole, no temporary file left"
else
  report FAIL "kill -9 during calibrate -o" "$leftover files left beside the profile: $(ls "$T/kill" | tr '\n' ' ') $(show)"
fi

# -c above the training context (2048): a warning, and the run goes on.
expect "generate -c 4096" 0 "warning: -c 4096 is above the model's training context (2048)" -- \
  "$BIN" generate -m "$S" -p hi -n 2 -c 4096
expect "perplexity -c 2560" 0 "warning: -c 2560 is above the model's training context (2048)" -- \
  "$BIN" perplexity -m "$S" -f "$TEXT" -c 2560 --chunks 1 -q
expect "calibrate -c 4096" 0 "warning: -c 4096 is above the model's training context (2048)" -- \
  "$BIN" calibrate -m "$S" -f "$TEXT" -c 4096 --chunks 1 -q -o "$T/out/c.dkv"
expect "passkey -c 4096" 0 "warning: -c 4096 is above the model's training context (2048)" -- \
  "$BIN" passkey -m "$S" -f "$TEXT" -c 4096 --per-cell 1 --lengths 150 --depths 0.5 -q

# -t 1 against -t 2 (docs/architecture.md, Threads): batches of tokens and decode steps (one token)
# give the same bits.
ppl_of() { grep -o 'PPL = [0-9.]*' "$1" | cut -d' ' -f3; }
ppl_pair() {  # ppl_pair NAME BOUND args...
  local name=$1 bound=$2
  shift 2
  local a b
  timeout -k 5 "$TMO" "$BIN" perplexity -m "$S" -f "$TEXT" -q -t 1 "$@" >"$T/t1" 2>"$ERR"
  a=$(ppl_of "$T/t1")
  timeout -k 5 "$TMO" "$BIN" perplexity -m "$S" -f "$TEXT" -q -t 2 "$@" >"$T/t2" 2>"$ERR"
  b=$(ppl_of "$T/t2")
  if [ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" -v e="$bound" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= e * a) }'; then
    report PASS "$name" "PPL $a (-t 1) vs $b (-t 2), within $bound relative"
  else
    report FAIL "$name" "PPL '$a' (-t 1) vs '$b' (-t 2), bound $bound relative: $(show)"
  fi
}
ppl_pair "perplexity -t 1 vs -t 2" 0 -c 128 --chunks 4
ppl_pair "perplexity -t 1 vs -t 2, snapkv, decode 1" 0 -c 128 --chunks 4 --evict snapkv --evict-keep 0.5 --decode-batch 1

echo "bad inputs: $passes passed, $failures failed"
[ "$failures" -eq 0 ] || exit $((failures > 100 ? 100 : failures))
exit 0
