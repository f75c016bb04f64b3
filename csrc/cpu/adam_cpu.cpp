// The CPU backend: every tensor of a group in one parallel region, SIMD inner loop.
//
// Work split: each tensor is padded (in index space only) to whole 16-element units, the units of
// all tensors are laid end to end, and at::parallel_for (torch's own OpenMP runtime, so
// torch.set_num_threads is honoured and no second OpenMP runtime is loaded) hands each thread one
// contiguous run of units. A run can span many tensors, so 2000 small tensors cost one parallel
// region instead of 2000, and split points fall on 64-byte boundaries of fp32 data (torch's CPU
// allocator aligns to 64 bytes) so two threads never write the same cache line.
//
// SIMD: the inner loop is one plain loop over adam_element (csrc/adam_math.h) that gcc
// vectorizes; it is compiled three times under different target attributes (AVX-512, AVX2,
// baseline x86-64) and the widest one the CPU supports is chosen at run time. IEEE results do not
// depend on the vector width (no reductions, no FMA contraction), so all three give the same bits;
// the tests run each one this CPU has.
#include "../adam_math.h"
#include "../onepass_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace onepass {
namespace {

constexpr int64_t kUnit = 16;        // elements per work unit: 64 bytes of fp32
constexpr int64_t kGrainUnits = 2048;  // 32K elements (~0.9 MB of traffic) per thread at least

struct TensorWork;
using RangeFn = void (*)(const TensorWork&, int64_t, int64_t);

struct TensorWork {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* v_max;
  const void* scalars;  // StepScalars<float> or <double>, by the param's dtype
  RangeFn fn;           // the loop for this param's dtype and the batch's flags
  int64_t n;
  int64_t unit_begin;   // first global unit of this tensor
};

// ---- the loop, instantiated per (storage, flags) and per ISA ------------------------------------
template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline)) void update_range(const TensorWork& w,
                                                        const StepScalars<typename Storage<P>::math_t>& s,
                                                        int64_t begin, int64_t end) {
  using T = typename Storage<P>::math_t;
  P* __restrict p = static_cast<P*>(w.p);
  const P* __restrict g = static_cast<const P*>(w.g);
  T* __restrict m = static_cast<T*>(w.m);
  T* __restrict v = static_cast<T*>(w.v);
  T* __restrict vm = static_cast<T*>(w.v_max);
  const StepScalars<T> sc = s;  // a local copy: the compiler keeps the scalars in registers
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    T pi = Storage<P>::load(p + i);
    T mi = m[i];
    T vi = v[i];
    T vmi = AMS ? vm[i] : T(0);
    adam_element<T, AMS, MAX, COUPLED, SCALED>(pi, Storage<P>::load(g + i), mi, vi, vmi, sc);
    Storage<P>::store(p + i, pi);
    m[i] = mi;
    v[i] = vi;
    if (AMS) vm[i] = vmi;
  }
}

#define ONEPASS_DEFINE_ISA(NAME, TARGET)                                                          \
  template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>                            \
  __attribute__((target(TARGET))) void NAME(const TensorWork& w, int64_t b, int64_t e) {        \
    update_range<P, AMS, MAX, COUPLED, SCALED>(                                                   \
        w, *static_cast<const StepScalars<typename Storage<P>::math_t>*>(w.scalars), b, e);       \
  }
ONEPASS_DEFINE_ISA(range_avx512, "avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
ONEPASS_DEFINE_ISA(range_avx2, "avx2,bmi2")
ONEPASS_DEFINE_ISA(range_base, "default")
#undef ONEPASS_DEFINE_ISA

enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2")) return kAvx2;
  return kBase;
}

const int g_best_isa = detect_isa();

// ONEPASS_CPU_ISA=baseline|avx2|avx512 caps the ISA used by default (e.g. to compare variants,
// or to step around a suspected problem in one of them); the best supported one otherwise.
int initial_isa() {
  const char* env = std::getenv("ONEPASS_CPU_ISA");
  if (env == nullptr) return g_best_isa;
  for (int i = 0; i <= 2; ++i)
    if (std::strcmp(env, kIsaNames[i]) == 0) return std::min(i, g_best_isa);
  return g_best_isa;
}

std::atomic<int> g_isa{initial_isa()};

template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>
RangeFn pick_isa(int isa) {
  switch (isa) {
    case kAvx512: return &range_avx512<P, AMS, MAX, COUPLED, SCALED>;
    case kAvx2: return &range_avx2<P, AMS, MAX, COUPLED, SCALED>;
    default: return &range_base<P, AMS, MAX, COUPLED, SCALED>;
  }
}

// Turns the four runtime flags into template arguments, one level at a time.
template <typename P, bool... B>
RangeFn pick_flags(int isa, const bool* flags, int left) {
  if constexpr (sizeof...(B) == 4) {
    return pick_isa<P, B...>(isa);
  } else {
    return flags[0] ? pick_flags<P, B..., true>(isa, flags + 1, left - 1)
                    : pick_flags<P, B..., false>(isa, flags + 1, left - 1);
  }
}

template <typename P>
RangeFn pick(bool amsgrad, bool maximize, bool coupled, bool scaled) {
  const bool flags[4] = {amsgrad, maximize, coupled, scaled};
  return pick_flags<P>(g_isa.load(std::memory_order_relaxed), flags, 4);
}

