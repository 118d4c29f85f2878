#include "kv/profile.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

#include "core/crc32.h"
#include "core/mapped_file.h"
#include "kv/registry.h"

namespace dk {

// The file is written with memcpy of native values; a big-endian port must byte-swap here.
static_assert(std::endian::native == std::endian::little, "profile I/O assumes a little-endian host");

namespace {

constexpr char kMagic[8] = {'D', 'K', 'V', 'P', 'R', 'O', 'F', '\0'};
constexpr size_t kPreambleBytes = sizeof(kMagic) + sizeof(uint32_t);  // magic + version: outside the CRC
// Caps on header values, so a damaged header cannot ask for absurd allocations. Generous for any
// published Llama-family model (Llama-3-405B: 126 layers, D = 8 * 128 = 1024).
constexpr uint32_t kMaxNameBytes = 4096;
constexpr uint32_t kMaxLayers = 4096;
constexpr uint32_t kMaxHeadsKv = 4096;
constexpr uint32_t kMaxHeadDim = 4096;
constexpr uint32_t kMaxKvDim = 32768;
constexpr uint32_t kMaxRouterHidden = 4096;
constexpr uint32_t kMaxEmbd = 1u << 20;
constexpr uint32_t kMaxInfoBytes = 1u << 20;
constexpr uint32_t kMaxBudgetRows = 4096;

std::string Hex64(uint64_t x) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, x);
  return buf;
}

std::string Hex32(uint32_t x) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08" PRIx32, x);
  return buf;
}

// Bytes one BasisSet takes in the file: basis D*D f32, mean D f32, eigenvalues D f64.
uint64_t BasisSetBytes(uint64_t D) { return D * D * 4 + D * 4 + D * 8; }

// Bytes of the router's weights (all layers) and of its budget table in a version-2 file.
uint64_t RouterWeightBytes(uint64_t n_layer, uint64_t E, uint64_t H, uint64_t L) {
  return n_layer * 4 * (H * E + H + 2 * (L * H + L));
}
uint64_t BudgetBytes(uint64_t n_layer, uint64_t rows) { return rows * 8 * (1 + n_layer); }

class Writer {
 public:
  explicit Writer(size_t reserve) { bytes_.reserve(reserve); }
  void Raw(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    bytes_.insert(bytes_.end(), b, b + n);
  }
  template <typename T>
  void Pod(T x) {
    Raw(&x, sizeof(T));
  }
  template <typename T>
  void Array(const std::vector<T>& v) {
    Raw(v.data(), v.size() * sizeof(T));
  }
  std::vector<uint8_t>& bytes() { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

// Bounds-checked reads from the mapped file; every failure names the file, the field and the offset.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size, std::string path) : data_(data), size_(size), path_(std::move(path)) {}
  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }
  void Seek(size_t pos) { pos_ = pos; }

