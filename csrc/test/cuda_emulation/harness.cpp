// Runs the CUDA kernels of csrc/cuda/dw_bn_act.cu on the CPU, one fiber per CUDA thread (emu.h), and
// compares every op with the CPU kernels over dtypes, kernel sizes, strides, layouts and odd shapes, for
// several shared-memory budgets, with the launches' blocks in forward, reverse or shuffled order. It checks the
// CUDA code's indexing, tiling, synchronisation and reductions where no GPU exists; speed and the device's own
// arithmetic need a GPU (gpu_check.sh).
// ctest builds it twice (CMakeLists.txt): as it is, where the test shapes give each block one (image, tile) item,
// and with small BETANAS_DW_TARGET_BLOCKS and BETANAS_DW_MAX_MICRO, where images span several tiles and blocks walk
// runs of several items (some crossing from one image to the next), as blocks do at ImageNet shapes with the real
// settings; that build fails unless some blocks did walk several items.
//   test_cuda_emulation [level [optin]] [--block-order=forward|reverse|shuffle]
//       level 0: small odd shapes (ctest); 1: + mid-size; 2: + a 20 KB budget; 3: ImageNet-like shapes only
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <cstdio>
#include <string>
#include "compare.h"
#include "emu.h"
// The multi-item build sets the work split (the .cu file defaults it otherwise): its coverage claim must hold.
#ifdef BETANAS_DW_TARGET_BLOCKS
#define EXPECT_MULTI_ITEM_BLOCKS 1
#endif
#define kCUDA kCPU
#ifndef CU_FILE
#define CU_FILE "cuda/dw_bn_act.cu"
#endif
#include CU_FILE
#undef kCUDA

using at::Tensor;
static int g_fail = 0, g_checks = 0;

static void check(const char* what, const std::string& cs, const Tensor& got, const Tensor& ref, double tol,
                  bool check_meta = true, at::ScalarType want_dtype = at::ScalarType::Undefined) {
  ++g_checks;
  bool ok = true;
  std::string why;
  if (got.sizes() != ref.sizes()) { ok = false; why += " sizes"; }
  if (check_meta && got.strides() != ref.strides()) { ok = false; why += " strides"; }
  at::ScalarType wd = want_dtype == at::ScalarType::Undefined ? ref.scalar_type() : want_dtype;
  if (got.scalar_type() != wd) { ok = false; why += " dtype"; }
  double e = ok ? rel_err(got, ref) : INFINITY;
  if (!(e <= tol)) { ok = false; why += " value(" + std::to_string(e) + ")"; }
  if (!ok) {
    ++g_fail;
    std::printf("FAIL %s %s:%s  got %s %s ref %s %s\n", cs.c_str(), what, why.c_str(), c10::toString(got.scalar_type()),
                c10::str(got.strides()).c_str(), c10::toString(ref.scalar_type()), c10::str(ref.strides()).c_str());
  }
}

using TrainSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double);
using TrainBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double, bool);
using EvalSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t);
using EvalBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t);

struct Case { int64_t N, C, H, W, K, S, act; at::ScalarType dt; bool cl; bool param_f32; bool dy_other_layout; double xoff; };

