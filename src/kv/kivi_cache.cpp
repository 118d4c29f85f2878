// KIVI (Liu et al., 2024), "kivi": keys quantized per channel and values per token, b = 2 or 4
// bits, asymmetric (fp16 min and scale per group, ops/quant.h), the most recent tokens kept in an
// fp16 residual until they fill whole groups. Per-channel keys follow the key cache's structure
// (outliers sit in fixed channels, so one channel's tokens share a range); per-token values keep a
// token's error within the token, which is what the attention-weighted sum of values needs.
//
// Layout per layer (G = --kivi-group, R = --kivi-residual, a multiple of G; D = H_kv * d,
// cb = AsymCodeBytes(G, b) bytes of codes per group, n_g quantized groups, n_r residual tokens;
// stored token s < n_g * G is quantized, s >= n_g * G is residual row s - n_g * G):
//   keys, group j = s / G, channel c:   codes  kc[(j * D + c) * cb ...], G codes over the group's
//                                       tokens, token s at code s % G
//                                       min/scale km[j * D + c], ks[j * D + c]
//   values, token s, channel group u = c / G (u in [0, D / G)):
//                                       codes  vc[(s * (D / G) + u) * cb ...], channel c at code c % G
//                                       min/scale vm[s * (D / G) + u], vs[s * (D / G) + u]
//   residual, token s:                  rk[(s - n_g G) * D + c], rv[...] fp16
// G divides the head size, so a value group never straddles two KV heads. Writes go to the
// residual; when it holds R tokens they become R / G groups and it empties, so the quantized part
// is always whole groups and 0 <= n_r < R between writes. Each group is quantized from the fp16
// residual, i.e. from what was stored, so attention and ReadKeys agree on every number.
//
// Retention re-quantizes: a key group spans G tokens, so dropping some breaks it. Retain
// dequantizes the layer (per KV head when heads keep different tokens), keeps the listed rows and
// re-appends them, whole groups quantized again and the rest back in the residual. A kept token's
// numbers can therefore change by up to one quantization step per retention (each eviction step of
// StreamingLLM or H2O is one). Layout, invariants and bytes: docs/kv_layout.md, section 4.
#include <algorithm>
#include <memory>

#include "core/fp16.h"
#include "core/threads.h"
#include "kv/quant_attend.h"
#include "kv/registry.h"
#include "ops/quant.h"

namespace dk {
namespace {

struct KiviParams {
  int bits = 4, group = 32, residual = 32;
  bool hadamard = false;
};

class KiviKvCache final : public KvCache {
 public:
  KiviKvCache(const KvShape& shape, int capacity, const KiviParams& p);

  std::string name() const override {
    return "kivi-" + std::to_string(p_.bits) + "bit(G=" + std::to_string(p_.group) + ", R=" +
           std::to_string(p_.residual) + ")" + (p_.hadamard ? "+hadamard" : "");
  }
  void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) override;
  void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) override;
  int Stored(int layer) const override { return layers_[layer].groups * p_.group + layers_[layer].residual; }
  void ReadKeys(int layer, int first, int n, float* out) const override { ReadRotated(layer, first, n, out, true); }
  void ReadValues(int layer, int first, int n, float* out) const override { ReadRotated(layer, first, n, out, false); }
  Status Retain(int layer, const std::vector<std::vector<int>>& keep) override;
  bool PerHeadRetain() const override { return true; }
  size_t BytesUsed() const override;
  size_t BytesReserved() const override;

 private:
  struct Layer {
    int groups = 0, residual = 0;   // n_g quantized groups, n_r residual tokens
    std::vector<uint8_t> kc, vc;    // codes: [max_groups][D][cb], [max_groups * G][D / G][cb]
    std::vector<uint16_t> km, ks;   // key min / scale: [max_groups][D]
    std::vector<uint16_t> vm, vs;   // value min / scale: [max_groups * G][D / G]
    std::vector<uint16_t> rk, rv;   // residual: [R][D] fp16
  };

  int D() const { return shape_.kv_dim(); }
  size_t GroupBytes() const { return 2 * static_cast<size_t>(D()) * (cb_ + 4); }  // K and V of G tokens
  void OnClear() override {
    for (Layer& l : layers_) l.groups = l.residual = 0;
  }
  void Append(Layer& l, const float* k, const float* v, int n);
  void Flush(Layer& l);
  // Stored tokens [first, first + n), columns [col, col + width) (whole value groups) of keys and/or
  // values (either may be null), in the storage basis: kout/vout [n][ld].
  void Dequantize(const Layer& l, int first, int n, int col, int width, float* kout, float* vout, int64_t ld) const;
  void ReadRotated(int layer, int first, int n, float* out, bool keys) const;
  void ScoreGroups(const Layer& l, int g, const float* qs, int t0, int t1, float* s) const;
  void AccumulateValues(const Layer& l, int g, const float* p, int t0, int t1, float* acc) const;
  void AttendGemm(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool);