void run(const std::vector<TensorWork>& ts, int64_t total_units) {
  at::parallel_for(0, total_units, kGrainUnits, [&](int64_t ub, int64_t ue) {
    // first tensor whose units end after ub
    auto it = std::upper_bound(ts.begin(), ts.end(), ub, [](int64_t u, const TensorWork& w) {
      return u < w.unit_begin + (w.n + kUnit - 1) / kUnit;
    });
    for (; it != ts.end() && it->unit_begin < ue; ++it) {
      const int64_t b = std::max<int64_t>(0, (ub - it->unit_begin) * kUnit);
      const int64_t e = std::min<int64_t>(it->n, (ue - it->unit_begin) * kUnit);
      if (b < e) it->fn(*it, b, e);
    }
  });
}

void bump_step(const at::Tensor& st) {
  if (st.scalar_type() == at::kFloat)
    *static_cast<float*>(st.data_ptr()) += 1.0f;
  else
    *static_cast<double*>(st.data_ptr()) += 1.0;
}

template <typename T>
void add_scalars(std::vector<StepScalars<T>>& table, int64_t& last_step, int64_t step,
                 const BatchArgs& a, double lr, double grad_scale) {
  // Consecutive params with the same step count (the usual case: all of them) share one entry.
  if (table.empty() || step != last_step) {
    table.push_back(make_step_scalars<T>(step, lr, a.beta1, a.beta2, a.eps, a.weight_decay,
                                         a.decoupled, grad_scale));
    last_step = step;
  }
}

}  // namespace

namespace {

void step_impl(const BatchArgs& a) {
  const size_t n = a.params.size();
  const double lr = a.lr_tensor.has_value() ? a.lr_tensor->item<double>() : a.lr;
  ONEPASS_CHECK(lr >= 0.0, "onepass: invalid learning rate ", lr);
  const double grad_scale = a.grad_scale.has_value() ? a.grad_scale->item<double>() : 1.0;
  const bool coupled = !a.decoupled;
  const bool scaled = a.grad_scale.has_value();
  const RangeFn fns[4] = {pick<float>(a.amsgrad, a.maximize, coupled, scaled),
                          pick<double>(a.amsgrad, a.maximize, coupled, scaled),
                          pick<Bf16>(a.amsgrad, a.maximize, coupled, scaled),
                          pick<Fp16>(a.amsgrad, a.maximize, coupled, scaled)};

  // Reserved up front: TensorWork points into these tables, so they must never reallocate.
  std::vector<StepScalars<float>> scalars_f;
  std::vector<StepScalars<double>> scalars_d;
  scalars_f.reserve(n);
  scalars_d.reserve(n);
  int64_t last_f = -1, last_d = -1;
  std::vector<TensorWork> work;
  work.reserve(n);
  std::vector<at::Tensor> keep;  // temporaries that must outlive the kernel
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (param, dense working copy)
  int64_t units = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p0 = a.params[i];
    if (p0.numel() == 0) continue;
    const DensePair dp = dense_pair(p0, a.grads[i]);
    if (dp.copy_back) write_back.emplace_back(p0, dp.p);
    keep.push_back(dp.g);
    const at::Tensor& p = dp.p;
    TensorWork w;
    w.p = p.data_ptr();
    w.g = dp.g.data_ptr();
    w.m = a.exp_avgs[i].data_ptr();
    w.v = a.exp_avg_sqs[i].data_ptr();
    w.v_max = a.amsgrad ? a.max_exp_avg_sqs[i].data_ptr() : nullptr;
    const int64_t step = static_cast<int64_t>(read_step(a.steps[i])) + 1;
    if (p.scalar_type() == at::kDouble) {
      add_scalars(scalars_d, last_d, step, a, lr, grad_scale);
      w.scalars = &scalars_d.back();
      w.fn = fns[1];
    } else {
      add_scalars(scalars_f, last_f, step, a, lr, grad_scale);
      w.scalars = &scalars_f.back();
      w.fn = fns[p.scalar_type() == at::kFloat ? 0 : p.scalar_type() == at::kBFloat16 ? 2 : 3];
    }
    w.n = p.numel();
    w.unit_begin = units;
    units += (w.n + kUnit - 1) / kUnit;
    work.push_back(w);
  }
  run(work, units);
  for (auto& pw : write_back) pw.first.copy_(pw.second);
  for (size_t i = 0; i < n; ++i) bump_step(a.steps[i]);
}

}  // namespace

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                   double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                   double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf};
  validate_batch(a, c10::DeviceType::CPU);
  if (params.empty()) return;
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;  // AMP overflow: skip
  step_impl(a);
}

// The checks of adam_step_ without the step: a multi-group optimizer step checks every batch
// before it writes the first one.
void adam_check_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                    double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                    double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    bool decoupled, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf};
  validate_batch(a, c10::DeviceType::CPU);
}

std::string cpu_isa_get() { return kIsaNames[g_isa.load()]; }

std::vector<std::string> cpu_isa_supported() {
  std::vector<std::string> out;
  for (int i = 0; i <= g_best_isa; ++i) out.emplace_back(kIsaNames[i]);
  return out;
}

void cpu_isa_set(const std::string& name) {
  for (int i = 0; i <= 2; ++i) {
    if (name == kIsaNames[i]) {
      ONEPASS_CHECK(i <= g_best_isa, "onepass: this CPU does not support ", name,
                  " (best: ", kIsaNames[g_best_isa], ")");
      g_isa.store(i);
      return;
    }
  }
  ONEPASS_CHECK(false, "onepass: unknown CPU ISA '", name, "' (choose baseline, avx2 or avx512)");
}

TORCH_LIBRARY_IMPL(onepass, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("adam_check", &adam_check_cpu);
}

}  // namespace onepass
