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
  const c10::Device dev = params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(dev.index());
  const bool capturable = steps[0].device().is_cuda();

  Hyper h{lr, beta1, beta2, eps, weight_decay, nullptr, nullptr, nullptr, nullptr, decoupled};
  at::Tensor lr_keep;
  if (lr_tensor.has_value()) {
    if (lr_tensor->is_cuda()) {
      ONEPASS_CHECK(lr_tensor->device() == dev, "onepass: a device lr must be on the params' device");
      if (lr_tensor->scalar_type() == at::kDouble) {
        h.lr_dev64 = lr_tensor->data_ptr<double>();
      } else {
        lr_keep = lr_tensor->to(at::kFloat);  // exact for float32/bf16/fp16 values
        h.lr_dev = lr_keep.data_ptr<float>();
      }
    } else {
      h.lr = lr_tensor->item<double>();
    }
  }
  at::Tensor gs_keep, fi_keep;
  if (grad_scale.has_value()) {
    gs_keep = grad_scale->to(dev, at::kFloat);
    h.grad_scale = gs_keep.data_ptr<float>();
  }
  if (found_inf.has_value()) {
    if (!capturable) {
      // Host step counts: whether to count this step must be known on the host (one sync).
      if (found_inf->item<double>() != 0.0) return;
    } else {
      fi_keep = found_inf->to(dev, at::kFloat);
      h.found_inf = fi_keep.data_ptr<float>();
    }
  }

  // One launch per param dtype present (a group normally has one).
  const at::ScalarType dtypes[4] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  const bool flags[4] = {amsgrad, maximize, !decoupled, grad_scale.has_value()};
  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  for (const at::ScalarType dt : dtypes) {
    std::vector<Desc> descs;
    int64_t blocks = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() != dt || params[i].numel() == 0) continue;
      const DensePair dp = dense_pair(params[i], grads[i]);
      if (dp.copy_back) write_back.emplace_back(params[i], dp.p);
      const at::Tensor& p = dp.p;
      const at::Tensor& g = dp.g;
      keep.push_back(p);
      keep.push_back(g);
      Desc d{};
      d.p = p.data_ptr();
      d.g = g.data_ptr();
      d.m = exp_avgs[i].data_ptr();
      d.v = exp_avg_sqs[i].data_ptr();
      d.v_max = amsgrad ? max_exp_avg_sqs[i].data_ptr() : d.m;
      if (capturable) {
        ONEPASS_CHECK(steps[i].is_cuda() && steps[i].scalar_type() == at::kFloat,
                      "onepass: capturable steps must be float32 tensors on the device");
        d.step_dev = steps[i].data_ptr<float>();
      } else {
        ONEPASS_CHECK(steps[i].is_cpu(), "onepass: mixed host and device step counts in one group");
        d.step_host = static_cast<int64_t>(steps[i].item<double>()) + 1;
      }
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
    fn(reinterpret_cast<const Desc*>(table.data_ptr()), static_cast<int>(descs.size()), h, blocks,
       stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (auto& pw : write_back) pw.first.copy_(pw.second);
  if (capturable) {
    std::vector<float*> ptrs(steps.size());
    for (size_t i = 0; i < steps.size(); ++i) ptrs[i] = steps[i].data_ptr<float>();
    at::Tensor table = upload(ptrs.data(), static_cast<int64_t>(ptrs.size() * sizeof(float*)), dev);
    const int n = static_cast<int>(ptrs.size());
    bump_device_steps<<<(n + 255) / 256, 256, 0, stream>>>(
        reinterpret_cast<float* const*>(table.data_ptr()), n, h.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    for (size_t i = 0; i < steps.size(); ++i) {
      at::Tensor st = steps[i];
      if (st.scalar_type() == at::kFloat) *st.data_ptr<float>() += 1.0f;
      else *st.data_ptr<double>() += 1.0;
    }
  }
}

TORCH_LIBRARY_IMPL(onepass, CUDA, m) { m.impl("adam_step_", &adam_step_cuda); }

}  // namespace onepass
