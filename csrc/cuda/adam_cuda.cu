// The CUDA backend: every tensor of a batch in one launch, 16-byte vector access, bit-exact.
//
// A device table describes the tensors (addresses, sizes, step counts); block b finds its tensor
// by binary search over the tensors' first blocks, so there is no cap on the number of tensors
// (torch's multi_tensor_apply takes 36 tensors / 320 blocks per launch). Each thread handles VEC
// elements with one 16-byte load per array when every pointer of the tensor is 16-byte aligned
// (4 fp32, 8 bf16/fp16, 2 fp64 params; the fp32 moments of 16-bit params take two loads), and
// element by element otherwise and in the tail. Indices are 64-bit.
//
// The element math and the per-step scalars are csrc/adam_math.h, the same code the CPU kernel
// runs; its device path uses the __f*_rn / __d*_rn intrinsics, which nvcc never contracts into
// FMAs, so the bits equal the reference's. Scalars are computed in the kernel from the step count
// and the learning rate (a float, or a Tensor read on the device), by make_step_scalars.
//
// Step counts: host counts (CPU step tensors) are incremented on the host and passed in the table;
// with capturable=True the step tensors live on the device, the kernel reads them and a second,
// tiny kernel increments them afterwards (unless found_inf is set), so a CUDA graph replays it.
//
// Low precision (onepass::adam_step_lowp_; reference.py "Storage"): bf16 moments (stochastic
// rounding) and stochastic / Kahan bf16 params run in lowp_kernel, element-wise like adam_kernel;
// int8 moments in int8_kernel, one warp per quantization block (256 elements of a dim-0 row,
// 8 a lane): dequantize, update (param written in the same pass), the block's new absmax as a
// warp max of abs_bits, block_scale, quantize. Random bits are random_bits(stream_key(seed,
// step, stream), element index) with the element's index in the walk (storage order of a dense
// param, row-major for int8 and for working copies), the keys computed in the kernel from the
// step count (host or device) so CUDA graphs replay them too. The int8 code search is
// float_map_code_* (integer ops) when qtables hold quant's "float3" maps, else code_search over
// the midpoints copied to shared memory; decoding likewise. Both are adam_math.h, as on the CPU.
#include "../adam_math.h"
#include "../onepass_ops.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace onepass {
namespace {

constexpr int kThreads = 256;

struct Desc {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* v_max;
  const float* step_dev;  // capturable: the step tensor (float32, device), else nullptr
  int64_t step_host;      // non-capturable: the count after the increment
  int64_t n;
  int64_t block_start;
  int32_t aligned;  // every pointer 16-byte aligned: vector path
  int32_t pad;
};

struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  const float* lr_dev;        // Tensor lr (float32 on the device), else nullptr
  const double* lr_dev64;     // Tensor lr (float64 on the device), else nullptr
  const float* grad_scale;    // device, or nullptr
  const float* found_inf;     // device, or nullptr
  bool decoupled;
  uint32_t seed;              // low precision: the key of the random streams
};

template <typename P> struct Vec;  // elements per 16 bytes of param
template <> struct Vec<float> { static constexpr int n = 4; };
template <> struct Vec<double> { static constexpr int n = 2; };
template <> struct Vec<Bf16> { static constexpr int n = 8; };
template <> struct Vec<Fp16> { static constexpr int n = 8; };

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T x[N];
};

