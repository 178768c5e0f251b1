// The training-mode CPU kernels of the fused depthwise stage for channels_last (NHWC) tensors: no layout
// copies, and the inner loops run over the channels, which are contiguous, so that they vectorise however
// small the plane is (the NCHW kernels' weak spot is the 8x8 plane, whose rows are shorter than a register
// tile). Work is split over output rows (n, oh); per-channel sums are per thread, then added in double.
// The weights are used as w_t [K * K, C] (tap-major), so that a tap's weights for consecutive channels are
// contiguous too.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "common/activation.h"

namespace betanas {
namespace cpu {

struct NhwcShape {
  int64_t N, H, W, C, Ho, Wo;
};

// Per-thread accumulators of `width` doubles each, for sums over rows split across threads.
class ThreadSums {
 public:
  explicit ThreadSums(int64_t width) : width_(width), sums_(at::get_num_threads() * width, 0.0) {}
  double* mine() { return sums_.data() + at::get_thread_num() * width_; }
  std::vector<double> total() const {
    std::vector<double> out(width_, 0.0);
    for (size_t t = 0; t < sums_.size() / width_; ++t) {
      for (int64_t i = 0; i < width_; ++i) out[i] += sums_[t * width_ + i];
    }
    return out;
  }

 private:
  int64_t width_;
  std::vector<double> sums_;
};

template <typename F>
void for_each_row(int64_t rows, F&& f) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

// z[ow, c] of output row (n, oh), Wo x C, from x in NHWC.
template <typename scalar_t, int K, int S, typename T>
void nhwc_conv_row(const scalar_t* __restrict x, const T* __restrict w_t, T* __restrict z, const NhwcShape& s,
                   int64_t n, int64_t oh) {
  constexpr int P = K / 2;
  const int64_t C = s.C;
  for (int64_t ow = 0; ow < s.Wo; ++ow) {
    T* __restrict acc = z + ow * C;
    std::fill(acc, acc + C, T(0));
    for (int kh = 0; kh < K; ++kh) {
      const int64_t ih = oh * S - P + kh;
      if (ih < 0 || ih >= s.H) continue;
      for (int kw = 0; kw < K; ++kw) {
        const int64_t iw = ow * S - P + kw;
        if (iw < 0 || iw >= s.W) continue;
        const scalar_t* __restrict xp = x + ((n * s.H + ih) * s.W + iw) * C;
        const T* __restrict wp = w_t + (kh * K + kw) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += wp[c] * static_cast<T>(xp[c]);
      }
    }
  }
}

// Training-mode forward: y = act(BN(conv(x))) with batch statistics; writes mean and biased var per channel.
template <typename scalar_t, int K, int S, int ACT, typename T>
void nhwc_train_forward(const scalar_t* x, scalar_t* y, const NhwcShape& s, const T* w_t, const T* gamma,
                        const T* beta, double eps, T* mean_out, T* var_out) {
  const int64_t C = s.C, rows = s.N * s.Ho, row_len = s.Wo * C, count = rows * s.Wo;
  std::vector<T> z_buffer;
  T* z;
  if constexpr (std::is_same_v<scalar_t, T>) {
    z = y;  // the conv output is kept where the result goes
  } else {
    z_buffer.resize(rows * row_len);
    z = z_buffer.data();
  }
  ThreadSums sums(C);
  for_each_row(rows, [&](int64_t r) {
    T* zr = z + r * row_len;
    nhwc_conv_row<scalar_t, K, S>(x, w_t, zr, s, r / s.Ho, r % s.Ho);
    double* acc = sums.mine();
    for (int64_t c = 0; c < C; ++c) {
      T part = 0;
      for (int64_t ow = 0; ow < s.Wo; ++ow) part += zr[ow * C + c];
      acc[c] += part;
    }
  });
  std::vector<T> mean(C);
  const auto sum = sums.total();
  for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<T>(sum[c] / count);
  ThreadSums squares(C);  // centred second pass: no cancellation
  for_each_row(rows, [&](int64_t r) {
    const T* zr = z + r * row_len;
    double* acc = squares.mine();
    std::vector<T> part(C, T(0));
    for (int64_t ow = 0; ow < s.Wo; ++ow) {
      for (int64_t c = 0; c < C; ++c) part[c] += (zr[ow * C + c] - mean[c]) * (zr[ow * C + c] - mean[c]);
    }
    for (int64_t c = 0; c < C; ++c) acc[c] += part[c];
  });
  const auto sq = squares.total();
  std::vector<T> a(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    const double var = sq[c] / count;
    a[c] = static_cast<T>(gamma[c] / std::sqrt(var + eps));
    b[c] = static_cast<T>(beta[c] - sum[c] / count * a[c]);
    mean_out[c] = mean[c];
    var_out[c] = static_cast<T>(var);
  }
  for_each_row(rows, [&](int64_t r) {
    const T* zr = z + r * row_len;
    scalar_t* yr = y + r * row_len;
    for (int64_t ow = 0; ow < s.Wo; ++ow) {
      for (int64_t c = 0; c < C; ++c) {
        yr[ow * C + c] = static_cast<scalar_t>(act_forward<ACT>(a[c] * zr[ow * C + c] + b[c]));
      }
    }
  });
}

// Training-mode backward from dL/dy: dx (NHWC), and the weight (w_t's layout, [K * K, C]), gamma and beta
// gradients, written (not accumulated) in double. The convolution is recomputed, as in the NCHW kernels.
template <typename scalar_t, int K, int S, int ACT, typename T>
void nhwc_train_backward(const scalar_t* gy, const scalar_t* x, scalar_t* dx, const NhwcShape& s, const T* w_t,
                         const T* gamma, const T* beta, const T* mean, const T* var, double eps, double* grad_w,
                         double* grad_gamma, double* grad_beta) {
  constexpr int P = K / 2;
  const int64_t C = s.C, rows = s.N * s.Ho, row_len = s.Wo * C, count = rows * s.Wo;
  std::vector<T> z(rows * row_len), g(rows * row_len), a(C), b(C), invstd(C);
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
    a[c] = gamma[c] * invstd[c];
    b[c] = beta[c] - mean[c] * a[c];
  }
  // g = dL/d(BN output), and the two sums of batch-norm backward.
  ThreadSums sums(2 * C);
  for_each_row(rows, [&](int64_t r) {
    T* zr = z.data() + r * row_len;
    T* gr = g.data() + r * row_len;
    nhwc_conv_row<scalar_t, K, S>(x, w_t, zr, s, r / s.Ho, r % s.Ho);
    const scalar_t* dyr = gy + r * row_len;
    double* acc = sums.mine();
    for (int64_t ow = 0; ow < s.Wo; ++ow) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = ow * C + c;
        gr[i] = act_backward<ACT>(a[c] * zr[i] + b[c], static_cast<T>(dyr[i]));
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      T sg = 0, sgz = 0;
      for (int64_t ow = 0; ow < s.Wo; ++ow) {
        sg += gr[ow * C + c];
        sgz += gr[ow * C + c] * (zr[ow * C + c] - mean[c]);
      }
      acc[c] += sg;
      acc[C + c] += sgz;
    }
  });
  const auto tot = sums.total();
  std::vector<T> c0(C), c1(C);
  for (int64_t c = 0; c < C; ++c) {
    grad_beta[c] = tot[c];
    grad_gamma[c] = tot[C + c] * invstd[c];
    c0[c] = static_cast<T>(a[c] * tot[c] / count);
    c1[c] = static_cast<T>(a[c] * invstd[c] * invstd[c] * tot[C + c] / count);
  }
  // dL/dz = a (g - mean(g) - xhat mean(g xhat)), over g.
  for_each_row(rows, [&](int64_t r) {
    T* gr = g.data() + r * row_len;
    const T* zr = z.data() + r * row_len;
    for (int64_t ow = 0; ow < s.Wo; ++ow) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = ow * C + c;
        gr[i] = a[c] * gr[i] - c0[c] - c1[c] * (zr[i] - mean[c]);
      }
    }
  });
  // dL/dx: each input pixel gathers the output pixels whose window covers it.
  const int64_t in_rows = s.N * s.H, in_len = s.W * C;
  for_each_row(in_rows, [&](int64_t r) {
    const int64_t n = r / s.H, ih = r % s.H;
    std::vector<T> acc(C);
    for (int64_t iw = 0; iw < s.W; ++iw) {
      std::fill(acc.begin(), acc.end(), T(0));
      for (int kh = 0; kh < K; ++kh) {
        const int64_t th = ih + P - kh;
        if (th < 0 || th % S != 0 || th / S >= s.Ho) continue;
        for (int kw = 0; kw < K; ++kw) {
          const int64_t tw = iw + P - kw;
          if (tw < 0 || tw % S != 0 || tw / S >= s.Wo) continue;
          const T* __restrict dz = g.data() + ((n * s.Ho + th / S) * s.Wo + tw / S) * C;
          const T* __restrict wp = w_t + (kh * K + kw) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += wp[c] * dz[c];
        }
      }
      scalar_t* out = dx + r * in_len + iw * C;
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
    }
  });
  // dL/dw[tap, c] = sum over output pixels of dz * the input under that tap; per row in T, then double.
  ThreadSums wsum(K * K * C);
  for_each_row(rows, [&](int64_t r) {
    const int64_t n = r / s.Ho, oh = r % s.Ho;
    std::vector<T> part(K * K * C, T(0));
    for (int64_t ow = 0; ow < s.Wo; ++ow) {
      const T* __restrict dz = g.data() + r * row_len + ow * C;
      for (int kh = 0; kh < K; ++kh) {
        const int64_t ih = oh * S - P + kh;
        if (ih < 0 || ih >= s.H) continue;
        for (int kw = 0; kw < K; ++kw) {
          const int64_t iw = ow * S - P + kw;
          if (iw < 0 || iw >= s.W) continue;
          const scalar_t* __restrict xp = x + ((n * s.H + ih) * s.W + iw) * C;
          T* __restrict pp = part.data() + (kh * K + kw) * C;
          for (int64_t c = 0; c < C; ++c) pp[c] += dz[c] * static_cast<T>(xp[c]);
        }
      }
    }
    double* acc = wsum.mine();
    for (int64_t i = 0; i < K * K * C; ++i) acc[i] += part[i];
  });
  const auto gw = wsum.total();
  std::copy(gw.begin(), gw.end(), grad_w);
}

}  // namespace cpu
}  // namespace betanas
