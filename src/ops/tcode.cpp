// Transform-coded latents (ops/tcode.h): the group quantizer, the records, and the ladder of
// least-distortion bit allocations.
#include "ops/tcode.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/fp16.h"
#include "core/hash.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__)
#define DK_TC_AVX2 1
#include <immintrin.h>
#endif

namespace dk {

namespace {

// Widths a group may take (7 bits never beats 8 by enough to be worth a code path of its own).
constexpr std::array<int, 8> kWidths = {0, 1, 2, 3, 4, 5, 6, 8};

// Clipping ratios tried per width: the scale is ratio x amax / o; few bits gain from clipping the
// rare large numbers, eight bits do not.
const std::vector<float>& ClipRatios(int b) {
  static const std::vector<float> low = {1.0f, 0.9f, 0.8f, 0.7f, 0.6f, 0.5f, 0.4f};
  static const std::vector<float> mid = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f};
  static const std::vector<float> high = {1.0f};
  return b <= 2 ? low : b <= 4 ? mid : high;
}

float Finite(float x) { return std::isfinite(x) ? x : 0.0f; }

int Code(float x, float inv_s, float o, int top) {
  const float t = std::nearbyint(Finite(x) * inv_s + o);
  return static_cast<int>(std::clamp(t, 0.0f, static_cast<float>(top)));
}

// Quantizes n numbers at b bits: the fp16 scale of least squared error among the clipping
// ratios, the codes into q[n]. A group of zeros (or non-finite numbers only) gets scale 0.
uint16_t QuantizeGroup(const float* z, int n, int b, uint8_t* q) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(Finite(z[i])));
  const int top = (1 << b) - 1;
  const float o = 0.5f * static_cast<float>(top);
  std::fill(q, q + std::max(n, 0), uint8_t{0});
  if (!(amax > 0.0f)) return 0;
  uint16_t best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (float ratio : ClipRatios(b)) {
    const uint16_t s16 = Fp32ToFp16(std::min(ratio * amax / o, 65504.0f));
    const float s = Fp16ToFp32(s16);
    if (!(s > 0.0f)) continue;
    const float inv = 1.0f / s;
    double err = 0.0;
    for (int i = 0; i < n; ++i) {
      const float d = Finite(z[i]) - s * (static_cast<float>(Code(z[i], inv, o, top)) - o);
      err += static_cast<double>(d) * d;
    }
    if (err < best_err) {
      best_err = err;
      best = s16;
    }
  }
  const float s = Fp16ToFp32(best);
  if (s > 0.0f)
    for (int i = 0; i < n; ++i) q[i] = static_cast<uint8_t>(Code(z[i], 1.0f / s, o, top));
  return best;
}

// Codes of a group: 8 at a time, each 8 codes exactly b bytes.
void PackCodes(const uint8_t* q, int n, int b, uint8_t* dst) {
  for (int i = 0; i < n; i += 8) {
    uint64_t x = 0;
    for (int k = 0; k < 8; ++k) x |= static_cast<uint64_t>(q[i + k]) << (k * b);
    for (int k = 0; k < b; ++k) dst[k] = static_cast<uint8_t>(x >> (8 * k));
    dst += b;
  }
}

uint64_t Load(const uint8_t* p, int b) {
  uint64_t x = 0;
  for (int k = 0; k < b; ++k) x |= static_cast<uint64_t>(p[k]) << (8 * k);
  return x;
}

double GroupEigenSum(const std::vector<double>& ev, int D, int g) {
  double s = 0.0;
  for (int j = g * kTcGroup, e = j + TcGroupSize(D, g); j < e; ++j) s += std::max(0.0, ev[j]);
  return s;
}