  Status Raw(void* dst, size_t n, const char* field) {
    if (n > left()) {
      return Corrupt(path_ + ": truncated profile: reading " + field + " at byte " + std::to_string(pos_) +
                     " needs " + std::to_string(n) + " bytes, only " + std::to_string(left()) + " left");
    }
    if (n > 0) std::memcpy(dst, data_ + pos_, n);
    pos_ += n;
    return Status::Ok();
  }
  template <typename T>
  Status Pod(T* x, const char* field) {
    return Raw(x, sizeof(T), field);
  }
  // Reads a u32 and checks it lies in [lo, hi].
  Status U32InRange(uint32_t* x, uint32_t lo, uint32_t hi, const char* field) {
    DK_RETURN_IF_ERROR(Pod(x, field));
    if (*x < lo || *x > hi) {
      return Corrupt(path_ + ": " + field + " = " + std::to_string(*x) + " at byte " + std::to_string(pos_ - 4) +
                     ", expected a value in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return Status::Ok();
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  std::string path_;
};

Status ValidateBasisSet(const BasisSet& b, int D, const std::string& where) {
  const size_t d = static_cast<size_t>(D);
  if (b.basis.size() != d * d || b.mean.size() != d || b.eigenvalues.size() != d) {
    return Corrupt(where + ": expected basis " + std::to_string(d * d) + ", mean " + std::to_string(d) +
                   ", eigenvalues " + std::to_string(d) + " numbers; found " + std::to_string(b.basis.size()) + ", " +
                   std::to_string(b.mean.size()) + ", " + std::to_string(b.eigenvalues.size()));
  }
  for (size_t i = 0; i < b.basis.size(); ++i)
    if (!std::isfinite(b.basis[i]))
      return Corrupt(where + ": basis entry " + std::to_string(i) + " is not finite");
  for (size_t i = 0; i < d; ++i)
    if (!std::isfinite(b.mean[i])) return Corrupt(where + ": mean entry " + std::to_string(i) + " is not finite");
  for (size_t i = 0; i < d; ++i) {
    const double e = b.eigenvalues[i];
    if (!std::isfinite(e) || e < 0.0)
      return Corrupt(where + ": eigenvalue " + std::to_string(i) + " = " + std::to_string(e) +
                     ", expected a finite value >= 0");
    if (i > 0 && e > b.eigenvalues[i - 1])
      return Corrupt(where + ": eigenvalues must be non-increasing, but eigenvalue " + std::to_string(i) + " (" +
                     std::to_string(e) + ") > eigenvalue " + std::to_string(i - 1) + " (" +
                     std::to_string(b.eigenvalues[i - 1]) + ")");
  }
  return Status::Ok();
}

Status ReadBasisSet(Reader& r, int D, BasisSet* b) {
  const size_t d = static_cast<size_t>(D);
  b->basis.resize(d * d);
  b->mean.resize(d);
  b->eigenvalues.resize(d);
  DK_RETURN_IF_ERROR(r.Raw(b->basis.data(), d * d * sizeof(float), "basis"));
  DK_RETURN_IF_ERROR(r.Raw(b->mean.data(), d * sizeof(float), "mean"));
  return r.Raw(b->eigenvalues.data(), d * sizeof(double), "eigenvalues");
}

template <typename V>
Status CheckFinite(const V& v, const std::string& where) {
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i])) return Corrupt(where + ": entry " + std::to_string(i) + " is not finite");
  return Status::Ok();
}

Status ValidateRouter(const Router& r, int n_layer, int L, const std::string& origin) {
  if (r.hidden < 1 || static_cast<uint32_t>(r.hidden) > kMaxRouterHidden || r.n_embd < 1 ||
      static_cast<uint32_t>(r.n_embd) > kMaxEmbd)
    return Corrupt(origin + ": router hidden width " + std::to_string(r.hidden) + " and input width " +
                   std::to_string(r.n_embd) + " must be in [1, " + std::to_string(kMaxRouterHidden) + "] and [1, " +
                   std::to_string(kMaxEmbd) + "]");
  if (!(r.target > 0.0 && r.target <= 1.0))
    return Corrupt(origin + ": router target fraction " + std::to_string(r.target) + " is outside (0, 1]");
  if (r.info.size() > kMaxInfoBytes)
    return Corrupt(origin + ": router info of " + std::to_string(r.info.size()) + " bytes, at most " +
                   std::to_string(kMaxInfoBytes));
  if (r.layers.size() != static_cast<size_t>(n_layer))
    return Corrupt(origin + ": router has " + std::to_string(r.layers.size()) + " layers, the profile " +
                   std::to_string(n_layer));
  const size_t E = r.n_embd, H = r.hidden, Ls = static_cast<size_t>(L);
  for (int l = 0; l < n_layer; ++l) {
    const RouterLayer& w = r.layers[l];
    const std::string where = origin + ": router layer " + std::to_string(l);
    if (w.w1.size() != H * E || w.b1.size() != H || w.w2k.size() != Ls * H || w.b2k.size() != Ls ||
        w.w2v.size() != Ls * H || w.b2v.size() != Ls)
      return Corrupt(where + ": expected w1 [" + std::to_string(H) + "][" + std::to_string(E) + "], b1 [" +
                     std::to_string(H) + "], w2k and w2v [" + std::to_string(Ls) + "][" + std::to_string(H) +
                     "], b2k and b2v [" + std::to_string(Ls) + "]");
    DK_RETURN_IF_ERROR(CheckFinite(w.w1, where + " w1"));
    DK_RETURN_IF_ERROR(CheckFinite(w.b1, where + " b1"));
    DK_RETURN_IF_ERROR(CheckFinite(w.w2k, where + " w2k"));
    DK_RETURN_IF_ERROR(CheckFinite(w.b2k, where + " b2k"));
    DK_RETURN_IF_ERROR(CheckFinite(w.w2v, where + " w2v"));
    DK_RETURN_IF_ERROR(CheckFinite(w.b2v, where + " b2v"));
  }
  if (r.budget.size() > kMaxBudgetRows)
    return Corrupt(origin + ": router budget table of " + std::to_string(r.budget.size()) + " rows, at most " +
                   std::to_string(kMaxBudgetRows));
  for (size_t i = 0; i < r.budget.size(); ++i) {
    const RouterBudgetRow& row = r.budget[i];
    const std::string where = origin + ": router budget row " + std::to_string(i);
    if (row.fraction.size() != static_cast<size_t>(n_layer))
      return Corrupt(where + ": " + std::to_string(row.fraction.size()) + " fractions for " +
                     std::to_string(n_layer) + " layers");
    if (!std::isfinite(row.beta) || (i > 0 && row.beta <= r.budget[i - 1].beta))
      return Corrupt(where + ": beta must be finite and increasing");
    for (double f : row.fraction)
      if (!(f > 0.0 && f <= 1.5)) return Corrupt(where + ": fraction " + std::to_string(f) + " outside (0, 1.5]");
    if (i > 0 && Router::MeanFraction(row) < Router::MeanFraction(r.budget[i - 1]))
      return Corrupt(where + ": mean fraction decreases as beta grows");
  }
  return Status::Ok();
}

