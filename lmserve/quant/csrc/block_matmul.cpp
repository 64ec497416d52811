// Matmul and dequantization over block-quantized weights, for the CPU fast path.
//
// A weight [N, K] is stored as small integers per row with one fp32 scale (and optional fp32
// offset) per group of `group` consecutive columns: w[n, k] = q[n, k] * scale[n, g] + bias[n, g].
// Two storages: 4-bit (`bits` = 4, uint8 [N, K/2]; in each 32-column block byte j holds column j
// in its low nibble and column j + 16 in its high nibble, as GGUF's Q4 formats do) and 8-bit
// (`bits` = 8, int8 [N, K]). Activations enter as fp32 and are carried as int16 per group, so
// results match dequantize-then-matmul in fp32 to about 1e-5 relative. The matmul is meant for
// few rows (decode); each weight group is widened once and multiplied into up to kRowTile
// activation rows. Requires AVX2 and FMA; threads come from PyTorch's intra-op pool (OpenMP).
#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int kRowTile = 4;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 bytes_to_floats(__m128i eight_bytes_low, bool is_signed) {
  __m256i wide = is_signed ? _mm256_cvtepi8_epi32(eight_bytes_low) : _mm256_cvtepu8_epi32(eight_bytes_low);
  return _mm256_cvtepi32_ps(wide);
}

// Unpack one group of GROUP (16 or 32) columns starting at column k0 of a row into floats.
template <int BITS, int GROUP>
inline void unpack_group(const uint8_t* row, int64_t k0, __m256* w) {
  if constexpr (BITS == 4) {
    // GROUP is 32: 16 bytes, low nibbles are columns 0-15, high nibbles 16-31
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

void check(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& bias, int64_t group,
           int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(bits == 8 ? (group == 16 || group == 32) : group == 32, "unsupported group size");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == torch::kFloat32);
  TORCH_CHECK(!bias.defined() || bias.numel() == 0 || (bias.is_contiguous() && bias.sizes() == scale.sizes()));
}

}  // namespace

// The weights of one group widened to int16: 16 columns per register.
template <int BITS, int GROUP>
inline void load_group_i16(const uint8_t* row, int64_t k0, __m256i* w) {
  if constexpr (BITS == 4) {
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 / 2));
    __m128i mask = _mm_set1_epi8(0x0F);
    w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(packed, mask));                      // columns 0-15
    w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask));   // columns 16-31
  } else {
    for (int i = 0; i < GROUP / 16; ++i)
      w[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 + 16 * i)));
  }
}

// Activations are quantized to int16 per row and group (relative error 2^-16 of the group's
// largest value, far below bf16's 2^-9) so each group's dot product is integer multiply-adds
// (vpmaddwd) with one conversion to float per group instead of one per 8 weights.
template <int BITS, int GROUP>
void matmul_rows(const int16_t* xq, const float* xs, const uint8_t* qp, const float* sp, const float* bp,
                 const float* xsum, float* op, int64_t M, int64_t N, int64_t K, int64_t begin, int64_t end) {
  constexpr int kRegs = GROUP / 16;
  const int64_t G = K / GROUP, row_bytes = BITS == 4 ? K / 2 : K;
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = qp + n * row_bytes;
    const float* srow = sp + n * G;
    for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowTile, M - m0));
      // Two accumulators per row (even and odd groups) keep the FMA dependency chains short.
      __m256 acc[kRowTile][2];
      for (int r = 0; r < kRowTile; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m256i w[kRegs];
        load_group_i16<BITS, GROUP>(row, g * GROUP, w);
        for (int r = 0; r < rows; ++r) {
          const int64_t m = m0 + r;
          const __m256i* xr = reinterpret_cast<const __m256i*>(xq + m * K + g * GROUP);
          __m256i dot = _mm256_madd_epi16(w[0], _mm256_loadu_si256(xr));
          if constexpr (kRegs == 2) dot = _mm256_add_epi32(dot, _mm256_madd_epi16(w[1], _mm256_loadu_si256(xr + 1)));
          const __m256 s = _mm256_set1_ps(srow[g] * xs[m * G + g]);
          acc[r][g & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[r][g & 1]);
        }
      }
      for (int r = 0; r < rows; ++r) {
        float total = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        if (bp != nullptr) {
          const float* brow = bp + n * G;
          const float* sums = xsum + (m0 + r) * G;
          for (int64_t g = 0; g < G; ++g) total += brow[g] * sums[g];
        }
        op[(m0 + r) * N + n] = total;
      }
    }
  }
}

