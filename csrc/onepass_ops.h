// Declarations shared by the op registration (ops.cpp) and the backends' kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdio>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace onepass {

// Error-message text built without iostreams. On the GPU reference machine (gcc 13.3 building
// against torch 2.11) every error message that formatted a number through c10::str (an
// ostringstream) crashed the process with SIGSEGV, while messages made of strings only were
// fine; std::to_string/snprintf avoid the stream's number formatting altogether.
inline std::string msg_piece(const std::string& s) { return s; }
inline std::string msg_piece(const char* s) { return s; }
inline std::string msg_piece(char c) { return std::string(1, c); }
inline std::string msg_piece(bool b) { return b ? "true" : "false"; }
inline std::string msg_piece(int v) { return std::to_string(v); }
inline std::string msg_piece(long v) { return std::to_string(v); }
inline std::string msg_piece(long long v) { return std::to_string(v); }
inline std::string msg_piece(unsigned long v) { return std::to_string(v); }
inline std::string msg_piece(unsigned long long v) { return std::to_string(v); }
inline std::string msg_piece(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}
inline std::string msg_piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string msg_piece(const c10::Device& d) { return d.str(); }
inline std::string msg_piece(c10::DeviceType t) { return c10::DeviceTypeName(t, /*lower_case=*/true); }
inline std::string msg_piece(c10::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}
template <typename... Args>
std::string msg(const Args&... args) {
  std::string out;
  (out += ... += msg_piece(args));
  return out;
}

// TORCH_CHECK with a message made by msg() (one string: c10::str passes it through untouched).
#define ONEPASS_CHECK(cond, ...) TORCH_CHECK((cond), ::onepass::msg(__VA_ARGS__))

// a == b for shapes and strides: a loop over the few dims a tensor has (IntArrayRef's == calls
// memcmp, 7% of a 2000-tensor step's instructions when the checks used it).
inline bool same_dims(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// t.data_ptr() for a strided tensor with storage, without the checks TensorBase::data_ptr makes
// through a non-inline call (a planned step reads two addresses a tensor: ~5% of its
// instructions with data_ptr). The item size comes from the dtype unchecked: TensorImpl::itemsize()
// checks that the dtype is set (always, with storage), and that check kept this from inlining
// (a 26-instruction call, twice a row in a 2000-tensor step).
inline const void* raw_data(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return static_cast<const char*>(impl->unsafe_storage().data()) +
         impl->storage_offset() * static_cast<int64_t>(impl->dtype().itemsize());
}

// Whether t's storage holds every element t addresses. A storage can shrink under its tensors
// in place (FSDP resizes an unsharded param's or grad's storage to 0 bytes; a state tensor's
// storage can be resized by hand), and a kernel reading raw_data(t) would then read or write
// memory no one owns. Size-0 dims address nothing; torch has no negative strides.
inline bool storage_holds(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (!impl->has_storage()) return false;
  const int64_t n = impl->numel();
  if (n == 0) return true;
  int64_t last = impl->storage_offset();
  if (impl->is_contiguous()) {
    last += n - 1;
  } else {
    const c10::IntArrayRef sizes = impl->sizes(), strides = impl->strides();
    for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
  }
  return static_cast<uint64_t>(last + 1) * impl->dtype().itemsize() <=
         impl->unsafe_storage().nbytes();
}

// The arguments of onepass::adam_step_ (one batch: the tensors of one group on one device, of one
// param dtype), as the kernels see them. Backends never see param groups or hyperparameter dicts.
struct BatchArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  double lr;
  const std::optional<at::Tensor>& lr_tensor;
  double beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  // Low precision (onepass::adam_step_lowp_; reference.py "Storage"). The defaults are fp32 state
  // and nearest rounding, what onepass::adam_step_ does.
  int state_format = 0;    // 0 fp32, 1 bf16, 2 int8 (parse_state_format)
  int param_rounding = 0;  // 0 nearest, 1 stochastic, 2 kahan (parse_param_rounding)
  at::TensorList exp_avg_absmaxs = {};
  at::TensorList exp_avg_sq_absmaxs = {};
  const at::Tensor* qtables = nullptr;
  at::TensorList kahan_comps = {};
  int64_t seed = 0;
  // Fused statistics (onepass::adam_step_stats_; reference.update_statistics): float64
  // [params, 2] receiving (sum of w^2, sum of dw^2) per param; null: none.
  const at::Tensor* stats = nullptr;
  // The params, their state tensors and step counts passed these checks before and have not
  // changed since (the optimizer's cached plan, group_plan.h): validate_batch checks the grads
  // and settings only, and the caller the step counts' values.
  bool state_checked = false;
  // Set when every grad passed the plan's gather checks this step (group_plan.h:
  // PlanPart::grads_fit): the grads' addresses. Those checks imply check_grad's (validate_batch
  // skips it) and that every param and grad is contiguous (walked in place, no working copy).
  const void* const* grad_data = nullptr;
  // found_inf is left to the kernels even with host step counts (they skip on the device, and the
  // caller takes the counts back if the step was skipped: the optimizer's Batch.deferred), so
  // that the step needs no host sync.
  bool defer_found_inf = false;
};