// Binary search: the last tensor whose first block is <= block b.
template <typename D>
__device__ __forceinline__ int find_tensor(const D* __restrict__ descs, int n_tensors, int64_t b) {
  int lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (descs[mid].block_start <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The tensor's step count after the increment (host, or read on the device) and its scalars.
template <typename T, typename D>
__device__ __forceinline__ StepScalars<T> device_scalars(const D& d, const Hyper& h, int64_t& step) {
  step = d.step_dev != nullptr ? static_cast<int64_t>(*d.step_dev) + 1 : d.step_host;
  const double lr = h.lr_dev != nullptr ? static_cast<double>(*h.lr_dev)
                    : h.lr_dev64 != nullptr ? *h.lr_dev64 : h.lr;
  const double gs = h.grad_scale != nullptr ? static_cast<double>(*h.grad_scale) : 1.0;
  return make_step_scalars<T>(step, lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled, gs);
}

template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>
__global__ void __launch_bounds__(kThreads)
adam_kernel(const Desc* __restrict__ descs, int n_tensors, Hyper h) {
  using T = typename Storage<P>::math_t;
  constexpr int VEC = Vec<P>::n;
  if (h.found_inf != nullptr && *h.found_inf != 0.0f) return;

  const int64_t b = blockIdx.x;
  const Desc d = descs[find_tensor(descs, n_tensors, b)];
  int64_t step;
  const StepScalars<T> s = device_scalars<T>(d, h, step);

  P* __restrict__ p = static_cast<P*>(d.p);
  const P* __restrict__ g = static_cast<const P*>(d.g);
  T* __restrict__ m = static_cast<T*>(d.m);
  T* __restrict__ v = static_cast<T*>(d.v);
  T* __restrict__ vm = static_cast<T*>(d.v_max);
  const int64_t chunk = static_cast<int64_t>(kThreads) * VEC;
  const int64_t base = (b - d.block_start) * chunk + static_cast<int64_t>(threadIdx.x) * VEC;

  if (d.aligned && base + VEC <= d.n) {
    Pack<P, VEC> pp = *reinterpret_cast<const Pack<P, VEC>*>(p + base);
    const Pack<P, VEC> gg = *reinterpret_cast<const Pack<P, VEC>*>(g + base);
    Pack<T, VEC> mm, vv, vmm;
#pragma unroll
    for (int k = 0; k < VEC; k += 16 / static_cast<int>(sizeof(T))) {
      constexpr int W = 16 / sizeof(T);
      *reinterpret_cast<Pack<T, W>*>(&mm.x[k]) = *reinterpret_cast<const Pack<T, W>*>(m + base + k);
      *reinterpret_cast<Pack<T, W>*>(&vv.x[k]) = *reinterpret_cast<const Pack<T, W>*>(v + base + k);
      if (AMS) *reinterpret_cast<Pack<T, W>*>(&vmm.x[k]) = *reinterpret_cast<const Pack<T, W>*>(vm + base + k);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      T pk = Storage<P>::load(&pp.x[k]);
      T vmk = AMS ? vmm.x[k] : T(0);
      adam_element<T, AMS, MAX, COUPLED, SCALED>(pk, Storage<P>::load(&gg.x[k]), mm.x[k], vv.x[k], vmk, s);
      Storage<P>::store(&pp.x[k], pk);
      if (AMS) vmm.x[k] = vmk;
    }
    *reinterpret_cast<Pack<P, VEC>*>(p + base) = pp;
#pragma unroll
    for (int k = 0; k < VEC; k += 16 / static_cast<int>(sizeof(T))) {
      constexpr int W = 16 / sizeof(T);
      *reinterpret_cast<Pack<T, W>*>(m + base + k) = *reinterpret_cast<const Pack<T, W>*>(&mm.x[k]);
      *reinterpret_cast<Pack<T, W>*>(v + base + k) = *reinterpret_cast<const Pack<T, W>*>(&vv.x[k]);
      if (AMS) *reinterpret_cast<Pack<T, W>*>(vm + base + k) = *reinterpret_cast<const Pack<T, W>*>(&vmm.x[k]);
    }
  } else {
    for (int k = 0; k < VEC; ++k) {
      const int64_t i = base + k;
      if (i >= d.n) break;
      T pi = Storage<P>::load(p + i);
      T mi = m[i], vi = v[i];
      T vmi = AMS ? vm[i] : T(0);
      adam_element<T, AMS, MAX, COUPLED, SCALED>(pi, Storage<P>::load(g + i), mi, vi, vmi, s);
      Storage<P>::store(p + i, pi);
      m[i] = mi;
      v[i] = vi;
      if (AMS) vm[i] = vmi;
    }
  }
}

// ---- low precision: bf16 moments, stochastic / Kahan bf16 params, int8 moments ------------------
// The same element math (adam_element); only the loads and stores around it differ, as in the CPU
// kernel (csrc/cpu/adam_cpu.cpp: lowp_range, int8_blocks). SF: how the moments are stored; PR:
// how the param is written.
enum StateFmt : int { kF32 = 0, kBF16 = 1, kInt8 = 2 };
enum ParamRnd : int { kNearest = 0, kStochastic = 1, kKahan = 2 };

constexpr int kInt8Warps = kThreads / 32;       // quantization blocks per CUDA block: one a warp
constexpr int kInt8PerLane = kInt8Block / 32;   // elements of its block a lane handles

// One tensor of a low-precision launch.
struct LowpDesc {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* v_max;             // amsgrad (fp32 state only), else nullptr
  void* comp;              // Kahan compensation (bf16, the walk's layout), else nullptr
  float* absmax_m;         // int8: [rows, blocks per row], contiguous
  float* absmax_v;
  const float* step_dev;   // capturable: the step tensor (float32, device), else nullptr
  int64_t step_host;       // non-capturable: the count after the increment
  int64_t n;               // elements; int8: quantization blocks (rows * blocks_per_row)
  int64_t row_len;         // int8: elements per dim-0 row
  int64_t blocks_per_row;  // int8
  int64_t block_start;
  int32_t aligned;  // element-wise: every pointer 16-byte aligned (vector path)
  int32_t pad;
};

// 16-byte (or narrower, for short packs) vector loads and stores of a pack of N values at src,
// which is aligned to min(16, N * sizeof(X)) bytes.
template <typename X, int N>
__device__ __forceinline__ void load_pack(Pack<X, N>& dst, const X* src) {
  constexpr int W = sizeof(X) * N > 16 ? static_cast<int>(16 / sizeof(X)) : N;
#pragma unroll
  for (int k = 0; k < N; k += W)
    *reinterpret_cast<Pack<X, W>*>(&dst.x[k]) = *reinterpret_cast<const Pack<X, W>*>(src + k);
}

template <typename X, int N>
__device__ __forceinline__ void store_pack(X* dst, const Pack<X, N>& src) {
  constexpr int W = sizeof(X) * N > 16 ? static_cast<int>(16 / sizeof(X)) : N;
#pragma unroll
  for (int k = 0; k < N; k += W)
    *reinterpret_cast<Pack<X, W>*>(dst + k) = *reinterpret_cast<const Pack<X, W>*>(&src.x[k]);
}

// Element i's param value: the stored param, plus its compensation under Kahan (one add).
template <typename P, int PR>
__device__ __forceinline__ float load_param(const P* p, const Bf16* comp, int64_t i) {
  float pv = Storage<P>::load(p + i);
  if constexpr (PR == kKahan) pv = op_add(pv, bf16_to_float(comp[i].x));
  return pv;
}

// Writes element i's new param value pv (and its Kahan compensation); idx is its index in the
// walk (the random stream's counter).
template <typename P, int PR>
__device__ __forceinline__ void store_param(P* p, Bf16* comp, int64_t i, float pv, uint32_t key,
                                            uint64_t idx) {
  if constexpr (PR == kStochastic) {
    p[i].x = float_to_bf16_stochastic(pv, random_bits(key, idx));
  } else if constexpr (PR == kKahan) {
    const uint16_t stored = float_to_bf16(pv);
    p[i].x = stored;
    comp[i].x = float_to_bf16(op_sub(pv, bf16_to_float(stored)));
  } else {
    Storage<P>::store(p + i, pv);
  }
}

// One element of the element-wise formats (fp32 or bf16 moments): element i of the arrays given
// (global memory, or a thread's registers on the vector path), idx its index in the walk.
template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR, typename M>
__device__ __forceinline__ void lowp_element(P* p, const P* g, M* m, M* v, float* vm, Bf16* comp,
                                             int64_t i, uint64_t idx, const StepScalars<float>& s,
                                             uint32_t key_p, uint32_t key_m, uint32_t key_v) {
  float pi = load_param<P, PR>(p, comp, i);
  float mi = Storage<M>::load(m + i);
  float vi = Storage<M>::load(v + i);
  float vmi = 0.0f;
  if constexpr (AMS) vmi = vm[i];
  adam_element<float, AMS, MAX, COUPLED, SCALED>(pi, Storage<P>::load(g + i), mi, vi, vmi, s);
  store_param<P, PR>(p, comp, i, pi, key_p, idx);
  if constexpr (SF == kBF16) {
    m[i].x = float_to_bf16_stochastic(mi, random_bits(key_m, idx));
    v[i].x = float_to_bf16_stochastic(vi, random_bits(key_v, idx));
  } else {
    m[i] = mi;
    v[i] = vi;
  }
  if constexpr (AMS) vm[i] = vmi;
}

// fp32 or bf16 moments: VEC elements a thread, as adam_kernel.
template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR>
__global__ void __launch_bounds__(kThreads)
lowp_kernel(const LowpDesc* __restrict__ descs, int n_tensors, Hyper h) {
  using M = std::conditional_t<SF == kBF16, Bf16, float>;
  constexpr int VEC = Vec<P>::n;
  if (h.found_inf != nullptr && *h.found_inf != 0.0f) return;

  const int64_t b = blockIdx.x;
  const LowpDesc d = descs[find_tensor(descs, n_tensors, b)];
  int64_t step;
  const StepScalars<float> s = device_scalars<float>(d, h, step);
  const uint32_t key_p = stream_key(h.seed, step, kStreamParam);
  const uint32_t key_m = stream_key(h.seed, step, kStreamM);
  const uint32_t key_v = stream_key(h.seed, step, kStreamV);

  P* __restrict__ p = static_cast<P*>(d.p);
  const P* __restrict__ g = static_cast<const P*>(d.g);
  M* __restrict__ m = static_cast<M*>(d.m);
  M* __restrict__ v = static_cast<M*>(d.v);
  float* __restrict__ vm = static_cast<float*>(d.v_max);
  Bf16* __restrict__ comp = static_cast<Bf16*>(d.comp);
  const int64_t chunk = static_cast<int64_t>(kThreads) * VEC;
  const int64_t base = (b - d.block_start) * chunk + static_cast<int64_t>(threadIdx.x) * VEC;

  if (d.aligned && base + VEC <= d.n) {
    Pack<P, VEC> pp, gg;
    Pack<M, VEC> mm, vv;
    Pack<float, VEC> vmm;
    Pack<Bf16, VEC> cc;
    load_pack(pp, p + base);
    load_pack(gg, g + base);
    load_pack(mm, m + base);
    load_pack(vv, v + base);
    if constexpr (AMS) load_pack(vmm, vm + base);
    if constexpr (PR == kKahan) load_pack(cc, comp + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      lowp_element<P, AMS, MAX, COUPLED, SCALED, SF, PR>(
          pp.x, gg.x, mm.x, vv.x, vmm.x, cc.x, k, static_cast<uint64_t>(base + k), s, key_p, key_m,
          key_v);
    store_pack(p + base, pp);
    store_pack(m + base, mm);
    store_pack(v + base, vv);
    if constexpr (AMS) store_pack(vm + base, vmm);
    if constexpr (PR == kKahan) store_pack(comp + base, cc);
  } else {
    for (int k = 0; k < VEC; ++k) {
      const int64_t i = base + k;
      if (i >= d.n) break;
      lowp_element<P, AMS, MAX, COUPLED, SCALED, SF, PR>(p, g, m, v, vm, comp, i,
                                                         static_cast<uint64_t>(i), s, key_p, key_m,
                                                         key_v);
    }
  }
}

__device__ __forceinline__ uint32_t max_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }

// int8 moments: warp w of CUDA block b updates quantization block (b - block_start) * kInt8Warps
// + w of its tensor; lane l its elements l, l + 32, ... (coalesced). FMAP: the maps are quant's
// "float3" maps, decoded and searched with integer operations; otherwise code tables and a search
// of the midpoints, from shared memory.
template <typename P, bool MAX, bool COUPLED, bool SCALED, int PR, bool FMAP>
__global__ void __launch_bounds__(kThreads)
int8_kernel(const LowpDesc* __restrict__ descs, int n_tensors, Hyper h,
            const float* __restrict__ tables) {
  __shared__ float tab[FMAP ? 1 : kTablesLen];
  if (h.found_inf != nullptr && *h.found_inf != 0.0f) return;
  if constexpr (!FMAP) {
    for (int i = threadIdx.x; i < kTablesLen; i += kThreads) tab[i] = tables[i];
    __syncthreads();
  }

  const int64_t b = blockIdx.x;
  const LowpDesc d = descs[find_tensor(descs, n_tensors, b)];
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t k = (b - d.block_start) * kInt8Warps + warp;  // this warp's quantization block
  if (k >= d.n) return;  // whole warps: no block-wide synchronization follows
  const int64_t row = k / d.blocks_per_row;
  const int64_t col = (k - row * d.blocks_per_row) * kInt8Block;
  const int64_t start = row * d.row_len + col;
  const int len = static_cast<int>(d.row_len - col < kInt8Block ? d.row_len - col : kInt8Block);

  int64_t step;
  const StepScalars<float> s = device_scalars<float>(d, h, step);
  const uint32_t key_p = stream_key(h.seed, step, kStreamParam);
  P* __restrict__ p = static_cast<P*>(d.p) + start;
  const P* __restrict__ g = static_cast<const P*>(d.g) + start;
  uint8_t* __restrict__ qm = static_cast<uint8_t*>(d.m) + start;
  uint8_t* __restrict__ qv = static_cast<uint8_t*>(d.v) + start;
  Bf16* __restrict__ comp = PR == kKahan ? static_cast<Bf16*>(d.comp) + start : nullptr;
  const float am = d.absmax_m[k];
  const float av = d.absmax_v[k];

  float mb[kInt8PerLane], vb[kInt8PerLane];
  uint32_t bm = 0, bv = 0;
#pragma unroll
  for (int e = 0; e < kInt8PerLane; ++e) {
    const int j = lane + 32 * e;
    mb[e] = 0.0f;
    vb[e] = 0.0f;
    if (j < len) {
      float pj = load_param<P, PR>(p, comp, j);
      float mj, vj;
      if constexpr (FMAP) {
        mj = op_mul(float_map_value_m(qm[j]), am);
        vj = op_mul(float_map_value_v(qv[j]), av);
      } else {
        mj = dequantize_code(qm[j], am, tab + kCodeM);
        vj = dequantize_code(qv[j], av, tab + kCodeV);
      }
      float unused = 0.0f;
      adam_element<float, false, MAX, COUPLED, SCALED>(pj, Storage<P>::load(g + j), mj, vj, unused, s);
      store_param<P, PR>(p, comp, j, pj, key_p, static_cast<uint64_t>(start + j));
      mb[e] = mj;
      vb[e] = vj;
      bm = max_u32(bm, abs_bits(mj));
      bv = max_u32(bv, abs_bits(vj));
    }
  }
  // The block's absmax: an unsigned max of |x|'s bit patterns (NaN wins), over the warp.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    bm = max_u32(bm, __shfl_xor_sync(0xffffffffu, bm, off));
    bv = max_u32(bv, __shfl_xor_sync(0xffffffffu, bv, off));
  }
  const float nam = bits_float(bm);
  const float nav = bits_float(bv);
  const float im = block_scale(nam);
  const float iv = block_scale(nav);
#pragma unroll
  for (int e = 0; e < kInt8PerLane; ++e) {
    const int j = lane + 32 * e;
    if (j < len) {
      if constexpr (FMAP) {
        qm[j] = static_cast<uint8_t>(float_map_code_m(op_mul(mb[e], im)));
        qv[j] = static_cast<uint8_t>(float_map_code_v(op_mul(vb[e], iv)));
      } else {
        qm[j] = static_cast<uint8_t>(quantize_code(mb[e], im, tab + kMidM));
        qv[j] = static_cast<uint8_t>(quantize_code(vb[e], iv, tab + kMidV));
      }
    }
  }
  if (lane == 0) {
    d.absmax_m[k] = nam;
    d.absmax_v[k] = nav;
  }
}

// Capturable: step += 1 on the device after the update, unless found_inf.
__global__ void bump_device_steps(float* const* steps, int n, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && (found_inf == nullptr || *found_inf == 0.0f)) *steps[i] += 1.0f;
}

