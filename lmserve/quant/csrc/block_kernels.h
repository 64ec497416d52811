// Shared declarations of the CPU fast path's native code: the block-quantized matmul
// (block_matmul.cpp) and the fused Llama decode step built on it (llama_decode.cpp).
#pragma once

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

// The BlockMatrix view of a packed weight's tensors (checks dtypes, shapes and contiguity).
BlockMatrix block_matrix(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& bias,
                         int64_t group, int64_t bits);

// out[M, N] = x[M, K] @ W^T, fp32, threads from PyTorch's intra-op pool. Each output row depends
// only on its own input row, so results do not change with the batch around a row.
void block_matmul_into(const float* x, int64_t M, const BlockMatrix& w, float* out);

}  // namespace lmserve
