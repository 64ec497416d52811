// Matmul and dequantization over block-quantized weights (layout in block_kernels.h), for the
// CPU fast path. Activations enter as fp32 and are carried as int16 per row and group (relative
// error 2^-16 of the group's largest value, far below bf16's 2^-9), so each group's dot product
// is integer multiply-adds (vpmaddwd) with one conversion to float per group; results match
// dequantize-then-matmul in fp32 to about 1e-5 relative. Requires AVX2 and FMA; threads come
// from PyTorch's intra-op pool (OpenMP).
#include "block_kernels.h"

#include <immintrin.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace lmserve {
namespace {

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Activations of M rows quantized per group: int16 values, their scale and (for the offset term,
// sum_k x * bias = bias * sum_k x) the exact fp32 sum. Values and scales are stored group-major
// ([G][M][group] and [G][M]) so a tile finds all its rows' data for one group at fixed offsets
// from one pointer; sums are row-major [M][G] for the per-row offset dot product.
struct QuantizedActivations {
  std::vector<int16_t> q;
  std::vector<float> scale, sum;
  int64_t M, K, G;
};

// Fills `a` (whose buffers are reused from call to call: a decode step makes ~120 of these).
void quantize_activations(const float* x, int64_t M, int64_t K, int64_t group, QuantizedActivations& a) {
  const int64_t G = K / group;
  a.M = M, a.K = K, a.G = G;
  a.q.resize(M * K);
  a.scale.resize(M * G);
  a.sum.resize(M * G);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* v = x + m * K + g * group;
      __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int64_t k = 0; k < group; k += 8) {
        const __m256 xv = _mm256_loadu_ps(v + k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, xv));
        sum = _mm256_add_ps(sum, xv);
      }
      const float top = hmax(amax);
      const float scale = top > 0.0f ? top / 32767.0f : 1.0f;
      const __m256 inv = _mm256_set1_ps(1.0f / scale);
      int16_t* dst = a.q.data() + (g * M + m) * group;
      for (int64_t k = 0; k < group; k += 16) {
        // cvtps rounds to nearest even; packs interleaves 128-bit lanes, the permute restores order.
        const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k), inv));
        const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k + 8), inv));
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), packed);
      }
      a.scale[g * M + m] = scale;
      a.sum[m * G + g] = hsum(sum);
    }
  }
}

// The weights of one group widened to int16: 16 columns per register.
template <int BITS, int GROUP>
inline void load_group_i16(const uint8_t* row, int64_t k0, __m256i* w) {
  if constexpr (BITS == 4) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 / 2));
    const __m128i mask = _mm_set1_epi8(0x0F);
    w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(packed, mask));                     // columns 0-15
    w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask));  // columns 16-31
  } else {
    for (int i = 0; i < GROUP / 16; ++i)
      w[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 + 16 * i)));
  }
}

