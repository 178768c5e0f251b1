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
#include "cpu/dw_kernels.h"

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
  int threads() const { return static_cast<int>(sums_.size() / width_); }
  const double* of(int thread) const { return sums_.data() + thread * width_; }
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

// out[c] = sum_t w[t][c] * src[t][c] over the n taps of one output pixel, c < C: the channels in the
// inner loop, 16 at a time in two vector accumulators that stay in registers over all taps.
template <typename src_t, typename T, typename out_t>
inline void dot_taps(int n, const src_t* const* src, const T* const* w, out_t* __restrict out, int64_t C) {
  int64_t c = 0;
  if constexpr (std::is_same_v<src_t, float> && std::is_same_v<T, float>) {
    for (; c + 16 <= C; c += 16) {
      Float8 a0 = {}, a1 = {};
      for (int t = 0; t < n; ++t) {
        a0 += load8(w[t] + c) * load8(src[t] + c);
        a1 += load8(w[t] + c + 8) * load8(src[t] + c + 8);
      }
      for (int j = 0; j < 8; ++j) {
        out[c + j] = static_cast<out_t>(a0[j]);
        out[c + 8 + j] = static_cast<out_t>(a1[j]);
      }
    }
    for (; c + 8 <= C; c += 8) {
      Float8 a0 = {};
      for (int t = 0; t < n; ++t) a0 += load8(w[t] + c) * load8(src[t] + c);
      for (int j = 0; j < 8; ++j) out[c + j] = static_cast<out_t>(a0[j]);
    }
  }
  for (; c < C; ++c) {
    T acc = 0;
    for (int t = 0; t < n; ++t) acc += w[t][c] * static_cast<T>(src[t][c]);
    out[c] = static_cast<out_t>(acc);
  }
}

// Channels c0 .. C-1 of output row (n, oh), a pixel at a time: each pixel's valid taps gathered, then dot_taps.
template <typename scalar_t, int K, int S, typename T, typename out_t>
void nhwc_conv_row_pixels(const scalar_t* __restrict x, const T* __restrict w_t, out_t* __restrict z,
                          const NhwcShape& s, int64_t n, int64_t oh, int64_t c0) {
  constexpr int P = K / 2;
  const int64_t C = s.C;
  const scalar_t* src[K * K];
  const T* w[K * K];
  for (int64_t ow = 0; ow < s.Wo; ++ow) {
    int taps = 0;
    for (int kh = 0; kh < K; ++kh) {
      const int64_t ih = oh * S - P + kh;
      if (ih < 0 || ih >= s.H) continue;
      for (int kw = 0; kw < K; ++kw) {
        const int64_t iw = ow * S - P + kw;
        if (iw < 0 || iw >= s.W) continue;
        src[taps] = x + ((n * s.H + ih) * s.W + iw) * C + c0;
        w[taps++] = w_t + (kh * K + kw) * C + c0;
      }
    }
    dot_taps(taps, src, w, z + ow * C + c0, C - c0);
  }
}

// The register tile of one kernel row: R consecutive output pixels ow0 + r and the 8 channels at c, xrow the
// input row ih at column 0 and col0 = ow0 * S - P the input column of output ow0's first tap. Every input
// column of the tile is loaded once and handed to f(r, kw, x) for each (output r, tap kw) that reads it
// (S * r + kw = j): R * K products for S * (R - 1) + K loads, where a pixel at a time loads twice per FMA.
// Columns outside [0, W) are the zero padding and are skipped. Every loop is unrolled, so that r and kw
// are constants and the caller's accumulators stay in registers.
template <int K, int S, int R, typename F>
__attribute__((always_inline)) inline void for_each_tile_tap(const float* __restrict xrow, int64_t C, int64_t c,
                                                             int64_t col0, int64_t W, F&& f) {
  constexpr int J = S * (R - 1) + K;
#pragma GCC unroll 32
  for (int j = 0; j < J; ++j) {
    const int64_t col = col0 + j;
    if (col < 0 || col >= W) continue;
    const Float8 xv = load8(xrow + col * C + c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int kw = j - S * r;
      if (kw >= 0 && kw < K) f(r, kw, xv);
    }
  }
}

