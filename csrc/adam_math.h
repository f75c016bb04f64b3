// The element math of onepass in C++, stated once for the CPU and the CUDA kernels.
//
// This is the C++ twin of python/onepass/reference.py: same operations, same order, so every
// backend gives the bits of the reference (ARCHITECTURE.md sections 2-3). Rules kept here:
//  * every floating-point operation is one correctly rounded IEEE operation: the host build uses
//    -ffp-contract=off (no FMA contraction) and -fno-math-errno (so sqrt vectorizes, still IEEE);
//    device code calls the explicit round-to-nearest intrinsics, which nvcc never contracts;
//  * per-step scalars are computed in double from the step count with multiplications only
//    (pow_int) and rounded once to the math type;
//  * bf16/fp16 storage is converted bitwise, rounding to nearest even, so host and device agree
//    without depending on a library's conversion routine.
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ONEPASS_HD __host__ __device__ __forceinline__
#else
#define ONEPASS_HD inline __attribute__((always_inline))
#endif

namespace onepass {

// ---- correctly rounded operations -------------------------------------------------------------
#if defined(__CUDA_ARCH__)
ONEPASS_HD float op_add(float a, float b) { return __fadd_rn(a, b); }
ONEPASS_HD float op_sub(float a, float b) { return __fsub_rn(a, b); }
ONEPASS_HD float op_mul(float a, float b) { return __fmul_rn(a, b); }
ONEPASS_HD float op_div(float a, float b) { return __fdiv_rn(a, b); }
ONEPASS_HD float op_sqrt(float a) { return __fsqrt_rn(a); }
ONEPASS_HD double op_add(double a, double b) { return __dadd_rn(a, b); }
ONEPASS_HD double op_sub(double a, double b) { return __dsub_rn(a, b); }
ONEPASS_HD double op_mul(double a, double b) { return __dmul_rn(a, b); }
ONEPASS_HD double op_div(double a, double b) { return __ddiv_rn(a, b); }
ONEPASS_HD double op_sqrt(double a) { return __dsqrt_rn(a); }
#else
template <typename T> ONEPASS_HD T op_add(T a, T b) { return a + b; }
template <typename T> ONEPASS_HD T op_sub(T a, T b) { return a - b; }
template <typename T> ONEPASS_HD T op_mul(T a, T b) { return a * b; }
template <typename T> ONEPASS_HD T op_div(T a, T b) { return a / b; }
ONEPASS_HD float op_sqrt(float a) { return __builtin_sqrtf(a); }
ONEPASS_HD double op_sqrt(double a) { return __builtin_sqrt(a); }
#endif

// max that propagates NaN from either side, like torch.maximum.
template <typename T> ONEPASS_HD T op_max(T a, T b) { return (a > b || a != a) ? a : b; }

// ---- per-step scalars ---------------------------------------------------------------------------
// base**n with multiplications only; the same sequence as reference.pow_int.
ONEPASS_HD double pow_int(double base, int64_t n) {
  double result = 1.0;
  while (n > 0) {
    if (n & 1) result = op_mul(result, base);
    base = op_mul(base, base);
    n >>= 1;
  }
  return result;
}

template <typename T>
struct StepScalars {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, inv_bc2_sqrt;
  T grad_scale;  // divides the gradient when a GradScaler hands one over (else unused)
};

// The bias corrections of count `step` (after the increment), float64: 1 - beta1**step, and
// 1 / sqrt(1 - beta2**step) (reference.step_scalars' bc1 and inv_bc2_sqrt).
ONEPASS_HD double bias_correction1(double beta1, int64_t step) {
  return op_sub(1.0, pow_int(beta1, step));
}
ONEPASS_HD double inv_bc2_sqrt(double beta2, int64_t step) {
  return op_div(1.0, op_sqrt(op_sub(1.0, pow_int(beta2, step))));
}

// The twin of reference.step_scalars, rounded once to T. `step` is the count after increment.
template <typename T>
ONEPASS_HD StepScalars<T> make_step_scalars(int64_t step, double lr, double beta1, double beta2,
                                            double eps, double weight_decay, bool decoupled,
                                            double grad_scale) {
  const double bc1 = bias_correction1(beta1, step);
  StepScalars<T> s;
  s.beta1 = static_cast<T>(beta1);
  s.one_minus_beta1 = static_cast<T>(op_sub(1.0, beta1));
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(op_sub(1.0, beta2));
  s.eps = static_cast<T>(eps);
  s.weight_decay = static_cast<T>(weight_decay);
  s.decay = decoupled ? static_cast<T>(op_sub(1.0, op_mul(lr, weight_decay))) : static_cast<T>(1.0);
  s.step_size = static_cast<T>(op_div(lr, bc1));
  s.inv_bc2_sqrt = static_cast<T>(inv_bc2_sqrt(beta2, step));
  s.grad_scale = static_cast<T>(grad_scale);
  return s;
}

// ---- the element update ---------------------------------------------------------------------------
// One element of Adam(W), in the order of reference.py. T is the math type (float or double).
template <typename T, bool AMSGRAD, bool MAXIMIZE, bool COUPLED, bool SCALED>
ONEPASS_HD void adam_element(T& p, T g, T& m, T& v, T& v_max, const StepScalars<T>& s) {
  if (SCALED) g = op_div(g, s.grad_scale);
  if (MAXIMIZE) g = -g;
  if (COUPLED) g = op_add(g, op_mul(s.weight_decay, p));
  m = op_add(op_mul(s.beta1, m), op_mul(s.one_minus_beta1, g));
  v = op_add(op_mul(s.beta2, v), op_mul(s.one_minus_beta2, op_mul(g, g)));
  T vh = v;
  if (AMSGRAD) {
    vh = op_max(v_max, v);
    v_max = vh;
  }
  const T denom = op_add(op_mul(op_sqrt(vh), s.inv_bc2_sqrt), s.eps);
  p = op_sub(op_mul(p, s.decay), op_mul(s.step_size, op_div(m, denom)));
}

// ---- storage conversions (bitwise, round to nearest even) ---------------------------------------
ONEPASS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
ONEPASS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

ONEPASS_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

ONEPASS_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN, as c10::BFloat16 writes it
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

ONEPASS_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    // subnormal or zero: m * 2**-24 is exact in float
    const float mag = op_mul(static_cast<float>(m), 5.9604644775390625e-8f);
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

ONEPASS_HD uint16_t float_to_fp16(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf (65504 is the largest)
  if (ax >= 0x38800000u) {                        // normal half (>= 2**-14): round at bit 13
    const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
    return sign | static_cast<uint16_t>((r - 0x38000000u) >> 13);
  }
  const uint32_t e = ax >> 23;
  if (e < 102) return sign;  // below 2**-25: rounds to zero (2**-25 itself ties to even zero)
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24: units of 2**-24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  return sign | static_cast<uint16_t>(q);
}

// Storage tags: how a param element is loaded into / stored from the math type.
struct Bf16 { uint16_t x; };
struct Fp16 { uint16_t x; };

template <typename P> struct Storage;
template <> struct Storage<float> {
  using math_t = float;
  static ONEPASS_HD float load(const float* p) { return *p; }
  static ONEPASS_HD void store(float* p, float v) { *p = v; }
};
template <> struct Storage<double> {
  using math_t = double;
  static ONEPASS_HD double load(const double* p) { return *p; }
  static ONEPASS_HD void store(double* p, double v) { *p = v; }
};
template <> struct Storage<Bf16> {
  using math_t = float;
  static ONEPASS_HD float load(const Bf16* p) { return bf16_to_float(p->x); }
  static ONEPASS_HD void store(Bf16* p, float v) { p->x = float_to_bf16(v); }
};
template <> struct Storage<Fp16> {
  using math_t = float;
  static ONEPASS_HD float load(const Fp16* p) { return fp16_to_float(p->x); }
  static ONEPASS_HD void store(Fp16* p, float v) { p->x = float_to_fp16(v); }
};

// ---- low-precision storage: random bits, stochastic rounding, 8-bit codes ------------------------
// The twins of reference.mix32 / stream_key / random_bits / moment_bits / round_bf16_stochastic /
// quantize_blocks / dequantize_blocks (module docstring "Storage"). Integer arithmetic is uint32
// (mod 2**32, as the reference masks it), so host and device give the same bits.
constexpr uint32_t kMix1 = 0x21F0AAADu;
constexpr uint32_t kMix2 = 0x735A2D97u;
constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kHiMult = 0x85EBCA6Bu;
constexpr uint32_t kStreamParam = 0, kStreamMoments = 1;
constexpr int kInt8Block = 256;  // reference.INT8_BLOCK
// Offsets into quant.tables(): signed codes, signed midpoints, unsigned codes, unsigned midpoints.
constexpr int kCodeM = 0, kMidM = 256, kCodeV = 511, kMidV = 767, kTablesLen = 1022;

ONEPASS_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix1;
  x ^= x >> 15;
  x *= kMix2;
  x ^= x >> 15;
  return x;
}

