// Registration of the onepass custom ops (torch.library) and the Python module stub.
//
// The ops are registered with TORCH_LIBRARY so torch.compile and CUDA graphs can treat a whole
// step as one opaque op; python/onepass/_ops.py adds the fake (meta) implementations.
#include "adam_math.h"
#include "onepass_ops.h"

#include <torch/extension.h>
#include <torch/library.h>

namespace onepass {
namespace {

// The C++ twin of reference.step_scalars, exposed so the tests can compare the two directly.
std::vector<double> step_scalars_op(int64_t step, double lr, double beta1, double beta2, double eps,
                                    double weight_decay, bool decoupled, bool f64) {
  auto pack = [](const auto& s) {
    return std::vector<double>{s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps,
                               s.weight_decay, s.decay, s.step_size, s.bc2_sqrt};
  };
  if (f64) return pack(make_step_scalars<double>(step, lr, beta1, beta2, eps, weight_decay, decoupled, 1.0));
  return pack(make_step_scalars<float>(step, lr, beta1, beta2, eps, weight_decay, decoupled, 1.0));
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
  m.def("_step_scalars(int step, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool decoupled, bool f64) -> float[]",
        &onepass::step_scalars_op);
  m.def("_cpu_isa() -> str", &onepass::cpu_isa_get);
  m.def("_cpu_isa_supported() -> str[]", &onepass::cpu_isa_supported);
  m.def("_cpu_isa_set(str name) -> ()", &onepass::cpu_isa_set);
}

// The extension is loaded as the Python module onepass._C; importing it runs the registrations.
// It also binds the CPU kernel directly: calling torch.ops.onepass.adam_step_ from Python converts
// six lists through the dispatcher's boxed IValue path, ~1.2 us per param (2.4 ms per step for
// the `small` case of 2000 tensors, a fifth of the step); pybind11's list conversion is ~10x
// cheaper. Eager steps use this binding, traced code (torch.compile) the registered op; both run
// the same function.
namespace {
using TVec = std::vector<at::Tensor>;
using OptT = std::optional<at::Tensor>;
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
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
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
}
