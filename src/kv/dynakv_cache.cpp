// The DynaKV cache: packed variable-rank latents (docs/kv_layout.md), the encode path (one GEMM
// per batch, then the rank policy), attention on the latents (decode: straight from the packed
// records; prefill: GEMMs on fp32 tiles), the double-precision reference, and the factory.
#include "kv/dynakv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <sys/stat.h>

#include <cblas.h>

#include "core/fp16.h"
#include "core/threads.h"
#include "ops/latent_block.h"
#include "ops/ops.h"
#include "ops/quant.h"
#include "ops/simd.h"

namespace dk {

namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// C[n][D] = (X[n][D] - mu) U, U[i * D + j] = component i of direction j: one GEMM.
void EncodeRows(const float* x, const BasisSet& b, int n, int D, float* xc, float* c) {
  for (int i = 0; i < n; ++i) {
    const float* xi = x + static_cast<int64_t>(i) * D;
    float* o = xc + static_cast<int64_t>(i) * D;
#pragma omp simd
    for (int j = 0; j < D; ++j) o[j] = xi[j] - b.mean[j];
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, D, D, 1.0f, xc, D, b.basis.data(), D, 0.0f, c, D);
}

}  // namespace

int64_t LatentFormat::Bytes(int r) const {
  switch (type) {
    case kF16: return 2 * static_cast<int64_t>(r);
    case kF32: return 4 * static_cast<int64_t>(r);
    case kTc: return 2 * static_cast<int64_t>(r);
    default: {
      const int64_t b = static_cast<int64_t>(SymLatentBytes(r, bits(), GroupSize(r)));
      return (b + 1) & ~int64_t{1};  // even: the next latent's fp16 scales stay aligned
    }
  }
}

std::string LatentFormat::Name() const {
  static const char* names[] = {"f16", "f32", "q8", "q4", "tc"};
  return std::string(names[type]) + (quantized() && group > 0 ? "g" + std::to_string(group) : "");
}

StatusOr<LatentFormat> ParseLatentFormat(const std::string& dtype, int group) {
  LatentFormat f;
  if (dtype == "f16") f.type = LatentFormat::kF16;
  else if (dtype == "f32") f.type = LatentFormat::kF32;
  else if (dtype == "q8") f.type = LatentFormat::kQ8;
  else if (dtype == "q4") f.type = LatentFormat::kQ4;
  else if (dtype == "tc") f.type = LatentFormat::kTc;
  else return InvalidArgument("--kv-dtype: dynakv stores latents as f16, f32, q8, q4 or tc, found '" + dtype + "'");
  if (group < 0) return InvalidArgument("--latent-group: expected a group size >= 0, found " + std::to_string(group));
  if (group > 0 && !f.quantized())
    return InvalidArgument("--latent-group: only quantized latents (--kv-dtype q8 or q4) have groups (tc's are fixed)");
  f.group = group;
  return f;
}

TcCodebook MakeTcCodebook(const BasisSet& b, int D) {
  TcCodebook c;
  c.ladder = TcLadder(b.eigenvalues, D);
  // Directions of (almost) no variance keep a finite 1 / sigma; they are rarely coded at all.
  const double floor = std::max(b.eigenvalues.empty() ? 0.0 : b.eigenvalues[0] * 1e-8, 1e-30);
  c.sigma.resize(D);
  c.inv_sigma.resize(D);
  for (int j = 0; j < D; ++j) {
    c.sigma[j] = static_cast<float>(std::sqrt(std::max(b.eigenvalues[j], floor)));
    c.inv_sigma[j] = 1.0f / c.sigma[j];
  }
  return c;
}

RecordCost DynaKvCache::CostFor(int kv_dim, LatentFormat format) {
  RecordCost c;
  c.meta_bytes = 2 * (kv_dim <= 256 ? 1 : 2);
  c.index_bytes_per_token = static_cast<double>(sizeof(uint32_t)) / kIndexEvery;
  switch (format.type) {
    case LatentFormat::kF16: c.elem_bytes = 2; break;
    case LatentFormat::kF32: c.elem_bytes = 4; break;
    // tc: rank r is a code of at most 2 r bytes, so the fp16 arithmetic is an upper bound.
    case LatentFormat::kTc: c.elem_bytes = 2; break;
    default:
      // Codes; an fp16 scale per group (or per latent); the padding to an even size averages half
      // a byte per latent (plus half a byte of int4 rounding).
      c.elem_bytes = format.bits() / 8.0 + (format.group > 0 ? 2.0 / format.group : 0.0);
      c.meta_bytes += 2 * ((format.group > 0 ? 1.0 : 2.0) + (format.type == LatentFormat::kQ4 ? 1.0 : 0.5));
  }
  return c;
}

