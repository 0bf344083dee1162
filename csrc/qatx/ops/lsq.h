// Public C++ API of the learnable quantizers (LSQ, LSQ+, PACT): typed calls through the
// dispatcher, so they reach the CPU, CUDA and Meta kernels and record autograd exactly as calls
// from Python or TorchScript do. Formulas, rounding, gradients and errors: docs/ops.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace qatx {
namespace ops {

// ---- fake-quantize with learnable qparams (differentiable in input, scale, zero_point / alpha) ----
// LSQ (Esser et al. 2020) and LSQ+ (zero_point requiring grad; Bhalgat et al. 2020). Per-tensor
// when scale has one element, per-channel along axis otherwise.
at::Tensor fake_quantize_lsq(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                             int64_t axis, int64_t quant_min, int64_t quant_max, double grad_factor);
// LSQ per group of group_size consecutive elements of the last dimension.
at::Tensor fake_quantize_lsq_per_group(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                                       int64_t group_size, int64_t quant_min, int64_t quant_max, double grad_factor);
// PACT (Choi et al. 2018): fake-quantize clip(input, -alpha or 0, alpha) with `bits` bits.
at::Tensor fake_quantize_pact(const at::Tensor& input, const at::Tensor& alpha, int64_t bits, bool is_signed);

// ---- backward passes (one pass over the input; deterministic qparam gradients) ----
// (grad_input, grad_scale, grad_zero_point); grad_zero_point is undefined unless
// zero_point_requires_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> _fake_quantize_lsq_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t axis, int64_t quant_min, int64_t quant_max, double grad_factor, bool zero_point_requires_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> _fake_quantize_lsq_per_group_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t group_size, int64_t quant_min, int64_t quant_max, double grad_factor, bool zero_point_requires_grad);
// (grad_input, grad_alpha)
std::tuple<at::Tensor, at::Tensor> _fake_quantize_pact_backward(const at::Tensor& grad_output,
                                                                const at::Tensor& input, const at::Tensor& alpha,
                                                                int64_t bits, bool is_signed);

}  // namespace ops
}  // namespace qatx
