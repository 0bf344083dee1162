// CUDA kernels of the learnable quantizers (LSQ, LSQ+, PACT). The forward passes are the affine
// fake-quantize kernel (cuda_kernels.cuh, via lsq_impl.h); this file holds the backward passes.
// The math is qatx/kernels/quant_math.h; this file only loops.
//
// A backward pass is one kernel over the input plus one small kernel over the partial sums:
//   1. each thread block takes tiles of math::ReductionTiling (grid-stride), recomputes each
//      element's quantization, writes grad_input, and reduces the qparam gradient terms of the
//      tile per channel in a fixed order (float32 terms, float64 sums: per thread in element
//      order, then a fixed shuffle tree or a fixed sequential sum) into one partial per channel;
//   2. one warp per qparam adds its partials in a fixed order and writes the float32 gradient.
// The tiles depend only on the shape, so the result does not depend on the grid size; there are
// no atomics, no host synchronisation (qparam values are checked by device-side assertions),
// the kernels run on the current stream and index with 64 bits. Partials take at most
// numel / 128 + 2 channels doubles.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "qatx/ops/cuda/cuda_kernels.cuh"
#include "qatx/ops/lsq_impl.h"

namespace qatx {
namespace ops {
namespace {

using cuda::kThreads;
using math::ReductionTile;
using math::ReductionTiling;

constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;

// Row segments over several channels of at most kThreads elements (one per thread), long runs
// in chunks of 16 * kThreads elements, and at least 512 elements per channel in a tile over
// short runs.
ReductionTiling cuda_tiling(math::QParamIndex index, int64_t numel) {
  return math::make_reduction_tiling(math::qparam_runs(index, numel), kThreads, 16 * kThreads, 512);
}

// LSQ / LSQ+ element: grad_input, the scale term and (kZeroPoint) the zero-point term.
template <bool kZeroPoint>
struct LsqElement {
  static constexpr int kSums = kZeroPoint ? 2 : 1;
  const float* scale;
  const float* zero_point;  // rounded
  float qmin, qmax;

  struct Channel {
    float s, inv, z;
  };
  __device__ __forceinline__ Channel channel(int64_t c) const {
    const float s = scale[c];
    const float z = zero_point[c];
    CUDA_KERNEL_ASSERT_MSG(math::is_valid_scale(s), "qatx: scale must be finite and at least 2^-126");
    CUDA_KERNEL_ASSERT_MSG(z == z, "qatx: zero_point must not be NaN");
    return {s, 1.0f / s, z};
  }
  template <typename T>
  __device__ __forceinline__ void operator()(const Channel& c, const T* x, const T* g, T* gx, int64_t p,
                                             double acc[kSums]) const {
    const T gp = g[p];
    const math::LsqGradTerms t =
        math::lsq_grad_terms(static_cast<float>(x[p]), static_cast<float>(gp), c.s, c.inv, c.z, qmin, qmax);
    gx[p] = t.in_range ? gp : T(0);
    acc[0] += t.scale;
    if constexpr (kZeroPoint) acc[1] += t.zero_point;
  }
};

// PACT element: grad_input and the alpha term.
struct PactElement {
  static constexpr int kSums = 1;
  const float* alpha;
  bool is_signed;