static void run_case(const Case& c, bool train_ok_expected = true) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "[N%ld C%ld %ldx%ld K%ld S%ld act%ld %s %s p%s dyL%d off%.0f optin%zu]", (long)c.N, (long)c.C, (long)c.H, (long)c.W, (long)c.K,
                (long)c.S, (long)c.act, c10::toString(c.dt), c.cl ? "CL" : "NCHW", c.param_f32 ? "f32" : "x", (int)c.dy_other_layout, c.xoff, betanas_emu::g_optin);
  std::string cs(buf);
  const bool half = c.dt == at::kHalf;
  const auto refdt = half ? at::kFloat : c.dt;  // the CPU kernels have no float16
  auto opt = at::TensorOptions().dtype(at::kDouble);
  Tensor x64 = at::randn({c.N, c.C, c.H, c.W}, opt) + c.xoff;
  Tensor w64 = at::randn({c.C, 1, c.K, c.K}, opt) * 0.3;
  Tensor g64 = 1 + 0.2 * at::randn({c.C}, opt), b64 = 0.3 * at::randn({c.C}, opt);
  const auto pdt = c.param_f32 ? at::kFloat : c.dt;
  Tensor x = x64.to(c.dt), w = w64.to(pdt), g = g64.to(pdt), b = b64.to(pdt);
  if (c.cl) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  // reference inputs: the same values (float for half)
  Tensor xr = x.to(refdt), wr = w.to(c.param_f32 ? at::kFloat : refdt), gr = g.to(wr.scalar_type()), br = b.to(wr.scalar_type());
  const double eps = 1e-3;
  const double tol = tol_of(c.dt);
  const int64_t Ho = betanas::conv_out_size(c.H, c.K, c.S), Wo = betanas::conv_out_size(c.W, c.K, c.S);
  Tensor dy = at::randn({c.N, c.C, Ho, Wo}, opt).to(c.dt);
  if (c.dy_other_layout) dy = c.cl ? dy.contiguous() : dy.contiguous(at::MemoryFormat::ChannelsLast);
  if (c.dy_other_layout && c.N > 1) dy = dy.transpose(2, 3).contiguous().transpose(2, 3);  // arbitrary strides
  Tensor dyr = dy.to(refdt);

  // eval forward / backward
  Tensor scale = g, shift = b, scale_r = gr, shift_r = br;
  {
    Tensor out = betanas::dw_bn_act_eval_cuda(x, w, scale, shift, c.S, c.act);
    Tensor ref = cpu_op<EvalSig>("betanas::dw_bn_act_eval").call(xr, wr, scale_r, shift_r, c.S, c.act);
    check("eval.out", cs, out, half ? ref.to(at::kHalf) : ref, tol);
    auto [gx, gw, gs, gb] = betanas::dw_bn_act_eval_backward_cuda(dy, x, w, scale, shift, c.S, c.act);
    auto [rgx, rgw, rgs, rgb] = cpu_op<EvalBwdSig>("betanas::dw_bn_act_eval_backward").call(dyr, xr, wr, scale_r, shift_r, c.S, c.act);
    check("evalbwd.gx", cs, gx, rgx, tol, true, c.dt);
    check("evalbwd.gw", cs, gw, rgw, tol * 5, true, w.scalar_type());
    check("evalbwd.gscale", cs, gs, rgs, tol * 5, true, w.scalar_type());
    check("evalbwd.gshift", cs, gb, rgb, tol * 5, true, w.scalar_type());
  }
  if (c.N * Ho * Wo <= 1) {
    std::string e1, e2;
    try { betanas::dw_bn_act_train_cuda(x, w, g, b, c.S, c.act, eps); } catch (const c10::Error& e) { e1 = e.what_without_backtrace(); }
    try { cpu_op<TrainSig>("betanas::dw_bn_act_train").call(xr, wr, gr, br, c.S, c.act, eps); } catch (const c10::Error& e) { e2 = e.what_without_backtrace(); }
    ++g_checks;
    if (e1.empty() || e1 != e2) { ++g_fail; std::printf("FAIL %s train error message: '%s' vs '%s'\n", cs.c_str(), e1.c_str(), e2.c_str()); }
    return;
  }
  // train forward / backward
  auto [out, mean, var] = betanas::dw_bn_act_train_cuda(x, w, g, b, c.S, c.act, eps);
  auto [rout, rmean, rvar] = cpu_op<TrainSig>("betanas::dw_bn_act_train").call(xr, wr, gr, br, c.S, c.act, eps);
  check("train.out", cs, out, half ? rout.to(at::kHalf) : rout, tol * (c.dt == at::kFloat ? 3 : 1));
  check("train.mean", cs, mean, rmean, c.dt == at::kDouble ? 1e-10 : 2e-5);
  check("train.var", cs, var, rvar, c.dt == at::kDouble ? 1e-10 : 2e-5);
  auto [gx, gw, gg, gb] = betanas::dw_bn_act_train_backward_cuda(dy, x, w, g, b, rmean, rvar, c.S, c.act, eps, true);
  auto [rgx, rgw, rgg, rgb] = cpu_op<TrainBwdSig>("betanas::dw_bn_act_train_backward").call(dyr, xr, wr, gr, br, rmean, rvar, c.S, c.act, eps, true);
  // Without the weight gradient: the same dx, gamma and beta gradients, and grad_weight zeros.
  auto [gx0, gw0, gg0, gb0] = betanas::dw_bn_act_train_backward_cuda(dy, x, w, g, b, rmean, rvar, c.S, c.act, eps, false);
  check("trainbwd.gx without weight_grad", cs, gx0, gx, 1e-6);
  check("trainbwd.gg without weight_grad", cs, gg0, gg, 1e-6);
  check("trainbwd.gb without weight_grad", cs, gb0, gb, 1e-6);
  ++g_checks;
  if (gw0.ne(0).any().item<bool>()) {
    ++g_fail;
    std::printf("FAIL %s trainbwd weight_grad=false left grad_weight non-zero\n", cs.c_str());
  }
  const double btol = tol * (c.dt == at::kFloat ? 10 : (c.dt == at::kDouble ? 100 : 2));
  check("trainbwd.gx", cs, gx, rgx, btol, true, c.dt);
  check("trainbwd.gw", cs, gw, rgw, btol * 5, true, w.scalar_type());
  check("trainbwd.gg", cs, gg, rgg, btol * 5, true, w.scalar_type());
  check("trainbwd.gb", cs, gb, rgb, btol * 5, true, w.scalar_type());
}