// The key of one random stream at one step (host side, once per tensor and step); `step` is the
// count after the increment.
ONEPASS_HD uint32_t stream_key(uint32_t seed, int64_t step, uint32_t stream) {
  return mix32(seed + kGolden * (static_cast<uint32_t>(step) * 4u + stream));
}

// The random bits of element `index` of a stream as two parts: the key with the index's high half
// folded in (range_key: the same for every index of one 2**32 block), and the low half. A loop
// over a range within one such block hashes 32-bit lanes only (64-bit index lanes made the CPU's
// bf16 stochastic rounding 0.35 instead of 0.25 ns a value: bench/stage_cost.cpp).
ONEPASS_HD uint32_t range_key(uint32_t key, uint64_t index) {
  return key ^ (static_cast<uint32_t>(index >> 32) * kHiMult);
}
ONEPASS_HD uint32_t random_bits_lo(uint32_t range_key, uint32_t index_lo) {
  return mix32(index_lo ^ range_key);
}

// 32 random bits for element `index` of a stream.
ONEPASS_HD uint32_t random_bits(uint32_t key, uint64_t index) {
  return random_bits_lo(range_key(key, index), static_cast<uint32_t>(index));
}

// reference.moment_bits: the two bf16 moments round with one draw of the moments' stream, m with
// its low 16 bits (the draw itself: float_to_bf16_stochastic reads the low 16), v with these.
ONEPASS_HD uint32_t v_bits(uint32_t moment_draw) { return moment_draw >> 16; }

