// A whole forward step of a decoder-only transformer in one native call, for the CPU fast path.
//
// Between the block-quantized matmuls a step is ~30 small tensor ops per layer (norms, rotary,
// cache write, attention, activation, residuals); through PyTorch each costs more in dispatch
// than in arithmetic at batch sizes of 1-16. Here they are plain loops over the step's rows, the
// matmuls call the block kernel directly (or, for many rows, dequantize slabs of the weight and
// multiply with PyTorch's GEMM, as lmserve/quant/packed.py does), and attention reads K/V straight
// from the paged cache through each sequence's slot list.
//
// One layer loop serves every family: its pieces are chosen per layer from what the Python side
// (lmserve/models/fused_decoder.py, from the family's description of its modules) hands over —
// RMSNorm or LayerNorm, norms before and after attention and feed-forward, q/k norms, a rotary
// table per layer (or none), gated SiLU / gated GELU-tanh / plain GELU-tanh MLPs or sparse
// mixture-of-experts blocks (moe_ffn.h), biases,
// sliding windows, token-embedding scale, learned position embeddings, and a KV cache in fp32,
// bf16, fp16 or int8 with per-token scales. A step's rows are tokens: several rows may belong to
// one sequence (a prompt chunk, speculative proposals) at consecutive positions; each layer stores
// every row's K/V before any row attends, and a row attends its sequence's positions up to its
// own, so causality within the new tokens holds. Every row is computed independently of the
// others (no batch-dependent reduction order on the kernel path). LoRA adapters (`LoraFactors`)
// add their low-rank updates to the projections of the rows that run them: a step passes spans of
// rows, one per adapter, and each projection adds (x A^T) B^T to its span after the base product.
// Under tensor parallelism each rank's decoder holds its shard (its heads, its slice of the MLP,
// its rows of the token table) and calls back into Python for the all-reduces the modules run:
// after the embedding lookup and after each row-parallel projection (o, down), whose bias is
// added once, after the sum.
#include "block_kernels.h"
#include "moe_ffn.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <optional>
#include <tuple>
#include <string>
#include <vector>

namespace lmserve {
namespace {

namespace py = pybind11;

// The entry `key` of a description dict as a contiguous tensor, or an undefined tensor when it is
// absent or None.
torch::Tensor optional_tensor(const py::dict& d, const char* key) {
  if (!d.contains(key) || d[key].is_none()) return torch::Tensor();
  return d[key].cast<torch::Tensor>().contiguous();
}

const float* data_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

void check_vector(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(!t.defined() || (t.scalar_type() == torch::kFloat32 && t.numel() == n), what,
              " must be fp32 with ", n, " values");
}

// RMSNorm (`bias` undefined) or LayerNorm (mean and variance, then weight and bias), over rows of
// `dim` values; absent when `weight` is undefined.
struct Norm {
  torch::Tensor weight, bias;
  bool layer_norm = false;

  static Norm from(const py::dict& d, const char* key, int64_t dim) {
    Norm n;
    if (!d.contains(key) || d[key].is_none()) return n;
    const auto t = d[key].cast<py::tuple>();  // (kind, weight, bias or None)
    const auto kind = t[0].cast<std::string>();
    TORCH_CHECK(kind == "rms" || kind == "layer", "unknown norm ", kind);
    n.layer_norm = kind == "layer";
    n.weight = t[1].cast<torch::Tensor>().contiguous();
    if (!t[2].is_none()) n.bias = t[2].cast<torch::Tensor>().contiguous();
    check_vector(n.weight, dim, key);
    check_vector(n.bias, dim, key);
    TORCH_CHECK(n.layer_norm == n.bias.defined(), key, ": a LayerNorm has a bias, an RMSNorm none");
    return n;
  }

  bool present() const { return weight.defined(); }

  void apply(const IsaKernels& k, const float* x, int64_t dim, float eps, float* y) const {
    if (!layer_norm) {
      k.rms_norm(x, weight.data_ptr<float>(), dim, eps, y);
      return;
    }
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < dim; ++i) mean += x[i];
    mean /= dim;
    for (int64_t i = 0; i < dim; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float inv = static_cast<float>(1.0 / std::sqrt(var / dim + eps)), m = static_cast<float>(mean);
    const float* w = weight.data_ptr<float>();
    const float* b = bias.data_ptr<float>();
    for (int64_t i = 0; i < dim; ++i) y[i] = (x[i] - m) * inv * w[i] + b[i];
  }
};

// How a step multiplies many rows: rows up to `kernel_max_rows` run the block kernel; more
// dequantize the weight a slab at a time and multiply with GEMM (fp32, or bf16 operands when
// the engine's prefill precision says so).
struct GemmPolicy {
  int64_t kernel_max_rows = 32;
  bool bf16 = false;
};

struct PackedLinear {
  torch::Tensor q, scale, offset, bias;  // bias: added after the matmul (after the all-reduce), or undefined
  BlockMatrix m{};
  bool row_parallel = false;  // its outputs are partial sums, to be all-reduced across ranks