std::string LevelsString(const std::vector<int>& levels) {
  std::string s;
  for (int l : levels) {
    if (!s.empty()) s += ',';
    s += std::to_string(l);
  }
  return s;
}

}  // namespace

double DynaKvProfile::ExplainedVariance(const BasisSet& b, int r) const {
  const int D = static_cast<int>(b.eigenvalues.size());
  r = std::clamp(r, 0, D);
  double total = 0.0, kept = 0.0;
  for (int i = 0; i < D; ++i) {
    total += b.eigenvalues[i];
    if (i < r) kept += b.eigenvalues[i];
  }
  // A constant signal has nothing to explain: any rank reproduces it (the mean carries it).
  if (total <= 0.0) return 1.0;
  return kept / total;
}

std::vector<int> DefaultLevels(int D) {
  std::vector<int> levels;
  if (D < 1) return levels;
  // 1, 2, 4, 8, then alternately x1.5 and x4/3: 12, 16, 24, 32, 48, 64, ... (powers of two and
  // 1.5 x powers of two), every value below D, then D itself.
  auto push = [&](int64_t x) {
    if (x < D && (levels.empty() || x > levels.back())) levels.push_back(static_cast<int>(x));
  };
  for (int64_t x : {1, 2, 4}) push(x);
  for (int64_t p = 8; p < D; p *= 2) {
    push(p);
    push(p + p / 2);
  }
  levels.push_back(D);
  return levels;
}

StatusOr<std::vector<int>> NormalizeLevels(std::vector<int> levels, int D) {
  if (D < 1) return InvalidArgument("levels: KV width D must be positive, found " + std::to_string(D));
  if (levels.empty()) return DefaultLevels(D);
  for (size_t i = 0; i < levels.size(); ++i) {
    if (levels[i] < 1 || levels[i] > D)
      return InvalidArgument("--levels: level " + std::to_string(levels[i]) + " is outside [1, D = " +
                             std::to_string(D) + "]");
    if (i > 0 && levels[i] <= levels[i - 1])
      return InvalidArgument("--levels: levels must be strictly increasing, found " + std::to_string(levels[i - 1]) +
                             " then " + std::to_string(levels[i]));
  }
  if (levels.back() < D) levels.push_back(D);
  return levels;
}

