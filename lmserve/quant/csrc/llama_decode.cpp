// A whole decode step of a Llama-family model in one native call, for the CPU fast path.
//
// Between the block-quantized matmuls a decode step is ~30 small tensor ops per layer (norms,
// rotary, cache write, attention, activation, residuals); through PyTorch each costs more in
// dispatch than in arithmetic at batch sizes of 1-16. Here they are plain loops over the step's
// rows, the matmuls call the block kernel directly, and attention reads K/V straight from the
// paged cache through each sequence's slot list. The vector loops (matmul, norms, activation,
// attention) are those of the kernel variant in use (isa_kernels.h), read once per step. Every
// row is computed independently of the others (no batch-dependent reduction order). Layout and semantics match the PyTorch modules in
// lmserve/models/llama.py; the Python side (lmserve/models/llama_fused.py) decides when a model
// and a step qualify.
#include "block_kernels.h"

#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace lmserve {
namespace {

struct PackedLinear {
  torch::Tensor q, scale, offset, bias;  // bias: added after the matmul, or empty
  BlockMatrix m;

  PackedLinear(torch::Tensor q_, torch::Tensor scale_, torch::Tensor offset_, int64_t group, int64_t bits,
               int64_t rows, torch::Tensor bias_)
      : q(q_), scale(scale_), offset(offset_), bias(bias_), m(block_matrix(q_, scale_, offset_, group, bits, rows)) {
    TORCH_CHECK(bias.numel() == 0 || (bias.is_contiguous() && bias.numel() == m.N &&
                                      bias.scalar_type() == torch::kFloat32));
  }

  void apply(const IsaKernels& k, const float* x, int64_t rows, float* out) const {
    k.matmul(x, rows, m, out);
    if (bias.numel() == 0) return;
    const float* b = bias.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < m.N; ++n) out[r * m.N + n] += b[n];
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm, q_norm, k_norm;  // q_norm / k_norm empty unless the model has them
  PackedLinear qkv, o, gate_up, down;
  torch::Tensor kv_cache;  // [2, slots, kv_heads, head_dim] fp32
  int64_t window;          // sliding window in tokens, 0 for none
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


class LlamaDecoder {
 public:
  // The token table is dense fp32 [V, hidden] (`embed` = {table}, `embed_format` empty) or a
  // block-quantized matrix (`embed` = {q, scale, offset}, `embed_format` = {group, bits, rows}).
  LlamaDecoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double attn_scale,
               torch::Tensor cos_table, torch::Tensor sin_table, std::vector<torch::Tensor> embed,
               std::vector<int64_t> embed_format, torch::Tensor final_norm)
      : heads_(num_heads), kv_heads_(num_kv_heads), dim_(head_dim), eps_(eps), scale_(attn_scale),
        cos_(cos_table.contiguous()), sin_(sin_table.contiguous()), rotary_dim_(cos_table.size(-1)),
        embed_(std::move(embed)), final_norm_(final_norm.contiguous()) {
    TORCH_CHECK(num_heads % num_kv_heads == 0 && rotary_dim_ <= head_dim && rotary_dim_ % 2 == 0);
    if (embed_format.empty()) {
      TORCH_CHECK(embed_.size() == 1 && embed_[0].dim() == 2 && embed_[0].scalar_type() == torch::kFloat32 &&
                  embed_[0].is_contiguous(), "a dense token table must be contiguous fp32 [V, hidden]");
      vocab_ = embed_[0].size(0), hidden_ = embed_[0].size(1);
    } else {
      TORCH_CHECK(embed_.size() == 3 && embed_format.size() == 3, "a packed token table is (q, scale, offset)");
      packed_embed_ = block_matrix(embed_[0], embed_[1], embed_[2], embed_format[0], embed_format[1], embed_format[2]);
      vocab_ = packed_embed_.N, hidden_ = packed_embed_.K;
    }
    TORCH_CHECK(final_norm_.numel() == hidden_);
  }

  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, torch::Tensor q_norm, torch::Tensor k_norm,
                 std::vector<torch::Tensor> qkv, std::vector<torch::Tensor> o, std::vector<torch::Tensor> gate_up,
                 std::vector<torch::Tensor> down, std::vector<int64_t> formats, torch::Tensor kv_cache,
                 int64_t window) {
    // Each linear: (q, scale, offset, bias) tensors and (group, bits, rows) in `formats`, in the
    // order qkv, o, gate_up, down.
    auto linear = [&](const std::vector<torch::Tensor>& t, int i) {
      TORCH_CHECK(t.size() == 4, "a linear is (q, scale, offset, bias)");
      return PackedLinear(t[0], t[1], t[2], formats[3 * i], formats[3 * i + 1], formats[3 * i + 2], t[3]);
    };
    TORCH_CHECK(formats.size() == 12);
    TORCH_CHECK(kv_cache.scalar_type() == torch::kFloat32 && kv_cache.is_contiguous() && kv_cache.dim() == 4 &&
                kv_cache.size(2) == kv_heads_ && kv_cache.size(3) == dim_, "KV cache must be fp32 [2, slots, Hkv, D]");
    layers_.push_back(Layer{input_norm.contiguous(), post_norm.contiguous(), q_norm.contiguous(),
                            k_norm.contiguous(), linear(qkv, 0), linear(o, 1), linear(gate_up, 2), linear(down, 3),
                            kv_cache, window});
    widest_window_ = layers_.size() == 1 || (widest_window_ > 0 && window > 0) ? std::max(widest_window_, window) : 0;
    const Layer& l = layers_.back();
    TORCH_CHECK(l.qkv.m.N == (heads_ + 2 * kv_heads_) * dim_ && l.o.m.K == heads_ * dim_ &&
                l.gate_up.m.N == 2 * l.down.m.K, "layer shapes do not match the model");
  }

