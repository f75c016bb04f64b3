// Prefetches for a step's host work on many small tensors: the metadata it reads for each tensor
// is a chain of separately allocated objects, cold after a backward pass.
#pragma once

#include <cstdint>

namespace onepass {

// Lines [p, p + 64 * lines) towards L1, for reading (null: nothing).
inline void prefetch_lines(const void* p, int lines) {
  if (p == nullptr) return;
  for (int k = 0; k < lines; ++k) __builtin_prefetch(static_cast<const char*>(p) + 64 * k, 0, 3);
}

}  // namespace onepass
