// The emulated low-precision kernels (lowp_kernel, int8_kernel): every instantiation the CUDA
// build has.
#include "emu_runtime.h"

namespace onepass {
void emu_step_lowp(const BatchArgs& a, const EmuRuntime& rt, host::PlannedLaunches* kept) {
  host::step_lowp(a, rt, kept);
}
}  // namespace onepass
