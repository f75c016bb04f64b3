// onepass._C.GroupPlan: the optimizer's cached plan of a param group (group_plan.h), and a step
// over one of its parts: on CPU tensors through the kept walk of the CPU kernels
// (step_planned_cpu), on others through the registered op, called from C++ (the dispatcher picks
// the device's kernels as from Python, without the boxed IValue conversion).
#include "group_plan.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace onepass {
namespace {

namespace py = pybind11;
using TVec = std::vector<at::Tensor>;
using OptT = std::optional<at::Tensor>;

using StepFn = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    at::TensorList, double, const OptT&, double, double, double, double, bool, bool,
                    bool, const OptT&, const OptT&, const std::string&, at::TensorList,
                    at::TensorList, const OptT&, const std::string&, at::TensorList, int64_t);
using StatsFn = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     at::TensorList, at::TensorList, double, const OptT&, double, double, double,
                     double, bool, bool, bool, const OptT&, const OptT&, const std::string&,
                     at::TensorList, at::TensorList, const OptT&, const std::string&,
                     at::TensorList, int64_t, const at::Tensor&);

// The kernels' registered signatures take the names as std::string (the typed call must match).
const std::string kFormats[] = {"fp32", "bf16", "int8"};
const std::string kRoundings[] = {"nearest", "stochastic", "kahan"};

class PyGroupPlan {
 public:
  // parts: one tuple a part, (positions, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
  // exp_avg_absmaxs, exp_avg_sq_absmaxs, kahan_comps, qtables, state_format, param_rounding,
  // amsgrad), as the optimizer's state lists hold them.
  PyGroupPlan(const py::list& group_params, const py::list& parts) {
    const size_t n = group_params.size();
    plan_.held.reserve(n);
    for (size_t j = 0; j < n; ++j) {
      PyObject* o = group_params[j].ptr();
      Py_INCREF(o);
      plan_.held.push_back(o);
    }
    plan_.part_of.assign(n, -1);
    plan_.index_in.assign(n, -1);
    for (const py::handle item : parts) {
      const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
      PlanPart part;
      part.pos = t[0].cast<std::vector<int64_t>>();
      part.params = t[1].cast<TVec>();
      part.exp_avgs = t[2].cast<TVec>();
      part.exp_avg_sqs = t[3].cast<TVec>();
      part.max_exp_avg_sqs = t[4].cast<TVec>();
      part.steps = t[5].cast<TVec>();
      part.exp_avg_absmaxs = t[6].cast<TVec>();
      part.exp_avg_sq_absmaxs = t[7].cast<TVec>();
      part.kahan_comps = t[8].cast<TVec>();
      part.qtables = t[9].cast<OptT>();
      part.state_format = parse_state_format(t[10].cast<std::string>());
      part.param_rounding = parse_param_rounding(t[11].cast<std::string>());
      part.amsgrad = t[12].cast<bool>();
      ONEPASS_CHECK(part.pos.size() == part.params.size(),
                    "onepass: a plan part needs one position per param");
      const int32_t k = static_cast<int32_t>(plan_.parts.size());
      for (size_t i = 0; i < part.pos.size(); ++i) {
        const int64_t j = part.pos[i];
        ONEPASS_CHECK(j >= 0 && static_cast<size_t>(j) < n && plan_.part_of[j] < 0,
                      "onepass: plan position ", j, " is out of range or taken twice");
        plan_.part_of[j] = k;
        plan_.index_in[j] = static_cast<int32_t>(i);
        const at::Tensor& p = part.params[i];
        part.data.push_back(p.data_ptr());
        part.sizes.push_back(p.sizes().vec());
        part.dtypes.push_back(p.scalar_type());
      }
      part.grads.resize(part.params.size());
      plan_.parts.push_back(std::move(part));
    }
  }

  ~PyGroupPlan() {
    py::gil_scoped_acquire gil;
    for (void* o : plan_.held) Py_DECREF(static_cast<PyObject*>(o));
  }

  PyGroupPlan(const PyGroupPlan&) = delete;
  PyGroupPlan& operator=(const PyGroupPlan&) = delete;

  // Reads this step's grads. False (and the caller rebuilds the plan) when the list no longer
  // holds the same params, a param gained or lost its grad, or a param's storage, shape or dtype
  // changed. A plain tensor param is its own kernel tensor; the optimizer makes no plan for
  // DTensor or complex params, whose kernel tensors are views made every step.
  bool gather(const py::handle& group_params) {
    PyObject* list = group_params.ptr();
    if (!PyList_Check(list)) return false;
    const size_t n = plan_.held.size();
    if (static_cast<size_t>(PyList_GET_SIZE(list)) != n) return false;
    for (size_t j = 0; j < n; ++j) {
      PyObject* o = PyList_GET_ITEM(list, j);
      if (o != plan_.held[j]) return false;
      const at::Tensor& t = THPVariable_Unpack(o);
      const at::Tensor& g = t.grad();
      const int32_t k = plan_.part_of[j];
      if (g.defined() != (k >= 0)) return false;
      if (k < 0) continue;
      PlanPart& part = plan_.parts[k];
      const int32_t i = plan_.index_in[j];
      if (t.data_ptr() != part.data[i] || t.scalar_type() != part.dtypes[i] ||
          !same_dims(t.sizes(), part.sizes[i]))
        return false;
      part.grads[i] = g;
    }
    return true;
  }