Status ValidateProfile(const DynaKvProfile& p, const std::string& origin) {
  if (p.n_layer < 1 || static_cast<uint32_t>(p.n_layer) > kMaxLayers || p.n_head_kv < 1 ||
      static_cast<uint32_t>(p.n_head_kv) > kMaxHeadsKv || p.head_dim < 1 ||
      static_cast<uint32_t>(p.head_dim) > kMaxHeadDim) {
    return Corrupt(origin + ": bad shape n_layer=" + std::to_string(p.n_layer) + ", n_head_kv=" +
                   std::to_string(p.n_head_kv) + ", head_dim=" + std::to_string(p.head_dim) +
                   " (each must be in [1, " + std::to_string(kMaxLayers) + "])");
  }
  const int64_t D = static_cast<int64_t>(p.n_head_kv) * p.head_dim;
  if (D > kMaxKvDim)
    return Corrupt(origin + ": KV width D = n_head_kv * head_dim = " + std::to_string(D) + " exceeds " +
                   std::to_string(kMaxKvDim));
  if (p.model_name.size() > kMaxNameBytes)
    return Corrupt(origin + ": model name of " + std::to_string(p.model_name.size()) + " bytes, at most " +
                   std::to_string(kMaxNameBytes));
  if (p.n_calib_tokens < 0)
    return Corrupt(origin + ": n_calib_tokens = " + std::to_string(p.n_calib_tokens) + ", expected >= 0");
  if (p.levels.empty() || p.levels.back() != D) {
    return Corrupt(origin + ": levels [" + LevelsString(p.levels) + "] must end with D = " + std::to_string(D));
  }
  for (size_t i = 0; i < p.levels.size(); ++i) {
    if (p.levels[i] < 1 || (i > 0 && p.levels[i] <= p.levels[i - 1]))
      return Corrupt(origin + ": levels [" + LevelsString(p.levels) + "] must be strictly increasing, in [1, " +
                     std::to_string(D) + "]");
  }
  if (p.k.size() != static_cast<size_t>(p.n_layer) || p.v.size() != static_cast<size_t>(p.n_layer)) {
    return Corrupt(origin + ": expected " + std::to_string(p.n_layer) + " K and V basis sets, found " +
                   std::to_string(p.k.size()) + " and " + std::to_string(p.v.size()));
  }
  for (int l = 0; l < p.n_layer; ++l) {
    DK_RETURN_IF_ERROR(ValidateBasisSet(p.k[l], static_cast<int>(D), origin + ": layer " + std::to_string(l) + " K"));
    DK_RETURN_IF_ERROR(ValidateBasisSet(p.v[l], static_cast<int>(D), origin + ": layer " + std::to_string(l) + " V"));
  }
  if ((p.flags & ~(DynaKvProfile::kFlagTrainedBases | DynaKvProfile::kFlagTcRouter)) != 0)
    return Corrupt(origin + ": unknown flags " + Hex32(p.flags));
  if (p.router) DK_RETURN_IF_ERROR(ValidateRouter(*p.router, p.n_layer, static_cast<int>(p.levels.size()), origin));
  return Status::Ok();
}

uint64_t ProfileFileBytes(const DynaKvProfile& p) {
  const uint64_t D = static_cast<uint64_t>(p.kv_dim()), NL = static_cast<uint64_t>(p.n_layer);
  uint64_t header = 8 + 4 + p.model_name.size() + 4 * 3 + 4 + 4 * p.levels.size() + 8 + 4 + 4;
  uint64_t router = 0;
  if (p.router) {
    const Router& r = *p.router;
    header += 4 + 8 + 4 + r.info.size() + 4;
    router = RouterWeightBytes(NL, r.n_embd, r.hidden, p.levels.size()) + BudgetBytes(NL, r.budget.size());
  }
  return kPreambleBytes + header + NL * 2 * BasisSetBytes(D) + router + 4;
}

