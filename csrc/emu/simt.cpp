// The fiber runtime behind csrc/emu/simt.h: one block at a time, its threads as ucontext fibers.
#include "simt.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>

namespace onepass_emu {
namespace {

// 64 KiB a fiber: the kernels keep a few hundred bytes of locals, but an unoptimized build
// inlines little. Each stack has a guard page below it, so an overflow faults instead of
// silently writing into the next thread's stack.
constexpr std::size_t kStack = 64 * 1024;
constexpr std::size_t kSharedBytes = 48 * 1024;  // the static shared memory a CUDA block may have
constexpr int kWarp = 32;

enum class State { kReady, kAtBarrier, kAtWarp, kDone };

struct Fiber {
  ucontext_t uc;
  char* stack = nullptr;
  State state = State::kReady;
  uint64_t wait_gen = 0;  // the generation of the rendezvous it waits for
  int shared_calls = 0;   // shared_alloc calls made so far in this block
  ThreadCtx ctx{};
};

struct Warp {
  uint64_t gen = 0;       // completed rendezvous
  int arrived = 0;        // lanes arrived at the open one
  unsigned mask = 0;      // its mask
  const char* what = "";  // its intrinsic
  uint64_t slots[2][kWarp] = {};
};

struct Region {
  std::size_t offset, bytes;
};

struct Launch {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int n_threads = 0;
  int current = -1;
  uint64_t bar_gen = 0;
  int bar_arrived = 0;
  int exited = 0;
  std::vector<Region> regions;
  std::size_t shared_used = 0;
  alignas(16) unsigned char shared[kSharedBytes];
  ucontext_t scheduler;
  bool failed = false;
  std::string error;
  dim3 grid, block;
  uint3 block_idx{};
};

thread_local Launch* tl_launch = nullptr;
thread_local std::vector<char*>* tl_stacks = nullptr;
std::atomic<bool> g_reverse{false};

std::mutex g_names_mu;
std::vector<std::string>& compiled_names() {
  static auto* v = new std::vector<std::string>();
  return *v;
}
std::set<std::string>& run_names() {
  static auto* s = new std::set<std::string>();
  return *s;
}

char* new_stack() {
  const long page = sysconf(_SC_PAGESIZE);
  void* mem = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) throw std::runtime_error("onepass_emu: cannot map a fiber stack");
  mprotect(mem, page, PROT_NONE);  // the guard page: stacks grow down into it
  return static_cast<char*>(mem) + page;
}

Launch& L() { return *tl_launch; }
Fiber& me() { return L().fibers[L().current]; }

std::string where() {
  const Launch& l = L();
  if (l.current < 0) return "block (" + std::to_string(l.block_idx.x) + ")";
  const Fiber& f = l.fibers[l.current];
  return "block (" + std::to_string(f.ctx.block_idx.x) + ", " + std::to_string(f.ctx.block_idx.y) +
         ", " + std::to_string(f.ctx.block_idx.z) + ") thread (" + std::to_string(f.ctx.thread_idx.x) +
         ", " + std::to_string(f.ctx.thread_idx.y) + ", " + std::to_string(f.ctx.thread_idx.z) + ")";
}

void yield_to_scheduler() { swapcontext(&me().uc, &L().scheduler); }

// A fiber's entry: the kernel body, then the exit bookkeeping.
void trampoline() {
  (*L().body)();
  Launch& l = L();
  Fiber& f = me();
  f.state = State::kDone;
  ++l.exited;
  if (l.bar_arrived > 0 && !l.failed) {
    l.failed = true;
    l.error = "divergent __syncthreads: " + where() + " exited while " +
              std::to_string(l.bar_arrived) + " thread(s) of its block wait at a barrier";
  }
  // uc_link returns to the scheduler
}


void run_block(Launch& l) {
  const int n = l.n_threads;
  l.bar_gen = 0;
  l.bar_arrived = 0;
  l.exited = 0;
  l.regions.clear();
  l.shared_used = 0;
  std::memset(l.shared, 0xff, sizeof(l.shared));
  for (Warp& w : l.warps) w = Warp{};
  const bool reverse = g_reverse.load();
  for (int i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    f.state = State::kReady;
    f.wait_gen = 0;
    f.shared_calls = 0;
    f.ctx.thread_idx = uint3{static_cast<unsigned>(i) % l.block.x,
                             (static_cast<unsigned>(i) / l.block.x) % l.block.y,
                             static_cast<unsigned>(i) / (l.block.x * l.block.y)};
    f.ctx.block_idx = l.block_idx;
    f.ctx.block_dim = l.block;
    f.ctx.grid_dim = l.grid;
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStack;
    f.uc.uc_link = &l.scheduler;
    makecontext(&f.uc, trampoline, 0);
  }
  int done = 0;
  while (done < n) {
    bool progressed = false;
    for (int k = 0; k < n; ++k) {
      const int i = reverse ? n - 1 - k : k;
      Fiber& f = l.fibers[i];
      if (f.state == State::kDone) continue;
      if (f.state == State::kAtBarrier && l.bar_gen == f.wait_gen) continue;
      if (f.state == State::kAtWarp && l.warps[i / kWarp].gen == f.wait_gen) continue;
      f.state = State::kReady;
      l.current = i;
      swapcontext(&l.scheduler, &f.uc);
      l.current = -1;
      progressed = true;
      if (l.failed) throw std::runtime_error("onepass_emu: " + l.error);
      if (f.state == State::kDone) ++done;
    }
    if (!progressed) {
      std::string who;
      for (int i = 0; i < n && who.size() < 200; ++i) {
        const Fiber& f = l.fibers[i];
        if (f.state == State::kAtWarp)
          who += " thread " + std::to_string(i) + " waits at " + l.warps[i / kWarp].what + ";";
        else if (f.state == State::kAtBarrier)
          who += " thread " + std::to_string(i) + " waits at __syncthreads;";
      }
      throw std::runtime_error("onepass_emu: deadlock in block " + std::to_string(l.block_idx.x) +
                               " (" + std::to_string(l.exited) + " threads exited):" + who);
    }
  }
}

}  // namespace

