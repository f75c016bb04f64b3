// A param group's tensors held in C++ between steps (the optimizer's cached plan), so a step hands
// the kernels its lists without converting them from Python: converting one list of 2000 tensors
// through pybind11 costs ~130 us on this 2-core Zen 3 machine, and a step passes five to nine of
// them. Only the grads change between steps; GroupPlan::gather reads them from the params' autograd
// metadata in C++ (~10 ns a param) instead of ``p.grad`` in Python (~90 ns).
#pragma once

#include "onepass_ops.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace onepass {

// A part's step counts (one-element float32 or float64 CPU tensors), checked once
// (check_step_tensor) and then read and advanced through their addresses: the checked read of a
// tensor is ~125 instructions, a quarter of the triton table's per-row work in a 2000-tensor step.
// Valid for the part's life: the optimizer makes a new plan when a count tensor is replaced.
struct PlanCounts {
  std::vector<void*> data;
  std::vector<uint8_t> f64;

  double value(size_t i) const { return count_at(data[i], f64[i]); }
  int64_t advance(size_t i) const { return advance_count_at(data[i], f64[i]); }  // the new count
  size_t size() const { return data.size(); }
};

// What a plan may hold, and when it stops holding (its validity rules, all of them):
// - the params: gather refuses the plan when the group's list is not the same objects in the
//   same order, a param gained or lost its grad, or a param's storage address, shape, strides
//   or dtype changed, or its storage no longer holds its elements;
// - the grads: read every step, never kept; one whose storage does not hold it goes the checked
//   way (a clear error, nothing written);
// - every state tensor and the qtables (Seal): refused once one's TensorImpl holds another
//   storage, offset, dtype, shape or strides, or its storage another address or byte count
//   (`.data =`, set_, resize_, share_memory_(), an in-place transpose). Then moved() is true
//   and the optimizer rebuilds its lists and what backends derived from them (Batch.scratch).
// A refused plan is stale, never wrong: the step takes the checked way, which the reference's
// checks mirror (python/onepass/backends/reference.py: check_batch).
//
// A state tensor the plan holds (a moment, maximum, count, absmax or compensation, or the
// qtables) as it was when the plan was made: its TensorImpl, address, storage size, dtype and
// dims. In-place changes a user can make keep the TensorImpl but not these (`.data = ...`,
// `set_`, `resize_`, `share_memory_()`, an in-place transpose), so a plan whose seals all hold
// still addresses the state's own memory in its own layout (seal_holds).
struct Seal {
  const c10::TensorImpl* impl;  // (the plan holds the tensor: alive while the plan is)
  // Not owned: read only once the tensor is seen to hold it still (so gather can prefetch it
  // without a dependent load; a prefetch of freed memory is harmless).
  const c10::StorageImpl* storage;
  const void* data;
  size_t nbytes;
  int64_t offset;
  uint32_t dims_at;  // its sizes, then its strides, at PlanPart::seal_dims[dims_at ..)
  uint16_t dim;
  at::ScalarType dtype;
};