// float -> bf16 bits, rounding up in magnitude with probability (dropped bits) / 2**16: the low
// 16 random bits are added to the float's bit pattern and the low half is cut off (no carry out of
// 32 bits for finite values). Non-finite values round to nearest (float_to_bf16): an infinity's
// low half is zero, so the sum leaves it as it is, and only NaN needs its own value (0x7fc0, as
// float_to_bf16 writes it). Testing for NaN alone instead of selecting float_to_bf16's whole
// rounding for every non-finite value halved the vectorized cost (0.64 -> 0.35 ns a value).
ONEPASS_HD uint16_t float_to_bf16_stochastic(float f, uint32_t bits) {
  const uint32_t u = float_bits(f);
  const uint16_t sr = static_cast<uint16_t>((u + (bits & 0xffffu)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>(0x7fc0) : sr;
}

// The code of a value already divided by its absmax: the number of the 255 sorted midpoints
// below x (branchless binary search; NaN compares false everywhere and gets code 0).
ONEPASS_HD uint32_t code_search(float x, const float* mid) {
  // Comparisons turned into integers (no branches, no selects): the loop around this vectorizes
  // into gathers and compares, and mispredicted branches would cost far more than the search.
  uint32_t q = static_cast<uint32_t>(mid[127] < x) << 7;
  q += static_cast<uint32_t>(mid[q + 63] < x) << 6;
  q += static_cast<uint32_t>(mid[q + 31] < x) << 5;
  q += static_cast<uint32_t>(mid[q + 15] < x) << 4;
  q += static_cast<uint32_t>(mid[q + 7] < x) << 3;
  q += static_cast<uint32_t>(mid[q + 3] < x) << 2;
  q += static_cast<uint32_t>(mid[q + 1] < x) << 1;
  q += static_cast<uint32_t>(mid[q] < x);
  return q;
}

// The code of x in a block whose scale (block_scale) is `inv`: x * inv (one multiply), then
// code_search.
ONEPASS_HD uint32_t quantize_code(float x, float inv, const float* mid) {
  return code_search(op_mul(x, inv), mid);
}

// A float's order-preserving integer key: a < b (floats, neither NaN) <=> key(a) < key(b) (signed
// integers), with -0 and +0 both 0 and NaN below everything (INT32_MIN), so that counting the
// midpoints whose key is below key(x) is code_search(x, mid), NaN -> 0 included. Integer
// comparisons let the CPU kernel's search loops vectorize (float compares may trap).
ONEPASS_HD int32_t order_key(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(x);
#else
  const uint32_t u = __builtin_bit_cast(uint32_t, x);  // vectorizes where memcpy of a value may not
#endif
  const int32_t a = static_cast<int32_t>(u & 0x7fffffffu);
  const int32_t k = (u >> 31) ? -a : a;
  return a > 0x7f800000 ? INT32_MIN : k;
}

// The code of a second-moment value y = v * (1 / absmax): the search's code q, but never code 0
// (zero) for a positive y (reference.quantize_blocks, keep_positive). A v that dequantizes to 0
// while its m keeps a code turns the next small or zero gradient into a step of lr * m / eps,
// thousands of times the usual one (the failure of blockwise 8-bit optimizers that the main
// job's accuracy protocol shows); the smallest code instead bounds |m| / sqrt(v) near 1.
// (Bitwise &, not &&: the CPU kernel's code loops stay vectorized; with && they ran 3x slower.)
ONEPASS_HD uint32_t keep_positive(uint32_t q, float y) {
  return q + static_cast<uint32_t>((q == 0u) & (y > 0.0f));
}

// code[q] * absmax (one multiply).
ONEPASS_HD float dequantize_code(uint32_t q, float absmax, const float* code) {
  return op_mul(code[q], absmax);
}

// ---- the "float3" maps of onepass.quant (quant._float(signed, 3)), decoded and searched by bits --
// Their codes are the float32 numbers with 3 fraction bits (low 20 bits zero) counted down from
// 1.0 in bit-pattern steps of 2**20: unsigned code q > 0 is pattern kFmTop - (255 - q), code 0 is
// 0; signed code q > 128 is pattern kFmTop - (255 - q), q < 128 is minus pattern kFmTop - q, and
// 128 is 0. Within a binade the values are evenly spaced and the step into the next binade is
// the same pattern step, so the midpoint of two neighbouring codes is their patterns' midpoint:
// the nearest code of a float is its bit pattern rounded at bit 20, with the reference's tie
// rule (ties to the lower code: down in magnitude for x > 0, up for x < 0). Below the smallest
// code the choice is between it and 0, at half its value. NaN gets code 0 (its count of
// midpoints below), +-inf and values above 1 the extreme codes. These equal quantize_code's
// table search bit for bit (verified on all 2**32 floats, and by tests/backends/test_lowp_cpu.py
// on every midpoint and its neighbours), with integer operations only: no table loads.
constexpr uint32_t kFmOne = 0x3F800000u;              // 1.0f
constexpr int kFmShift = 20;                           // 23 - 3 fraction bits
constexpr int32_t kFmTop = int32_t(kFmOne >> kFmShift);  // pattern of 1.0
constexpr int32_t kFmLowV = kFmTop - 254;              // smallest unsigned code's pattern
constexpr int32_t kFmLowP = kFmTop - 126;              // smallest positive signed code's pattern
constexpr int32_t kFmLowN = kFmTop - 127;              // smallest negative signed code's pattern
// half the smallest code of each kind, as bits: the rounding threshold to 0
constexpr int32_t kFmHalfV = int32_t(uint32_t(kFmLowV) << kFmShift) - 0x00800000;
constexpr int32_t kFmHalfP = int32_t(uint32_t(kFmLowP) << kFmShift) - 0x00800000;
constexpr int32_t kFmHalfN = int32_t(uint32_t(kFmLowN) << kFmShift) - 0x00800000;

ONEPASS_HD float float_map_value_v(uint32_t q) {
  const uint32_t b = kFmOne - ((255u - q) << kFmShift);
  return bits_float(q != 0u ? b : 0u);
}

// Signed: code q > 128 is pattern kFmTop - 255 + q, q < 128 is minus pattern kFmTop - q (the sign
// bit plus kFmOne minus q steps), 128 is 0. Written as one add or subtract of q << 20 each.
ONEPASS_HD float float_map_value_m(uint32_t q) {
  const uint32_t t = q << kFmShift;
  const uint32_t b = q > 128u ? (kFmOne - (255u << kFmShift)) + t : (0x80000000u + kFmOne) - t;
  return bits_float(q != 128u ? b : 0u);
}

ONEPASS_HD int32_t fm_clamp(int32_t r, int32_t lo) { return r < lo ? lo : (r > kFmTop ? kFmTop : r); }

ONEPASS_HD uint32_t float_map_code_v(float y) {
  const int32_t u = static_cast<int32_t>(float_bits(y));  // negative (sign set) -> below everything
  const int32_t r = static_cast<int32_t>((static_cast<uint32_t>(u) + 0x7ffffu) >> kFmShift);
  const bool nonzero = u > kFmHalfV && u <= 0x7f800000;    // not NaN
  return nonzero ? static_cast<uint32_t>(fm_clamp(r, kFmLowV) - kFmLowV + 1) : 0u;
}

// keep_positive(float_map_code_v(y), y), the int8 store's v code, in 9 vector operations instead
// of ~15: the codes kept above 0 are exactly those of the positive, non-NaN y (signed-integer
// patterns in (0, inf's]), and each of those gets the clamped rank, at least 1 (a y below half the
// smallest code is clamped up to it, which is what keep_positive gives it). Equal on all 2**32
// inputs (tests/backends/float_map_test.cpp); the CPU's v encode 0.48 -> 0.23 ns a value
// (bench/stage_cost.sh).
ONEPASS_HD uint32_t float_map_code_v_kept(float y) {
  const int32_t u = static_cast<int32_t>(float_bits(y));
  const int32_t r = static_cast<int32_t>((static_cast<uint32_t>(u) + 0x7ffffu) >> kFmShift);
  const int32_t c = fm_clamp(r, kFmLowV) - (kFmLowV - 1);
  return (u > 0) & (u <= 0x7f800000) ? static_cast<uint32_t>(c) : 0u;
}

// Signed: the magnitude's rank k (1 = smallest nonzero code on its side: the negative side has one
// more code, kFmLowN = kFmLowP - 1) rounded with ties up in magnitude when x < 0, then
// q = 128 + k or 128 - k (k ^ s - s with s = 0 or -1), 128 below the side's zero threshold, 0 for
// NaN. Unsigned arithmetic where a NaN's pattern could overflow (its code is 0 anyway).
ONEPASS_HD uint32_t float_map_code_m(float x) {
  const uint32_t u = float_bits(x);
  const int32_t s = static_cast<int32_t>(u) >> 31;  // 0, or -1 when x < 0
  const uint32_t neg = u >> 31;
  const int32_t a = static_cast<int32_t>(u & 0x7fffffffu);
  const int32_t r = static_cast<int32_t>((static_cast<uint32_t>(a) + 0x7ffffu + neg) >> kFmShift);
  const int32_t lo = kFmLowP - static_cast<int32_t>(neg);
  const int32_t k = fm_clamp(r, lo) - lo + 1;
  const int32_t thr = kFmHalfP - (s & (kFmHalfP - kFmHalfN + 1));  // x < 0: a >= kFmHalfN
  const int32_t q = a > thr ? 128 + ((k ^ s) - s) : 128;
  return a > 0x7f800000 ? 0u : static_cast<uint32_t>(q);
}

// Whether packed tables (quant.tables(), on the host) hold the float3 maps, codes and midpoints
// exactly as float_map_value_* gives them (midpoints as quant.midpoints computes them: float64
// mean, rounded once); then a kernel may search by bits. 1022 compares; host code only.
inline bool is_float_map(const float* t) {
  for (uint32_t q = 0; q < 256; ++q)
    if (float_bits(t[kCodeM + q]) != float_bits(float_map_value_m(q)) ||
        float_bits(t[kCodeV + q]) != float_bits(float_map_value_v(q)))
      return false;
  for (int i = 0; i < 255; ++i) {
    const float mm = static_cast<float>((double(t[kCodeM + i]) + double(t[kCodeM + i + 1])) * 0.5);
    const float mv = static_cast<float>((double(t[kCodeV + i]) + double(t[kCodeV + i + 1])) * 0.5);
    if (float_bits(t[kMidM + i]) != float_bits(mm) || float_bits(t[kMidV + i]) != float_bits(mv))
      return false;
  }
  return true;
}

// The block scale of reference.quantize_blocks: 1 / absmax, or 0 unless absmax is a normal,
// finite float (then 1 / absmax cannot overflow).
ONEPASS_HD float block_scale(float absmax) {
  const float inv = op_div(1.0f, absmax);
  return (absmax >= 1.17549435e-38f && absmax <= 3.40282347e+38f) ? inv : 0.0f;
}

// |x|'s bit pattern: the running maximum of these over a block (as unsigned integers) is the
// block's absmax with NaN winning over everything (NaN patterns lie above inf's), as torch's
// abs().amax() gives it; an integer max also vectorizes where a NaN-aware float max does not.
ONEPASS_HD uint32_t abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

}  // namespace onepass