  struct Channel {
    float alpha;
  };
  __device__ __forceinline__ Channel channel(int64_t) const {
    const float a = alpha[0];
    CUDA_KERNEL_ASSERT_MSG(math::is_valid_scale(a), "qatx: alpha must be positive and finite");
    return {a};
  }
  template <typename T>
  __device__ __forceinline__ void operator()(const Channel& c, const T* x, const T* g, T* gx, int64_t p,
                                             double acc[1]) const {
    const float xf = static_cast<float>(x[p]);
    const T gp = g[p];
    gx[p] = math::pact_in_range(xf, c.alpha, is_signed) ? gp : T(0);
    acc[0] += math::pact_alpha_term(xf, static_cast<float>(gp), c.alpha, is_signed);
  }
};

// Sum over the block of one value per thread, in a fixed order (shuffle tree within each warp,
// then the warp totals in order); the total is valid in thread 0. smem holds kWarps doubles.
__device__ __forceinline__ double block_sum(double v, double* smem) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) total += smem[w];
  __syncthreads();  // smem is reused by the next call
  return total;
}

// Pass 1: grad_input, and partials[k][tile.partial_row][channel] for each tile.
template <typename T, typename Element>
__global__ void backward_kernel(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ gx,
                                ReductionTiling tiling, Element element, double* __restrict__ partials) {
  constexpr int kSums = Element::kSums;
  __shared__ double smem[kSums][kThreads];
  const int t = threadIdx.x;
  const int64_t rows = tiling.partial_rows();
  for (int64_t index = blockIdx.x; index < tiling.num_tiles(); index += gridDim.x) {
    const ReductionTile tile = tiling.tile(index);
    const int64_t tile_channels = tile.c1 - tile.c0;
    const int64_t segment = tile_channels * (tile.i1 - tile.i0);
    double acc[kSums];
    for (int k = 0; k < kSums; ++k) acc[k] = 0.0;
    if (tile_channels == 1) {
      // One channel: thread t takes positions t, t + kThreads, ... of each row segment (coalesced).
      const auto qp = element.channel(tile.c0);
      for (int64_t o = tile.o0; o < tile.o1; ++o) {
        const int64_t base = (o * tiling.channels + tile.c0) * tiling.inner + tile.i0;
        for (int64_t e = t; e < segment; e += kThreads) element(qp, x, g, gx, base + e, acc);
      }
      for (int k = 0; k < kSums; ++k) {
        const double total = block_sum(acc[k], smem[k]);
        if (t == 0) partials[(k * rows + tile.partial_row) * tiling.channels + tile.c0] = total;
      }
    } else {
      // Whole inner runs of several channels, segment <= kThreads: thread t keeps position
      // t % segment (so one channel) and takes every lanes-th row, starting at row t / segment.
      const int64_t lanes = kThreads / segment;
      const int64_t e = t % segment;
      const int64_t lane = t / segment;
      if (lane < lanes) {
        const auto qp = element.channel(tile.c0 + e / tiling.inner);
        for (int64_t o = tile.o0 + lane; o < tile.o1; o += lanes)
          element(qp, x, g, gx, (o * tiling.channels + tile.c0) * tiling.inner + e, acc);
      }
      for (int k = 0; k < kSums; ++k) smem[k][t] = acc[k];
      __syncthreads();
      if (t < tile_channels) {
        for (int k = 0; k < kSums; ++k) {
          double total = 0.0;
          for (int64_t l = 0; l < lanes; ++l)
            for (int64_t i = 0; i < tiling.inner; ++i) total += smem[k][l * segment + t * tiling.inner + i];
          partials[(k * rows + tile.partial_row) * tiling.channels + tile.c0 + t] = total;
        }
      }
      __syncthreads();
    }
  }
}

// Pass 2: out_k[c] = float32(factor * sum of partials[k][r][c] over r). One warp per (k, c):
// lane l adds rows r = l (mod 32) in order, then a fixed shuffle tree.
__global__ void sum_partials_kernel(const double* __restrict__ partials, int64_t rows, int64_t channels, int sums,
                                    double factor, float* __restrict__ out0, float* __restrict__ out1) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t w = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp; w < sums * channels;
       w += warps) {
    const int64_t k = w / channels;
    const int64_t c = w % channels;
    const double* p = partials + k * rows * channels + c;
    double total = 0.0;
    for (int64_t r = lane; r < rows; r += kWarp) total += p[r * channels];
    for (int offset = kWarp / 2; offset > 0; offset /= 2) total += __shfl_down_sync(0xffffffffu, total, offset);
    if (lane == 0) (k == 0 ? out0 : out1)[c] = static_cast<float>(factor * total);
  }
}

template <typename T, typename Element>
void run_backward(const at::Tensor& x, const at::Tensor& grad, at::Tensor& grad_input, const ReductionTiling& tiling,
                  const Element& element, double factor, at::Tensor& out0, at::Tensor* out1) {
  const at::Tensor partials =
      at::empty({Element::kSums, tiling.partial_rows(), tiling.channels}, x.options().dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  backward_kernel<T, Element><<<cuda::capped_grid(tiling.num_tiles()), kThreads, 0, stream>>>(
      x.const_data_ptr<T>(), grad.const_data_ptr<T>(), grad_input.mutable_data_ptr<T>(), tiling, element,
      partials.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t warps = Element::kSums * tiling.channels;
  sum_partials_kernel<<<cuda::capped_grid((warps + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      partials.const_data_ptr<double>(), tiling.partial_rows(), tiling.channels, Element::kSums, factor,
      out0.mutable_data_ptr<float>(), out1 != nullptr ? out1->mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct LsqCudaBackend : CudaBackend {
  static void lsq_backward(const at::Tensor& x, const at::Tensor& grad, at::Tensor& grad_input,
                           const at::Tensor& scale, const at::Tensor& zero_point, math::QParamIndex index,
                           int64_t quant_min, int64_t quant_max, double grad_factor, at::Tensor& grad_scale,
                           at::Tensor& grad_zero_point) {
    const c10::cuda::CUDAGuard guard(x.device());
    const ReductionTiling tiling = cuda_tiling(index, x.numel());
    const float* sp = scale.const_data_ptr<float>();
    const float* zp = zero_point.const_data_ptr<float>();
    const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
    QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_lsq_backward_cuda", [&] {
      if (grad_zero_point.defined())
        run_backward<scalar_t>(x, grad, grad_input, tiling, LsqElement<true>{sp, zp, qmin, qmax}, grad_factor,
                               grad_scale, &grad_zero_point);
      else
        run_backward<scalar_t>(x, grad, grad_input, tiling, LsqElement<false>{sp, zp, qmin, qmax}, grad_factor,
                               grad_scale, nullptr);
    });
  }

  static void pact_backward(const at::Tensor& x, const at::Tensor& grad, at::Tensor& grad_input,
                            const at::Tensor& alpha, bool is_signed, at::Tensor& grad_alpha) {
    const c10::cuda::CUDAGuard guard(x.device());
    const ReductionTiling tiling = cuda_tiling(math::QParamIndex{x.numel(), 1}, x.numel());
    QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_pact_backward_cuda", [&] {
      run_backward<scalar_t>(x, grad, grad_input, tiling, PactElement{alpha.const_data_ptr<float>(), is_signed}, 1.0,
                             grad_alpha, nullptr);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CUDA, m) { LsqKernels<LsqCudaBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
