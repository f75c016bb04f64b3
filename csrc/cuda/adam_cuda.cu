// The CUDA backend's launch glue: every tensor of a batch in one launch per param dtype, on the
// current stream, with the device tables the kernels read. The kernels are kernels.cuh, the plan
// (which block updates which elements) plan.h, the host step (checks, walk layout, choice of
// instantiation, step counts) host_step.h -- all shared with the CPU emulation that runs them in
// CI (csrc/emu/). What is here is what only a GPU has: streams, pinned uploads, graph capture.
//
// Step counts: host counts (CPU step tensors) are incremented on the host, and the per-step
// scalars made from them there; with capturable=True the step tensors live on the device, and a
// tiny kernel (step_scalars_kernel) makes the scalars and increments the counts (unless found_inf
// is set) before the update kernels run, so a CUDA graph replays it.
#include "../adam_math.h"
#include "../onepass_ops.h"
#include "../group_plan.h"
#include "host_step.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <vector>

namespace onepass {
namespace {

bool capturing_now() {
  return at::cuda::currentStreamCaptureStatusMayInitCtx() != at::cuda::CaptureStatus::None;
}

// Pinned host tables that captured graphs read at every replay (a captured host-to-device copy
// becomes a graph node that reads its source then). Each is owned by its graph through a CUDA
// user object; when the graph is destroyed, CUDA calls release_held, which may not call CUDA, so
// it only hands the tensor over, and the next upload outside a capture frees it.
struct Held {
  at::Tensor host;
};
std::mutex& held_mu() {
  static auto* mu = new std::mutex();
  return *mu;
}
std::vector<Held*>& released() {
  static auto* v = new std::vector<Held*>();  // never destroyed: no CUDA frees at exit
  return *v;
}
void release_held(void* p) {
  const std::lock_guard<std::mutex> lock(held_mu());
  released().push_back(static_cast<Held*>(p));
}
void free_released() {
  std::vector<Held*> done;
  {
    const std::lock_guard<std::mutex> lock(held_mu());
    done.swap(released());
  }
  for (Held* h : done) delete h;
}
void hold_for_graph(const at::Tensor& host, cudaStream_t stream) {
  cudaStreamCaptureStatus status;
  unsigned long long id = 0;
  cudaGraph_t graph = nullptr;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &id, &graph));
  TORCH_CHECK(status == cudaStreamCaptureStatusActive && graph != nullptr,
              "onepass: the capture of the current stream is not active");
  auto* held = new Held{host};
  cudaUserObject_t obj;
  C10_CUDA_CHECK(cudaUserObjectCreate(&obj, held, release_held, 1, cudaUserObjectNoDestructorSync));
  C10_CUDA_CHECK(cudaGraphRetainUserObject(graph, obj, 1, cudaGraphUserObjectMove));
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

// The runtime of host_step.h on a GPU.
struct CudaRuntime {
  c10::Device dev;
  cudaStream_t stream;

  bool device_steps(const BatchArgs& a) const { return a.steps[0].is_cuda(); }
  bool step_on_device(const at::Tensor& st) const { return st.is_cuda(); }
  bool on_device(const at::Tensor& t) const { return t.is_cuda(); }
  bool capturing() const { return capturing_now(); }
  bool float_maps(const at::Tensor& q) const { return tables_are_float_maps(q); }

  // A host table copied to the device with the stream, through a pinned buffer (no sync).
  at::Tensor upload(const void* data, int64_t bytes) const {
    const bool capture = capturing();
    if (!capture) free_released();
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), data, static_cast<size_t>(bytes));
    at::Tensor table = host.to(dev, /*non_blocking=*/true);
    if (capture) hold_for_graph(host, stream);
    return table;
  }

  at::Tensor alloc(int64_t bytes) const {
    return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(dev));
  }

  template <auto K, typename... Args>
  void run(int64_t grid, int threads, Args... args) const {
    K<<<static_cast<unsigned>(grid), threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

CudaRuntime runtime_for(const BatchArgs& a) {
  const c10::Device dev = a.params[0].device();
  return CudaRuntime{dev, at::cuda::getCurrentCUDAStream(dev.index())};
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
  const c10::cuda::CUDAGuard guard(params[0].device());
  host::step_fp32(a, runtime_for(a));
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
  const c10::cuda::CUDAGuard guard(params[0].device());
  host::step_any(a, runtime_for(a));
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
  if (!params.empty()) host::check_launch(a, runtime_for(a));
}

void step_planned_cuda(PlanPart& part, const StepHyper& h, bool check_only) {
  BatchArgs a = plan_args(part, h, nullptr);
  // (a step reads the host counts' values once, where it makes the scalars: host::host_next_count)
  if (check_only)
    validate_planned(part, a, c10::DeviceType::CUDA);
  else
    validate_planned_state(part, a, c10::DeviceType::CUDA);
  if (a.params.empty()) return;
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  if (check_only)
    host::check_launch(a, runtime_for(a));
  else
    host::step_any(a, runtime_for(a), &kept<host::PlannedLaunches>(part.cuda_work));
}

TORCH_LIBRARY_IMPL(onepass, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("adam_step_lowp_", &adam_step_lowp_cuda);
  m.impl("adam_check_lowp", &adam_check_lowp_cuda);
}

}  // namespace onepass