// x [M, K] fp32, returns [M, N] fp32.
torch::Tensor block_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor bias,
                           int64_t group, int64_t bits) {
  check(q, scale, bias, group, bits);
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "activations must be fp32");
  const int64_t M = x.size(0), K = x.size(1), N = scale.size(0), G = scale.size(1);
  TORCH_CHECK(G * group == K, "weight has ", G * group, " columns, input has ", K);
  const bool has_bias = bias.defined() && bias.numel() > 0;
  auto out = torch::empty({M, N}, x.options());
  // Per row and group: the int16 activations, their scale, and (for the offset term,
  // sum_k x * bias = bias * sum_k x) the exact fp32 sum. Plain loops: this is M x K values,
  // and a chain of small tensor ops would cost more than the matmul at batch 1.
  std::vector<int16_t> xq(M * K);
  std::vector<float> xscale(M * G), xsum(M * G);
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < M * G; ++i) {
    const float* v = xp + i * group;
    float amax = 0.0f, sum = 0.0f;
    for (int64_t k = 0; k < group; ++k) {
      amax = std::max(amax, std::abs(v[k]));
      sum += v[k];
    }
    const float scale = amax > 0.0f ? amax / 32767.0f : 1.0f;
    for (int64_t k = 0; k < group; ++k) xq[i * group + k] = static_cast<int16_t>(std::nearbyint(v[k] / scale));
    xscale[i] = scale;
    xsum[i] = sum;
  }
  const int16_t* xqp = xq.data();
  const float* xsp = xscale.data();
  const float* sp = scale.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* sums = xsum.data();
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    if (bits == 4) {
      matmul_rows<4, 32>(xqp, xsp, qp, sp, bp, sums, op, M, N, K, begin, end);
    } else if (group == 32) {
      matmul_rows<8, 32>(xqp, xsp, qp, sp, bp, sums, op, M, N, K, begin, end);
    } else {
      matmul_rows<8, 16>(xqp, xsp, qp, sp, bp, sums, op, M, N, K, begin, end);
    }
  });
  return out;
}

template <int BITS, int GROUP>
void dequantize_rows(const uint8_t* qp, const float* sp, const float* bp, float* op, int64_t K, int64_t begin,
                     int64_t end) {
  const int64_t G = K / GROUP, row_bytes = BITS == 4 ? K / 2 : K;
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      __m256 w[GROUP / 8];
      unpack_group<BITS, GROUP>(qp + n * row_bytes, g * GROUP, w);
      const __m256 s = _mm256_set1_ps(sp[n * G + g]);
      const __m256 b = _mm256_set1_ps(bp != nullptr ? bp[n * G + g] : 0.0f);
      for (int i = 0; i < GROUP / 8; ++i) _mm256_storeu_ps(op + n * K + g * GROUP + 8 * i, _mm256_fmadd_ps(w[i], s, b));
    }
  }
}

// Writes the dense fp32 weight [N, K] into `out` (a reused buffer: fresh large allocations
// would page-fault on every call).
void block_dequantize(torch::Tensor q, torch::Tensor scale, torch::Tensor bias, int64_t group, int64_t bits,
                      torch::Tensor out) {
  check(q, scale, bias, group, bits);
  const int64_t N = scale.size(0), G = scale.size(1), K = G * group;
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * K && out.scalar_type() == torch::kFloat32);
  const bool has_bias = bias.defined() && bias.numel() > 0;
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
  const float* sp = scale.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    if (bits == 4) {
      dequantize_rows<4, 32>(qp, sp, bp, op, K, begin, end);
    } else if (group == 32) {
      dequantize_rows<8, 32>(qp, sp, bp, op, K, begin, end);
    } else {
      dequantize_rows<8, 16>(qp, sp, bp, op, K, begin, end);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_matmul", &block_matmul, "x @ W^T for a block-quantized W (fp32 activations)");
  m.def("block_dequantize", &block_dequantize, "dense fp32 copy of a block-quantized weight, into out");
}
