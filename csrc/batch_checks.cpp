// The checks a batch passes before any kernel writes (CPU and CUDA alike), and the storage-order
// rule both kernels walk by. Kept out of the CPU kernel's file so the CUDA kernels can be built
// without it (the JIT build of the CUDA kernels beside a CPU-only extension, python/onepass/_ops.py).
#include "group_plan.h"
#include "onepass_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <cstdlib>

namespace onepass {
namespace {

// A tensor of the batch whose storage no longer holds its elements (storage_holds).
void check_holds(const at::Tensor& t, const char* name, size_t i) {
  ONEPASS_CHECK(storage_holds(t), "onepass: ", name, "[", i, "] has ",
                t.has_storage() ? t.unsafeGetTensorImpl()->unsafe_storage().nbytes() : 0,
                " bytes of storage, too few for its shape ", t.sizes(),
                " (its storage was resized or freed in place)");
}

bool same_strides_as_param_layout(const at::Tensor& state, const at::Tensor& param) {
  // State is created with zeros_like(param, preserve_format): the param's strides when the param
  // is dense, contiguous strides otherwise. Elements correspond by storage position.
  if (param.is_non_overlapping_and_dense()) return same_dims(state.strides(), param.strides());
  return state.is_contiguous();
}

void check_state(const at::Tensor& s, const at::Tensor& p, at::ScalarType math, const char* name,
                 size_t i, bool contiguous = false) {
  ONEPASS_CHECK(s.device() == p.device(), "onepass: ", name, "[", i, "] is on ", s.device(),
              " but its param is on ", p.device());
  ONEPASS_CHECK(s.scalar_type() == math, "onepass: ", name, "[", i, "] must be ", math,
              " for a ", p.scalar_type(), " param, got ", s.scalar_type());
  ONEPASS_CHECK(same_dims(s.sizes(), p.sizes()), "onepass: ", name, "[", i, "] has shape ", s.sizes(),
              " but its param has shape ", p.sizes());
  check_holds(s, name, i);
  if (contiguous) {
    ONEPASS_CHECK(s.is_contiguous(), "onepass: ", name, "[", i,
                  "] of int8 state must be contiguous (strides ", s.strides(), ")");
    return;
  }
  ONEPASS_CHECK(same_strides_as_param_layout(s, p), "onepass: ", name, "[", i,
              "] does not have its param's memory layout (strides ", s.strides(), " vs ",
              p.strides(), ")");
}

// An int8 moment's absmax: contiguous float32 [rows, blocks per row] (reference.absmax_shape).
void check_absmax(const at::Tensor& s, const at::Tensor& p, const char* name, size_t i) {
  const int64_t n = p.numel();
  const int64_t rows = p.dim() < 2 ? 1 : p.size(0);
  const int64_t len = p.dim() < 2 ? n : (rows ? n / rows : 0);
  const int64_t blocks = (len + 255) / 256;
  ONEPASS_CHECK(s.device() == p.device() && s.scalar_type() == at::kFloat && s.dim() == 2 &&
                    s.size(0) == rows && s.size(1) == blocks && s.is_contiguous(),
                "onepass: ", name, "[", i, "] must be a contiguous float32 tensor of shape [",
                rows, ", ", blocks, "] on ", p.device(), ", got ", s.scalar_type(), " ",
                s.sizes(), " on ", s.device());
  check_holds(s, name, i);
}

// Param i's state tensors against it (validate_batch's per-param state checks).
void check_batch_state(const BatchArgs& a, size_t i, at::ScalarType math) {
  const at::Tensor& p = a.params[i];
  const int fmt = a.state_format;
  const int rnd = a.param_rounding;
  const at::ScalarType sdt = fmt == 0 ? math : fmt == 1 ? at::kBFloat16 : at::kByte;
  check_state(a.exp_avgs[i], p, sdt, "exp_avgs", i, fmt == 2);
  check_state(a.exp_avg_sqs[i], p, sdt, "exp_avg_sqs", i, fmt == 2);
  if (fmt == 2) {
    check_absmax(a.exp_avg_absmaxs[i], p, "exp_avg_absmaxs", i);
    check_absmax(a.exp_avg_sq_absmaxs[i], p, "exp_avg_sq_absmaxs", i);
  }
  if (rnd == 2) {
    const at::Tensor& c = a.kahan_comps[i];
    ONEPASS_CHECK(c.device() == p.device() && c.scalar_type() == at::kBFloat16 &&
                      same_dims(c.sizes(), p.sizes()) && c.layout() == at::kStrided,
                  "onepass: kahan_comps[", i, "] must be a bfloat16 tensor of shape ", p.sizes(),
                  " on ", p.device(), ", got ", c.scalar_type(), " ", c.sizes(), " on ",
                  c.device());
    check_holds(c, "kahan_comps", i);
  }
  if (a.amsgrad) check_state(a.max_exp_avg_sqs[i], p, math, "max_exp_avg_sqs", i);
}

}  // namespace

double read_step(const at::Tensor& st) {
  // (raw_data: a step count is a one-element CPU tensor with storage wherever this is called,
  // and data_ptr()'s checks were a third of this read in a 2000-tensor step)
  return count_at(raw_data(st), st.scalar_type() == at::kDouble);
}

int64_t advance_step(const at::Tensor& st) {
  return advance_count_at(const_cast<void*>(raw_data(st)), st.scalar_type() == at::kDouble);
}

void check_step_tensor(const at::Tensor& st, size_t i) {
  ONEPASS_CHECK(st.numel() == 1 && st.device().is_cpu() && storage_holds(st) &&
                    (st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble),
                "onepass: steps[", i, "] must be a one-element float32/float64 CPU tensor");
}

void check_grad(const at::Tensor& p, const at::Tensor& g, size_t i) {
  ONEPASS_CHECK(g.layout() == at::kStrided, "onepass: grads[", i,
                "] is sparse; onepass supports dense gradients only (use torch.optim.SparseAdam)");
  ONEPASS_CHECK(g.scalar_type() == p.scalar_type(), "onepass: grads[", i, "] is ", g.scalar_type(),
                " but its param is ", p.scalar_type());
  ONEPASS_CHECK(g.device() == p.device(), "onepass: grads[", i, "] is on ", g.device(),
                " but its param on ", p.device());
  ONEPASS_CHECK(same_dims(g.sizes(), p.sizes()), "onepass: grads[", i, "] has shape ", g.sizes(),
                " but its param has shape ", p.sizes());
  check_holds(g, "grads", i);
}

DensePair dense_pair(const at::Tensor& param, const at::Tensor& grad) {
  DensePair out{param, grad, false};
  if (!walks_in_place(param, false)) {
    // An overlapping or gappy param (rare: a view made a Parameter) is updated through a
    // contiguous copy; its state is contiguous (zeros_like with preserve_format).
    out.p = param.contiguous();
    out.copy_back = true;
  }
  if (!in_walk_layout(grad, out.p, false)) {
    // A transposed or strided grad is copied into the param's layout first (torch's own fused
    // CPU AdamW reads it in the wrong order instead).
    out.g = at::empty_like(out.p);
    out.g.copy_(grad);
  }
  return out;
}

int parse_state_format(const std::string& s) {
  if (s == "fp32") return 0;
  if (s == "bf16") return 1;
  if (s == "int8") return 2;
  ONEPASS_CHECK(false, "onepass: unknown state format '", s, "' (fp32, bf16 or int8)");
  return 0;
}

int parse_param_rounding(const std::string& s) {
  if (s == "nearest") return 0;
  if (s == "stochastic") return 1;
  if (s == "kahan") return 2;
  ONEPASS_CHECK(false, "onepass: unknown param_rounding '", s, "' (nearest, stochastic or kahan)");
  return 0;
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
  const int fmt = a.state_format;
  const int rnd = a.param_rounding;
  ONEPASS_CHECK(fmt >= 0 && fmt <= 2, "onepass: unknown state format ", fmt);
  ONEPASS_CHECK(rnd >= 0 && rnd <= 2, "onepass: unknown param_rounding ", rnd);
  ONEPASS_CHECK(fmt == 0 || !a.amsgrad, "onepass: amsgrad needs state_dtype='fp32'");
  ONEPASS_CHECK(a.seed >= 0 && a.seed < (int64_t(1) << 32), "onepass: seed must be in [0, 2**32), got ",
                static_cast<long long>(a.seed));
  if (fmt == 2) {
    ONEPASS_CHECK(a.exp_avg_absmaxs.size() == n && a.exp_avg_sq_absmaxs.size() == n,
                  "onepass: int8 state needs one exp_avg_absmax and exp_avg_sq_absmax per param, got ",
                  a.exp_avg_absmaxs.size(), " and ", a.exp_avg_sq_absmaxs.size(), " for ", n,
                  " params");
    ONEPASS_CHECK(a.qtables != nullptr && a.qtables->defined(),
                  "onepass: int8 state needs qtables (onepass.quant.tables())");
    const at::Tensor& q = *a.qtables;
    ONEPASS_CHECK(q.scalar_type() == at::kFloat && q.dim() == 1 && q.numel() == 1022 &&
                      q.is_contiguous() && (n == 0 || q.device() == a.params[0].device()),
                  "onepass: qtables must be a contiguous float32 tensor of 1022 values on the "
                  "params' device (onepass.quant.tables()), got ", q.scalar_type(), " ",
                  q.sizes(), " on ", q.device());
  }
  if (rnd == 2)
    ONEPASS_CHECK(a.kahan_comps.size() == n, "onepass: kahan rounding needs one compensation per "
                  "param, got ", a.kahan_comps.size(), " for ", n, " params");
  if (n == 0) return;
  const c10::Device dev = a.params[0].device();
  ONEPASS_CHECK(dev.type() == device_type, "onepass: this kernel runs on ", device_type,
              " tensors, got ", dev);
  if (a.state_checked && a.grad_data != nullptr) return;  // (the plan's gather checked the grads)
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    const at::Tensor& g = a.grads[i];
    if (a.state_checked) {
      // The params, their state and step counts passed every check below and have not changed
      // (the plan's gather saw each param's storage, shape and dtype unchanged); the caller
      // checks the counts' values (check_step_value) as it reads them.
      check_grad(p, g, i);
      continue;
    }
    const at::ScalarType dtype = p.scalar_type();
    ONEPASS_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                    dtype == at::kHalf,
                "onepass: params[", i, "] is ", dtype,
                "; params must be float32, float64, bfloat16 or float16");
    ONEPASS_CHECK(p.layout() == at::kStrided, "onepass: params[", i, "] is not a strided tensor");
    check_holds(p, "params", i);
    ONEPASS_CHECK(p.device() == dev, "onepass: all params of one group must be on one device; params[",
                i, "] is on ", p.device(), ", params[0] on ", dev);
    check_grad(p, g, i);
    const at::ScalarType math = dtype == at::kDouble ? at::kDouble : at::kFloat;
    ONEPASS_CHECK(fmt == 0 || math == at::kFloat, "onepass: ", fmt == 1 ? "bf16" : "int8",
                  " state is for float32/bf16/fp16 params, got ", dtype);
    ONEPASS_CHECK(rnd == 0 || dtype == at::kBFloat16, "onepass: param_rounding=",
                  rnd == 1 ? "'stochastic'" : "'kahan'", " is for bfloat16 params, got ", dtype);
    check_batch_state(a, i, math);
    const at::Tensor& st = a.steps[i];
    // Host step counts, or (capturable, CUDA) counts on the params' device.
    ONEPASS_CHECK(st.numel() == 1 && (st.device().is_cpu() || st.device() == dev) && storage_holds(st) &&
                    (st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble),
                "onepass: steps[", i, "] must be a one-element float32/float64 tensor on the CPU",
                " or the params' device, got ", st.scalar_type(), " with ", st.numel(),
                " elements on ", st.device());
    if (st.device().is_cpu()) check_step_value(read_step(st), i);  // (a device count: no sync)
  }
}

bool validate_planned_state(PlanPart& part, BatchArgs& a, c10::DeviceType device_type) {
  const bool known = part.state_checked;
  a.state_checked = known;
  validate_batch(a, device_type);
  part.state_checked = true;  // unchanged until the optimizer makes a new plan
  return known;
}

void validate_planned(PlanPart& part, BatchArgs& a, c10::DeviceType device_type) {
  if (validate_planned_state(part, a, device_type))  // the counts' values are left to us
    for (size_t i = 0; i < a.steps.size(); ++i)
      if (a.steps[i].device().is_cpu()) check_step_value(read_step(a.steps[i]), i);
}

void bad_step_value(double t, size_t i) {
  ONEPASS_CHECK(false, "onepass: steps[", i, "] holds ", t,
                ", not a whole number in [0, 2**53] (a step count)");
  std::abort();  // (not reached: ONEPASS_CHECK(false, ...) throws)
}

}  // namespace onepass
