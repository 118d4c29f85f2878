#include "model/train_graph.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "core/threads.h"
#include "ops/grad.h"
#include "ops/ops.h"

namespace dk {

const float* ModelGraphWeights::Fp32(const WeightMatrix& m) {
  if (m.type == WeightType::kF32 && reinterpret_cast<uintptr_t>(m.data) % alignof(float) == 0) {
    return reinterpret_cast<const float*>(m.data);
  }
  owned_.emplace_back(static_cast<size_t>(m.rows * m.cols));
  float* dst = owned_.back().data();
  for (int64_t r = 0; r < m.rows; ++r) DequantizeWeights(m.type, m.row(r), dst + r * m.cols, m.cols);
  return dst;
}

ModelGraphWeights::ModelGraphWeights(const Model& model) {
  GraphWeights<float>& g = view_;
  g.config = model.config();
  g.tok_embd = Fp32(model.tok_embd());
  g.output_norm = model.output_norm();
  g.output = model.output().data == model.tok_embd().data ? g.tok_embd : Fp32(model.output());
  g.layers.resize(g.config.n_layer);
  for (int l = 0; l < g.config.n_layer; ++l) {
    const LayerWeights& s = model.layer(l);
    g.layers[l] = GraphLayerWeights<float>{s.attn_norm, Fp32(s.wq), Fp32(s.wk),     Fp32(s.wv),
                                           Fp32(s.wo),  s.bq,        s.bk,           s.bv,
                                           s.ffn_norm,  Fp32(s.w_gate), Fp32(s.w_up), Fp32(s.w_down)};
  }
}

namespace {

// Order in which OwnedGraphWeights stores a layer's tensors (after tok_embd, output_norm, output).
enum LayerTensor { kAttnNorm, kWq, kWk, kWv, kWo, kBq, kBk, kBv, kFfnNorm, kWGate, kWUp, kWDown, kLayerTensors };

struct TensorShape {
  int64_t rows, cols;  // [out][in]; vectors have rows = 1
  bool is_norm;
};

TensorShape ShapeOf(const ModelConfig& c, int which) {
  const int64_t E = c.n_embd, Q = static_cast<int64_t>(c.n_head) * c.head_dim,
                KV = static_cast<int64_t>(c.n_head_kv) * c.head_dim, F = c.n_ff;
  switch (which) {
    case kAttnNorm: case kFfnNorm: return {1, E, true};
    case kWq: return {Q, E, false};
    case kWk: case kWv: return {KV, E, false};
    case kWo: return {E, Q, false};
    case kBq: return {1, c.qkv_bias ? Q : 0, false};
    case kBk: case kBv: return {1, c.qkv_bias ? KV : 0, false};
    case kWGate: case kWUp: return {F, E, false};
    default: return {E, F, false};  // kWDown
  }
}

template <typename T>
void Wire(GraphWeights<T>& g, std::vector<std::vector<T>>& store) {
  const ModelConfig& c = g.config;
  g.tok_embd = store[0].data();
  g.output_norm = store[1].data();
  g.output = c.tied_output ? store[0].data() : store[2].data();
  g.layers.resize(c.n_layer);
  for (int l = 0; l < c.n_layer; ++l) {
    auto t = [&](int which) -> const T* {
      const std::vector<T>& v = store[3 + static_cast<size_t>(l) * kLayerTensors + which];
      return v.empty() ? nullptr : v.data();
    };
    g.layers[l] = GraphLayerWeights<T>{t(kAttnNorm), t(kWq), t(kWk), t(kWv), t(kWo), t(kBq), t(kBk), t(kBv),
                                       t(kFfnNorm), t(kWGate), t(kWUp), t(kWDown)};
  }
}

}  // namespace

template <typename T>
OwnedGraphWeights<T> OwnedGraphWeights<T>::FromModel(const Model& model) {
  const ModelGraphWeights fp32(model);
  const GraphWeights<float>& src = fp32.view();
  const ModelConfig& c = src.config;
  OwnedGraphWeights<T> o;
  auto copy = [](const float* p, int64_t n) { return p == nullptr ? std::vector<T>() : std::vector<T>(p, p + n); };
  const int64_t E = c.n_embd, V = c.n_vocab;
  o.store_.push_back(copy(src.tok_embd, V * E));
  o.store_.push_back(copy(src.output_norm, E));
  o.store_.push_back(c.tied_output ? std::vector<T>() : copy(src.output, V * E));
  for (int l = 0; l < c.n_layer; ++l) {
    const GraphLayerWeights<float>& s = src.layers[l];
    const float* ptrs[kLayerTensors] = {s.attn_norm, s.wq, s.wk, s.wv, s.wo, s.bq, s.bk, s.bv,
                                        s.ffn_norm, s.w_gate, s.w_up, s.w_down};
    for (int which = 0; which < kLayerTensors; ++which) {
      const TensorShape sh = ShapeOf(c, which);
      o.store_.push_back(copy(ptrs[which], sh.rows * sh.cols));
    }
  }
  o.view_.config = c;
  Wire(o.view_, o.store_);
  return o;
}

template <typename T>
OwnedGraphWeights<T> OwnedGraphWeights<T>::Random(const ModelConfig& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  OwnedGraphWeights<T> o;
  auto matrix = [&](int64_t rows, int64_t cols) {
    std::vector<T> m(static_cast<size_t>(rows * cols));
    const double s = 1.0 / std::sqrt(static_cast<double>(cols));
    for (T& x : m) x = static_cast<T>(nd(rng) * s);
    return m;
  };
  auto norm = [&](int64_t n) {
    std::vector<T> m(static_cast<size_t>(n));
    for (T& x : m) x = static_cast<T>(1.0 + 0.1 * nd(rng));
    return m;
  };
  const int64_t E = c.n_embd, V = c.n_vocab;
  std::vector<T> embd(static_cast<size_t>(V * E));  // O(1) entries, like a trained model's
  for (T& x : embd) x = static_cast<T>(nd(rng));
  o.store_.push_back(std::move(embd));
  o.store_.push_back(norm(E));
  o.store_.push_back(c.tied_output ? std::vector<T>() : matrix(V, E));
  for (int l = 0; l < c.n_layer; ++l) {
    for (int which = 0; which < kLayerTensors; ++which) {
      const TensorShape sh = ShapeOf(c, which);
      if (sh.rows * sh.cols == 0) {
        o.store_.emplace_back();
      } else if (sh.is_norm) {
        o.store_.push_back(norm(sh.cols));
      } else if (sh.rows == 1) {  // biases
        std::vector<T> b(static_cast<size_t>(sh.cols));
        for (T& x : b) x = static_cast<T>(0.1 * nd(rng));
        o.store_.push_back(std::move(b));
      } else {
        o.store_.push_back(matrix(sh.rows, sh.cols));
      }
    }
  }
  o.view_.config = c;
  Wire(o.view_, o.store_);
  return o;
}

template <typename T>
TrainGraph<T>::TrainGraph(const GraphWeights<T>& weights, int batch, int seq_len)
    : w_(weights), B_(batch), T_(seq_len), N_(batch * seq_len) {
  const ModelConfig& c = w_.config;
  const size_t N = static_cast<size_t>(N_), E = c.n_embd, Q = static_cast<size_t>(c.n_head) * c.head_dim,
               KV = static_cast<size_t>(c.n_head_kv) * c.head_dim, F = c.n_ff, V = c.n_vocab;
  pos_.resize(N);
  for (int b = 0; b < B_; ++b)
    for (int t = 0; t < T_; ++t) pos_[static_cast<size_t>(b) * T_ + t] = t;
  resid_.assign(c.n_layer + 1, std::vector<T>(N * E));
  acts_.resize(c.n_layer);
  for (LayerActs& a : acts_) {
    a.xn1.resize(N * E);
    a.q.resize(N * Q);
    a.khat.resize(N * KV);
    a.vhat.resize(N * KV);
    a.probs.resize(static_cast<size_t>(B_) * c.n_head * T_ * T_);
    a.att.resize(N * Q);
    a.x_mid.resize(N * E);
    a.xn2.resize(N * E);
    a.gate.resize(N * F);
    a.up.resize(N * F);
  }
  xf_.resize(N * E);
  logits_.resize(N * V);
  k_.resize(N * KV);
  v_.resize(N * KV);
  act_.resize(N * F);
  for (auto* buf : {&dx_, &dxmid_, &dxn_, &tmp_}) buf->resize(N * E);
  for (auto* buf : {&dgate_, &dup_, &dact_}) buf->resize(N * F);
  for (auto* buf : {&datt_, &dq_}) buf->resize(N * Q);
  for (auto* buf : {&dkhat_, &dvhat_, &dk_, &dv_}) buf->resize(N * KV);
}

template <typename T>
uint64_t TrainGraph<T>::BytesFor(const ModelConfig& c, int batch, int seq_len) {
  // The buffers the constructor sizes, in elements (see the members in train_graph.h).
  const long double N = static_cast<long double>(batch) * seq_len, E = c.n_embd, Q = c.n_head * c.head_dim,
                    KV = c.n_head_kv * c.head_dim, F = c.n_ff, V = c.n_vocab, L = c.n_layer;
  const long double probs = static_cast<long double>(batch) * c.n_head * seq_len * seq_len;
  const long double per_layer = 3 * N * E + 2 * N * Q + 2 * N * KV + probs + 2 * N * F;
  const long double elems = (L + 1) * N * E + L * per_layer + N * E + N * V + 2 * N * KV + N * F + 4 * N * E +
                            3 * N * F + 2 * N * Q + 4 * N * KV;
  const long double bytes = elems * sizeof(T) + N * sizeof(int32_t);
  return bytes >= 1.8e19L ? UINT64_MAX : static_cast<uint64_t>(bytes);
}

template <typename T>
size_t TrainGraph<T>::bytes() const {
  size_t n = pos_.size() * sizeof(int32_t);
  for (const auto& r : resid_) n += r.size() * sizeof(T);
  for (const LayerActs& a : acts_)
    for (const auto* v : {&a.xn1, &a.q, &a.khat, &a.vhat, &a.probs, &a.att, &a.x_mid, &a.xn2, &a.gate, &a.up})
      n += v->size() * sizeof(T);
  for (const auto* v : {&xf_, &logits_, &k_, &v_, &act_, &dx_, &dxmid_, &dxn_, &tmp_, &dgate_, &dup_, &dact_, &datt_,
                        &dq_, &dkhat_, &dvhat_, &dk_, &dv_})
    n += v->size() * sizeof(T);
  return n;
}

namespace {

// The graph's products split by rows over the pool (OpenBLAS runs at one thread beside it, see
// ConfigureBlasFor): each part multiplies its own rows, so a row's result is the same however the
// rows are split, and the parts are fixed for a thread count (ThreadPool::ParallelFor).
template <typename T>
void RowsMatMulWT(ThreadPool& pool, const T* x, const T* w, T* y, int n, int in, int out, bool add) {
  pool.ParallelFor(n, [&](int64_t b, int64_t e, int) {
    const int rows = static_cast<int>(e - b);
    if (add) {
      MatMulWTAdd(x + b * in, w, y + b * out, rows, in, out);
    } else {
      MatMulWT(x + b * in, w, y + b * out, rows, in, out);
    }
  });
}

template <typename T>
void RowsMatMulW(ThreadPool& pool, const T* dy, const T* w, T* dx, int n, int out, int in, bool accumulate) {
  pool.ParallelFor(n, [&](int64_t b, int64_t e, int) {
    MatMulW(dy + b * out, w, dx + b * in, static_cast<int>(e - b), out, in, accumulate);
  });
}

template <typename T>
void AddBiasRows(T* x, const T* bias, int n, int dim) {
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < dim; ++i) x[static_cast<int64_t>(r) * dim + i] += bias[i];
}

}  // namespace

