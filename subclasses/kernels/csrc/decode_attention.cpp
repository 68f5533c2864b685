// unwrap_cpu::decode_attention: attention of ONE query token over a key/value cache, reading only
// the slots the mask allows (for many slots, aten's flash kernel over the slots up to the last
// allowed one: a slot after it is never read). out[0, 0, h] = softmax_j(scale * q_h . k_{g(h), j} + mask_j) v_{g(h), j}
// over the allowed j, g(h) = h / (H / H_kv) (grouped K/V heads), all in fp32.
//
// Why: a static cache of L slots is attended in full by SDPA (masked, not shortened); at one
// query token its CPU flash kernel also pays a fixed ~35 us per call (30 calls per token for
// SmolLM2). Here the work is the filled slots only.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "aoti_shim.h"
#include "avx2_load.h"
#include "avx512_load.h"
#include "int4_gemv.h"

namespace {

using unwrap_cpu::load16;
using unwrap_cpu::load8;

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kParallelWork = 1 << 16;  // below ~this many multiply-adds one thread is faster
// Above this many (query head, slot) pairs aten's flash kernel (blocked GEMMs) beats the loop
// below, whose per-slot cost is ~1.5x flash's: measured in SmolLM2's decode step (9 heads), one
// thread, AVX512, flash ~14 us per call at ~200 slots vs ~21 us here; ~9 us here at 16 slots,
// where flash still pays its fixed ~14 us.
constexpr int64_t kFlashPairs = 9 * 96;
// The same under AVX2, where flash costs ~40 us per call before any slot and more per slot than the
// loop: on a 2-core AVX2 EPYC, 2 threads, bf16, head_dim 64, the loop won at every length measured up
// to 4096 slots with 9 heads over 3 (SmolLM2: 27 vs 71 us at 256 slots, 311 vs 585 at 4096) and up to
// 2048 with 14 over 2 (Qwen2.5-0.5B: 223 vs 242 us; 422 vs 404 at 4096).
constexpr int64_t kFlashPairsAvx2 = 14 * 4096;

// e^x for x <= 0 (scores minus their maximum), fp32 to ~2 ulp (Cephes expf): x = n ln2 + r, 2^n p(r).
AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// One query head: q (fp32, pre-scaled) over the slots in `slots` of one K/V head. `scores` has
// room for the slots rounded up to 16.
template <typename T>
AVX512 void attend(const float* q, const T* k, const T* v, int64_t slot_stride, const std::vector<int64_t>& slots,
                   const std::vector<float>& bias, int64_t d, float* scores, T* out) {
  const int64_t count = static_cast<int64_t>(slots.size());
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < count; ++i) {
    const T* key = k + slots[i] * slot_stride;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), load16(key + c), acc);
    scores[i] = _mm512_reduce_add_ps(acc) + bias[i];
    top = std::max(top, scores[i]);
  }
  // p = e^(s - top), 16 at a time (the padding past `count` is computed and ignored).
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 live = count - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + i), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + i, p);
    sum = _mm512_mask_add_ps(sum, live, sum, p);
  }
  const float total = _mm512_reduce_add_ps(sum);
  __m512 acc[kMaxHeadDim / 16];
  for (int64_t c = 0; c < d / 16; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    const __m512 p = _mm512_set1_ps(scores[i]);
    const T* value = v + slots[i] * slot_stride;
    for (int64_t c = 0; c < d / 16; ++c) acc[c] = _mm512_fmadd_ps(p, load16(value + 16 * c), acc[c]);
  }
  const float inv = total > 0 ? 1.f / total : 0.f;  // no slot allowed: zeros
  alignas(64) float row[kMaxHeadDim];
  for (int64_t c = 0; c < d / 16; ++c) _mm512_store_ps(row + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
  for (int64_t c = 0; c < d; ++c) out[c] = static_cast<T>(row[c]);
}