std::vector<uint8_t> SerializeProfile(const DynaKvProfile& p) {
  Writer w(static_cast<size_t>(ProfileFileBytes(p)));
  w.Raw(kMagic, sizeof(kMagic));
  w.Pod<uint32_t>(DynaKvProfile::kFormatVersion);
  w.Pod<uint64_t>(p.model_fingerprint);
  w.Pod<uint32_t>(static_cast<uint32_t>(p.model_name.size()));
  w.Raw(p.model_name.data(), p.model_name.size());
  w.Pod<uint32_t>(static_cast<uint32_t>(p.n_layer));
  w.Pod<uint32_t>(static_cast<uint32_t>(p.n_head_kv));
  w.Pod<uint32_t>(static_cast<uint32_t>(p.head_dim));
  w.Pod<uint32_t>(static_cast<uint32_t>(p.levels.size()));
  for (int l : p.levels) w.Pod<uint32_t>(static_cast<uint32_t>(l));
  w.Pod<int64_t>(p.n_calib_tokens);
  w.Pod<uint32_t>(p.flags);
  w.Pod<uint32_t>(p.router ? static_cast<uint32_t>(p.router->hidden) : 0u);
  if (p.router) {
    w.Pod<uint32_t>(static_cast<uint32_t>(p.router->n_embd));
    w.Pod<double>(p.router->target);
    w.Pod<uint32_t>(static_cast<uint32_t>(p.router->info.size()));
    w.Raw(p.router->info.data(), p.router->info.size());
    w.Pod<uint32_t>(static_cast<uint32_t>(p.router->budget.size()));
  }
  for (int l = 0; l < p.n_layer; ++l) {
    for (const BasisSet* b : {&p.k[l], &p.v[l]}) {
      w.Array(b->basis);
      w.Array(b->mean);
      w.Array(b->eigenvalues);
    }
  }
  if (p.router) {
    for (const RouterLayer& rl : p.router->layers) {
      for (const std::vector<float>* a : {&rl.w1, &rl.b1, &rl.w2k, &rl.b2k, &rl.w2v, &rl.b2v}) w.Array(*a);
    }
    for (const RouterBudgetRow& row : p.router->budget) {
      w.Pod<double>(row.beta);
      w.Array(row.fraction);
    }
  }
  std::vector<uint8_t>& bytes = w.bytes();
  const uint32_t crc = Crc32(bytes.data() + kPreambleBytes, bytes.size() - kPreambleBytes);
  w.Pod<uint32_t>(crc);
  return std::move(bytes);
}

Status SaveProfile(const DynaKvProfile& p, const std::string& path) {
  DK_RETURN_IF_ERROR(ValidateProfile(p, "profile to be written to " + path));
  const std::vector<uint8_t> bytes = SerializeProfile(p);
  return WriteFileAtomically(path, bytes.data(), bytes.size());
}

StatusOr<DynaKvProfile> LoadProfile(const std::string& path) {
  DK_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> file, MappedFile::Open(path));
  return ParseProfile(file->data(), file->size(), path);
}