// "fp32"/"bf16"/"int8" -> 0/1/2 and "nearest"/"stochastic"/"kahan" -> 0/1/2 (errors otherwise).
int parse_state_format(const std::string& s);
int parse_param_rounding(const std::string& s);

// Whether the kernels walk a param in place (else through a working copy): int8 blocks are rows
// of the row-major order, so int8 walks contiguous tensors; the other formats walk any dense
// layout in storage order.
inline bool walks_in_place(const at::Tensor& p, bool int8) {
  return int8 ? p.is_contiguous() : p.is_non_overlapping_and_dense();
}
// Whether a grad (or a Kahan compensation) is in the walk layout of its param `p`.
inline bool in_walk_layout(const at::Tensor& t, const at::Tensor& p, bool int8) {
  if (int8) return t.is_contiguous();
  // both row-major (the usual grad of the usual param): the same walk whatever the strides of
  // size-1 dims say; two flag reads against comparing every stride (~25 instructions a grad)
  if (t.is_contiguous() && p.is_contiguous()) return true;
  return same_dims(t.strides(), p.strides()) && t.is_non_overlapping_and_dense();
}

// What a kernel walks in storage order: the param itself when it is dense (else a contiguous
// working copy, to be copied back: copy_back), and the grad in that tensor's layout (copied into
// it when its strides differ). Moments share the param's layout (zeros_like, preserve_format).
struct DensePair {
  at::Tensor p, g;
  bool copy_back;
};
DensePair dense_pair(const at::Tensor& param, const at::Tensor& grad);

// Checks a grad against its param (dense, same dtype, device and shape); i names it in the error.
void check_grad(const at::Tensor& p, const at::Tensor& g, size_t i);

// A step count's value at its address (a float32, or a float64 when f64), and count + 1 written
// there returning the new count (float32 + 1: a float32 count stops at 2**24, as torch's does): read_step / advance_step on a tensor, and a
// plan's kept addresses (group_plan.h: PlanCounts).
inline double count_at(const void* d, bool f64) {
  return f64 ? *static_cast<const double*>(d) : static_cast<double>(*static_cast<const float*>(d));
}
// The count a step makes of count t (a value count_at read), as advance_count_at writes it: in
// the count's own dtype, so a float32 count at 2**24 stays there (torch's float32 step does).
inline int64_t next_count(double t, bool f64) {
  return f64 ? static_cast<int64_t>(t + 1.0) : static_cast<int64_t>(static_cast<float>(t) + 1.0f);
}
inline int64_t advance_count_at(void* d, bool f64) {
  if (f64) return static_cast<int64_t>(*static_cast<double*>(d) += 1.0);
  return static_cast<int64_t>(*static_cast<float*>(d) += 1.0f);
}
// A host step-count tensor's value (float32 or float64, one element).
double read_step(const at::Tensor& st);
// count += 1 on a host step-count tensor that passed check_step_tensor; returns the new count.
int64_t advance_step(const at::Tensor& st);
// Raises unless st is a step count the host can read: a one-element float32/float64 CPU tensor.
void check_step_tensor(const at::Tensor& st, size_t i);
// Raises unless t is a step count a step can advance: a whole number in [0, 2**53] (kMaxCount);
// i names it. A float32 count saturates at 2**24 (16777216 + 1 rounds back to it), as torch's
// float32 step does: the bias corrections there are 1 to within 5e-8 for betas <= 1 - 1e-6.
// (whole: t equals its int64 truncation; std::floor was a libm call, ~40
// instructions a count, 8% of a planned 2000-tensor step's.) Inline, its message out of line: a
// planned step checks every count every step, and the call cost ~25 instructions a tensor.
[[noreturn]] void bad_step_value(double t, size_t i);
constexpr double kMaxCount = 9007199254740992.0;  // 2**53: every whole number below is a double
inline void check_step_value(double t, size_t i) {
  if (!(t >= 0.0 && t <= kMaxCount && t == static_cast<double>(static_cast<int64_t>(t))))
    bad_step_value(t, i);
}

