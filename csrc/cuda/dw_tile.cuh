// Device side of the depthwise tiles: which channels and tiles a block and a thread own, shared-memory
// regions and their copies from and to global memory, and the fixed-order reductions over a block's threads.
// The host side that sizes them is dw_tile_plan.cuh; `launch` starts the kernels. Private to the files that
// include it (dw_bn_act.cu, dw_ragged.cuh), hence internal linkage.
//
// Shared arrays are [channel][row][col]; the plane pitch is 1 mod 32 and the row pitch is chosen so that a
// warp (CT channels x 32/CT micro-tiles) hits 32 distinct banks. The global <-> shared copies are the only
// layout-dependent code: NCHW copies run along W, channels_last copies run along C with 16-byte vectors when
// C allows it; both are coalesced.
#pragma once
#include <cstdint>
#include <utility>

#include <c10/util/Exception.h>
#ifndef BETANAS_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#endif

namespace betanas {
namespace {

constexpr int kThreads = 256;  // every kernel of the depthwise stage runs 256-thread blocks
constexpr int kRH = 2;         // micro-tile rows (outputs per thread per step)
constexpr int kRW = 4;         // micro-tile columns
constexpr int kRedChunk = 8;   // values reduced at a time at the end of the backward kernel

#define BDEV __device__ __forceinline__

#ifndef BETANAS_CUDA_EMULATION
template <typename T>
BDEV T* dyn_smem() {
  extern __shared__ __align__(16) unsigned char betanas_dyn_smem[];
  return reinterpret_cast<T*>(betanas_dyn_smem);
}

BDEV uint32_t umulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
#else
// A host test harness that runs every CUDA thread as a CPU thread provides these.
using betanas_emu::dyn_smem;
using betanas_emu::umulhi;
#endif

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
  BDEV int at(int c, int r, int q) const { return c * pl + r * rp + q; }
};

// The launch geometry both kernels decode, chosen on the host (dw_tile_plan.cuh): a block owns CT channels
// (a power of two) of a run of items, an item being one image and one tile of MH x MW micro-tiles. Blocks
// are laid out channel group fastest.
struct TileGeometry {
  int64_t items = 0, items_per_block = 0;
  int C = 0, H = 0, W = 0, Ho = 0, Wo = 0;
  int ncg = 1, G = 0, cl = 0, vec = 0;
  int CT = 1, ct_shift = 0, MH = 1, MW = 1, tiles_w = 1, tiles_per_img = 1;
  int mhd = 1, mwd = 1;  // micro-tiles of the dz region (backward)
  FastDiv fd_mh, fd_mhd;
  Region xr, yr, gr;  // x tile; dy / y / dz tile; grad_x tile (backward, aliases xr's storage)
};

// This thread's share of the launch.
struct BlockWork {
  int g;             // the block's column in the per-block partials
  int c0;            // first channel of the block's group
  int lc, c;         // the thread's channel, within the group and overall
  bool active;       // c < C: the threads of a partial last group only help with the copies
  int pos, tpc;      // the thread's first micro-tile and its step: the number of threads of a channel
  int64_t it0, it1;  // the block's items
};

BDEV BlockWork block_work(const TileGeometry& geo) {
  const int tid = threadIdx.x;
  BlockWork bw;
  const int cgi = static_cast<int>(blockIdx.x % geo.ncg);
  bw.g = static_cast<int>(blockIdx.x / geo.ncg);
  bw.c0 = cgi * geo.CT;
  bw.lc = tid & (geo.CT - 1);
  bw.pos = tid >> geo.ct_shift;
  bw.tpc = kThreads >> geo.ct_shift;
  bw.c = bw.c0 + bw.lc;
  bw.active = bw.c < geo.C;
  bw.it0 = int64_t(bw.g) * geo.items_per_block;
  bw.it1 = geo.items < bw.it0 + geo.items_per_block ? geo.items : bw.it0 + geo.items_per_block;
#ifdef BETANAS_CUDA_EMULATION  // the harness asserts that its multi-item configuration reaches such blocks
  if (tid == 0 && bw.it1 - bw.it0 > 1) betanas_emu::cover("dense blocks walking several items", bw.it1 - bw.it0);
#endif
  return bw;
}

// Item it: image n (offsets of its input and output planes) and the first output (oh0, ow0) of its tile.
struct TileItem {
  int64_t in_off, out_off;
  int oh0, ow0;
};

BDEV TileItem tile_item(const TileGeometry& geo, int64_t it) {
  const int64_t n = it / geo.tiles_per_img;
  const int t = static_cast<int>(it - n * geo.tiles_per_img);
  const int th = t / geo.tiles_w;
  return {n * (int64_t(geo.C) * geo.H * geo.W), n * (int64_t(geo.C) * geo.Ho * geo.Wo), th * geo.MH * kRH,
          (t - th * geo.tiles_w) * geo.MW * kRW};
}

// First row and column of micro-tile m of a tile mh micro-tiles high (numbered down the columns).
struct MicroPos {
  int r0, q0;
};

BDEV MicroPos micro_pos(const FastDiv& fd_mh, int mh, int m) {
  const int mc = fd_mh.div(m);
  const int mr = m - mc * mh;
  return {mr * kRH, mc * kRW};
}

// ---------------------------------------------------------------------------------------------------------
// Global <-> shared copies of a tile: rows [r0, r0 + rows) x cols [q0, q0 + cols) of channels [c0, c0 + CT)
// of one image. Loads give zeros outside the image and beyond C; stores write the positions inside (the
// stored tiles start at r0, q0 >= 0).

// Where a region lies in global memory: offset of the image, plane size, first channel, row and column; and
// the offset of channel c, row r, column q of the image in either layout.
struct Window {
  int64_t img_off;
  int Hs, Ws, c0, r0, q0;
  BDEV int64_t nchw(int c, int r, int q) const { return img_off + (int64_t(c) * Hs + r) * Ws + q; }
  BDEV int64_t cl(int C, int c, int r, int q) const { return img_off + (int64_t(r) * Ws + q) * C + c; }
};

// Element i of an NCHW copy, which runs along the columns: channel c, row r, column q of the region.
struct RegionPos {
  int c, r, q;
};

BDEV RegionPos nchw_pos(const Region& rg, int i) {
  const int t = rg.fd_cols.div(i);
  const int q = i - t * rg.cols;
  const int c = rg.fd_rows.div(t);
  return {c, t - c * rg.rows, q};
}

// Element i of a channels_last copy, which runs along the 2^lane_shift lanes of a pixel: c is the lane (a
// channel, or a vector of channels).
BDEV RegionPos cl_pos(const Region& rg, int i, int lane_shift) {
  const int pix = i >> lane_shift;
  const int r = rg.fd_cols.div(pix);
  return {i & ((1 << lane_shift) - 1), r, pix - r * rg.cols};
}

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) VecT {
  scalar_t v[V];
};

