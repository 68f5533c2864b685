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

#include <algorithm>
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
// The same under AVX2, where flash costs ~30-40 us per call before any slot: on a 2-core AVX2 EPYC, 2
// threads, bf16, head_dim 64 (python -m perf.bench_attention), the loop won at every length measured up
// to 6000 slots with 9 heads over 3 (SmolLM2: 27 vs 67 us at 256 slots, 237 vs 534 at 4096) and up to
// 2048 with 14 over 2 (Qwen2.5-0.5B: 181 vs 193 us; 343 vs 326 at 4096).
constexpr int64_t kFlashPairsAvx2 = 14 * 4096;

// e^x for x <= 0 (scores minus their maximum), fp32 to ~2 ulp (Cephes expf): x = n ln2 + r, 2^n p(r).
AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.f), x);  // this order: a NaN x stays NaN (max returns its 2nd operand then)
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
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);  // a NaN x stays NaN, as above
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

// The scores of 8 slots against one query head: lane j = q . key_j (keys[j] each d values).
template <typename T> AVX2 inline __m256 scores8(const float* q, const T* const* keys, int64_t d) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qc, load8(keys[j] + c), a[j]);
  }
  // Transpose-add: lane j of the result sums the 8 lanes of a[j].
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// One query head q (fp32, pre-scaled) over `count` slots of one K/V head: the scores' maximum `top`,
// total = sum e^(s - top) and acc = sum e^(s - top) v, unnormalized (a part of the slots, merged by
// the caller). `scores` has room for count + 8.
template <typename T>
AVX2 void attend_part8(const float* q, const T* k, const T* v, int64_t slot_stride, const int64_t* slots,
                       const float* bias, int64_t count, int64_t d, float* scores, float* top_out, float* total_out,
                       float* acc_out) {
  __m256 top8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const T* keys[8];
    for (int j = 0; j < 8; ++j) keys[j] = k + slots[i + j] * slot_stride;
    const __m256 s = _mm256_add_ps(scores8<T>(q, keys, d), _mm256_loadu_ps(bias + i));
    _mm256_storeu_ps(scores + i, s);
    top8 = _mm256_max_ps(top8, s);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  float top = *std::max_element(lanes, lanes + 8);
  for (; i < count; ++i) {
    const T* key = k + slots[i] * slot_stride;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(key + c), acc);
    scores[i] = unwrap_cpu::reduce_add8(acc) + bias[i];
    top = std::max(top, scores[i]);
  }
  __m256 sum = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j = 0; j < count; j += 8) {
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count - j)), lane));
    const __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), _mm256_set1_ps(top)));
    _mm256_storeu_ps(scores + j, p);
    sum = _mm256_add_ps(sum, _mm256_and_ps(p, live));
  }
  __m256 acc[kMaxHeadDim / 8];
  for (int64_t c = 0; c < d / 8; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const __m256 p = _mm256_set1_ps(scores[j]);
    const T* value = v + slots[j] * slot_stride;
    for (int64_t c = 0; c < d / 8; ++c) acc[c] = _mm256_fmadd_ps(p, load8(value + 8 * c), acc[c]);
  }
  for (int64_t c = 0; c < d / 8; ++c) _mm256_storeu_ps(acc_out + 8 * c, acc[c]);
  *top_out = top;
  *total_out = count ? unwrap_cpu::reduce_add8(sum) : 0.f;
}

// The AVX2 path of `run`: the slots split into parts (one per thread where there is work enough), each
// part's heads attended by one thread over only its slots (each K/V row read by one thread, the heads of
// a group one after another while it is in cache), then merged per head: the parts' sums rescaled to the
// largest maximum. Split over heads instead, SmolLM2's 9 heads went 5/4 and a K/V head to both threads.
template <typename T>
void run_avx2(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& slots,
              const std::vector<float>& bias, double scale, at::Tensor& out) {
  const int64_t heads = q.size(1), kv_heads = k.size(1), d = q.size(3), count = static_cast<int64_t>(slots.size());
  // at least 16 slots a part: a part's fixed work (q, the merge) is a few slots' worth
  const int64_t parts =
      heads * count * d < kParallelWork ? 1 : std::clamp<int64_t>(count / 16, 1, at::get_num_threads());
  const int64_t row = d + 2;  // a part's [top, total, acc[d]] per head
  std::vector<float> partial(parts * heads * row);
  const T *q_data = q.const_data_ptr<T>(), *k_data = k.const_data_ptr<T>(), *v_data = v.const_data_ptr<T>();
  at::parallel_for(0, parts * heads, heads, [&](int64_t begin, int64_t end) {
    alignas(32) float qf[kMaxHeadDim];
    std::vector<float> scores(count / parts + 24);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t part = item / heads, h = item % heads;
      const int64_t first = count * part / parts, last = count * (part + 1) / parts;
      const T* qh = q_data + h * q.stride(1);
      for (int64_t c = 0; c < d; ++c) qf[c] = static_cast<float>(qh[c]) * static_cast<float>(scale);
      const int64_t g = h / (heads / kv_heads);
      float* p = partial.data() + item * row;
      attend_part8<T>(qf, k_data + g * k.stride(1), v_data + g * v.stride(1), k.stride(2), slots.data() + first,
                      bias.data() + first, last - first, d, scores.data(), p, p + 1, p + 2);
    }
  });
  T* out_data = out.data_ptr<T>();
  for (int64_t h = 0; h < heads; ++h) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t part = 0; part < parts; ++part) {
      const float* p = partial.data() + (part * heads + h) * row;
      if (p[1] != 0.f) top = std::max(top, p[0]);
    }
    float total = 0.f;
    alignas(32) float acc[kMaxHeadDim] = {};
    for (int64_t part = 0; part < parts; ++part) {
      const float* p = partial.data() + (part * heads + h) * row;
      if (p[1] == 0.f) continue;  // no slot in this part (a NaN goes on, into the output)
      const float w = parts == 1 ? 1.f : std::exp(p[0] - top);
      total += w * p[1];
      for (int64_t c = 0; c < d; ++c) acc[c] += w * p[2 + c];
    }
    const float inv = total > 0 ? 1.f / total : 0.f;  // no slot allowed: zeros
    for (int64_t c = 0; c < d; ++c) out_data[h * d + c] = static_cast<T>(acc[c] * inv);
  }
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
  if (!avx512) {
    run_avx2<T>(q, k, v, slots, bias, scale, out);
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
      attend<T>(qf, kg, vg, k.stride(2), slots, bias, d, scores.data(), out_data + h * d);
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
