// Matmul and dequantization over block-quantized weights (layout in block_kernels.h), for the
// CPU fast path. Activations enter as fp32 and are carried as int16 per row and group (relative
// error 2^-16 of the group's largest value, far below bf16's 2^-9), so a group's dot products
// are exact integer multiply-adds (vpmaddwd, 8 weight rows per instruction) with one conversion
// to float per group; results match dequantize-then-matmul in fp32 to about 1e-5 relative.
// Requires AVX2 and FMA; threads come from PyTorch's intra-op pool (OpenMP).
#include "block_kernels.h"

#include <immintrin.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace lmserve {
namespace {

// Activations of M rows quantized per group: int16 values [M][K], and per [M][G] their scale and
// (for the offset term, sum_k x * bias = bias * sum_k x) their exact fp32 sum.
struct QuantizedActivations {
  std::vector<int16_t> q;
  std::vector<float> scale, sum;
};

// Fills `a` (whose buffers are reused from call to call: a decode step makes ~120 of these).
void quantize_activations(const float* x, int64_t M, int64_t K, int64_t group, QuantizedActivations& a) {
  const int64_t G = K / group;
  a.q.resize(M * K);
  a.scale.resize(M * G);
  a.sum.resize(M * G);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t mg = 0; mg < M * G; ++mg) {
    const float* v = x + mg * group;
    __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int64_t k = 0; k < group; k += 8) {
      const __m256 xv = _mm256_loadu_ps(v + k);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, xv));
      sum = _mm256_add_ps(sum, xv);
    }
    const float top = hmax(amax);
    const float scale = top > 0.0f ? top / 32767.0f : 1.0f;
    const __m256 inv = _mm256_set1_ps(1.0f / scale);
    int16_t* dst = a.q.data() + mg * group;
    for (int64_t k = 0; k < group; k += 16) {
      // cvtps rounds to nearest even; packs interleaves 128-bit lanes, the permute restores order.
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k), inv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k + 8), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
    }
    a.scale[mg] = scale;
    a.sum[mg] = hsum(sum);
  }
}

// The two int16 chunks (columns 4u .. 4u+3 of a block's 8 rows) of unit u of a block's group.
template <int BITS>
inline void load_unit(const uint8_t* group_values, int u, __m256i& first, __m256i& second) {
  if constexpr (BITS == 4) {
    // Low nibbles into the lower 128-bit lane and high nibbles into the upper one, then widen.
    const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group_values + 16 * u)));
    const __m256i nibbles = _mm256_and_si256(_mm256_srlv_epi32(packed, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                             _mm256_set1_epi8(0x0F));
    first = _mm256_unpacklo_epi8(nibbles, _mm256_setzero_si256());
    second = _mm256_unpackhi_epi8(nibbles, _mm256_setzero_si256());
  } else {
    const __m128i* p = reinterpret_cast<const __m128i*>(group_values + 32 * u);
    first = _mm256_cvtepi8_epi16(_mm_loadu_si128(p));
    second = _mm256_cvtepi8_epi16(_mm_loadu_si128(p + 1));
  }
}

inline __m256i broadcast_pair(const int16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return _mm256_set1_epi32(pair);
}

// Outputs of weight block `block` (8 rows) for R activation rows from m0. Per row and group the
// dot products are exact int32 sums, then scaled and added to that output's fp32 accumulator in
// group order: an output depends only on its own weight row and activation row.
template <int BITS, int GROUP, int R>
inline void tile(const QuantizedActivations& a, int64_t m0, const BlockMatrix& w, int64_t block, float* out) {
  const int64_t G = w.groups(), K = w.K, group_bytes = w.group_bytes();
  const uint8_t* wq = w.q + block * G * group_bytes;
  const float* ws = w.scale + block * G * 8;
  const float* wb = w.bias != nullptr ? w.bias + block * G * 8 : nullptr;
  const int16_t* xq = a.q.data() + m0 * K;
  const float* xs = a.scale.data() + m0 * G;
  const float* xsum = a.sum.data() + m0 * G;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g, wq += group_bytes) {
    _mm_prefetch(reinterpret_cast<const char*>(wq + 8 * group_bytes), _MM_HINT_T0);
    __m256i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
    for (int u = 0; u < GROUP / 4; ++u) {
      __m256i first, second;
      load_unit<BITS>(wq, u, first, second);
      for (int r = 0; r < R; ++r) {
        const int16_t* x = xq + r * K + g * GROUP + 4 * u;
        dot[r] = _mm256_add_epi32(dot[r], _mm256_add_epi32(_mm256_madd_epi16(first, broadcast_pair(x)),
                                                           _mm256_madd_epi16(second, broadcast_pair(x + 2))));
      }
    }
    const __m256 scale = _mm256_loadu_ps(ws + 8 * g);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_mul_ps(scale, _mm256_set1_ps(xs[r * G + g])), acc[r]);
      if (wb != nullptr) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wb + 8 * g), _mm256_set1_ps(xsum[r * G + g]), acc[r]);
    }
  }
  const int64_t n0 = block * 8, valid = std::min<int64_t>(8, w.N - n0);
  for (int r = 0; r < R; ++r) {
    float* dst = out + (m0 + r) * w.N + n0;
    if (valid == 8) {
      _mm256_storeu_ps(dst, acc[r]);
    } else {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[r]);
      std::copy_n(lanes, valid, dst);
    }
  }
}