StatusOr<DynaKvProfile> ParseProfile(const uint8_t* data, size_t size, const std::string& path) {
  if (size < kPreambleBytes) {
    return Corrupt(path + ": not a DynaKV profile: " + std::to_string(size) + " bytes, expected at least " +
                   std::to_string(kPreambleBytes) + " (magic 'DKVPROF' and version)");
  }
  Reader r(data, size, path);
  char magic[8];
  DK_RETURN_IF_ERROR(r.Raw(magic, sizeof(magic), "magic"));
  if (std::memcmp(magic, kMagic, sizeof(kMagic)) != 0) {
    std::string found;
    for (char c : magic) {
      const auto u = static_cast<unsigned char>(c);
      char buf[8];
      std::snprintf(buf, sizeof(buf), (u >= 0x20 && u < 0x7F) ? "%c" : "\\x%02x", u);
      found += buf;
    }
    return Corrupt(path + ": not a DynaKV profile: expected magic 'DKVPROF\\0', found '" + found + "'");
  }
  uint32_t version = 0;
  DK_RETURN_IF_ERROR(r.Pod(&version, "version"));
  if (version > DynaKvProfile::kFormatVersion) {
    return Unimplemented(path + ": profile format version " + std::to_string(version) +
                         " is newer than this build reads (version " +
                         std::to_string(DynaKvProfile::kFormatVersion) +
                         "); update dynakv or recalibrate with 'dynakv calibrate'");
  }
  if (version < 1)
    return Corrupt(path + ": profile format version 0 is invalid (expected 1.." +
                   std::to_string(DynaKvProfile::kFormatVersion) + ")");

  DynaKvProfile p;
  p.file_version = version;
  uint32_t name_len = 0, n_layer = 0, n_head_kv = 0, head_dim = 0, n_levels = 0;
  DK_RETURN_IF_ERROR(r.Pod(&p.model_fingerprint, "model fingerprint"));
  DK_RETURN_IF_ERROR(r.U32InRange(&name_len, 0, kMaxNameBytes, "model name length"));
  if (name_len > r.left())
    return Corrupt(path + ": truncated profile: model name of " + std::to_string(name_len) + " bytes, only " +
                   std::to_string(r.left()) + " left");
  p.model_name.resize(name_len);
  DK_RETURN_IF_ERROR(r.Raw(p.model_name.data(), name_len, "model name"));
  DK_RETURN_IF_ERROR(r.U32InRange(&n_layer, 1, kMaxLayers, "n_layer"));
  DK_RETURN_IF_ERROR(r.U32InRange(&n_head_kv, 1, kMaxHeadsKv, "n_head_kv"));
  DK_RETURN_IF_ERROR(r.U32InRange(&head_dim, 1, kMaxHeadDim, "head_dim"));
  const uint64_t D = static_cast<uint64_t>(n_head_kv) * head_dim;
  if (D > kMaxKvDim)
    return Corrupt(path + ": KV width n_head_kv * head_dim = " + std::to_string(D) + ", at most " +
                   std::to_string(kMaxKvDim) + " expected");
  DK_RETURN_IF_ERROR(r.U32InRange(&n_levels, 1, static_cast<uint32_t>(D), "number of levels"));
  if (static_cast<uint64_t>(n_levels) * 4 > r.left())
    return Corrupt(path + ": truncated profile: " + std::to_string(n_levels) + " levels need " +
                   std::to_string(n_levels * 4ull) + " bytes, only " + std::to_string(r.left()) + " left");
  p.levels.resize(n_levels);
  for (uint32_t i = 0; i < n_levels; ++i) {
    uint32_t level = 0;
    DK_RETURN_IF_ERROR(r.U32InRange(&level, 1, static_cast<uint32_t>(D), "level"));
    p.levels[i] = static_cast<int>(level);
  }
  DK_RETURN_IF_ERROR(r.Pod(&p.n_calib_tokens, "n_calib_tokens"));
  p.n_layer = static_cast<int>(n_layer);
  p.n_head_kv = static_cast<int>(n_head_kv);
  p.head_dim = static_cast<int>(head_dim);
  uint32_t hidden = 0, n_embd = 0, info_len = 0, n_rows = 0;
  if (version >= 2) {
    DK_RETURN_IF_ERROR(r.Pod(&p.flags, "flags"));
    DK_RETURN_IF_ERROR(r.U32InRange(&hidden, 0, kMaxRouterHidden, "router hidden width"));
    if (hidden > 0) {
      p.router.emplace();
      p.router->hidden = static_cast<int>(hidden);
      DK_RETURN_IF_ERROR(r.U32InRange(&n_embd, 1, kMaxEmbd, "router input width"));
      p.router->n_embd = static_cast<int>(n_embd);
      DK_RETURN_IF_ERROR(r.Pod(&p.router->target, "router target"));
      DK_RETURN_IF_ERROR(r.U32InRange(&info_len, 0, kMaxInfoBytes, "router info length"));
      if (info_len > r.left())
        return Corrupt(path + ": truncated profile: router info of " + std::to_string(info_len) + " bytes, only " +
                       std::to_string(r.left()) + " left");
      p.router->info.resize(info_len);
      DK_RETURN_IF_ERROR(r.Raw(p.router->info.data(), info_len, "router info"));
      DK_RETURN_IF_ERROR(r.U32InRange(&n_rows, 0, kMaxBudgetRows, "router budget rows"));
    }
  }

  // The header fixes the whole file size: check it (and the checksum) before allocating the bases.
  const uint64_t router_bytes =
      hidden == 0 ? 0 : RouterWeightBytes(n_layer, n_embd, hidden, n_levels) + BudgetBytes(n_layer, n_rows);
  const uint64_t expected = r.pos() + static_cast<uint64_t>(n_layer) * 2 * BasisSetBytes(D) + router_bytes + 4;
  if (size != expected) {
    return Corrupt(path + ": " + (size < expected ? "truncated profile" : "trailing bytes after profile") +
                   ": expected " + std::to_string(expected) + " bytes for n_layer=" + std::to_string(n_layer) +
                   ", D=" + std::to_string(D) + ", found " + std::to_string(size));
  }
  uint32_t stored_crc = 0;
  std::memcpy(&stored_crc, data + size - 4, 4);
  const uint32_t crc = Crc32(data + kPreambleBytes, size - 4 - kPreambleBytes);
  if (crc != stored_crc) {
    return Corrupt(path + ": checksum mismatch: stored CRC-32 " + Hex32(stored_crc) + ", computed " + Hex32(crc) +
                   " (the file is damaged; recalibrate or copy it again)");
  }
  p.k.resize(n_layer);
  p.v.resize(n_layer);
  for (uint32_t l = 0; l < n_layer; ++l) {
    DK_RETURN_IF_ERROR(ReadBasisSet(r, static_cast<int>(D), &p.k[l]));
    DK_RETURN_IF_ERROR(ReadBasisSet(r, static_cast<int>(D), &p.v[l]));
  }
  if (p.router) {
    const size_t H = hidden, E = n_embd, L = n_levels;
    p.router->layers.resize(n_layer);
    for (RouterLayer& rl : p.router->layers) {
      const std::pair<std::vector<float>*, size_t> parts[] = {{&rl.w1, H * E}, {&rl.b1, H}, {&rl.w2k, L * H},
                                                              {&rl.b2k, L},    {&rl.w2v, L * H}, {&rl.b2v, L}};
      for (const auto& [vec, count] : parts) {
        vec->resize(count);
        DK_RETURN_IF_ERROR(r.Raw(vec->data(), count * sizeof(float), "router weights"));
      }
    }
    p.router->budget.resize(n_rows);
    for (RouterBudgetRow& row : p.router->budget) {
      DK_RETURN_IF_ERROR(r.Pod(&row.beta, "router budget beta"));
      row.fraction.resize(n_layer);
      DK_RETURN_IF_ERROR(r.Raw(row.fraction.data(), n_layer * sizeof(double), "router budget fractions"));
    }
  }
  DK_RETURN_IF_ERROR(ValidateProfile(p, path));
  return p;
}

