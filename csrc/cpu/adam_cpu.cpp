// The CPU backend's step (onepass::adam_step_ and friends on CPU tensors, and a planned part's
// step): checks, the walk of a batch's tensors (TensorWork, work.h) kept between steps for a
// planned part, the per-step scalars, then the loops (loops_full.cpp, loops_lowp.cpp) run by the
// work split (run.cpp), and the statistics (stats.cpp).
#include "code_index.h"
#include "isa.h"
#include "stats.h"
#include "work.h"

#include "../adam_math.h"
#include "../group_plan.h"
#include "../onepass_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace onepass {

using namespace cpu;  // NOLINT: this file is the CPU backend's step

namespace {

template <typename T>
void add_scalars(std::vector<StepScalars<T>>& table, int64_t& last_step, int64_t step,
                 const BatchArgs& a, double lr, double grad_scale) {
  // Consecutive params with the same step count (the usual case: all of them) share one entry.
  if (table.empty() || step != last_step) {
    table.push_back(make_step_scalars<T>(step, lr, a.beta1, a.beta2, a.eps, a.weight_decay,
                                         a.decoupled, grad_scale));
    last_step = step;
  }
}

void check_stats(const at::Tensor& stats, size_t n) {
  ONEPASS_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kDouble &&
                    stats.is_contiguous() && stats.dim() == 2 &&
                    stats.size(0) == static_cast<int64_t>(n) && stats.size(1) == 2,
                "onepass: stats must be a contiguous float64 CPU tensor of shape [", n, ", 2]");
}

// What the walk of a batch needs that is the same for all its tensors: the loops chosen by its
// flags and the ISA, and the int8 tables with their code search. The TensorWork entries point
// into it, so it lives as long as they do.
struct WalkCtx {
  bool lowp, int8;
  int sf, pr, isa;
  bool flags[4];  // amsgrad, maximize, coupled, scaled
  uint32_t seed;
  const float* tables = nullptr;
  CodeIndex index_m, index_v;
  bool float_map = false, indexed = false;
  RangeFn fns[4] = {nullptr, nullptr, nullptr, nullptr};  // by param dtype: f32, f64, bf16, f16

  explicit WalkCtx(const BatchArgs& a)
      : lowp(a.state_format != kF32 || a.param_rounding != kNearest),
        int8(a.state_format == kInt8),
        sf(a.state_format),
        pr(a.param_rounding),
        isa(current_isa()),
        flags{a.amsgrad, a.maximize, !a.decoupled, a.grad_scale.has_value()},
        seed(static_cast<uint32_t>(a.seed)) {
    if (int8) {
      tables = a.qtables->data_ptr<float>();
      float_map = is_float_map(tables);
      indexed = !float_map && index_m.build(tables + kMidM) && index_v.build(tables + kMidV);
    }
  }

  // Whether this context's loops are the ones a batch with these settings needs.
  bool fits(const BatchArgs& a) const {
    return isa == current_isa() && flags[0] == a.amsgrad &&
           flags[1] == a.maximize && flags[2] == !a.decoupled &&
           flags[3] == a.grad_scale.has_value() && seed == static_cast<uint32_t>(a.seed);
  }

  RangeFn fn_for(at::ScalarType dt) {
    const int slot = dt == at::kFloat ? 0 : dt == at::kDouble ? 1 : dt == at::kBFloat16 ? 2 : 3;
    if (fns[slot] == nullptr) {
      if (lowp) {
        fns[slot] = pick_lowp(dt, sf, pr, flags);
      } else {
        fns[slot] = pick_full(dt, flags);
      }
    }
    return fns[slot];
  }
};

