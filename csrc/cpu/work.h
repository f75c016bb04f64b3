// The CPU backend's shared picture of a step (csrc/cpu/): one TensorWork per tensor, the loop
// chosen for it (RangeFn), and the constants of the work split. The loops (loops_full.cpp,
// loops_lowp.cpp), the work split (run.cpp), the statistics (stats.cpp) and the step's entry
// points (adam_cpu.cpp) all read it.
#pragma once

#include "../adam_math.h"
#include "../onepass_ops.h"

#include <cstdint>
#include <vector>

namespace onepass {
namespace cpu {

constexpr int64_t kUnit = 16;        // elements per work unit: 64 bytes of fp32
constexpr int64_t kGrainUnits = 2048;  // 32K elements (~0.9 MB of traffic) per thread at least

struct TensorWork;
struct CodeIndex;
// The loop over elements [b, e) (int8: blocks). stats (element-wise formats): [b, e) is whole
// statistics chunks from a chunk's start, and each chunk's sums go to the tensor's partials.
using RangeFn = void (*)(const TensorWork&, int64_t b, int64_t e, bool stats);
// The statistics of one int8 block: elements [start, start + len) of the walk, block b.
using BlockStatsFn = void (*)(const TensorWork&, int64_t start, int64_t len, int64_t b, double* out);
// Elements per statistics chunk (reference.STATS_CHUNK; int8 state: its blocks are the chunks),
// and the lanes of an element-wise format's chunk (reference.STATS_LANES).
constexpr int64_t kStatsChunk = 2048;
constexpr int64_t kStatsLanes = 16;
static_assert(kStatsChunk % kStatsLanes == 0, "whole rows");

struct TensorWork {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* v_max;
  const void* scalars;  // StepScalars<float> or <double>, by the param's dtype
  RangeFn fn;           // the loop for this param's dtype and the batch's flags
  int64_t n;
  int64_t unit_begin;   // first global unit of this tensor
  int64_t units;        // global units of this tensor: ceil(n / kUnit), or kUnit per int8 block
  // Low precision (state_format "bf16"/"int8", param_rounding "stochastic"/"kahan"):
  bool blocks = false;      // int8: fn takes a range of blocks instead of elements
  void* comp = nullptr;     // Kahan compensation (bf16, the walk's layout)
  float* absmax_m = nullptr;  // int8: [rows, blocks per row], contiguous
  float* absmax_v = nullptr;
  const float* tables = nullptr;  // quant.tables(): codes and midpoints
  int64_t row_len = 0;          // int8: elements per dim-0 row
  int64_t blocks_per_row = 0;
  uint32_t key_p = 0, key_moments = 0;  // stream keys of this tensor at this step
  const CodeIndex* index_m = nullptr;  // int8: the code search tables (null: fallback)
  const CodeIndex* index_v = nullptr;
  bool float_map = false;  // int8: the tables are quant's "float3" maps (bit-level search)
  // Fused statistics: each chunk's two partial sums go to partials[2 * chunk] (null: no
  // statistics), written by fn (stats = true) or, for int8, block by block by block_stats.
  double* partials = nullptr;
  int64_t chunks = 0;  // statistics chunks (int8: blocks) of this tensor
  BlockStatsFn block_stats = nullptr;  // int8
  int64_t index = 0;  // the param's position in the batch (its row of the stats tensor)
};

// How a low-precision batch stores its moments (SF) and writes its params (PR): the values of
// BatchArgs::state_format / param_rounding (parse_state_format, parse_param_rounding).
enum StateFmt : int { kF32 = 0, kBF16 = 1, kInt8 = 2 };
enum ParamRnd : int { kNearest = 0, kStochastic = 1, kKahan = 2 };

// The loop of a param of dtype `dt` with fp32 (float64: float64) state and nearest rounding, and
// of a low-precision one (loops_full.cpp, loops_lowp.cpp), for the flags (amsgrad, maximize,
// coupled, scaled) and the ISA in use (isa.h).
RangeFn pick_full(at::ScalarType dt, const bool* flags);
RangeFn pick_lowp(at::ScalarType dtype, int sf, int pr, const bool* flags);

// Runs every tensor's loop, split between torch's threads (run.cpp).
void run(const std::vector<TensorWork>& ts, int64_t total_units);

}  // namespace cpu
}  // namespace onepass
