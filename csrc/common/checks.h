// Input validation at the C++ entry of every op: one clear message naming the argument at fault.
#pragma once
#include <initializer_list>
#include <utility>

#include <ATen/ATen.h>

#include "common/dispatch.h"

namespace betanas {

// Whether an op treats x as channels_last. The Python fake kernels apply the same rule, so that the
// real and fake outputs have the same strides.
inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Output size of a convolution with padding kernel_size / 2 (ceil(in / stride) for the odd kernels of the ops).
// Python: betanas_fast._rules.conv_out_size.
inline int64_t conv_out_size(int64_t in, int64_t kernel_size, int64_t stride) {
  return (in + 2 * (kernel_size / 2) - kernel_size) / stride + 1;
}

// Batch statistics, per-channel sums and the BatchNorm arithmetic are kept in float32, or float64 for float64
// tensors. Python: betanas_fast._rules.stats_dtype.
inline at::ScalarType stats_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }
inline at::ScalarType stats_dtype(const at::Tensor& x) { return stats_dtype(x.scalar_type()); }

struct NamedTensor {
  const char* name;
  const at::Tensor& t;
};

// Checks the arguments shared by every fused depthwise op:
//   x [N, C, H, W] of a supported dtype on `device_type`; weight [C, 1, k, k] with k in {3, 5, 7},
//   in x's dtype or float32; every per-channel tensor 1-D [C], in x's dtype or float32; all on x's device.
inline void check_dw_args(const char* op, c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& weight,
                          std::initializer_list<NamedTensor> per_channel, int64_t stride, int64_t act) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D tensor [N, C, H, W], got ", x.dim(), "-D with shape ", x.sizes());
  TORCH_CHECK(x.device().type() == device_type, op, ": x is on ", x.device(), " but this kernel runs on ",
              device_type);
  const auto dt = x.scalar_type();
  const bool dtype_ok = dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble ||
                        (device_type == c10::kCUDA && dt == at::kHalf);
  TORCH_CHECK(dtype_ok, op, ": x has unsupported dtype ", dt, "; supported: float32, bfloat16, float64",
              device_type == c10::kCUDA ? ", float16" : " (float16 on CUDA only)");
  const int64_t C = x.size(1);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1 && C >= 1, op, ": x must have C, H, W >= 1, got shape ", x.sizes());

  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be a 4-D depthwise kernel [C, 1, k, k], got shape ",
              weight.sizes());
  const int64_t k = weight.size(3);
  TORCH_CHECK(k == 3 || k == 5 || k == 7, op, ": kernel size (weight.size(-1)) must be 3, 5 or 7, got ", k);
  TORCH_CHECK(weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == k, op,
              ": weight must have shape [C, 1, k, k] = [", C, ", 1, ", k, ", ", k, "] for x with C = ", C,
              " channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dt || weight.scalar_type() == at::kFloat, op, ": weight has dtype ",
              weight.scalar_type(), "; it must be x's dtype (", dt, ") or float32");

  for (const auto& p : per_channel) {
    TORCH_CHECK(p.t.device() == x.device(), op, ": ", p.name, " is on ", p.t.device(), " but x is on ", x.device());
    TORCH_CHECK(p.t.dim() == 1 && p.t.size(0) == C, op, ": ", p.name, " must have shape [C] = [", C, "], got ",
                p.t.sizes());
    TORCH_CHECK(p.t.scalar_type() == dt || p.t.scalar_type() == at::kFloat, op, ": ", p.name, " has dtype ",
                p.t.scalar_type(), "; it must be x's dtype (", dt, ") or float32");
  }
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  TORCH_CHECK(act_switch(act, [](auto) {}), op, ": act must be 0 (none), 1 (relu6) or 2 (silu), got ", act);
}

// A training-mode batch norm needs more than one value per channel, as torch's BatchNorm says.
inline void check_batch_stats_count(const char* op, const at::Tensor& x, int64_t kernel_size, int64_t stride) {
  const int64_t count = x.size(0) * conv_out_size(x.size(2), kernel_size, stride) *
                        conv_out_size(x.size(3), kernel_size, stride);
  TORCH_CHECK(count > 1, op, ": training-mode batch statistics need more than 1 value per channel, got input "
              "shape ", x.sizes());
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, int64_t kernel_size,
                           int64_t stride) {
  const std::vector<int64_t> expected = {x.size(0), x.size(1), conv_out_size(x.size(2), kernel_size, stride),
                                         conv_out_size(x.size(3), kernel_size, stride)};
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out is on ", grad_out.device(), " but x is on ",
              x.device());
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expected), op, ": grad_out must have shape ",
              at::IntArrayRef(expected), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ", grad_out.scalar_type(),
              " but x has ", x.scalar_type());
}

}  // namespace betanas