using Launcher = void (*)(const Desc*, int, const Hyper&, int64_t, cudaStream_t);

template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>
void launch(const Desc* descs, int n, const Hyper& h, int64_t blocks, cudaStream_t stream) {
  adam_kernel<P, AMS, MAX, COUPLED, SCALED><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(descs, n, h);
}

template <typename P, bool... B>
Launcher pick(const bool* f) {
  if constexpr (sizeof...(B) == 4) {
    return &launch<P, B...>;
  } else {
    return f[0] ? pick<P, B..., true>(f + 1) : pick<P, B..., false>(f + 1);
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Copies a host table to the device with the stream. While a CUDA graph is being captured, the
// copy becomes a graph node that reads the pinned buffer at every replay, so the buffers (a few
// hundred bytes per tensor) are kept alive for good instead of returning to the caching
// allocators.
at::Tensor upload(const void* data, int64_t bytes, const c10::Device& dev) {
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), data, static_cast<size_t>(bytes));
  at::Tensor table = host.to(dev, /*non_blocking=*/true);
  if (at::cuda::currentStreamCaptureStatusMayInitCtx() != at::cuda::CaptureStatus::None) {
    static std::vector<at::Tensor> captured;
    captured.push_back(host);
    captured.push_back(table);
  }
  return table;
}

