// unwrap_cpu::int4_gemv: y[1, N] = x[1, K] @ W^T for the int4 weight in the packing of
// aten::_convert_weight_to_int4pack_for_cpu, which depends on torch's CPU capability: this file
// holds the op, its checks and the AVX512 kernel; int4_gemv_avx2.cpp the AVX2 one. Under AVX512
// (see subclasses/int4_packing.py):
// rows in blocks of 64, each block stored [K, 32] bytes, byte j of column k holding row j (low
// nibble) and row j + 32 (high nibble); a last partial block of R rows is [K, R/2] bytes with
// rows 2j (low) and 2j + 1 (high). scale_and_zero is [K/g, N, 2]; w = (q - 8) * scale + zero.
//
// Per 32 input features, the activation is rounded to 15-bit integers and each sum of q * x is
// exact in int32 (AVX512-VNNI dot products), then scaled in fp32: scale * sum(q x) + (zero - 8 *
// scale) * sum(x), with sum(x) in fp32. Memory-bound at M = 1: each packed byte is read once.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "aoti_shim.h"
#include "avx512_load.h"
#include "int4_gemv.h"

namespace {

using unwrap_cpu::load16;
using unwrap_cpu::to_float;
using unwrap_cpu::kernel_isa;
using unwrap_cpu::Weight;

constexpr int64_t kBlock = 64;
// Software prefetch distance in the weight stream, bytes: on the project's 2-core Xeon the
// hardware prefetcher alone left cold GEMVs ~10-15 % slower (measured 1024 and 2048; 2048 won).
constexpr int64_t kPrefetch = 2048;

// acc += dot4(u, s) per 32-bit lane, in place. gcc 12 compiles _mm512_dpbusd_epi32 in a loop into
// copies of every accumulator and spills to the stack (~2x slower); this asm keeps them in registers.
AVX512 inline void dpbusd(__m512i& acc, __m512i u, __m512i s) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s)); }

// 16 consecutive (scale, zero) pairs as two fp32 vectors.
template <typename T> AVX512 inline void load_pairs(const T* p, __m512& s, __m512& z) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __m512 a = load16(p), b = load16(p + 16);
  s = _mm512_permutex2var_ps(a, even, b);
  z = _mm512_permutex2var_ps(a, odd, b);
}

