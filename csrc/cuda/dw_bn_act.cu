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
//   dw_tile_plan.cuh chooses CT and the tile per shape; dw_tile.cuh decodes them on the device.
// * Shared memory. Each item stages the x tile with its halo (zero padded at the image border) in shared
//   memory, converted to the arithmetic type T (float, double for float64); the copies (dw_tile.cuh) are the
//   only layout-dependent code.
// * Compute. Thread (channel = tid % CT, slot = tid / CT) computes 2x4 output micro-tiles from shared memory
//   with the kernel size K and stride S as template constants (dw_conv_micro.cuh). The activation is a
//   runtime switch taken once per micro-tile.
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
#include <cmath>
#include <cstdint>
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
#include "cuda/dw_conv_micro.cuh"
#include "cuda/dw_tile.cuh"
#include "cuda/dw_tile_plan.cuh"

namespace betanas {
namespace {

// Modes of the forward kernel.
constexpr int kZStats = 0;  // batch statistics of z = conv(x)
constexpr int kApply = 1;   // y = act(a * z + b)
constexpr int kGStats = 2;  // sum(g), sum(g * (z - mean)), g = act'(a*z+b) * dy (training backward, pass 1)
// Modes of the backward kernel.
constexpr int kBwdTrain = 0;
constexpr int kBwdEval = 1;

// The kernels' argument: the tile geometry and one pass's data.
template <typename scalar_t>
struct Params : TileGeometry {
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
  int mode = 0, act = 0;
};

// The thread's channel, in registers for the whole launch: its taps and the coefficients of Params that the
// mode uses (zero otherwise, and for an inactive thread).
template <typename T, int KK>
struct ChannelCoef {
  T w[KK];
  T a = T(0), b = T(0), mean = T(0), c0 = T(0), c1 = T(0);
};

template <int KK, typename scalar_t, typename T>
BDEV void load_taps(const Params<scalar_t>& p, const BlockWork& bw, T (&w)[KK]) {
#pragma unroll
  for (int t = 0; t < KK; ++t) w[t] = bw.active ? p.w[int64_t(bw.c) * KK + t] : T(0);
}

template <typename scalar_t, typename T>
BDEV void store_partial(const Params<scalar_t>& p, int v, int64_t c, int g, T value) {
  p.partial[(int64_t(v) * p.C + c) * p.G + g] = value;
}

// ---------------------------------------------------------------------------------------------------------
// Forward kernel: z over owned tiles; modes kZStats, kApply, kGStats.

template <int KK, typename scalar_t, typename T = at::opmath_type<scalar_t>>
BDEV ChannelCoef<T, KK> fwd_channel(const Params<scalar_t>& p, const BlockWork& bw) {
  ChannelCoef<T, KK> cf;
  load_taps(p, bw, cf.w);
  if (bw.active && p.mode != kZStats) {
    cf.a = p.ca[bw.c];
    cf.b = p.cb[bw.c];
  }
  if (bw.active && p.mode == kGStats) cf.mean = p.cm[bw.c];
  return cf;
}

// The item's x tile with its halo (zero padded at the image border) and, for kGStats, its dy tile.
template <int K, int S, typename scalar_t, typename T>
BDEV void fwd_load_tile(const Params<scalar_t>& p, const BlockWork& bw, const TileItem& ti, T* xs, T* ys) {
  constexpr int P = K / 2;
  load_region(p, p.xr, Window{ti.in_off, p.H, p.W, bw.c0, ti.oh0 * S - P, ti.ow0 * S - P}, p.x, xs);
  if (p.mode == kGStats) load_region(p, p.yr, Window{ti.out_off, p.Ho, p.Wo, bw.c0, ti.oh0, ti.ow0}, p.dy, ys);
}

// kApply: act(a*z + b) into the staged y tile; the store skips what lies past the plane.
template <typename T, int KK>
BDEV void apply_micro(int act, const ChannelCoef<T, KK>& cf, const T (&z)[kRH][kRW], T* yv, int rp) {
  act_switch(act, [&](auto ac) {
    constexpr int ACT = decltype(ac)::value;
#pragma unroll
    for (int a = 0; a < kRH; ++a) {
#pragma unroll
      for (int b = 0; b < kRW; ++b) yv[a * rp + b] = act_forward<ACT>(cf.a * z[a][b] + cf.b);
    }
  });
}

// kGStats: sums of g = act'(a*z + b) * dy and of g * (z - mean) over the valid outputs, dy staged in dyv.
template <typename T, int KK>
BDEV void gstats_micro(int act, const ChannelCoef<T, KK>& cf, const T (&z)[kRH][kRW], int vr, int vc,
                       const T* dyv, int rp, T (&st)[3]) {
  act_switch(act, [&](auto ac) {
    constexpr int ACT = decltype(ac)::value;
#pragma unroll
    for (int a = 0; a < kRH; ++a) {
#pragma unroll
      for (int b = 0; b < kRW; ++b) {
        if (a < vr && b < vc) {
          const T gv = act_backward<ACT>(cf.a * z[a][b] + cf.b, dyv[a * rp + b]);
          st[0] += gv;
          st[1] += gv * (z[a][b] - cf.mean);
        }
      }
    }
  });
}

// z on the thread's micro-tiles of the item, consumed at once by the mode.
template <int K, int S, typename scalar_t, typename T>
BDEV void fwd_compute_tile(const Params<scalar_t>& p, const BlockWork& bw, const TileItem& ti,
                           const ChannelCoef<T, K * K>& cf, const T* xs, T* ys, T (&st)[3]) {
  for (int m = bw.pos; m < p.MH * p.MW; m += bw.tpc) {
    const MicroPos mp = micro_pos(p.fd_mh, p.MH, m);
    T z[kRH][kRW];
    conv_micro<K, S>(xs + p.xr.at(bw.lc, mp.r0 * S, mp.q0 * S), p.xr.rp, cf.w, z);
    const int vr = p.Ho - (ti.oh0 + mp.r0), vc = p.Wo - (ti.ow0 + mp.q0);  // valid rows / cols of the micro-tile
    T* yv = ys + p.yr.at(bw.lc, mp.r0, mp.q0);
    if (p.mode == kZStats) {
      zstats_micro(z, vr, vc, st);
    } else if (p.mode == kApply) {
      apply_micro(p.act, cf, z, yv, p.yr.rp);
    } else {
      gstats_micro(p.act, cf, z, vr, vc, yv, p.yr.rp, st);
    }
  }
}

// Per-channel reduction of the threads' statistics over the block, in a fixed order, into the partials.
template <typename scalar_t, typename T>
BDEV void fwd_reduce_block(const Params<scalar_t>& p, const BlockWork& bw, const T (&st)[3], T* red) {
  const int tid = threadIdx.x;
  __syncthreads();
  red[tid] = st[0];
  red[kThreads + tid] = st[1];
  red[2 * kThreads + tid] = st[2];
  __syncthreads();
  if (tid >= p.CT || bw.c0 + tid >= p.C) return;
  const int64_t c = bw.c0 + tid;
  if (p.mode == kZStats) {
    T n = T(0), mean = T(0), m2 = T(0);
    for (int j = 0; j < bw.tpc; ++j) {
      const int idx = (j << p.ct_shift) + tid;
      if (red[idx] == T(0)) continue;
      welford_merge(n, mean, m2, red[idx], red[kThreads + idx], red[2 * kThreads + idx]);
    }
    store_partial(p, 0, c, bw.g, n);
    store_partial(p, 1, c, bw.g, mean);
    store_partial(p, 2, c, bw.g, m2);
  } else {
    store_partial(p, 0, c, bw.g, channel_sum(red, tid, bw.tpc, p.ct_shift));
    store_partial(p, 1, c, bw.g, channel_sum(red + kThreads, tid, bw.tpc, p.ct_shift));
  }
}

template <typename scalar_t, int K, int S>
__global__ void __launch_bounds__(kThreads) dw_fwd_kernel(const Params<scalar_t> p) {
  using T = at::opmath_type<scalar_t>;
  T* xs = dyn_smem<T>();
  T* ys = xs + p.CT * p.xr.pl;
  const BlockWork bw = block_work(p);
  const ChannelCoef<T, K * K> cf = fwd_channel<K * K>(p, bw);
  T st[3] = {T(0), T(0), T(0)};  // kZStats: count, mean, M2 (Chan); kGStats: sum g, sum g * (z - mean)
  for (int64_t it = bw.it0; it < bw.it1; ++it) {
    const TileItem ti = tile_item(p, it);
    __syncthreads();  // the previous item is done with the shared tiles
    fwd_load_tile<K, S>(p, bw, ti, xs, ys);
    __syncthreads();
    if (bw.active) fwd_compute_tile<K, S>(p, bw, ti, cf, xs, ys, st);
    if (p.mode == kApply) {
      __syncthreads();
      store_region(p, p.yr, Window{ti.out_off, p.Ho, p.Wo, bw.c0, ti.oh0, ti.ow0}, ys, p.out);
    }
  }
  if (p.mode != kApply) fwd_reduce_block(p, bw, st, xs);
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernel: dz on the owned tile plus a halo of HD outputs, then grad_weight partials over the owned
// outputs and grad_x of the owned inputs [oh0*S, (oh0+TOH)*S) x [ow0*S, (ow0+TOW)*S).

template <int KK, typename scalar_t, typename T = at::opmath_type<scalar_t>>
BDEV ChannelCoef<T, KK> bwd_channel(const Params<scalar_t>& p, const BlockWork& bw) {
  ChannelCoef<T, KK> cf;
  load_taps(p, bw, cf.w);
  if (bw.active) {
    cf.a = p.ca[bw.c];
    cf.b = p.cb[bw.c];
    if (p.mode == kBwdTrain) {
      cf.mean = p.cm[bw.c];
      cf.c0 = p.c0[bw.c];
      cf.c1 = p.c1[bw.c];
    }
  }
  return cf;
}

// The x tile under the dz region and the dy tile of the dz region (the tile plus a halo of HD outputs).
template <int K, int S, typename scalar_t, typename T>
BDEV void bwd_load_tile(const Params<scalar_t>& p, const BlockWork& bw, const TileItem& ti, T* xs, T* ds) {
  constexpr int P = K / 2, HD = (P + S - 1) / S;
  load_region(p, p.xr, Window{ti.in_off, p.H, p.W, bw.c0, (ti.oh0 - HD) * S - P, (ti.ow0 - HD) * S - P}, p.x,
              xs);
  load_region(p, p.yr, Window{ti.out_off, p.Ho, p.Wo, bw.c0, ti.oh0 - HD, ti.ow0 - HD}, p.dy, ds);
}

// Batch-norm and activation backward of one micro-tile of the dz region: dy in dv becomes dz, zero outside the
// output plane. Evaluation mode also sums g*z and g over the owned outputs (grad scale and shift).
template <int ACT, int HD, typename scalar_t, typename T, int KK>
BDEV void dz_micro(const Params<scalar_t>& p, const TileItem& ti, const MicroPos& mp, const ChannelCoef<T, KK>& cf,
                   const T (&z)[kRH][kRW], T* dv, T& s_gz, T& s_g) {
  const bool train = p.mode == kBwdTrain;
  const int TOH = p.MH * kRH, TOW = p.MW * kRW, rp = p.yr.rp;
  const int ohb = ti.oh0 - HD + mp.r0, owb = ti.ow0 - HD + mp.q0;
#pragma unroll
  for (int a = 0; a < kRH; ++a) {
#pragma unroll
    for (int b = 0; b < kRW; ++b) {
      const int oh = ohb + a, ow = owb + b;
      const bool valid = oh >= 0 && oh < p.Ho && ow >= 0 && ow < p.Wo;
      const T zz = z[a][b];
      const T gv = act_backward<ACT>(cf.a * zz + cf.b, dv[a * rp + b]);
      T dz;
      if (train) {
        dz = cf.a * gv - cf.c0 - cf.c1 * (zz - cf.mean);
      } else {
        dz = gv * cf.a;
        const int r = mp.r0 + a, q = mp.q0 + b;
        if (valid && r >= HD && r < HD + TOH && q >= HD && q < HD + TOW) {
          s_gz += gv * zz;
          s_g += gv;
        }
      }
      dv[a * rp + b] = valid ? dz : T(0);
    }
  }
}

// 1. z recomputed over the dz region, then dz in place of dy.
template <int K, int S, typename scalar_t, typename T>
BDEV void bwd_dz_tile(const Params<scalar_t>& p, const BlockWork& bw, const TileItem& ti,
                      const ChannelCoef<T, K * K>& cf, const T* xs, T* ds, T& s_gz, T& s_g) {
  constexpr int HD = (K / 2 + S - 1) / S;
  for (int m = bw.pos; m < p.mhd * p.mwd; m += bw.tpc) {
    const MicroPos mp = micro_pos(p.fd_mhd, p.mhd, m);
    T z[kRH][kRW];
    conv_micro<K, S>(xs + p.xr.at(bw.lc, mp.r0 * S, mp.q0 * S), p.xr.rp, cf.w, z);
    T* dv = ds + p.yr.at(bw.lc, mp.r0, mp.q0);
    act_switch(p.act, [&](auto ac) { dz_micro<decltype(ac)::value, HD>(p, ti, mp, cf, z, dv, s_gz, s_g); });
  }
}

// 2. grad_weight partial sums over the owned outputs.
template <int K, int S, typename scalar_t, typename T>
BDEV void bwd_wgrad_tile(const Params<scalar_t>& p, const BlockWork& bw, const T* xs, const T* ds, T (&gw)[K * K]) {
  constexpr int HD = (K / 2 + S - 1) / S;
  for (int m = bw.pos; m < p.MH * p.MW; m += bw.tpc) {
    const MicroPos mp = micro_pos(p.fd_mh, p.MH, m);
    wgrad_micro<K, S>(xs + p.xr.at(bw.lc, (HD + mp.r0) * S, (HD + mp.q0) * S), p.xr.rp,
                      ds + p.yr.at(bw.lc, HD + mp.r0, HD + mp.q0), p.yr.rp, gw);
  }
}

// 3. grad_x of the owned inputs, staged in gxs (the x tile's storage) for a coalesced store.
template <int K, int S, typename scalar_t, typename T>
BDEV void bwd_dgrad_tile(const Params<scalar_t>& p, const BlockWork& bw, const T (&w)[K * K], const T* ds, T* gxs) {
  for (int m = bw.pos; m < p.MH * p.MW; m += bw.tpc) {
    const MicroPos mp = micro_pos(p.fd_mh, p.MH, m);
    T gx[S * kRH][S * kRW];
    dgrad_micro<K, S>(ds + p.yr.at(bw.lc, mp.r0, mp.q0), p.yr.rp, w, gx);
    T* gv = gxs + p.xr.at(bw.lc, S * mp.r0, S * mp.q0);
#pragma unroll
    for (int i = 0; i < S * kRH; ++i) {
#pragma unroll
      for (int j = 0; j < S * kRW; ++j) gv[i * p.xr.rp + j] = gx[i][j];
    }
  }
}

// Per-channel reduction of gw (and the evaluation sums) over the block, kRedChunk values at a time, in a fixed
// order, into the partials.
template <int KK, typename scalar_t, typename T>
BDEV void bwd_reduce_block(const Params<scalar_t>& p, const BlockWork& bw, const T (&gw)[KK], T s_gz, T s_g,
                           T* red) {
  constexpr int NV = KK + 2;
  const int nv = p.mode == kBwdTrain ? KK : NV;
  const int tid = threadIdx.x;
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
      if (v < nv && bw.c0 + l < p.C) {
        store_partial(p, v, bw.c0 + l, bw.g, channel_sum(red + j * kThreads, l, bw.tpc, p.ct_shift));
      }
    }
  }
}

template <typename scalar_t, int K, int S>
__global__ void __launch_bounds__(kThreads) dw_bwd_kernel(const Params<scalar_t> p) {
  using T = at::opmath_type<scalar_t>;
  T* xs = dyn_smem<T>();
  T* ds = xs + p.CT * p.xr.pl;
  const BlockWork bw = block_work(p);
  const ChannelCoef<T, K * K> cf = bwd_channel<K * K>(p, bw);
  T gw[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) gw[t] = T(0);
  T s_gz = T(0), s_g = T(0);  // evaluation mode: sum g*z, sum g over owned outputs
  for (int64_t it = bw.it0; it < bw.it1; ++it) {
    const TileItem ti = tile_item(p, it);
    __syncthreads();  // the previous item is done with the shared tiles
    bwd_load_tile<K, S>(p, bw, ti, xs, ds);
    __syncthreads();
    if (bw.active) bwd_dz_tile<K, S>(p, bw, ti, cf, xs, ds, s_gz, s_g);
    __syncthreads();
    if (bw.active) bwd_wgrad_tile<K, S>(p, bw, xs, ds, gw);
    __syncthreads();
    if (bw.active) bwd_dgrad_tile<K, S>(p, bw, cf.w, ds, xs);  // x is no longer needed
    __syncthreads();
    store_region(p, p.gr, Window{ti.in_off, p.H, p.W, bw.c0, ti.oh0 * S, ti.ow0 * S}, xs, p.out);
  }
  bwd_reduce_block(p, bw, gw, s_gz, s_g, xs);
}

// ---------------------------------------------------------------------------------------------------------
// Per-channel kernels (one block per channel unless noted).

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
  const double mean = block_sum(s, red) / count;
  double s2 = 0.0;
  for (int i = tid; i < G; i += kThreads) {
    const double d = static_cast<double>(pm[i]) - mean;
    s2 += static_cast<double>(p2[i]) + static_cast<double>(pn[i]) * d * d;
  }
  const double var = block_sum(s2, red) / count;
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
  const double sum_g = block_sum(s0, red);
  const double sum_g_zc = block_sum(s1, red);
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
// Host side.

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Params shared by all passes over one (x, plan): geometry, work split, layout.
template <typename scalar_t>
Params<scalar_t> make_params(const Plan& plan, const at::Tensor& x, int K, int S, bool cl) {
  Params<scalar_t> p;
  static_cast<TileGeometry&>(p) = make_geometry(plan, x.sizes(), K, S, cl, sizeof(scalar_t));
  p.x = x.const_data_ptr<scalar_t>();
  return p;
}

template <typename scalar_t>
void finish_vec(Params<scalar_t>& p) {
  if (p.vec && !(aligned16(p.x) && (p.dy == nullptr || aligned16(p.dy)) && (p.out == nullptr || aligned16(p.out)))) {
    p.vec = 0;
  }
}

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
  const auto ot = stats_dtype(x);
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
    double eps, bool weight_grad) {
  const char* op = "betanas::dw_bn_act_train_backward";
  check_dw_args(op, c10::kCUDA, x_in, weight,
                {{"bn_weight", bn_weight}, {"bn_bias", bn_bias}, {"mean", mean}, {"var", var}}, stride, act);
  const int64_t K = weight.size(3), C = x_in.size(1);
  check_grad_out(op, grad_out_in, x_in, K, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto layout = layout_of(x_in);
  const bool cl = layout == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(layout), dy = grad_out_in.contiguous(layout);
  const auto ot = stats_dtype(x);
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
  // dx and the weight gradient come out of the same fused pass: nothing to skip.
  if (!weight_grad) gw.zero_();
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
  const auto ot = stats_dtype(x);
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
  const auto ot = stats_dtype(x);
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
