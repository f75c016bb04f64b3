// The CPU loops of low-precision state and params: bf16 state, stochastic / Kahan bf16 params,
// int8 state. Same element math (adam_element) as loops_full.cpp and the same three ISA
// variants; only the loads and stores around it differ.
#include "bf16_state_avx2.h"
#include "code_index.h"
#include "int8_block_avx2.h"
#include "int8_block_avx512.h"
#include "bf16_state_avx512.h"
#include "isa.h"
#include "stats.h"
#include "work.h"

#include <type_traits>

namespace onepass {
namespace cpu {
namespace {

// Same element math (adam_element); only the loads and stores around it differ. SF: how the
// moments are stored; PR: how the param is written. Element index (random streams) = the
// element's position in the walk: storage order of a dense param, row-major for a working copy
// and for int8 (reference.element_index).

// Writes the new param value `pv` of element `idx` (and its Kahan compensation); returns the
// value as stored, widened to float. Stochastic rounding: its random bits are
// random_bits_lo(rkey, idx_lo), rkey the param stream's range_key for idx.
template <typename P, int PR>
inline __attribute__((always_inline)) float store_param(P* p, Bf16* comp, float pv, uint32_t rkey,
                                                        uint32_t idx_lo) {
  if constexpr (PR == kStochastic) {
    const uint16_t stored = float_to_bf16_stochastic(pv, random_bits_lo(rkey, idx_lo));
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

// The end of the 2**32 block of element indices holding `i`, or `end` if that comes first: a range
// of one such block has one range_key per stream and 32-bit index lanes.
inline __attribute__((always_inline)) int64_t index_block_end(int64_t i, int64_t end) {
  return std::min<int64_t>(end, ((i >> 32) + 1) << 32);
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
  // the streams' keys for the current range of indices (range_key: set below per 2**32 block)
  uint32_t key_p = 0, key_mv = 0;
  const StepScalars<float> sc = s;
  auto elem = [&](int64_t i, int64_t lane, float* aw, float* ad) __attribute__((always_inline)) {
    const uint32_t lo = static_cast<uint32_t>(i);
    const float old = Storage<P>::load(p + i);  // as stored (Kahan: without the compensation)
    float pi = load_param<P, PR>(p + i, comp + i);
    float mi = Storage<M>::load(m + i);
    float vi = Storage<M>::load(v + i);
    float vmi = AMS ? vm[i] : 0.0f;
    adam_element<float, AMS, MAX, COUPLED, SCALED>(pi, Storage<P>::load(g + i), mi, vi, vmi, sc);
    const float nw = store_param<P, PR>(p + i, comp + i, pi, key_p, lo);
    if constexpr (SF == kBF16) {
      const uint32_t draw = random_bits_lo(key_mv, lo);
      m[i].x = float_to_bf16_stochastic(mi, draw);
      v[i].x = float_to_bf16_stochastic(vi, v_bits(draw));
    } else {
      m[i] = mi;
      v[i] = vi;
    }
    if (AMS) vm[i] = vmi;
    if constexpr (ST) add_squares(nw, old, aw[lane], ad[lane]);
  };
  // Ranges within one 2**32 block of indices (every range of a tensor under 2**32 elements; a
  // block boundary is a multiple of the statistics chunk), counted by a 32-bit j: the random
  // bits' index is then 32-bit lanes (uint32(i) of begin + j narrows to them), with the high
  // half in the keys.
  for (int64_t b0 = begin; b0 < end;) {
    const int64_t b1 = index_block_end(b0, end);
    key_p = range_key(w.key_p, static_cast<uint64_t>(b0));
    key_mv = range_key(w.key_moments, static_cast<uint64_t>(b0));
    if constexpr (ST) {
      stats_chunks<float>(w, b0, b1, elem);
    } else {
      const uint32_t n = static_cast<uint32_t>(b1 - b0);
#pragma omp simd
      for (uint32_t j = 0; j < n; ++j) elem(b0 + static_cast<int64_t>(j), 0, nullptr, nullptr);
    }
    b0 = b1;
  }
}

// Where int8 block k of a tensor starts (its element index) and how many elements it holds: blocks
// run along rows (reference.quantize_blocks), the last of a row is short when the row is.
struct Int8BlockAt {
  int64_t start;
  int len;
};
inline __attribute__((always_inline)) Int8BlockAt int8_block_at(const TensorWork& w, int64_t k) {
  const int64_t row = k / w.blocks_per_row;
  const int64_t col = (k - row * w.blocks_per_row) * kInt8Block;
  return {row * w.row_len + col, static_cast<int>(std::min<int64_t>(kInt8Block, w.row_len - col))};
}

// int8 state over blocks [kb, ke): dequantize, update (param written in the same pass), new
// absmax of the block's m and v, quantize. The block's values wait in two small local buffers.
// FMAP: the maps are quant's "float3" maps, decoded and searched with integer operations
// (float_map_value_* / float_map_code_*); otherwise table loads and a search of the midpoints.
// Measured on a 2-core AVX2 EPYC (Zen 3), one thread, L2-resident block loop: the table path
// costs ~2x the fp32 element math, the bit path ~1.3x (int8_blocks_avx2 takes fp32 params'
// blocks under the float3 maps where AVX2 is present).
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
    const auto [start, len] = int8_block_at(w, k);
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
      const uint64_t idx = static_cast<uint64_t>(start + i);
      store_param<P, PR>(p + i, comp + i, pi, range_key(key_p, idx), static_cast<uint32_t>(idx));
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
        cv[i] = float_map_code_v_kept(op_mul(vb[i], iv));
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

// The param types the hand-written AVX2 loops take (bf16x8_avx2.h: load8, store8), rounded to
// nearest: fp32 and bf16 (fp16 params keep the compiled loops).
template <typename P>
constexpr bool kHandParams = std::is_same_v<P, float> || std::is_same_v<P, Bf16>;

// int8_blocks for fp32 or bf16 params with nearest rounding under the float3 maps, where AVX2 is
// present: whole blocks by hand (int8_block_avx2), a row's short last block by int8_blocks.
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx2"))) void int8_blocks_avx2(
    const TensorWork& w, const StepScalars<float>& s, int64_t kb, int64_t ke) {
  const StepScalars<F8> sc = step_scalars_f8(s);
  for (int64_t k = kb; k < ke; ++k) {
    const auto [start, len] = int8_block_at(w, k);
    if (len < kInt8Block) {
      int8_blocks<P, MAX, COUPLED, SCALED, kNearest, true>(w, s, k, k + 1);
      continue;
    }
    int8_block_avx2<P, MAX, COUPLED, SCALED>(
        static_cast<P*>(w.p) + start, static_cast<const P*>(w.g) + start,
        static_cast<uint8_t*>(w.m) + start, static_cast<uint8_t*>(w.v) + start, w.absmax_m + k,
        w.absmax_v + k, sc);
  }
}

// int8_blocks_avx2 with AVX-512's 16-lane block (int8_block_avx512.h), where the CPU has it.
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq"))) void
int8_blocks_avx512(const TensorWork& w, const StepScalars<float>& s, int64_t kb, int64_t ke) {
  const StepScalars<F16> sc = step_scalars_f16(s);
  for (int64_t k = kb; k < ke; ++k) {
    const auto [start, len] = int8_block_at(w, k);
    if (len < kInt8Block) {
      int8_blocks<P, MAX, COUPLED, SCALED, kNearest, true>(w, s, k, k + 1);
      continue;
    }
    int8_block_avx512<P, MAX, COUPLED, SCALED>(
        static_cast<P*>(w.p) + start, static_cast<const P*>(w.g) + start,
        static_cast<uint8_t*>(w.m) + start, static_cast<uint8_t*>(w.v) + start, w.absmax_m + k,
        w.absmax_v + k, sc);
  }
}

// A range's last few elements (fewer than 8) for lowp_range_bf16_avx2, out of line: inlined (with
// the statistics' range), their copy of the step's scalars went into every call's prologue: a
// 16-element tensor's call took 261 instructions, 231 with both out of line (callgrind of
// bench/host_time.py's bf16 case, 2000 tensors, one thread).
template <typename P, bool MAX, bool COUPLED, bool SCALED>
__attribute__((noinline, target("avx2"))) void lowp_tail_bf16_avx2(const TensorWork& w,
                                                                  const StepScalars<float>& s,
                                                                  int64_t begin, int64_t end) {
  lowp_range<P, false, MAX, COUPLED, SCALED, kBF16, kNearest, false>(w, s, begin, end);
}

// lowp_range for fp32 or bf16 params with bf16 moments (nearest rounding, no amsgrad, no
// statistics) where AVX2 is present: runs of 8 elements by hand (bf16_state_avx2, fp32 params:
// 0.71 against 0.87 ns an element, bench/stage_cost.sh), within each 2**32 block of indices (the
// range keys' span); a block's last few by lowp_range.
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx2"))) void lowp_range_bf16_avx2(
    const TensorWork& w, const StepScalars<float>& s, int64_t begin, int64_t end) {
  const StepScalars<F8> sc = step_scalars_f8(s);
  P* p = static_cast<P*>(w.p);
  const P* g = static_cast<const P*>(w.g);
  Bf16* m = static_cast<Bf16*>(w.m);
  Bf16* v = static_cast<Bf16*>(w.v);
  for (int64_t i = begin; i < end;) {
    const int64_t b1 = index_block_end(i, end);
    const int64_t n8 = (b1 - i) & ~int64_t(7);
    const uint64_t at = static_cast<uint64_t>(i);
    bf16_state_avx2<P, MAX, COUPLED, SCALED>(p + i, g + i, m + i, v + i, n8,
                                             static_cast<uint32_t>(at),
                                             range_key(w.key_moments, at), sc);
    if (i + n8 < b1) lowp_tail_bf16_avx2<P, MAX, COUPLED, SCALED>(w, s, i + n8, b1);
    i = b1;
  }
}

// lowp_range_bf16_avx2 with 16-lane runs (bf16_state_avx512), where the CPU has AVX-512.
template <typename P, bool MAX, bool COUPLED, bool SCALED>
inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq"))) void
lowp_range_bf16_avx512(const TensorWork& w, const StepScalars<float>& s, int64_t begin,
                       int64_t end) {
  const StepScalars<F16> sc = step_scalars_f16(s);
  P* p = static_cast<P*>(w.p);
  const P* g = static_cast<const P*>(w.g);
  Bf16* m = static_cast<Bf16*>(w.m);
  Bf16* v = static_cast<Bf16*>(w.v);
  for (int64_t i = begin; i < end;) {
    const int64_t b1 = index_block_end(i, end);
    const int64_t n8 = (b1 - i) & ~int64_t(7);
    const uint64_t at = static_cast<uint64_t>(i);
    bf16_state_avx512<P, MAX, COUPLED, SCALED>(p + i, g + i, m + i, v + i, n8,
                                               static_cast<uint32_t>(at),
                                               range_key(w.key_moments, at), sc, s);
    if (i + n8 < b1) lowp_tail_bf16_avx2<P, MAX, COUPLED, SCALED>(w, s, i + n8, b1);
    i = b1;
  }
}

// (the statistics' range out of line, as lowp_tail_bf16_avx2 and for the same reason)
#define ONEPASS_DEFINE_LOWP_ISA(NAME, TARGET, AVX2, AVX512)                                       \
  template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR>            \
  __attribute__((noinline, target(TARGET))) void NAME##_stats(const TensorWork& w, int64_t b,    \
                                                              int64_t e) {                      \
    const auto& s = *static_cast<const StepScalars<float>*>(w.scalars);                           \
    lowp_range<P, AMS, MAX, COUPLED, SCALED, SF, PR, true>(w, s, b, e);                           \
  }                                                                                               \
  template <typename P, bool AMS, bool MAX, bool COUPLED, bool SCALED, int SF, int PR>            \
  __attribute__((target(TARGET))) void NAME(const TensorWork& w, int64_t b, int64_t e,          \
                                            bool stats) {                                       \
    const auto& s = *static_cast<const StepScalars<float>*>(w.scalars);                           \
    if constexpr (SF == kInt8) { /* stats: stats_block takes them, block by block */              \
      if (!w.float_map)                                                                           \
        int8_blocks<P, MAX, COUPLED, SCALED, PR, false>(w, s, b, e);                              \
      else if constexpr (AVX512 && kHandParams<P> && PR == kNearest)                              \
        int8_blocks_avx512<P, MAX, COUPLED, SCALED>(w, s, b, e);                                  \
      else if constexpr (AVX2 && kHandParams<P> && PR == kNearest)                                \
        int8_blocks_avx2<P, MAX, COUPLED, SCALED>(w, s, b, e);                                    \
      else                                                                                        \
        int8_blocks<P, MAX, COUPLED, SCALED, PR, true>(w, s, b, e);                               \
    } else if (stats) {                                                                           \
      NAME##_stats<P, AMS, MAX, COUPLED, SCALED, SF, PR>(w, b, e);                                \
    } else if constexpr (AVX512 && SF == kBF16 && kHandParams<P> && PR == kNearest && !AMS) {    \
      lowp_range_bf16_avx512<P, MAX, COUPLED, SCALED>(w, s, b, e);                                \
    } else if constexpr (AVX2 && SF == kBF16 && kHandParams<P> && PR == kNearest && !AMS) {      \
      lowp_range_bf16_avx2<P, MAX, COUPLED, SCALED>(w, s, b, e);                                  \
    } else {                                                                                      \
      lowp_range<P, AMS, MAX, COUPLED, SCALED, SF, PR, false>(w, s, b, e);                        \
    }                                                                                             \
  }
ONEPASS_DEFINE_LOWP_ISA(lowp_avx512, "avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512",
                        true, true)
ONEPASS_DEFINE_LOWP_ISA(lowp_avx2, "avx2,bmi2", true, false)
ONEPASS_DEFINE_LOWP_ISA(lowp_base, "default", false, false)
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

}  // namespace

RangeFn pick_lowp(at::ScalarType dtype, int sf, int pr, const bool* flags) {
  const int isa = current_isa();
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

}  // namespace cpu
}  // namespace onepass