// Rows [64 * block, 64 * block + 64) of y, fp32. The activation comes as int16 per 32-block
// (x ~ scale[b] * (256 * xh + xl), xh and xl int8): two VNNI dot products per 4 columns give the
// exact integer sum of q * x16, so the only rounding is x's to 15 bits (~1e-5 of the block's
// largest |x|: below bf16/fp16 resolution). 4 columns of the block are 128 contiguous bytes;
// vpermt2b regroups them so that each 32-bit lane holds the 4 columns of one row.
template <typename T>
AVX512 void full_block(const uint8_t* packed, const T* sz, const int8_t* xh, const int8_t* xl, const float* xscale,
                       const float* xsum, int64_t block, int64_t n, int64_t k, int64_t group, float* y) {
  alignas(64) static const uint8_t kIdx[2][64] = {
#define ROW(j) (j), 32 + (j), 64 + (j), 96 + (j)
      {ROW(0), ROW(1), ROW(2), ROW(3), ROW(4), ROW(5), ROW(6), ROW(7),
       ROW(8), ROW(9), ROW(10), ROW(11), ROW(12), ROW(13), ROW(14), ROW(15)},
      {ROW(16), ROW(17), ROW(18), ROW(19), ROW(20), ROW(21), ROW(22), ROW(23),
       ROW(24), ROW(25), ROW(26), ROW(27), ROW(28), ROW(29), ROW(30), ROW(31)}};
#undef ROW
  const __m512i idx0 = _mm512_load_si512(kIdx[0]), idx1 = _mm512_load_si512(kIdx[1]);
  const __m512i nibble = _mm512_set1_epi8(15);
  const uint8_t* p = packed + block * k * (kBlock / 2);
  // The group and block sums live in memory (L1), not registers: the inner loop needs 21 of
  // the 32 vector registers, and with 8 more gcc spills inside the loop.
  alignas(64) float gsum[kBlock];
  float* out = y + block * kBlock;
  for (int i = 0; i < kBlock; ++i) out[i] = 0.f;
  for (int64_t g0 = 0; g0 < k; g0 += group) {
    const T* pairs = sz + ((g0 / group) * n + block * kBlock) * 2;
    if (g0 + group < k) {  // the next group's scales: 4 scattered lines, not in any stream
      for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(pairs + n * 2) + 64 * i, _MM_HINT_T0);
    }
    for (int i = 0; i < kBlock; ++i) gsum[i] = 0.f;
    for (int64_t b0 = g0; b0 < g0 + group; b0 += 32) {
      // Named accumulators, not arrays: gcc spills arrays of vectors to the stack here.
      __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, h3 = h0, l0 = h0, l1 = h0, l2 = h0, l3 = h0;
      for (int64_t kk = b0; kk < b0 + 32; kk += 4, p += 2 * kBlock) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch + 64, _MM_HINT_T0);
        __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + kBlock);
        __m512i t0 = _mm512_permutex2var_epi8(a, idx0, b), t1 = _mm512_permutex2var_epi8(a, idx1, b);
        // rows 0-15, 16-31 (low nibbles), 32-47, 48-63 (high nibbles)
        __m512i q0 = _mm512_and_si512(t0, nibble), q1 = _mm512_and_si512(t1, nibble);
        __m512i q2 = _mm512_and_si512(_mm512_srli_epi16(t0, 4), nibble);
        __m512i q3 = _mm512_and_si512(_mm512_srli_epi16(t1, 4), nibble);
        __m512i xh4 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xh + kk));
        __m512i xl4 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xl + kk));
        dpbusd(h0, q0, xh4);
        dpbusd(h1, q1, xh4);
        dpbusd(h2, q2, xh4);
        dpbusd(h3, q3, xh4);
        dpbusd(l0, q0, xl4);
        dpbusd(l1, q1, xl4);
        dpbusd(l2, q2, xl4);
        dpbusd(l3, q3, xl4);
      }
      const __m512 a = _mm512_set1_ps(xscale[b0 / 32]);
      const __m512i hs[4] = {h0, h1, h2, h3}, ls[4] = {l0, l1, l2, l3};
      for (int i = 0; i < 4; ++i) {
        __m512i total = _mm512_add_epi32(_mm512_slli_epi32(hs[i], 8), ls[i]);
        _mm512_store_ps(gsum + 16 * i, _mm512_fmadd_ps(a, _mm512_cvtepi32_ps(total), _mm512_load_ps(gsum + 16 * i)));
      }
    }
    // w = (q - 8) * s + z: sum_k w x = s * sum(q x) + (z - 8 s) * sum(x)
    __m512 xs = _mm512_set1_ps(xsum[g0 / group]);
    for (int i = 0; i < 4; ++i) {
      __m512 s, z;
      load_pairs<T>(pairs + 32 * i, s, z);
      __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z);
      __m512 acc = _mm512_fmadd_ps(offset, xs, _mm512_loadu_ps(out + 16 * i));
      _mm512_storeu_ps(out + 16 * i, _mm512_fmadd_ps(s, _mm512_load_ps(gsum + 16 * i), acc));
    }
  }
}

// The last partial block (rows [start, n), adjacent pairing): scalar, it is at most 48 rows.
template <typename T>
void partial_block(const uint8_t* packed, const T* sz, const float* x, int64_t start, int64_t n, int64_t k,
                   int64_t group, float* y) {
  const int64_t rows = n - start;
  const uint8_t* p = packed + start * (k / 2);
  for (int64_t r = 0; r < rows; ++r) {
    float acc = 0;
    for (int64_t g0 = 0; g0 < k; g0 += group) {
      float sum = 0, xs = 0;
      for (int64_t kk = g0; kk < g0 + group; ++kk) {
        int q = (p[kk * (rows / 2) + r / 2] >> (4 * (r % 2))) & 15;
        sum += static_cast<float>(q - 8) * x[kk];
        xs += x[kk];
      }
      const T* pair = sz + ((g0 / group) * n + start + r) * 2;
      acc += to_float(pair[0]) * sum + to_float(pair[1]) * xs;
    }
    y[start + r] = acc;
  }
}

