// CPU kernels of the fused depthwise stage y = act(BN(depthwise_conv(x))).
//
// Every quantity of a channel (its conv output over the whole batch, its batch statistics, its
// gradients) depends on that channel alone, so the kernels run one channel per task: the channel's
// planes stay in cache from the convolution through the statistics to the activation, and the
// backward pass reduces the weight gradient without atomics. Arithmetic is float32 whatever the
// storage dtype (float64 for float64 tensors, which exist for gradcheck); sums over the batch are double.
// The backward pass recomputes the convolution instead of saving it: only x is kept for backward, and
// the depthwise convolution costs less than writing and re-reading a saved tensor of the same size.
//
// Training mode on channels_last inputs runs the NHWC kernels of dw_nhwc.h (channels in the inner loops,
// no layout copies); evaluation mode computes channels_last inputs in NCHW and returns channels_last.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/checks.h"
#include "common/dispatch.h"

#include "cpu/dw_kernels.h"
#include "cpu/dw_nhwc.h"

namespace betanas {
namespace {

using namespace cpu;

// ---------------------------------------------------------------------------------------------------------
// Training mode.

template <typename scalar_t, int K, int S, int ACT, typename T = at::opmath_type<scalar_t>>
void train_forward_kernel(const at::Tensor& x, const std::vector<T>& w, const std::vector<T>& gamma,
                          const std::vector<T>& beta, double eps, at::Tensor& out, T* mean_out, T* var_out) {
  const int64_t N = x.size(0), C = x.size(1);
  const DwPlane<T, K, S> plane(x.size(2), x.size(3));
  const int64_t in_plane = plane.H * plane.W, out_plane = plane.Ho * plane.Wo;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* yd = out.mutable_data_ptr<scalar_t>();
  for_each_index(C, [&](int64_t c) {
    train_forward_channel<scalar_t, K, S, ACT>(plane, xd + c * in_plane, C * in_plane, yd + c * out_plane,
                                               C * out_plane, N, w.data() + c * K * K, gamma[c], beta[c], eps,
                                               mean_out + c, var_out + c);
  });
}

// channels_last: the NHWC kernels, the weight as w_t [K * K, C].
template <typename T>
std::vector<T> tap_major_weight(const at::Tensor& weight) {
  return to_vector<T>(weight.reshape({weight.size(0), -1}).t());
}

NhwcShape nhwc_shape(const at::Tensor& x, int64_t K, int64_t stride) {
  return {x.size(0), x.size(2), x.size(3), x.size(1), conv_out_size(x.size(2), K, stride),
          conv_out_size(x.size(3), K, stride)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_bn_act_train_nhwc(const at::Tensor& x_in, const at::Tensor& weight,
                                                                     const at::Tensor& bn_weight,
                                                                     const at::Tensor& bn_bias, int64_t stride,
                                                                     int64_t act, double eps) {
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t K = weight.size(3), C = x.size(1);
  const NhwcShape shape = nhwc_shape(x, K, stride);
  at::Tensor out = at::empty({shape.N, C, shape.Ho, shape.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor mean = at::empty({C}, x.options().dtype(stats_dtype(x)));
  at::Tensor var = at::empty({C}, x.options().dtype(stats_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_bn_act_train_nhwc", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto w = tap_major_weight<T>(weight), g = to_vector<T>(bn_weight), b = to_vector<T>(bn_bias);
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      dispatch_act(act, [&](auto a) {
        nhwc_train_forward<scalar_t, decltype(k)::value, decltype(s)::value, decltype(a)::value>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), shape, w.data(), g.data(), b.data(), eps,
            mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>());
      });
    });
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_act_train_backward_nhwc(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, int64_t stride, int64_t act,
    double eps, bool weight_grad) {
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t K = weight.size(3), C = x.size(1);
  const NhwcShape shape = nhwc_shape(x, K, stride);
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  std::vector<double> gw_tap(K * K * C), gg(C), gb(C);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_bn_act_train_backward_nhwc", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto w = tap_major_weight<T>(weight), g = to_vector<T>(bn_weight), b = to_vector<T>(bn_bias);
    const auto m = to_vector<T>(mean), v = to_vector<T>(var);
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      dispatch_act(act, [&](auto a) {
        nhwc_train_backward<scalar_t, decltype(k)::value, decltype(s)::value, decltype(a)::value>(
            grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
            shape, w.data(), g.data(), b.data(), m.data(), v.data(), eps, weight_grad ? gw_tap.data() : nullptr,
            gg.data(), gb.data());
      });
    });
  });
  std::vector<double> gw(C * K * K);  // back to the weight's [C, 1, K, K]
  for (int64_t t = 0; t < K * K; ++t) {
    for (int64_t c = 0; c < C; ++c) gw[c * K * K + t] = gw_tap[t * C + c];
  }
  return {grad_x, like_param(gw, weight), like_param(gg, bn_weight), like_param(gb, bn_bias)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_bn_act_train_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                    const at::Tensor& bn_weight,
                                                                    const at::Tensor& bn_bias, int64_t stride,
                                                                    int64_t act, double eps) {
  const char* op = "betanas::dw_bn_act_train";
  check_dw_args(op, c10::kCPU, x_in, weight, {{"bn_weight", bn_weight}, {"bn_bias", bn_bias}}, stride, act);
  const int64_t K = weight.size(3);
  check_batch_stats_count(op, x_in, K, stride);
  const auto layout = layout_of(x_in);
  if (layout == at::MemoryFormat::ChannelsLast) return dw_bn_act_train_nhwc(x_in, weight, bn_weight, bn_bias, stride, act, eps);
  const at::Tensor x = x_in.contiguous();
  const int64_t C = x.size(1);
  at::Tensor out = at::empty({x.size(0), C, conv_out_size(x.size(2), K, stride), conv_out_size(x.size(3), K, stride)},
                             x.options());
  at::Tensor mean = at::empty({C}, x.options().dtype(stats_dtype(x)));
  at::Tensor var = at::empty({C}, x.options().dtype(stats_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_bn_act_train_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto w = to_vector<T>(weight), g = to_vector<T>(bn_weight), b = to_vector<T>(bn_bias);
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      dispatch_act(act, [&](auto a) {
        train_forward_kernel<scalar_t, decltype(k)::value, decltype(s)::value, decltype(a)::value>(
            x, w, g, b, eps, out, mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>());
      });
    });
  });
  return {out.contiguous(layout), mean, var};
}

