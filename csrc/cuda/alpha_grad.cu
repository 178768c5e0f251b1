// CUDA kernel of betanas::alpha_grad: one thread per row (block of the supernet). A search has a few
// dozen rows of a handful of paths, so the op is launch-bound; its point is one launch instead of the
// dozen small kernels of the eager composite.
#include <utility>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/alpha_grad.h"

namespace betanas {
namespace {

#ifndef BETANAS_CUDA_EMULATION
// `blocks` blocks of `threads` threads on the current stream, checked.
template <typename... KArgs, typename... Args>
void launch_blocks(void (*kernel)(KArgs...), unsigned blocks, unsigned threads, size_t smem, Args&&... args) {
  kernel<<<blocks, threads, smem, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#else
// A host harness emulates the launch on the CPU (csrc/test/cuda_emulation/alpha_grad_harness.cpp).
using betanas_emu::launch_blocks;
#endif

__global__ void alpha_grad_kernel(int64_t L, int64_t M, const float* __restrict__ alpha,
                                  const bool* __restrict__ remaining, const float* __restrict__ gate_grad,
                                  const float* __restrict__ cost, float beta, float* __restrict__ p,
                                  float* __restrict__ grad_alpha) {
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (l >= L) return;
  alpha_grad_row(M, alpha + l * M, remaining + l * M, gate_grad + l * M, cost + l * M, beta, p + l * M,
                 grad_alpha + l * M);
}

std::tuple<at::Tensor, at::Tensor> alpha_grad_cuda(const at::Tensor& alpha_in, const at::Tensor& remaining_in,
                                                   const at::Tensor& gate_grad_in, const at::Tensor& cost_in,
                                                   double beta) {
  check_alpha_grad_args(c10::kCUDA, alpha_in, remaining_in, gate_grad_in, cost_in);
  const c10::cuda::CUDAGuard guard(alpha_in.device());
  const auto alpha = alpha_in.contiguous(), remaining = remaining_in.contiguous();
  const auto gate_grad = gate_grad_in.contiguous(), cost = cost_in.contiguous();
  auto p = at::empty_like(alpha), grad_alpha = at::empty_like(alpha);
  const int64_t L = alpha.size(0), M = alpha.size(1);
  if (L == 0 || M == 0) return {p, grad_alpha};
  constexpr int threads = 64;
  const auto blocks = static_cast<unsigned>((L + threads - 1) / threads);
  launch_blocks(alpha_grad_kernel, blocks, threads, 0, L, M, alpha.const_data_ptr<float>(),
                remaining.const_data_ptr<bool>(), gate_grad.const_data_ptr<float>(), cost.const_data_ptr<float>(),
                static_cast<float>(beta), p.mutable_data_ptr<float>(), grad_alpha.mutable_data_ptr<float>());
  return {p, grad_alpha};
}

}  // namespace

#ifndef BETANAS_CUDA_EMULATION  // the emulation harness calls the entry point directly
TORCH_LIBRARY_IMPL(betanas, CUDA, m) { m.impl("alpha_grad", &alpha_grad_cuda); }
#endif

}  // namespace betanas
