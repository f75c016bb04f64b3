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

#include <type_traits>

namespace onepass {
namespace cpu {

// mix32 on 8 lanes: the same shifts, xors and multiplications mod 2**32.
ONEPASS_AVX2 __m256i mix32x8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, u32x8(kMix1));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, u32x8(kMix2));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
}

// float_to_bf16_stochastic on 8 lanes, each bf16 pattern in the high half of its 32-bit lane (the
// low half is what the rounding cuts off): the low 16 random bits added to the pattern; a NaN
// (unordered with itself) takes 0x7fc0.
ONEPASS_AVX2 __m256i bf16_stochastic8(__m256 f, __m256i bits) {
  const __m256i sum = _mm256_add_epi32(_mm256_castps_si256(f), _mm256_and_si256(bits, u32x8(0xffffu)));
  return _mm256_blendv_epi8(sum, u32x8(0x7fc00000u),
                            _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}

// 8 elements' update: adam_element, then m and v rounded with one draw each of the moments'
// stream at their indices idx (v_bits: v takes the draw's high 16 bits); mo, vo hold the bf16
// patterns in their lanes' high halves.
template <bool MAX, bool COUPLED, bool SCALED>
ONEPASS_AVX2 void bf16_update8(F8& p, __m256 g, __m256 m, __m256 v, __m256i idx, __m256i kmv,
                               __m256i& mo, __m256i& vo, const StepScalars<F8>& sc) {
  F8 mi{m}, vi{v}, unused{};
  adam_element<F8, false, MAX, COUPLED, SCALED>(p, F8{g}, mi, vi, unused, sc);
  const __m256i draw = mix32x8(_mm256_xor_si256(idx, kmv));
  mo = bf16_stochastic8(mi.v, draw);
  vo = bf16_stochastic8(vi.v, _mm256_srli_epi32(draw, 16));
}

// Elements [0, n) (n a multiple of 8) of params p (float or Bf16) with bf16 moments m, v; element
// k's index in its random streams is index_lo + k within the 2**32 block whose range keys are
// key_mv, the moments' stream (no wrap past 2**32: the caller splits ranges there); one draw
// rounds both moments (v_bits: v takes its high 16 bits).
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
  const __m256i kmv = u32x8(key_mv);
  int64_t i = 0;
  if constexpr (std::is_same_v<P, Bf16>) {
    __m256i ia = _mm256_add_epi32(u32x8(index_lo), _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11));
    for (; i + 16 <= n; i += 16) {
      __m256 pa, pb, ga, gb, ma, mb, va, vb;
      load_bf16x16(p + i, pa, pb);
      load_bf16x16(g + i, ga, gb);
      load_bf16x16(m + i, ma, mb);
      load_bf16x16(v + i, va, vb);
      F8 p0{pa}, p1{pb};
      __m256i m0, m1, v0, v1;
      bf16_update8<MAX, COUPLED, SCALED>(p0, ga, ma, va, ia, kmv, m0, v0, sc);
      bf16_update8<MAX, COUPLED, SCALED>(p1, gb, mb, vb, _mm256_add_epi32(ia, u32x8(4)), kmv, m1,
                                         v1, sc);
      store_bf16x16(p + i, bf16_nearest8(p0.v), bf16_nearest8(p1.v));
      store_bf16x16(m + i, m0, m1);
      store_bf16x16(v + i, v0, v1);
      ia = _mm256_add_epi32(ia, u32x8(16));
    }
  }
  __m256i idx = _mm256_add_epi32(u32x8(index_lo + static_cast<uint32_t>(i)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (; i < n; i += 8) {
    F8 pi{load8(p + i)};
    __m256i mo, vo;
    bf16_update8<MAX, COUPLED, SCALED>(pi, load8(g + i), load_bf16x8(m + i), load_bf16x8(v + i),
                                       idx, kmv, mo, vo, sc);
    store8(p + i, pi.v);
    store_bf16x8(m + i, mo);
    store_bf16x8(v + i, vo);
    idx = _mm256_add_epi32(idx, u32x8(8));
  }
}

}  // namespace cpu
}  // namespace onepass
