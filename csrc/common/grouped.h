// The layout of the grouped ops (betanas::dw_bn_act_grouped_train*, betanas::block_gate_grads): G groups
// of depthwise channels that share H, W and the stride, each with its own number of samples, channels
// and kernel size, checked once here for every backend.
#pragma once
#include <vector>

#include <ATen/ATen.h>

#include "common/checks.h"

namespace betanas {

// Group g: channel c of sample n has its input plane at x_offset + n * x_step + c * H * W and its output
// plane at y_offset + n * y_step + c * Ho * Wo; its weights start at weight_offset (c * k * k further),
// its per-channel parameters and statistics at channel_offset + c.
struct DwGroup {
  int64_t samples, channels, kernel;
  int64_t x_offset, x_step, y_offset, y_step;
  int64_t channel_offset, weight_offset;
};

struct DwGroups {
  std::vector<DwGroup> groups;
  int64_t total_channels = 0, x_numel = 0, y_numel = 0, weight_numel = 0;
};

// Group-major packing: each group's [n_g, C_g, H, W] block follows the previous one.
inline DwGroups packed_groups(const char* op, at::IntArrayRef samples, at::IntArrayRef channels,
                              at::IntArrayRef kernel_sizes, int64_t H, int64_t W, int64_t stride) {
  TORCH_CHECK(samples.size() == channels.size() && channels.size() == kernel_sizes.size(), op,
              ": samples, channels and kernel_sizes must have one entry per group, got ", samples.size(), ", ",
              channels.size(), " and ", kernel_sizes.size());
  TORCH_CHECK(H >= 1 && W >= 1, op, ": height and width must be >= 1, got ", H, " x ", W);
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  DwGroups out;
  for (size_t g = 0; g < samples.size(); ++g) {
    const int64_t n = samples[g], c = channels[g], k = kernel_sizes[g];
    TORCH_CHECK(n >= 0 && c >= 1, op, ": group ", g, " must have samples >= 0 and channels >= 1, got ", n, " and ", c);
    TORCH_CHECK(k == 3 || k == 5 || k == 7, op, ": group ", g, " has kernel size ", k, "; it must be 3, 5 or 7");
    const int64_t Ho = conv_out_size(H, k, stride), Wo = conv_out_size(W, k, stride);
    TORCH_CHECK(n == 0 || n * Ho * Wo > 1, op, ": group ", g, " has ", n, " sample(s) of ", Ho, "x", Wo,
                " outputs; training-mode batch statistics need more than 1 value per channel");
    out.groups.push_back({n, c, k, out.x_numel, c * H * W, out.y_numel, c * Ho * Wo, out.total_channels,
                          out.weight_numel});
    out.x_numel += n * c * H * W;
    out.y_numel += n * c * Ho * Wo;
    out.total_channels += c;
    out.weight_numel += c * k * k;
  }
  return out;
}

inline void check_flat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t numel,
                       bool allow_float32) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.dim() == 1 && t.numel() == numel, op, ": ", name, " must be a flat tensor of ", numel,
              " elements for these groups, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || (allow_float32 && t.scalar_type() == at::kFloat), op, ": ",
              name, " has dtype ", t.scalar_type(), "; it must be x's dtype (", x.scalar_type(), ")",
              allow_float32 ? " or float32" : "");
}

inline void check_x_dtype(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x is on ", x.device(), " but this kernel runs on ",
              device_type);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble || (device_type == c10::kCUDA && dt == at::kHalf),
              op, ": x has unsupported dtype ", dt, "; supported: float32, bfloat16, float64",
              device_type == c10::kCUDA ? ", float16" : " (float16 on CUDA only)");
}

// Checks the arguments of dw_bn_act_grouped_train(_backward) and returns the packed layout.
inline DwGroups check_grouped_args(const char* op, c10::DeviceType device_type, const at::Tensor& x,
                                   const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                   at::IntArrayRef samples, at::IntArrayRef channels, at::IntArrayRef kernel_sizes,
                                   int64_t H, int64_t W, int64_t stride, int64_t act) {
  check_x_dtype(op, x, device_type);
  TORCH_CHECK(act >= 0 && act <= 2, op, ": act must be 0 (none), 1 (relu6) or 2 (silu), got ", act);
  DwGroups groups = packed_groups(op, samples, channels, kernel_sizes, H, W, stride);
  check_flat(op, "x", x, x, groups.x_numel, false);
  check_flat(op, "weight", weight, x, groups.weight_numel, true);
  check_flat(op, "bn_weight", bn_weight, x, groups.total_channels, true);
  check_flat(op, "bn_bias", bn_bias, x, groups.total_channels, true);
  return groups;
}

