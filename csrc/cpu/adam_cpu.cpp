// The CPU backend: every tensor of a group in one parallel region, SIMD inner loop.
//
// Work split: each tensor is padded (in index space only) to whole 16-element units, the units of
// all tensors are laid end to end, and at::parallel_for (torch's own OpenMP runtime, so
// torch.set_num_threads is honoured and no second OpenMP runtime is loaded) hands each thread one
// contiguous run of units. A run can span many tensors, so 2000 small tensors cost one parallel
// region instead of 2000, and split points fall on 64-byte boundaries of fp32 data (torch's CPU
// allocator aligns to 64 bytes) so two threads never write the same cache line.
//
// SIMD: the inner loop is one plain loop over adam_element (csrc/adam_math.h) that gcc
// vectorizes; it is compiled three times under different target attributes (AVX-512, AVX2,
// baseline x86-64) and the widest one the CPU supports is chosen at run time. IEEE results do not
// depend on the vector width (no reductions, no FMA contraction), so all three give the same bits;
// the tests run each one this CPU has.
#include "../adam_math.h"
#include "../group_plan.h"
#include "../onepass_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace onepass {
namespace {

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
  uint32_t key_p = 0, key_m = 0, key_v = 0;  // stream keys of this tensor at this step
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

BlockStatsFn pick_block_stats(at::ScalarType dt) {
  switch (dt) {  // int8 state: float, bf16 or fp16 params
    case at::kBFloat16: return &stats_block<Bf16>;
    case at::kHalf: return &stats_block<Fp16>;
    default: return &stats_block<float>;
  }
}

// The int8 code search on the CPU: the same count of midpoints below x / absmax as code_search
// (csrc/adam_math.h), found with one table look-up and two comparisons instead of eight steps
// of a binary search. Keys are order_key values (integers ordered as the floats); the key range
// of |x| <= 1 is cut into buckets of 2**shift keys, each holding at most two midpoints, and
// lo[bucket] counts the midpoints below the bucket's first key. Then
// count(mid < x) = lo + (mk[lo] < key) + (mk[lo + 1] < key), mk padded with INT32_MAX.
// Built once per batch from qtables (~16K buckets for the maps of onepass.quant); a map that no
// shift in [12, 20] fits is searched with code_search.
constexpr int32_t kKeyMin = -0x3f800001;  // just below order_key(-1.0f)
constexpr int32_t kKeyMax = 0x3f800000;   // order_key(1.0f)
struct CodeIndex {
  int shift = 0;
  std::vector<int32_t> lo;
  int32_t mk[257];
  bool build(const float* mid) {
    for (int i = 0; i < 255; ++i) mk[i] = order_key(mid[i]);
    mk[255] = mk[256] = INT32_MAX;
    for (int i = 1; i < 255; ++i)
      if (!(mk[i - 1] < mk[i]) || mk[i - 1] < kKeyMin || mk[i] > kKeyMax) return false;
    for (int sh = 20; sh >= 12; --sh) {
      const int64_t nb = ((int64_t(kKeyMax) - kKeyMin) >> sh) + 1;
      std::vector<int32_t> t(nb + 1);
      int c = 0;
      bool ok = true;
      for (int64_t b = 0; b <= nb && ok; ++b) {
        const int64_t start = int64_t(kKeyMin) + (b << sh);
        while (c < 255 && mk[c] < start) ++c;
        t[b] = c;
        ok = b == 0 || t[b] - t[b - 1] <= 2;
      }
      if (ok) {
        t.pop_back();
        lo = std::move(t);
        shift = sh;
        return true;
      }
    }
    return false;
  }
};

// ---- the loop, instantiated per (storage, flags) and per ISA ------------------------------------
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

// Elements [begin, end); ST: whole statistics chunks (stats_chunks).
template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, bool ST>
inline __attribute__((always_inline)) void update_range(const TensorWork& w,
                                                        const StepScalars<typename Storage<P>::math_t>& s,
                                                        int64_t begin, int64_t end) {
  using T = typename Storage<P>::math_t;
  P* __restrict p = static_cast<P*>(w.p);
  const P* __restrict g = static_cast<const P*>(w.g);
  T* __restrict m = static_cast<T*>(w.m);
  T* __restrict v = static_cast<T*>(w.v);
  T* __restrict vm = static_cast<T*>(w.v_max);
  const StepScalars<T> sc = s;  // a local copy: the compiler keeps the scalars in registers
  auto elem = [&](int64_t i, int64_t lane, T* aw, T* ad) __attribute__((always_inline)) {
    const T old = Storage<P>::load(p + i);
    T pi = old;
    T mi = m[i];
    T vi = v[i];
    T vmi = AMS ? vm[i] : T(0);
    adam_element<T, AMS, MAX, COUPLED, SCALED>(pi, Storage<P>::load(g + i), mi, vi, vmi, sc);
    P stored;
    Storage<P>::store(&stored, pi);
    p[i] = stored;
    m[i] = mi;
    v[i] = vi;
    if (AMS) vm[i] = vmi;
    if constexpr (ST) add_squares(Storage<P>::load(&stored), old, aw[lane], ad[lane]);
  };
  if constexpr (ST) {
    stats_chunks<T>(w, begin, end, elem);
  } else {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) elem(i, 0, nullptr, nullptr);
  }
}

