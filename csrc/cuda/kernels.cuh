// The CUDA kernels of onepass: one source for nvcc (adam_cuda.cu) and for the CPU emulation of the
// SIMT model (csrc/emu/, where csrc/emu/simt.h is included first and supplies the CUDA names).
//
// The element math and the per-step scalars are csrc/adam_math.h, the same code the CPU kernel
// runs; its device path uses the __f*_rn / __d*_rn intrinsics, which nvcc never contracts into
// FMAs, so the bits equal the reference's. Scalars are computed in the kernel from the step count
// and the learning rate (a float, or a Tensor read on the device), by make_step_scalars.
//
// Which elements a block and a thread update is plan.h (tensor_of_block, thread_first_element,
// int8_span), shared with the host planner and its unit test. Indices are 64-bit.
//
// Low precision (reference.py "Storage"): bf16 moments (stochastic rounding) and stochastic /
// Kahan bf16 params run in lowp_kernel, element-wise like adam_kernel; int8 moments in
// int8_kernel, one warp per quantization block (256 elements of a dim-0 row, 8 a lane):
// dequantize, update (param written in the same pass), the block's new absmax as a warp max of
// abs_bits, block_scale, quantize. Random bits are random_bits(stream_key(seed, step, stream),
// element index) with the element's index in the walk (storage order of a dense param, row-major
// for int8 and for working copies), the keys computed in the kernel from the step count (host or
// device) so CUDA graphs replay them too. The int8 code search is float_map_code_* (integer ops)
// when qtables hold quant's "float3" maps, else code_search over the midpoints copied to shared
// memory; decoding likewise. Both are adam_math.h, as on the CPU.
//
// Bytes in flight (sm_90 build, registers from cuobjdump -res-usage; a block is 256 threads, an SM
// has 64K registers): HBM needs bandwidth x latency in flight, about 4.8 TB/s x ~0.7 us / 132 SMs
// = ~25 KB per SM on an H200 (~18 KB on an H100). The fp32 kernel uses 34-40 registers, so 6
// blocks (1536 threads) fit an SM, each thread with four 16-byte loads (p, g, m, v) issued before
// any math: ~96 KB per SM. bf16 params (44-56 registers, 4-5 blocks): 96 bytes a thread, ~100 KB.
// int8 (64-77 registers, 3 blocks): 8 elements a lane, 10 bytes each, all loaded first: ~60 KB.
// Each is 2.4x or more of what the bandwidth needs; measured speed waits for a GPU
// (scripts/gpu_check.sh).
#pragma once

#include "../adam_math.h"
#include "plan.h"

#include <cstring>
#include <type_traits>

#ifndef ONEPASS_EMU
// nvcc: a static __shared__ array; no alignment check (a misaligned vector access faults).
#define ONEPASS_SHARED(type, name, count) __shared__ type name[count]
#define ONEPASS_CHECK_ALIGNED(ptr, bytes, what) ((void)0)
#endif

