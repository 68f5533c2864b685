// unwrap_qparams::int4_mse: the int4 "mse" and "clip" qparams searches of subclasses/int4_qparams.py
// (_mse_chunk), one group at a time, in C++. It must return exactly what the eager PyTorch code
// returns (tested on every dtype and group size), so each step below is that code's ops in that
// code's order and precision: no fused multiply-adds (built with -ffp-contract=off), no fast-math.
// Groups are searched 16 at a time, one per vector lane. Every sum of the search is a sum of integers (the group is rounded to 13-bit integers u), exact in
// any order; the two squared errors at the end follow _tree_sum's order. Groups are independent:
// the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr float kFixed = 4096.0f;  // FIXED
constexpr double kEps = 1e-6;      // int4_packing.EPS
constexpr int64_t kMaxGroup = 256;
// Groups are searched kLanes at a time, stored element-major ([i][lane]): every step is a loop over
// the lanes that the compiler vectorizes, and a group's sums accumulate within its own lane.
constexpr int64_t kLanes = 16;
using Lanes = float[kLanes];

// torch's double -> dtype copy: through float for the 16-bit types.
template <typename T> T from_double(double v) { return static_cast<T>(static_cast<float>(v)); }

struct Best {
  double gain[kLanes], s[kLanes], qbar[kLanes];
};

// _fit: codes q = clamp(round(u * a + b), 0, 15) in A's precision (float for the grid candidates,
// double for the refinements), h * q in A's precision, then the exact sums and the line fit.
template <typename A>
void fit(const Lanes* u, const Lanes* h, int64_t g, const double* sum_h, const double* sum_hu, const A* a, const A* b,
         Best& best) {
  double sum_hq[kLanes] = {}, sum_hqq[kLanes] = {}, sum_hqu[kLanes] = {};
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < kLanes; ++j) {
      const A q = std::min(std::max(std::nearbyint(static_cast<A>(u[i][j]) * a[j] + b[j]), A(0)), A(15));
      const double hq = static_cast<double>(static_cast<A>(h[i][j]) * q);
      sum_hq[j] += hq;
      sum_hqq[j] += hq * static_cast<double>(q);
      sum_hqu[j] += hq * static_cast<double>(u[i][j]);
    }
  for (int64_t j = 0; j < kLanes; ++j) {
    double var_q = sum_hqq[j] - sum_hq[j] * sum_hq[j] / sum_h[j];
    const double cov = sum_hqu[j] - sum_hq[j] * sum_hu[j] / sum_h[j];
    const bool ok = var_q > 0;
    var_q = ok ? var_q : 1.0;
    const double gain = ok ? cov * cov / var_q : 0.0;
    const bool better = gain > best.gain[j];
    best.gain[j] = better ? gain : best.gain[j];
    best.s[j] = better ? cov / var_q : best.s[j];
    best.qbar[j] = better ? sum_hq[j] / sum_h[j] : best.qbar[j];
  }
}

// _error: per lane, the squared error of codes q with the stored scale and zero, summed as
// _tree_sum does (t is scratch [g][kLanes]).
template <typename T>
void error(const Lanes* x, const uint8_t (*q)[kLanes], const T* scale, const T* zero, int64_t g, double (*t)[kLanes],
           double* out) {
  float s[kLanes], z[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) s[j] = static_cast<float>(scale[j]), z[j] = static_cast<float>(zero[j]);
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float deq = (static_cast<float>(q[i][j]) - 8.0f) * s[j] + z[j];
      const double d = static_cast<double>(deq) - static_cast<double>(x[i][j]);
      t[i][j] = d * d;
    }
  for (int64_t n = g; n > 1; n /= 2)
    for (int64_t i = 0; i < n / 2; ++i)
      for (int64_t j = 0; j < kLanes; ++j) t[i][j] = t[i][j] + t[i + n / 2][j];
  for (int64_t j = 0; j < kLanes; ++j) out[j] = t[0][j];
}

