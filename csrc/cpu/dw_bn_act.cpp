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
// channels_last inputs are computed in NCHW and returned in channels_last (the copies are cheap next
// to the convolution on a CPU; the CUDA kernels read both layouts directly).
//
// Where it is slower than ATen: the forward alone on small planes (8x8) with k = 5/7, where most taps
// of a 4x8 register tile fall on zero padding and the per-plane loops are short; ATen's oneDNN kernel
// vectorises across channels in a blocked NHWC layout instead. A channels-vectorised path (16 channels
// per SIMD register, NHWC tiles) for planes narrower than ~16 would fix that, and would also let
// channels_last inputs skip the two layout copies.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/checks.h"
#include "common/dispatch.h"

namespace betanas {
namespace {

// Eight floats as one SIMD value (GCC/Clang vector extensions): the tiles below are written with it so
// that their accumulators are registers whatever the auto-vectoriser decides.
typedef float Float8 __attribute__((vector_size(32)));

inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Elements p[0], p[2], ..., p[14]: one stride-2 row segment.
inline Float8 load8_stride2(const float* p) {
  const Float8 a = load8(p), b = load8(p + 8);
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
}

inline void store8(float* p, Float8 v) { std::memcpy(p, &v, sizeof(v)); }

inline float sum8(Float8 v) {
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

// sum_{i < n} f(i) in eight partial sums of type T (vectorised, no long dependency chain), then double.
// Used per plane, so that the partial sums stay short; the planes of a channel add up in double.
template <typename T, typename F>
double lane_sum(int64_t n, F&& f) {
  T part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += f(i + j);
  }
  double s = 0.0;
  for (; i < n; ++i) s += f(i);
  for (int j = 0; j < 8; ++j) s += part[j];
  return s;
}

// One zero-padded plane of a channel, in the arithmetic type T, and the convolution arithmetic over it.
// K and S are template constants, so that the inner loops run over contiguous rows without bounds checks.
template <typename T, int K, int S>
struct DwPlane {
  static constexpr int P = K / 2;
  int64_t H, W, Ho, Wo, Hp, Wp;

  DwPlane(int64_t H_, int64_t W_)
      : H(H_), W(W_), Ho(conv_out_size(H_, K, S)), Wo(conv_out_size(W_, K, S)), Hp(H_ + 2 * P), Wp(W_ + 2 * P) {}

  template <typename scalar_t>
  void pad(const scalar_t* __restrict x, T* __restrict xp) const {
    std::fill(xp, xp + P * Wp, T(0));
    for (int64_t h = 0; h < H; ++h) {
      T* __restrict row = xp + (h + P) * Wp;
      for (int p = 0; p < P; ++p) row[p] = row[P + W + p] = T(0);
      const scalar_t* __restrict src = x + h * W;
      for (int64_t w = 0; w < W; ++w) row[P + w] = static_cast<T>(src[w]);
    }
    std::fill(xp + (P + H) * Wp, xp + Hp * Wp, T(0));
  }

  // z[oh, ow] = sum_{kh, kw} w[kh, kw] * xp[oh*S + kh, ow*S + kw]. Tiles of 4 output rows x 8 columns
  // accumulate over all K*K taps in registers: four independent vector sums hide the FMA latency even
  // on the 8x8 planes of a network's last stages.
  void conv(const T* __restrict xp, const T* __restrict w, T* __restrict z) const {
    conv_plane<S>(xp, w, z, Ho, Wo, Wp);
  }

  template <int SS>
  static void conv_plane(const T* __restrict xp, const T* __restrict w, T* __restrict z, int64_t Ho_, int64_t Wo_,
                         int64_t Wp_) {
    int64_t oh = 0;
    for (; oh + 4 <= Ho_; oh += 4) conv_band<4, SS>(xp, w, z, oh, Wo_, Wp_);
    for (; oh < Ho_; ++oh) conv_band<1, SS>(xp, w, z, oh, Wo_, Wp_);
  }

