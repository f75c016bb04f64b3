// float_map_avx2.h on 16 lanes with AVX-512 (F, BW, VL, DQ): the float3 codes and values, the
// 16-lane float type adam_element runs on in int8_block_avx512.h, and 16 params or codes in and
// out of a register.
//
// Why a second width: on a CPU with AVX-512 (the CI machine's Xeon, the GPU machine's host) the
// AVX2 int8 block is bound by its vector ALU work, not by the divider: 1.03 ns an element (one
// thread, L2, bench/stage_cost.sh) where the fp32 update takes 0.53. A 512-bit instruction does
// twice the lanes, mask registers stand in for compare-and-blend pairs, and the packs' order is
// fixed once per 64 codes.
//
// The same rules as adam_math.h's float_map_value_m/_v, float_map_code_m and float_map_code_v_kept,
// rearranged: the codes, once stored by store_codes64_m / _v, equal the scalar ones on all 2**32
// float32 inputs (the *_no_nan forms on all but NaN), and the values on all 256 codes
// (tests/backends/float_map_avx512_test.cpp).
#pragma once

#include "bf16x8_avx2.h"  // (float_map_avx2.h, and ONEPASS_PLANTED_LOOP_BUG)

namespace onepass {
namespace cpu {

// ---- 16 float lanes for adam_element<F16> (as F8 in float_map_avx2.h) ---------------------------
typedef float F16Lanes __attribute__((vector_size(64)));
struct F16 {
  F16Lanes v;
};
ONEPASS_HD F16 operator+(F16 a, F16 b) { return {a.v + b.v}; }
ONEPASS_HD F16 operator-(F16 a, F16 b) { return {a.v - b.v}; }
ONEPASS_HD F16 operator*(F16 a, F16 b) { return {a.v * b.v}; }
ONEPASS_HD F16 operator/(F16 a, F16 b) { return {a.v / b.v}; }
ONEPASS_HD F16 operator-(F16 a) { return {-a.v}; }
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// (all lanes, the current rounding mode: _mm512_sqrt_ps)
ONEPASS_HD F16 op_sqrt(F16 a) {
  return {__builtin_ia32_sqrtps512_mask(a.v, a.v, static_cast<unsigned short>(0xffff), 4)};
}
#pragma GCC diagnostic pop
ONEPASS_HD F16 op_max(F16 a, F16 b) { return {(a.v > b.v) | (a.v != a.v) ? a.v : b.v}; }

#define ONEPASS_AVX512 \
  inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq")))

ONEPASS_AVX512 F16 f16(float x) { return {_mm512_set1_ps(x)}; }

ONEPASS_AVX512 StepScalars<F16> step_scalars_f16(const StepScalars<float>& s) {
  StepScalars<F16> o;
  o.beta1 = f16(s.beta1);
  o.one_minus_beta1 = f16(s.one_minus_beta1);
  o.beta2 = f16(s.beta2);
  o.one_minus_beta2 = f16(s.one_minus_beta2);
  o.eps = f16(s.eps);
  o.weight_decay = f16(s.weight_decay);
  o.decay = f16(s.decay);
  o.step_size = f16(s.step_size);
  o.inv_bc2_sqrt = f16(s.inv_bc2_sqrt);
  o.grad_scale = f16(s.grad_scale);
  return o;
}

ONEPASS_AVX512 __m512i u32x16(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }

// Shifts of 16 32-bit lanes by a constant, written as GNU vector shifts: gcc 12's
// _mm512_s*i_epi32 start from an undefined vector that -Wuninitialized flags once inlined (for
// the same reason the widening, the permutations and the extraction below take maskz forms).
typedef int32_t I32x16 __attribute__((vector_size(64)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
template <int N>
ONEPASS_AVX512 __m512i shl32(__m512i x) { return (__m512i)((U32x16)x << N); }
template <int N>
ONEPASS_AVX512 __m512i shr32(__m512i x) { return (__m512i)((U32x16)x >> N); }
template <int N>
ONEPASS_AVX512 __m512i sar32(__m512i x) { return (__m512i)((I32x16)x >> N); }
// (and so does _mm512_max_epu32: the unsigned max as a GNU vector select, vpmaxud)
ONEPASS_AVX512 __m512i max_u32(__m512i a, __m512i b) {
  return (__m512i)((U32x16)a > (U32x16)b ? (U32x16)a : (U32x16)b);
}

// ---- bf16 in and out of 32-bit lanes' high halves ---------------------------------------------
// One word permutation each way (vpermw), where a widening (vpmovzxwd) and a shift, or a shift
// and a narrowing (vpmovdw), took two to three operations: the AVX-512 bf16 loop 0.84-0.88 of the
// AVX2 loop's time with these against 0.93-1.02 with those, 0.67-0.88 against 0.88-1.02 with bf16
// params (bench/stage_cost.sh, two builds run in turn three times).
typedef long long I64x8 __attribute__((vector_size(64)));
// 16 bf16 values, each into the high half of its lane, the low halves zeroed by the mask (the
// permutation reads words 0-15 only: the register's upper half, left as the cast leaves it,
// is never read).
ONEPASS_AVX512 __m512i widen_bf16x16(const Bf16* x) {
  const __m512i u =
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_maskz_permutexvar_epi16(
      0xaaaaaaaau,
      _mm512_setr_epi32(0 << 16, 1 << 16, 2 << 16, 3 << 16, 4 << 16, 5 << 16, 6 << 16, 7 << 16,
                        8 << 16, 9 << 16, 10 << 16, 11 << 16, 12 << 16, 13 << 16, 14 << 16,
                        15 << 16),
      u);
}
// The high halves of 16 lanes stored as 16 bf16 (the odd words gathered into the low 256 bits).
ONEPASS_AVX512 void narrow_store_bf16x16(Bf16* out, __m512i b) {
  const __m512i w = _mm512_maskz_permutexvar_epi16(
      0x0000ffffu,
      _mm512_setr_epi32(1 | 3 << 16, 5 | 7 << 16, 9 | 11 << 16, 13 | 15 << 16, 17 | 19 << 16,
                        21 | 23 << 16, 25 | 27 << 16, 29 | 31 << 16, 0, 0, 0, 0, 0, 0, 0, 0),
      b);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      (__m256i)__builtin_shufflevector((I64x8)w, (I64x8)w, 0, 1, 2, 3));
}

// ---- params in and out: fp32 as they are, bf16 widened / rounded to nearest ------------------
ONEPASS_AVX512 __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
ONEPASS_AVX512 __m512 load16(const Bf16* x) { return _mm512_castsi512_ps(widen_bf16x16(x)); }
ONEPASS_AVX512 void store16(float* out, __m512 f) { _mm512_storeu_ps(out, f); }
// float_to_bf16 on 16 lanes (bf16x8_avx2.h's rule: 0x7fff plus the kept half's lowest bit added,
// ties to even), a NaN lane set to 0x7fc0 only when the block has one; the high halves narrowed.
ONEPASS_AVX512 void store16(Bf16* out, __m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(shr32<16>(u), u32x16(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, u32x16(0x7fffu)));
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  if (ONEPASS_PLANTED_LOOP_BUG != 3 && __builtin_expect(nan != 0, 0))
    r = _mm512_mask_mov_epi32(r, nan, u32x16(0x7fc00000u));
  narrow_store_bf16x16(out, r);
}

// ---- the float3 codes ---------------------------------------------------------------------------
// 16 codes from 16 bytes, widened to 32-bit lanes.
ONEPASS_AVX512 __m512i load_codes16(const uint8_t* q) {
  return _mm512_maskz_cvtepu8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
}

// float_map_value_v: code q > 0 is (kFmOne - (255 << 20)) + (q << 20), code 0 is 0 (the add
// zero-masked by q != 0). 3 instructions.
ONEPASS_AVX512 __m512 fm_value_v16(__m512i q) {
  const __mmask16 nz = _mm512_test_epi32_mask(q, q);
  return _mm512_castsi512_ps(_mm512_maskz_add_epi32(nz, shl32<kFmShift>(q),
                                                    u32x16(kFmOne - (255u << kFmShift))));
}

// float_map_value_m: q > 128 is (kFmOne - (255 << 20)) + (q << 20), q < 128 is the negative
// pattern (0x80000000 + kFmOne) - (q << 20), q = 128 is 0 (neither mask). 5 instructions.
ONEPASS_AVX512 __m512 fm_value_m16(__m512i q) {
  const __m512i t = shl32<kFmShift>(q);
  const __mmask16 pos = _mm512_cmpgt_epu32_mask(q, u32x16(128));
  const __mmask16 neg = _mm512_cmplt_epu32_mask(q, u32x16(128));
  const __m512i b = _mm512_maskz_sub_epi32(neg, u32x16(0x80000000u + kFmOne), t);
  return _mm512_castsi512_ps(
      _mm512_mask_add_epi32(b, pos, t, u32x16(kFmOne - (255u << kFmShift))));
}

// The codes below are unclamped, as in float_map_avx2.h: store_codes64_v's and store_codes64_m's
// saturating packs clamp them, and only codes stored that way equal the scalar rule. Each has a
// *_no_nan form and a full one that gives a NaN its code (int8_block_avx512 takes the short one
// where the block's scale is nonzero: float_map_avx2.h says why that block has no NaN).

// float_map_code_v_kept: fm_code_v8_no_nan's rank, zero-masked to y > 0 (as a signed pattern: +0,
// negatives and negative NaNs excluded) in the max that raises it to 1. 4 instructions.
ONEPASS_AVX512 __m512i fm_code_v16_no_nan(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i r = sar32<kFmShift>(
      _mm512_add_epi32(u, u32x16(0x7ffffu - (static_cast<uint32_t>(kFmLowV - 1) << kFmShift))));
  return _mm512_maskz_max_epi32(_mm512_cmpgt_epi32_mask(u, _mm512_setzero_si512()), r,
                                u32x16(1));
}
// (positive NaNs, patterns above +inf's, excluded from the mask too: code 0)
ONEPASS_AVX512 __m512i fm_code_v16(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i r = sar32<kFmShift>(
      _mm512_add_epi32(u, u32x16(0x7ffffu - (static_cast<uint32_t>(kFmLowV - 1) << kFmShift))));
  const __mmask16 pos = _mm512_mask_cmple_epi32_mask(
      _mm512_cmpgt_epi32_mask(u, _mm512_setzero_si512()), u, u32x16(0x7f800000u));
  return _mm512_maskz_max_epi32(pos, r, u32x16(1));
}

// float_map_code_m as a signed offset from 128 (store_codes64_m adds the 128 to the bytes): with
// a = |x|'s pattern and n = 1 for x < 0, fm_code_m8_no_nan's rank is (a + K + n * (2**20 + 1))
// >> 20 and x is coded above a > kFmHalfP for x >= 0, a + 1 > kFmHalfN = kFmHalfP - 2**20 for
// x < 0. With t = a + K + n * (2**20 + 1), both thresholds are t > kFmHalfP + K, and t comes from
// x's pattern u without taking |x|: u + K, plus 2**20 + 1 - 2**31 (mod 2**32) where x's sign bit
// is set (the mask: vpmovd2m). t lies in [K, 0x7f900001 + K] for every non-NaN x (no signed
// overflow: K is about -0x3788 << 16). The offset is +-k, k >= 1 above the threshold and 0 below.
// 7 instructions.
ONEPASS_AVX512 __m512i fm_code_m16_no_nan(__m512 x) {
  constexpr uint32_t kK = 0x7ffffu + (static_cast<uint32_t>(1 - kFmLowP) << kFmShift);
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 neg = _mm512_movepi32_mask(u);
  const __m512i t0 = _mm512_add_epi32(u, u32x16(kK));
  const __m512i t = _mm512_mask_add_epi32(t0, neg, t0, u32x16((1u << kFmShift) + 1u + 0x80000000u));
  const __m512i k = _mm512_maskz_max_epi32(
      _mm512_cmpgt_epi32_mask(t, u32x16(static_cast<uint32_t>(kFmHalfP) + kK)),
      sar32<kFmShift>(t), u32x16(1));
  return _mm512_mask_sub_epi32(k, neg, _mm512_setzero_si512(), k);
}
// (a NaN's offset is -128, its code 0; +-inf and finite x as the short form)
ONEPASS_AVX512 __m512i fm_code_m16(__m512 x) {
  const __mmask16 nan =
      _mm512_cmpgt_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x), u32x16(0x7fffffffu)),
                              u32x16(0x7f800000u));
  return _mm512_mask_mov_epi32(fm_code_m16_no_nan(x), nan, u32x16(static_cast<uint32_t>(-128)));
}

