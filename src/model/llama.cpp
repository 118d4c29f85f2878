#include "model/llama.h"

#include <cstring>

#include "core/hash.h"
#include "core/threads.h"
#include "model/ggml_types.h"
#include "ops/ops.h"

namespace dk {

ForwardState::ForwardState(const ModelConfig& c, int max_batch_)
    : max_batch(max_batch_),
      pos(max_batch_),
      x(static_cast<size_t>(max_batch_) * c.n_embd),
      xn(static_cast<size_t>(max_batch_) * c.n_embd),
      q(static_cast<size_t>(max_batch_) * c.n_head * c.head_dim),
      k(static_cast<size_t>(max_batch_) * c.n_head_kv * c.head_dim),
      v(static_cast<size_t>(max_batch_) * c.n_head_kv * c.head_dim),
      att(static_cast<size_t>(max_batch_) * c.n_head * c.head_dim),
      gate(static_cast<size_t>(max_batch_) * c.n_ff),
      up(static_cast<size_t>(max_batch_) * c.n_ff) {}

StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& path) {
  std::unique_ptr<Model> m(new Model());
  DK_ASSIGN_OR_RETURN(m->gguf_, GgufFile::Open(path));
  DK_RETURN_IF_ERROR(m->LoadConfig());
  DK_ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromGguf(*m->gguf_));
  if (m->tokenizer_->vocab_size() != m->config_.n_vocab) {
    return Corrupt(path + ": tokenizer has " + std::to_string(m->tokenizer_->vocab_size()) +
                   " tokens but token_embd.weight has " + std::to_string(m->config_.n_vocab) + " rows");
  }
  DK_RETURN_IF_ERROR(m->LoadWeights());
  return m;
}

namespace {

// kOutOfRange when x[n][width] holds a NaN or an infinity, naming the layer whose output it is
// (-1: the logits) and the row's token position.
Status CheckActivations(const float* x, int n, int width, const int32_t* pos, int layer) {
  const int64_t i = FirstNonFinite(x, static_cast<int64_t>(n) * width);
  if (i < 0) return Status::Ok();
  const int64_t row = i / width;
  const std::string where = layer < 0 ? "logits" : "layer " + std::to_string(layer) + " output";
  return OutOfRange("forward: " + where + ": non-finite value " + std::to_string(x[i]) + " at token position " +
                    std::to_string(pos[row]) + ", column " + std::to_string(i % width) +
                    " (the numbers overflowed fp32: check the model and the profile)");
}

// Reads "<arch>.<suffix>" as a positive int within [lo, hi].
StatusOr<int> HParam(const GgufFile& f, const std::string& arch, const std::string& suffix, int64_t lo, int64_t hi,
                     const int64_t* def = nullptr) {
  const std::string key = arch + "." + suffix;
  uint64_t v;
  if (def != nullptr) {
    DK_ASSIGN_OR_RETURN(v, f.GetUIntOr(key, static_cast<uint64_t>(*def)));
  } else {
    DK_ASSIGN_OR_RETURN(v, f.GetUInt(key));
  }
  if (static_cast<int64_t>(v) < lo || static_cast<int64_t>(v) > hi) {
    return Corrupt(f.path() + ": key '" + key + "': expected a value in [" + std::to_string(lo) + ", " +
                   std::to_string(hi) + "], found " + std::to_string(v));
  }
  return static_cast<int>(v);
}


}  // namespace

