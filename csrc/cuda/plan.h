// The CUDA backend's launch description and its planner: which tensor, and which elements of it,
// each block and thread of a launch updates. Plain C++ with no CUDA runtime call and no ATen, so
// the real launch (adam_cuda.cu), the emulated one (csrc/emu/) and the planner's unit test
// (tests/cuda/plan_test.cpp) share it; the device-side lookups are __host__ __device__.
//
// Element-wise formats (fp32 / bf16 moments): a block of kThreads threads covers kThreads * VEC
// consecutive elements of one tensor, VEC = 16 bytes of param (4 fp32, 2 fp64, 8 bf16 / fp16), so
// a thread reads its param with one 16-byte load when every pointer of the tensor is 16-byte
// aligned (Desc::aligned) and the VEC elements lie inside the tensor; element by element
// otherwise. int8 moments: a warp updates one quantization block (kInt8Block elements of a dim-0
// row), a CUDA block kInt8Warps of them.
#pragma once

#include "../adam_math.h"

#include <cstdint>
#include <vector>

#ifndef ONEPASS_PLANTED_BUG
#define ONEPASS_PLANTED_BUG 0  // tests/emu: 1-4 build the emulated kernels with one planted bug
#endif

namespace onepass {

constexpr int kThreads = 256;
constexpr int kInt8Warps = kThreads / 32;      // quantization blocks per CUDA block: one a warp
constexpr int kInt8PerLane = kInt8Block / 32;  // elements of its block a lane handles

// One tensor of an fp32-state launch.
// What can change between steps (the grad, which scalars) is its StepEntry, so that a planned
// group uploads its Desc table once (host_step.h, PlannedLaunches).
struct Desc {
  void* p;
  void* m;
  void* v;
  void* v_max;
  int64_t n;
  int64_t block_start;
  int32_t aligned;  // p, m, v (and v_max) 16-byte aligned: the vector path, if the grad is too
  int32_t pad;
};

// One tensor of a low-precision launch.
struct LowpDesc {
  void* p;
  void* m;
  void* v;
  void* v_max;             // amsgrad (fp32 state only), else nullptr
  void* comp;              // Kahan compensation (bf16, the walk's layout), else nullptr
  float* absmax_m;         // int8: [rows, blocks per row], contiguous
  float* absmax_v;
  int64_t n;               // elements; int8: quantization blocks (rows * blocks_per_row)
  int64_t row_len;         // int8: elements per dim-0 row
  int64_t blocks_per_row;  // int8
  int64_t block_start;
  int32_t aligned;  // element-wise: every pointer but the grad 16-byte aligned (vector path)
  int32_t pad;
};

// The part of tensor d of a launch that may change every step, in a table of its own indexed
// like the descs: 16 bytes a tensor to upload per step instead of the 72-104 of its descriptor.
// A grad is often a new tensor each step (zero_grad(set_to_none=True)), and which step count a
// tensor has (so which TensorScalars) may change when some params miss a step.
struct StepEntry {
  const void* g;      // this step's grad, in its param's walk layout
  int32_t scalars;    // its TensorScalars in the step's table
  int32_t g_aligned;  // g is 16-byte aligned (tested on the host: a test of the pointer's bits in
                      // the kernel made nvcc give up proving any pointer global, LD not LDG)
};

// The per-step scalars of one tensor (make_step_scalars of its step count, in its math type)
// and the keys of its random streams. Computed once per step for the whole batch -- on the host
// when every input is there, else by step_scalars_kernel -- so the update kernels issue their
// loads without waiting on the float64 work (pow_int, a division, a square root) and run no
// float64 instruction for float params.
struct TensorScalars {
  union {
    StepScalars<float> f;
    StepScalars<double> d;
  };
  uint32_t key_p, key_moments, pad[2];
};

template <typename T> ONEPASS_HD const StepScalars<T>& scalars_of(const TensorScalars& t);
template <> ONEPASS_HD const StepScalars<float>& scalars_of<float>(const TensorScalars& t) { return t.f; }
template <> ONEPASS_HD const StepScalars<double>& scalars_of<double>(const TensorScalars& t) { return t.d; }

// Where one tensor's step count lives, for step_scalars_kernel: the device tensor (capturable)
// or the host count after the increment.
struct StepSlot {
  float* step_dev;
  int64_t step_host;
  int32_t f64;  // float64 math (float64 params)
  int32_t pad;
};

// The launch-wide arguments (of step_scalars_kernel, and the host's twin of it).
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  const float* lr_dev;       // Tensor lr (float32 on the device), else nullptr
  const double* lr_dev64;    // Tensor lr (float64 on the device), else nullptr
  const double* grad_scale;  // device, float64 (exact for any grad_scale dtype), or nullptr
  const double* found_inf;   // device, float64 (non-zero, however small, skips), or nullptr
  bool decoupled;
  uint32_t seed;             // low precision: the key of the random streams
};

