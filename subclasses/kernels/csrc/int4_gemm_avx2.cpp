// unwrap_cpu::int4_gemm: y [M, N] = x [M, K] @ W^T for several activation rows (a prompt), on AVX2,
// for the int4 weight in the packing aten makes under CPU capability AVX2 (int4_gemv_avx2.cpp
// describes it): rows in blocks of 32, each block [K, 16] bytes.
//
// Integer arithmetic, as llama.cpp's prompt path on AVX2: each activation row is rounded to int8
// per 32 features (scale = the block's largest |x| / 127, llama.cpp's Q8_0), and each sum of q * x
// over 32 features is exact in int16 (vpmaddubsw: u8 x s8 pairs; 8 steps stay below 8 * 2 * 15 *
// 127 = 30480). The fp32 work is per 32 features: the block's scale, then per group the weight's
// scale and zero. So y is exactly W_dequantized @ x_rounded: the only error is x's rounding to
// 8 bits (~45 dB on Gaussian rows; less where a block holds an outlier). Two activation rows share
// every unpacked weight register: at M = 512 this is 1.4-1.7x faster than dequantize + an fp32 GEMM, at
// M = 2-64 ~2x faster than aten's int4 kernel, on a 2-core AVX2 EPYC (docs/decoding.md, Prefill).
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "aoti_shim.h"
#include "avx2_int4.h"
#include "int4_gemv.h"

namespace {

using namespace unwrap_cpu;

constexpr int64_t kRows = 32;   // weight rows per packed block
constexpr int64_t kPanel = 32;  // activation rows whose int8 copy is read from L2 across weight blocks
constexpr int64_t kPrefetch = 2048;  // bytes ahead in the weight stream (the GEMVs')

// One activation row as int8 per 32-block: q [K], scale [K/32], and per weight group the sum of
// scale * sum(q) over its blocks (the zero's term: the rounded x's sum, so y stays exact for it).
template <typename T>
AVX2 void quantize_row(const T* x, int64_t k, int64_t group, int8_t* q, float* scale, float* group_sum) {
  for (int64_t g = 0; g < k / group; ++g) group_sum[g] = 0.f;
  for (int64_t b = 0; b < k / 32; ++b) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = load8<T>(x + 32 * b + 8 * i);
    const float amax = abs_max32(v);
    const __m256 inv = _mm256_set1_ps(amax > 0 ? 127.f / amax : 0.f);
    __m256i r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // to nearest even
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
    scale[b] = amax / 127.f;
    group_sum[32 * b / group] += scale[b] * reduce_add8(_mm256_cvtepi32_ps(sum));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), pack32(r[0], r[1], r[2], r[3]));
  }
}

// out[0, 8) += weight_scale[0, 8) * x_scale * (the int16 lanes of acc, the two halves added).
AVX2 inline void add_block(__m256i acc, const float* weight_scale, float x_scale, float* out) {
  const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(weight_scale), _mm256_set1_ps(x_scale));
  _mm256_store_ps(out, _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(widen(acc)), _mm256_load_ps(out)));
}

// out[0, 32) += offset[0, 32) * x_group_sum: the zero's term of one group, w = (q - 8) s + z.
AVX2 inline void add_group(const float* offset, float x_group_sum, float* out) {
  const __m256 xs = _mm256_set1_ps(x_group_sum);
  for (int i = 0; i < 4; ++i)
    _mm256_store_ps(out + 8 * i, _mm256_fmadd_ps(_mm256_loadu_ps(offset + 8 * i), xs, _mm256_load_ps(out + 8 * i)));
}

// One weight block's scales in fp32, [K/g, 32] each: scale, and offset = zero - 8 * scale (w = q * scale +
// offset). Converted per task from the [K/g, N, 2] pairs: K/g * 32 pairs, against the task's 32 * rows * K
// multiply-adds (converting the whole weight once per call instead cost as much as the products at M = 4).
template <typename T>
AVX2 void block_scales(const T* sz, int64_t n, int64_t n0, int64_t groups, float* scale, float* offset) {
  for (int64_t g = 0; g < groups; ++g) {
    for (int i = 0; i < 4; ++i) {
      __m256 s, z;
      load_pairs<T>(sz + (g * n + n0) * 2 + 16 * i, s, z);
      _mm256_store_ps(scale + g * kRows + 8 * i, s);
      _mm256_store_ps(offset + g * kRows + 8 * i, _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s, z));
    }
  }
}

