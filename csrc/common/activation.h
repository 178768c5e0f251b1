// Activations of the fused depthwise stage, shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define BETANAS_HD __host__ __device__ __forceinline__
#else
#define BETANAS_HD inline
#endif

namespace betanas {

// Values of the `act` argument of every op schema (betanas_fast.ops.ACTIVATIONS mirrors them).
enum Act : int { kActNone = 0, kActReLU6 = 1, kActSiLU = 2 };

template <typename T>
BETANAS_HD T sigmoid(T v) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return 1.f / (1.f + expf(-v));
  } else {
    return T(1) / (T(1) + exp(-v));
  }
}

// T is the arithmetic type: float, or double for float64 tensors (gradcheck).
template <int ACT, typename T>
BETANAS_HD T act_forward(T v) {
  if constexpr (ACT == kActReLU6) {
    return v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
  } else if constexpr (ACT == kActSiLU) {
    return v * sigmoid(v);
  } else {
    return v;
  }
}

// d act(pre) / d pre * dy. ReLU6 passes the gradient strictly inside (0, 6), as torch's hardtanh does.
template <int ACT, typename T>
BETANAS_HD T act_backward(T pre, T dy) {
  if constexpr (ACT == kActReLU6) {
    return ((pre > T(0)) & (pre < T(6))) ? dy : T(0);  // no short circuit: branch-free, vectorisable
  } else if constexpr (ACT == kActSiLU) {
    const T s = sigmoid(pre);
    return dy * s * (T(1) + pre * (T(1) - s));
  } else {
    return dy;
  }
}

}  // namespace betanas