Status Model::LoadConfig() {
  const GgufFile& f = *gguf_;
  ModelConfig& c = config_;
  DK_ASSIGN_OR_RETURN(c.arch, f.GetString("general.architecture"));
  if (c.arch != "llama" && c.arch != "qwen2") {
    return Unimplemented(f.path() + ": general.architecture '" + Printable(c.arch) +
                         "' is not supported (llama, qwen2)");
  }
  auto name = f.GetString("general.name");
  c.name = name.ok() ? name.value() : "";
  constexpr int64_t kMax = 1 << 20;
  DK_ASSIGN_OR_RETURN(c.n_embd, HParam(f, c.arch, "embedding_length", 1, kMax));
  DK_ASSIGN_OR_RETURN(c.n_layer, HParam(f, c.arch, "block_count", 1, 4096));
  DK_ASSIGN_OR_RETURN(c.n_ff, HParam(f, c.arch, "feed_forward_length", 1, kMax));
  DK_ASSIGN_OR_RETURN(c.n_head, HParam(f, c.arch, "attention.head_count", 1, 4096));
  const int64_t def_kv = c.n_head, def_ctx = 2048;
  DK_ASSIGN_OR_RETURN(c.n_head_kv, HParam(f, c.arch, "attention.head_count_kv", 1, c.n_head, &def_kv));
  DK_ASSIGN_OR_RETURN(c.n_ctx_train, HParam(f, c.arch, "context_length", 1, 1 << 24, &def_ctx));
  if (c.n_head % c.n_head_kv != 0) {
    return Corrupt(f.path() + ": head_count " + std::to_string(c.n_head) + " is not a multiple of head_count_kv " +
                   std::to_string(c.n_head_kv));
  }
  const int64_t def_hd = c.n_embd / c.n_head;
  DK_ASSIGN_OR_RETURN(c.head_dim, HParam(f, c.arch, "attention.key_length", 2, 65536, &def_hd));
  const int64_t def_rot = c.head_dim;
  DK_ASSIGN_OR_RETURN(c.n_rot, HParam(f, c.arch, "rope.dimension_count", 0, c.head_dim, &def_rot));
  if (c.n_rot % 2 != 0) return Corrupt(f.path() + ": rope.dimension_count must be even, found " + std::to_string(c.n_rot));
  double base, eps;
  DK_ASSIGN_OR_RETURN(base, f.GetFloatOr(c.arch + ".rope.freq_base", 10000.0));
  DK_ASSIGN_OR_RETURN(eps, f.GetFloatOr(c.arch + ".attention.layer_norm_rms_epsilon", 1e-5));
  if (!(base > 0) || !(eps >= 0)) return Corrupt(f.path() + ": rope.freq_base or rms epsilon out of range");
  c.rope_base = static_cast<float>(base);
  c.rms_eps = static_cast<float>(eps);
  c.rope_neox = c.arch == "qwen2";
  c.qkv_bias = c.arch == "qwen2";
  const GgufTensorInfo* emb = f.FindTensor("token_embd.weight");
  if (emb == nullptr) return NotFound(f.path() + ": tensor 'token_embd.weight' is missing");
  if (emb->dims.size() != 2 || emb->dims[0] != c.n_embd) {
    return Corrupt(f.path() + ": tensor 'token_embd.weight': expected shape [" + std::to_string(c.n_embd) +
                   ", n_vocab], found " + emb->shape_string());
  }
  c.n_vocab = static_cast<int>(emb->dims[1]);
  c.tied_output = f.FindTensor("output.weight") == nullptr;
  return Status::Ok();
}

namespace {

bool AsWeightType(GgmlType t, WeightType* out) {
  switch (t) {
    case GgmlType::kF32: *out = WeightType::kF32; return true;
    case GgmlType::kF16: *out = WeightType::kF16; return true;
    case GgmlType::kBF16: *out = WeightType::kBF16; return true;
    case GgmlType::kQ8_0: *out = WeightType::kQ8_0; return true;
    case GgmlType::kQ4_0: *out = WeightType::kQ4_0; return true;
    case GgmlType::kQ4_K: *out = WeightType::kQ4_K; return true;
    case GgmlType::kQ5_K: *out = WeightType::kQ5_K; return true;
    case GgmlType::kQ6_K: *out = WeightType::kQ6_K; return true;
    default: return false;
  }
}

}  // namespace

StatusOr<const GgufTensorInfo*> Model::Tensor(const std::string& name, const std::vector<int64_t>& dims) {
  const GgufTensorInfo* t;
  DK_ASSIGN_OR_RETURN(t, gguf_->GetTensor(name, dims));
  fingerprint_ = Fnv1a(fingerprint_, name.data(), name.size());
  fingerprint_ = Fnv1a(fingerprint_, t->data, std::min<size_t>(t->nbytes, 4096));
  fingerprint_ = Fnv1a(fingerprint_, t->data + t->nbytes - std::min<size_t>(t->nbytes, 4096), std::min<size_t>(t->nbytes, 4096));
  // NaN or infinity in a weight would surface as "PPL = nan" much later: refuse the file now.
  DK_RETURN_IF_ERROR(
      CheckFinite(t->type, t->data, t->n_elements()).WithContext(gguf_->path() + ": tensor '" + name + "'"));
  return t;
}

