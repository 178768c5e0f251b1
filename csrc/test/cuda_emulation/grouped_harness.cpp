// Runs the CUDA kernels of csrc/cuda/grouped.cu (the single-launch ragged depthwise kernels of dw_ragged.cuh and
// the block_gate_grads reductions) on the CPU, one fiber per CUDA thread (emu.h), and compares all three
// grouped ops with the CPU kernels: ragged groups (different samples, channels and kernel sizes, an empty group,
// a one-sample group), odd planes, stride 1 and 2, every activation, float32 / bfloat16 / float16 / float64,
// parameters in x's dtype or float32, several shared-memory budgets and sample-chunk widths. Inputs are fresh
// random values (never zeros). Compiled with small tiles, chunks and reduction splits (CMakeLists.txt) so that
// blocks walk several chunks and tiles and block_gate_grads' reductions split channels over several blocks, whose
// last block to finish (a ticket) combines them; it fails unless some reduction was split. ctest runs it with the
// launches' blocks in forward, reverse and shuffled order, so that the combining block is the highest-numbered one,
// the lowest or any. It checks the CUDA code's indexing, tiling, synchronisation and reductions where no GPU
// exists; speed and the device's own arithmetic need a GPU (benchmarks/gpu_check.sh).
//   test_cuda_emulation_grouped [level] [--block-order=forward|reverse|shuffle]
//       level 0: small ragged cases (ctest); 1: + larger groups and blocks
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "compare.h"
#include "emu.h"

// The build shrinks the reductions' chunks (grouped.cu defaults them otherwise): its coverage claim must hold.
#ifdef BETANAS_RED_MIN_CHUNK
#define EXPECT_SPLIT_REDUCTIONS 1
#endif
static int g_max_lanes = 32;  // the ragged kernels' widest sample chunk, varied by the test
#define BETANAS_RAGGED_MAX_LANES g_max_lanes
#define kCUDA kCPU
#include "cuda/grouped.cu"
#undef kCUDA

using at::Tensor;
using IntList = std::vector<int64_t>;
static int g_fail = 0, g_checks = 0;
static std::map<std::string, double> g_worst;  // check and dtype -> largest error / tolerance

static void check(const char* what, const std::string& cs, const Tensor& got, const Tensor& ref, double tol,
                  at::ScalarType want_dtype, double floor = 1e-30) {
  ++g_checks;
  std::string why;
  if (got.sizes() != ref.sizes()) why += " sizes";
  if (got.strides() != ref.strides()) why += " strides";
  if (got.scalar_type() != want_dtype) why += " dtype";
  const double e = why.empty() ? rel_err(got, ref, floor) : INFINITY;
  double& worst = g_worst[std::string(what) + " " + c10::toString(got.scalar_type())];
  worst = std::max(worst, e / tol);
  if (!(e <= tol)) why += " value(" + std::to_string(e) + ")";
  if (!why.empty()) {
    ++g_fail;
    std::printf("FAIL %s %s:%s  got %s ref %s\n", cs.c_str(), what, why.c_str(), c10::toString(got.scalar_type()),
                c10::toString(ref.scalar_type()));
  }
}

using Train3 = std::tuple<Tensor, Tensor, Tensor>;
using Grad4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using GroupedSig = Train3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef,
                          at::IntArrayRef, int64_t, int64_t, int64_t, int64_t, double);
using GroupedBwdSig = Grad4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, int64_t,
                            int64_t, double);
using GateSig = Tensor(const Tensor&, const Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                       at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, int64_t, bool,
                       int64_t, double);