// ---- low precision: picking the kernel ----------------------------------------------------------
using LowpLauncher = void (*)(const LowpDesc*, int, const Hyper&, const float*, int64_t,
                              cudaStream_t);

template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR>
void launch_lowp(const LowpDesc* descs, int n, const Hyper& h, const float*, int64_t blocks,
                 cudaStream_t stream) {
  lowp_kernel<P, AMS, MAX, COUPLED, SCALED, SF, PR>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(descs, n, h);
}

template <typename P, bool MAX, bool COUPLED, bool SCALED, int PR, bool FMAP>
void launch_int8(const LowpDesc* descs, int n, const Hyper& h, const float* tables, int64_t blocks,
                 cudaStream_t stream) {
  int8_kernel<P, MAX, COUPLED, SCALED, PR, FMAP>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(descs, n, h, tables);
}

template <typename P, int SF, int PR, bool FMAP>
struct LowpKernel {
  template <bool AMS, bool MAX, bool COUPLED, bool SCALED>
  static LowpLauncher get() {
    if constexpr (AMS && SF != kF32) {
      return nullptr;  // amsgrad only with fp32 state (validate_batch)
    } else if constexpr (SF == kInt8) {
      return &launch_int8<P, MAX, COUPLED, SCALED, PR, FMAP>;
    } else {
      return &launch_lowp<P, AMS, MAX, COUPLED, SCALED, SF, PR>;
    }
  }
};

