// Host emulation of the CUDA execution model for the kernels of csrc/cuda/ (dw_bn_act.cu, grouped.cu,
// alpha_grad.cu), which the harnesses here compile as C++ with BETANAS_CUDA_EMULATION defined:
// * every CUDA thread of a block is a fiber (its own stack, switched in user space on the one host thread);
//   between two barriers the threads run one after the other, each until its next __syncthreads, so that a missing
//   barrier shows as a thread reading what another has not written yet (under one of the orders below). A
//   __syncthreads that some threads of the block never reach (they returned) is an error: on the device it hangs
//   or misbehaves.
// * dynamic shared memory is a malloc'ed buffer of exactly the requested size, filled with NaN bytes before each
//   block (reading unset shared memory poisons results); atomics and __threadfence are plain operations (nothing
//   runs concurrently); threadIdx, blockIdx, blockDim and gridDim (x only).
// * a launch's blocks run one at a time, in an order chosen at run time: forward (blocks 0 .. grid-1, and threads
//   0 .. n-1 between barriers), reverse (both reversed), or shuffle (seeded permutations, different ones per launch
//   and per barrier interval). A kernel that assumes an order of its blocks (for instance that the highest-numbered
//   block finishes last, instead of taking a ticket) or of its threads fails under reverse or shuffle. The order
//   comes from BETANAS_EMU_BLOCK_ORDER=forward|reverse|shuffle or a harness's --block-order=NAME argument
//   (take_block_order); BETANAS_EMU_SEED sets the shuffle's seed.
// * coverage notes: emulation hooks in the kernels (cover) count what a launch exercised, e.g. blocks that walked
//   several items, so that a harness can assert that its cases reach what it claims to cover.
// What it cannot show: blocks or threads that overlap in time (memory-model races), warp-synchronous code,
// static __shared__ variables left unset by a block (they keep the previous block's values here), the device's
// own arithmetic (fast math, FMA contraction) and speed; those need a GPU.
// Fibers switch with a few instructions of assembly on x86-64, with ucontext elsewhere or with
// BETANAS_EMU_UCONTEXT (a system call a switch, many times slower). CUDA threads as std::threads, as this emulator
// first had them, cost tens of times more (256 OS threads a block, woken at every barrier).
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#if !defined(__x86_64__) || defined(BETANAS_EMU_UCONTEXT)
#define BETANAS_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#define BETANAS_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(n) alignas(n)
#define __shared__ static

struct dim3e { unsigned x = 0, y = 0, z = 0; };

namespace betanas_emu {
inline dim3e g_threadIdx, g_blockIdx, g_blockDim, g_gridDim;
inline unsigned char* g_smem = nullptr;
inline size_t g_optin = 227 * 1024;
inline std::atomic<long> g_launches{0};
inline std::atomic<long> g_blocks{0};

template <typename T>
T* dyn_smem() { return reinterpret_cast<T*>(g_smem); }
inline uint32_t umulhi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * b) >> 32); }
inline size_t smem_optin_bytes() { return g_optin; }
inline size_t smem_per_sm_bytes() { return g_optin + 1024; }

// ---------------------------------------------------------------------------------------------------------
// The order in which a launch's blocks, and a block's threads between two barriers, run.

enum class BlockOrder { kForward, kReverse, kShuffle };
inline BlockOrder g_block_order = BlockOrder::kForward;
inline uint64_t g_shuffle_seed = 0x5eed;

inline const char* block_order_name(BlockOrder o) {
  return o == BlockOrder::kForward ? "forward" : (o == BlockOrder::kReverse ? "reverse" : "shuffle");
}

inline void set_block_order(const std::string& name) {
  if (name == "forward") {
    g_block_order = BlockOrder::kForward;
  } else if (name == "reverse") {
    g_block_order = BlockOrder::kReverse;
  } else if (name == "shuffle") {
    g_block_order = BlockOrder::kShuffle;
  } else {
    std::fprintf(stderr, "emu: unknown block order '%s' (forward, reverse or shuffle)\n", name.c_str());
    std::exit(2);
  }
}