template <typename scalar_t, int K, int S, int ACT, typename T = at::opmath_type<scalar_t>>
void train_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const std::vector<T>& w,
                           const std::vector<T>& gamma, const std::vector<T>& beta, const std::vector<T>& mean_in,
                           const std::vector<T>& var_in, double eps, at::Tensor& grad_x, std::vector<double>& grad_w,
                           std::vector<double>& grad_gamma, std::vector<double>& grad_beta) {
  const int64_t N = x.size(0), C = x.size(1);
  const DwPlane<T, K, S> plane(x.size(2), x.size(3));
  const int64_t in_plane = plane.H * plane.W, out_plane = plane.Ho * plane.Wo;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
  scalar_t* dxd = grad_x.mutable_data_ptr<scalar_t>();
  for_each_index(C, [&](int64_t c) {
    train_backward_channel<scalar_t, K, S, ACT>(plane, gd + c * out_plane, C * out_plane, xd + c * in_plane,
                                                dxd + c * in_plane, C * in_plane, N, w.data() + c * K * K, gamma[c],
                                                beta[c], mean_in[c], var_in[c], eps, grad_w.data() + c * K * K,
                                                &grad_gamma[c], &grad_beta[c]);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_act_train_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, int64_t stride, int64_t act,
    double eps, bool weight_grad) {
  const char* op = "betanas::dw_bn_act_train_backward";
  check_dw_args(op, c10::kCPU, x_in, weight,
                {{"bn_weight", bn_weight}, {"bn_bias", bn_bias}, {"mean", mean}, {"var", var}}, stride, act);
  const int64_t K = weight.size(3), C = x_in.size(1);
  check_grad_out(op, grad_out_in, x_in, K, stride);
  const auto layout = layout_of(x_in);
  if (layout == at::MemoryFormat::ChannelsLast) {
    return dw_bn_act_train_backward_nhwc(grad_out_in, x_in, weight, bn_weight, bn_bias, mean, var, stride, act, eps,
                                         weight_grad);
  }
  const at::Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  std::vector<double> gw(C * K * K), gg(C), gb(C);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_bn_act_train_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto w = to_vector<T>(weight), g = to_vector<T>(bn_weight), b = to_vector<T>(bn_bias);
    const auto m = to_vector<T>(mean), v = to_vector<T>(var);
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      dispatch_act(act, [&](auto a) {
        train_backward_kernel<scalar_t, decltype(k)::value, decltype(s)::value, decltype(a)::value>(
            grad_out, x, w, g, b, m, v, eps, grad_x, gw, gg, gb);
      });
    });
  });
  // The NCHW kernels compute dx and the weight gradient in the same pass over each plane: nothing to skip.
  if (!weight_grad) std::fill(gw.begin(), gw.end(), 0.0);
  return {grad_x.contiguous(layout), like_param(gw, weight), like_param(gg, bn_weight), like_param(gb, bn_bias)};
}

// ---------------------------------------------------------------------------------------------------------
// Evaluation mode: y = act(scale * conv(x) + shift).

template <typename scalar_t, int K, int S, int ACT, typename T = at::opmath_type<scalar_t>>
void eval_forward_kernel(const at::Tensor& x, const std::vector<T>& w, const std::vector<T>& scale,
                         const std::vector<T>& shift, at::Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1);
  const DwPlane<T, K, S> plane(x.size(2), x.size(3));
  const int64_t in_plane = plane.H * plane.W, out_plane = plane.Ho * plane.Wo;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* yd = out.mutable_data_ptr<scalar_t>();
  // No reduction across the batch here: one (n, c) plane per task.
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xp(plane.Hp * plane.Wp), z(out_plane);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t c = nc % C;
      plane.pad(xd + nc * in_plane, xp.data());
      plane.conv(xp.data(), w.data() + c * K * K, z.data());
      scalar_t* yn = yd + nc * out_plane;
      const T a = scale[c], b = shift[c];
      for (int64_t i = 0; i < out_plane; ++i) yn[i] = static_cast<scalar_t>(act_forward<ACT>(a * z[i] + b));
    }
  });
}

