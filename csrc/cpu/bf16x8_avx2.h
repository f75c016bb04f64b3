// Eight bf16 values in and out of an AVX2 register, each widened to (or taken from) the high half
// of a 32-bit lane: the bf16 params' and bf16 moments' loads and stores of the hand-written CPU
// loops (bf16_state_avx2.h, int8_block_avx2.h), and float_to_bf16 (adam_math.h) on 8 lanes. The
// rounding equals the scalar rule on all 2**32 float32 patterns
// (tests/backends/bf16_state_avx2_test.cpp).
#pragma once

#include "float_map_avx2.h"

// tests/backends/bf16_state_loop_avx2_test.cpp builds the bf16 loops with one planted slip to show
// its check catches it: 1, every run keyed by the first index's 65536-block (bf16_state_avx2.h);
// 2, NaN moments not fixed (bf16_state_avx2.h); 3, NaN bf16 params not fixed (here).
#ifndef ONEPASS_PLANTED_LOOP_BUG
#define ONEPASS_PLANTED_LOOP_BUG 0
#endif

namespace onepass {
namespace cpu {

// 8 bf16 values widened to floats.
ONEPASS_AVX2 __m256 load_bf16x8(const Bf16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The high halves of 8 32-bit lanes stored as 8 bf16 (16 bytes): a byte shuffle gathers each
// 128-bit half's four into its low 8 bytes, a qword permutation puts those two side by side.
ONEPASS_AVX2 void store_bf16x8(Bf16* out, __m256i b) {
  const __m256i hi = _mm256_shuffle_epi8(
      b, _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                          2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm256_castsi256_si128(_mm256_permute4x64_epi64(hi, 0x08)));
}

// float_to_bf16 on 8 lanes, each pattern in the high half of its lane: to nearest, ties to even
// (0x7fff plus the kept half's lowest bit added); a NaN (unordered with itself) takes 0x7fc0.
// bf16_nearest8_no_nan leaves NaN lanes to bf16_nan8 (store_bf16x16_nearest: only when there is
// one).
ONEPASS_AVX2 __m256i bf16_nearest8_no_nan(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), u32x8(1));
  return _mm256_add_epi32(u, _mm256_add_epi32(odd, u32x8(0x7fffu)));
}
// A NaN lane of f takes 0x7fc0 (float_to_bf16's NaN) in place of its rounded pattern.
ONEPASS_AVX2 __m256i bf16_nan8(__m256i rounded, __m256 f) {
  return _mm256_blendv_epi8(rounded, u32x8(0x7fc00000u),
                            _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}
ONEPASS_AVX2 __m256i bf16_nearest8(__m256 f) { return bf16_nan8(bf16_nearest8_no_nan(f), f); }

// 16 bf16 values in lane order, for loops over bf16 params (bf16_state_avx2.h): one 32-byte load
// unpacked against zero within each 128-bit half gives a = elements {0-3, 8-11} and
// b = {4-7, 12-15}, each in the high half of its lane (2 in-lane shuffles for 16 values, where
// load_bf16x8 takes a lane-crossing widening and a shift for 8); store_bf16x16 packs a and b back
// in the same order (2 shifts and 1 in-lane pack for 16, where store_bf16x8 takes a shuffle and a
// lane-crossing permutation for 8). An elementwise step does not care which lane holds which
// element, so long as every operand (params, grads, moments, random bits) is in the same order.
ONEPASS_AVX2 void load_bf16x16(const Bf16* x, __m256& a, __m256& b) {
  const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), u));
  b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), u));
}
// (each lane's high half; the logical shifts leave values below 2**16, which the pack's unsigned
// saturation keeps as they are)
ONEPASS_AVX2 void store_bf16x16(Bf16* out, __m256i a, __m256i b) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16)));
}

// 16 new param values (a, b in lane order) rounded to nearest and stored: one compare of a and b
// together finds a NaN, and only then are the NaN lanes fixed (2 of bf16_nearest8's 6 operations
// a vector saved).
ONEPASS_AVX2 void store_bf16x16_nearest(Bf16* out, __m256 a, __m256 b) {
  __m256i ra = bf16_nearest8_no_nan(a), rb = bf16_nearest8_no_nan(b);
  if (ONEPASS_PLANTED_LOOP_BUG != 3 &&
      __builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)) != 0, 0)) {
    ra = bf16_nan8(ra, a);
    rb = bf16_nan8(rb, b);
  }
  store_bf16x16(out, ra, rb);
}

// A param's (or grad's) 8 elements as floats, and the param's 8 new values stored: fp32 as they
// are, bf16 rounded to nearest (the loops' kNearest param rounding).
ONEPASS_AVX2 __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
ONEPASS_AVX2 __m256 load8(const Bf16* x) { return load_bf16x8(x); }
ONEPASS_AVX2 void store8(float* out, __m256 f) { _mm256_storeu_ps(out, f); }
ONEPASS_AVX2 void store8(Bf16* out, __m256 f) { store_bf16x8(out, bf16_nearest8(f)); }

}  // namespace cpu
}  // namespace onepass
