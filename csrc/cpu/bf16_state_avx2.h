// bf16 moments (stochastically rounded) of fp32 or bf16 params (rounded to nearest), by hand in
// AVX2, 8 elements at a time: the CPU loop's for those cases (loops_lowp.cpp:
// lowp_range_bf16_avx2) and bench/stage_cost.cpp's.
//
// The random bits (adam_math.h random_bits_lo, mix32) and the rounding (float_to_bf16_stochastic)
// restated on 8 lanes; adam_element on F8 (float_map_avx2.h). The bits equal the scalar rules':
// the hash on all 2**32 inputs and the rounding on all 2**32 float32 patterns
// (tests/backends/bf16_state_avx2_test.cpp), the whole loop in the reference matrix.
#pragma once

#include "bf16x8_avx2.h"

#include <algorithm>
#include <type_traits>

namespace onepass {
namespace cpu {

// mix32 on 8 lanes: the same shifts, xors and multiplications mod 2**32. mix32x8_rest is all but
// its first step (x ^ x >> 16), which the loops below fold into the stream's key (premix_key).
ONEPASS_AVX2 __m256i mix32x8_rest(__m256i x) {
  x = _mm256_mullo_epi32(x, u32x8(kMix1));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, u32x8(kMix2));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
}
ONEPASS_AVX2 __m256i mix32x8_first(__m256i x) {
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
ONEPASS_AVX2 __m256i mix32x8(__m256i x) { return mix32x8_rest(mix32x8_first(x)); }

// mix32's first step on idx ^ key, for every idx of one 65536-aligned run of indices (those
// sharing idx >> 16, `hi`): (idx ^ key) >> 16 is then hi ^ key >> 16, so the step is idx ^ (the
// key this returns), one xor a vector instead of three.
inline uint32_t premix_key(uint32_t key, uint32_t hi) { return key ^ (hi ^ (key >> 16)); }

// float_to_bf16_stochastic on 8 lanes, each bf16 pattern in the high half of its 32-bit lane (the
// low half is what the rounding cuts off): bits16, random bits in the low 16 of each lane, added
// to the pattern. NaN lanes are left to bf16_nan8 (bf16x8_avx2.h), which the loops call only
// when a vector holds a NaN (one test of m and v together: 3 of the 8 elements' ~45 vector
// operations saved).
ONEPASS_AVX2 __m256i bf16_add_bits8(__m256 f, __m256i bits16) {
  return _mm256_add_epi32(_mm256_castps_si256(f), bits16);
}
ONEPASS_AVX2 __m256i bf16_stochastic8(__m256 f, __m256i bits) {
  return bf16_nan8(bf16_add_bits8(f, _mm256_and_si256(bits, u32x8(0xffffu))), f);
}

// 8 elements' update: adam_element, then m and v rounded with one draw each of the moments'
// stream (v_bits: v takes the draw's high 16 bits). pre: the elements' indices after mix32's first
// step (premix_key); mo, vo hold the bf16 patterns in their lanes' high halves.
template <bool MAX, bool COUPLED, bool SCALED>
ONEPASS_AVX2 void bf16_update8(F8& p, __m256 g, __m256 m, __m256 v, __m256i pre, __m256i& mo,
                               __m256i& vo, const StepScalars<F8>& sc) {
  F8 mi{m}, vi{v}, unused{};
  adam_element<F8, false, MAX, COUPLED, SCALED>(p, F8{g}, mi, vi, unused, sc);
  const __m256i draw = mix32x8_rest(pre);
  mo = bf16_add_bits8(mi.v, _mm256_and_si256(draw, u32x8(0xffffu)));
  vo = bf16_add_bits8(vi.v, _mm256_srli_epi32(draw, 16));
  if (ONEPASS_PLANTED_LOOP_BUG != 2 &&
      __builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(mi.v, vi.v, _CMP_UNORD_Q)) != 0, 0)) {
    mo = bf16_nan8(mo, mi.v);
    vo = bf16_nan8(vo, vi.v);
  }
}

// Elements [i, i + 8) of bf16_state_avx2 (pre: their indices after mix32's first step).
template <typename P, bool MAX, bool COUPLED, bool SCALED>
ONEPASS_AVX2 void bf16_state8(P* __restrict p, const P* __restrict g, Bf16* __restrict m,
                              Bf16* __restrict v, int64_t i, __m256i pre,
                              const StepScalars<F8>& sc) {
  F8 pi{load8(p + i)};
  __m256i mo, vo;
  bf16_update8<MAX, COUPLED, SCALED>(pi, load8(g + i), load_bf16x8(m + i), load_bf16x8(v + i), pre,
                                     mo, vo, sc);
  store8(p + i, pi.v);
  store_bf16x8(m + i, mo);
  store_bf16x8(v + i, vo);
}

