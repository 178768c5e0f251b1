// The per-channel arithmetic of the CPU depthwise kernels, shared by the dense ops (dw_bn_act.cpp) and
// the grouped ones (grouped.cpp): one zero-padded plane and its register-tiled convolution, and one
// channel of the training-mode forward and backward over n samples addressed by a pointer and a step.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/activation.h"
#include "common/checks.h"

namespace betanas {
namespace cpu {


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
inline at::Tensor like_param(const std::vector<double>& v, const at::Tensor& param) {
  return at::tensor(v, at::TensorOptions().dtype(at::kDouble)).view(param.sizes()).to(param.scalar_type());
}

// f(i) for i < n, split across threads: channels of the NCHW kernels, rows of the NHWC ones.
template <typename F>
void for_each_index(int64_t n, F&& f) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Training mode, one channel.

// One channel of the training-mode forward over n samples: x points at the channel's plane of sample 0
// and x_step is the distance between samples (C * H * W in an NCHW tensor); likewise y and y_step.
// Writes the channel's batch mean and biased variance. n = 0: mean and var 0, nothing written.
template <typename scalar_t, int K, int S, int ACT, typename T>
void train_forward_channel(const DwPlane<T, K, S>& plane, const scalar_t* x, int64_t x_step, scalar_t* y,
                           int64_t y_step, int64_t N, const T* w, T gamma, T beta, double eps, T* mean_out,
                           T* var_out) {
  const int64_t out_plane = plane.Ho * plane.Wo, count = N * out_plane;
  if (N == 0) {
    *mean_out = *var_out = T(0);
    return;
  }
  std::vector<T> xp(plane.Hp * plane.Wp), z(count);
  for (int64_t n = 0; n < N; ++n) {
    plane.pad(x + n * x_step, xp.data());
    plane.conv(xp.data(), w, z.data() + n * out_plane);
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
  const T a = static_cast<T>(gamma / std::sqrt(var + eps));
  const T b = static_cast<T>(beta - mean * a);
  for (int64_t n = 0; n < N; ++n) {
    const T* zn = z.data() + n * out_plane;
    scalar_t* yn = y + n * y_step;
    for (int64_t i = 0; i < out_plane; ++i) yn[i] = static_cast<scalar_t>(act_forward<ACT>(a * zn[i] + b));
  }
  *mean_out = static_cast<T>(mean);
  *var_out = static_cast<T>(var);
}

// One channel of the training-mode backward over n samples, addressed as in train_forward_channel (the
// planes of grad_out and grad_x with the steps of y and x). Accumulates nothing across calls: dw (K*K),
// grad_gamma and grad_beta are written. n = 0: all zero.
template <typename scalar_t, int K, int S, int ACT, typename T>
void train_backward_channel(const DwPlane<T, K, S>& plane, const scalar_t* gy, int64_t y_step, const scalar_t* x,
                            scalar_t* dx, int64_t x_step, int64_t N, const T* wc, T gamma, T beta, T mean, T var,
                            double eps, double* dw_out, double* grad_gamma, double* grad_beta) {
  std::fill(dw_out, dw_out + K * K, 0.0);
  *grad_gamma = *grad_beta = 0.0;
  if (N == 0) return;
  const int64_t in_plane = plane.H * plane.W, out_plane = plane.Ho * plane.Wo, count = N * out_plane;
  // The channel's padded input planes are kept for the weight gradient (at most a few hundred KB).
  const int64_t padded_plane = plane.Hp * plane.Wp;
  std::vector<T> xp(N * padded_plane), dxp(padded_plane), z(count), g(count);
  std::vector<T> dzp(plane.grad_pad_size()), dx_plane(in_plane);
  const auto wf = plane.flipped(wc);
  for (int64_t n = 0; n < N; ++n) {
    plane.pad(x + n * x_step, xp.data() + n * padded_plane);
    plane.conv(xp.data() + n * padded_plane, wc, z.data() + n * out_plane);
  }
  const T invstd = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var) + eps));
  const T a = gamma * invstd, b = beta - mean * a;
  // g = dL/d(BN output); the two sums of batch-norm backward.
  double sum_g = 0.0, sum_g_zc = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t* dy = gy + n * y_step;
    const T* zn = z.data() + n * out_plane;
    T* gn = g.data() + n * out_plane;
    for (int64_t i = 0; i < out_plane; ++i) gn[i] = act_backward<ACT>(a * zn[i] + b, static_cast<T>(dy[i]));
    sum_g += lane_sum<T>(out_plane, [&](int64_t i) { return gn[i]; });
    sum_g_zc += lane_sum<T>(out_plane, [&](int64_t i) { return gn[i] * (zn[i] - mean); });
  }
  *grad_beta = sum_g;
  *grad_gamma = sum_g_zc * invstd;
  // dL/dz = a * (g - mean(g) - xhat * mean(g * xhat)), xhat = (z - mean) * invstd; written over g.
  const T c0 = static_cast<T>(a * sum_g / count);
  const T c1 = static_cast<T>(a * invstd * invstd * sum_g_zc / count);
  for (int64_t i = 0; i < count; ++i) g[i] = a * g[i] - c0 - c1 * (z[i] - mean);
  for (int64_t n = 0; n < N; ++n) {
    plane.backward_plane(g.data() + n * out_plane, xp.data() + n * padded_plane, wc, wf.data(), dzp, dxp, dx_plane,
                         dw_out, dx + n * x_step);
  }
}

}  // namespace cpu
}  // namespace betanas