// The packs work within 128-bit lanes: after packing a, b then c, d (64 codes, 16 each, in order)
// dword 4i + j holds elements 4i..4i+3 of a, b, c, d (j = 0..3); this permutation puts them in
// order (dword 4j + i takes dword 4i + j).
ONEPASS_AVX512 __m512i codes_in_order(__m512i x) {
  return _mm512_maskz_permutexvar_epi32(  // (maskz, all lanes: as _mm512_undefined_epi32 above)
      0xffff, _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), x);
}

// 64 v codes stored as bytes in order, clamped to [0, 255] by the packs' unsigned saturation.
ONEPASS_AVX512 void store_codes64_v(uint8_t* out, __m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i x = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
  _mm512_storeu_si512(out, codes_in_order(x));
}

// 64 m codes from their offsets: signed saturation clamps an offset to [-128, 127], and 128
// added (the top bit of each byte flipped) gives the code clamped to [0, 255], as fm_clamp's.
ONEPASS_AVX512 void store_codes64_m(uint8_t* out, __m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i x = _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
  _mm512_storeu_si512(out, _mm512_xor_si512(codes_in_order(x), _mm512_set1_epi8(-128)));
}

// The largest of 16 unsigned 32-bit lanes (the halves taken by maskz forms, as above).
ONEPASS_AVX512 uint32_t max_u32x16(__m512i x) {
  return max_u32x8(_mm256_max_epu32(_mm512_maskz_extracti64x4_epi64(0xf, x, 0),
                                    _mm512_maskz_extracti64x4_epi64(0xf, x, 1)));
}

}  // namespace cpu
}  // namespace onepass