// How the loops below (and bf16_state_avx512.h's) cut a range into runs of one 65536-aligned
// block of indices: whether [index_lo, index_lo + n) is one run; how many elements from index
// `at` (n_left of them left) stay in its run, in whole vectors of 8 (0: the vector at `at`
// straddles a boundary); the key of the run holding `at` (index_lo, the range's first index, is
// what planted slip 1 keys every run by); and the straddling vector's indices after mix32's first
// step, from the whole hash.
inline bool one_run(uint32_t index_lo, int64_t n) { return (index_lo & 0xffffu) + n <= 65536; }
inline int64_t run_length(uint32_t at, int64_t n_left) {
  return std::min<int64_t>(n_left, 65536 - (at & 0xffffu)) & ~int64_t(7);
}
inline uint32_t run_key(uint32_t key_mv, uint32_t index_lo, uint32_t at) {
  return premix_key(key_mv, (ONEPASS_PLANTED_LOOP_BUG == 1 ? index_lo : at) >> 16);
}
ONEPASS_AVX2 __m256i straddle_pre8(uint32_t at, uint32_t key_mv) {
  const __m256i idx = _mm256_add_epi32(u32x8(at), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return mix32x8_first(_mm256_xor_si256(idx, u32x8(key_mv)));
}

// Elements [i, end) of bf16_state_avx2's range, all in one 65536-aligned run of indices, keyed by
// `key` (premix_key of that run's block).
template <typename P, bool MAX, bool COUPLED, bool SCALED>
ONEPASS_AVX2 void bf16_state_run(P* __restrict p, const P* __restrict g, Bf16* __restrict m,
                                 Bf16* __restrict v, int64_t i, int64_t end, uint32_t index_lo,
                                 __m256i key, const StepScalars<F8>& sc) {
  if constexpr (std::is_same_v<P, Bf16>) {
    __m256i ia = _mm256_add_epi32(u32x8(index_lo + static_cast<uint32_t>(i)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11));
    for (; i + 16 <= end; i += 16) {
      __m256 pa, pb, ga, gb, ma, mb, va, vb;
      load_bf16x16(p + i, pa, pb);
      load_bf16x16(g + i, ga, gb);
      load_bf16x16(m + i, ma, mb);
      load_bf16x16(v + i, va, vb);
      F8 p0{pa}, p1{pb};
      __m256i m0, m1, v0, v1;
      bf16_update8<MAX, COUPLED, SCALED>(p0, ga, ma, va, _mm256_xor_si256(ia, key), m0, v0, sc);
      bf16_update8<MAX, COUPLED, SCALED>(
          p1, gb, mb, vb, _mm256_xor_si256(_mm256_add_epi32(ia, u32x8(4)), key), m1, v1, sc);
      store_bf16x16_nearest(p + i, p0.v, p1.v);
      store_bf16x16(m + i, m0, m1);
      store_bf16x16(v + i, v0, v1);
      ia = _mm256_add_epi32(ia, u32x8(16));
    }
  }
  __m256i idx = _mm256_add_epi32(u32x8(index_lo + static_cast<uint32_t>(i)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (; i < end; i += 8) {
    bf16_state8<P, MAX, COUPLED, SCALED>(p, g, m, v, i, _mm256_xor_si256(idx, key), sc);
    idx = _mm256_add_epi32(idx, u32x8(8));
  }
}

// Elements [0, n) (n a multiple of 8) of params p (float or Bf16) with bf16 moments m, v; element
// k's index in its random streams is index_lo + k within the 2**32 block whose range keys are
// key_mv, the moments' stream (no wrap past 2**32: the caller splits ranges there); one draw
// rounds both moments (v_bits: v takes its high 16 bits).
//
// The elements go in runs of one 65536-aligned block of indices each (premix_key's); a vector
// that would straddle two (index_lo not a multiple of 8) takes the whole hash.
//
// bf16 params go 16 elements at a time in lane order (bf16x8_avx2.h: load_bf16x16), their random
// bits drawn for the same order: 0.86 against 1.06-1.14 ns an element, one thread, L2
// (bench/stage_cost.sh), the lane-crossing widenings and permutations of 3 bf16 loads and 3
// stores gone. fp32 params stay 8 at a time in order: lane order would need 128-bit loads and
// stores of p and g, and measured 0.73 against 0.71.
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx2"))) void bf16_state_avx2(
    P* __restrict p, const P* __restrict g, Bf16* __restrict m, Bf16* __restrict v,
    int64_t n, uint32_t index_lo, uint32_t key_mv, const StepScalars<F8>& sc) {
  if (one_run(index_lo, n)) {  // (most ranges: keyed once)
    bf16_state_run<P, MAX, COUPLED, SCALED>(p, g, m, v, 0, n, index_lo,
                                            u32x8(run_key(key_mv, index_lo, index_lo)), sc);
    return;
  }
  for (int64_t i = 0; i < n;) {
    const uint32_t at = index_lo + static_cast<uint32_t>(i);
    const int64_t len = run_length(at, n - i);
    if (len == 0) {
      bf16_state8<P, MAX, COUPLED, SCALED>(p, g, m, v, i, straddle_pre8(at, key_mv), sc);
      i += 8;
      continue;
    }
    bf16_state_run<P, MAX, COUPLED, SCALED>(p, g, m, v, i, i + len, index_lo,
                                            u32x8(run_key(key_mv, index_lo, at)), sc);
    i += len;
  }
}

}  // namespace cpu
}  // namespace onepass
