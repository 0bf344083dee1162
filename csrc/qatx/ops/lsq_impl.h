// The device-independent part of the learnable-quantizer kernels (LSQ, LSQ+, PACT): argument
// checks, output allocation, qparam preparation. A backend (CPU, CUDA, Meta) supplies only loops.
//
// The forward ops run the affine fake-quantize loop of the backend (Backend::fake_quantize,
// see affine_impl.h) with prepared qparams: LSQ with its rounded zero point, PACT with scale
// alpha / levels and zero point 0. So their outputs are bit-identical to
// qatx::fake_quantize_*_affine with those qparams.
//
// A Backend provides, besides kRunsKernels, kChecksValuesOnHost and fake_quantize:
//   static void lsq_backward(x, grad, grad_input, scale_f, zero_point_r, index, qmin, qmax,
//                            grad_factor, grad_scale, grad_zero_point_or_undefined);
//   static void pact_backward(x, grad, grad_input, alpha, is_signed, grad_alpha);
// x, grad and grad_input are dense with identical strides; scale_f / zero_point_r are
// contiguous float32 (the zero point already rounded); grad_scale / grad_zero_point /
// grad_alpha are contiguous float32 of the qparams' shape, indexed like the qparams.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "qatx/ops/lsq_args.h"

namespace qatx {
namespace ops {

template <class Backend>
struct LsqKernels {
  using Tensor = at::Tensor;

  // Checks shared by an LSQ forward and its backward.
  static void check_lsq(const char* op, const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                        const Granularity& g, int64_t quant_min, int64_t quant_max, double grad_factor) {
    check_float_input(input, op);
    check_quant_range(quant_min, quant_max, op);
    check_qparams(input, scale, zero_point, g, op, QParamDtypes::Learnable);
    check_grad_factor(grad_factor, op);
  }

  static Tensor lsq_forward(const char* op, const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                            const Granularity& g, int64_t quant_min, int64_t quant_max, double grad_factor) {
    check_lsq(op, input, scale, zero_point, g, quant_min, quant_max, grad_factor);
    Tensor out = empty_output_like(input, g, input.scalar_type());
    if constexpr (Backend::kRunsKernels) {
      if (Backend::kChecksValuesOnHost) check_qparam_values_cpu(scale, zero_point, quant_min, quant_max, false, op);
      if (input.numel() > 0) {
        const Tensor x = dense_input_like_output(input, g);
        Tensor no_mask;
        Backend::fake_quantize(x, out, no_mask, scale.contiguous(), rounded_zero_point(zero_point, quant_min, quant_max),
                               qparam_index(x, g), quant_min, quant_max);
      }
    }
    return out;
  }

  static std::tuple<Tensor, Tensor, Tensor> lsq_backward(const char* op, const Tensor& grad_output, const Tensor& input,
                                                         const Tensor& scale, const Tensor& zero_point,
                                                         const Granularity& g, int64_t quant_min, int64_t quant_max,
                                                         double grad_factor, bool zero_point_requires_grad) {
    check_lsq(op, input, scale, zero_point, g, quant_min, quant_max, grad_factor);
    check_grad_output(grad_output, input, op);
    Tensor grad_input = empty_output_like(input, g, input.scalar_type());
    Tensor grad_scale = at::empty_like(scale, at::MemoryFormat::Contiguous);
    Tensor grad_zero_point =
        zero_point_requires_grad ? at::empty_like(zero_point, at::MemoryFormat::Contiguous) : Tensor();
    if constexpr (Backend::kRunsKernels) {
      if (Backend::kChecksValuesOnHost) check_qparam_values_cpu(scale, zero_point, quant_min, quant_max, false, op);
      if (input.numel() == 0) {
        grad_scale.zero_();
        if (zero_point_requires_grad) grad_zero_point.zero_();
      } else {
        const Tensor x = dense_input_like_output(input, g);
        Backend::lsq_backward(x, in_layout_of(grad_output, x), grad_input, scale.contiguous(),
                              rounded_zero_point(zero_point, quant_min, quant_max), qparam_index(x, g), quant_min,
                              quant_max, grad_factor, grad_scale, grad_zero_point);
      }
    }
    return {grad_input, grad_scale, grad_zero_point};
  }

