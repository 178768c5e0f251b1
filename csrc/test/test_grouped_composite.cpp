// The compositions that the CUDA build registers for the grouped ops (common/grouped_composite.h), run on
// the CPU against the CPU kernels of the same ops: their grouping, offsets, statistics and reductions are
// checked here without a GPU.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include "common/grouped_composite.h"

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& actual, const at::Tensor& expected, double tol) {
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  const double err = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>() / scale;
  std::printf("%-40s max scaled error %.3e (tolerance %.1e)\n", what, err, tol);
  if (!(err <= tol)) ++failures;
}

using namespace betanas;

}  // namespace

int main() {
  at::manual_seed(0);
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto grouped = dispatcher.findSchemaOrThrow("betanas::dw_bn_act_grouped_train", "")
                           .typed<composite::Train3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                                    at::IntArrayRef, int64_t, int64_t, int64_t, int64_t, double)>();
  const auto grouped_bwd =
      dispatcher.findSchemaOrThrow("betanas::dw_bn_act_grouped_train_backward", "")
          .typed<composite::Grad4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                  at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, int64_t, int64_t, double)>();
  const std::vector<int64_t> samples = {4, 0, 1, 3}, channels = {3, 5, 4, 6}, kernels = {7, 3, 5, 3};
  const int64_t H = 7, W = 6;
  for (int64_t stride : {1, 2}) {
    const DwGroups groups = packed_groups("test", samples, channels, kernels, H, W, stride);
    const auto x = at::randn({groups.x_numel}) * 2 + 0.3, w = at::randn({groups.weight_numel}) / 4;
    const auto gamma = at::rand({groups.total_channels}) + 0.5, beta = at::randn({groups.total_channels});
    const auto [out, mean, var] = grouped.call(x, w, gamma, beta, samples, channels, kernels, H, W, stride, 1, 1e-5);
    const auto [c_out, c_mean, c_var] = composite::grouped_train("test", c10::kCPU, x, w, gamma, beta, samples,
                                                                 channels, kernels, H, W, stride, 1, 1e-5);
    expect_close(stride == 1 ? "grouped out, stride 1" : "grouped out, stride 2", c_out, out, 1e-5);
    expect_close("  mean", c_mean, mean, 1e-5);
    expect_close("  var", c_var, var, 1e-5);
    const auto gy = at::randn_like(out);
    const auto ours = grouped_bwd.call(gy, x, w, gamma, beta, mean, var, samples, channels, kernels, H, W, stride, 1,
                                       1e-5);
    const auto theirs = composite::grouped_train_backward("test", c10::kCPU, gy, x, w, gamma, beta, mean, var, samples,
                                                          channels, kernels, H, W, stride, 1, 1e-5);
    expect_close("  grad_x", std::get<0>(theirs), std::get<0>(ours), 1e-5);
    expect_close("  grad_weight", std::get<1>(theirs), std::get<1>(ours), 1e-5);
    expect_close("  grad_bn_weight", std::get<2>(theirs), std::get<2>(ours), 1e-5);
    expect_close("  grad_bn_bias", std::get<3>(theirs), std::get<3>(ours), 1e-5);
  }

  const auto gate = dispatcher.findSchemaOrThrow("betanas::block_gate_grads", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                          at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                          at::TensorList, at::TensorList, at::TensorList, int64_t, bool, int64_t,
                                          double)>();
  for (int64_t stride : {1, 2}) {
    const int64_t N = 5, Cin = 8, Cout = stride == 1 ? 8 : 12, Hs = 9, Ho = stride == 1 ? 9 : 5;
    std::vector<at::Tensor> ew, ebw, ebb, dww, dbw, dbb, pw, pbw, pbb;
    for (auto [k, e] : std::vector<std::pair<int64_t, int64_t>>{{3, 3}, {5, 6}, {7, 3}}) {
      const int64_t mid = Cin * e;
      ew.push_back(at::randn({mid, Cin, 1, 1}) / 3);
      ebw.push_back(at::rand({mid}) + 0.5);
      ebb.push_back(at::randn({mid}) * 0.5);
      dww.push_back(at::randn({mid, 1, k, k}) / k);
      dbw.push_back(at::rand({mid}) + 0.5);
      dbb.push_back(at::randn({mid}) * 0.5);
      pw.push_back(at::randn({Cout, mid, 1, 1}) / 5);
      pbw.push_back(at::rand({Cout}) + 0.5);
      pbb.push_back(at::randn({Cout}) * 0.5);
    }
    const auto x = at::randn({N, Cin, Hs, Hs}), g = at::randn({N, Cout, Ho, Ho});
    const bool residual = stride == 1;
    const auto ours = gate.call(x, g, ew, ebw, ebb, dww, dbw, dbb, pw, pbw, pbb, stride, residual, 1, 1e-5);
    const auto theirs = composite::block_gate_grads("test", c10::kCPU, x, g, ew, ebw, ebb, dww, dbw, dbb, pw, pbw, pbb,
                                                    stride, residual, 1, 1e-5);
    expect_close(stride == 1 ? "block_gate_grads, residual" : "block_gate_grads, stride 2", theirs, ours, 1e-5);
  }
  std::printf(failures ? "FAILED (%d)\n" : "OK\n", failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