// Sets the block order from BETANAS_EMU_BLOCK_ORDER, then from a --block-order=NAME argument, which it removes
// from argv; returns the new argc. BETANAS_EMU_SEED (an integer) sets the shuffle's seed.
inline int take_block_order(int argc, char** argv) {
  if (const char* env = std::getenv("BETANAS_EMU_BLOCK_ORDER")) set_block_order(env);
  if (const char* seed = std::getenv("BETANAS_EMU_SEED")) g_shuffle_seed = std::strtoull(seed, nullptr, 0);
  const std::string flag = "--block-order=";
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind(flag, 0) == 0) {
      set_block_order(a.substr(flag.size()));
    } else {
      argv[out++] = argv[i];
    }
  }
  argv[out] = nullptr;
  std::printf("block order: %s", block_order_name(g_block_order));
  if (g_block_order == BlockOrder::kShuffle) std::printf(" (seed %llu)", (unsigned long long)g_shuffle_seed);
  std::printf("\n");
  return out;
}

// 0 .. n-1 in the selected order; rng draws the shuffles.
inline void order_sequence(std::vector<unsigned>& seq, unsigned n, std::mt19937_64& rng) {
  seq.resize(n);
  std::iota(seq.begin(), seq.end(), 0u);
  if (g_block_order == BlockOrder::kReverse) {
    std::reverse(seq.begin(), seq.end());
  } else if (g_block_order == BlockOrder::kShuffle) {
    // Fisher-Yates with our own draws: the same permutations on every platform and run.
    for (unsigned i = n; i > 1; --i) std::swap(seq[i - 1], seq[rng() % i]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Coverage notes: per name, how many times a hook reported and the largest value it reported.

struct Coverage {
  long count = 0, max = 0;
};
inline std::map<std::string, Coverage> g_cover;

inline void cover(const char* what, long value) {
  Coverage& c = g_cover[what];
  ++c.count;
  c.max = std::max(c.max, value);
}

inline Coverage covered(const char* what) {
  const auto it = g_cover.find(what);
  return it == g_cover.end() ? Coverage{} : it->second;
}

// ---------------------------------------------------------------------------------------------------------
// Fibers: a saved stack pointer (x86-64: the callee-saved registers and the resume address are on the stack), or a
// ucontext.

extern "C" inline void betanas_emu_fiber_main();  // below

#ifndef BETANAS_EMU_USE_UCONTEXT
// betanas_emu_switch(&from, to): saves the callee-saved registers on this stack and its pointer in *from, then
// resumes the stack `to` (System V ABI; the x87 and SSE control words are left alone, no code here changes them).
extern "C" void betanas_emu_switch(void** from, void* to);
asm(R"(
  .text
  .weak betanas_emu_switch
  .type betanas_emu_switch, @function
betanas_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size betanas_emu_switch, .-betanas_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
// A context that starts betanas_emu_fiber_main on the stack that ends at top (16-byte aligned).
inline void context_start(Context& c, unsigned char* top, size_t) {
  void** t = reinterpret_cast<void**>(top);
  t[-1] = nullptr;                                           // the entry's return address: never used
  t[-2] = reinterpret_cast<void*>(&betanas_emu_fiber_main);  // where the first switch's `ret` goes
  for (int i = 3; i <= 8; ++i) t[-i] = nullptr;              // rbp, rbx, r12 .. r15
  c.sp = t - 8;
}
inline void context_switch(Context& from, Context& to) { betanas_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void context_start(Context& c, unsigned char* top, size_t size) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = top - size;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, betanas_emu_fiber_main, 0);
}
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// The threads of one block size: a fiber each, reused by every block and launch of that size.
struct Block {
  static constexpr size_t kStack = 256 * 1024;  // a thread's stack, below a guard page
  const unsigned n;
  std::vector<unsigned char*> stacks;
  std::vector<Context> ctx;
  std::vector<char> done;
  Context host;
  unsigned cur = 0;
  const std::function<void()>* job = nullptr;
  std::exception_ptr error;
  size_t page = 4096;

  explicit Block(unsigned threads) : n(threads), stacks(threads), ctx(threads), done(threads) {
    page = size_t(sysconf(_SC_PAGESIZE));
    for (auto& s : stacks) {
      void* m = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
                     0);
      if (m == MAP_FAILED) throw std::runtime_error("emu: no memory for a thread's stack");
      mprotect(m, page, PROT_NONE);  // an overflow faults instead of corrupting the next stack
      s = static_cast<unsigned char*>(m);
    }
  }
  ~Block() {
    for (auto* s : stacks) munmap(s, kStack + page);
  }

  // Runs the block: phase by phase, each thread in `order` until it reaches __syncthreads or returns.
  void run(const std::function<void()>& kernel_job, std::mt19937_64& rng) {
    job = &kernel_job;
    error = nullptr;
    for (unsigned t = 0; t < n; ++t) {
      context_start(ctx[t], stacks[t] + page + kStack, kStack);
      done[t] = 0;
    }
    std::vector<unsigned> order;
    unsigned finished = 0;
    while (finished < n) {
      order_sequence(order, n, rng);
      unsigned returned = 0;
      for (unsigned t : order) {
        cur = t;
        g_threadIdx.x = t;
        context_switch(host, ctx[t]);
        if (done[t]) ++returned;
      }
      if (error) std::rethrow_exception(error);
      finished += returned;
      if (returned != 0 && finished != n) {
        throw std::runtime_error("emu: __syncthreads reached by " + std::to_string(n - finished) + " threads of a "
                                 "block whose other " + std::to_string(finished) + " threads returned");
      }
    }
  }
  void sync() { context_switch(ctx[cur], host); }
};

// The current launch's block runner; launches come from the harness's one host thread.
inline Block* g_block = nullptr;

inline Block& block_of(unsigned threads) {
  static std::map<unsigned, std::unique_ptr<Block>> blocks;
  std::unique_ptr<Block>& b = blocks[threads];
  if (!b) b = std::make_unique<Block>(threads);
  return *b;
}

// Every thread of a block starts here on its own stack and ends by switching back to the host for good.
extern "C" inline void betanas_emu_fiber_main() {
  Block& B = *g_block;
  try {
    (*B.job)();
  } catch (...) {
    B.error = std::current_exception();
  }
  B.done[B.cur] = 1;
  B.sync();
  std::abort();  // never resumed
}

// kernel<<<grid, threads, smem>>>(args...), its blocks in the selected order.
template <typename... KArgs, typename... Args>
void launch_blocks(void (*kernel)(KArgs...), int64_t grid, int64_t threads, size_t smem, Args&&... args) {
  if (grid == 0) return;
  if (threads < 1 || threads > 1024) throw std::runtime_error("emu: block size out of range");
  if (smem > g_optin) throw std::runtime_error("emu: smem above opt-in limit");
  if (grid > INT32_MAX) throw std::runtime_error("emu: grid too large");
  std::tuple<std::decay_t<KArgs>...> targs(std::forward<Args>(args)...);
  const std::function<void()> job = [&] { std::apply(kernel, targs); };
  std::unique_ptr<unsigned char, decltype(&std::free)> buf(
      smem ? static_cast<unsigned char*>(std::malloc(smem)) : nullptr, &std::free);
  Block& B = block_of(unsigned(threads));
  g_block = &B;
  g_smem = buf.get();
  g_blockDim = {unsigned(threads), 1, 1};
  g_gridDim = {unsigned(grid), 1, 1};
  std::mt19937_64 rng(g_shuffle_seed * 0x9E3779B97F4A7C15ull + uint64_t(g_launches++));
  std::vector<unsigned> blocks;
  order_sequence(blocks, unsigned(grid), rng);
  for (unsigned b : blocks) {
    if (smem) std::memset(buf.get(), 0xFF, smem);  // NaN everywhere: reading unset shared memory poisons results
    g_blockIdx.x = b;
    B.run(job, rng);
    ++g_blocks;
  }
  g_smem = nullptr;
  g_block = nullptr;
}

// dw_tile.cuh's launch: 256-thread blocks.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int64_t grid, size_t smem, Args&&... args) {
  launch_blocks(kernel, grid, 256, smem, std::forward<Args>(args)...);
}
}  // namespace betanas_emu

#define threadIdx (::betanas_emu::g_threadIdx)
#define blockIdx (::betanas_emu::g_blockIdx)
#define blockDim (::betanas_emu::g_blockDim)
#define gridDim (::betanas_emu::g_gridDim)
inline void __syncthreads() { betanas_emu::g_block->sync(); }
inline void __threadfence() {}
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
