// The CPU backend's work split: every tensor of a group in one parallel region.
//
// Work split: each tensor is padded (in index space only) to whole 16-element units, the units of
// all tensors are laid end to end, and at::parallel_for (torch's own OpenMP runtime, so
// torch.set_num_threads is honoured and no second OpenMP runtime is loaded) hands each thread one
// contiguous run of units. A run can span many tensors, so 2000 small tensors cost one parallel
// region instead of 2000, and split points fall on 64-byte boundaries of fp32 data (torch's CPU
// allocator aligns to 64 bytes) so two threads never write the same cache line.
#include "work.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace onepass {
namespace cpu {
namespace {

// A thread walks its tensors one after another, and each new tensor starts four new streams (p, g,
// m, v) that the hardware prefetcher picks up only after a few misses; this prefetches the first
// kPrefetchLines lines of each stream of the next tensor while the current one runs. On the
// `small` case (2000 tensors of 16 KB a stream) on this 2-core Zen 3 it measured 4.54 against
// 5.09 ms a step in one layout, but within 2% of no prefetch (and of 16 to 128 lines into L2, or
// a line per page of the whole next tensor) in the benchmark's layout and a model's
// (bench/results/prefetch-small-cpu-epyc-2core-20261130/): the gap to the mul_ ceiling there is
// not the streams' start. gpt2's 148 long tensors do not notice it.
constexpr int64_t kPrefetchLines = 8;

inline void prefetch_start(const TensorWork& w) {
  // (2 bytes an element at least: no line past a short tensor's end)
  const int64_t lines = std::min<int64_t>(kPrefetchLines, (2 * w.n + 63) / 64);
  for (int64_t k = 0; k < lines; ++k) {
    __builtin_prefetch(static_cast<const char*>(w.p) + 64 * k, 1, 3);
    __builtin_prefetch(static_cast<const char*>(w.g) + 64 * k, 0, 3);
    __builtin_prefetch(static_cast<const char*>(w.m) + 64 * k, 1, 3);
    __builtin_prefetch(static_cast<const char*>(w.v) + 64 * k, 1, 3);
  }
}

}  // namespace

void run(const std::vector<TensorWork>& ts, int64_t total_units) {
  at::parallel_for(0, total_units, kGrainUnits, [&](int64_t ub, int64_t ue) {
    // first tensor whose units end after ub
    auto it = std::upper_bound(ts.begin(), ts.end(), ub, [](int64_t u, const TensorWork& w) {
      return u < w.unit_begin + w.units;
    });
    for (; it != ts.end() && it->unit_begin < ue; ++it) {
      if (it->partials != nullptr) {
        // statistics: whole chunks (int8: blocks), each in the range holding its first unit, so
        // a chunk's sums never depend on how the units were split between threads
        const int64_t per = it->blocks ? kUnit : kStatsChunk / kUnit;  // units per chunk
        const int64_t nc = it->chunks;
        const int64_t b = std::max<int64_t>(0, (ub - it->unit_begin + per - 1) / per);
        const int64_t e = std::min<int64_t>(nc, (ue - it->unit_begin + per - 1) / per);
        if (!it->blocks) {
          if (b < e) it->fn(*it, b * kStatsChunk, std::min(it->n, e * kStatsChunk), true);
          continue;
        }
        for (int64_t c = b; c < e; ++c) {
          const int64_t row = c / it->blocks_per_row;
          const int64_t col = (c - row * it->blocks_per_row) * kInt8Block;
          const int64_t len = std::min<int64_t>(kInt8Block, it->row_len - col);
          it->block_stats(*it, row * it->row_len + col, len, c, it->partials + 2 * c);
        }
        continue;
      }
      if (it->blocks) {
        // int8: kUnit units per block; a block belongs to the range holding its first unit
        const int64_t nb = it->units / kUnit;
        const int64_t b = std::max<int64_t>(0, (ub - it->unit_begin + kUnit - 1) / kUnit);
        const int64_t e = std::min<int64_t>(nb, (ue - it->unit_begin + kUnit - 1) / kUnit);
        if (b < e) it->fn(*it, b, e, false);
        continue;
      }
      const int64_t b = std::max<int64_t>(0, (ub - it->unit_begin) * kUnit);
      const int64_t e = std::min<int64_t>(it->n, (ue - it->unit_begin) * kUnit);
      const auto next = it + 1;
      if (next != ts.end() && next->unit_begin < ue && !next->blocks && next->partials == nullptr)
        prefetch_start(*next);
      if (b < e) it->fn(*it, b, e, false);
    }
  });
}


}  // namespace cpu
}  // namespace onepass