// x as 15-bit integers per 32-block, split into two int8 halves: x16 = 256 * xh + xl.
constexpr float kX16Max = 127 * 256 + 127;  // so that xh = (x16 - xl) / 256 stays in int8

// xf = x in fp32; per 32-block b: xscale[b], and xh, xl; per weight group: xsum.
template <typename T>
AVX512 void quantize_activation(const T* x, int64_t k, int64_t group, float* xf, int8_t* xh, int8_t* xl, float* xscale,
                                float* xsum) {
  for (int64_t i = 0; i < k / group; ++i) xsum[i] = 0.f;
  for (int64_t b = 0; b < k / 32; ++b) {
    __m512 v[2] = {load16<T>(x + 32 * b), load16<T>(x + 32 * b + 16)};
    _mm512_storeu_ps(xf + 32 * b, v[0]);
    _mm512_storeu_ps(xf + 32 * b + 16, v[1]);
    xsum[32 * b / group] += _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    xscale[b] = amax / kX16Max;
    const __m512 inv = _mm512_set1_ps(amax > 0 ? kX16Max / amax : 0.f);
    for (int h = 0; h < 2; ++h) {
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], inv));  // round to nearest even
      __m512i low = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(128)), _mm512_set1_epi32(255)),
                                     _mm512_set1_epi32(128));
      __m512i high = _mm512_srai_epi32(_mm512_sub_epi32(q, low), 8);  // exact: q - low is a multiple of 256
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xl + 32 * b + 16 * h), _mm512_cvtepi32_epi8(low));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xh + 32 * b + 16 * h), _mm512_cvtepi32_epi8(high));
    }
  }
}

// y = x @ [W_0; W_1; ...]^T: the full blocks of every weight are one parallel loop, so a fused q/k/v or
// gate/up projection is a single call.
template <typename T>
void gemv(const at::Tensor& x, const std::vector<Weight<T>>& weights, int64_t group, at::Tensor& out) {
  const int64_t k = x.size(1), n = out.size(1);
  const T* xp = x.const_data_ptr<T>();
  T* o = out.data_ptr<T>();
  const bool avx512 = kernel_isa() == "avx512";
  const int64_t block = avx512 ? kBlock : 32;
  const bool partial = std::any_of(weights.begin(), weights.end(), [&](const Weight<T>& w) { return w.n % block; });
  float* yf = unwrap_cpu::scratch<float, 1>(n);
  float* xf = unwrap_cpu::scratch<float, 0>(k);
  if (!avx512 && partial) {  // x in fp32 for the scalar partial blocks (AVX512's quantize_activation writes it)
    for (int64_t i = 0; i < k; ++i) xf[i] = to_float(xp[i]);
  }
  if (avx512) {
    float* xsum = unwrap_cpu::scratch<float, 2>(k / group);
    float* xscale = unwrap_cpu::scratch<float, 3>(k / 32);
    int8_t* xh = unwrap_cpu::scratch<int8_t, 0>(k);
    int8_t* xl = unwrap_cpu::scratch<int8_t, 1>(k);
    quantize_activation<T>(xp, k, group, xf, xh, xl, xscale, xsum);
    const unwrap_cpu::BlockIndex blocks(weights, kBlock);
    at::parallel_for(0, blocks.total(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const size_t i = blocks.weight(b);
        const Weight<T>& w = weights[i];
        full_block<T>(w.packed, w.scale_and_zero, xh, xl, xscale, xsum, b - blocks.first[i], w.n, k, group,
                      yf + w.offset);
      }
    });
    for (const auto& w : weights) {
      for (int64_t i = 0; i < w.n / block * block; ++i) o[w.offset + i] = static_cast<T>(yf[w.offset + i]);
    }
  } else {
    unwrap_cpu::full_blocks_avx2<T>(xp, k, group, weights, o);  // writes the full blocks' rows of o
  }
  for (const auto& w : weights) {
    if (w.n % block == 0) continue;
    partial_block<T>(w.packed, w.scale_and_zero, xf, w.n / block * block, w.n, k, group, yf + w.offset);
    for (int64_t i = w.n / block * block; i < w.n; ++i) o[w.offset + i] = static_cast<T>(yf[w.offset + i]);
  }
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(kernel_isa() != "none", "unwrap_cpu::int4_gemv needs CPU capability AVX512 (with BW/VNNI/VBMI) or "
              "AVX2 (with FMA/F16C); torch reports ", at::get_cpu_capability());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.is_contiguous(), "int4_gemv: x must be a contiguous [1, K], got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "int4_gemv: x dtype must be float32, bfloat16 or float16, got ", x.scalar_type());
}