StatusOr<const float*> Model::Weight(const std::string& name, const std::vector<int64_t>& dims) {
  const GgufTensorInfo* t;
  DK_ASSIGN_OR_RETURN(t, Tensor(name, dims));
  if (t->type == GgmlType::kF32 && reinterpret_cast<uintptr_t>(t->data) % alignof(float) == 0) {
    weight_bytes_ += t->nbytes;
    return reinterpret_cast<const float*>(t->data);
  }
  weight_bytes_ += static_cast<size_t>(t->n_elements()) * 4;
  owned_.emplace_back(static_cast<size_t>(t->n_elements()));
  DK_RETURN_IF_ERROR(gguf_->ReadAsF32(*t, owned_.back().data()));
  return static_cast<const float*>(owned_.back().data());
}

StatusOr<WeightMatrix> Model::Matrix(const std::string& name, const std::vector<int64_t>& dims) {
  const GgufTensorInfo* t;
  DK_ASSIGN_OR_RETURN(t, Tensor(name, dims));
  const std::string ctx = gguf_->path() + ": tensor '" + name + "'";
  WeightType wt;
  if (!AsWeightType(t->type, &wt)) {
    return Unimplemented(ctx + ": type " + TypeName(static_cast<uint32_t>(t->type)) + " is not supported");
  }
  const GgmlTypeTraits* tr = GetTypeTraits(static_cast<uint32_t>(t->type));
  size_t expect = 0;
  if (dims.size() != 2 || tr == nullptr || dims[0] % tr->block_size != 0 ||
      !RowBytes(t->type, t->n_elements(), &expect) || expect != t->nbytes) {
    return Corrupt(ctx + ": rows of " + std::to_string(dims[0]) + " values are not whole " + TypeName(static_cast<uint32_t>(t->type)) +
                   " blocks, or the size disagrees with the shape " + t->shape_string());
  }
  if (wt == WeightType::kF32 && reinterpret_cast<uintptr_t>(t->data) % alignof(float) != 0) {
    // A file with general.alignment = 1: BLAS wants aligned floats, so this one is copied.
    owned_.emplace_back(static_cast<size_t>(t->n_elements()));
    DK_RETURN_IF_ERROR(gguf_->ReadAsF32(*t, owned_.back().data()));
    weight_bytes_ += t->nbytes;
    return MakeWeightMatrix(wt, owned_.back().data(), dims[1], dims[0]);
  }
  weight_bytes_ += t->nbytes;
  return MakeWeightMatrix(wt, t->data, dims[1], dims[0]);
}

Status Model::LoadWeights() {
  const ModelConfig& c = config_;
  const int64_t E = c.n_embd, Q = static_cast<int64_t>(c.n_head) * c.head_dim;
  const int64_t KV = static_cast<int64_t>(c.n_head_kv) * c.head_dim, F = c.n_ff, V = c.n_vocab;
  fingerprint_ = Fnv1a(kFnv1aOffset, &c.n_embd, sizeof(int));
  DK_ASSIGN_OR_RETURN(tok_embd_, Matrix("token_embd.weight", {E, V}));
  DK_ASSIGN_OR_RETURN(output_norm_, Weight("output_norm.weight", {E}));
  if (c.tied_output) {
    output_ = tok_embd_;
  } else {
    DK_ASSIGN_OR_RETURN(output_, Matrix("output.weight", {E, V}));
  }
  layers_.resize(c.n_layer);
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LayerWeights& w = layers_[l];
    DK_ASSIGN_OR_RETURN(w.attn_norm, Weight(p + "attn_norm.weight", {E}));
    DK_ASSIGN_OR_RETURN(w.wq, Matrix(p + "attn_q.weight", {E, Q}));
    DK_ASSIGN_OR_RETURN(w.wk, Matrix(p + "attn_k.weight", {E, KV}));
    DK_ASSIGN_OR_RETURN(w.wv, Matrix(p + "attn_v.weight", {E, KV}));
    DK_ASSIGN_OR_RETURN(w.wo, Matrix(p + "attn_output.weight", {Q, E}));
    if (c.qkv_bias) {
      DK_ASSIGN_OR_RETURN(w.bq, Weight(p + "attn_q.bias", {Q}));
      DK_ASSIGN_OR_RETURN(w.bk, Weight(p + "attn_k.bias", {KV}));
      DK_ASSIGN_OR_RETURN(w.bv, Weight(p + "attn_v.bias", {KV}));
    }
    DK_ASSIGN_OR_RETURN(w.ffn_norm, Weight(p + "ffn_norm.weight", {E}));
    DK_ASSIGN_OR_RETURN(w.w_gate, Matrix(p + "ffn_gate.weight", {E, F}));
    DK_ASSIGN_OR_RETURN(w.w_up, Matrix(p + "ffn_up.weight", {E, F}));
    DK_ASSIGN_OR_RETURN(w.w_down, Matrix(p + "ffn_down.weight", {F, E}));
  }
  return Status::Ok();
}