// The fields of batch tensor i's work that stay while its tensors keep their storage. `p` is the
// tensor walked (the param or its working copy), `comp` its Kahan compensation in p's layout.
void fill_static(TensorWork& w, const BatchArgs& a, size_t i, const at::Tensor& p, void* comp,
                 WalkCtx& ctx) {
  w.p = p.data_ptr();
  w.m = a.exp_avgs[i].data_ptr();
  w.v = a.exp_avg_sqs[i].data_ptr();
  w.v_max = a.amsgrad ? a.max_exp_avg_sqs[i].data_ptr() : nullptr;
  w.comp = comp;
  w.fn = ctx.fn_for(p.scalar_type());
  w.n = p.numel();
  w.index = static_cast<int64_t>(i);
  if (ctx.int8) {
    const int64_t rows = p.dim() < 2 ? 1 : p.size(0);
    w.blocks = true;
    w.row_len = w.n / rows;
    w.blocks_per_row = (w.row_len + kInt8Block - 1) / kInt8Block;
    w.units = rows * w.blocks_per_row * kUnit;
    w.absmax_m = a.exp_avg_absmaxs[i].data_ptr<float>();
    w.absmax_v = a.exp_avg_sq_absmaxs[i].data_ptr<float>();
    w.tables = ctx.tables;
    w.index_m = ctx.indexed ? &ctx.index_m : nullptr;
    w.index_v = ctx.indexed ? &ctx.index_v : nullptr;
    w.float_map = ctx.float_map;
    w.block_stats = pick_block_stats(p.scalar_type());
  } else {
    w.units = (w.n + kUnit - 1) / kUnit;
  }
}

// The per-step scalars of a batch: params with the same step count in a row share an entry.
// Reserved for every param up front, so the entries TensorWork points to never move. The random
// streams' keys depend on the count alone too: hashed once per run of one count (two mix32 a
// tensor were ~40 of a 2000-tensor bf16-state step's ~800 instructions a tensor).
struct ScalarTables {
  std::vector<StepScalars<float>> f;
  std::vector<StepScalars<double>> d;
  int64_t last_f = -1, last_d = -1;
  int64_t key_step = -1;
  uint32_t key_p = 0, key_moments = 0;

  void reset(size_t n) {
    f.clear();
    d.clear();
    f.reserve(n);
    d.reserve(n);
    last_f = last_d = key_step = -1;
  }
};

// The fields of a tensor's work that change every step: its grad and its step's scalars (and the
// random streams' keys of the low-precision loops).
// `step` is the count this step makes (the stored count + 1).
void fill_step(TensorWork& w, const void* g, int64_t step, bool f64, ScalarTables& sc,
               const BatchArgs& a, double lr, double grad_scale, const WalkCtx& ctx) {
  w.g = g;
  if (f64) {
    add_scalars(sc.d, sc.last_d, step, a, lr, grad_scale);
    w.scalars = &sc.d.back();
  } else {
    add_scalars(sc.f, sc.last_f, step, a, lr, grad_scale);
    w.scalars = &sc.f.back();
  }
  if (ctx.lowp) {
    if (step != sc.key_step) {
      sc.key_step = step;
      sc.key_p = stream_key(ctx.seed, step, kStreamParam);
      sc.key_moments = stream_key(ctx.seed, step, kStreamMoments);
    }
    w.key_p = sc.key_p;
    w.key_moments = sc.key_moments;
  }
}

// lr (a Tensor lr read here) and the grad scale of a checked batch.
std::pair<double, double> host_lr_and_scale(const BatchArgs& a) {
  const double lr = a.lr_tensor.has_value() ? a.lr_tensor->item<double>() : a.lr;
  ONEPASS_CHECK(lr >= 0.0, "onepass: invalid learning rate ", lr);
  const double grad_scale = a.grad_scale.has_value() ? a.grad_scale->item<double>() : 1.0;
  return {lr, grad_scale};
}

// Runs the work (with the fused statistics when the batch has them), then bumps the counts.
void run_and_count(const BatchArgs& a, std::vector<TensorWork>& work, int64_t units) {
  std::vector<double> partials;
  if (a.stats != nullptr) units = setup_stats(work, partials);
  run(work, units);
  if (a.stats != nullptr) finish_stats(work, *a.stats);
}

