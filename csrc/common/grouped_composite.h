// The grouped ops written as compositions of ATen calls and the dense betanas::dw_bn_act_train(_backward),
// called through the dispatcher, so they run on any device that has the dense kernels. The CUDA build
// registers them (csrc/cuda/grouped.cu); the ctest suite runs them on the CPU against the CPU kernels
// (csrc/test/test_dw_bn_act.cpp), which is how their logic is checked on a machine without a GPU.
// Unlike the CPU kernels, they launch the depthwise kernel once per group.
#pragma once
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "common/grouped.h"

namespace betanas {
namespace composite {

using Train3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grad4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline Train3 dense_train(const at::Tensor& x, const at::Tensor& w, const at::Tensor& g, const at::Tensor& b,
                          int64_t stride, int64_t act, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("betanas::dw_bn_act_train", "")
                             .typed<Train3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           int64_t, int64_t, double)>();
  return op.call(x, w, g, b, stride, act, eps);
}

inline Grad4 dense_train_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& g,
                                  const at::Tensor& b, const at::Tensor& mean, const at::Tensor& var, int64_t stride,
                                  int64_t act, double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("betanas::dw_bn_act_train_backward", "")
          .typed<Grad4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, int64_t, int64_t, double)>();
  return op.call(gy, x, w, g, b, mean, var, stride, act, eps);
}

inline Train3 grouped_train(const char* op, c10::DeviceType device, const at::Tensor& x_in, const at::Tensor& weight,
                            const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::IntArrayRef samples,
                            at::IntArrayRef channels, at::IntArrayRef kernel_sizes, int64_t H, int64_t W,
                            int64_t stride, int64_t act, double eps) {
  const DwGroups groups = check_grouped_args(op, device, x_in, weight, bn_weight, bn_bias, samples, channels,
                                             kernel_sizes, H, W, stride, act);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({groups.y_numel}, x.options());
  at::Tensor mean = at::zeros({groups.total_channels}, x.options().dtype(stats_dtype(x)));
  at::Tensor var = at::zeros({groups.total_channels}, x.options().dtype(stats_dtype(x)));
  for (const DwGroup& g : groups.groups) {
    if (g.samples == 0) continue;
    const int64_t C = g.channels, k = g.kernel;
    auto [o, m, v] = dense_train(x.narrow(0, g.x_offset, g.samples * g.x_step).view({g.samples, C, H, W}),
                                 weight.narrow(0, g.weight_offset, C * k * k).view({C, 1, k, k}),
                                 bn_weight.narrow(0, g.channel_offset, C), bn_bias.narrow(0, g.channel_offset, C),
                                 stride, act, eps);
    out.narrow(0, g.y_offset, g.samples * g.y_step).copy_(o.reshape(-1));
    mean.narrow(0, g.channel_offset, C).copy_(m);
    var.narrow(0, g.channel_offset, C).copy_(v);
  }
  return {out, mean, var};
}

inline Grad4 grouped_train_backward(const char* op, c10::DeviceType device, const at::Tensor& grad_out_in,
                                    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight,
                                    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
                                    at::IntArrayRef samples, at::IntArrayRef channels, at::IntArrayRef kernel_sizes,
                                    int64_t H, int64_t W, int64_t stride, int64_t act, double eps) {
  const DwGroups groups = check_grouped_args(op, device, x_in, weight, bn_weight, bn_bias, samples, channels,
                                             kernel_sizes, H, W, stride, act);
  check_flat(op, "grad_out", grad_out_in, x_in, groups.y_numel, true);
  check_flat(op, "mean", mean, x_in, groups.total_channels, true);
  check_flat(op, "var", var, x_in, groups.total_channels, true);
  const at::Tensor x = x_in.contiguous(), gy = grad_out_in.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::zeros_like(x), grad_w = at::zeros_like(weight);
  at::Tensor grad_g = at::zeros_like(bn_weight), grad_b = at::zeros_like(bn_bias);
  for (const DwGroup& g : groups.groups) {
    if (g.samples == 0) continue;
    const int64_t C = g.channels, k = g.kernel;
    auto [dx, dw, dg, db] = dense_train_backward(
        gy.narrow(0, g.y_offset, g.samples * g.y_step)
            .view({g.samples, C, conv_out_size(H, k, stride), conv_out_size(W, k, stride)}),
        x.narrow(0, g.x_offset, g.samples * g.x_step).view({g.samples, C, H, W}),
        weight.narrow(0, g.weight_offset, C * k * k).view({C, 1, k, k}), bn_weight.narrow(0, g.channel_offset, C),
        bn_bias.narrow(0, g.channel_offset, C), mean.narrow(0, g.channel_offset, C),
        var.narrow(0, g.channel_offset, C), stride, act, eps);
    grad_x.narrow(0, g.x_offset, g.samples * g.x_step).copy_(dx.reshape(-1));
    grad_w.narrow(0, g.weight_offset, C * k * k).copy_(dw.reshape(-1));
    grad_g.narrow(0, g.channel_offset, C).copy_(dg);
    grad_b.narrow(0, g.channel_offset, C).copy_(db);
  }
  return {grad_x, grad_w, grad_g, grad_b};
}

