// Unit test of the CUDA backend's planner (csrc/cuda/plan.h) on the CPU: randomized batches of
// tensor metadata -- sizes 0, 1, primes, vector tails, views whose storage offsets break 16-byte
// alignment, sizes above 2**31 in metadata only (fake addresses, nothing allocated) -- planned as
// the launch would be, then walked block by block and thread by thread with the same lookups the
// kernels use: every element must be visited exactly once, every block must find the tensor
// whose range holds it, and every vector access must be 16-byte aligned.
// Prints "plan_test: ok ..." and exits 0, or prints each failure and exits 1.
#include "cuda/plan.h"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using namespace onepass;

namespace {

int failures = 0;
void fail(const std::string& what) {
  if (failures++ < 20) std::printf("FAIL %s\n", what.c_str());
}

std::mt19937_64 rng(12345);
int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

const int64_t kPrimes[] = {2, 3, 5, 7, 97, 251, 257, 1021, 4099, 65521};

// A size: mostly small and awkward; sometimes above 2**31 (metadata only: never walked element
// by element).
int64_t random_numel(bool allow_huge) {
  switch (pick(0, 7)) {
    case 0: return 0;
    case 1: return 1;
    case 2: return kPrimes[pick(0, 9)];
    case 3: return 8 * pick(1, 300) + pick(1, 7);             // a vector tail
    case 4: return 256 * pick(1, 40);                           // whole int8 blocks
    case 5: return kThreads * 4 * pick(1, 5) + pick(0, 3);    // whole CUDA blocks, or just past
    case 6: if (allow_huge) return (int64_t(1) << 31) + pick(-5, 5) * 4099;
            return pick(2, 5000);
    default: return pick(2, 20000);
  }
}

// A fake device address: 256-byte aligned, plus a storage offset of `off` elements.
uintptr_t fake_addr(int elem_bytes, int64_t off) {
  static uintptr_t next = uintptr_t(1) << 40;
  const uintptr_t a = next + static_cast<uintptr_t>(off) * elem_bytes;
  next += (uintptr_t(1) << 36);  // room for the largest tensor
  return a;
}
int64_t random_offset() { return pick(0, 3) == 0 ? pick(1, 7) : 0; }

bool is_aligned(const void* p, size_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// The expected tensor of each block, found by a linear walk over the block counts (independent
// of locate_tensor's binary search).
// The planned launches' block map (block_map, read by tensor_of_block) must give every block's
// tensor too: checked at every block.
template <typename D>
void check_lookup(const Plan<D>& plan, const std::string& name) {
  const int n = static_cast<int>(plan.descs.size());
  const std::vector<int32_t> map = block_map(plan.descs, plan.blocks);
  if (static_cast<int64_t>(map.size()) != plan.blocks) fail(name + ": block map of the wrong size");
  for (int i = 0; i < n; ++i) {
    const int64_t first = plan.descs[i].block_start;
    const int64_t end = i + 1 < n ? plan.descs[i + 1].block_start : plan.blocks;
    if (end <= first) fail(name + ": tensor " + std::to_string(i) + " owns no block");
    // its first, second, middle and last blocks
    for (int64_t b : {first, first + 1, (first + end) / 2, end - 1}) {
      if (b < first || b >= end) continue;
      const int got = locate_tensor(plan.descs.data(), n, b);
      if (got != i)
        fail(name + ": block " + std::to_string(b) + " found tensor " + std::to_string(got) +
             ", not " + std::to_string(i));
    }
    for (int64_t b = first; b < end; ++b)
      if (tensor_of_block(plan.descs.data(), n, map.data(), b) != i)
        fail(name + ": the block map gives block " + std::to_string(b) + " tensor " +
             std::to_string(map[static_cast<size_t>(b)]) + ", not " + std::to_string(i));
  }
}

// Element-wise formats: walks tensor i's blocks and threads as the kernels do.
// p/g/m/v element sizes: pb, pb, mb, mb.
void walk_elementwise(int n_tensors, int64_t blocks, int vec, int pb, int mb,
                      bool lowp_desc, const void* descs_any, const StepEntry* entries,
                      const std::string& name, int64_t& checked) {
  for (int i = 0; i < n_tensors; ++i) {
    int64_t n, start, end;
    void *p, *m;
    const void* g;
    void* v;
    bool aligned;
    if (lowp_desc) {
      const LowpDesc* ds = static_cast<const LowpDesc*>(descs_any);
      n = ds[i].n; start = ds[i].block_start;
      end = i + 1 < n_tensors ? ds[i + 1].block_start : blocks;
      p = ds[i].p; g = entries[i].g; m = ds[i].m; v = ds[i].v; aligned = ds[i].aligned;
    } else {
      const Desc* ds = static_cast<const Desc*>(descs_any);
      n = ds[i].n; start = ds[i].block_start;
      end = i + 1 < n_tensors ? ds[i + 1].block_start : blocks;
      p = ds[i].p; g = entries[i].g; m = ds[i].m; v = ds[i].v; aligned = ds[i].aligned;
    }
    const int64_t chunk = static_cast<int64_t>(kThreads) * vec;
    if (end - start != (n + chunk - 1) / chunk)
      fail(name + ": tensor " + std::to_string(i) + " has " + std::to_string(end - start) +
           " blocks for " + std::to_string(n) + " elements");
    const bool huge = n > (int64_t(1) << 24);
    std::vector<uint8_t> seen(huge ? 0 : static_cast<size_t>(n), 0);
    int64_t covered = 0;
    for (int64_t b = start; b < end; ++b) {
      if (huge && b > start + 2 && b < end - 2) {  // metadata only: the blocks near the ends
        covered += chunk;
        continue;
      }
      for (int t = 0; t < kThreads; ++t) {
        LowpDesc dl{};
        Desc dd{};
        int64_t base;
        bool vpath;
        if (lowp_desc) {
          dl = static_cast<const LowpDesc*>(descs_any)[i];
          base = thread_first_element(dl, b, t, vec);
          vpath = vector_path(dl, entries[i], base, vec);
        } else {
          dd = static_cast<const Desc*>(descs_any)[i];
          base = thread_first_element(dd, b, t, vec);
          vpath = vector_path(dd, entries[i], base, vec);
        }
        if (vpath) {
          const char* pp = static_cast<const char*>(p) + base * pb;
          const char* gp = static_cast<const char*>(g) + base * pb;
          const char* mp = static_cast<const char*>(m) + base * mb;
          const char* vp = static_cast<const char*>(v) + base * mb;
          const size_t mw = static_cast<size_t>(vec * mb) < 16 ? static_cast<size_t>(vec * mb) : 16;
          if (!aligned || !is_aligned(pp, 16) || !is_aligned(gp, 16) || !is_aligned(mp, mw) || !is_aligned(vp, mw))
            fail(name + ": misaligned vector access, tensor " + std::to_string(i) + " element " + std::to_string(base));
        }
        for (int k = 0; k < vec; ++k) {
          const int64_t e = base + k;
          if (e >= n) break;
          if (e < 0) { fail(name + ": negative element"); break; }
          ++covered;
          if (!huge && seen[static_cast<size_t>(e)]++)
            fail(name + ": element " + std::to_string(e) + " of tensor " + std::to_string(i) + " visited twice");
        }
      }
    }
    if (huge) {
      // the walked ends plus the skipped middle blocks must add up to n
      if (covered != n) fail(name + ": huge tensor covered " + std::to_string(covered) + " of " + std::to_string(n));
    } else {
      for (int64_t e = 0; e < n; ++e)
        if (!seen[static_cast<size_t>(e)]) {
          fail(name + ": element " + std::to_string(e) + " of tensor " + std::to_string(i) + " never visited");
          break;
        }
    }
    checked += n;
  }
}

void test_fp32(int trial, int64_t& checked) {
  const int pb = std::vector<int>{2, 4, 8}[pick(0, 2)];
  const int mb = pb == 8 ? 8 : 4;  // the math type
  const int vec = vec_elems(pb);
  std::vector<TensorMeta> ts;
  const int count = static_cast<int>(pick(1, 12));
  for (int j = 0; j < count; ++j) {
    TensorMeta t{};
    t.numel = random_numel(true);
    t.p = reinterpret_cast<void*>(fake_addr(pb, random_offset()));
    t.g = reinterpret_cast<void*>(fake_addr(pb, random_offset()));
    t.m = reinterpret_cast<void*>(fake_addr(mb, random_offset()));
    t.v = reinterpret_cast<void*>(fake_addr(mb, random_offset()));
    t.v_max = pick(0, 1) ? reinterpret_cast<void*>(fake_addr(mb, random_offset())) : nullptr;
    t.rows = 1;
    ts.push_back(t);
  }
  const Plan<Desc> plan = plan_fp32(ts, pb);
  const std::string name = "fp32 trial " + std::to_string(trial);
  check_lookup(plan, name);
  walk_elementwise(static_cast<int>(plan.descs.size()), plan.blocks, vec, pb, mb, false,
                   plan.descs.data(), plan.entries.data(), name, checked);
}

void test_lowp_elementwise(int trial, int64_t& checked) {
  const int pb = pick(0, 1) ? 2 : 4;
  const int mb = pick(0, 1) ? 2 : 4;  // bf16 or fp32 moments
  const int vec = vec_elems(pb);
  std::vector<TensorMeta> ts;
  const int count = static_cast<int>(pick(1, 12));
  for (int j = 0; j < count; ++j) {
    TensorMeta t{};
    t.numel = random_numel(true);
    t.p = reinterpret_cast<void*>(fake_addr(pb, random_offset()));
    t.g = reinterpret_cast<void*>(fake_addr(pb, random_offset()));
    t.m = reinterpret_cast<void*>(fake_addr(mb, random_offset()));
    t.v = reinterpret_cast<void*>(fake_addr(mb, random_offset()));
    t.comp = pick(0, 1) ? reinterpret_cast<void*>(fake_addr(2, random_offset())) : nullptr;
    t.rows = 1;
    ts.push_back(t);
  }
  const Plan<LowpDesc> plan = plan_lowp(ts, pb, false);
  const std::string name = "lowp trial " + std::to_string(trial);
  check_lookup(plan, name);
  walk_elementwise(static_cast<int>(plan.descs.size()), plan.blocks, vec, pb, mb, true,
                   plan.descs.data(), plan.entries.data(), name, checked);
}

void test_int8(int trial, int64_t& checked) {
  std::vector<TensorMeta> ts;
  const int count = static_cast<int>(pick(1, 8));
  for (int j = 0; j < count; ++j) {
    TensorMeta t{};
    t.rows = pick(0, 2) == 0 ? 1 : pick(1, 70);
    const int64_t row_len = pick(0, 3) == 0 ? 256 * pick(1, 4) : random_numel(false) % 3000 + 1;
    t.numel = pick(0, 9) == 0 ? 0 : t.rows * row_len;
    t.p = reinterpret_cast<void*>(fake_addr(4, 0));
    t.g = reinterpret_cast<void*>(fake_addr(4, 0));
    t.m = reinterpret_cast<void*>(fake_addr(1, 0));
    t.v = reinterpret_cast<void*>(fake_addr(1, 0));
    ts.push_back(t);
  }
  const Plan<LowpDesc> plan = plan_lowp(ts, 4, true);
  const std::string name = "int8 trial " + std::to_string(trial);
  check_lookup(plan, name);
  const int n_tensors = static_cast<int>(plan.descs.size());
  size_t di = 0;
  for (const TensorMeta& t : ts) {
    if (t.numel == 0) continue;
    const LowpDesc& d = plan.descs[di];
    const int64_t end = di + 1 < plan.descs.size() ? plan.descs[di + 1].block_start : plan.blocks;
    ++di;
    std::vector<uint8_t> seen(static_cast<size_t>(t.numel), 0);
    for (int64_t b = d.block_start; b < end; ++b) {
      if (locate_tensor(plan.descs.data(), n_tensors, b) != static_cast<int>(di - 1))
        fail(name + ": int8 block lookup");
      for (int w = 0; w < kInt8Warps; ++w) {
        const int64_t k = int8_block_of(d, b, w);
        if (k >= d.n) continue;
        const Int8Span s = int8_span(d, k);
        const int64_t row = s.start / d.row_len;
        if (s.len <= 0 || s.len > kInt8Block || (s.start + s.len - 1) / d.row_len != row)
          fail(name + ": a quantization block straddles a row or is empty");
        for (int j = 0; j < s.len; ++j)
          if (seen[static_cast<size_t>(s.start + j)]++) fail(name + ": int8 element visited twice");
      }
    }
    for (int64_t e = 0; e < t.numel; ++e)
      if (!seen[static_cast<size_t>(e)]) {
        fail(name + ": int8 element " + std::to_string(e) + " never visited");
        break;
      }
    checked += t.numel;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 200;
  int64_t checked = 0;
  for (int trial = 0; trial < trials; ++trial) {
    test_fp32(trial, checked);
    test_lowp_elementwise(trial, checked);
    test_int8(trial, checked);
  }
  if (failures) {
    std::printf("plan_test: %d failures\n", failures);
    return 1;
  }
  std::printf("plan_test: ok, %d trials, %lld elements\n", trials, static_cast<long long>(checked));
  return 0;
}
