// The host side of a CUDA-backend step, shared by the real launch (adam_cuda.cu) and the emulated
// one (csrc/emu/adam_emu.cpp): the checks made before anything is launched, the walk layout of
// each tensor (working copies), the plan (plan.h), the choice of kernel instantiation, and the
// step-count increment. What differs between the two is a runtime RT:
//   RT::device_steps(a)  whether the step counts live on the device (capturable): steps[0]'s
//   RT::step_on_device(t) whether this step count does (all of a group's must agree)
//   RT::on_device(t)     whether a tensor lives where the kernels run
//   RT::capturing()      whether a CUDA graph is being captured on the current stream
//   RT::upload(p, n)     a table of n bytes, readable by the kernels
//   RT::alloc(n)         n bytes of device memory
//   RT::float_maps(q)    whether the int8 tables are quant's float3 maps
//   RT::run<K>(grid, threads, args...)  launches kernel K
#pragma once

#include "../onepass_ops.h"
#include "kernels.cuh"
#include "plan.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <type_traits>
#include <utility>
#include <vector>

namespace onepass {
namespace host {

using kernels::kBF16;
using kernels::kF32;
using kernels::kInt8;
using kernels::kKahan;
using kernels::kNearest;
using kernels::kStochastic;

// ---- checks -------------------------------------------------------------------------------------
// What validate_batch (batch_checks.cpp) cannot see because it depends on where the kernels run:
// all of it before the first launch, so a bad batch changes nothing.
template <class RT>
void check_launch(const BatchArgs& a, const RT& rt) {
  if (a.params.empty()) return;
  const bool dev_steps = rt.device_steps(a);
  for (size_t i = 0; i < a.steps.size(); ++i) {
    const at::Tensor& st = a.steps[i];
    ONEPASS_CHECK(rt.step_on_device(st) == dev_steps,
                  "onepass: steps[", i, "] is on ", st.device(), " but steps[0] on ",
                  a.steps[0].device(), ": the step counts of one group live all on the host or "
                  "all on the device (capturable=True)");
    if (dev_steps)
      ONEPASS_CHECK(st.scalar_type() == at::kFloat, "onepass: steps[", i, "] is ",
                    st.scalar_type(), "; step counts on the device (capturable=True) must be "
                    "float32 tensors");
  }
  if (a.lr_tensor.has_value() && rt.on_device(*a.lr_tensor))
    ONEPASS_CHECK(a.lr_tensor->device() == a.params[0].device(),
                  "onepass: a device lr must be on the params' device, got ", a.lr_tensor->device());
  if (!rt.capturing()) return;
  // A graph replays what was captured: a count or an lr read on the host would be frozen at its
  // captured value, and a host-to-device copy of a pageable tensor cannot be captured.
  ONEPASS_CHECK(dev_steps, "onepass: a CUDA graph is being captured, but this group's step counts "
                "live on the host (capturable=False): every replay would repeat the captured step. "
                "Create the optimizer with capturable=True");
  ONEPASS_CHECK(!a.lr_tensor.has_value() || rt.on_device(*a.lr_tensor),
                "onepass: a CUDA graph is being captured with a Tensor lr on the host: replays "
                "would keep its captured value. Put the lr tensor on the params' device");
  ONEPASS_CHECK(!a.grad_scale.has_value() || rt.on_device(*a.grad_scale),
                "onepass: a CUDA graph is being captured with grad_scale on the host");
  ONEPASS_CHECK(!a.found_inf.has_value() || rt.on_device(*a.found_inf),
                "onepass: a CUDA graph is being captured with found_inf on the host");
}

// ---- launch-wide arguments ----------------------------------------------------------------------
struct LaunchArgs {
  Hyper h{};
  bool device_steps = false;
  at::Tensor lr_keep, gs_keep, fi_keep;  // the device copies h points into
};

// Fills L from a checked batch; false when the step is skipped (host step counts and found_inf
// set: whether to count the step must be known on the host, one sync).
template <class RT>
bool prepare(const BatchArgs& a, const RT& rt, LaunchArgs& L) {
  const c10::Device dev = a.params[0].device();
  L.device_steps = rt.device_steps(a);
  Hyper& h = L.h;
  h.lr = a.lr;
  h.beta1 = a.beta1;
  h.beta2 = a.beta2;
  h.eps = a.eps;
  h.weight_decay = a.weight_decay;
  h.decoupled = a.decoupled;
  h.seed = static_cast<uint32_t>(a.seed);
  if (a.lr_tensor.has_value()) {
    const at::Tensor& lr_tensor = *a.lr_tensor;
    if (rt.on_device(lr_tensor)) {
      if (lr_tensor.scalar_type() == at::kDouble) {
        L.lr_keep = lr_tensor.contiguous();
        h.lr_dev64 = L.lr_keep.data_ptr<double>();
      } else {
        L.lr_keep = lr_tensor.to(at::kFloat);  // exact for float32/bf16/fp16 values
        h.lr_dev = L.lr_keep.data_ptr<float>();
      }
    } else {
      h.lr = lr_tensor.item<double>();
    }
  }
  // float64 on the device: exact for a grad_scale of any dtype (make_step_scalars rounds it once
  // to the math dtype, as the reference does), and a found_inf however small still skips.
  if (a.grad_scale.has_value()) {
    L.gs_keep = a.grad_scale->to(dev, at::kDouble);
    h.grad_scale = L.gs_keep.data_ptr<double>();
  }
  if (a.found_inf.has_value()) {
    if (!L.device_steps) {
      if (a.found_inf->item<double>() != 0.0) return false;
    } else {
      L.fi_keep = a.found_inf->to(dev, at::kDouble);
      h.found_inf = L.fi_keep.data_ptr<double>();
    }
  }
  return true;
}

// The batch's per-step scalars and which of them each param takes (index[i]): made on the host
// when every input is there (host step counts, a float or host lr, no grad scale), one entry per
// distinct (count, math dtype) -- a group's params normally share one count, so that is one
// entry to upload, not one a param -- else by step_scalars_kernel, one a param, which with device
// step counts also advances them.
struct ScalarTable {
  at::Tensor keep;
  const TensorScalars* table = nullptr;
  std::vector<int32_t> index;  // param i's entry
};

// Host step count i, checked (a planned step leaves the values to this read: validate_planned_state;
// nothing has been written yet).
inline int64_t host_count(const BatchArgs& a, size_t i) {
  const double t = read_step(a.steps[i]);
  check_step_value(t, i);
  return static_cast<int64_t>(t);
}

template <class RT>
ScalarTable make_scalars(const BatchArgs& a, const RT& rt, const LaunchArgs& L) {
  const size_t n = a.params.size();
  const bool on_device = L.device_steps || L.h.lr_dev != nullptr || L.h.lr_dev64 != nullptr ||
                         L.h.grad_scale != nullptr;
  ScalarTable out;
  out.index.resize(n);
  if (!on_device) {
    std::vector<TensorScalars> host;
    std::vector<std::pair<int64_t, bool>> keys;  // (count, f64) of each entry
    for (size_t i = 0; i < n; ++i) {
      const std::pair<int64_t, bool> key{host_count(a, i) + 1,
                                         a.params[i].scalar_type() == at::kDouble};
      // (the last entry first: params that share a count are usually neighbours)
      size_t k = keys.size();
      if (k > 0 && keys[k - 1] == key) {
        k -= 1;
      } else {
        k = 0;
        if (keys.size() <= 16)  // (past that a count is appended: a step stays O(n))
          while (k < keys.size() && keys[k] != key) ++k;
        else
          k = keys.size();
        if (k == keys.size()) {
          keys.push_back(key);
          host.push_back(tensor_scalars(key.first, L.h.lr, 1.0, L.h, key.second));
        }
      }
      out.index[i] = static_cast<int32_t>(k);
    }
    out.keep = rt.upload(host.data(), static_cast<int64_t>(host.size() * sizeof(TensorScalars)));
    out.table = reinterpret_cast<const TensorScalars*>(out.keep.data_ptr());
    return out;
  }
  std::vector<StepSlot> slots(n);
  for (size_t i = 0; i < n; ++i) {
    StepSlot& sl = slots[i];
    sl = StepSlot{};
    if (L.device_steps)
      sl.step_dev = a.steps[i].data_ptr<float>();
    else
      sl.step_host = host_count(a, i) + 1;
    sl.f64 = a.params[i].scalar_type() == at::kDouble;
    out.index[i] = static_cast<int32_t>(i);
  }
  const at::Tensor up = rt.upload(slots.data(), static_cast<int64_t>(n * sizeof(StepSlot)));
  out.keep = rt.alloc(static_cast<int64_t>(n * sizeof(TensorScalars)));
  TensorScalars* table = reinterpret_cast<TensorScalars*>(out.keep.data_ptr());
  const int count = static_cast<int>(n);
  rt.template run<&kernels::step_scalars_kernel<StepSlot>>((count + kThreads - 1) / kThreads, kThreads,
                                                 reinterpret_cast<const StepSlot*>(up.data_ptr()),
                                                 table, count, L.h, L.device_steps);
  out.table = table;
  return out;
}

// Host step counts += 1 after the launches (device counts: step_scalars_kernel).
inline void bump_host_steps(at::TensorList steps, const LaunchArgs& L) {
  if (L.device_steps) return;
  for (const at::Tensor& st : steps) {
    void* d = const_cast<void*>(raw_data(st));  // (a checked one-element CPU tensor)
    if (st.scalar_type() == at::kFloat) *static_cast<float*>(d) += 1.0f;
    else *static_cast<double*>(d) += 1.0;
  }
}

// ---- choosing the kernel instantiation ----------------------------------------------------------
// The four runtime flags (amsgrad, maximize, coupled, scaled) become template arguments.
template <class RT>
using Launcher = void (*)(const RT&, const Desc*, int, const int32_t*, const StepEntry*,
                          const TensorScalars*, const double*, const float*, int64_t);

template <class RT, typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>
void launch_fp32(const RT& rt, const Desc* descs, int n, const int32_t* map,
                 const StepEntry* entries, const TensorScalars* sc, const double* found_inf,
                 const float*, int64_t blocks) {
  rt.template run<&kernels::adam_kernel<P, AMS, MAX, COUPLED, SCALED>>(blocks, kThreads, descs, n,
                                                                      map, entries, sc, found_inf);
}

template <class RT, typename P, bool... B>
Launcher<RT> pick(const bool* f) {
  if constexpr (sizeof...(B) == 4) {
    return &launch_fp32<RT, P, B...>;
  } else {
    return f[0] ? pick<RT, P, B..., true>(f + 1) : pick<RT, P, B..., false>(f + 1);
  }
}

template <class RT>
using LowpLauncher = void (*)(const RT&, const LowpDesc*, int, const int32_t*,
                              const StepEntry*, const TensorScalars*, const double*,
                              const float*, int64_t);

template <class RT, typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR>
void launch_lowp(const RT& rt, const LowpDesc* descs, int n, const int32_t* map,
                 const StepEntry* entries, const TensorScalars* sc, const double* found_inf,
                 const float*, int64_t blocks) {
  rt.template run<&kernels::lowp_kernel<P, AMS, MAX, COUPLED, SCALED, SF, PR>>(
      blocks, kThreads, descs, n, map, entries, sc, found_inf);
}

template <class RT, typename P, bool MAX, bool COUPLED, bool SCALED, int PR, bool FMAP>
void launch_int8(const RT& rt, const LowpDesc* descs, int n, const int32_t* map,
                 const StepEntry* entries, const TensorScalars* sc, const double* found_inf,
                 const float* tables, int64_t blocks) {
  rt.template run<&kernels::int8_kernel<P, MAX, COUPLED, SCALED, PR, FMAP>>(
      blocks, kThreads, descs, n, map, entries, sc, found_inf, tables);
}

template <class RT, typename P, int SF, int PR, bool FMAP>
struct LowpKernel {
  template <bool AMS, bool MAX, bool COUPLED, bool SCALED>
  static LowpLauncher<RT> get() {
    if constexpr (AMS && SF != kF32) {
      return nullptr;  // amsgrad only with fp32 state (validate_batch)
    } else if constexpr (SF == kInt8) {
      return &launch_int8<RT, P, MAX, COUPLED, SCALED, PR, FMAP>;
    } else {
      return &launch_lowp<RT, P, AMS, MAX, COUPLED, SCALED, SF, PR>;
    }
  }
};

template <class RT, typename K, bool... B>
LowpLauncher<RT> pick_kernel(const bool* f) {
  if constexpr (sizeof...(B) == 4) {
    return K::template get<B...>();
  } else {
    return f[0] ? pick_kernel<RT, K, B..., true>(f + 1) : pick_kernel<RT, K, B..., false>(f + 1);
  }
}

template <class RT, typename P, int PR>
LowpLauncher<RT> pick_state(int sf, bool fmap, const bool* f) {
  if (sf == kInt8)
    return fmap ? pick_kernel<RT, LowpKernel<RT, P, kInt8, PR, true>>(f)
                : pick_kernel<RT, LowpKernel<RT, P, kInt8, PR, false>>(f);
  if (sf == kBF16) return pick_kernel<RT, LowpKernel<RT, P, kBF16, PR, false>>(f);
  if constexpr (PR != kNearest) return pick_kernel<RT, LowpKernel<RT, P, kF32, PR, false>>(f);
  return nullptr;  // fp32 state, nearest rounding: adam_kernel
}

// The kernel for a low-precision batch: param dtype x state format x param rounding x flags
// (stochastic and Kahan rounding exist for bf16 params only: validate_batch).
template <class RT>
LowpLauncher<RT> pick_lowp(at::ScalarType dtype, int sf, int pr, bool fmap, const bool* f) {
  if (dtype == at::kBFloat16) {
    if (pr == kStochastic) return pick_state<RT, Bf16, kStochastic>(sf, fmap, f);
    if (pr == kKahan) return pick_state<RT, Bf16, kKahan>(sf, fmap, f);
    return pick_state<RT, Bf16, kNearest>(sf, fmap, f);
  }
  if (dtype == at::kHalf) return pick_state<RT, Fp16, kNearest>(sf, fmap, f);
  return pick_state<RT, float, kNearest>(sf, fmap, f);
}

inline int param_bytes(at::ScalarType dt) {
  return dt == at::kDouble ? 8 : dt == at::kFloat ? 4 : 2;
}

// ---- the launches of a step ------------------------------------------------------------------
// One launch per param dtype present (a group normally has one). Its tensors in the walk layout
// the CPU kernel's step_walk walks: dense params in storage order, int8 params and grads as
// contiguous (row-major) tensors, Kahan compensations in their param's walk layout. Where a
// tensor is not, a working copy is walked and written back after the launch.
struct Working {
  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, working copy)
  void finish() {
    for (auto& pw : write_back) pw.first.copy_(pw.second);
  }
};

// The dtypes of a batch's launches, in launch order: fp32 state has a kernel for float64 params,
// the low-precision formats do not (validate_batch).
inline int launch_dtypes(bool lowp, const at::ScalarType** out) {
  static const at::ScalarType fp32[4] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  static const at::ScalarType low[3] = {at::kFloat, at::kBFloat16, at::kHalf};
  *out = lowp ? low : fp32;
  return lowp ? 3 : 4;
}

inline bool is_lowp(const BatchArgs& a) { return !(a.state_format == kF32 && a.param_rounding == kNearest); }

// Param i's tensors for the planner, through working copies where they are not in the walk
// layout (w keeps them).
inline TensorMeta tensor_meta(const BatchArgs& a, size_t i, Working& w) {
  const bool lowp = is_lowp(a);
  const bool int8 = a.state_format == kInt8;
  const at::Tensor& p0 = a.params[i];
  const at::Tensor& g0 = a.grads[i];
  TensorMeta t{};
  at::Tensor p = p0;
  if (walks_in_place(p0, int8) && in_walk_layout(g0, p0, int8)) {
    // the usual case: both walked in place, no tensor copied or kept
    t.p = const_cast<void*>(raw_data(p0));
    t.g = raw_data(g0);
  } else if (int8) {
    // int8 blocks are rows of the row-major order: walk contiguous working copies
    p = p0.contiguous();
    if (!p0.is_contiguous()) w.write_back.emplace_back(p0, p);
    const at::Tensor g = g0.contiguous();
    w.keep.push_back(p);
    w.keep.push_back(g);
    t.p = p.data_ptr();
    t.g = g.data_ptr();
  } else {
    const DensePair dp = dense_pair(p0, g0);
    if (dp.copy_back) w.write_back.emplace_back(p0, dp.p);
    p = dp.p;
    w.keep.push_back(dp.p);
    w.keep.push_back(dp.g);
    t.p = dp.p.data_ptr();
    t.g = dp.g.data_ptr();
  }
  t.m = const_cast<void*>(raw_data(a.exp_avgs[i]));
  t.v = const_cast<void*>(raw_data(a.exp_avg_sqs[i]));
  t.v_max = a.amsgrad ? const_cast<void*>(raw_data(a.max_exp_avg_sqs[i])) : nullptr;
  if (a.param_rounding == kKahan) {
    const at::Tensor& c0 = a.kahan_comps[i];
    if (in_walk_layout(c0, p, false)) {
      t.comp = const_cast<void*>(raw_data(c0));
    } else {
      at::Tensor c = at::empty_like(p, c0.options());
      c.copy_(c0);
      w.write_back.emplace_back(c0, c);
      w.keep.push_back(c);
      t.comp = c.data_ptr();
    }
  }
  if (int8) {
    t.absmax_m = a.exp_avg_absmaxs[i].data_ptr<float>();
    t.absmax_v = a.exp_avg_sq_absmaxs[i].data_ptr<float>();
  }
  t.slot = static_cast<int32_t>(i);
  t.numel = p.numel();
  t.rows = !lowp || p.dim() < 2 ? 1 : p.size(0);
  return t;
}

// Whether every tensor of the batch is walked in place (no working copy this step).
inline bool all_in_place(const BatchArgs& a) {
  const bool int8 = a.state_format == kInt8;
  for (size_t i = 0; i < a.params.size(); ++i) {
    const at::Tensor& p = a.params[i];
    if (!walks_in_place(p, int8) || !in_walk_layout(a.grads[i], p, int8)) return false;
    if (a.param_rounding == kKahan && !in_walk_layout(a.kahan_comps[i], p, false)) return false;
  }
  return true;
}

template <typename D>
Plan<D> plan_launch(const BatchArgs& a, const std::vector<TensorMeta>& metas, at::ScalarType dt) {
  Plan<D> plan;
  if constexpr (std::is_same_v<D, Desc>)
    plan = plan_fp32(metas, param_bytes(dt));
  else
    plan = plan_lowp(metas, param_bytes(dt), a.state_format == kInt8);
  ONEPASS_CHECK(plan.blocks < (int64_t(1) << 31), "onepass: too many blocks for one launch");
  return plan;
}

// A launch of a planned group, kept between steps (PlannedLaunches): its descriptor table and
// block map on the device, uploaded once; what a step changes is its StepEntry table.
template <typename D>
struct KeptLaunch {
  at::ScalarType dtype;
  int n = 0;
  int64_t blocks = 0;
  at::Tensor descs, map;         // device
  std::vector<int32_t> param_of;  // each desc's param (index in the batch)
  std::vector<StepEntry> entries; // the last step's, and their device copy
  at::Tensor entries_dev;
};

// A planned group's launches (PlanPart::cuda_work), made on its first step whose tensors are all
// walked in place and kept for the plan's life: the plan keeps the params' and the state's
// storage and sizes, which is all a Desc holds. A step whose grads are not in place (a working
// copy), or one being captured into a CUDA graph (a replay would read tables the plan may have
// dropped), takes the unkept path.
struct PlannedLaunches {
  bool made = false;
  std::vector<KeptLaunch<Desc>> fp32;
  std::vector<KeptLaunch<LowpDesc>> lowp;
  template <typename D>
  std::vector<KeptLaunch<D>>& of() {
    if constexpr (std::is_same_v<D, Desc>) return fp32; else return lowp;
  }
};

template <typename D, class RT>
void make_kept(const BatchArgs& a, const RT& rt, std::vector<KeptLaunch<D>>& out) {
  const at::ScalarType* dtypes = nullptr;
  const int nd = launch_dtypes(is_lowp(a), &dtypes);
  Working unused;  // (every tensor is in place: nothing is copied)
  for (int l = 0; l < nd; ++l) {
    std::vector<TensorMeta> metas;
    for (size_t i = 0; i < a.params.size(); ++i)
      if (a.params[i].scalar_type() == dtypes[l] && a.params[i].numel() > 0)
        metas.push_back(tensor_meta(a, i, unused));
    if (metas.empty()) continue;
    const Plan<D> plan = plan_launch<D>(a, metas, dtypes[l]);
    KeptLaunch<D> k;
    k.dtype = dtypes[l];
    k.n = static_cast<int>(plan.descs.size());
    k.blocks = plan.blocks;
    k.descs = rt.upload(plan.descs.data(), static_cast<int64_t>(plan.descs.size() * sizeof(D)));
    const std::vector<int32_t> map = block_map(plan.descs, plan.blocks);
    k.map = rt.upload(map.data(), static_cast<int64_t>(map.size() * sizeof(int32_t)));
    for (const TensorMeta& t : metas) k.param_of.push_back(t.slot);
    out.push_back(std::move(k));
  }
}

// This step's entries of a kept launch, uploaded only when they differ from the last step's (the
// grads kept their addresses and the params their counts: nothing to upload).
template <typename D, class RT>
const StepEntry* kept_entries(const BatchArgs& a, const RT& rt, const ScalarTable& sc,
                              KeptLaunch<D>& k) {
  bool same = k.entries.size() == k.param_of.size();
  k.entries.resize(k.param_of.size());
  for (size_t d = 0; d < k.param_of.size(); ++d) {
    const int32_t i = k.param_of[d];
    const StepEntry e = step_entry(raw_data(a.grads[i]), sc.index[i]);
    StepEntry& last = k.entries[d];
    same = same && last.g == e.g && last.scalars == e.scalars;  // (g_aligned follows g)
    last = e;
  }
  if (!same)
    k.entries_dev = rt.upload(k.entries.data(),
                              static_cast<int64_t>(k.entries.size() * sizeof(StepEntry)));
  return reinterpret_cast<const StepEntry*>(k.entries_dev.data_ptr());
}

// The launcher of a launch's kernel (nullptr: none for this combination).
template <class RT>
Launcher<RT> pick_launcher(const BatchArgs& a, const RT&, at::ScalarType dt, const Desc*) {
  const bool flags[4] = {a.amsgrad, a.maximize, !a.decoupled, a.grad_scale.has_value()};
  switch (dt) {
    case at::kFloat: return pick<RT, float>(flags);
    case at::kDouble: return pick<RT, double>(flags);
    case at::kBFloat16: return pick<RT, Bf16>(flags);
    default: return pick<RT, Fp16>(flags);
  }
}
template <class RT>
LowpLauncher<RT> pick_launcher(const BatchArgs& a, const RT& rt, at::ScalarType dt,
                               const LowpDesc*) {
  const bool flags[4] = {a.amsgrad, a.maximize, !a.decoupled, a.grad_scale.has_value()};
  const bool fmap = a.state_format == kInt8 && rt.float_maps(*a.qtables);
  return pick_lowp<RT>(dt, a.state_format, a.param_rounding, fmap, flags);
}

// ---- the step -----------------------------------------------------------------------------------
// A validated, non-empty batch: fp32 state with nearest rounding (D = Desc: adam_kernel), or
// bf16 / int8 state, stochastic / Kahan bf16 params (D = LowpDesc). kept: a planned group's
// launches (null: planned every step).
template <typename D, class RT>
void step_launches(const BatchArgs& a, const RT& rt, PlannedLaunches* kept) {
  check_launch(a, rt);
  LaunchArgs L;
  if (!prepare(a, rt, L)) return;
  const ScalarTable sc = make_scalars(a, rt, L);
  const float* tables = a.state_format == kInt8 ? a.qtables->data_ptr<float>() : nullptr;
  auto launch = [&](at::ScalarType dt, const D* descs, int n, const int32_t* map,
                    const StepEntry* entries, int64_t blocks) {
    const auto fn = pick_launcher(a, rt, dt, static_cast<const D*>(nullptr));
    ONEPASS_CHECK(fn != nullptr, "onepass: no CUDA kernel for state format ", a.state_format,
                  ", param rounding ", a.param_rounding, " and ", dt, " params");
    fn(rt, descs, n, map, entries, sc.table, L.h.found_inf, tables, blocks);
  };

  if (kept != nullptr && !rt.capturing() && all_in_place(a)) {
    if (!kept->made) {
      make_kept<D>(a, rt, kept->of<D>());
      kept->made = true;
    }
    for (KeptLaunch<D>& k : kept->of<D>())
      launch(k.dtype, reinterpret_cast<const D*>(k.descs.data_ptr()), k.n,
             reinterpret_cast<const int32_t*>(k.map.data_ptr()), kept_entries(a, rt, sc, k),
             k.blocks);
  } else {
    // Planned this step: the kernels find their tensor by a search (no block map).
    Working w;
    const at::ScalarType* dtypes = nullptr;
    const int nd = launch_dtypes(is_lowp(a), &dtypes);
    for (int l = 0; l < nd; ++l) {
      std::vector<TensorMeta> metas;
      for (size_t i = 0; i < a.params.size(); ++i)
        if (a.params[i].scalar_type() == dtypes[l] && a.params[i].numel() > 0)
          metas.push_back(tensor_meta(a, i, w));
      if (metas.empty()) continue;
      Plan<D> plan = plan_launch<D>(a, metas, dtypes[l]);
      for (StepEntry& e : plan.entries) e.scalars = sc.index[e.scalars];  // (slot: param i)
      const at::Tensor descs =
          rt.upload(plan.descs.data(), static_cast<int64_t>(plan.descs.size() * sizeof(D)));
      const at::Tensor entries = rt.upload(
          plan.entries.data(), static_cast<int64_t>(plan.entries.size() * sizeof(StepEntry)));
      w.keep.push_back(descs);
      w.keep.push_back(entries);
      launch(dtypes[l], reinterpret_cast<const D*>(descs.data_ptr()),
             static_cast<int>(plan.descs.size()), nullptr,
             reinterpret_cast<const StepEntry*>(entries.data_ptr()), plan.blocks);
    }
    w.finish();
  }
  bump_host_steps(a.steps, L);
}

template <class RT>
void step_fp32(const BatchArgs& a, const RT& rt, PlannedLaunches* kept = nullptr) {
  step_launches<Desc>(a, rt, kept);
}
template <class RT>
void step_lowp(const BatchArgs& a, const RT& rt, PlannedLaunches* kept = nullptr) {
  step_launches<LowpDesc>(a, rt, kept);
}

// adam_step_lowp_'s dispatch: fp32 state with nearest rounding is what adam_step_ does.
template <class RT>
void step_any(const BatchArgs& a, const RT& rt, PlannedLaunches* kept = nullptr) {
  if (a.params.empty()) return;
  if (is_lowp(a))
    step_lowp(a, rt, kept);
  else
    step_fp32(a, rt, kept);
}

}  // namespace host
}  // namespace onepass