namespace onepass {
namespace kernels {

template <typename P> struct Vec { static constexpr int n = vec_elems(sizeof(P)); };

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T x[N];
};

// 16-byte (or narrower, for short packs) vector loads and stores of a pack of N values at src,
// which is aligned to min(16, N * sizeof(X)) bytes.
template <typename X, int N>
__device__ __forceinline__ void load_pack(Pack<X, N>& dst, const X* src) {
  constexpr int W = sizeof(X) * N > 16 ? static_cast<int>(16 / sizeof(X)) : N;
  ONEPASS_CHECK_ALIGNED(src, sizeof(X) * W, "vector load");
#pragma unroll
  for (int k = 0; k < N; k += W)
    *reinterpret_cast<Pack<X, W>*>(&dst.x[k]) = *reinterpret_cast<const Pack<X, W>*>(src + k);
}

template <typename X, int N>
__device__ __forceinline__ void store_pack(X* dst, const Pack<X, N>& src) {
  constexpr int W = sizeof(X) * N > 16 ? static_cast<int>(16 / sizeof(X)) : N;
  ONEPASS_CHECK_ALIGNED(dst, sizeof(X) * W, "vector store");
#pragma unroll
  for (int k = 0; k < N; k += W)
    *reinterpret_cast<Pack<X, W>*>(dst + k) = *reinterpret_cast<const Pack<X, W>*>(&src.x[k]);
}

// Whether a GradScaler's found_inf says to skip this step: any value but +-0, tested on its bits
// (an integer test: the float-param kernels hold no float64 instruction, scripts/check_codegen.py).
__device__ __forceinline__ bool skip_step(const double* found_inf) {
  if (found_inf == nullptr) return false;
  uint64_t bits;
  memcpy(&bits, found_inf, sizeof(bits));
  return (bits << 1) != 0;
}

// Whether element i lies past the end of a tensor of n elements (the element-wise tail loops).
__device__ __forceinline__ bool past_end(int64_t i, int64_t n) {
#if ONEPASS_PLANTED_BUG == 2
  return i >= n - 1;  // planted: the last element is dropped
#else
  return i >= n;
#endif
}

// fp32 state, nearest rounding: VEC elements a thread.
template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>
__global__ void __launch_bounds__(kThreads)
adam_kernel(const Desc* __restrict__ descs, int n_tensors, const int32_t* __restrict__ block_map,
            const StepEntry* __restrict__ entries, const TensorScalars* __restrict__ sc,
            const double* found_inf) {
  using T = typename Storage<P>::math_t;
  constexpr int VEC = Vec<P>::n;
  if (skip_step(found_inf)) return;

  const int64_t b = blockIdx.x;
  const int t = tensor_of_block(descs, n_tensors, block_map, b);
  const Desc d = descs[t];
  const StepEntry e = entries[t];  // (loaded beside d: no extra round trip before the data)

  P* __restrict__ p = static_cast<P*>(d.p);
  const P* __restrict__ g = static_cast<const P*>(e.g);
  T* __restrict__ m = static_cast<T*>(d.m);
  T* __restrict__ v = static_cast<T*>(d.v);
  T* __restrict__ vm = static_cast<T*>(d.v_max);
  const int64_t base = thread_first_element(d, b, static_cast<int>(threadIdx.x), VEC);

  // The scalars are one table entry (made once per step, TensorScalars), loaded with the data.
  const StepScalars<T> s = scalars_of<T>(sc[e.scalars]);
  if (vector_path(d, e, base, VEC)) {
    Pack<P, VEC> pp, gg;
    Pack<T, VEC> mm, vv, vmm;
    load_pack(pp, p + base);
    load_pack(gg, g + base);
    load_pack(mm, m + base);
    load_pack(vv, v + base);
    if constexpr (AMS) load_pack(vmm, vm + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      T pk = Storage<P>::load(&pp.x[k]);
      T vmk = AMS ? vmm.x[k] : T(0);
      adam_element<T, AMS, MAX, COUPLED, SCALED>(pk, Storage<P>::load(&gg.x[k]), mm.x[k], vv.x[k], vmk, s);
      Storage<P>::store(&pp.x[k], pk);
      if (AMS) vmm.x[k] = vmk;
    }
    store_pack(p + base, pp);
    store_pack(m + base, mm);
    store_pack(v + base, vv);
    if constexpr (AMS) store_pack(vm + base, vmm);
  } else {
    for (int k = 0; k < VEC; ++k) {
      const int64_t i = base + k;
      if (past_end(i, d.n)) break;
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
// kernel (csrc/cpu/loops_lowp.cpp: lowp_range, int8_blocks). SF: how the moments are stored; PR:
// how the param is written.
enum StateFmt : int { kF32 = 0, kBF16 = 1, kInt8 = 2 };
enum ParamRnd : int { kNearest = 0, kStochastic = 1, kKahan = 2 };

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
                                             uint32_t key_p, uint32_t key_moments) {
  float pi = load_param<P, PR>(p, comp, i);
  float mi = Storage<M>::load(m + i);
  float vi = Storage<M>::load(v + i);
  float vmi = 0.0f;
  if constexpr (AMS) vmi = vm[i];
  adam_element<float, AMS, MAX, COUPLED, SCALED>(pi, Storage<P>::load(g + i), mi, vi, vmi, s);
  store_param<P, PR>(p, comp, i, pi, key_p, idx);
  if constexpr (SF == kBF16) {
    const uint32_t draw = random_bits(key_moments, idx);
    m[i].x = float_to_bf16_stochastic(mi, draw);
    v[i].x = float_to_bf16_stochastic(vi, v_bits(draw));
  } else {
    m[i] = mi;
    v[i] = vi;
  }
  if constexpr (AMS) vm[i] = vmi;
}

// fp32 or bf16 moments: VEC elements a thread, as adam_kernel.
template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR>
__global__ void __launch_bounds__(kThreads)
lowp_kernel(const LowpDesc* __restrict__ descs, int n_tensors,
            const int32_t* __restrict__ block_map, const StepEntry* __restrict__ entries,
            const TensorScalars* __restrict__ sc, const double* found_inf) {
  using M = std::conditional_t<SF == kBF16, Bf16, float>;
  constexpr int VEC = Vec<P>::n;
  if (skip_step(found_inf)) return;

  const int64_t b = blockIdx.x;
  const int t = tensor_of_block(descs, n_tensors, block_map, b);
  const LowpDesc d = descs[t];
  const StepEntry e = entries[t];

  P* __restrict__ p = static_cast<P*>(d.p);
  const P* __restrict__ g = static_cast<const P*>(e.g);
  M* __restrict__ m = static_cast<M*>(d.m);
  M* __restrict__ v = static_cast<M*>(d.v);
  float* __restrict__ vm = static_cast<float*>(d.v_max);
  Bf16* __restrict__ comp = static_cast<Bf16*>(d.comp);
  const int64_t base = thread_first_element(d, b, static_cast<int>(threadIdx.x), VEC);

  if (vector_path(d, e, base, VEC)) {
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
    const TensorScalars& ts = sc[e.scalars];  // after the loads are issued
    const StepScalars<float> s = ts.f;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      lowp_element<P, AMS, MAX, COUPLED, SCALED, SF, PR>(
          pp.x, gg.x, mm.x, vv.x, vmm.x, cc.x, k, static_cast<uint64_t>(base + k), s, ts.key_p,
          ts.key_moments);
    store_pack(p + base, pp);
    store_pack(m + base, mm);
    store_pack(v + base, vv);
    if constexpr (AMS) store_pack(vm + base, vmm);
    if constexpr (PR == kKahan) store_pack(comp + base, cc);
  } else {
    const TensorScalars& ts = sc[e.scalars];
    const StepScalars<float> s = ts.f;
    for (int k = 0; k < VEC; ++k) {
      const int64_t i = base + k;
      if (past_end(i, d.n)) break;
      lowp_element<P, AMS, MAX, COUPLED, SCALED, SF, PR>(p, g, m, v, vm, comp, i,
                                                         static_cast<uint64_t>(i), s, ts.key_p,
                                                         ts.key_moments);
    }
  }
}

__device__ __forceinline__ uint32_t max_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }

// int8 moments: warp w of CUDA block b updates quantization block int8_block_of(d, b, w) of its
// tensor; lane l its elements l, l + 32, ... (coalesced). A lane first loads all of its elements
// (param, grad, both codes: kInt8PerLane of each in flight), then decodes and updates them, so
// its loads do not wait behind its stores. FMAP: the maps are quant's "float3" maps, decoded and
// searched with integer operations; otherwise code tables and a search of the midpoints, from
// shared memory.
template <typename P, bool MAX, bool COUPLED, bool SCALED, int PR, bool FMAP>
__global__ void __launch_bounds__(kThreads)
int8_kernel(const LowpDesc* __restrict__ descs, int n_tensors,
            const int32_t* __restrict__ block_map, const StepEntry* __restrict__ entries,
            const TensorScalars* __restrict__ sc, const double* found_inf,
            const float* __restrict__ tables) {
  ONEPASS_SHARED(float, tab, FMAP ? 1 : kTablesLen);
  if (skip_step(found_inf)) return;
  if constexpr (!FMAP) {
    for (int i = threadIdx.x; i < kTablesLen; i += kThreads) tab[i] = tables[i];
#if ONEPASS_PLANTED_BUG != 3  // planted: the tables are read before every thread has copied its part
    __syncthreads();
#endif
  }

  const int64_t b = blockIdx.x;
  const int t = tensor_of_block(descs, n_tensors, block_map, b);
  const LowpDesc d = descs[t];
  const StepEntry e = entries[t];
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t k = int8_block_of(d, b, warp);  // this warp's quantization block
  if (k >= d.n) return;  // whole warps: no block-wide synchronization follows
  const Int8Span span = int8_span(d, k);
  const int64_t start = span.start;
  const int len = span.len;

  P* __restrict__ p = static_cast<P*>(d.p) + start;
  const P* __restrict__ g = static_cast<const P*>(e.g) + start;
  uint8_t* __restrict__ qm = static_cast<uint8_t*>(d.m) + start;
  uint8_t* __restrict__ qv = static_cast<uint8_t*>(d.v) + start;
  Bf16* __restrict__ comp = PR == kKahan ? static_cast<Bf16*>(d.comp) + start : nullptr;

  // Every load of the lane first.
  float pb[kInt8PerLane], gb[kInt8PerLane];
  uint8_t cm[kInt8PerLane], cv[kInt8PerLane];
#pragma unroll
  for (int e = 0; e < kInt8PerLane; ++e) {
    const int j = lane + 32 * e;
    pb[e] = 0.0f;
    gb[e] = 0.0f;
    cm[e] = 0;
    cv[e] = 0;
    if (j < len) {
      pb[e] = load_param<P, PR>(p, comp, j);
      gb[e] = Storage<P>::load(g + j);
      cm[e] = qm[j];
      cv[e] = qv[j];
    }
  }
  const float am = d.absmax_m[k];
  const float av = d.absmax_v[k];
  const TensorScalars& ts = sc[e.scalars];
  const StepScalars<float> s = ts.f;

  float mb[kInt8PerLane], vb[kInt8PerLane];
  uint32_t bm = 0, bv = 0;
#pragma unroll
  for (int e = 0; e < kInt8PerLane; ++e) {
    const int j = lane + 32 * e;
    mb[e] = 0.0f;
    vb[e] = 0.0f;
    if (j < len) {
      float pj = pb[e];
      float mj, vj;
      if constexpr (FMAP) {
        mj = op_mul(float_map_value_m(cm[e]), am);
        vj = op_mul(float_map_value_v(cv[e]), av);
      } else {
        mj = dequantize_code(cm[e], am, tab + kCodeM);
        vj = dequantize_code(cv[e], av, tab + kCodeV);
      }
      float unused = 0.0f;
      adam_element<float, false, MAX, COUPLED, SCALED>(pj, gb[e], mj, vj, unused, s);
      store_param<P, PR>(p, comp, j, pj, ts.key_p, static_cast<uint64_t>(start + j));
      mb[e] = mj;
      vb[e] = vj;
      bm = max_u32(bm, abs_bits(mj));
      bv = max_u32(bv, abs_bits(vj));
    }
  }
  // The block's absmax: an unsigned max of |x|'s bit patterns (NaN wins), over the warp.
#if ONEPASS_PLANTED_BUG == 4
  constexpr int kFirstOffset = 8;  // planted: lanes 0-15 never see lanes 16-31
#else
  constexpr int kFirstOffset = 16;
#endif
#pragma unroll
  for (int off = kFirstOffset; off > 0; off >>= 1) {
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
      const float y = op_mul(vb[e], iv);
      if constexpr (FMAP) {
        qm[j] = static_cast<uint8_t>(float_map_code_m(op_mul(mb[e], im)));
        qv[j] = static_cast<uint8_t>(float_map_code_v_kept(y));
      } else {
        qm[j] = static_cast<uint8_t>(quantize_code(mb[e], im, tab + kMidM));
        qv[j] = static_cast<uint8_t>(keep_positive(code_search(y, tab + kMidV), y));
      }
    }
  }
  if (lane == 0) {
    d.absmax_m[k] = nam;
    d.absmax_v[k] = nav;
  }
}

// The per-step scalars of every tensor of a batch (thread i: slot i), when an input lives on the
// device: capturable step counts, a Tensor lr or a GradScaler's scale. With `bump` (capturable),
// it also advances the device step counts, unless found_inf: the update kernels that follow read
// the scalars, not the counts, so a CUDA graph replays both. (A template, like every kernel here,
// so that each file including this one may instantiate it: Slot is StepSlot.)
template <typename Slot>
__global__ void __launch_bounds__(kThreads)
step_scalars_kernel(const Slot* __restrict__ slots, TensorScalars* __restrict__ out, int n,
                    Hyper h, bool bump) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const Slot sl = slots[i];
  const int64_t step = sl.step_dev != nullptr ? static_cast<int64_t>(*sl.step_dev + 1.0f) : sl.step_host;
  const double lr = h.lr_dev != nullptr ? static_cast<double>(*h.lr_dev)
                    : h.lr_dev64 != nullptr ? *h.lr_dev64 : h.lr;
  const double gs = h.grad_scale != nullptr ? *h.grad_scale : 1.0;
  out[i] = tensor_scalars(step, lr, gs, h, sl.f64 != 0);
  if (bump && sl.step_dev != nullptr && !skip_step(h.found_inf))
    *sl.step_dev = static_cast<float>(step);
}

}  // namespace kernels
}  // namespace onepass
