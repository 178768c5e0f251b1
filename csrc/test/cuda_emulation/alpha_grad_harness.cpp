// Runs the CUDA kernel of csrc/cuda/alpha_grad.cu (one thread per row, 64-thread blocks) on the CPU, one
// fiber per CUDA thread (emu.h), and compares it with the CPU kernel (csrc/cpu/alpha_grad.cpp) on fresh
// random inputs: rows of one path, odd numbers of rows and paths, grids of one to several blocks (rows past the
// last full block), rows with few remaining paths, one remaining path and none, large alphas, beta 0 and not,
// non-contiguous inputs, empty tensors; and the op's argument checks (alpha_grad takes float32 only, so other
// dtypes must be refused with the CPU kernel's message). It checks the CUDA code's indexing and launch
// geometry where no GPU exists; the device's own arithmetic (fast-math expf) needs a GPU.
//   test_cuda_emulation_alpha_grad [--block-order=forward|reverse|shuffle]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <cstdio>
#include <string>
#include <vector>

#include "compare.h"
#include "emu.h"
#define kCUDA kCPU
#include "cuda/alpha_grad.cu"
#undef kCUDA

using at::Tensor;
using AlphaGradSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double);
static int g_fail = 0, g_checks = 0;

static void fail(const std::string& cs, const std::string& why) {
  ++g_fail;
  std::printf("FAIL %s %s\n", cs.c_str(), why.c_str());
}

static void check(const char* what, const std::string& cs, const Tensor& got, const Tensor& ref,
                  const Tensor& remaining) {
  ++g_checks;
  std::string why;
  if (got.sizes() != ref.sizes()) why += " sizes";
  if (got.strides() != ref.strides()) why += " strides";
  if (got.scalar_type() != ref.scalar_type()) why += " dtype";
  if (why.empty()) {
    const double e = rel_err(got, ref, 1e-30);
    if (!(e <= tol_of(at::kFloat))) why += " value(" + std::to_string(e) + ")";
    // Dropped paths are exactly zero in both kernels.
    if (got.numel() > 0 && got.masked_select(remaining.logical_not()).ne(0).any().item<bool>()) {
      why += " non-zero on a dropped path";
    }
  }
  if (!why.empty()) fail(cs, std::string(what) + ":" + why);
}

// mask: 0 random (about 70% kept), 1 each row one path, 2 each row two paths at most, 3 some rows none.
struct Case {
  int64_t L, M;
  int mask;
  double alpha_scale, beta;
  bool transposed;  // inputs as transposed views of [M, L] storage
};

static void run_case(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "[L%ld M%ld mask%d alpha*%g beta%g %s]", (long)c.L, (long)c.M, c.mask,
                c.alpha_scale, c.beta, c.transposed ? "transposed" : "contiguous");
  const std::string cs(buf);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  Tensor alpha = at::randn({c.L, c.M}, f32) * c.alpha_scale;
  Tensor remaining = at::rand({c.L, c.M}, f32) < 0.7;
  if (c.L > 0 && c.M > 0) {
    const Tensor pick = at::randint(c.M, {c.L}, at::TensorOptions().dtype(at::kLong));
    const Tensor rows = at::arange(c.L, at::TensorOptions().dtype(at::kLong));
    if (c.mask == 1 || c.mask == 2) remaining.zero_();
    remaining.index_put_({rows, pick}, true);  // at least one path a row
    if (c.mask == 2) remaining.index_put_({rows, (pick + 1) % c.M}, true);
    if (c.mask == 3) remaining.index_put_({rows.remainder(3) == 1}, false);  // rows with no remaining path
  }
  Tensor gate = at::randn({c.L, c.M}, f32);
  Tensor cost = at::rand({c.L, c.M}, f32) * 50;
  if (c.transposed) {
    auto t = [](const Tensor& v) { return v.t().contiguous().t(); };
    alpha = t(alpha);
    remaining = t(remaining);
    gate = t(gate);
    cost = t(cost);
  }
  auto [p, grad] = betanas::alpha_grad_cuda(alpha, remaining, gate, cost, c.beta);
  auto [rp, rgrad] = cpu_op<AlphaGradSig>("betanas::alpha_grad").call(alpha, remaining, gate, cost, c.beta);
  check("p", cs, p, rp, remaining);
  check("grad_alpha", cs, grad, rgrad, remaining);
}

