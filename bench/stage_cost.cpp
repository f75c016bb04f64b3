// Per-element cost of each stage of a low-precision CPU step (issue 18), one thread, data in L2,
// built with the CPU kernel's flags and its AVX2 target: what each stage costs by itself, before
// any design change. Every stage is a loop over kN elements of 256-element blocks, written as the
// CPU kernel writes it (csrc/cpu/loops_lowp.cpp: lowp_range, int8_blocks) from adam_math.h's
// functions, so the compiler vectorizes it the same way.
//
//   bash bench/stage_cost.sh        (compiles with g++ and runs; prints ns per element)
//
// Stages:
//   fp32 update      adam_element on fp32 p, g, m, v (loads and stores included): the fp32 step
//   bf16 moments     the same with m, v stored as bf16, stochastically rounded (one hash, two SR)
//   bf16 moments, by hand   csrc/cpu/bf16_state_avx2.h, what the avx2 variant runs for fp32 params
//   SR hash          random_bits + float_to_bf16_stochastic alone, one value an element
//   int8 decode      float3 codes of m and v to floats (times the block's absmax)
//   int8 update      adam_element on decoded m, v (registers), p and g from memory
//   absmax           the unsigned max of |m|, |v| bit patterns over each block
//   int8 encode      block_scale, then the float3 codes of m and v (keep_positive on v)
//   int8 block, compiled   the four above as int8_blocks runs them (the base variant's loops:
//                          codes widened in a loop of their own, narrowed in another)
//   int8 block, by hand    csrc/cpu/int8_block_avx2.h, what the avx2 variant runs for fp32 params
//   bf16 params: ...       the two by-hand loops on bf16 params and grads (rounded to nearest)
//   ..., AVX-512           csrc/cpu/int8_block_avx512.h and bf16_state_avx512.h, what the avx512
//                          variant runs (fp32 and bf16 params), where the CPU has AVX-512 (F, BW,
//                          VL, DQ)
#include "../csrc/adam_math.h"
#include "../csrc/cpu/bf16_state_avx2.h"
#include "../csrc/cpu/int8_block_avx2.h"
#include "../csrc/cpu/int8_block_avx512.h"
#include "../csrc/cpu/bf16_state_avx512.h"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

using namespace onepass;

namespace {

constexpr int64_t kN = 1 << 16;  // 64K elements: p, g, m, v in fp32 are 1 MB, in L2 (512 KB/core
                                 // on Zen 3 holds the int8 stages' working set, 448 KB)
constexpr int kBlock = kInt8Block;
constexpr int kReps = 400;

template <typename F>
double ns_per_element(F&& body) {
  body();  // warm
  double best = 1e30;
  for (int trial = 0; trial < 5; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < kReps; ++r) body();
    const auto t1 = std::chrono::steady_clock::now();
    const double ns = std::chrono::duration<double, std::nano>(t1 - t0).count() / (double(kReps) * kN);
    best = ns < best ? ns : best;
  }
  return best;
}

#define STAGE __attribute__((target("avx2,bmi2"), noinline))

