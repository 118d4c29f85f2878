// Llama-family decoder (architectures "llama" and "qwen2"): weights from GGUF and the forward pass.
// The model owns its weights; the caller owns the KV cache and the activations, so one model
// serves many caches (e.g. a full-cache teacher beside a compressed student).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "kv/kv_cache.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "ops/qmatmul.h"

namespace dk {

class ThreadPool;

struct ModelConfig {
  std::string arch;        // "llama" or "qwen2"
  std::string name;        // general.name
  int n_vocab = 0;
  int n_embd = 0;
  int n_layer = 0;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  int n_ff = 0;
  int n_ctx_train = 0;
  int n_rot = 0;           // rotated dims per head
  float rope_base = 10000.0f;
  float rms_eps = 1e-5f;
  bool rope_neox = false;  // qwen2: NeoX pairs (i, i + n_rot/2); llama: adjacent pairs
  bool qkv_bias = false;   // qwen2
  bool tied_output = false;

  KvShape kv_shape() const { return KvShape{n_layer, n_head, n_head_kv, head_dim, n_embd}; }
};

struct LayerWeights {
  // Matrices are [out][in] (ggml ne = [in, out]) as stored in the file (F32, F16, BF16, q8_0, q4_0,
  // q4_K, q5_K, q6_K; usually pointing into the file's mapping); vectors are fp32 [width].
  const float* attn_norm = nullptr;  // [n_embd]
  WeightMatrix wq;                   // [n_head*d][n_embd]
  WeightMatrix wk;                   // [n_head_kv*d][n_embd]
  WeightMatrix wv;                   // [n_head_kv*d][n_embd]
  WeightMatrix wo;                   // [n_embd][n_head*d]
  const float* bq = nullptr;         // [n_head*d]     qwen2 only
  const float* bk = nullptr;         // [n_head_kv*d]  qwen2 only
  const float* bv = nullptr;         // [n_head_kv*d]  qwen2 only
  const float* ffn_norm = nullptr;   // [n_embd]
  WeightMatrix w_gate;               // [n_ff][n_embd]
  WeightMatrix w_up;                 // [n_ff][n_embd]
  WeightMatrix w_down;               // [n_embd][n_ff]
};

// Activation buffers for batches of up to max_batch tokens. Owned by the caller.
struct ForwardState {
  ForwardState(const ModelConfig& c, int max_batch);
  int max_batch;
  std::vector<int32_t> pos;   // [max_batch]
  std::vector<float> x;       // [max_batch][n_embd]   residual stream
  std::vector<float> xn;      // [max_batch][n_embd]   normed input of a sub-block
  std::vector<float> q;       // [max_batch][n_head*d]
  std::vector<float> k;       // [max_batch][n_head_kv*d]
  std::vector<float> v;       // [max_batch][n_head_kv*d]
  std::vector<float> att;     // [max_batch][n_head*d]
  std::vector<float> gate;    // [max_batch][n_ff]
  std::vector<float> up;      // [max_batch][n_ff]
};

class Model {
 public:
  // Loads and validates a GGUF model. Matrices are used as stored in the file's memory mapping
  // (F32, F16, BF16, q8_0, q4_0, q4_K, q5_K, q6_K; see ops/qmatmul.h); only vectors (norms, biases)
  // not stored as F32 are converted to owned fp32 copies.
  static StatusOr<std::unique_ptr<Model>> Load(const std::string& path);

  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const GgufFile& gguf() const { return *gguf_; }
  // Bytes of weights held (mapped as stored, or converted vectors).
  size_t weight_bytes() const { return weight_bytes_; }
  // Fingerprint of the weights (FNV-1a over the metadata and a sample of every tensor's bytes):
  // lets a calibrated profile refuse a different model.
  uint64_t fingerprint() const { return fingerprint_; }

  // Runs n tokens (n <= state.max_batch) through the model, appending them to `cache`.
  // logits: [n][n_vocab] if all_logits, else [n_vocab] for the last token only.
  // kResourceExhausted if the cache cannot take n more tokens (nothing is changed then).
  Status Forward(const int32_t* tokens, int n, KvCache& cache, ForwardState& state, float* logits, bool all_logits,
                 ThreadPool& pool) const;

  // Read-only views of the weights as stored (the training graph converts them; weights stay frozen).
  const WeightMatrix& tok_embd() const { return tok_embd_; }  // [n_vocab][n_embd]
  const float* output_norm() const { return output_norm_; }   // [n_embd]
  const WeightMatrix& output() const { return output_; }      // [n_vocab][n_embd]
  const LayerWeights& layer(int l) const { return layers_[l]; }

 private:
  Model() = default;
  Status LoadConfig();
  Status LoadWeights();
  // Looks a tensor up, checks it is finite and adds it to the fingerprint.
  StatusOr<const GgufTensorInfo*> Tensor(const std::string& name, const std::vector<int64_t>& dims);
  // A vector (or any tensor) as fp32: in place when stored as aligned F32, else an owned copy.
  StatusOr<const float*> Weight(const std::string& name, const std::vector<int64_t>& dims);
  // A matrix [dims[1]][dims[0]] as stored.
  StatusOr<WeightMatrix> Matrix(const std::string& name, const std::vector<int64_t>& dims);

  std::unique_ptr<GgufFile> gguf_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ModelConfig config_;
  std::vector<std::vector<float>> owned_;  // converted tensors
  WeightMatrix tok_embd_;                  // [n_vocab][n_embd]
  const float* output_norm_ = nullptr;     // [n_embd]
  WeightMatrix output_;                    // [n_vocab][n_embd]
  std::vector<LayerWeights> layers_;
  size_t weight_bytes_ = 0;
  uint64_t fingerprint_ = 0;
};

}  // namespace dk
