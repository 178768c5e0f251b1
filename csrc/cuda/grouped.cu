// CUDA registrations of the grouped ops: the device-generic compositions of csrc/common/grouped_composite.h
// (cuBLAS GEMMs, ATen reductions, and the dense fused depthwise kernel once per group), run on the
// tensors' device. A single-launch ragged depthwise kernel for all groups is future work.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/grouped_composite.h"

namespace betanas {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_bn_act_grouped_train_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    at::IntArrayRef samples, at::IntArrayRef channels, at::IntArrayRef kernel_sizes, int64_t H, int64_t W,
    int64_t stride, int64_t act, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return composite::grouped_train("betanas::dw_bn_act_grouped_train", c10::kCUDA, x, weight, bn_weight, bn_bias,
                                  samples, channels, kernel_sizes, H, W, stride, act, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_act_grouped_train_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef samples,
    at::IntArrayRef channels, at::IntArrayRef kernel_sizes, int64_t H, int64_t W, int64_t stride, int64_t act,
    double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return composite::grouped_train_backward("betanas::dw_bn_act_grouped_train_backward", c10::kCUDA, grad_out, x,
                                           weight, bn_weight, bn_bias, mean, var, samples, channels, kernel_sizes, H,
                                           W, stride, act, eps);
}

at::Tensor block_gate_grads_cuda(const at::Tensor& x, const at::Tensor& grad_out, at::TensorList ew, at::TensorList ebw,
                                 at::TensorList ebb, at::TensorList dww, at::TensorList dbw, at::TensorList dbb,
                                 at::TensorList pw, at::TensorList pbw, at::TensorList pbb, int64_t stride,
                                 bool residual, int64_t act, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return composite::block_gate_grads("betanas::block_gate_grads", c10::kCUDA, x, grad_out, ew, ebw, ebb, dww, dbw,
                                     dbb, pw, pbw, pbb, stride, residual, act, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(betanas, CUDA, m) {
  m.impl("dw_bn_act_grouped_train", &dw_bn_act_grouped_train_cuda);
  m.impl("dw_bn_act_grouped_train_backward", &dw_bn_act_grouped_train_backward_cuda);
  m.impl("block_gate_grads", &block_gate_grads_cuda);
}

}  // namespace betanas
