// dynakv make-gguf: a random-weight Llama-architecture GGUF of a real model's shapes (llama3-8b,
// llama2-7b, qwen2-7b) or custom ones, in f32, f16, q8_0 or q4_0, so decode speed in the
// memory-bound regime can be measured (and compared with llama.cpp) without downloading weights.
// The data is streamed to a nameless file in the output's folder and linked into place when complete
// (core's WriteFileAtomicallyWith); the free space is checked first.
#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/fp16.h"
#include "core/hash.h"
#include "core/mapped_file.h"
#include "model/ggml_types.h"
#include "model/gguf.h"
#include "tools/common.h"

namespace dk::cli {
namespace {

struct Shape {
  std::string arch = "llama";
  int n_embd = 0, n_ff = 0, n_head = 0, n_head_kv = 0, n_vocab = 0, n_layer = 0, n_ctx = 2048;
  double rope_base = 10000.0;
};

bool Preset(const std::string& name, Shape* s) {
  if (name == "llama3-8b") {
    *s = Shape{"llama", 4096, 14336, 32, 8, 128256, 32, 8192, 500000.0};
  } else if (name == "llama2-7b") {
    *s = Shape{"llama", 4096, 11008, 32, 32, 32000, 32, 4096, 10000.0};
  } else if (name == "qwen2-7b") {
    *s = Shape{"qwen2", 3584, 18944, 28, 4, 152064, 28, 32768, 1000000.0};
  } else if (name == "custom") {
    *s = Shape{};
  } else {
    return false;
  }
  return true;
}

// ---- GGUF encoding ----

void Put(std::vector<uint8_t>* out, const void* p, size_t n) {
  const size_t old = out->size();
  out->resize(old + n);
  std::memcpy(out->data() + old, p, n);
}
template <typename T>
void PutPod(std::vector<uint8_t>* out, T v) { Put(out, &v, sizeof v); }
void PutStr(std::vector<uint8_t>* out, const std::string& s) {
  PutPod<uint64_t>(out, s.size());
  Put(out, s.data(), s.size());
}
void KvHead(std::vector<uint8_t>* out, const std::string& key, GgufType t) {
  PutStr(out, key);
  PutPod<uint32_t>(out, static_cast<uint32_t>(t));
}
void KvU32(std::vector<uint8_t>* out, const std::string& key, uint32_t v) {
  KvHead(out, key, GgufType::kU32);
  PutPod(out, v);
}
void KvF32(std::vector<uint8_t>* out, const std::string& key, float v) {
  KvHead(out, key, GgufType::kF32);
  PutPod(out, v);
}
void KvStr(std::vector<uint8_t>* out, const std::string& key, const std::string& v) {
  KvHead(out, key, GgufType::kString);
  PutStr(out, v);
}

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> dims;  // ggml order: ne[0] (the row) first
  GgmlType type;
  float scale;  // weights uniform with this standard deviation; 0: all ones (norms) or zeros (biases)
  bool ones = false;
  uint64_t offset = 0, bytes = 0;
};

uint64_t TensorBytes(GgmlType type, uint64_t n) {
  switch (type) {
    case GgmlType::kF32: return n * 4;
    case GgmlType::kF16: return n * 2;
    case GgmlType::kQ8_0: return n / 32 * 34;
    case GgmlType::kQ4_0: return n / 32 * 18;
    default: return 0;
  }
}

// SplitMix64 (core/hash.h): fast, and seeded per tensor so every tensor is reproducible on its own.
struct Rng {
  SplitMix64 g;
  uint64_t Next() { return g.Next(); }
  // Uniform on [-1, 1).
  float Sym() { return static_cast<float>(static_cast<int64_t>(Next() >> 40) - (int64_t{1} << 23)) * (1.0f / (1 << 23)); }
};

void QuantizeQ8_0(const float* x, size_t n, uint8_t* out) {
  for (size_t b = 0; b < n / 32; ++b, x += 32, out += 34) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t h = Fp32ToFp16(d);
    std::memcpy(out, &h, 2);
    for (int j = 0; j < 32; ++j) out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::lround(x[j] * id)));
  }
}