// The relative errors, measured once on fixed samples: [bits 0..8][n / 8 - 1].
struct ErrorTable {
  double e[kTcMaxBits + 1][kTcGroup / 8];
  ErrorTable() {
    constexpr int kNumbers = 16384;
    std::vector<float> z(kNumbers);
    for (int i = 0; i < kNumbers; i += 2) {  // Box-Muller on counter-based uniforms
      const double u1 = (static_cast<double>(Mix64(2 * i + 1) >> 11) + 0.5) * 0x1.0p-53;
      const double u2 = (static_cast<double>(Mix64(2 * i + 2) >> 11) + 0.5) * 0x1.0p-53;
      const double rad = std::sqrt(-2.0 * std::log(u1));
      z[i] = static_cast<float>(rad * std::cos(2 * M_PI * u2));
      z[i + 1] = static_cast<float>(rad * std::sin(2 * M_PI * u2));
    }
    std::vector<uint8_t> q(kTcGroup);
    for (int c = 0; c < kTcGroup / 8; ++c) {
      const int n = 8 * (c + 1);
      e[0][c] = 1.0;
      for (int b = 1; b <= kTcMaxBits; ++b) {
        double err = 0.0, count = 0.0;
        const float o = 0.5f * static_cast<float>((1 << b) - 1);
        for (int i = 0; i + n <= kNumbers; i += n) {
          const float s = Fp16ToFp32(QuantizeGroup(z.data() + i, n, b, q.data()));
          for (int j = 0; j < n; ++j) {
            const double d = z[i + j] - s * (static_cast<float>(q[j]) - o);
            err += d * d;
          }
          count += n;
        }
        e[b][c] = err / count;
      }
    }
  }
};

}  // namespace

int TcRecordBytes(const uint8_t* bits, int D) {
  int bytes = 0;
  for (int g = 0; g < TcGroups(D); ++g)
    if (bits[g] > 0) bytes += 2 + TcGroupSize(D, g) * bits[g] / 8;
  return (bytes + 1) & ~1;
}

double TcRelativeError(int bits, int n) {
  static const ErrorTable table;
  const int b = std::clamp(bits, 0, kTcMaxBits);
  const int c = std::clamp((n + 7) / 8, 1, kTcGroup / 8) - 1;
  return table.e[b][c];
}

std::vector<TcAllocation> TcLadder(const std::vector<double>& ev, int D) {
  const int G = TcGroups(D), W = static_cast<int>(kWidths.size());
  int max_bytes = 0;
  for (int g = 0; g < G; ++g) max_bytes += 2 + TcGroupSize(D, g);
  const int B = max_bytes + 1;
  const double inf = std::numeric_limits<double>::infinity();
  // dp[g][bytes][w]: least distortion of groups [0, g) using `bytes` raw bytes, group g - 1 at
  // width index w; from[...] the width index of group g - 2 (the path back).
  auto at = [&](int g, int bytes, int w) { return (static_cast<size_t>(g) * B + bytes) * W + w; };
  std::vector<double> dp(static_cast<size_t>(G + 1) * B * W, inf);
  std::vector<int8_t> from(dp.size(), -1);
  dp[at(0, 0, W - 1)] = 0.0;  // before the first group any width may follow
  for (int g = 0; g < G; ++g) {
    const int n = TcGroupSize(D, g);
    const double lambda = GroupEigenSum(ev, D, g);
    for (int bytes = 0; bytes < B; ++bytes)
      for (int wp = 0; wp < W; ++wp) {
        const double d0 = dp[at(g, bytes, wp)];
        if (d0 == inf) continue;
        for (int w = 0; w <= wp; ++w) {
          const int b = kWidths[w];
          const int nb = bytes + (b > 0 ? 2 + n * b / 8 : 0);
          const double d = d0 + lambda * TcRelativeError(b, n);
          if (d < dp[at(g + 1, nb, w)]) {
            dp[at(g + 1, nb, w)] = d;
            from[at(g + 1, nb, w)] = static_cast<int8_t>(wp);
          }
        }
      }
  }
  // best[budget]: the final state of least distortion within `budget` bytes (padded to even).
  std::vector<std::pair<int, int>> best(B + 2, {-1, -1});
  {
    double bd = inf;
    std::pair<int, int> bs{-1, -1};
    for (int budget = 0; budget < B + 2; ++budget) {
      for (int raw = std::max(0, budget - 1); raw <= std::min(budget, B - 1); ++raw) {
        if (((raw + 1) & ~1) != budget) continue;
        for (int w = 0; w < W; ++w)
          if (dp[at(G, raw, w)] < bd) {
            bd = dp[at(G, raw, w)];
            bs = {raw, w};
          }
      }
      best[budget] = bs;
    }
  }
  std::vector<TcAllocation> ladder(D);
  for (int r = 1; r <= D; ++r) {
    const auto [raw, w_last] = best[std::min(2 * r, B + 1)];
    TcAllocation& a = ladder[r - 1];
    a.bits.assign(G, 0);
    a.distortion = dp[at(G, raw, w_last)];
    int bytes = raw, w = w_last;
    for (int g = G; g > 0; --g) {
      a.bits[g - 1] = static_cast<uint8_t>(kWidths[w]);
      const int b = kWidths[w];
      const int wp = from[at(g, bytes, w)];
      bytes -= b > 0 ? 2 + TcGroupSize(D, g - 1) * b / 8 : 0;
      w = wp;
    }
    a.active = 0;
    a.coords = 0;
    for (int g = 0; g < G && a.bits[g] > 0; ++g) {
      ++a.active;
      a.coords += TcGroupSize(D, g);
    }
    a.bytes = TcRecordBytes(a.bits.data(), D);
  }
  return ladder;
}