DynaKvCache::DynaKvCache(const KvShape& shape, int capacity, LatentFormat format,
                         std::shared_ptr<const DynaKvProfile> profile, std::unique_ptr<RankPolicy> policy)
    : KvCache(shape, capacity),
      format_(format),
      profile_(std::move(profile)),
      policy_(std::move(policy)),
      meta_width_(shape.kv_dim() <= 256 ? 1 : 2),
      cost_(CostFor(shape.kv_dim(), format)),
      layers_(shape.n_layer) {
  // First reservation: what the policy expects (exact for uniform); the arena grows if needed.
  const double expect = std::clamp(policy_->ExpectedElemsPerToken(), 2.0, 2.0 * D());
  const int Dk = D();
  if (format_.tc()) {
    tc_.resize(shape.n_layer);
    for (int l = 0; l < shape.n_layer; ++l) tc_[l] = TcLayer{MakeTcCodebook(profile_->k[l], Dk), MakeTcCodebook(profile_->v[l], Dk)};
  }
  for (int l = 0; l < shape.n_layer; ++l) {
    LayerStore& s = layers_[l];
    s.bytes_k.assign(Dk + 1, 0);
    s.bytes_v.assign(Dk + 1, 0);
    s.width_k.assign(Dk + 1, 0);
    s.width_v.assign(Dk + 1, 0);
    for (int r = 1; r <= Dk; ++r) {
      s.bytes_k[r] = format_.tc() ? tc_[l].k.ladder[r - 1].bytes : static_cast<int32_t>(format_.Bytes(r));
      s.bytes_v[r] = format_.tc() ? tc_[l].v.ladder[r - 1].bytes : static_cast<int32_t>(format_.Bytes(r));
      s.width_k[r] = format_.tc() ? tc_[l].k.ladder[r - 1].coords : r;
      s.width_v[r] = format_.tc() ? tc_[l].v.ladder[r - 1].coords : r;
    }
    s.meta.assign(static_cast<size_t>(capacity) * 2 * meta_width_, 0);
    s.index.assign(static_cast<size_t>(CeilDiv(capacity, kIndexEvery)), 0);
    Grow(s, static_cast<int64_t>(std::ceil(expect / 2 * capacity)) * 2 * format_.Bytes(1));
  }
}

std::string DynaKvCache::name() const { return "dynakv-" + policy_->name() + "-" + format_.Name(); }

void DynaKvCache::OnClear() {
  for (LayerStore& s : layers_) {
    s.used = 0;
    s.n = 0;
  }
  policy_->Reset();
}

size_t DynaKvCache::BytesUsed() const {
  size_t bytes = 0;
  for (const LayerStore& s : layers_) {
    bytes += static_cast<size_t>(s.used);
    bytes += static_cast<size_t>(s.n) * 2 * meta_width_;
    bytes += static_cast<size_t>(CeilDiv(s.n, kIndexEvery)) * sizeof(uint32_t);
  }
  return bytes;
}

size_t DynaKvCache::BytesReserved() const {
  size_t bytes = 0;
  for (const LayerStore& s : layers_) bytes += s.arena.size() + s.meta.size() + s.index.size() * sizeof(uint32_t);
  return bytes;
}

// Grows the arena to hold need_bytes, by at least 1.5x (amortized appends), never past the worst
// case capacity x 2 full-rank latents. Records are copied; nothing outside the cache points into it.
void DynaKvCache::Grow(LayerStore& s, int64_t need_bytes) {
  if (need_bytes <= s.arena_bytes) return;
  const int64_t worst = static_cast<int64_t>(capacity_) * 2 * format_.Bytes(D());
  const int64_t bytes = std::min(worst, std::max(need_bytes, s.arena_bytes + s.arena_bytes / 2));
  std::vector<uint8_t> bigger(static_cast<size_t>(bytes));  // every read stays inside its record
  if (s.used > 0) std::memcpy(bigger.data(), s.arena.data(), static_cast<size_t>(s.used));
  s.arena.swap(bigger);
  s.arena_bytes = bytes;
}

void DynaKvCache::Append(int layer, bool value, const float* c, int r) {
  LayerStore& s = layers_[layer];
  uint8_t* dst = s.arena.data() + s.used;
  switch (format_.type) {
    case LatentFormat::kTc: {
      const TcLayer& t = tc_[layer];
      const TcAllocation& a = (value ? t.v : t.k).ladder[r - 1];
      const float* inv = (value ? t.v : t.k).inv_sigma.data();
      zt_.resize(D());
      for (int j = 0; j < a.coords; ++j) zt_[j] = c[j] * inv[j];
      TcEncode(zt_.data(), a, D(), dst);
      s.used += a.bytes;
      return;
    }
    case LatentFormat::kF16: Fp32ToFp16Row(c, reinterpret_cast<uint16_t*>(dst), r); break;
    case LatentFormat::kF32: std::memcpy(dst, c, static_cast<size_t>(r) * 4); break;
    default: {
      const int groups = format_.Groups(r);
      std::memset(dst, 0, static_cast<size_t>(format_.Bytes(r)));  // the padding byte, if any
      QuantizeSymLatent(c, r, format_.bits(), format_.GroupSize(r), dst + 2 * groups, reinterpret_cast<uint16_t*>(dst));
    }
  }
  s.used += format_.Bytes(r);
}

