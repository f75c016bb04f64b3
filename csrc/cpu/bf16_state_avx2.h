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

// Elements [0, n) (n a multiple of 8) of params p (float or Bf16) with bf16 moments m, v; element
// k's index in its random streams is index_lo + k within the 2**32 block whose range keys are
// key_mv, the moments' stream (no wrap past 2**32: the caller splits ranges there); one draw
// rounds both moments (v_bits: v takes its high 16 bits).
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx2"))) void bf16_state_avx2(
    P* __restrict p, const P* __restrict g, Bf16* __restrict m, Bf16* __restrict v,
    int64_t n, uint32_t index_lo, uint32_t key_mv, const StepScalars<F8>& sc) {
  const __m256i kmv = u32x8(key_mv);
  __m256i idx = _mm256_add_epi32(u32x8(index_lo), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t i = 0; i < n; i += 8) {
    F8 pi{load8(p + i)};
    F8 mi{load_bf16x8(m + i)};
    F8 vi{load_bf16x8(v + i)};
    F8 unused{};
    adam_element<F8, false, MAX, COUPLED, SCALED>(pi, F8{load8(g + i)}, mi, vi, unused, sc);
    store8(p + i, pi.v);
    const __m256i draw = mix32x8(_mm256_xor_si256(idx, kmv));
    store_bf16x8(m + i, bf16_stochastic8(mi.v, draw));
    store_bf16x8(v + i, bf16_stochastic8(vi.v, _mm256_srli_epi32(draw, 16)));
    idx = _mm256_add_epi32(idx, u32x8(8));
  }
}

}  // namespace cpu
}  // namespace onepass