void QuantizeQ4_0(const float* x, size_t n, uint8_t* out) {
  for (size_t b = 0; b < n / 32; ++b, x += 32, out += 18) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j)
      if (std::fabs(x[j]) > amax) {
        amax = std::fabs(x[j]);
        max = x[j];
      }
    const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t h = Fp32ToFp16(d);
    std::memcpy(out, &h, 2);
    for (int j = 0; j < 16; ++j) {
      const int lo = std::min(15, static_cast<int>(x[j] * id + 8.5f));
      const int hi = std::min(15, static_cast<int>(x[j + 16] * id + 8.5f));
      out[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

Status WriteAll(int fd, const void* p, size_t n, const std::string& path) {
  const auto* c = static_cast<const uint8_t*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return IoError(path + ": write failed: " + std::strerror(errno));
    }
    c += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

Status WriteTensor(int fd, const TensorSpec& t, uint64_t seed, size_t index, const std::string& path) {
  uint64_t n = 1;
  for (uint64_t d : t.dims) n *= d;
  Rng rng{SplitMix64{seed * 0x100000001b3ull + index * kSplitMixGamma + 1}};
  const float a = t.scale * std::sqrt(3.0f);  // uniform on [-a, a] has standard deviation `scale`
  constexpr uint64_t kChunk = uint64_t{1} << 20;  // elements per write (a multiple of 32)
  std::vector<float> x(static_cast<size_t>(std::min(n, kChunk)));
  std::vector<uint8_t> bytes(static_cast<size_t>(TensorBytes(t.type, x.size())));
  for (uint64_t done = 0; done < n;) {
    const size_t m = static_cast<size_t>(std::min(kChunk, n - done));
    for (size_t i = 0; i < m; ++i) x[i] = t.ones ? 1.0f : a * rng.Sym();
    const size_t nb = static_cast<size_t>(TensorBytes(t.type, m));
    switch (t.type) {
      case GgmlType::kF32: std::memcpy(bytes.data(), x.data(), nb); break;
      case GgmlType::kF16:
        for (size_t i = 0; i < m; ++i) {
          const uint16_t h = Fp32ToFp16(x[i]);
          std::memcpy(bytes.data() + 2 * i, &h, 2);
        }
        break;
      case GgmlType::kQ8_0: QuantizeQ8_0(x.data(), m, bytes.data()); break;
      case GgmlType::kQ4_0: QuantizeQ4_0(x.data(), m, bytes.data()); break;
      default: return Internal("make-gguf: unexpected tensor type");
    }
    DK_RETURN_IF_ERROR(WriteAll(fd, bytes.data(), nb, path));
    done += m;
  }
  return Status::Ok();
}

std::string HumanBytes(uint64_t b) {
  char buf[64];
  if (b >= (uint64_t{1} << 30)) {
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / 1073741824.0);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f MiB", b / 1048576.0);
  }
  return buf;
}

}  // namespace

