// CPU kernels of the grouped ops: the depthwise stages of many groups in one parallel loop over all their
// channels (dw_bn_act_grouped_train and its backward), and block_gate_grads, which evaluates every MBConv
// candidate of a choice block on the same input and reduces each output against dL/dO at once.
//
// block_gate_grads runs the candidates one after the other, channels_last: in chunks of samples, one GEMM
// expands x, its batch norm and activation are applied in place (the statistics come from x's covariance,
// never from a pass over the expanded activations) and the depthwise stage writes its output rows with
// their moments; then in chunks of rows, that output's batch norm and activation, one GEMM projects it,
// and a fused pass reduces BN(z) . dL/dO without writing BN(z). Each chunk's activations are read back while
// in cache. No autograd graph is built; one candidate's activations exist at a time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/grouped.h"
#include "cpu/dw_kernels.h"
#include "cpu/dw_nhwc.h"

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

// The batch statistics of the expand stage h = W x of every candidate, without computing h: per output
// channel c, mean(h_c) = w_c . mean(x) and var(h_c) = w_c^T Cov(x) w_c, with Cov(x) the Cin x Cin
// covariance of x over the batch and the plane (per sample in x's stats dtype, summed in double). x3 is x as
// [N, H * W, Cin] (NHWC). Returns, per candidate, the folded batch norm: a and b per channel, act(a * h + b)
// being the expand stage's output, in T.
template <typename T>
std::vector<std::pair<std::vector<T>, std::vector<T>>> expand_bn_folded(const at::Tensor& x3,
                                                                        at::TensorList expand_weight,
                                                                        at::TensorList expand_bn_weight,
                                                                        at::TensorList expand_bn_bias, double eps) {
  const int64_t Cin = x3.size(2);
  const at::Tensor xs = x3.to(stats_dtype(x3));
  const at::Tensor mean = xs.mean(at::IntArrayRef{0, 1}, /*keepdim=*/true);
  const at::Tensor xc = xs - mean;
  const at::Tensor cov = at::bmm(xc.transpose(1, 2), xc).sum(0, /*keepdim=*/false, at::kDouble) /
                         static_cast<double>(x3.size(0) * x3.size(1));
  const at::Tensor mu = mean.reshape({Cin, 1}).to(at::kDouble);
  std::vector<std::pair<std::vector<T>, std::vector<T>>> folded;
  for (size_t j = 0; j < expand_weight.size(); ++j) {
    const at::Tensor w = expand_weight[j].reshape({-1, Cin}).to(at::kDouble);
    const at::Tensor mean_h = at::mm(w, mu).reshape({-1});
    const at::Tensor var_h = (at::mm(w, cov) * w).sum(1).clamp_min(0.0);
    const at::Tensor a = expand_bn_weight[j].to(at::kDouble) * at::rsqrt(var_h + eps);
    const at::Tensor b = expand_bn_bias[j].to(at::kDouble) - mean_h * a;
    folded.emplace_back(to_vector<T>(a), to_vector<T>(b));
  }
  return folded;
}

// Bytes of activations that one chunk of a candidate's pipeline holds at once: small enough to stay in the
// last-level cache between the GEMM that writes them and the pass that reads them, large enough that a
// GEMM call's fixed cost is small.
constexpr int64_t kChunkBytes = int64_t(2) << 20;

// Running sums of BN(z) . g per output channel over parts of the rows of z and g (both [rows, C]): the
// count, mean(z), M2 = sum (z - mean)^2, the cross term sum (z - mean) g and sum g, in double. Parts merge with
// Chan et al.'s pairwise update (merge_moments), the cross term moved to the new mean first.
struct GateMoments {
  explicit GateMoments(int64_t C) : mean(C, 0.0), m2(C, 0.0), cross(C, 0.0), sum_g(C, 0.0) {}
  double n = 0.0;
  std::vector<double> mean, m2, cross, sum_g;

  template <typename U>
  void merge(double n_b, const U* mean_b, const U* m2_b, const U* cross_b, const U* sum_g_b) {
    if (n_b == 0.0) return;
    const double total = n + n_b;
    for (size_t c = 0; c < mean.size(); ++c) {
      const double new_mean = mean[c] + (static_cast<double>(mean_b[c]) - mean[c]) * n_b / total;
      cross[c] += static_cast<double>(cross_b[c]) + (mean[c] - new_mean) * sum_g[c] +
                  (static_cast<double>(mean_b[c]) - new_mean) * static_cast<double>(sum_g_b[c]);
      sum_g[c] += static_cast<double>(sum_g_b[c]);
    }
    n = merge_moments(mean.data(), m2.data(), n, mean_b, m2_b, n_b, static_cast<int64_t>(mean.size()));
  }

