// The emulated fp32-state kernels (adam_kernel): every instantiation the CUDA build has.
#include "emu_runtime.h"

namespace onepass {
void emu_step_fp32(const BatchArgs& a, const EmuRuntime& rt, host::PlannedLaunches* kept) {
  host::step_fp32(a, rt, kept);
}
}  // namespace onepass
