// The vector kernels of every instruction-set variant, written once against `Vec` (see
// block_kernels.h). isa_avx2.cpp and isa_avx512.cpp each define `Vec` under their
// `#pragma GCC target` and include this file inside their own namespace, so it has no include
// guard; it ends with that variant's `kernels` table.
//
// Vec has floats `F` (kFloats lanes) and the int32 dot products `I` of kBlocks weight blocks of 8
// rows (kFloats = 8 * kBlocks: lane i of a dot product belongs to weight row 8 * block + i), the
// element-wise operations used below, and for the block layout: load_unit (a unit of kBlocks
// consecutive blocks, given the byte offset from one block's data to the next's, 0 to read the
// same block again), dot2 (int16 pair products added into int32 lanes), iadd, load_rows /
// store_rows (per-row scales, offsets or outputs of kBlocks blocks, stores cut at `valid` rows)
// and kTileRows (activation rows per tile of the matmul).
//
// Matmul: activations enter as fp32 and are carried as int16 per row and group (relative error
// 2^-16 of the group's largest value, far below bf16's 2^-9), so a group's dot products are exact
// integer multiply-adds (8 or 16 weight rows per instruction) with one conversion to float per
// group; results match dequantize-then-matmul in fp32 to about 1e-5 relative, and the variants
// give the same int32 sums and the same per-group float arithmetic.

namespace {

using V = Vec;
using F = Vec::F;
using I = Vec::I;

// e^x (Cephes' expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp). Inputs below -87.3
// give 0, the way expf underflows.
inline F exp_v(F x) {
  x = V::min(x, V::set1(88.3762626647949f));
  const F unclamped = x;
  x = V::max(x, V::set1(-87.3365447505531f));
  const F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  F r = V::fnmadd(n, V::set1(0.693359375f), x);
  r = V::fnmadd(n, V::set1(-2.12194440e-4f), r);
  F p = V::set1(1.9875691500e-4f);
  p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
  p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
  p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
  p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
  p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
  p = V::fmadd(p, V::mul(r, r), V::add(r, V::set1(1.0f)));
  return V::zero_below(V::mul(p, V::pow2(n)), unclamped, -87.3365447505531f);
}

inline float exp1(float x) { return V::first(exp_v(V::set1(x))); }

// The storage of one cached value (or LoRA factor) of each KvType, and its loads as fp32 (a register's worth, or
// one value). An int8 value is loaded unscaled: the caller applies its token's scale once per dot
// product or weight.
template <KvType T> struct KvElement { using type = float; };
template <> struct KvElement<KvType::kBF16> { using type = uint16_t; };
template <> struct KvElement<KvType::kF16> { using type = uint16_t; };
template <> struct KvElement<KvType::kI8> { using type = int8_t; };

template <KvType T>
inline F load_kv(const typename KvElement<T>::type* p) {
  if constexpr (T == KvType::kF32) return V::load(p);
  else if constexpr (T == KvType::kBF16) return V::load_bf16(p);
  else if constexpr (T == KvType::kF16) return V::load_f16(p);
  else return V::load_i8(p);
}

template <KvType T>
inline float kv_value(const typename KvElement<T>::type* p) {
  if constexpr (T == KvType::kBF16) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    return x;
  } else if constexpr (T == KvType::kF16) {
    return _cvtsh_ss(*p);
  } else {
    return static_cast<float>(*p);
  }
}

