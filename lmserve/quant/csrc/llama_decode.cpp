// A whole decode step of a Llama-family model in one native call, for the CPU fast path.
//
// Between the block-quantized matmuls a decode step is ~30 small tensor ops per layer (norms,
// rotary, cache write, attention, activation, residuals); through PyTorch each costs more in
// dispatch than in arithmetic at batch sizes of 1-16. Here they are plain loops over the step's
// rows, the matmuls call block_matmul_into directly, and attention reads K/V straight from the
// paged cache through each sequence's slot list. Every row is computed independently of the
// others (no batch-dependent reduction order). Layout and semantics match the PyTorch modules in
// lmserve/models/llama.py; the Python side (lmserve/models/llama_fused.py) decides when a model
// and a step qualify.
#include "block_kernels.h"

#include <immintrin.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
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

  void apply(const float* x, int64_t rows, float* out) const {
    block_matmul_into(x, rows, m, out);
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

// y = x / sqrt(mean(x^2) + eps) * w, as F.rms_norm computes it in fp32.
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  const float inv = 1.0f / std::sqrt(dot_f32(x, x, n) / static_cast<float>(n) + eps);
  const __m256 scale = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), scale), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// out = silu(gate) * up over n values.
void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + exp1(-gate[i])) * up[i];
}

// softmax weights exp(scores[i] - max) in place over [first, n); returns their sum.
float exponentiate(float* scores, int64_t first, int64_t n, float max_score) {
  const __m256 shift = _mm256_set1_ps(max_score);
  __m256 sum = _mm256_setzero_ps();
  int64_t p = first;
  for (; p + 8 <= n; p += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + p), shift));
    _mm256_storeu_ps(scores + p, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum(sum);
  for (; p < n; ++p) total += (scores[p] = exp1(scores[p] - max_score));
  return total;
}

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


// Attention of one query head over the cached keys and values at `slots[first..n)` (rows of
// `row` floats; k and v point at this head's kv-head columns). Four keys at a time so their dot
// products are independent FMA chains; the output stays in registers across positions.
// Requests the cache lines of one head's cached row: slots scatter rows over the cache, so the
// hardware prefetcher does not see them coming and each row would otherwise stall on memory.
template <int D, _mm_hint HINT = _MM_HINT_T0>
inline void prefetch_row(const float* row) {
  for (int i = 0; i < D; i += 16) _mm_prefetch(reinterpret_cast<const char*>(row + i), HINT);
}

constexpr int64_t kPrefetchKeys = 16;  // how many positions ahead rows are requested

