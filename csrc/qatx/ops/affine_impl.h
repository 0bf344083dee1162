// The device-independent part of the affine op kernels: argument checks, output allocation,
// qparam conversion. A backend (CPU, CUDA, Meta) supplies only the loops, so the three
// kernels of an op cannot disagree on what is valid or on the layout of what they return.
//
// A Backend provides:
//   static constexpr bool kRunsKernels;        false for Meta (shapes only)
//   static constexpr bool kChecksValuesOnHost;  CPU: check scale/zero_point values here;
//                                              CUDA checks them on the device (no sync)
//   static void fake_quantize(x, out, mask_or_undefined, scale_f, zero_point_f, index, qmin, qmax);
//   static void quantize(x, out, scale_f, zero_point_f, index, qmin, qmax);
//   static void dequantize(q, out, scale_f, zero_point_f, index);
//   static void ste_backward(grad, mask, out);
// x / q and out are dense with identical strides, so the loops walk memory linearly.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "qatx/ops/affine_args.h"
#include "qatx/ops/output_memory.h"

namespace qatx {
namespace ops {

template <class Backend>
struct AffineKernels {
  using Tensor = at::Tensor;

  static std::tuple<Tensor, Tensor> fake_quantize(const char* op, const Tensor& input, const Tensor& scale,
                                                  const Tensor& zero_point, const Granularity& g, int64_t quant_min,
                                                  int64_t quant_max, bool with_mask) {
    check_float_input(input, op);
    check_quant_range(quant_min, quant_max, op);
    check_qparams(input, scale, zero_point, g, op);
    Tensor out = empty_output_like(input, g, input.scalar_type());
    Tensor mask = with_mask ? empty_mask_for(input) : Tensor();
    if constexpr (Backend::kRunsKernels) {
      if (Backend::kChecksValuesOnHost) check_qparam_values_cpu(scale, zero_point, quant_min, quant_max, true, op);
      if (input.numel() > 0) {
        const Tensor x = dense_input_like_output(input, g);
        Backend::fake_quantize(x, out, mask, scale_as_float(scale), zero_point_as_float(zero_point),
                               qparam_index(x, g), quant_min, quant_max);
      }
    }
    return {out, mask};
  }

  static Tensor quantize(const char* op, const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                         const Granularity& g, int64_t quant_min, int64_t quant_max, at::ScalarType dtype) {
    check_float_input(input, op);
    check_quant_range_for_dtype(quant_min, quant_max, dtype, op);
    check_qparams(input, scale, zero_point, g, op);
    Tensor out = empty_output_like(input, g, dtype);
    if constexpr (Backend::kRunsKernels) {
      if (Backend::kChecksValuesOnHost) check_qparam_values_cpu(scale, zero_point, quant_min, quant_max, true, op);
      if (input.numel() > 0) {
        const Tensor x = dense_input_like_output(input, g);
        Backend::quantize(x, out, scale_as_float(scale), zero_point_as_float(zero_point), qparam_index(x, g),
                          quant_min, quant_max);
      }
    }
    return out;
  }

  static Tensor dequantize(const char* op, const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                           const Granularity& g, std::optional<at::ScalarType> output_dtype) {
    check_int_input(input, op);
    const at::ScalarType dtype = output_dtype.value_or(at::kFloat);
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                ": output_dtype must be torch.float32, torch.float16 or torch.bfloat16, got ", c10::toString(dtype));
    check_qparams(input, scale, zero_point, g, op);
    Tensor out = empty_output_like(input, g, dtype);
    if constexpr (Backend::kRunsKernels) {
      if (Backend::kChecksValuesOnHost) check_qparam_values_cpu(scale, zero_point, 0, 0, false, op);
      if (input.numel() > 0) {
        const Tensor q = dense_input_like_output(input, g);
        Backend::dequantize(q, out, scale_as_float(scale), zero_point_as_float(zero_point), qparam_index(q, g));
      }
    }
    return out;
  }

  static Tensor ste_backward(const Tensor& grad_output, const Tensor& mask) {
    constexpr const char* op = "qatx::_fake_quantize_ste_backward";
    check_float_input(grad_output, op, "grad_output");
    TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1, op,
                ": mask must be a 1-D torch.uint8 tensor, got ", mask.scalar_type(), " with shape ", mask.sym_sizes());
    TORCH_CHECK(mask.device() == grad_output.device(), op, ": mask must be on grad_output's device (",
                grad_output.device(), "), got ", mask.device());
    TORCH_CHECK(mask.sym_numel() == (grad_output.sym_numel() + 7) / 8, op, ": mask must have ceil(numel / 8) = ",
                (grad_output.sym_numel() + 7) / 8, " bytes for grad_output of shape ", grad_output.sym_sizes(),
                ", got ", mask.sym_numel());
    Tensor out = empty_like_output(grad_output, grad_output.options());
    if constexpr (Backend::kRunsKernels) {
      TORCH_CHECK(grad_output.is_non_overlapping_and_dense(), op,
                  ": grad_output must be dense (its memory order defines the mask's bit order)");
      if (grad_output.numel() > 0) Backend::ste_backward(grad_output, mask.contiguous(), out);
    }
    return out;
  }

