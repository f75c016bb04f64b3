// The int8 code search on the CPU (loops_lowp.cpp), built once per batch (adam_cpu.cpp).
#pragma once

#include "../adam_math.h"

#include <cstdint>
#include <vector>

namespace onepass {
namespace cpu {

// The int8 code search on the CPU: the same count of midpoints below x / absmax as code_search
// (csrc/adam_math.h), found with one table look-up and two comparisons instead of eight steps
// of a binary search. Keys are order_key values (integers ordered as the floats); the key range
// of |x| <= 1 is cut into buckets of 2**shift keys, each holding at most two midpoints, and
// lo[bucket] counts the midpoints below the bucket's first key. Then
// count(mid < x) = lo + (mk[lo] < key) + (mk[lo + 1] < key), mk padded with INT32_MAX.
// Built once per batch from qtables (~16K buckets for the maps of onepass.quant); a map that no
// shift in [12, 20] fits is searched with code_search.
constexpr int32_t kKeyMin = -0x3f800001;  // just below order_key(-1.0f)
constexpr int32_t kKeyMax = 0x3f800000;   // order_key(1.0f)
struct CodeIndex {
  int shift = 0;
  std::vector<int32_t> lo;
  int32_t mk[257];
  bool build(const float* mid) {
    for (int i = 0; i < 255; ++i) mk[i] = order_key(mid[i]);
    mk[255] = mk[256] = INT32_MAX;
    for (int i = 1; i < 255; ++i)
      if (!(mk[i - 1] < mk[i]) || mk[i - 1] < kKeyMin || mk[i] > kKeyMax) return false;
    for (int sh = 20; sh >= 12; --sh) {
      const int64_t nb = ((int64_t(kKeyMax) - kKeyMin) >> sh) + 1;
      std::vector<int32_t> t(nb + 1);
      int c = 0;
      bool ok = true;
      for (int64_t b = 0; b <= nb && ok; ++b) {
        const int64_t start = int64_t(kKeyMin) + (b << sh);
        while (c < 255 && mk[c] < start) ++c;
        t[b] = c;
        ok = b == 0 || t[b] - t[b - 1] <= 2;
      }
      if (ok) {
        t.pop_back();
        lo = std::move(t);
        shift = sh;
        return true;
      }
    }
    return false;
  }
};

}  // namespace cpu
}  // namespace onepass