// Turns the four runtime flags (amsgrad, maximize, coupled, scaled) into template arguments.
template <typename K, bool... B>
LowpLauncher pick_kernel(const bool* f) {
  if constexpr (sizeof...(B) == 4) {
    return K::template get<B...>();
  } else {
    return f[0] ? pick_kernel<K, B..., true>(f + 1) : pick_kernel<K, B..., false>(f + 1);
  }
}

template <typename P, int PR>
LowpLauncher pick_state(int sf, bool fmap, const bool* f) {
  if (sf == kInt8)
    return fmap ? pick_kernel<LowpKernel<P, kInt8, PR, true>>(f)
                : pick_kernel<LowpKernel<P, kInt8, PR, false>>(f);
  if (sf == kBF16) return pick_kernel<LowpKernel<P, kBF16, PR, false>>(f);
  if constexpr (PR != kNearest) return pick_kernel<LowpKernel<P, kF32, PR, false>>(f);
  return nullptr;  // fp32 state, nearest rounding: adam_kernel
}

// The kernel for a low-precision batch: param dtype x state format x param rounding x flags
// (stochastic and Kahan rounding exist for bf16 params only: validate_batch).
LowpLauncher pick_lowp(at::ScalarType dtype, int sf, int pr, bool fmap, const bool* f) {
  if (dtype == at::kBFloat16) {
    if (pr == kStochastic) return pick_state<Bf16, kStochastic>(sf, fmap, f);
    if (pr == kKahan) return pick_state<Bf16, kKahan>(sf, fmap, f);
    return pick_state<Bf16, kNearest>(sf, fmap, f);
  }
  if (dtype == at::kHalf) return pick_state<Fp16, kNearest>(sf, fmap, f);
  return pick_state<float, kNearest>(sf, fmap, f);
}

