// C entry points of this library's ops for AOTInductor packages. A package built with
// aot_inductor.custom_ops_to_c_shims (subclasses/kernels/int4_gemv.py: c_shims) calls
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
}  // namespace unwrap_cpu