// One checked batch, any state format: every tensor in one parallel region. Params the kernels
// cannot walk in place, and grads or compensations in another layout, go through working copies
// (written back after the run).
void step_walk(const BatchArgs& a) {
  const size_t n = a.params.size();
  const auto [lr, grad_scale] = host_lr_and_scale(a);
  WalkCtx ctx(a);
  ScalarTables sc;
  sc.reset(n);
  std::vector<TensorWork> work;
  work.reserve(n);
  std::vector<at::Tensor> keep;  // temporaries that must outlive the kernel
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, working copy)
  int64_t units = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p0 = a.params[i];
    if (p0.numel() == 0) continue;
    at::Tensor p = p0, g = a.grads[i];
    if (!walks_in_place(p0, ctx.int8)) {
      p = p0.contiguous();
      write_back.emplace_back(p0, p);
    }
    if (!in_walk_layout(g, p, ctx.int8)) {
      // a transposed or strided grad is copied into the walk's layout first (torch's own fused
      // CPU AdamW reads it in the wrong order instead)
      g = at::empty_like(p);
      g.copy_(a.grads[i]);
    }
    keep.push_back(g);
    void* comp = nullptr;
    if (a.param_rounding == kKahan) {
      at::Tensor c = a.kahan_comps[i];
      if (!in_walk_layout(c, p, ctx.int8)) {
        c = at::empty_like(p, c.options());
        c.copy_(a.kahan_comps[i]);
        write_back.emplace_back(a.kahan_comps[i], c);
      }
      comp = c.data_ptr();
    }
    TensorWork w;
    fill_static(w, a, i, p, comp, ctx);
    fill_step(w, g.data_ptr(), next_count(read_step(a.steps[i]), a.steps[i].scalar_type() == at::kDouble),
              p.scalar_type() == at::kDouble, sc, a, lr, grad_scale, ctx);
    w.unit_begin = units;
    units += w.units;
    work.push_back(w);
  }
  run_and_count(a, work, units);
  for (auto& pw : write_back) pw.first.copy_(pw.second);
  for (size_t i = 0; i < n; ++i) advance_step(a.steps[i]);
}

// A plan part's walk, kept between steps (group_plan.h: PlanPart::cpu_work): the static fields
// of every tensor's work, made once while the part's tensors keep their storage and its flags.
struct PlannedWalk {
  explicit PlannedWalk(const BatchArgs& a) : ctx(a) {}
  WalkCtx ctx;
  std::vector<TensorWork> work;  // one per non-empty param, in order
  std::vector<size_t> index;     // the batch index of each
  int64_t units = 0;
  ScalarTables sc;
  bool usable = true;  // false: some param or compensation needs a working copy (step_walk)
};

std::shared_ptr<PlannedWalk> make_planned_walk(const BatchArgs& a) {
  auto pw = std::make_shared<PlannedWalk>(a);
  const size_t n = a.params.size();
  pw->work.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    if (p.numel() == 0) continue;
    void* comp = nullptr;
    if (a.param_rounding == kKahan) {
      if (!in_walk_layout(a.kahan_comps[i], p, pw->ctx.int8)) pw->usable = false;
      comp = a.kahan_comps[i].data_ptr();
    }
    if (!walks_in_place(p, pw->ctx.int8)) pw->usable = false;
    if (!pw->usable) return pw;
    TensorWork w;
    fill_static(w, a, i, p, comp, pw->ctx);
    w.unit_begin = pw->units;
    pw->units += w.units;
    pw->work.push_back(w);
    pw->index.push_back(i);
  }
  return pw;
}

}  // namespace

