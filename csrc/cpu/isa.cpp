// The CPU loops' ISA (isa.h): detected once, capped by ONEPASS_CPU_ISA, switchable at run time.
#include "isa.h"

#include "../onepass_ops.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace onepass {
namespace cpu {
namespace {

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

}  // namespace

int current_isa() { return g_isa.load(std::memory_order_relaxed); }

}  // namespace cpu

using cpu::g_best_isa;
using cpu::g_isa;
using cpu::kIsaNames;

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

}  // namespace onepass