// Weight blocks [begin, end) against all M activation rows, in tiles of up to 4 rows (a block
// stays in L1 while its tiles pass over it).
template <int BITS, int GROUP>
void matmul_blocks(const QuantizedActivations& a, int64_t M, const BlockMatrix& w, float* out, int64_t begin,
                   int64_t end) {
  for (int64_t block = begin; block < end; ++block) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) tile<BITS, GROUP, 4>(a, m0, w, block, out);
    switch (M - m0) {
      case 1: tile<BITS, GROUP, 1>(a, m0, w, block, out); break;
      case 2: tile<BITS, GROUP, 2>(a, m0, w, block, out); break;
      case 3: tile<BITS, GROUP, 3>(a, m0, w, block, out); break;
      default: break;
    }
  }
}

// In-register transpose of an 8x8 matrix of 32-bit elements.
inline void transpose8(__m256i r[8]) {
  __m256i t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m256i u[8];
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      u[4 * i + j] = _mm256_unpacklo_epi64(t[4 * i + j], t[4 * i + 2 + j]);
      u[4 * i + 2 + j] = _mm256_unpackhi_epi64(t[4 * i + j], t[4 * i + 2 + j]);
    }
  }
  // u[0..3]: rows 0-3 / 4-7 interleaved per lane; combine lanes of u[i] and u[i+4].
  const int order[4] = {0, 2, 1, 3};
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[order[i]], u[order[i] + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[order[i]], u[order[i] + 4], 0x31);
  }
}

// Rows [first_lane, end_lane) of block `block` in group g, dequantized to fp32 at row(lane): each
// 8 chunks (16 columns) of a block are one 8x8 transpose of column pairs away from 8 rows.
template <int BITS, int GROUP, typename RowOut>
inline void dequantize_block_group(const BlockMatrix& w, int64_t block, int64_t g, int64_t first_lane,
                                   int64_t end_lane, const RowOut& row) {
  const int64_t G = w.groups();
  const uint8_t* values = w.q + (block * G + g) * w.group_bytes();
  const float* scale = w.scale + (block * G + g) * 8;
  const float* bias = w.bias != nullptr ? w.bias + (block * G + g) * 8 : nullptr;
  for (int half = 0; half < GROUP / 16; ++half) {
    __m256i chunks[8];  // 8 chunks: columns 16 * half .. + 15
    for (int u = 0; u < 4; ++u) load_unit<BITS>(values, 4 * half + u, chunks[2 * u], chunks[2 * u + 1]);
    transpose8(chunks);  // chunks[j]: row j's 16 columns as int16
    for (int64_t j = first_lane; j < end_lane; ++j) {
      float* dst = row(j) + g * GROUP + 16 * half;
      const __m256 s = _mm256_set1_ps(scale[j]), b = _mm256_set1_ps(bias != nullptr ? bias[j] : 0.0f);
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(chunks[j])));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(chunks[j], 1)));
      _mm256_storeu_ps(dst, _mm256_fmadd_ps(lo, s, b));
      _mm256_storeu_ps(dst + 8, _mm256_fmadd_ps(hi, s, b));
    }
  }
}

// Dense fp32 rows of blocks [begin, end) into out (row n of the matrix at out + (n - first_row) * K).
template <int BITS, int GROUP>
void dequantize_blocks(const BlockMatrix& w, int64_t first_row, float* out, int64_t begin, int64_t end) {
  for (int64_t block = begin; block < end; ++block) {
    const int64_t valid = std::min<int64_t>(8, w.N - block * 8);
    for (int64_t g = 0; g < w.groups(); ++g)
      dequantize_block_group<BITS, GROUP>(w, block, g, 0, valid,
                                          [&](int64_t j) { return out + (block * 8 + j - first_row) * w.K; });
  }
}

// Calls f.template operator()<BITS, GROUP>() for the matrix's storage.
template <typename F>
void dispatch(const BlockMatrix& w, F&& f) {
  if (w.bits == 4) {
    f.template operator()<4, 32>();
  } else if (w.group == 32) {
    f.template operator()<8, 32>();
  } else {
    f.template operator()<8, 16>();
  }
}

}  // namespace