// Each loop twice, without and with the statistics (a runtime branch inside the loop would cost
// every step that does not take them).
#define ONEPASS_DEFINE_ISA(NAME, TARGET)                                                          \
  template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>                            \
  __attribute__((target(TARGET))) void NAME(const TensorWork& w, int64_t b, int64_t e,          \
                                            bool stats) {                                       \
    using T = typename Storage<P>::math_t;                                                        \
    const auto& s = *static_cast<const StepScalars<T>*>(w.scalars);                               \
    if (stats)                                                                                    \
      update_range<P, AMS, MAX, COUPLED, SCALED, true>(w, s, b, e);                               \
    else                                                                                          \
      update_range<P, AMS, MAX, COUPLED, SCALED, false>(w, s, b, e);                              \
  }
ONEPASS_DEFINE_ISA(range_avx512, "avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
ONEPASS_DEFINE_ISA(range_avx2, "avx2,bmi2")
ONEPASS_DEFINE_ISA(range_base, "default")
#undef ONEPASS_DEFINE_ISA

enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2")) return kAvx2;
  return kBase;
}

const int g_best_isa = detect_isa();

// ONEPASS_CPU_ISA=baseline|avx2|avx512 caps the ISA used by default (e.g. to compare variants,
// or to step around a suspected problem in one of them); the best supported one otherwise.
int initial_isa() {
  const char* env = std::getenv("ONEPASS_CPU_ISA");
  if (env == nullptr) return g_best_isa;
  for (int i = 0; i <= 2; ++i)
    if (std::strcmp(env, kIsaNames[i]) == 0) return std::min(i, g_best_isa);
  return g_best_isa;
}

std::atomic<int> g_isa{initial_isa()};

template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED>
RangeFn pick_isa(int isa) {
  switch (isa) {
    case kAvx512: return &range_avx512<P, AMS, MAX, COUPLED, SCALED>;
    case kAvx2: return &range_avx2<P, AMS, MAX, COUPLED, SCALED>;
    default: return &range_base<P, AMS, MAX, COUPLED, SCALED>;
  }
}

// Turns the four runtime flags into template arguments, one level at a time.
template <typename P, bool... B>
RangeFn pick_flags(int isa, const bool* flags, int left) {
  if constexpr (sizeof...(B) == 4) {
    return pick_isa<P, B...>(isa);
  } else {
    return flags[0] ? pick_flags<P, B..., true>(isa, flags + 1, left - 1)
                    : pick_flags<P, B..., false>(isa, flags + 1, left - 1);
  }
}

template <typename P>
RangeFn pick(bool amsgrad, bool maximize, bool coupled, bool scaled) {
  const bool flags[4] = {amsgrad, maximize, coupled, scaled};
  return pick_flags<P>(g_isa.load(std::memory_order_relaxed), flags, 4);
}

