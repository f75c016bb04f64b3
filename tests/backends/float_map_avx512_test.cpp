// csrc/cpu/float_map_avx512.h against adam_math.h's scalar float3 rules it restates: the m and v
// codes of every float32 input (all 2**32 bit patterns, 16 lanes at a time, stored by
// store_codes64_m / _v as the int8 loop stores them; the full forms and the *_no_nan forms, the
// latter on every input but NaN), the values of all 256 codes, and the 16-lane bf16 rounding
// (store16) on every pattern. Plain C++, no torch. Prints "skip" where the CPU has no AVX-512.
// ONEPASS_PLANTED_BUG=1 checks an m code whose threshold is one pattern too high, to show a
// one-value slip is caught (the sweep then stops at its first difference).
#include "cpu/float_map_avx512.h"

#include <cstdint>
#include <cstdio>

using namespace onepass;
using namespace onepass::cpu;

#ifdef ONEPASS_PLANTED_BUG
ONEPASS_AVX512 __m512i code_m_under_test(__m512 x) {
  constexpr uint32_t kK = 0x7ffffu + (static_cast<uint32_t>(1 - kFmLowP) << kFmShift);
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 neg = _mm512_movepi32_mask(u);
  const __m512i t0 = _mm512_add_epi32(u, u32x16(kK));
  const __m512i t = _mm512_mask_add_epi32(t0, neg, t0, u32x16((1u << kFmShift) + 1u + 0x80000000u));
  const __m512i k = _mm512_maskz_max_epi32(  // (kFmHalfP + 1: the bug)
      _mm512_cmpgt_epi32_mask(t, u32x16(static_cast<uint32_t>(kFmHalfP + 1) + kK)),
      sar32<kFmShift>(t), u32x16(1));
  const __m512i o = _mm512_mask_sub_epi32(k, neg, _mm512_setzero_si512(), k);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, u32x16(0x7fffffffu)),
                                                u32x16(0x7f800000u));
  return _mm512_mask_mov_epi32(o, nan, u32x16(static_cast<uint32_t>(-128)));
}
constexpr bool kStopAtFirst = true;
#else
ONEPASS_AVX512 __m512i code_m_under_test(__m512 x) { return fm_code_m16(x); }
constexpr bool kStopAtFirst = false;
#endif

// The four codes and the bf16 pattern of 64 consecutive patterns from b, against the scalar rules.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) static uint64_t sweep() {
  uint64_t bad = 0;
  alignas(64) uint32_t in[64];
  alignas(64) uint8_t qm[64], qv[64], qm_short[64], qv_short[64];
  alignas(64) Bf16 h[64];
  for (uint64_t b = 0; b < (uint64_t(1) << 32); b += 64) {
    for (int j = 0; j < 64; ++j) in[j] = static_cast<uint32_t>(b + j);
    __m512 x[4];
    for (int j = 0; j < 4; ++j) x[j] = _mm512_load_ps(reinterpret_cast<const float*>(in + 16 * j));
    store_codes64_m(qm, code_m_under_test(x[0]), code_m_under_test(x[1]),
                    code_m_under_test(x[2]), code_m_under_test(x[3]));
    store_codes64_v(qv, fm_code_v16(x[0]), fm_code_v16(x[1]), fm_code_v16(x[2]), fm_code_v16(x[3]));
    store_codes64_m(qm_short, fm_code_m16_no_nan(x[0]), fm_code_m16_no_nan(x[1]),
                    fm_code_m16_no_nan(x[2]), fm_code_m16_no_nan(x[3]));
    store_codes64_v(qv_short, fm_code_v16_no_nan(x[0]), fm_code_v16_no_nan(x[1]),
                    fm_code_v16_no_nan(x[2]), fm_code_v16_no_nan(x[3]));
    for (int j = 0; j < 4; ++j) store16(h + 16 * j, x[j]);
    for (int j = 0; j < 64; ++j) {
      const float f = bits_float(in[j]);
      const bool nan = f != f;
      const uint32_t wm = float_map_code_m(f), wv = float_map_code_v_kept(f);
      if (qm[j] != wm || qv[j] != wv || (!nan && (qm_short[j] != wm || qv_short[j] != wv)) ||
          h[j].x != float_to_bf16(f)) {
        if (bad < 5)
          std::printf("pattern %08x: codes m %u v %u (short %u %u) bf16 %04x, want %u %u %04x\n",
                      in[j], qm[j], qv[j], qm_short[j], qv_short[j], h[j].x, wm, wv,
                      float_to_bf16(f));
        ++bad;
        if (kStopAtFirst) return bad;
      }
    }
  }
  return bad;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) static uint64_t check_values() {
  uint64_t bad = 0;
  alignas(64) uint32_t q[16], vm[16], vv[16];
  for (uint32_t c = 0; c < 256; c += 16) {
    for (int j = 0; j < 16; ++j) q[j] = c + j;
    const __m512i codes = _mm512_load_si512(q);
    _mm512_store_ps(vm, fm_value_m16(codes));
    _mm512_store_ps(vv, fm_value_v16(codes));
    for (int j = 0; j < 16; ++j)
      if (vm[j] != float_bits(float_map_value_m(q[j])) ||
          vv[j] != float_bits(float_map_value_v(q[j]))) {
        std::printf("code %u: values %08x %08x\n", q[j], vm[j], vv[j]);
        ++bad;
      }
  }
  return bad;
}

int main() {
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))) {
    std::printf("float_map_avx512_test: skip, no AVX-512 on this CPU\n");
    return 0;
  }
  const uint64_t bad_values = check_values();
  const uint64_t bad_codes = sweep();
  if (bad_values || bad_codes) {
    std::printf("float_map_avx512_test: %llu codes' values and %llu patterns differ\n",
                static_cast<unsigned long long>(bad_values),
                static_cast<unsigned long long>(bad_codes));
    return 1;
  }
  std::printf("float_map_avx512_test: ok, 256 codes and 2**32 patterns\n");
  return 0;
}
