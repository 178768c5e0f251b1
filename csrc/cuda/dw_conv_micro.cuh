// Depthwise-convolution arithmetic of one kRH x kRW micro-tile of outputs on the shared-memory tiles of
// dw_tile.cuh: the convolution, its weight gradient and its transposed convolution (input gradient). Input rows
// are streamed through registers and the K*K taps stay in registers, so a 2x4 micro-tile of a 3x3 conv needs
// 24 shared loads for 72 FMAs. All loops have compile-time trip counts and are fully unrolled; the tap
// conditions fold away. Private to dw_bn_act.cu, hence internal linkage.
#pragma once
#include "cuda/dw_tile.cuh"

namespace betanas {
namespace {

// z[a][b] = sum_{kh, kw} w[kh][kw] * xs[a*S + kh][b*S + kw], summed kh-major as the CPU code does.
template <int K, int S, typename T>
BDEV void conv_micro(const T* __restrict__ xs, int rp, const T (&w)[K * K], T (&z)[kRH][kRW]) {
  constexpr int ROWS = (kRH - 1) * S + K, SEGW = (kRW - 1) * S + K;
#pragma unroll
  for (int a = 0; a < kRH; ++a) {
#pragma unroll
    for (int b = 0; b < kRW; ++b) z[a][b] = T(0);
  }
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    T seg[SEGW];
#pragma unroll
    for (int j = 0; j < SEGW; ++j) seg[j] = xs[q * rp + j];
#pragma unroll
    for (int a = 0; a < kRH; ++a) {
      const int kh = q - a * S;
      if (kh < 0 || kh >= K) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
#pragma unroll
        for (int b = 0; b < kRW; ++b) z[a][b] += w[kh * K + kw] * seg[b * S + kw];
      }
    }
  }
}

// gw[kh][kw] += sum_{a, b} dz[a][b] * xs[a*S + kh][b*S + kw]
template <int K, int S, typename T>
BDEV void wgrad_micro(const T* __restrict__ xs, int xrp, const T* __restrict__ dzs, int drp, T (&gw)[K * K]) {
  constexpr int ROWS = (kRH - 1) * S + K, SEGW = (kRW - 1) * S + K;
  T d[kRH][kRW];
#pragma unroll
  for (int a = 0; a < kRH; ++a) {
#pragma unroll
    for (int b = 0; b < kRW; ++b) d[a][b] = dzs[a * drp + b];
  }
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    T seg[SEGW];
#pragma unroll
    for (int j = 0; j < SEGW; ++j) seg[j] = xs[q * xrp + j];
#pragma unroll
    for (int a = 0; a < kRH; ++a) {
      const int kh = q - a * S;
      if (kh < 0 || kh >= K) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
#pragma unroll
        for (int b = 0; b < kRW; ++b) gw[kh * K + kw] += d[a][b] * seg[b * S + kw];
      }
    }
  }
}

// Transposed convolution of dz into the S*kRH x S*kRW inputs (S*a + py, S*b + px) of a micro-tile:
// gx[i][j] = sum over (oh, kh) with oh*S - P + kh = i (same for columns) of w[kh][kw] * dz[oh][ow].
// dzs points at the window of dz rows/cols that can reach the micro-tile: dz window row q holds output row
// a + q - HD relative to the micro-tile's first output row, HD = ceil(P / S).
template <int K, int S, typename T>
BDEV void dgrad_micro(const T* __restrict__ dzs, int rp, const T (&w)[K * K], T (&gx)[S * kRH][S * kRW]) {
  constexpr int P = K / 2, HD = (P + S - 1) / S, WR = kRH + 2 * HD, WC = kRW + 2 * HD;
#pragma unroll
  for (int i = 0; i < S * kRH; ++i) {
#pragma unroll
    for (int j = 0; j < S * kRW; ++j) gx[i][j] = T(0);
  }
#pragma unroll
  for (int q = 0; q < WR; ++q) {
    T seg[WC];
#pragma unroll
    for (int j = 0; j < WC; ++j) seg[j] = dzs[q * rp + j];
#pragma unroll
    for (int a = 0; a < kRH; ++a) {
#pragma unroll
      for (int py = 0; py < S; ++py) {
        // input row S*a + py receives output row (S*a + py + P - kh) / S = a + (q - a - HD): solve for kh.
        const int kh = py + P - S * (q - a - HD);
        if (kh < 0 || kh >= K) continue;
#pragma unroll
        for (int b = 0; b < kRW; ++b) {
#pragma unroll
          for (int px = 0; px < S; ++px) {
#pragma unroll
            for (int t = -HD; t <= HD; ++t) {
              const int kw = px + P - S * t;
              if (kw < 0 || kw >= K) continue;
              gx[S * a + py][S * b + px] += w[kh * K + kw] * seg[b + t + HD];
            }
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace betanas
