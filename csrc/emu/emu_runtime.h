// The runtime of csrc/cuda/host_step.h under the SIMT emulation: CPU tensors stand for device
// memory, kernels run through onepass_emu::launch. Whether the step counts are "device" counts
// (capturable: the kernels read them and bump_device_steps advances them) and whether a graph is
// being "captured" are set by the caller, so the tests reach both paths and the capture checks.
#pragma once

#include "simt.h"  // first: the CUDA names the kernel source uses

#include "../cuda/host_step.h"

#include <cstring>

namespace onepass {

struct EmuRuntime {
  bool dev_steps = false;
  bool capture = false;
  // Everything but the kernels themselves: for timing the host step (bench/host_time.py).
  bool stub_launch = false;

  bool device_steps(const BatchArgs&) const { return dev_steps; }
  bool step_on_device(const at::Tensor&) const { return dev_steps; }
  bool on_device(const at::Tensor&) const { return true; }
  bool capturing() const { return capture; }
  bool float_maps(const at::Tensor& q) const { return is_float_map(q.data_ptr<float>()); }

  at::Tensor upload(const void* data, int64_t bytes) const {
    at::Tensor t = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(t.data_ptr(), data, static_cast<size_t>(bytes));
    return t;
  }

  at::Tensor alloc(int64_t bytes) const {
    return at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }

  template <auto K, typename... Args>
  void run(int64_t grid, int threads, Args... args) const {
    (void)onepass_emu::KernelRecord<K>::id;  // lists K among the kernels compiled in
    if (stub_launch) return;
    onepass_emu::launch(dim3(static_cast<unsigned>(grid)), dim3(static_cast<unsigned>(threads)),
                        [&] { K(args...); }, onepass_emu::kernel_name<K>());
  }
};

// The two halves of a step, compiled in two files so that a parallel build splits the kernels.
// kept: a planned group's kept launches (null: planned every step).
void emu_step_fp32(const BatchArgs& a, const EmuRuntime& rt, host::PlannedLaunches* kept = nullptr);
void emu_step_lowp(const BatchArgs& a, const EmuRuntime& rt, host::PlannedLaunches* kept = nullptr);

}  // namespace onepass
