// Registration of the onepass custom ops (torch.library) and the Python module stub.
//
// Built two ways: as onepass._C (setup.py: the schema, the CPU kernels and, with nvcc, the CUDA
// kernels), or with ONEPASS_CUDA_ADDON as a JIT-built module holding only the CUDA kernels, loaded
// beside a CPU-only onepass._C that already defines the schema (python/onepass/_ops.py).
//
// The ops are registered with TORCH_LIBRARY so torch.compile and CUDA graphs can treat a whole
// step as one opaque op; python/onepass/_ops.py adds the fake (meta) implementations.
#include "adam_math.h"
#include "group_plan.h"
#include "onepass_ops.h"

#include <torch/extension.h>
#include <torch/library.h>

#ifndef ONEPASS_CUDA_ADDON
namespace onepass {
namespace {

// The C++ twin of reference.step_scalars, exposed so the tests can compare the two directly.
std::vector<double> step_scalars_op(int64_t step, double lr, double beta1, double beta2, double eps,
                                    double weight_decay, bool decoupled, bool f64) {
  auto pack = [](const auto& s) {
    return std::vector<double>{s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps,
                               s.weight_decay, s.decay, s.step_size, s.inv_bc2_sqrt};
  };
  if (f64) return pack(make_step_scalars<double>(step, lr, beta1, beta2, eps, weight_decay, decoupled, 1.0));
  return pack(make_step_scalars<float>(step, lr, beta1, beta2, eps, weight_decay, decoupled, 1.0));
}

// The float3 maps' bit-level code search and decoding (adam_math.h), exposed so the tests can
// hold them against quant's tables and reference.quantize_blocks' search.
at::Tensor float_map_codes_op(const at::Tensor& x, bool is_signed) {
  ONEPASS_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
                "onepass._float_map_codes: a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(at::kByte));
  const float* src = xc.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t i = 0; i < xc.numel(); ++i)
    dst[i] = static_cast<uint8_t>(is_signed ? float_map_code_m(src[i]) : float_map_code_v(src[i]));
  return out;
}

at::Tensor float_map_values_op(bool is_signed) {
  at::Tensor out = at::empty({256}, at::TensorOptions().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  for (uint32_t q = 0; q < 256; ++q) dst[q] = is_signed ? float_map_value_m(q) : float_map_value_v(q);
  return out;
}

}  // namespace
}  // namespace onepass

