// CUDA kernels of the grouped ops; csrc/cpu/grouped.cpp defines their semantics (outputs, dtypes, checks) and
// these reproduce them.
//
// * dw_bn_act_grouped_train and its backward: one launch each over every channel of every group, the ragged
//   depthwise kernels of dw_ragged.cuh (one block per channel, batch statistics reduced inside the block).
// * block_gate_grads: the candidates of a choice block side by side, stage by stage, as the CPU kernel runs them:
//   1. one GEMM expands x for every candidate (their expand weights stacked): h [N, sum Cmid, H*W];
//   2. one launch computes the batch statistics of every expanded channel and folds them with the expand BN
//      into a per-channel a, b (bn_stats_kernel);
//   3. one ragged depthwise launch runs every candidate's depthwise stage (training mode, batch statistics) on
//      act(a*h + b), applied as h is loaded, so the normalised activations are never written;
//   4. per candidate a GEMM projects its channels into z [K, N, Cout, Ho*Wo];
//   5. one launch reduces sum(BN(z_j) . dL/dO) for every candidate (and sum(x . dL/dO) for the identity path)
//      without writing BN(z): per (candidate, channel) the sums of d, d^2, d*g and g with d = z - z[first] (a
//      shift that keeps the moments exact in double), from which the batch mean and variance and
//      sum((z - mean) g) follow (gate_reduce_kernel).
//   The reductions of steps 2 and 5 split each channel over several blocks (enough blocks to fill the device)
//   and the last block to finish (a ticket counter) combines the partial sums in a fixed order, so both stay one
//   launch and deterministic. Autocast is excluded: the GEMMs run in x's dtype; statistics in float32 (float64
//   for float64 tensors).
//
// Checked without a GPU by csrc/test/cuda_emulation/grouped_harness.cpp, which compiles this file as C++
// (BETANAS_CUDA_EMULATION), runs every CUDA thread as a CPU thread and compares all three ops with the CPU kernels;
// BETANAS_RED_TARGET_BLOCKS and BETANAS_RED_MIN_CHUNK shrink the reductions' chunks there so that channels are
// split. Speed and the device's own arithmetic need a GPU (benchmarks/gpu_check.sh).
//
// What would make block_gate_grads faster: one grouped GEMM (cuBLAS grouped batched) for every candidate's
// projection instead of K calls, or the reduction as the projection GEMM's epilogue (z never written).
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/grouped.h"
#include "cuda/dw_ragged.cuh"

