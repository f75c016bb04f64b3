// The checks a batch passes before any kernel writes (CPU and CUDA alike), and the storage-order
// rule both kernels walk by. Kept out of the CPU kernel's file so the CUDA kernels can be built
// without it (the JIT build of the CUDA kernels beside a CPU-only extension, python/onepass/_ops.py).
#include "onepass_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cmath>

namespace onepass {
namespace {

bool same_strides_as_param_layout(const at::Tensor& state, const at::Tensor& param) {
  // State is created with zeros_like(param, preserve_format): the param's strides when the param
  // is dense, contiguous strides otherwise. Elements correspond by storage position.
  if (param.is_non_overlapping_and_dense()) return state.strides() == param.strides();
  return state.is_contiguous();
}

void check_state(const at::Tensor& s, const at::Tensor& p, at::ScalarType math, const char* name,
                 size_t i) {
  ONEPASS_CHECK(s.device() == p.device(), "onepass: ", name, "[", i, "] is on ", s.device(),
              " but its param is on ", p.device());
  ONEPASS_CHECK(s.scalar_type() == math, "onepass: ", name, "[", i, "] must be ", math,
              " for a ", p.scalar_type(), " param, got ", s.scalar_type());
  ONEPASS_CHECK(s.sizes() == p.sizes(), "onepass: ", name, "[", i, "] has shape ", s.sizes(),
              " but its param has shape ", p.sizes());
  ONEPASS_CHECK(same_strides_as_param_layout(s, p), "onepass: ", name, "[", i,
              "] does not have its param's memory layout (strides ", s.strides(), " vs ",
              p.strides(), ")");
}

}  // namespace

double read_step(const at::Tensor& st) {
  return st.scalar_type() == at::kFloat ? static_cast<double>(*static_cast<const float*>(st.data_ptr()))
                                        : *static_cast<const double*>(st.data_ptr());
}

void check_grad(const at::Tensor& p, const at::Tensor& g, size_t i) {
  ONEPASS_CHECK(g.layout() == at::kStrided, "onepass: grads[", i,
                "] is sparse; onepass supports dense gradients only (use torch.optim.SparseAdam)");
  ONEPASS_CHECK(g.scalar_type() == p.scalar_type(), "onepass: grads[", i, "] is ", g.scalar_type(),
                " but its param is ", p.scalar_type());
  ONEPASS_CHECK(g.device() == p.device(), "onepass: grads[", i, "] is on ", g.device(),
                " but its param on ", p.device());
  ONEPASS_CHECK(g.sizes() == p.sizes(), "onepass: grads[", i, "] has shape ", g.sizes(),
                " but its param has shape ", p.sizes());
}

DensePair dense_pair(const at::Tensor& param, const at::Tensor& grad) {
  DensePair out{param, grad, false};
  if (!param.is_non_overlapping_and_dense()) {
    // An overlapping or gappy param (rare: a view made a Parameter) is updated through a
    // contiguous copy; its state is contiguous (zeros_like with preserve_format).
    out.p = param.contiguous();
    out.copy_back = true;
  }
  if (grad.strides() != out.p.strides() || !grad.is_non_overlapping_and_dense()) {
    // A transposed or strided grad is copied into the param's layout first (torch's own fused
    // CPU AdamW reads it in the wrong order instead).
    out.g = at::empty_like(out.p);
    out.g.copy_(grad);
  }
  return out;
}

void validate_batch(const BatchArgs& a, c10::DeviceType device_type) {
  const size_t n = a.params.size();
  ONEPASS_CHECK(a.grads.size() == n && a.exp_avgs.size() == n && a.exp_avg_sqs.size() == n &&
                  a.steps.size() == n,
              "onepass: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length (",
              n, ", ", a.grads.size(), ", ", a.exp_avgs.size(), ", ", a.exp_avg_sqs.size(), ", ",
              a.steps.size(), ")");
  ONEPASS_CHECK(!a.amsgrad || a.max_exp_avg_sqs.size() == n,
              "onepass: amsgrad needs one max_exp_avg_sq per param, got ", a.max_exp_avg_sqs.size(),
              " for ", n, " params");
  ONEPASS_CHECK(a.lr >= 0.0, "onepass: invalid learning rate ", a.lr);
  if (a.lr_tensor.has_value())
    ONEPASS_CHECK(a.lr_tensor->numel() == 1, "onepass: a Tensor lr must have one element");
  if (a.grad_scale.has_value())
    ONEPASS_CHECK(a.grad_scale->numel() == 1, "onepass: grad_scale must have one element");
  if (a.found_inf.has_value())
    ONEPASS_CHECK(a.found_inf->numel() == 1, "onepass: found_inf must have one element");
  if (n == 0) return;
  const c10::Device dev = a.params[0].device();
  ONEPASS_CHECK(dev.type() == device_type, "onepass: this kernel runs on ", device_type,
              " tensors, got ", dev);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    const at::Tensor& g = a.grads[i];
    const at::ScalarType dtype = p.scalar_type();
    ONEPASS_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                    dtype == at::kHalf,
                "onepass: params[", i, "] is ", dtype,
                "; params must be float32, float64, bfloat16 or float16");
    ONEPASS_CHECK(p.layout() == at::kStrided, "onepass: params[", i, "] is not a strided tensor");
    ONEPASS_CHECK(p.device() == dev, "onepass: all params of one group must be on one device; params[",
                i, "] is on ", p.device(), ", params[0] on ", dev);
    check_grad(p, g, i);
    const at::ScalarType math = dtype == at::kDouble ? at::kDouble : at::kFloat;
    check_state(a.exp_avgs[i], p, math, "exp_avgs", i);
    check_state(a.exp_avg_sqs[i], p, math, "exp_avg_sqs", i);
    if (a.amsgrad) check_state(a.max_exp_avg_sqs[i], p, math, "max_exp_avg_sqs", i);
    const at::Tensor& st = a.steps[i];
    // Host step counts, or (capturable, CUDA) counts on the params' device.
    ONEPASS_CHECK(st.numel() == 1 && (st.device().is_cpu() || st.device() == dev) &&
                    (st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble),
                "onepass: steps[", i, "] must be a one-element float32/float64 tensor on the CPU",
                " or the params' device, got ", st.scalar_type(), " with ", st.numel(),
                " elements on ", st.device());
    if (st.device().is_cpu()) {  // a device count cannot be read here without a sync
      const double t = read_step(st);
      ONEPASS_CHECK(t >= 0.0 && t == std::floor(t) && t < 16777216.0, "onepass: steps[", i,
                    "] holds ", t, ", not a whole number in [0, 2**24) (a float32 step count)");
    }
  }
}

}  // namespace onepass
