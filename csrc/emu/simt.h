// A CPU emulation of the CUDA SIMT model, so that the kernels of csrc/cuda/ -- the same source nvcc
// compiles -- run under g++ on CPU tensors in CI (ARCHITECTURE.md section 7).
//
// Every thread of a block is a fiber (its own stack, switched cooperatively). A fiber runs until
// it reaches a rendezvous -- __syncthreads, __syncwarp, a __shfl_*_sync -- or returns; the
// rendezvous completes only when every thread it names has arrived, as on a GPU. So a missing
// barrier shows: threads run in index order, thread 0 first, and it reads shared memory that the
// later threads have not written yet (shared memory starts each block filled with 0xFF bytes: NaN
// for floats). Divergent barriers (a thread exits while others wait, a lane outside the mask,
// masks that differ within one shuffle) and deadlocks are reported as errors, never hang.
//
// What the layer gives the kernel source: the CUDA keywords (__global__, __device__, ...),
// threadIdx / blockIdx / blockDim / gridDim, warpSize 32, the barrier and warp intrinsics, the _rn
// arithmetic intrinsics (plain IEEE operations here: the build uses -ffp-contract=off, so each is
// one correctly rounded operation), bit casts, and ONEPASS_SHARED (per-block shared memory; nvcc
// reads it as a __shared__ array). Kernels are launched with onepass_emu::launch, which runs the
// blocks one after another on the calling thread.
//
// What it cannot show -- speed, the GPU memory model, NaN canonicalization -- is left to
// scripts/gpu_check.sh and the static checks of the generated code (scripts/check_codegen.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define ONEPASS_EMU 1

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace onepass_emu {

// The coordinates of the running thread (the current fiber).
struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
ThreadCtx& ctx();

void syncthreads();
void syncwarp(unsigned mask);
// Exchanges one 64-bit value among the lanes of `mask`: every lane deposits `value` and gets the
// value of lane `src(lane)`. Blocks until every lane of the mask has arrived.
uint64_t exchange(unsigned mask, uint64_t value, int src_lane, const char* what);
int lane_id();
unsigned ballot(unsigned mask, bool pred);

// Per-block shared memory: the k-th call of a thread returns the block's k-th region (every
// thread declares the same arrays in the same order), created filled with 0xFF.
void* shared_alloc(std::size_t bytes, std::size_t align);

// A fault found while a kernel runs (a misaligned vector access, a divergent barrier): the launch
// stops and raises std::runtime_error with the message and the thread's coordinates.
[[noreturn]] void fail(const std::string& what);
inline void check_aligned(const void* p, std::size_t bytes, const char* what) {
  if ((reinterpret_cast<uintptr_t>(p) & (bytes - 1)) != 0)
    fail(std::string("misaligned ") + std::to_string(bytes) + "-byte " + what);
}

// Runs `body` as every thread of every block (blocks in order, threads as fibers). `name` names
// the kernel for the coverage record (kernels_run).
void launch(dim3 grid, dim3 block, const std::function<void()>& body, const std::string& name);

// Coverage: the names of the kernels compiled into this module (register_kernel, at load time)
// and of those launched since load.
int register_kernel(const std::string& name);
std::vector<std::string> kernels_compiled();
std::vector<std::string> kernels_run();

// Scheduling order of the fibers of a block: forward (thread 0 first) or reversed; the results of
// a correct kernel do not depend on it.
void set_reverse_order(bool reverse);

// Function names as the compiler spells them (__PRETTY_FUNCTION__ of a template naming K).
template <auto K>
const char* kernel_name() {
  return __PRETTY_FUNCTION__;
}
template <auto K>
struct KernelRecord {
  static inline const int id = register_kernel(kernel_name<K>());
};

}  // namespace onepass_emu

// ---- the CUDA names the kernel source uses ------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define threadIdx (::onepass_emu::ctx().thread_idx)
#define blockIdx (::onepass_emu::ctx().block_idx)
#define blockDim (::onepass_emu::ctx().block_dim)
#define gridDim (::onepass_emu::ctx().grid_dim)
#define warpSize 32
#define ONEPASS_SHARED(type, name, count) \
  type* name = static_cast<type*>(::onepass_emu::shared_alloc(sizeof(type) * (count), alignof(type)))
#define ONEPASS_CHECK_ALIGNED(ptr, bytes, what) ::onepass_emu::check_aligned((ptr), (bytes), (what))

inline void __syncthreads() { onepass_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { onepass_emu::syncwarp(mask); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return onepass_emu::ballot(mask, pred != 0); }

namespace onepass_emu {
template <typename T>
T shfl_to(unsigned mask, T v, int src, const char* what) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  uint64_t in = 0;
  std::memcpy(&in, &v, sizeof(T));
  const uint64_t out = exchange(mask, in, src, what);
  T r;
  std::memcpy(&r, &out, sizeof(T));
  return r;
}
// The source lane of each shuffle within its segment of `width` lanes, as the PTX shfl defines
// it: a source outside the segment reads the lane's own value.
inline int segment_src(int lane, int width, int src) {
  const int base = lane & ~(width - 1);
  return (src < base || src >= base + width) ? lane : src;
}
}  // namespace onepass_emu

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = onepass_emu::lane_id();
  const int s = (lane & ~(width - 1)) + (src & (width - 1));
  return onepass_emu::shfl_to(mask, v, s, "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = onepass_emu::lane_id();
  return onepass_emu::shfl_to(mask, v, onepass_emu::segment_src(lane, width, lane ^ lane_mask),
                              "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = onepass_emu::lane_id();
  return onepass_emu::shfl_to(mask, v, onepass_emu::segment_src(lane, width, lane + int(delta)),
                              "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = onepass_emu::lane_id();
  return onepass_emu::shfl_to(mask, v, onepass_emu::segment_src(lane, width, lane - int(delta)),
                              "__shfl_up_sync");
}

// The _rn intrinsics: one IEEE operation each (round to nearest even; -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return __builtin_sqrtf(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return __builtin_sqrt(a); }
inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }
inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
