// Transform-coded latents: DynaKV's rank x precision storage (--kv-dtype tc, issue 16).
//
// A latent z (the coefficients on the layer's basis divided by their calibrated standard deviations,
// so every coordinate has unit variance) is cut into groups of kTcGroup coordinates (the last group
// may be shorter, a multiple of 8). An allocation gives each group a width b in {0..8} bits,
// non-increasing along the latent: the leading, high-variance directions get many bits, the middle
// few, the tail none (the coordinates past the last stored group are zero). A group of n numbers at
// b > 0 bits stores an fp16 scale s and n codes q in [0, 2^b), the value being s (q - o) with
// o = (2^b - 1) / 2 (a midrise quantizer: no level at zero, both signs symmetric). The scale is the
// group's absolute maximum over o, shrunk by the clipping ratio of least squared error (for b <= 4).
//
// Record: the scales of the stored groups (fp16, in group order), then their codes, each group's
// codes a little-endian bit stream (code i at bits [i b, (i + 1) b)), n b / 8 bytes; the record is
// padded to an even size. Index formulas and invariants: docs/kv_layout.md.
//
// A ladder maps a byte budget to the allocation of least modelled distortion that fits it:
// sum over groups of (sum of the group's eigenvalues) x TcRelativeError(b, n), found by dynamic
// programming over the groups. DynaKV's rank policies pick a nominal rank r per token; with tc
// storage a rank r means "the best code of at most 2 r bytes", the bytes an fp16 latent of rank r
// takes, so every policy's byte arithmetic holds unchanged (as an upper bound).
#pragma once

#include <cstdint>
#include <vector>

namespace dk {

constexpr int kTcGroup = 32;
constexpr int kTcMaxBits = 8;

struct TcAllocation {
  std::vector<uint8_t> bits;  // [groups] width per group, non-increasing
  int active = 0;             // groups stored (bits > 0): a prefix
  int coords = 0;             // coordinates covered: the end of the last stored group
  int bytes = 0;              // record size in bytes (even)
  double distortion = 0.0;    // modelled expected squared error (in the eigenvalues' units)
};

inline int TcGroups(int D) { return (D + kTcGroup - 1) / kTcGroup; }  // ceil(D / kTcGroup)
// kTcGroup, or what is left for the last group
inline int TcGroupSize(int D, int g) { return D - g * kTcGroup < kTcGroup ? D - g * kTcGroup : kTcGroup; }
// Bytes of a record with these widths (D % 8 == 0).
int TcRecordBytes(const uint8_t* bits, int D);
// Expected squared error per number of a group of n iid N(0, 1) numbers coded at b bits (b = 0: 1,
// nothing stored). Measured once per process on fixed pseudo-random samples with the quantizer itself.
double TcRelativeError(int bits, int n);

// ladder[r - 1], r = 1..D: the least-distortion allocation of at most 2 r bytes (D % 8 == 0;
// eigenvalues: [D], decreasing, the variance of each coordinate before normalisation).
std::vector<TcAllocation> TcLadder(const std::vector<double>& eigenvalues, int D);

// Encodes z[0 .. a.coords) into dst (a.bytes bytes, padding zeroed).
void TcEncode(const float* z, const TcAllocation& a, int D, uint8_t* dst);
// out[0 .. a.coords) = the decoded numbers (the vectorised version of scalar::TcDecode).
void TcDecode(const uint8_t* src, const TcAllocation& a, int D, float* out);

namespace scalar {
void TcDecode(const uint8_t* src, const TcAllocation& a, int D, float* out);  // bit by bit
}  // namespace scalar

}  // namespace dk
