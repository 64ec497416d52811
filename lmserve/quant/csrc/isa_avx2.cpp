// The AVX2 + FMA variant of the vector kernels (isa_kernels.h over 256-bit registers), and the
// dequantization every variant uses. Runs on any x86-64 CPU with AVX2 and FMA.
#include "block_kernels.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#pragma GCC target("avx2,fma,f16c")

namespace lmserve::avx2 {
namespace {

struct Vec {
  static constexpr const char* kName = "avx2";
  static constexpr const char* kLabel = "AVX2+FMA";
  static constexpr int kFloats = 8, kBlocks = 1, kTileRows = 4;
  // Matmuls past this many rows are faster as dequantize-then-fp32-GEMM (measured on Zen 3 and on
  // an AVX-512 Xeon running this variant: the kernel's crossover there is 32-64 rows).
  static constexpr int64_t kKernelMaxRows = 32;
  using F = __m256;
  using I = __m256i;

  static bool runs_here() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  // Cached K/V of the narrower types, widened to fp32 (int8 unscaled).
  static F load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F abs(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
  static F neg(F v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.0f)); }
  static F round(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static float first(F v) { return _mm256_cvtss_f32(v); }
  static bool any_equal(F a, F b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)) != 0; }

  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static float hmax(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // 2^n for integral n in the normal range.
  static F pow2(F n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }

  // v where x >= limit, else 0.
  static F zero_below(F v, F x, float limit) { return _mm256_andnot_ps(_mm256_cmp_ps(x, set1(limit), _CMP_LT_OQ), v); }

  // v rounded to the nearest integers (even on ties), stored as 8 int16.
  static void store_i16(int16_t* p, F v) {
    const __m256i i = _mm256_cvtps_epi32(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
  }

  static I izero() { return _mm256_setzero_si256(); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static I dot2(I acc, I w1, I x1, I w2, I x2) {
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(w1, x1), _mm256_madd_epi16(w2, x2)));
  }

  static I pair(const int16_t* x) {
    int32_t pair;
    std::memcpy(&pair, x, sizeof(pair));
    return _mm256_set1_epi32(pair);
  }

  // The two int16 chunks (columns 4u .. 4u+3 of the block's 8 rows) of unit u of a block's group.
  template <int BITS>
  static void load_unit(const uint8_t* group_values, int64_t, int u, I& first, I& second) {
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

  // The 8 scales or offsets from element i of a BlockMatrix array (fp16 when `half`).
  static F load_rows(const void* base, bool half, int64_t i, int64_t) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  }

  static void store_rows(float* p, F v, int64_t valid) {
    if (valid == 8) {
      _mm256_storeu_ps(p, v);
    } else {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, v);
      std::copy_n(lanes, valid, p);
    }
  }
};

}  // namespace

#include "isa_kernels.h"

namespace {

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
  const int64_t first = (block * G + g) * 8;  // this block and group's first scale
  auto value = [&](const void* base, int64_t j) {
    return w.half ? _cvtsh_ss(static_cast<const uint16_t*>(base)[first + j]) : static_cast<const float*>(base)[first + j];
  };
  for (int half = 0; half < GROUP / 16; ++half) {
    __m256i chunks[8];  // 8 chunks: columns 16 * half .. + 15
    for (int u = 0; u < 4; ++u) Vec::load_unit<BITS>(values, 0, 4 * half + u, chunks[2 * u], chunks[2 * u + 1]);
    transpose8(chunks);  // chunks[j]: row j's 16 columns as int16
    for (int64_t j = first_lane; j < end_lane; ++j) {
      float* dst = row(j) + g * GROUP + 16 * half;
      const float scale = value(w.scale, j);
      const float offset = w.bias != nullptr ? value(w.bias, j) : BITS == 4 ? -8.0f * scale : 0.0f;
      const __m256 s = _mm256_set1_ps(scale), b = _mm256_set1_ps(offset);
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(chunks[j])));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(chunks[j], 1)));
      _mm256_storeu_ps(dst, _mm256_fmadd_ps(lo, s, b));
      _mm256_storeu_ps(dst + 8, _mm256_fmadd_ps(hi, s, b));
    }
  }
}

}  // namespace

void dequantize_blocks(const BlockMatrix& w, int64_t first_row, float* out, int64_t begin, int64_t end) {
  for_format(w, [&]<int BITS, int GROUP>() {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t valid = std::min<int64_t>(8, w.N - block * 8);
      for (int64_t g = 0; g < w.groups(); ++g)
        dequantize_block_group<BITS, GROUP>(w, block, g, 0, valid,
                                            [&](int64_t j) { return out + (block * 8 + j - first_row) * w.K; });
    }
  });
}

void gather_rows(const BlockMatrix& w, const int64_t* ids, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < w.N, "row ", ids[i], " out of range");
    const int64_t block = ids[i] / 8, lane = ids[i] % 8;
    for_format(w, [&]<int BITS, int GROUP>() {
      for (int64_t g = 0; g < w.groups(); ++g)
        dequantize_block_group<BITS, GROUP>(w, block, g, lane, lane + 1, [&](int64_t) { return out + i * w.K; });
    });
  }
}

}  // namespace lmserve::avx2