  // A description tuple (q, scale, offset, bias or None, group, bits, rows, row_parallel).
  static PackedLinear from(const py::dict& d, const char* key) {
    PackedLinear l;
    const auto t = d[key].cast<py::tuple>();
    TORCH_CHECK(t.size() == 8, key, " must be (q, scale, offset, bias, group, bits, rows, row_parallel)");
    l.row_parallel = t[7].cast<bool>();
    l.q = t[0].cast<torch::Tensor>();
    l.scale = t[1].cast<torch::Tensor>();
    l.offset = t[2].cast<torch::Tensor>();
    if (!t[3].is_none()) l.bias = t[3].cast<torch::Tensor>().contiguous();
    l.m = block_matrix(l.q, l.scale, l.offset, t[4].cast<int64_t>(), t[5].cast<int64_t>(), t[6].cast<int64_t>());
    check_vector(l.bias, l.m.N, key);
    return l;
  }

  // out = x W^T, without the bias.
  void multiply(const IsaKernels& k, const GemmPolicy& gemm, const float* x, int64_t rows, float* out) const {
    if (rows <= gemm.kernel_max_rows) {
      k.matmul(x, rows, m, out);
    } else {
      slab_gemm(m, x, rows, gemm.bf16, out);
    }
  }

  void add_bias(int64_t rows, float* out) const {
    if (!bias.defined()) return;
    const float* b = bias.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < m.N; ++n) out[r * m.N + n] += b[n];
  }
};

enum class Activation { kSiluGated, kGeluTanhGated, kGeluTanh };

Activation activation_named(const std::string& name) {
  if (name == "silu_gated") return Activation::kSiluGated;
  if (name == "gelu_tanh_gated") return Activation::kGeluTanhGated;
  TORCH_CHECK(name == "gelu_tanh", "unsupported activation ", name);
  return Activation::kGeluTanh;
}

// A layer's paged KV cache [2, slots, kv_heads, head_dim] in one of the KvTypes, with int8's
// scales [2, slots, kv_heads].
struct KvCache {
  torch::Tensor values, scales;
  KvType type = KvType::kF32;
  int64_t slots = 0, kv_heads = 0, dim = 0;

  static KvCache from(const py::dict& d, int64_t kv_heads, int64_t dim) {
    KvCache c;
    c.values = d["kv_cache"].cast<torch::Tensor>();
    c.scales = optional_tensor(d, "kv_scales");
    TORCH_CHECK(c.values.is_contiguous() && c.values.dim() == 4 && c.values.size(0) == 2 &&
                c.values.size(2) == kv_heads && c.values.size(3) == dim, "KV cache must be [2, slots, Hkv, D]");
    switch (c.values.scalar_type()) {
      case torch::kFloat32: c.type = KvType::kF32; break;
      case torch::kBFloat16: c.type = KvType::kBF16; break;
      case torch::kHalf: c.type = KvType::kF16; break;
      case torch::kChar: c.type = KvType::kI8; break;
      default: TORCH_CHECK(false, "KV cache dtype ", c.values.scalar_type(), " has no native attention");
    }
    TORCH_CHECK((c.type == KvType::kI8) == c.scales.defined(), "an int8 KV cache (only) has scales");
    TORCH_CHECK(!c.scales.defined() || (c.scales.scalar_type() == torch::kFloat32 && c.scales.dim() == 3 &&
                                        c.scales.size(1) == c.values.size(1) && c.scales.size(2) == kv_heads));
    c.slots = c.values.size(1), c.kv_heads = kv_heads, c.dim = dim;
    return c;
  }

  // Head `kv` of plane 0 (K) or 1 (V).
  KvHead head(int plane, int64_t kv) const {
    const int64_t row = kv_heads * dim;
    const char* base = static_cast<const char*>(values.data_ptr()) +
                       (plane * slots * row + kv * dim) * values.element_size();
    const float* s = scales.defined() ? scales.data_ptr<float>() + plane * slots * kv_heads + kv : nullptr;
    return KvHead{base, s, row, kv_heads, type};
  }

