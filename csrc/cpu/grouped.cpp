// CPU kernels of the grouped ops: the depthwise stages of many groups in one parallel loop over all their
// channels (dw_bn_act_grouped_train and its backward), and block_gate_grads, which evaluates every MBConv
// candidate of a choice block on the same input and reduces each output against dL/dO at once.
//
// block_gate_grads runs the candidates side by side, stage by stage: one GEMM expands x for all of them
// (their expand weights stacked), one pass normalises and activates every expanded channel, one parallel
// loop runs every depthwise stage (per-channel kernel sizes), and per candidate a GEMM projects and a
// fused pass reduces BN(z) . dL/dO without writing BN(z). At no point does more than the expanded
// activations of all candidates (and one projection) exist; no autograd graph is built.
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
  for_each_channel(groups.total_channels, [&](int64_t ch) {
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

// Batch norm with batch statistics plus activation, in place, for every channel of h [N, C, S].
template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
void bn_act_inplace(at::Tensor& h, const std::vector<T>& gamma, const std::vector<T>& beta, int64_t act, double eps) {
  const int64_t N = h.size(0), C = h.size(1), S = h.size(2), count = N * S;
  scalar_t* hd = h.mutable_data_ptr<scalar_t>();
  for_each_channel(C, [&](int64_t c) {
    double sum = 0.0, sq = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* p = hd + (n * C + c) * S;
      sum += lane_sum<T>(S, [&](int64_t i) { return static_cast<T>(p[i]); });
    }
    const T mean = static_cast<T>(sum / count);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* p = hd + (n * C + c) * S;
      sq += lane_sum<T>(S, [&](int64_t i) { return (static_cast<T>(p[i]) - mean) * (static_cast<T>(p[i]) - mean); });
    }
    const T a = static_cast<T>(gamma[c] / std::sqrt(sq / count + eps));
    const T b = beta[c] - mean * a;
    dispatch_act(act, [&](auto ac) {
      for (int64_t n = 0; n < N; ++n) {
        scalar_t* p = hd + (n * C + c) * S;
        for (int64_t i = 0; i < S; ++i) p[i] = static_cast<scalar_t>(act_forward<decltype(ac)::value>(a * p[i] + b));
      }
    });
  });
}

// sum over n, c, s of BN(z)[n, c, s] * g[n, c, s] with batch statistics, BN(z) never written:
// per channel gamma / sqrt(var + eps) * sum (z - mean) g + beta * sum g. z [N, C, S]; g in T.
template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
double bn_dot(const at::Tensor& z, const at::Tensor& g, const std::vector<T>& gamma, const std::vector<T>& beta,
              double eps) {
  const int64_t N = z.size(0), C = z.size(1), S = z.size(2), count = N * S;
  const scalar_t* zd = z.const_data_ptr<scalar_t>();
  const T* gd = g.const_data_ptr<T>();
  std::vector<double> per_channel(C);
  for_each_channel(C, [&](int64_t c) {
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

// The parameters of all candidates as one host vector of T, in candidate order.
template <typename T>
std::vector<T> cat_vector(at::TensorList ts) {
  std::vector<T> out;
  for (const auto& t : ts) {
    const auto v = to_vector<T>(t);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
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
                            stride, act);
  const bool same_shape = x_in.sizes() == grad_out_in.sizes();
  TORCH_CHECK(!residual || same_shape, op, ": residual=True needs grad_out of x's shape ", x_in.sizes(), ", got ",
              grad_out_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const auto stats_type = stats_dtype(x);
  const at::Tensor g = grad_out_in.to(stats_type).contiguous();
  const size_t K = b.mid.size();
  at::Tensor result = at::zeros({static_cast<int64_t>(K) + 1}, x.options().dtype(at::kFloat));
  const double identity = same_shape ? at::sum(x.to(stats_type) * g, at::kDouble).item<double>() : 0.0;
  result[K] = identity;
  if (K == 0) return result;

  // Expand: every candidate's 1x1 convolution in one GEMM, [sum Cmid, Cin] x [N, Cin, H*W].
  std::vector<at::Tensor> ew;
  for (size_t j = 0; j < K; ++j) ew.push_back(expand_weight[j].reshape({b.mid[j], b.Cin}));
  const at::Tensor w_expand = at::cat(ew).to(x.scalar_type());
  at::Tensor h = at::matmul(w_expand, x.view({b.N, b.Cin, b.H * b.W})).contiguous();
  // The depthwise stages of all candidates in one loop: group j is channels [off_j, off_j + Cmid_j) of the
  // dense [N, sum Cmid, .] tensors.
  DwGroups groups;
  const int64_t total_mid = h.size(1);
  for (size_t j = 0; j < K; ++j) {
    const int64_t c0 = groups.total_channels, k = b.kernel[j];
    groups.groups.push_back({b.N, b.mid[j], k, c0 * b.H * b.W, total_mid * b.H * b.W, c0 * b.Ho * b.Wo,
                             total_mid * b.Ho * b.Wo, c0, groups.weight_numel});
    groups.total_channels += b.mid[j];
    groups.weight_numel += b.mid[j] * k * k;
  }
  at::Tensor y = at::empty({b.N, total_mid, b.Ho * b.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "block_gate_grads_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    bn_act_inplace<scalar_t>(h, cat_vector<T>(expand_bn_weight), cat_vector<T>(expand_bn_bias), act, eps);
    std::vector<T> mean(total_mid), var(total_mid);
    grouped_forward<scalar_t>(groups, h.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), b.H, b.W, stride,
                              act, eps, cat_vector<T>(dw_weight), cat_vector<T>(dw_bn_weight),
                              cat_vector<T>(dw_bn_bias), mean.data(), var.data());
    h = at::Tensor();  // the expanded activations are no longer needed
    const at::Tensor g3 = g.view({b.N, b.Cout, b.Ho * b.Wo});
    auto res = result.accessor<float, 1>();
    for (size_t j = 0; j < K; ++j) {
      const auto& grp = groups.groups[j];
      const at::Tensor wp = project_weight[j].reshape({b.Cout, b.mid[j]}).to(x.scalar_type());
      const at::Tensor z = at::matmul(wp, y.narrow(1, grp.channel_offset, b.mid[j])).contiguous();
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