Status CheckProfileMatchesModel(const DynaKvProfile& p, const KvModelInfo& model, const std::string& profile_path) {
  const KvShape& s = model.shape;
  if (p.model_fingerprint != model.fingerprint) {
    return FailedPrecondition("profile " + profile_path + " was calibrated for model '" + Printable(p.model_name) +
                           "' (fingerprint " + Hex64(p.model_fingerprint) + "), not for " + model.model_path +
                           " (fingerprint " + Hex64(model.fingerprint) + "); run 'dynakv calibrate' for this model");
  }
  if (p.n_layer != s.n_layer || p.n_head_kv != s.n_head_kv || p.head_dim != s.head_dim) {
    return FailedPrecondition("profile " + profile_path + " has n_layer=" + std::to_string(p.n_layer) +
                           ", n_head_kv=" + std::to_string(p.n_head_kv) + ", head_dim=" + std::to_string(p.head_dim) +
                           " but model " + model.model_path + " has n_layer=" + std::to_string(s.n_layer) +
                           ", n_head_kv=" + std::to_string(s.n_head_kv) + ", head_dim=" +
                           std::to_string(s.head_dim) + "; run 'dynakv calibrate' for this model");
  }
  if (p.router && p.router->n_embd != s.n_embd) {
    return FailedPrecondition("profile " + profile_path + ": its router reads hidden states of width " +
                           std::to_string(p.router->n_embd) + " but model " + model.model_path + " has n_embd=" +
                           std::to_string(s.n_embd) + "; run 'dynakv train-router' for this model");
  }
  return Status::Ok();
}

std::string ExplainedVarianceTable(const DynaKvProfile& p) {
  std::string out = "explained variance: fraction of the calibration variance kept by the first r directions\n";
  char buf[64];
  out += "layer kv  r =";
  for (int r : p.levels) {
    std::snprintf(buf, sizeof(buf), " %6d", r);
    out += buf;
  }
  out += "\n";
  for (int l = 0; l < p.n_layer && l < static_cast<int>(p.k.size()) && l < static_cast<int>(p.v.size()); ++l) {
    for (int which = 0; which < 2; ++which) {
      const BasisSet& b = which == 0 ? p.k[l] : p.v[l];
      std::snprintf(buf, sizeof(buf), "%5d  %c     ", l, which == 0 ? 'K' : 'V');
      out += buf;
      for (int r : p.levels) {
        std::snprintf(buf, sizeof(buf), " %6.4f", p.ExplainedVariance(b, r));
        out += buf;
      }
      out += "\n";
    }
  }
  return out;
}

}  // namespace dk
