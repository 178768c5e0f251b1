// CPU kernels of the grouped ops: the depthwise stages of many groups in one parallel loop over all their
// channels (dw_bn_act_grouped_train and its backward), and block_gate_grads, which evaluates every MBConv
// candidate of a choice block on the same input and reduces each output against dL/dO at once.
//
// block_gate_grads runs the candidates one after the other, each in three passes over memory: a batched
// GEMM expands x; the depthwise stage reads the expanded activations with their batch norm and activation
// applied on the fly (the statistics come from x's covariance, never from a pass over the expanded
// activations) and writes its output; a batched GEMM projects it, and a fused pass reduces BN(z) . dL/dO
// without writing BN(z). No autograd graph is built; one candidate's activations exist at a time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/grouped.h"
#include "cpu/dw_kernels.h"

namespace betanas {
namespace {

using namespace cpu;

// The group of every channel, for one parallel loop over the channels of all groups.
std::vector<int32_t> group_of_channel(const DwGroups& groups) {
  std::vector<int32_t> owner(groups.total_channels);
  for (size_t g = 0; g < groups.groups.size(); ++g) {
    const auto& grp = groups.groups[g];
    std::fill_n(owner.begin() + grp.channel_offset, grp.channels, static_cast<int32_t>(g));
  }
  return owner;
}

// f(group, channel within the group, channel overall, k, s, act) for every channel of every group, in one
// parallel loop; k, s and act are integral constants (template values inside f).
template <typename F>
void for_each_group_channel(const DwGroups& groups, int64_t stride, int64_t act, F&& f) {
  const auto owner = group_of_channel(groups);
  for_each_index(groups.total_channels, [&](int64_t ch) {
    const DwGroup& g = groups.groups[owner[ch]];
    dispatch_kernel_stride(g.kernel, stride, [&](auto k, auto s) {
      dispatch_act(act, [&](auto a) { f(g, ch - g.channel_offset, ch, k, s, a); });
    });
  });
}

template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
void grouped_forward(const DwGroups& groups, const scalar_t* x, scalar_t* y, int64_t H, int64_t W, int64_t stride,
                     int64_t act, double eps, const std::vector<T>& w, const std::vector<T>& gamma,
                     const std::vector<T>& beta, T* mean, T* var) {
  for_each_group_channel(groups, stride, act, [&](const DwGroup& g, int64_t c, int64_t ch, auto k, auto s, auto a) {
    constexpr int K = decltype(k)::value, S = decltype(s)::value;
    const DwPlane<T, K, S> plane(H, W);
    train_forward_channel<scalar_t, K, S, decltype(a)::value>(
        plane, x + g.x_offset + c * H * W, g.x_step, y + g.y_offset + c * plane.Ho * plane.Wo, g.y_step, g.samples,
        w.data() + g.weight_offset + c * K * K, gamma[ch], beta[ch], eps, mean + ch, var + ch);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_bn_act_grouped_train_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    at::IntArrayRef samples, at::IntArrayRef channels, at::IntArrayRef kernel_sizes, int64_t H, int64_t W,
    int64_t stride, int64_t act, double eps) {
  const DwGroups groups = check_grouped_args("betanas::dw_bn_act_grouped_train", c10::kCPU, x_in, weight, bn_weight,
                                             bn_bias, samples, channels, kernel_sizes, H, W, stride, act);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({groups.y_numel}, x.options());
  at::Tensor mean = at::empty({groups.total_channels}, x.options().dtype(stats_dtype(x)));
  at::Tensor var = at::empty({groups.total_channels}, x.options().dtype(stats_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_bn_act_grouped_train_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    grouped_forward<scalar_t>(groups, x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), H, W, stride,
                              act, eps, to_vector<T>(weight), to_vector<T>(bn_weight), to_vector<T>(bn_bias),
                              mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>());
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_act_grouped_train_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef samples,
    at::IntArrayRef channels, at::IntArrayRef kernel_sizes, int64_t H, int64_t W, int64_t stride, int64_t act,
    double eps) {
  const char* op = "betanas::dw_bn_act_grouped_train_backward";
  const DwGroups groups =
      check_grouped_args(op, c10::kCPU, x_in, weight, bn_weight, bn_bias, samples, channels, kernel_sizes, H, W,
                         stride, act);
  check_flat(op, "grad_out", grad_out_in, x_in, groups.y_numel, true);
  check_flat(op, "mean", mean, x_in, groups.total_channels, true);
  check_flat(op, "var", var, x_in, groups.total_channels, true);
  const at::Tensor x = x_in.contiguous(), grad_out = grad_out_in.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  std::vector<double> gw(groups.weight_numel), gg(groups.total_channels), gb(groups.total_channels);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_bn_act_grouped_train_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto w = to_vector<T>(weight), gamma = to_vector<T>(bn_weight), beta = to_vector<T>(bn_bias);
    const auto m = to_vector<T>(mean), v = to_vector<T>(var);
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dxd = grad_x.mutable_data_ptr<scalar_t>();
    for_each_group_channel(groups, stride, act, [&](const DwGroup& g, int64_t c, int64_t ch, auto k, auto s, auto a) {
      constexpr int K = decltype(k)::value, S = decltype(s)::value;
      const DwPlane<T, K, S> plane(H, W);
      train_backward_channel<scalar_t, K, S, decltype(a)::value>(
          plane, gd + g.y_offset + c * plane.Ho * plane.Wo, g.y_step, xd + g.x_offset + c * H * W,
          dxd + g.x_offset + c * H * W, g.x_step, g.samples, w.data() + g.weight_offset + c * K * K, gamma[ch],
          beta[ch], m[ch], v[ch], eps, gw.data() + g.weight_offset + c * K * K, &gg[ch], &gb[ch]);
    });
  });
  return {grad_x, like_param(gw, weight), like_param(gg, bn_weight), like_param(gb, bn_bias)};
}

// ---------------------------------------------------------------------------------------------------------
// block_gate_grads.

// sum over n, c, s of BN(z)[n, c, s] * g[n, c, s] with batch statistics, BN(z) never written:
// per channel gamma / sqrt(var + eps) * sum (z - mean) g + beta * sum g. z [N, C, S]; g in T.
template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
double bn_dot(const at::Tensor& z, const at::Tensor& g, const std::vector<T>& gamma, const std::vector<T>& beta,
              double eps) {
  const int64_t N = z.size(0), C = z.size(1), S = z.size(2), count = N * S;
  const scalar_t* zd = z.const_data_ptr<scalar_t>();
  const T* gd = g.const_data_ptr<T>();
  std::vector<double> per_channel(C);
  for_each_index(C, [&](int64_t c) {
    double sum = 0.0, sq = 0.0, zg = 0.0, sg = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* p = zd + (n * C + c) * S;
      sum += lane_sum<T>(S, [&](int64_t i) { return static_cast<T>(p[i]); });
    }
    const T mean = static_cast<T>(sum / count);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* p = zd + (n * C + c) * S;
      const T* q = gd + (n * C + c) * S;
      sq += lane_sum<T>(S, [&](int64_t i) { return (static_cast<T>(p[i]) - mean) * (static_cast<T>(p[i]) - mean); });
      zg += lane_sum<T>(S, [&](int64_t i) { return (static_cast<T>(p[i]) - mean) * q[i]; });
      sg += lane_sum<T>(S, [&](int64_t i) { return q[i]; });
    }
    per_channel[c] = static_cast<double>(gamma[c]) / std::sqrt(sq / count + eps) * zg + static_cast<double>(beta[c]) * sg;
  });
  double total = 0.0;
  for (double v : per_channel) total += v;
  return total;
}

// The batch statistics of the expand stage h = W x of every candidate, without computing h: per output
// channel c, mean(h_c) = w_c . mean(x) and var(h_c) = w_c^T Cov(x) w_c, with Cov(x) the Cin x Cin
// covariance of x over the batch and the plane (one small GEMM). Returns, per candidate, the folded batch
// norm {a, b} per channel (act(a * h + b) is the expand stage's output), in T.
template <typename T>
std::vector<std::vector<T>> expand_bn_folded(const at::Tensor& x3, at::TensorList expand_weight,
                                             at::TensorList expand_bn_weight, at::TensorList expand_bn_bias,
                                             double eps) {
  const int64_t Cin = x3.size(1);
  const at::Tensor xs = x3.to(stats_dtype(x3));
  const at::Tensor mean = xs.mean({0, 2}, /*keepdim=*/true);
  const at::Tensor xc = xs - mean;
  const at::Tensor cov = at::bmm(xc, xc.transpose(1, 2)).sum(0, /*keepdim=*/false, at::kDouble) /
                         static_cast<double>(x3.size(0) * x3.size(2));
  const at::Tensor mu = mean.reshape({Cin, 1}).to(at::kDouble);
  std::vector<std::vector<T>> folded;
  for (size_t j = 0; j < expand_weight.size(); ++j) {
    const at::Tensor w = expand_weight[j].reshape({-1, Cin}).to(at::kDouble);
    const at::Tensor mean_h = at::mm(w, mu).reshape({-1});
    const at::Tensor var_h = (at::mm(w, cov) * w).sum(1).clamp_min(0.0);
    const at::Tensor a = expand_bn_weight[j].to(at::kDouble) * at::rsqrt(var_h + eps);
    const at::Tensor b = expand_bn_bias[j].to(at::kDouble) - mean_h * a;
    const at::Tensor ab = at::stack({a, b}, 1).to(c10::CppTypeToScalarType<T>::value).contiguous();
    folded.emplace_back(ab.const_data_ptr<T>(), ab.const_data_ptr<T>() + ab.numel());
  }
  return folded;
}

at::Tensor block_gate_grads_cpu(const at::Tensor& x_in, const at::Tensor& grad_out_in, at::TensorList expand_weight,
                                at::TensorList expand_bn_weight, at::TensorList expand_bn_bias, at::TensorList dw_weight,
                                at::TensorList dw_bn_weight, at::TensorList dw_bn_bias, at::TensorList project_weight,
                                at::TensorList project_bn_weight, at::TensorList project_bn_bias, int64_t stride,
                                bool residual, int64_t act, double eps) {
  const char* op = "betanas::block_gate_grads";
  // The GEMMs below must run in x's dtype even when the caller is inside an autocast region.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const BlockCandidates b =
      check_block_gate_args(op, c10::kCPU, x_in, grad_out_in, expand_weight, expand_bn_weight, expand_bn_bias,
                            dw_weight, dw_bn_weight, dw_bn_bias, project_weight, project_bn_weight, project_bn_bias,
                            stride, residual, act);
  const bool same_shape = x_in.sizes() == grad_out_in.sizes();
  const at::Tensor x = x_in.contiguous();
  const auto stats_type = stats_dtype(x);
  const at::Tensor g = grad_out_in.to(stats_type).contiguous();
  const size_t K = b.mid.size();
  at::Tensor result = at::zeros({static_cast<int64_t>(K) + 1}, x.options().dtype(at::kFloat));
  const double identity = same_shape ? at::sum(x.to(stats_type) * g, at::kDouble).item<double>() : 0.0;
  result[K] = identity;
  if (K == 0) return result;

  const at::Tensor x3 = x.view({b.N, b.Cin, b.H * b.W});
  const at::Tensor g3 = g.view({b.N, b.Cout, b.Ho * b.Wo});
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "block_gate_grads_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto expand_bn = expand_bn_folded<T>(x3, expand_weight, expand_bn_weight, expand_bn_bias, eps);
    auto res = result.accessor<float, 1>();
    // One candidate at a time, so that its expanded activations (written by the GEMM, read by the depthwise
    // stage) and its depthwise output (read by the projection) are as fresh in the cache as they can be.
    for (size_t j = 0; j < K; ++j) {
      const int64_t mid = b.mid[j], k = b.kernel[j];
      // Expand: h = W_e x per sample (one batched GEMM, the weight shared); its batch norm and activation are
      // applied as the depthwise stage reads it, with the statistics from expand_bn_folded.
      const at::Tensor we = expand_weight[j].reshape({mid, b.Cin}).to(x.scalar_type());
      const at::Tensor h = at::bmm(we.expand({b.N, mid, b.Cin}), x3);
      at::Tensor y = at::empty({b.N, mid, b.Ho * b.Wo}, x.options());
      const auto w = to_vector<T>(dw_weight[j]), gamma = to_vector<T>(dw_bn_weight[j]), beta = to_vector<T>(dw_bn_bias[j]);
      const scalar_t* hd = h.const_data_ptr<scalar_t>();
      scalar_t* yd = y.mutable_data_ptr<scalar_t>();
      for_each_index(mid, [&](int64_t c) {
        dispatch_kernel_stride(k, stride, [&](auto kk, auto ss) {
          constexpr int KK = decltype(kk)::value, SS = decltype(ss)::value;
          const DwPlane<T, KK, SS> plane(b.H, b.W);
          dispatch_act(act, [&](auto a) {
            T mean, var;
            train_forward_channel<scalar_t, KK, SS, decltype(a)::value>(
                plane, hd + c * b.H * b.W, mid * b.H * b.W, yd + c * b.Ho * b.Wo, mid * b.Ho * b.Wo, b.N,
                w.data() + c * KK * KK, gamma[c], beta[c], eps, &mean, &var, expand_bn[j].data() + 2 * c);
          });
        });
      });
      // Project (one batched GEMM), then the batch-norm-and-reduce pass against dL/dO.
      const at::Tensor wp = project_weight[j].reshape({b.Cout, mid}).to(x.scalar_type());
      const at::Tensor z = at::bmm(wp.expand({b.N, b.Cout, mid}), y);
      const double v = bn_dot<scalar_t>(z, g3, to_vector<T>(project_bn_weight[j]), to_vector<T>(project_bn_bias[j]), eps);
      res[j] = static_cast<float>(v + (residual ? identity : 0.0));
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(betanas, CPU, m) {
  m.impl("dw_bn_act_grouped_train", &dw_bn_act_grouped_train_cpu);
  m.impl("dw_bn_act_grouped_train_backward", &dw_bn_act_grouped_train_backward_cpu);
  m.impl("block_gate_grads", &block_gate_grads_cpu);
}

}  // namespace betanas