void check_weight(const at::Tensor& x, const at::Tensor& packed, int64_t group_size, const at::Tensor& scale_and_zero) {
  const int64_t k = x.size(1), n = packed.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) * 2 == k && packed.is_contiguous(),
              "int4_gemv: packed must be a contiguous uint8 [N, K/2] with K = ", k, ", got ", packed.sizes());
  TORCH_CHECK(group_size > 0 && k % group_size == 0, "int4_gemv: group_size=", group_size, " must divide K=", k);
  TORCH_CHECK(n % 16 == 0, "int4_gemv: N=", n, " must be a multiple of 16");
  TORCH_CHECK(scale_and_zero.scalar_type() == x.scalar_type() && scale_and_zero.dim() == 3 &&
                  scale_and_zero.size(0) == k / group_size && scale_and_zero.size(1) == n &&
                  scale_and_zero.size(2) == 2 && scale_and_zero.is_contiguous(),
              "int4_gemv: scale_and_zero must be a contiguous [K/g, N, 2] in x's dtype, got ", scale_and_zero.sizes(),
              " ", scale_and_zero.scalar_type());
}

template <typename T>
void run(const at::Tensor& x, const std::vector<at::Tensor>& packed, int64_t group_size,
         const std::vector<at::Tensor>& scale_and_zero, at::Tensor& out) {
  std::vector<Weight<T>> weights;
  int64_t offset = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    weights.push_back({packed[i].const_data_ptr<uint8_t>(), scale_and_zero[i].const_data_ptr<T>(), packed[i].size(0), offset});
    offset += packed[i].size(0);
  }
  gemv<T>(x, weights, group_size, out);
}

// y [1, sum N_i] = x @ [W_0; W_1; ...]^T for weights of the same K and group size.
at::Tensor int4_gemv_cat(const at::Tensor& x, at::TensorList packed_in, int64_t group_size,
                         at::TensorList scale_and_zero_in) {
  check_x(x);
  TORCH_CHECK(!packed_in.empty() && packed_in.size() == scale_and_zero_in.size(),
              "int4_gemv_cat: one scale_and_zero per packed weight (at least one), got ", packed_in.size(), " and ",
              scale_and_zero_in.size());
  std::vector<at::Tensor> packed, scale_and_zero;
  int64_t n = 0;
  for (size_t i = 0; i < packed_in.size(); ++i) {
    packed.push_back(packed_in[i].contiguous());  // no-ops as stored
    scale_and_zero.push_back(scale_and_zero_in[i].contiguous());
    check_weight(x, packed[i], group_size, scale_and_zero[i]);
    n += packed[i].size(0);
  }
  at::Tensor out = at::empty({1, n}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: run<float>(x, packed, group_size, scale_and_zero, out); break;
    case at::kBFloat16: run<c10::BFloat16>(x, packed, group_size, scale_and_zero, out); break;
    default: run<c10::Half>(x, packed, group_size, scale_and_zero, out); break;
  }
  return out;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, int64_t group_size, const at::Tensor& scale_and_zero) {
  return int4_gemv_cat(x, {packed}, group_size, {scale_and_zero});
}