// One tensor's TensorScalars for its step count (after the increment), the learning rate and
// the grad scale: the same function on the host and in step_scalars_kernel.
ONEPASS_HD TensorScalars tensor_scalars(int64_t step, double lr, double grad_scale, const Hyper& h,
                                        bool f64) {
  TensorScalars t;
  if (f64)
    t.d = make_step_scalars<double>(step, lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled,
                                    grad_scale);
  else
    t.f = make_step_scalars<float>(step, lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled,
                                   grad_scale);
  t.key_p = stream_key(h.seed, step, kStreamParam);
  t.key_moments = stream_key(h.seed, step, kStreamMoments);
  t.pad[0] = t.pad[1] = 0;
  return t;
}

// Elements a thread updates: 16 bytes of param.
constexpr int vec_elems(int param_bytes) { return 16 / param_bytes; }

// The tensor of block b: the last one whose first block is <= b (binary search; descs sorted by
// block_start, every tensor owning at least one block).
template <typename D>
ONEPASS_HD int locate_tensor(const D* descs, int n_tensors, int64_t b) {
  int lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
#if ONEPASS_PLANTED_BUG == 1
    if (descs[mid].block_start < b) lo = mid; else hi = mid - 1;  // planted: off by one
#else
    if (descs[mid].block_start <= b) lo = mid; else hi = mid - 1;
#endif
  }
  return lo;
}

// The tensor of block b in O(1): map[b] where the launch has a block map (block_map below), else
// the binary search (a launch that is not planned, or one being captured into a CUDA graph).
template <typename D>
ONEPASS_HD int tensor_of_block(const D* descs, int n_tensors, const int32_t* map, int64_t b) {
  return map != nullptr ? map[b] : locate_tensor(descs, n_tensors, b);
}

// Every block's tensor, as locate_tensor finds it (so the map and the search cannot disagree).
// It depends on the tensors' sizes only, so a planned group makes it once and keeps it on the
// device (host_step.h, BlockMaps): 4 bytes a block, 0.5 MB for gpt2's fp32 launch, against a
// search of eight dependent loads from an 80-byte-a-tensor table at the start of every block.
template <typename D>
std::vector<int32_t> block_map(const std::vector<D>& descs, int64_t blocks) {
  std::vector<int32_t> out(static_cast<size_t>(blocks));
  const int n = static_cast<int>(descs.size());
  for (int64_t b = 0; b < blocks; ++b) out[static_cast<size_t>(b)] = locate_tensor(descs.data(), n, b);
  return out;
}

// Element-wise formats: the first element of thread t of block b, whose tensor is d.
template <typename D>
ONEPASS_HD int64_t thread_first_element(const D& d, int64_t b, int t, int vec) {
  return (b - d.block_start) * (static_cast<int64_t>(kThreads) * vec) + static_cast<int64_t>(t) * vec;
}

// Whether thread t's elements [base, base + vec) take the 16-byte vector path.
template <typename D>
ONEPASS_HD bool vector_path(const D& d, const StepEntry& e, int64_t base, int vec) {
  return d.aligned && e.g_aligned && base + vec <= d.n;
}