// Outputs for NT weight rows from n0 and R activation rows from m0. Every (row, output) pair has
// its own accumulator fed group by group in order, so a value does not depend on the tile shape;
// the NT x R independent chains hide the FMA latency. The next NT weight rows are prefetched: the
// hardware prefetcher does not follow several interleaved row streams far enough ahead.
template <int BITS, int GROUP, int NT, int R>
inline void tile(const QuantizedActivations& a, int64_t m0, const BlockMatrix& w, int64_t n0, float* out) {
  constexpr int kRegs = GROUP / 16;
  constexpr int64_t kGroupBytes = GROUP * BITS / 8, kGroupsPerLine = 64 / kGroupBytes;
  const int64_t G = a.G, M = a.M, row_bytes = BITS == 4 ? w.K / 2 : w.K;
  const uint8_t* wq = w.q + n0 * row_bytes;
  const float* ws = w.scale + n0 * G;
  const int16_t* xq = a.q.data() + m0 * GROUP;  // this group's values of row m0; rows follow
  const float* xs = a.scale.data() + m0;
  __m256 acc[NT][R];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g, xq += M * GROUP, xs += M) {
    if (g % kGroupsPerLine == 0) {
      for (int t = 0; t < NT; ++t)
        _mm_prefetch(reinterpret_cast<const char*>(wq + (NT + t) * row_bytes + g * kGroupBytes), _MM_HINT_T0);
    }
    __m256i wv[NT][kRegs];
    for (int t = 0; t < NT; ++t) load_group_i16<BITS, GROUP>(wq + t * row_bytes, g * GROUP, wv[t]);
    for (int r = 0; r < R; ++r) {
      const __m256i* xr = reinterpret_cast<const __m256i*>(xq + r * GROUP);
      const __m256i x0 = _mm256_loadu_si256(xr);
      const __m256i x1 = kRegs == 2 ? _mm256_loadu_si256(xr + 1) : x0;
      for (int t = 0; t < NT; ++t) {
        __m256i dot = _mm256_madd_epi16(wv[t][0], x0);
        if constexpr (kRegs == 2) dot = _mm256_add_epi32(dot, _mm256_madd_epi16(wv[t][1], x1));
        const __m256 s = _mm256_set1_ps(ws[t * G + g] * xs[r]);
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[t][r]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    for (int r = 0; r < R; ++r) {
      float total = hsum(acc[t][r]);
      if (w.bias != nullptr) total += dot_f32(w.bias + (n0 + t) * G, a.sum.data() + (m0 + r) * G, G);
      out[(m0 + r) * w.N + n0 + t] = total;
    }
  }
}

// NT weight rows from n0 against all M activation rows: activation rows in tiles of 4 (each
// weight group widened once per tile), the rest in one smaller tile. Weight rows outermost, so
// each is read from memory once while the activations stay in cache.
template <int BITS, int GROUP, int NT>
inline void weight_tile(const QuantizedActivations& a, int64_t M, const BlockMatrix& w, int64_t n0, float* out) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) tile<BITS, GROUP, NT, 4>(a, m0, w, n0, out);
  switch (M - m0) {
    case 1: tile<BITS, GROUP, NT, 1>(a, m0, w, n0, out); break;
    case 2: tile<BITS, GROUP, NT, 2>(a, m0, w, n0, out); break;
    case 3: tile<BITS, GROUP, NT, 3>(a, m0, w, n0, out); break;
    default: break;
  }
}

// Weight rows [begin, end) against all M activation rows.
template <int BITS, int GROUP>
void matmul_rows(const QuantizedActivations& a, int64_t M, const BlockMatrix& w, float* out, int64_t begin,
                 int64_t end) {
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) weight_tile<BITS, GROUP, 4>(a, M, w, n, out);
  for (; n < end; ++n) weight_tile<BITS, GROUP, 1>(a, M, w, n, out);
}

inline __m256 bytes_to_floats(__m128i eight_bytes_low, bool is_signed) {
  __m256i wide = is_signed ? _mm256_cvtepi8_epi32(eight_bytes_low) : _mm256_cvtepu8_epi32(eight_bytes_low);
  return _mm256_cvtepi32_ps(wide);
}

// Unpack one group of GROUP (16 or 32) columns starting at column k0 of a row into floats.
template <int BITS, int GROUP>
inline void unpack_group(const uint8_t* row, int64_t k0, __m256* w) {
  if constexpr (BITS == 4) {
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 / 2));
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(packed, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    w[0] = bytes_to_floats(lo, false);
    w[1] = bytes_to_floats(_mm_srli_si128(lo, 8), false);
    w[2] = bytes_to_floats(hi, false);
    w[3] = bytes_to_floats(_mm_srli_si128(hi, 8), false);
  } else {
    for (int i = 0; i < GROUP / 8; ++i) {
      __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k0 + 8 * i));
      w[i] = bytes_to_floats(b, true);
    }
  }
}

