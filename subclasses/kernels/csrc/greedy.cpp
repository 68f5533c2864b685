// unwrap_cpu::argmax_rows: per row of logits [B, V], the index of its largest value, exactly as
// torch.argmax(logits, -1) answers it (the first of equal maxima; in a row holding NaN, its first NaN).
// aten's argmax over a vocabulary-sized row is a scalar loop: ~53 us for 49152 fp32 logits on the
// 2-core EPYC, ~220 us over bf16 (1-4 % of a SmolLM2 token); two vectorized passes (the maximum, then
// its first index) take a few.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "aoti_shim.h"
#include "avx2_int4.h"
#include "int4_gemv.h"

namespace {

using unwrap_cpu::load8;

template <typename T> AVX2 int64_t row_argmax(const T* row, int64_t v) {
  const int64_t whole = v / 8 * 8;
  __m256 best8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 unordered = _mm256_setzero_ps();
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 x = load8(row + i);
    best8 = _mm256_max_ps(best8, x);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  float best = unwrap_cpu::reduce_max8(best8);
  bool nan = _mm256_movemask_ps(unordered) != 0;
  for (int64_t i = whole; i < v; ++i) {
    const float x = static_cast<float>(row[i]);
    nan = nan || std::isnan(x);
    best = x > best ? x : best;
  }
  if (nan) {  // torch's answer: the first NaN
    for (int64_t i = 0; i < v; ++i)
      if (std::isnan(static_cast<float>(row[i]))) return i;
  }
  const __m256 target = _mm256_set1_ps(best);
  for (int64_t i = 0; i < whole; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(load8(row + i), target, _CMP_EQ_OQ));
    if (mask) return i + __builtin_ctz(mask);
  }
  for (int64_t i = whole; i < v; ++i)
    if (static_cast<float>(row[i]) == best) return i;
  return 0;  // unreachable: best is one of the row's values
}

template <typename T> void rows_argmax(const at::Tensor& logits, int64_t* out) {
  const T* data = logits.const_data_ptr<T>();
  for (int64_t b = 0; b < logits.size(0); ++b) out[b] = row_argmax(data + b * logits.stride(0), logits.size(1));
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(unwrap_cpu::kernel_isa() != "none", "unwrap_cpu::argmax_rows needs AVX2 (the int4 GEMV's capability)");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.stride(1) == 1,
              "argmax_rows: logits must be [B, V] with V > 0 and unit stride in V, got ", logits.sizes(), " strides ",
              logits.strides());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "argmax_rows: logits dtype must be float32, bfloat16 or float16, got ", logits.scalar_type());
  at::Tensor out = at::empty({logits.size(0), 1}, logits.options().dtype(at::kLong));
  switch (logits.scalar_type()) {
    case at::kFloat: rows_argmax<float>(logits, out.data_ptr<int64_t>()); break;
    case at::kBFloat16: rows_argmax<c10::BFloat16>(logits, out.data_ptr<int64_t>()); break;
    default: rows_argmax<c10::Half>(logits, out.data_ptr<int64_t>()); break;
  }
  return out;
}

}  // namespace

UNWRAP_SHIM aoti_torch_cpu_argmax_rows(AtenTensorHandle logits, AtenTensorHandle* out) {
  using namespace unwrap_cpu;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    const at::Tensor& l = tensor_of(logits);
    RECORD_FUNCTION("unwrap_cpu::argmax_rows", std::vector<c10::IValue>({l}));
    *out = handle_of(argmax_rows(l));
  });
}

TORCH_LIBRARY_FRAGMENT(unwrap_cpu, m) { m.def("argmax_rows(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(unwrap_cpu, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
