// Argument checking and qparam preparation of the learnable quantizers (LSQ, LSQ+, PACT),
// shared by their CPU, CUDA and Meta kernels. The generic checks (dtypes, shapes, devices,
// quantization range, granularity) are the affine ones in affine_args.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "qatx/ops/affine_args.h"

namespace qatx {
namespace ops {

// fake_quantize_lsq's granularity: per-tensor when scale has one element, per-channel along
// `axis` otherwise. axis must lie in [-dim, dim) whenever the input has a dimension.
Granularity lsq_granularity(const at::Tensor& input, const at::Tensor& scale, int64_t axis, const char* op);
// grad_factor is finite and positive.
void check_grad_factor(double grad_factor, const char* op);
// grad_output has the input's shape, dtype and device.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op);

// The zero point the LSQ kernels use, forward and backward alike: rint(clamp(zero_point,
// quant_min, quant_max)) as a contiguous float32 tensor (round half to even, NaN stays NaN).
at::Tensor rounded_zero_point(const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max);

// PACT's quantization grid for `bits` in [2, 16]: scale alpha / levels, zero point 0.
struct PactRange {
  int64_t levels;     // 2^bits - 1 (unsigned) or 2^(bits-1) - 1 (signed)
  int64_t quant_min;  // 0 or -levels
  int64_t quant_max;  // levels
};
PactRange pact_range(int64_t bits, bool is_signed, const char* op);
// alpha: one float32 element on the input's device. Meta-safe.
void check_alpha(const at::Tensor& input, const at::Tensor& alpha, const char* op);
// CPU only (CUDA kernels assert on the device): alpha is finite and alpha / levels is a valid
// scale, [2^-126, FLT_MAX].
void check_alpha_value_cpu(const at::Tensor& alpha, int64_t levels, const char* op);
// The PACT scale fl32(alpha / levels) as a one-element float32 tensor.
at::Tensor pact_scale(const at::Tensor& alpha, int64_t levels);

}  // namespace ops
}  // namespace qatx
