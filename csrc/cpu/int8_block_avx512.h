// int8_block_avx2.h on 16 lanes: one whole int8 block of fp32 or bf16 params under the float3
// maps, with AVX-512 (float_map_avx512.h). The avx512 variant of the CPU int8 loop
// (loops_lowp.cpp: int8_blocks_avx512) and bench/stage_cost.cpp's, which times it.
#pragma once

#include "float_map_avx512.h"

namespace onepass {
namespace cpu {

// The codes of a block's kInt8Block values x (64-byte aligned) times scale, 64 at a time.
template <__m512i (*CODE)(__m512), void (*STORE)(uint8_t*, __m512i, __m512i, __m512i, __m512i)>
ONEPASS_AVX512 void encode_block16(uint8_t* __restrict q, const float* __restrict x, __m512 scale) {
  for (int i = 0; i < kInt8Block; i += 64) {
    const __m512i a = CODE(_mm512_mul_ps(_mm512_load_ps(x + i), scale));
    const __m512i b = CODE(_mm512_mul_ps(_mm512_load_ps(x + i + 16), scale));
    const __m512i c = CODE(_mm512_mul_ps(_mm512_load_ps(x + i + 32), scale));
    const __m512i d = CODE(_mm512_mul_ps(_mm512_load_ps(x + i + 48), scale));
    STORE(q + i, a, b, c, d);
  }
}

// One whole int8 block, as int8_block_avx2: 16 elements at a time, the codes widened as they are
// loaded, adam_element on 16 lanes, the new m and v kept for the encode and their absmax (as
// unsigned patterns of |x|: a NaN's above every number's) taken on the way; then the codes.
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq"))) void
int8_block_avx512(P* __restrict p, const P* __restrict g, uint8_t* __restrict qm,
                  uint8_t* __restrict qv, float* __restrict absmax_m, float* __restrict absmax_v,
                  const StepScalars<F16>& sc) {
  alignas(64) float mb[kInt8Block];
  alignas(64) float vb[kInt8Block];
  const __m512 am = _mm512_set1_ps(*absmax_m);
  const __m512 av = _mm512_set1_ps(*absmax_v);
  const __m512i abs_mask = u32x16(0x7fffffffu);
  __m512i bm = _mm512_setzero_si512();
  __m512i bv = _mm512_setzero_si512();
  for (int i = 0; i < kInt8Block; i += 16) {
    F16 pi{load16(p + i)};
    F16 mi{_mm512_mul_ps(fm_value_m16(load_codes16(qm + i)), am)};
    F16 vi{_mm512_mul_ps(fm_value_v16(load_codes16(qv + i)), av)};
    F16 unused{};
    adam_element<F16, false, MAX, COUPLED, SCALED>(pi, F16{load16(g + i)}, mi, vi, unused, sc);
    _mm512_store_ps(mb + i, mi.v);
    _mm512_store_ps(vb + i, vi.v);
    bm = max_u32(bm, _mm512_and_si512(_mm512_castps_si512(mi.v), abs_mask));
    bv = max_u32(bv, _mm512_and_si512(_mm512_castps_si512(vi.v), abs_mask));
    store16(p + i, pi.v);
  }
  const float nam = bits_float(max_u32x16(bm));
  const float nav = bits_float(max_u32x16(bv));
  const float sm = block_scale(nam);
  const float sv = block_scale(nav);
  const __m512 im = _mm512_set1_ps(sm);
  const __m512 iv = _mm512_set1_ps(sv);
  // (a nonzero scale: no NaN to code, float_map_avx2.h)
  if (sm != 0.0f)
    encode_block16<fm_code_m16_no_nan, store_codes64_m>(qm, mb, im);
  else
    encode_block16<fm_code_m16, store_codes64_m>(qm, mb, im);
  if (sv != 0.0f)
    encode_block16<fm_code_v16_no_nan, store_codes64_v>(qv, vb, iv);
  else
    encode_block16<fm_code_v16, store_codes64_v>(qv, vb, iv);
  *absmax_m = nam;
  *absmax_v = nav;
}

}  // namespace cpu
}  // namespace onepass
