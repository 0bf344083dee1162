// CUDA kernels of the histogram observer ops. The math (grid rule, exact rebinning, range
// searches) is qatx/kernels/histogram_math.h; this file only loops. No host synchronisation:
// the grid is decided on the device, between the kernels of one stream.
//
// observe, per batch:
//   1. finite min / max per channel: each block reduces a slice of one channel and folds it into
//      the channel's result with an integer atomicMin / atomicMax on an order-preserving
//      encoding of the float (min and max do not depend on the order);
//   2. one thread per channel updates bounds and grid (hist_update);
//   3. one thread per old bin moves its count to its bin in the new grid (exact merge);
//   4. each block bins a slice of one channel into a shared-memory histogram (when the bins fit)
//      and adds it to the global counts.
// Counts are added with 64-bit integer atomics, so the result is exact and deterministic.
//
// range: one block per channel; thread 0 prepares the channel's prefix sums, the threads evaluate
// the candidates (strided) and a block reduction picks the smallest (error, index).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "qatx/ops/cuda/cuda_kernels.cuh"
#include "qatx/ops/histogram_impl.h"

namespace qatx {
namespace ops {
namespace {

using cuda::kThreads;
using ull = unsigned long long;

// Order-preserving map float -> int32 (for finite values and +-Inf).
__device__ __forceinline__ int ordered(float f) {
  const int i = __float_as_int(f);
  return i >= 0 ? i : i ^ 0x7fffffff;
}
__device__ __forceinline__ float unordered(int i) { return __int_as_float(i >= 0 ? i : i ^ 0x7fffffff); }

// Memory position of element q of channel c in x seen as [outer, channels, inner].
struct ChannelLayout {
  int64_t channels, inner, per_channel;
  __device__ __forceinline__ int64_t position(int64_t c, int64_t q) const {
    if (channels == 1) return q;
    if (inner == 1) return q * channels + c;
    return ((q / inner) * channels + c) * inner + q % inner;
  }
};

__global__ void init_minmax_kernel(int* mm, int64_t channels) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c < channels) {
    mm[2 * c] = ordered(INFINITY);
    mm[2 * c + 1] = ordered(-INFINITY);
  }
}

template <typename T>
__global__ void minmax_kernel(const T* __restrict__ x, ChannelLayout layout, int* mm) {
  const int64_t c = blockIdx.y;
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t q = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; q < layout.per_channel;
       q += int64_t{gridDim.x} * blockDim.x) {
    const float v = static_cast<float>(x[layout.position(c, q)]);
    if (fabsf(v) <= 3.402823466e+38f) {
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  }
  __shared__ float s_lo[kThreads], s_hi[kThreads];
  s_lo[threadIdx.x] = lo;
  s_hi[threadIdx.x] = hi;
  __syncthreads();
  for (int step = kThreads / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) {
      s_lo[threadIdx.x] = fminf(s_lo[threadIdx.x], s_lo[threadIdx.x + step]);
      s_hi[threadIdx.x] = fmaxf(s_hi[threadIdx.x], s_hi[threadIdx.x + step]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    atomicMin(mm + 2 * c, ordered(s_lo[0]));
    atomicMax(mm + 2 * c + 1, ordered(s_hi[0]));
  }
}

__global__ void update_kernel(const int* __restrict__ mm, const int32_t* __restrict__ grid,
                              const float* __restrict__ bounds, int32_t* grid_out, float* bounds_out, int64_t channels,
                              int64_t bins) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c >= channels) return;
  // Exponents outside the admissible range (a corrupted state) are clamped.
  const int e = min(max(grid[2 * c], math::kHistMinExponent), 127);
  const math::HistUpdate u = math::hist_update(math::HistGrid{e, grid[2 * c + 1]}, bounds[2 * c], bounds[2 * c + 1],
                                               unordered(mm[2 * c]), unordered(mm[2 * c + 1]), bins);
  grid_out[2 * c] = u.grid.e;
  grid_out[2 * c + 1] = u.grid.a;
  bounds_out[2 * c] = u.lo;
  bounds_out[2 * c + 1] = u.hi;
}