void DynaKvCache::Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) {
  LayerStore& s = layers_[layer];
  const int n = plan.n, Dk = D();
  const size_t rows = static_cast<size_t>(n) * Dk;
  xc_.resize(rows);
  ck_.resize(rows);
  cv_.resize(rows);
  ranks_.resize(n);
  EncodeRows(k, profile_->k[layer], n, Dk, xc_.data(), ck_.data());
  EncodeRows(v, profile_->v[layer], n, Dk, xc_.data(), cv_.data());
  policy_->Choose(layer, n, ck_.data(), cv_.data(), x, ranks_.data());

  int64_t need = s.used;
  for (TokenRanks& r : ranks_) {
    r.r_k = std::clamp(r.r_k, 1, Dk);  // a policy bug must not corrupt the arena
    r.r_v = std::clamp(r.r_v, 1, Dk);
    need += s.bytes_k[r.r_k] + s.bytes_v[r.r_v];
  }
  Grow(s, need);
  for (int i = 0; i < n; ++i) {
    AppendRecord(layer, ranks_[i], ck_.data() + static_cast<size_t>(i) * Dk, cv_.data() + static_cast<size_t>(i) * Dk);
  }
}

// Appends one token's record at stored index s.n: its ranks in the metadata, the index entry when
// it starts a block, then the latents.
void DynaKvCache::AppendRecord(int layer, TokenRanks r, const float* ck, const float* cv) {
  LayerStore& s = layers_[layer];
  const int t = s.n;
  if (t % kIndexEvery == 0) s.index[t / kIndexEvery] = static_cast<uint32_t>(s.used);
  uint8_t* m = s.meta.data() + static_cast<size_t>(t) * 2 * meta_width_;
  const int stored[2] = {r.r_k - 1, r.r_v - 1};
  for (int w = 0; w < 2; ++w) {
    m[w * meta_width_] = static_cast<uint8_t>(stored[w] & 0xFF);
    if (meta_width_ == 2) m[w * meta_width_ + 1] = static_cast<uint8_t>(stored[w] >> 8);
  }
  Append(layer, false, ck, r.r_k);
  Append(layer, true, cv, r.r_v);
  ++s.n;
}

void DynaKvCache::ReadKeys(int layer, int first, int n, float* out) const {
  for (int i = 0; i < n; ++i) ReconstructK(layer, first + i, out + static_cast<size_t>(i) * D());
}

void DynaKvCache::ReadValues(int layer, int first, int n, float* out) const {
  for (int i = 0; i < n; ++i) ReconstructV(layer, first + i, out + static_cast<size_t>(i) * D());
}

// Records move toward the front (keep[i] >= i): each kept record is read before anything is written
// over it, so the arena is compacted in place. Metadata and the block index are rebuilt.
Status DynaKvCache::Retain(int layer, const std::vector<std::vector<int>>& keep) {
  DK_RETURN_IF_ERROR(CheckRetain(layer, keep));
  LayerStore& s = layers_[layer];
  const std::vector<int>& k = keep[0];
  std::vector<int> rk(s.n), rv(s.n);
  std::vector<int64_t> off(s.n);
  if (s.n > 0) DecodeBlock(s, 0, s.n, rk.data(), rv.data(), off.data());
  s.n = 0;
  s.used = 0;
  for (int i = 0; i < static_cast<int>(k.size()); ++i) {
    const int t = k[i];
    const int64_t len = s.bytes_k[rk[t]] + s.bytes_v[rv[t]];
    if (off[t] != s.used)
      std::memmove(s.arena.data() + s.used, s.arena.data() + off[t], static_cast<size_t>(len));
    if (i % kIndexEvery == 0) s.index[i / kIndexEvery] = static_cast<uint32_t>(s.used);
    uint8_t* m = s.meta.data() + static_cast<size_t>(i) * 2 * meta_width_;
    const uint8_t* src = s.meta.data() + static_cast<size_t>(t) * 2 * meta_width_;
    if (m != src) std::memmove(m, src, 2 * meta_width_);
    s.used += len;
    ++s.n;
  }
  return Status::Ok();
}

void DynaKvCache::DecodeBlock(const LayerStore& s, int t0, int t1, int* rk, int* rv, int64_t* off) const {
  const int block_start = t0 / kIndexEvery * kIndexEvery;
  int64_t cur = s.index[t0 / kIndexEvery];
  const uint8_t* meta = s.meta.data();
  auto rank = [&](int t, int w) {
    const uint8_t* m = meta + static_cast<size_t>(t) * 2 * meta_width_ + w * meta_width_;
    return (meta_width_ == 1 ? m[0] : (m[0] | (m[1] << 8))) + 1;
  };
  const int32_t* bk = s.bytes_k.data();
  const int32_t* bv = s.bytes_v.data();
  for (int t = block_start; t < t0; ++t) cur += bk[rank(t, 0)] + bv[rank(t, 1)];
  for (int t = t0; t < t1; ++t) {
    rk[t - t0] = rank(t, 0);
    rv[t - t0] = rank(t, 1);
    off[t - t0] = cur;
    cur += bk[rk[t - t0]] + bv[rv[t - t0]];
  }
}

