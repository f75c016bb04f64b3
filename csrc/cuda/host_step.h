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

// The batch's per-step scalars, one TensorScalars a param (TensorMeta::slot indexes them): made
// on the host when every input is there (host step counts, a float or host lr, no grad scale),
// else by step_scalars_kernel, which with device step counts also advances them. Params that
// share a step count share the host's float64 work.
struct ScalarTable {
  at::Tensor keep;
  const TensorScalars* table = nullptr;
};

template <class RT>
ScalarTable make_scalars(const BatchArgs& a, const RT& rt, const LaunchArgs& L) {
  const size_t n = a.params.size();
  const bool on_device = L.device_steps || L.h.lr_dev != nullptr || L.h.lr_dev64 != nullptr ||
                         L.h.grad_scale != nullptr;
  ScalarTable out;
  if (!on_device) {
    std::vector<TensorScalars> host(n);
    int64_t prev_step = -1;
    bool prev_f64 = false;
    for (size_t i = 0; i < n; ++i) {
      const int64_t step = static_cast<int64_t>(read_step(a.steps[i])) + 1;
      const bool f64 = a.params[i].scalar_type() == at::kDouble;
      if (i > 0 && step == prev_step && f64 == prev_f64)
        host[i] = host[i - 1];
      else
        host[i] = tensor_scalars(step, L.h.lr, 1.0, L.h, f64);
      prev_step = step;
      prev_f64 = f64;
    }
    out.keep = rt.upload(host.data(), static_cast<int64_t>(n * sizeof(TensorScalars)));
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
      sl.step_host = static_cast<int64_t>(read_step(a.steps[i])) + 1;
    sl.f64 = a.params[i].scalar_type() == at::kDouble;
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
using Launcher = void (*)(const RT&, const Desc*, int, const int32_t*, const TensorScalars*,
                          const double*, int64_t);

template <class RT, typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>
void launch_fp32(const RT& rt, const Desc* descs, int n, const int32_t* map,
                 const TensorScalars* sc, const double* found_inf, int64_t blocks) {
  rt.template run<&kernels::adam_kernel<P, AMS, MAX, COUPLED, SCALED>>(blocks, kThreads, descs, n,
                                                                      map, sc, found_inf);
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
                              const TensorScalars*, const double*, const float*, int64_t);

template <class RT, typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR>
void launch_lowp(const RT& rt, const LowpDesc* descs, int n, const int32_t* map,
                 const TensorScalars* sc, const double* found_inf, const float*, int64_t blocks) {
  rt.template run<&kernels::lowp_kernel<P, AMS, MAX, COUPLED, SCALED, SF, PR>>(
      blocks, kThreads, descs, n, map, sc, found_inf);
}

template <class RT, typename P, bool MAX, bool COUPLED, bool SCALED, int PR, bool FMAP>
void launch_int8(const RT& rt, const LowpDesc* descs, int n, const int32_t* map,
                 const TensorScalars* sc, const double* found_inf, const float* tables,
                 int64_t blocks) {
  rt.template run<&kernels::int8_kernel<P, MAX, COUPLED, SCALED, PR, FMAP>>(
      blocks, kThreads, descs, n, map, sc, found_inf, tables);
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

// ---- block maps -----------------------------------------------------------------------------
// A planned group's block maps (plan.h, block_map), one a launch (param dtype), made on its first
// step and kept with the plan (PlanPart::cuda_work): they depend on the tensors' sizes only, which
// the plan keeps. Not used while a CUDA graph is captured (a replay would read a map the plan may
// have dropped): the kernels search then.
struct BlockMaps {
  at::Tensor map[4];
  int64_t blocks[4] = {-1, -1, -1, -1};

  template <class RT, typename D>
  const int32_t* get(const RT& rt, int launch, const Plan<D>& plan) {
    if (rt.capturing()) return nullptr;
    if (blocks[launch] != plan.blocks) {
      const std::vector<int32_t> host = block_map(plan.descs, plan.blocks);
      map[launch] = rt.upload(host.data(), static_cast<int64_t>(host.size() * sizeof(int32_t)));
      blocks[launch] = plan.blocks;
    }
    return reinterpret_cast<const int32_t*>(map[launch].data_ptr());
  }
};

// ---- the steps ----------------------------------------------------------------------------------
// fp32 state, nearest rounding (adam_step_): a validated, non-empty batch.
template <class RT>
void step_fp32(const BatchArgs& a, const RT& rt, BlockMaps* maps = nullptr) {
  check_launch(a, rt);
  LaunchArgs L;
  if (!prepare(a, rt, L)) return;
  const ScalarTable sc = make_scalars(a, rt, L);

  // One launch per param dtype present (a group normally has one).
  const at::ScalarType dtypes[4] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  const bool flags[4] = {a.amsgrad, a.maximize, !a.decoupled, a.grad_scale.has_value()};
  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  for (int launch = 0; launch < 4; ++launch) {
    const at::ScalarType dt = dtypes[launch];
    std::vector<TensorMeta> metas;
    for (size_t i = 0; i < a.params.size(); ++i) {
      const at::Tensor& p0 = a.params[i];
      if (p0.scalar_type() != dt || p0.numel() == 0) continue;
      TensorMeta t{};
      const at::Tensor& g0 = a.grads[i];
      if (walks_in_place(p0, false) && in_walk_layout(g0, p0, false)) {
        // the usual case: both walked in place, no tensor copied or kept
        t.p = const_cast<void*>(raw_data(p0));
        t.g = raw_data(g0);
      } else {
        const DensePair dp = dense_pair(p0, g0);
        if (dp.copy_back) write_back.emplace_back(p0, dp.p);
        keep.push_back(dp.p);
        keep.push_back(dp.g);
        t.p = dp.p.data_ptr();
        t.g = dp.g.data_ptr();
      }
      t.m = const_cast<void*>(raw_data(a.exp_avgs[i]));
      t.v = const_cast<void*>(raw_data(a.exp_avg_sqs[i]));
      t.v_max = a.amsgrad ? const_cast<void*>(raw_data(a.max_exp_avg_sqs[i])) : nullptr;
      t.slot = static_cast<int32_t>(i);
      t.numel = p0.numel();
      t.rows = 1;
      metas.push_back(t);
    }
    if (metas.empty()) continue;
    const Plan<Desc> plan = plan_fp32(metas, param_bytes(dt));
    ONEPASS_CHECK(plan.blocks < (int64_t(1) << 31), "onepass: too many blocks for one launch");
    const at::Tensor table =
        rt.upload(plan.descs.data(), static_cast<int64_t>(plan.descs.size() * sizeof(Desc)));
    keep.push_back(table);
    Launcher<RT> fn = nullptr;
    switch (dt) {
      case at::kFloat: fn = pick<RT, float>(flags); break;
      case at::kDouble: fn = pick<RT, double>(flags); break;
      case at::kBFloat16: fn = pick<RT, Bf16>(flags); break;
      default: fn = pick<RT, Fp16>(flags); break;
    }
    const int32_t* map = maps != nullptr ? maps->get(rt, launch, plan) : nullptr;
    fn(rt, reinterpret_cast<const Desc*>(table.data_ptr()), static_cast<int>(plan.descs.size()),
       map, sc.table, L.h.found_inf, plan.blocks);
  }
  for (auto& pw : write_back) pw.first.copy_(pw.second);
  bump_host_steps(a.steps, L);
}

// bf16 / int8 state, stochastic / Kahan bf16 params: a validated, non-empty batch. What the CPU
// kernel's step_walk walks, this walks: dense params in storage order (working copies of
// the others), int8 params and grads as contiguous (row-major) tensors, Kahan compensations in
// their param's walk layout; working copies are written back after the launch.
template <class RT>
void step_lowp(const BatchArgs& a, const RT& rt, BlockMaps* maps = nullptr) {
  check_launch(a, rt);
  LaunchArgs L;
  if (!prepare(a, rt, L)) return;
  const ScalarTable sc = make_scalars(a, rt, L);
  const int sf = a.state_format;
  const int pr = a.param_rounding;
  const bool int8 = sf == kInt8;
  const float* tables = int8 ? a.qtables->data_ptr<float>() : nullptr;
  const bool fmap = int8 && rt.float_maps(*a.qtables);

  // One launch per param dtype present (a group normally has one).
  const at::ScalarType dtypes[3] = {at::kFloat, at::kBFloat16, at::kHalf};
  const bool flags[4] = {a.amsgrad, a.maximize, !a.decoupled, a.grad_scale.has_value()};
  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, working copy)
  for (int launch = 0; launch < 3; ++launch) {
    const at::ScalarType dt = dtypes[launch];
    std::vector<TensorMeta> metas;
    for (size_t i = 0; i < a.params.size(); ++i) {
      const at::Tensor& p0 = a.params[i];
      if (p0.scalar_type() != dt || p0.numel() == 0) continue;
      at::Tensor p, g;
      if (int8) {
        // int8 blocks are rows of the row-major order: walk contiguous working copies
        p = p0.is_contiguous() ? p0 : p0.contiguous();
        if (!p0.is_contiguous()) write_back.emplace_back(p0, p);
        g = a.grads[i].is_contiguous() ? a.grads[i] : a.grads[i].contiguous();
      } else {
        const DensePair dp = dense_pair(p0, a.grads[i]);
        if (dp.copy_back) write_back.emplace_back(p0, dp.p);
        p = dp.p;
        g = dp.g;
      }
      keep.push_back(p);
      keep.push_back(g);
      TensorMeta t{};
      t.p = p.data_ptr();
      t.g = g.data_ptr();
      t.m = a.exp_avgs[i].data_ptr();
      t.v = a.exp_avg_sqs[i].data_ptr();
      t.v_max = a.amsgrad ? a.max_exp_avg_sqs[i].data_ptr() : nullptr;
      if (pr == kKahan) {
        const at::Tensor& c0 = a.kahan_comps[i];
        at::Tensor c = c0;
        if (!in_walk_layout(c0, p, false)) {
          c = at::empty_like(p, c0.options());
          c.copy_(c0);
          write_back.emplace_back(c0, c);
        }
        keep.push_back(c);
        t.comp = c.data_ptr();
      }
      if (int8) {
        t.absmax_m = a.exp_avg_absmaxs[i].data_ptr<float>();
        t.absmax_v = a.exp_avg_sq_absmaxs[i].data_ptr<float>();
      }
      t.slot = static_cast<int32_t>(i);
      t.numel = p.numel();
      t.rows = p.dim() < 2 ? 1 : p.size(0);
      metas.push_back(t);
    }
    if (metas.empty()) continue;
    const Plan<LowpDesc> plan = plan_lowp(metas, param_bytes(dt), int8);
    ONEPASS_CHECK(plan.blocks < (int64_t(1) << 31), "onepass: too many blocks for one launch");
    const LowpLauncher<RT> fn = pick_lowp<RT>(dt, sf, pr, fmap, flags);
    ONEPASS_CHECK(fn != nullptr, "onepass: no CUDA kernel for state format ", sf,
                  ", param rounding ", pr, " and ", dt, " params");
    const at::Tensor table =
        rt.upload(plan.descs.data(), static_cast<int64_t>(plan.descs.size() * sizeof(LowpDesc)));
    keep.push_back(table);
    const int32_t* map = maps != nullptr ? maps->get(rt, launch, plan) : nullptr;
    fn(rt, reinterpret_cast<const LowpDesc*>(table.data_ptr()), static_cast<int>(plan.descs.size()),
       map, sc.table, L.h.found_inf, tables, plan.blocks);
  }
  for (auto& pw : write_back) pw.first.copy_(pw.second);
  bump_host_steps(a.steps, L);
}

// adam_step_lowp_'s dispatch: fp32 state with nearest rounding is what adam_step_ does.
template <class RT>
void step_any(const BatchArgs& a, const RT& rt, BlockMaps* maps = nullptr) {
  if (a.params.empty()) return;
  if (a.state_format == kF32 && a.param_rounding == kNearest)
    step_fp32(a, rt, maps);
  else
    step_lowp(a, rt, maps);
}

}  // namespace host
}  // namespace onepass