// sum_i a[i] * b[i] for fp32 a and b stored as T (fp32 or bf16), in a fixed order (four
// interleaved kFloats-lane sums, then the tail): four chains, since one would wait on each fused
// multiply-add's latency.
template <KvType T>
float dot_typed(const float* a, const typename KvElement<T>::type* b, int64_t n) {
  F acc0 = V::zero(), acc1 = V::zero(), acc2 = V::zero(), acc3 = V::zero();
  int64_t i = 0;
  for (; i + 4 * V::kFloats <= n; i += 4 * V::kFloats) {
    acc0 = V::fmadd(V::load(a + i), load_kv<T>(b + i), acc0);
    acc1 = V::fmadd(V::load(a + i + V::kFloats), load_kv<T>(b + i + V::kFloats), acc1);
    acc2 = V::fmadd(V::load(a + i + 2 * V::kFloats), load_kv<T>(b + i + 2 * V::kFloats), acc2);
    acc3 = V::fmadd(V::load(a + i + 3 * V::kFloats), load_kv<T>(b + i + 3 * V::kFloats), acc3);
  }
  for (; i + V::kFloats <= n; i += V::kFloats) acc0 = V::fmadd(V::load(a + i), load_kv<T>(b + i), acc0);
  float total = V::hsum(V::add(V::add(acc0, acc1), V::add(acc2, acc3)));
  for (; i < n; ++i) total += a[i] * kv_value<T>(b + i);
  return total;
}

// y[i] += sum_j coef[j] * rows[j * stride + i] for i < n, rows stored as T (fp32 or bf16): the
// terms summed in registers, four vectors of y at a time, so y is read and written once whatever
// the count.
template <KvType T>
void add_combination_typed(const float* coef, int64_t count, const typename KvElement<T>::type* rows, int64_t stride,
                           float* y, int64_t n) {
  constexpr int64_t W = 4 * V::kFloats;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    F acc0 = V::load(y + i), acc1 = V::load(y + i + V::kFloats), acc2 = V::load(y + i + 2 * V::kFloats),
      acc3 = V::load(y + i + 3 * V::kFloats);
    for (int64_t j = 0; j < count; ++j) {
      const F c = V::set1(coef[j]);
      const auto* r = rows + j * stride + i;
      acc0 = V::fmadd(c, load_kv<T>(r), acc0);
      acc1 = V::fmadd(c, load_kv<T>(r + V::kFloats), acc1);
      acc2 = V::fmadd(c, load_kv<T>(r + 2 * V::kFloats), acc2);
      acc3 = V::fmadd(c, load_kv<T>(r + 3 * V::kFloats), acc3);
    }
    V::store(y + i, acc0);
    V::store(y + i + V::kFloats, acc1);
    V::store(y + i + 2 * V::kFloats, acc2);
    V::store(y + i + 3 * V::kFloats, acc3);
  }
  for (; i + V::kFloats <= n; i += V::kFloats) {
    F acc = V::load(y + i);
    for (int64_t j = 0; j < count; ++j) acc = V::fmadd(V::set1(coef[j]), load_kv<T>(rows + j * stride + i), acc);
    V::store(y + i, acc);
  }
  for (; i < n; ++i)
    for (int64_t j = 0; j < count; ++j) y[i] += coef[j] * kv_value<T>(rows + j * stride + i);
}

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
  for (int64_t mg = 0; mg < M * G; ++mg) {
    const float* v = x + mg * group;
    F amax = V::zero(), sum = V::zero();
    for (int64_t k = 0; k < group; k += V::kFloats) {
      const F xv = V::load(v + k);
      amax = V::max(amax, V::abs(xv));
      sum = V::add(sum, xv);
    }
    const float top = V::hmax(amax);
    const float scale = top > 0.0f ? top / 32767.0f : 1.0f;
    const F inv = V::set1(1.0f / scale);
    for (int64_t k = 0; k < group; k += V::kFloats) V::store_i16(a.q.data() + mg * group + k, V::mul(V::load(v + k), inv));
    a.scale[mg] = scale;
    a.sum[mg] = V::hsum(sum);
  }
}

