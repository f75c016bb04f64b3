// bf16_state_avx2.h on 16 lanes with AVX-512: bf16 moments (stochastically rounded) of fp32 or
// bf16 params (rounded to nearest), 16 elements at a time in order, the last 8 of a run (and a
// vector across a 65536 boundary) by the AVX2 loop's 8-lane steps, which give the same bits. The
// avx512 variant of the CPU loop (loops_lowp.cpp: lowp_range_bf16_avx512) and
// bench/stage_cost.cpp's.
//
// Why: on a CPU with AVX-512 the 8-lane loop is bound by its ~40 vector operations a vector on
// the core's vector ports, not by the divider (bench/results/int8-avx512-cpu-xeon-2core-20261201/
// for the same finding on the int8 block). The same rules as bf16_state_avx2.h, each operation
// on 16 lanes; checked element by element against the scalar rules by
// tests/backends/bf16_state_loop_avx2_test.cpp built with ONEPASS_LOOP_AVX512.
#pragma once

#include "bf16_state_avx2.h"
#include "float_map_avx512.h"

namespace onepass {
namespace cpu {

ONEPASS_AVX512 __m512i mix32x16_rest(__m512i x) {
  x = _mm512_mullo_epi32(x, u32x16(kMix1));
  x = _mm512_xor_si512(x, shr32<15>(x));
  x = _mm512_mullo_epi32(x, u32x16(kMix2));
  return _mm512_xor_si512(x, shr32<15>(x));
}

// bf16_update8 on 16 lanes: adam_element, one draw each of the moments' stream rounding m (low
// 16 bits) and v (high 16), NaN moments set to 0x7fc0 only when one compare of m and v finds one.
template <bool MAX, bool COUPLED, bool SCALED>
ONEPASS_AVX512 void bf16_update16(F16& p, __m512 g, __m512 m, __m512 v, __m512i pre,
                                  __m512i& mo, __m512i& vo, const StepScalars<F16>& sc) {
  F16 mi{m}, vi{v}, unused{};
  adam_element<F16, false, MAX, COUPLED, SCALED>(p, F16{g}, mi, vi, unused, sc);
  const __m512i draw = mix32x16_rest(pre);
  mo = _mm512_add_epi32(_mm512_castps_si512(mi.v), _mm512_and_si512(draw, u32x16(0xffffu)));
  vo = _mm512_add_epi32(_mm512_castps_si512(vi.v), shr32<16>(draw));
  if (ONEPASS_PLANTED_LOOP_BUG != 2 &&
      __builtin_expect(_mm512_cmp_ps_mask(mi.v, vi.v, _CMP_UNORD_Q) != 0, 0)) {
    mo = _mm512_mask_mov_epi32(mo, _mm512_cmp_ps_mask(mi.v, mi.v, _CMP_UNORD_Q),
                               u32x16(0x7fc00000u));
    vo = _mm512_mask_mov_epi32(vo, _mm512_cmp_ps_mask(vi.v, vi.v, _CMP_UNORD_Q),
                               u32x16(0x7fc00000u));
  }
}

// bf16_state_run on 16 lanes: elements [i, end) (end - i a multiple of 8), all in one
// 65536-aligned run of indices keyed by `key` (premix_key of that run's block); a last 8 by
// bf16_state8, with its 8-lane scalars made from s only then (a 16-element tensor's call makes
// none: the host path of many small tensors pays for every broadcast).
template <typename P, bool MAX, bool COUPLED, bool SCALED>
ONEPASS_AVX512 void bf16_state_run16(P* __restrict p, const P* __restrict g, Bf16* __restrict m,
                                     Bf16* __restrict v, int64_t i, int64_t end,
                                     uint32_t index_lo, uint32_t key,
                                     const StepScalars<F16>& sc, const StepScalars<float>& s) {
  const __m512i k16 = u32x16(key);
  __m512i idx = _mm512_add_epi32(
      u32x16(index_lo + static_cast<uint32_t>(i)),
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  for (; i + 16 <= end; i += 16) {
    F16 pi{load16(p + i)};
    __m512i mo, vo;
    bf16_update16<MAX, COUPLED, SCALED>(pi, load16(g + i), load16(m + i), load16(v + i),
                                        _mm512_xor_si512(idx, k16), mo, vo, sc);
    store16(p + i, pi.v);
    narrow_store_bf16x16(m + i, mo);
    narrow_store_bf16x16(v + i, vo);
    idx = _mm512_add_epi32(idx, u32x16(16));
  }
  if (i < end) {  // (8 left)
    const __m256i idx8 = _mm256_add_epi32(u32x8(index_lo + static_cast<uint32_t>(i)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    bf16_state8<P, MAX, COUPLED, SCALED>(p, g, m, v, i, _mm256_xor_si256(idx8, u32x8(key)),
                                         step_scalars_f8(s));
  }
}

// bf16_state_avx2 with 16-lane runs: elements [0, n) (n a multiple of 8), element k's index
// index_lo + k in the moments' stream keyed key_mv; one key a 65536-aligned run, the whole hash
// for an 8-vector across a run's boundary.
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq"))) void
bf16_state_avx512(P* __restrict p, const P* __restrict g, Bf16* __restrict m, Bf16* __restrict v,
                  int64_t n, uint32_t index_lo, uint32_t key_mv, const StepScalars<F16>& sc,
                  const StepScalars<float>& s) {
  if (one_run(index_lo, n)) {  // (most ranges: keyed once)
    bf16_state_run16<P, MAX, COUPLED, SCALED>(p, g, m, v, 0, n, index_lo,
                                              run_key(key_mv, index_lo, index_lo), sc, s);
    return;
  }
  for (int64_t i = 0; i < n;) {
    const uint32_t at = index_lo + static_cast<uint32_t>(i);
    const int64_t len = run_length(at, n - i);
    if (len == 0) {
      bf16_state8<P, MAX, COUPLED, SCALED>(p, g, m, v, i, straddle_pre8(at, key_mv),
                                           step_scalars_f8(s));
      i += 8;
      continue;
    }
    bf16_state_run16<P, MAX, COUPLED, SCALED>(p, g, m, v, i, i + len, index_lo,
                                              run_key(key_mv, index_lo, at), sc, s);
    i += len;
  }
}

}  // namespace cpu
}  // namespace onepass