// Requests the [K/g] scattered lines of a weight block's scales (block_scales reads them) while the
// tiles of the block before it compute: read cold, they stalled block_scales on memory once per group.
template <typename T> AVX2 void prefetch_block_scales(const T* sz, int64_t n, int64_t n0, int64_t groups) {
  for (int64_t g = 0; g < groups; ++g) {
    const char* line = reinterpret_cast<const char*>(sz + (g * n + n0) * 2);
    for (int i = 0; i < static_cast<int>(sizeof(T)); ++i) _mm_prefetch(line + 64 * i, _MM_HINT_T0);
  }
}

// out[r][0, 32) (fp32) for R = 1 or 2 activation rows (arranged, see avx2_int4.h) and the weight
// block of rows [n0, n0 + 32), its 4 columns at a time unpacked as the GEMV's (unpack_columns); named
// accumulators, not arrays, keep gcc from spilling them.
template <int R>
AVX2 void tile(const uint8_t* block, const float* w_scale, const float* w_offset, const __m256i* const* x,
               const float* const* x_scale, const float* const* x_group_sum, int64_t k, int64_t group,
               float (*out)[kRows]) {
  for (int r = 0; r < R; ++r) std::fill(out[r], out[r] + kRows, 0.f);
  const uint8_t* p = block;
  for (int64_t b0 = 0; b0 < k; b0 += 32) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    const __m256i* x0 = x[0] + b0 / 4;
    const __m256i* x1 = x[R - 1] + b0 / 4;
    for (int step = 0; step < 8; ++step, p += 64) {
      // A few rows (a batch's decode step) stream the weight from memory, as the GEMV does: its prefetch
      // distance. Many rows re-read each block from L2 and do not need it.
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
      __m256i q0, q1, q2, q3;
      unpack_columns(p, q0, q1, q2, q3);
      a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(q0, x0[step]));
      a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(q1, x0[step]));
      a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(q2, x0[step]));
      a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(q3, x0[step]));
      if constexpr (R == 2) {
        c0 = _mm256_add_epi16(c0, _mm256_maddubs_epi16(q0, x1[step]));
        c1 = _mm256_add_epi16(c1, _mm256_maddubs_epi16(q1, x1[step]));
        c2 = _mm256_add_epi16(c2, _mm256_maddubs_epi16(q2, x1[step]));
        c3 = _mm256_add_epi16(c3, _mm256_maddubs_epi16(q3, x1[step]));
      }
    }
    // Lanes of a0: rows 0-7; a1: 8-15; a2, a3: the high nibbles, rows 16-23 and 24-31.
    const int64_t g = b0 / group;
    const float* s = w_scale + g * kRows;
    const float xs0 = x_scale[0][b0 / 32];
    add_block(a0, s, xs0, out[0]), add_block(a1, s + 8, xs0, out[0] + 8);
    add_block(a2, s + 16, xs0, out[0] + 16), add_block(a3, s + 24, xs0, out[0] + 24);
    if constexpr (R == 2) {
      const float xs1 = x_scale[1][b0 / 32];
      add_block(c0, s, xs1, out[1]), add_block(c1, s + 8, xs1, out[1] + 8);
      add_block(c2, s + 16, xs1, out[1] + 16), add_block(c3, s + 24, xs1, out[1] + 24);
    }
    if ((b0 + 32) % group == 0)
      for (int r = 0; r < R; ++r) add_group(w_offset + g * kRows, x_group_sum[r][g], out[r]);
  }
}