template <int V>
constexpr int log2_of() {
  return V <= 1 ? 0 : 1 + log2_of<V / 2>();
}

template <typename scalar_t, typename T>
BDEV void load_region(const TileGeometry& geo, const Region& rg, const Window& win,
                      const scalar_t* __restrict__ src, T* __restrict__ dst) {
  const int tid = threadIdx.x;
  const auto inside = [&](int cg, int gr, int gq) {
    return cg < geo.C && gr >= 0 && gr < win.Hs && gq >= 0 && gq < win.Ws;
  };
  if (!geo.cl) {
    const int total = geo.CT * rg.rows * rg.cols;
    for (int i = tid; i < total; i += kThreads) {
      const RegionPos e = nchw_pos(rg, i);
      const int gr = win.r0 + e.r, gq = win.q0 + e.q, cg = win.c0 + e.c;
      T v = T(0);
      if (inside(cg, gr, gq)) v = static_cast<T>(src[win.nchw(cg, gr, gq)]);
      dst[rg.at(e.c, e.r, e.q)] = v;
    }
  } else if (geo.vec) {
    constexpr int V = 16 / sizeof(scalar_t);
    const int nv_shift = geo.ct_shift - log2_of<V>();  // vectors per pixel: CT / V
    const int total = (rg.rows * rg.cols) << nv_shift;
    for (int i = tid; i < total; i += kThreads) {
      const RegionPos e = cl_pos(rg, i, nv_shift);
      const int gr = win.r0 + e.r, gq = win.q0 + e.q, cg = win.c0 + e.c * V;
      VecT<scalar_t, V> u;
      const bool in = inside(cg, gr, gq);
      if (in) u = *reinterpret_cast<const VecT<scalar_t, V>*>(src + win.cl(geo.C, cg, gr, gq));
      T* d = dst + rg.at(e.c * V, e.r, e.q);
#pragma unroll
      for (int j = 0; j < V; ++j) d[j * rg.pl] = in ? static_cast<T>(u.v[j]) : T(0);
    }
  } else {
    const int total = (rg.rows * rg.cols) << geo.ct_shift;
    for (int i = tid; i < total; i += kThreads) {
      const RegionPos e = cl_pos(rg, i, geo.ct_shift);
      const int gr = win.r0 + e.r, gq = win.q0 + e.q, cg = win.c0 + e.c;
      T v = T(0);
      if (inside(cg, gr, gq)) v = static_cast<T>(src[win.cl(geo.C, cg, gr, gq)]);
      dst[rg.at(e.c, e.r, e.q)] = v;
    }
  }
}

