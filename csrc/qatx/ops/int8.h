// Public C++ API of the INT8 inference ops: typed calls through the dispatcher (CPU, CUDA and
// Meta kernels). Inputs are float32, or uint8 / int8 holding the quantized integers; with
// output_scale and output_zero_point the output is quantized to that grid (uint8 / int8).
// Formulas, rounding, saturation and errors: docs/ops.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace qatx {
namespace ops {

at::Tensor linear_int8(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                       int64_t input_quant_min, int64_t input_quant_max, const at::Tensor& weight,
                       const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                       const std::optional<at::Tensor>& bias = std::nullopt, bool relu = false,
                       const std::optional<at::Tensor>& output_scale = std::nullopt,
                       const std::optional<at::Tensor>& output_zero_point = std::nullopt,
                       int64_t output_quant_min = 0, int64_t output_quant_max = 255);

at::Tensor convolution_int8(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                            int64_t input_quant_min, int64_t input_quant_max, const at::Tensor& weight,
                            const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
                            bool relu = false,
                       const std::optional<at::Tensor>& output_scale = std::nullopt,
                       const std::optional<at::Tensor>& output_zero_point = std::nullopt,
                       int64_t output_quant_min = 0, int64_t output_quant_max = 255);

at::Tensor linear_int8_dynamic(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
                               const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias = std::nullopt,
                               bool per_row = false);

at::Tensor add_int8(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                    int64_t input_quant_min, int64_t input_quant_max, const at::Tensor& other,
                    const at::Tensor& other_scale, const at::Tensor& other_zero_point, int64_t other_quant_min,
                    int64_t other_quant_max, bool relu = false,
                       const std::optional<at::Tensor>& output_scale = std::nullopt,
                       const std::optional<at::Tensor>& output_zero_point = std::nullopt,
                       int64_t output_quant_min = 0, int64_t output_quant_max = 255);

// int8 [..., n] from 4-bit values packed two per byte (library.cpp).
at::Tensor unpack_int4(const at::Tensor& packed, int64_t n);

}  // namespace ops
}  // namespace qatx
