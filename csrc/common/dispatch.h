// Turns the runtime kernel size, stride and activation into template constants, so that the kernels'
// inner loops never branch on them (flash-attention's switch idiom, written as generic lambdas).
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

#include <c10/util/Exception.h>

#include "common/activation.h"

namespace betanas {

template <int V>
using IntConst = std::integral_constant<int, V>;

// f(IntConst<K>{}, IntConst<S>{}) for K in {3, 5, 7}, S in {1, 2}.
template <typename F>
void dispatch_kernel_stride(int64_t kernel_size, int64_t stride, F&& f) {
  auto with_stride = [&](auto k) {
    if (stride == 1) {
      f(k, IntConst<1>{});
    } else if (stride == 2) {
      f(k, IntConst<2>{});
    } else {
      TORCH_CHECK(false, "betanas: stride must be 1 or 2, got ", stride);
    }
  };
  switch (kernel_size) {
    case 3: with_stride(IntConst<3>{}); break;
    case 5: with_stride(IntConst<5>{}); break;
    case 7: with_stride(IntConst<7>{}); break;
    default: TORCH_CHECK(false, "betanas: kernel size must be 3, 5 or 7, got ", kernel_size);
  }
}

// The one list of activations turned into template constants, for host and device code alike:
// f(IntConst<ACT>{}) and true, or false without calling f for a value outside Act. Device code runs after the
// ops have checked act, so it has no error path of its own.
template <typename F>
BETANAS_HD bool act_switch(int64_t act, F&& f) {
  switch (act) {
    case kActNone: f(IntConst<kActNone>{}); return true;
    case kActReLU6: f(IntConst<kActReLU6>{}); return true;
    case kActSiLU: f(IntConst<kActSiLU>{}); return true;
    default: return false;
  }
}

// act_switch for host code: a value outside Act is an error.
template <typename F>
void dispatch_act(int64_t act, F&& f) {
  const bool known = act_switch(act, std::forward<F>(f));
  TORCH_CHECK(known, "betanas: act must be 0 (none), 1 (relu6) or 2 (silu), got ", act);
}

}  // namespace betanas
