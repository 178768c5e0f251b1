// The per-row arithmetic of betanas::alpha_grad (dL/dalpha from the binary-gate gradients), shared by the
// CPU and CUDA kernels.
#pragma once
#include <cmath>
#include <utility>

#include <ATen/ATen.h>

#include "common/activation.h"

namespace betanas {

// One block's row: p = softmax(alpha over remaining), grad_alpha_m = p_m (h_m - <h, p>) with
// h = gate_grad + beta * cost, since sum_j h_j p_j (delta_mj - p_m) = p_m h_m - p_m <h, p>.
// The maximum is taken over remaining paths only, so very large or small alphas stay finite.
// A row with no remaining path gets p = 0 and grad_alpha = 0.
BETANAS_HD void alpha_grad_row(int64_t M, const float* alpha, const bool* remaining, const float* gate_grad,
                               const float* cost, float beta, float* p, float* grad_alpha) {
  float max_alpha = -INFINITY;
  for (int64_t m = 0; m < M; ++m) {
    if (remaining[m] && alpha[m] > max_alpha) max_alpha = alpha[m];
  }
  float denom = 0.f;
  for (int64_t m = 0; m < M; ++m) {
    const float e = remaining[m] ? expf(alpha[m] - max_alpha) : 0.f;
    p[m] = e;
    denom += e;
  }
  const float inv = denom > 0.f ? 1.f / denom : 0.f;
  float mean_h = 0.f;
  for (int64_t m = 0; m < M; ++m) {
    p[m] *= inv;
    mean_h += p[m] * (gate_grad[m] + beta * cost[m]);
  }
  for (int64_t m = 0; m < M; ++m) {
    grad_alpha[m] = remaining[m] ? p[m] * (gate_grad[m] + beta * cost[m] - mean_h) : 0.f;
  }
}

inline void check_alpha_grad_args(c10::DeviceType device_type, const at::Tensor& alpha, const at::Tensor& remaining,
                                  const at::Tensor& gate_grad, const at::Tensor& cost) {
  const char* op = "betanas::alpha_grad";
  TORCH_CHECK(alpha.dim() == 2, op, ": alpha must be 2-D [blocks, paths], got shape ", alpha.sizes());
  TORCH_CHECK(alpha.device().type() == device_type, op, ": alpha is on ", alpha.device(),
              " but this kernel runs on ", device_type);
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"remaining", &remaining}, {"gate_grad", &gate_grad}, {"cost", &cost}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == alpha.device(), op, ": ", name, " is on ", t->device(), " but alpha is on ",
                alpha.device());
    TORCH_CHECK(t->sizes() == alpha.sizes(), op, ": ", name, " must have alpha's shape ", alpha.sizes(), ", got ",
                t->sizes());
  }
  TORCH_CHECK(remaining.scalar_type() == at::kBool, op, ": remaining must be a bool mask, got ",
              remaining.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"alpha", &alpha},
                                {"gate_grad", &gate_grad}, {"cost", &cost}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
  }
}

}  // namespace betanas