static std::string str(const IntList& v) {
  std::string s;
  for (auto e : v) s += (s.empty() ? "" : ",") + std::to_string(e);
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// dw_bn_act_grouped_train and its backward.

struct GroupCase {
  IntList samples, channels, kernels;
  int64_t H, W, S, act;
  at::ScalarType dt;
  bool param_f32, grad_f32;
};

static void run_group_case(const GroupCase& c) {
  char buf[320];
  std::snprintf(buf, sizeof buf, "[grouped n=%s c=%s k=%s %ldx%ld S%ld act%ld %s p%s g%s lanes%d optin%zu]",
                str(c.samples).c_str(), str(c.channels).c_str(), str(c.kernels).c_str(), (long)c.H, (long)c.W,
                (long)c.S, (long)c.act, c10::toString(c.dt), c.param_f32 ? "f32" : "x", c.grad_f32 ? "f32" : "x",
                g_max_lanes, betanas_emu::g_optin);
  const std::string cs(buf);
  const bool half = c.dt == at::kHalf;
  const auto refdt = half ? at::kFloat : c.dt;  // the CPU kernels have no float16
  const auto pdt = c.param_f32 ? at::kFloat : c.dt;
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  int64_t xn = 0, yn = 0, wn = 0, cn = 0;
  for (size_t g = 0; g < c.samples.size(); ++g) {
    const int64_t Ho = betanas::conv_out_size(c.H, c.kernels[g], c.S);
    const int64_t Wo = betanas::conv_out_size(c.W, c.kernels[g], c.S);
    xn += c.samples[g] * c.channels[g] * c.H * c.W;
    yn += c.samples[g] * c.channels[g] * Ho * Wo;
    wn += c.channels[g] * c.kernels[g] * c.kernels[g];
    cn += c.channels[g];
  }
  const Tensor x = (at::randn({xn}, opt) * 1.5 + 0.3).to(c.dt);
  const Tensor w = (at::randn({wn}, opt) * 0.3).to(pdt);
  const Tensor g = (at::rand({cn}, opt) + 0.5).to(pdt), b = (0.4 * at::randn({cn}, opt)).to(pdt);
  const Tensor xr = x.to(refdt), wr = w.to(c.param_f32 ? at::kFloat : refdt), gr = g.to(wr.scalar_type()),
               br = b.to(wr.scalar_type());
  const double eps = 1e-3, tol = tol_of(c.dt);
  const auto stats_dt = c.dt == at::kDouble ? at::kDouble : at::kFloat;

  auto [out, mean, var] = betanas::dw_bn_act_grouped_train_cuda(x, w, g, b, c.samples, c.channels, c.kernels, c.H,
                                                                 c.W, c.S, c.act, eps);
  auto [rout, rmean, rvar] = cpu_op<GroupedSig>("betanas::dw_bn_act_grouped_train")
                                 .call(xr, wr, gr, br, c.samples, c.channels, c.kernels, c.H, c.W, c.S, c.act, eps);
  check("fwd.out", cs, out, half ? rout.to(at::kHalf) : rout, tol * (c.dt == at::kFloat ? 3 : 1), c.dt);
  check("fwd.mean", cs, mean, rmean, c.dt == at::kDouble ? 1e-10 : 2e-5, stats_dt);
  check("fwd.var", cs, var, rvar, c.dt == at::kDouble ? 1e-10 : 2e-5, stats_dt);

  const Tensor dy = at::randn({yn}, opt).to(c.grad_f32 ? at::kFloat : c.dt), dyr = dy.to(refdt);
  auto [gx, gw, gg, gb] = betanas::dw_bn_act_grouped_train_backward_cuda(dy, x, w, g, b, rmean, rvar, c.samples,
                                                                         c.channels, c.kernels, c.H, c.W, c.S, c.act,
                                                                         eps);
  auto [rgx, rgw, rgg, rgb] =
      cpu_op<GroupedBwdSig>("betanas::dw_bn_act_grouped_train_backward")
          .call(dyr, xr, wr, gr, br, rmean, rvar, c.samples, c.channels, c.kernels, c.H, c.W, c.S, c.act, eps);
  const double btol = tol * (c.dt == at::kFloat ? 10 : (c.dt == at::kDouble ? 100 : 2));
  check("bwd.gx", cs, gx, half ? rgx.to(at::kHalf) : rgx, btol, c.dt);
  check("bwd.gw", cs, gw, rgw, btol * 5, w.scalar_type());
  check("bwd.gg", cs, gg, rgg, btol * 5, w.scalar_type());
  check("bwd.gb", cs, gb, rgb, btol * 5, w.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------
// block_gate_grads.

struct GateCase {
  int64_t N, Cin, Cout, H, W, S;
  std::vector<std::pair<int64_t, int64_t>> cands;  // (kernel size, expansion)
  bool residual;
  int64_t act;
  at::ScalarType dt;
  bool param_f32;
  at::ScalarType grad_dt;  // Undefined: x's dtype
};

static void run_gate_case(const GateCase& c) {
  char buf[320];
  std::string ks;
  for (auto [k, e] : c.cands) ks += "k" + std::to_string(k) + "e" + std::to_string(e) + " ";
  const auto grad_dt = c.grad_dt == at::ScalarType::Undefined ? c.dt : c.grad_dt;
  std::snprintf(buf, sizeof buf, "[gate N%ld %ld->%ld %ldx%ld S%ld %sres%d act%ld %s p%s g%s lanes%d optin%zu]",
                (long)c.N, (long)c.Cin, (long)c.Cout, (long)c.H, (long)c.W, (long)c.S, ks.c_str(), (int)c.residual,
                (long)c.act, c10::toString(c.dt), c.param_f32 ? "f32" : "x", c10::toString(grad_dt), g_max_lanes,
                betanas_emu::g_optin);
  const std::string cs(buf);
  const bool half = c.dt == at::kHalf;
  const auto refdt = half ? at::kFloat : c.dt;
  const auto pdt = c.param_f32 ? at::kFloat : c.dt;
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const int64_t Ho = betanas::conv_out_size(c.H, 3, c.S), Wo = betanas::conv_out_size(c.W, 3, c.S);
  const Tensor x = (at::randn({c.N, c.Cin, c.H, c.W}, opt) * 1.5 + 0.2).to(c.dt);
  const Tensor gout = at::randn({c.N, c.Cout, Ho, Wo}, opt).to(grad_dt);
  std::vector<Tensor> p[9], r[9];
  for (auto [k, e] : c.cands) {
    const int64_t mid = c.Cin * e;
    const Tensor t[9] = {at::randn({mid, c.Cin, 1, 1}, opt) / std::sqrt(double(c.Cin)),
                         at::rand({mid}, opt) + 0.5,
                         0.5 * at::randn({mid}, opt),
                         at::randn({mid, 1, k, k}, opt) / k,
                         at::rand({mid}, opt) + 0.5,
                         0.5 * at::randn({mid}, opt),
                         at::randn({c.Cout, mid, 1, 1}, opt) / std::sqrt(double(mid)),
                         at::rand({c.Cout}, opt) + 0.5,
                         0.5 * at::randn({c.Cout}, opt)};
    for (int i = 0; i < 9; ++i) {
      p[i].push_back(t[i].to(pdt));
      r[i].push_back(t[i].to(pdt).to(c.param_f32 ? at::kFloat : refdt));
    }
  }
  const double eps = 1e-3;
  const Tensor got = betanas::block_gate_grads_cuda(x, gout, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], c.S,
                                                    c.residual, c.act, eps);
  const Tensor want = cpu_op<GateSig>("betanas::block_gate_grads")
                          .call(x.to(refdt), gout.to(grad_dt == at::kHalf ? at::kFloat : grad_dt), r[0], r[1], r[2],
                                r[3], r[4], r[5], r[6], r[7], r[8], c.S, c.residual, c.act, eps);
  // Relative to the largest value; bfloat16 / float16 round the GEMM inputs and the depthwise outputs, so a
  // rounding flip there moves the sums by a few units of the storage precision.
  const double tol = c.dt == at::kDouble ? 1e-9 : (c.dt == at::kFloat ? 2e-5 : (half ? 4e-3 : 3e-2));
  check(("gate." + std::string(c10::toString(c.dt))).c_str(), cs, got, want, tol, at::kFloat, 1.0);
}

int main(int argc, char** argv) {
  argc = betanas_emu::take_block_order(argc, argv);
  at::manual_seed(0);
  at::set_num_threads(1);
  const int level = argc > 1 ? std::atoi(argv[1]) : 0;
  const auto t0 = std::chrono::steady_clock::now();
  const at::ScalarType dts[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};

  std::vector<GroupCase> groups;
  // Ragged: an empty group, a one-sample group, every kernel size, odd planes; every act, stride, dtype.
  for (auto dt : dts) {
    for (int64_t S : {1, 2}) {
      for (int64_t act : {0, 1, 2}) {
        const bool pf = dt != at::kFloat && act == 1;
        const bool grad_f32 = dt == at::kBFloat16 && S == 2;
        groups.push_back({{3, 0, 2, 1}, {2, 3, 1, 2}, {3, 7, 5, 7}, 7, 9, S, act, dt, pf, grad_f32});
      }
      groups.push_back({{5, 1}, {1, 2}, {5, 3}, 5, 6, S, (S + 1) % 3, dt, false, false});
      groups.push_back({{2, 4, 0}, {3, 1, 2}, {7, 3, 5}, 3, 2, S, 2, dt, true, false});
    }
  }
  // One group holding every sample, more samples than a chunk (of two or of 32); 1 x W planes.
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    groups.push_back({{9}, {2}, {3}, 8, 8, 1, 1, dt, false, false});
    groups.push_back({{33, 2}, {1, 2}, {3, 5}, 3, 3, 2, 0, dt, false, false});
    groups.push_back({{0, 6, 3}, {2, 2, 1}, {5, 7, 3}, 1, 11, 2, 2, dt, false, false});
  }
  if (level >= 1) {
    for (auto dt : {at::kFloat, at::kBFloat16}) {
      for (int64_t S : {1, 2}) {
        groups.push_back({{7, 9, 0, 5, 12, 3, 4}, {6, 4, 5, 8, 3, 6, 4}, {3, 5, 7, 3, 5, 7, 3}, 16, 13, S, 1, dt,
                          dt != at::kFloat, false});
      }
    }
  }

  std::vector<GateCase> gates;
  const std::vector<std::pair<int64_t, int64_t>> mix = {{3, 3}, {5, 6}, {7, 3}};
  const auto same = at::ScalarType::Undefined;  // grad_out in x's dtype
  for (int64_t act : {0, 1, 2}) gates.push_back({3, 2, 2, 5, 7, 1, mix, act != 0, act, at::kFloat, false, same});
  gates.push_back({2, 2, 3, 7, 6, 2, {{7, 3}, {3, 6}}, false, 2, at::kFloat, false, same});
  gates.push_back({3, 2, 2, 5, 7, 1, mix, true, 1, at::kBFloat16, true, same});
  gates.push_back({2, 2, 3, 7, 6, 2, {{7, 3}, {3, 6}}, false, 2, at::kBFloat16, false, same});
  gates.push_back({3, 2, 2, 5, 7, 1, mix, true, 2, at::kHalf, true, same});
  gates.push_back({3, 2, 2, 5, 7, 1, mix, true, 1, at::kDouble, false, same});
  gates.push_back({2, 2, 3, 7, 6, 2, {{7, 3}, {3, 6}}, false, 0, at::kDouble, true, same});
  // grad_out in another dtype than x; a single candidate; the identity path alone (same and other shapes).
  gates.push_back({3, 2, 2, 5, 5, 1, mix, true, 1, at::kBFloat16, true, at::kFloat});
  gates.push_back({3, 2, 2, 5, 5, 1, mix, false, 1, at::kFloat, false, at::kBFloat16});
  gates.push_back({4, 3, 3, 3, 4, 1, {{5, 6}}, true, 2, at::kFloat, false, same});
  gates.push_back({2, 3, 3, 4, 5, 1, {}, false, 1, at::kFloat, false, same});
  gates.push_back({2, 3, 5, 4, 5, 2, {}, false, 1, at::kBFloat16, false, same});
  gates.push_back({2, 3, 3, 0, 5, 1, {}, false, 1, at::kFloat, false, same});  // empty planes
  if (level >= 1) {
    for (auto dt : dts) {
      for (int64_t act : {0, 1, 2}) {
        gates.push_back({3, 4, 4, 5, 7, 1, mix, act != 0, act, dt, dt == at::kBFloat16, same});
      }
    }
    gates.push_back({8, 8, 8, 12, 12, 1, {{3, 3}, {3, 6}, {5, 3}, {5, 6}, {7, 3}, {7, 6}}, true, 1, at::kFloat, false,
                     same});
    gates.push_back({8, 8, 12, 12, 12, 2, {{3, 6}, {7, 3}}, false, 2, at::kBFloat16, true, same});
  }

  // Shared-memory budgets (opt-in per block) and sample-chunk widths; the small budget with two-sample chunks
  // (more chunks and tiles per block) runs the float32 and bfloat16 cases at level 0.
  std::vector<std::pair<size_t, int>> configs = {{227 * 1024, 32}, {24 * 1024, 2}};
  if (level >= 1) configs.push_back({64 * 1024, 4});
  auto skip = [&](at::ScalarType dt) {
    return level == 0 && g_max_lanes == 2 && dt != at::kFloat && dt != at::kBFloat16;
  };
  for (auto [optin, lanes] : configs) {
    betanas_emu::g_optin = optin;
    g_max_lanes = lanes;
    for (const auto& c : groups) {
      if (skip(c.dt)) continue;
      try {
        run_group_case(c);
      } catch (const std::exception& e) {
        ++g_fail;
        std::printf("EXCEPTION grouped n=%s: %s\n", str(c.samples).c_str(), e.what());
      }
    }
    for (const auto& c : gates) {
      if (skip(c.dt)) continue;
      try {
        run_gate_case(c);
      } catch (const std::exception& e) {
        ++g_fail;
        std::printf("EXCEPTION gate N%ld: %s\n", (long)c.N, e.what());
      }
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("optin %zu lanes %d done: %d checks, %d failures, %ld launches, %ld blocks, %.1f s\n", optin, lanes,
                g_checks, g_fail, betanas_emu::g_launches.load(), betanas_emu::g_blocks.load(), secs);
    std::fflush(stdout);
  }
  std::printf("largest error / tolerance:");
  for (const auto& [name, ratio] : g_worst) std::printf(" %s %.2g;", name.c_str(), ratio);
  std::printf("\n");
  const betanas_emu::Coverage split = betanas_emu::covered("channel reductions split over blocks");
  std::printf("channel reductions split over blocks: %ld (at most %ld blocks a channel)\n", split.count, split.max);
#ifdef EXPECT_SPLIT_REDUCTIONS
  ++g_checks;
  if (split.count == 0) {
    ++g_fail;
    std::printf("FAIL no reduction split a channel over blocks: BETANAS_RED_MIN_CHUNK too large\n");
  }
#endif
  return g_fail ? 1 : 0;
}
