// Shared by the CPU kernels in this folder: the AVX512 target attribute and fp32 loads of
// float / bfloat16 / half data.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,f16c")))

namespace unwrap_cpu {

template <typename T> inline float to_float(T v) { return static_cast<float>(v); }

// 16 consecutive values of T as one fp32 vector.
template <typename T> AVX512 inline __m512 load16(const T* p);
template <> AVX512 inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> AVX512 inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
template <> AVX512 inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

}  // namespace unwrap_cpu