// Outputs of the kBlocks weight blocks from `block` (past the last block, the last is read again
// and its outputs dropped) for R activation rows from m0. Per row and group the dot products are
// exact int32 sums, then scaled and added to that output's fp32 accumulator in group order: an
// output depends only on its own weight row and activation row.
template <int BITS, int GROUP, int R>
inline void tile(const QuantizedActivations& a, int64_t m0, const BlockMatrix& w, int64_t block, float* out) {
  const int64_t G = w.groups(), K = w.K, group_bytes = w.group_bytes();
  const bool has_next = block + 1 < w.blocks();
  const int64_t next_values = has_next ? G * group_bytes : 0, next_rows = has_next ? G * 8 : 0;
  const uint8_t* wq = w.q + block * G * group_bytes;
  const int64_t first_scale = block * G * 8;
  // Offsets per group: stored, or -8 * scale for centred 4-bit values, or none.
  const bool has_offset = w.bias != nullptr || BITS == 4;
  const int16_t* xq = a.q.data() + m0 * K;
  const float* xs = a.scale.data() + m0 * G;
  const float* xsum = a.sum.data() + m0 * G;
  // Independent int32 sums per row: with few rows, registers are free and the latency of one
  // chain of multiply-adds would bound the loop.
  constexpr int S = 4 * R <= V::kTileRows ? 2 : 1;
  F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V::zero();
  const int64_t block_values = G * group_bytes;  // from one block's values to the next's
  for (int64_t g = 0; g < G; ++g, wq += group_bytes) {
    // This group of the next tile's blocks, so that their reads from memory overlap this tile's
    // work (with many rows a tile computes long enough to hide them entirely).
    for (int b = V::kBlocks; b < 2 * V::kBlocks; ++b)
      for (int64_t line = 0; line < group_bytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wq + b * block_values + line), _MM_HINT_T0);
    I dot[R][S];
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < S; ++s) dot[r][s] = V::izero();
    for (int u = 0; u < GROUP / 4; ++u) {
      I first, second;
      V::template load_unit<BITS>(wq, next_values, u, first, second);
      for (int r = 0; r < R; ++r) {
        const int16_t* x = xq + r * K + g * GROUP + 4 * u;
        dot[r][u % S] = V::dot2(dot[r][u % S], first, V::pair(x), second, V::pair(x + 2));
      }
    }
    const F scale = V::load_rows(w.scale, w.half, first_scale + 8 * g, next_rows);
    const F offset = w.bias != nullptr ? V::load_rows(w.bias, w.half, first_scale + 8 * g, next_rows)
                                       : V::mul(scale, V::set1(-8.0f));
    for (int r = 0; r < R; ++r) {
      if constexpr (S == 2) dot[r][0] = V::iadd(dot[r][0], dot[r][1]);
      acc[r] = V::fmadd(V::to_float(dot[r][0]), V::mul(scale, V::set1(xs[r * G + g])), acc[r]);
      if (has_offset) acc[r] = V::fmadd(offset, V::set1(xsum[r * G + g]), acc[r]);
    }
  }
  const int64_t n0 = block * 8, valid = std::min<int64_t>(V::kFloats, w.N - n0);
  for (int r = 0; r < R; ++r) V::store_rows(out + (m0 + r) * w.N + n0, acc[r], valid);
}

// The last `rows` (< kTileRows) activation rows from m0, in one tile of that height.
template <int BITS, int GROUP, int R = V::kTileRows - 1>
inline void tile_rest(int64_t rows, const QuantizedActivations& a, int64_t m0, const BlockMatrix& w, int64_t block,
                      float* out) {
  if constexpr (R > 0) {
    if (rows == R) {
      tile<BITS, GROUP, R>(a, m0, w, block, out);
    } else {
      tile_rest<BITS, GROUP, R - 1>(rows, a, m0, w, block, out);
    }
  }
}

// Tiles of kBlocks weight blocks [begin, end) against all M activation rows, kTileRows rows at a
// time (the blocks stay in L1 while the row tiles pass over them).
template <int BITS, int GROUP>
void matmul_tiles(const QuantizedActivations& a, int64_t M, const BlockMatrix& w, float* out, int64_t begin,
                  int64_t end) {
  for (int64_t block = begin * V::kBlocks; block < end * V::kBlocks; block += V::kBlocks) {
    int64_t m0 = 0;
    for (; m0 + V::kTileRows <= M; m0 += V::kTileRows) tile<BITS, GROUP, V::kTileRows>(a, m0, w, block, out);
    tile_rest<BITS, GROUP>(M - m0, a, m0, w, block, out);
  }
}

