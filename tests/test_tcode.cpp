// Transform-coded latents (ops/tcode.h): the vectorised decoder against the bit-by-bit reference,
// the quantizer's error against the modelled one, and the ladder's invariants (bytes within 2 r,
// widths non-increasing, distortion non-increasing in r, the record layout's byte count).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "core/fp16.h"
#include "ops/tcode.h"

namespace dk {
namespace {

TcAllocation Uniform(int D, int groups, int bits) {
  TcAllocation a;
  a.bits.assign(TcGroups(D), 0);
  for (int g = 0; g < groups; ++g) a.bits[g] = static_cast<uint8_t>(bits);
  a.active = groups;
  for (int g = 0; g < groups; ++g) a.coords += TcGroupSize(D, g);
  a.bytes = TcRecordBytes(a.bits.data(), D);
  return a;
}

std::vector<float> Gaussian(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> z(n);
  for (float& x : z) x = nd(rng);
  return z;
}

TEST(Tcode, RecordBytesFollowTheLayout) {
  // D = 72: groups of 32, 32, 8. Widths 4, 3, 8: (2 + 16) + (2 + 12) + (2 + 8) = 42 bytes.
  const uint8_t bits[] = {4, 3, 8};
  EXPECT_EQ(TcRecordBytes(bits, 72), 42);
  const uint8_t odd[] = {5, 0, 0};  // 2 + 20 = 22
  EXPECT_EQ(TcRecordBytes(odd, 72), 22);
  const uint8_t one[] = {1, 1, 1};  // 2 + 4 + 2 + 4 + 2 + 1 = 15, padded to 16
  EXPECT_EQ(TcRecordBytes(one, 72), 16);
  EXPECT_EQ(TcGroups(72), 3);
  EXPECT_EQ(TcGroupSize(72, 2), 8);
}

// Every width, full and short last groups: the AVX2 decoder equals the bit-by-bit reference, and
// the decoded numbers are the encoder's: |z - zhat| <= s / 2 for every number the scale does not
// clip (with the scale recomputed from the record).
TEST(Tcode, FastDecodeMatchesScalarReference) {
  for (int D : {64, 72, 256}) {
    for (int bits : {1, 2, 3, 4, 5, 6, 8}) {
      for (int groups = 1; groups <= TcGroups(D); ++groups) {
        const TcAllocation a = Uniform(D, groups, bits);
        const std::vector<float> z = Gaussian(D, 1000 * D + 10 * bits + groups);
        std::vector<uint8_t> rec(a.bytes + 8, 0xAB);
        TcEncode(z.data(), a, D, rec.data());
        EXPECT_EQ(rec[a.bytes], 0xAB) << "encode wrote past the record";
        std::vector<float> fast(D, -7.0f), ref(D, -7.0f);
        TcDecode(rec.data(), a, D, fast.data());
        scalar::TcDecode(rec.data(), a, D, ref.data());
        for (int i = 0; i < D; ++i) {
          if (i >= a.coords) {
            EXPECT_EQ(fast[i], -7.0f) << "decode wrote past the code's coordinates";
            EXPECT_EQ(ref[i], -7.0f);
            continue;
          }
          EXPECT_NEAR(fast[i], ref[i], 1e-6f * (1.0f + std::fabs(ref[i])))
              << "D " << D << " bits " << bits << " groups " << groups << " i " << i;
        }
        for (int g = 0; g < a.active; ++g) {
          const float s = Fp16ToFp32(static_cast<uint16_t>(rec[2 * g] | (rec[2 * g + 1] << 8)));
          const float o = 0.5f * static_cast<float>((1 << bits) - 1);
          ASSERT_GT(s, 0.0f);
          for (int i = 0; i < TcGroupSize(D, g); ++i) {
            const int j = g * kTcGroup + i;
            if (std::fabs(z[j]) <= o * s) {
              EXPECT_LE(std::fabs(z[j] - ref[j]), 0.5f * s * (1 + 1e-5f)) << j;
            } else {
              EXPECT_LE(std::fabs(ref[j]), o * s * (1 + 1e-5f)) << j;  // clipped to the outer level
            }
          }
        }
      }
    }
  }
}

// The squared error of coding iid N(0, 1) numbers is the modelled TcRelativeError (measured on
// other samples), within sampling noise, and falls with every added bit.
TEST(Tcode, ErrorMatchesTheModel) {
  constexpr int D = 256, kVectors = 64;
  for (int bits : {1, 2, 3, 4, 5, 6, 8}) {
    const TcAllocation a = Uniform(D, TcGroups(D), bits);
    std::vector<uint8_t> rec(a.bytes);
    std::vector<float> out(D);
    double err = 0.0;
    for (int v = 0; v < kVectors; ++v) {
      const std::vector<float> z = Gaussian(D, 77 + v);
      TcEncode(z.data(), a, D, rec.data());
      TcDecode(rec.data(), a, D, out.data());
      for (int i = 0; i < D; ++i) err += (z[i] - out[i]) * static_cast<double>(z[i] - out[i]);
    }
    err /= D * kVectors;
    const double model = TcRelativeError(bits, kTcGroup);
    EXPECT_NEAR(err, model, 0.15 * model) << bits << " bits";
    if (bits > 1) {
      EXPECT_LT(TcRelativeError(bits, kTcGroup), 0.5 * TcRelativeError(bits - 1, kTcGroup)) << bits;
    }
  }
  EXPECT_EQ(TcRelativeError(0, kTcGroup), 1.0);
}

// Non-finite numbers are coded as zero and never poison their group's scale.
TEST(Tcode, NonFiniteNumbersDoNotPoisonTheGroup) {
  constexpr int D = 64;
  const TcAllocation a = Uniform(D, 2, 4);
  std::vector<float> z = Gaussian(D, 3);
  z[5] = std::numeric_limits<float>::quiet_NaN();
  z[40] = std::numeric_limits<float>::infinity();
  std::vector<uint8_t> rec(a.bytes);
  std::vector<float> out(D);
  TcEncode(z.data(), a, D, rec.data());
  TcDecode(rec.data(), a, D, out.data());
  for (int i = 0; i < D; ++i) {
    ASSERT_TRUE(std::isfinite(out[i])) << i;
    if (i != 5 && i != 40) {
      EXPECT_NEAR(out[i], z[i], 0.5) << i;
    }
  }
  EXPECT_LT(std::fabs(out[5]), 0.5);
}

// The ladder on a decaying spectrum: each rung fits 2 r bytes, widths never increase along the
// latent, the allocation's recorded fields agree with its widths, and more bytes never cost quality.
TEST(Tcode, LadderInvariants) {
  for (int D : {64, 72, 256}) {
    std::vector<double> ev(D);
    for (int i = 0; i < D; ++i) ev[i] = 10.0 * std::exp(-0.05 * i) + 0.01;
    const std::vector<TcAllocation> ladder = TcLadder(ev, D);
    ASSERT_EQ(static_cast<int>(ladder.size()), D);
    double total = 0.0;
    for (double e : ev) total += e;
    for (int r = 1; r <= D; ++r) {
      const TcAllocation& a = ladder[r - 1];
      SCOPED_TRACE("D " + std::to_string(D) + " r " + std::to_string(r));
      EXPECT_LE(a.bytes, 2 * r);
      EXPECT_EQ(a.bytes, TcRecordBytes(a.bits.data(), D));
      EXPECT_EQ(a.bytes % 2, 0);
      int active = 0, coords = 0;
      for (int g = 0; g < TcGroups(D); ++g) {
        if (g > 0) {
          EXPECT_LE(a.bits[g], a.bits[g - 1]);
        }
        if (a.bits[g] > 0) {
          ++active;
          coords += TcGroupSize(D, g);
        }
      }
      EXPECT_EQ(a.active, active);
      EXPECT_EQ(a.coords, coords);
      EXPECT_LE(a.distortion, total + 1e-9);
      if (r > 1) {
        EXPECT_LE(a.distortion, ladder[r - 2].distortion + 1e-12);
      }
    }
    // At the full fp16 budget the code keeps nearly everything; at a quarter of it, more than an
    // fp16 latent of the same bytes (rank D / 4) would.
    EXPECT_LT(ladder[D - 1].distortion, 1e-3 * total);
    double tail = 0.0;
    for (int i = D / 4; i < D; ++i) tail += ev[i];
    EXPECT_LT(ladder[D / 4 - 1].distortion, tail);
  }
}

}  // namespace
}  // namespace dk