  // Final-normed hidden states [B, hidden] for one new token per sequence: token_ids [B] at
  // positions [B] (its context is positions 0..position), block_tables [B, max blocks] the cache
  // blocks of each sequence, block_size tokens each.
  torch::Tensor forward(torch::Tensor token_ids, torch::Tensor positions, torch::Tensor block_tables,
                        int64_t block_size) {
    TORCH_CHECK(token_ids.scalar_type() == torch::kInt64 && positions.scalar_type() == torch::kInt64 &&
                block_tables.scalar_type() == torch::kInt64);
    token_ids = token_ids.contiguous();
    positions = positions.contiguous();
    block_tables = block_tables.contiguous();
    const int64_t B = token_ids.numel(), D = hidden_, max_blocks = block_tables.size(1);
    TORCH_CHECK(positions.numel() == B && block_tables.size(0) == B && block_size > 0);
    torch::Tensor hidden = torch::empty({B, D}, torch::kFloat32);
    embed(token_ids.data_ptr<int64_t>(), B, hidden.data_ptr<float>());
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t table_rows = cos_.size(0), num_slots = layers_.empty() ? 0 : layers_[0].kv_cache.size(1);
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(pos[b] >= 0 && pos[b] < table_rows && pos[b] < max_blocks * block_size, "bad decode metadata");
    // The cache slot of every context position. Blocks released by a sliding window hold -1; they
    // lie before `earliest`, outside every layer's window, and are never read.
    const int64_t L = *std::max_element(pos, pos + B) + 1;
    slots_.assign(B * L, 0);
    ctx_.resize(B);
    const int64_t* tables = block_tables.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      ctx_[b] = pos[b] + 1;
      const int64_t earliest = widest_window_ > 0 ? std::max<int64_t>(0, ctx_[b] - widest_window_) : 0;
      for (int64_t p = 0; p <= pos[b]; ++p) {
        const int64_t slot = tables[b * max_blocks + p / block_size] * block_size + p % block_size;
        TORCH_CHECK(p < earliest || (slot >= 0 && slot < num_slots), "cache slot ", slot, " of position ", p,
                    " is out of range");
        slots_[b * L + p] = slot;
      }
    }
    const int64_t* slots = slots_.data();
    const int64_t* ctx = ctx_.data();
    float* h = hidden.data_ptr<float>();
    const int64_t qkv_width = (heads_ + 2 * kv_heads_) * dim_;
    const IsaKernels& k = kernels();
    normed_.resize(B * D);
    qkv_.resize(B * qkv_width);
    attn_.resize(B * heads_ * dim_);
    for (const Layer& l : layers_) {
      const int64_t inter = l.down.m.K;
      mlp_.resize(B * 2 * inter);
      act_.resize(B * inter);
      delta_.resize(B * D);
      for (int64_t b = 0; b < B; ++b) k.rms_norm(h + b * D, l.input_norm.data_ptr<float>(), D, eps_, &normed_[b * D]);
      l.qkv.apply(k, normed_.data(), B, qkv_.data());
      for (int64_t b = 0; b < B; ++b) position_and_store(k, l, &qkv_[b * qkv_width], pos[b], slots[b * L + ctx[b] - 1]);
      attention(k, l, B, L, slots, ctx);
      l.o.apply(k, attn_.data(), B, delta_.data());
      for (int64_t i = 0; i < B * D; ++i) h[i] += delta_[i];
      for (int64_t b = 0; b < B; ++b) k.rms_norm(h + b * D, l.post_norm.data_ptr<float>(), D, eps_, &normed_[b * D]);
      l.gate_up.apply(k, normed_.data(), B, mlp_.data());
      parallel_chunks(B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) k.silu_mul(&mlp_[b * 2 * inter], &mlp_[(b * 2 + 1) * inter], inter, &act_[b * inter]);
      });
      l.down.apply(k, act_.data(), B, delta_.data());
      for (int64_t i = 0; i < B * D; ++i) h[i] += delta_[i];
    }
    for (int64_t b = 0; b < B; ++b) k.rms_norm(h + b * D, final_norm_.data_ptr<float>(), D, eps_, h + b * D);
    return hidden;
  }

 private:
  // The token table's rows for `ids` (each checked in range).
  void embed(const int64_t* ids, int64_t B, float* out) const {
    if (embed_.size() == 3) {
      avx2::gather_rows(packed_embed_, ids, B, out);
      return;
    }
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ids[b] >= 0 && ids[b] < vocab_, "token id ", ids[b], " out of range");
      std::copy_n(embed_[0].data_ptr<float>() + ids[b] * hidden_, hidden_, out + b * hidden_);
    }
  }

  // q/k norms and rotary on one token's q and k heads, then its k and v into the cache slot.
  void position_and_store(const IsaKernels& k, const Layer& l, float* qkv, int64_t position, int64_t slot) const {
    const float* cos = cos_.data_ptr<float>() + position * rotary_dim_;
    const float* sin = sin_.data_ptr<float>() + position * rotary_dim_;
    for (int64_t head = 0; head < heads_ + kv_heads_; ++head) {
      float* x = qkv + head * dim_;
      if (l.q_norm.numel() > 0) {
        const float* w = (head < heads_ ? l.q_norm : l.k_norm).data_ptr<float>();
        k.rms_norm(x, w, dim_, eps_, x);
      }
      rotate(x, cos, sin, rotary_dim_);
    }
    float* cache = l.kv_cache.data_ptr<float>();
    const int64_t row = kv_heads_ * dim_, plane = l.kv_cache.size(1) * row;
    std::copy_n(qkv + heads_ * dim_, row, cache + slot * row);                            // K
    std::copy_n(qkv + (heads_ + kv_heads_) * dim_, row, cache + plane + slot * row);     // V
  }

  // Softmax attention of every query head over its sequence's cached context (sliding window
  // respected), one (sequence, head) pair per task.
  void attention(const IsaKernels& k, const Layer& l, int64_t B, int64_t L, const int64_t* slots, const int64_t* ctx) {
    const float* cache = l.kv_cache.data_ptr<float>();
    const int64_t row = kv_heads_ * dim_, plane = l.kv_cache.size(1) * row, group = heads_ / kv_heads_;
    const int64_t qkv_width = (heads_ + 2 * kv_heads_) * dim_;
    const float scale = static_cast<float>(scale_);
    const int64_t grain = std::max<int64_t>(1, 512 / std::max<int64_t>(1, L));  // ~512 keys per chunk at least
    parallel_chunks(B * heads_, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(L);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / heads_, head = task % heads_, kv = head / group;
        const int64_t n = ctx[b], first = l.window > 0 ? std::max<int64_t>(0, n - l.window) : 0;
        const float* q = &qkv_[b * qkv_width + head * dim_];
        const float* keys = cache + kv * dim_;
        const float* values = cache + plane + kv * dim_;
        const int64_t* seq_slots = slots + b * L;
        float* out = &attn_[(b * heads_ + head) * dim_];
        k.attend(q, keys, values, seq_slots, first, n, row, dim_, scale, scores.data(), out);
      }
    });
  }

  int64_t heads_, kv_heads_, dim_;
  double eps_, scale_;
  torch::Tensor cos_, sin_;
  int64_t rotary_dim_;
  std::vector<torch::Tensor> embed_;  // kept alive for packed_embed_ / the dense table
  BlockMatrix packed_embed_{};
  int64_t vocab_ = 0, hidden_ = 0;
  torch::Tensor final_norm_;
  std::vector<Layer> layers_;
  int64_t widest_window_ = 0;  // the largest sliding window, 0 when some layer sees the whole context
  std::vector<float> normed_, qkv_, attn_, mlp_, act_, delta_;  // per-step scratch, reused
  std::vector<int64_t> slots_, ctx_;
};

}  // namespace

void bind_llama_decode(pybind11::module& m) {
  pybind11::class_<LlamaDecoder>(m, "LlamaDecoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double, torch::Tensor, torch::Tensor,
                          std::vector<torch::Tensor>, std::vector<int64_t>, torch::Tensor>())
      .def("add_layer", &LlamaDecoder::add_layer)
      .def("forward", &LlamaDecoder::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace lmserve
