// Single-launch ragged depthwise kernels: the training-mode forward and backward of the fused depthwise stage
// act(BN(depthwise_conv(x))) for many groups of channels at once, each group with its own number of samples,
// channels, kernel size (3, 5 or 7) and offsets in flat tensors (csrc/common/grouped.h: DwGroup). They are the
// CUDA counterpart of the CPU kernels' single parallel loop over all channels of all groups
// (csrc/cpu/grouped.cpp, for_each_group_channel), and serve dw_bn_act_grouped_train(_backward) and the
// depthwise stage of block_gate_grads (csrc/cuda/grouped.cu).
//
// Design
// ------
// * Grid. One 256-thread block per channel of every group, so that a block owns all of its channel's outputs
//   and batch statistics: the forward (statistics, then normalise and activate) and the backward (the two
//   batch-norm sums, then dz, grad_x and grad_weight) each run in one launch, with no cross-block reduction and
//   no atomics (results are run-to-run deterministic). Blocks are numbered heaviest group first (samples *
//   k * k per channel), so that the longest blocks start first and the tail of the launch is short. Each block
//   finds its group by a binary search over a small device table of group descriptors built on the host
//   (RaggedGroup: offsets, sizes, and the tile plan of each pass), and takes the kernel size from it with a
//   switch, uniform over the block.
// * Tiles. A channel's planes are its samples' [H, W] planes, a sample step apart. A block walks items = (a
//   chunk of CT samples, one tile of MH x MW micro-tiles of 2x4 outputs), staging the chunk's CT planes of the
//   tile (with the halo, zero padded) in shared memory as the dense kernels stage CT channels: the samples play
//   the part of the dense kernels' channel tile, and thread (lane = tid % CT, slot = tid / CT) computes the
//   micro-tiles of one sample. CT and the tile come from the dense kernels' shared-memory tile planner
//   (dw_tile_plan.cuh) with the group's sample count in place of the channel count; the convolution, weight
//   gradient and transposed convolution of a micro-tile are the dense kernels' (dw_conv_micro.cuh).
// * Statistics. Forward: per-thread Welford (count, mean, M2) over its micro-tiles, merged over the block in
//   double (sum of n*mean, then sum of M2 + n*(mean - mean_all)^2, fixed-order tree reductions), then the
//   same folded a, b as the dense kernel's finalize. Backward: per-thread sums of g and g * (z - mean), summed
//   over the block in double; the batch-norm backward coefficients follow the CPU formulas. grad_weight: K*K
//   per-thread partial sums reduced over the block in chunks of 8 values (two-level fixed-order sums).
// * Shared memory per block: the largest tile plan over the groups (forward plan, and backward plan for the
//   backward kernel), at least the reduction scratch (2 KB forward, 18 KB backward).
// * The group table is built on the host per call (the tile plans are cached per shape) and copied to the device
//   from pinned memory without blocking the host; a launch captured in a CUDA graph would replay a stale copy.
// * An optional per-channel input transform x -> act(a * x + b), rounded to the storage dtype, is applied as
//   the tiles are loaded (zero padding stays zero): block_gate_grads uses it to apply the expand stage's batch
//   norm and activation without writing the expanded activations a second time.
//
// What would make it faster
// -------------------------
// * One block per channel: a launch of few channels with large planes (ImageNet's first stages) runs few, long
//   blocks, and its last wave leaves SMs idle. Splitting such channels over several blocks needs a second launch
//   (statistics, then normalisation; the dense kernels' structure) or a grid-wide wait per channel.
// * The kernels hold the code of every kernel size, so their register count is the K=7 path's: the backward
//   needs ~240 registers at stride 2 (one 256-thread block per SM; 128 at stride 1), where the dense kernel for
//   K=3 needs ~100. Launching per kernel size (at most three launches) would let K=3/5 groups run more blocks.
// * The group table could travel as a kernel parameter when it is small (no copy, capturable in CUDA graphs).
//
// Checked without a GPU by csrc/test/cuda_emulation/grouped_harness.cpp (every CUDA thread a CPU thread, against
// the CPU kernels); BETANAS_RAGGED_MAX_LANES and BETANAS_DW_MAX_MICRO shrink the sample chunks and tiles there so
// that blocks walk several chunks and tiles. Private to grouped.cu, hence internal linkage.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "common/activation.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/grouped.h"
#include "cuda/dw_conv_micro.cuh"
#include "cuda/dw_tile.cuh"
#include "cuda/dw_tile_plan.cuh"

