// Native check of the library built by CMake: the ops are registered with the dispatcher, and the CPU
// kernel of the fused depthwise stage matches ATen's conv2d + batch_norm + relu6 on random input.
#include <cstdio>
#include <cstdlib>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& actual, const at::Tensor& expected, double tol) {
  const double err = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
  std::printf("%-28s max abs error %.3e (tolerance %.1e)\n", what, err, tol);
  if (!(err <= tol)) ++failures;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto train = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("betanas::dw_bn_act_train", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                             int64_t, double)>();
  const auto eval = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("betanas::dw_bn_act_eval", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, int64_t, int64_t)>();
  for (int64_t k : {3, 5, 7}) {
    for (int64_t stride : {1, 2}) {
      const int64_t C = 6;
      const auto x = at::randn({3, C, 13, 17}) * 2 + 0.5;
      const auto w = at::randn({C, 1, k, k}) / static_cast<double>(k);
      const auto gamma = at::rand({C}) + 0.5, beta = at::randn({C});
      const double eps = 1e-5;
      const auto z = at::conv2d(x, w, {}, stride, k / 2, 1, C);
      const auto expected = at::clamp(at::batch_norm(z, gamma, beta, {}, {}, true, 0.1, eps, false), 0, 6);
      const auto [out, mean, var] = train.call(x, w, gamma, beta, stride, 1, eps);
      char name[64];
      std::snprintf(name, sizeof(name), "train k=%ld s=%ld", static_cast<long>(k), static_cast<long>(stride));
      expect_close(name, out, expected, 1e-4);
      expect_close("  batch mean", mean, z.mean({0, 2, 3}), 1e-5);
      const auto scale = at::rand({C}) + 0.5, shift = at::randn({C});
      const auto expected_eval = at::clamp(z * scale.view({1, C, 1, 1}) + shift.view({1, C, 1, 1}), 0, 6);
      std::snprintf(name, sizeof(name), "eval  k=%ld s=%ld", static_cast<long>(k), static_cast<long>(stride));
      expect_close(name, eval.call(x, w, scale, shift, stride, 1), expected_eval, 1e-4);
    }
  }
  bool rejected = false;
  try {
    train.call(at::randn({2, 3, 8}), at::randn({3, 1, 3, 3}), at::ones({3}), at::zeros({3}), 1, 1, 1e-5);
  } catch (const c10::Error& e) {
    rejected = std::string(e.what()).find("x must be a 4-D tensor") != std::string::npos;
  }
  std::printf("bad input rejected with its message: %s\n", rejected ? "yes" : "no");
  if (!rejected) ++failures;
  std::printf(failures ? "FAILED (%d)\n" : "OK\n", failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
