// The emulated CUDA backend as a Python module (test-only: built by the test suite with
// torch.utils.cpp_extension.load, python/onepass/backends/cuda_emu.py). The same checks and host
// step as the cuda backend's ops (adam_cuda.cu), on CPU tensors, with the kernels of csrc/cuda/
// run by the SIMT emulation.
#include "emu_runtime.h"

#include "../group_plan.h"

#include <torch/csrc/utils/pybind.h>

#include <string>
#include <vector>

namespace {

using TVec = std::vector<at::Tensor>;
using OptT = std::optional<at::Tensor>;
using onepass::BatchArgs;
using onepass::EmuRuntime;

// The cuda backend's step on a checked batch: the kernels, or the launch checks only.
void run(const BatchArgs& a, const EmuRuntime& rt, bool check_only,
         onepass::host::PlannedLaunches* kept = nullptr) {
  if (a.params.empty()) return;
  if (check_only) {
    onepass::host::check_launch(a, rt);
    return;
  }
  // (the two halves are compiled in two files, emu_fp32.cpp and emu_lowp.cpp: step_any here
  // would compile every kernel into this one)
  if (a.state_format == onepass::host::kF32 && a.param_rounding == onepass::host::kNearest)
    onepass::emu_step_fp32(a, rt, kept);
  else
    onepass::emu_step_lowp(a, rt, kept);
}

// adam_step_lowp_'s arguments, plus where the step counts live and whether a graph is "captured".
void step(const TVec& p, const TVec& g, const TVec& m, const TVec& v, const TVec& vmax,
          const TVec& steps, double lr, const OptT& lr_t, double b1, double b2, double eps,
          double wd, bool ams, bool maximize, bool decoupled, const OptT& gs, const OptT& fi,
          const std::string& fmt, const TVec& am, const TVec& av, const OptT& qt,
          const std::string& rnd, const TVec& comps, int64_t seed, bool device_steps,
          bool capturing, bool check_only) {
  const BatchArgs a{p, g, m, v, vmax, steps, lr, lr_t, b1, b2, eps, wd, ams, maximize, decoupled,
                    gs, fi, onepass::parse_state_format(fmt), onepass::parse_param_rounding(rnd),
                    am, av, qt.has_value() ? &*qt : nullptr, comps, seed};
  onepass::validate_batch(a, c10::DeviceType::CPU);
  run(a, EmuRuntime{device_steps, capturing, false}, check_only);
}

// One part of the optimizer's cached plan (onepass._C.GroupPlan, csrc/group_plan.h), reached by
// the address GroupPlan.address() gives: that module and this one are built from the same header
// by the same compiler, and this module has no other way to reach a C++ object of the other.
// stub_launch: the whole host step without the kernels (bench/host_time.py).
void step_plan(uintptr_t address, size_t part, double lr, const OptT& lr_t, double b1, double b2,
               double eps, double wd, bool maximize, bool decoupled, const OptT& gs,
               const OptT& fi, int64_t seed, bool device_steps, bool capturing, bool check_only,
               bool stub_launch, bool defer_found_inf) {
  onepass::PlanPart& pp = onepass::plan_part(onepass::plan_at(address), part);
  onepass::StepHyper h =
      onepass::make_hyper(lr, lr_t, b1, b2, eps, wd, maximize, decoupled, gs, fi, seed);
  h.defer_found_inf = defer_found_inf;
  BatchArgs a = onepass::plan_args(pp, h, nullptr);
  // (as step_planned_cuda: a step reads the host counts' values once, in host::host_next_count)
  if (check_only)
    onepass::validate_planned(pp, a, c10::DeviceType::CPU);
  else
    onepass::validate_planned_state(pp, a, c10::DeviceType::CPU);
  run(a, EmuRuntime{device_steps, capturing, stub_launch}, check_only,
      &onepass::kept<onepass::host::PlannedLaunches>(pp.cuda_work));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "one step of the cuda backend's kernels under the SIMT emulation",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("steps"), py::kw_only(), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("state_format"),
        py::arg("exp_avg_absmaxs"), py::arg("exp_avg_sq_absmaxs"), py::arg("qtables"),
        py::arg("param_rounding"), py::arg("kahan_comps"), py::arg("seed"),
        py::arg("device_steps"), py::arg("capturing"), py::arg("check_only"));
  m.def("step_plan", &step_plan, "a part of a onepass._C.GroupPlan, by its address",
        py::arg("address"), py::arg("part"), py::kw_only(), py::arg("lr"), py::arg("lr_tensor"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("maximize"), py::arg("decoupled"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("seed"), py::arg("device_steps"), py::arg("capturing"), py::arg("check_only"),
        py::arg("stub_launch"), py::arg("defer_found_inf") = false);
  m.def("kernels_compiled", &onepass_emu::kernels_compiled,
        "the kernel instantiations compiled into this module");
  m.def("kernels_run", &onepass_emu::kernels_run, "the kernel instantiations launched since load");
  m.def("set_reverse_order", &onepass_emu::set_reverse_order,
        "run each block's threads from the last to the first");
  m.attr("planted_bug") = ONEPASS_PLANTED_BUG;
}