__global__ void rebin_kernel(const int64_t* __restrict__ hist, const int32_t* __restrict__ grid,
                             const float* __restrict__ bounds, const int32_t* __restrict__ grid_out, int64_t* hist_out,
                             int64_t channels, int64_t bins) {
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < channels * bins;
       t += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = t / bins, i = t % bins;
    const int64_t n = hist[t];
    if (n == 0 || !(bounds[2 * c] <= bounds[2 * c + 1])) continue;
    const math::HistGrid from{min(max(grid[2 * c], math::kHistMinExponent), 127), grid[2 * c + 1]};
    const math::HistGrid to{grid_out[2 * c], grid_out[2 * c + 1]};
    int64_t j = math::hist_rebin_index(i, from, to);
    j = j < 0 ? 0 : (j >= bins ? bins - 1 : j);  // only for an inconsistent state
    atomicAdd(reinterpret_cast<ull*>(hist_out + c * bins + j), static_cast<ull>(n));
  }
}

// Bins per block-private shared histogram (32-bit counts, 32 KiB).
constexpr int64_t kSharedBins = 8192;

template <typename T, bool kShared>
__global__ void count_kernel(const T* __restrict__ x, ChannelLayout layout, const int32_t* __restrict__ grid,
                             int64_t* hist, int64_t bins) {
  extern __shared__ unsigned int s_counts[];
  const int64_t c = blockIdx.y;
  const float inv = math::exp2_int(-grid[2 * c]);
  const float a = static_cast<float>(grid[2 * c + 1]);
  int64_t* row = hist + c * bins;
  if (kShared) {
    for (int64_t j = threadIdx.x; j < bins; j += blockDim.x) s_counts[j] = 0;
    __syncthreads();
  }
  for (int64_t q = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; q < layout.per_channel;
       q += int64_t{gridDim.x} * blockDim.x) {
    const int32_t j = math::hist_bin(static_cast<float>(x[layout.position(c, q)]), inv, a, static_cast<float>(bins));
    if (j < bins) {
      if (kShared)
        atomicAdd(s_counts + j, 1u);
      else
        atomicAdd(reinterpret_cast<ull*>(row + j), 1ull);
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < bins; j += blockDim.x)
      if (s_counts[j] != 0) atomicAdd(reinterpret_cast<ull*>(row + j), static_cast<ull>(s_counts[j]));
  }
}

// Blocks per channel: enough to fill the GPU, at most 2^20 elements per block (so the 32-bit
// shared counts cannot overflow).
dim3 channel_grid(int64_t per_channel, int64_t channels) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = std::max<int64_t>(1, (sms * 8 + channels - 1) / channels);
  const int64_t needed = (per_channel + kThreads - 1) / kThreads;
  const int64_t floor_blocks = (per_channel + (int64_t{1} << 20) - 1) >> 20;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::max(floor_blocks, std::min(wanted, needed)))),
              static_cast<unsigned>(channels));
}

__global__ void range_kernel(const int64_t* __restrict__ hist, const int32_t* __restrict__ grid,
                             const float* __restrict__ bounds, math::HistSearchParams params, double* scratch,
                             int64_t c_begin, int64_t bins, float* lo_out, float* hi_out) {
  const int64_t c = c_begin + blockIdx.x;
  __shared__ math::HistSearch s_search;
  __shared__ double s_err[kThreads];
  __shared__ int64_t s_idx[kThreads];
  if (threadIdx.x == 0) {
    math::HistSearch s = math::make_hist_search(
        hist + c * bins, bins, math::HistGrid{min(max(grid[2 * c], math::kHistMinExponent), 127), grid[2 * c + 1]},
        bounds[2 * c], bounds[2 * c + 1], params, scratch + blockIdx.x * math::hist_scratch_size(bins));
    s.prepare();
    s_search = s;
  }
  __syncthreads();
  const math::HistSearch s = s_search;
  if (s.empty() || params.method == math::HistMethod::Percentile) {
    if (threadIdx.x == 0) {
      const math::HistRange r = s.empty() ? s.full_range() : s.percentile_range();
      lo_out[c] = r.lo;
      hi_out[c] = r.hi;
    }
    return;
  }
  double best = 0.0;
  int64_t best_i = -1;
  const int64_t n = s.num_candidates();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double e = s.candidate_error(i);
    if (math::hist_better(e, i, best, best_i)) best = e, best_i = i;
  }
  s_err[threadIdx.x] = best;
  s_idx[threadIdx.x] = best_i;
  __syncthreads();
  for (int step = kThreads / 2; step > 0; step /= 2) {
    if (threadIdx.x < step && s_idx[threadIdx.x + step] >= 0 &&
        math::hist_better(s_err[threadIdx.x + step], s_idx[threadIdx.x + step], s_err[threadIdx.x],
                          s_idx[threadIdx.x])) {
      s_err[threadIdx.x] = s_err[threadIdx.x + step];
      s_idx[threadIdx.x] = s_idx[threadIdx.x + step];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const math::HistRange r = s_idx[0] >= 0 ? s.candidate_range(s_idx[0]) : s.full_range();
    lo_out[c] = r.lo;
    hi_out[c] = r.hi;
  }
}

