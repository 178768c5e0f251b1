// CUDA kernels of the fused depthwise stage y = act(BN(depthwise_conv(x))); csrc/cpu/dw_bn_act.cpp defines
// the semantics (outputs, dtypes, layouts, checks) and these kernels reproduce them.
//
// Design
// ------
// * Work unit. A block (256 threads) owns CT channels (a power of two, CT <= 32) of one image and one
//   rectangular tile of TOH x TOW conv outputs (TOH = MH*2, TOW = MW*4). Blocks are laid out channel group
//   fastest, so blocks running at the same time read neighbouring channels of the same pixels (whole L2
//   sectors in channels_last). Each block walks a fixed, contiguous run of (image, tile) items: the work
//   split depends on the shape only, so every reduction below is run-to-run deterministic (no atomics).
// * Shared memory. Each item stages the x tile with its halo (zero padded at the image border) in shared
//   memory, converted to the arithmetic type T (float, double for float64). The global <-> shared copies are
//   the only layout-dependent code: NCHW copies run along W, channels_last copies run along C with 16-byte
//   vectors when C allows it; both are coalesced. Shared arrays are [channel][row][col]; the plane pitch is
//   1 mod 32 and the row pitch is chosen so that a warp (CT channels x 32/CT micro-tiles) hits 32 distinct
//   banks.
// * Compute. Thread (channel = tid % CT, slot = tid / CT) computes 2x4 output micro-tiles from shared memory
//   with the kernel size K and stride S as template constants: input rows are streamed through registers,
//   the K*K weights of the thread's channel stay in registers, so a 2x4 micro-tile of a 3x3 conv needs
//   24 shared loads for 72 FMAs. The activation is a runtime switch taken once per micro-tile.
// * Training forward: pass 1 computes z and per-thread Welford statistics of each 2x4 micro-tile merged with
//   Chan's formula, then per block (fixed order); a finalize kernel merges the per-block (count, mean, M2)
//   in double into mean/var and the folded scale/shift. Pass 2 recomputes z (re-reading x costs the same as
//   reading a saved z and saves writing it) and writes act(a*z + b). Eval forward is pass 2 alone.
// * Backward: z is recomputed from x. Training needs sum(g) and sum(g*(z-mean)) before dz exists, so a first
//   pass (the forward kernel in its third mode) reduces them, a finalize kernel turns them into the batch-norm
//   backward coefficients, and the backward kernel then computes, per tile, dz on the tile plus a halo of
//   ceil(P/S) outputs (recomputing z there), grad_x of the tile's own inputs as a transposed convolution of
//   dz (polyphase for stride 2), and grad_weight partial sums over the tile's own outputs. Per-block partial
//   sums (float) are reduced in double by a finalize kernel, and parameter gradients are returned in their
//   parameter's dtype exactly as the CPU code's like_param does (double -> dtype).
// * Instantiations: {float, half, bfloat16, double} x K {3,5,7} x S {1,2} for the forward and the backward
//   kernel (48), plus a few small per-channel kernels templated on T only.
// * Testing without a GPU: defining BETANAS_CUDA_EMULATION (and providing namespace betanas_emu: launch,
//   dyn_smem, umulhi, smem_*_bytes) lets a host harness compile this file as C++ and run every CUDA thread as
//   a CPU thread with __syncthreads as a barrier; BETANAS_DW_TARGET_BLOCKS and BETANAS_DW_MAX_MICRO shrink
//   the work split and the tiles so that such tests cover multi-item blocks and multi-tile images.
//
// What would make it faster
// -------------------------
// * Double-buffer the shared tiles with cp.async / TMA so that loading item i+1 overlaps computing item i
//   (now only other resident blocks hide the load latency).
// * Keep the x tile in shared memory in the storage dtype (bf16/fp16) to halve shared memory and raise
//   occupancy, especially for the K=7 backward kernel (which needs ~150 registers and large halos).
// * For K=7 (compute bound) the halo recomputation of z in the backward kernel costs ~1.5-2x; a variant that
//   writes dz in float32 to global memory and runs a separate dgrad/wgrad pass may win there.
// * Fuse the small finalize kernels into the last block of the reducing pass (a grid-wide ticket) to save
//   launches on small shapes; autotune the tile plan on the device instead of the static cost model.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/checks.h"
#include "common/dispatch.h"

namespace betanas {
namespace {

constexpr int kThreads = 256;  // every kernel of this file runs 256-thread blocks
constexpr int kRH = 2;         // micro-tile rows (outputs per thread per step)
constexpr int kRW = 4;         // micro-tile columns
#ifndef BETANAS_DW_TARGET_BLOCKS
#define BETANAS_DW_TARGET_BLOCKS 2048
#endif
constexpr int kTargetBlocks = BETANAS_DW_TARGET_BLOCKS;  // blocks per launch the work split aims at
#ifndef BETANAS_DW_MAX_MICRO
#define BETANAS_DW_MAX_MICRO 16
#endif
constexpr int kMaxMicro = BETANAS_DW_MAX_MICRO;  // largest tile: kMaxMicro x kMaxMicro micro-tiles
constexpr int kRedChunk = 8;   // values reduced at a time at the end of the backward kernel

// Modes of the forward kernel.
constexpr int kZStats = 0;  // batch statistics of z = conv(x)
constexpr int kApply = 1;   // y = act(a * z + b)
constexpr int kGStats = 2;  // sum(g), sum(g * (z - mean)), g = act'(a*z+b) * dy (training backward, pass 1)
// Modes of the backward kernel.
constexpr int kBwdTrain = 0;
constexpr int kBwdEval = 1;

#define BDEV __device__ __forceinline__

#ifndef BETANAS_CUDA_EMULATION
template <typename T>
BDEV T* dyn_smem() {
  extern __shared__ __align__(16) unsigned char betanas_dyn_smem[];
  return reinterpret_cast<T*>(betanas_dyn_smem);
}

BDEV uint32_t umulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }

// Every kernel of this file: 1-D grid of 256-thread blocks on the current stream.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int64_t grid, size_t smem, Args&&... args) {
  if (grid == 0) return;
  TORCH_INTERNAL_ASSERT(grid <= INT32_MAX, "betanas: grid too large: ", grid);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

size_t smem_optin_bytes() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }
size_t smem_per_sm_bytes() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor; }
#else
// A host test harness that runs every CUDA thread as a CPU thread provides these.
using betanas_emu::dyn_smem;
using betanas_emu::launch;
using betanas_emu::smem_optin_bytes;
using betanas_emu::smem_per_sm_bytes;
using betanas_emu::umulhi;
#endif

// Rounded arithmetic that the compiler may not contract into an FMA, to reproduce the CPU's per-channel
// coefficients exactly.
BDEV float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
BDEV double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
BDEV float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
BDEV double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// n / d for 0 <= n < 2^31 by a multiply-high (ATen's IntDivider).
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;
  FastDiv() = default;
  explicit FastDiv(int64_t divisor) {
    TORCH_INTERNAL_ASSERT(divisor >= 1 && divisor <= INT32_MAX);
    d = static_cast<uint32_t>(divisor);
    s = 0;
    while ((uint64_t(1) << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1);
  }
  BDEV int div(int n) const { return static_cast<int>((umulhi(static_cast<uint32_t>(n), m) + n) >> s); }
};

// A [channel][row][col] array in shared memory.
struct Region {
  int rows = 0, cols = 0;  // the part that is loaded or stored
  int rp = 0, pl = 0;      // row and plane pitch, in elements
  FastDiv fd_cols, fd_rows;
};