// Checks everything a kernel relies on before anything is written, so a bad batch raises a clear
// error and changes nothing.
void validate_batch(const BatchArgs& a, c10::DeviceType device_type);

// The CPU kernels (csrc/cpu/: adam_cpu.cpp and the loops it runs), registered as onepass::adam_step_ / adam_check.
void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                   double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                   double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf);
void adam_check_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                    double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                    double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    bool decoupled, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf);

// The low-precision step (bf16/int8 state, stochastic/Kahan bf16 params; fp32 too), registered as
// onepass::adam_step_lowp_ / adam_check_lowp for CPU tensors.
void adam_step_lowp_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                        at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                        bool maximize, bool decoupled, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, const std::string& state_format,
                        at::TensorList exp_avg_absmaxs, at::TensorList exp_avg_sq_absmaxs,
                        const std::optional<at::Tensor>& qtables, const std::string& param_rounding,
                        at::TensorList kahan_comps, int64_t seed);
// adam_step_lowp_ that also writes each param's update statistics into `stats` (CPU only).
void adam_step_stats_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                         double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                         bool maximize, bool decoupled, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::string& state_format,
                         at::TensorList exp_avg_absmaxs, at::TensorList exp_avg_sq_absmaxs,
                         const std::optional<at::Tensor>& qtables, const std::string& param_rounding,
                         at::TensorList kahan_comps, int64_t seed, const at::Tensor& stats);
void adam_check_lowp_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
                         int64_t seed);

#ifdef ONEPASS_WITH_CUDA
// The CUDA kernels (csrc/cuda/adam_cuda.cu), registered as onepass::adam_step_ for CUDA tensors.
void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                    double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                    double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf);
// The low-precision step and its checks for CUDA tensors (onepass::adam_step_lowp_ /
// adam_check_lowp); same arguments as adam_step_lowp_cpu / adam_check_lowp_cpu.
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
                         int64_t seed);
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
                          int64_t seed);
#endif

// Increments one-element CPU step-count tensors and returns the new counts (for the triton
// backend, whose kernels take the counts from the host).
std::vector<int64_t> bump_steps(at::TensorList steps);
// Checks each (param, grad) pair as validate_batch does and returns an int64 [n, 3] table of
// (param address, grad address, flags: 1 = param contiguous, 2 = grad contiguous).
at::Tensor pair_table(at::TensorList params, at::TensorList grads);

// The triton backend's per-step tables (csrc/triton_table.cpp). next_counts: the distinct values
// of count + 1 over the step counts (checked).
std::vector<int64_t> next_counts(at::TensorList steps);
// What a launch's corrections depend on besides the count: the betas, the math dtype (float64
// params: float64, else float32) and the random streams' seed (keys only when key_col >= 0).
struct TritonCorrArgs {
  double beta1, beta2;
  bool math_f64;
  int64_t seed;
};
// The packed float64 table of one launch, pinned when `pin`: the static rows with this step's
// param and grad addresses (and its random-stream keys at key_col unless negative), each row's
// bias corrections (1 - beta1**t, inv_bc2_sqrt rounded to the math dtype) for its count t = step
// + 1, then hp; and the rows whose param or grad is not contiguous. rows: each row's param (None:
// row r is param r). Checks every (param, grad) pair and every count first; then, when `bump`
// (a launch of every param of the step), advances the rows' counts: the step's first write.
// counts: the plan's (group_plan.h), whose params and grads have storage; null for plain lists.
// grad_data: the plan's grad addresses when its gather checked every grad (BatchArgs::grad_data):
// the pairs are not checked again.
struct PlanCounts;
std::tuple<at::Tensor, std::vector<int64_t>> triton_table(
    at::TensorList params, at::TensorList grads, at::TensorList steps, const at::Tensor& statics,
    const std::optional<at::Tensor>& rows, const TritonCorrArgs& corr, int64_t key_col,
    const std::vector<double>& hp, bool pin, bool bump, const PlanCounts* counts = nullptr,
    const void* const* grad_data = nullptr);

std::string cpu_isa_get();
std::vector<std::string> cpu_isa_supported();
void cpu_isa_set(const std::string& name);

}  // namespace onepass