// is_float_map of device tables without a sync every step: the answer is remembered per tensor
// (held, so its address cannot be reused by another) and version counter (bumped by any in-place
// write). The first look at a tensor copies it to the host (one sync); during CUDA graph capture,
// where that copy is not allowed, an unseen tensor takes the table search, right for every map.
bool tables_are_float_maps(const at::Tensor& q) {
  struct Seen {
    at::Tensor t;
    int64_t version;
    bool fmap;
  };
  static std::mutex mu;
  static auto* seen = new std::vector<Seen>();  // never destroyed: no CUDA frees at exit
  const int64_t version = q.is_inference() ? -1 : q._version();
  const std::lock_guard<std::mutex> lock(mu);
  for (const Seen& e : *seen)
    if (e.t.is_same(q) && e.version == version) return e.fmap;
  if (at::cuda::currentStreamCaptureStatusMayInitCtx() != at::cuda::CaptureStatus::None) return false;
  const at::Tensor host = q.to(at::kCPU);
  const bool fmap = is_float_map(host.data_ptr<float>());
  for (auto it = seen->begin(); it != seen->end();)
    it = it->t.is_same(q) ? seen->erase(it) : it + 1;
  if (seen->size() >= 8) seen->erase(seen->begin());
  seen->push_back(Seen{q, version, fmap});
  return fmap;
}

// ---- host side, shared by both ops ---------------------------------------------------------------
// The launch-wide arguments of a batch, and the device copies they point into.
struct Launch {
  Hyper h{};
  bool capturable = false;
  at::Tensor lr_keep, gs_keep, fi_keep;
};

// Fills L from the batch; false when the step is skipped (host step counts and found_inf set).
bool prepare(const BatchArgs& a, const c10::Device& dev, Launch& L) {
  L.capturable = a.steps[0].device().is_cuda();
  Hyper& h = L.h;
  h.lr = a.lr;
  h.beta1 = a.beta1;
  h.beta2 = a.beta2;
  h.eps = a.eps;
  h.weight_decay = a.weight_decay;
  h.decoupled = a.decoupled;
  h.seed = static_cast<uint32_t>(a.seed);
  if (a.lr_tensor.has_value()) {
    const at::Tensor& lr_tensor = *a.lr_tensor;
    if (lr_tensor.is_cuda()) {
      ONEPASS_CHECK(lr_tensor.device() == dev, "onepass: a device lr must be on the params' device");
      if (lr_tensor.scalar_type() == at::kDouble) {
        h.lr_dev64 = lr_tensor.data_ptr<double>();
      } else {
        L.lr_keep = lr_tensor.to(at::kFloat);  // exact for float32/bf16/fp16 values
        h.lr_dev = L.lr_keep.data_ptr<float>();
      }
    } else {
      h.lr = lr_tensor.item<double>();
    }
  }
  if (a.grad_scale.has_value()) {
    L.gs_keep = a.grad_scale->to(dev, at::kFloat);
    h.grad_scale = L.gs_keep.data_ptr<float>();
  }
  if (a.found_inf.has_value()) {
    if (!L.capturable) {
      // Host step counts: whether to count this step must be known on the host (one sync).
      if (a.found_inf->item<double>() != 0.0) return false;
    } else {
      L.fi_keep = a.found_inf->to(dev, at::kFloat);
      h.found_inf = L.fi_keep.data_ptr<float>();
    }
  }
  return true;
}

// A descriptor's step count: the device tensor (capturable) or the host count after the increment.
template <typename D>
void set_step(D& d, const at::Tensor& st, bool capturable) {
  if (capturable) {
    ONEPASS_CHECK(st.is_cuda() && st.scalar_type() == at::kFloat,
                  "onepass: capturable steps must be float32 tensors on the device");
    d.step_dev = st.data_ptr<float>();
  } else {
    ONEPASS_CHECK(st.is_cpu(), "onepass: mixed host and device step counts in one group");
    d.step_host = static_cast<int64_t>(st.item<double>()) + 1;
  }
}

