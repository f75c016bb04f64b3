// onepass._C.GroupPlan: the optimizer's cached plan of a param group (group_plan.h), and a step
// over one of its parts on CPU tensors (step_planned_cpu).
#include "group_plan.h"

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace onepass {
namespace {

// Lines [p, p + 64 * lines) towards L1, for reading (null: nothing).
inline void prefetch_lines(const void* p, int lines) {
  if (p == nullptr) return;
  for (int k = 0; k < lines; ++k) __builtin_prefetch(static_cast<const char*>(p) + 64 * k, 0, 3);
}

namespace py = pybind11;
using TVec = std::vector<at::Tensor>;
using OptT = std::optional<at::Tensor>;

class PyGroupPlan {
 public:
  // parts: one tuple a part, (positions, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
  // exp_avg_absmaxs, exp_avg_sq_absmaxs, kahan_comps, qtables, state_format, param_rounding,
  // amsgrad), as the optimizer's state lists hold them.
  PyGroupPlan(const py::list& group_params, const py::list& parts) {
    const size_t n = group_params.size();
    plan_.layout = plan_layout();
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
      part.dims_at.push_back(0);
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
        // (a sparse or storage-less param: no plan; the step's checks say what is wrong)
        if (p.layout() != at::kStrided || !p.has_storage()) usable_ = false;
        part.data.push_back(usable_ ? raw_data(p) : nullptr);
        const c10::IntArrayRef sizes = p.sizes();
        part.dims.insert(part.dims.end(), sizes.begin(), sizes.end());
        if (usable_) part.dims.insert(part.dims.end(), p.strides().begin(), p.strides().end());
        else part.dims.insert(part.dims.end(), sizes.size(), 0);
        part.dims_at.push_back(static_cast<uint32_t>(part.dims.size()));
        part.contiguous.push_back(usable_ && p.is_contiguous());
        part.dtypes.push_back(p.scalar_type());
      }
      for (const TVec* list : {&part.exp_avgs, &part.exp_avg_sqs, &part.max_exp_avg_sqs,
                               &part.steps, &part.exp_avg_absmaxs, &part.exp_avg_sq_absmaxs,
                               &part.kahan_comps})
        for (const at::Tensor& x : *list) seal(part, x);
      if (part.qtables.has_value()) seal(part, *part.qtables);
      part.grads.resize(part.params.size());
      part.grad_data.resize(part.params.size());
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
    if (!usable_ || !PyList_Check(list)) return false;
    const size_t n = plan_.held.size();
    if (static_cast<size_t>(PyList_GET_SIZE(list)) != n) return false;
    // (set only when every grad was read: a plan that refuses the list keeps none of this step;
    // and a step that raised before its release() lets go of its grads here, before the loop,
    // so that no assignment in it frees a grad: freeing one can run Python code (a weakref
    // callback) that would leave ahead()'s rings pointing at freed tensors)
    release();
    for (const PlanPart& part : plan_.parts) {
      // (a part's seals lie in one array and their tensors' addresses are in it: fetching
      // them ahead turns ~6000 dependent misses of a 2000-param step into overlapped ones)
      const Seal* sl = part.seals.data();
      const size_t m = part.seals.size();
      for (size_t q = 0; q < m; ++q) {
        if (q + kSealAhead < m) {
          const char* ti = reinterpret_cast<const char*>(sl[q + kSealAhead].impl);
          if (ti != nullptr) {
            __builtin_prefetch(ti);
            __builtin_prefetch(ti + 64);
            __builtin_prefetch(ti + 128);
          }
          __builtin_prefetch(sl[q + kSealAhead].storage);
        }
        if (!seal_holds(sl[q], part.seal_dims.data())) {
          moved_ = true;
          return false;
        }
      }
    }
    fit_.assign(plan_.parts.size(), 1);  // (one flag a part, kept: no allocation a step)
    const at::Tensor* grad_ring[kRing];
    // s runs from -5 * kGap so that every position passes every stage of ahead() before it is
    // read (at s = its position).
    for (ptrdiff_t s = -5 * kGap; s < static_cast<ptrdiff_t>(n); ++s) {
      ahead(s, n, grad_ring);
      if (s < 0) continue;
      const size_t j = static_cast<size_t>(s);
      PyObject* o = PyList_GET_ITEM(list, j);
      if (o != plan_.held[j]) return false;
      const at::Tensor& t = THPVariable_Unpack(o);
      const at::Tensor& g = *grad_ring[j % kRing];  // (TensorImpl::grad(), read by ahead())
      const int32_t k = plan_.part_of[j];
      if (g.defined() != (k >= 0)) return false;
      if (k < 0) continue;
      // the kernels read a grad through raw_data: one without storage goes the checked way
      const c10::TensorImpl* gi = g.unsafeGetTensorImpl();
      if (!storage_holds(g) || !storage_holds(t)) return false;
      PlanPart& part = plan_.parts[k];
      const int32_t i = plan_.index_in[j];
      const c10::TensorImpl* ti = t.unsafeGetTensorImpl();
      const c10::IntArrayRef sizes = ti->sizes();
      if (raw_data(t) != part.data[i] || ti->dtype() != part.dtypes[i] ||
          !same_dims(sizes, plan_sizes(part, i)))
        return false;
      // the state was made in the param's layout of then (both row-major: the same walk)
      const bool contiguous = ti->is_contiguous();
      if (!(contiguous && part.contiguous[i]) && !same_dims(ti->strides(), plan_strides(part, i)))
        return false;
      part.grads[i] = g;
      // (a grad that fails these still steps: the step's own checks and layout handling take it)
      fit_[k] = fit_[k] && contiguous && gi->layout() == at::kStrided &&
               gi->dtype() == ti->dtype() && gi->device() == ti->device() &&
               same_dims(gi->sizes(), sizes) && gi->is_contiguous();
      part.grad_data[i] = raw_data(g);
    }
    for (size_t k = 0; k < fit_.size(); ++k) plan_.parts[k].grads_fit = fit_[k] != 0;
    return true;
  }

  // One part's batch on CPU tensors: checked only (check_only), else updated in place, with
  // stats (a float64 [n, 2] tensor) for the fused statistics. (A part on CUDA tensors steps
  // through the CUDA module's step_plan, which may be a separate JIT-built module.)
  void step(size_t k, double lr, const OptT& lr_tensor, double beta1, double beta2, double eps,
            double weight_decay, bool maximize, bool decoupled, const OptT& grad_scale,
            const OptT& found_inf, int64_t seed, const OptT& stats, bool check_only) {
    PlanPart& part = at(k);
    ONEPASS_CHECK(part.params.empty() || part.params[0].device().is_cpu(),
                  "onepass: GroupPlan.step runs CPU tensors; this part is on ",
                  part.params[0].device());
    const StepHyper h = make_hyper(lr, lr_tensor, beta1, beta2, eps, weight_decay, maximize,
                                   decoupled, grad_scale, found_inf, seed);
    py::gil_scoped_release no_gil;  // the kernels may run for milliseconds
    step_planned_cpu(part, h, stats.has_value() ? &*stats : nullptr, check_only);
  }

  // Whether a gather refused the plan because a state tensor it holds moved (seal_holds): the
  // optimizer's lists and whatever a backend derived from them (Batch.scratch) are stale too.
  bool moved() const { return moved_; }

  // Drops the grads gather read, so that zero_grad(set_to_none=True) frees their memory (the
  // optimizer calls it when the step ends, whether it ran or raised).
  void release() {
    for (PlanPart& part : plan_.parts) {
      part.grads_fit = false;  // (grad_data no longer holds this step's grads)
      for (at::Tensor& g : part.grads) g = at::Tensor();
    }
  }

  // A part's grads of this step, for the backends that take Python lists (reference).
  TVec grads(size_t k) const { return at(k).grads; }

  // The triton backend's per-step host work on a part, without converting the lists: the
  // (param, grad) checks and addresses (ops.cpp: pair_table), the counts' increment (bump_steps),
  // and its launches' packed tables (triton_table.cpp: next_counts, triton_table).
  at::Tensor pair_table(size_t k) const {
    const PlanPart& part = at(k);
    return onepass::pair_table(part.params, part.grads);
  }
  void bump_steps(size_t k) {
    const PlanCounts& counts = plan_counts(at(k));
    for (size_t i = 0; i < counts.size(); ++i) counts.advance(i);
  }
  std::vector<int64_t> next_counts(size_t k) const { return onepass::next_counts(at(k).steps); }
  std::tuple<at::Tensor, std::vector<int64_t>> triton_table(
      size_t k, const at::Tensor& statics, const OptT& rows, double beta1, double beta2,
      bool math_f64, int64_t seed, int64_t key_col, const std::vector<double>& hp, bool pin,
      bool bump) {
    PlanPart& part = at(k);
    return onepass::triton_table(part.params, part.grads, part.steps, statics, rows,
                                 {beta1, beta2, math_f64, seed}, key_col, hp, pin, bump,
                                 &plan_counts(part),
                                 part.grads_fit ? part.grad_data.data() : nullptr);
  }

  // The plan's address, for the emulated cuda backend's module (test-only; built from the same
  // header by the same compiler, csrc/emu/adam_emu.cpp), which has no other way to reach it.
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(&plan_); }

 private:
  // gather's prefetches. A step after a backward finds the metadata gather reads out of cache,
  // and each param's is a chain of objects each found through the one before (its Python object,
  // TensorImpl, AutogradMeta, grad's TensorImpl, grad's StorageImpl): five misses in a row a
  // param. ahead(s) works kGap positions apart on each link: for position s + 5 * kGap it fetches
  // the Python object, for s + 4 * kGap reads it and fetches the TensorImpl, and so on, so each
  // read finds its line fetched kGap positions (~30-60 ns of gather a position) earlier. On this
  // 2-core Xeon, 2000 16-element params: a step 5-7% faster, hot or with caches flushed (bench/
  // results/host-prefetch-cpu-xeon-2core-20261201/). kGap 1 to 4 measured alike.
  static constexpr ptrdiff_t kGap = 2;
  static constexpr size_t kSealAhead = 8;  // seals fetched ahead in gather's seal check
  static constexpr size_t kRing = 8;  // > 2 * kGap: the positions between a grad's stage and read
  void ahead(ptrdiff_t s, size_t n, const at::Tensor** grad_ring) {
    const auto held = [&](ptrdiff_t d) -> PyObject* {  // the plan's object at s + d (null past n)
      const ptrdiff_t j = s + d;
      return j >= 0 && j < static_cast<ptrdiff_t>(n) ? static_cast<PyObject*>(plan_.held[j])
                                                      : nullptr;
    };
    // (the held objects are the plan's own references: alive whatever the list now holds)
    if (PyObject* o = held(5 * kGap)) prefetch_lines(o, 1);
    if (PyObject* o = held(4 * kGap))
      prefetch_lines(THPVariable_Unpack(o).unsafeGetTensorImpl(), 3);
    if (PyObject* o = held(3 * kGap)) {
      const c10::TensorImpl* ti = THPVariable_Unpack(o).unsafeGetTensorImpl();
      prefetch_lines(ti->autograd_meta(), 2);
      prefetch_lines(ti->unsafe_storage().unsafeGetStorageImpl(), 1);
    }
    if (PyObject* o = held(2 * kGap)) {
      // (TensorImpl's grad: Tensor::grad() also asks autograd whether it is a leaf, to warn)
      const at::Tensor& g = THPVariable_Unpack(o).unsafeGetTensorImpl()->grad();
      grad_ring[(s + 2 * kGap) % kRing] = &g;
      if (g.defined()) prefetch_lines(g.unsafeGetTensorImpl(), 3);
    }
    if (held(kGap) != nullptr) {
      const c10::TensorImpl* gi = grad_ring[(s + kGap) % kRing]->unsafeGetTensorImpl();
      if (gi->has_storage()) prefetch_lines(gi->unsafe_storage().unsafeGetStorageImpl(), 1);
    }
  }

  const PlanPart& at(size_t k) const { return plan_part(const_cast<GroupPlan&>(plan_), k); }
  PlanPart& at(size_t k) { return plan_part(plan_, k); }

  static void seal(PlanPart& part, const at::Tensor& x) {
    Seal sl{};
    sl.impl = x.unsafeGetTensorImpl();
    sl.dtype = x.scalar_type();
    sl.dim = static_cast<uint16_t>(x.dim());
    sl.dims_at = static_cast<uint32_t>(part.seal_dims.size());
    part.seal_dims.insert(part.seal_dims.end(), x.sizes().begin(), x.sizes().end());
    if (x.layout() == at::kStrided && x.has_storage()) {
      const c10::Storage& st = sl.impl->unsafe_storage();
      sl.storage = st.unsafeGetStorageImpl();
      sl.data = st.data();
      sl.nbytes = st.nbytes();
      sl.offset = x.storage_offset();
      part.seal_dims.insert(part.seal_dims.end(), x.strides().begin(), x.strides().end());
    } else {  // (never holds: the step's checks say what is wrong)
      sl.impl = nullptr;
      part.seal_dims.insert(part.seal_dims.end(), x.sizes().size(), 0);
    }
    part.seals.push_back(sl);
  }

  GroupPlan plan_;
  bool usable_ = true;
  bool moved_ = false;
  std::vector<uint8_t> fit_;  // gather's flags, one a part (PlanPart::grads_fit once all are read)
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
           py::arg("check_only"))
      .def("grads", &PyGroupPlan::grads, py::arg("part"))
      .def("release", &PyGroupPlan::release)
      .def("moved", &PyGroupPlan::moved)
      .def("pair_table", &PyGroupPlan::pair_table, py::arg("part"))
      .def("bump_steps", &PyGroupPlan::bump_steps, py::arg("part"))
      .def("next_counts", &PyGroupPlan::next_counts, py::arg("part"))
      .def("triton_table", &PyGroupPlan::triton_table, py::arg("part"), py::arg("statics"),
           py::arg("rows"), py::arg("beta1"), py::arg("beta2"), py::arg("math_f64"), py::arg("seed"),
           py::arg("key_col"), py::arg("hp"), py::arg("pin"), py::arg("bump") = false)
      .def("address", &PyGroupPlan::address);
}

}  // namespace onepass