namespace betanas {
namespace {

#ifndef BETANAS_RED_TARGET_BLOCKS
#define BETANAS_RED_TARGET_BLOCKS 1024
#endif
#ifndef BETANAS_RED_MIN_CHUNK
#define BETANAS_RED_MIN_CHUNK 8192
#endif
constexpr int64_t kRedTargetBlocks = BETANAS_RED_TARGET_BLOCKS;  // blocks a reduction launch aims at
constexpr int64_t kRedMinChunk = BETANAS_RED_MIN_CHUNK;          // fewest values of a channel per block

at::Tensor to_opmath(const at::Tensor& t, at::ScalarType ot) { return t.detach().to(ot).contiguous(); }

// ---------------------------------------------------------------------------------------------------------
// Ops: the grouped depthwise stage.

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_bn_act_grouped_train_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    at::IntArrayRef samples, at::IntArrayRef channels, at::IntArrayRef kernel_sizes, int64_t H, int64_t W,
    int64_t stride, int64_t act, double eps) {
  const DwGroups groups = check_grouped_args("betanas::dw_bn_act_grouped_train", c10::kCUDA, x_in, weight, bn_weight,
                                             bn_bias, samples, channels, kernel_sizes, H, W, stride, act);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto ot = stats_dtype(x);
  at::Tensor out = at::empty({groups.y_numel}, x.options());
  at::Tensor mean = at::empty({groups.total_channels}, x.options().dtype(ot));
  at::Tensor var = at::empty({groups.total_channels}, x.options().dtype(ot));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bn_act_grouped_train_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor w = to_opmath(weight, ot), gamma = to_opmath(bn_weight, ot), beta = to_opmath(bn_bias, ot);
    RaggedParams<scalar_t> p;
    p.act = static_cast<int>(act);
    p.eps = eps;
    p.x = x.const_data_ptr<scalar_t>();
    p.out = out.mutable_data_ptr<scalar_t>();
    p.w = w.const_data_ptr<T>();
    p.gamma = gamma.const_data_ptr<T>();
    p.beta = beta.const_data_ptr<T>();
    p.mean_out = mean.mutable_data_ptr<T>();
    p.var_out = var.mutable_data_ptr<T>();
    run_ragged<scalar_t>(groups, H, W, stride, /*backward=*/false, p, x.device());
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_act_grouped_train_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef samples,
    at::IntArrayRef channels, at::IntArrayRef kernel_sizes, int64_t H, int64_t W, int64_t stride, int64_t act,
    double eps) {
  const char* op = "betanas::dw_bn_act_grouped_train_backward";
  const DwGroups groups = check_grouped_args(op, c10::kCUDA, x_in, weight, bn_weight, bn_bias, samples, channels,
                                             kernel_sizes, H, W, stride, act);
  check_flat(op, "grad_out", grad_out_in, x_in, groups.y_numel, true);
  check_flat(op, "mean", mean, x_in, groups.total_channels, true);
  check_flat(op, "var", var, x_in, groups.total_channels, true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), dy = grad_out_in.to(x.scalar_type()).contiguous();
  const auto ot = stats_dtype(x);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor gw = at::empty({groups.weight_numel}, x.options().dtype(ot));
  at::Tensor gg = at::empty({groups.total_channels}, x.options().dtype(ot));
  at::Tensor gb = at::empty({groups.total_channels}, x.options().dtype(ot));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bn_act_grouped_train_backward_cuda",
                                  [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor w = to_opmath(weight, ot), gamma = to_opmath(bn_weight, ot), beta = to_opmath(bn_bias, ot);
    const at::Tensor m = to_opmath(mean, ot), v = to_opmath(var, ot);
    RaggedParams<scalar_t> p;
    p.act = static_cast<int>(act);
    p.eps = eps;
    p.x = x.const_data_ptr<scalar_t>();
    p.dy = dy.const_data_ptr<scalar_t>();
    p.out = grad_x.mutable_data_ptr<scalar_t>();
    p.w = w.const_data_ptr<T>();
    p.gamma = gamma.const_data_ptr<T>();
    p.beta = beta.const_data_ptr<T>();
    p.mean = m.const_data_ptr<T>();
    p.var = v.const_data_ptr<T>();
    p.grad_w = gw.mutable_data_ptr<T>();
    p.grad_gamma = gg.mutable_data_ptr<T>();
    p.grad_beta = gb.mutable_data_ptr<T>();
    run_ragged<scalar_t>(groups, H, W, stride, /*backward=*/true, p, x.device());
  });
  // The CPU kernel sums in double and returns each gradient in its parameter's dtype.
  return {grad_x, gw.to(weight.scalar_type()), gg.to(bn_weight.scalar_type()), gb.to(bn_bias.scalar_type())};
}

// ---------------------------------------------------------------------------------------------------------
// block_gate_grads: the reductions.

// The values of channel c of a [N, C, S] tensor, N * S of them, in `split` chunks of `chunk` values, one block
// per chunk; the blocks of a channel are consecutive.
struct ChannelSplit {
  int C = 0, split = 1;
  int64_t S = 1, E = 0, chunk = 0;
  FastDiv fd_s;
};

ChannelSplit channel_split(int64_t N, int64_t C, int64_t S) {
  ChannelSplit cs;
  cs.C = static_cast<int>(C);
  cs.S = S;
  cs.E = N * S;
  TORCH_CHECK(cs.E < INT32_MAX && C < INT32_MAX, "betanas::block_gate_grads: ", N, " x ", S,
              " values per channel are too many for one block's index arithmetic");
  cs.fd_s = FastDiv(std::max<int64_t>(S, 1));  // S = 0: an empty identity-only input, no values
  const int64_t by_blocks = ceil_div(kRedTargetBlocks, std::max<int64_t>(C, 1));
  const int64_t by_size = std::max<int64_t>(1, ceil_div(cs.E, kRedMinChunk));
  const int64_t split = std::max<int64_t>(1, std::min(by_blocks, by_size));
  cs.chunk = std::max<int64_t>(1, ceil_div(cs.E, split));
  cs.split = static_cast<int>(std::max<int64_t>(1, ceil_div(cs.E, cs.chunk)));
#ifdef BETANAS_CUDA_EMULATION  // the harness asserts that its cases split channels over several blocks
  if (cs.split > 1) betanas_emu::cover("channel reductions split over blocks", cs.split);
#endif
  return cs;
}