template <int D>
void attend_head(const float* q, const float* k, const float* v, const int64_t* slots, int64_t first, int64_t n,
                 int64_t row, float scale, float* scores, float* out) {
  static_assert(D % 8 == 0 && D > 0, "head_dim must be a multiple of 8");
  constexpr int C = D / 8;
  __m256 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
  float max_score = -std::numeric_limits<float>::infinity();
  int64_t p = first;
  for (; p + 4 <= n; p += 4) {
    const float* key[4];
    __m256 acc[4];
    for (int j = 0; j < 4; ++j) {
      if (p + j + kPrefetchKeys < n) {
        prefetch_row<D>(k + slots[p + j + kPrefetchKeys] * row);
        prefetch_row<D, _MM_HINT_T1>(v + slots[p + j + kPrefetchKeys] * row);  // for the weighted sum
      }
      key[j] = k + slots[p + j] * row;
      acc[j] = _mm256_mul_ps(qv[0], _mm256_loadu_ps(key[j]));
    }
    for (int c = 1; c < C; ++c)
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(key[j] + 8 * c), acc[j]);
    for (int j = 0; j < 4; ++j) max_score = std::max(max_score, scores[p + j] = hsum(acc[j]) * scale);
  }
  for (; p < n; ++p) {
    const float* key = k + slots[p] * row;
    __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(key));
    for (int c = 1; c < C; ++c) acc = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(key + 8 * c), acc);
    max_score = std::max(max_score, scores[p] = hsum(acc) * scale);
  }
  const __m256 inv_total = _mm256_set1_ps(1.0f / exponentiate(scores, first, n, max_score));
  __m256 o[C];
  for (int c = 0; c < C; ++c) o[c] = _mm256_setzero_ps();
  for (p = first; p < std::min(n, first + kPrefetchKeys); ++p) prefetch_row<D>(v + slots[p] * row);
  for (p = first; p < n; ++p) {
    if (p + kPrefetchKeys < n) prefetch_row<D>(v + slots[p + kPrefetchKeys] * row);
    const float* value = v + slots[p] * row;
    const __m256 w = _mm256_set1_ps(scores[p]);
    for (int c = 0; c < C; ++c) o[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(value + 8 * c), o[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(o[c], inv_total));
}

// The same for any head_dim, plainly.
void attend_head_any(const float* q, const float* k, const float* v, const int64_t* slots, int64_t first, int64_t n,
                     int64_t row, int64_t dim, float scale, float* scores, float* out) {
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t p = first; p < n; ++p) max_score = std::max(max_score, scores[p] = dot_f32(q, k + slots[p] * row, dim) * scale);
  const float total = exponentiate(scores, first, n, max_score);
  std::fill_n(out, dim, 0.0f);
  for (int64_t p = first; p < n; ++p) {
    const float* value = v + slots[p] * row;
    const float w = scores[p] / total;
    for (int64_t d = 0; d < dim; ++d) out[d] += w * value[d];
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
    normed_.resize(B * D);
    qkv_.resize(B * qkv_width);
    attn_.resize(B * heads_ * dim_);
    for (const Layer& l : layers_) {
      const int64_t inter = l.down.m.K;
      mlp_.resize(B * 2 * inter);
      act_.resize(B * inter);
      delta_.resize(B * D);
      for (int64_t b = 0; b < B; ++b) rms_norm(h + b * D, l.input_norm.data_ptr<float>(), D, eps_, &normed_[b * D]);
      l.qkv.apply(normed_.data(), B, qkv_.data());
      for (int64_t b = 0; b < B; ++b) position_and_store(l, &qkv_[b * qkv_width], pos[b], slots[b * L + ctx[b] - 1]);
      attention(l, B, L, slots, ctx);
      l.o.apply(attn_.data(), B, delta_.data());
      for (int64_t i = 0; i < B * D; ++i) h[i] += delta_[i];
      for (int64_t b = 0; b < B; ++b) rms_norm(h + b * D, l.post_norm.data_ptr<float>(), D, eps_, &normed_[b * D]);
      l.gate_up.apply(normed_.data(), B, mlp_.data());
      parallel_chunks(B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) silu_mul(&mlp_[b * 2 * inter], &mlp_[(b * 2 + 1) * inter], inter, &act_[b * inter]);
      });
      l.down.apply(act_.data(), B, delta_.data());
      for (int64_t i = 0; i < B * D; ++i) h[i] += delta_[i];
    }
    for (int64_t b = 0; b < B; ++b) rms_norm(h + b * D, final_norm_.data_ptr<float>(), D, eps_, h + b * D);
    return hidden;
  }

 private:
  // The token table's rows for `ids` (each checked in range).
  void embed(const int64_t* ids, int64_t B, float* out) const {
    if (embed_.size() == 3) {
      block_gather_rows(packed_embed_, ids, B, out);
      return;
    }
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ids[b] >= 0 && ids[b] < vocab_, "token id ", ids[b], " out of range");
      std::copy_n(embed_[0].data_ptr<float>() + ids[b] * hidden_, hidden_, out + b * hidden_);
    }
  }

  // q/k norms and rotary on one token's q and k heads, then its k and v into the cache slot.
  void position_and_store(const Layer& l, float* qkv, int64_t position, int64_t slot) const {
    const float* cos = cos_.data_ptr<float>() + position * rotary_dim_;
    const float* sin = sin_.data_ptr<float>() + position * rotary_dim_;
    for (int64_t head = 0; head < heads_ + kv_heads_; ++head) {
      float* x = qkv + head * dim_;
      if (l.q_norm.numel() > 0) {
        const float* w = (head < heads_ ? l.q_norm : l.k_norm).data_ptr<float>();
        rms_norm(x, w, dim_, eps_, x);
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
  void attention(const Layer& l, int64_t B, int64_t L, const int64_t* slots, const int64_t* ctx) {
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
        const float* k = cache + kv * dim_;
        const float* v = cache + plane + kv * dim_;
        const int64_t* seq_slots = slots + b * L;
        float* out = &attn_[(b * heads_ + head) * dim_];
        switch (dim_) {
          case 16: attend_head<16>(q, k, v, seq_slots, first, n, row, scale, scores.data(), out); break;
          case 32: attend_head<32>(q, k, v, seq_slots, first, n, row, scale, scores.data(), out); break;
          case 64: attend_head<64>(q, k, v, seq_slots, first, n, row, scale, scores.data(), out); break;
          case 128: attend_head<128>(q, k, v, seq_slots, first, n, row, scale, scores.data(), out); break;
          case 256: attend_head<256>(q, k, v, seq_slots, first, n, row, scale, scores.data(), out); break;
          default: attend_head_any(q, k, v, seq_slots, first, n, row, dim_, scale, scores.data(), out);
        }
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