void DynaKvCache::ReadLatent(int layer, bool value, int64_t off, int r, float* dst) const {
  const uint8_t* src = layers_[layer].arena.data() + off;
  switch (format_.type) {
    case LatentFormat::kTc: TcDecode(src, (value ? tc_[layer].v : tc_[layer].k).ladder[r - 1], D(), dst); break;
    case LatentFormat::kF16: Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(src), dst, r); break;
    case LatentFormat::kF32: std::memcpy(dst, src, static_cast<size_t>(r) * 4); break;
    default:
      DequantizeSymLatent(src + 2 * format_.Groups(r), reinterpret_cast<const uint16_t*>(src), r, format_.bits(),
                          format_.GroupSize(r), dst);
  }
}

TokenRanks DynaKvCache::Ranks(int layer, int t) const {
  int rk, rv;
  int64_t off;
  DecodeBlock(layers_[layer], t, t + 1, &rk, &rv, &off);
  return TokenRanks{rk, rv};
}

void DynaKvCache::Reconstruct(int layer, int t, bool value, double* dst) const {
  const int Dk = D();
  int rk, rv;
  int64_t off;
  DecodeBlock(layers_[layer], t, t + 1, &rk, &rv, &off);
  const LayerStore& s = layers_[layer];
  const int rank = value ? rv : rk;
  const int r = (value ? s.width_v : s.width_k)[rank];
  std::vector<float> c(std::max(r, 1));
  ReadLatent(layer, value, value ? off + s.bytes_k[rk] : off, rank, c.data());
  if (format_.tc()) {
    const float* sg = (value ? tc_[layer].v : tc_[layer].k).sigma.data();
    for (int j = 0; j < r; ++j) c[j] *= sg[j];
  }
  const BasisSet& b = value ? profile_->v[layer] : profile_->k[layer];
  for (int i = 0; i < Dk; ++i) {
    double acc = b.mean[i];
    for (int j = 0; j < r; ++j) acc += static_cast<double>(b.basis[static_cast<size_t>(i) * Dk + j]) * c[j];
    dst[i] = acc;
  }
}

void DynaKvCache::ReconstructK(int layer, int t, float* dst) const {
  std::vector<double> r(D());
  Reconstruct(layer, t, false, r.data());
  for (int i = 0; i < D(); ++i) dst[i] = static_cast<float>(r[i]);
}

void DynaKvCache::ReconstructV(int layer, int t, float* dst) const {
  std::vector<double> r(D());
  Reconstruct(layer, t, true, r.data());
  for (int i = 0; i < D(); ++i) dst[i] = static_cast<float>(r[i]);
}

void DynaKvCache::AttendReference(int layer, const KvPlan& plan, const float* q, float* out) const {
  const int d = shape_.head_dim, Hq = shape_.n_head, group = Hq / shape_.n_head_kv, Dk = D();
  const int T = layers_[layer].n, before = T - plan.n;
  std::vector<double> kh(static_cast<size_t>(T) * Dk), vh(static_cast<size_t>(T) * Dk), p(T);
  for (int t = 0; t < T; ++t) {
    Reconstruct(layer, t, false, &kh[static_cast<size_t>(t) * Dk]);
    Reconstruct(layer, t, true, &vh[static_cast<size_t>(t) * Dk]);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (int i = 0; i < plan.n; ++i) {
    const int visible = before + i + 1;
    for (int h = 0; h < Hq; ++h) {
      const float* qh = q + (static_cast<size_t>(i) * Hq + h) * d;
      const int64_t col = static_cast<int64_t>(h / group) * d;
      double mx = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (int t = 0; t < visible; ++t) {
        double s = 0.0;
        for (int e = 0; e < d; ++e) s += static_cast<double>(qh[e]) * kh[t * Dk + col + e];
        p[t] = s * scale;
        mx = std::max(mx, p[t]);
      }
      for (int t = 0; t < visible; ++t) sum += (p[t] = std::exp(p[t] - mx));
      float* oh = out + (static_cast<size_t>(i) * Hq + h) * d;
      for (int e = 0; e < d; ++e) {
        double acc = 0.0;
        for (int t = 0; t < visible; ++t) acc += p[t] * vh[t * Dk + col + e];
        oh[e] = static_cast<float>(acc / sum);
      }
    }
  }
}

// ---- Attention on the latents ------------------------------------------------------------------

void DynaKvCache::ProjectQueries(int layer, int n, const float* q) {
  const int d = shape_.head_dim, Hq = shape_.n_head, group = Hq / shape_.n_head_kv, Dk = D();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const BasisSet& bk = profile_->k[layer];
  qt_.resize(static_cast<size_t>(n) * Hq * Dk);
  mterm_.resize(static_cast<size_t>(n) * Hq);
  for (int h = 0; h < Hq; ++h) {
    const int64_t g = h / group;
    // q~_h = U_K,h^T q_h: U_K,h = rows g*d .. g*d+d-1 of U_K, i.e. [d][D] at basis + g*d*D.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, Dk, d, scale, q + h * d, Hq * d,
                bk.basis.data() + g * d * Dk, Dk, 0.0f, qt_.data() + static_cast<size_t>(h) * Dk, Hq * Dk);
    for (int i = 0; i < n; ++i)
      mterm_[static_cast<size_t>(i) * Hq + h] = scale * Dot(q + (static_cast<size_t>(i) * Hq + h) * d, bk.mean.data() + g * d, d);
  }
  if (format_.tc()) {  // the stored numbers are z = c / sigma: q . c = (q * sigma) . z
    const float* sg = tc_[layer].k.sigma.data();
    for (int64_t i = 0; i < static_cast<int64_t>(n) * Hq; ++i) {
      float* row = qt_.data() + i * Dk;
#pragma omp simd
      for (int j = 0; j < Dk; ++j) row[j] *= sg[j];
    }
  }
}