// f(offset from the channel's first value) for the values of chunk s (the block's threads take turns).
template <typename F>
BDEV void for_chunk(const ChannelSplit& cs, int s, F&& f) {
  const int64_t end = (s + 1) * cs.chunk;
  const int e1 = static_cast<int>(end < cs.E ? end : cs.E);
#pragma unroll 4
  for (int e = static_cast<int>(s * cs.chunk) + threadIdx.x; e < e1; e += kThreads) {
    const int n = cs.fd_s.div(e);
    f(int64_t(n) * cs.C * cs.S + (e - n * cs.S));
  }
}

// Whether this block is the last of the launch to get here; its partial results were written before, and the
// last block then sees every block's (threadfence reduction).
BDEV bool last_block(int* ticket, int num_blocks) {
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(ticket, 1) == num_blocks - 1;
  __syncthreads();
  const bool last = is_last != 0;
  if (last) __threadfence();
  return last;
}

// A value another block wrote, read past the (non-coherent) L1 cache.
BDEV double load_cg(const double* p) {
#ifdef __CUDA_ARCH__
  return __ldcg(p);
#else
  return *p;
#endif
}

// Step 2: per expanded channel, a = gamma / sqrt(var + eps) and b = beta - mean * a from the batch statistics.
template <typename scalar_t>
struct BnStatsParams {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* h = nullptr;  // [N, C, S]
  ChannelSplit cs;
  const T* gamma = nullptr;
  const T* beta = nullptr;
  double eps = 0.0;
  double* part = nullptr;  // [C * split][2]
  int* ticket = nullptr;
  int num_blocks = 0;
  T* coef_a = nullptr;
  T* coef_b = nullptr;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bn_stats_kernel(const BnStatsParams<scalar_t> p) {
  using T = at::opmath_type<scalar_t>;
  const int blk = static_cast<int>(blockIdx.x), tid = threadIdx.x;
  const ChannelSplit& cs = p.cs;
  double* red = dyn_smem<double>();
  {
    const int c = blk / cs.split, s = blk - c * cs.split;
    const scalar_t* hc = p.h + c * cs.S;
    const double shift = static_cast<double>(static_cast<T>(hc[0]));
    double acc[2] = {0.0, 0.0};  // sum d, sum d^2; d = h - shift
    for_chunk(cs, s, [&](int64_t off) {
      const double d = static_cast<double>(static_cast<T>(hc[off])) - shift;
      acc[0] += d;
      acc[1] += d * d;
    });
    double* tot = red + kSumScratch - 64;
    block_sums(acc, red, tot);
    if (tid < 2) p.part[int64_t(blk) * 2 + tid] = tot[tid];
  }
  if (!last_block(p.ticket, p.num_blocks)) return;
  for (int c = tid; c < cs.C; c += kThreads) {
    double sd = 0.0, sdd = 0.0;
    for (int s = 0; s < cs.split; ++s) {
      sd += load_cg(p.part + (int64_t(c) * cs.split + s) * 2);
      sdd += load_cg(p.part + (int64_t(c) * cs.split + s) * 2 + 1);
    }
    const double md = sd / double(cs.E);
    const double var = fmax(sdd / double(cs.E) - md * md, 0.0);
    const T mean = static_cast<T>(static_cast<double>(static_cast<T>(p.h[c * cs.S])) + md);
    const T a = static_cast<T>(static_cast<double>(p.gamma[c]) / ::sqrt(var + p.eps));
    p.coef_a[c] = a;
    p.coef_b[c] = sub_rn(p.beta[c], mul_rn(mean, a));
  }
}

// Step 5: per candidate j, sum over its output channels c of gamma / sqrt(var + eps) * sum((z - mean) g) +
// beta * sum(g), plus sum(x g) when residual; then sum(x g) (the identity path).
template <typename scalar_t, typename gscalar_t>
struct GateParams {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* z = nullptr;   // [K, N, Cout, S]
  const gscalar_t* g = nullptr;  // [N, Cout, S]
  const scalar_t* x = nullptr;   // the identity path: x of g's shape, or null
  const T* gamma = nullptr;      // [K * Cout]
  const T* beta = nullptr;
  ChannelSplit cs;  // over the Cout channels of one candidate
  int K = 0, id_blocks = 0, num_blocks = 0;
  int64_t z_step = 0, id_numel = 0, id_chunk = 1;
  double eps = 0.0;
  bool residual = false;
  double* part = nullptr;  // [K * Cout * split][4], then [id_blocks]
  double* vals = nullptr;  // [K * Cout]
  int* ticket = nullptr;
  float* result = nullptr;  // [K + 1]
};

template <typename scalar_t, typename gscalar_t>
__global__ void __launch_bounds__(kThreads) gate_reduce_kernel(const GateParams<scalar_t, gscalar_t> p) {
  using T = at::opmath_type<scalar_t>;
  const int blk = static_cast<int>(blockIdx.x), tid = threadIdx.x;
  const ChannelSplit& cs = p.cs;
  const int pair_blocks = p.K * cs.C * cs.split;
  double* red = dyn_smem<double>();
  double* tot = red + kSumScratch - 64;
  if (blk < pair_blocks) {
    const int pair = blk / cs.split, s = blk - pair * cs.split;
    const int j = pair / cs.C, c = pair - j * cs.C;
    const scalar_t* zc = p.z + j * p.z_step + c * cs.S;
    const gscalar_t* gc = p.g + c * cs.S;
    const double shift = static_cast<double>(static_cast<T>(zc[0]));
    double acc[4] = {0.0, 0.0, 0.0, 0.0};  // sum d, d^2, d g, g; d = z - shift
    for_chunk(cs, s, [&](int64_t off) {
      const double d = static_cast<double>(static_cast<T>(zc[off])) - shift;
      const double gv = static_cast<double>(static_cast<T>(gc[off]));
      acc[0] += d;
      acc[1] += d * d;
      acc[2] += d * gv;
      acc[3] += gv;
    });
    block_sums(acc, red, tot);
    if (tid < 4) p.part[int64_t(blk) * 4 + tid] = tot[tid];
  } else {
    const int ib = blk - pair_blocks;
    const int64_t end = (ib + 1) * p.id_chunk, e1 = end < p.id_numel ? end : p.id_numel;
    double acc[1] = {0.0};
    for (int64_t e = ib * p.id_chunk + tid; e < e1; e += kThreads) {
      acc[0] += static_cast<double>(static_cast<T>(p.x[e]) * static_cast<T>(p.g[e]));
    }
    block_sums(acc, red, tot);
    if (tid == 0) p.part[int64_t(pair_blocks) * 4 + ib] = tot[0];
  }
  if (!last_block(p.ticket, p.num_blocks)) return;
  const double count = double(cs.E);
  for (int pair = tid; pair < p.K * cs.C; pair += kThreads) {
    double m[4] = {0.0, 0.0, 0.0, 0.0};
    for (int s = 0; s < cs.split; ++s) {
#pragma unroll
      for (int v = 0; v < 4; ++v) m[v] += load_cg(p.part + (int64_t(pair) * cs.split + s) * 4 + v);
    }
    const double md = m[0] / count;
    const double var = fmax(m[1] / count - md * md, 0.0);
    const double zg = m[2] - md * m[3];  // sum (z - mean) g
    p.vals[pair] =
        static_cast<double>(p.gamma[pair]) / ::sqrt(var + p.eps) * zg + static_cast<double>(p.beta[pair]) * m[3];
  }
  if (tid == 0) {
    double identity = 0.0;
    for (int i = 0; i < p.id_blocks; ++i) identity += load_cg(p.part + int64_t(pair_blocks) * 4 + i);
    tot[0] = identity;
  }
  __syncthreads();
  const double identity = tot[0];
  for (int j = tid; j < p.K; j += kThreads) {
    double v = 0.0;
    for (int c = 0; c < cs.C; ++c) v += p.vals[int64_t(j) * cs.C + c];
    p.result[j] = static_cast<float>(v + (p.residual ? identity : 0.0));
  }
  if (tid == 0) p.result[p.K] = static_cast<float>(identity);
}

// ---------------------------------------------------------------------------------------------------------
// Ops: block_gate_grads.

template <typename scalar_t, typename gscalar_t>
void launch_gate_reduce(GateParams<scalar_t, gscalar_t> p, const at::Tensor& options_like) {
  const int64_t pair_blocks = int64_t(p.K) * p.cs.C * p.cs.split;
  const int64_t blocks = pair_blocks + p.id_blocks;
  TORCH_CHECK(blocks < INT32_MAX, "betanas::block_gate_grads: too many blocks");
  p.num_blocks = static_cast<int>(blocks);
  at::Tensor part = at::empty({pair_blocks * 4 + p.id_blocks + int64_t(p.K) * p.cs.C},
                              options_like.options().dtype(at::kDouble));
  p.part = part.mutable_data_ptr<double>();
  p.vals = p.part + pair_blocks * 4 + p.id_blocks;
  launch(gate_reduce_kernel<scalar_t, gscalar_t>, blocks, kSumScratch * sizeof(double), p);
}

at::Tensor block_gate_grads_cuda(const at::Tensor& x_in, const at::Tensor& grad_out_in, at::TensorList expand_weight,
                                 at::TensorList expand_bn_weight, at::TensorList expand_bn_bias,
                                 at::TensorList dw_weight, at::TensorList dw_bn_weight, at::TensorList dw_bn_bias,
                                 at::TensorList project_weight, at::TensorList project_bn_weight,
                                 at::TensorList project_bn_bias, int64_t stride, bool residual, int64_t act,
                                 double eps) {
  const char* op = "betanas::block_gate_grads";
  // The GEMMs below must run in x's dtype even when the caller is inside an autocast region.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const BlockCandidates b =
      check_block_gate_args(op, c10::kCUDA, x_in, grad_out_in, expand_weight, expand_bn_weight, expand_bn_bias,
                            dw_weight, dw_bn_weight, dw_bn_bias, project_weight, project_bn_weight, project_bn_bias,
                            stride, residual, act);
  const bool same_shape = x_in.sizes() == grad_out_in.sizes();
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto ot = stats_dtype(x);
  const int64_t K = static_cast<int64_t>(b.mid.size());
  at::Tensor result = at::empty({K + 1}, x.options().dtype(at::kFloat));
  if (K == 0 && !same_shape) return result.zero_();
  const int64_t HW = b.H * b.W, HoWo = b.Ho * b.Wo;
  const int64_t total_mid = std::accumulate(b.mid.begin(), b.mid.end(), int64_t(0));
  // grad_out is read in x's dtype when it has it, else in the statistics dtype (as the CPU kernel reads it).
  const bool g_native = grad_out_in.scalar_type() == x.scalar_type();
  const at::Tensor g = g_native ? grad_out_in.contiguous() : grad_out_in.to(ot).contiguous();
  at::Tensor ticket = at::zeros({2}, x.options().dtype(at::kInt));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_gate_grads_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    at::Tensor z, proj_gamma, proj_beta;
    if (K > 0) {
      // Every per-channel parameter and depthwise tap of every candidate in the statistics dtype, in one tensor.
      std::vector<at::Tensor> flat;
      for (at::TensorList list : {dw_weight, expand_bn_weight, expand_bn_bias, dw_bn_weight, dw_bn_bias,
                                  project_bn_weight, project_bn_bias}) {
        for (const at::Tensor& t : list) flat.push_back(t.detach().reshape(-1).to(ot));
      }
      const at::Tensor params = at::cat(flat);
      int64_t at_ = 0;
      auto take = [&](int64_t n) {
        at::Tensor v = params.narrow(0, at_, n);
        at_ += n;
        return v;
      };
      int64_t dw_numel = 0;
      for (int64_t j = 0; j < K; ++j) dw_numel += b.mid[j] * b.kernel[j] * b.kernel[j];
      const at::Tensor dw_taps = take(dw_numel), e_gamma = take(total_mid), e_beta = take(total_mid);
      const at::Tensor d_gamma = take(total_mid), d_beta = take(total_mid);
      proj_gamma = take(K * b.Cout);
      proj_beta = take(K * b.Cout);

      // The depthwise stages of all candidates as groups of one launch: group j is channels [off_j, off_j +
      // Cmid_j) of the dense [N, sum Cmid, .] tensors.
      DwGroups groups;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t c0 = groups.total_channels, k = b.kernel[j];
        groups.groups.push_back({b.N, b.mid[j], k, c0 * HW, total_mid * HW, c0 * HoWo, total_mid * HoWo, c0,
                                 groups.weight_numel});
        groups.total_channels += b.mid[j];
        groups.weight_numel += b.mid[j] * k * k;
      }
      at::Tensor y = at::empty({b.N, total_mid, HoWo}, x.options());
      {
        // 1. Expand: every candidate's 1x1 convolution in one GEMM, [sum Cmid, Cin] x [N, Cin, H*W].
        std::vector<at::Tensor> ew;
        for (int64_t j = 0; j < K; ++j) ew.push_back(expand_weight[j].detach().reshape({b.mid[j], b.Cin}));
        const at::Tensor h = at::matmul(at::cat(ew).to(x.scalar_type()), x.view({b.N, b.Cin, HW})).contiguous();
        // 2. The expand BN's batch statistics, folded into a, b per expanded channel.
        at::Tensor coef = at::empty({2, total_mid}, x.options().dtype(ot));
        BnStatsParams<scalar_t> sp;
        sp.h = h.const_data_ptr<scalar_t>();
        sp.cs = channel_split(b.N, total_mid, HW);
        sp.gamma = e_gamma.const_data_ptr<T>();
        sp.beta = e_beta.const_data_ptr<T>();
        sp.eps = eps;
        at::Tensor part = at::empty({total_mid * sp.cs.split * 2}, x.options().dtype(at::kDouble));
        sp.part = part.mutable_data_ptr<double>();
        sp.ticket = ticket.mutable_data_ptr<int>();
        const int64_t stat_blocks = total_mid * sp.cs.split;
        TORCH_CHECK(stat_blocks < INT32_MAX, op, ": too many blocks");
        sp.num_blocks = static_cast<int>(stat_blocks);
        sp.coef_a = coef.mutable_data_ptr<T>();
        sp.coef_b = sp.coef_a + total_mid;
        launch(bn_stats_kernel<scalar_t>, stat_blocks, kSumScratch * sizeof(double), sp);
        // 3. Every candidate's depthwise stage on act(a * h + b), in one launch.
        RaggedParams<scalar_t> p;
        p.act = static_cast<int>(act);
        p.eps = eps;
        p.x = sp.h;
        p.out = y.mutable_data_ptr<scalar_t>();
        p.w = dw_taps.const_data_ptr<T>();
        p.gamma = d_gamma.const_data_ptr<T>();
        p.beta = d_beta.const_data_ptr<T>();
        p.in_a = sp.coef_a;
        p.in_b = sp.coef_b;
        run_ragged<scalar_t>(groups, b.H, b.W, stride, /*backward=*/false, p, x.device());
      }  // the expanded activations are no longer needed
      // 4. Per candidate, the projection.
      z = at::empty({K, b.N, b.Cout, HoWo}, x.options());
      for (int64_t j = 0; j < K; ++j) {
        const at::Tensor wp = project_weight[j].detach().reshape({b.Cout, b.mid[j]}).to(x.scalar_type());
        at::Tensor zj = z.select(0, j);
        at::matmul_out(zj, wp, y.narrow(1, groups.groups[j].channel_offset, b.mid[j]));
      }
    }
    // 5. One reduction for every candidate and the identity path.
    auto reduce = [&](auto g_tag) {
      using gscalar_t = decltype(g_tag);
      GateParams<scalar_t, gscalar_t> gp;
      gp.z = K > 0 ? z.const_data_ptr<scalar_t>() : nullptr;
      gp.g = g.const_data_ptr<gscalar_t>();
      gp.x = same_shape ? x.const_data_ptr<scalar_t>() : nullptr;
      gp.gamma = K > 0 ? proj_gamma.const_data_ptr<T>() : nullptr;
      gp.beta = K > 0 ? proj_beta.const_data_ptr<T>() : nullptr;
      gp.cs = channel_split(b.N, b.Cout, HoWo);
      gp.K = static_cast<int>(K);
      gp.z_step = b.N * b.Cout * HoWo;
      gp.id_numel = same_shape ? x.numel() : 0;
      gp.id_blocks = same_shape ? static_cast<int>(std::min<int64_t>(kRedTargetBlocks, ceil_div(gp.id_numel,
                                                                                                 kRedMinChunk)))
                                : 0;
      gp.id_blocks = same_shape ? std::max(gp.id_blocks, 1) : 0;
      gp.id_chunk = same_shape ? ceil_div(gp.id_numel, gp.id_blocks) : 1;
      gp.eps = eps;
      gp.residual = residual;
      gp.ticket = ticket.mutable_data_ptr<int>() + 1;
      gp.result = result.mutable_data_ptr<float>();
      launch_gate_reduce(gp, x);
    };
    if (g_native) {
      reduce(scalar_t(0));
    } else {
      reduce(T(0));
    }
  });
  return result;
}

}  // namespace

#ifndef BETANAS_CUDA_EMULATION  // the emulation harness calls the entry points directly
TORCH_LIBRARY_IMPL(betanas, CUDA, m) {
  m.impl("dw_bn_act_grouped_train", &dw_bn_act_grouped_train_cuda);
  m.impl("dw_bn_act_grouped_train_backward", &dw_bn_act_grouped_train_backward_cuda);
  m.impl("block_gate_grads", &block_gate_grads_cuda);
}
#endif

}  // namespace betanas
