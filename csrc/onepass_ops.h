// Declarations shared by the op registration (ops.cpp) and the backends' kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <string>
#include <vector>

namespace onepass {

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
};

// Checks everything a kernel relies on before anything is written, so a bad batch raises a clear
// error and changes nothing.
void validate_batch(const BatchArgs& a, c10::DeviceType device_type);

// The CPU kernels (csrc/cpu/adam_cpu.cpp), registered as onepass::adam_step_ / adam_check.
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

std::string cpu_isa_get();
std::vector<std::string> cpu_isa_supported();
void cpu_isa_set(const std::string& name);

}  // namespace onepass