BlockMatrix block_matrix(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& bias,
                         int64_t group, int64_t bits, int64_t rows) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(bits == 8 ? (group == 16 || group == 32) : group == 32, "unsupported group size");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == torch::kFloat32);
  TORCH_CHECK(scale.dim() == 3 && scale.size(2) == 8 && scale.size(0) == (rows + 7) / 8,
              "scales must be [row blocks, groups, 8]");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.is_contiguous() && bias.sizes() == scale.sizes()));
  const int64_t K = scale.size(1) * group;
  TORCH_CHECK(q.numel() == scale.size(0) * 8 * K * bits / 8, "packed values do not match the scales' shape");
  return BlockMatrix{reinterpret_cast<const uint8_t*>(q.data_ptr()), scale.data_ptr<float>(),
                     has_bias ? bias.data_ptr<float>() : nullptr, rows, K, group, static_cast<int>(bits)};
}

void block_matmul_into(const float* x, int64_t M, const BlockMatrix& w, float* out) {
  // The caller thread's buffers, named through a local reference: a lambda does not capture a
  // thread_local, so the pool's workers would otherwise see their own (empty) copies.
  static thread_local QuantizedActivations buffers;
  QuantizedActivations& a = buffers;
  quantize_activations(x, M, w.K, w.group, a);
  // About 8 chunks per thread, so a thread that falls behind hands work to the others.
  const int64_t blocks = w.blocks(), chunk = std::max<int64_t>(2, blocks / (8 * at::get_num_threads()));
  parallel_chunks(blocks, chunk, [&](int64_t begin, int64_t end) {
    dispatch(w, [&]<int BITS, int GROUP>() { matmul_blocks<BITS, GROUP>(a, M, w, out, begin, end); });
  });
}

void block_gather_rows(const BlockMatrix& w, const int64_t* ids, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < w.N, "row ", ids[i], " out of range");
    const int64_t block = ids[i] / 8, lane = ids[i] % 8;
    dispatch(w, [&]<int BITS, int GROUP>() {
      for (int64_t g = 0; g < w.groups(); ++g)
        dequantize_block_group<BITS, GROUP>(w, block, g, lane, lane + 1, [&](int64_t) { return out + i * w.K; });
    });
  }
}

}  // namespace lmserve

namespace {

// x [M, K] fp32, returns [M, rows] fp32.
torch::Tensor block_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor bias,
                           int64_t group, int64_t bits, int64_t rows) {
  const lmserve::BlockMatrix w = lmserve::block_matrix(q, scale, bias, group, bits, rows);
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "activations must be fp32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K, "weight has ", w.K, " columns, input has ", x.size(-1));
  auto out = torch::empty({x.size(0), w.N}, x.options());
  lmserve::block_matmul_into(x.data_ptr<float>(), x.size(0), w, out.data_ptr<float>());
  return out;
}

// Writes the dense fp32 rows [first_row, first_row + out rows) of the weight into `out` (a reused
// buffer: fresh large allocations would page-fault on every call). first_row is a multiple of 8.
void block_dequantize(torch::Tensor q, torch::Tensor scale, torch::Tensor bias, int64_t group, int64_t bits,
                      int64_t rows, int64_t first_row, torch::Tensor out) {
  const lmserve::BlockMatrix w = lmserve::block_matrix(q, scale, bias, group, bits, rows);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.size(1) == w.K);
  const int64_t count = out.size(0);
  TORCH_CHECK(first_row % 8 == 0 && first_row >= 0 && first_row + count <= w.N && (count % 8 == 0 || first_row + count == w.N),
              "dequantized rows must be whole blocks of 8 (or end at the last row)");
  float* op = out.data_ptr<float>();
  at::parallel_for(first_row / 8, (first_row + count + 7) / 8, 4, [&](int64_t begin, int64_t end) {
    lmserve::dispatch(w, [&]<int BITS, int GROUP>() {
      lmserve::dequantize_blocks<BITS, GROUP>(w, first_row, op, begin, end);
    });
  });
}

// Dense fp32 rows `ids` [n] of the weight, [n, K] (embedding lookups in a packed token table).
torch::Tensor block_gather_rows(torch::Tensor q, torch::Tensor scale, torch::Tensor bias, int64_t group, int64_t bits,
                                int64_t rows, torch::Tensor ids) {
  const lmserve::BlockMatrix w = lmserve::block_matrix(q, scale, bias, group, bits, rows);
  ids = ids.contiguous();
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1, "ids must be int64 [n]");
  auto out = torch::empty({ids.size(0), w.K}, torch::kFloat32);
  lmserve::block_gather_rows(w, ids.data_ptr<int64_t>(), ids.size(0), out.data_ptr<float>());
  return out;
}

}  // namespace

namespace lmserve {
void bind_llama_decode(pybind11::module& m);  // llama_decode.cpp
void bind_row_stats(pybind11::module& m);     // row_stats.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  lmserve::bind_llama_decode(m);
  lmserve::bind_row_stats(m);
  // Both release the GIL (as PyTorch's own ops do), so a server's event loop runs meanwhile.
  m.def("block_matmul", &block_matmul, "x @ W^T for a block-quantized W (fp32 activations)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("block_dequantize", &block_dequantize, "dense fp32 rows of a block-quantized weight, into out",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("block_gather_rows", &block_gather_rows, "dense fp32 copies of the given rows of a block-quantized weight",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
