// Which SIMD variant of the CPU loops runs: the widest this CPU supports, capped by
// ONEPASS_CPU_ISA=baseline|avx2|avx512 or onepass._C.cpu_isa_set (every variant gives the same
// bits; tests run each one the CPU has).
#pragma once

namespace onepass {
namespace cpu {

enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The ISA the loops are picked for now.
int current_isa();

}  // namespace cpu
}  // namespace onepass