  template <int R, int SS>
  static inline void conv_band(const T* __restrict xp, const T* __restrict w, T* __restrict z, int64_t oh0,
                               int64_t Wo_, int64_t Wp_) {
    int64_t ow = 0;
    if constexpr (std::is_same_v<T, float>) {
      for (; ow + 8 <= Wo_; ow += 8) conv_tile8<R, SS>(xp, w, z, oh0, ow, Wo_, Wp_);
    }
    for (; ow < Wo_; ++ow) conv_tile<R, 1, SS>(xp, w, z, oh0, ow, Wo_, Wp_);
  }

  template <int R, int SS>
  static inline void conv_tile8(const float* __restrict xp, const float* __restrict w, float* __restrict z,
                                int64_t oh0, int64_t ow0, int64_t Wo_, int64_t Wp_) {
    Float8 acc[R] = {};
    for (int kh = 0; kh < K; ++kh) {
      for (int kw = 0; kw < K; ++kw) {
        const Float8 wv = Float8{} + w[kh * K + kw];
        for (int r = 0; r < R; ++r) {
          const float* xr = xp + ((oh0 + r) * SS + kh) * Wp_ + ow0 * SS + kw;
          acc[r] += wv * (SS == 1 ? load8(xr) : load8_stride2(xr));
        }
      }
    }
    for (int r = 0; r < R; ++r) store8(z + (oh0 + r) * Wo_ + ow0, acc[r]);
  }