template <typename T>
Status TrainGraph<T>::Forward(const int32_t* tokens, KvRelaxation<T>* kv, ThreadPool& pool) {
  const ModelConfig& c = w_.config;
  const int N = N_, E = c.n_embd, Q = c.n_head * c.head_dim, KV = c.n_head_kv * c.head_dim, F = c.n_ff;
  for (int i = 0; i < N; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.n_vocab)
      return InvalidArgument("training forward: token id " + std::to_string(tokens[i]) + " at row " +
                             std::to_string(i) + " is outside the vocabulary of " + std::to_string(c.n_vocab));
    std::memcpy(&resid_[0][static_cast<size_t>(i) * E], w_.tok_embd + static_cast<int64_t>(tokens[i]) * E,
                E * sizeof(T));
  }
  for (int l = 0; l < c.n_layer; ++l) {
    const GraphLayerWeights<T>& w = w_.layers[l];
    LayerActs& a = acts_[l];
    const T* x = resid_[l].data();
    RmsNorm(x, w.attn_norm, a.xn1.data(), N, E, c.rms_eps);
    RowsMatMulWT(pool, a.xn1.data(), w.wq, a.q.data(), N, E, Q, false);
    RowsMatMulWT(pool, a.xn1.data(), w.wk, k_.data(), N, E, KV, false);
    RowsMatMulWT(pool, a.xn1.data(), w.wv, v_.data(), N, E, KV, false);
    if (c.qkv_bias) {
      AddBiasRows(a.q.data(), w.bq, N, Q);
      AddBiasRows(k_.data(), w.bk, N, KV);
      AddBiasRows(v_.data(), w.bv, N, KV);
    }
    Rope(a.q.data(), pos_.data(), N, c.n_head, c.head_dim, c.n_rot, c.rope_base, c.rope_neox);
    Rope(k_.data(), pos_.data(), N, c.n_head_kv, c.head_dim, c.n_rot, c.rope_base, c.rope_neox);
    if (kv != nullptr) {
      kv->Forward(l, N, k_.data(), v_.data(), a.xn1.data(), a.khat.data(), a.vhat.data());
    } else {
      a.khat = k_;
      a.vhat = v_;
    }
    CausalAttentionForward(a.q.data(), a.khat.data(), a.vhat.data(), a.att.data(), a.probs.data(), B_, T_, c.n_head,
                           c.n_head_kv, c.head_dim, pool);
    a.x_mid.assign(x, x + static_cast<size_t>(N) * E);
    RowsMatMulWT(pool, a.att.data(), w.wo, a.x_mid.data(), N, Q, E, true);
    RmsNorm(a.x_mid.data(), w.ffn_norm, a.xn2.data(), N, E, c.rms_eps);
    RowsMatMulWT(pool, a.xn2.data(), w.w_gate, a.gate.data(), N, E, F, false);
    RowsMatMulWT(pool, a.xn2.data(), w.w_up, a.up.data(), N, E, F, false);
    SwiGlu(a.gate.data(), a.up.data(), act_.data(), static_cast<int64_t>(N) * F);
    resid_[l + 1] = a.x_mid;
    RowsMatMulWT(pool, act_.data(), w.w_down, resid_[l + 1].data(), N, F, E, true);
  }
  RmsNorm(resid_[c.n_layer].data(), w_.output_norm, xf_.data(), N, E, c.rms_eps);
  RowsMatMulWT(pool, xf_.data(), w_.output, logits_.data(), N, E, c.n_vocab, false);
  return Status::Ok();
}

