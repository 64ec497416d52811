// Shared declarations of the CPU fast path's native code: the block-quantized matmul
// (block_matmul.cpp), the fused decoder step built on it (fused_decoder.cpp), the sparse
// mixture-of-experts feed-forward block (moe_ffn.cpp) and the sampler's per-row statistics
// (row_stats.cpp).
//
// Runtime ISA dispatch. The vector kernels are written once, in isa_kernels.h, against a small
// vector type `Vec`, and compiled once per instruction set: isa_avx2.cpp (AVX2 + FMA, 256-bit
// registers) and isa_avx512.cpp (AVX-512 F/BW/VL/VNNI, 512-bit registers) each define their
// `Vec` under `#pragma GCC target(...)` and include isa_kernels.h into their own namespace
// (lmserve::avx2, lmserve::avx512), which ends with that variant's table of entry points
// (`IsaKernels`). The compiler emits AVX-512 code on any machine, since the pragma, not the
// command line, enables it; the rest of the extension (this header, the bindings, PyTorch's
// headers) is compiled for the baseline x86-64, so no inline function shared between translation
// units carries AVX-512 code. Which table runs is chosen at load time from CPUID
// (`isa_variants()`, `use_isa()`, called by lmserve/quant/native.py): only a variant whose
// instructions this CPU and OS support can be chosen.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

namespace lmserve {

// A weight [N, K] as small integers with one scale (and optional offset) per group of `group`
// consecutive columns of a row: w[n, k] = q[n, k] * scale[n, g] + bias[n, g]. 4-bit values
// without offsets are centred instead, w = (q - 8) * scale (GGUF's Q4_0). Scales and offsets are
// fp32, or fp16 (`half`) where that holds them exactly (the simple GGUF formats store fp16), which
// cuts the bytes a matmul reads by a sixth.
//
// Rows are stored in blocks of 8 (the last block padded with zero rows), each block group by
// group, so that 16 int16 hold a "chunk": 2 consecutive columns of all 8 rows ([r0 c, r0 c+1,
// r1 c, r1 c+1, ..., r7 c+1]). vpmaddwd (or VNNI's vpdpwssd) of a chunk with the activation pair
// of those columns broadcast gives the 8 rows' partial dot products in 8 int32 lanes, so a
// group's dot products of a whole block need no horizontal sums. A 256-bit register holds one
// chunk of one block; a 512-bit one holds the same chunk of two consecutive blocks, so every
// variant reads this one layout (weights packed on one machine run on any).
// bits = 8 (int8): chunk c of a group (columns 2c, 2c+1) is 16 bytes, byte 2j + e holding row j,
//   column 2c + e.
// bits = 4 (values 0-15): chunks 2u and 2u+1 share 16 bytes, chunk 2u in bytes 0-7 and chunk
//   2u+1 in bytes 8-15; rows 0-3 sit in the low nibbles of bytes 2j, 2j + 1 (+8) and rows 4-7 in
//   the high nibbles of bytes 2(j-4), 2(j-4) + 1 (+8).
// Scales and offsets are [blocks, groups, 8]. lmserve/quant/packed.py writes this layout.
struct BlockMatrix {
  const uint8_t* q;
  const void* scale;  // fp32, or fp16 when `half`
  const void* bias;   // the same type; nullptr when the format has no offsets
  int64_t N, K, group;
  int bits;
  bool half;

  int64_t blocks() const { return (N + 7) / 8; }
  int64_t groups() const { return K / group; }
  int64_t group_bytes() const { return 8 * group * bits / 8; }  // one block's values of one group
};

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
BlockMatrix block_matrix(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& bias, int64_t group,
                         int64_t bits, int64_t rows);

// How a layer's KV cache stores its values: fp32, bf16 or fp16 as they are, or int8 with one fp32
// scale per token and KV head (value = int8 * scale), as lmserve/layers/attention.py writes them.
enum class KvType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3 };