template <typename T>
void gemm(const T* x, int64_t m, int64_t k, int64_t group, const uint8_t* packed, const T* sz, int64_t n, T* y) {
  const int64_t blocks = k / 32, groups = k / group;
  std::vector<int8_t> q(m * k);
  std::vector<float> x_scale(m * blocks), x_group_sum(m * groups);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row<T>(x + i * k, k, group, q.data() + i * k, x_scale.data() + i * blocks, x_group_sum.data() + i * groups);
  });
  // One task per (panel of activation rows, weight block), panel-major: a thread's consecutive
  // tasks reuse the panel's arranged rows (arranged once per panel per thread) while the weight
  // blocks stream past.
  const int64_t weight_blocks = n / kRows, panels = (m + kPanel - 1) / kPanel;
  at::parallel_for(0, panels * weight_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float out[2][kRows];
    // 32 bytes per 4 features per row, 32-byte aligned; uninitialized (every byte read is written first)
    std::unique_ptr<int8_t[]> storage(new int8_t[std::min(m, kPanel) * k * 8 + 32]);
    __m256i* arranged = reinterpret_cast<__m256i*>((reinterpret_cast<uintptr_t>(storage.get()) + 31) & ~uintptr_t{31});
    std::unique_ptr<float[]> scales(new float[2 * groups * kRows + 8]);
    float* w_scale = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scales.get()) + 31) & ~uintptr_t{31});
    float* w_offset = w_scale + groups * kRows;
    int64_t current = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t wb = t % weight_blocks, panel = t / weight_blocks, row0 = panel * kPanel, n0 = wb * kRows;
      const int64_t rows_in_panel = std::min(m, row0 + kPanel) - row0;
      if (panel != current) {
        for (int64_t i = 0; i < rows_in_panel; ++i) arrange(q.data() + (row0 + i) * k, k, arranged + i * (k / 4));
        current = panel;
      }
      const uint8_t* block = packed + wb * k * (kRows / 2);
      block_scales<T>(sz, n, n0, groups, w_scale, w_offset);
      if (wb + 1 < weight_blocks) prefetch_block_scales(sz, n, n0 + kRows, groups);
      for (int64_t i = 0; i < rows_in_panel; i += 2) {
        const int64_t row = row0 + i;
        const int rows = i + 1 < rows_in_panel ? 2 : 1;
        const __m256i* rx[2] = {arranged + i * (k / 4), arranged + (i + rows - 1) * (k / 4)};
        const float* rs[2] = {x_scale.data() + row * blocks, x_scale.data() + (row + rows - 1) * blocks};
        const float* rg[2] = {x_group_sum.data() + row * groups, x_group_sum.data() + (row + rows - 1) * groups};
        if (rows == 2) tile<2>(block, w_scale, w_offset, rx, rs, rg, k, group, out);
        else tile<1>(block, w_scale, w_offset, rx, rs, rg, k, group, out);
        for (int r = 0; r < rows; ++r)
          for (int64_t j = 0; j < kRows; ++j) y[(row + r) * n + n0 + j] = static_cast<T>(out[r][j]);
      }
    }
  });
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t group_size, const at::Tensor& scale_and_zero) {
  TORCH_CHECK(kernel_isa() == "avx2", "unwrap_cpu::int4_gemm reads the AVX2 packing: it needs CPU capability AVX2 "
              "(with FMA/F16C); torch reports ", at::get_cpu_capability());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int4_gemm: x must be a contiguous [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "int4_gemm: x dtype must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) * 2 == k && packed.is_contiguous(),
              "int4_gemm: packed must be a contiguous uint8 [N, K/2] with K = ", k, ", got ", packed.sizes());
  TORCH_CHECK(n % kRows == 0, "int4_gemm: N=", n, " must be a multiple of ", kRows, " (full packed blocks)");
  TORCH_CHECK(group_size % 32 == 0 && k % group_size == 0, "int4_gemm: group_size=", group_size,
              " must be a multiple of 32 that divides K=", k);
  TORCH_CHECK(scale_and_zero.scalar_type() == x.scalar_type() && scale_and_zero.dim() == 3 &&
                  scale_and_zero.size(0) == k / group_size && scale_and_zero.size(1) == n &&
                  scale_and_zero.size(2) == 2 && scale_and_zero.is_contiguous(),
              "int4_gemm: scale_and_zero must be a contiguous [K/g, N, 2] in x's dtype, got ", scale_and_zero.sizes(),
              " ", scale_and_zero.scalar_type());
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  switch (x.scalar_type()) {
    case at::kFloat:
      gemm<float>(x.const_data_ptr<float>(), m, k, group_size, p, scale_and_zero.const_data_ptr<float>(), n,
                  y.data_ptr<float>());
      break;
    case at::kBFloat16:
      gemm<c10::BFloat16>(x.const_data_ptr<c10::BFloat16>(), m, k, group_size, p,
                          scale_and_zero.const_data_ptr<c10::BFloat16>(), n, y.data_ptr<c10::BFloat16>());
      break;
    default:
      gemm<c10::Half>(x.const_data_ptr<c10::Half>(), m, k, group_size, p, scale_and_zero.const_data_ptr<c10::Half>(),
                      n, y.data_ptr<c10::Half>());
  }
  return y;
}

}  // namespace

UNWRAP_SHIM aoti_torch_cpu_int4_gemm(AtenTensorHandle x, AtenTensorHandle packed, int64_t group_size,
                                     AtenTensorHandle scale_and_zero, AtenTensorHandle* out) {
  return unwrap_cpu::call_int4_op("unwrap_cpu::int4_gemm", int4_gemm, x, packed, group_size, scale_and_zero, out);
}

TORCH_LIBRARY_FRAGMENT(unwrap_cpu, m) {
  m.def("int4_gemm(Tensor x, Tensor packed, int group_size, Tensor scale_and_zero) -> Tensor");
}

TORCH_LIBRARY_IMPL(unwrap_cpu, CPU, m) { m.impl("int4_gemm", &int4_gemm); }