void DynaKvCache::ProjectOutputs(int layer, int n, int r_max, float* out) {
  const int d = shape_.head_dim, Hq = shape_.n_head, group = Hq / shape_.n_head_kv, Dk = D();
  const BasisSet& bv = profile_->v[layer];
  if (format_.tc()) {  // attention over z = c / sigma: back to c
    const float* sg = tc_[layer].v.sigma.data();
    for (int64_t i = 0; i < static_cast<int64_t>(n) * Hq; ++i) {
      float* row = att_.data() + i * Dk;
#pragma omp simd
      for (int j = 0; j < r_max; ++j) row[j] *= sg[j];
    }
  }
  for (int h = 0; h < Hq; ++h) {
    const int64_t g = h / group;
    // o_h = U_V,h a_h + mu_V,h; a_h is zero past r_max, so only U_V,h[:, :r_max] is needed.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, r_max, 1.0f, att_.data() + static_cast<size_t>(h) * Dk,
                Hq * Dk, bv.basis.data() + g * d * Dk, Dk, 0.0f, out + h * d, Hq * d);
    for (int i = 0; i < n; ++i) {
      float* o = out + (static_cast<size_t>(i) * Hq + h) * d;
      const float* mu = bv.mean.data() + g * d;
#pragma omp simd
      for (int e = 0; e < d; ++e) o[e] += mu[e];
    }
  }
}

void DynaKvCache::Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) {
  ProjectQueries(layer, plan.n, q);
  if (plan.n >= kGemmMinBatch) {
    AttendGemm(layer, plan, out, pool);
  } else {
    AttendLatent(layer, plan, out, pool);
  }
}

namespace {

int RoundUp8(int r) { return (r + 7) & ~7; }
// Row stride of a block of decoded latents: D rounded up to 16 (ops/latent_block.h's padding),
// plus 16 so that rows are not 4 KiB apart (a column walk would fall in one L1 set).
int64_t LatentBlockStride(int D) { return ((D + 15) & ~15) + 16; }

}  // namespace

// The online-softmax step of a block whose scores are in p.scores ([Hq][B]): new running max per
// head, what was accumulated under the old one rescaled, the scores turned into weights.
void DynaKvCache::OnlineSoftmax(int nb, Partial& p) const {
  const int Hq = shape_.n_head, Dp = RoundUp8(D());
  constexpr int B = kIndexEvery;
  for (int h = 0; h < Hq; ++h) {
    float* sh = p.scores.data() + h * B;
    float mx = p.m[h];
#pragma omp simd reduction(max : mx)
    for (int t = 0; t < nb; ++t) mx = std::max(mx, sh[t]);
    const float f = std::exp(p.m[h] - mx);  // 0 on the first block (m = -inf)
    p.m[h] = mx;
    if (f != 1.0f) {
      float* ah = p.acc.data() + static_cast<size_t>(h) * Dp;
      for (int j = 0; j < p.rmax_v; ++j) ah[j] *= f;
    }
    p.l[h] = p.l[h] * f + ExpShiftSum(sh, nb, mx);
  }
}