  // One part's batch: checked only (check_only), else updated in place, with stats (a float64
  // [n, 2] tensor) for the fused statistics. CPU tensors take the kept walk (step_planned_cpu),
  // others the registered op of its kind; via_op takes the op for CPU tensors too, so the tests
  // run the path CUDA tensors take.
  void step(size_t k, double lr, const OptT& lr_tensor, double beta1, double beta2, double eps,
            double weight_decay, bool maximize, bool decoupled, const OptT& grad_scale,
            const OptT& found_inf, int64_t seed, const OptT& stats, bool check_only,
            bool via_op) {
    PlanPart& part = at(k);
    StepHyper h;
    h.lr = lr;
    h.lr_tensor = lr_tensor;
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.eps = eps;
    h.weight_decay = weight_decay;
    h.maximize = maximize;
    h.decoupled = decoupled;
    h.grad_scale = grad_scale;
    h.found_inf = found_inf;
    h.seed = seed;
    if (!via_op && !part.params.empty() && part.params[0].device().is_cpu()) {
      py::gil_scoped_release no_gil;  // the kernels may run for milliseconds
      step_planned_cpu(part, h, stats.has_value() ? &*stats : nullptr, check_only);
      return;
    }
    if (check_only) {
      if (part.params.empty()) return;
      validate_batch(plan_args(part, h, nullptr), part.params[0].device().type());
      return;
    }
    py::gil_scoped_release no_gil;  // the kernels may run for milliseconds
    // Straight to the CPU or CUDA kernel: through the autograd keys (params require grad) the
    // dispatcher boxes every argument and collects autograd edges, 60% of a 2000-tensor step's
    // instructions (callgrind), for an op that has no autograd formula to run. The optimizer
    // steps under no_grad, as the eager bindings always did.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::string& fmt = kFormats[part.state_format];
    const std::string& rnd = kRoundings[part.param_rounding];
    if (stats.has_value()) {
      static const auto op = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("onepass::adam_step_stats_", "")
                                  .typed<StatsFn>();
      op.call(part.params, part.grads, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs,
              part.steps, lr, lr_tensor, beta1, beta2, eps, weight_decay, part.amsgrad, maximize,
              decoupled, grad_scale, found_inf, fmt, part.exp_avg_absmaxs,
              part.exp_avg_sq_absmaxs, part.qtables, rnd, part.kahan_comps, seed, *stats);
      return;
    }
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("onepass::adam_step_lowp_", "")
                               .typed<StepFn>();
    op.call(part.params, part.grads, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs,
            part.steps, lr, lr_tensor, beta1, beta2, eps, weight_decay, part.amsgrad, maximize,
            decoupled, grad_scale, found_inf, fmt, part.exp_avg_absmaxs, part.exp_avg_sq_absmaxs,
            part.qtables, rnd, part.kahan_comps, seed);
  }

  // Drops the grads gather read, so that zero_grad(set_to_none=True) frees their memory (the
  // optimizer calls it when the step ends, whether it ran or raised).
  void release() {
    for (PlanPart& part : plan_.parts)
      for (at::Tensor& g : part.grads) g = at::Tensor();
  }

  // A part's grads of this step, for the backends that take Python lists (reference).
  TVec grads(size_t k) const { return at(k).grads; }

  // The triton backend's per-step host work on a part: the (param, grad) address table and the
  // step counts' increment (ops.cpp: pair_table, bump_steps), without converting the lists.
  at::Tensor pair_table(size_t k) const {
    const PlanPart& part = at(k);
    return onepass::pair_table(part.params, part.grads);
  }
  std::vector<int64_t> bump_steps(size_t k) const { return onepass::bump_steps(at(k).steps); }

  size_t num_parts() const { return plan_.parts.size(); }

  // The plan's address, for the emulated cuda backend's module (test-only; built from the same
  // header by the same compiler, csrc/emu/adam_emu.cpp), which has no other way to reach it.
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(&plan_); }

 private:
  const PlanPart& at(size_t k) const {
    ONEPASS_CHECK(k < plan_.parts.size(), "onepass: plan part ", k, " of ", plan_.parts.size());
    return plan_.parts[k];
  }
  PlanPart& at(size_t k) {
    ONEPASS_CHECK(k < plan_.parts.size(), "onepass: plan part ", k, " of ", plan_.parts.size());
    return plan_.parts[k];
  }

  GroupPlan plan_;
};

}  // namespace

void bind_group_plan(py::module& m) {
  py::class_<PyGroupPlan>(m, "GroupPlan", py::module_local())
      .def(py::init<const py::list&, const py::list&>(), py::arg("group_params"),
           py::arg("parts"))
      .def("gather", &PyGroupPlan::gather, py::arg("group_params"))
      .def("step", &PyGroupPlan::step, py::arg("part"), py::kw_only(), py::arg("lr"),
           py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
           py::arg("weight_decay"), py::arg("maximize"), py::arg("decoupled"),
           py::arg("grad_scale"), py::arg("found_inf"), py::arg("seed"), py::arg("stats"),
           py::arg("check_only"), py::arg("via_op") = false)
      .def("grads", &PyGroupPlan::grads, py::arg("part"))
      .def("release", &PyGroupPlan::release)
      .def("pair_table", &PyGroupPlan::pair_table, py::arg("part"))
      .def("bump_steps", &PyGroupPlan::bump_steps, py::arg("part"))
      .def("address", &PyGroupPlan::address)
      .def_property_readonly("num_parts", &PyGroupPlan::num_parts);
}

}  // namespace onepass