// One KV head's keys or values in a cache laid out [slots, kv_heads, head_dim]: `data` points at
// slot 0's values of this head (elements of `type`), `row` elements apart from slot to slot;
// `scales` (int8 only) at slot 0's scale of this head, `scale_row` floats apart.
struct KvHead {
  const void* data;
  const float* scales;
  int64_t row, scale_row;
  KvType type;
};

// One instruction set's kernels (isa_kernels.h). Every output row depends only on its own input
// row, so results do not change with the batch around a row.
struct IsaKernels {
  const char* name;   // for LMSERVE_NATIVE_ISA and use_isa(): "avx2", "avx512"
  const char* label;  // for logs: the instruction sets it uses
  // The most rows for which `matmul` beats dequantizing the weight for an fp32 GEMM (slab_gemm).
  int64_t kernel_max_rows;
  bool (*runs_here)();  // whether this CPU and OS support them (CPUID)
  // out[M, N] = x[M, K] @ W^T, fp32, threads from PyTorch's intra-op pool.
  void (*matmul)(const float* x, int64_t M, const BlockMatrix& w, float* out);
  // y = x / sqrt(mean(x^2) + eps) * w, as F.rms_norm computes it in fp32 (y may be x).
  void (*rms_norm)(const float* x, const float* w, int64_t n, float eps, float* y);
  // out = silu(gate) * up over n values.
  void (*silu_mul)(const float* gate, const float* up, int64_t n, float* out);
  // out = gelu_tanh(gate) * up over n values (GeGLU), or gelu_tanh(gate) when up is null.
  void (*gelu_tanh_mul)(const float* gate, const float* up, int64_t n, float* out);
  // Softmax attention of one query head q [dim] over the cached keys and values at
  // slots[first..n), into out [dim]; `scores` holds n floats of scratch.
  void (*attend)(const float* q, const KvHead& k, const KvHead& v, const int64_t* slots, int64_t first, int64_t n,
                 int64_t dim, float scale, float* scores, float* out);
  // (first index of the largest value, log-sum-exp) of a row of n finite values.
  std::pair<int64_t, float> (*argmax_logsumexp)(const float* x, int64_t n);
  // sum_i a[i] * b[i] over n values, b fp32 or bf16, summed in a fixed order.
  float (*dot)(const float* a, const float* b, int64_t n);
  float (*dot_bf16)(const float* a, const uint16_t* b, int64_t n);
  // y[i] += sum_j coef[j] * rows[j * stride + i] over n values and `count` rows, fp32 or bf16.
  void (*add_combination)(const float* coef, int64_t count, const float* rows, int64_t stride, float* y, int64_t n);
  void (*add_combination_bf16)(const float* coef, int64_t count, const uint16_t* rows, int64_t stride, float* y,
                               int64_t n);
};

namespace avx2 {
extern const IsaKernels kernels;
// Dense fp32 rows (dequantization is AVX2 in every variant: prefill spends its time in the GEMM
// that follows, and token lookups are a few rows). Blocks [begin, end) into out (row n of the
// matrix at out + (n - first_row) * K), and single rows `ids` into out [count, K].
void dequantize_blocks(const BlockMatrix& w, int64_t first_row, float* out, int64_t begin, int64_t end);
void gather_rows(const BlockMatrix& w, const int64_t* ids, int64_t count, float* out);
}  // namespace avx2
namespace avx512 {
extern const IsaKernels kernels;
}

// out [M, N] = x [M, K] W^T for many rows: W dequantized 2 MiB at a time into a buffer that stays
// in cache for its GEMM (PyTorch's), fp32 or with bf16 operands (block_matmul.cpp).
void slab_gemm(const BlockMatrix& w, const float* x, int64_t M, bool bf16, float* out);

// The variant in use (chosen by use_isa(); AVX2 until then).
const IsaKernels& kernels();

}  // namespace lmserve
