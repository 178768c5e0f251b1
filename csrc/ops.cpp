// Every op's schema, in one place. CPU kernels: csrc/cpu/, CUDA kernels: csrc/cuda/; fake kernels and
// autograd are registered from Python (betanas_fast/ops/), the pure-PyTorch oracles are in
// betanas_fast/reference/.
#include <torch/library.h>

#ifdef TORCH_EXTENSION_NAME  // built as the Python extension betanas_fast._C (not by the CMake build)
#include <Python.h>
// Importing betanas_fast._C loads this library, whose static initialisers register the ops.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(betanas, m) {
  // Fused depthwise MBConv stage y = act(BN(depthwise_conv(x))), padding k // 2, k = weight.size(-1).
  // act: 0 none, 1 relu6, 2 silu. Training mode normalises with the batch statistics and returns them
  // (mean and biased variance, float32) so that the caller can update its running statistics.
  m.def("dw_bn_act_train(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, int stride, int act, "
        "float eps) -> (Tensor out, Tensor mean, Tensor var)");
  // weight_grad=False: the caller needs no weight gradient (Phase 2's frozen weights); grad_weight is zeros, and
  // a kernel may skip its pass (the CPU channels_last one does).
  m.def("dw_bn_act_train_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
        "Tensor mean, Tensor var, int stride, int act, float eps, bool weight_grad=True) -> (Tensor grad_x, "
        "Tensor grad_weight, Tensor grad_bn_weight, Tensor grad_bn_bias)");
  // Evaluation mode: batch norm folded into a per-channel scale and shift.
  m.def("dw_bn_act_eval(Tensor x, Tensor weight, Tensor scale, Tensor shift, int stride, int act) -> Tensor");
  m.def("dw_bn_act_eval_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor scale, Tensor shift, int stride, "
        "int act) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_scale, Tensor grad_shift)");

  // The architecture-parameter gradient of a Phase-2 step, every block in one call. Per row l:
  // p = softmax(alpha over the remaining paths), 0 on dropped ones; grad_alpha = the binary-gate gradient
  // sum_j gate_grad_j p_j (delta_mj - p_m) over remaining j, plus the exact gradient of
  // beta * sum_m p_m cost_m; 0 on dropped paths. float32 [L, M]; remaining is bool [L, M].
  m.def("alpha_grad(Tensor alpha, Tensor remaining, Tensor gate_grad, Tensor cost, float beta) -> "
        "(Tensor p, Tensor grad_alpha)");

  // The depthwise stages of G groups in one call (Phase 1 with a path per sample): group g has samples[g]
  // samples of channels[g] channels with a kernel_sizes[g] kernel, all height x width, same stride and act.
  // Every tensor is flat and group-major: x is the groups' [n_g, C_g, H, W] blocks one after another,
  // weight their [C_g, 1, k_g, k_g], the per-channel ones their [C_g], out their [n_g, C_g, Ho_g, Wo_g].
  // Batch statistics per group and channel; an empty group has mean = var = 0 and zero gradients.
  m.def("dw_bn_act_grouped_train(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, int[] samples, "
        "int[] channels, int[] kernel_sizes, int height, int width, int stride, int act, float eps) -> "
        "(Tensor out, Tensor mean, Tensor var)");
  m.def("dw_bn_act_grouped_train_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bn_weight, "
        "Tensor bn_bias, Tensor mean, Tensor var, int[] samples, int[] channels, int[] kernel_sizes, int height, "
        "int width, int stride, int act, float eps) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bn_weight, "
        "Tensor grad_bn_bias)");
  // The binary-gate gradients of one choice block (Phase 2): for each of the K MBConv candidates given by
  // their parameter lists, sum(o_j(x) * grad_out) with BatchNorm on batch statistics (o_j includes x when
  // residual); entry K is sum(x * grad_out), the identity path (0 when the shapes differ). float32 [K + 1].
  // No autograd: the outputs are reduced as they are computed, never kept.
  m.def("block_gate_grads(Tensor x, Tensor grad_out, Tensor[] expand_weight, Tensor[] expand_bn_weight, "
        "Tensor[] expand_bn_bias, Tensor[] dw_weight, Tensor[] dw_bn_weight, Tensor[] dw_bn_bias, "
        "Tensor[] project_weight, Tensor[] project_bn_weight, Tensor[] project_bn_bias, int stride, bool residual, "
        "int act, float eps) -> Tensor");

  // Host memory, not a tensor op: installs (once) a caching allocator as c10's CPU allocator, which keeps
  // freed blocks of 256 KiB and more, up to max_cached_bytes, for reuse (csrc/cpu/caching_allocator.cpp).
  m.def("cache_cpu_allocations(int max_cached_bytes) -> int");
}