  // --- one function per schema ---
  static Tensor fq_per_tensor(const Tensor& x, const Tensor& s, const Tensor& z, int64_t qmin, int64_t qmax) {
    return std::get<0>(fake_quantize("qatx::fake_quantize_per_tensor_affine", x, s, z, Granularity::per_tensor(),
                                     qmin, qmax, false));
  }
  static Tensor fq_per_channel(const Tensor& x, const Tensor& s, const Tensor& z, int64_t axis, int64_t qmin,
                               int64_t qmax) {
    constexpr const char* op = "qatx::fake_quantize_per_channel_affine";
    return std::get<0>(fake_quantize(op, x, s, z, Granularity::per_channel(x, axis, op), qmin, qmax, false));
  }
  static Tensor fq_per_group(const Tensor& x, const Tensor& s, const Tensor& z, int64_t group_size, int64_t qmin,
                             int64_t qmax) {
    return std::get<0>(fake_quantize("qatx::fake_quantize_per_group_affine", x, s, z,
                                     Granularity::per_group(group_size), qmin, qmax, false));
  }
  static std::tuple<Tensor, Tensor> fqm_per_tensor(const Tensor& x, const Tensor& s, const Tensor& z, int64_t qmin,
                                                   int64_t qmax) {
    return fake_quantize("qatx::fake_quantize_per_tensor_affine", x, s, z, Granularity::per_tensor(), qmin, qmax,
                         true);
  }
  static std::tuple<Tensor, Tensor> fqm_per_channel(const Tensor& x, const Tensor& s, const Tensor& z, int64_t axis,
                                                    int64_t qmin, int64_t qmax) {
    constexpr const char* op = "qatx::fake_quantize_per_channel_affine";
    return fake_quantize(op, x, s, z, Granularity::per_channel(x, axis, op), qmin, qmax, true);
  }
  static std::tuple<Tensor, Tensor> fqm_per_group(const Tensor& x, const Tensor& s, const Tensor& z,
                                                  int64_t group_size, int64_t qmin, int64_t qmax) {
    return fake_quantize("qatx::fake_quantize_per_group_affine", x, s, z, Granularity::per_group(group_size), qmin,
                         qmax, true);
  }
  static Tensor q_per_tensor(const Tensor& x, const Tensor& s, const Tensor& z, int64_t qmin, int64_t qmax,
                             at::ScalarType dtype) {
    return quantize("qatx::quantize_per_tensor_affine", x, s, z, Granularity::per_tensor(), qmin, qmax, dtype);
  }
  static Tensor q_per_channel(const Tensor& x, const Tensor& s, const Tensor& z, int64_t axis, int64_t qmin,
                              int64_t qmax, at::ScalarType dtype) {
    constexpr const char* op = "qatx::quantize_per_channel_affine";
    return quantize(op, x, s, z, Granularity::per_channel(x, axis, op), qmin, qmax, dtype);
  }
  static Tensor q_per_group(const Tensor& x, const Tensor& s, const Tensor& z, int64_t group_size, int64_t qmin,
                            int64_t qmax, at::ScalarType dtype) {
    return quantize("qatx::quantize_per_group_affine", x, s, z, Granularity::per_group(group_size), qmin, qmax,
                    dtype);
  }
  static Tensor dq_per_tensor(const Tensor& q, const Tensor& s, const Tensor& z,
                              std::optional<at::ScalarType> dtype) {
    return dequantize("qatx::dequantize_per_tensor_affine", q, s, z, Granularity::per_tensor(), dtype);
  }
  static Tensor dq_per_channel(const Tensor& q, const Tensor& s, const Tensor& z, int64_t axis,
                               std::optional<at::ScalarType> dtype) {
    constexpr const char* op = "qatx::dequantize_per_channel_affine";
    return dequantize(op, q, s, z, Granularity::per_channel(q, axis, op), dtype);
  }
  static Tensor dq_per_group(const Tensor& q, const Tensor& s, const Tensor& z, int64_t group_size,
                             std::optional<at::ScalarType> dtype) {
    return dequantize("qatx::dequantize_per_group_affine", q, s, z, Granularity::per_group(group_size), dtype);
  }

  static void register_all(torch::Library& m) {
    m.impl("fake_quantize_per_tensor_affine", &fq_per_tensor);
    m.impl("fake_quantize_per_channel_affine", &fq_per_channel);
    m.impl("fake_quantize_per_group_affine", &fq_per_group);
    m.impl("_fake_quantize_per_tensor_affine_with_mask", &fqm_per_tensor);
    m.impl("_fake_quantize_per_channel_affine_with_mask", &fqm_per_channel);
    m.impl("_fake_quantize_per_group_affine_with_mask", &fqm_per_group);
    m.impl("_fake_quantize_ste_backward", &ste_backward);
    m.impl("quantize_per_tensor_affine", &q_per_tensor);
    m.impl("quantize_per_channel_affine", &q_per_channel);
    m.impl("quantize_per_group_affine", &q_per_group);
    m.impl("dequantize_per_tensor_affine", &dq_per_tensor);
    m.impl("dequantize_per_channel_affine", &dq_per_channel);
    m.impl("dequantize_per_group_affine", &dq_per_group);
  }
};

}  // namespace ops
}  // namespace qatx
