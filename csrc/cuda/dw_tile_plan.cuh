// Host side of the depthwise tiles: per shape, the channels per block (CT), the tile (MH x MW micro-tiles),
// the shared-memory regions and budget, and the split of the items over blocks, chosen by a rough cost model
// and cached. The device side that walks these tiles is dw_tile.cuh. Private to dw_bn_act.cu, hence internal
// linkage.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <mutex>

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "cuda/dw_tile.cuh"

namespace betanas {
namespace {

#ifndef BETANAS_DW_TARGET_BLOCKS
#define BETANAS_DW_TARGET_BLOCKS 2048
#endif
constexpr int kTargetBlocks = BETANAS_DW_TARGET_BLOCKS;  // blocks per launch the work split aims at
#ifndef BETANAS_DW_MAX_MICRO
#define BETANAS_DW_MAX_MICRO 16
#endif
constexpr int kMaxMicro = BETANAS_DW_MAX_MICRO;  // largest tile: kMaxMicro x kMaxMicro micro-tiles

#ifndef BETANAS_CUDA_EMULATION
size_t smem_optin_bytes() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }
size_t smem_per_sm_bytes() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor; }
#else
using betanas_emu::smem_optin_bytes;
using betanas_emu::smem_per_sm_bytes;
#endif

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

// What one item of a candidate plan costs: instructions per thread, elements copied between global and shared
// memory, and elements read from or written to DRAM.
struct TileWork {
  double compute_i, io_elems, mem_elems;
};

// Shared loads and FMAs of one micro-tile's convolution.
double conv_instr(int K, int S) {
  const int rows_c = (kRH - 1) * S + K, segw = (kRW - 1) * S + K;
  return rows_c * segw + double(K) * K * kRH * kRW;
}

// Forward: the x tile with its halo, and the y (or dy) tile.
TileWork plan_forward_tile(Plan& pl, int Ho, int Wo, int K, int S, size_t tsize) {
  const int TOH = pl.MH * kRH, TOW = pl.MW * kRW, tpc = kThreads / pl.CT;
  pl.xr = make_region((TOH - 1) * S + K, (TOW - 1) * S + K, kRH * S, pl.CT);
  pl.yr = make_region(TOH, TOW, kRH, pl.CT);
  pl.smem = std::max<size_t>(size_t(pl.CT) * (pl.xr.pl + pl.yr.pl), 3 * kThreads) * tsize;
  TileWork tw;
  tw.compute_i = double(ceil_div(pl.MH * pl.MW, tpc)) * (conv_instr(K, S) + 6.0 * kRH * kRW);
  tw.io_elems = double(pl.CT) * (double(pl.xr.rows) * pl.xr.cols + double(TOH) * TOW);
  tw.mem_elems = double(pl.CT) * (double(std::min(TOH, Ho)) * S * std::min(TOW, Wo) * S + double(TOH) * TOW);
  return tw;
}

// Backward: the dz region (the tile plus a halo of HD outputs, whole micro-tiles), the x tile under it, and the
// grad_x tile of the tile's own inputs, which reuses the x tile's storage.
TileWork plan_backward_tile(Plan& pl, int Ho, int Wo, int K, int S, size_t tsize) {
  const int P = K / 2, HD = (P + S - 1) / S;
  const int TOH = pl.MH * kRH, TOW = pl.MW * kRW, tpc = kThreads / pl.CT;
  const int DH = static_cast<int>(ceil_div(TOH + 2 * HD, kRH)) * kRH;
  const int DW = static_cast<int>(ceil_div(TOW + 2 * HD, kRW)) * kRW;
  pl.mhd = DH / kRH;
  pl.mwd = DW / kRW;
  pl.xr = make_region((DH - 1) * S + K, (DW - 1) * S + K, kRH * S, pl.CT);
  pl.yr = make_region(DH, DW, kRH, pl.CT);
  pl.gr = pl.xr;
  pl.gr.rows = TOH * S;
  pl.gr.cols = TOW * S;
  pl.gr.fd_rows = FastDiv(pl.gr.rows);
  pl.gr.fd_cols = FastDiv(pl.gr.cols);
  pl.smem = std::max<size_t>(size_t(pl.CT) * (pl.xr.pl + pl.yr.pl), kRedChunk * kThreads) * tsize;
  const double conv_i = conv_instr(K, S);
  const double wgrad_i = conv_i + kRH * kRW;
  const double dgrad_i = double(kRH + 2 * HD) * (kRW + 2 * HD) + double(K) * K * kRH * kRW + 2.0 * S * S * kRH * kRW;
  TileWork tw;
  tw.compute_i = double(ceil_div(pl.mhd * pl.mwd, tpc)) * (conv_i + 14.0 * kRH * kRW) +
                 double(ceil_div(pl.MH * pl.MW, tpc)) * (wgrad_i + dgrad_i);
  tw.io_elems = double(pl.CT) * (double(pl.xr.rows) * pl.xr.cols + double(DH) * DW + double(TOH) * S * TOW * S);
  tw.mem_elems = double(pl.CT) * (2.0 * std::min(TOH, Ho) * S * std::min(TOW, Wo) * S + double(TOH) * TOW);
  return tw;
}