  static Tensor pact_forward(const Tensor& input, const Tensor& alpha, int64_t bits, bool is_signed) {
    constexpr const char* op = "qatx::fake_quantize_pact";
    check_float_input(input, op);
    check_alpha(input, alpha, op);
    const PactRange r = pact_range(bits, is_signed, op);
    const Granularity g = Granularity::per_tensor();
    Tensor out = empty_output_like(input, g, input.scalar_type());
    if constexpr (Backend::kRunsKernels) {
      if (Backend::kChecksValuesOnHost) check_alpha_value_cpu(alpha, r.levels, op);
      if (input.numel() > 0) {
        const Tensor x = dense_input_like_output(input, g);
        Tensor no_mask;
        Backend::fake_quantize(x, out, no_mask, pact_scale(alpha, r.levels),
                               at::zeros({1}, alpha.options()), qparam_index(x, g), r.quant_min, r.quant_max);
      }
    }
    return out;
  }

  static std::tuple<Tensor, Tensor> pact_backward(const Tensor& grad_output, const Tensor& input, const Tensor& alpha,
                                                  int64_t bits, bool is_signed) {
    constexpr const char* op = "qatx::_fake_quantize_pact_backward";
    check_float_input(input, op);
    check_alpha(input, alpha, op);
    check_grad_output(grad_output, input, op);
    const PactRange r = pact_range(bits, is_signed, op);
    const Granularity g = Granularity::per_tensor();
    Tensor grad_input = empty_output_like(input, g, input.scalar_type());
    Tensor grad_alpha = at::empty_like(alpha, at::MemoryFormat::Contiguous);
    if constexpr (Backend::kRunsKernels) {
      if (Backend::kChecksValuesOnHost) check_alpha_value_cpu(alpha, r.levels, op);
      if (input.numel() == 0) {
        grad_alpha.zero_();
      } else {
        const Tensor x = dense_input_like_output(input, g);
        Backend::pact_backward(x, in_layout_of(grad_output, x), grad_input, alpha.contiguous(), is_signed,
                               grad_alpha);
      }
    }
    return {grad_input, grad_alpha};
  }

  // --- one function per schema ---
  static Tensor fq_lsq(const Tensor& x, const Tensor& s, const Tensor& z, int64_t axis, int64_t qmin, int64_t qmax,
                       double grad_factor) {
    constexpr const char* op = "qatx::fake_quantize_lsq";
    return lsq_forward(op, x, s, z, lsq_granularity(x, s, axis, op), qmin, qmax, grad_factor);
  }
  static Tensor fq_lsq_per_group(const Tensor& x, const Tensor& s, const Tensor& z, int64_t group_size, int64_t qmin,
                                 int64_t qmax, double grad_factor) {
    return lsq_forward("qatx::fake_quantize_lsq_per_group", x, s, z, Granularity::per_group(group_size), qmin, qmax,
                       grad_factor);
  }
  static std::tuple<Tensor, Tensor, Tensor> lsq_bw(const Tensor& grad, const Tensor& x, const Tensor& s,
                                                   const Tensor& z, int64_t axis, int64_t qmin, int64_t qmax,
                                                   double grad_factor, bool zero_point_requires_grad) {
    constexpr const char* op = "qatx::_fake_quantize_lsq_backward";
    return lsq_backward(op, grad, x, s, z, lsq_granularity(x, s, axis, op), qmin, qmax, grad_factor,
                        zero_point_requires_grad);
  }
  static std::tuple<Tensor, Tensor, Tensor> lsq_per_group_bw(const Tensor& grad, const Tensor& x, const Tensor& s,
                                                             const Tensor& z, int64_t group_size, int64_t qmin,
                                                             int64_t qmax, double grad_factor,
                                                             bool zero_point_requires_grad) {
    return lsq_backward("qatx::_fake_quantize_lsq_per_group_backward", grad, x, s, z,
                        Granularity::per_group(group_size), qmin, qmax, grad_factor, zero_point_requires_grad);
  }

  static void register_all(torch::Library& m) {
    m.impl("fake_quantize_lsq", &fq_lsq);
    m.impl("fake_quantize_lsq_per_group", &fq_lsq_per_group);
    m.impl("fake_quantize_pact", &pact_forward);
    m.impl("_fake_quantize_lsq_backward", &lsq_bw);
    m.impl("_fake_quantize_lsq_per_group_backward", &lsq_per_group_bw);
    m.impl("_fake_quantize_pact_backward", &pact_backward);
  }
};

}  // namespace ops
}  // namespace qatx