// The groups [first, first + count) (count <= kLanes) of w [groups, g]: the C++ _mse_chunk.
template <typename T>
void block(const T* w, const uint8_t* old_q, const T* old_scale, const T* old_zero, int64_t first, int64_t count,
           int64_t g, const std::vector<double>& candidates, const std::vector<double>& offsets, int64_t refinements,
           std::optional<double> mean_weight, uint8_t* out_q, T* out_scale, T* out_zero) {
  alignas(64) Lanes x[kMaxGroup], u[kMaxGroup], h[kMaxGroup];
  alignas(64) uint8_t q[kMaxGroup][kLanes], oq[kMaxGroup][kLanes];
  alignas(64) double t[kMaxGroup][kLanes];
  T os[kLanes], oz[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) {  // missing lanes: zero groups, searched and dropped
    const bool real = j < count;
    for (int64_t i = 0; i < g; ++i) {
      x[i][j] = real ? static_cast<float>(w[(first + j) * g + i]) : 0.0f;
      oq[i][j] = real ? old_q[(first + j) * g + i] : 0;
    }
    os[j] = real ? old_scale[first + j] : T(1.0f);
    oz[j] = real ? old_zero[first + j] : T(0.0f);
  }
  float amax[kLanes], to_fixed[kLanes], sum_abs[kLanes] = {}, low[kLanes], high[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) amax[j] = 0.0f, low[j] = INFINITY, high[j] = -INFINITY;
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < kLanes; ++j) amax[j] = std::max(amax[j], std::abs(x[i][j]));
  for (int64_t j = 0; j < kLanes; ++j) {
    amax[j] = std::max(amax[j], 1e-30f);
    to_fixed[j] = (1.0f / amax[j]) * kFixed;  // FIXED / amax is amax.reciprocal() * FIXED
  }
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < kLanes; ++j) {
      u[i][j] = std::nearbyint(x[i][j] * to_fixed[j]);
      sum_abs[j] += std::abs(u[i][j]);
      low[j] = std::min(low[j], u[i][j]);
      high[j] = std::max(high[j], u[i][j]);
    }
  double sum_h[kLanes] = {}, sum_hu[kLanes] = {};
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < kLanes; ++j) {
      h[i][j] = mean_weight ? static_cast<float>(g) * std::abs(u[i][j]) + static_cast<float>(*mean_weight) * sum_abs[j]
                          : 1.0f;
      sum_h[j] += static_cast<double>(h[i][j]);
      sum_hu[j] += static_cast<double>(h[i][j]) * static_cast<double>(u[i][j]);
    }
  float span[kLanes];
  Best best;
  for (int64_t j = 0; j < kLanes; ++j) {
    sum_h[j] = std::max(sum_h[j], 1.0);
    span[j] = std::max(high[j] - low[j], 1.0f);
    best.gain[j] = -1.0, best.s[j] = 0.0, best.qbar[j] = 0.0;
  }
  for (size_t c = 0; c < candidates.size(); ++c) {
    float a[kLanes], b[kLanes];
    const float offset = static_cast<float>(offsets[c]);
    for (int64_t j = 0; j < kLanes; ++j) {
      a[j] = (1.0f / span[j]) * static_cast<float>(candidates[c]);  // c / span: reciprocal, times
      b[j] = -low[j] * a[j] + offset;
    }
    fit<float>(u, h, g, sum_h, sum_hu, a, b, best);
  }
  for (int64_t r = 0; r < refinements; ++r) {
    double a[kLanes], b[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) {
      a[j] = 1.0 / (best.s[j] > 0 ? best.s[j] : 1.0);
      b[j] = best.qbar[j] - sum_hu[j] / sum_h[j] * a[j];
    }
    fit<double>(u, h, g, sum_h, sum_hu, a, b, best);
  }
  T scale[kLanes], zero[kLanes];
  float scale32[kLanes], zero32[kLanes];
  const T eps = from_double<T>(kEps);
  for (int64_t j = 0; j < kLanes; ++j) {
    const double unit = static_cast<double>(amax[j]) / static_cast<double>(kFixed);
    scale[j] = std::max(from_double<T>(best.s[j] * unit), eps);
    scale32[j] = static_cast<float>(scale[j]);
    zero[j] = from_double<T>(sum_hu[j] / sum_h[j] * unit + static_cast<double>(scale32[j]) * (8 - best.qbar[j]));
    zero32[j] = static_cast<float>(zero[j]);
  }
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < kLanes; ++j)
      q[i][j] = static_cast<uint8_t>(
          std::min(std::max(std::nearbyint((x[i][j] - zero32[j]) / scale32[j] + 8.0f), 0.0f), 15.0f));
  double ours[kLanes], theirs[kLanes];
  error(x, q, scale, zero, g, t, ours);
  error(x, oq, os, oz, g, t, theirs);
  for (int64_t j = 0; j < count; ++j) {
    const bool keep = ours[j] < theirs[j] * (1 - 1e-9);
    for (int64_t i = 0; i < g; ++i) out_q[(first + j) * g + i] = keep ? q[i][j] : oq[i][j];
    out_scale[first + j] = keep ? scale[j] : os[j];
    out_zero[first + j] = keep ? zero[j] : oz[j];
  }
}

