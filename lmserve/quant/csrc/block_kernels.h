// Shared declarations and vector helpers of the CPU fast path's native code: the block-quantized
// matmul (block_matmul.cpp), the fused Llama decode step built on it (llama_decode.cpp) and the
// sampler's per-row statistics (row_stats.cpp).
#pragma once

#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace lmserve {

// A weight [N, K] as small integers with one fp32 scale (and optional fp32 offset) per group of
// `group` consecutive columns of a row: w[n, k] = q[n, k] * scale[n, g] + bias[n, g].
//
// Rows are stored in blocks of 8 (the last block padded with zero rows), each block group by
// group, so that one AVX2 register of int16 holds a "chunk": 2 consecutive columns of all 8 rows
// ([r0 c, r0 c+1, r1 c, r1 c+1, ..., r7 c+1]). vpmaddwd of a chunk with the activation pair of
// those columns broadcast gives the 8 rows' partial dot products in the 8 lanes, so a group's
// dot products of a whole block need no horizontal sums.
// bits = 8 (int8): chunk c of a group (columns 2c, 2c+1) is 16 bytes, byte 2j + e holding row j,
//   column 2c + e.
// bits = 4 (values 0-15): chunks 2u and 2u+1 share 16 bytes, chunk 2u in bytes 0-7 and chunk
//   2u+1 in bytes 8-15; rows 0-3 sit in the low nibbles of bytes 2j, 2j + 1 (+8) and rows 4-7 in
//   the high nibbles of bytes 2(j-4), 2(j-4) + 1 (+8).
// Scales and offsets are [blocks, groups, 8] fp32. lmserve/quant/packed.py writes this layout.
struct BlockMatrix {
  const uint8_t* q;
  const float* scale;
  const float* bias;  // nullptr when the format has no offsets
  int64_t N, K, group;
  int bits;

  int64_t blocks() const { return (N + 7) / 8; }
  int64_t groups() const { return K / group; }
  int64_t group_bytes() const { return 8 * group * bits / 8; }  // one block's values of one group
};

// Sum of a register's 8 floats.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Largest of a register's 8 floats.
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for 8 floats (Cephes' expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp).
// Inputs below -87.3 give 0, the way expf underflows.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3365447505531f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447505531f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(power)));
}

inline float exp1(float x) { return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))); }

// sum_i a[i] * b[i] in a fixed order (8 lanes, then the tail).
inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float total = hsum(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// f(begin, end) over [0, count) in chunks of `chunk` that PyTorch's intra-op threads take one at a
// time until none is left. A static split waits for its slowest thread, and on a shared VM one
// core is often slowed for a while by others; results do not depend on which thread ran a chunk.
template <typename F>
void parallel_chunks(int64_t count, int64_t chunk, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (count + chunk - 1) / chunk);
  if (threads <= 1) {
    if (count > 0) f(0, count);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk)) < count;) f(begin, std::min(count, begin + chunk));
  });
}

// The BlockMatrix view of a packed weight's tensors (checks dtypes, shapes and contiguity).
BlockMatrix block_matrix(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& bias,
                         int64_t group, int64_t bits, int64_t rows);

// out[M, N] = x[M, K] @ W^T, fp32, threads from PyTorch's intra-op pool. Each output row depends
// only on its own input row, so results do not change with the batch around a row.
void block_matmul_into(const float* x, int64_t M, const BlockMatrix& w, float* out);

// out[i, :] = W[ids[i], :] in fp32 for `count` rows (checked in range): token-table lookups.
void block_gather_rows(const BlockMatrix& w, const int64_t* ids, int64_t count, float* out);

}  // namespace lmserve