// ---- low precision: bf16 state, stochastic / Kahan bf16 params, int8 state ----------------------
// Same element math (adam_element); only the loads and stores around it differ. SF: how the
// moments are stored; PR: how the param is written. Element index (random streams) = the
// element's position in the walk: storage order of a dense param, row-major for a working copy
// and for int8 (reference.element_index).
enum StateFmt : int { kF32 = 0, kBF16 = 1, kInt8 = 2 };
enum ParamRnd : int { kNearest = 0, kStochastic = 1, kKahan = 2 };

// Writes the new param value `pv` of element `idx` (and its Kahan compensation); returns the
// value as stored, widened to float.
template <typename P, int PR>
inline __attribute__((always_inline)) float store_param(P* p, Bf16* comp, float pv, uint32_t key,
                                                        uint64_t idx) {
  if constexpr (PR == kStochastic) {
    const uint16_t stored = float_to_bf16_stochastic(pv, random_bits(key, idx));
    p->x = stored;
    return bf16_to_float(stored);
  } else if constexpr (PR == kKahan) {
    const uint16_t stored = float_to_bf16(pv);
    p->x = stored;
    comp->x = float_to_bf16(op_sub(pv, bf16_to_float(stored)));
    return bf16_to_float(stored);
  } else {
    P stored;
    Storage<P>::store(&stored, pv);
    *p = stored;
    return Storage<P>::load(&stored);
  }
}

template <typename P, int PR>
inline __attribute__((always_inline)) float load_param(const P* p, const Bf16* comp) {
  float pv = Storage<P>::load(p);
  if constexpr (PR == kKahan) pv = op_add(pv, bf16_to_float(comp->x));
  return pv;
}

// Element-wise formats (fp32 or bf16 moments) over elements [begin, end); ST: whole statistics
// chunks (stats_chunks).
template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR, bool ST>
inline __attribute__((always_inline)) void lowp_range(const TensorWork& w,
                                                      const StepScalars<float>& s, int64_t begin,
                                                      int64_t end) {
  using M = std::conditional_t<SF == kBF16, Bf16, float>;
  P* __restrict p = static_cast<P*>(w.p);
  const P* __restrict g = static_cast<const P*>(w.g);
  M* __restrict m = static_cast<M*>(w.m);
  M* __restrict v = static_cast<M*>(w.v);
  float* __restrict vm = static_cast<float*>(w.v_max);
  Bf16* __restrict comp = static_cast<Bf16*>(w.comp);
  const uint32_t key_p = w.key_p, key_m = w.key_m, key_v = w.key_v;
  const StepScalars<float> sc = s;
  auto elem = [&](int64_t i, int64_t lane, float* aw, float* ad) __attribute__((always_inline)) {
    const float old = Storage<P>::load(p + i);  // as stored (Kahan: without the compensation)
    float pi = load_param<P, PR>(p + i, comp + i);
    float mi = Storage<M>::load(m + i);
    float vi = Storage<M>::load(v + i);
    float vmi = AMS ? vm[i] : 0.0f;
    adam_element<float, AMS, MAX, COUPLED, SCALED>(pi, Storage<P>::load(g + i), mi, vi, vmi, sc);
    const float nw = store_param<P, PR>(p + i, comp + i, pi, key_p, static_cast<uint64_t>(i));
    if constexpr (SF == kBF16) {
      m[i].x = float_to_bf16_stochastic(mi, random_bits(key_m, static_cast<uint64_t>(i)));
      v[i].x = float_to_bf16_stochastic(vi, random_bits(key_v, static_cast<uint64_t>(i)));
    } else {
      m[i] = mi;
      v[i] = vi;
    }
    if (AMS) vm[i] = vmi;
    if constexpr (ST) add_squares(nw, old, aw[lane], ad[lane]);
  };
  if constexpr (ST) {
    stats_chunks<float>(w, begin, end, elem);
  } else {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) elem(i, 0, nullptr, nullptr);
  }
}