// int8: the quantization block warp w of block b updates (>= d.n: none), and where it lies.
ONEPASS_HD int64_t int8_block_of(const LowpDesc& d, int64_t b, int w) {
  return (b - d.block_start) * kInt8Warps + w;
}
struct Int8Span {
  int64_t start;  // its first element (row-major)
  int len;        // its elements: kInt8Block, or fewer at the end of a row
};
ONEPASS_HD Int8Span int8_span(const LowpDesc& d, int64_t k) {
  const int64_t row = k / d.blocks_per_row;
  const int64_t col = (k - row * d.blocks_per_row) * kInt8Block;
  const int64_t rest = d.row_len - col;
  return Int8Span{row * d.row_len + col, static_cast<int>(rest < kInt8Block ? rest : kInt8Block)};
}

// ---- the planner (host) -----------------------------------------------------------------------
// What the planner needs of one tensor of a batch: addresses (v_max / comp / absmaxes null when
// absent) and sizes. The walk layout (dense storage order, or row-major for int8) is the glue's
// choice; the planner only counts.
struct TensorMeta {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* v_max;
  void* comp;
  float* absmax_m;
  float* absmax_v;
  int64_t numel;
  int64_t rows;  // int8: dim-0 rows (1 for a tensor of fewer than 2 dims)
  int32_t slot;  // its TensorScalars in the step's table
};

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Tensor d's entry for a step: its grad and which scalars it takes.
inline StepEntry step_entry(const void* g, int32_t scalars) {
  return StepEntry{g, scalars, aligned16(g) ? 1 : 0};
}

template <typename D>
struct Plan {
  std::vector<D> descs;
  std::vector<StepEntry> entries;  // one a desc (TensorMeta's g and slot)
  int64_t blocks = 0;              // the launch's grid
};

// fp32 state: every non-empty tensor gets ceil(n / (kThreads * vec)) blocks, in order.
inline Plan<Desc> plan_fp32(const std::vector<TensorMeta>& ts, int param_bytes) {
  Plan<Desc> out;
  const int64_t chunk = static_cast<int64_t>(kThreads) * vec_elems(param_bytes);
  for (const TensorMeta& t : ts) {
    if (t.numel == 0) continue;
    Desc d{};
    d.p = t.p;
    d.m = t.m;
    d.v = t.v;
    d.v_max = t.v_max != nullptr ? t.v_max : t.m;  // never read without amsgrad; aligned as m
    d.n = t.numel;
    d.block_start = out.blocks;
    d.aligned = aligned16(d.p) && aligned16(d.m) && aligned16(d.v) && aligned16(d.v_max);
    out.blocks += (d.n + chunk - 1) / chunk;
    out.descs.push_back(d);
    out.entries.push_back(step_entry(t.g, t.slot));
  }
  return out;
}

// Low-precision state: element-wise like plan_fp32, or (int8) one warp per quantization block.
inline Plan<LowpDesc> plan_lowp(const std::vector<TensorMeta>& ts, int param_bytes, bool int8) {
  Plan<LowpDesc> out;
  const int64_t chunk = static_cast<int64_t>(kThreads) * vec_elems(param_bytes);
  for (const TensorMeta& t : ts) {
    if (t.numel == 0) continue;
    LowpDesc d{};
    d.p = t.p;
    d.m = t.m;
    d.v = t.v;
    d.v_max = t.v_max;
    d.comp = t.comp;
    d.block_start = out.blocks;
    if (int8) {
      d.row_len = t.numel / t.rows;
      d.blocks_per_row = (d.row_len + kInt8Block - 1) / kInt8Block;
      d.n = t.rows * d.blocks_per_row;
      d.absmax_m = t.absmax_m;
      d.absmax_v = t.absmax_v;
      out.blocks += (d.n + kInt8Warps - 1) / kInt8Warps;
    } else {
      d.n = t.numel;
      d.aligned = aligned16(d.p) && aligned16(d.m) && aligned16(d.v) && aligned16(d.v_max) &&
                  aligned16(d.comp);
      out.blocks += (d.n + chunk - 1) / chunk;
    }
    out.descs.push_back(d);
    out.entries.push_back(step_entry(t.g, t.slot));
  }
  return out;
}

}  // namespace onepass