STAGE void fp32_update(float* p, const float* g, float* m, float* v, const StepScalars<float>& s) {
  const StepScalars<float> sc = s;
#pragma omp simd
  for (int64_t i = 0; i < kN; ++i) {
    float pi = p[i], mi = m[i], vi = v[i], unused = 0.0f;
    adam_element<float, false, false, false, false>(pi, g[i], mi, vi, unused, sc);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

STAGE void bf16_update(float* p, const float* g, uint16_t* m, uint16_t* v, const StepScalars<float>& s,
                       uint32_t kmv) {
  const StepScalars<float> sc = s;
  // (as loops_lowp.cpp: a 32-bit count, and the index's high half, 0 here, in the keys)
#pragma omp simd
  for (uint32_t j = 0; j < uint32_t(kN); ++j) {
    const int64_t i = j;
    float pi = p[i], mi = bf16_to_float(m[i]), vi = bf16_to_float(v[i]), unused = 0.0f;
    adam_element<float, false, false, false, false>(pi, g[i], mi, vi, unused, sc);
    p[i] = pi;
    const uint32_t draw = random_bits_lo(kmv, static_cast<uint32_t>(i));
    m[i] = float_to_bf16_stochastic(mi, draw);
    v[i] = float_to_bf16_stochastic(vi, v_bits(draw));
  }
}

STAGE void sr_hash(const float* x, uint16_t* out, uint32_t key) {
#pragma omp simd
  for (uint32_t j = 0; j < uint32_t(kN); ++j)
    out[j] = float_to_bf16_stochastic(x[j], random_bits_lo(key, j));
}

STAGE void int8_decode(const uint8_t* qm, const uint8_t* qv, const float* am, const float* av,
                       float* m, float* v) {
  for (int64_t b = 0; b < kN / kBlock; ++b) {
    const float sm = am[b], sv = av[b];
#pragma omp simd
    for (int j = 0; j < kBlock; ++j) {
      const int64_t i = b * kBlock + j;
      m[i] = op_mul(float_map_value_m(qm[i]), sm);
      v[i] = op_mul(float_map_value_v(qv[i]), sv);
    }
  }
}

STAGE void int8_update(float* p, const float* g, float* m, float* v, const StepScalars<float>& s) {
  // (m, v: the decoded block in a buffer, as int8_blocks keeps it)
  fp32_update(p, g, m, v, s);
}

STAGE void absmax(const float* m, const float* v, float* am, float* av) {
  for (int64_t b = 0; b < kN / kBlock; ++b) {
    uint32_t bm = 0, bv = 0;
#pragma omp simd reduction(max : bm, bv)
    for (int j = 0; j < kBlock; ++j) {
      const int64_t i = b * kBlock + j;
      const uint32_t x = abs_bits(m[i]), y = abs_bits(v[i]);
      bm = x > bm ? x : bm;
      bv = y > bv ? y : bv;
    }
    am[b] = bits_float(bm);
    av[b] = bits_float(bv);
  }
}

STAGE void int8_encode(const float* m, const float* v, const float* am, const float* av,
                       uint8_t* qm, uint8_t* qv) {
  for (int64_t b = 0; b < kN / kBlock; ++b) {
    const float im = block_scale(am[b]), iv = block_scale(av[b]);
#pragma omp simd
    for (int j = 0; j < kBlock; ++j) {
      const int64_t i = b * kBlock + j;
      qm[i] = static_cast<uint8_t>(float_map_code_m(op_mul(m[i], im)));
      qv[i] = static_cast<uint8_t>(float_map_code_v_kept(op_mul(v[i], iv)));
    }
  }
}


STAGE void int8_block_compiled(float* p, const float* g, uint8_t* qm, uint8_t* qv, float* am,
                               float* av, const StepScalars<float>& s) {
  const StepScalars<float> sc = s;
  alignas(64) float mb[kBlock];
  alignas(64) float vb[kBlock];
  alignas(64) uint32_t cm[kBlock];
  alignas(64) uint32_t cv[kBlock];
  for (int64_t b = 0; b < kN / kBlock; ++b) {
    const int64_t o = b * kBlock;
    const float sm = am[b], sv = av[b];
#pragma omp simd
    for (int i = 0; i < kBlock; ++i) {
      cm[i] = qm[o + i];
      cv[i] = qv[o + i];
    }
    uint32_t bm = 0, bv = 0;
#pragma omp simd reduction(max : bm, bv)
    for (int i = 0; i < kBlock; ++i) {
      float pi = p[o + i], unused = 0.0f;
      float mi = op_mul(float_map_value_m(cm[i]), sm);
      float vi = op_mul(float_map_value_v(cv[i]), sv);
      adam_element<float, false, false, false, false>(pi, g[o + i], mi, vi, unused, sc);
      p[o + i] = pi;
      mb[i] = mi;
      vb[i] = vi;
      const uint32_t x = abs_bits(mi), y = abs_bits(vi);
      bm = x > bm ? x : bm;
      bv = y > bv ? y : bv;
    }
    const float nam = bits_float(bm), nav = bits_float(bv);
    const float im = block_scale(nam), iv = block_scale(nav);
#pragma omp simd
    for (int i = 0; i < kBlock; ++i) {
      cm[i] = float_map_code_m(op_mul(mb[i], im));
      cv[i] = float_map_code_v_kept(op_mul(vb[i], iv));
    }
#pragma omp simd
    for (int i = 0; i < kBlock; ++i) {
      qm[o + i] = static_cast<uint8_t>(cm[i]);
      qv[o + i] = static_cast<uint8_t>(cv[i]);
    }
    am[b] = nam;
    av[b] = nav;
  }
}

// (P: float or Bf16 params and grads, as the CPU loop instantiates them)
template <typename P>
STAGE void int8_block_by_hand(P* p, const P* g, uint8_t* qm, uint8_t* qv, float* am, float* av,
                              const StepScalars<float>& s) {
  const StepScalars<cpu::F8> sc = cpu::step_scalars_f8(s);
  for (int64_t b = 0; b < kN / kBlock; ++b)
    cpu::int8_block_avx2<P, false, false, false>(p + b * kBlock, g + b * kBlock, qm + b * kBlock,
                                                 qv + b * kBlock, am + b, av + b, sc);
}

template <typename P>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), noinline)) void int8_block_avx512(
    P* p, const P* g, uint8_t* qm, uint8_t* qv, float* am, float* av, const StepScalars<float>& s) {
  const StepScalars<cpu::F16> sc = cpu::step_scalars_f16(s);
  for (int64_t b = 0; b < kN / kBlock; ++b)
    cpu::int8_block_avx512<P, false, false, false>(p + b * kBlock, g + b * kBlock,
                                                   qm + b * kBlock, qv + b * kBlock, am + b,
                                                   av + b, sc);
}