int CmdMakeGguf(int argc, char** argv) {
  std::string out_path, shape_name = "custom", type_name = "f16";
  int layers = 0, n_embd = 0, n_ff = 0, n_head = 0, n_head_kv = 0, n_vocab = 0, n_ctx = 0;
  unsigned long long seed = 1;
  bool help = false;
  ArgParser p("make-gguf",
              "write a random-weight Llama-architecture GGUF of a given shape and type (for speed measurements)");
  p.AddString({"-o", "--output"}, &out_path, "FILE", "the GGUF file to write (required)");
  p.AddString({"--shape"}, &shape_name, "NAME",
              "llama3-8b, llama2-7b, qwen2-7b or custom (custom: give --n-embd --n-ff --n-head --n-vocab --layers)");
  p.AddString({"--type"}, &type_name, "TYPE", "weight type: f32, f16, q8_0, q4_0 (default f16; norms stay f32)");
  p.AddInt({"--layers"}, &layers, 1, 4096, "number of layers (default: the shape's)");
  p.AddInt({"--n-embd"}, &n_embd, 1, 1 << 20, "embedding width");
  p.AddInt({"--n-ff"}, &n_ff, 1, 1 << 20, "feed-forward width");
  p.AddInt({"--n-head"}, &n_head, 1, 4096, "query heads");
  p.AddInt({"--n-head-kv"}, &n_head_kv, 1, 4096, "key/value heads (default: --n-head for custom)");
  p.AddInt({"--n-vocab"}, &n_vocab, 259, 1 << 24, "vocabulary size (at least 259: 3 specials and 256 bytes)");
  p.AddInt({"--ctx"}, &n_ctx, 1, 1 << 24, "context_length written to the file (default: the shape's, 2048 custom)");
  p.AddUInt64({"--seed"}, &seed, "random seed (default 1)");
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("make-gguf", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (out_path.empty()) return UsageError("make-gguf", p, InvalidArgument("-o: an output file is required"));
  Shape s;
  if (!Preset(shape_name, &s)) {
    return UsageError("make-gguf", p,
                      InvalidArgument("--shape: unknown shape '" + shape_name +
                                      "' (llama3-8b, llama2-7b, qwen2-7b, custom)"));
  }
  GgmlType type;
  if (type_name == "f32") {
    type = GgmlType::kF32;
  } else if (type_name == "f16") {
    type = GgmlType::kF16;
  } else if (type_name == "q8_0") {
    type = GgmlType::kQ8_0;
  } else if (type_name == "q4_0") {
    type = GgmlType::kQ4_0;
  } else {
    return UsageError("make-gguf", p, InvalidArgument("--type: unknown type '" + type_name + "' (f32, f16, q8_0, q4_0)"));
  }
  if (p.WasSet("--layers")) s.n_layer = layers;
  if (p.WasSet("--n-embd")) s.n_embd = n_embd;
  if (p.WasSet("--n-ff")) s.n_ff = n_ff;
  if (p.WasSet("--n-head")) s.n_head = n_head;
  if (p.WasSet("--n-head-kv")) s.n_head_kv = n_head_kv;
  if (p.WasSet("--n-vocab")) s.n_vocab = n_vocab;
  if (p.WasSet("--ctx")) s.n_ctx = n_ctx;
  if (shape_name == "custom" && s.n_head_kv == 0) s.n_head_kv = s.n_head;
  if (s.n_embd == 0 || s.n_ff == 0 || s.n_head == 0 || s.n_vocab == 0 || s.n_layer == 0) {
    return UsageError("make-gguf", p,
                      InvalidArgument("--shape custom: give --n-embd, --n-ff, --n-head, --n-vocab and --layers"));
  }
  if (s.n_embd % s.n_head != 0) {
    return UsageError("make-gguf", p,
                      InvalidArgument("--n-head: " + std::to_string(s.n_head) + " does not divide --n-embd " +
                                      std::to_string(s.n_embd)));
  }
  const int head_dim = s.n_embd / s.n_head;
  if (head_dim % 2 != 0 || head_dim < 2) {
    return UsageError("make-gguf", p, InvalidArgument("--n-head: the head width n_embd / n_head must be even"));
  }
  if (s.n_head % s.n_head_kv != 0) {
    return UsageError("make-gguf", p,
                      InvalidArgument("--n-head-kv: " + std::to_string(s.n_head_kv) + " does not divide --n-head " +
                                      std::to_string(s.n_head)));
  }
  const bool quant = type == GgmlType::kQ8_0 || type == GgmlType::kQ4_0;
  if (quant && (s.n_embd % 32 != 0 || s.n_ff % 32 != 0)) {
    return UsageError("make-gguf", p,
                      InvalidArgument("--type " + type_name + ": rows are blocks of 32, so --n-embd and --n-ff must be "
                                      "multiples of 32"));
  }
  if (Status st = CheckOutputPath(out_path, "-o"); !st.ok()) return UsageError("make-gguf", p, st);

  // Tensors, in llama.cpp's order.
  const uint64_t E = s.n_embd, F = s.n_ff, V = s.n_vocab, Q = static_cast<uint64_t>(s.n_head) * head_dim;
  const uint64_t KV = static_cast<uint64_t>(s.n_head_kv) * head_dim;
  const bool bias = s.arch == "qwen2";
  constexpr float kStd = 0.02f;
  std::vector<TensorSpec> tensors;
  auto weight = [&](const std::string& name, std::vector<uint64_t> dims) {
    tensors.push_back(TensorSpec{name, std::move(dims), type, kStd});
  };
  auto f32 = [&](const std::string& name, uint64_t n, bool ones) {
    TensorSpec t{name, {n}, GgmlType::kF32, 0.0f};
    t.ones = ones;
    tensors.push_back(std::move(t));
  };
  weight("token_embd.weight", {E, V});
  f32("output_norm.weight", E, true);
  weight("output.weight", {E, V});
  for (int l = 0; l < s.n_layer; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    f32(b + "attn_norm.weight", E, true);
    weight(b + "attn_q.weight", {E, Q});
    weight(b + "attn_k.weight", {E, KV});
    weight(b + "attn_v.weight", {E, KV});
    if (bias) {
      f32(b + "attn_q.bias", Q, false);
      f32(b + "attn_k.bias", KV, false);
      f32(b + "attn_v.bias", KV, false);
    }
    weight(b + "attn_output.weight", {Q, E});
    f32(b + "ffn_norm.weight", E, true);
    weight(b + "ffn_gate.weight", {E, F});
    weight(b + "ffn_up.weight", {E, F});
    weight(b + "ffn_down.weight", {F, E});
  }

  // Metadata: the model's hyperparameters and a minimal SentencePiece vocabulary (unk, bos, eos,
  // the 256 byte tokens, then filler pieces): any text encodes through byte fallback.
  const std::string& a = s.arch;
  std::vector<uint8_t> meta;
  uint64_t n_kv = 0;
  auto count = [&] { ++n_kv; };
  KvStr(&meta, "general.architecture", a), count();
  KvStr(&meta, "general.name", "random " + shape_name + " " + type_name + " (dynakv make-gguf, seed " +
                                   std::to_string(seed) + ")"),
      count();
  const uint32_t file_type = type == GgmlType::kF32 ? 0 : type == GgmlType::kF16 ? 1 : type == GgmlType::kQ4_0 ? 2 : 7;
  KvU32(&meta, "general.file_type", file_type), count();
  KvU32(&meta, a + ".context_length", static_cast<uint32_t>(s.n_ctx)), count();
  KvU32(&meta, a + ".embedding_length", static_cast<uint32_t>(s.n_embd)), count();
  KvU32(&meta, a + ".block_count", static_cast<uint32_t>(s.n_layer)), count();
  KvU32(&meta, a + ".feed_forward_length", static_cast<uint32_t>(s.n_ff)), count();
  KvU32(&meta, a + ".attention.head_count", static_cast<uint32_t>(s.n_head)), count();
  KvU32(&meta, a + ".attention.head_count_kv", static_cast<uint32_t>(s.n_head_kv)), count();
  KvU32(&meta, a + ".rope.dimension_count", static_cast<uint32_t>(head_dim)), count();
  KvF32(&meta, a + ".rope.freq_base", static_cast<float>(s.rope_base)), count();
  KvF32(&meta, a + ".attention.layer_norm_rms_epsilon", 1e-5f), count();
  KvStr(&meta, "tokenizer.ggml.model", "llama"), count();
  {
    KvHead(&meta, "tokenizer.ggml.tokens", GgufType::kArray);
    PutPod<uint32_t>(&meta, static_cast<uint32_t>(GgufType::kString));
    PutPod<uint64_t>(&meta, V);
    PutStr(&meta, "<unk>");
    PutStr(&meta, "<s>");
    PutStr(&meta, "</s>");
    for (int b = 0; b < 256; ++b) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "<0x%02X>", b);
      PutStr(&meta, buf);
    }
    for (uint64_t i = 259; i < V; ++i) PutStr(&meta, "\xe2\x96\x81w" + std::to_string(i));
    count();
    KvHead(&meta, "tokenizer.ggml.scores", GgufType::kArray);
    PutPod<uint32_t>(&meta, static_cast<uint32_t>(GgufType::kF32));
    PutPod<uint64_t>(&meta, V);
    for (uint64_t i = 0; i < V; ++i) PutPod<float>(&meta, i < 259 ? 0.0f : -static_cast<float>(i));
    count();
    KvHead(&meta, "tokenizer.ggml.token_type", GgufType::kArray);
    PutPod<uint32_t>(&meta, static_cast<uint32_t>(GgufType::kI32));
    PutPod<uint64_t>(&meta, V);
    for (uint64_t i = 0; i < V; ++i) PutPod<int32_t>(&meta, i == 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1);
    count();
  }
  KvU32(&meta, "tokenizer.ggml.unknown_token_id", 0), count();
  KvU32(&meta, "tokenizer.ggml.bos_token_id", 1), count();
  KvU32(&meta, "tokenizer.ggml.eos_token_id", 2), count();

  constexpr uint64_t kAlign = 32;
  uint64_t data_bytes = 0;
  std::vector<uint8_t> head;
  PutPod<uint32_t>(&head, 0x46554747u);  // "GGUF"
  PutPod<uint32_t>(&head, 3);
  PutPod<uint64_t>(&head, tensors.size());
  PutPod<uint64_t>(&head, n_kv);
  Put(&head, meta.data(), meta.size());
  for (TensorSpec& t : tensors) {
    uint64_t n = 1;
    for (uint64_t d : t.dims) n *= d;
    t.bytes = TensorBytes(t.type, n);
    t.offset = data_bytes;
    data_bytes += (t.bytes + kAlign - 1) / kAlign * kAlign;
    PutStr(&head, t.name);
    PutPod<uint32_t>(&head, static_cast<uint32_t>(t.dims.size()));
    for (uint64_t d : t.dims) PutPod<uint64_t>(&head, d);
    PutPod<uint32_t>(&head, static_cast<uint32_t>(t.type));
    PutPod<uint64_t>(&head, t.offset);
  }
  head.resize((head.size() + kAlign - 1) / kAlign * kAlign, 0);
  const uint64_t total = head.size() + data_bytes;

  // Free space first: a multi-GB file that fails at 90 % wastes minutes.
  std::filesystem::path dir = std::filesystem::path(out_path).parent_path();
  if (dir.empty()) dir = ".";
  struct statvfs vfs {};
  if (::statvfs(dir.c_str(), &vfs) == 0) {
    const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    constexpr uint64_t kMargin = uint64_t{64} << 20;
    if (free_bytes < total + kMargin) {
      return Fail("make-gguf", IoError(out_path + ": needs " + std::to_string(total) + " bytes (" + HumanBytes(total) +
                                       ") plus a 64 MiB margin, but only " + std::to_string(free_bytes) + " (" +
                                       HumanBytes(free_bytes) + ") are free in " + dir.string()));
    }
  }
  std::fprintf(stderr, "make-gguf: %s %s, %d layers, n_embd %d, n_ff %d, heads %d/%d, vocab %d: %zu tensors, %s\n",
               shape_name.c_str(), type_name.c_str(), s.n_layer, s.n_embd, s.n_ff, s.n_head, s.n_head_kv, s.n_vocab,
               tensors.size(), HumanBytes(total).c_str());

  // Streamed into a nameless file beside the output, linked into place when complete (as every
  // writer of the library does): a make-gguf killed midway leaves no partial file behind.
  const Status st = WriteFileAtomicallyWith(out_path, [&](int fd) -> Status {
    DK_RETURN_IF_ERROR(WriteAll(fd, head.data(), head.size(), out_path));
    const std::vector<uint8_t> zeros(kAlign, 0);
    for (size_t i = 0; i < tensors.size(); ++i) {
      DK_RETURN_IF_ERROR(
          WriteTensor(fd, tensors[i], seed, i, out_path).WithContext("tensor '" + tensors[i].name + "'"));
      const uint64_t pad = (kAlign - tensors[i].bytes % kAlign) % kAlign;
      DK_RETURN_IF_ERROR(WriteAll(fd, zeros.data(), static_cast<size_t>(pad), out_path));
    }
    return Status::Ok();
  });
  if (!st.ok()) return Fail("make-gguf", st);
  std::printf("wrote %s (%llu bytes)\n", out_path.c_str(), static_cast<unsigned long long>(total));
  return kExitOk;
}

}  // namespace dk::cli
