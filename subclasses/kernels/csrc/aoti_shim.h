// C entry points of this library's ops for AOTInductor packages. A package built with
// aot_inductor.custom_ops_to_c_shims (subclasses/kernels/int4_gemv.py: package_c_shims) calls
// aoti_torch_cpu_<op> directly; without it every call goes through the proxy executor, which boxes
// the arguments into IValues and dispatches (~151 calls per SmolLM2 token). The package resolves these
// symbols when it loads: the library is made global first (int4_gemv.py). Each entry point records a
// profiler event under the op's name, as the dispatcher would (perf/decode_profile.py reads them; free
// when no profiler runs).
#pragma once
#include <ATen/record_function.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#define UNWRAP_SHIM extern "C" __attribute__((visibility("default"))) AOTITorchError

namespace unwrap_cpu {
inline const at::Tensor& tensor_of(AtenTensorHandle handle) {
  return *torch::aot_inductor::tensor_handle_to_tensor_pointer(handle);
}
inline std::vector<at::Tensor> tensors_of(const AtenTensorHandle* handles, int64_t count) {
  return torch::aot_inductor::pointer_to_list<at::Tensor>(handles, count);
}
inline AtenTensorHandle handle_of(at::Tensor&& tensor) { return torch::aot_inductor::new_tensor_handle(std::move(tensor)); }

// The entry point of an op (x, packed, group_size, scale_and_zero) -> Tensor named `name` (int4_gemv, int4_gemm).
template <typename Op>
AOTITorchError call_int4_op(const char* name, Op op, AtenTensorHandle x, AtenTensorHandle packed, int64_t group_size,
                            AtenTensorHandle scale_and_zero, AtenTensorHandle* out) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    const at::Tensor &xt = tensor_of(x), &p = tensor_of(packed), &s = tensor_of(scale_and_zero);
    RECORD_FUNCTION(name, std::vector<c10::IValue>({xt, p, group_size, s}));
    *out = handle_of(op(xt, p, group_size, s));
  });
}
}  // namespace unwrap_cpu