  // Writes one token's K or V heads [kv_heads, dim] into `slot` of `plane`, rounded or quantized
  // the way lmserve/layers/attention.py writes them.
  void store(int plane, int64_t slot, const float* x) const {
    const int64_t row = kv_heads * dim, offset = (plane * slots + slot) * row;
    switch (type) {
      case KvType::kF32:
        std::copy_n(x, row, values.data_ptr<float>() + offset);
        break;
      case KvType::kBF16: {
        auto* out = values.data_ptr<c10::BFloat16>() + offset;
        for (int64_t i = 0; i < row; ++i) out[i] = c10::BFloat16(x[i]);
        break;
      }
      case KvType::kF16: {
        auto* out = values.data_ptr<c10::Half>() + offset;
        for (int64_t i = 0; i < row; ++i) out[i] = c10::Half(x[i]);
        break;
      }
      case KvType::kI8: {
        auto* out = values.data_ptr<int8_t>() + offset;
        float* scale = scales.data_ptr<float>() + (plane * slots + slot) * kv_heads;
        for (int64_t h = 0; h < kv_heads; ++h) {
          const float* v = x + h * dim;
          float amax = 0.0f;
          for (int64_t i = 0; i < dim; ++i) amax = std::max(amax, std::fabs(v[i]));
          const float s = std::max(amax, 1e-8f) / 127.0f;
          for (int64_t i = 0; i < dim; ++i)
            out[h * dim + i] = static_cast<int8_t>(std::nearbyint(std::clamp(v[i] / s, -127.0f, 127.0f)));
          scale[h] = s;
        }
        break;
      }
    }
  }
};

// One LoRA adapter's factors for the decoder's projections: per layer and projection (qkv, o, up,
// down) a list of blocks, each A [r, K] and B^T [r, n] (B already scaled), fp32 or bf16 as the
// adapter holds them, updating the n outputs from `offset` — a fused projection's shards (q, k,
// v; gate, up) as separate blocks, so the zeros between them are neither stored nor multiplied.
class LoraFactors {
 public:
  enum Projection { kQkv = 0, kO = 1, kUp = 2, kDown = 3 };

  struct Block {
    torch::Tensor a, bt;
    int64_t offset;

    bool bf16() const { return a.scalar_type() == torch::kBFloat16; }
  };

  // `layers`: per layer a sequence of 4 lists of (A [r, K], B [n, r], offset).
  explicit LoraFactors(const py::list& layers) {
    for (const auto& layer : layers) {
      const auto entries = layer.cast<py::list>();
      TORCH_CHECK(entries.size() == 4, "a layer's LoRA factors are (qkv, o, up, down)");
      std::array<std::vector<Block>, 4> blocks;
      for (int i = 0; i < 4; ++i) {
        for (const auto& entry : entries[i].cast<py::list>()) {
          const auto t = entry.cast<py::tuple>();
          const auto a = t[0].cast<torch::Tensor>().contiguous();
          const auto b = t[1].cast<torch::Tensor>();
          TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && b.size(1) == a.size(0), "LoRA factors must be A [r, K], B [n, r]");
          TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                          (a.scalar_type() == torch::kFloat32 || a.scalar_type() == torch::kBFloat16),
                      "LoRA factors must both be fp32 or both bf16");
          blocks[i].push_back(Block{a, b.t().contiguous(), t[2].cast<int64_t>()});
        }
      }
      layers_.push_back(std::move(blocks));
    }
  }

  const std::vector<Block>& get(size_t layer, Projection p) const { return layers_.at(layer)[p]; }

  size_t num_layers() const { return layers_.size(); }

 private:
  std::vector<std::array<std::vector<Block>, 4>> layers_;
};

// A step's LoRA rows: rows [start, end) run `adapter`.
using LoraSpan = std::tuple<std::shared_ptr<LoraFactors>, int64_t, int64_t>;

struct Layer {
  Norm input_norm, post_attention_norm, pre_ffn_norm, post_ffn_norm;  // post_* absent unless the family has them
  torch::Tensor q_norm, k_norm;  // per-head RMSNorm weights, undefined unless the model has them
  PackedLinear qkv, o, up, down;  // up: gate|up for the gated activations; both unset for a MoE block
  Activation activation;
  std::shared_ptr<MoeFeedForward> moe;  // the layer's sparse MoE block, instead of up / down
  torch::Tensor cos, sin;  // rotary tables [positions, rotary_dim], undefined for none
  float attn_scale;
  int64_t window;  // sliding window in tokens, 0 for none
  KvCache kv;
};