  template <int R, int NB, int SS>
  static inline void conv_tile(const T* __restrict xp, const T* __restrict w, T* __restrict z, int64_t oh0,
                               int64_t ow0, int64_t Wo_, int64_t Wp_) {
    T acc[R][NB] = {};
    for (int kh = 0; kh < K; ++kh) {
      for (int kw = 0; kw < K; ++kw) {
        const T wv = w[kh * K + kw];
        for (int r = 0; r < R; ++r) {
          const T* __restrict xr = xp + ((oh0 + r) * SS + kh) * Wp_ + ow0 * SS + kw;
          for (int j = 0; j < NB; ++j) acc[r][j] += wv * xr[j * SS];
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < NB; ++j) z[(oh0 + r) * Wo_ + ow0 + j] = acc[r][j];
    }
  }

  // dL/dx of the convolution, into dx_plane [H, W]. Stride 1: a correlation of the zero-padded dz
  // (dzp, [Ho + 2P, Wo + 2P], filled by the caller) with the flipped kernel wf, reusing the register-
  // blocked conv. Stride 2: scattered into the padded dxp (zeroed by the caller), then cropped.
  void grad_input(const T* __restrict dz, const T* __restrict dzp, const T* __restrict w, const T* __restrict wf,
                  T* __restrict dxp, T* __restrict dx_plane) const {
    if constexpr (S == 1) {
      conv_plane<1>(dzp, wf, dx_plane, H, W, Wo + 2 * P);
    } else {
      for (int64_t oh = 0; oh < Ho; ++oh) {
        const T* __restrict dzr = dz + oh * Wo;
        for (int kh = 0; kh < K; ++kh) {
          T* __restrict dxr = dxp + (oh * S + kh) * Wp;
          for (int kw = 0; kw < K; ++kw) {
            const T wv = w[kh * K + kw];
            for (int64_t ow = 0; ow < Wo; ++ow) dxr[ow * S + kw] += wv * dzr[ow];
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) std::copy_n(dxp + (h + P) * Wp + P, W, dx_plane + h * W);
    }
  }

  // dL/dw[kh, kw] += sum_{oh, ow} dz[oh, ow] * xp[oh*S + kh, ow*S + kw]. One kernel row at a time, its K
  // taps accumulated side by side (K independent vector sums) over the whole plane, which stays in L1.
  void grad_weight(const T* __restrict dz, const T* __restrict xp, double* __restrict dw) const {
    for (int kh = 0; kh < K; ++kh) {
      T tail[K] = {};
      [[maybe_unused]] Float8 acc[K] = {};
      for (int64_t oh = 0; oh < Ho; ++oh) {
        const T* __restrict dzr = dz + oh * Wo;
        const T* __restrict xr = xp + (oh * S + kh) * Wp;
        int64_t ow = 0;
        if constexpr (std::is_same_v<T, float>) {
          for (; ow + 8 <= Wo; ow += 8) {
            const Float8 d = load8(dzr + ow);
            for (int kw = 0; kw < K; ++kw) {
              acc[kw] += d * (S == 1 ? load8(xr + ow + kw) : load8_stride2(xr + ow * S + kw));
            }
          }
        }
        for (; ow < Wo; ++ow) {
          for (int kw = 0; kw < K; ++kw) tail[kw] += dzr[ow] * xr[ow * S + kw];
        }
      }
      for (int kw = 0; kw < K; ++kw) {
        double sum = tail[kw];
        if constexpr (std::is_same_v<T, float>) sum += sum8(acc[kw]);
        dw[kh * K + kw] += sum;
      }
    }
  }

  // The zero-padded dz plane that grad_input needs for stride 1.
  void pad_grad(const T* __restrict dz, T* __restrict dzp) const {
    const int64_t Wq = Wo + 2 * P;
    std::fill(dzp, dzp + (Ho + 2 * P) * Wq, T(0));
    for (int64_t oh = 0; oh < Ho; ++oh) std::copy_n(dz + oh * Wo, Wo, dzp + (oh + P) * Wq + P);
  }

  int64_t grad_pad_size() const { return S == 1 ? (Ho + 2 * P) * (Wo + 2 * P) : 0; }

  static std::vector<T> flipped(const T* w) {
    std::vector<T> wf(K * K);
    for (int t = 0; t < K * K; ++t) wf[t] = w[K * K - 1 - t];
    return wf;
  }

  // dL/dx of one (n, c) plane from its dz plane, stored in the tensor's dtype; buffers are per task.
  template <typename scalar_t>
  void backward_plane(const T* __restrict dz, const T* __restrict xp, const T* __restrict w, const T* __restrict wf,
                      std::vector<T>& dzp, std::vector<T>& dxp, std::vector<T>& dx_plane, double* __restrict dw,
                      scalar_t* __restrict dx) const {
    if constexpr (S == 1) {
      pad_grad(dz, dzp.data());
    } else {
      std::fill(dxp.begin(), dxp.end(), T(0));
    }
    grad_input(dz, dzp.data(), w, wf, dxp.data(), dx_plane.data());
    grad_weight(dz, xp, dw);
    for (int64_t i = 0; i < H * W; ++i) dx[i] = static_cast<scalar_t>(dx_plane[i]);
  }
};

// A small parameter tensor as a host vector of the arithmetic type T.
template <typename T>
std::vector<T> to_vector(const at::Tensor& t) {
  auto f = t.detach().to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* p = f.template const_data_ptr<T>();
  return std::vector<T>(p, p + f.numel());
}

// The result tensor of a per-channel gradient, in the shape and dtype of the argument it belongs to.
at::Tensor like_param(const std::vector<double>& v, const at::Tensor& param) {
  return at::tensor(v, at::TensorOptions().dtype(at::kDouble)).view(param.sizes()).to(param.scalar_type());
}

// Batch statistics and per-channel sums are kept in float32, or float64 for float64 tensors.
at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename F>
void for_each_channel(int64_t C, F&& f) {
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Training mode.

template <typename scalar_t, int K, int S, int ACT, typename T = at::opmath_type<scalar_t>>
void train_forward_kernel(const at::Tensor& x, const std::vector<T>& w, const std::vector<T>& gamma,
                          const std::vector<T>& beta, double eps, at::Tensor& out, T* mean_out, T* var_out) {
  const int64_t N = x.size(0), C = x.size(1);
  const DwPlane<T, K, S> plane(x.size(2), x.size(3));
  const int64_t in_plane = plane.H * plane.W, out_plane = plane.Ho * plane.Wo, count = N * out_plane;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* yd = out.mutable_data_ptr<scalar_t>();

  for_each_channel(C, [&](int64_t c) {
    std::vector<T> xp(plane.Hp * plane.Wp), z(count);
    for (int64_t n = 0; n < N; ++n) {
      plane.pad(xd + (n * C + c) * in_plane, xp.data());
      plane.conv(xp.data(), w.data() + c * K * K, z.data() + n * out_plane);
    }
    double sum = 0.0, sq = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const T* zn = z.data() + n * out_plane;
      sum += lane_sum<T>(out_plane, [&](int64_t i) { return zn[i]; });
    }
    const double mean = sum / count;
    const T mean_t = static_cast<T>(mean);
    for (int64_t n = 0; n < N; ++n) {  // centred second pass: no cancellation
      const T* zn = z.data() + n * out_plane;
      sq += lane_sum<T>(out_plane, [&](int64_t i) { return (zn[i] - mean_t) * (zn[i] - mean_t); });
    }
    const double var = sq / count;
    const T a = static_cast<T>(gamma[c] / std::sqrt(var + eps));
    const T b = static_cast<T>(beta[c] - mean * a);
    for (int64_t n = 0; n < N; ++n) {
      const T* zn = z.data() + n * out_plane;
      scalar_t* yn = yd + (n * C + c) * out_plane;
      for (int64_t i = 0; i < out_plane; ++i) yn[i] = static_cast<scalar_t>(act_forward<ACT>(a * zn[i] + b));
    }
    mean_out[c] = static_cast<T>(mean);
    var_out[c] = static_cast<T>(var);
  });
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
  const int64_t in_plane = plane.H * plane.W, out_plane = plane.Ho * plane.Wo, count = N * out_plane;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
  scalar_t* dxd = grad_x.mutable_data_ptr<scalar_t>();

  for_each_channel(C, [&](int64_t c) {
    // The channel's padded input planes are kept for the weight gradient (at most a few hundred KB).
    const int64_t padded_plane = plane.Hp * plane.Wp;
    std::vector<T> xp(N * padded_plane), dxp(padded_plane), z(count), g(count);
    std::vector<T> dzp(plane.grad_pad_size()), dx_plane(in_plane);
    std::vector<double> dw(K * K, 0.0);
    const T* wc = w.data() + c * K * K;
    const auto wf = plane.flipped(wc);
    for (int64_t n = 0; n < N; ++n) {
      plane.pad(xd + (n * C + c) * in_plane, xp.data() + n * padded_plane);
      plane.conv(xp.data() + n * padded_plane, wc, z.data() + n * out_plane);
    }
    const T mean = mean_in[c];
    const T invstd = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var_in[c]) + eps));
    const T a = gamma[c] * invstd, b = beta[c] - mean * a;
    // g = dL/d(BN output); the two sums of batch-norm backward.
    double sum_g = 0.0, sum_g_zc = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* dy = gd + (n * C + c) * out_plane;
      const T* zn = z.data() + n * out_plane;
      T* gn = g.data() + n * out_plane;
      for (int64_t i = 0; i < out_plane; ++i) gn[i] = act_backward<ACT>(a * zn[i] + b, static_cast<T>(dy[i]));
      sum_g += lane_sum<T>(out_plane, [&](int64_t i) { return gn[i]; });
      sum_g_zc += lane_sum<T>(out_plane, [&](int64_t i) { return gn[i] * (zn[i] - mean); });
    }
    grad_beta[c] = sum_g;
    grad_gamma[c] = sum_g_zc * invstd;
    // dL/dz = a * (g - mean(g) - xhat * mean(g * xhat)), xhat = (z - mean) * invstd; written over g.
    const T c0 = static_cast<T>(a * sum_g / count);
    const T c1 = static_cast<T>(a * invstd * invstd * sum_g_zc / count);
    for (int64_t i = 0; i < count; ++i) g[i] = a * g[i] - c0 - c1 * (z[i] - mean);
    for (int64_t n = 0; n < N; ++n) {
      plane.backward_plane(g.data() + n * out_plane, xp.data() + n * padded_plane, wc, wf.data(), dzp, dxp, dx_plane, dw.data(),
                           dxd + (n * C + c) * in_plane);
    }
    std::copy(dw.begin(), dw.end(), grad_w.begin() + c * K * K);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_act_train_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, int64_t stride, int64_t act,
    double eps) {
  const char* op = "betanas::dw_bn_act_train_backward";
  check_dw_args(op, c10::kCPU, x_in, weight,
                {{"bn_weight", bn_weight}, {"bn_bias", bn_bias}, {"mean", mean}, {"var", var}}, stride, act);
  const int64_t K = weight.size(3), C = x_in.size(1);
  check_grad_out(op, grad_out_in, x_in, K, stride);
  const auto layout = layout_of(x_in);
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

  for_each_channel(C, [&](int64_t c) {
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
