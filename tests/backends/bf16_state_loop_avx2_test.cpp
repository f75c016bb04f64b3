// csrc/cpu/bf16_state_avx2.h's whole loop (bf16_state_avx2) against adam_math.h's scalar rules,
// element by element: runs of one 65536-aligned block of indices each, keyed once a run
// (premix_key), and the vectors across a block boundary that take the whole hash; NaN moments
// (fixed only when a vector holds one). fp32 and bf16 params, starting indices aligned and not,
// near 2**32's end; finite, infinite and NaN values. Plain C++, no torch; prints "skip" where the
// CPU has no AVX2. ONEPASS_PLANTED_LOOP_BUG shows a slip is caught: 1, every run keyed by the
// first index's block; 2, NaN moments left unfixed; 3, NaN bf16 params left unfixed.
// Built with ONEPASS_LOOP_AVX512, it checks csrc/cpu/bf16_state_avx512.h's loop the same way (and
// says "skip" where the CPU has no AVX-512).
#ifdef ONEPASS_LOOP_AVX512
#include "cpu/bf16_state_avx512.h"
#define LOOP_NAME "bf16_state_loop_avx512_test"
#else
#include "cpu/bf16_state_avx2.h"
#define LOOP_NAME "bf16_state_loop_avx2_test"
#endif

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

using namespace onepass;
using namespace onepass::cpu;

namespace {

uint32_t next(uint32_t& x) { return x = mix32(x + 0x9E3779B9u); }

// A value of the test's mix: mostly ordinary, a few zeros, infinities and NaNs.
float value(uint32_t& x, float scale) {
  const uint32_t r = next(x);
  // (NaNs of either sign and with payloads: 0x7fc00000 plus random low bits would round to the
  // right pattern even unfixed)
  switch (r % 97) {
    case 0: return 0.0f;
    case 1: return bits_float(0x7fc00000u);
    case 2: return bits_float(0xffc00000u);
    case 3: return bits_float(0x7fffffffu);
    case 4: return bits_float(0x7f800001u);
    case 5: return bits_float(0x7f800000u);
    case 6: return bits_float(0xff800000u);
    default: return static_cast<float>(static_cast<int32_t>(next(x))) * scale;
  }
}

// The scalar rules on element k (index index_lo + k) of the loop's inputs.
template <typename P>
void scalar(P& p, P g, Bf16& m, Bf16& v, uint32_t index, uint32_t key,
            const StepScalars<float>& s) {
  float pi = Storage<P>::load(&p), mi = bf16_to_float(m.x), vi = bf16_to_float(v.x), unused = 0.0f;
  adam_element<float, false, false, false, false>(pi, Storage<P>::load(&g), mi, vi, unused, s);
  Storage<P>::store(&p, pi);
  const uint32_t draw = random_bits_lo(key, index);
  m.x = float_to_bf16_stochastic(mi, draw);
  v.x = float_to_bf16_stochastic(vi, v_bits(draw));
}

// An fp32 param's NaN is compared as a value (ARCHITECTURE.md: payload and sign unspecified; the
// compiler may order a commutative operation's NaN operands either way); a bf16 param's by its
// bits, which the rounding fixes (0x7fc0: a NaN's pattern plus the rounding's addend could carry
// into the sign bit and make it -0).
bool same_param(float a, float b) { return (a != a && b != b) || float_bits(a) == float_bits(b); }
bool same_param(Bf16 a, Bf16 b) { return a.x == b.x; }

#ifdef ONEPASS_LOOP_AVX512
template <typename P>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), noinline)) void run_loop(
    P* p, const P* g, Bf16* m, Bf16* v, int64_t n, uint32_t index_lo, uint32_t key,
    const StepScalars<float>& s) {
  bf16_state_avx512<P, false, false, false>(p, g, m, v, n, index_lo, key, step_scalars_f16(s), s);
}
bool cpu_has_loop_isa() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#else
template <typename P>
__attribute__((target("avx2"), noinline)) void run_loop(P* p, const P* g, Bf16* m, Bf16* v,
                                                        int64_t n, uint32_t index_lo, uint32_t key,
                                                        const StepScalars<float>& s) {
  bf16_state_avx2<P, false, false, false>(p, g, m, v, n, index_lo, key, step_scalars_f8(s));
}
bool cpu_has_loop_isa() { return __builtin_cpu_supports("avx2"); }
#endif

template <typename P>
uint64_t check(uint32_t index_lo, int64_t n, uint32_t seed) {
  std::vector<P> p(n), g(n), p2;
  std::vector<Bf16> m(n), v(n), m2, v2;
  uint32_t x = seed;
  for (int64_t k = 0; k < n; ++k) {
    Storage<P>::store(&p[k], value(x, 1e-9f));
    Storage<P>::store(&g[k], value(x, 1e-11f));
    m[k].x = float_to_bf16(value(x, 1e-12f));
    const float vv = value(x, 1e-22f);
    v[k].x = float_to_bf16(vv < 0.0f ? -vv : vv);
  }
  p2 = p, m2 = m, v2 = v;
  const StepScalars<float> s = make_step_scalars<float>(7, 1e-3, 0.9, 0.999, 1e-8, 0.01, true, 1.0);
  const uint32_t key = stream_key(seed, 7, kStreamMoments);
  run_loop(p.data(), g.data(), m.data(), v.data(), n, index_lo, key, s);
  uint64_t bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    scalar(p2[k], g[k], m2[k], v2[k], index_lo + static_cast<uint32_t>(k), key, s);
    if (!same_param(p[k], p2[k]) || m[k].x != m2[k].x || v[k].x != v2[k].x) {
      uint32_t pb = 0, pb2 = 0;  // (the param's pattern, for the message)
      std::memcpy(&pb, &p[k], sizeof(P));
      std::memcpy(&pb2, &p2[k], sizeof(P));
      if (bad < 3)
        std::printf("index %08x: p %08x m %04x v %04x, want %08x %04x %04x\n",
                    index_lo + static_cast<uint32_t>(k), pb, m[k].x, v[k].x, pb2, m2[k].x,
                    v2[k].x);
      ++bad;
    }
  }
  return bad;
}

}  // namespace

int main() {
  if (!cpu_has_loop_isa()) {
    std::printf(LOOP_NAME ": skip, the CPU lacks the loop's ISA\n");
    return 0;
  }
  // (start, elements): aligned and not, crossing one or several 65536 boundaries, ending at 2**32
  const struct { uint32_t at; int64_t n; } cases[] = {
      {0, 65536 + 64}, {65536 - 8, 24}, {65536 - 5, 32}, {3 * 65536 - 12, 2 * 65536 + 40},
      {0xfffdfff3u, 131080}, {12345, 8}, {0xfffffff8u, 8}, {100, 24}, {7, 40}};
  uint64_t bad = 0;
  uint32_t seed = 1;
  for (const auto& c : cases) {
    const int64_t n = c.n & ~int64_t(7);  // (the loop takes a multiple of 8)
    bad += check<float>(c.at, n, seed++);
    bad += check<Bf16>(c.at, n, seed++);
  }
  if (bad) {
    std::printf(LOOP_NAME ": %llu elements differ\n",
                static_cast<unsigned long long>(bad));
    return 1;
  }
  std::printf(LOOP_NAME ": ok\n");
  return 0;
}
