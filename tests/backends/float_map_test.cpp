// Every float32 input of adam_math.h's float_map_code_v_kept against the rule it fuses,
// keep_positive(float_map_code_v(y), y) (whose equality with the midpoint search
// tests/backends/test_lowp_cpu.py checks): all 2**32 bit patterns, ~6 s at -O2. Plain C++, no
// torch. ONEPASS_PLANTED_BUG checks a copy with +0 taken for positive instead, to show a
// one-value slip is caught.
#include "adam_math.h"

#include <cstdint>
#include <cstdio>

using namespace onepass;

#ifdef ONEPASS_PLANTED_BUG
static uint32_t under_test(float y) {
  const int32_t u = static_cast<int32_t>(float_bits(y));
  const int32_t r = static_cast<int32_t>((static_cast<uint32_t>(u) + 0x7ffffu) >> kFmShift);
  const int32_t c = fm_clamp(r, kFmLowV) - (kFmLowV - 1);
  return (u >= 0) & (u <= 0x7f800000) ? static_cast<uint32_t>(c) : 0u;  // (>= : the bug)
}
#else
static uint32_t under_test(float y) { return float_map_code_v_kept(y); }
#endif

int main() {
  uint64_t bad = 0;
  for (uint64_t b = 0; b < (uint64_t(1) << 32); ++b) {
    const float y = bits_float(static_cast<uint32_t>(b));
    const uint32_t want = keep_positive(float_map_code_v(y), y);
    const uint32_t got = under_test(y);
    if (got != want) {
      if (bad < 5)
        std::printf("pattern %08llx: code %u, want %u\n", static_cast<unsigned long long>(b), got, want);
      ++bad;
    }
  }
  if (bad) {
    std::printf("float_map_test: %llu patterns differ\n", static_cast<unsigned long long>(bad));
    return 1;
  }
  std::printf("float_map_test: ok, 2**32 patterns\n");
  return 0;
}
