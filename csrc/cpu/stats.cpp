// The fused statistics on the CPU (stats.h): int8 blocks, the chunks' layout, the final sums.
#include "stats.h"

#include <cstring>

namespace onepass {
namespace cpu {
namespace {

// An int8 block (a chunk; reference.chunk_partials with the tree alone): the old values are kept
// before fn updates the block (the int8 loop has its own stages), then the squares, zero-padded
// to the block, and the halving tree.
template <typename P>
void stats_block(const TensorWork& w, int64_t start, int64_t len, int64_t b, double* out) {
  using T = typename Storage<P>::math_t;
  alignas(64) P old[kInt8Block];
  alignas(64) T sw[kInt8Block];
  alignas(64) T sd[kInt8Block];
  const P* p = static_cast<const P*>(w.p) + start;
  std::memcpy(old, p, static_cast<size_t>(len) * sizeof(P));
  w.fn(w, b, b + 1, false);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const T a = Storage<P>::load(p + i);
    const T x = op_sub(a, Storage<P>::load(old + i));
    sw[i] = op_mul(a, a);
    sd[i] = op_mul(x, x);
  }
  for (int64_t i = len; i < kInt8Block; ++i) sw[i] = sd[i] = T(0);
  out[0] = static_cast<double>(halving_tree(sw, kInt8Block));
  out[1] = static_cast<double>(halving_tree(sd, kInt8Block));
}

}  // namespace

BlockStatsFn pick_block_stats(at::ScalarType dt) {
  switch (dt) {  // int8 state: float, bf16 or fp16 params
    case at::kBFloat16: return &stats_block<Bf16>;
    case at::kHalf: return &stats_block<Fp16>;
    default: return &stats_block<float>;
  }
}

int64_t setup_stats(std::vector<TensorWork>& work, std::vector<double>& partials) {
  int64_t chunks = 0;
  for (TensorWork& w : work) {
    w.chunks = w.blocks ? w.units / kUnit : (w.n + kStatsChunk - 1) / kStatsChunk;
    chunks += w.chunks;
  }
  partials.assign(static_cast<size_t>(2 * chunks), 0.0);
  int64_t units = 0, at = 0;
  for (TensorWork& w : work) {
    const int64_t nc = w.chunks;
    w.partials = partials.data() + 2 * at;
    w.unit_begin = units;
    w.units = w.blocks ? nc * kUnit : nc * (kStatsChunk / kUnit);
    units += w.units;
    at += nc;
  }
  return units;
}


constexpr int64_t kStatsGroup = 2048;  // reference.STATS_GROUP
void finish_stats(const std::vector<TensorWork>& work, const at::Tensor& stats) {
  double* out = stats.data_ptr<double>();
  std::fill(out, out + stats.numel(), 0.0);
  std::vector<double> tw(kStatsGroup), td(kStatsGroup);
  for (const TensorWork& w : work) {
    const int64_t nc = w.chunks;
    double sw = 0.0, sd = 0.0;
    for (int64_t g0 = 0; g0 < nc; g0 += kStatsGroup) {
      const int64_t len = std::min<int64_t>(kStatsGroup, nc - g0);
      // The tree over the zero-padded group starts at the first power of two >= len: the levels
      // above it only add +0 to each partial (sums of squares, never -0), which changes no bit.
      // (A 2-chunk param then costs one add, not 2 x 2047: 9% of a `small` step before.)
      int64_t top = 1;
      while (top < len) top *= 2;
      for (int64_t i = 0; i < top; ++i) {
        tw[i] = i < len ? w.partials[2 * (g0 + i)] : 0.0;
        td[i] = i < len ? w.partials[2 * (g0 + i) + 1] : 0.0;
      }
      sw = op_add(sw, halving_tree(tw.data(), top));
      sd = op_add(sd, halving_tree(td.data(), top));
    }
    out[2 * w.index] = sw;
    out[2 * w.index + 1] = sd;
  }
}

}  // namespace cpu
}  // namespace onepass