// Calls f.template operator()<BITS, GROUP>() for the matrix's storage.
template <typename Fn>
void for_format(const BlockMatrix& w, Fn&& f) {
  if (w.bits == 4) {
    f.template operator()<4, 32>();
  } else if (w.group == 32) {
    f.template operator()<8, 32>();
  } else {
    f.template operator()<8, 16>();
  }
}

void matmul(const float* x, int64_t M, const BlockMatrix& w, float* out) {
  // The caller thread's buffers, named through a local reference: a lambda does not capture a
  // thread_local, so the pool's workers would otherwise see their own (empty) copies.
  static thread_local QuantizedActivations buffers;
  QuantizedActivations& a = buffers;
  quantize_activations(x, M, w.K, w.group, a);
  // About 8 chunks per thread, so a thread that falls behind hands work to the others.
  const int64_t tiles = (w.blocks() + V::kBlocks - 1) / V::kBlocks;
  const int64_t chunk = std::max<int64_t>(1, tiles / (8 * at::get_num_threads()));
  parallel_chunks(tiles, chunk, [&](int64_t begin, int64_t end) {
    for_format(w, [&]<int BITS, int GROUP>() { matmul_tiles<BITS, GROUP>(a, M, w, out, begin, end); });
  });
}

void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  const float inv = 1.0f / std::sqrt(dot_typed<KvType::kF32>(x, x, n) / static_cast<float>(n) + eps);
  const F scale = V::set1(inv);
  int64_t i = 0;
  for (; i + V::kFloats <= n; i += V::kFloats) V::store(y + i, V::mul(V::mul(V::load(x + i), scale), V::load(w + i)));
  for (; i < n; ++i) y[i] = x[i] * inv * w[i];
}