// The params of one group that share a state format and param rounding: one batch.
struct PlanPart {
  std::vector<int64_t> pos;  // each param's position in the group's param list
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
      exp_avg_absmaxs, exp_avg_sq_absmaxs, kahan_comps;
  // Each param's storage address, sizes, strides and dtype when the plan was made: a param given
  // new storage (p.data = ..., .to(), a resize) or a new layout (an in-place t_() of a square
  // one) makes the plan stale, so its state is looked up (and its layout checked) again.
  std::vector<const void*> data;
  // Param i's sizes and then its strides are dims[dims_at[i] .. dims_at[i + 1]): one array, read
  // in order by gather, where a vector a param was a pointer to follow (a cache miss a param in
  // a cold step).
  std::vector<int64_t> dims;
  std::vector<uint32_t> dims_at;
  std::vector<uint8_t> contiguous;
  std::vector<at::ScalarType> dtypes;
  // Every state tensor above and the qtables, sealed when the plan was made: gather refuses the
  // plan once one has moved (the validity rules above).
  std::vector<Seal> seals;
  std::vector<int64_t> seal_dims;
  std::optional<at::Tensor> qtables;
  int state_format = 0;
  int param_rounding = 0;
  bool amsgrad = false;
  // The state tensors passed validate_batch's checks (they stay as they are for the plan's life).
  bool state_checked = false;
  // Set by gather each step: every grad is strided, of its param's dtype, device and shape, and
  // it and its param are contiguous (the walk layout of every format), with its address in
  // grad_data. The step then skips check_grad and the layout checks: ~160 of a planned CPU step's
  // ~670 instructions a tensor (callgrind, 2000 16-element tensors).
  bool grads_fit = false;
  std::vector<const void*> grad_data;
  // The counts' addresses (plan_counts), made on first use.
  std::optional<PlanCounts> counts;
  // The CPU kernels' walk of this part, kept between steps (adam_cpu.cpp: PlannedWalk).
  std::shared_ptr<void> cpu_work;
  // The CUDA kernels' launches of this part, kept between steps (cuda/host_step.h:
  // PlannedLaunches).
  std::shared_ptr<void> cuda_work;
};

inline c10::IntArrayRef plan_sizes(const PlanPart& part, size_t i) {
  const size_t b = part.dims_at[i], e = part.dims_at[i + 1];
  return {part.dims.data() + b, (e - b) / 2};
}
inline c10::IntArrayRef plan_strides(const PlanPart& part, size_t i) {
  const size_t b = part.dims_at[i], e = part.dims_at[i + 1];
  return {part.dims.data() + b + (e - b) / 2, (e - b) / 2};
}

// Whether the tensor of `seal` is still where and as it was sealed (dims: PlanPart::seal_dims).
inline bool seal_holds(const Seal& seal, const int64_t* dims) {
  const c10::TensorImpl* t = seal.impl;
  if (t == nullptr) return false;
  const c10::StorageImpl* st = t->unsafe_storage().unsafeGetStorageImpl();
  if (st != seal.storage || t->storage_offset() != seal.offset || t->dtype() != seal.dtype ||
      t->dim() != seal.dim)
    return false;
  if (st->data() != seal.data || st->nbytes() != seal.nbytes) return false;
  const c10::IntArrayRef sizes = t->sizes(), strides = t->strides();
  for (size_t d = 0; d < seal.dim; ++d)
    if (sizes[d] != dims[seal.dims_at + d] || strides[d] != dims[seal.dims_at + seal.dim + d])
      return false;
  return true;
}

// What a step passes besides the tensors.
struct StepHyper {
  double lr = 0.0;
  std::optional<at::Tensor> lr_tensor;
  double beta1 = 0.0, beta2 = 0.0, eps = 0.0, weight_decay = 0.0;
  bool maximize = false, decoupled = true;
  std::optional<at::Tensor> grad_scale, found_inf;
  int64_t seed = 0;
  bool defer_found_inf = false;  // BatchArgs::defer_found_inf
};

inline StepHyper make_hyper(double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                            double beta2, double eps, double weight_decay, bool maximize,
                            bool decoupled, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, int64_t seed) {
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
  return h;
}

// A part's batch with this step's grads (it refers to `part` and `h`, which must outlive it).
inline BatchArgs plan_args(const PlanPart& part, const StepHyper& h, const at::Tensor* stats) {
  BatchArgs a{part.params, part.grads, part.exp_avgs, part.exp_avg_sqs,
              part.max_exp_avg_sqs, part.steps, h.lr, h.lr_tensor, h.beta1, h.beta2, h.eps,
              h.weight_decay, part.amsgrad, h.maximize, h.decoupled, h.grad_scale,
              h.found_inf, part.state_format, part.param_rounding, part.exp_avg_absmaxs,
              part.exp_avg_sq_absmaxs, part.qtables.has_value() ? &*part.qtables : nullptr,
              part.kahan_comps, h.seed, stats};
  a.defer_found_inf = h.defer_found_inf;
  if (part.grads_fit) a.grad_data = part.grad_data.data();
  return a;
}