// int8 state over blocks [kb, ke): dequantize, update (param written in the same pass), new
// absmax of the block's m and v, quantize. The block's values wait in two small local buffers.
// FMAP: the maps are quant's "float3" maps, decoded and searched with integer operations
// (float_map_value_* / float_map_code_*); otherwise table loads and a search of the midpoints.
// Measured on a 2-core AVX2 EPYC (Zen 3), one thread, L2-resident block loop: the table path
// costs ~2x the fp32 element math, the bit path ~1.3x.
template <typename P, bool MAX, bool COUPLED, bool SCALED, int PR, bool FMAP>
inline __attribute__((always_inline)) void int8_blocks(const TensorWork& w,
                                                       const StepScalars<float>& s, int64_t kb,
                                                       int64_t ke) {
  const float* __restrict code_m = w.tables + kCodeM;
  const float* __restrict mid_m = w.tables + kMidM;
  const float* __restrict code_v = w.tables + kCodeV;
  const float* __restrict mid_v = w.tables + kMidV;
  const StepScalars<float> sc = s;
  const uint32_t key_p = w.key_p;
  alignas(64) float mb[kInt8Block];
  alignas(64) float vb[kInt8Block];
  for (int64_t k = kb; k < ke; ++k) {
    const int64_t row = k / w.blocks_per_row;
    const int64_t col = (k - row * w.blocks_per_row) * kInt8Block;
    const int64_t start = row * w.row_len + col;
    const int len = static_cast<int>(std::min<int64_t>(kInt8Block, w.row_len - col));
    P* __restrict p = static_cast<P*>(w.p) + start;
    const P* __restrict g = static_cast<const P*>(w.g) + start;
    uint8_t* __restrict qm = static_cast<uint8_t*>(w.m) + start;
    uint8_t* __restrict qv = static_cast<uint8_t*>(w.v) + start;
    Bf16* __restrict comp = static_cast<Bf16*>(w.comp) + (w.comp ? start : 0);
    const float am = w.absmax_m[k];
    const float av = w.absmax_v[k];
    // The codes are widened to 32 bits in a loop of their own (and narrowed back in one): with
    // bytes in the update loop gcc vectorizes it with 16-byte vectors only (seen in the avx2
    // variant's code); 32-bit lanes throughout get it 32-byte vectors, as the fp32 loop.
    alignas(64) uint32_t cm[kInt8Block];
    alignas(64) uint32_t cv[kInt8Block];
#pragma omp simd
    for (int i = 0; i < len; ++i) {
      cm[i] = qm[i];
      cv[i] = qv[i];
    }
    uint32_t bm = 0, bv = 0;
#pragma omp simd reduction(max : bm, bv)
    for (int i = 0; i < len; ++i) {
      float pi = load_param<P, PR>(p + i, comp + i);
      float mi, vi;
      if constexpr (FMAP) {
        mi = op_mul(float_map_value_m(cm[i]), am);
        vi = op_mul(float_map_value_v(cv[i]), av);
      } else {
        mi = dequantize_code(cm[i], am, code_m);
        vi = dequantize_code(cv[i], av, code_v);
      }
      float unused = 0.0f;
      adam_element<float, false, MAX, COUPLED, SCALED>(pi, Storage<P>::load(g + i), mi, vi, unused, sc);
      store_param<P, PR>(p + i, comp + i, pi, key_p, static_cast<uint64_t>(start + i));
      mb[i] = mi;
      vb[i] = vi;
      bm = std::max(bm, abs_bits(mi));
      bv = std::max(bv, abs_bits(vi));
    }
    const float nam = bits_float(bm);
    const float nav = bits_float(bv);
    const float im = block_scale(nam);
    const float iv = block_scale(nav);
    if constexpr (FMAP) {
#pragma omp simd
      for (int i = 0; i < len; ++i) {
        cm[i] = float_map_code_m(op_mul(mb[i], im));
        const float y = op_mul(vb[i], iv);
        cv[i] = keep_positive(float_map_code_v(y), y);
      }
#pragma omp simd
      for (int i = 0; i < len; ++i) {
        qm[i] = static_cast<uint8_t>(cm[i]);
        qv[i] = static_cast<uint8_t>(cv[i]);
      }
    } else if (w.index_m != nullptr) {
      // keys of x * scale (vectorized), then the table look-ups; NaN's key (INT32_MIN) clamps to
      // kKeyMin, below every midpoint: code 0, as the search gives it
      alignas(64) int32_t km[kInt8Block];
      alignas(64) int32_t kv[kInt8Block];
#pragma omp simd
      for (int i = 0; i < len; ++i) {
        km[i] = std::min(std::max(order_key(op_mul(mb[i], im)), kKeyMin), kKeyMax);
        kv[i] = std::min(std::max(order_key(op_mul(vb[i], iv)), kKeyMin), kKeyMax);
      }
      const int32_t* __restrict lo_m = w.index_m->lo.data();
      const int32_t* __restrict mk_m = w.index_m->mk;
      const int32_t* __restrict lo_v = w.index_v->lo.data();
      const int32_t* __restrict mk_v = w.index_v->mk;
      const int sh_m = w.index_m->shift, sh_v = w.index_v->shift;
#pragma omp simd
      for (int i = 0; i < len; ++i) {
        const int32_t a = km[i];
        const int32_t la = lo_m[(a - kKeyMin) >> sh_m];
        qm[i] = static_cast<uint8_t>(la + (mk_m[la] < a) + (mk_m[la + 1] < a));
        const int32_t b = kv[i];
        const int32_t lb = lo_v[(b - kKeyMin) >> sh_v];
        const int32_t qb = lb + (mk_v[lb] < b) + (mk_v[lb + 1] < b);
        qv[i] = static_cast<uint8_t>(qb + ((qb == 0) & (b > 0)));  // keep_positive: key > 0 <=> y > 0
      }
    } else {
      for (int i = 0; i < len; ++i) {
        qm[i] = static_cast<uint8_t>(quantize_code(mb[i], im, mid_m));
        const float y = op_mul(vb[i], iv);
        qv[i] = static_cast<uint8_t>(keep_positive(code_search(y, mid_v), y));
      }
    }
    w.absmax_m[k] = nam;
    w.absmax_v[k] = nav;
  }
}