// Per tile, the larger of the block's instruction time (shared loads + FMAs + copies) and its share of DRAM
// bandwidth, plus a fixed cost.
double plan_cost(const Plan& pl, const TileWork& tw, bool cl, bool vec, size_t elem) {
  const double io_i = tw.io_elems / kThreads * (vec ? 3.0 : 8.0);
  const double instr_cycles = 2.0 * (tw.compute_i + io_i);  // 8 warps on 4 schedulers
  double eff = 1.0;
  if (cl) eff = std::min(1.0, double(pl.CT) * elem / 32.0);
  const double mem_cycles = tw.mem_elems * elem / eff / 20.0;
  return double(pl.ncg) * pl.tiles_h * pl.tiles_w * (std::max(instr_cycles, mem_cycles) + 400.0);
}

// Picks CT and the tile (MH x MW micro-tiles) of least modelled cost that fits in `budget` bytes of shared
// memory. elem: bytes of the storage dtype; tsize: of the arithmetic type.
Plan make_plan(bool bwd, bool cl, int C, int H, int W, int K, int S, size_t elem, size_t tsize, size_t budget) {
  const int Ho = static_cast<int>(conv_out_size(H, K, S)), Wo = static_cast<int>(conv_out_size(W, K, S));
  const int vec_width = static_cast<int>(16 / elem);
  int ct_max = 1;
  while (ct_max < C && ct_max < 32) ct_max *= 2;
  const int mh_max = static_cast<int>(std::min<int64_t>(kMaxMicro, ceil_div(Ho, kRH)));
  const int mw_max = static_cast<int>(std::min<int64_t>(kMaxMicro, ceil_div(Wo, kRW)));
  Plan best;
  double best_cost = -1.0;
  for (int CT = ct_max; CT >= 1; CT /= 2) {
    const bool vec = cl && C % vec_width == 0 && CT >= vec_width;
    for (int MH = 1; MH <= mh_max; ++MH) {
      for (int MW = 1; MW <= mw_max; ++MW) {
        Plan pl;
        pl.CT = CT;
        pl.ncg = static_cast<int>(ceil_div(C, CT));
        pl.MH = MH;
        pl.MW = MW;
        pl.tiles_h = static_cast<int>(ceil_div(Ho, MH * kRH));
        pl.tiles_w = static_cast<int>(ceil_div(Wo, MW * kRW));
        const TileWork tw =
            bwd ? plan_backward_tile(pl, Ho, Wo, K, S, tsize) : plan_forward_tile(pl, Ho, Wo, K, S, tsize);
        if (pl.smem > budget) continue;
        const double cost = plan_cost(pl, tw, cl, vec, elem);
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

struct PlanKey {
  std::array<int64_t, 11> v;
  bool operator<(const PlanKey& o) const { return v < o.v; }
};

// make_plan for the current device, cached per shape.
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

// The geometry the kernels decode, for x of `sizes` [N, C, H, W] under `plan`. The blocks of a channel group
// split its items evenly, aiming at kTargetBlocks blocks a launch; the split depends on the shape only, so the
// reductions over blocks are run-to-run deterministic. elem: bytes of the storage dtype.
TileGeometry make_geometry(const Plan& plan, c10::IntArrayRef sizes, int K, int S, bool cl, size_t elem) {
  TileGeometry geo;
  const int64_t N = sizes[0];
  geo.C = static_cast<int>(sizes[1]);
  geo.H = static_cast<int>(sizes[2]);
  geo.W = static_cast<int>(sizes[3]);
  geo.Ho = static_cast<int>(conv_out_size(geo.H, K, S));
  geo.Wo = static_cast<int>(conv_out_size(geo.W, K, S));
  geo.cl = cl ? 1 : 0;
  geo.CT = plan.CT;
  geo.ct_shift = plan.ct_shift;
  geo.ncg = plan.ncg;
  geo.MH = plan.MH;
  geo.MW = plan.MW;
  geo.mhd = plan.mhd;
  geo.mwd = plan.mwd;
  geo.fd_mh = FastDiv(plan.MH);
  geo.fd_mhd = FastDiv(plan.mhd);
  geo.tiles_w = plan.tiles_w;
  geo.tiles_per_img = plan.tiles_h * plan.tiles_w;
  geo.xr = plan.xr;
  geo.yr = plan.yr;
  geo.gr = plan.gr;
  geo.items = N * geo.tiles_per_img;
  if (geo.items > 0) {
    const int64_t per_cg = std::max<int64_t>(1, kTargetBlocks / plan.ncg);
    const int64_t g0 = std::min<int64_t>(geo.items, per_cg);
    geo.items_per_block = ceil_div(geo.items, g0);
    geo.G = static_cast<int>(ceil_div(geo.items, geo.items_per_block));
  } else {
    geo.items_per_block = 0;
    geo.G = 0;
  }
  const int V = static_cast<int>(16 / elem);
  geo.vec = (cl && geo.C % V == 0 && plan.CT >= V) ? 1 : 0;
  return geo;
}

}  // namespace
}  // namespace betanas