// The MBConv candidates of one block, as block_gate_grads receives them: per candidate j the expand
// weight [Cmid_j, Cin(, 1, 1)], its BN [Cmid_j] x2, the depthwise weight [Cmid_j, 1, k_j, k_j], its BN,
// the projection weight [Cout, Cmid_j(, 1, 1)] and its BN [Cout] x2.
struct BlockCandidates {
  int64_t N, Cin, H, W, Cout, Ho, Wo;
  std::vector<int64_t> mid, kernel;
};

inline BlockCandidates check_block_gate_args(const char* op, c10::DeviceType device_type, const at::Tensor& x,
                                             const at::Tensor& grad_out, at::TensorList ew, at::TensorList ebw,
                                             at::TensorList ebb, at::TensorList dww, at::TensorList dbw,
                                             at::TensorList dbb, at::TensorList pw, at::TensorList pbw,
                                             at::TensorList pbb, int64_t stride, bool residual, int64_t act) {
  check_x_dtype(op, x, device_type);
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0), op,
              ": grad_out must be [N, Cout, Ho, Wo] with x's N = ", x.size(0), ", got shape ", grad_out.sizes());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out is on ", grad_out.device(), " but x is on ", x.device());
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  TORCH_CHECK(act >= 0 && act <= 2, op, ": act must be 0 (none), 1 (relu6) or 2 (silu), got ", act);
  const size_t K = ew.size();
  const std::vector<std::pair<const char*, size_t>> sizes = {
      {"expand_bn_weight", ebw.size()}, {"expand_bn_bias", ebb.size()}, {"dw_weight", dww.size()},
      {"dw_bn_weight", dbw.size()},     {"dw_bn_bias", dbb.size()},     {"project_weight", pw.size()},
      {"project_bn_weight", pbw.size()}, {"project_bn_bias", pbb.size()}};
  for (const auto& [name, n] : sizes) {
    TORCH_CHECK(n == K, op, ": ", name, " has ", n, " entries but expand_weight has ", K, " (one per candidate)");
  }
  BlockCandidates b{x.size(0), x.size(1), x.size(2), x.size(3), grad_out.size(1), grad_out.size(2), grad_out.size(3),
                    {}, {}};
  auto check_param = [&](const char* name, size_t j, const at::Tensor& t, int64_t numel) {
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, "[", j, "] is on ", t.device(), " but x is on ", x.device());
    TORCH_CHECK(t.numel() == numel, op, ": ", name, "[", j, "] must have ", numel, " elements, got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name, "[", j,
                "] has dtype ", t.scalar_type(), "; it must be x's dtype (", x.scalar_type(), ") or float32");
  };
  for (size_t j = 0; j < K; ++j) {
    const int64_t mid = ebw[j].numel();
    TORCH_CHECK(dww[j].dim() == 4 && dww[j].size(0) == mid && dww[j].size(1) == 1, op, ": dw_weight[", j,
                "] must be [", mid, ", 1, k, k], got shape ", dww[j].sizes());
    const int64_t k = dww[j].size(3);
    TORCH_CHECK((k == 3 || k == 5 || k == 7) && dww[j].size(2) == k, op, ": dw_weight[", j,
                "] must have a 3x3, 5x5 or 7x7 kernel, got shape ", dww[j].sizes());
    TORCH_CHECK(conv_out_size(b.H, k, stride) == b.Ho && conv_out_size(b.W, k, stride) == b.Wo, op,
                ": grad_out has spatial size ", b.Ho, "x", b.Wo, " but candidate ", j, " (k=", k, ", stride ", stride,
                ") outputs ", conv_out_size(b.H, k, stride), "x", conv_out_size(b.W, k, stride));
    check_param("expand_weight", j, ew[j], mid * b.Cin);
    check_param("expand_bn_weight", j, ebw[j], mid);
    check_param("expand_bn_bias", j, ebb[j], mid);
    check_param("dw_weight", j, dww[j], mid * k * k);
    check_param("dw_bn_weight", j, dbw[j], mid);
    check_param("dw_bn_bias", j, dbb[j], mid);
    check_param("project_weight", j, pw[j], b.Cout * mid);
    check_param("project_bn_weight", j, pbw[j], b.Cout);
    check_param("project_bn_bias", j, pbb[j], b.Cout);
    b.mid.push_back(mid);
    b.kernel.push_back(k);
  }
  TORCH_CHECK(!residual || x.sizes() == grad_out.sizes(), op, ": residual=True needs grad_out of x's shape ",
              x.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(K == 0 || (b.N * b.H * b.W > 1 && b.N * b.Ho * b.Wo > 1), op,
              ": training-mode batch statistics need more than 1 value per channel, got x of shape ", x.sizes());
  return b;
}

}  // namespace betanas
