// The int8 store's float3 codes with AVX2 integer instructions, 8 lanes at a time, and the 8-lane
// float type that adam_element runs on in the hand-vectorized int8 block (loops_lowp.cpp).
//
// Why by hand: gcc's vectorization of the scalar rules (adam_math.h float_map_*) widened and
// narrowed the bytes in ~6 shuffles per 8 codes, masked every code before its saturating pack, and
// spilled constants in the 4-vector unrolled encode; the int8 block cost 1.53 ns an element (one
// thread, L2, bench/stage_cost.sh), against 0.90 with these.
//
// These are the same rules as adam_math.h's float_map_value_m/_v, float_map_code_m and
// float_map_code_v_kept (the statement of them), rearranged for fewer instructions; their codes,
// once narrowed by store_codes32, equal the scalar ones on all 2**32 float32 inputs (the *_no_nan
// forms on all but NaN), and the values on all 256 codes (tests/backends/float_map_avx2_test.cpp).
#pragma once

#include "../adam_math.h"

#include <immintrin.h>

#include <cstdint>

namespace onepass {
namespace cpu {

// ---- 8 float lanes for adam_element<F8> ---------------------------------------------------------
// adam_element is a template over its math type; on F8 each of its operations is one IEEE vector
// instruction (add, sub, mul, div, sqrt: correctly rounded, and -ffp-contract=off keeps a*b+c
// apart), so a lane gets the bits of the scalar float update. The operators are GNU vector
// arithmetic, not intrinsics: they are inlined through adam_math.h's op_* templates, which carry
// no target attribute (an intrinsic there would not inline); they become AVX instructions in the
// AVX2 function they end up in. op_sqrt and op_max are found by argument-dependent lookup.
typedef float F8Lanes __attribute__((vector_size(32)));
struct F8 {
  F8Lanes v;
};
ONEPASS_HD F8 operator+(F8 a, F8 b) { return {a.v + b.v}; }
ONEPASS_HD F8 operator-(F8 a, F8 b) { return {a.v - b.v}; }
ONEPASS_HD F8 operator*(F8 a, F8 b) { return {a.v * b.v}; }
ONEPASS_HD F8 operator/(F8 a, F8 b) { return {a.v / b.v}; }
ONEPASS_HD F8 operator-(F8 a) { return {-a.v}; }  // the sign bit flipped, as -x on a float
// (-Wpsabi: gcc notes that a 32-byte vector returned by a function built without AVX would be
// passed differently; these are always inlined into AVX2 code, never called)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
ONEPASS_HD F8 op_sqrt(F8 a) { return {__builtin_ia32_sqrtps256(a.v)}; }
#pragma GCC diagnostic pop
// (adam_element names op_max for amsgrad only, which int8 state excludes; stated for completeness)
ONEPASS_HD F8 op_max(F8 a, F8 b) { return {(a.v > b.v) | (a.v != a.v) ? a.v : b.v}; }

#define ONEPASS_AVX2 inline __attribute__((always_inline, target("avx2")))

ONEPASS_AVX2 F8 f8(float x) { return {_mm256_set1_ps(x)}; }

ONEPASS_AVX2 StepScalars<F8> step_scalars_f8(const StepScalars<float>& s) {
  StepScalars<F8> o;
  o.beta1 = f8(s.beta1);
  o.one_minus_beta1 = f8(s.one_minus_beta1);
  o.beta2 = f8(s.beta2);
  o.one_minus_beta2 = f8(s.one_minus_beta2);
  o.eps = f8(s.eps);
  o.weight_decay = f8(s.weight_decay);
  o.decay = f8(s.decay);
  o.step_size = f8(s.step_size);
  o.inv_bc2_sqrt = f8(s.inv_bc2_sqrt);
  o.grad_scale = f8(s.grad_scale);
  return o;
}

// ---- the float3 codes --------------------------------------------------------------------------
ONEPASS_AVX2 __m256i u32x8(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }

// 8 codes from 8 bytes, widened to 32-bit lanes.
ONEPASS_AVX2 __m256i load_codes8(const uint8_t* q) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
}

// float_map_value_v: kFmOne - ((255 - q) << 20) is (kFmOne - (255 << 20)) + (q << 20), and code 0
// is 0: vpsignd by q zeroes that lane (q >= 0 otherwise leaves the pattern). 3 instructions.
ONEPASS_AVX2 __m256 fm_value_v8(__m256i q) {
  const __m256i b = _mm256_add_epi32(_mm256_slli_epi32(q, kFmShift),
                                     u32x8(kFmOne - (255u << kFmShift)));
  return _mm256_castsi256_ps(_mm256_sign_epi32(b, q));
}

// float_map_value_m: q > 128 is (kFmOne - (255 << 20)) + (q << 20); q < 128 is the negative
// pattern 0x80000000 + kFmOne - (q << 20), written as the two's complement negation of
// (0x80000000 - kFmOne) + (q << 20), which vpsignd by q - 128 undoes; and q = 128 is 0, which
// vpsignd gives too. 6 instructions.
ONEPASS_AVX2 __m256 fm_value_m8(__m256i q) {
  const __m256i base = _mm256_blendv_epi8(u32x8(0x80000000u - kFmOne),
                                          u32x8(kFmOne - (255u << kFmShift)),
                                          _mm256_cmpgt_epi32(q, u32x8(128)));
  const __m256i x = _mm256_add_epi32(base, _mm256_slli_epi32(q, kFmShift));
  return _mm256_castsi256_ps(_mm256_sign_epi32(x, _mm256_sub_epi32(q, u32x8(128))));
}

// The codes below are left unclamped at the top: a y above 1 (or infinite) gives a code above
// 255 (m: x below -1, a code below 0), which store_codes32's saturating packs clamp to 255 (0),
// as fm_clamp does. Only codes that went through store_codes32 equal the scalar rule.

// Each code comes in two forms: *_no_nan, exact for every input but NaN, and the full one, which
// also gives a NaN its code 0. A block whose scale is nonzero has no NaN to code: its absmax is
// then finite, so its m and v are (a NaN's or an infinity's bits would have been the maximum),
// and |x * scale| stays near 1; int8_block_avx2 takes the shorter form there.

// float_map_code_v_kept: the rank of y's pattern rounded at bit 20 (ties down), with the
// constant that makes the smallest code 1 folded in before the arithmetic shift (a pattern below
// it gives a rank <= 0, raised to 1 by the max: keep_positive's rule), for y > 0; 0 for +-0 and
// negatives. 5 instructions (7 with NaN).
ONEPASS_AVX2 __m256i fm_code_v8_no_nan(__m256 y) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i c = _mm256_max_epi32(
      _mm256_srai_epi32(
          _mm256_add_epi32(u, u32x8(0x7ffffu - (static_cast<uint32_t>(kFmLowV - 1) << kFmShift))),
          kFmShift),
      u32x8(1));
  return _mm256_and_si256(_mm256_cmpgt_epi32(u, _mm256_setzero_si256()), c);
}
ONEPASS_AVX2 __m256i fm_code_v8(__m256 y) {
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_castps_si256(y), u32x8(0x7f800000u));
  return _mm256_andnot_si256(nan, fm_code_v8_no_nan(y));
}