// step += 1 for every param after the launches: on the device (capturable; skipped there when
// found_inf is set) or on the host.
void bump_steps(at::TensorList steps, const Launch& L, const c10::Device& dev, cudaStream_t stream) {
  if (L.capturable) {
    std::vector<float*> ptrs(steps.size());
    for (size_t i = 0; i < steps.size(); ++i) ptrs[i] = steps[i].data_ptr<float>();
    at::Tensor table = upload(ptrs.data(), static_cast<int64_t>(ptrs.size() * sizeof(float*)), dev);
    const int n = static_cast<int>(ptrs.size());
    bump_device_steps<<<(n + 255) / 256, 256, 0, stream>>>(
        reinterpret_cast<float* const*>(table.data_ptr()), n, L.h.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    for (size_t i = 0; i < steps.size(); ++i) {
      at::Tensor st = steps[i];
      if (st.scalar_type() == at::kFloat) *st.data_ptr<float>() += 1.0f;
      else *st.data_ptr<double>() += 1.0;
    }
  }
}

// fp32 state, nearest rounding (adam_step_): a checked, non-empty batch.
void step_fp32(const BatchArgs& a) {
  const c10::Device dev = a.params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(dev.index());
  Launch L;
  if (!prepare(a, dev, L)) return;

  // One launch per param dtype present (a group normally has one).
  const at::ScalarType dtypes[4] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  const bool flags[4] = {a.amsgrad, a.maximize, !a.decoupled, a.grad_scale.has_value()};
  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  for (const at::ScalarType dt : dtypes) {
    std::vector<Desc> descs;
    int64_t blocks = 0;
    for (size_t i = 0; i < a.params.size(); ++i) {
      if (a.params[i].scalar_type() != dt || a.params[i].numel() == 0) continue;
      const DensePair dp = dense_pair(a.params[i], a.grads[i]);
      if (dp.copy_back) write_back.emplace_back(a.params[i], dp.p);
      const at::Tensor& p = dp.p;
      const at::Tensor& g = dp.g;
      keep.push_back(p);
      keep.push_back(g);
      Desc d{};
      d.p = p.data_ptr();
      d.g = g.data_ptr();
      d.m = a.exp_avgs[i].data_ptr();
      d.v = a.exp_avg_sqs[i].data_ptr();
      d.v_max = a.amsgrad ? a.max_exp_avg_sqs[i].data_ptr() : d.m;
      set_step(d, a.steps[i], L.capturable);
      d.n = p.numel();
      d.block_start = blocks;
      d.aligned = aligned16(d.p) && aligned16(d.g) && aligned16(d.m) && aligned16(d.v) &&
                  aligned16(d.v_max);
      const int64_t chunk = static_cast<int64_t>(kThreads) *
                            (dt == at::kDouble ? 2 : (dt == at::kFloat ? 4 : 8));
      blocks += (d.n + chunk - 1) / chunk;
      descs.push_back(d);
    }
    if (descs.empty()) continue;
    ONEPASS_CHECK(blocks < (int64_t(1) << 31), "onepass: too many blocks for one launch");
    // The table goes up through a pinned buffer with the stream, so it needs no sync.
    at::Tensor table = upload(descs.data(), static_cast<int64_t>(descs.size() * sizeof(Desc)), dev);
    keep.push_back(table);
    Launcher fn = nullptr;
    switch (dt) {
      case at::kFloat: fn = pick<float>(flags); break;
      case at::kDouble: fn = pick<double>(flags); break;
      case at::kBFloat16: fn = pick<Bf16>(flags); break;
      default: fn = pick<Fp16>(flags); break;
    }
    fn(reinterpret_cast<const Desc*>(table.data_ptr()), static_cast<int>(descs.size()), L.h, blocks,
       stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (auto& pw : write_back) pw.first.copy_(pw.second);
  bump_steps(a.steps, L, dev, stream);
}

// bf16 / int8 state, stochastic / Kahan bf16 params: a checked, non-empty batch. What the CPU
// kernel's step_impl_lowp walks, this walks: dense params in storage order (working copies of
// the others), int8 params and grads as contiguous (row-major) tensors, Kahan compensations in
// their param's walk layout; working copies are written back after the launch.
void step_lowp(const BatchArgs& a) {
  const c10::Device dev = a.params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(dev.index());
  Launch L;
  if (!prepare(a, dev, L)) return;
  const int sf = a.state_format;
  const int pr = a.param_rounding;
  const bool int8 = sf == kInt8;
  const float* tables = int8 ? a.qtables->data_ptr<float>() : nullptr;
  const bool fmap = int8 && tables_are_float_maps(*a.qtables);

  // One launch per param dtype present (a group normally has one).
  const at::ScalarType dtypes[3] = {at::kFloat, at::kBFloat16, at::kHalf};
  const bool flags[4] = {a.amsgrad, a.maximize, !a.decoupled, a.grad_scale.has_value()};
  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, working copy)
  for (const at::ScalarType dt : dtypes) {
    std::vector<LowpDesc> descs;
    int64_t blocks = 0;
    for (size_t i = 0; i < a.params.size(); ++i) {
      const at::Tensor& p0 = a.params[i];
      if (p0.scalar_type() != dt || p0.numel() == 0) continue;
      at::Tensor p, g;
      if (int8) {
        // int8 blocks are rows of the row-major order: walk contiguous working copies
        p = p0.is_contiguous() ? p0 : p0.contiguous();
        if (!p0.is_contiguous()) write_back.emplace_back(p0, p);
        g = a.grads[i].is_contiguous() ? a.grads[i] : a.grads[i].contiguous();
      } else {
        const DensePair dp = dense_pair(p0, a.grads[i]);
        if (dp.copy_back) write_back.emplace_back(p0, dp.p);
        p = dp.p;
        g = dp.g;
      }
      keep.push_back(p);
      keep.push_back(g);
      LowpDesc d{};
      d.p = p.data_ptr();
      d.g = g.data_ptr();
      d.m = a.exp_avgs[i].data_ptr();
      d.v = a.exp_avg_sqs[i].data_ptr();
      d.v_max = a.amsgrad ? a.max_exp_avg_sqs[i].data_ptr() : nullptr;
      if (pr == kKahan) {
        const at::Tensor& c0 = a.kahan_comps[i];
        at::Tensor c = c0;
        if (c0.strides() != p.strides() || !c0.is_non_overlapping_and_dense()) {
          c = at::empty_like(p, c0.options());
          c.copy_(c0);
          write_back.emplace_back(c0, c);
        }
        keep.push_back(c);
        d.comp = c.data_ptr();
      }
      set_step(d, a.steps[i], L.capturable);
      d.block_start = blocks;
      if (int8) {
        const int64_t rows = p.dim() < 2 ? 1 : p.size(0);
        d.row_len = p.numel() / rows;
        d.blocks_per_row = (d.row_len + kInt8Block - 1) / kInt8Block;
        d.n = rows * d.blocks_per_row;
        d.absmax_m = a.exp_avg_absmaxs[i].data_ptr<float>();
        d.absmax_v = a.exp_avg_sq_absmaxs[i].data_ptr<float>();
        blocks += (d.n + kInt8Warps - 1) / kInt8Warps;
      } else {
        d.n = p.numel();
        d.aligned = aligned16(d.p) && aligned16(d.g) && aligned16(d.m) && aligned16(d.v) &&
                    aligned16(d.v_max) && aligned16(d.comp);
        const int64_t chunk = static_cast<int64_t>(kThreads) * (dt == at::kFloat ? 4 : 8);
        blocks += (d.n + chunk - 1) / chunk;
      }
      descs.push_back(d);
    }
    if (descs.empty()) continue;
    ONEPASS_CHECK(blocks < (int64_t(1) << 31), "onepass: too many blocks for one launch");
    const LowpLauncher fn = pick_lowp(dt, sf, pr, fmap, flags);
    ONEPASS_CHECK(fn != nullptr, "onepass: no CUDA kernel for state format ", sf,
                  ", param rounding ", pr, " and ", dt, " params");
    at::Tensor table =
        upload(descs.data(), static_cast<int64_t>(descs.size() * sizeof(LowpDesc)), dev);
    keep.push_back(table);
    fn(reinterpret_cast<const LowpDesc*>(table.data_ptr()), static_cast<int>(descs.size()), L.h,
       tables, blocks, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (auto& pw : write_back) pw.first.copy_(pw.second);
  bump_steps(a.steps, L, dev, stream);
}

}  // namespace

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                    double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                    double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf};
  validate_batch(a, c10::DeviceType::CUDA);
  if (params.empty()) return;
  step_fp32(a);
}

void adam_step_lowp_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList steps, double lr,
                         const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                         double eps, double weight_decay, bool amsgrad, bool maximize,
                         bool decoupled, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf,
                         const std::string& state_format, at::TensorList exp_avg_absmaxs,
                         at::TensorList exp_avg_sq_absmaxs,
                         const std::optional<at::Tensor>& qtables,
                         const std::string& param_rounding, at::TensorList kahan_comps,
                         int64_t seed) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf, parse_state_format(state_format),
                    parse_param_rounding(param_rounding), exp_avg_absmaxs, exp_avg_sq_absmaxs,
                    qtables.has_value() ? &*qtables : nullptr, kahan_comps, seed};
  validate_batch(a, c10::DeviceType::CUDA);
  if (params.empty()) return;
  if (a.state_format == kF32 && a.param_rounding == kNearest)
    step_fp32(a);  // what adam_step_ does
  else
    step_lowp(a);
}

// The checks of adam_step_lowp_ without the step (a multi-group step checks every batch first).
void adam_check_lowp_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                          at::TensorList steps, double lr,
                          const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                          double eps, double weight_decay, bool amsgrad, bool maximize,
                          bool decoupled, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf,
                          const std::string& state_format, at::TensorList exp_avg_absmaxs,
                          at::TensorList exp_avg_sq_absmaxs,
                          const std::optional<at::Tensor>& qtables,
                          const std::string& param_rounding, at::TensorList kahan_comps,
                          int64_t seed) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf, parse_state_format(state_format),
                    parse_param_rounding(param_rounding), exp_avg_absmaxs, exp_avg_sq_absmaxs,
                    qtables.has_value() ? &*qtables : nullptr, kahan_comps, seed};
  validate_batch(a, c10::DeviceType::CUDA);
}

TORCH_LIBRARY_IMPL(onepass, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("adam_step_lowp_", &adam_step_lowp_cuda);
  m.impl("adam_check_lowp", &adam_check_lowp_cuda);
}

}  // namespace onepass
