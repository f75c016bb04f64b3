// csrc/cpu/float_map_avx2.h against adam_math.h's scalar float3 rules it restates: the m and v
// codes of every float32 input (all 2**32 bit patterns, 8 lanes at a time, narrowed to bytes by
// store_codes32 as the int8 loop stores them; the full forms are the *_no_nan forms with NaN's
// code put in, so those are checked on every input but NaN) and the values of all 256 codes.
// Plain C++, no torch. Prints "skip" where the CPU has no AVX2. ONEPASS_PLANTED_BUG checks a copy
// of the m code whose zero threshold is one pattern too high, to show a one-value slip is caught
// (the sweep then stops at its first difference).
#include "cpu/float_map_avx2.h"

#include <cstdint>
#include <cstdio>

using namespace onepass;
using namespace onepass::cpu;

#ifdef ONEPASS_PLANTED_BUG
ONEPASS_AVX2 __m256i code_m_under_test(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i s = _mm256_srai_epi32(u, 31);
  const __m256i a = _mm256_and_si256(u, u32x8(0x7fffffffu));
  const __m256i t = _mm256_sub_epi32(a, s);
  const __m256i r = _mm256_srai_epi32(
      _mm256_add_epi32(t, u32x8(0x7ffffu + (static_cast<uint32_t>(1 - kFmLowP) << kFmShift))),
      kFmShift);
  const __m256i above =  // (kFmHalfP + 1: the bug)
      _mm256_cmpgt_epi32(t, _mm256_add_epi32(_mm256_slli_epi32(s, kFmShift), u32x8(kFmHalfP + 1)));
  const __m256i k = _mm256_and_si256(_mm256_max_epi32(_mm256_sub_epi32(r, s), u32x8(1)), above);
  const __m256i q = _mm256_add_epi32(_mm256_sign_epi32(k, u), u32x8(128));
  return _mm256_andnot_si256(_mm256_cmpgt_epi32(a, u32x8(0x7f800000u)), q);
}
constexpr bool kStopAtFirst = true;
#else
ONEPASS_AVX2 __m256i code_m_under_test(__m256 x) { return fm_code_m8(x); }
constexpr bool kStopAtFirst = false;
#endif

__attribute__((target("avx2"))) static uint64_t sweep_codes() {
  uint64_t bad = 0;
  alignas(32) uint32_t in[32];
  alignas(32) uint8_t qm[32], qv[32];
  for (uint64_t b = 0; b < (uint64_t(1) << 32); b += 32) {
    for (int j = 0; j < 32; ++j) in[j] = static_cast<uint32_t>(b + j);
    __m256 x[4];
    for (int j = 0; j < 4; ++j) x[j] = _mm256_load_ps(reinterpret_cast<const float*>(in + 8 * j));
    store_codes32(qm, code_m_under_test(x[0]), code_m_under_test(x[1]), code_m_under_test(x[2]),
                  code_m_under_test(x[3]));
    store_codes32(qv, fm_code_v8(x[0]), fm_code_v8(x[1]), fm_code_v8(x[2]), fm_code_v8(x[3]));
    for (int j = 0; j < 32; ++j) {
      const float f = bits_float(in[j]);
      const uint32_t wm = float_map_code_m(f), wv = float_map_code_v_kept(f);
      if (qm[j] != wm || qv[j] != wv) {
        if (bad < 5)
          std::printf("pattern %08x: codes m %u v %u, want %u %u\n", in[j], qm[j], qv[j], wm, wv);
        ++bad;
        if (kStopAtFirst) return bad;
      }
    }
  }
  return bad;
}

__attribute__((target("avx2"))) static uint64_t check_values() {
  uint64_t bad = 0;
  alignas(32) uint32_t q[8], vm[8], vv[8];
  for (uint32_t c = 0; c < 256; c += 8) {
    for (int j = 0; j < 8; ++j) q[j] = c + j;
    const __m256i codes = _mm256_load_si256(reinterpret_cast<const __m256i*>(q));
    _mm256_store_ps(reinterpret_cast<float*>(vm), fm_value_m8(codes));
    _mm256_store_ps(reinterpret_cast<float*>(vv), fm_value_v8(codes));
    for (int j = 0; j < 8; ++j)
      if (vm[j] != float_bits(float_map_value_m(q[j])) ||
          vv[j] != float_bits(float_map_value_v(q[j]))) {
        std::printf("code %u: values %08x %08x\n", q[j], vm[j], vv[j]);
        ++bad;
      }
  }
  return bad;
}

int main() {
  if (!__builtin_cpu_supports("avx2")) {
    std::printf("float_map_avx2_test: skip, no AVX2 on this CPU\n");
    return 0;
  }
  const uint64_t bad_values = check_values();
  const uint64_t bad_codes = sweep_codes();
  if (bad_values || bad_codes) {
    std::printf("float_map_avx2_test: %llu codes' values and %llu patterns differ\n",
                static_cast<unsigned long long>(bad_values),
                static_cast<unsigned long long>(bad_codes));
    return 1;
  }
  std::printf("float_map_avx2_test: ok, 256 codes and 2**32 patterns\n");
  return 0;
}