// Decodes the block's K latents (value = false) or V latents into p.z ([B][ldz] floats, whatever
// the storage: ReadLatent), their widths rounded up to 8 into p.width, each row zero from its width
// to the block's widest rounded up to 16 (ops/latent_block.h's layout); returns the widest, rounded
// up to 8.
int DynaKvCache::DecodeLatentBlock(int layer, bool value, int nb, Partial& p) const {
  const LayerStore& s = layers_[layer];
  const int64_t ldz = LatentBlockStride(D());
  float* z = p.z.data();
  int* width = p.width.data();
  int wmax = 0;
  for (int t = 0; t < nb; ++t) {
    const int r = value ? p.rv[t] : p.rk[t];
    ReadLatent(layer, value, p.off[t] + (value ? s.bytes_k[p.rk[t]] : 0), r, z + t * ldz);
    width[t] = value ? s.width_v[r] : s.width_k[r];
    wmax = std::max(wmax, width[t]);
  }
  const int wpad = (wmax + 15) & ~15;
  for (int t = 0; t < nb; ++t) {
    std::fill(z + t * ldz + width[t], z + t * ldz + wpad, 0.0f);
    width[t] = RoundUp8(width[t]);
  }
  return RoundUp8(wmax);
}

// One block of cells [b0, b0 + nb) for one query (ranks and byte offsets in p.rk/rv/off): the
// block's K latents decoded once (shared by all heads), the scores of every head as one
// register-blocked product (ops/latent_block.h), the online-softmax update per head, then the V
// latents decoded into the same buffer and accumulated the same way. tc: the queries are already
// multiplied by K's sigmas and the accumulated values are z's (ProjectOutputs scales).
void DynaKvCache::AttendBlock(int layer, const float* qp, const float* mterm, int nb, Partial& p) const {
  const int Hq = shape_.n_head, Dp = RoundUp8(D());
  const int64_t ldz = LatentBlockStride(D());
  constexpr int B = kIndexEvery;
  float* sc = p.scores.data();  // [Hq][B], head-major so the softmax loops run over cells
  for (int h = 0; h < Hq; ++h)
    for (int t = 0; t < nb; ++t) sc[h * B + t] = mterm[h];
  DecodeLatentBlock(layer, false, nb, p);
  LatentScores(qp, Dp, Hq, p.z.data(), ldz, p.width.data(), nb, sc, B);
  OnlineSoftmax(nb, p);
  const int wv = DecodeLatentBlock(layer, true, nb, p);
  LatentAccumulate(sc, B, Hq, p.z.data(), ldz, p.width.data(), nb, p.acc.data(), Dp);
  p.rmax_v = std::max(p.rmax_v, wv);
}

// One thread's share of a query: cells [t0, t1) (t0 a multiple of B), block by block.
// p.m / p.l / p.acc carry the online softmax over blocks.
//   qp: [Hq][Dp] projected query heads (zero-padded)   mterm: [Hq]
void DynaKvCache::AttendRange(int layer, const float* qp, const float* mterm, int t0, int t1, Partial& p) const {
  const LayerStore& s = layers_[layer];
  for (int b0 = t0; b0 < t1; b0 += kIndexEvery) {
    const int nb = std::min(t1, b0 + kIndexEvery) - b0;
    DecodeBlock(s, b0, b0 + nb, p.rk.data(), p.rv.data(), p.off.data());
    AttendBlock(layer, qp, mterm, nb, p);
  }
}

// Small batches (decode): per query, the visible cells are split into blocks of B over the
// threads (latents are shared by all heads, so each record is read once per query), and the
// threads' partial softmaxes are merged.
void DynaKvCache::AttendLatent(int layer, const KvPlan& plan, float* out, ThreadPool& pool) {
  const int Hq = shape_.n_head, Dk = D(), Dp = RoundUp8(Dk);
  const LayerStore& s = layers_[layer];
  partials_.resize(pool.size());
  for (Partial& p : partials_) {
    p.m.resize(Hq);
    p.l.resize(Hq);
    p.acc.resize(static_cast<size_t>(Hq) * Dp);
    p.scores.resize(static_cast<size_t>(kIndexEvery) * Hq);
    p.rk.resize(kIndexEvery);
    p.rv.resize(kIndexEvery);
    p.off.resize(kIndexEvery);
    p.z.resize(static_cast<size_t>(kIndexEvery) * LatentBlockStride(Dk));
    p.width.resize(kIndexEvery);
  }
  att_.assign(static_cast<size_t>(plan.n) * Hq * Dk, 0.0f);
  qpad_.assign(static_cast<size_t>(Hq) * Dp, 0.0f);
  int r_max = 1;
  for (int i = 0; i < plan.n; ++i) {
    for (int h = 0; h < Hq; ++h)
      std::memcpy(&qpad_[static_cast<size_t>(h) * Dp], &qt_[(static_cast<size_t>(i) * Hq + h) * Dk],
                  static_cast<size_t>(Dk) * 4);
    for (Partial& p : partials_) {
      std::fill(p.m.begin(), p.m.end(), -std::numeric_limits<float>::infinity());
      std::fill(p.l.begin(), p.l.end(), 0.0f);
      std::fill(p.acc.begin(), p.acc.end(), 0.0f);
      p.rmax_v = 0;
    }
    const int T = s.n - plan.n + i + 1;  // stored before the batch, plus the batch's tokens up to i
    const float* mterm = mterm_.data() + static_cast<size_t>(i) * Hq;
    pool.ParallelFor(CeilDiv(T, kIndexEvery), [&](int64_t b, int64_t e, int tid) {
      if (b >= e) return;
      AttendRange(layer, qpad_.data(), mterm, static_cast<int>(b * kIndexEvery),
                  static_cast<int>(std::min<int64_t>(T, e * kIndexEvery)), partials_[tid]);
    });
    // Merge: a_h = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
    float* ai = att_.data() + static_cast<size_t>(i) * Hq * Dk;
    for (int h = 0; h < Hq; ++h) {
      float M = -std::numeric_limits<float>::infinity();
      for (const Partial& p : partials_) M = std::max(M, p.m[h]);
      float L = 0.0f;
      for (const Partial& p : partials_)
        if (p.rmax_v > 0) L += std::exp(p.m[h] - M) * p.l[h];
      float* a = ai + static_cast<size_t>(h) * Dk;
      for (const Partial& p : partials_) {
        if (p.rmax_v == 0) continue;
        const float w = std::exp(p.m[h] - M) / L;
        const float* ph = p.acc.data() + static_cast<size_t>(h) * Dp;
        const int r = std::min(p.rmax_v, Dk);
        for (int j = 0; j < r; ++j) a[j] += w * ph[j];
        r_max = std::max(r_max, r);
      }
    }
  }
  ProjectOutputs(layer, plan.n, r_max, out);
}

