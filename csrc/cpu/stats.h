// The fused statistics on the CPU (reference.update_statistics, reference.chunk_partials): what
// the loops inline (halving_tree, stats_chunks, add_squares) and what a step calls (stats.cpp).
#pragma once

#include "work.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

namespace onepass {
namespace cpu {

// The fused statistics (reference.update_statistics, reference.chunk_partials): w^2 and
// (w - w_old)^2 in the math dtype. An element-wise format's chunk is 128 rows of kStatsLanes = 16
// elements: the update loop walks a chunk row by row and adds each row's squares into 16 lane
// accumulators, which stay in vector registers (two AVX2 / one AVX-512 register each), then a
// 15-add tree over the lanes. So the statistics cost the loop a subtract, three multiplies and two
// adds an element, in registers, while it waits for memory. Measured on the 2-core Zen 3 against
// the step without statistics: a separate pass over each updated chunk (a tree over all 2048
// squares) cost +21% of a gpt2 step; 256 lanes accumulated in L1, +9% (one 2**26 tensor); these
// 16 lanes in registers, +2.4 to +3.6% of a gpt2 step (three runs of the benchmark).
// The halving tree a[:h] + a[h:] over a[0, n) (n a power of two), in place; returns the sum.
// One statement for the chunks' lanes, the int8 blocks and the groups of chunk sums.
template <typename T>
inline __attribute__((always_inline)) T halving_tree(T* a, int64_t n) {
  for (int64_t h = n / 2; h >= 1; h /= 2) {
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) a[i] = op_add(a[i], a[i + h]);
  }
  return a[0];
}

// Whole chunks [b, e) from a chunk's start. elem(i, lane, aw, ad) updates element i and adds its
// squares into aw[lane], ad[lane]. Accumulators start at zero (adding a square to +0 gives the
// square, so row 0 is taken as it is, as the reference does); a partial last row leaves the
// other lanes as they are (the reference adds +0 there). Inlined into each ISA's function (elem
// is an always_inline lambda), so the rows run with that ISA's vectors; the full rows have a
// constant trip count, so the accumulators live in registers and each row is two AVX2 vectors.
template <typename T, typename Elem>
inline __attribute__((always_inline)) void stats_chunks(const TensorWork& w, int64_t b, int64_t e,
                                                        Elem elem) {
  for (int64_t c0 = b; c0 < e; c0 += kStatsChunk) {
    T aw[kStatsLanes] = {};
    T ad[kStatsLanes] = {};
    const int64_t c1 = std::min(e, c0 + kStatsChunk);
    int64_t r0 = c0;
    for (; r0 + kStatsLanes <= c1; r0 += kStatsLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kStatsLanes; ++l) elem(r0 + l, l, aw, ad);
    }
    for (int64_t l = 0; r0 + l < c1; ++l) elem(r0 + l, l, aw, ad);
    double* out = w.partials + 2 * (c0 / kStatsChunk);
    out[0] = static_cast<double>(halving_tree(aw, kStatsLanes));
    out[1] = static_cast<double>(halving_tree(ad, kStatsLanes));
  }
}


// Statistics: adds w^2 and dw^2 (nw, old: the param as stored after and before) into lane
// accumulators. nw comes from registers, not from the param just written: reading the stored
// values back right after the store cost the gpt2 case +26% instead of +9% on this Zen 3
// (measured, 256 lanes).
template <typename T>
inline __attribute__((always_inline)) void add_squares(T nw, T old, T& aw, T& ad) {
  const T d = op_sub(nw, old);
  aw = op_add(aw, op_mul(nw, nw));
  ad = op_add(ad, op_mul(d, d));
}


// The statistics of an int8 block of a param of dtype dt (its loop runs inside).
BlockStatsFn pick_block_stats(at::ScalarType dt);
// Statistics: gives each tensor its partial sums (one pair per chunk) and re-lays the units so
// chunks are whole; returns the new total of units.
int64_t setup_stats(std::vector<TensorWork>& work, std::vector<double>& partials);
// Each param's sums (reference.update_statistics): its chunks' partials in groups of
// kStatsGroup by the halving tree (float64, zero-padded), then the groups' sums added in order;
// 0 for an empty param.
void finish_stats(const std::vector<TensorWork>& work, const at::Tensor& stats);

}  // namespace cpu
}  // namespace onepass
