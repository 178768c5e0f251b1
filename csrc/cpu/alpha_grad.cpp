// CPU kernel of betanas::alpha_grad: one row (block) per iteration; rows are a few dozen, so serial.
#include <torch/library.h>

#include "common/alpha_grad.h"

namespace betanas {
namespace {

std::tuple<at::Tensor, at::Tensor> alpha_grad_cpu(const at::Tensor& alpha_in, const at::Tensor& remaining_in,
                                                  const at::Tensor& gate_grad_in, const at::Tensor& cost_in,
                                                  double beta) {
  check_alpha_grad_args(c10::kCPU, alpha_in, remaining_in, gate_grad_in, cost_in);
  const auto alpha = alpha_in.contiguous(), remaining = remaining_in.contiguous();
  const auto gate_grad = gate_grad_in.contiguous(), cost = cost_in.contiguous();
  auto p = at::empty_like(alpha), grad_alpha = at::empty_like(alpha);
  const int64_t L = alpha.size(0), M = alpha.size(1);
  for (int64_t l = 0; l < L; ++l) {
    alpha_grad_row(M, alpha.const_data_ptr<float>() + l * M, remaining.const_data_ptr<bool>() + l * M,
                   gate_grad.const_data_ptr<float>() + l * M, cost.const_data_ptr<float>() + l * M,
                   static_cast<float>(beta), p.mutable_data_ptr<float>() + l * M,
                   grad_alpha.mutable_data_ptr<float>() + l * M);
  }
  return {p, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(betanas, CPU, m) { m.impl("alpha_grad", &alpha_grad_cpu); }

}  // namespace betanas
