// Small kernels run under the SIMT emulation (csrc/emu/simt.h), each printing one result line that
// tests/emu/test_simt.py checks: correct programs give the GPU's answer, broken ones an error.
#include "emu/simt.h"

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Block sum: shared-memory staging, a barrier, then a warp-shuffle tree in warp 0.
template <bool SYNC, int FIRST_OFFSET>
__global__ void block_sum(const int* in, int* out) {
  ONEPASS_SHARED(int, part, 256);
  const int t = threadIdx.x;
  part[t] = in[blockIdx.x * 256 + t];
  if (SYNC) __syncthreads();
  if (t < 32) {
    int s = 0;
    for (int k = t; k < 256; k += 32) s += part[k];
    for (int off = FIRST_OFFSET; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (t == 0) out[blockIdx.x] = s;
  }
}

__global__ void exit_then_barrier() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void half_warp_shuffle(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // lanes 16..31 never come
  out[threadIdx.x] = v;
}

__global__ void ballot_and_down(unsigned* out) {
  const unsigned b = __ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
  const int d = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 4);
  out[threadIdx.x] = b ^ static_cast<unsigned>(d);
}

__global__ void misaligned(const float* p) {
  ONEPASS_CHECK_ALIGNED(p + 1, 16, "load");
}

template <typename F>
void run(const char* name, F f) {
  try {
    f();
  } catch (const std::exception& e) {
    std::printf("%s: error: %s\n", name, e.what());
  }
}

template <bool SYNC, int OFF>
void sums(const char* name) {
  run(name, [&] {
    std::vector<int> in(3 * 256), out(3, -1);
    long want[3] = {0, 0, 0};
    for (int i = 0; i < 3 * 256; ++i) {
      in[i] = (i * 7919) % 1000;
      want[i / 256] += in[i];
    }
    const int* pi = in.data();
    int* po = out.data();
    onepass_emu::launch(dim3(3), dim3(256), [=] { block_sum<SYNC, OFF>(pi, po); }, name);
    int ok = 1;
    for (int b = 0; b < 3; ++b) ok &= out[b] == want[b];
    std::printf("%s: %s\n", name, ok ? "ok" : "wrong");
  });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "reverse") == 0) onepass_emu::set_reverse_order(true);
  sums<true, 16>("sum");
  sums<false, 16>("sum_without_sync");
  sums<true, 8>("sum_wrong_offset");
  run("exit_then_barrier", [] {
    onepass_emu::launch(dim3(1), dim3(64), [] { exit_then_barrier(); }, "exit_then_barrier");
    std::printf("exit_then_barrier: ok\n");
  });
  run("half_warp_shuffle", [] {
    std::vector<int> out(32);
    int* po = out.data();
    onepass_emu::launch(dim3(1), dim3(32), [=] { half_warp_shuffle(po); }, "half_warp_shuffle");
    std::printf("half_warp_shuffle: ok\n");
  });
  run("ballot_and_down", [] {
    std::vector<unsigned> out(32);
    unsigned* po = out.data();
    onepass_emu::launch(dim3(1), dim3(32), [=] { ballot_and_down(po); }, "ballot_and_down");
    unsigned b = 0;
    for (int i = 0; i < 32; ++i) b |= (i % 3 == 0 ? 1u : 0u) << i;
    int ok = 1;
    for (int i = 0; i < 32; ++i) ok &= out[i] == (b ^ static_cast<unsigned>(i + 4 < 32 ? i + 4 : i));
    std::printf("ballot_and_down: %s\n", ok ? "ok" : "wrong");
  });
  run("misaligned", [] {
    alignas(16) float buf[8] = {};
    const float* p = buf;
    onepass_emu::launch(dim3(1), dim3(1), [=] { misaligned(p); }, "misaligned");
    std::printf("misaligned: ok\n");
  });
  return 0;
}