// Arguments the op refuses: the emulated CUDA entry point must say what the CPU kernel says.
static void run_refusal(const std::string& what, const Tensor& alpha, const Tensor& remaining, const Tensor& gate,
                        const Tensor& cost) {
  ++g_checks;
  std::string e1, e2;
  try {
    betanas::alpha_grad_cuda(alpha, remaining, gate, cost, 0.1);
  } catch (const c10::Error& e) {
    e1 = e.what_without_backtrace();
  }
  try {
    cpu_op<AlphaGradSig>("betanas::alpha_grad").call(alpha, remaining, gate, cost, 0.1);
  } catch (const c10::Error& e) {
    e2 = e.what_without_backtrace();
  }
  if (e1.empty() || e1 != e2) fail("[refusal " + what + "]", "error message: '" + e1 + "' vs '" + e2 + "'");
}

int main(int argc, char** argv) {
  argc = betanas_emu::take_block_order(argc, argv);
  at::manual_seed(0);
  at::set_num_threads(1);
  std::vector<Case> cases;
  // One row, one path; odd rows and paths; one block, exactly one, just over one, several with a partial last.
  for (auto [L, M] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {5, 3}, {21, 7}, {63, 5}, {64, 2}, {65, 7}, {130, 3}, {193, 13}, {3, 40}}) {
    for (int mask : {0, 1, 2, 3}) {
      const bool odd = (L + M + mask) % 2 == 1;
      cases.push_back({L, M, mask, odd ? 1.0 : 3.0, mask == 1 ? 0.0 : 0.3, odd && L > 1});
    }
  }
  cases.push_back({70, 6, 0, 40.0, 0.5, false});  // large alphas: the softmax must stay finite
  cases.push_back({129, 1, 1, 1.0, 0.3, true});   // one path a row over three blocks
  cases.push_back({0, 4, 0, 1.0, 0.3, false});    // no rows
  cases.push_back({3, 0, 0, 1.0, 0.3, false});    // no paths
  for (const auto& c : cases) {
    try {
      run_case(c);
    } catch (const std::exception& e) {
      fail("[L" + std::to_string(c.L) + " M" + std::to_string(c.M) + "]", std::string("exception: ") + e.what());
    }
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const Tensor a = at::randn({4, 3}, f32), r = at::rand({4, 3}, f32) < 0.7, g = at::randn({4, 3}, f32);
  for (auto dt : {at::kDouble, at::kBFloat16, at::kHalf}) {
    const std::string name = c10::toString(dt);
    run_refusal("alpha " + name, a.to(dt), r, g, g);
    run_refusal("gate_grad " + name, a, r, g.to(dt), g);
    run_refusal("cost " + name, a, r, g, g.to(dt));
  }
  run_refusal("remaining float", a, r.to(at::kFloat), g, g);
  run_refusal("shape", a, r, g.narrow(1, 0, 2), g);
  run_refusal("1-D alpha", a.reshape({-1}), r.reshape({-1}), g.reshape({-1}), g.reshape({-1}));

  // The cases must have run grids of several blocks, or the block order would not matter.
  const long launches = betanas_emu::g_launches.load(), blocks = betanas_emu::g_blocks.load();
  ++g_checks;
  if (blocks <= launches) fail("[coverage]", "no launch ran more than one block");
  std::printf("%d checks, %d failures, %ld launches, %ld blocks\n", g_checks, g_fail, launches, blocks);
  return g_fail ? 1 : 0;
}
