// CUDA kernels of the affine ops. The math is qatx/kernels/quant_math.h; this file only loops.
//
// Each thread handles chunks of 8 consecutive elements (one byte of the bit-packed mask), so
// the mask is written without atomics, and loads/stores are 16-byte vectors when the data is
// aligned. Indexing is 64-bit throughout. Kernels run on the current stream; qparams are read
// on the device, and their values are checked there (device-side assertion) so that the host
// never waits on the GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "qatx/ops/affine_impl.h"
#include "qatx/ops/cuda/cuda_kernels.cuh"

namespace qatx {
namespace ops {
namespace {

using cuda::kThreads;
using math::QParamIndex;

constexpr int kChunk = 8;

template <typename T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

// Loads n <= 8 elements as float; one or two 16-byte loads when the chunk is full and aligned.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* p, int n, bool aligned, float out[kChunk]) {
  if (aligned && n == kChunk) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < kChunk / kPer; ++k) {
      const Vec16<T> v = reinterpret_cast<const Vec16<T>*>(p)[k];
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[k * kPer + i] = static_cast<float>(v.v[i]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = j < n ? static_cast<float>(p[j]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* p, int n, bool aligned, const float in[kChunk]) {
  if (aligned && n == kChunk) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < kChunk / kPer; ++k) {
      Vec16<T> v;
#pragma unroll
      for (int i = 0; i < kPer; ++i) v.v[i] = static_cast<T>(in[k * kPer + i]);
      reinterpret_cast<Vec16<T>*>(p)[k] = v;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      if (j < n) p[j] = static_cast<T>(in[j]);
  }
}

// Per-element scale, 1/scale and zero point of a chunk; one load when the chunk lies in a
// single channel or group. Checks the values: the CUDA path cannot raise a host error
// without synchronising.
struct ChunkQParams {
  float s[kChunk], inv[kChunk], z[kChunk];

  __device__ __forceinline__ ChunkQParams(const float* scale, const float* zero_point, QParamIndex index, int64_t p0,
                                          int n, bool check_range, float qmin, float qmax) {
    const bool uniform = index.channels == 1 || p0 / index.inner == (p0 + n - 1) / index.inner;
    const int64_t c0 = index(p0);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const int64_t c = uniform || j >= n ? c0 : index(p0 + j);
      s[j] = scale[c];
      z[j] = zero_point[c];
      CUDA_KERNEL_ASSERT_MSG(math::is_valid_scale(s[j]), "qatx: scale must be finite and at least 2^-126");
      CUDA_KERNEL_ASSERT_MSG(!check_range || (z[j] >= qmin && z[j] <= qmax),
                             "qatx: zero_point must lie inside [quant_min, quant_max]");
      inv[j] = 1.0f / s[j];
    }
  }
};

__device__ __forceinline__ int chunk_size(int64_t numel, int64_t p0) {
  const int64_t left = numel - p0;
  return left < kChunk ? static_cast<int>(left) : kChunk;
}

#define QATX_CHUNK_LOOP(numel)                                                                   \
  for (int64_t chunk = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x,              \
               num_chunks = ((numel) + kChunk - 1) / kChunk;                                     \
       chunk < num_chunks; chunk += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T>
__global__ void fake_quantize_kernel(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ mask,
                                     int64_t numel, const float* __restrict__ scale,
                                     const float* __restrict__ zero_point, QParamIndex index, float qmin, float qmax,
                                     bool aligned) {
  QATX_CHUNK_LOOP(numel) {
    const int64_t p0 = chunk * kChunk;
    const int n = chunk_size(numel, p0);
    const ChunkQParams qp(scale, zero_point, index, p0, n, true, qmin, qmax);
    float v[kChunk];
    uint8_t flags[kChunk];
    load_chunk(x + p0, n, aligned, v);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      bool in_range;
      v[j] = math::fake_quantize_value(v[j], qp.s[j], qp.inv[j], qp.z[j], qmin, qmax, in_range);
      flags[j] = j < n && in_range;
    }
    store_chunk(y + p0, n, aligned, v);
    if (mask != nullptr) mask[chunk] = math::pack_bits8(flags);
  }
}

template <typename T, typename Int>
__global__ void quantize_kernel(const T* __restrict__ x, Int* __restrict__ out, int64_t numel,
                                const float* __restrict__ scale, const float* __restrict__ zero_point,
                                QParamIndex index, float qmin, float qmax, Int int_min, Int int_max, bool aligned) {
  QATX_CHUNK_LOOP(numel) {
    const int64_t p0 = chunk * kChunk;
    const int n = chunk_size(numel, p0);
    const ChunkQParams qp(scale, zero_point, index, p0, n, true, qmin, qmax);
    float v[kChunk];
    load_chunk(x + p0, n, aligned, v);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (j >= n) break;
      const float q = math::quantize_value(v[j], qp.inv[j], qp.z[j], qmin, qmax);
      CUDA_KERNEL_ASSERT_MSG(q == q, "qatx: quantize input contains NaN, which has no quantized value");
      out[p0 + j] = math::to_quantized_int<Int>(q, int_min, int_max);
    }
  }
}

template <typename Int, typename T>
__global__ void dequantize_kernel(const Int* __restrict__ q, T* __restrict__ y, int64_t numel,
                                  const float* __restrict__ scale, const float* __restrict__ zero_point,
                                  QParamIndex index, bool aligned) {
  QATX_CHUNK_LOOP(numel) {
    const int64_t p0 = chunk * kChunk;
    const int n = chunk_size(numel, p0);
    const ChunkQParams qp(scale, zero_point, index, p0, n, false, 0.0f, 0.0f);
    float v[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      v[j] = j < n ? math::dequantize_value(static_cast<float>(q[p0 + j]), qp.s[j], qp.z[j]) : 0.0f;
    store_chunk(y + p0, n, aligned, v);
  }
}

template <typename T>
__global__ void ste_backward_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ mask, T* __restrict__ out,
                                    int64_t numel, bool aligned) {
  QATX_CHUNK_LOOP(numel) {
    const int64_t p0 = chunk * kChunk;
    const int n = chunk_size(numel, p0);
    const uint8_t bits = mask[chunk];
    float v[kChunk];
    load_chunk(grad + p0, n, aligned, v);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = math::mask_bit(bits, j) ? v[j] : 0.0f;
    store_chunk(out + p0, n, aligned, v);
  }
}

#undef QATX_CHUNK_LOOP

// One thread per chunk of 8 elements, capped; the grid-stride loop covers the rest.
dim3 grid_for(int64_t numel) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  return cuda::capped_grid((chunks + kThreads - 1) / kThreads);
}

