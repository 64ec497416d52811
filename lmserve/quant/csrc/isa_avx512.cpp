// The AVX-512 variant of the vector kernels (isa_kernels.h over 512-bit registers): VNNI's
// vpdpwssd multiplies and adds the int16 pairs of two weight blocks (16 rows) per instruction.
// Chosen only where CPUID reports AVX-512 F, BW, VL and VNNI and the OS saves the registers.
#include "block_kernels.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")

namespace lmserve::avx512 {
namespace {

struct Vec {
  static constexpr const char* kName = "avx512";
  static constexpr const char* kLabel = "AVX-512 VNNI";
  static constexpr int kFloats = 16, kBlocks = 2, kTileRows = 8;
  // Matmuls past this many rows are faster as dequantize-then-fp32-GEMM: on a 2-core Xeon the kernel
  // took 0.74x / 0.85x / 0.96x the slab GEMM's time at 128 / 512 / 1024 rows of SmolLM2's layers.
  static constexpr int64_t kKernelMaxRows = 512;
  using F = __m512;
  using I = __m512i;

  static bool runs_here() {
    __builtin_cpu_init();  // libgcc's CPUID reading also checks (XGETBV) that the OS saves the registers
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  // Cached K/V of the narrower types, widened to fp32 (int8 unscaled).
  static F load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static F load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F abs(F v) { return _mm512_abs_ps(v); }
  static F neg(F v) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN))); }
  static F round(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static float first(F v) { return _mm512_cvtss_f32(v); }
  static bool any_equal(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ) != 0; }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }

  // 2^n for integral n in the normal range.
  static F pow2(F n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }

  // v where x >= limit (or unordered), else 0.
  static F zero_below(F v, F x, float limit) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(limit), _CMP_NLT_UQ), v); }

  // v rounded to the nearest integers (even on ties), stored as 16 int16 (|v| <= 32767 here).
  static void store_i16(int16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(v)));
  }

  static I izero() { return _mm512_setzero_si512(); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static I dot2(I acc, I w1, I x1, I w2, I x2) { return _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc, w1, x1), w2, x2); }

  static I pair(const int16_t* x) {
    int32_t pair;
    std::memcpy(&pair, x, sizeof(pair));
    return _mm512_set1_epi32(pair);
  }

  // Unit u of a group of the block at `group_values` and of the block `next` bytes on: the two
  // chunks (columns 4u .. 4u+3 of the 8 rows) of the first block in the lower 256 bits, the second
  // block's in the upper 256.
  template <int BITS>
  static void load_unit(const uint8_t* group_values, int64_t next, int u, I& first, I& second) {
    if constexpr (BITS == 4) {
      // Each block's 16 bytes in two 128-bit lanes; low nibbles from the even lanes, high from the
      // odd ones, then widen.
      const __m256i a = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group_values + 16 * u)));
      const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group_values + next + 16 * u)));
      const __m512i packed = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4);
      const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi32(packed, shifts), _mm512_set1_epi8(0x0F));
      first = _mm512_unpacklo_epi8(nibbles, _mm512_setzero_si512());
      second = _mm512_unpackhi_epi8(nibbles, _mm512_setzero_si512());
    } else {
      const uint8_t* p = group_values + 32 * u;
      auto both = [&](int64_t offset) {
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + offset));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + next + offset));
        return _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
      };
      first = both(0);
      second = both(16);
    }
  }

  // The 8 scales or offsets from element i of a BlockMatrix array (fp16 when `half`) and the 8
  // from element i + next.
  static F load_rows(const void* base, bool half, int64_t i, int64_t next) {
    if (half) {
      const uint16_t* p = static_cast<const uint16_t*>(base) + i;
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + next));
      return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
    }
    const float* p = static_cast<const float*>(base) + i;
    const __m512d lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(p)));
    return _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_loadu_ps(p + next)), 1));
  }

  static void store_rows(float* p, F v, int64_t valid) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << valid) - 1), v);
  }
};

}  // namespace

#include "isa_kernels.h"

}  // namespace lmserve::avx512