// Forward tile: acc[r] += sum over the row's taps of w[kw] * x, the K weights (wrow = w_t + kh * K * C) in
// registers.
template <int K, int S, int R>
__attribute__((always_inline)) inline void row_taps_block(const float* __restrict xrow, const float* __restrict wrow,
                                                          int64_t C, int64_t c, int64_t col0, int64_t W, Float8* acc) {
  Float8 w[K];
#pragma GCC unroll 8
  for (int kw = 0; kw < K; ++kw) w[kw] = load8(wrow + kw * C + c);
  for_each_tile_tap<K, S, R>(xrow, C, c, col0, W, [&](int r, int kw, Float8 xv) { acc[r] += w[kw] * xv; });
}

// Weight-gradient tile: acc[kw] += sum over the R output pixels (r < count; the others count as 0) of
// dz[ow0 + r] * x[S * (ow0 + r) - P + kw], the R dz vectors in registers.
template <int K, int S, int R>
__attribute__((always_inline)) inline void row_wgrad_block(const float* __restrict xrow, const float* __restrict dz,
                                                           int64_t C, int64_t c, int64_t col0, int64_t W,
                                                           int64_t count, Float8* acc) {
  Float8 d[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) d[r] = r < count ? load8(dz + r * C + c) : Float8{};
  for_each_tile_tap<K, S, R>(xrow, C, c, col0, W, [&](int r, int kw, Float8 xv) { acc[kw] += d[r] * xv; });
}

// Output row (n, oh) of the float convolution, register-tiled: R = 8 output pixels and 8 channels at a
// time (the last block of a row computes pixels past Wo from in-range inputs and does not store them).
// Channels past the last multiple of 8 go a pixel at a time.
template <int K, int S>
void nhwc_conv_row_tiled(const float* __restrict x, const float* __restrict w_t, float* __restrict z,
                         const NhwcShape& s, int64_t n, int64_t oh) {
  constexpr int P = K / 2, R = 8;
  const int64_t C = s.C, C8 = C / 8 * 8;
  // pixels outer, channels inner: consecutive tiles read adjacent bytes of the same input columns
  for (int64_t ow0 = 0; ow0 < s.Wo; ow0 += R) {
    for (int64_t c = 0; c < C8; c += 8) {
      // acc is indexed by constants only (every loop over r unrolled), so that it stays in registers
      Float8 acc[R] = {};
#pragma GCC unroll 8
      for (int kh = 0; kh < K; ++kh) {
        const int64_t ih = oh * S - P + kh;
        if (ih < 0 || ih >= s.H) continue;
        row_taps_block<K, S, R>(x + (n * s.H + ih) * s.W * C, w_t + kh * K * C, C, c, ow0 * S - P, s.W, acc);
      }
      const int64_t count = s.Wo - ow0;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (r < count) store8(z + (ow0 + r) * C + c, acc[r]);
      }
    }
  }
  if (C8 < C) nhwc_conv_row_pixels<float, K, S>(x, w_t, z, s, n, oh, C8);
}

// z[ow, c] of output row (n, oh), Wo x C, from x in NHWC (x of shape s.N x s.H x s.W x s.C): the register
// tiles for float, a pixel at a time otherwise.
template <typename scalar_t, int K, int S, typename T, typename out_t>
void nhwc_conv_row(const scalar_t* __restrict x, const T* __restrict w_t, out_t* __restrict z, const NhwcShape& s,
                   int64_t n, int64_t oh) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float> && std::is_same_v<out_t, float>) {
    nhwc_conv_row_tiled<K, S>(x, w_t, z, s, n, oh);
  } else {
    nhwc_conv_row_pixels<scalar_t, K, S>(x, w_t, z, s, n, oh, 0);
  }
}

// Chan et al.'s pairwise update: the running moments (mean[C], M2[C] over n_a values) absorb a part's
// (mean_b, m2_b over n_b values); returns the new count.
template <typename U>
inline double merge_moments(double* mean, double* m2, double n_a, const U* mean_b, const U* m2_b, double n_b,
                            int64_t C) {
  const double n = n_a + n_b;
  if (n_b == 0.0) return n_a;
  for (int64_t c = 0; c < C; ++c) {
    const double delta = static_cast<double>(mean_b[c]) - mean[c];
    mean[c] += delta * n_b / n;
    m2[c] += static_cast<double>(m2_b[c]) + delta * delta * n_a * n_b / n;
  }
  return n;
}