TORCH_LIBRARY(onepass, m) {
  // One Adam(W) step over every tensor of a batch, in place. Each param's step count is
  // incremented and its per-step scalars are computed from it (make_step_scalars). Nothing changes
  // when found_inf is non-zero.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, *, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, bool decoupled, Tensor? grad_scale, Tensor? found_inf) -> ()");
  // The checks of adam_step_, writing nothing (same arguments).
  m.def(
      "adam_check(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] max_exp_avg_sqs, Tensor[] steps, *, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, bool decoupled, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  // adam_step_ with low-precision storage (python/onepass/reference.py, "Storage"): state_format
  // "fp32" | "bf16" | "int8" (uint8 codes in exp_avgs / exp_avg_sqs, float32 absmax lists of shape
  // reference.absmax_shape, qtables = onepass.quant.tables()), param_rounding "nearest" |
  // "stochastic" | "kahan" (bf16 compensations in kahan_comps) for bf16 params, and the seed of
  // the random streams. CPU and CUDA kernels.
  m.def(
      "adam_step_lowp_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, *, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, bool decoupled, Tensor? grad_scale, Tensor? found_inf, str state_format, "
      "Tensor(f!)[] exp_avg_absmaxs, Tensor(g!)[] exp_avg_sq_absmaxs, Tensor? qtables, "
      "str param_rounding, Tensor(h!)[] kahan_comps, int seed) -> ()");
  // adam_step_lowp_ that also writes each param's update statistics (reference.update_statistics:
  // sum of w^2 and of dw^2) into stats, float64 [params, 2]; the CPU kernels only so far.
  m.def(
      "adam_step_stats_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, *, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, bool decoupled, Tensor? grad_scale, Tensor? found_inf, str state_format, "
      "Tensor(f!)[] exp_avg_absmaxs, Tensor(g!)[] exp_avg_sq_absmaxs, Tensor? qtables, "
      "str param_rounding, Tensor(h!)[] kahan_comps, int seed, Tensor(i!) stats) -> ()");
  // The checks of adam_step_lowp_, writing nothing (same arguments).
  m.def(
      "adam_check_lowp(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] max_exp_avg_sqs, Tensor[] steps, *, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, bool decoupled, "
      "Tensor? grad_scale, Tensor? found_inf, str state_format, Tensor[] exp_avg_absmaxs, "
      "Tensor[] exp_avg_sq_absmaxs, Tensor? qtables, str param_rounding, Tensor[] kahan_comps, "
      "int seed) -> ()");
  m.def("_step_scalars(int step, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool decoupled, bool f64) -> float[]",
        &onepass::step_scalars_op);
  m.def("_float_map_codes(Tensor x, bool signed) -> Tensor", &onepass::float_map_codes_op);
  m.def("_float_map_values(bool signed) -> Tensor", &onepass::float_map_values_op);
  m.def("_cpu_isa() -> str", &onepass::cpu_isa_get);
  m.def("_cpu_isa_supported() -> str[]", &onepass::cpu_isa_supported);
  m.def("_cpu_isa_set(str name) -> ()", &onepass::cpu_isa_set);
}

#endif  // ONEPASS_CUDA_ADDON

namespace onepass {

// Increments CPU step-count tensors and returns the new counts: for backends whose kernels take
// the counts from the host (triton), where 2000 Python-side add_ calls cost ~7 ms a step.
std::vector<int64_t> bump_steps(at::TensorList steps) {
  for (size_t i = 0; i < steps.size(); ++i) check_step_tensor(steps[i], i);
  std::vector<int64_t> out(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) out[i] = advance_step(steps[i]);
  return out;
}
// Checks each (param, grad) pair as validate_batch does and returns an int64 [n, 3] table of
// (param address, grad address, flags: 1 = param contiguous, 2 = grad contiguous). For backends
// that build device tables on the host (triton): ~2 us of Python per param otherwise.
at::Tensor pair_table(at::TensorList params, at::TensorList grads) {
  ONEPASS_CHECK(params.size() == grads.size(), "onepass: ", params.size(), " params but ",
                grads.size(), " grads");
  at::Tensor out = at::empty({static_cast<int64_t>(params.size()), 3}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    check_grad(p, g, i);
    o[3 * i] = reinterpret_cast<int64_t>(p.data_ptr());
    o[3 * i + 1] = reinterpret_cast<int64_t>(g.data_ptr());
    o[3 * i + 2] = (p.is_contiguous() ? 1 : 0) | (g.is_contiguous() ? 2 : 0);
  }
  return out;
}

}  // namespace onepass

// The extension is loaded as the Python module onepass._C; importing it runs the registrations.
// It also binds the CPU kernel directly: calling torch.ops.onepass.adam_step_ from Python converts
// six lists through the dispatcher's boxed IValue path, ~1.2 us per param (2.4 ms per step for
// the `small` case of 2000 tensors, a fifth of the step); pybind11's list conversion is ~10x
// cheaper. Eager steps use this binding, traced code (torch.compile) the registered op; both run
// the same function.
namespace {
using TVec = std::vector<at::Tensor>;
using OptT = std::optional<at::Tensor>;
#ifndef ONEPASS_CUDA_ADDON
void step_direct(const TVec& p, const TVec& g, const TVec& m, const TVec& v, const TVec& vmax,
                 const TVec& steps, double lr, const OptT& lr_t, double b1, double b2, double eps,
                 double wd, bool ams, bool maximize, bool decoupled, const OptT& gs, const OptT& fi) {
  onepass::adam_step_cpu(p, g, m, v, vmax, steps, lr, lr_t, b1, b2, eps, wd, ams, maximize,
                         decoupled, gs, fi);
}
void check_direct(const TVec& p, const TVec& g, const TVec& m, const TVec& v, const TVec& vmax,
                  const TVec& steps, double lr, const OptT& lr_t, double b1, double b2, double eps,
                  double wd, bool ams, bool maximize, bool decoupled, const OptT& gs, const OptT& fi) {
  onepass::adam_check_cpu(p, g, m, v, vmax, steps, lr, lr_t, b1, b2, eps, wd, ams, maximize,
                          decoupled, gs, fi);
}
void step_lowp_direct(const TVec& p, const TVec& g, const TVec& m, const TVec& v,
                      const TVec& vmax, const TVec& steps, double lr, const OptT& lr_t, double b1,
                      double b2, double eps, double wd, bool ams, bool maximize, bool decoupled,
                      const OptT& gs, const OptT& fi, const std::string& fmt, const TVec& am,
                      const TVec& av, const OptT& qt, const std::string& rnd, const TVec& comps,
                      int64_t seed) {
  onepass::adam_step_lowp_cpu(p, g, m, v, vmax, steps, lr, lr_t, b1, b2, eps, wd, ams, maximize,
                              decoupled, gs, fi, fmt, am, av, qt, rnd, comps, seed);
}
void step_stats_direct(const TVec& p, const TVec& g, const TVec& m, const TVec& v,
                       const TVec& vmax, const TVec& steps, double lr, const OptT& lr_t, double b1,
                       double b2, double eps, double wd, bool ams, bool maximize, bool decoupled,
                       const OptT& gs, const OptT& fi, const std::string& fmt, const TVec& am,
                       const TVec& av, const OptT& qt, const std::string& rnd, const TVec& comps,
                       int64_t seed, const at::Tensor& stats) {
  onepass::adam_step_stats_cpu(p, g, m, v, vmax, steps, lr, lr_t, b1, b2, eps, wd, ams, maximize,
                               decoupled, gs, fi, fmt, am, av, qt, rnd, comps, seed, stats);
}
void check_lowp_direct(const TVec& p, const TVec& g, const TVec& m, const TVec& v,
                       const TVec& vmax, const TVec& steps, double lr, const OptT& lr_t, double b1,
                       double b2, double eps, double wd, bool ams, bool maximize, bool decoupled,
                       const OptT& gs, const OptT& fi, const std::string& fmt, const TVec& am,
                       const TVec& av, const OptT& qt, const std::string& rnd, const TVec& comps,
                       int64_t seed) {
  onepass::adam_check_lowp_cpu(p, g, m, v, vmax, steps, lr, lr_t, b1, b2, eps, wd, ams, maximize,
                               decoupled, gs, fi, fmt, am, av, qt, rnd, comps, seed);
}
#endif  // ONEPASS_CUDA_ADDON
}  // namespace

#ifndef ONEPASS_CUDA_ADDON
namespace onepass {
void bind_group_plan(pybind11::module& m);  // group_plan.cpp
}  // namespace onepass
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pair_table", [](const TVec& p, const TVec& g) { return onepass::pair_table(p, g); },
        "check (param, grad) pairs; int64 [n, 3] of addresses, flags");
  m.def("bump_steps", [](const TVec& s) { return onepass::bump_steps(s); },
        "step += 1 for each CPU step tensor; returns the new counts");
