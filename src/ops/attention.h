// Dense causal attention kernels on fp32 key/value rows (the full-cache path, and the
// reference that compressed backends are checked against).
#pragma once

#include <algorithm>
#include <cstdint>

namespace dk {

// One query head against T cached rows.
//   q: [d]   k, v: row t at k + t * stride (d floats)   out: [d]   scores: scratch [T]
void AttendOne(const float* q, const float* k, const float* v, int64_t stride, int T, int d, float scale,
               float* out, float* scores);

// Decode-path attention reads a cache's rows in tiles of this many tokens, every query head that
// shares the tile's KV head in turn, so a row is fetched from memory once per work item and the
// other heads find it in the core's cache (a tile of one 128-wide head: 32 KiB in fp16).
constexpr int kDecodeTile = 128;

// One work item of a decode-path attention: a query, a KV head and a run of the query heads that
// share it (GQA), heads head0 .. head0 + heads - 1.
struct DecodeItem {
  int query = 0, kv_head = 0, head0 = 0, heads = 0;
};

// How n queries x n_head_kv KV heads x `group` query heads per KV head are cut into work items:
// whole groups where that gives every thread of the pool work, else each group cut into runs of
// `heads` query heads (fewer KV heads than threads: MQA, or GQA with 2 KV heads on many cores).
struct DecodeSplit {
  int n = 0, n_head_kv = 0, group = 0, heads = 0, runs = 0;  // runs per (query, KV head)
  int64_t items = 0;
  DecodeItem At(int64_t item) const {
    const int run = static_cast<int>(item % runs);
    const int64_t qg = item / runs;
    DecodeItem it;
    it.query = static_cast<int>(qg / n_head_kv);
    it.kv_head = static_cast<int>(qg % n_head_kv);
    it.head0 = it.kv_head * group + run * heads;
    it.heads = run * heads + heads <= group ? heads : group - run * heads;
    return it;
  }
};

inline DecodeSplit SplitDecode(int n, int n_head_kv, int group, int threads) {
  DecodeSplit s;
  s.n = n;
  s.n_head_kv = n_head_kv;
  s.group = group;
  const int64_t whole = static_cast<int64_t>(n) * n_head_kv;
  int runs = 1;
  while (runs < group && whole * runs < threads) ++runs;
  s.heads = std::max(1, group / runs);  // at least `runs` runs
  s.runs = (group + s.heads - 1) / s.heads;
  s.items = whole * s.runs;
  return s;
}

}  // namespace dk
