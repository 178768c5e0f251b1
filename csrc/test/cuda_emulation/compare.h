// What the emulation harnesses compare with: the CPU kernels, called through the dispatcher, per-dtype
// tolerances, and the relative error of a result.
#pragma once
#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

template <typename Sig>
static auto cpu_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

static double tol_of(at::ScalarType dt) {
  switch (dt) {
    case at::kDouble: return 1e-10;
    case at::kFloat: return 3e-5;
    case at::kHalf: return 4e-3;
    default: return 2e-2;
  }
}

// max |got - ref| / max(max |ref|, floor); a NaN anywhere fails.
static double rel_err(const at::Tensor& got, const at::Tensor& ref, double floor = 1e-30) {
  if (ref.numel() == 0) return 0;
  auto a = got.to(at::kDouble), r = ref.to(at::kDouble);
  if (a.isnan().any().item<bool>() || r.isnan().any().item<bool>()) return INFINITY;
  const double den = std::max(r.abs().max().item<double>(), floor);
  return (a - r).abs().max().item<double>() / den;
}