// A part's step on CPU tensors (csrc/cpu/adam_cpu.cpp), or its checks only: the walk of its
// tensors is made on the first step and reused while they keep their storage, so a step sets
// each tensor's grad and scalars and runs. stats: the fused statistics' float64 [n, 2] (or null).
void step_planned_cpu(PlanPart& part, const StepHyper& h, const at::Tensor* stats,
                      bool check_only);

// validate_batch for a part's batch `a` (plan_args): its params, state and counts once per plan,
// its grads (and the host counts' values) every step. Marks the part checked.
void validate_planned(PlanPart& part, BatchArgs& a, c10::DeviceType device_type);
// validate_planned without the counts' values; true when they are left to the caller (who may
// read them more cheaply: the CPU walk keeps their addresses).
bool validate_planned_state(PlanPart& part, BatchArgs& a, c10::DeviceType device_type);

#ifdef ONEPASS_WITH_CUDA
// A part's step on CUDA tensors (csrc/cuda/adam_cuda.cu), or its checks only.
void step_planned_cuda(PlanPart& part, const StepHyper& h, bool check_only);
#endif

// A part's counts (PlanCounts): each count tensor checked (check_step_tensor) on first use.
inline const PlanCounts& plan_counts(PlanPart& part) {
  if (!part.counts.has_value()) {
    PlanCounts c;
    for (size_t i = 0; i < part.steps.size(); ++i) {
      check_step_tensor(part.steps[i], i);
      c.data.push_back(const_cast<void*>(raw_data(part.steps[i])));
      c.f64.push_back(part.steps[i].scalar_type() == at::kDouble);
    }
    part.counts = std::move(c);
  }
  return *part.counts;
}

// The object of type T kept in `slot` (made on first use).
template <typename T>
T& kept(std::shared_ptr<void>& slot) {
  if (!slot) slot = std::make_shared<T>();
  return *static_cast<T*>(slot.get());
}

// What the modules that reach a GroupPlan by its address (the CUDA module, maybe a separately
// built JIT add-on, and the emulated one) must agree on with onepass._C: its layout. A module
// built from another version of this header refuses the plan instead of misreading it.
struct PlanPart;
struct GroupPlan;
constexpr uint64_t kPlanVersion = 6;  // bump with any change to the structs above or below

struct GroupPlan {
  uint64_t layout;  // first, so a module of any version can read it: plan_layout()
  // The group's params as Python objects (owned references): a step's param list must hold the
  // same objects in the same order for the plan to apply.
  std::vector<void*> held;
  // Per position: the part holding it and its index there; part -1 for a param that had no grad.
  std::vector<int32_t> part_of, index_in;
  std::vector<PlanPart> parts;
};

constexpr uint64_t plan_layout() {
  return kPlanVersion * 1000003u + sizeof(GroupPlan) * 1009u + sizeof(PlanPart) * 31u +
         sizeof(StepHyper);
}

// Part k of a plan (an error past its parts).
inline PlanPart& plan_part(GroupPlan& plan, size_t k) {
  ONEPASS_CHECK(k < plan.parts.size(), "onepass: plan part ", k, " of ", plan.parts.size());
  return plan.parts[k];
}

// The plan at `address` (GroupPlan.address()), refused when it was built with another layout.
inline GroupPlan& plan_at(uintptr_t address) {
  auto* plan = reinterpret_cast<GroupPlan*>(address);
  ONEPASS_CHECK(plan != nullptr && plan->layout == plan_layout(),
                "onepass: this module and onepass._C were built from different versions of "
                "csrc/group_plan.h; rebuild them together");
  return *plan;
}

}  // namespace onepass