template <typename scalar_t>
struct Params {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* x = nullptr;   // [N, C, H, W]
  const scalar_t* dy = nullptr;  // [N, C, Ho, Wo]
  scalar_t* out = nullptr;       // y [N, C, Ho, Wo] (forward) or grad_x [N, C, H, W] (backward)
  const T* w = nullptr;          // [C, K*K]
  const T* ca = nullptr;         // per-channel coefficients [C]: z -> a*z + b, mean, dz = a*g - c0 - c1*(z-m)
  const T* cb = nullptr;
  const T* cm = nullptr;
  const T* c0 = nullptr;
  const T* c1 = nullptr;
  T* partial = nullptr;  // per-block partial results [value][C][G]
  int64_t items = 0, items_per_block = 0;
  int C = 0, H = 0, W = 0, Ho = 0, Wo = 0;
  int ncg = 1, G = 0, mode = 0, act = 0, cl = 0, vec = 0;
  int CT = 1, ct_shift = 0, MH = 1, MW = 1, tiles_w = 1, tiles_per_img = 1;
  int mhd = 1, mwd = 1;  // micro-tiles of the dz region (backward)
  FastDiv fd_mh, fd_mhd;
  Region xr, yr, gr;  // x tile; dy / y / dz tile; grad_x tile (backward, aliases xr's storage)
};

template <typename F>
BDEV void act_switch(int act, F&& f) {
  if (act == kActReLU6) {
    f(IntConst<kActReLU6>{});
  } else if (act == kActSiLU) {
    f(IntConst<kActSiLU>{});
  } else {
    f(IntConst<kActNone>{});
  }
}

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) VecT {
  scalar_t v[V];
};

template <int V>
constexpr int log2_of() {
  return V <= 1 ? 0 : 1 + log2_of<V / 2>();
}

// ---------------------------------------------------------------------------------------------------------
// Global <-> shared copies of a tile: rows [r0, r0 + rows) x cols [q0, q0 + cols) of channels [c0, c0 + CT)
// of one image (img_off: offset of the image, in elements). Outside the image and beyond C: zeros.

template <typename scalar_t, typename T>
BDEV void load_region(T* __restrict__ dst, const Region& rg, const scalar_t* __restrict__ src, int64_t img_off,
                      int C, int Hs, int Ws, int c0, int CT, int ct_shift, int r0, int q0, bool cl, bool vec) {
  const int tid = threadIdx.x;
  if (!cl) {
    const int total = CT * rg.rows * rg.cols;
    for (int i = tid; i < total; i += kThreads) {
      const int t = rg.fd_cols.div(i);
      const int q = i - t * rg.cols;
      const int c = rg.fd_rows.div(t);
      const int r = t - c * rg.rows;
      const int gr = r0 + r, gq = q0 + q, cg = c0 + c;
      T v = T(0);
      if (cg < C && gr >= 0 && gr < Hs && gq >= 0 && gq < Ws) {
        v = static_cast<T>(src[img_off + (int64_t(cg) * Hs + gr) * Ws + gq]);
      }
      dst[c * rg.pl + r * rg.rp + q] = v;
    }
  } else if (vec) {
    constexpr int V = 16 / sizeof(scalar_t);
    const int nv_shift = ct_shift - log2_of<V>();  // vectors per pixel: CT / V
    const int total = (rg.rows * rg.cols) << nv_shift;
    for (int i = tid; i < total; i += kThreads) {
      const int cv = i & ((1 << nv_shift) - 1);
      const int pix = i >> nv_shift;
      const int r = rg.fd_cols.div(pix);
      const int q = pix - r * rg.cols;
      const int gr = r0 + r, gq = q0 + q, cg = c0 + cv * V;
      VecT<scalar_t, V> u;
      const bool in = cg < C && gr >= 0 && gr < Hs && gq >= 0 && gq < Ws;
      if (in) u = *reinterpret_cast<const VecT<scalar_t, V>*>(src + img_off + (int64_t(gr) * Ws + gq) * C + cg);
      T* d = dst + (cv * V) * rg.pl + r * rg.rp + q;
#pragma unroll
      for (int j = 0; j < V; ++j) d[j * rg.pl] = in ? static_cast<T>(u.v[j]) : T(0);
    }
  } else {
    const int total = (rg.rows * rg.cols) << ct_shift;
    for (int i = tid; i < total; i += kThreads) {
      const int c = i & (CT - 1);
      const int pix = i >> ct_shift;
      const int r = rg.fd_cols.div(pix);
      const int q = pix - r * rg.cols;
      const int gr = r0 + r, gq = q0 + q, cg = c0 + c;
      T v = T(0);
      if (cg < C && gr >= 0 && gr < Hs && gq >= 0 && gq < Ws) {
        v = static_cast<T>(src[img_off + (int64_t(gr) * Ws + gq) * C + cg]);
      }
      dst[c * rg.pl + r * rg.rp + q] = v;
    }
  }
}