void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  const F one = V::set1(1.0f);
  int64_t i = 0;
  for (; i + V::kFloats <= n; i += V::kFloats) {
    const F g = V::load(gate + i);
    const F sigmoid = V::div(one, V::add(one, exp_v(V::neg(g))));
    V::store(out + i, V::mul(V::mul(g, sigmoid), V::load(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + exp1(-gate[i])) * up[i];
}

// gelu_tanh(x) = x / (1 + e^(-2u)), u = sqrt(2/pi) * (x + 0.044715 x^3): the tanh form of
// F.gelu(approximate="tanh"), since 0.5 * (1 + tanh(u)) = 1 / (1 + e^(-2u)).
void gelu_tanh_mul(const float* gate, const float* up, int64_t n, float* out) {
  constexpr float kTwoSqrt2OverPi = 1.5957691216057308f, kCubic = 0.044715f;
  const F one = V::set1(1.0f);
  int64_t i = 0;
  for (; i + V::kFloats <= n; i += V::kFloats) {
    const F x = V::load(gate + i);
    const F u2 = V::mul(V::set1(kTwoSqrt2OverPi), V::fmadd(V::mul(V::set1(kCubic), x), V::mul(x, x), x));
    F y = V::div(x, V::add(one, exp_v(V::neg(u2))));
    if (up != nullptr) y = V::mul(y, V::load(up + i));
    V::store(out + i, y);
  }
  for (; i < n; ++i) {
    const float x = gate[i], u2 = kTwoSqrt2OverPi * (x + kCubic * x * x * x);
    out[i] = x / (1.0f + exp1(-u2)) * (up != nullptr ? up[i] : 1.0f);
  }
}

// softmax weights exp(scores[i] - max) in place over [first, n); returns their sum.
float exponentiate(float* scores, int64_t first, int64_t n, float max_score) {
  const F shift = V::set1(max_score);
  F sum = V::zero();
  int64_t p = first;
  for (; p + V::kFloats <= n; p += V::kFloats) {
    const F e = exp_v(V::sub(V::load(scores + p), shift));
    V::store(scores + p, e);
    sum = V::add(sum, e);
  }
  float total = V::hsum(sum);
  for (; p < n; ++p) total += (scores[p] = exp1(scores[p] - max_score));
  return total;
}

// One KV head's cached rows as typed pointers: row(slot) is that slot's values, scale(slot) its
// int8 scale (1 for the other types, which need none).
template <KvType T>
struct KvRows {
  using E = typename KvElement<T>::type;
  const E* data;
  const float* scales;
  int64_t stride, scale_stride;

  explicit KvRows(const KvHead& h)
      : data(static_cast<const E*>(h.data)), scales(h.scales), stride(h.row), scale_stride(h.scale_row) {}
  const E* row(int64_t slot) const { return data + slot * stride; }
  float scale(int64_t slot) const {
    if constexpr (T == KvType::kI8) return scales[slot * scale_stride];
    else return 1.0f;
  }
};

// Requests the cache lines of one head's cached row: slots scatter rows over the cache, so the
// hardware prefetcher does not see them coming and each row would otherwise stall on memory.
template <int BYTES, _mm_hint HINT = _MM_HINT_T0>
inline void prefetch_row(const void* row) {
  for (int i = 0; i < BYTES; i += 64) _mm_prefetch(static_cast<const char*>(row) + i, HINT);
}

constexpr int64_t kPrefetchKeys = 16;  // how many positions ahead rows are requested

// Attention of one head for a head_dim the registers divide: four keys at a time so their dot
// products are independent FMA chains; the output stays in registers across positions.
template <int D, KvType T>
void attend_head(const float* q, const KvRows<T>& k, const KvRows<T>& v, const int64_t* slots, int64_t first,
                 int64_t n, float scale, float* scores, float* out) {
  static_assert(D % V::kFloats == 0 && D > 0, "head_dim must be a multiple of the register width");
  constexpr int C = D / V::kFloats;
  constexpr int kRowBytes = D * sizeof(typename KvRows<T>::E);
  using E = typename KvRows<T>::E;
  F qv[C];
  for (int c = 0; c < C; ++c) qv[c] = V::load(q + V::kFloats * c);
  float max_score = -std::numeric_limits<float>::infinity();
  int64_t p = first;
  for (; p + 4 <= n; p += 4) {
    const E* key[4];
    F acc[4];
    for (int j = 0; j < 4; ++j) {
      if (p + j + kPrefetchKeys < n) {
        prefetch_row<kRowBytes>(k.row(slots[p + j + kPrefetchKeys]));
        prefetch_row<kRowBytes, _MM_HINT_T1>(v.row(slots[p + j + kPrefetchKeys]));  // for the weighted sum
      }
      key[j] = k.row(slots[p + j]);
      acc[j] = V::mul(qv[0], load_kv<T>(key[j]));
    }
    for (int c = 1; c < C; ++c)
      for (int j = 0; j < 4; ++j) acc[j] = V::fmadd(qv[c], load_kv<T>(key[j] + V::kFloats * c), acc[j]);
    for (int j = 0; j < 4; ++j)
      max_score = std::max(max_score, scores[p + j] = V::hsum(acc[j]) * k.scale(slots[p + j]) * scale);
  }
  for (; p < n; ++p) {
    const E* key = k.row(slots[p]);
    F acc = V::mul(qv[0], load_kv<T>(key));
    for (int c = 1; c < C; ++c) acc = V::fmadd(qv[c], load_kv<T>(key + V::kFloats * c), acc);
    max_score = std::max(max_score, scores[p] = V::hsum(acc) * k.scale(slots[p]) * scale);
  }
  const F inv_total = V::set1(1.0f / exponentiate(scores, first, n, max_score));
  F o[C];
  for (int c = 0; c < C; ++c) o[c] = V::zero();
  for (p = first; p < std::min(n, first + kPrefetchKeys); ++p) prefetch_row<kRowBytes>(v.row(slots[p]));
  for (p = first; p < n; ++p) {
    if (p + kPrefetchKeys < n) prefetch_row<kRowBytes>(v.row(slots[p + kPrefetchKeys]));
    const E* value = v.row(slots[p]);
    const F w = V::set1(scores[p] * v.scale(slots[p]));
    for (int c = 0; c < C; ++c) o[c] = V::fmadd(w, load_kv<T>(value + V::kFloats * c), o[c]);
  }
  for (int c = 0; c < C; ++c) V::store(out + V::kFloats * c, V::mul(o[c], inv_total));
}

// The same for any head_dim, plainly.
template <KvType T>
void attend_head_any(const float* q, const KvRows<T>& k, const KvRows<T>& v, const int64_t* slots, int64_t first,
                     int64_t n, int64_t dim, float scale, float* scores, float* out) {
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t p = first; p < n; ++p) {
    const auto* key = k.row(slots[p]);
    float dot = 0.0f;
    for (int64_t d = 0; d < dim; ++d) dot += q[d] * kv_value<T>(key + d);
    max_score = std::max(max_score, scores[p] = dot * k.scale(slots[p]) * scale);
  }
  const float total = exponentiate(scores, first, n, max_score);
  std::fill_n(out, dim, 0.0f);
  for (int64_t p = first; p < n; ++p) {
    const auto* value = v.row(slots[p]);
    const float w = scores[p] * v.scale(slots[p]) / total;
    for (int64_t d = 0; d < dim; ++d) out[d] += w * kv_value<T>(value + d);
  }
}

template <KvType T>
void attend_typed(const float* q, const KvHead& kh, const KvHead& vh, const int64_t* slots, int64_t first, int64_t n,
                  int64_t dim, float scale, float* scores, float* out) {
  const KvRows<T> k(kh), v(vh);
  switch (dim) {
    case 16: attend_head<16, T>(q, k, v, slots, first, n, scale, scores, out); break;
    case 32: attend_head<32, T>(q, k, v, slots, first, n, scale, scores, out); break;
    case 64: attend_head<64, T>(q, k, v, slots, first, n, scale, scores, out); break;
    case 128: attend_head<128, T>(q, k, v, slots, first, n, scale, scores, out); break;
    case 256: attend_head<256, T>(q, k, v, slots, first, n, scale, scores, out); break;
    default: attend_head_any<T>(q, k, v, slots, first, n, dim, scale, scores, out);
  }
}

void attend(const float* q, const KvHead& k, const KvHead& v, const int64_t* slots, int64_t first, int64_t n,
            int64_t dim, float scale, float* scores, float* out) {
  switch (k.type) {
    case KvType::kF32: attend_typed<KvType::kF32>(q, k, v, slots, first, n, dim, scale, scores, out); break;
    case KvType::kBF16: attend_typed<KvType::kBF16>(q, k, v, slots, first, n, dim, scale, scores, out); break;
    case KvType::kF16: attend_typed<KvType::kF16>(q, k, v, slots, first, n, dim, scale, scores, out); break;
    case KvType::kI8: attend_typed<KvType::kI8>(q, k, v, slots, first, n, dim, scale, scores, out); break;
  }
}

std::pair<int64_t, float> argmax_logsumexp(const float* x, int64_t n) {
  F top = V::set1(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + V::kFloats <= n; i += V::kFloats) top = V::max(top, V::load(x + i));
  float max_value = V::hmax(top);
  for (; i < n; ++i) max_value = std::max(max_value, x[i]);
  // The first register's worth holding the maximum, then its first lane.
  const F target = V::set1(max_value);
  int64_t index = 0;
  while (index + V::kFloats <= n && !V::any_equal(V::load(x + index), target)) index += V::kFloats;
  while (x[index] != max_value) ++index;
  F sum = V::zero();
  for (i = 0; i + V::kFloats <= n; i += V::kFloats) sum = V::add(sum, exp_v(V::sub(V::load(x + i), target)));
  float total = V::hsum(sum);
  for (; i < n; ++i) total += exp1(x[i] - max_value);
  return {index, max_value + std::log(total)};
}

}  // namespace

const IsaKernels kernels = {V::kName,          V::kLabel,        V::kKernelMaxRows, &V::runs_here,
                            &matmul,           &rms_norm,        &silu_mul,         &gelu_tanh_mul,
                            &attend,           &argmax_logsumexp, &dot_typed<KvType::kF32>,
                            &dot_typed<KvType::kBF16>, &add_combination_typed<KvType::kF32>,
                            &add_combination_typed<KvType::kBF16>};