bool aligned16(const void* a, const void* b) {
  return reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

}  // namespace

void CudaBackend::fake_quantize(const at::Tensor& x, at::Tensor& out, at::Tensor& mask, const at::Tensor& scale,
                                const at::Tensor& zero_point, QParamIndex index, int64_t quant_min,
                                int64_t quant_max) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t numel = x.numel();
  QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_fake_quantize_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    fake_quantize_kernel<scalar_t><<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        xp, yp, mask.defined() ? mask.mutable_data_ptr<uint8_t>() : nullptr, numel, scale.const_data_ptr<float>(),
        zero_point.const_data_ptr<float>(), index, static_cast<float>(quant_min), static_cast<float>(quant_max),
        aligned16(xp, yp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaBackend::quantize(const at::Tensor& x, at::Tensor& out, const at::Tensor& scale,
                           const at::Tensor& zero_point, QParamIndex index, int64_t quant_min, int64_t quant_max) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t numel = x.numel();
  QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_quantize_cuda", [&] {
    dispatch_int_dtype(out.scalar_type(), [&](auto int_tag) {
      using Int = decltype(int_tag);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      quantize_kernel<scalar_t, Int><<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          xp, out.mutable_data_ptr<Int>(), numel, scale.const_data_ptr<float>(), zero_point.const_data_ptr<float>(),
          index, static_cast<float>(quant_min), static_cast<float>(quant_max), static_cast<Int>(quant_min),
          static_cast<Int>(quant_max), aligned16(xp, xp));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void CudaBackend::dequantize(const at::Tensor& q, at::Tensor& out, const at::Tensor& scale,
                             const at::Tensor& zero_point, QParamIndex index) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t numel = q.numel();
  QATX_DISPATCH_FLOAT(out.scalar_type(), "qatx_dequantize_cuda", [&] {
    dispatch_int_dtype(q.scalar_type(), [&](auto int_tag) {
      using Int = decltype(int_tag);
      scalar_t* yp = out.mutable_data_ptr<scalar_t>();
      dequantize_kernel<Int, scalar_t><<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          q.const_data_ptr<Int>(), yp, numel, scale.const_data_ptr<float>(), zero_point.const_data_ptr<float>(),
          index, aligned16(yp, yp));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void CudaBackend::ste_backward(const at::Tensor& grad, const at::Tensor& mask, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t numel = grad.numel();
  QATX_DISPATCH_FLOAT(grad.scalar_type(), "qatx_ste_backward_cuda", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    ste_backward_kernel<scalar_t><<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        gp, mask.const_data_ptr<uint8_t>(), op, numel, aligned16(gp, op));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(qatx, CUDA, m) { AffineKernels<CudaBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