  void merge(const GateMoments& o) { merge(o.n, o.mean.data(), o.m2.data(), o.cross.data(), o.sum_g.data()); }

  // sum over rows and channels of BN(z) * g, with the batch statistics of z: per channel
  // gamma / sqrt(var + eps) * sum (z - mean) g + beta * sum g.
  double bn_dot(const std::vector<double>& gamma, const std::vector<double>& beta, double eps) const {
    double total = 0.0;
    for (size_t c = 0; c < mean.size(); ++c) {
      total += gamma[c] / std::sqrt(m2[c] / n + eps) * cross[c] + beta[c] * sum_g[c];
    }
    return total;
  }
};

// Rows [begin, end) of z [*, C] and g [*, C] as one part: its mean first (the rows are in cache), then the
// centred sums in T; merged into `into`.
template <typename scalar_t, typename T>
void gate_moments_part(const scalar_t* z, const T* g, int64_t begin, int64_t end, int64_t C, GateMoments& into) {
  std::vector<T> mean(C, T(0)), m2(C, T(0)), cross(C, T(0)), sum_g(C, T(0));
  T* __restrict mp = mean.data();
  T* __restrict m2p = m2.data();
  T* __restrict cp = cross.data();
  T* __restrict gp = sum_g.data();
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* __restrict zr = z + r * C;
    for (int64_t c = 0; c < C; ++c) mp[c] += static_cast<T>(zr[c]);
  }
  const T inv = T(1) / static_cast<T>(end - begin);
  for (int64_t c = 0; c < C; ++c) mp[c] *= inv;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* __restrict zr = z + r * C;
    const T* __restrict gr = g + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const T d = static_cast<T>(zr[c]) - mp[c];
      m2p[c] += d * d;
      cp[c] += d * gr[c];
      gp[c] += gr[c];
    }
  }
  into.merge(static_cast<double>(end - begin), mp, m2p, cp, gp);
}

