// Registration of the onepass custom ops (torch.library) and the Python module stub.
//
// The ops are registered with TORCH_LIBRARY so torch.compile and CUDA graphs can treat a whole
// step as one opaque op; python/onepass/_ops.py adds the fake (meta) implementations.
#include "adam_math.h"
#include "onepass_ops.h"

#include <Python.h>
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
  m.def("_step_scalars(int step, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool decoupled, bool f64) -> float[]",
        &onepass::step_scalars_op);
  m.def("_cpu_isa() -> str", &onepass::cpu_isa_get);
  m.def("_cpu_isa_supported() -> str[]", &onepass::cpu_isa_supported);
  m.def("_cpu_isa_set(str name) -> ()", &onepass::cpu_isa_set);
}

// The extension is loaded as the Python module onepass._C; importing it runs the registrations.
static struct PyModuleDef onepass_module = {PyModuleDef_HEAD_INIT, "_C", "onepass kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&onepass_module); }