// Prefill: the visible latents are converted once to dense fp32 [T][r_max] (zero-padded: the
// padding adds nothing to a dot product), then per head S = Q~ C_K^T and A = P C_V as GEMMs.
void DynaKvCache::AttendGemm(int layer, const KvPlan& plan, float* out, ThreadPool& pool) {
  const int Hq = shape_.n_head, Dk = D();
  const LayerStore& s = layers_[layer];
  const int n = plan.n, T = s.n, before = T - n;
  std::vector<int> rk(T), rv(T);
  std::vector<int64_t> off(T);
  DecodeBlock(s, 0, T, rk.data(), rv.data(), off.data());
  int rmax_k = 1, rmax_v = 1;  // widest latents (at least 1 column: tc codes may be empty)
  for (int t = 0; t < T; ++t) {
    rmax_k = std::max(rmax_k, s.width_k[rk[t]]);
    rmax_v = std::max(rmax_v, s.width_v[rv[t]]);
  }
  kd_.resize(static_cast<size_t>(T) * rmax_k);
  vd_.resize(static_cast<size_t>(T) * rmax_v);
  pool.ParallelForChunked(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* kt = kd_.data() + t * rmax_k;
      float* vt = vd_.data() + t * rmax_v;
      ReadLatent(layer, false, off[t], rk[t], kt);
      ReadLatent(layer, true, off[t] + s.bytes_k[rk[t]], rv[t], vt);
      std::fill(kt + s.width_k[rk[t]], kt + rmax_k, 0.0f);
      std::fill(vt + s.width_v[rv[t]], vt + rmax_v, 0.0f);
    }
  });
  s_.resize(static_cast<size_t>(n) * T);
  att_.resize(static_cast<size_t>(n) * Hq * Dk);
  for (int h = 0; h < Hq; ++h) {
    float* S = s_.data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, T, rmax_k, 1.0f, qt_.data() + static_cast<size_t>(h) * Dk,
                Hq * Dk, kd_.data(), rmax_k, 0.0f, S, T);
    pool.ParallelForChunked(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        float* row = S + i * T;
        const int visible = before + static_cast<int>(i) + 1;
        const float m = mterm_[static_cast<size_t>(i) * Hq + h];
        for (int t = 0; t < visible; ++t) row[t] += m;
        Softmax(row, visible);
        for (int t = visible; t < T; ++t) row[t] = 0.0f;
      }
    });
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, rmax_v, T, 1.0f, S, T, vd_.data(), rmax_v, 0.0f,
                att_.data() + static_cast<size_t>(h) * Dk, Hq * Dk);
  }
  ProjectOutputs(layer, n, rmax_v, out);
}

// ---- Factory --------------------------------------------------------------------------------------