template <typename T>
void TrainGraph<T>::Backward(const T* dlogits, KvRelaxation<T>* kv, ThreadPool& pool) {
  const ModelConfig& c = w_.config;
  const int N = N_, E = c.n_embd, Q = c.n_head * c.head_dim, KV = c.n_head_kv * c.head_dim, F = c.n_ff;
  const size_t NE = static_cast<size_t>(N) * E;
  // Head and final norm: dx = d/d resid[L].
  RowsMatMulW(pool, dlogits, w_.output, tmp_.data(), N, c.n_vocab, E, false);
  RmsNormBackward(resid_[c.n_layer].data(), w_.output_norm, tmp_.data(), dx_.data(), N, E, c.rms_eps);
  for (int l = c.n_layer - 1; l >= 0; --l) {
    const GraphLayerWeights<T>& w = w_.layers[l];
    const LayerActs& a = acts_[l];
    // Feed-forward block: resid[l+1] = x_mid + SwiGLU(xn2) Wd^T.
    RowsMatMulW(pool, dx_.data(), w.w_down, dact_.data(), N, E, F, false);
    SwiGluBackward(a.gate.data(), a.up.data(), dact_.data(), dgate_.data(), dup_.data(), static_cast<int64_t>(N) * F);
    RowsMatMulW(pool, dgate_.data(), w.w_gate, dxn_.data(), N, F, E, false);
    RowsMatMulW(pool, dup_.data(), w.w_up, dxn_.data(), N, F, E, true);
    RmsNormBackward(a.x_mid.data(), w.ffn_norm, dxn_.data(), tmp_.data(), N, E, c.rms_eps);
    for (size_t i = 0; i < NE; ++i) dxmid_[i] = dx_[i] + tmp_[i];
    // Attention block: x_mid = resid[l] + att Wo^T.
    RowsMatMulW(pool, dxmid_.data(), w.wo, datt_.data(), N, E, Q, false);
    CausalAttentionBackward(a.q.data(), a.khat.data(), a.vhat.data(), a.probs.data(), datt_.data(), dq_.data(),
                            dkhat_.data(), dvhat_.data(), B_, T_, c.n_head, c.n_head_kv, c.head_dim, pool);
    std::fill(dxn_.begin(), dxn_.end(), T(0));
    if (kv != nullptr) {
      kv->Backward(l, N, dkhat_.data(), dvhat_.data(), dk_.data(), dv_.data(), dxn_.data());
    } else {
      dk_ = dkhat_;
      dv_ = dvhat_;
    }
    RopeBackward(dq_.data(), pos_.data(), N, c.n_head, c.head_dim, c.n_rot, c.rope_base, c.rope_neox);
    RopeBackward(dk_.data(), pos_.data(), N, c.n_head_kv, c.head_dim, c.n_rot, c.rope_base, c.rope_neox);
    RowsMatMulW(pool, dq_.data(), w.wq, dxn_.data(), N, Q, E, true);
    RowsMatMulW(pool, dk_.data(), w.wk, dxn_.data(), N, KV, E, true);
    RowsMatMulW(pool, dv_.data(), w.wv, dxn_.data(), N, KV, E, true);
    RmsNormBackward(resid_[l].data(), w.attn_norm, dxn_.data(), tmp_.data(), N, E, c.rms_eps);
    for (size_t i = 0; i < NE; ++i) dx_[i] = dxmid_[i] + tmp_[i];
  }
}

template class TrainGraph<float>;
template class TrainGraph<double>;
template class OwnedGraphWeights<float>;
template class OwnedGraphWeights<double>;

}  // namespace dk