  KiviParams p_;
  size_t cb_;           // bytes of codes per group: AsymCodeBytes(G, bits)
  int max_groups_;      // groups a layer can hold: floor(capacity / G)
  std::vector<Layer> layers_;
  std::vector<float> rotated_;   // [n][2][D] a batch's keys then values, rotated (--hadamard)
  std::vector<float> flush_;     // [R][2][D] the residual as fp32 while it is quantized
  QuantGemmScratch gemm_;
};

KiviKvCache::KiviKvCache(const KvShape& shape, int capacity, const KiviParams& p)
    : KvCache(shape, capacity),
      p_(p),
      cb_(AsymCodeBytes(p.group, p.bits)),
      max_groups_(capacity / p.group),
      layers_(shape.n_layer) {
  const size_t g = max_groups_, D = shape.kv_dim(), per_token = D / p.group;
  for (Layer& l : layers_) {
    l.kc.resize(g * D * cb_);
    l.km.resize(g * D);
    l.ks.resize(g * D);
    l.vc.resize(g * p.group * per_token * cb_);
    l.vm.resize(g * p.group * per_token);
    l.vs.resize(g * p.group * per_token);
    l.rk.resize(static_cast<size_t>(p.residual) * D);
    l.rv.resize(static_cast<size_t>(p.residual) * D);
  }
}

size_t KiviKvCache::BytesUsed() const {
  size_t bytes = 0;
  for (const Layer& l : layers_) bytes += l.groups * GroupBytes() + static_cast<size_t>(l.residual) * 2 * D() * 2;
  return bytes;
}

size_t KiviKvCache::BytesReserved() const {
  return layers_.size() * (max_groups_ * GroupBytes() + static_cast<size_t>(p_.residual) * 2 * D() * 2);
}

void KiviKvCache::Append(Layer& l, const float* k, const float* v, int n) {
  const int64_t Dn = D();
  for (int t = 0; t < n; ++t) {
    Fp32ToFp16Row(k + t * Dn, l.rk.data() + l.residual * Dn, Dn);
    Fp32ToFp16Row(v + t * Dn, l.rv.data() + l.residual * Dn, Dn);
    if (++l.residual == p_.residual) Flush(l);
  }
}

// The full residual (R tokens) becomes R / G groups: keys per channel (stride D across the G
// tokens), values per token (G consecutive channels).
void KiviKvCache::Flush(Layer& l) {
  const int G = p_.group, Dn = D(), per_token = Dn / G;
  flush_.resize(static_cast<size_t>(p_.residual) * 2 * Dn);
  float* kf = flush_.data();
  float* vf = kf + static_cast<size_t>(p_.residual) * Dn;
  Fp16ToFp32Row(l.rk.data(), kf, static_cast<int64_t>(p_.residual) * Dn);
  Fp16ToFp32Row(l.rv.data(), vf, static_cast<int64_t>(p_.residual) * Dn);
  for (int r = 0; r < p_.residual / G; ++r, ++l.groups) {
    const float* kg = kf + static_cast<size_t>(r) * G * Dn;
    for (int c = 0; c < Dn; ++c) {
      const size_t idx = static_cast<size_t>(l.groups) * Dn + c;
      QuantizeAsym(kg + c, G, Dn, p_.bits, l.kc.data() + idx * cb_, &l.km[idx], &l.ks[idx]);
    }
    for (int t = 0; t < G; ++t) {
      const int64_t s = static_cast<int64_t>(l.groups) * G + t;  // the stored token
      for (int u = 0; u < per_token; ++u) {
        const size_t idx = s * per_token + u;
        QuantizeAsym(vf + (static_cast<int64_t>(r) * G + t) * Dn + u * G, G, 1, p_.bits, l.vc.data() + idx * cb_,
                     &l.vm[idx], &l.vs[idx]);
      }
    }
  }
  l.residual = 0;
}

void KiviKvCache::Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* /*x*/) {
  if (p_.hadamard) {
    const int64_t size = static_cast<int64_t>(plan.n) * D();
    rotated_.assign(k, k + size);
    rotated_.insert(rotated_.end(), v, v + size);
    RotateHeads(rotated_.data(), 2 * static_cast<int64_t>(plan.n), D(), shape_.n_head_kv, shape_.head_dim);
    k = rotated_.data();
    v = rotated_.data() + size;
  }
  Append(layers_[layer], k, v, plan.n);
}

