// The training graph of the Llama forward pass (llm.c style): a forward over B sequences of T
// tokens that keeps every activation the backward needs, and that backward, with respect to
// activations only: the model's weights stay frozen. Between RoPE and attention each layer's keys
// and values pass through a KvRelaxation, the seam where train/ puts DynaKV's relaxed cache (null:
// the exact full cache). One template serves float (training: BLAS, threads) and double (gradient
// checks: the scalar references of ops/grad.h), with the same code path.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/status.h"
#include "model/llama.h"

namespace dk {

class ThreadPool;

template <typename T>
struct GraphLayerWeights {
  // Matrices [out][in], vectors [width], as in LayerWeights.
  const T* attn_norm = nullptr;  // [E]
  const T* wq = nullptr;         // [Q][E]
  const T* wk = nullptr;         // [KV][E]
  const T* wv = nullptr;         // [KV][E]
  const T* wo = nullptr;         // [E][Q]
  const T* bq = nullptr;         // [Q]   qwen2 only
  const T* bk = nullptr;         // [KV]  qwen2 only
  const T* bv = nullptr;         // [KV]  qwen2 only
  const T* ffn_norm = nullptr;   // [E]
  const T* w_gate = nullptr;     // [F][E]
  const T* w_up = nullptr;       // [F][E]
  const T* w_down = nullptr;     // [E][F]
};

template <typename T>
struct GraphWeights {
  ModelConfig config;
  const T* tok_embd = nullptr;     // [V][E]
  const T* output_norm = nullptr;  // [E]
  const T* output = nullptr;       // [V][E]
  std::vector<GraphLayerWeights<T>> layers;
};

// A loaded model's weights as fp32 for the graph, which runs on fp32 BLAS (forward and backward):
// matrices stored as F32 are viewed in place; matrices stored in any other type (f16, q8_0, q4_K,
// ...: the engine uses those as stored) are dequantized into fp32 copies owned here, so training
// on a quantized file costs its fp32 size in memory. Keep it alive as long as the graph built on it.
class ModelGraphWeights {
 public:
  explicit ModelGraphWeights(const Model& model);
  const GraphWeights<float>& view() const { return view_; }

 private:
  const float* Fp32(const WeightMatrix& m);
  std::vector<std::vector<float>> owned_;
  GraphWeights<float> view_;
};

// Weights owned by the holder: a converted copy of a model, or random weights for tests.
template <typename T>
class OwnedGraphWeights {
 public:
  static OwnedGraphWeights FromModel(const Model& model);
  // Matrices N(0, 1 / in), embeddings N(0, 1), norm weights 1 + N(0, 0.1^2); the same values for float and
  // double for a given seed (drawn in double, then converted).
  static OwnedGraphWeights Random(const ModelConfig& config, uint64_t seed);
  const GraphWeights<T>& view() const { return view_; }
  std::vector<T>& tok_embd() { return store_[0]; }  // mutable, for gradient checks

 private:
  std::vector<std::vector<T>> store_;  // [0] = tok_embd, then the rest
  GraphWeights<T> view_;
};

// What happens to keys and values between RoPE and attention (train/: DynaKV's relaxed cache).
template <typename T>
class KvRelaxation {
 public:
  virtual ~KvRelaxation() = default;
  // n rows (B*T tokens). k (after RoPE), v: [n][D]; x: [n][E] the attention input (after
  // RMSNorm). Writes the keys and values attention will use, khat, vhat: [n][D].
  virtual void Forward(int layer, int n, const T* k, const T* v, const T* x, T* khat, T* vhat) = 0;
  // From dL/dkhat, dL/dvhat: writes dL/dk, dL/dv [n][D], and adds the relaxation's own path from
  // x (e.g. a router reading it) into dx [n][E]. Called layer by layer from the top.
  virtual void Backward(int layer, int n, const T* dkhat, const T* dvhat, T* dk, T* dv, T* dx) = 0;
};

template <typename T>
class TrainGraph {
 public:
  // Buffers for `batch` sequences of `seq_len` tokens each (positions 0 .. seq_len-1).
  TrainGraph(const GraphWeights<T>& weights, int batch, int seq_len);

  int batch() const { return B_; }
  int seq_len() const { return T_; }
  int rows() const { return N_; }
  const ModelConfig& config() const { return w_.config; }

  // tokens: [batch][seq_len]. Fills logits(). kv may be null (exact attention).
  Status Forward(const int32_t* tokens, KvRelaxation<T>* kv, ThreadPool& pool);
  const T* logits() const { return logits_.data(); }  // [N][V]

  // Backpropagates dlogits [N][V] through every layer (calling kv->Backward for each, from the
  // top) down to the input embeddings. Needs the activations of the last Forward.
  void Backward(const T* dlogits, KvRelaxation<T>* kv, ThreadPool& pool);
  const T* input_grad() const { return dx_.data(); }  // [N][E] dL/d(embedding rows)

  // Bytes of activations and scratch held.
  size_t bytes() const;
  // What bytes() will be for these sizes, computed without allocating (checked against the memory
  // available before a graph is made). Saturates instead of overflowing.
  static uint64_t BytesFor(const ModelConfig& config, int batch, int seq_len);

 private:
  struct LayerActs {
    std::vector<T> xn1;         // [N][E]  attention input (after RMSNorm)
    std::vector<T> q;           // [N][Q]  queries after RoPE
    std::vector<T> khat, vhat;  // [N][KV] keys (after RoPE) and values as attended
    std::vector<T> probs;       // [B][Hq][T][T] attention weights
    std::vector<T> att;         // [N][Q]  attention output (before Wo)
    std::vector<T> x_mid;       // [N][E]  residual after the attention block
    std::vector<T> xn2;         // [N][E]  feed-forward input (after RMSNorm)
    std::vector<T> gate, up;    // [N][F]
  };

  GraphWeights<T> w_;
  int B_, T_, N_;
  std::vector<int32_t> pos_;          // [N] position of each row within its sequence
  std::vector<std::vector<T>> resid_; // [n_layer + 1][N][E] residual stream entering each layer, and the last
  std::vector<LayerActs> acts_;       // [n_layer]
  std::vector<T> xf_;                 // [N][E] final RMSNorm output
  std::vector<T> logits_;             // [N][V]
  // Scratch: forward (k, v before the relaxation, feed-forward product) and backward.
  std::vector<T> k_, v_, act_;        // [N][KV], [N][KV], [N][F]
  std::vector<T> dx_, dxmid_, dxn_, tmp_;  // [N][E]
  std::vector<T> dgate_, dup_, dact_;      // [N][F]
  std::vector<T> datt_, dq_;               // [N][Q]
  std::vector<T> dkhat_, dvhat_, dk_, dv_; // [N][KV]
};

extern template class TrainGraph<float>;
extern template class TrainGraph<double>;
extern template class OwnedGraphWeights<float>;
extern template class OwnedGraphWeights<double>;

}  // namespace dk