at::Tensor dw_bn_act_eval_cpu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& shift, int64_t stride, int64_t act) {
  check_dw_args("betanas::dw_bn_act_eval", c10::kCPU, x_in, weight, {{"scale", scale}, {"shift", shift}}, stride,
                act);
  const int64_t K = weight.size(3);
  const auto layout = layout_of(x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(
      {x.size(0), x.size(1), conv_out_size(x.size(2), K, stride), conv_out_size(x.size(3), K, stride)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_bn_act_eval_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto w = to_vector<T>(weight), a = to_vector<T>(scale), b = to_vector<T>(shift);
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      dispatch_act(act, [&](auto ac) {
        eval_forward_kernel<scalar_t, decltype(k)::value, decltype(s)::value, decltype(ac)::value>(x, w, a, b, out);
      });
    });
  });
  return out.contiguous(layout);
}

template <typename scalar_t, int K, int S, int ACT, typename T = at::opmath_type<scalar_t>>
void eval_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const std::vector<T>& w,
                          const std::vector<T>& scale, const std::vector<T>& shift, at::Tensor& grad_x,
                          std::vector<double>& grad_w, std::vector<double>& grad_scale,
                          std::vector<double>& grad_shift) {
  const int64_t N = x.size(0), C = x.size(1);
  const DwPlane<T, K, S> plane(x.size(2), x.size(3));
  const int64_t in_plane = plane.H * plane.W, out_plane = plane.Ho * plane.Wo;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
  scalar_t* dxd = grad_x.mutable_data_ptr<scalar_t>();

  for_each_index(C, [&](int64_t c) {
    std::vector<T> xp(plane.Hp * plane.Wp), dxp(plane.Hp * plane.Wp), z(out_plane), dz_plane(out_plane);
    std::vector<T> dzp(plane.grad_pad_size()), dx_plane(in_plane);
    std::vector<double> dw(K * K, 0.0);
    const T* wc = w.data() + c * K * K;
    const auto wf = plane.flipped(wc);
    const T a = scale[c], b = shift[c];
    double sum_g = 0.0, sum_gz = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t nc = n * C + c;
      plane.pad(xd + nc * in_plane, xp.data());
      plane.conv(xp.data(), wc, z.data());
      const scalar_t* dy = gd + nc * out_plane;
      T* g = dz_plane.data();
      for (int64_t i = 0; i < out_plane; ++i) g[i] = act_backward<ACT>(a * z[i] + b, static_cast<T>(dy[i]));
      sum_g += lane_sum<T>(out_plane, [&](int64_t i) { return g[i]; });
      sum_gz += lane_sum<T>(out_plane, [&](int64_t i) { return g[i] * z[i]; });
      for (int64_t i = 0; i < out_plane; ++i) g[i] *= a;  // dL/dz
      plane.backward_plane(g, xp.data(), wc, wf.data(), dzp, dxp, dx_plane, dw.data(), dxd + nc * in_plane);
    }
    grad_shift[c] = sum_g;
    grad_scale[c] = sum_gz;
    std::copy(dw.begin(), dw.end(), grad_w.begin() + c * K * K);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_act_eval_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, int64_t stride, int64_t act) {
  const char* op = "betanas::dw_bn_act_eval_backward";
  check_dw_args(op, c10::kCPU, x_in, weight, {{"scale", scale}, {"shift", shift}}, stride, act);
  const int64_t K = weight.size(3), C = x_in.size(1);
  check_grad_out(op, grad_out_in, x_in, K, stride);
  const auto layout = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  std::vector<double> gw(C * K * K), gs(C), gb(C);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_bn_act_eval_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto w = to_vector<T>(weight), a = to_vector<T>(scale), b = to_vector<T>(shift);
    dispatch_kernel_stride(K, stride, [&](auto k, auto s) {
      dispatch_act(act, [&](auto ac) {
        eval_backward_kernel<scalar_t, decltype(k)::value, decltype(s)::value, decltype(ac)::value>(
            grad_out, x, w, a, b, grad_x, gw, gs, gb);
      });
    });
  });
  return {grad_x.contiguous(layout), like_param(gw, weight), like_param(gs, scale), like_param(gb, shift)};
}

}  // namespace

TORCH_LIBRARY_IMPL(betanas, CPU, m) {
  m.impl("dw_bn_act_train", &dw_bn_act_train_cpu);
  m.impl("dw_bn_act_train_backward", &dw_bn_act_train_backward_cpu);
  m.impl("dw_bn_act_eval", &dw_bn_act_eval_cpu);
  m.impl("dw_bn_act_eval_backward", &dw_bn_act_eval_backward_cpu);
}

}  // namespace betanas