template <typename scalar_t, typename T>
BDEV void store_region(const TileGeometry& geo, const Region& rg, const Window& win, const T* __restrict__ srcs,
                       scalar_t* __restrict__ dst) {
  const int tid = threadIdx.x;
  const auto inside = [&](int cg, int gr, int gq) { return cg < geo.C && gr < win.Hs && gq < win.Ws; };
  if (!geo.cl) {
    const int total = geo.CT * rg.rows * rg.cols;
    for (int i = tid; i < total; i += kThreads) {
      const RegionPos e = nchw_pos(rg, i);
      const int gr = win.r0 + e.r, gq = win.q0 + e.q, cg = win.c0 + e.c;
      if (inside(cg, gr, gq)) {
        dst[win.nchw(cg, gr, gq)] = static_cast<scalar_t>(srcs[rg.at(e.c, e.r, e.q)]);
      }
    }
  } else if (geo.vec) {
    constexpr int V = 16 / sizeof(scalar_t);
    const int nv_shift = geo.ct_shift - log2_of<V>();
    const int total = (rg.rows * rg.cols) << nv_shift;
    for (int i = tid; i < total; i += kThreads) {
      const RegionPos e = cl_pos(rg, i, nv_shift);
      const int gr = win.r0 + e.r, gq = win.q0 + e.q, cg = win.c0 + e.c * V;
      if (inside(cg, gr, gq)) {
        const T* s = srcs + rg.at(e.c * V, e.r, e.q);
        VecT<scalar_t, V> u;
#pragma unroll
        for (int j = 0; j < V; ++j) u.v[j] = static_cast<scalar_t>(s[j * rg.pl]);
        *reinterpret_cast<VecT<scalar_t, V>*>(dst + win.cl(geo.C, cg, gr, gq)) = u;
      }
    }
  } else {
    const int total = (rg.rows * rg.cols) << geo.ct_shift;
    for (int i = tid; i < total; i += kThreads) {
      const RegionPos e = cl_pos(rg, i, geo.ct_shift);
      const int gr = win.r0 + e.r, gq = win.q0 + e.q, cg = win.c0 + e.c;
      if (inside(cg, gr, gq)) {
        dst[win.cl(geo.C, cg, gr, gq)] = static_cast<scalar_t>(srcs[rg.at(e.c, e.r, e.q)]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Reductions in a fixed order, so that results do not depend on timing (no atomics).

// Merges a part (nb values, mean mean_b, sum of squared deviations m2_b) into (n, mean, m2): Chan's formula.
template <typename T>
BDEV void welford_merge(T& n, T& mean, T& m2, T nb, T mean_b, T m2_b) {
  const T nn = n + nb;
  const T delta = mean_b - mean;
  const T f = nb / nn;
  mean += delta * f;
  m2 += m2_b + delta * delta * n * f;
  n = nn;
}

// Welford statistics of a micro-tile's valid outputs (vr rows, vc cols), merged into the thread's (count, mean,
// M2): the statistics pass of the dense and the ragged forward kernels.
template <typename T>
BDEV void zstats_micro(const T (&z)[kRH][kRW], int vr, int vc, T (&st)[3]) {
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
  if (ln == 0) return;
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
  welford_merge(st[0], st[1], st[2], T(ln), lmean, lm2);
}

// Rounded arithmetic that the compiler may not contract into an FMA, to reproduce the CPU's per-channel
// coefficients exactly (dense and ragged kernels).
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

// Sum over the threads of channel lane l, in thread order: thread j's value is red_v[(j << ct_shift) + l].
template <typename T>
BDEV T channel_sum(const T* red_v, int l, int tpc, int ct_shift) {
  T s = T(0);
  for (int j = 0; j < tpc; ++j) s += red_v[(j << ct_shift) + l];
  return s;
}

// Sum of v over the block (a tree: its order is fixed), with a kThreads scratch array in shared memory.
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

#ifndef BETANAS_CUDA_EMULATION
// Host side: every kernel of the depthwise stage (dense and ragged) as a 1-D grid of 256-thread blocks on the
// current stream, checked.
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
#else
using betanas_emu::launch;
#endif

}  // namespace
}  // namespace betanas
