// The tensors of a CUDA-backend step as the kernels walk them (working copies where a tensor is
// not in the walk layout), the planner's launches made from them, and a planned group's launches
// kept between steps (PlannedLaunches). Shared by the real launch and the emulated one.
#pragma once

#include "../onepass_ops.h"
#include "launchers.h"
#include "plan.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <type_traits>
#include <utility>
#include <vector>

namespace onepass {
namespace host {

// ---- the launches of a step ------------------------------------------------------------------
// One launch per param dtype present (a group normally has one). Its tensors in the walk layout
// the CPU kernel's step_walk walks: dense params in storage order, int8 params and grads as
// contiguous (row-major) tensors, Kahan compensations in their param's walk layout. Where a
// tensor is not, a working copy is walked and written back after the launch.
struct Working {
  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, working copy)
  void finish() {
    for (auto& pw : write_back) pw.first.copy_(pw.second);
  }
};

// The dtypes of a batch's launches, in launch order: fp32 state has a kernel for float64 params,
// the low-precision formats do not (validate_batch).
inline int launch_dtypes(bool lowp, const at::ScalarType** out) {
  static const at::ScalarType fp32[4] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  static const at::ScalarType low[3] = {at::kFloat, at::kBFloat16, at::kHalf};
  *out = lowp ? low : fp32;
  return lowp ? 3 : 4;
}

inline bool is_lowp(const BatchArgs& a) { return !(a.state_format == kF32 && a.param_rounding == kNearest); }

// Param i's tensors for the planner, through working copies where they are not in the walk
// layout (w keeps them).
inline TensorMeta tensor_meta(const BatchArgs& a, size_t i, Working& w) {
  const bool lowp = is_lowp(a);
  const bool int8 = a.state_format == kInt8;
  const at::Tensor& p0 = a.params[i];
  const at::Tensor& g0 = a.grads[i];
  TensorMeta t{};
  at::Tensor p = p0;
  if (walks_in_place(p0, int8) && in_walk_layout(g0, p0, int8)) {
    // the usual case: both walked in place, no tensor copied or kept
    t.p = const_cast<void*>(raw_data(p0));
    t.g = raw_data(g0);
  } else if (int8) {
    // int8 blocks are rows of the row-major order: walk contiguous working copies
    p = p0.contiguous();
    if (!p0.is_contiguous()) w.write_back.emplace_back(p0, p);
    const at::Tensor g = g0.contiguous();
    w.keep.push_back(p);
    w.keep.push_back(g);
    t.p = p.data_ptr();
    t.g = g.data_ptr();
  } else {
    const DensePair dp = dense_pair(p0, g0);
    if (dp.copy_back) w.write_back.emplace_back(p0, dp.p);
    p = dp.p;
    w.keep.push_back(dp.p);
    w.keep.push_back(dp.g);
    t.p = dp.p.data_ptr();
    t.g = dp.g.data_ptr();
  }
  t.m = const_cast<void*>(raw_data(a.exp_avgs[i]));
  t.v = const_cast<void*>(raw_data(a.exp_avg_sqs[i]));
  t.v_max = a.amsgrad ? const_cast<void*>(raw_data(a.max_exp_avg_sqs[i])) : nullptr;
  if (a.param_rounding == kKahan) {
    const at::Tensor& c0 = a.kahan_comps[i];
    if (in_walk_layout(c0, p, false)) {
      t.comp = const_cast<void*>(raw_data(c0));
    } else {
      at::Tensor c = at::empty_like(p, c0.options());
      c.copy_(c0);
      w.write_back.emplace_back(c0, c);
      w.keep.push_back(c);
      t.comp = c.data_ptr();
    }
  }
  if (int8) {
    t.absmax_m = a.exp_avg_absmaxs[i].data_ptr<float>();
    t.absmax_v = a.exp_avg_sq_absmaxs[i].data_ptr<float>();
  }
  t.slot = static_cast<int32_t>(i);
  t.numel = p.numel();
  t.rows = !lowp || p.dim() < 2 ? 1 : p.size(0);
  return t;
}

// Whether every tensor of the batch is walked in place (no working copy this step).
inline bool all_in_place(const BatchArgs& a) {
  const bool int8 = a.state_format == kInt8;
  // (the plan's gather found every param and grad contiguous)
  if (a.grad_data != nullptr && a.param_rounding != kKahan) return true;
  for (size_t i = 0; i < a.params.size(); ++i) {
    const at::Tensor& p = a.params[i];
    if (!walks_in_place(p, int8) || !in_walk_layout(a.grads[i], p, int8)) return false;
    if (a.param_rounding == kKahan && !in_walk_layout(a.kahan_comps[i], p, false)) return false;
  }
  return true;
}

template <typename D>
Plan<D> plan_launch(const BatchArgs& a, const std::vector<TensorMeta>& metas, at::ScalarType dt) {
  Plan<D> plan;
  if constexpr (std::is_same_v<D, Desc>)
    plan = plan_fp32(metas, param_bytes(dt));
  else
    plan = plan_lowp(metas, param_bytes(dt), a.state_format == kInt8);
  ONEPASS_CHECK(plan.blocks < (int64_t(1) << 31), "onepass: too many blocks for one launch");
  return plan;
}

// A launch of a planned group, kept between steps (PlannedLaunches): its descriptor table and
// block map on the device, uploaded once; what a step changes is its StepEntry table.
template <typename D>
struct KeptLaunch {
  at::ScalarType dtype;
  int n = 0;
  int64_t blocks = 0;
  at::Tensor descs, map;         // device
  std::vector<int32_t> param_of;  // each desc's param (index in the batch)
  std::vector<StepEntry> entries; // the last step's, and their device copy
  at::Tensor entries_dev;
};

// A planned group's launches (PlanPart::cuda_work), made on its first step whose tensors are all
// walked in place and kept for the plan's life: the plan keeps the params' and the state's
// storage and sizes, which is all a Desc holds. A step whose grads are not in place (a working
// copy), or one being captured into a CUDA graph (a replay would read tables the plan may have
// dropped), takes the unkept path.
struct PlannedLaunches {
  bool made = false;
  std::vector<KeptLaunch<Desc>> fp32;
  std::vector<KeptLaunch<LowpDesc>> lowp;
  template <typename D>
  std::vector<KeptLaunch<D>>& of() {
    if constexpr (std::is_same_v<D, Desc>) return fp32; else return lowp;
  }
};

// The tensors of the batch's launch of param dtype dt (empty params have none).
inline std::vector<TensorMeta> launch_metas(const BatchArgs& a, at::ScalarType dt, Working& w) {
  std::vector<TensorMeta> metas;
  for (size_t i = 0; i < a.params.size(); ++i)
    if (a.params[i].scalar_type() == dt && a.params[i].numel() > 0)
      metas.push_back(tensor_meta(a, i, w));
  return metas;
}

template <typename D, class RT>
void make_kept(const BatchArgs& a, const RT& rt, std::vector<KeptLaunch<D>>& out) {
  const at::ScalarType* dtypes = nullptr;
  const int nd = launch_dtypes(is_lowp(a), &dtypes);
  Working unused;  // (every tensor is in place: nothing is copied)
  for (int l = 0; l < nd; ++l) {
    const std::vector<TensorMeta> metas = launch_metas(a, dtypes[l], unused);
    if (metas.empty()) continue;
    const Plan<D> plan = plan_launch<D>(a, metas, dtypes[l]);
    KeptLaunch<D> k;
    k.dtype = dtypes[l];
    k.n = static_cast<int>(plan.descs.size());
    k.blocks = plan.blocks;
    k.descs = rt.upload(plan.descs.data(), static_cast<int64_t>(plan.descs.size() * sizeof(D)));
    const std::vector<int32_t> map = block_map(plan.descs, plan.blocks);
    k.map = rt.upload(map.data(), static_cast<int64_t>(map.size() * sizeof(int32_t)));
    for (const TensorMeta& t : metas) k.param_of.push_back(t.slot);
    out.push_back(std::move(k));
  }
}

// This step's entries of a kept launch, uploaded only when they differ from the last step's (the
// grads kept their addresses and the params their counts: nothing to upload).
template <typename D, class RT>
const StepEntry* kept_entries(const BatchArgs& a, const RT& rt,
                              const std::vector<int32_t>& scalars, KeptLaunch<D>& k) {
  bool same = k.entries.size() == k.param_of.size();
  k.entries.resize(k.param_of.size());
  for (size_t d = 0; d < k.param_of.size(); ++d) {
    const int32_t i = k.param_of[d];
    const StepEntry e = step_entry(a.grad_data != nullptr ? a.grad_data[i] : raw_data(a.grads[i]),
                                   scalars[i]);
    StepEntry& last = k.entries[d];
    same = same && last.g == e.g && last.scalars == e.scalars;  // (g_aligned follows g)
    last = e;
  }
  if (!same)
    k.entries_dev = rt.upload(k.entries.data(),
                              static_cast<int64_t>(k.entries.size() * sizeof(StepEntry)));
  return reinterpret_cast<const StepEntry*>(k.entries_dev.data_ptr());
}

}  // namespace host
}  // namespace onepass