// Stores the tile's positions that lie inside the image (r0, q0 >= 0) and channels < C.
template <typename scalar_t, typename T>
BDEV void store_region(const T* __restrict__ srcs, const Region& rg, scalar_t* __restrict__ dst, int64_t img_off,
                       int C, int Hs, int Ws, int c0, int CT, int ct_shift, int r0, int q0, bool cl, bool vec) {
  const int tid = threadIdx.x;
  if (!cl) {
    const int total = CT * rg.rows * rg.cols;
    for (int i = tid; i < total; i += kThreads) {
      const int t = rg.fd_cols.div(i);
      const int q = i - t * rg.cols;
      const int c = rg.fd_rows.div(t);
      const int r = t - c * rg.rows;
      const int gr = r0 + r, gq = q0 + q, cg = c0 + c;
      if (cg < C && gr < Hs && gq < Ws) {
        dst[img_off + (int64_t(cg) * Hs + gr) * Ws + gq] = static_cast<scalar_t>(srcs[c * rg.pl + r * rg.rp + q]);
      }
    }
  } else if (vec) {
    constexpr int V = 16 / sizeof(scalar_t);
    const int nv_shift = ct_shift - log2_of<V>();
    const int total = (rg.rows * rg.cols) << nv_shift;
    for (int i = tid; i < total; i += kThreads) {
      const int cv = i & ((1 << nv_shift) - 1);
      const int pix = i >> nv_shift;
      const int r = rg.fd_cols.div(pix);
      const int q = pix - r * rg.cols;
      const int gr = r0 + r, gq = q0 + q, cg = c0 + cv * V;
      if (cg < C && gr < Hs && gq < Ws) {
        const T* s = srcs + (cv * V) * rg.pl + r * rg.rp + q;
        VecT<scalar_t, V> u;
#pragma unroll
        for (int j = 0; j < V; ++j) u.v[j] = static_cast<scalar_t>(s[j * rg.pl]);
        *reinterpret_cast<VecT<scalar_t, V>*>(dst + img_off + (int64_t(gr) * Ws + gq) * C + cg) = u;
      }
    }
  } else {
    const int total = (rg.rows * rg.cols) << ct_shift;
    for (int i = tid; i < total; i += kThreads) {
      const int c = i & (CT - 1);
      const int pix = i >> ct_shift;
      const int r = rg.fd_cols.div(pix);
      const int q = pix - r * rg.cols;
      const int gr = r0 + r, gq = q0 + q, cg = c0 + c;
      if (cg < C && gr < Hs && gq < Ws) {
        dst[img_off + (int64_t(gr) * Ws + gq) * C + cg] = static_cast<scalar_t>(srcs[c * rg.pl + r * rg.rp + q]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Micro-kernels on shared memory. All loops have compile-time trip counts and are fully unrolled; the tap
// conditions fold away.

// z[a][b] = sum_{kh, kw} w[kh][kw] * xs[a*S + kh][b*S + kw], summed kh-major as the CPU code does.
template <int K, int S, typename T>
BDEV void conv_micro(const T* __restrict__ xs, int rp, const T (&w)[K * K], T (&z)[kRH][kRW]) {
  constexpr int ROWS = (kRH - 1) * S + K, SEGW = (kRW - 1) * S + K;
#pragma unroll
  for (int a = 0; a < kRH; ++a) {
#pragma unroll
    for (int b = 0; b < kRW; ++b) z[a][b] = T(0);
  }
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    T seg[SEGW];
#pragma unroll
    for (int j = 0; j < SEGW; ++j) seg[j] = xs[q * rp + j];
#pragma unroll
    for (int a = 0; a < kRH; ++a) {
      const int kh = q - a * S;
      if (kh < 0 || kh >= K) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
#pragma unroll
        for (int b = 0; b < kRW; ++b) z[a][b] += w[kh * K + kw] * seg[b * S + kw];
      }
    }
  }
}

// gw[kh][kw] += sum_{a, b} dz[a][b] * xs[a*S + kh][b*S + kw]
template <int K, int S, typename T>
BDEV void wgrad_micro(const T* __restrict__ xs, int xrp, const T* __restrict__ dzs, int drp, T (&gw)[K * K]) {
  constexpr int ROWS = (kRH - 1) * S + K, SEGW = (kRW - 1) * S + K;
  T d[kRH][kRW];
#pragma unroll
  for (int a = 0; a < kRH; ++a) {
#pragma unroll
    for (int b = 0; b < kRW; ++b) d[a][b] = dzs[a * drp + b];
  }
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    T seg[SEGW];
#pragma unroll
    for (int j = 0; j < SEGW; ++j) seg[j] = xs[q * xrp + j];
#pragma unroll
    for (int a = 0; a < kRH; ++a) {
      const int kh = q - a * S;
      if (kh < 0 || kh >= K) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
#pragma unroll
        for (int b = 0; b < kRW; ++b) gw[kh * K + kw] += d[a][b] * seg[b * S + kw];
      }
    }
  }
}

// Transposed convolution of dz into the S*kRH x S*kRW inputs (S*a + py, S*b + px) of a micro-tile:
// gx[i][j] = sum over (oh, kh) with oh*S - P + kh = i (same for columns) of w[kh][kw] * dz[oh][ow].
// dzs points at the window of dz rows/cols that can reach the micro-tile: dz window row q holds output row
// a + q - HD relative to the micro-tile's first output row, HD = ceil(P / S).
template <int K, int S, typename T>
BDEV void dgrad_micro(const T* __restrict__ dzs, int rp, const T (&w)[K * K], T (&gx)[S * kRH][S * kRW]) {
  constexpr int P = K / 2, HD = (P + S - 1) / S, WR = kRH + 2 * HD, WC = kRW + 2 * HD;
#pragma unroll
  for (int i = 0; i < S * kRH; ++i) {
#pragma unroll
    for (int j = 0; j < S * kRW; ++j) gx[i][j] = T(0);
  }
#pragma unroll
  for (int q = 0; q < WR; ++q) {
    T seg[WC];
#pragma unroll
    for (int j = 0; j < WC; ++j) seg[j] = dzs[q * rp + j];
#pragma unroll
    for (int a = 0; a < kRH; ++a) {
#pragma unroll
      for (int py = 0; py < S; ++py) {
        // input row S*a + py receives output row (S*a + py + P - kh) / S = a + (q - a - HD): solve for kh.
        const int kh = py + P - S * (q - a - HD);
        if (kh < 0 || kh >= K) continue;
#pragma unroll
        for (int b = 0; b < kRW; ++b) {
#pragma unroll
          for (int px = 0; px < S; ++px) {
#pragma unroll
            for (int t = -HD; t <= HD; ++t) {
              const int kw = px + P - S * t;
              if (kw < 0 || kw >= K) continue;
              gx[S * a + py][S * b + px] += w[kh * K + kw] * seg[b + t + HD];
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward kernel: z over owned tiles; modes kZStats, kApply, kGStats.

template <typename scalar_t, int K, int S>
__global__ void __launch_bounds__(kThreads) dw_fwd_kernel(const Params<scalar_t> p) {
  using T = at::opmath_type<scalar_t>;
  constexpr int P = K / 2, KK = K * K;
  T* xs = dyn_smem<T>();
  T* ys = xs + p.CT * p.xr.pl;
  const int tid = threadIdx.x;
  const int cgi = static_cast<int>(blockIdx.x % p.ncg);
  const int g = static_cast<int>(blockIdx.x / p.ncg);
  const int c0 = cgi * p.CT;
  const int lc = tid & (p.CT - 1);
  const int pos = tid >> p.ct_shift;
  const int tpc = kThreads >> p.ct_shift;
  const int c = c0 + lc;
  const bool active = c < p.C;
  const int mode = p.mode;

  T w[KK];
#pragma unroll
  for (int t = 0; t < KK; ++t) w[t] = active ? p.w[int64_t(c) * KK + t] : T(0);
  T ca = T(0), cb = T(0), cm = T(0);
  if (active && mode != kZStats) {
    ca = p.ca[c];
    cb = p.cb[c];
  }
  if (active && mode == kGStats) cm = p.cm[c];
  // kZStats: count, mean, M2 (Chan); kGStats: sum g, sum g * (z - mean).
  T st0 = T(0), st1 = T(0), st2 = T(0);

  const int TOH = p.MH * kRH, TOW = p.MW * kRW, nmicro = p.MH * p.MW;
  const int64_t in_img = int64_t(p.C) * p.H * p.W, out_img = int64_t(p.C) * p.Ho * p.Wo;
  const int64_t it0 = int64_t(g) * p.items_per_block;
  const int64_t it1 = p.items < it0 + p.items_per_block ? p.items : it0 + p.items_per_block;
  for (int64_t it = it0; it < it1; ++it) {
    const int64_t n = it / p.tiles_per_img;
    const int t = static_cast<int>(it - n * p.tiles_per_img);
    const int th = t / p.tiles_w;
    const int oh0 = th * TOH, ow0 = (t - th * p.tiles_w) * TOW;
    __syncthreads();  // the previous item is done with the shared tiles
    load_region(xs, p.xr, p.x, n * in_img, p.C, p.H, p.W, c0, p.CT, p.ct_shift, oh0 * S - P, ow0 * S - P, p.cl,
                p.vec);
    if (mode == kGStats) {
      load_region(ys, p.yr, p.dy, n * out_img, p.C, p.Ho, p.Wo, c0, p.CT, p.ct_shift, oh0, ow0, p.cl, p.vec);
    }
    __syncthreads();
    if (active) {
      for (int m = pos; m < nmicro; m += tpc) {
        const int mc = p.fd_mh.div(m);
        const int mr = m - mc * p.MH;
        const int r0 = mr * kRH, q0 = mc * kRW;
        T z[kRH][kRW];
        conv_micro<K, S>(xs + lc * p.xr.pl + r0 * S * p.xr.rp + q0 * S, p.xr.rp, w, z);
        const int vr = p.Ho - (oh0 + r0), vc = p.Wo - (ow0 + q0);  // valid rows / cols of the micro-tile
        T* yv = ys + lc * p.yr.pl + r0 * p.yr.rp + q0;
        if (mode == kZStats) {
          T lsum = T(0);
          int ln = 0;
#pragma unroll
          for (int a = 0; a < kRH; ++a) {
#pragma unroll
            for (int b = 0; b < kRW; ++b) {
              if (a < vr && b < vc) {
                lsum += z[a][b];
                ++ln;
              }
            }
          }
          if (ln > 0) {
            const T lmean = lsum / T(ln);
            T lm2 = T(0);
#pragma unroll
            for (int a = 0; a < kRH; ++a) {
#pragma unroll
              for (int b = 0; b < kRW; ++b) {
                if (a < vr && b < vc) {
                  const T d = z[a][b] - lmean;
                  lm2 += d * d;
                }
              }
            }
            const T nn = st0 + T(ln);
            const T delta = lmean - st1;
            const T f = T(ln) / nn;
            st1 += delta * f;
            st2 += lm2 + delta * delta * st0 * f;
            st0 = nn;
          }
        } else if (mode == kApply) {
          act_switch(p.act, [&](auto ac) {
            constexpr int ACT = decltype(ac)::value;
#pragma unroll
            for (int a = 0; a < kRH; ++a) {
#pragma unroll
              for (int b = 0; b < kRW; ++b) yv[a * p.yr.rp + b] = act_forward<ACT>(ca * z[a][b] + cb);
            }
          });
        } else {
          act_switch(p.act, [&](auto ac) {
            constexpr int ACT = decltype(ac)::value;
#pragma unroll
            for (int a = 0; a < kRH; ++a) {
#pragma unroll
              for (int b = 0; b < kRW; ++b) {
                if (a < vr && b < vc) {
                  const T gv = act_backward<ACT>(ca * z[a][b] + cb, yv[a * p.yr.rp + b]);
                  st0 += gv;
                  st1 += gv * (z[a][b] - cm);
                }
              }
            }
          });
        }
      }
    }
    if (mode == kApply) {
      __syncthreads();
      store_region(ys, p.yr, p.out, n * out_img, p.C, p.Ho, p.Wo, c0, p.CT, p.ct_shift, oh0, ow0, p.cl, p.vec);
    }
  }
  if (mode == kApply) return;

  // Per-channel reduction over the block's threads, in a fixed order.
  __syncthreads();
  T* red = xs;
  red[tid] = st0;
  red[kThreads + tid] = st1;
  red[2 * kThreads + tid] = st2;
  __syncthreads();
  if (tid < p.CT && c0 + tid < p.C) {
    const int64_t cc = c0 + tid;
    if (mode == kZStats) {
      T n = T(0), mean = T(0), m2 = T(0);
      for (int j = 0; j < tpc; ++j) {
        const int idx = (j << p.ct_shift) + tid;
        const T nb = red[idx];
        if (nb == T(0)) continue;
        const T nn = n + nb;
        const T delta = red[kThreads + idx] - mean;
        const T f = nb / nn;
        mean += delta * f;
        m2 += red[2 * kThreads + idx] + delta * delta * n * f;
        n = nn;
      }
      p.partial[(0 * p.C + cc) * p.G + g] = n;
      p.partial[(int64_t(1) * p.C + cc) * p.G + g] = mean;
      p.partial[(int64_t(2) * p.C + cc) * p.G + g] = m2;
    } else {
      T s0 = T(0), s1 = T(0);
      for (int j = 0; j < tpc; ++j) {
        const int idx = (j << p.ct_shift) + tid;
        s0 += red[idx];
        s1 += red[kThreads + idx];
      }
      p.partial[(0 * p.C + cc) * p.G + g] = s0;
      p.partial[(int64_t(1) * p.C + cc) * p.G + g] = s1;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernel: dz on the owned tile plus a halo of HD outputs, then grad_weight partials over the owned
// outputs and grad_x of the owned inputs [oh0*S, (oh0+TOH)*S) x [ow0*S, (ow0+TOW)*S).

template <typename scalar_t, int K, int S>
__global__ void __launch_bounds__(kThreads) dw_bwd_kernel(const Params<scalar_t> p) {
  using T = at::opmath_type<scalar_t>;
  constexpr int P = K / 2, KK = K * K, HD = (P + S - 1) / S, NV = KK + 2;
  T* xs = dyn_smem<T>();
  T* ds = xs + p.CT * p.xr.pl;
  const int tid = threadIdx.x;
  const int cgi = static_cast<int>(blockIdx.x % p.ncg);
  const int g = static_cast<int>(blockIdx.x / p.ncg);
  const int c0 = cgi * p.CT;
  const int lc = tid & (p.CT - 1);
  const int pos = tid >> p.ct_shift;
  const int tpc = kThreads >> p.ct_shift;
  const int c = c0 + lc;
  const bool active = c < p.C;
  const bool train = p.mode == kBwdTrain;

  T w[KK];
#pragma unroll
  for (int t = 0; t < KK; ++t) w[t] = active ? p.w[int64_t(c) * KK + t] : T(0);
  T ca = T(0), cb = T(0), cm = T(0), cc0 = T(0), cc1 = T(0);
  if (active) {
    ca = p.ca[c];
    cb = p.cb[c];
    if (train) {
      cm = p.cm[c];
      cc0 = p.c0[c];
      cc1 = p.c1[c];
    }
  }
  T gw[KK];
#pragma unroll
  for (int t = 0; t < KK; ++t) gw[t] = T(0);
  T s_gz = T(0), s_g = T(0);  // evaluation mode: sum g*z, sum g over owned outputs

  const int TOH = p.MH * kRH, TOW = p.MW * kRW, nmicro = p.MH * p.MW, nmicro_d = p.mhd * p.mwd;
  const int xpl = p.xr.pl, xrp = p.xr.rp, ypl = p.yr.pl, yrp = p.yr.rp;
  const int64_t in_img = int64_t(p.C) * p.H * p.W, out_img = int64_t(p.C) * p.Ho * p.Wo;
  const int64_t it0 = int64_t(g) * p.items_per_block;
  const int64_t it1 = p.items < it0 + p.items_per_block ? p.items : it0 + p.items_per_block;
  for (int64_t it = it0; it < it1; ++it) {
    const int64_t n = it / p.tiles_per_img;
    const int t = static_cast<int>(it - n * p.tiles_per_img);
    const int th = t / p.tiles_w;
    const int oh0 = th * TOH, ow0 = (t - th * p.tiles_w) * TOW;
    __syncthreads();
    load_region(xs, p.xr, p.x, n * in_img, p.C, p.H, p.W, c0, p.CT, p.ct_shift, (oh0 - HD) * S - P,
                (ow0 - HD) * S - P, p.cl, p.vec);
    load_region(ds, p.yr, p.dy, n * out_img, p.C, p.Ho, p.Wo, c0, p.CT, p.ct_shift, oh0 - HD, ow0 - HD, p.cl,
                p.vec);
    __syncthreads();
    // 1. dz over the dz region (in place of dy); zero outside the output plane.
    if (active) {
      for (int m = pos; m < nmicro_d; m += tpc) {
        const int mc = p.fd_mhd.div(m);
        const int mr = m - mc * p.mhd;
        const int r0 = mr * kRH, q0 = mc * kRW;
        T z[kRH][kRW];
        conv_micro<K, S>(xs + lc * xpl + r0 * S * xrp + q0 * S, xrp, w, z);
        T* dv = ds + lc * ypl + r0 * yrp + q0;
        const int ohb = oh0 - HD + r0, owb = ow0 - HD + q0;
        act_switch(p.act, [&](auto ac) {
          constexpr int ACT = decltype(ac)::value;
#pragma unroll
          for (int a = 0; a < kRH; ++a) {
#pragma unroll
            for (int b = 0; b < kRW; ++b) {
              const int oh = ohb + a, ow = owb + b;
              const bool valid = oh >= 0 && oh < p.Ho && ow >= 0 && ow < p.Wo;
              const T zz = z[a][b];
              const T gv = act_backward<ACT>(ca * zz + cb, dv[a * yrp + b]);
              T dz;
              if (train) {
                dz = ca * gv - cc0 - cc1 * (zz - cm);
              } else {
                dz = gv * ca;
                const int r = r0 + a, q = q0 + b;
                if (valid && r >= HD && r < HD + TOH && q >= HD && q < HD + TOW) {
                  s_gz += gv * zz;
                  s_g += gv;
                }
              }
              dv[a * yrp + b] = valid ? dz : T(0);
            }
          }
        });
      }
    }
    __syncthreads();
    // 2. grad_weight over the owned outputs.
    if (active) {
      for (int m = pos; m < nmicro; m += tpc) {
        const int mc = p.fd_mh.div(m);
        const int mr = m - mc * p.MH;
        const int r0 = mr * kRH, q0 = mc * kRW;
        wgrad_micro<K, S>(xs + lc * xpl + (HD + r0) * S * xrp + (HD + q0) * S, xrp,
                          ds + lc * ypl + (HD + r0) * yrp + (HD + q0), yrp, gw);
      }
    }
    __syncthreads();
    // 3. grad_x of the owned inputs, staged in xs (no longer needed) for a coalesced store.
    if (active) {
      for (int m = pos; m < nmicro; m += tpc) {
        const int mc = p.fd_mh.div(m);
        const int mr = m - mc * p.MH;
        const int r0 = mr * kRH, q0 = mc * kRW;
        T gx[S * kRH][S * kRW];
        dgrad_micro<K, S>(ds + lc * ypl + r0 * yrp + q0, yrp, w, gx);
        T* gv = xs + lc * xpl + (S * r0) * xrp + S * q0;
#pragma unroll
        for (int i = 0; i < S * kRH; ++i) {
#pragma unroll
          for (int j = 0; j < S * kRW; ++j) gv[i * xrp + j] = gx[i][j];
        }
      }
    }
    __syncthreads();
    store_region(xs, p.gr, p.out, n * in_img, p.C, p.H, p.W, c0, p.CT, p.ct_shift, oh0 * S, ow0 * S, p.cl, p.vec);
  }

  // Per-channel reduction of gw (and the evaluation sums), kRedChunk values at a time, fixed order.
  const int nv = train ? KK : NV;
  T* red = xs;
#pragma unroll
  for (int v0 = 0; v0 < NV; v0 += kRedChunk) {
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kRedChunk; ++j) {
      const int v = v0 + j;
      if (v < NV) red[j * kThreads + tid] = v < KK ? gw[v < KK ? v : 0] : (v == KK ? s_gz : s_g);
    }
    __syncthreads();
    for (int pr = tid; pr < (kRedChunk << p.ct_shift); pr += kThreads) {
      const int j = pr >> p.ct_shift, l = pr & (p.CT - 1);
      const int v = v0 + j;
      if (v < nv && c0 + l < p.C) {
        T s = T(0);
        for (int q = 0; q < tpc; ++q) s += red[j * kThreads + (q << p.ct_shift) + l];
        p.partial[(int64_t(v) * p.C + c0 + l) * p.G + g] = s;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Per-channel kernels (one block per channel unless noted).

template <typename T>
BDEV double block_sum(double v, double* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  const double r = red[0];
  __syncthreads();
  return r;
}

// mean, biased var (double, as the CPU code) -> mean/var outputs and the folded a = gamma*invstd, b.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_zstats_kernel(const T* part, int C, int G, double count, const T* gamma, const T* beta, double eps,
                           T* mean_out, T* var_out, T* coef_a, T* coef_b) {
  __shared__ double red[kThreads];
  const int c = blockIdx.x, tid = threadIdx.x;
  const T* pn = part + (int64_t(0) * C + c) * G;
  const T* pm = part + (int64_t(1) * C + c) * G;
  const T* p2 = part + (int64_t(2) * C + c) * G;
  double s = 0.0;
  for (int i = tid; i < G; i += kThreads) s += static_cast<double>(pn[i]) * static_cast<double>(pm[i]);
  const double mean = block_sum<T>(s, red) / count;
  double s2 = 0.0;
  for (int i = tid; i < G; i += kThreads) {
    const double d = static_cast<double>(pm[i]) - mean;
    s2 += static_cast<double>(p2[i]) + static_cast<double>(pn[i]) * d * d;
  }
  const double var = block_sum<T>(s2, red) / count;
  if (tid == 0) {
    const T a = static_cast<T>(static_cast<double>(gamma[c]) / ::sqrt(var + eps));
    const T b = static_cast<T>(static_cast<double>(beta[c]) - mean * static_cast<double>(a));
    mean_out[c] = static_cast<T>(mean);
    var_out[c] = static_cast<T>(var);
    coef_a[c] = a;
    coef_b[c] = b;
  }
}

// Training backward: a = gamma*invstd, b = beta - mean*a, invstd from the saved var (CPU formulas).
// coef rows: 0 a, 1 b, 2 mean, 3 invstd, 4 c0, 5 c1. Grid-stride over channels.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    prep_train_coef_kernel(const T* gamma, const T* beta, const T* mean, const T* var, double eps, int C, T* coef) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c >= C) return;
  const T invstd = static_cast<T>(1.0 / ::sqrt(static_cast<double>(var[c]) + eps));
  const T m = mean[c];
  const T a = mul_rn(gamma[c], invstd);
  const T b = sub_rn(beta[c], mul_rn(m, a));
  coef[c] = a;
  coef[C + c] = b;
  coef[2 * C + c] = m;
  coef[3 * C + c] = invstd;
}

// Training backward: sums of g and g*(z-mean) -> grad_bn_bias, grad_bn_weight (double) and c0, c1.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_gstats_kernel(const T* part, int C, int G, double count, T* coef, double* grad_gamma,
                           double* grad_beta) {
  __shared__ double red[kThreads];
  const int c = blockIdx.x, tid = threadIdx.x;
  const T* p0 = part + (int64_t(0) * C + c) * G;
  const T* p1 = part + (int64_t(1) * C + c) * G;
  double s0 = 0.0, s1 = 0.0;
  for (int i = tid; i < G; i += kThreads) s0 += static_cast<double>(p0[i]);
  for (int i = tid; i < G; i += kThreads) s1 += static_cast<double>(p1[i]);
  const double sum_g = block_sum<T>(s0, red);
  const double sum_g_zc = block_sum<T>(s1, red);
  if (tid == 0) {
    const T a = coef[c], invstd = coef[3 * C + c];
    grad_beta[c] = sum_g;
    grad_gamma[c] = sum_g_zc * static_cast<double>(invstd);
    coef[4 * C + c] = static_cast<T>(static_cast<double>(a) * sum_g / count);
    coef[5 * C + c] = static_cast<T>(static_cast<double>(mul_rn(mul_rn(a, invstd), invstd)) * sum_g_zc / count);
  }
}

// Sums of the backward kernel's partials: values [0, KK) -> grad_weight, KK -> sum g*z, KK+1 -> sum g.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_wgrad_kernel(const T* part, int C, int G, int nv, int KK, double* gw, double* s_gz, double* s_g) {
  __shared__ double red[kThreads];
  const int c = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  constexpr int kWarps = kThreads / 32;
  for (int v0 = 0; v0 < nv; v0 += kWarps) {
    const int v = v0 + warp;
    double s = 0.0;
    if (v < nv) {
      const T* pv = part + (int64_t(v) * C + c) * G;
      for (int i = lane; i < G; i += 32) s += static_cast<double>(pv[i]);
    }
    red[tid] = s;
    __syncthreads();
    if (tid < kWarps && v0 + tid < nv) {
      double tot = 0.0;
      for (int l = 0; l < 32; ++l) tot += red[tid * 32 + l];
      const int vv = v0 + tid;
      if (vv < KK) {
        gw[int64_t(c) * KK + vv] = tot;
      } else if (vv == KK) {
        s_gz[c] = tot;
      } else {
        s_g[c] = tot;
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: tile plan.

struct Plan {
  int CT = 1, ct_shift = 0, ncg = 1, MH = 1, MW = 1, tiles_h = 1, tiles_w = 1, mhd = 1, mwd = 1;
  Region xr, yr, gr;
  size_t smem = 0;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row pitch >= cols such that row_step rows further is CT banks further (mod 32): with the plane pitch 1 mod
// 32, the CT channels x 32/CT micro-tiles of a warp then hit 32 distinct banks.
int row_pitch(int cols, int row_step, int CT) {
  if (CT >= 2 && CT < 32) {
    for (int rp = cols; rp < cols + 32; ++rp) {
      if ((row_step * rp) % 32 == CT) return rp;
    }
  }
  return cols;
}

Region make_region(int rows, int cols, int row_step, int CT) {
  Region r;
  r.rows = rows;
  r.cols = cols;
  r.rp = row_pitch(cols, row_step, CT);
  const int64_t pl = int64_t(rows) * r.rp;
  r.pl = static_cast<int>(pl + (33 - pl % 32) % 32);  // 1 mod 32
  r.fd_cols = FastDiv(cols);
  r.fd_rows = FastDiv(rows);
  return r;
}

struct PlanKey {
  std::array<int64_t, 11> v;
  bool operator<(const PlanKey& o) const { return v < o.v; }
};

// Picks CT and the tile (MH x MW micro-tiles) minimising a rough time model: per tile, the larger of the
// block's instruction time (shared loads + FMAs + copies) and its share of DRAM bandwidth, plus a fixed cost.
Plan make_plan(bool bwd, bool cl, int C, int H, int W, int K, int S, size_t elem, size_t tsize, size_t budget) {
  const int Ho = static_cast<int>(conv_out_size(H, K, S)), Wo = static_cast<int>(conv_out_size(W, K, S));
  const int P = K / 2, HD = (P + S - 1) / S;
  const int vec_width = static_cast<int>(16 / elem);
  const int rows_c = (kRH - 1) * S + K, segw = (kRW - 1) * S + K;
  const double conv_i = rows_c * segw + double(K) * K * kRH * kRW;
  int ct_max = 1;
  while (ct_max < C && ct_max < 32) ct_max *= 2;
  const int mh_max = static_cast<int>(std::min<int64_t>(kMaxMicro, ceil_div(Ho, kRH)));
  const int mw_max = static_cast<int>(std::min<int64_t>(kMaxMicro, ceil_div(Wo, kRW)));
  Plan best;
  double best_cost = -1.0;
  for (int CT = ct_max; CT >= 1; CT /= 2) {
    const int tpc = kThreads / CT;
    const int ncg = static_cast<int>(ceil_div(C, CT));
    const bool vec = cl && C % vec_width == 0 && CT >= vec_width;
    for (int MH = 1; MH <= mh_max; ++MH) {
      for (int MW = 1; MW <= mw_max; ++MW) {
        const int TOH = MH * kRH, TOW = MW * kRW;
        Plan pl;
        pl.CT = CT;
        pl.ncg = ncg;
        pl.MH = MH;
        pl.MW = MW;
        pl.tiles_h = static_cast<int>(ceil_div(Ho, TOH));
        pl.tiles_w = static_cast<int>(ceil_div(Wo, TOW));
        double compute_i, io_elems, mem_elems;
        if (!bwd) {
          pl.xr = make_region((TOH - 1) * S + K, (TOW - 1) * S + K, kRH * S, CT);
          pl.yr = make_region(TOH, TOW, kRH, CT);
          pl.smem = std::max<size_t>(size_t(CT) * (pl.xr.pl + pl.yr.pl), 3 * kThreads) * tsize;
          compute_i = double(ceil_div(MH * MW, tpc)) * (conv_i + 6.0 * kRH * kRW);
          io_elems = double(CT) * (double(pl.xr.rows) * pl.xr.cols + double(TOH) * TOW);
          mem_elems = double(CT) * (double(std::min(TOH, Ho)) * S * std::min(TOW, Wo) * S + double(TOH) * TOW);
        } else {
          const int DH = static_cast<int>(ceil_div(TOH + 2 * HD, kRH)) * kRH;
          const int DW = static_cast<int>(ceil_div(TOW + 2 * HD, kRW)) * kRW;
          pl.mhd = DH / kRH;
          pl.mwd = DW / kRW;
          pl.xr = make_region((DH - 1) * S + K, (DW - 1) * S + K, kRH * S, CT);
          pl.yr = make_region(DH, DW, kRH, CT);
          pl.gr = pl.xr;
          pl.gr.rows = TOH * S;
          pl.gr.cols = TOW * S;
          pl.gr.fd_rows = FastDiv(pl.gr.rows);
          pl.gr.fd_cols = FastDiv(pl.gr.cols);
          pl.smem = std::max<size_t>(size_t(CT) * (pl.xr.pl + pl.yr.pl), kRedChunk * kThreads) * tsize;
          const double wgrad_i = rows_c * segw + double(K) * K * kRH * kRW + kRH * kRW;
          const double dgrad_i = double(kRH + 2 * HD) * (kRW + 2 * HD) + double(K) * K * kRH * kRW + 2.0 * S * S * kRH * kRW;
          compute_i = double(ceil_div(pl.mhd * pl.mwd, tpc)) * (conv_i + 14.0 * kRH * kRW) +
                      double(ceil_div(MH * MW, tpc)) * (wgrad_i + dgrad_i);
          io_elems = double(CT) * (double(pl.xr.rows) * pl.xr.cols + double(DH) * DW + double(TOH) * S * TOW * S);
          mem_elems = double(CT) * (2.0 * std::min(TOH, Ho) * S * std::min(TOW, Wo) * S + double(TOH) * TOW);
        }
        if (pl.smem > budget) continue;
        const double io_i = io_elems / kThreads * (vec ? 3.0 : 8.0);
        const double instr_cycles = 2.0 * (compute_i + io_i);  // 8 warps on 4 schedulers
        double eff = 1.0;
        if (cl) eff = std::min(1.0, double(CT) * elem / 32.0);
        const double mem_cycles = mem_elems * elem / eff / 20.0;
        const double cost = double(ncg) * pl.tiles_h * pl.tiles_w * (std::max(instr_cycles, mem_cycles) + 400.0);
        if (best_cost < 0 || cost < best_cost) {
          best_cost = cost;
          best = pl;
        }
      }
    }
  }
  TORCH_CHECK(best_cost >= 0, "betanas: no tile plan fits in ", budget, " bytes of shared memory");
  int sh = 0;
  while ((1 << sh) < best.CT) ++sh;
  best.ct_shift = sh;
  return best;
}

Plan get_plan(bool bwd, bool cl, int C, int H, int W, int K, int S, size_t elem, size_t tsize) {
  // Shared memory per block: at most a third (forward) or half (backward, which needs ~100-200 registers a
  // thread anyway) of the SM's, so that several blocks overlap each other's loads and syncs.
  const size_t per_sm = smem_per_sm_bytes();
  const size_t share = (bwd ? per_sm / 2 : per_sm / 3) - 1024;
  const size_t budget = std::min<size_t>(smem_optin_bytes(), std::max<size_t>(share, 20 * 1024));
  const PlanKey key{{bwd, cl, C, H, W, K, S, int64_t(elem), int64_t(tsize), int64_t(budget), 0}};
  static std::mutex mu;
  static std::map<PlanKey, Plan> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  Plan plan = make_plan(bwd, cl, C, H, W, K, S, elem, tsize, budget);
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() > 4096) cache.clear();
  cache.emplace(key, plan);
  return plan;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Params shared by all passes over one (x, plan): geometry, work split, layout.
template <typename scalar_t>
Params<scalar_t> make_params(const Plan& plan, const at::Tensor& x, int K, int S, bool cl) {
  Params<scalar_t> p;
  const int64_t N = x.size(0);
  p.C = static_cast<int>(x.size(1));
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  p.Ho = static_cast<int>(conv_out_size(p.H, K, S));
  p.Wo = static_cast<int>(conv_out_size(p.W, K, S));
  p.cl = cl ? 1 : 0;
  p.CT = plan.CT;
  p.ct_shift = plan.ct_shift;
  p.ncg = plan.ncg;
  p.MH = plan.MH;
  p.MW = plan.MW;
  p.mhd = plan.mhd;
  p.mwd = plan.mwd;
  p.fd_mh = FastDiv(plan.MH);
  p.fd_mhd = FastDiv(plan.mhd);
  p.tiles_w = plan.tiles_w;
  p.tiles_per_img = plan.tiles_h * plan.tiles_w;
  p.xr = plan.xr;
  p.yr = plan.yr;
  p.gr = plan.gr;
  p.items = N * p.tiles_per_img;
  if (p.items > 0) {
    const int64_t per_cg = std::max<int64_t>(1, kTargetBlocks / plan.ncg);
    const int64_t g0 = std::min<int64_t>(p.items, per_cg);
    p.items_per_block = ceil_div(p.items, g0);
    p.G = static_cast<int>(ceil_div(p.items, p.items_per_block));
  } else {
    p.items_per_block = 0;
    p.G = 0;
  }
  constexpr int V = 16 / sizeof(scalar_t);
  p.vec = (cl && p.C % V == 0 && plan.CT >= V) ? 1 : 0;
  p.x = x.const_data_ptr<scalar_t>();
  return p;
}

template <typename scalar_t>
void finish_vec(Params<scalar_t>& p) {
  if (p.vec && !(aligned16(p.x) && (p.dy == nullptr || aligned16(p.dy)) && (p.out == nullptr || aligned16(p.out)))) {
    p.vec = 0;
  }
}

at::ScalarType opmath_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor to_opmath(const at::Tensor& t, at::ScalarType ot) { return t.detach().to(ot).contiguous(); }

// The tensor the CPU code returns for an NCHW result converted with .contiguous(layout).
at::Tensor empty_in_layout(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat layout) {
  at::Tensor t = at::empty(sizes, options);
  if (layout == at::MemoryFormat::ChannelsLast && !t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    t = at::empty(sizes, options.memory_format(at::MemoryFormat::ChannelsLast));
  }
  return t;
}

at::Tensor like_param(const at::Tensor& v, const at::Tensor& param) {
  return v.view(param.sizes()).to(param.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------
// Ops.

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_bn_act_train_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                                     const at::Tensor& bn_weight,
                                                                     const at::Tensor& bn_bias, int64_t stride,
                                                                     int64_t act, double eps) {
  const char* op = "betanas::dw_bn_act_train";
  check_dw_args(op, c10::kCUDA, x_in, weight, {{"bn_weight", bn_weight}, {"bn_bias", bn_bias}}, stride, act);
  const int64_t K = weight.size(3);
  check_batch_stats_count(op, x_in, K, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto layout = layout_of(x_in);
  const bool cl = layout == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(layout);
  const auto ot = opmath_dtype(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t Ho = conv_out_size(x.size(2), K, stride), Wo = conv_out_size(x.size(3), K, stride);
  at::Tensor out = empty_in_layout({N, C, Ho, Wo}, x.options(), layout);
  at::Tensor mean = at::empty({C}, x.options().dtype(ot));
  at::Tensor var = at::empty({C}, x.options().dtype(ot));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bn_act_train_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor w = to_opmath(weight, ot), gamma = to_opmath(bn_weight, ot), beta = to_opmath(bn_bias, ot);
    at::Tensor coef = at::empty({2, C}, x.options().dtype(ot));
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      constexpr int KC = decltype(k)::value, SC = decltype(s)::value;
      const Plan plan = get_plan(false, cl, C, x.size(2), x.size(3), KC, SC, sizeof(scalar_t), sizeof(T));
      Params<scalar_t> p = make_params<scalar_t>(plan, x, KC, SC, cl);
      p.out = out.mutable_data_ptr<scalar_t>();
      p.w = w.const_data_ptr<T>();
      p.act = static_cast<int>(act);
      finish_vec(p);
      at::Tensor partial = at::empty({3, C, p.G}, x.options().dtype(ot));
      p.partial = partial.mutable_data_ptr<T>();
      p.mode = kZStats;
      launch(dw_fwd_kernel<scalar_t, KC, SC>, int64_t(p.ncg) * p.G, plan.smem, p);
      T* coef_p = coef.mutable_data_ptr<T>();
      launch(finalize_zstats_kernel<T>, C, 0, p.partial, p.C, p.G, double(N * Ho * Wo), gamma.const_data_ptr<T>(),
             beta.const_data_ptr<T>(), eps, mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>(), coef_p,
             coef_p + C);
      p.mode = kApply;
      p.ca = coef_p;
      p.cb = coef_p + C;
      launch(dw_fwd_kernel<scalar_t, KC, SC>, int64_t(p.ncg) * p.G, plan.smem, p);
    });
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_act_train_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, int64_t stride, int64_t act,
    double eps) {
  const char* op = "betanas::dw_bn_act_train_backward";
  check_dw_args(op, c10::kCUDA, x_in, weight,
                {{"bn_weight", bn_weight}, {"bn_bias", bn_bias}, {"mean", mean}, {"var", var}}, stride, act);
  const int64_t K = weight.size(3), C = x_in.size(1);
  check_grad_out(op, grad_out_in, x_in, K, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto layout = layout_of(x_in);
  const bool cl = layout == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(layout), dy = grad_out_in.contiguous(layout);
  const auto ot = opmath_dtype(x.scalar_type());
  const int64_t N = x.size(0);
  const int64_t count = N * conv_out_size(x.size(2), K, stride) * conv_out_size(x.size(3), K, stride);
  at::Tensor grad_x = empty_in_layout(x.sizes(), x.options(), layout);
  const auto dopt = x.options().dtype(at::kDouble);
  at::Tensor gw = at::empty({C * K * K}, dopt), gg = at::empty({C}, dopt), gb = at::empty({C}, dopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bn_act_train_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor w = to_opmath(weight, ot), gamma = to_opmath(bn_weight, ot), beta = to_opmath(bn_bias, ot);
    const at::Tensor m = to_opmath(mean, ot), v = to_opmath(var, ot);
    at::Tensor coef = at::empty({6, C}, x.options().dtype(ot));
    T* coef_p = coef.mutable_data_ptr<T>();
    launch(prep_train_coef_kernel<T>, ceil_div(C, kThreads), 0, gamma.const_data_ptr<T>(), beta.const_data_ptr<T>(),
           m.const_data_ptr<T>(), v.const_data_ptr<T>(), eps, static_cast<int>(C), coef_p);
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      constexpr int KC = decltype(k)::value, SC = decltype(s)::value;
      // Pass 1: sum g and sum g * (z - mean).
      const Plan pf = get_plan(false, cl, C, x.size(2), x.size(3), KC, SC, sizeof(scalar_t), sizeof(T));
      Params<scalar_t> p1 = make_params<scalar_t>(pf, x, KC, SC, cl);
      p1.dy = dy.const_data_ptr<scalar_t>();
      p1.w = w.const_data_ptr<T>();
      p1.act = static_cast<int>(act);
      p1.ca = coef_p;
      p1.cb = coef_p + C;
      p1.cm = coef_p + 2 * C;
      p1.mode = kGStats;
      finish_vec(p1);
      at::Tensor part1 = at::empty({2, C, p1.G}, x.options().dtype(ot));
      p1.partial = part1.mutable_data_ptr<T>();
      launch(dw_fwd_kernel<scalar_t, KC, SC>, int64_t(p1.ncg) * p1.G, pf.smem, p1);
      launch(finalize_gstats_kernel<T>, C, 0, p1.partial, p1.C, p1.G, double(count), coef_p,
             gg.mutable_data_ptr<double>(), gb.mutable_data_ptr<double>());
      // Pass 2: dz, grad_x, grad_weight.
      const Plan pb = get_plan(true, cl, C, x.size(2), x.size(3), KC, SC, sizeof(scalar_t), sizeof(T));
      Params<scalar_t> p2 = make_params<scalar_t>(pb, x, KC, SC, cl);
      p2.dy = dy.const_data_ptr<scalar_t>();
      p2.out = grad_x.mutable_data_ptr<scalar_t>();
      p2.w = w.const_data_ptr<T>();
      p2.act = static_cast<int>(act);
      p2.ca = coef_p;
      p2.cb = coef_p + C;
      p2.cm = coef_p + 2 * C;
      p2.c0 = coef_p + 4 * C;
      p2.c1 = coef_p + 5 * C;
      p2.mode = kBwdTrain;
      finish_vec(p2);
      at::Tensor part2 = at::empty({KC * KC, C, p2.G}, x.options().dtype(ot));
      p2.partial = part2.mutable_data_ptr<T>();
      launch(dw_bwd_kernel<scalar_t, KC, SC>, int64_t(p2.ncg) * p2.G, pb.smem, p2);
      launch(finalize_wgrad_kernel<T>, C, 0, p2.partial, p2.C, p2.G, KC * KC, KC * KC, gw.mutable_data_ptr<double>(),
             static_cast<double*>(nullptr), static_cast<double*>(nullptr));
    });
  });
  return {grad_x, like_param(gw, weight), like_param(gg, bn_weight), like_param(gb, bn_bias)};
}

at::Tensor dw_bn_act_eval_cuda(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
                               const at::Tensor& shift, int64_t stride, int64_t act) {
  check_dw_args("betanas::dw_bn_act_eval", c10::kCUDA, x_in, weight, {{"scale", scale}, {"shift", shift}}, stride,
                act);
  const int64_t K = weight.size(3);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto layout = layout_of(x_in);
  const bool cl = layout == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(layout);
  const auto ot = opmath_dtype(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = empty_in_layout(
      {N, C, conv_out_size(x.size(2), K, stride), conv_out_size(x.size(3), K, stride)}, x.options(), layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bn_act_eval_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor w = to_opmath(weight, ot), a = to_opmath(scale, ot), b = to_opmath(shift, ot);
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      constexpr int KC = decltype(k)::value, SC = decltype(s)::value;
      const Plan plan = get_plan(false, cl, C, x.size(2), x.size(3), KC, SC, sizeof(scalar_t), sizeof(T));
      Params<scalar_t> p = make_params<scalar_t>(plan, x, KC, SC, cl);
      p.out = out.mutable_data_ptr<scalar_t>();
      p.w = w.const_data_ptr<T>();
      p.ca = a.const_data_ptr<T>();
      p.cb = b.const_data_ptr<T>();
      p.act = static_cast<int>(act);
      p.mode = kApply;
      finish_vec(p);
      launch(dw_fwd_kernel<scalar_t, KC, SC>, int64_t(p.ncg) * p.G, plan.smem, p);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_act_eval_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, int64_t stride, int64_t act) {
  const char* op = "betanas::dw_bn_act_eval_backward";
  check_dw_args(op, c10::kCUDA, x_in, weight, {{"scale", scale}, {"shift", shift}}, stride, act);
  const int64_t K = weight.size(3), C = x_in.size(1);
  check_grad_out(op, grad_out_in, x_in, K, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto layout = layout_of(x_in);
  const bool cl = layout == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(layout), dy = grad_out_in.contiguous(layout);
  const auto ot = opmath_dtype(x.scalar_type());
  at::Tensor grad_x = empty_in_layout(x.sizes(), x.options(), layout);
  const auto dopt = x.options().dtype(at::kDouble);
  at::Tensor gw = at::empty({C * K * K}, dopt), gs = at::empty({C}, dopt), gb = at::empty({C}, dopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bn_act_eval_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor w = to_opmath(weight, ot), a = to_opmath(scale, ot), b = to_opmath(shift, ot);
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      constexpr int KC = decltype(k)::value, SC = decltype(s)::value;
      const Plan pb = get_plan(true, cl, C, x.size(2), x.size(3), KC, SC, sizeof(scalar_t), sizeof(T));
      Params<scalar_t> p = make_params<scalar_t>(pb, x, KC, SC, cl);
      p.dy = dy.const_data_ptr<scalar_t>();
      p.out = grad_x.mutable_data_ptr<scalar_t>();
      p.w = w.const_data_ptr<T>();
      p.ca = a.const_data_ptr<T>();
      p.cb = b.const_data_ptr<T>();
      p.act = static_cast<int>(act);
      p.mode = kBwdEval;
      finish_vec(p);
      at::Tensor part = at::empty({KC * KC + 2, C, p.G}, x.options().dtype(ot));
      p.partial = part.mutable_data_ptr<T>();
      launch(dw_bwd_kernel<scalar_t, KC, SC>, int64_t(p.ncg) * p.G, pb.smem, p);
      launch(finalize_wgrad_kernel<T>, C, 0, p.partial, p.C, p.G, KC * KC + 2, KC * KC,
             gw.mutable_data_ptr<double>(), gs.mutable_data_ptr<double>(), gb.mutable_data_ptr<double>());
    });
  });
  return {grad_x, like_param(gw, weight), like_param(gs, scale), like_param(gb, shift)};
}

}  // namespace

#ifndef BETANAS_CUDA_EMULATION  // the emulation harness calls the entry points directly
TORCH_LIBRARY_IMPL(betanas, CUDA, m) {
  m.impl("dw_bn_act_train", &dw_bn_act_train_cuda);
  m.impl("dw_bn_act_train_backward", &dw_bn_act_train_backward_cuda);
  m.impl("dw_bn_act_eval", &dw_bn_act_eval_cuda);
  m.impl("dw_bn_act_eval_backward", &dw_bn_act_eval_backward_cuda);
}
#endif

}  // namespace betanas