ThreadCtx& ctx() {
  if (tl_launch == nullptr || tl_launch->current < 0)
    throw std::runtime_error("onepass_emu: threadIdx/blockIdx read outside a kernel");
  return me().ctx;
}

void fail(const std::string& what) {
  Launch& l = L();
  if (!l.failed) {
    l.failed = true;
    l.error = what + " in " + where();
  }
  me().state = State::kDone;
  // Never resumed: the scheduler raises as soon as this fiber yields.
  for (;;) yield_to_scheduler();
}

void syncthreads() {
  Launch& l = L();
  Fiber& f = me();
  if (l.exited > 0)
    fail("divergent __syncthreads: " + std::to_string(l.exited) +
         " thread(s) of the block already exited");
  f.wait_gen = l.bar_gen;
  if (++l.bar_arrived == l.n_threads) {
    l.bar_arrived = 0;
    ++l.bar_gen;
    return;
  }
  f.state = State::kAtBarrier;
  yield_to_scheduler();
}

int lane_id() { return L().current % kWarp; }

// Deposits `value` at the warp's open rendezvous of `mask` and waits for every lane of the mask;
// returns the rendezvous' generation, whose slots hold every lane's deposit until this lane
// arrives at the next one (a lane can be at most one rendezvous ahead of the others).
uint64_t arrive(unsigned mask, uint64_t value, const char* what) {
  Launch& l = L();
  const int i = l.current;
  const int lane = i % kWarp;
  const int warp = i / kWarp;
  const int warp_size = std::min(kWarp, l.n_threads - warp * kWarp);
  Warp& w = l.warps[warp];
  if (!((mask >> lane) & 1u)) fail(std::string(what) + " by a lane outside its mask");
  for (int k = 0; k < kWarp; ++k) {
    if (!((mask >> k) & 1u)) continue;
    if (k >= warp_size) fail(std::string(what) + " names lane " + std::to_string(k) + ", beyond the block");
    if (l.fibers[warp * kWarp + k].state == State::kDone)
      fail(std::string(what) + " names lane " + std::to_string(k) + ", which has exited");
  }
  if (w.arrived == 0) {
    w.mask = mask;
    w.what = what;
  } else if (w.mask != mask || std::strcmp(w.what, what) != 0) {
    fail(std::string("divergent warp: ") + what + " with mask " + std::to_string(mask) +
         " while lanes wait at " + w.what + " with mask " + std::to_string(w.mask));
  }
  const uint64_t gen = w.gen;
  w.slots[gen & 1][lane] = value;
  if (++w.arrived == __builtin_popcount(mask)) {
    w.arrived = 0;
    ++w.gen;
  } else {
    me().wait_gen = gen;
    me().state = State::kAtWarp;
    yield_to_scheduler();
  }
  return gen;
}

