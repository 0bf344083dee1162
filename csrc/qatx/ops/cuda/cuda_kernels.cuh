// What the CUDA kernel files share: block size, grid sizing, the device-side assertion macro,
// the dtype dispatch, and the affine backend (whose fake-quantize kernel the learnable
// quantizers reuse for their forward, so both are bit-identical by construction).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

#include "qatx/kernels/quant_math.h"
#include "qatx/ops/dispatch.h"

#ifndef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif


namespace qatx {
namespace ops {
namespace cuda {

constexpr int kThreads = 256;

// At most `blocks_wanted` blocks and enough to fill the GPU several times over; kernels loop
// (grid-stride) over whatever work the grid does not cover at once.
inline dim3 capped_grid(int64_t blocks_wanted) {
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks_wanted, cap))));
}

}  // namespace cuda

// The CUDA kernels of the affine ops (ops/cuda/affine_cuda.cu); the Backend of AffineKernels.
struct CudaBackend {
  static constexpr bool kRunsKernels = true;
  static constexpr bool kChecksValuesOnHost = false;

  static void fake_quantize(const at::Tensor& x, at::Tensor& out, at::Tensor& mask, const at::Tensor& scale,
                            const at::Tensor& zero_point, math::QParamIndex index, int64_t quant_min,
                            int64_t quant_max);
  static void quantize(const at::Tensor& x, at::Tensor& out, const at::Tensor& scale, const at::Tensor& zero_point,
                       math::QParamIndex index, int64_t quant_min, int64_t quant_max);
  static void dequantize(const at::Tensor& q, at::Tensor& out, const at::Tensor& scale, const at::Tensor& zero_point,
                         math::QParamIndex index);
  static void ste_backward(const at::Tensor& grad, const at::Tensor& mask, at::Tensor& out);
};

}  // namespace ops
}  // namespace qatx
