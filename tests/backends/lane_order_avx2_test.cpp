// The lane-order loads and stores of the CPU's bf16-param hand loops (csrc/cpu/bf16x8_avx2.h:
// load_bf16x16, store_bf16x16; float_map_avx2.h: load_codes16_lanes, store_codes32_lanes) against
// the in-order ones they replace: a 16-element group is held as a = elements {0-3, 8-11} and
// b = {4-7, 12-15}, and every store must put each element back where it came from. Checked on all
// 65536 bf16 patterns (with junk in the low halves the stores must drop) and on all 256 codes
// plus codes past [0, 255] (the packs' saturation clamps them, as store_codes32 does). Plain C++,
// no torch; prints "skip" where the CPU has no AVX2. Planted order slips show they are caught:
// ONEPASS_PLANTED_BUG=1 stores the codes with the permutation of in-order codes (store_codes32's),
// 2 stores bf16 as if a and b held elements 0-7 and 8-15.
#include "cpu/bf16x8_avx2.h"

#include <cstdint>
#include <cstdio>

using namespace onepass;
using namespace onepass::cpu;

#if ONEPASS_PLANTED_BUG == 1
ONEPASS_AVX2 void codes_store_under_test(uint8_t* out, __m256i a, __m256i b, __m256i c,
                                         __m256i d) {
  store_codes32(out, a, b, c, d);
}
#else
ONEPASS_AVX2 void codes_store_under_test(uint8_t* out, __m256i a, __m256i b, __m256i c,
                                         __m256i d) {
  store_codes32_lanes(out, a, b, c, d);
}
#endif

#if ONEPASS_PLANTED_BUG == 2
// (a and b in the order of load_bf16x8's halves: elements 0-7, then 8-15)
ONEPASS_AVX2 void bf16_store_under_test(Bf16* out, __m256i a, __m256i b) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_srli_epi32(a, 16),
                                                                   _mm256_srli_epi32(b, 16)),
                                               0xd8));
}
#else
ONEPASS_AVX2 void bf16_store_under_test(Bf16* out, __m256i a, __m256i b) {
  store_bf16x16(out, a, b);
}
#endif

// lane j of a (b) holds element kA[j] (kB[j]) of the group
constexpr int kA[8] = {0, 1, 2, 3, 8, 9, 10, 11};
constexpr int kB[8] = {4, 5, 6, 7, 12, 13, 14, 15};

__attribute__((target("avx2"))) static uint64_t check_bf16() {
  uint64_t bad = 0;
  alignas(32) Bf16 in[16], out[16];
  alignas(32) uint32_t la[8], lb[8];
  for (uint32_t base = 0; base < 65536; base += 16) {
    for (int k = 0; k < 16; ++k) in[k].x = static_cast<uint16_t>(base + k);
    __m256 a, b;
    load_bf16x16(in, a, b);
    _mm256_store_si256(reinterpret_cast<__m256i*>(la), _mm256_castps_si256(a));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lb), _mm256_castps_si256(b));
    for (int j = 0; j < 8; ++j)
      if (la[j] != uint32_t(in[kA[j]].x) << 16 || lb[j] != uint32_t(in[kB[j]].x) << 16) ++bad;
    // junk in the low halves (the rounding's dropped bits): the store keeps the high halves only
    const __m256i junk = _mm256_setr_epi32(0xffff, 1, 0x8000, 0x7fff, 0x1234, 0xfffe, 2, 0xabcd);
    bf16_store_under_test(out, _mm256_or_si256(_mm256_castps_si256(a), junk),
                          _mm256_or_si256(_mm256_castps_si256(b), junk));
    for (int k = 0; k < 16; ++k)
      if (out[k].x != in[k].x) ++bad;
  }
  return bad;
}

// 8 lanes of x picked by idx
ONEPASS_AVX2 __m256i lanes8(const int32_t* x, const int* idx) {
  return _mm256_setr_epi32(x[idx[0]], x[idx[1]], x[idx[2]], x[idx[3]], x[idx[4]], x[idx[5]],
                           x[idx[6]], x[idx[7]]);
}

__attribute__((target("avx2"))) static uint64_t check_codes() {
  uint64_t bad = 0;
  alignas(32) uint8_t in[32], out[32];
  alignas(32) int32_t la[8], lb[8];
  for (int base = 0; base < 256; base += 32) {
    for (int k = 0; k < 32; ++k) in[k] = static_cast<uint8_t>(base + k);
    __m256i a, b, c, d;
    load_codes16_lanes(in, a, b);
    load_codes16_lanes(in + 16, c, d);
    _mm256_store_si256(reinterpret_cast<__m256i*>(la), a);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lb), b);
    for (int j = 0; j < 8; ++j)
      if (la[j] != in[kA[j]] || lb[j] != in[kB[j]]) ++bad;
    codes_store_under_test(out, a, b, c, d);
    for (int k = 0; k < 32; ++k)
      if (out[k] != in[k]) ++bad;
  }
  // codes past the byte range, in lane order: element e holds -40 + 11 * e (-40 .. 301)
  int32_t want[32];
  for (int e = 0; e < 32; ++e) want[e] = -40 + 11 * e;
  codes_store_under_test(out, lanes8(want, kA), lanes8(want, kB), lanes8(want + 16, kA),
                         lanes8(want + 16, kB));
  for (int e = 0; e < 32; ++e) {
    const int clamped = want[e] < 0 ? 0 : want[e] > 255 ? 255 : want[e];
    if (out[e] != clamped) ++bad;
  }
  return bad;
}

int main() {
  if (!__builtin_cpu_supports("avx2")) {
    std::printf("lane_order_avx2_test: skip, no AVX2 on this CPU\n");
    return 0;
  }
  const uint64_t bad_bf16 = check_bf16();
  const uint64_t bad_codes = check_codes();
  if (bad_bf16 || bad_codes) {
    std::printf("lane_order_avx2_test: %llu bf16 and %llu code checks differ\n",
                static_cast<unsigned long long>(bad_bf16),
                static_cast<unsigned long long>(bad_codes));
    return 1;
  }
  std::printf("lane_order_avx2_test: ok, 65536 bf16 patterns and 256 codes\n");
  return 0;
}