// dL/dg of one MBConv candidate, everything channels_last: x2 is x as [N * H * W, Cin] (x's dtype), g2 dL/dO as
// [N * Ho * Wo, Cout] in T. Two pipelines over chunks of kChunkBytes:
// 1. per chunk of samples: h = x W_e^T (one GEMM), act(BN(h)) in place with the statistics of
//    expand_bn_folded, then the depthwise convolution's output rows and their moments;
// 2. per chunk of rows, with the depthwise stage's batch statistics now known: act(BN(.)) in place, the
//    projection (one GEMM) and its moments against dL/dO, merged into the batch's BN(z) . dL/dO.
template <typename scalar_t, int K, int S, int ACT, typename T = at::opmath_type<scalar_t>>
double candidate_gate_grad(const at::Tensor& x2, const at::Tensor& g2, const BlockCandidates& b,
                           const at::Tensor& expand_weight, const std::vector<T>& expand_a,
                           const std::vector<T>& expand_b, const at::Tensor& dw_weight, const at::Tensor& dw_bn_weight,
                           const at::Tensor& dw_bn_bias, const at::Tensor& project_weight,
                           const at::Tensor& project_bn_weight, const at::Tensor& project_bn_bias, double eps) {
  const int64_t mid = expand_a.size(), HW = b.H * b.W, HoWo = b.Ho * b.Wo, rows = b.N * HoWo;
  const auto t_options = x2.options().dtype(c10::CppTypeToScalarType<T>::value);
  constexpr bool in_place = std::is_same_v<scalar_t, T>;
  const at::Tensor we_t = expand_weight.reshape({mid, b.Cin}).to(x2.scalar_type()).t();
  const at::Tensor wp_t = project_weight.reshape({b.Cout, mid}).to(x2.scalar_type()).t();
  const auto w_t = to_vector<T>(dw_weight.reshape({mid, K * K}).t());

  // 1. expand, its BN and activation, depthwise convolution: z [rows, mid] in T, and its moments.
  at::Tensor z = at::empty({rows, mid}, t_options);
  T* const zd = z.mutable_data_ptr<T>();
  ThreadSums moments(2 * mid + 1);
  const int64_t samples = std::clamp<int64_t>(kChunkBytes / (HW * mid * int64_t(sizeof(T))), 1, b.N);
  for (int64_t n0 = 0; n0 < b.N; n0 += samples) {
    const int64_t nc = std::min(samples, b.N - n0);
    at::Tensor h = at::mm(x2.narrow(0, n0 * HW, nc * HW), we_t);
    at::Tensor h_t = in_place ? h : at::empty({nc * HW, mid}, t_options);
    nhwc_affine_act<ACT>(h.const_data_ptr<scalar_t>(), h_t.mutable_data_ptr<T>(), nc * HW, mid, expand_a.data(),
                         expand_b.data());
    const NhwcShape shape{nc, b.H, b.W, mid, b.Ho, b.Wo};
    nhwc_conv_moments<T, K, S>(h_t.const_data_ptr<T>(), w_t.data(), zd + n0 * HoWo * mid, shape, moments);
  }
  std::vector<double> mean, var;
  total_moments(moments, mid, mean, var);
  std::vector<T> a, bias;
  fold_batch_norm(mean, var, to_vector<double>(dw_bn_weight).data(), to_vector<double>(dw_bn_bias).data(), eps, a,
                  bias);

  // 2. the depthwise stage's BN and activation, projection, and BN(projection) . dL/dO.
  const T* const gd = g2.const_data_ptr<T>();
  const int64_t chunk_rows = std::clamp<int64_t>(kChunkBytes / (mid * int64_t(sizeof(T))), 1, rows);
  std::vector<GateMoments> parts(at::get_num_threads(), GateMoments(b.Cout));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t rc = std::min(chunk_rows, rows - r0);
    at::Tensor y = in_place ? z.narrow(0, r0, rc) : at::empty({rc, mid}, x2.options());
    nhwc_affine_act<ACT>(zd + r0 * mid, y.mutable_data_ptr<scalar_t>(), rc, mid, a.data(), bias.data());
    const at::Tensor out = at::mm(y, wp_t);  // [rc, Cout]
    const scalar_t* od = out.const_data_ptr<scalar_t>();
    at::parallel_for(0, rc, 256, [&](int64_t begin, int64_t end) {
      gate_moments_part(od, gd + r0 * b.Cout, begin, end, b.Cout, parts[at::get_thread_num()]);
    });
  }
  GateMoments total(b.Cout);
  for (const auto& part : parts) total.merge(part);
  return total.bn_dot(to_vector<double>(project_bn_weight), to_vector<double>(project_bn_bias), eps);
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
  const auto stats_type = stats_dtype(x_in);
  const size_t K = b.mid.size();
  at::Tensor result = at::zeros({static_cast<int64_t>(K) + 1}, x_in.options().dtype(at::kFloat));
  const double identity =
      same_shape ? at::sum(x_in.to(stats_type) * grad_out_in.to(stats_type), at::kDouble).item<double>() : 0.0;
  result[K] = identity;
  if (K == 0) return result;

  // Channels_last throughout: x as [N * H * W, Cin] rows, so that each GEMM is one call over the whole batch
  // (a view, not a copy, when x is channels_last already), and the depthwise stage's inner loops run over
  // contiguous channels.
  const at::Tensor x2 = x_in.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, b.Cin});
  const at::Tensor g2 = grad_out_in.to(stats_type)
                            .contiguous(at::MemoryFormat::ChannelsLast)
                            .permute({0, 2, 3, 1})
                            .reshape({-1, b.Cout});
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x_in.scalar_type(), "block_gate_grads_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto expand_bn =
        expand_bn_folded<T>(x2.view({b.N, b.H * b.W, b.Cin}), expand_weight, expand_bn_weight, expand_bn_bias, eps);
    auto res = result.accessor<float, 1>();
    // One candidate at a time: its activations are the only large buffer alive.
    for (size_t j = 0; j < K; ++j) {
      dispatch_kernel_stride(b.kernel[j], stride, [&](auto k, auto s) {
        dispatch_act(act, [&](auto a) {
          const double v = candidate_gate_grad<scalar_t, decltype(k)::value, decltype(s)::value, decltype(a)::value>(
              x2, g2, b, expand_weight[j], expand_bn[j].first, expand_bn[j].second, dw_weight[j], dw_bn_weight[j],
              dw_bn_bias[j], project_weight[j], project_bn_weight[j], project_bn_bias[j], eps);
          res[j] = static_cast<float>(v + (residual ? identity : 0.0));
        });
      });
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
