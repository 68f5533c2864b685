// Shared by the AVX2 kernels in this folder: the AVX2 target attribute and fp32 loads of
// float / bfloat16 / half data, 8 at a time (the AVX2 twin of avx512_load.h).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))

namespace unwrap_cpu {

// 8 consecutive values of T as one fp32 vector.
template <typename T> AVX2 inline __m256 load8(const T* p);
template <> AVX2 inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> AVX2 inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
template <> AVX2 inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The sum of the 8 lanes.
AVX2 inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

}  // namespace unwrap_cpu
