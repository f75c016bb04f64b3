// The CPU loop of params with fp32 state (float64 for float64 params) and nearest rounding: one
// plain loop over adam_element (csrc/adam_math.h) that gcc vectorizes, compiled three times under
// different target attributes (AVX-512, AVX2, baseline x86-64); the widest one the CPU supports
// is chosen at run time (isa.h). IEEE results do not depend on the vector width (no reductions,
// no FMA contraction), so all three give the same bits; the tests run each one this CPU has.
#include "isa.h"
#include "stats.h"
#include "work.h"

namespace onepass {
namespace cpu {
namespace {

// Elements [begin, end); ST: whole statistics chunks (stats_chunks).
template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, bool ST>
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
  auto elem = [&](int64_t i, int64_t lane, T* aw, T* ad) __attribute__((always_inline)) {
    const T old = Storage<P>::load(p + i);
    T pi = old;
    T mi = m[i];
    T vi = v[i];
    T vmi = AMS ? vm[i] : T(0);
    adam_element<T, AMS, MAX, COUPLED, SCALED>(pi, Storage<P>::load(g + i), mi, vi, vmi, sc);
    P stored;
    Storage<P>::store(&stored, pi);
    p[i] = stored;
    m[i] = mi;
    v[i] = vi;
    if (AMS) vm[i] = vmi;
    if constexpr (ST) add_squares(Storage<P>::load(&stored), old, aw[lane], ad[lane]);
  };
  if constexpr (ST) {
    stats_chunks<T>(w, begin, end, elem);
  } else {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) elem(i, 0, nullptr, nullptr);
  }
}

// Each loop twice, without and with the statistics (a runtime branch inside the loop would cost
// every step that does not take them).
#define ONEPASS_DEFINE_ISA(NAME, TARGET)                                                          \
  template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>                            \
  __attribute__((target(TARGET))) void NAME(const TensorWork& w, int64_t b, int64_t e,          \
                                            bool stats) {                                       \
    using T = typename Storage<P>::math_t;                                                        \
    const auto& s = *static_cast<const StepScalars<T>*>(w.scalars);                               \
    if (stats)                                                                                    \
      update_range<P, AMS, MAX, COUPLED, SCALED, true>(w, s, b, e);                               \
    else                                                                                          \
      update_range<P, AMS, MAX, COUPLED, SCALED, false>(w, s, b, e);                              \
  }
ONEPASS_DEFINE_ISA(range_avx512, "avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
ONEPASS_DEFINE_ISA(range_avx2, "avx2,bmi2")
ONEPASS_DEFINE_ISA(range_base, "default")
#undef ONEPASS_DEFINE_ISA

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
  return pick_flags<P>(current_isa(), flags, 4);
}

}  // namespace

RangeFn pick_full(at::ScalarType dt, const bool* f) {
  switch (dt) {
    case at::kFloat: return pick<float>(f[0], f[1], f[2], f[3]);
    case at::kDouble: return pick<double>(f[0], f[1], f[2], f[3]);
    case at::kBFloat16: return pick<Bf16>(f[0], f[1], f[2], f[3]);
    default: return pick<Fp16>(f[0], f[1], f[2], f[3]);
  }
}

}  // namespace cpu
}  // namespace onepass