uint64_t exchange(unsigned mask, uint64_t value, int src_lane, const char* what) {
  const uint64_t gen = arrive(mask, value, what);
  if (src_lane < 0 || src_lane >= kWarp || !((mask >> src_lane) & 1u))
    fail(std::string(what) + " reads lane " + std::to_string(src_lane) + ", outside its mask");
  return L().warps[L().current / kWarp].slots[gen & 1][src_lane];
}

void syncwarp(unsigned mask) { (void)arrive(mask, 0, "__syncwarp"); }

unsigned ballot(unsigned mask, bool pred) {
  const uint64_t gen = arrive(mask, pred ? 1u : 0u, "__ballot_sync");
  const Warp& w = L().warps[L().current / kWarp];
  unsigned out = 0;
  for (int k = 0; k < kWarp; ++k)
    if ((mask >> k) & 1u) out |= static_cast<unsigned>(w.slots[gen & 1][k] & 1u) << k;
  return out;
}

void* shared_alloc(std::size_t bytes, std::size_t align) {
  Launch& l = L();
  Fiber& f = me();
  const int k = f.shared_calls++;
  if (k < static_cast<int>(l.regions.size())) {
    if (l.regions[k].bytes != bytes) fail("threads of one block declare different shared arrays");
    return l.shared + l.regions[k].offset;
  }
  const std::size_t off = (l.shared_used + align - 1) / align * align;
  if (off + bytes > kSharedBytes) fail("more than 48 KiB of static shared memory");
  l.regions.push_back(Region{off, bytes});
  l.shared_used = off + bytes;
  return l.shared + off;
}

void launch(dim3 grid, dim3 block, const std::function<void()>& body, const std::string& name) {
  {
    const std::lock_guard<std::mutex> lock(g_names_mu);
    run_names().insert(name);
  }
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) throw std::runtime_error("onepass_emu: a block has 1 to 1024 threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;  // cudaErrorInvalidConfiguration on a GPU
  if (tl_launch != nullptr) throw std::runtime_error("onepass_emu: a kernel launched from a kernel");
  if (tl_stacks == nullptr) tl_stacks = new std::vector<char*>();  // kept for the thread's life
  while (static_cast<int>(tl_stacks->size()) < n) tl_stacks->push_back(new_stack());
  auto l = std::make_unique<Launch>();
  l->body = &body;
  l->n_threads = n;
  l->grid = grid;
  l->block = block;
  l->fibers.resize(n);
  for (int i = 0; i < n; ++i) l->fibers[i].stack = (*tl_stacks)[i];
  l->warps.resize((n + kWarp - 1) / kWarp);
  tl_launch = l.get();
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          l->block_idx = uint3{x, y, z};
          run_block(*l);
        }
  } catch (...) {
    tl_launch = nullptr;
    throw;
  }
  tl_launch = nullptr;
}

int register_kernel(const std::string& name) {
  const std::lock_guard<std::mutex> lock(g_names_mu);
  compiled_names().push_back(name);
  return static_cast<int>(compiled_names().size());
}

std::vector<std::string> kernels_compiled() {
  const std::lock_guard<std::mutex> lock(g_names_mu);
  std::set<std::string> s(compiled_names().begin(), compiled_names().end());
  return {s.begin(), s.end()};
}

std::vector<std::string> kernels_run() {
  const std::lock_guard<std::mutex> lock(g_names_mu);
  return {run_names().begin(), run_names().end()};
}

void set_reverse_order(bool reverse) { g_reverse.store(reverse); }

}  // namespace onepass_emu