// Channels per range launch: bounds the scratch to 256 * (5 bins + 4) doubles.
constexpr int64_t kRangeChannelsPerLaunch = 256;

struct HistogramCudaBackend {
  static constexpr bool kRunsKernels = true;
  static constexpr bool kChecksValuesOnHost = false;

  static void observe(const at::Tensor& x, math::QParamIndex index, const at::Tensor& hist, const at::Tensor& grid,
                      const at::Tensor& bounds, at::Tensor& hist_out, at::Tensor& grid_out, at::Tensor& bounds_out) {
    const c10::cuda::CUDAGuard guard(x.device());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t channels = hist.size(0), bins = hist.size(1), numel = x.numel();
    const ChannelLayout layout{channels, index.inner, channels == 0 ? 0 : numel / channels};
    at::Tensor mm = at::empty({channels, 2}, grid.options());
    const unsigned channel_blocks = static_cast<unsigned>((channels + kThreads - 1) / kThreads);
    init_minmax_kernel<<<channel_blocks, kThreads, 0, stream>>>(mm.mutable_data_ptr<int>(), channels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 blocks = channel_grid(layout.per_channel, channels);
    if (numel > 0) {
      QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_histogram_minmax_cuda", [&] {
        minmax_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), layout,
                                                                 mm.mutable_data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    update_kernel<<<channel_blocks, kThreads, 0, stream>>>(
        mm.const_data_ptr<int>(), grid.const_data_ptr<int32_t>(), bounds.const_data_ptr<float>(),
        grid_out.mutable_data_ptr<int32_t>(), bounds_out.mutable_data_ptr<float>(), channels, bins);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    hist_out.zero_();
    rebin_kernel<<<cuda::capped_grid((channels * bins + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        hist.const_data_ptr<int64_t>(), grid.const_data_ptr<int32_t>(), bounds.const_data_ptr<float>(),
        grid_out.const_data_ptr<int32_t>(), hist_out.mutable_data_ptr<int64_t>(), channels, bins);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (numel == 0) return;
    QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_histogram_count_cuda", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      if (bins <= kSharedBins) {
        count_kernel<scalar_t, true><<<blocks, kThreads, bins * sizeof(unsigned int), stream>>>(
            xp, layout, grid_out.const_data_ptr<int32_t>(), hist_out.mutable_data_ptr<int64_t>(), bins);
      } else {
        count_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
            xp, layout, grid_out.const_data_ptr<int32_t>(), hist_out.mutable_data_ptr<int64_t>(), bins);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void range(const at::Tensor& hist, const at::Tensor& grid, const at::Tensor& bounds,
                    math::HistSearchParams params, at::Tensor& min_val, at::Tensor& max_val) {
    const c10::cuda::CUDAGuard guard(hist.device());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t channels = hist.size(0), bins = hist.size(1);
    const int64_t per_launch = std::min(channels, kRangeChannelsPerLaunch);
    at::Tensor scratch = at::empty({per_launch, math::hist_scratch_size(bins)}, hist.options().dtype(at::kDouble));
    for (int64_t c0 = 0; c0 < channels; c0 += per_launch) {
      const int64_t n = std::min(per_launch, channels - c0);
      range_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
          hist.const_data_ptr<int64_t>(), grid.const_data_ptr<int32_t>(), bounds.const_data_ptr<float>(), params,
          scratch.mutable_data_ptr<double>(), c0, bins, min_val.mutable_data_ptr<float>(),
          max_val.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CUDA, m) { HistogramKernels<HistogramCudaBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
