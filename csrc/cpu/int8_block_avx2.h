// One whole int8 block of fp32 params under the float3 maps, by hand in AVX2: the CPU int8 loop's
// (loops_lowp.cpp: int8_blocks_avx2) and bench/stage_cost.cpp's, which times it.
#pragma once

#include "bf16x8_avx2.h"

#include <type_traits>

namespace onepass {
namespace cpu {

// The codes of a block's kInt8Block values x (64-byte aligned) times scale, stored as bytes; x in
// order, or (LANES) in lane order 16 at a time (bf16x8_avx2.h: load_bf16x16).
template <__m256i (*CODE)(__m256), bool LANES>
ONEPASS_AVX2 void encode_block(uint8_t* __restrict q, const float* __restrict x, __m256 scale) {
  for (int i = 0; i < kInt8Block; i += 32) {
    const __m256i a = CODE(_mm256_mul_ps(_mm256_load_ps(x + i), scale));
    const __m256i b = CODE(_mm256_mul_ps(_mm256_load_ps(x + i + 8), scale));
    const __m256i c = CODE(_mm256_mul_ps(_mm256_load_ps(x + i + 16), scale));
    const __m256i d = CODE(_mm256_mul_ps(_mm256_load_ps(x + i + 24), scale));
    if constexpr (LANES)
      store_codes32_lanes(q + i, a, b, c, d);
    else
      store_codes32(q + i, a, b, c, d);
  }
}

// 8 elements' update from their codes, with the block's running absmax of m and v: the decoded
// moments (codes times the old absmax) through adam_element, the new m and v kept in mb, vb for
// the encode.
template <bool MAX, bool COUPLED, bool SCALED>
ONEPASS_AVX2 void int8_update8(F8& p, __m256 g, __m256i cm, __m256i cv, __m256 am, __m256 av,
                               float* mb, float* vb, __m256i& bm, __m256i& bv,
                               const StepScalars<F8>& sc) {
  F8 mi{_mm256_mul_ps(fm_value_m8(cm), am)};
  F8 vi{_mm256_mul_ps(fm_value_v8(cv), av)};
  F8 unused{};
  adam_element<F8, false, MAX, COUPLED, SCALED>(p, F8{g}, mi, vi, unused, sc);
  _mm256_store_ps(mb, mi.v);
  _mm256_store_ps(vb, vi.v);
  const __m256i abs_mask = u32x8(0x7fffffffu);
  bm = _mm256_max_epu32(bm, _mm256_and_si256(_mm256_castps_si256(mi.v), abs_mask));
  bv = _mm256_max_epu32(bv, _mm256_and_si256(_mm256_castps_si256(vi.v), abs_mask));
}

// One whole int8 block (kInt8Block elements) of params p (float, or Bf16 rounded to nearest) under
// the float3 maps, by hand in AVX2 (float_map_avx2.h): the codes widened as they are loaded,
// adam_element on 8 lanes, the new absmax, then the codes of the block's m and v, packed to bytes.
// Same bits as int8_blocks' loops; fp32 params 0.90 against 1.53 ns an element, one thread, L2
// (bench/stage_cost.sh). bf16 params go 16 at a time in lane order (load_bf16x16), their codes
// too, and the encode puts the codes back in order: 1.11 against 1.21-1.31 ns in order (why lane
// order does not pay with fp32 params: bf16_state_avx2.h).
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx2"))) void int8_block_avx2(
    P* __restrict p, const P* __restrict g, uint8_t* __restrict qm,
    uint8_t* __restrict qv, float* __restrict absmax_m, float* __restrict absmax_v,
    const StepScalars<F8>& sc) {
  constexpr bool kLanes = std::is_same_v<P, Bf16>;
  alignas(64) float mb[kInt8Block];
  alignas(64) float vb[kInt8Block];
  const __m256 am = _mm256_set1_ps(*absmax_m);
  const __m256 av = _mm256_set1_ps(*absmax_v);
  __m256i bm = _mm256_setzero_si256();
  __m256i bv = _mm256_setzero_si256();
  if constexpr (kLanes) {
    for (int i = 0; i < kInt8Block; i += 16) {
      __m256 pa, pb, ga, gb;
      __m256i cm0, cm1, cv0, cv1;  // (codes)
      load_bf16x16(p + i, pa, pb);
      load_bf16x16(g + i, ga, gb);
      load_codes16_lanes(qm + i, cm0, cm1);
      load_codes16_lanes(qv + i, cv0, cv1);
      F8 p0{pa}, p1{pb};
      int8_update8<MAX, COUPLED, SCALED>(p0, ga, cm0, cv0, am, av, mb + i, vb + i, bm, bv, sc);
      int8_update8<MAX, COUPLED, SCALED>(p1, gb, cm1, cv1, am, av, mb + i + 8, vb + i + 8, bm, bv,
                                         sc);
      store_bf16x16_nearest(p + i, p0.v, p1.v);
    }
  } else {
    for (int i = 0; i < kInt8Block; i += 8) {
      F8 pi{load8(p + i)};
      int8_update8<MAX, COUPLED, SCALED>(pi, load8(g + i), load_codes8(qm + i), load_codes8(qv + i),
                                         am, av, mb + i, vb + i, bm, bv, sc);
      store8(p + i, pi.v);
    }
  }
  const float nam = bits_float(max_u32x8(bm));
  const float nav = bits_float(max_u32x8(bv));
  const float sm = block_scale(nam);
  const float sv = block_scale(nav);
  const __m256 im = _mm256_set1_ps(sm);
  const __m256 iv = _mm256_set1_ps(sv);
  // (a nonzero scale: no NaN to code, float_map_avx2.h)
  if (sm != 0.0f)
    encode_block<fm_code_m8_no_nan, kLanes>(qm, mb, im);
  else
    encode_block<fm_code_m8, kLanes>(qm, mb, im);
  if (sv != 0.0f)
    encode_block<fm_code_v8_no_nan, kLanes>(qv, vb, iv);
  else
    encode_block<fm_code_v8, kLanes>(qv, vb, iv);
  *absmax_m = nam;
  *absmax_v = nav;
}

}  // namespace cpu
}  // namespace onepass