int main(int argc, char** argv) {
  argc = betanas_emu::take_block_order(argc, argv);
  at::manual_seed(0);
  at::set_num_threads(1);
  const int level = argc > 1 ? std::atoi(argv[1]) : 0;
  if (level < 0) {  // dump plans: harness -1 budget bwd cl C H W K S elem tsize
    auto pl = betanas::make_plan(std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]), std::atoi(argv[6]), std::atoi(argv[7]),
                                 std::atoi(argv[8]), std::atoi(argv[9]), std::atoi(argv[10]), std::atoi(argv[11]), std::atol(argv[2]));
    std::printf("CT %d ncg %d MH %d MW %d (tile %dx%d) tiles %dx%d dz %dx%d xr %dx%d rp%d pl%d yr %dx%d rp%d pl%d smem %zu\n", pl.CT, pl.ncg, pl.MH, pl.MW,
                pl.MH * 2, pl.MW * 4, pl.tiles_h, pl.tiles_w, pl.mhd, pl.mwd, pl.xr.rows, pl.xr.cols, pl.xr.rp, pl.xr.pl, pl.yr.rows, pl.yr.cols, pl.yr.rp, pl.yr.pl, pl.smem);
    return 0;
  }
  std::vector<Case> cases;
  const at::ScalarType dts[] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  // small, odd shapes over every K, S, act, dtype, layout
  for (auto dt : dts)
    for (int64_t K : {3, 5, 7})
      for (int64_t S : {1, 2})
        for (bool cl : {false, true}) {
          int64_t act = (K + S + cl) % 3;
          cases.push_back({2, 5, 13, 17, K, S, act, dt, cl, (K == 5), (S == 2), 0.0});
        }
  // channel groups with a partial last group, vector paths (C % 8 == 0), tiny images, N=1, C=1
  for (auto dt : dts) {
    cases.push_back({3, 40, 9, 6, 3, 1, 2, dt, true, false, false, 2.0});
    cases.push_back({1, 1, 7, 7, 3, 2, 1, dt, false, false, false, 0.0});
    cases.push_back({1, 1, 7, 7, 7, 1, 0, dt, true, false, false, 0.0});
    cases.push_back({2, 16, 14, 14, 3, 1, 1, dt, true, false, true, 0.0});
    cases.push_back({2, 24, 8, 8, 5, 2, 2, dt, true, true, false, 0.0});
    cases.push_back({4, 8, 1, 1, 3, 1, 1, dt, true, false, false, 0.0});
    cases.push_back({1, 3, 2, 2, 3, 2, 0, dt, false, false, false, 0.0});  // train count 1 -> error
    cases.push_back({2, 3, 1, 3, 7, 2, 2, dt, false, false, false, 0.0});
  }
  if (level >= 1) {
    for (auto dt : {at::kFloat, at::kBFloat16})
      for (int64_t K : {3, 5, 7})
        for (int64_t S : {1, 2}) {
          cases.push_back({2, 48, 28, 28, K, S, 2, dt, true, false, false, 1.0});
          cases.push_back({2, 6, 29, 31, K, S, 1, dt, false, false, false, 0.0});
        }
  }
  if (level >= 3) {
    cases.clear();
    cases.push_back({1, 96, 56, 56, 3, 1, 1, at::kBFloat16, true, false, false, 0.5});
    cases.push_back({1, 96, 56, 56, 7, 2, 2, at::kBFloat16, true, true, true, 0.0});
    cases.push_back({2, 144, 28, 28, 5, 1, 2, at::kBFloat16, true, false, false, 0.0});
    cases.push_back({2, 144, 28, 28, 3, 2, 1, at::kFloat, false, false, false, 0.0});
    cases.push_back({2, 240, 14, 14, 7, 1, 1, at::kBFloat16, true, false, false, 0.0});
    cases.push_back({2, 240, 14, 14, 3, 2, 0, at::kHalf, true, false, false, 0.0});
    cases.push_back({1, 96, 56, 56, 5, 2, 1, at::kFloat, false, false, false, 0.0});
  }
  std::vector<size_t> optins = {227 * 1024, 64 * 1024};
  if (level >= 2) optins.push_back(20 * 1024);
  if (argc > 2) optins = {size_t(std::atol(argv[2]))};
  for (size_t oi = 0; oi < optins.size(); ++oi) {
    betanas_emu::g_optin = optins[oi];
    for (const auto& c : cases) {
      try {
        run_case(c);
      } catch (const std::exception& e) {
        ++g_fail;
        std::printf("EXCEPTION N%ld C%ld %ldx%ld K%ld S%ld: %s\n", (long)c.N, (long)c.C, (long)c.H, (long)c.W, (long)c.K, (long)c.S, e.what());
      }
    }
    std::printf("optin %zu done: %d checks, %d failures, %ld launches, %ld blocks\n", optins[oi], g_checks, g_fail,
                betanas_emu::g_launches.load(), betanas_emu::g_blocks.load());
    std::fflush(stdout);
  }
  const betanas_emu::Coverage multi = betanas_emu::covered("dense blocks walking several items");
  std::printf("blocks that walked several items: %ld (at most %ld items)\n", multi.count, multi.max);
#ifdef EXPECT_MULTI_ITEM_BLOCKS
  ++g_checks;
  if (multi.count == 0) {
    ++g_fail;
    std::printf("FAIL no block walked several items: BETANAS_DW_TARGET_BLOCKS / BETANAS_DW_MAX_MICRO too large\n");
  }
#endif
  return g_fail ? 1 : 0;
}
