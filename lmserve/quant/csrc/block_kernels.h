// Shared declarations of the CPU fast path's native code: the block-quantized matmul
// (block_matmul.cpp) and the fused Llama decode step built on it (llama_decode.cpp).
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>

namespace lmserve {

// A weight [N, K] as small integers per row with one fp32 scale (and optional fp32 offset) per
// group of `group` consecutive columns: w[n, k] = q[n, k] * scale[n, g] + bias[n, g].
// bits = 4: uint8 [N, K/2]; in each 32-column block byte j holds column j in its low nibble and
// column j + 16 in its high nibble, as GGUF's Q4 formats do. bits = 8: int8 [N, K].
struct BlockMatrix {
  const uint8_t* q;
  const float* scale;
  const float* bias;  // nullptr when the format has no offsets
  int64_t N, K, group;
  int bits;
};

// Sum of a register's 8 floats.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_i a[i] * b[i] in a fixed order (8 lanes, then the tail).
inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float total = hsum(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// The BlockMatrix view of a packed weight's tensors (checks dtypes, shapes and contiguity).
BlockMatrix block_matrix(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& bias,
                         int64_t group, int64_t bits);

// out[M, N] = x[M, K] @ W^T, fp32, threads from PyTorch's intra-op pool. Each output row depends
// only on its own input row, so results do not change with the batch around a row.
void block_matmul_into(const float* x, int64_t M, const BlockMatrix& w, float* out);

}  // namespace lmserve