// The convolution of every output row of x (shape s) into z (rows of s.Wo * s.C), rows in parallel, with the
// batch statistics in the same pass while each row is in cache: per row its sum and its squares about the
// row's own mean (no cancellation), merged into the running thread's (mean[C], M2[C], count) in `moments`
// (width 2C + 1) with Chan et al.'s pairwise update in double. Calls on several parts of a batch (chunks
// of samples) add up in the same `moments`.
template <typename scalar_t, int K, int S, typename T>
void nhwc_conv_moments(const scalar_t* x, const T* w_t, T* z, const NhwcShape& s, ThreadSums& moments) {
  const int64_t C = s.C, row_len = s.Wo * C;
  for_each_index(s.N * s.Ho, [&](int64_t r) {
    T* zr = z + r * row_len;
    nhwc_conv_row<scalar_t, K, S>(x, w_t, zr, s, r / s.Ho, r % s.Ho);
    std::vector<T> row_mean(C, T(0)), row_m2(C, T(0));
    for (int64_t ow = 0; ow < s.Wo; ++ow) {
      const T* __restrict zp = zr + ow * C;
      for (int64_t c = 0; c < C; ++c) row_mean[c] += zp[c];
    }
    for (int64_t c = 0; c < C; ++c) row_mean[c] /= static_cast<T>(s.Wo);
    for (int64_t ow = 0; ow < s.Wo; ++ow) {
      const T* __restrict zp = zr + ow * C;
      for (int64_t c = 0; c < C; ++c) row_m2[c] += (zp[c] - row_mean[c]) * (zp[c] - row_mean[c]);
    }
    double* m = moments.mine();
    m[2 * C] = merge_moments(m, m + C, m[2 * C], row_mean.data(), row_m2.data(), static_cast<double>(s.Wo), C);
  });
}

// The threads' moments of nhwc_conv_moments merged: the batch mean and biased variance per channel.
inline void total_moments(const ThreadSums& moments, int64_t C, std::vector<double>& mean, std::vector<double>& var) {
  mean.assign(C, 0.0);
  var.assign(C, 0.0);
  double n = 0.0;
  for (int t = 0; t < moments.threads(); ++t) {
    const double* m = moments.of(t);
    n = merge_moments(mean.data(), var.data(), n, m, m + C, m[2 * C], C);
  }
  for (int64_t c = 0; c < C; ++c) var[c] = n > 0.0 ? var[c] / n : 0.0;
}

// Batch norm with batch statistics as one affine map per channel: a = gamma / sqrt(var + eps), b = beta - mean a.
template <typename P, typename T>
void fold_batch_norm(const std::vector<double>& mean, const std::vector<double>& var, const P* gamma,
                     const P* beta, double eps, std::vector<T>& a, std::vector<T>& b) {
  const size_t C = mean.size();
  a.resize(C);
  b.resize(C);
  for (size_t c = 0; c < C; ++c) {
    const double ac = static_cast<double>(gamma[c]) / std::sqrt(var[c] + eps);
    a[c] = static_cast<T>(ac);
    b[c] = static_cast<T>(static_cast<double>(beta[c]) - mean[c] * ac);
  }
}

// act(a[c] * src + b[c]) of rows x C values into dst (which may be src), rows in parallel: a batch norm
// with folded statistics and its activation, applied to a whole tensor.
template <int ACT, typename src_t, typename dst_t, typename T>
void nhwc_affine_act(const src_t* src, dst_t* dst, int64_t rows, int64_t C, const T* a, const T* b) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const src_t* sp = src + r * C;
      dst_t* dp = dst + r * C;
      for (int64_t c = 0; c < C; ++c) dp[c] = static_cast<dst_t>(act_forward<ACT>(a[c] * static_cast<T>(sp[c]) + b[c]));
    }
  });
}

