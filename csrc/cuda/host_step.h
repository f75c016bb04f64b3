// The host side of a CUDA-backend step, shared by the real launch (adam_cuda.cu) and the emulated
// one (csrc/emu/adam_emu.cpp): the checks made before anything is launched, the per-step scalars,
// the launches (their tensors, plans and kept tables: kept_launches.h; the kernel each takes:
// launchers.h), and the step-count increment. What differs between the two is a runtime RT:
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
#include "kept_launches.h"
#include "launchers.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <type_traits>
#include <utility>
#include <vector>

namespace onepass {
namespace host {

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
// set: whether to count the step must be known on the host, one sync; unless the caller takes
// the counts back itself, a.defer_found_inf, when the kernels read found_inf).
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
    if (!L.device_steps && !a.defer_found_inf) {
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

// The count this step makes of host step count i (next_count), checked (a planned step leaves the
// values to this read: validate_planned_state; nothing has been written yet).
inline int64_t host_next_count(const BatchArgs& a, size_t i) {
  const double t = read_step(a.steps[i]);
  check_step_value(t, i);
  return next_count(t, a.steps[i].scalar_type() == at::kDouble);
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
      const std::pair<int64_t, bool> key{host_next_count(a, i),
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
      sl.step_host = host_next_count(a, i);
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
             reinterpret_cast<const int32_t*>(k.map.data_ptr()), kept_entries(a, rt, sc.index, k),
             k.blocks);
  } else {
    // Planned this step: the kernels find their tensor by a search (no block map).
    Working w;
    const at::ScalarType* dtypes = nullptr;
    const int nd = launch_dtypes(is_lowp(a), &dtypes);
    for (int l = 0; l < nd; ++l) {
      const std::vector<TensorMeta> metas = launch_metas(a, dtypes[l], w);
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
