// The AVX2 (+FMA, F16C) kernel of unwrap_cpu::int4_gemv, for the packing aten makes under CPU
// capability AVX2 (subclasses/kernels/int4_packing.py): rows in blocks of 32, each block stored
// [K, 16] bytes, byte j of column k holding row j (low nibble) and row j + 16 (high nibble).
//
// Per 32 input features the activation is rounded to integers, each sum of q * x is exact in
// integer arithmetic (vpmaddubsw: u8 x s8 pairs into int16), then scaled in fp32:
// scale * sum(q x) + (zero - 8 * scale) * sum(x), with sum(x) in fp32. The activation is 15-bit
// (x16 = 256 * xh + xl, two int8 halves, as the AVX512 kernel's).
#include <ATen/Parallel.h>

#include <algorithm>

#include "avx2_int4.h"
#include "int4_gemv.h"

// Measured and dropped on a 2-core AVX2 EPYC: fp32 FMAs on dequantized codes, ~1.5x slower on
// SmolLM2's shapes (compute-bound); 8-bit activations (llama.cpp's Q8: rounding ~1/254 of the
// 32-block's largest |x|), no faster and ~15 dB less accurate (38.5 vs 53 dB in bf16).

namespace unwrap_cpu {
namespace {

using unwrap_cpu::load8;

constexpr int64_t kRows = 32;
constexpr int64_t kPrefetch = 2048;  // bytes ahead in the weight stream (as the AVX512 kernel's)
// Fewer weights than this per thread cost more in fork/join than they save: on the 2-core EPYC a
// 192x576 GEMV took 10.7 us on one thread, 12.6 us on two; 576x576 21.3 vs 17.7.
constexpr int64_t kParallelWeights = 1 << 17;
constexpr float kXMax = 127 * 256 + 127;  // so that xh = (x16 - xl) / 256 stays in int8

// out[0, 32) += s * gsum + (z - 8 s) * xsum over one group: w = (q - 8) s + z.
template <typename T> AVX2 inline void scale_group(const T* pairs, const float* gsum, float xsum, float* out) {
  const __m256 xs = _mm256_set1_ps(xsum);
  for (int i = 0; i < 4; ++i) {
    __m256 s, z;
    load_pairs<T>(pairs + 16 * i, s, z);
    const __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s, z);
    const __m256 acc = _mm256_fmadd_ps(offset, xs, _mm256_loadu_ps(out + 8 * i));
    _mm256_storeu_ps(out + 8 * i, _mm256_fmadd_ps(s, _mm256_loadu_ps(gsum + 8 * i), acc));
  }
}

// Rows [32 * block, 32 * block + 32) of y, fp32, integer dot products. Four columns are 64
// contiguous bytes A = [k | k+1], B = [k+2 | k+3]; unpacking bytes of A and B gives int16 lanes
// (column k, k+2) in the low 128 bits and (k+1, k+3) in the high ones, rows 0-7 (C) and 8-15 (D),
// high nibbles rows 16-31. vpmaddubsw against the activation arranged the same way (`arrange`, read as
// a memory operand: two registers fewer than a broadcast and shuffle here, ~0-7 % faster) sums each pair;
// 8 such steps (one 32-block) stay below 8 * 2 * 15 * 128 = 30720 in int16, exact.
template <typename T>
AVX2 void full_block_int(const uint8_t* packed, const T* sz, const __m256i* xh, const __m256i* xl, const float* xscale,
                         const float* xsum, int64_t block, int64_t n, int64_t k, int64_t group, float* out) {
  const uint8_t* p = packed + block * k * (kRows / 2);
  alignas(32) float gsum[kRows];
  for (int i = 0; i < kRows; ++i) out[i] = 0.f;
  for (int64_t g0 = 0; g0 < k; g0 += group) {
    const T* pairs = sz + ((g0 / group) * n + block * kRows) * 2;
    if (g0 + group < k) {  // the next group's scales: scattered lines, not in any stream
      for (int i = 0; i < static_cast<int>(sizeof(T)); ++i)
        _mm_prefetch(reinterpret_cast<const char*>(pairs + n * 2) + 64 * i, _MM_HINT_T0);
    }
    for (int i = 0; i < kRows; ++i) gsum[i] = 0.f;
    for (int64_t b0 = g0; b0 < g0 + group; b0 += 32) {
      __m256i h0 = _mm256_setzero_si256(), h1 = h0, h2 = h0, h3 = h0, l0 = h0, l1 = h0, l2 = h0, l3 = h0;
      for (int64_t kk = b0; kk < b0 + 32; kk += 4, p += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
        __m256i q0, q1, q2, q3;
        unpack_columns(p, q0, q1, q2, q3);
        const __m256i xa = _mm256_load_si256(xh + kk / 4);
        h0 = _mm256_add_epi16(h0, _mm256_maddubs_epi16(q0, xa));
        h1 = _mm256_add_epi16(h1, _mm256_maddubs_epi16(q1, xa));
        h2 = _mm256_add_epi16(h2, _mm256_maddubs_epi16(q2, xa));
        h3 = _mm256_add_epi16(h3, _mm256_maddubs_epi16(q3, xa));
        const __m256i xb = _mm256_load_si256(xl + kk / 4);
        l0 = _mm256_add_epi16(l0, _mm256_maddubs_epi16(q0, xb));
        l1 = _mm256_add_epi16(l1, _mm256_maddubs_epi16(q1, xb));
        l2 = _mm256_add_epi16(l2, _mm256_maddubs_epi16(q2, xb));
        l3 = _mm256_add_epi16(l3, _mm256_maddubs_epi16(q3, xb));
      }
      const __m256 a = _mm256_set1_ps(xscale[b0 / 32]);
      const __m256i hs[4] = {h0, h1, h2, h3}, ls[4] = {l0, l1, l2, l3};
      const int order[4] = {0, 8, 16, 24};  // C: rows 0-7, D: 8-15, then the high nibbles
      for (int i = 0; i < 4; ++i) {
        const __m256i total = _mm256_add_epi32(_mm256_slli_epi32(widen(hs[i]), 8), widen(ls[i]));
        float* g = gsum + order[i];
        _mm256_store_ps(g, _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(total), _mm256_load_ps(g)));
      }
    }
    scale_group<T>(pairs, gsum, xsum[g0 / group], out);
  }
}