void TcEncode(const float* z, const TcAllocation& a, int D, uint8_t* dst) {
  std::memset(dst, 0, static_cast<size_t>(a.bytes));
  auto* scales = reinterpret_cast<uint16_t*>(dst);
  uint8_t* codes = dst + 2 * a.active;
  uint8_t q[kTcGroup];
  for (int g = 0; g < a.active; ++g) {
    const int n = TcGroupSize(D, g), b = a.bits[g];
    const uint16_t s = QuantizeGroup(z + g * kTcGroup, n, b, q);
    std::memcpy(scales + g, &s, 2);
    PackCodes(q, n, b, codes);
    codes += n * b / 8;
  }
}

void TcDecode(const uint8_t* src, const TcAllocation& a, int D, float* out) {
  const uint8_t* codes = src + 2 * a.active;
  for (int g = 0; g < a.active; ++g) {
    const int n = TcGroupSize(D, g), b = a.bits[g];
    uint16_t s16;
    std::memcpy(&s16, src + 2 * g, 2);
    const float s = Fp16ToFp32(s16), so = s * 0.5f * static_cast<float>((1 << b) - 1);
    float* o = out + g * kTcGroup;
#if DK_TC_AVX2
    // pdep spreads the 8 codes of b bits (b bytes) into 8 bytes, which widen to 8 lanes.
    const uint64_t spread = 0x0101010101010101ull * ((1u << b) - 1);
    const __m256 vs = _mm256_set1_ps(s), vso = _mm256_set1_ps(-so);
    for (int i = 0; i < n; i += 8) {
      // A whole 8-byte load (the bytes past the b used are not in `spread`) while it stays
      // inside the record.
      uint64_t x;
      if (codes + 8 <= src + a.bytes)
        std::memcpy(&x, codes, 8);
      else
        x = Load(codes, b);
      const __m256i q = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(_pdep_u64(x, spread))));
      _mm256_storeu_ps(o + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), vs, vso));
      codes += b;
    }
#else
    const uint64_t mask = (uint64_t{1} << b) - 1;
    for (int i = 0; i < n; i += 8) {
      const uint64_t x = Load(codes, b);
      for (int k = 0; k < 8; ++k) o[i + k] = s * static_cast<float>((x >> (k * b)) & mask) - so;
      codes += b;
    }
#endif
  }
}

namespace scalar {

void TcDecode(const uint8_t* src, const TcAllocation& a, int D, float* out) {
  const uint8_t* codes = src + 2 * a.active;
  for (int g = 0; g < a.active; ++g) {
    const int n = TcGroupSize(D, g), b = a.bits[g];
    const float s = Fp16ToFp32(static_cast<uint16_t>(src[2 * g] | (src[2 * g + 1] << 8)));
    const float o = 0.5f * static_cast<float>((1 << b) - 1);
    for (int i = 0; i < n; ++i) {
      int q = 0;
      for (int k = 0; k < b; ++k) {
        const int bit = i * b + k;
        q |= ((codes[bit / 8] >> (bit % 8)) & 1) << k;
      }
      out[g * kTcGroup + i] = s * (static_cast<float>(q) - o);
    }
    codes += n * b / 8;
  }
}

}  // namespace scalar

}  // namespace dk