void KiviKvCache::Dequantize(const Layer& l, int first, int n, int col, int width, float* kout, float* vout,
                             int64_t ld) const {
  const int G = p_.group, Dn = D(), per_token = Dn / G, nq = l.groups * G, q_end = std::min(first + n, nq);
  std::vector<float> tmp(G);  // [G] one key channel of a group
  for (int j = first / G; kout != nullptr && j * G < q_end; ++j) {
    const int t0 = std::max(first, j * G), t1 = std::min(q_end, j * G + G);
    for (int c = col; c < col + width; ++c) {
      const size_t idx = static_cast<size_t>(j) * Dn + c;
      DequantizeAsym(l.kc.data() + idx * cb_, G, p_.bits, l.km[idx], l.ks[idx], tmp.data(), 1);
      for (int t = t0; t < t1; ++t) kout[(t - first) * ld + c - col] = tmp[t - j * G];
    }
  }
  for (int t = first; vout != nullptr && t < q_end; ++t)
    for (int u = col / G; u < (col + width) / G; ++u) {
      const size_t idx = static_cast<size_t>(t) * per_token + u;
      DequantizeAsym(l.vc.data() + idx * cb_, G, p_.bits, l.vm[idx], l.vs[idx], vout + (t - first) * ld + u * G - col,
                     1);
    }
  for (int t = std::max(first, nq); t < first + n; ++t) {
    const int64_t row = static_cast<int64_t>(t - nq) * Dn + col;
    if (kout != nullptr) Fp16ToFp32Row(l.rk.data() + row, kout + (t - first) * ld, width);
    if (vout != nullptr) Fp16ToFp32Row(l.rv.data() + row, vout + (t - first) * ld, width);
  }
}

void KiviKvCache::ReadRotated(int layer, int first, int n, float* out, bool keys) const {
  Dequantize(layers_[layer], first, n, 0, D(), keys ? out : nullptr, keys ? nullptr : out, D());
  if (p_.hadamard) RotateHeads(out, n, D(), shape_.n_head_kv, shape_.head_dim);  // back to the original basis
}

// Per KV head when the heads keep different tokens: head g's columns of new row s come from its
// own keep[g][s]. Rows are re-appended in the storage basis (no second rotation).
Status KiviKvCache::Retain(int layer, const std::vector<std::vector<int>>& keep) {
  DK_RETURN_IF_ERROR(CheckRetain(layer, keep));
  Layer& l = layers_[layer];
  const int T = Stored(layer), kept = static_cast<int>(keep[0].size()), Dn = D(), d = shape_.head_dim;
  std::vector<float> k(static_cast<size_t>(T) * Dn), v(k.size());  // [T][D] as stored
  Dequantize(l, 0, T, 0, Dn, k.data(), v.data(), Dn);
  const int sets = static_cast<int>(keep.size()), width = sets == 1 ? Dn : d;
  for (int g = 0; g < sets; ++g)
    for (int s = 0; s < kept; ++s) {  // keep[g][s] >= s: compacting in order reads rows not yet written
      const int64_t to = static_cast<int64_t>(s) * Dn + g * width;
      const int64_t from = static_cast<int64_t>(keep[g][s]) * Dn + g * width;
      std::copy(k.begin() + from, k.begin() + from + width, k.begin() + to);
      std::copy(v.begin() + from, v.begin() + from + width, v.begin() + to);
    }
  l.groups = l.residual = 0;
  Append(l, k.data(), v.data(), kept);
  return Status::Ok();
}

// Scores of tokens [t0, t1) (t0 a multiple of G), key group by key group: for key group j,
//   s[j G + t] = sum_c (qs_c scale_c) code_c[t] + sum_c qs_c min_c     (c over KV head g)
// i.e. one AxpyAsymCodes per channel into the group's G scores. Whole groups are written
// (j G + G <= n_g G <= Stored), the last maybe past t1; the residual's scores follow (fp16 rows).
void KiviKvCache::ScoreGroups(const Layer& l, int g, const float* qs, int t0, int t1, float* s) const {
  const int G = p_.group, Dn = D(), d = shape_.head_dim, nq = l.groups * G;
  for (int j = t0 / G; j * G < std::min(t1, nq); ++j) {
    float* sj = s + static_cast<int64_t>(j) * G;
    std::fill(sj, sj + G, 0.0f);
    float base = 0.0f;
    for (int e = 0; e < d; ++e) {
      const size_t idx = static_cast<size_t>(j) * Dn + g * d + e;
      AxpyAsymCodes(qs[e] * Fp16ToFp32(l.ks[idx]), l.kc.data() + idx * cb_, G, p_.bits, sj);
      base += qs[e] * Fp16ToFp32(l.km[idx]);
    }
    for (int t = 0; t < G; ++t) sj[t] += base;
  }
  for (int t = std::max(t0, nq); t < t1; ++t)
    s[t] = DotF16(qs, l.rk.data() + static_cast<int64_t>(t - nq) * Dn + g * d, d);
}