namespace betanas {
namespace {

#ifndef BETANAS_RAGGED_MAX_LANES
#define BETANAS_RAGGED_MAX_LANES 32  // most samples a block stages at a time (a test may make it a variable)
#endif
constexpr int kSumScratch = (kRedChunk + 1) * kThreads + 64;  // doubles of shared memory for block_sums

static_assert(kRedChunk * 32 == kThreads, "block_sums splits kRedChunk values over the block's 32-thread groups");

// ---------------------------------------------------------------------------------------------------------
// Device side.

// Sums of v[0, NV) over the block's threads, in double and in a fixed order (per value: 32 sums of 8 threads,
// then the 32 sums), kRedChunk values at a time. Every thread receives the sums in out[0, NV) (shared memory,
// past the scratch: red + kSumScratch - 64). red: kSumScratch doubles of shared memory; the caller syncs before
// red is written over data that other threads may still read.
template <int NV, typename T>
BDEV void block_sums(const T (&v)[NV], double* red, double* out) {
  static_assert(NV <= 64, "block_sums returns at most 64 sums");
  const int tid = threadIdx.x;
  double* part = red + kRedChunk * kThreads;
#pragma unroll
  for (int v0 = 0; v0 < NV; v0 += kRedChunk) {
#pragma unroll
    for (int j = 0; j < kRedChunk; ++j) {
      if (v0 + j < NV) red[j * kThreads + tid] = static_cast<double>(v[v0 + j < NV ? v0 + j : 0]);
    }
    __syncthreads();
    {
      const int j = tid >> 5, q = tid & 31;
      if (v0 + j < NV) {
        double s = 0.0;
        for (int i = 0; i < 8; ++i) s += red[j * kThreads + q * 8 + i];
        part[j * 32 + q] = s;
      }
    }
    __syncthreads();
    if (tid < kRedChunk && v0 + tid < NV) {
      double s = 0.0;
      for (int q = 0; q < 32; ++q) s += part[tid * 32 + q];
      out[v0 + tid] = s;
    }
    __syncthreads();
  }
}

// One pass's tiling of a group's planes (dw_tile_plan.cuh's Plan, with samples in place of channels): a block
// walks chunks x tiles items; CT samples per chunk.
struct RaggedPass {
  int CT = 1, ct_shift = 0, MH = 1, MW = 1, tiles_w = 1, tiles = 1, chunks = 0, mhd = 1, mwd = 1;
  FastDiv fd_mh, fd_mhd;
  Region xr, yr, gr;  // x tile; y / dy / dz tile; grad_x tile (backward, aliases xr's storage)
};

// Group g of a launch: channel c of sample n has its input plane at x_offset + n * x_step + c * H * W and its
// output plane at y_offset + n * y_step + c * Ho * Wo (DwGroup); its taps at weight_offset + c * k * k, its
// per-channel values at channel_offset + c. Its channels are the blocks [block_offset, block_offset + channels).
struct RaggedGroup {
  int64_t x_offset = 0, x_step = 0, y_offset = 0, y_step = 0, weight_offset = 0;
  int samples = 0, channels = 0, kernel = 3, channel_offset = 0, block_offset = 0;
  RaggedPass fwd, bwd;
};

// The kernels' argument.
template <typename scalar_t>
struct RaggedParams {
  using T = at::opmath_type<scalar_t>;
  const RaggedGroup* groups = nullptr;  // device table, in block order
  int num_groups = 0, H = 0, W = 0, Ho = 0, Wo = 0, act = 0;
  double eps = 0.0;
  const scalar_t* x = nullptr;
  const scalar_t* dy = nullptr;  // backward: grad_out
  scalar_t* out = nullptr;       // forward: y; backward: grad_x
  const T* w = nullptr;          // taps, flat
  const T* gamma = nullptr;      // per channel
  const T* beta = nullptr;
  const T* in_a = nullptr;       // optional input transform x -> act(in_a * x + in_b), per channel
  const T* in_b = nullptr;
  const T* mean = nullptr;       // backward: the forward's statistics
  const T* var = nullptr;
  T* mean_out = nullptr;         // forward (optional): batch mean and biased variance
  T* var_out = nullptr;
  T* grad_w = nullptr;           // backward
  T* grad_gamma = nullptr;
  T* grad_beta = nullptr;
};

// The block's group, found by a binary search over the table and staged in shared memory: read from there, its
// fields cost no registers (a copy in registers would hold ~100 of them for the whole kernel).
BDEV const RaggedGroup& block_group(const RaggedGroup* groups, int n) {
  __shared__ RaggedGroup grp;
  if (threadIdx.x == 0) {
    const int block = static_cast<int>(blockIdx.x);
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (groups[mid].block_offset <= block) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    grp = groups[lo];
  }
  __syncthreads();
  return grp;
}

// The thread's sample lane within a chunk, its first micro-tile and its step.
struct Lane {
  int lane, pos, tpc;
};

BDEV Lane lane_of(const RaggedPass& ps) {
  const int tid = threadIdx.x;
  return {tid & (ps.CT - 1), tid >> ps.ct_shift, kThreads >> ps.ct_shift};
}

// Item it: its chunk of samples and the first output (oh0, ow0) of its tile.
struct PlaneItem {
  int chunk, oh0, ow0;
};

BDEV PlaneItem plane_item(const RaggedPass& ps, int it) {
  const int chunk = it / ps.tiles;
  const int t = it - chunk * ps.tiles;
  const int th = t / ps.tiles_w;
  return {chunk, th * ps.MH * kRH, (t - th * ps.tiles_w) * ps.MW * kRW};
}

// Where a chunk's planes lie: the plane of its first sample, the sample step, the plane size, the number of
// samples present (lanes beyond are zero on load and skipped on store), and the window's first row and column.
template <typename P>
struct Planes {
  P base;
  int64_t step;
  int Hs, Ws, lanes, r0, q0;
};

template <typename T>
struct InTransform {
  bool on = false;
  int act = 0;
  T a = T(0), b = T(0);
};

template <typename scalar_t, typename T>
BDEV T transform_in(const InTransform<T>& tf, T v) {
  T r = v;
  act_switch(tf.act, [&](auto ac) { r = act_forward<decltype(ac)::value>(tf.a * v + tf.b); });
  return static_cast<T>(static_cast<scalar_t>(r));
}

// Rows [r0, r0 + rows) x cols [q0, q0 + cols) of a chunk's planes into the [lane][row][col] region; zeros
// outside the planes and for absent samples. NCHW planes: the copy runs along the columns (coalesced).
template <typename scalar_t, typename T>
BDEV void load_planes(const Region& rg, int CT, const Planes<const scalar_t*>& pl, const InTransform<T>& tf,
                      T* __restrict__ dst) {
  const int total = CT * rg.rows * rg.cols;
  for (int i = threadIdx.x; i < total; i += kThreads) {
    const RegionPos e = nchw_pos(rg, i);
    const int gr = pl.r0 + e.r, gq = pl.q0 + e.q;
    T v = T(0);
    if (e.c < pl.lanes && gr >= 0 && gr < pl.Hs && gq >= 0 && gq < pl.Ws) {
      v = static_cast<T>(pl.base[e.c * pl.step + int64_t(gr) * pl.Ws + gq]);
      if (tf.on) v = transform_in<scalar_t>(tf, v);
    }
    dst[rg.at(e.c, e.r, e.q)] = v;
  }
}

// The region back to the chunk's planes, positions inside the planes only (r0, q0 >= 0).
template <typename scalar_t, typename T>
BDEV void store_planes(const Region& rg, int CT, const T* __restrict__ src, const Planes<scalar_t*>& pl) {
  const int total = CT * rg.rows * rg.cols;
  for (int i = threadIdx.x; i < total; i += kThreads) {
    const RegionPos e = nchw_pos(rg, i);
    const int gr = pl.r0 + e.r, gq = pl.q0 + e.q;
    if (e.c < pl.lanes && gr < pl.Hs && gq < pl.Ws) {
      pl.base[e.c * pl.step + int64_t(gr) * pl.Ws + gq] = static_cast<scalar_t>(src[rg.at(e.c, e.r, e.q)]);
    }
  }
}

// The channel of a block: where its planes are, its taps, its input transform.
template <typename scalar_t, int KK, typename T = at::opmath_type<scalar_t>>
struct ChannelView {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* out;
  int64_t x_step, y_step;
  int samples, ch;
  T w[KK];
  InTransform<T> tf;
};

template <int KK, typename scalar_t, typename T = at::opmath_type<scalar_t>>
BDEV ChannelView<scalar_t, KK> channel_view(const RaggedParams<scalar_t>& p, const RaggedGroup& grp, int c,
                                            bool backward) {
  ChannelView<scalar_t, KK> v;
  const int64_t in_plane = int64_t(p.H) * p.W, out_plane = int64_t(p.Ho) * p.Wo;
  v.x = p.x + grp.x_offset + c * in_plane;
  v.dy = p.dy ? p.dy + grp.y_offset + c * out_plane : nullptr;
  v.out = p.out + (backward ? grp.x_offset + c * in_plane : grp.y_offset + c * out_plane);
  v.x_step = grp.x_step;
  v.y_step = grp.y_step;
  v.samples = grp.samples;
  v.ch = grp.channel_offset + c;
#pragma unroll
  for (int t = 0; t < KK; ++t) v.w[t] = p.w[grp.weight_offset + int64_t(c) * KK + t];
  if (p.in_a) {
    v.tf.on = true;
    v.tf.act = p.act;
    v.tf.a = p.in_a[v.ch];
    v.tf.b = p.in_b[v.ch];
  }
  return v;
}

// The planes of chunk `chunk` (CT samples) of a channel whose sample-0 plane is plane0, Hs x Ws planes a step
// apart; the window starts at row r0, column q0.
template <typename P>
BDEV Planes<P> chunk_planes(P plane0, int64_t step, int Hs, int Ws, int samples, int CT, int chunk, int r0, int q0) {
  const int first = chunk * CT, left = samples - first;
  return {plane0 + first * step, step, Hs, Ws, left < CT ? left : CT, r0, q0};
}

// ---------------------------------------------------------------------------------------------------------
// Forward: pass 1, batch statistics of z = conv(x); pass 2, y = act(a * z + b), z recomputed.

template <int K, int S, typename scalar_t, typename T = at::opmath_type<scalar_t>>
BDEV void ragged_forward_channel(const RaggedParams<scalar_t>& p, const RaggedGroup& grp, int c) {
  constexpr int P = K / 2;
  const int tid = threadIdx.x;
  if (grp.samples == 0) {  // an empty group: statistics 0, nothing to write
    if (tid == 0 && p.mean_out) {
      p.mean_out[grp.channel_offset + c] = T(0);
      p.var_out[grp.channel_offset + c] = T(0);
    }
    return;
  }
  const RaggedPass& ps = grp.fwd;
  const ChannelView<scalar_t, K * K> cv = channel_view<K * K>(p, grp, c, false);
  T* xs = dyn_smem<T>();
  T* ys = xs + ps.CT * ps.xr.pl;
  double* red = dyn_smem<double>();
  const Lane ln = lane_of(ps);
  const int items = ps.chunks * ps.tiles, nm = ps.MH * ps.MW;

  T st[3] = {T(0), T(0), T(0)};  // count, mean, M2 of the thread's outputs
  for (int it = 0; it < items; ++it) {
    const PlaneItem pi = plane_item(ps, it);
    const Planes<const scalar_t*> xp =
        chunk_planes(cv.x, cv.x_step, p.H, p.W, cv.samples, ps.CT, pi.chunk, pi.oh0 * S - P, pi.ow0 * S - P);
    __syncthreads();  // the previous item is done with the tile
    load_planes<scalar_t>(ps.xr, ps.CT, xp, cv.tf, xs);
    __syncthreads();
    if (ln.lane >= xp.lanes) continue;
    for (int m = ln.pos; m < nm; m += ln.tpc) {
      const MicroPos mp = micro_pos(ps.fd_mh, ps.MH, m);
      T z[kRH][kRW];
      conv_micro<K, S>(xs + ps.xr.at(ln.lane, mp.r0 * S, mp.q0 * S), ps.xr.rp, cv.w, z);
      zstats_micro(z, p.Ho - (pi.oh0 + mp.r0), p.Wo - (pi.ow0 + mp.q0), st);
    }
  }
  const double count = double(grp.samples) * p.Ho * p.Wo;
  __syncthreads();
  const double mean = block_sum(double(st[0]) * double(st[1]), red) / count;
  const double dm = double(st[1]) - mean;
  const double var = block_sum(double(st[2]) + double(st[0]) * dm * dm, red) / count;
  const T a = static_cast<T>(static_cast<double>(p.gamma[cv.ch]) / ::sqrt(var + p.eps));
  const T b = static_cast<T>(static_cast<double>(p.beta[cv.ch]) - mean * static_cast<double>(a));
  if (tid == 0 && p.mean_out) {
    p.mean_out[cv.ch] = static_cast<T>(mean);
    p.var_out[cv.ch] = static_cast<T>(var);
  }

  for (int it = 0; it < items; ++it) {
    const PlaneItem pi = plane_item(ps, it);
    const Planes<const scalar_t*> xp =
        chunk_planes(cv.x, cv.x_step, p.H, p.W, cv.samples, ps.CT, pi.chunk, pi.oh0 * S - P, pi.ow0 * S - P);
    __syncthreads();
    load_planes<scalar_t>(ps.xr, ps.CT, xp, cv.tf, xs);
    __syncthreads();
    if (ln.lane < xp.lanes) {
      act_switch(p.act, [&](auto ac) {
        constexpr int ACT = decltype(ac)::value;
        for (int m = ln.pos; m < nm; m += ln.tpc) {
          const MicroPos mp = micro_pos(ps.fd_mh, ps.MH, m);
          T z[kRH][kRW];
          conv_micro<K, S>(xs + ps.xr.at(ln.lane, mp.r0 * S, mp.q0 * S), ps.xr.rp, cv.w, z);
          T* yv = ys + ps.yr.at(ln.lane, mp.r0, mp.q0);
#pragma unroll
          for (int r = 0; r < kRH; ++r) {
#pragma unroll
            for (int q = 0; q < kRW; ++q) yv[r * ps.yr.rp + q] = act_forward<ACT>(a * z[r][q] + b);
          }
        }
      });
    }
    __syncthreads();
    store_planes<scalar_t>(ps.yr, ps.CT, ys,
                           chunk_planes(cv.out, cv.y_step, p.Ho, p.Wo, cv.samples, ps.CT, pi.chunk, pi.oh0, pi.ow0));
  }
}

template <typename scalar_t, int S>
__global__ void __launch_bounds__(kThreads) ragged_forward_kernel(const RaggedParams<scalar_t> p) {
  const RaggedGroup& grp = block_group(p.groups, p.num_groups);
  const int c = static_cast<int>(blockIdx.x) - grp.block_offset;
  switch (grp.kernel) {
    case 3: ragged_forward_channel<3, S>(p, grp, c); break;
    case 5: ragged_forward_channel<5, S>(p, grp, c); break;
    default: ragged_forward_channel<7, S>(p, grp, c); break;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward: pass 1 (forward tiles), sum g and sum g * (z - mean), g = act'(a*z + b) * dy; pass 2 (backward
// tiles: the tile plus a halo of HD outputs), dz = a*g - c0 - c1*(z - mean) on the dz region, grad_weight
// partials over the tile's own outputs, grad_x of its own inputs as a transposed convolution of dz.

// The batch-norm coefficients of a channel (CPU formulas).
template <typename T>
struct BnBackwardCoef {
  T a, b, mean, invstd, c0 = T(0), c1 = T(0);
};

template <int ACT, int HD, typename T>
BDEV void dz_micro_tile(const BnBackwardCoef<T>& cf, const T (&z)[kRH][kRW], T* dv, int rp, int ohb, int owb,
                        int Ho, int Wo) {
#pragma unroll
  for (int a = 0; a < kRH; ++a) {
#pragma unroll
    for (int b = 0; b < kRW; ++b) {
      const int oh = ohb + a, ow = owb + b;
      const bool valid = oh >= 0 && oh < Ho && ow >= 0 && ow < Wo;
      const T gv = act_backward<ACT>(cf.a * z[a][b] + cf.b, dv[a * rp + b]);
      const T dz = cf.a * gv - cf.c0 - cf.c1 * (z[a][b] - cf.mean);
      dv[a * rp + b] = valid ? dz : T(0);
    }
  }
}

template <int K, int S, typename scalar_t, typename T = at::opmath_type<scalar_t>>
BDEV void ragged_backward_channel(const RaggedParams<scalar_t>& p, const RaggedGroup& grp, int c) {
  constexpr int P = K / 2, KK = K * K, HD = (P + S - 1) / S;
  const int tid = threadIdx.x;
  const int ch = grp.channel_offset + c;
  const int64_t wbase = grp.weight_offset + int64_t(c) * KK;
  if (grp.samples == 0) {  // an empty group: zero gradients
    if (tid < KK) p.grad_w[wbase + tid] = T(0);
    if (tid == 0) {
      p.grad_gamma[ch] = T(0);
      p.grad_beta[ch] = T(0);
    }
    return;
  }
  const ChannelView<scalar_t, KK> cv = channel_view<KK>(p, grp, c, true);
  T* xs = dyn_smem<T>();
  double* red = dyn_smem<double>();
  BnBackwardCoef<T> cf;
  cf.mean = p.mean[ch];
  cf.invstd = static_cast<T>(1.0 / ::sqrt(static_cast<double>(p.var[ch]) + p.eps));
  cf.a = mul_rn(p.gamma[ch], cf.invstd);
  cf.b = sub_rn(p.beta[ch], mul_rn(cf.mean, cf.a));

  // Pass 1.
  {
    const RaggedPass& ps = grp.fwd;
    T* ys = xs + ps.CT * ps.xr.pl;
    const Lane ln = lane_of(ps);
    const int items = ps.chunks * ps.tiles, nm = ps.MH * ps.MW;
    T sums[2] = {T(0), T(0)};  // sum g, sum g * (z - mean)
    for (int it = 0; it < items; ++it) {
      const PlaneItem pi = plane_item(ps, it);
      const Planes<const scalar_t*> xp =
          chunk_planes(cv.x, cv.x_step, p.H, p.W, cv.samples, ps.CT, pi.chunk, pi.oh0 * S - P, pi.ow0 * S - P);
      __syncthreads();
      load_planes<scalar_t>(ps.xr, ps.CT, xp, cv.tf, xs);
      load_planes<scalar_t>(ps.yr, ps.CT,
                            chunk_planes(cv.dy, cv.y_step, p.Ho, p.Wo, cv.samples, ps.CT, pi.chunk, pi.oh0, pi.ow0),
                            InTransform<T>{}, ys);
      __syncthreads();
      if (ln.lane >= xp.lanes) continue;
      act_switch(p.act, [&](auto ac) {
        constexpr int ACT = decltype(ac)::value;
        for (int m = ln.pos; m < nm; m += ln.tpc) {
          const MicroPos mp = micro_pos(ps.fd_mh, ps.MH, m);
          T z[kRH][kRW];
          conv_micro<K, S>(xs + ps.xr.at(ln.lane, mp.r0 * S, mp.q0 * S), ps.xr.rp, cv.w, z);
          const int vr = p.Ho - (pi.oh0 + mp.r0), vc = p.Wo - (pi.ow0 + mp.q0);
          const T* dyv = ys + ps.yr.at(ln.lane, mp.r0, mp.q0);
#pragma unroll
          for (int a = 0; a < kRH; ++a) {
#pragma unroll
            for (int b = 0; b < kRW; ++b) {
              if (a < vr && b < vc) {
                const T gv = act_backward<ACT>(cf.a * z[a][b] + cf.b, dyv[a * ps.yr.rp + b]);
                sums[0] += gv;
                sums[1] += gv * (z[a][b] - cf.mean);
              }
            }
          }
        }
      });
    }
    __syncthreads();
    double* tot = red + kSumScratch - 64;
    block_sums(sums, red, tot);
    const double sum_g = tot[0], sum_g_zc = tot[1];
    const double count = double(grp.samples) * p.Ho * p.Wo;
    if (tid == 0) {
      p.grad_beta[ch] = static_cast<T>(sum_g);
      p.grad_gamma[ch] = static_cast<T>(sum_g_zc * static_cast<double>(cf.invstd));
    }
    cf.c0 = static_cast<T>(static_cast<double>(cf.a) * sum_g / count);
    cf.c1 = static_cast<T>(static_cast<double>(mul_rn(mul_rn(cf.a, cf.invstd), cf.invstd)) * sum_g_zc / count);
  }

  // Pass 2.
  const RaggedPass& ps = grp.bwd;
  T* ds = xs + ps.CT * ps.xr.pl;
  const Lane ln = lane_of(ps);
  const int items = ps.chunks * ps.tiles, nm = ps.MH * ps.MW, nmd = ps.mhd * ps.mwd;
  T gw[KK];
#pragma unroll
  for (int t = 0; t < KK; ++t) gw[t] = T(0);
  for (int it = 0; it < items; ++it) {
    const PlaneItem pi = plane_item(ps, it);
    const Planes<const scalar_t*> xp = chunk_planes(cv.x, cv.x_step, p.H, p.W, cv.samples, ps.CT, pi.chunk,
                                                    (pi.oh0 - HD) * S - P, (pi.ow0 - HD) * S - P);
    __syncthreads();
    load_planes<scalar_t>(ps.xr, ps.CT, xp, cv.tf, xs);
    load_planes<scalar_t>(ps.yr, ps.CT,
                          chunk_planes(cv.dy, cv.y_step, p.Ho, p.Wo, cv.samples, ps.CT, pi.chunk, pi.oh0 - HD,
                                       pi.ow0 - HD),
                          InTransform<T>{}, ds);
    __syncthreads();
    const bool active = ln.lane < xp.lanes;
    if (active) {  // 1. dz over the dz region, in place of dy
      act_switch(p.act, [&](auto ac) {
        for (int m = ln.pos; m < nmd; m += ln.tpc) {
          const MicroPos mp = micro_pos(ps.fd_mhd, ps.mhd, m);
          T z[kRH][kRW];
          conv_micro<K, S>(xs + ps.xr.at(ln.lane, mp.r0 * S, mp.q0 * S), ps.xr.rp, cv.w, z);
          dz_micro_tile<decltype(ac)::value, HD>(cf, z, ds + ps.yr.at(ln.lane, mp.r0, mp.q0), ps.yr.rp,
                                                 pi.oh0 - HD + mp.r0, pi.ow0 - HD + mp.q0, p.Ho, p.Wo);
        }
      });
    }
    __syncthreads();
    if (active) {  // 2. grad_weight partial sums over the tile's own outputs
      for (int m = ln.pos; m < nm; m += ln.tpc) {
        const MicroPos mp = micro_pos(ps.fd_mh, ps.MH, m);
        wgrad_micro<K, S>(xs + ps.xr.at(ln.lane, (HD + mp.r0) * S, (HD + mp.q0) * S), ps.xr.rp,
                          ds + ps.yr.at(ln.lane, HD + mp.r0, HD + mp.q0), ps.yr.rp, gw);
      }
    }
    __syncthreads();
    if (active) {  // 3. grad_x of the tile's own inputs, staged in the x tile's storage
      for (int m = ln.pos; m < nm; m += ln.tpc) {
        const MicroPos mp = micro_pos(ps.fd_mh, ps.MH, m);
        T gx[S * kRH][S * kRW];
        dgrad_micro<K, S>(ds + ps.yr.at(ln.lane, mp.r0, mp.q0), ps.yr.rp, cv.w, gx);
        T* gv = xs + ps.xr.at(ln.lane, S * mp.r0, S * mp.q0);
#pragma unroll
        for (int i = 0; i < S * kRH; ++i) {
#pragma unroll
          for (int j = 0; j < S * kRW; ++j) gv[i * ps.xr.rp + j] = gx[i][j];
        }
      }
    }
    __syncthreads();
    store_planes<scalar_t>(ps.gr, ps.CT, xs,
                           chunk_planes(cv.out, cv.x_step, p.H, p.W, cv.samples, ps.CT, pi.chunk, pi.oh0 * S,
                                        pi.ow0 * S));
  }
  __syncthreads();
  double* tot = red + kSumScratch - 64;
  block_sums(gw, red, tot);
  if (tid < KK) p.grad_w[wbase + tid] = static_cast<T>(tot[tid]);
}

template <typename scalar_t, int S>
__global__ void __launch_bounds__(kThreads) ragged_backward_kernel(const RaggedParams<scalar_t> p) {
  const RaggedGroup& grp = block_group(p.groups, p.num_groups);
  const int c = static_cast<int>(blockIdx.x) - grp.block_offset;
  switch (grp.kernel) {
    case 3: ragged_backward_channel<3, S>(p, grp, c); break;
    case 5: ragged_backward_channel<5, S>(p, grp, c); break;
    default: ragged_backward_channel<7, S>(p, grp, c); break;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

// A host array of trivially copyable structs as a tensor on `device`, copied without blocking the host (from
// pinned memory, which the caching host allocator keeps until the copy is done).
template <typename S>
at::Tensor device_table(const std::vector<S>& v, const at::Device& device) {
  static_assert(std::is_trivially_copyable_v<S>);
  const int64_t bytes = static_cast<int64_t>(v.size() * sizeof(S));
#ifdef BETANAS_CUDA_EMULATION
  (void)device;
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  if (bytes) std::memcpy(host.mutable_data_ptr(), v.data(), bytes);
  return host;
#else
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (bytes) std::memcpy(host.mutable_data_ptr(), v.data(), bytes);
  return host.to(device, /*non_blocking=*/true);
#endif
}

RaggedPass ragged_pass(const Plan& pl, int samples) {
  RaggedPass r;
  r.CT = pl.CT;
  r.ct_shift = pl.ct_shift;
  r.MH = pl.MH;
  r.MW = pl.MW;
  r.tiles_w = pl.tiles_w;
  r.tiles = pl.tiles_h * pl.tiles_w;
  r.chunks = static_cast<int>(ceil_div(samples, pl.CT));
  r.mhd = pl.mhd;
  r.mwd = pl.mwd;
  r.fd_mh = FastDiv(pl.MH);
  r.fd_mhd = FastDiv(pl.mhd);
  r.xr = pl.xr;
  r.yr = pl.yr;
  r.gr = pl.gr;
  TORCH_INTERNAL_ASSERT(int64_t(r.chunks) * r.tiles <= INT32_MAX);
  return r;
}

// A launch over every channel of `groups`: the group table in block order (heaviest channels first) and the
// dynamic shared memory its blocks need.
struct RaggedLaunch {
  std::vector<RaggedGroup> table;
  int64_t blocks = 0;
  size_t smem = 0;
};

RaggedLaunch plan_ragged(const DwGroups& groups, int64_t H, int64_t W, int64_t S, bool backward, size_t elem,
                         size_t tsize) {
  RaggedLaunch rl;
  std::vector<size_t> order(groups.groups.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const DwGroup &ga = groups.groups[a], &gb = groups.groups[b];
    return ga.samples * ga.kernel * ga.kernel > gb.samples * gb.kernel * gb.kernel;
  });
  rl.smem = (backward ? kSumScratch : kThreads) * sizeof(double);
  TORCH_CHECK(H <= INT32_MAX / 4 && W <= INT32_MAX / 4, "betanas: planes of ", H, "x", W, " are too large");
  for (size_t gi : order) {
    const DwGroup& g = groups.groups[gi];
    TORCH_CHECK(g.samples <= INT32_MAX && g.channel_offset + g.channels <= INT32_MAX,
                "betanas: too many samples or channels for one launch");
    RaggedGroup r;
    r.x_offset = g.x_offset;
    r.x_step = g.x_step;
    r.y_offset = g.y_offset;
    r.y_step = g.y_step;
    r.weight_offset = g.weight_offset;
    r.samples = static_cast<int>(g.samples);
    r.channels = static_cast<int>(g.channels);
    r.kernel = static_cast<int>(g.kernel);
    r.channel_offset = static_cast<int>(g.channel_offset);
    r.block_offset = static_cast<int>(rl.blocks);
    if (g.samples > 0) {
      // The planner sizes CT samples like CT channels (at most 32), costing the partial last chunk too.
      const int lanes = static_cast<int>(
          BETANAS_RAGGED_MAX_LANES >= 32 ? g.samples : std::min<int64_t>(g.samples, BETANAS_RAGGED_MAX_LANES));
      const int k = static_cast<int>(g.kernel), s = static_cast<int>(S);
      const Plan pf = get_plan(false, false, lanes, static_cast<int>(H), static_cast<int>(W), k, s, elem, tsize);
      r.fwd = ragged_pass(pf, r.samples);
      rl.smem = std::max(rl.smem, pf.smem);
      if (backward) {
        const Plan pb = get_plan(true, false, lanes, static_cast<int>(H), static_cast<int>(W), k, s, elem, tsize);
        r.bwd = ragged_pass(pb, r.samples);
        rl.smem = std::max(rl.smem, pb.smem);
      }
    }
    rl.blocks += g.channels;
    rl.table.push_back(r);
  }
  return rl;
}

// Runs the forward (backward = false) or backward kernel over every channel of `groups`; p holds the data.
template <typename scalar_t>
void run_ragged(const DwGroups& groups, int64_t H, int64_t W, int64_t stride, bool backward,
                RaggedParams<scalar_t> p, const at::Device& device) {
  using T = at::opmath_type<scalar_t>;
  const RaggedLaunch rl = plan_ragged(groups, H, W, stride, backward, sizeof(scalar_t), sizeof(T));
  if (rl.blocks == 0) return;
  const at::Tensor table = device_table(rl.table, device);
  p.groups = reinterpret_cast<const RaggedGroup*>(table.const_data_ptr());
  p.num_groups = static_cast<int>(rl.table.size());
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.Ho = static_cast<int>(conv_out_size(H, 3, stride));  // the same for every odd kernel size
  p.Wo = static_cast<int>(conv_out_size(W, 3, stride));
  if (stride == 1) {
    launch(backward ? ragged_backward_kernel<scalar_t, 1> : ragged_forward_kernel<scalar_t, 1>, rl.blocks, rl.smem,
           p);
  } else {
    launch(backward ? ragged_backward_kernel<scalar_t, 2> : ragged_forward_kernel<scalar_t, 2>, rl.blocks, rl.smem,
           p);
  }
}

}  // namespace
}  // namespace betanas
