// CUDA kernels of qatx::_observe_min_max, on the current stream and without a host
// synchronisation: the qparams stay on the device.
//
// The input is seen in memory order as [outer, channels, inner]; channel c has outer * inner
// elements, element e of it at memory position ((e / inner) * channels + c) * inner + e % inner.
// 1. partial_ranges_kernel: each block reduces one chunk of one channel (non-finite values read
//    as 0) to a partial minimum and maximum (warp shuffles, then shared memory).
// 2. finish_kernel: one thread per channel merges its partials, updates the running range and
//    writes scale and zero_point (kernels/quant_math.h).
// Min and max do not depend on the order of evaluation, so the result is deterministic.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "qatx/ops/cuda/cuda_kernels.cuh"
#include "qatx/ops/observe_impl.h"

namespace qatx {
namespace ops {
namespace {

using cuda::kThreads;
constexpr int kWarp = 32;

template <typename T>
__global__ void partial_ranges_kernel(const T* __restrict__ x, math::QParamRuns r, int64_t chunk, int64_t chunks,
                                      float* __restrict__ part_lo, float* __restrict__ part_hi) {
  __shared__ float s_lo[kThreads / kWarp], s_hi[kThreads / kWarp];
  const int64_t per_channel = r.outer * r.inner;
  for (int64_t b = blockIdx.x; b < r.channels * chunks; b += gridDim.x) {
    const int64_t c = b / chunks;
    const int64_t e0 = (b % chunks) * chunk;
    const int64_t e1 = e0 + chunk < per_channel ? e0 + chunk : per_channel;
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
      const int64_t p = r.channels == 1 ? e : ((e / r.inner) * r.channels + c) * r.inner + e % r.inner;
      const float v = math::finite_or_zero(static_cast<float>(x[p]));
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      lo = fminf(lo, __shfl_down_sync(0xffffffffu, lo, offset));
      hi = fmaxf(hi, __shfl_down_sync(0xffffffffu, hi, offset));
    }
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (lane == 0) s_lo[warp] = lo, s_hi[warp] = hi;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kThreads / kWarp; ++w) lo = fminf(lo, s_lo[w]), hi = fmaxf(hi, s_hi[w]);
      part_lo[b] = lo;
      part_hi[b] = hi;
    }
    __syncthreads();  // s_lo / s_hi are reused by the next chunk
  }
}

__global__ void finish_kernel(const float* __restrict__ part_lo, const float* __restrict__ part_hi, int64_t channels,
                              int64_t chunks, float c, int64_t quant_min, int64_t quant_max, bool symmetric,
                              float* __restrict__ min_val, float* __restrict__ max_val, float* __restrict__ scale,
                              int32_t* __restrict__ zero_point) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < channels;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    math::Range batch{INFINITY, -INFINITY};
    for (int64_t j = 0; j < chunks; ++j) {
      batch.lo = fminf(batch.lo, part_lo[k * chunks + j]);
      batch.hi = fmaxf(batch.hi, part_hi[k * chunks + j]);
    }
    const math::Range run = math::update_running_range({min_val[k], max_val[k]}, batch, c);
    min_val[k] = run.lo;
    max_val[k] = run.hi;
    const math::RangeQParams q = math::qparams_from_range(run.lo, run.hi, quant_min, quant_max, symmetric);
    scale[k] = q.scale;
    zero_point[k] = q.zero_point;
  }
}

struct CudaObserveBackend {
  static constexpr bool kRunsKernels = true;
  static void observe(const at::Tensor& x, math::QParamRuns r, at::Tensor& min_val, at::Tensor& max_val,
                      at::Tensor& scale, at::Tensor& zero_point, float c, int64_t quant_min, int64_t quant_max,
                      bool symmetric) {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t per_channel = r.outer * r.inner;
    // Enough chunks to fill the GPU a few times over, each of at least 4096 elements.
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t wanted = std::max<int64_t>(1, (4 * sms + r.channels - 1) / r.channels);
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(wanted, (per_channel + 4095) / 4096));
    const int64_t chunk = (per_channel + chunks - 1) / chunks;
    const at::Tensor partials = at::empty({2, r.channels * chunks}, x.options().dtype(at::kFloat));
    float* part_lo = partials.mutable_data_ptr<float>();
    float* part_hi = part_lo + r.channels * chunks;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_observe_cuda", [&] {
      partial_ranges_kernel<scalar_t><<<cuda::capped_grid(r.channels * chunks), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), r, chunk, chunks, part_lo, part_hi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    finish_kernel<<<cuda::capped_grid((r.channels + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        part_lo, part_hi, r.channels, chunks, c, quant_min, quant_max, symmetric, min_val.mutable_data_ptr<float>(),
        max_val.mutable_data_ptr<float>(), scale.mutable_data_ptr<float>(), zero_point.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CUDA, m) { m.impl("_observe_min_max", &ObserveKernels<CudaObserveBackend>::observe); }

}  // namespace ops
}  // namespace qatx