#ifndef ONEPASS_CUDA_ADDON
  m.def("next_counts", [](const TVec& s) { return onepass::next_counts(s); },
        "the distinct values of count + 1 of CPU step tensors (checked)");
  m.def("triton_table", [](const TVec& p, const TVec& g, const TVec& s, const at::Tensor& statics,
                           const OptT& rows, double beta1, double beta2, bool math_f64,
                           int64_t seed, int64_t key_col, const std::vector<double>& hp, bool pin,
                           bool bump) {
          return onepass::triton_table(p, g, s, statics, rows, {beta1, beta2, math_f64, seed},
                                       key_col, hp, pin, bump);
        }, "the triton backend's packed per-step table of one launch (csrc/triton_table.cpp)",
        py::arg("params"), py::arg("grads"), py::arg("steps"), py::arg("statics"),
        py::arg("rows"), py::arg("beta1"), py::arg("beta2"), py::arg("math_f64"),
        py::arg("seed"), py::arg("key_col"), py::arg("hp"), py::arg("pin"),
        py::arg("bump") = false);
#endif
#ifndef ONEPASS_CUDA_ADDON
  onepass::bind_group_plan(m);
  m.def("adam_step_cpu", &step_direct, "onepass::adam_step_ on CPU tensors (eager)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("steps"), py::kw_only(), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"),
        py::arg("grad_scale"), py::arg("found_inf"));
  m.def("adam_check_cpu", &check_direct, "onepass::adam_check on CPU tensors (eager)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("steps"), py::kw_only(), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"),
        py::arg("grad_scale"), py::arg("found_inf"));
  m.def("adam_step_lowp_cpu", &step_lowp_direct, "onepass::adam_step_lowp_ on CPU tensors (eager)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("steps"), py::kw_only(), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("state_format"),
        py::arg("exp_avg_absmaxs"), py::arg("exp_avg_sq_absmaxs"), py::arg("qtables"),
        py::arg("param_rounding"), py::arg("kahan_comps"), py::arg("seed"));
  m.def("adam_step_stats_cpu", &step_stats_direct,
        "onepass::adam_step_stats_ on CPU tensors (eager)", py::arg("params"), py::arg("grads"),
        py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"),
        py::kw_only(), py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("decoupled"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("state_format"), py::arg("exp_avg_absmaxs"), py::arg("exp_avg_sq_absmaxs"),
        py::arg("qtables"), py::arg("param_rounding"), py::arg("kahan_comps"), py::arg("seed"),
        py::arg("stats"));
  m.def("adam_check_lowp_cpu", &check_lowp_direct, "onepass::adam_check_lowp on CPU tensors (eager)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("steps"), py::kw_only(), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("state_format"),
        py::arg("exp_avg_absmaxs"), py::arg("exp_avg_sq_absmaxs"), py::arg("qtables"),
        py::arg("param_rounding"), py::arg("kahan_comps"), py::arg("seed"));
#endif  // ONEPASS_CUDA_ADDON
#ifdef ONEPASS_WITH_CUDA
  // A part of the optimizer's plan (onepass._C.GroupPlan, by its address: this module may be the
  // JIT add-on beside onepass._C, built from the same header by the same compiler).
  m.def("step_plan",
        [](uintptr_t address, size_t part, double lr, const OptT& lr_t, double b1, double b2,
           double eps, double wd, bool maximize, bool decoupled, const OptT& gs, const OptT& fi,
           int64_t seed, bool check_only, bool defer_found_inf) {
          onepass::PlanPart& pp = onepass::plan_part(onepass::plan_at(address), part);
          onepass::StepHyper h =
              onepass::make_hyper(lr, lr_t, b1, b2, eps, wd, maximize, decoupled, gs, fi, seed);
          h.defer_found_inf = defer_found_inf;
          py::gil_scoped_release no_gil;
          onepass::step_planned_cuda(pp, h, check_only);
        },
        "a part of a onepass._C.GroupPlan on CUDA tensors", py::arg("address"), py::arg("part"),
        py::kw_only(), py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("maximize"), py::arg("decoupled"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("seed"), py::arg("check_only"),
        py::arg("defer_found_inf") = false);
  m.def("adam_step_cuda", [](const TVec& p, const TVec& g, const TVec& m_, const TVec& v,
                             const TVec& vmax, const TVec& steps, double lr, const OptT& lr_t,
                             double b1, double b2, double eps, double wd, bool ams, bool maximize,
                             bool decoupled, const OptT& gs, const OptT& fi) {
          onepass::adam_step_cuda(p, g, m_, v, vmax, steps, lr, lr_t, b1, b2, eps, wd, ams,
                                  maximize, decoupled, gs, fi);
        },
        "onepass::adam_step_ on CUDA tensors (eager)", py::arg("params"), py::arg("grads"),
        py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"),
        py::kw_only(), py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("decoupled"), py::arg("grad_scale"), py::arg("found_inf"));
#endif
}