#define ONEPASS_DEFINE_LOWP_ISA(NAME, TARGET)                                                     \
  template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR>            \
  __attribute__((target(TARGET))) void NAME(const TensorWork& w, int64_t b, int64_t e,          \
                                            bool stats) {                                       \
    const auto& s = *static_cast<const StepScalars<float>*>(w.scalars);                           \
    if constexpr (SF == kInt8) {                                                                  \
      if (w.float_map) /* stats: stats_block takes them, block by block */                        \
        int8_blocks<P, MAX, COUPLED, SCALED, PR, true>(w, s, b, e);                               \
      else                                                                                        \
        int8_blocks<P, MAX, COUPLED, SCALED, PR, false>(w, s, b, e);                              \
    } else if (stats) {                                                                           \
      lowp_range<P, AMS, MAX, COUPLED, SCALED, SF, PR, true>(w, s, b, e);                         \
    } else {                                                                                      \
      lowp_range<P, AMS, MAX, COUPLED, SCALED, SF, PR, false>(w, s, b, e);                        \
    }                                                                                             \
  }
ONEPASS_DEFINE_LOWP_ISA(lowp_avx512, "avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
ONEPASS_DEFINE_LOWP_ISA(lowp_avx2, "avx2,bmi2")
ONEPASS_DEFINE_LOWP_ISA(lowp_base, "default")
#undef ONEPASS_DEFINE_LOWP_ISA

template <typename P, int SF, int PR>
struct LowpKernel {
  template <bool AMS, bool MAX, bool COUPLED, bool SCALED>
  static RangeFn get(int isa) {
    if constexpr (AMS && SF != kF32) {
      return nullptr;  // amsgrad only with fp32 state (validate_batch)
    } else {
      switch (isa) {
        case kAvx512: return &lowp_avx512<P, AMS, MAX, COUPLED, SCALED, SF, PR>;
        case kAvx2: return &lowp_avx2<P, AMS, MAX, COUPLED, SCALED, SF, PR>;
        default: return &lowp_base<P, AMS, MAX, COUPLED, SCALED, SF, PR>;
      }
    }
  }
};

template <typename K, bool... B>
RangeFn pick_kernel(int isa, const bool* flags) {
  if constexpr (sizeof...(B) == 4) {
    return K::template get<B...>(isa);
  } else {
    return flags[0] ? pick_kernel<K, B..., true>(isa, flags + 1)
                    : pick_kernel<K, B..., false>(isa, flags + 1);
  }
}

// The loop for a low-precision param: dtype x state format x param rounding x flags x ISA.
RangeFn pick_lowp(at::ScalarType dtype, int sf, int pr, const bool* flags) {
  const int isa = g_isa.load(std::memory_order_relaxed);
  if (dtype == at::kBFloat16) {
    if (pr == kStochastic) {
      if (sf == kF32) return pick_kernel<LowpKernel<Bf16, kF32, kStochastic>>(isa, flags);
      if (sf == kBF16) return pick_kernel<LowpKernel<Bf16, kBF16, kStochastic>>(isa, flags);
      return pick_kernel<LowpKernel<Bf16, kInt8, kStochastic>>(isa, flags);
    }
    if (pr == kKahan) {
      if (sf == kF32) return pick_kernel<LowpKernel<Bf16, kF32, kKahan>>(isa, flags);
      if (sf == kBF16) return pick_kernel<LowpKernel<Bf16, kBF16, kKahan>>(isa, flags);
      return pick_kernel<LowpKernel<Bf16, kInt8, kKahan>>(isa, flags);
    }
    if (sf == kBF16) return pick_kernel<LowpKernel<Bf16, kBF16, kNearest>>(isa, flags);
    return pick_kernel<LowpKernel<Bf16, kInt8, kNearest>>(isa, flags);
  }
  if (dtype == at::kHalf) {
    if (sf == kBF16) return pick_kernel<LowpKernel<Fp16, kBF16, kNearest>>(isa, flags);
    return pick_kernel<LowpKernel<Fp16, kInt8, kNearest>>(isa, flags);
  }
  if (sf == kBF16) return pick_kernel<LowpKernel<float, kBF16, kNearest>>(isa, flags);
  return pick_kernel<LowpKernel<float, kInt8, kNearest>>(isa, flags);
}

// A thread walks its tensors one after another, and each new tensor starts four new streams (p, g,
// m, v) that the hardware prefetcher picks up only after a few misses. Prefetching the first
// kPrefetchLines lines of each stream of the next tensor while the current one runs cut the
// `small` case (2000 tensors of 16 KB a stream) from 5.04 to 4.54 ms a step on this 2-core Zen 3
// (interleaved A/B in one process, 20 rounds: 4 lines 4.64, 8 4.59, 12 4.54, 24 4.73 ms against
// 5.09 without); gpt2's 148 long tensors do not notice it.
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

// Statistics: gives each tensor its partial sums (one pair per chunk) and re-lays the units so
// chunks are whole; returns the new total of units.
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

// Each param's sums (reference.update_statistics): its chunks' partials in groups of
// kStatsGroup by the halving tree (float64, zero-padded), then the groups' sums added in order;
// 0 for an empty param.
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

void bump_step(const at::Tensor& st) {
  if (st.scalar_type() == at::kFloat)
    *static_cast<float*>(st.data_ptr()) += 1.0f;
  else
    *static_cast<double*>(st.data_ptr()) += 1.0;
}

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

}  // namespace

