// The triton backend's per-step table of one launch (python/onepass/backends/triton.py), made in
// one call: the (param, grad) addresses and contiguity of each row, its bias corrections and
// random-stream keys for its step count (adam_math.h's bias_correction1, inv_bc2_sqrt, stream_key:
// the bits of reference.py's), and the launch-wide scalars, packed in the one float64 buffer the
// backend copies to the device. Built from torch ops it took ~15 of them a step (about 100 us of
// host time for 148 tensors on this 2-core Zen 3 machine), and the corrections in Python ~12 us
// more; the backend keeps that path for an install without this extension.
#include "adam_math.h"
#include "group_plan.h"

#include <ATen/ops/empty.h>

#include <cstring>

namespace onepass {
namespace {

// Count t + 1 of steps[i], checked (a whole number in [0, 2**53] of a host tensor).
int64_t checked_next(const at::Tensor& s, size_t i) {
  check_step_tensor(s, i);
  const double t = read_step(s);
  check_step_value(t, i);
  return next_count(t, s.scalar_type() == at::kDouble);
}

// t.data_ptr() without its checks where t has storage (a plan's params and grads always do:
// GroupPlan::gather checks, so `planned` skips the out-of-line has_storage call, ~70 instructions
// a row with the call's).
const void* address(const at::Tensor& t, bool planned) {
  return planned || t.unsafeGetTensorImpl()->has_storage() ? raw_data(t) : t.data_ptr();
}

// One count's corrections as the kernels read them.
struct Correction {
  int64_t t;
  double bc1, inv_bc2_sqrt;
  int64_t keys[2];  // the param's stream, the moments'
};

Correction correction(int64_t t, const TritonCorrArgs& a, bool keys) {
  // inv_bc2_sqrt rounded once to the math type, as reference.round_scalar does
  const double inv = inv_bc2_sqrt(a.beta2, t);
  Correction c{t, bias_correction1(a.beta1, t),
               a.math_f64 ? inv : static_cast<double>(static_cast<float>(inv)), {0, 0}};
  if (keys) {
    const uint32_t seed = static_cast<uint32_t>(a.seed);  // (the reference masks it to 32 bits)
    c.keys[0] = stream_key(seed, t, kStreamParam);
    c.keys[1] = stream_key(seed, t, kStreamMoments);
  }
  return c;
}

}  // namespace

std::vector<int64_t> next_counts(at::TensorList steps) {
  std::vector<int64_t> out;
  for (size_t i = 0; i < steps.size(); ++i) {
    const int64_t next = checked_next(steps[i], i);
    // (a group's counts are nearly always one value: the last one found first)
    if (out.empty() || out.back() != next) {
      bool seen = false;
      for (const int64_t c : out) seen = seen || c == next;
      if (!seen) out.push_back(next);
    }
  }
  return out;
}

std::tuple<at::Tensor, std::vector<int64_t>> triton_table(
    at::TensorList params, at::TensorList grads, at::TensorList steps, const at::Tensor& statics,
    const std::optional<at::Tensor>& rows, const TritonCorrArgs& corr, int64_t key_col,
    const std::vector<double>& hp, bool pin, bool bump, const PlanCounts* counts,
    const void* const* grad_data) {
  ONEPASS_CHECK(params.size() == grads.size() && params.size() == steps.size(),
                "onepass: triton_table needs one grad and one step count a param");
  ONEPASS_CHECK(statics.dim() == 2 && statics.scalar_type() == at::kLong &&
                    statics.is_contiguous() && statics.device().is_cpu(),
                "onepass: triton_table's static table must be a contiguous int64 CPU matrix");
  const int64_t n = statics.size(0);
  const int64_t w = statics.size(1);
  ONEPASS_CHECK(w >= 6 && (key_col < 0 || key_col + 2 <= w), "onepass: triton_table: ", w,
                " columns, keys at ", key_col);
  ONEPASS_CHECK(counts == nullptr || counts->size() == steps.size(),
                "onepass: triton_table: the plan's counts do not match its steps");
  const int64_t* idx = nullptr;
  if (rows.has_value()) {
    ONEPASS_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->numel() == n,
                  "onepass: triton_table's rows must be int64, one a row");
    idx = rows->data_ptr<int64_t>();
  } else {
    ONEPASS_CHECK(static_cast<size_t>(n) == params.size(), "onepass: triton_table: ", n,
                  " rows for ", params.size(), " params");
  }
  auto param_of = [&](int64_t r) {
    const int64_t i = idx != nullptr ? idx[r] : r;
    ONEPASS_CHECK(i >= 0 && static_cast<size_t>(i) < params.size(), "onepass: triton_table: row ",
                  r, " names param ", i);
    return static_cast<size_t>(i);
  };
  // One pass: a bad grad or count raises before the step writes anything (the table is only
  // made, not yet used). Each row's count is read once.
  const int64_t total = n * w + 2 * n + static_cast<int64_t>(hp.size());
  at::Tensor out = at::empty({total}, at::TensorOptions().dtype(at::kDouble).pinned_memory(pin));
  double* o = out.data_ptr<double>();
  int64_t* itab = reinterpret_cast<int64_t*>(o);  // (int64 bits carried as float64)
  double* ftab = o + n * w;
  std::memcpy(itab, statics.data_ptr<int64_t>(), static_cast<size_t>(n * w) * sizeof(int64_t));
  std::vector<Correction> made;  // one per distinct count (nearly always one)
  std::vector<int64_t> odd;      // rows whose param or grad is not contiguous
  for (int64_t r = 0; r < n; ++r) {
    const size_t i = param_of(r);
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    if (grad_data == nullptr) check_grad(p, g, i);
    int64_t t;
    if (counts != nullptr) {
      const double value = counts->value(i);
      check_step_value(value, i);
      t = next_count(value, counts->f64[i]);
    } else {
      t = checked_next(steps[i], i);
    }
    size_t k = 0;
    if (!made.empty() && made.back().t == t) {
      k = made.size() - 1;  // (the common case: the previous row's count)
    } else {
      while (k < made.size() && made[k].t != t) ++k;
      if (k == made.size()) made.push_back(correction(t, corr, key_col >= 0));
    }
    const Correction& c = made[k];
    int64_t* row = itab + r * w;
    row[0] = reinterpret_cast<int64_t>(address(p, counts != nullptr));
    if (grad_data != nullptr) {
      row[1] = reinterpret_cast<int64_t>(grad_data[i]);
    } else {
      row[1] = reinterpret_cast<int64_t>(address(g, counts != nullptr));
      if (!p.is_contiguous() || !g.is_contiguous()) odd.push_back(r);
    }
    ftab[2 * r] = c.bc1;
    ftab[2 * r + 1] = c.inv_bc2_sqrt;
    if (key_col >= 0) std::memcpy(row + key_col, c.keys, sizeof(c.keys));
  }
  if (!hp.empty()) std::memcpy(o + n * w + 2 * n, hp.data(), hp.size() * sizeof(double));
  // Every check passed: the step's first write (count + 1 = t, next_count's).
  if (bump) {
    for (int64_t r = 0; r < n; ++r) {
      const size_t i = static_cast<size_t>(idx != nullptr ? idx[r] : r);
      if (counts != nullptr) counts->advance(i);
      else advance_step(steps[i]);
    }
  }
  return {out, odd};
}

}  // namespace onepass