// x * cos + roll(x, half) * signed_sin over the first rotary_dim values (the tables of
// lmserve/layers/rotary.py, whose sin carries the rotate-half sign).
void rotate(float* x, const float* cos, const float* sin, int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

class FusedDecoder {
 public:
  // `model`: heads, kv_heads, head_dim, eps; the token table (this rank's rows of it, from token id
  // `vocab_start`) as `embed` (dense fp32 [V, hidden]) or `embed_packed` (q, scale, offset, group,
  // bits, rows); `all_reduce` (a Python function summing a tensor across the ranks in place, or
  // None without tensor parallelism); `embed_scale`; optionally
  // `position_table` (learned positions, dense fp32 [P, hidden]); `final_norm`; and the GEMM
  // policy `kernel_max_rows`, `gemm_bf16`.
  explicit FusedDecoder(const py::dict& model)
      : heads_(model["heads"].cast<int64_t>()), kv_heads_(model["kv_heads"].cast<int64_t>()),
        dim_(model["head_dim"].cast<int64_t>()), eps_(model["eps"].cast<double>()),
        embed_scale_(model["embed_scale"].cast<float>()), vocab_start_(model["vocab_start"].cast<int64_t>()) {
    if (!model["all_reduce"].is_none()) all_reduce_ = model["all_reduce"].cast<py::function>();
    TORCH_CHECK(heads_ % kv_heads_ == 0, "query heads must be a multiple of KV heads");
    gemm_.kernel_max_rows = model["kernel_max_rows"].cast<int64_t>();
    gemm_.bf16 = model["gemm_bf16"].cast<bool>();
    if (model.contains("embed_packed")) {
      const auto t = model["embed_packed"].cast<py::tuple>();
      for (int i = 0; i < 3; ++i) embed_.push_back(t[i].cast<torch::Tensor>());
      packed_embed_ = block_matrix(embed_[0], embed_[1], embed_[2], t[3].cast<int64_t>(), t[4].cast<int64_t>(),
                                   t[5].cast<int64_t>());
      vocab_ = packed_embed_.N, hidden_ = packed_embed_.K;
    } else {
      embed_.push_back(model["embed"].cast<torch::Tensor>().contiguous());
      TORCH_CHECK(embed_[0].dim() == 2 && embed_[0].scalar_type() == torch::kFloat32,
                  "a dense token table must be fp32 [V, hidden]");
      vocab_ = embed_[0].size(0), hidden_ = embed_[0].size(1);
    }
    positions_ = optional_tensor(model, "position_table");
    TORCH_CHECK(!positions_.defined() || (positions_.scalar_type() == torch::kFloat32 && positions_.dim() == 2 &&
                                          positions_.size(1) == hidden_), "position table must be fp32 [P, hidden]");
    final_norm_ = Norm::from(model, "final_norm", hidden_);
    TORCH_CHECK(final_norm_.present(), "the model needs a final norm");
  }

  // `layer`: the norms (each (kind, weight, bias)), `q_norm` / `k_norm`, the linears `qkv`, `o`,
  // and either `up`, `down` (each (q, scale, offset, bias, group, bits, rows)) and `activation`
  // or `moe` (a MoeFeedForward); rotary `cos` / `sin` (None for no rotary), `attn_scale`,
  // `window`, `kv_cache` and `kv_scales`.
  void add_layer(const py::dict& layer) {
    const bool sparse = layer.contains("moe") && !layer["moe"].is_none();
    Layer l{Norm::from(layer, "input_norm", hidden_),
            Norm::from(layer, "post_attention_norm", hidden_),
            Norm::from(layer, "pre_ffn_norm", hidden_),
            Norm::from(layer, "post_ffn_norm", hidden_),
            optional_tensor(layer, "q_norm"),
            optional_tensor(layer, "k_norm"),
            PackedLinear::from(layer, "qkv"),
            PackedLinear::from(layer, "o"),
            sparse ? PackedLinear{} : PackedLinear::from(layer, "up"),
            sparse ? PackedLinear{} : PackedLinear::from(layer, "down"),
            sparse ? Activation::kSiluGated : activation_named(layer["activation"].cast<std::string>()),
            sparse ? layer["moe"].cast<std::shared_ptr<MoeFeedForward>>() : nullptr,
            optional_tensor(layer, "cos"),
            optional_tensor(layer, "sin"),
            layer["attn_scale"].cast<float>(),
            layer["window"].cast<int64_t>(),
            KvCache::from(layer, kv_heads_, dim_)};
    TORCH_CHECK(l.input_norm.present() && l.pre_ffn_norm.present(), "a layer needs its input and pre-FFN norms");
    check_vector(l.q_norm, dim_, "q_norm");
    check_vector(l.k_norm, dim_, "k_norm");
    TORCH_CHECK(l.q_norm.defined() == l.k_norm.defined(), "q and k norms come together");
    TORCH_CHECK(l.cos.defined() == l.sin.defined() && (!l.cos.defined() || (l.cos.dim() == 2 &&
                l.cos.sizes() == l.sin.sizes() && l.cos.size(1) <= dim_ && l.cos.size(1) % 2 == 0 &&
                l.cos.scalar_type() == torch::kFloat32)), "rotary tables must be fp32 [positions, even dim <= head_dim]");
    const bool gated = l.activation != Activation::kGeluTanh;
    TORCH_CHECK(l.qkv.m.N == (heads_ + 2 * kv_heads_) * dim_ && l.qkv.m.K == hidden_ && l.o.m.K == heads_ * dim_ &&
                l.o.m.N == hidden_, "attention shapes do not match the model");
    TORCH_CHECK(sparse ? l.moe->hidden_size() == hidden_
                       : l.up.m.K == hidden_ && l.down.m.N == hidden_ && l.up.m.N == (gated ? 2 : 1) * l.down.m.K,
                "feed-forward shapes do not match the model");
    widest_window_ = layers_.empty() || (widest_window_ > 0 && l.window > 0) ? std::max(widest_window_, l.window) : 0;
    layers_.push_back(std::move(l));
  }

  // Final-normed hidden states [B, hidden] of B new tokens: token_ids [B] at positions [B], row b
  // belonging to sequence seq_of_row[b], whose cache blocks are block_tables[seq_of_row[b]]
  // (block_size tokens each). A row attends its sequence's positions 0..its own.
  torch::Tensor forward(torch::Tensor token_ids, torch::Tensor positions, torch::Tensor seq_of_row,
                        torch::Tensor block_tables, int64_t block_size, std::vector<LoraSpan> lora) {
    TORCH_CHECK(token_ids.scalar_type() == torch::kInt64 && positions.scalar_type() == torch::kInt64 &&
                seq_of_row.scalar_type() == torch::kInt64 && block_tables.scalar_type() == torch::kInt64);
    token_ids = token_ids.contiguous();
    positions = positions.contiguous();
    seq_of_row = seq_of_row.contiguous();
    block_tables = block_tables.contiguous();
    const int64_t B = token_ids.numel(), D = hidden_;
    TORCH_CHECK(positions.numel() == B && seq_of_row.numel() == B && block_tables.dim() == 2 && block_size > 0,
                "bad step metadata");
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* seq = seq_of_row.data_ptr<int64_t>();
    map_slots(pos, seq, B, block_tables, block_size);
    for (const auto& [adapter, start, end] : lora)
      TORCH_CHECK(adapter && adapter->num_layers() == layers_.size() && 0 <= start && start <= end && end <= B,
                  "bad LoRA span");
    lora_ = std::move(lora);
    torch::Tensor hidden = torch::empty({B, D}, torch::kFloat32);
    float* h = hidden.data_ptr<float>();
    embed(token_ids.data_ptr<int64_t>(), pos, B, h);
    const int64_t qkv_width = (heads_ + 2 * kv_heads_) * dim_;
    const IsaKernels& k = kernels();
    normed_.resize(B * D);
    qkv_.resize(B * qkv_width);
    attn_.resize(B * heads_ * dim_);
    delta_.resize(B * D);
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& l = layers_[li];
      for (int64_t b = 0; b < B; ++b) l.input_norm.apply(k, h + b * D, D, eps_, &normed_[b * D]);
      project(k, li, LoraFactors::kQkv, l.qkv, normed_.data(), B, qkv_.data());
      for (int64_t b = 0; b < B; ++b) {
        float* row = &qkv_[b * qkv_width];
        position(k, l, row, pos[b]);
        const int64_t slot = slots_[seq[b] * span_ + pos[b]];
        l.kv.store(0, slot, row + heads_ * dim_);
        l.kv.store(1, slot, row + (heads_ + kv_heads_) * dim_);
      }
      attention(k, l, B, pos, seq);
      project(k, li, LoraFactors::kO, l.o, attn_.data(), B, delta_.data());
      add_residual(k, l.post_attention_norm, B, h);
      for (int64_t b = 0; b < B; ++b) l.pre_ffn_norm.apply(k, h + b * D, D, eps_, &normed_[b * D]);
      feed_forward(k, li, B);
      add_residual(k, l.post_ffn_norm, B, h);
    }
    for (int64_t b = 0; b < B; ++b) final_norm_.apply(k, h + b * D, D, eps_, h + b * D);
    lora_.clear();
    return hidden;
  }

 private:
  // slots_[s * span_ + p]: the cache slot of position p of sequence s, for every position a row of
  // the step may attend. Blocks released by a sliding window hold -1; they lie before every
  // layer's window and are never read.
  void map_slots(const int64_t* pos, const int64_t* seq, int64_t B, const torch::Tensor& block_tables,
                 int64_t block_size) {
    const int64_t S = block_tables.size(0), max_blocks = block_tables.size(1);
    const int64_t table_rows = layers_.empty() || !layers_[0].cos.defined() ? INT64_MAX : layers_[0].cos.size(0);
    const int64_t table_limit = positions_.defined() ? positions_.size(0) : table_rows;
    std::vector<int64_t> last(S, -1), first(S, INT64_MAX);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(seq[b] >= 0 && seq[b] < S && pos[b] >= 0 && pos[b] < max_blocks * block_size &&
                  pos[b] < table_limit, "bad step metadata for row ", b);
      last[seq[b]] = std::max(last[seq[b]], pos[b]);
      first[seq[b]] = std::min(first[seq[b]], pos[b]);
    }
    span_ = *std::max_element(last.begin(), last.end()) + 1;
    slots_.assign(S * span_, 0);
    const int64_t* tables = block_tables.data_ptr<int64_t>();
    const int64_t num_slots = layers_.empty() ? 0 : layers_[0].kv.slots;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t earliest = widest_window_ > 0 ? std::max<int64_t>(0, first[s] + 1 - widest_window_) : 0;
      for (int64_t p = 0; p <= last[s]; ++p) {
        const int64_t slot = tables[s * max_blocks + p / block_size] * block_size + p % block_size;
        TORCH_CHECK(p < earliest || (slot >= 0 && slot < num_slots), "cache slot ", slot, " of position ", p,
                    " is out of range");
        slots_[s * span_ + p] = slot;
      }
    }
  }

  // The token table's rows for `ids`, scaled, plus learned positions. Under tensor parallelism a
  // rank writes zeros for the ids another rank holds and the ranks' rows are summed.
  void embed(const int64_t* ids, const int64_t* pos, int64_t B, float* out) {
    if (!all_reduce_) {
      gather(ids, B, out);
    } else {
      std::vector<int64_t> local(B);
      for (int64_t b = 0; b < B; ++b) local[b] = ids[b] - vocab_start_;
      std::fill_n(out, B * hidden_, 0.0f);
      for (int64_t b = 0; b < B; ++b)
        if (local[b] >= 0 && local[b] < vocab_) gather(&local[b], 1, out + b * hidden_);
      reduce(out, B * hidden_);
    }
    if (embed_scale_ != 1.0f)
      for (int64_t i = 0; i < B * hidden_; ++i) out[i] *= embed_scale_;
    if (positions_.defined()) {
      const float* table = positions_.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < hidden_; ++i) out[b * hidden_ + i] += table[pos[b] * hidden_ + i];
    }
  }

  // Rows `ids` of the token table into out (each checked in range).
  void gather(const int64_t* ids, int64_t B, float* out) const {
    if (embed_.size() == 3) {
      avx2::gather_rows(packed_embed_, ids, B, out);
      return;
    }
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ids[b] >= 0 && ids[b] < vocab_, "token id ", ids[b], " out of range");
      std::copy_n(embed_[0].data_ptr<float>() + ids[b] * hidden_, hidden_, out + b * hidden_);
    }
  }

  // values [n] summed across the ranks, in place (through the Python group's all_reduce).
  void reduce(float* values, int64_t n) {
    py::gil_scoped_acquire gil;
    torch::Tensor t = torch::from_blob(values, {n}, torch::kFloat32);
    torch::Tensor summed = all_reduce_(t).cast<torch::Tensor>();
    if (summed.data_ptr() != t.data_ptr()) t.copy_(summed);
  }

  // q/k norms and rotary on one token's q and k heads.
  void position(const IsaKernels& k, const Layer& l, float* qkv, int64_t position) const {
    const bool rotary = l.cos.defined();
    const int64_t rotary_dim = rotary ? l.cos.size(1) : 0;
    const float* cos = rotary ? l.cos.data_ptr<float>() + position * rotary_dim : nullptr;
    const float* sin = rotary ? l.sin.data_ptr<float>() + position * rotary_dim : nullptr;
    for (int64_t head = 0; head < heads_ + kv_heads_; ++head) {
      float* x = qkv + head * dim_;
      if (l.q_norm.defined()) k.rms_norm(x, (head < heads_ ? l.q_norm : l.k_norm).data_ptr<float>(), dim_, eps_, x);
      if (rotary) rotate(x, cos, sin, rotary_dim);
    }
  }

  // Softmax attention of every query head over its sequence's cached context (sliding window
  // respected), one (row, head) pair per task.
  void attention(const IsaKernels& k, const Layer& l, int64_t B, const int64_t* pos, const int64_t* seq) {
    const int64_t group = heads_ / kv_heads_, qkv_width = (heads_ + 2 * kv_heads_) * dim_;
    const int64_t grain = std::max<int64_t>(1, 512 / std::max<int64_t>(1, span_));  // ~512 keys per chunk at least
    parallel_chunks(B * heads_, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(span_);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / heads_, head = task % heads_, kv = head / group;
        const int64_t n = pos[b] + 1, first = l.window > 0 ? std::max<int64_t>(0, n - l.window) : 0;
        k.attend(&qkv_[b * qkv_width + head * dim_], l.kv.head(0, kv), l.kv.head(1, kv), &slots_[seq[b] * span_],
                 first, n, dim_, l.attn_scale, scores.data(), &attn_[(b * heads_ + head) * dim_]);
      }
    });
  }

  // out = x W^T (summed across the ranks for a row-parallel projection) + bias, plus each LoRA
  // span's (x A^T) B^T on its rows.
  void project(const IsaKernels& k, size_t layer, LoraFactors::Projection which, const PackedLinear& linear,
               const float* x, int64_t rows, float* out) {
    linear.multiply(k, gemm_, x, rows, out);
    const int64_t K = linear.m.K, N = linear.m.N;
    if (linear.row_parallel && all_reduce_) reduce(out, rows * N);
    linear.add_bias(rows, out);
    if (!lora_.empty()) add_lora(k, layer, which, x, K, N, out);
  }

  // Each LoRA span's (x A^T) B^T added to its rows of out [rows, N], block by block (a job: one
  // span's rows through one block of factors).
  void add_lora(const IsaKernels& k, size_t layer, LoraFactors::Projection which, const float* x, int64_t K,
                int64_t N, float* out) {
    struct Job {
      const LoraFactors::Block* block;
      int64_t start, rows, rank, offset, first_unit;  // offset: its x A^T in lora_t_
    };
    std::vector<Job> jobs;
    int64_t total = 0, units = 0;
    for (const auto& [adapter, start, end] : lora_) {
      if (start == end) continue;
      for (const LoraFactors::Block& block : adapter->get(layer, which)) {
        TORCH_CHECK(block.a.size(1) == K && block.offset >= 0 && block.offset + block.bt.size(1) <= N,
                    "LoRA factors do not match the layer");
        const int64_t rank = block.a.size(0);
        jobs.push_back(Job{&block, start, end - start, rank, total, units});
        total += (end - start) * rank;
        units += rank;
      }
    }
    if (jobs.empty()) return;
    lora_t_.resize(total);
    float* t = lora_t_.data();
    // Row `rank_row` of a job's A dotted with each of its span's rows (while that row sits in L1).
    const auto shrink = [&](const Job& job, int64_t rank_row) {
      const LoraFactors::Block& b = *job.block;
      for (int64_t r = 0; r < job.rows; ++r) {
        const float* xr = x + (job.start + r) * K;
        t[job.offset + r * job.rank + rank_row] =
            b.bf16() ? k.dot_bf16(xr, static_cast<const uint16_t*>(b.a.data_ptr()) + rank_row * K, K)
                   : k.dot(xr, b.a.data_ptr<float>() + rank_row * K, K);
      }
    };
    // Outputs [lo, hi) of a job's rows (within its block's columns) plus their combination of B^T's rows.
    const auto expand = [&](const Job& job, int64_t lo, int64_t hi) {
      const LoraFactors::Block& b = *job.block;
      const int64_t n = b.bt.size(1), first = b.offset;
      for (int64_t r = 0; r < job.rows; ++r) {
        const float* coef = t + job.offset + r * job.rank;
        float* y = out + (job.start + r) * N + lo;
        if (b.bf16())
          k.add_combination_bf16(coef, job.rank, static_cast<const uint16_t*>(b.bt.data_ptr()) + (lo - first), n, y,
                                 hi - lo);
        else
          k.add_combination(coef, job.rank, b.bt.data_ptr<float>() + (lo - first), n, y, hi - lo);
      }
    };
    if (static_cast<int64_t>(jobs.size()) >= 2 * at::get_num_threads()) {
      // Enough (span, block) jobs to share out whole: each writes its own rows' block of columns,
      // so one parallel pass with no barrier between a job's x A^T and its B^T.
      parallel_chunks(static_cast<int64_t>(jobs.size()), 1, [&](int64_t begin, int64_t stop) {
        for (int64_t j = begin; j < stop; ++j) {
          for (int64_t rank_row = 0; rank_row < jobs[j].rank; ++rank_row) shrink(jobs[j], rank_row);
          expand(jobs[j], jobs[j].block->offset, jobs[j].block->offset + jobs[j].block->bt.size(1));
        }
      });
      return;
    }
    // Few jobs (one adapter's prompt, say): every x A^T first, split by rows of A, then the outputs
    // split by column chunk.
    parallel_chunks(units, 4, [&](int64_t begin, int64_t stop) {
      size_t j = 0;
      for (int64_t u = begin; u < stop; ++u) {
        while (u >= jobs[j].first_unit + jobs[j].rank) ++j;
        shrink(jobs[j], u - jobs[j].first_unit);
      }
    });
    parallel_chunks(N, 512, [&](int64_t begin, int64_t stop) {
      for (const Job& job : jobs) {
        const int64_t lo = std::max(begin, job.block->offset), hi = std::min(stop, job.block->offset + job.block->bt.size(1));
        if (lo < hi) expand(job, lo, hi);
      }
    });
  }

  void feed_forward(const IsaKernels& k, size_t layer, int64_t B) {
    const Layer& l = layers_[layer];
    if (l.moe) {
      l.moe->apply(k, normed_.data(), B, delta_.data());
      return;
    }
    const int64_t inter = l.down.m.K, width = l.up.m.N;
    mlp_.resize(B * width);
    act_.resize(B * inter);
    project(k, layer, LoraFactors::kUp, l.up, normed_.data(), B, mlp_.data());
    parallel_chunks(B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const float* in = &mlp_[b * width];
        float* out = &act_[b * inter];
        switch (l.activation) {
          case Activation::kSiluGated: k.silu_mul(in, in + inter, inter, out); break;
          case Activation::kGeluTanhGated: k.gelu_tanh_mul(in, in + inter, inter, out); break;
          case Activation::kGeluTanh: k.gelu_tanh_mul(in, nullptr, inter, out); break;
        }
      }
    });
    project(k, layer, LoraFactors::kDown, l.down, act_.data(), B, delta_.data());
  }

  // h += delta, normed first by `norm` when the layer has one there.
  void add_residual(const IsaKernels& k, const Norm& norm, int64_t B, float* h) {
    const int64_t D = hidden_;
    if (norm.present())
      for (int64_t b = 0; b < B; ++b) norm.apply(k, &delta_[b * D], D, eps_, &delta_[b * D]);
    for (int64_t i = 0; i < B * D; ++i) h[i] += delta_[i];
  }

  int64_t heads_, kv_heads_, dim_;
  double eps_;
  float embed_scale_;
  int64_t vocab_start_;  // the first token id of this rank's rows of the table
  py::function all_reduce_;  // null without tensor parallelism
  GemmPolicy gemm_;
  std::vector<torch::Tensor> embed_;  // kept alive for packed_embed_ / the dense table
  BlockMatrix packed_embed_{};
  int64_t vocab_ = 0, hidden_ = 0;
  torch::Tensor positions_;
  Norm final_norm_;
  std::vector<Layer> layers_;
  int64_t widest_window_ = 0;  // the largest sliding window, 0 when some layer sees the whole context
  std::vector<float> normed_, qkv_, attn_, mlp_, act_, delta_;  // per-step scratch, reused
  std::vector<float> lora_t_;  // x A^T of one LoRA span
  std::vector<int64_t> slots_;
  int64_t span_ = 0;  // positions per sequence in slots_
  std::vector<LoraSpan> lora_;  // the current step's LoRA rows
};

}  // namespace

void bind_fused_decoder(pybind11::module& m) {
  pybind11::class_<LoraFactors, std::shared_ptr<LoraFactors>>(m, "LoraFactors").def(pybind11::init<const py::list&>());
  pybind11::class_<FusedDecoder>(m, "FusedDecoder")
      .def(pybind11::init<const py::dict&>())
      .def("add_layer", &FusedDecoder::add_layer)
      .def("forward", &FusedDecoder::forward, pybind11::arg("token_ids"), pybind11::arg("positions"),
           pybind11::arg("seq_of_row"), pybind11::arg("block_tables"), pybind11::arg("block_size"),
           pybind11::arg("lora") = std::vector<LoraSpan>{}, pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace lmserve