namespace {

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
        isa(g_isa.load(std::memory_order_relaxed)),
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
    return isa == g_isa.load(std::memory_order_relaxed) && flags[0] == a.amsgrad &&
           flags[1] == a.maximize && flags[2] == !a.decoupled &&
           flags[3] == a.grad_scale.has_value() && seed == static_cast<uint32_t>(a.seed);
  }

  RangeFn fn_for(at::ScalarType dt) {
    const int slot = dt == at::kFloat ? 0 : dt == at::kDouble ? 1 : dt == at::kBFloat16 ? 2 : 3;
    if (fns[slot] == nullptr) {
      if (lowp) {
        fns[slot] = pick_lowp(dt, sf, pr, flags);
      } else {
        const bool* f = flags;
        switch (slot) {
          case 0: fns[slot] = pick<float>(f[0], f[1], f[2], f[3]); break;
          case 1: fns[slot] = pick<double>(f[0], f[1], f[2], f[3]); break;
          case 2: fns[slot] = pick<Bf16>(f[0], f[1], f[2], f[3]); break;
          default: fns[slot] = pick<Fp16>(f[0], f[1], f[2], f[3]); break;
        }
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
// Reserved for every param up front, so the entries TensorWork points to never move.
struct ScalarTables {
  std::vector<StepScalars<float>> f;
  std::vector<StepScalars<double>> d;
  int64_t last_f = -1, last_d = -1;

  void reset(size_t n) {
    f.clear();
    d.clear();
    f.reserve(n);
    d.reserve(n);
    last_f = last_d = -1;
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
    w.key_p = stream_key(ctx.seed, step, kStreamParam);
    w.key_m = stream_key(ctx.seed, step, kStreamM);
    w.key_v = stream_key(ctx.seed, step, kStreamV);
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
    fill_step(w, g.data_ptr(), static_cast<int64_t>(read_step(a.steps[i])) + 1,
              p.scalar_type() == at::kDouble, sc, a, lr, grad_scale, ctx);
    w.unit_begin = units;
    units += w.units;
    work.push_back(w);
  }
  run_and_count(a, work, units);
  for (auto& pw : write_back) pw.first.copy_(pw.second);
  for (size_t i = 0; i < n; ++i) bump_step(a.steps[i]);
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
  // Every param's step count (float32 or float64, one element), read and bumped in place.
  std::vector<void*> count_data;
  std::vector<uint8_t> count_f64;

  double count(size_t i) const {
    return count_f64[i] ? *static_cast<const double*>(count_data[i])
                        : static_cast<double>(*static_cast<const float*>(count_data[i]));
  }
  void bump_counts() {
    for (size_t i = 0; i < count_data.size(); ++i) {
      if (count_f64[i]) *static_cast<double*>(count_data[i]) += 1.0;
      else *static_cast<float*>(count_data[i]) += 1.0f;
    }
  }
};

std::shared_ptr<PlannedWalk> make_planned_walk(const BatchArgs& a) {
  auto pw = std::make_shared<PlannedWalk>(a);
  const size_t n = a.params.size();
  pw->work.reserve(n);
  for (const at::Tensor& st : a.steps) {
    pw->count_data.push_back(st.data_ptr());
    pw->count_f64.push_back(st.scalar_type() == at::kDouble);
  }
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
  if (counts_unchecked)
    for (size_t i = 0; i < a.params.size(); ++i) check_step_value(pw->count(i), i);
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
    const at::Tensor& g = a.grads[i];
    if (!in_walk_layout(g, p, pw->ctx.int8)) {  // this step's grad needs a copy: nothing written yet
      step_walk(a);
      return;
    }
    fill_step(pw->work[k], raw_data(g), static_cast<int64_t>(pw->count(i)) + 1,
              p.scalar_type() == at::kDouble, pw->sc, a, lr, grad_scale, pw->ctx);
  }
  run_and_count(a, pw->work, pw->units);
  pw->bump_counts();
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

std::string cpu_isa_get() { return kIsaNames[g_isa.load()]; }

std::vector<std::string> cpu_isa_supported() {
  std::vector<std::string> out;
  for (int i = 0; i <= g_best_isa; ++i) out.emplace_back(kIsaNames[i]);
  return out;
}

void cpu_isa_set(const std::string& name) {
  for (int i = 0; i <= 2; ++i) {
    if (name == kIsaNames[i]) {
      ONEPASS_CHECK(i <= g_best_isa, "onepass: this CPU does not support ", name,
                  " (best: ", kIsaNames[g_best_isa], ")");
      g_isa.store(i);
      return;
    }
  }
  ONEPASS_CHECK(false, "onepass: unknown CPU ISA '", name, "' (choose baseline, avx2 or avx512)");
}

TORCH_LIBRARY_IMPL(onepass, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("adam_check", &adam_check_cpu);
  m.impl("adam_step_lowp_", &adam_step_lowp_cpu);
  m.impl("adam_check_lowp", &adam_check_lowp_cpu);
  m.impl("adam_step_stats_", &adam_step_stats_cpu);
}

}  // namespace onepass
