// The register-blocked latent attention products (ops/latent_block.h), AVX2 and AVX-512 where the
// CPU has them, against their scalar references, on blocks whose shapes hit every tile and remainder: head counts that are and are not
// multiples of 4, token counts around the 4-token tile, widths from 0 to past 32-column strips
// (mixed within a block, as a router's choices are), and strides that are not the widths.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "ops/latent_block.h"

namespace dk {
namespace {

struct Case {
  int nh, nt;
  std::vector<int> width;
};

double MaxRelativeDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double scale = 1e-6, diff = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    scale = std::max(scale, static_cast<double>(std::fabs(b[i])));
    diff = std::max(diff, static_cast<double>(std::fabs(a[i] - b[i])));
  }
  return diff / scale;
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  std::mt19937 rng(7);
  for (int nh : {1, 3, 4, 8, 13, 32})
    for (int nt : {1, 3, 4, 5, 17, 64}) {
      Case c{nh, nt, {}};
      const int kind = (nh + nt) % 3;  // uniform, mixed, mixed with empty codes
      for (int t = 0; t < nt; ++t) {
        int w = 8 * static_cast<int>(rng() % 21);  // 0..160
        if (kind == 0) w = 104;
        if (kind == 1 && w == 0) w = 8;
        c.width.push_back(w);
      }
      cases.push_back(c);
    }
  return cases;
}

TEST(LatentBlock, ScoresAndAccumulateMatchScalarReference) {
  int tested = 0;
  for (QdotIsa isa : {QdotIsa::kAvx2, QdotIsa::kAvx512Vnni}) {
  if (!CpuHasQdotIsa(isa)) continue;
  ++tested;
  SCOPED_TRACE(QdotIsaName(isa));
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  for (const Case& c : Cases()) {
    int wmax = 0;
    for (int w : c.width) wmax = std::max(wmax, w);
    const int64_t ld = ((wmax + 15) & ~15) + 24;  // padding past the contract's, not a multiple of 16
    std::vector<float> q(c.nh * ld), z(c.nt * ld, 0.0f), p(c.nh * c.nt + 5);
    for (float& v : q) v = nd(rng);
    for (int t = 0; t < c.nt; ++t)
      for (int j = 0; j < c.width[t]; ++j) z[t * ld + j] = nd(rng);
    for (float& v : p) v = std::fabs(nd(rng));
    const int64_t lds = c.nt + 5;
    std::vector<float> s_fast(c.nh * lds), s_ref;
    for (float& v : s_fast) v = nd(rng);  // the products add to what is there
    s_ref = s_fast;
    LatentScores(isa, q.data(), ld, c.nh, z.data(), ld, c.width.data(), c.nt, s_fast.data(), lds);
    scalar::LatentScores(q.data(), ld, c.nh, z.data(), ld, c.width.data(), c.nt, s_ref.data(), lds);
    EXPECT_LT(MaxRelativeDiff(s_fast, s_ref), 1e-5) << "scores, nh " << c.nh << " nt " << c.nt;

    std::vector<float> ps(c.nh * lds);
    for (float& v : ps) v = std::fabs(nd(rng));
    std::vector<float> a_fast(c.nh * ld), a_ref;
    for (int h = 0; h < c.nh; ++h)
      for (int j = 0; j < ld; ++j) a_fast[h * ld + j] = j < wmax ? nd(rng) : 123.0f;
    a_ref = a_fast;
    LatentAccumulate(isa, ps.data(), lds, c.nh, z.data(), ld, c.width.data(), c.nt, a_fast.data(), ld);
    scalar::LatentAccumulate(ps.data(), lds, c.nh, z.data(), ld, c.width.data(), c.nt, a_ref.data(), ld);
    EXPECT_LT(MaxRelativeDiff(a_fast, a_ref), 1e-5) << "accumulate, nh " << c.nh << " nt " << c.nt;
    // Columns past the widest latent are not the kernels' to touch.
    for (int h = 0; h < c.nh; ++h)
      for (int j = (wmax + 7) & ~7; j < ld; ++j) ASSERT_EQ(a_fast[h * ld + j], 123.0f) << "h " << h << " j " << j;
  }
  }
#if defined(__x86_64__)
  EXPECT_GT(tested, 0) << "no SIMD kernel ran on an x86-64 machine";
#endif
}

// The reference itself, on numbers small enough to check by hand: 2 heads, 2 tokens of widths 8
// and 0 (an empty code adds nothing).
TEST(LatentBlock, ReferenceOnAHandCheckedBlock) {
  std::vector<float> q(2 * 16, 0.0f), z(2 * 16, 0.0f);
  for (int j = 0; j < 8; ++j) {
    q[j] = 1.0f;
    q[16 + j] = static_cast<float>(j);
    z[j] = 2.0f;
  }
  const int width[] = {8, 0};
  std::vector<float> s(4, 0.5f);
  scalar::LatentScores(q.data(), 16, 2, z.data(), 16, width, 2, s.data(), 2);
  EXPECT_FLOAT_EQ(s[0], 16.5f);       // 8 x 2 + 0.5
  EXPECT_FLOAT_EQ(s[1], 0.5f);        // empty code
  EXPECT_FLOAT_EQ(s[2], 56.5f);       // 2 x (0 + ... + 7) + 0.5
  EXPECT_FLOAT_EQ(s[3], 0.5f);
  const float p[] = {0.25f, 9.0f, 1.0f, 9.0f};
  std::vector<float> acc(2 * 16, 0.0f);
  scalar::LatentAccumulate(p, 2, 2, z.data(), 16, width, 2, acc.data(), 16);
  for (int j = 0; j < 8; ++j) {
    EXPECT_FLOAT_EQ(acc[j], 0.5f);
    EXPECT_FLOAT_EQ(acc[16 + j], 2.0f);
  }
}

}  // namespace
}  // namespace dk
