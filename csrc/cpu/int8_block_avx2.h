// One whole int8 block of fp32 params under the float3 maps, by hand in AVX2: the CPU int8 loop's
// (loops_lowp.cpp: int8_blocks_avx2) and bench/stage_cost.cpp's, which times it.
#pragma once

#include "bf16x8_avx2.h"

namespace onepass {
namespace cpu {

// The codes of a block's kInt8Block values x (64-byte aligned) times scale, stored as bytes.
template <__m256i (*CODE)(__m256)>
ONEPASS_AVX2 void encode_block(uint8_t* __restrict q, const float* __restrict x, __m256 scale) {
  for (int i = 0; i < kInt8Block; i += 32)
    store_codes32(q + i, CODE(_mm256_mul_ps(_mm256_load_ps(x + i), scale)),
                  CODE(_mm256_mul_ps(_mm256_load_ps(x + i + 8), scale)),
                  CODE(_mm256_mul_ps(_mm256_load_ps(x + i + 16), scale)),
                  CODE(_mm256_mul_ps(_mm256_load_ps(x + i + 24), scale)));
}

// One whole int8 block (kInt8Block elements) of params p (float, or Bf16 rounded to nearest) under
// the float3 maps, by hand in AVX2 (float_map_avx2.h): the codes widened as they are loaded,
// adam_element on 8 lanes, the new absmax, then the codes of the block's m and v, packed to bytes.
// Same bits as int8_blocks' loops; fp32 params 0.90 against 1.53 ns an element, one thread, L2
// (bench/stage_cost.sh).
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx2"))) void int8_block_avx2(
    P* __restrict p, const P* __restrict g, uint8_t* __restrict qm,
    uint8_t* __restrict qv, float* __restrict absmax_m, float* __restrict absmax_v,
    const StepScalars<F8>& sc) {
  alignas(64) float mb[kInt8Block];
  alignas(64) float vb[kInt8Block];
  const __m256 am = _mm256_set1_ps(*absmax_m);
  const __m256 av = _mm256_set1_ps(*absmax_v);
  const __m256i abs_mask = u32x8(0x7fffffffu);
  __m256i bm = _mm256_setzero_si256();
  __m256i bv = _mm256_setzero_si256();
  for (int i = 0; i < kInt8Block; i += 8) {
    F8 pi{load8(p + i)};
    F8 mi{_mm256_mul_ps(fm_value_m8(load_codes8(qm + i)), am)};
    F8 vi{_mm256_mul_ps(fm_value_v8(load_codes8(qv + i)), av)};
    F8 unused{};
    adam_element<F8, false, MAX, COUPLED, SCALED>(pi, F8{load8(g + i)}, mi, vi, unused, sc);
    store8(p + i, pi.v);
    _mm256_store_ps(mb + i, mi.v);
    _mm256_store_ps(vb + i, vi.v);
    bm = _mm256_max_epu32(bm, _mm256_and_si256(_mm256_castps_si256(mi.v), abs_mask));
    bv = _mm256_max_epu32(bv, _mm256_and_si256(_mm256_castps_si256(vi.v), abs_mask));
  }
  const float nam = bits_float(max_u32x8(bm));
  const float nav = bits_float(max_u32x8(bv));
  const float sm = block_scale(nam);
  const float sv = block_scale(nav);
  const __m256 im = _mm256_set1_ps(sm);
  const __m256 iv = _mm256_set1_ps(sv);
  // (a nonzero scale: no NaN to code, float_map_avx2.h)
  if (sm != 0.0f)
    encode_block<fm_code_m8_no_nan>(qm, mb, im);
  else
    encode_block<fm_code_m8>(qm, mb, im);
  if (sv != 0.0f)
    encode_block<fm_code_v8_no_nan>(qv, vb, iv);
  else
    encode_block<fm_code_v8>(qv, vb, iv);
  *absmax_m = nam;
  *absmax_v = nav;
}

}  // namespace cpu
}  // namespace onepass
