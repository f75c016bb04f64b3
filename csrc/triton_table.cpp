// The triton backend's per-step table of one launch (python/onepass/backends/triton.py), made in
// one call: the (param, grad) addresses and contiguity of each row, its bias corrections and
// random-stream keys for its step count, and the launch-wide scalars, packed in the one float64
// buffer the backend copies to the device. Built from torch ops it took ~15 of them a step (about
// 100 us of host time for 148 tensors on this 2-core Zen 3 machine) and a Python list of every
// count; the backend keeps that path for an install without this extension.
#include "onepass_ops.h"

#include <ATen/ops/empty.h>

#include <cstring>

namespace onepass {

std::vector<int64_t> next_counts(at::TensorList steps) {
  std::vector<int64_t> out;
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    ONEPASS_CHECK(s.numel() == 1 && s.device().is_cpu() &&
                      (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                  "onepass: steps[", i, "] must be a one-element float32/float64 CPU tensor");
    const double t = read_step(s);
    check_step_value(t, i);
    const int64_t next = static_cast<int64_t>(t) + 1;
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
    const std::optional<at::Tensor>& rows, const std::vector<TritonCorrection>& corr,
    int64_t key_col, const std::vector<double>& hp, bool pin) {
  ONEPASS_CHECK(params.size() == grads.size() && params.size() == steps.size(),
                "onepass: triton_table needs one grad and one step count a param");
  ONEPASS_CHECK(statics.dim() == 2 && statics.scalar_type() == at::kLong &&
                    statics.is_contiguous() && statics.device().is_cpu(),
                "onepass: triton_table's static table must be a contiguous int64 CPU matrix");
  const int64_t n = statics.size(0);
  const int64_t w = statics.size(1);
  ONEPASS_CHECK(w >= 6 && (key_col < 0 || key_col + 3 <= w), "onepass: triton_table: ", w,
                " columns, keys at ", key_col);
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
  // Every check before anything is made: a bad grad raises here and the step writes nothing.
  for (int64_t r = 0; r < n; ++r) {
    const size_t i = param_of(r);
    check_grad(params[i], grads[i], i);
  }
  const int64_t total = n * w + 2 * n + static_cast<int64_t>(hp.size());
  at::Tensor out = at::empty({total}, at::TensorOptions().dtype(at::kDouble).pinned_memory(pin));
  double* o = out.data_ptr<double>();
  int64_t* itab = reinterpret_cast<int64_t*>(o);  // (int64 bits carried as float64)
  double* ftab = o + n * w;
  std::memcpy(itab, statics.data_ptr<int64_t>(), static_cast<size_t>(n * w) * sizeof(int64_t));
  std::vector<int64_t> odd;  // rows whose param or grad is not contiguous
  for (int64_t r = 0; r < n; ++r) {
    const size_t i = param_of(r);
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    int64_t* row = itab + r * w;
    row[0] = reinterpret_cast<int64_t>(p.data_ptr());
    row[1] = reinterpret_cast<int64_t>(g.data_ptr());
    if (!p.is_contiguous() || !g.is_contiguous()) odd.push_back(r);
    const int64_t t = static_cast<int64_t>(read_step(steps[i])) + 1;
    const TritonCorrection* c = nullptr;
    for (const TritonCorrection& x : corr)
      if (std::get<0>(x) == t) c = &x;
    ONEPASS_CHECK(c != nullptr, "onepass: triton_table: no corrections for step ", t);
    ftab[2 * r] = std::get<1>(*c);
    ftab[2 * r + 1] = std::get<2>(*c);
    if (key_col >= 0) {
      row[key_col] = std::get<3>(*c);
      row[key_col + 1] = std::get<4>(*c);
      row[key_col + 2] = std::get<5>(*c);
    }
  }
  if (!hp.empty()) std::memcpy(o + n * w + 2 * n, hp.data(), hp.size() * sizeof(double));
  return {out, odd};
}

}  // namespace onepass