template <int BITS, int GROUP>
void dequantize_rows(const BlockMatrix& w, float* op, int64_t begin, int64_t end) {
  const int64_t K = w.K, G = K / GROUP, row_bytes = BITS == 4 ? K / 2 : K;
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      __m256 v[GROUP / 8];
      unpack_group<BITS, GROUP>(w.q + n * row_bytes, g * GROUP, v);
      const __m256 s = _mm256_set1_ps(w.scale[n * G + g]);
      const __m256 b = _mm256_set1_ps(w.bias != nullptr ? w.bias[n * G + g] : 0.0f);
      for (int i = 0; i < GROUP / 8; ++i) _mm256_storeu_ps(op + n * K + g * GROUP + 8 * i, _mm256_fmadd_ps(v[i], s, b));
    }
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
                         int64_t group, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(bits == 8 ? (group == 16 || group == 32) : group == 32, "unsupported group size");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == torch::kFloat32);
  const bool has_bias = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.is_contiguous() && bias.sizes() == scale.sizes()));
  const int64_t N = scale.size(0), K = scale.size(1) * group;
  TORCH_CHECK(q.numel() == N * K * bits / 8, "packed values do not match the scales' shape");
  return BlockMatrix{reinterpret_cast<const uint8_t*>(q.data_ptr()), scale.data_ptr<float>(),
                     has_bias ? bias.data_ptr<float>() : nullptr, N, K, group, static_cast<int>(bits)};
}

void block_matmul_into(const float* x, int64_t M, const BlockMatrix& w, float* out) {
  // The caller thread's buffers, named through a local reference: a lambda does not capture a
  // thread_local, so the pool's workers would otherwise see their own (empty) copies.
  static thread_local QuantizedActivations buffers;
  QuantizedActivations& a = buffers;
  quantize_activations(x, M, w.K, w.group, a);
  // Chunks of whole 4-row weight tiles; a chunk per thread unless the matrix is tiny.
  const int64_t grain = std::max<int64_t>(16, (w.N / at::get_num_threads() + 3) / 4 * 4);
  at::parallel_for(0, w.N, grain, [&](int64_t begin, int64_t end) {
    dispatch(w, [&]<int BITS, int GROUP>() { matmul_rows<BITS, GROUP>(a, M, w, out, begin, end); });
  });
}

}  // namespace lmserve

namespace {

// x [M, K] fp32, returns [M, N] fp32.
torch::Tensor block_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor bias,
                           int64_t group, int64_t bits) {
  const lmserve::BlockMatrix w = lmserve::block_matrix(q, scale, bias, group, bits);
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "activations must be fp32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K, "weight has ", w.K, " columns, input has ", x.size(-1));
  auto out = torch::empty({x.size(0), w.N}, x.options());
  lmserve::block_matmul_into(x.data_ptr<float>(), x.size(0), w, out.data_ptr<float>());
  return out;
}

// Writes the dense fp32 weight [N, K] into `out` (a reused buffer: fresh large allocations
// would page-fault on every call).
void block_dequantize(torch::Tensor q, torch::Tensor scale, torch::Tensor bias, int64_t group, int64_t bits,
                      torch::Tensor out) {
  const lmserve::BlockMatrix w = lmserve::block_matrix(q, scale, bias, group, bits);
  TORCH_CHECK(out.is_contiguous() && out.numel() == w.N * w.K && out.scalar_type() == torch::kFloat32);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.N, 16, [&](int64_t begin, int64_t end) {
    lmserve::dispatch(w, [&]<int BITS, int GROUP>() { lmserve::dequantize_rows<BITS, GROUP>(w, op, begin, end); });
  });
}

}  // namespace

namespace lmserve {
void bind_llama_decode(pybind11::module& m);  // llama_decode.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  lmserve::bind_llama_decode(m);
  // Both release the GIL (as PyTorch's own ops do), so a server's event loop runs meanwhile.
  m.def("block_matmul", &block_matmul, "x @ W^T for a block-quantized W (fp32 activations)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("block_dequantize", &block_dequantize, "dense fp32 copy of a block-quantized weight, into out",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