// float_map_code_m: with a = |x|'s pattern and n = 1 for x < 0 (else 0), the scalar rule's rank is
// k = ((a + n + 0x7ffff) >> 20) - (kFmLowP - n) + 1, at least 1, i.e. (a + K + n * (2**20 + 1))
// >> 20 with K = 0x7ffff + ((1 - kFmLowP) << 20) (n ties up in magnitude and lowers the smallest
// code by one for x < 0); x is coded only above its threshold, a > kFmHalfP for x >= 0 and
// a + 1 > kFmHalfN = kFmHalfP - 2**20 for x < 0; q = 128 + k with x's sign (vpsignd), 128 below
// the threshold. Both x-dependent constants are picked by x's sign bit (vblendvps reads it where
// it is), not derived from it. 10 instructions (12 with NaN).
ONEPASS_AVX2 __m256i fm_code_m8_no_nan(__m256 x) {
  constexpr uint32_t kK = 0x7ffffu + (static_cast<uint32_t>(1 - kFmLowP) << kFmShift);
  const __m256i u = _mm256_castps_si256(x);
  const __m256i a = _mm256_and_si256(u, u32x8(0x7fffffffu));
  const __m256i add = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(u32x8(kK)),
                       _mm256_castsi256_ps(u32x8(kK + (1u << kFmShift) + 1u)), x));
  const __m256i thr = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(u32x8(static_cast<uint32_t>(kFmHalfP))),
                       _mm256_castsi256_ps(u32x8(static_cast<uint32_t>(kFmHalfN) - 1u)), x));
  const __m256i r = _mm256_srai_epi32(_mm256_add_epi32(a, add), kFmShift);
  const __m256i k = _mm256_and_si256(_mm256_max_epi32(r, u32x8(1)), _mm256_cmpgt_epi32(a, thr));
  return _mm256_add_epi32(_mm256_sign_epi32(k, u), u32x8(128));
}
ONEPASS_AVX2 __m256i fm_code_m8(__m256 x) {
  const __m256i a = _mm256_and_si256(_mm256_castps_si256(x), u32x8(0x7fffffffu));
  return _mm256_andnot_si256(_mm256_cmpgt_epi32(a, u32x8(0x7f800000u)), fm_code_m8_no_nan(x));
}

// 32 codes (four vectors of 32-bit lanes, in order) stored as 32 bytes in order, each clamped to
// [0, 255] by the packs' unsigned saturation.
ONEPASS_AVX2 void store_codes32(uint8_t* out, __m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i x = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  // the packs work within 128-bit halves: dwords 0..7 hold a0-3 b0-3 c0-3 d0-3 a4-7 ... d4-7
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// 16 codes widened in lane order (bf16x8_avx2.h: load_bf16x16): a = elements {0-3, 8-11},
// b = {4-7, 12-15}; the 16 bytes in both 128-bit halves, each half picking its four a byte.
ONEPASS_AVX2 void load_codes16_lanes(const uint8_t* q, __m256i& a, __m256i& b) {
  const __m256i u =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  a = _mm256_shuffle_epi8(u, _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1,
                                              -1, -1, 8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1,
                                              11, -1, -1, -1));
  b = _mm256_shuffle_epi8(u, _mm256_setr_epi8(4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1,
                                              -1, -1, 12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1,
                                              -1, 15, -1, -1, -1));
}

// store_codes32 for codes in lane order (a, b: elements 0-15 as load_codes16_lanes gives them;
// c, d: 16-31): the packs leave dwords holding elements 0-3 4-7 16-19 20-23 8-11 12-15 24-27
// 28-31, which a qword permutation puts in order.
ONEPASS_AVX2 void store_codes32_lanes(uint8_t* out, __m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i x = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(x, 0xd8));
}

// The largest of 8 unsigned 32-bit lanes.
ONEPASS_AVX2 uint32_t max_u32x8(__m256i x) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

}  // namespace cpu
}  // namespace onepass