void step_planned_cpu(PlanPart& part, const StepHyper& h, const at::Tensor* stats,
                      bool check_only) {
  BatchArgs a = plan_args(part, h, stats);
  const bool counts_unchecked = validate_planned_state(part, a, c10::DeviceType::CPU);
  if (stats != nullptr) check_stats(*stats, a.params.size());
  if (a.params.empty()) return;
  auto* pw = static_cast<PlannedWalk*>(part.cpu_work.get());
  if (pw == nullptr || !pw->ctx.fits(a)) {
    part.cpu_work = make_planned_walk(a);
    pw = static_cast<PlannedWalk*>(part.cpu_work.get());
  }
  const PlanCounts& counts = plan_counts(part);
  if (counts_unchecked)
    for (size_t i = 0; i < a.params.size(); ++i) check_step_value(counts.value(i), i);
  if (check_only) return;
  if (a.found_inf.has_value() && a.found_inf->item<double>() != 0.0) return;  // AMP: skip
  if (!pw->usable || stats != nullptr) {  // (statistics re-lay the units: the general walk)
    step_walk(a);
    return;
  }
  const auto [lr, grad_scale] = host_lr_and_scale(a);
  pw->sc.reset(a.params.size());
  for (size_t k = 0; k < pw->work.size(); ++k) {
    const size_t i = pw->index[k];
    const at::Tensor& p = a.params[i];
    const void* g;
    if (a.grad_data != nullptr) {  // (gather found every grad and param contiguous)
      g = a.grad_data[i];
    } else {
      if (!in_walk_layout(a.grads[i], p, pw->ctx.int8)) {  // the grad needs a copy: nothing written
        step_walk(a);
        return;
      }
      g = raw_data(a.grads[i]);
    }
    fill_step(pw->work[k], g, next_count(counts.value(i), counts.f64[i]),
              part.dtypes[i] == at::kDouble, pw->sc, a, lr, grad_scale, pw->ctx);
  }
  run_and_count(a, pw->work, pw->units);
  for (size_t i = 0; i < counts.size(); ++i) counts.advance(i);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                   double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                   double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf};
  validate_batch(a, c10::DeviceType::CPU);
  if (params.empty()) return;
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;  // AMP overflow: skip
  step_walk(a);
}

// The checks of adam_step_ without the step: a multi-group optimizer step checks every batch
// before it writes the first one.
void adam_check_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                    double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                    double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    bool decoupled, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf};
  validate_batch(a, c10::DeviceType::CPU);
}

void adam_step_lowp_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                        at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                        bool maximize, bool decoupled, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, const std::string& state_format,
                        at::TensorList exp_avg_absmaxs, at::TensorList exp_avg_sq_absmaxs,
                        const std::optional<at::Tensor>& qtables, const std::string& param_rounding,
                        at::TensorList kahan_comps, int64_t seed) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf, parse_state_format(state_format),
                    parse_param_rounding(param_rounding), exp_avg_absmaxs, exp_avg_sq_absmaxs,
                    qtables.has_value() ? &*qtables : nullptr, kahan_comps, seed};
  validate_batch(a, c10::DeviceType::CPU);
  if (params.empty()) return;
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;  // AMP overflow: skip
  step_walk(a);
}

void adam_step_stats_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                         double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                         bool maximize, bool decoupled, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::string& state_format,
                         at::TensorList exp_avg_absmaxs, at::TensorList exp_avg_sq_absmaxs,
                         const std::optional<at::Tensor>& qtables, const std::string& param_rounding,
                         at::TensorList kahan_comps, int64_t seed, const at::Tensor& stats) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf, parse_state_format(state_format),
                    parse_param_rounding(param_rounding), exp_avg_absmaxs, exp_avg_sq_absmaxs,
                    qtables.has_value() ? &*qtables : nullptr, kahan_comps, seed, &stats};
  validate_batch(a, c10::DeviceType::CPU);
  check_stats(stats, params.size());
  if (params.empty()) return;
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;  // AMP overflow: skip
  step_walk(a);
}

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
                         int64_t seed) {
  const BatchArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                    grad_scale, found_inf, parse_state_format(state_format),
                    parse_param_rounding(param_rounding), exp_avg_absmaxs, exp_avg_sq_absmaxs,
                    qtables.has_value() ? &*qtables : nullptr, kahan_comps, seed};
  validate_batch(a, c10::DeviceType::CPU);
}


TORCH_LIBRARY_IMPL(onepass, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("adam_check", &adam_check_cpu);
  m.impl("adam_step_lowp_", &adam_step_lowp_cpu);
  m.impl("adam_check_lowp", &adam_check_lowp_cpu);
  m.impl("adam_step_stats_", &adam_step_stats_cpu);
}

}  // namespace onepass