template <typename P>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), noinline)) void bf16_update_avx512(
    P* p, const P* g, uint16_t* m, uint16_t* v, const StepScalars<float>& s, uint32_t kmv) {
  cpu::bf16_state_avx512<P, false, false, false>(p, g, reinterpret_cast<Bf16*>(m),
                                                 reinterpret_cast<Bf16*>(v), kN, 0, kmv,
                                                 cpu::step_scalars_f16(s), s);
}

template <typename P>
STAGE void bf16_update_by_hand(P* p, const P* g, uint16_t* m, uint16_t* v,
                               const StepScalars<float>& s, uint32_t kmv) {
  cpu::bf16_state_avx2<P, false, false, false>(p, g, reinterpret_cast<Bf16*>(m),
                                               reinterpret_cast<Bf16*>(v), kN, 0, kmv,
                                               cpu::step_scalars_f8(s));
}
}  // namespace

int main() {
  std::vector<float> p(kN), g(kN), m(kN), v(kN), am(kN / kBlock), av(kN / kBlock);
  std::vector<uint16_t> m16(kN), v16(kN);
  std::vector<uint8_t> qm(kN), qv(kN);
  uint32_t x = 12345;
  for (int64_t i = 0; i < kN; ++i) {
    x = mix32(x + 1);
    p[i] = static_cast<float>(static_cast<int32_t>(x)) * 1e-10f;
    g[i] = static_cast<float>(static_cast<int32_t>(mix32(x))) * 1e-12f;
    m[i] = g[i] * 0.1f;
    v[i] = g[i] * g[i] * 0.001f;
    m16[i] = float_to_bf16(m[i]);
    v16[i] = float_to_bf16(v[i]);
  }
  absmax(m.data(), v.data(), am.data(), av.data());
  int8_encode(m.data(), v.data(), am.data(), av.data(), qm.data(), qv.data());
  // lr 0: the params do not drift over the repetitions (the work is the same)
  const StepScalars<float> s = make_step_scalars<float>(10, 0.0, 0.9, 0.999, 1e-8, 0.0, true, 1.0);
  const uint32_t kmv = stream_key(0, 10, kStreamMoments);
  std::vector<float> mw(m), vw(v);  // working copies the update stages write
  // the bf16 moments compiled and by hand, from the same start; the SR hash's output
  std::vector<uint16_t> h1m(m16), h1v(v16), h2m(m16), h2v(v16), sr16(kN);
  // the two int8 blocks' own states, from the same start (compared after the timing)
  std::vector<uint8_t> q1m(qm), q1v(qv), q2m(qm), q2v(qv);
  std::vector<float> a1m(am), a1v(av), a2m(am), a2v(av), a3m(am), a3v(av);
  // bf16 params and grads (the same values rounded), with their own states
  std::vector<Bf16> pb(kN), gb(kN);
  for (int64_t i = 0; i < kN; ++i) {
    pb[i].x = float_to_bf16(p[i]);
    gb[i].x = float_to_bf16(g[i]);
  }
  std::vector<uint8_t> q3m(qm), q3v(qv);
  // the AVX-512 blocks' own states, fp32 and bf16 params (the params as well: lr is 0, but the
  // stores still round them)
  std::vector<uint8_t> q4m(qm), q4v(qv), q5m(qm), q5v(qv);
  std::vector<float> a4m(am), a4v(av), a5m(am), a5v(av), p4(p);
  std::vector<Bf16> pb5(pb);
  std::vector<uint16_t> h4m(m16), h4v(v16), h5m(m16), h5v(v16);
  std::vector<float> p6(p);
  std::vector<Bf16> pb7(pb);
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  std::vector<uint16_t> h3m(m16), h3v(v16);

  struct Row { const char* name; double ns; };
  const Row rows[] = {
      {"fp32 update", ns_per_element([&] { fp32_update(p.data(), g.data(), mw.data(), vw.data(), s); })},
      {"bf16 moments (update + SR)", ns_per_element([&] { bf16_update(p.data(), g.data(), h1m.data(), h1v.data(), s, kmv); })},
      {"bf16 moments, by hand", ns_per_element([&] { bf16_update_by_hand(p.data(), g.data(), h2m.data(), h2v.data(), s, kmv); })},
      {"SR hash (one value)", ns_per_element([&] { sr_hash(m.data(), sr16.data(), kmv); })},
      {"int8 decode (m and v)", ns_per_element([&] { int8_decode(qm.data(), qv.data(), am.data(), av.data(), mw.data(), vw.data()); })},
      {"int8 update (decoded m, v)", ns_per_element([&] { int8_update(p.data(), g.data(), mw.data(), vw.data(), s); })},
      {"absmax (m and v)", ns_per_element([&] { absmax(mw.data(), vw.data(), am.data(), av.data()); })},
      {"int8 encode (m and v)", ns_per_element([&] { int8_encode(mw.data(), vw.data(), am.data(), av.data(), qm.data(), qv.data()); })},
      {"int8 block, compiled", ns_per_element([&] { int8_block_compiled(p.data(), g.data(), q1m.data(), q1v.data(), a1m.data(), a1v.data(), s); })},
      {"int8 block, by hand", ns_per_element([&] { int8_block_by_hand(p.data(), g.data(), q2m.data(), q2v.data(), a2m.data(), a2v.data(), s); })},
      {"bf16 params: bf16 moments", ns_per_element([&] { bf16_update_by_hand(pb.data(), gb.data(), h3m.data(), h3v.data(), s, kmv); })},
      {"bf16 params: int8 block", ns_per_element([&] { int8_block_by_hand(pb.data(), gb.data(), q3m.data(), q3v.data(), a3m.data(), a3v.data(), s); })},
  };
  const Row rows512[] = {
      {"int8 block, AVX-512", avx512 ? ns_per_element([&] { int8_block_avx512(p4.data(), g.data(), q4m.data(), q4v.data(), a4m.data(), a4v.data(), s); }) : 0.0},
      {"bf16 params: int8, AVX-512", avx512 ? ns_per_element([&] { int8_block_avx512(pb5.data(), gb.data(), q5m.data(), q5v.data(), a5m.data(), a5v.data(), s); }) : 0.0},
      {"bf16 moments, AVX-512", avx512 ? ns_per_element([&] { bf16_update_avx512(p6.data(), g.data(), h4m.data(), h4v.data(), s, kmv); }) : 0.0},
      {"bf16 params: bf16, AVX-512", avx512 ? ns_per_element([&] { bf16_update_avx512(pb7.data(), gb.data(), h5m.data(), h5v.data(), s, kmv); }) : 0.0},
  };
  // the same number of passes from the same start: the same codes and absmax (lr is 0, so the
  // params do not move)
  const bool same = q1m == q2m && q1v == q2v && a1m == a2m && a1v == a2v;
  const bool same512 = q4m == q2m && q4v == q2v && a4m == a2m && a4v == a2v && q5m == q3m &&
                       q5v == q3v && a5m == a3m && a5v == a3v && p4 == p &&
                       std::memcmp(pb5.data(), pb.data(), kN * sizeof(Bf16)) == 0 &&
                       h4m == h2m && h4v == h2v && h5m == h3m && h5v == h3v && p6 == p &&
                       std::memcmp(pb7.data(), pb.data(), kN * sizeof(Bf16)) == 0;
  const bool same16 = h1m == h2m && h1v == h2v;
  uint64_t check = 0;  // (keeps every result alive)
  for (int64_t i = 0; i < kN; i += 997)
    check += qm[i] + qv[i] + sr16[i] + h1m[i] + float_bits(p[i]) + q3m[i] + h3m[i] + pb[i].x;
  std::printf("stage_cost: %lld elements (L2), 1 thread, AVX2, best of 5 x %d passes, ns/element\n",
              static_cast<long long>(kN), kReps);
  for (const Row& r : rows) std::printf("  %-30s %6.3f\n", r.name, r.ns);
  if (avx512) {
    for (const Row& r : rows512) std::printf("  %-30s %6.3f\n", r.name, r.ns);
    std::printf("  (AVX-512 and AVX2 loops agree, int8 and bf16: %s)\n", same512 ? "yes" : "NO");
  } else {
    std::printf("  (no AVX-512 on this CPU: its loops not timed)\n");
  }
  std::printf("  (checksum %llu; compiled and by hand agree: int8 blocks %s, bf16 moments %s)\n",
              static_cast<unsigned long long>(check), same ? "yes" : "NO", same16 ? "yes" : "NO");
  return 0;
}