template <typename T>
void search(const at::Tensor& w, const at::Tensor& old_q, const at::Tensor& old_scale, const at::Tensor& old_zero,
            const std::vector<double>& candidates, const std::vector<double>& offsets, int64_t refinements,
            std::optional<double> mean_weight, at::Tensor& q, at::Tensor& scale, at::Tensor& zero) {
  const int64_t groups = w.size(0), g = w.size(1);
  const T* pw = w.const_data_ptr<T>();
  const uint8_t* pq = old_q.const_data_ptr<uint8_t>();
  const T *ps = old_scale.const_data_ptr<T>(), *pz = old_zero.const_data_ptr<T>();
  uint8_t* oq = q.data_ptr<uint8_t>();
  T *os = scale.data_ptr<T>(), *oz = zero.data_ptr<T>();
  at::parallel_for(0, (groups + kLanes - 1) / kLanes, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      block<T>(pw, pq, ps, pz, b * kLanes, std::min(kLanes, groups - b * kLanes), g, candidates, offsets, refinements,
               mean_weight, oq, os, oz);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_mse(const at::Tensor& w_in, const at::Tensor& q_in,
                                                         const at::Tensor& scale_in, const at::Tensor& zero_in,
                                                         at::ArrayRef<double> candidates, at::ArrayRef<double> offsets,
                                                         int64_t refinements, std::optional<double> mean_weight) {
  const at::Tensor w = w_in.contiguous(), old_q = q_in.contiguous();
  const at::Tensor old_scale = scale_in.contiguous(), old_zero = zero_in.contiguous();
  TORCH_CHECK(w.dim() == 2, "int4_mse: w must be [groups, group_size], got ", w.sizes());
  const int64_t groups = w.size(0), g = w.size(1);
  TORCH_CHECK(g >= 1 && g <= kMaxGroup && (g & (g - 1)) == 0, "int4_mse: group_size=", g,
              " must be a power of two <= ", kMaxGroup);
  TORCH_CHECK(old_q.scalar_type() == at::kByte && old_q.sizes() == w.sizes(), "int4_mse: q must be uint8 ",
              w.sizes(), ", got ", old_q.scalar_type(), " ", old_q.sizes());
  for (const at::Tensor* t : {&old_scale, &old_zero})
    TORCH_CHECK(t->scalar_type() == w.scalar_type() && t->dim() == 1 && t->size(0) == groups,
                "int4_mse: scale and zero must be [", groups, "] in w's dtype, got ", t->sizes(), " ",
                t->scalar_type());
  at::Tensor q = at::empty_like(old_q), scale = at::empty_like(old_scale), zero = at::empty_like(old_zero);
  TORCH_CHECK(offsets.size() == candidates.size(), "int4_mse: ", candidates.size(), " candidates but ", offsets.size(),
              " offsets");
  const std::vector<double> cands(candidates.begin(), candidates.end()), offs(offsets.begin(), offsets.end());
  switch (w.scalar_type()) {
    case at::kFloat: search<float>(w, old_q, old_scale, old_zero, cands, offs, refinements, mean_weight, q, scale, zero); break;
    case at::kBFloat16: search<c10::BFloat16>(w, old_q, old_scale, old_zero, cands, offs, refinements, mean_weight, q, scale, zero); break;
    case at::kHalf: search<c10::Half>(w, old_q, old_scale, old_zero, cands, offs, refinements, mean_weight, q, scale, zero); break;
    default: TORCH_CHECK(false, "int4_mse: w dtype must be float32, bfloat16 or float16, got ", w.scalar_type());
  }
  return {q, scale, zero};
}

}  // namespace

TORCH_LIBRARY(unwrap_qparams, m) {
  m.def("int4_mse(Tensor w, Tensor q, Tensor scale, Tensor zero, float[] candidates, float[] offsets, "
        "int refinements, float? mean_weight) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unwrap_qparams, CPU, m) { m.impl("int4_mse", &int4_mse); }