// For perf/bench_gemv.py: read every byte of ``buffer`` (contiguous, a multiple of 64 bytes) as
// the GEMV reads its weights (64-byte loads, the same prefetch, at::parallel_for), so that
// bytes / this time is the floor the GEMV is measured against. Returns a checksum.
AVX512 int64_t read_lines(const char* base, int64_t begin, int64_t end) {
  __m512i acc = _mm512_setzero_si512();
  for (int64_t i = begin; i < end; ++i) {
    _mm_prefetch(base + i * 64 + kPrefetch, _MM_HINT_T0);
    acc = _mm512_xor_si512(acc, _mm512_loadu_si512(base + i * 64));
  }
  return _mm512_reduce_add_epi64(acc);
}

int64_t read_bytes(const at::Tensor& buffer) {
  TORCH_CHECK(kernel_isa() != "none", "read_bytes: no GEMV kernel on this CPU capability");
  TORCH_CHECK(buffer.is_contiguous() && buffer.nbytes() % 64 == 0, "read_bytes: a contiguous buffer of 64-byte lines");
  const char* base = static_cast<const char*>(buffer.const_data_ptr());
  const int64_t lines = buffer.nbytes() / 64;
  std::vector<int64_t> sums(at::get_num_threads() + 1, 0);
  const bool avx512 = kernel_isa() == "avx512";
  at::parallel_for(0, lines, 1024, [&](int64_t begin, int64_t end) {
    sums[at::get_thread_num()] ^= avx512 ? read_lines(base, begin, end) : unwrap_cpu::read_lines_avx2(base, begin, end);
  });
  int64_t total = 0;
  for (int64_t v : sums) total ^= v;
  return total;
}

}  // namespace

namespace unwrap_cpu {

// The kernel that reads this process's packing: aten packs for torch's CPU capability
// (ATEN_CPU_CAPABILITY can lower it), so the capability picks the kernel, and the CPU must have
// the kernel's instructions. "none": no kernel here (the Python side runs aten's).
const std::string& kernel_isa() {
  static const std::string isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx512vbmi"))
      return std::string("avx512");
    if (capability == "AVX2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return std::string("avx2");
    return std::string("none");
  }();
  return isa;
}

}  // namespace unwrap_cpu

UNWRAP_SHIM aoti_torch_cpu_int4_gemv(AtenTensorHandle x, AtenTensorHandle packed, int64_t group_size,
                                     AtenTensorHandle scale_and_zero, AtenTensorHandle* out) {
  return unwrap_cpu::call_int4_op("unwrap_cpu::int4_gemv", int4_gemv, x, packed, group_size, scale_and_zero, out);
}

UNWRAP_SHIM aoti_torch_cpu_int4_gemv_cat(AtenTensorHandle x, const AtenTensorHandle* packed, int64_t packed_count,
                                         int64_t group_size, const AtenTensorHandle* scale_and_zero,
                                         int64_t scale_and_zero_count, AtenTensorHandle* out) {
  using namespace unwrap_cpu;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    const at::Tensor& xt = tensor_of(x);
    const std::vector<at::Tensor> p = tensors_of(packed, packed_count), s = tensors_of(scale_and_zero, scale_and_zero_count);
    RECORD_FUNCTION("unwrap_cpu::int4_gemv_cat", std::vector<c10::IValue>({xt, p, group_size, s}));
    *out = handle_of(int4_gemv_cat(xt, p, group_size, s));
  });
}

TORCH_LIBRARY(unwrap_cpu, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, int group_size, Tensor scale_and_zero) -> Tensor");
  m.def("int4_gemv_cat(Tensor x, Tensor[] packed, int group_size, Tensor[] scale_and_zero) -> Tensor");
  m.def("read_bytes(Tensor buffer) -> int");
  m.def("int4_gemv_kernel() -> str", [] { return unwrap_cpu::kernel_isa(); });  // no tensors: a catch-all kernel
}

TORCH_LIBRARY_IMPL(unwrap_cpu, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_gemv_cat", &int4_gemv_cat);
  m.impl("read_bytes", &read_bytes);
}