Status Model::Forward(const int32_t* tokens, int n, KvCache& cache, ForwardState& st, float* logits, bool all_logits,
                      ThreadPool& pool) const {
  const ModelConfig& c = config_;
  if (n <= 0 || n > st.max_batch) {
    return InvalidArgument("forward: batch of " + std::to_string(n) + " tokens (max " + std::to_string(st.max_batch) + ")");
  }
  for (int i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.n_vocab)
      return InvalidArgument("forward: token id " + std::to_string(tokens[i]) + " outside the vocabulary of " +
                             std::to_string(c.n_vocab));
  }
  KvPlan plan;
  DK_ASSIGN_OR_RETURN(plan, cache.Plan(n));
  DK_RETURN_IF_ERROR(cache.Apply(plan));

  const int E = c.n_embd, Q = c.n_head * c.head_dim, KV = c.n_head_kv * c.head_dim, F = c.n_ff;
  for (int i = 0; i < n; ++i) {
    st.pos[i] = plan.first + i;
    // Only the rows used are converted (the table stays as stored).
    DequantizeWeights(tok_embd_.type, tok_embd_.row(tokens[i]), &st.x[static_cast<size_t>(i) * E], E);
  }
  for (int l = 0; l < c.n_layer; ++l) {
    const LayerWeights& w = layers_[l];
    // Attention block.
    RmsNorm(st.x.data(), w.attn_norm, st.xn.data(), n, E, c.rms_eps);
    MatMulWT(st.xn.data(), w.wq, st.q.data(), n, false, &pool);
    MatMulWT(st.xn.data(), w.wk, st.k.data(), n, false, &pool);
    MatMulWT(st.xn.data(), w.wv, st.v.data(), n, false, &pool);
    if (c.qkv_bias) {
      AddBias(st.q.data(), w.bq, n, Q);
      AddBias(st.k.data(), w.bk, n, KV);
      AddBias(st.v.data(), w.bv, n, KV);
    }
    Rope(st.q.data(), st.pos.data(), n, c.n_head, c.head_dim, c.n_rot, c.rope_base, c.rope_neox);
    Rope(st.k.data(), st.pos.data(), n, c.n_head_kv, c.head_dim, c.n_rot, c.rope_base, c.rope_neox);
    cache.Write(l, plan, st.k.data(), st.v.data(), st.xn.data());
    cache.Attend(l, plan, st.q.data(), st.att.data(), pool);
    MatMulWT(st.att.data(), w.wo, st.x.data(), n, true, &pool);
    // Feed-forward block (SwiGLU).
    RmsNorm(st.x.data(), w.ffn_norm, st.xn.data(), n, E, c.rms_eps);
    MatMulWT(st.xn.data(), w.w_gate, st.gate.data(), n, false, &pool);
    MatMulWT(st.xn.data(), w.w_up, st.up.data(), n, false, &pool);
    SwiGlu(st.gate.data(), st.up.data(), st.gate.data(), static_cast<int64_t>(n) * F);
    MatMulWT(st.gate.data(), w.w_down, st.x.data(), n, true, &pool);
    // A NaN or infinity would flow through every later layer into the logits (and "PPL = nan"):
    // stop at the layer that made it. One pass over n x E values, next to n x E x (Q + 2 F) FLOPs.
    DK_RETURN_IF_ERROR(CheckActivations(st.x.data(), n, E, st.pos.data(), l));
  }
  const int first_out = all_logits ? 0 : n - 1;
  const int n_out = n - first_out;
  RmsNorm(st.x.data() + static_cast<size_t>(first_out) * E, output_norm_, st.xn.data(), n_out, E, c.rms_eps);
  MatMulWT(st.xn.data(), output_, logits, n_out, false, &pool);
  return CheckActivations(logits, n_out, c.n_vocab, st.pos.data() + first_out, -1);
}

}  // namespace dk