StatusOr<std::unique_ptr<DynaKvCache>> CreateDynaKvCacheFromProfile(const KvConfig& config, const KvModelInfo& model,
                                                                    int capacity,
                                                                    std::shared_ptr<const DynaKvProfile> profile,
                                                                    const std::string& origin) {
  if (profile == nullptr) return InvalidArgument("dynakv: no profile given");
  int group;
  DK_ASSIGN_OR_RETURN(group, config.options.Int("--latent-group", 0, 0, 1 << 20));
  // A router trained for tc latents runs on them unless --kv-dtype says otherwise.
  LatentFormat format;
  DK_ASSIGN_OR_RETURN(format,
                      ParseLatentFormat(config.options.String("--kv-dtype", profile->tc_router() ? "tc" : "f16"), group));
  DK_RETURN_IF_ERROR(ValidateProfile(*profile, origin));
  DK_RETURN_IF_ERROR(CheckProfileMatchesModel(*profile, model, origin));
  const KvShape& shape = model.shape;
  if (format.tc() && shape.kv_dim() % 8 != 0)
    return InvalidArgument("--kv-dtype tc: the latent width D = " + std::to_string(shape.kv_dim()) +
                           " must be a multiple of 8 (codes are packed 8 at a time)");
  if (shape.n_head_kv <= 0 || shape.n_head % shape.n_head_kv != 0)
    return InvalidArgument("dynakv: " + std::to_string(shape.n_head) + " query heads are not a multiple of " +
                           std::to_string(shape.n_head_kv) + " KV heads");
  // Record offsets are 32-bit byte counts.
  if (static_cast<int64_t>(capacity) * 2 * format.Bytes(shape.kv_dim()) > std::numeric_limits<uint32_t>::max())
    return InvalidArgument("dynakv: a capacity of " + std::to_string(capacity) + " tokens at D = " +
                           std::to_string(shape.kv_dim()) + " overflows the 32-bit record offsets");
  RankPolicyContext ctx;
  ctx.n_layer = shape.n_layer;
  ctx.kv_dim = shape.kv_dim();
  ctx.n_embd = shape.n_embd;
  ctx.levels = profile->levels;
  ctx.cost = DynaKvCache::CostFor(shape.kv_dim(), format);
  ctx.profile = profile;
  ctx.origin = origin;
  std::unique_ptr<RankPolicy> policy;
  DK_ASSIGN_OR_RETURN(policy, CreateRankPolicy(config, ctx));
  return std::make_unique<DynaKvCache>(shape, capacity, format, std::move(profile), std::move(policy));
}

StatusOr<std::shared_ptr<const DynaKvProfile>> LoadSharedProfile(const std::string& path) {
  // One copy per file for the whole process: every cache (sequence, server slot, eval run) built
  // on a profile reads the same bases and router. A file that changed on disk is loaded again.
  static std::mutex mu;
  static std::map<std::string, std::pair<std::string, std::weak_ptr<const DynaKvProfile>>> loaded;
  struct stat st;
  const std::string stamp = ::stat(path.c_str(), &st) == 0
                                ? std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) +
                                      ":" + std::to_string(st.st_size)
                                : "";
  std::lock_guard<std::mutex> lock(mu);
  auto it = loaded.find(path);
  if (it != loaded.end() && it->second.first == stamp && !stamp.empty())
    if (auto p = it->second.second.lock()) return p;
  DynaKvProfile profile;
  DK_ASSIGN_OR_RETURN(profile, LoadProfile(path));
  auto shared = std::make_shared<const DynaKvProfile>(std::move(profile));
  loaded[path] = {stamp, shared};
  return shared;
}

namespace {

StatusOr<std::unique_ptr<KvCache>> CreateDynaKv(const KvConfig& config, const KvModelInfo& model, int capacity) {
  const std::string path = config.options.String("--profile", "");
  if (path.empty()) return InvalidArgument("--profile: dynakv needs a calibrated profile (dynakv calibrate)");
  std::shared_ptr<const DynaKvProfile> profile;
  DK_ASSIGN_OR_RETURN(profile, LoadSharedProfile(path));
  std::unique_ptr<DynaKvCache> cache;
  DK_ASSIGN_OR_RETURN(cache, CreateDynaKvCacheFromProfile(config, model, capacity, std::move(profile), path));
  return std::unique_ptr<KvCache>(std::move(cache));
}

}  // namespace

const KvMethod& DynaKvMethod() {
  static const KvMethod m{
      "dynakv",
      "low-rank latents on a calibrated basis, each token its own rank (--profile)",
      {{"--kv-dtype", "TYPE", "storage of cached rows or latents: f16 (default) or f32; dynakv also q8, q4, tc (rank x precision)"},
       {"--latent-group", "G", "dynakv q8/q4: numbers per fp16 scale (default 0: one scale per latent)"},
       {"--profile", "FILE", "dynakv: calibrated profile from 'dynakv calibrate' (or 'train-router')"},
       {"--rank-policy", "NAME", "dynakv: uniform (default), energy, or router (a profile from train-router)"},
       {"--rank", "N", "dynakv uniform: rank of every token's latent (1..D)"},
       {"--tau", "X", "dynakv energy: fraction of each token's latent energy to keep"},
       {"--kv-budget", "X", "dynakv: cache bytes as a fraction of the fp16 full cache"},
       {"--k-share", "X", "dynakv uniform with --kv-budget: share of the bytes given to keys (default 0.5)"}},
      &CreateDynaKv};
  return m;
}

}  // namespace dk