// The AVX2 twin of exp_nonpositive: 2^n built in the exponent bits (n >= -126 here: a normal float).
AVX2 inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// attend, 8 lanes at a time (AVX2 + FMA).
template <typename T>
AVX2 void attend8(const float* q, const T* k, const T* v, int64_t slot_stride, const std::vector<int64_t>& slots,
                  const std::vector<float>& bias, int64_t d, float* scores, T* out) {
  const int64_t count = static_cast<int64_t>(slots.size());
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < count; ++i) {
    const T* key = k + slots[i] * slot_stride;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;  // two chains: d / 8 dependent FMAs halved
    for (int64_t c = 0; c < d; c += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(key + c), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 8), load8(key + c + 8), acc1);
    }
    scores[i] = unwrap_cpu::reduce_add8(_mm256_add_ps(acc0, acc1)) + bias[i];
    top = std::max(top, scores[i]);
  }
  __m256 sum = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < count; i += 8) {
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count - i)), lane));
    const __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(scores + i), _mm256_set1_ps(top)));
    _mm256_storeu_ps(scores + i, p);
    sum = _mm256_add_ps(sum, _mm256_and_ps(p, live));
  }
  const float total = unwrap_cpu::reduce_add8(sum);
  __m256 acc[kMaxHeadDim / 8];
  for (int64_t c = 0; c < d / 8; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    const __m256 p = _mm256_set1_ps(scores[i]);
    const T* value = v + slots[i] * slot_stride;
    for (int64_t c = 0; c < d / 8; ++c) acc[c] = _mm256_fmadd_ps(p, load8(value + 8 * c), acc[c]);
  }
  const float inv = total > 0 ? 1.f / total : 0.f;  // no slot allowed: zeros
  alignas(32) float row[kMaxHeadDim];
  for (int64_t c = 0; c < d / 8; ++c) _mm256_store_ps(row + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
  for (int64_t c = 0; c < d; ++c) out[c] = static_cast<T>(row[c]);
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, double scale,
         at::Tensor& out) {
  const int64_t heads = q.size(1), kv_heads = k.size(1), length = k.size(2), d = q.size(3);
  // The allowed slots and their additive bias (0 for a bool mask).
  std::vector<int64_t> slots;
  std::vector<float> bias;
  slots.reserve(length), bias.reserve(length);
  const int64_t step = mask.stride(-1);  // [.., L] with one row: every other size is 1
  // The data pointer is taken once: each const_data_ptr checks the dtype (per slot, 30 layers x 256 slots
  // of a SmolLM2 token, that was ~1 % of it).
  if (mask.scalar_type() == at::kBool) {
    const bool* allowed = mask.const_data_ptr<bool>();
    for (int64_t j = 0; j < length; ++j)
      if (allowed[j * step]) slots.push_back(j), bias.push_back(0.f);
  } else {
    const float* bias_f = mask.scalar_type() == at::kFloat ? mask.const_data_ptr<float>() : nullptr;
    const T* bias_t = bias_f ? nullptr : mask.const_data_ptr<T>();
    for (int64_t j = 0; j < length; ++j) {
      const float b = bias_f ? bias_f[j * step] : static_cast<float>(bias_t[j * step]);
      if (b != -std::numeric_limits<float>::infinity()) slots.push_back(j), bias.push_back(b);
    }
  }
  const bool avx512 = unwrap_cpu::kernel_isa() == "avx512";
  if (heads * static_cast<int64_t>(slots.size()) > (avx512 ? kFlashPairs : kFlashPairsAvx2)) {
    // flash, over the slots up to the last allowed
    const int64_t end = slots.back() + 1;
    at::Tensor additive = at::full({1, 1, 1, end}, -std::numeric_limits<float>::infinity(), q.options());
    T* row = additive.data_ptr<T>();
    for (size_t i = 0; i < slots.size(); ++i) row[slots[i]] = static_cast<T>(bias[i]);
    const at::Tensor grouped = q.reshape({1, kv_heads, heads / kv_heads, d});
    const at::Tensor result = std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(
        grouped, k.narrow(2, 0, end), v.narrow(2, 0, end), 0.0, false, additive, scale));
    out.copy_(result.reshape({1, 1, heads, d}));
    return;
  }
  const int64_t grain = heads * static_cast<int64_t>(slots.size()) * d < kParallelWork ? heads : 1;
  const T *q_data = q.const_data_ptr<T>(), *k_data = k.const_data_ptr<T>(), *v_data = v.const_data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  at::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float qf[kMaxHeadDim];
    std::vector<float> scores(slots.size() + 16, 0.f);
    for (int64_t h = begin; h < end; ++h) {
      const T* qh = q_data + h * q.stride(1);
      for (int64_t c = 0; c < d; ++c) qf[c] = static_cast<float>(qh[c]) * static_cast<float>(scale);
      const int64_t g = h / (heads / kv_heads);
      const T* kg = k_data + g * k.stride(1);
      const T* vg = v_data + g * v.stride(1);
      if (avx512)
        attend<T>(qf, kg, vg, k.stride(2), slots, bias, d, scores.data(), out_data + h * d);
      else
        attend8<T>(qf, kg, vg, k.stride(2), slots, bias, d, scores.data(), out_data + h * d);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(unwrap_cpu::kernel_isa() != "none",
              "unwrap_cpu::decode_attention needs the CPU capability the int4 GEMV runs under (AVX512 or AVX2)");
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(2) == 1 && q.stride(3) == 1,
              "decode_attention: q must be [1, H, 1, D] with unit stride in D, got ", q.sizes(), " strides ", q.strides());
  const int64_t heads = q.size(1), d = q.size(3);
  TORCH_CHECK(d % 16 == 0 && d <= kMaxHeadDim, "decode_attention: head_dim=", d, " must be a multiple of 16, at most ",
              kMaxHeadDim);
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides() && k.size(0) == 1 && k.size(3) == d &&
                  k.stride(3) == 1 && k.size(1) > 0 && heads % k.size(1) == 0,
              "decode_attention: k and v must be [1, H_kv, L, D] alike, with H_kv dividing H=", heads, ", D=", d,
              " and unit stride in D; got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf),
              "decode_attention: q, k, v must share a float32, bfloat16 or float16 dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(mask.numel() == k.size(2) && mask.size(-1) == k.size(2) &&
                  (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kFloat || mask.scalar_type() == q.scalar_type()),
              "decode_attention: mask must be one row of L=", k.size(2), " (bool, float32 or q's dtype) for every head, got ",
              mask.sizes(), " ", mask.scalar_type());
  at::Tensor out = at::empty({1, 1, heads, d}, q.options());
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, k, v, mask, scale, out); break;
    case at::kBFloat16: run<c10::BFloat16>(q, k, v, mask, scale, out); break;
    default: run<c10::Half>(q, k, v, mask, scale, out); break;
  }
  return out;
}

}  // namespace

UNWRAP_SHIM aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v, AtenTensorHandle mask,
                                            double scale, AtenTensorHandle* out) {
  using namespace unwrap_cpu;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    const at::Tensor &qt = tensor_of(q), &kt = tensor_of(k), &vt = tensor_of(v), &m = tensor_of(mask);
    RECORD_FUNCTION("unwrap_cpu::decode_attention", std::vector<c10::IValue>({qt, kt, vt, m, scale}));
    *out = handle_of(decode_attention(qt, kt, vt, m, scale));
  });
}

TORCH_LIBRARY_FRAGMENT(unwrap_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(unwrap_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
