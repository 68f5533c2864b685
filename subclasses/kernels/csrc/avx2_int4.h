// Shared by the AVX2 int4 kernels (int4_gemv_avx2.cpp, int4_gemm_avx2.cpp): the arithmetic on
// the AVX2 packing's scales and on int16/int32 lanes that both the GEMV and the GEMM need.
#pragma once
#include "avx2_load.h"

namespace unwrap_cpu {

// 8 consecutive (scale, zero) pairs as two fp32 vectors.
template <typename T> AVX2 inline void load_pairs(const T* p, __m256& s, __m256& z) {
  const __m256 a = load8(p), b = load8(p + 8);
  // shuffle_ps leaves [0 1 4 5 | 2 3 6 7]; the 64-bit permute puts the pairs of columns in order.
  s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
  z = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}

// int16 lanes [rows 0-7 | the same rows] -> int32 rows 0-7, the two halves added.
AVX2 inline __m256i widen(__m256i v) {
  return _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)),
                          _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
}

// The largest of the 8 lanes.
AVX2 inline float reduce_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// The largest |x| of 32 values held in 4 vectors (an activation block's rounding step comes from it).
AVX2 inline float abs_max32(const __m256* v) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  return reduce_max8(_mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]))));
}

// 32 int32 (4 vectors, in order) -> 32 int8, in order (the values fit: no saturation).
AVX2 inline __m256i pack32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // undo the lane interleave
}

// The codes of 4 columns of a 32-row block (64 bytes at p: A = [k | k+1], B = [k+2 | k+3]) as u8
// lanes for vpmaddubsw: unpacking the bytes of A and B pairs columns (k, k+2) in the low 128 bits and
// (k+1, k+3) in the high ones; q0 holds rows 0-7, q1 rows 8-15 (low nibbles), q2 16-23, q3 24-31.
AVX2 inline void unpack_columns(const uint8_t* p, __m256i& q0, __m256i& q1, __m256i& q2, __m256i& q3) {
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  const __m256i c = _mm256_unpacklo_epi8(a, b), d = _mm256_unpackhi_epi8(a, b);
  q0 = _mm256_and_si256(c, nibble), q1 = _mm256_and_si256(d, nibble);
  q2 = _mm256_and_si256(_mm256_srli_epi16(c, 4), nibble);
  q3 = _mm256_and_si256(_mm256_srli_epi16(d, 4), nibble);
}

// An int8 activation arranged for vpmaddubsw against the unpacked weight bytes (the GEMV's and the
// GEMM's inner loops): per 4 features k..k+3, 32 bytes holding (x[k], x[k+2]) in every int16 lane of
// the low half and (x[k+1], x[k+3]) in the high half, as the bytes pair their columns. Read as a
// memory operand there, it saves a broadcast and a shuffle per step.
AVX2 inline void arrange(const int8_t* x, int64_t k, __m256i* out) {
  const __m256i spread = _mm256_setr_epi8(0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2,  //
                                          1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3);
  for (int64_t i = 0; i < k / 4; ++i)
    _mm256_store_si256(out + i, _mm256_shuffle_epi8(_mm256_set1_epi32(*reinterpret_cast<const int32_t*>(x + 4 * i)), spread));
}

}  // namespace unwrap_cpu