// Batch norm with batch statistics over dims (0, 2) of t [N, C, S], computed in the statistics dtype.
inline at::Tensor bn_batch(const at::Tensor& t, const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  const at::Tensor z = t.to(stats_dtype(t));
  auto [var, mean] = at::var_mean(z, {0, 2}, /*correction=*/0, /*keepdim=*/true);
  return (z - mean) * at::rsqrt(var + eps) * gamma.to(z.scalar_type()).view({1, -1, 1}) +
         beta.to(z.scalar_type()).view({1, -1, 1});
}

inline at::Tensor activation(const at::Tensor& t, int64_t act) {
  return act == 1 ? at::clamp(t, 0, 6) : act == 2 ? at::silu(t) : t;
}

inline at::Tensor block_gate_grads(const char* op, c10::DeviceType device, const at::Tensor& x_in,
                                   const at::Tensor& grad_out_in, at::TensorList ew, at::TensorList ebw,
                                   at::TensorList ebb, at::TensorList dww, at::TensorList dbw, at::TensorList dbb,
                                   at::TensorList pw, at::TensorList pbw, at::TensorList pbb, int64_t stride,
                                   bool residual, int64_t act, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const BlockCandidates b =
      check_block_gate_args(op, device, x_in, grad_out_in, ew, ebw, ebb, dww, dbw, dbb, pw, pbw, pbb, stride, act);
  const bool same_shape = x_in.sizes() == grad_out_in.sizes();
  TORCH_CHECK(!residual || same_shape, op, ": residual=True needs grad_out of x's shape ", x_in.sizes(), ", got ",
              grad_out_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_out_in.to(stats_dtype(x)).contiguous().view({b.N, b.Cout, b.Ho * b.Wo});
  const size_t K = b.mid.size();
  std::vector<at::Tensor> values;
  const at::Tensor identity =
      same_shape ? at::sum(x.to(stats_dtype(x)).view_as(g) * g) : at::zeros({}, g.options());
  if (K > 0) {
    std::vector<at::Tensor> w_e;
    for (size_t j = 0; j < K; ++j) w_e.push_back(ew[j].reshape({b.mid[j], b.Cin}));
    const at::Tensor h_all = at::matmul(at::cat(w_e).to(x.scalar_type()), x.view({b.N, b.Cin, b.H * b.W}));
    int64_t c0 = 0;
    for (size_t j = 0; j < K; ++j) {
      const at::Tensor h = activation(bn_batch(h_all.narrow(1, c0, b.mid[j]), ebw[j], ebb[j], eps), act)
                               .to(x.scalar_type())
                               .view({b.N, b.mid[j], b.H, b.W});
      c0 += b.mid[j];
      const at::Tensor y = std::get<0>(dense_train(h, dww[j], dbw[j], dbb[j], stride, act, eps));
      const at::Tensor z = at::matmul(pw[j].reshape({b.Cout, b.mid[j]}).to(x.scalar_type()),
                                      y.reshape({b.N, b.mid[j], b.Ho * b.Wo}));
      at::Tensor v = at::sum(bn_batch(z, pbw[j], pbb[j], eps) * g);
      values.push_back(residual ? v + identity : v);
    }
  }
  values.push_back(identity);
  return at::stack(values).to(at::kFloat);
}

}  // namespace composite
}  // namespace betanas