// acc += sum_t p_t v^_t over tokens [t0, t1). A quantized value group contributes
// p_t (min + scale code): AxpyAsymCodes(p_t scale) per group, the p_t min terms summed per group
// over the tokens and added once at the end.
void KiviKvCache::AccumulateValues(const Layer& l, int g, const float* p, int t0, int t1, float* acc) const {
  const int G = p_.group, d = shape_.head_dim, per_token = D() / G, per_head = d / G, nq = l.groups * G;
  std::vector<float> mins(per_head, 0.0f);  // [d / G] sum_t p_t min of each of the head's groups
  for (int t = t0; t < std::min(t1, nq); ++t)
    for (int u = 0; u < per_head; ++u) {
      const size_t idx = static_cast<size_t>(t) * per_token + g * per_head + u;
      AxpyAsymCodes(p[t] * Fp16ToFp32(l.vs[idx]), l.vc.data() + idx * cb_, G, p_.bits, acc + u * G);
      mins[u] += p[t] * Fp16ToFp32(l.vm[idx]);
    }
  for (int u = 0; u < per_head; ++u)
    for (int e = 0; e < G; ++e) acc[u * G + e] += mins[u];
  for (int t = std::max(t0, nq); t < t1; ++t)
    AxpyF16(p[t], l.rv.data() + static_cast<int64_t>(t - nq) * D() + g * d, acc, d);
}

void KiviKvCache::Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) {
  if (plan.n >= kQuantGemmMinBatch) {
    AttendGemm(layer, plan, q, out, pool);
    return;
  }
  const Layer& l = layers_[layer];
  auto score = [&](int g, const float* qs, int t0, int t1, float* s) { ScoreGroups(l, g, qs, t0, t1, s); };
  auto accumulate = [&](int g, const float* p, int t0, int t1, float* acc) { AccumulateValues(l, g, p, t0, t1, acc); };
  const int tile = (kDecodeTile + p_.group - 1) / p_.group * p_.group;  // whole key groups
  AttendDecode(shape_, Stored(layer), plan, q, out, p_.hadamard, pool, tile, score, accumulate);
}

// Batched path: each KV head dequantized once to fp32 [T][d] (still rotated), then GEMMs.
void KiviKvCache::AttendGemm(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) {
  const int d = shape_.head_dim, T = Stored(layer);
  gemm_.k.resize(static_cast<size_t>(T) * d);
  gemm_.v.resize(static_cast<size_t>(T) * d);
  for (int g = 0; g < shape_.n_head_kv; ++g) {
    Dequantize(layers_[layer], 0, T, g * d, d, gemm_.k.data(), gemm_.v.data(), d);
    AttendKvHeadGemm(shape_, g, plan.n, T, q, p_.hadamard, out, gemm_, pool);
  }
}

StatusOr<std::unique_ptr<KvCache>> CreateKivi(const KvConfig& config, const KvModelInfo& model, int capacity) {
  KiviParams p;
  const int d = model.shape.head_dim;
  DK_ASSIGN_OR_RETURN(p.bits, config.options.Int("--kivi-bits", 4, 2, 4));
  if (p.bits == 3) return InvalidArgument("--kivi-bits: kivi stores 2- or 4-bit codes, found 3");
  DK_ASSIGN_OR_RETURN(p.group, config.options.Int("--kivi-group", 32, 1, 4096));
  if (d % p.group != 0)
    return InvalidArgument("--kivi-group: kivi's value groups of " + std::to_string(p.group) +
                           " channels must divide head_dim " + std::to_string(d));
  DK_ASSIGN_OR_RETURN(p.residual, config.options.Int("--kivi-residual", p.group, 1, 1 << 16));
  if (p.residual % p.group != 0)
    return InvalidArgument("--kivi-residual: " + std::to_string(p.residual) + " is not a multiple of --kivi-group " +
                           std::to_string(p.group) + " (the residual is quantized in whole groups)");
  DK_ASSIGN_OR_RETURN(p.hadamard, ParseHadamard(config.options, "kivi", d));
  return std::unique_ptr<KvCache>(new KiviKvCache(model.shape, capacity, p));
}

}  // namespace

const KvMethod& KiviKvMethod() {
  static const KvMethod m{
      "kivi",
      "KIVI: keys per channel, values per token, 2/4-bit groups, recent tokens in an fp16 residual",
      {{"--kivi-bits", "B", "kivi: bits per code, 2 or 4 (default 4)"},
       {"--kivi-group", "G", "kivi: tokens per key group and channels per value group (default 32; divides head_dim)"},
       {"--kivi-residual", "R",
        "kivi: fp16 residual of recent tokens, quantized when R fill up (default G; a multiple of G)"},
       HadamardKvFlag()},
      &CreateKivi};
  return m;
}

}  // namespace dk
