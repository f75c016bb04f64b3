// The CUDA kernel instantiation a launch takes: the runtime flags (amsgrad, maximize, coupled,
// scaled), the param dtype, the state format and the param rounding become template arguments
// of the kernels in kernels.cuh. Shared by the real launch and the emulated one (host_step.h).
#pragma once

#include "../onepass_ops.h"
#include "kernels.cuh"
#include "plan.h"

namespace onepass {
namespace host {

using kernels::kBF16;
using kernels::kF32;
using kernels::kInt8;
using kernels::kKahan;
using kernels::kNearest;
using kernels::kStochastic;

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

}  // namespace host
}  // namespace onepass
