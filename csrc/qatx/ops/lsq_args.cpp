#include "qatx/ops/lsq_args.h"

#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>

#include <cmath>

#include "qatx/kernels/quant_math.h"

namespace qatx {
namespace ops {

Granularity lsq_granularity(const at::Tensor& input, const at::Tensor& scale, int64_t axis, const char* op) {
  const Granularity per_channel = input.dim() >= 1 ? Granularity::per_channel(input, axis, op) : Granularity{};
  if (scale.sym_numel() == 1) return Granularity::per_tensor();
  TORCH_CHECK(input.dim() >= 1, op, ": a 0-dim input needs a scale with one element (per-tensor), got shape ",
              scale.sym_sizes());
  return per_channel;
}

void check_grad_factor(double grad_factor, const char* op) {
  TORCH_CHECK(std::isfinite(grad_factor) && grad_factor > 0.0, op, ": grad_factor=", grad_factor,
              " must be finite and positive (e.g. 1 / sqrt(numel * quant_max))");
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op) {
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output must have the input's dtype (",
              input.scalar_type(), "), got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output must be on the input's device (",
              input.device(), "), got ", grad_output.device());
  TORCH_CHECK(grad_output.sym_sizes() == input.sym_sizes(), op, ": grad_output must have the input's shape ",
              input.sym_sizes(), ", got ", grad_output.sym_sizes());
}

at::Tensor rounded_zero_point(const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
  // clamp keeps NaN (a CPU check or a CUDA device assertion reports it); round is half to even.
  return zero_point.to(at::kFloat).clamp(quant_min, quant_max).round().contiguous();
}

PactRange pact_range(int64_t bits, bool is_signed, const char* op) {
  TORCH_CHECK(bits >= 2 && bits <= 16, op, ": bits=", bits, " must lie inside [2, 16]");
  const int64_t levels = math::pact_levels(bits, is_signed);
  return {levels, is_signed ? -levels : 0, levels};
}

void check_alpha(const at::Tensor& input, const at::Tensor& alpha, const char* op) {
  TORCH_CHECK(alpha.device() == input.device(), op, ": alpha must be on the input's device (", input.device(),
              "), got ", alpha.device());
  TORCH_CHECK(alpha.scalar_type() == at::kFloat, op, ": alpha must be torch.float32 (a learnable parameter), got ",
              alpha.scalar_type());
  TORCH_CHECK(alpha.sym_numel() == 1, op, ": alpha must have one element, got shape ", alpha.sym_sizes());
}

void check_alpha_value_cpu(const at::Tensor& alpha, int64_t levels, const char* op) {
  const float a = alpha.contiguous().const_data_ptr<float>()[0];
  TORCH_CHECK(std::isfinite(a) && a > 0.0f && math::is_valid_scale(a / static_cast<float>(levels)), op, ": alpha=", a,
              " must be positive and finite, and alpha / ", levels, " (the scale) at least 2^-126 (",
              math::kMinScale, ")");
}

at::Tensor pact_scale(const at::Tensor& alpha, int64_t levels) {
  // alpha / levels in float64, then rounded to float32, equals the float32 division fl32(alpha /
  // levels) whichever way the float64 quotient is formed (division, or a product with 1 / levels
  // as ATen may do for a scalar divisor): a float32 alpha over an integer below 2^16 is never
  // within 2^-42 (relative) of a float32 rounding boundary, so errors of a few float64 ulps
  // never change the rounding. No host synchronisation, any device.
  return alpha.to(at::kDouble).div(static_cast<double>(levels)).to(at::kFloat).reshape({1}).contiguous();
}

}  // namespace ops
}  // namespace qatx
