// Host emulation of the CUDA execution model for dw_bn_act.cu and grouped.cu: one std::thread per CUDA thread,
// blocks run one after the other, __syncthreads is a std::barrier, dynamic shared memory is a malloc'ed buffer of
// exactly the requested size filled with NaN bytes before each block, atomics are std::atomic_ref operations and
// __threadfence a sequentially consistent fence.
#pragma once
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <tuple>
#include <vector>
#include <atomic>
#include <stdexcept>

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
inline thread_local dim3e tl_threadIdx, tl_blockIdx;
inline std::barrier<>* g_sync = nullptr;
inline unsigned char* g_smem = nullptr;
inline size_t g_optin = 227 * 1024;
inline std::atomic<long> g_launches{0};
inline std::atomic<long> g_blocks{0};

template <typename T>
T* dyn_smem() { return reinterpret_cast<T*>(g_smem); }
inline uint32_t umulhi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * b) >> 32); }
inline size_t smem_optin_bytes() { return g_optin; }
inline size_t smem_per_sm_bytes() { return g_optin + 1024; }

constexpr int kT = 256;
struct Pool {
  std::vector<std::thread> th;
  std::barrier<> start{kT + 1}, end{kT + 1};
  std::barrier<> sync{kT};
  std::function<void()> job;
  unsigned block = 0;
  bool quit = false;
  Pool() {
    g_sync = &sync;
    for (int i = 0; i < kT; ++i) {
      th.emplace_back([this, i] {
        tl_threadIdx.x = i;
        while (true) {
          start.arrive_and_wait();
          if (quit) return;
          tl_blockIdx.x = block;
          job();
          end.arrive_and_wait();
        }
      });
    }
  }
  ~Pool() {
    quit = true;
    start.arrive_and_wait();
    for (auto& t : th) t.join();
  }
  void run(unsigned b) {
    block = b;
    start.arrive_and_wait();
    end.arrive_and_wait();
  }
};
inline Pool& pool() { static Pool p; return p; }

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int64_t grid, size_t smem, Args&&... args) {
  if (grid == 0) return;
  if (smem > g_optin) throw std::runtime_error("emu: smem above opt-in limit");
  if (grid > INT32_MAX) throw std::runtime_error("emu: grid too large");
  std::tuple<std::decay_t<KArgs>...> targs(std::forward<Args>(args)...);
  unsigned char* buf = smem ? static_cast<unsigned char*>(std::malloc(smem)) : nullptr;
  g_smem = buf;
  Pool& P = pool();
  P.job = [&] { std::apply(kernel, targs); };
  ++g_launches;
  for (int64_t b = 0; b < grid; ++b) {
    if (buf) std::memset(buf, 0xFF, smem);  // NaN everywhere: reading unset shared memory poisons results
    P.run(unsigned(b));
    ++g_blocks;
  }
  std::free(buf);
  g_smem = nullptr;
}
}  // namespace betanas_emu

#define threadIdx (::betanas_emu::tl_threadIdx)
#define blockIdx (::betanas_emu::tl_blockIdx)
inline void __syncthreads() { betanas_emu::g_sync->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