// Training-mode forward: y = act(BN(conv(x))) with batch statistics; writes mean and biased var per channel.
template <typename scalar_t, int K, int S, int ACT, typename T>
void nhwc_train_forward(const scalar_t* x, scalar_t* y, const NhwcShape& s, const T* w_t, const T* gamma,
                        const T* beta, double eps, T* mean_out, T* var_out) {
  const int64_t C = s.C, rows = s.N * s.Ho, row_len = s.Wo * C;
  at::Tensor z_buffer;  // from the tensor allocator: no fresh pages every call
  T* z;
  if constexpr (std::is_same_v<scalar_t, T>) {
    z = y;  // the conv output is kept where the result goes
  } else {
    z_buffer = at::empty({rows * row_len}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    z = z_buffer.mutable_data_ptr<T>();
  }
  ThreadSums moments(2 * C + 1);  // per thread: mean[C], M2[C], count
  nhwc_conv_moments<scalar_t, K, S>(x, w_t, z, s, moments);
  std::vector<double> mean_d, var_d;
  total_moments(moments, C, mean_d, var_d);
  std::vector<T> a, b;
  fold_batch_norm(mean_d, var_d, gamma, beta, eps, a, b);
  for (int64_t c = 0; c < C; ++c) {
    mean_out[c] = static_cast<T>(mean_d[c]);
    var_out[c] = static_cast<T>(var_d[c]);
  }
  nhwc_affine_act<ACT>(z, y, rows * s.Wo, C, a.data(), b.data());
}

// Training-mode backward from dL/dy: dx (NHWC), and the weight (w_t's layout, [K * K, C]; grad_w == nullptr:
// not needed, its pass skipped), gamma and beta gradients, written (not accumulated) in double. The
// convolution is recomputed, as in the NCHW kernels.
template <typename scalar_t, int K, int S, int ACT, typename T>
void nhwc_train_backward(const scalar_t* gy, const scalar_t* x, scalar_t* dx, const NhwcShape& s, const T* w_t,
                         const T* gamma, const T* beta, const T* mean, const T* var, double eps, double* grad_w,
                         double* grad_gamma, double* grad_beta) {
  constexpr int P = K / 2;
  const int64_t C = s.C, rows = s.N * s.Ho, row_len = s.Wo * C, count = rows * s.Wo;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor z_buffer = at::empty({rows * row_len}, options), g_buffer = at::empty({rows * row_len}, options);
  T* const z = z_buffer.mutable_data_ptr<T>();
  T* const g = g_buffer.mutable_data_ptr<T>();
  std::vector<T> a(C), b(C), invstd(C);
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
    a[c] = gamma[c] * invstd[c];
    b[c] = beta[c] - mean[c] * a[c];
  }
  // g = dL/d(BN output), and the two sums of batch-norm backward.
  ThreadSums sums(2 * C);
  for_each_index(rows, [&](int64_t r) {
    T* zr = z + r * row_len;
    T* gr = g + r * row_len;
    nhwc_conv_row<scalar_t, K, S>(x, w_t, zr, s, r / s.Ho, r % s.Ho);
    const scalar_t* dyr = gy + r * row_len;
    double* acc = sums.mine();
    std::vector<T> sg_row(C, T(0)), sgz_row(C, T(0));
    T* __restrict sg = sg_row.data();
    T* __restrict sgz = sgz_row.data();
    const T* __restrict ap = a.data();
    const T* __restrict bp = b.data();
    const T* __restrict mp = mean;
    for (int64_t ow = 0; ow < s.Wo; ++ow) {
      const T* __restrict zp = zr + ow * C;
      const scalar_t* __restrict dyp = dyr + ow * C;
      T* __restrict gp = gr + ow * C;
      for (int64_t c = 0; c < C; ++c) gp[c] = act_backward<ACT>(ap[c] * zp[c] + bp[c], static_cast<T>(dyp[c]));
      for (int64_t c = 0; c < C; ++c) {
        sg[c] += gp[c];
        sgz[c] += gp[c] * (zp[c] - mp[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      acc[c] += sg_row[c];
      acc[C + c] += sgz_row[c];
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
  for_each_index(rows, [&](int64_t r) {
    T* gr = g + r * row_len;
    const T* zr = z + r * row_len;
    for (int64_t ow = 0; ow < s.Wo; ++ow) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = ow * C + c;
        gr[i] = a[c] * gr[i] - c0[c] - c1[c] * (zr[i] - mean[c]);
      }
    }
  });
  // dL/dx. Stride 1: the convolution of dz with the flipped kernel. Stride 2: each input pixel gathers
  // the output pixels whose window covers it.
  const int64_t in_rows = s.N * s.H, in_len = s.W * C;
  if constexpr (S == 1) {
    std::vector<T> w_flip(K * K * C);
    for (int t = 0; t < K * K; ++t) std::copy_n(w_t + (K * K - 1 - t) * C, C, w_flip.data() + t * C);
    const NhwcShape dz_shape{s.N, s.Ho, s.Wo, C, s.H, s.W};
    for_each_index(in_rows, [&](int64_t r) {
      nhwc_conv_row<T, K, 1>(g, w_flip.data(), dx + r * in_len, dz_shape, r / s.H, r % s.H);
    });
  } else {
    for_each_index(in_rows, [&](int64_t r) {
      const int64_t n = r / s.H, ih = r % s.H;
      const T* src[K * K];
      const T* w[K * K];
      for (int64_t iw = 0; iw < s.W; ++iw) {
        int taps = 0;
        for (int kh = 0; kh < K; ++kh) {
          const int64_t th = ih + P - kh;
          if (th < 0 || th % S != 0 || th / S >= s.Ho) continue;
          for (int kw = 0; kw < K; ++kw) {
            const int64_t tw = iw + P - kw;
            if (tw < 0 || tw % S != 0 || tw / S >= s.Wo) continue;
            src[taps] = g + ((n * s.Ho + th / S) * s.Wo + tw / S) * C;
            w[taps++] = w_t + (kh * K + kw) * C;
          }
        }
        dot_taps(taps, src, w, dx + r * in_len + iw * C, C);
      }
    });
  }
  if (grad_w == nullptr) return;
  // dL/dw[tap, c] = sum over output pixels of dz * the input under that tap: per tap and 8 channels, a
  // vector sum along the output row in registers; rows add up in T per thread and in double every 16 rows.
  ThreadSums wsum(K * K * C);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {  // one chunk of rows per thread
    std::vector<T> part(K * K * C, T(0));
    double* acc = wsum.mine();
    auto flush = [&] {
      for (int64_t i = 0; i < K * K * C; ++i) acc[i] += part[i];
      std::fill(part.begin(), part.end(), T(0));
    };
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / s.Ho, oh = r % s.Ho;
      const T* dz = g + r * row_len;
      for (int kh = 0; kh < K; ++kh) {
        const int64_t ih = oh * S - P + kh;
        if (ih < 0 || ih >= s.H) continue;
        const scalar_t* xrow = x + (n * s.H + ih) * s.W * C;
        for (int kw = 0; kw < K; ++kw) {
          // the output columns whose tap kw falls inside the input row
          const int64_t ow0 = std::max<int64_t>(0, (P - kw + S - 1) / S);
          const int64_t last = s.W - 1 + P - kw;  // ow * S <= last
          const int64_t ow1 = last < 0 ? 0 : std::min<int64_t>(s.Wo, last / S + 1);
          T* __restrict pp = part.data() + (kh * K + kw) * C;
          int64_t c = 0;
          if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float>) {
            c = C / 8 * 8;  // done per kernel row by row_wgrad_block below
          }
          for (; c < C; ++c) {
            T a = 0;
            for (int64_t ow = ow0; ow < ow1; ++ow) a += dz[ow * C + c] * static_cast<T>(xrow[(ow * S - P + kw) * C + c]);
            pp[c] += a;
          }
        }
        if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float>) {
          constexpr int R = 8;
          // pixels outer, channels inner (adjacent bytes of the same columns); the K partial sums of a tile
          // are loaded and stored around it, from L1
          for (int64_t ow0 = 0; ow0 < s.Wo; ow0 += R) {
            for (int64_t c = 0; c + 8 <= C; c += 8) {
              Float8 wacc[K];  // indexed by constants only: in registers
#pragma GCC unroll 8
              for (int kw = 0; kw < K; ++kw) wacc[kw] = load8(part.data() + (kh * K + kw) * C + c);
              row_wgrad_block<K, S, R>(xrow, dz + ow0 * C, C, c, ow0 * S - P, s.W, s.Wo - ow0, wacc);
#pragma GCC unroll 8
              for (int kw = 0; kw < K; ++kw) store8(part.data() + (kh * K + kw) * C + c, wacc[kw]);
            }
          }
        }
      }
      if ((r - begin) % 16 == 15) flush();
    }
    flush();
  });
  const auto gw = wsum.total();
  std::copy(gw.begin(), gw.end(), grad_w);
}

}  // namespace cpu
}  // namespace betanas
