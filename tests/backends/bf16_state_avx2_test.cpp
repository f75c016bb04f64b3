// csrc/cpu/bf16_state_avx2.h's random bits and roundings (with bf16x8_avx2.h's) against
// adam_math.h's scalar rules they restate, on all 2**32 inputs, 8 lanes at a time: mix32x8(x)
// against mix32(x); bf16_stochastic8 of the float with x's bit pattern, stored by store_bf16x8,
// against float_to_bf16_stochastic with the random bits mix32(x); and bf16_nearest8 (a bf16
// param's store) against float_to_bf16. Plain C++, no torch. Prints "skip" where the CPU has no
// AVX2. ONEPASS_PLANTED_BUG shows a slip is caught (the sweep then stops at its first difference):
// 1, a stochastic rounding that adds 17 random bits instead of 16; 2, a nearest rounding that
// forgets the tie-to-even bit.
#include "cpu/bf16_state_avx2.h"

#include <cstdint>
#include <cstdio>

#ifndef ONEPASS_PLANTED_BUG
#define ONEPASS_PLANTED_BUG 0
#endif

using namespace onepass;
using namespace onepass::cpu;

#if ONEPASS_PLANTED_BUG == 1
ONEPASS_AVX2 __m256i rounding_under_test(__m256 f, __m256i bits) {
  const __m256i sum =  // (0x1ffff: the bug)
      _mm256_add_epi32(_mm256_castps_si256(f), _mm256_and_si256(bits, u32x8(0x1ffffu)));
  return _mm256_blendv_epi8(sum, u32x8(0x7fc00000u),
                            _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}
#else
ONEPASS_AVX2 __m256i rounding_under_test(__m256 f, __m256i bits) {
  return bf16_stochastic8(f, bits);
}
#endif
#if ONEPASS_PLANTED_BUG == 2
ONEPASS_AVX2 __m256i nearest_under_test(__m256 f) {
  const __m256i sum = _mm256_add_epi32(_mm256_castps_si256(f), u32x8(0x7fffu));  // (no tie bit)
  return _mm256_blendv_epi8(sum, u32x8(0x7fc00000u),
                            _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}
#else
ONEPASS_AVX2 __m256i nearest_under_test(__m256 f) { return bf16_nearest8(f); }
#endif
constexpr bool kStopAtFirst = ONEPASS_PLANTED_BUG != 0;

__attribute__((target("avx2"))) static uint64_t sweep() {
  uint64_t bad = 0;
  alignas(32) uint32_t in[8], hash[8];
  alignas(16) Bf16 out[8], near[8];
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (uint64_t b = 0; b < (uint64_t(1) << 32); b += 8) {
    const __m256i x = _mm256_add_epi32(u32x8(static_cast<uint32_t>(b)), lanes);
    const __m256i h = mix32x8(x);
    _mm256_store_si256(reinterpret_cast<__m256i*>(in), x);
    _mm256_store_si256(reinterpret_cast<__m256i*>(hash), h);
    store_bf16x8(out, rounding_under_test(_mm256_castsi256_ps(x), h));
    store_bf16x8(near, nearest_under_test(_mm256_castsi256_ps(x)));
    for (int j = 0; j < 8; ++j) {
      const uint32_t want_h = mix32(in[j]);
      const uint16_t want = float_to_bf16_stochastic(bits_float(in[j]), want_h);
      const uint16_t want_near = float_to_bf16(bits_float(in[j]));
      if (hash[j] != want_h || out[j].x != want || near[j].x != want_near) {
        if (bad < 5)
          std::printf("input %08x: hash %08x bf16 %04x nearest %04x, want %08x %04x %04x\n", in[j],
                      hash[j], out[j].x, near[j].x, want_h, want, want_near);
        ++bad;
        if (kStopAtFirst) return bad;
      }
    }
  }
  return bad;
}

int main() {
  if (!__builtin_cpu_supports("avx2")) {
    std::printf("bf16_state_avx2_test: skip, no AVX2 on this CPU\n");
    return 0;
  }
  const uint64_t bad = sweep();
  if (bad) {
    std::printf("bf16_state_avx2_test: %llu inputs differ\n", static_cast<unsigned long long>(bad));
    return 1;
  }
  std::printf("bf16_state_avx2_test: ok, 2**32 inputs\n");
  return 0;
}
