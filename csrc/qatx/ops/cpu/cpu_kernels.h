// What the CPU kernel files share: the multi-ISA compilation of the loops, the block size, the
// qparam views of a block, and the affine backend (whose fake-quantize loop the learnable
// quantizers reuse for their forward, so both are bit-identical by construction).
//
// The loops are compiled for AVX-512, AVX2 and baseline x86-64 and the best is picked at load
// time (GCC target_clones), so one binary runs everywhere and uses the machine's widest vectors.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "qatx/kernels/quant_math.h"
#include "qatx/ops/dispatch.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define QATX_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QATX_CPU_CLONES
#endif
#define QATX_ALWAYS_INLINE inline __attribute__((always_inline))


namespace qatx {
namespace ops {
namespace cpu {

// Elements per block: the unit of the vectorized inner loops, a multiple of 8 so that a block
// owns whole bytes of a bit-packed mask.
constexpr int64_t kBlock = 512;
// Elements per parallel task: large enough that thread start-up stays negligible.
constexpr int64_t kGrainElements = 1 << 15;

// The qparams of a block whose elements share one channel (or group).
struct UniformQParams {
  float s, inv, z;
  float scale(int64_t) const { return s; }
  float inv_scale(int64_t) const { return inv; }
  float zero_point(int64_t) const { return z; }
};

// The qparams of a block spanning several channels, gathered per element.
struct PerElementQParams {
  float s[kBlock], inv[kBlock], z[kBlock];
  float scale(int64_t j) const { return s[j]; }
  float inv_scale(int64_t j) const { return inv[j]; }
  float zero_point(int64_t j) const { return z[j]; }
};

}  // namespace cpu

// The CPU loops of the affine ops (ops/cpu/affine_cpu.cpp); the Backend of AffineKernels.
struct CpuBackend {
  static constexpr bool kRunsKernels = true;
  static constexpr bool kChecksValuesOnHost = true;

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