// Per 32-block b of x (read in fp32): xscale[b] and the integers xh and xl; per group: xsum.
// Vectorized: per call this is K elements against the weight's N * K, but a scalar loop (libm
// nearbyintf per element) cost more than the GEMV itself on small weights.
template <typename T>
AVX2 void quantize_activation(const T* x, int64_t k, int64_t group, int8_t* xh, int8_t* xl, float* xscale, float* xsum) {
  for (int64_t g = 0; g < k / group; ++g) xsum[g] = 0.f;
  for (int64_t b = 0; b < k / 32; ++b) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = load8(x + 32 * b + 8 * i);
    xsum[32 * b / group] += reduce_add8(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    const float amax = abs_max32(v);
    xscale[b] = amax / kXMax;
    const __m256 inv = _mm256_set1_ps(amax > 0 ? kXMax / amax : 0.f);
    __m256i q[4], low[4];
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // to nearest even (the default rounding mode)
      low[i] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(q[i], _mm256_set1_epi32(128)), _mm256_set1_epi32(255)),
                                _mm256_set1_epi32(128));
      q[i] = _mm256_srai_epi32(_mm256_sub_epi32(q[i], low[i]), 8);  // exact: q - low is a multiple of 256
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xh + 32 * b), pack32(q[0], q[1], q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xl + 32 * b), pack32(low[0], low[1], low[2], low[3]));
  }
}

// The activation as full_block_int reads it, in this thread's buffers.
struct Activation {
  const __m256i *high, *low;
  const float *scale, *sum;
};

template <typename T> AVX2 Activation prepare_activation(const T* x, int64_t k, int64_t group) {
  float* xsum = scratch<float, 4>(k / group);
  float* xscale = scratch<float, 5>(k / 32);
  int8_t* xh = scratch<int8_t, 2>(k);
  int8_t* xl = scratch<int8_t, 3>(k);
  quantize_activation(x, k, group, xh, xl, xscale, xsum);
  // 32 bytes per 4 features, 32-byte aligned (a std::vector<__m256i> would drop the vector type's alignment).
  int8_t* arranged = scratch<int8_t, 4>(2 * 8 * k + 32);
  __m256i* ah = reinterpret_cast<__m256i*>((reinterpret_cast<uintptr_t>(arranged) + 31) & ~uintptr_t{31});
  __m256i* al = ah + k / 4;
  arrange(xh, k, ah);
  arrange(xl, k, al);
  return {ah, al, xscale, xsum};
}

}  // namespace

template <typename T>
void full_blocks_avx2(const T* x, int64_t k, int64_t group, const std::vector<Weight<T>>& weights, T* y) {
  const BlockIndex blocks(weights, kRows);
  const int64_t grain = std::max<int64_t>(1, kParallelWeights / (kRows * k));
  at::parallel_for(0, blocks.total(), grain, [&](int64_t begin, int64_t end) {
    // Each thread quantizes and arranges x itself (~1 us at K = 576) in its own cache: read from the
    // calling thread's, the arranged copy (8x x's bytes) crossed cores at every block of the other thread.
    const Activation a = prepare_activation(x, k, group);
    alignas(32) float rows[kRows];
    for (int64_t b = begin; b < end; ++b) {
      const size_t i = blocks.weight(b);
      const Weight<T>& w = weights[i];
      const int64_t local = b - blocks.first[i];
      full_block_int<T>(w.packed, w.scale_and_zero, a.high, a.low, a.scale, a.sum, local, w.n, k, group, rows);
      T* out = y + w.offset + local * kRows;  // converted here, in parallel: lm_head's 49152 rows were ~1 % of a token
      for (int r = 0; r < kRows; ++r) out[r] = static_cast<T>(rows[r]);
    }
  });
}

template void full_blocks_avx2<float>(const float*, int64_t, int64_t, const std::vector<Weight<float>>&, float*);
template void full_blocks_avx2<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t,
                                              const std::vector<Weight<c10::BFloat16>>&, c10::BFloat16*);
template void full_blocks_avx2<c10::Half>(const c10::Half*, int64_t, int64_t, const std::vector<Weight<c10::Half>>&,
                                          c10::Half*);

AVX2 int64_t read_lines_avx2(const char* base, int64_t begin, int64_t end) {
  __m256i acc = _mm256_setzero_si256();
  for (int64_t i = begin; i < end; ++i) {
    _mm_prefetch(base + i * 64 + kPrefetch, _MM_HINT_T0);
    acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + i * 64)));
    acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + i * 64 + 32)));
  }
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

}  // namespace unwrap_cpu
