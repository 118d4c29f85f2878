#include "kv/profile_export.h"

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/mapped_file.h"

namespace dk {

namespace {

using json = nlohmann::json;

// safetensors: an 8-byte little-endian header length, the JSON header (name -> dtype, shape,
// data_offsets relative to the end of the header), then the data, tensor after tensor.
class SafetensorsWriter {
 public:
  template <typename T>
  void Add(const std::string& name, const char* dtype, std::vector<int64_t> shape, const std::vector<T>& values) {
    const size_t begin = data_.size();
    data_.resize(begin + values.size() * sizeof(T));
    if (!values.empty()) std::memcpy(data_.data() + begin, values.data(), values.size() * sizeof(T));
    header_[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, data_.size()}}};
  }
  void Metadata(const std::string& key, const std::string& value) { header_["__metadata__"][key] = value; }

  std::vector<uint8_t> Bytes() const {
    std::string h = header_.dump();
    h.append((8 - h.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
    const uint64_t n = h.size();
    std::vector<uint8_t> out(8 + h.size() + data_.size());
    std::memcpy(out.data(), &n, 8);
    std::memcpy(out.data() + 8, h.data(), h.size());
    if (!data_.empty()) std::memcpy(out.data() + 8 + h.size(), data_.data(), data_.size());
    return out;
  }

 private:
  json header_ = json::object();
  std::vector<uint8_t> data_;
};

std::string Hex64(uint64_t x) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, x);
  return buf;
}

}  // namespace

Status ExportProfile(const DynaKvProfile& p, const std::string& dir) {
  DK_RETURN_IF_ERROR(ValidateProfile(p, "profile to export"));
  const int64_t D = p.kv_dim(), L = static_cast<int64_t>(p.levels.size());
  SafetensorsWriter st;
  st.Add("levels", "I32", {L}, std::vector<int32_t>(p.levels.begin(), p.levels.end()));
  for (int l = 0; l < p.n_layer; ++l) {
    for (int which = 0; which < 2; ++which) {
      const BasisSet& b = which == 0 ? p.k[l] : p.v[l];
      const std::string base = "layers." + std::to_string(l) + (which == 0 ? ".k." : ".v.");
      st.Add(base + "basis", "F32", {D, D}, b.basis);
      st.Add(base + "mean", "F32", {D}, b.mean);
      st.Add(base + "eigenvalues", "F64", {D}, b.eigenvalues);
    }
  }
  json router = nullptr;
  if (p.router) {
    const Router& r = *p.router;
    const int64_t H = r.hidden, E = r.n_embd;
    for (int l = 0; l < p.n_layer; ++l) {
      const RouterLayer& w = r.layers[l];
      const std::string base = "layers." + std::to_string(l) + ".router.";
      st.Add(base + "w1", "F32", {H, E}, w.w1);
      st.Add(base + "b1", "F32", {H}, w.b1);
      st.Add(base + "w2k", "F32", {L, H}, w.w2k);
      st.Add(base + "b2k", "F32", {L}, w.b2k);
      st.Add(base + "w2v", "F32", {L, H}, w.w2v);
      st.Add(base + "b2v", "F32", {L}, w.b2v);
    }
    std::vector<double> beta, fraction;
    for (const RouterBudgetRow& row : r.budget) {
      beta.push_back(row.beta);
      fraction.insert(fraction.end(), row.fraction.begin(), row.fraction.end());
    }
    st.Add("router.budget.beta", "F64", {static_cast<int64_t>(beta.size())}, beta);
    st.Add("router.budget.fraction", "F64", {static_cast<int64_t>(beta.size()), p.n_layer}, fraction);
    json training = json::parse(r.info, nullptr, false);
    if (training.is_discarded()) training = r.info;  // free text from an older trainer: kept as is
    router = {{"hidden", r.hidden}, {"n_embd", r.n_embd}, {"activation", "silu"}, {"target", r.target},
              {"budget_rows", r.budget.size()}, {"training", training}};
  }
  st.Metadata("format", "dynakv-profile");
  st.Metadata("model_fingerprint", Hex64(p.model_fingerprint));

  const json config = {
      {"format", "dynakv-profile"},
      {"format_version", DynaKvProfile::kFormatVersion},
      {"model_name", p.model_name},
      {"model_fingerprint", Hex64(p.model_fingerprint)},
      {"n_layer", p.n_layer},
      {"n_head_kv", p.n_head_kv},
      {"head_dim", p.head_dim},
      {"kv_dim", D},
      {"levels", p.levels},
      {"n_calib_tokens", p.n_calib_tokens},
      {"trained_bases", p.trained_bases()},
      {"keys_after_rope", true},
      {"latent",
       "c = basis[:, :r].T @ (x - mean), x^ = basis[:, :r] @ c + mean; x = one token's keys (after RoPE) or "
       "values of all KV heads of a layer, concatenated head after head"},
      {"router", router},
      {"tensors", "dynakv.safetensors"},
  };
  const std::vector<uint8_t> bytes = st.Bytes();
  DK_RETURN_IF_ERROR(WriteFileAtomically(dir + "/dynakv.safetensors", bytes.data(), bytes.size()));
  const std::string text = config.dump(2) + "\n";
  return WriteFileAtomically(dir + "/dynakv_config.json", text.data(), text.size());
}

}  // namespace dk
