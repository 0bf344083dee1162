// The INT8 ops' shared kernel glue: every backend (CPU, CUDA, Meta) runs the same checks and
// allocates the same output; only `compute` differs. A backend provides
//   static constexpr bool kChecksValuesOnHost;
//   static at::Tensor linear(...), convolution(...), linear_dynamic(...)   (the computation)
//   static void add(input, ..., other, ..., relu, out)                    (writes out)
#pragma once

#include <torch/library.h>

#include "qatx/ops/affine_args.h"
#include "qatx/ops/int8_args.h"

namespace qatx {
namespace ops {

template <typename Backend>
struct Int8Kernels {
  static at::Tensor linear_int8(const at::Tensor& input, const at::Tensor& input_scale,
                                const at::Tensor& input_zero_point, int64_t quant_min, int64_t quant_max,
                                const at::Tensor& weight, const at::Tensor& weight_scale,
                                const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias, bool relu) {
    constexpr const char* op = "qatx::linear_int8";
    const c10::SymInt n = int8::check_linear(input, weight, op);
    int8::check_input_qparams(input, input_scale, input_zero_point, quant_min, quant_max, Backend::kChecksValuesOnHost,
                              op);
    const auto wq = int8::check_weight(input, weight, weight_scale, weight_zero_point, n, weight.sym_size(1), true,
                                       Backend::kChecksValuesOnHost, op);
    int8::check_bias(input, bias, n, at::kInt, op);
    return Backend::linear(input, input_scale, input_zero_point, quant_min, quant_max, weight, weight_scale,
                           weight_zero_point, bias, relu, wq);
  }

  static at::Tensor convolution_int8(const at::Tensor& input, const at::Tensor& input_scale,
                                     const at::Tensor& input_zero_point, int64_t quant_min, int64_t quant_max,
                                     const at::Tensor& weight, const at::Tensor& weight_scale,
                                     const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     bool transposed, at::IntArrayRef output_padding, int64_t groups, bool relu) {
    constexpr const char* op = "qatx::convolution_int8";
    const auto geo = int8::check_convolution(input, weight, stride, padding, dilation, transposed, output_padding,
                                             groups, op);
    int8::check_input_qparams(input, input_scale, input_zero_point, quant_min, quant_max, Backend::kChecksValuesOnHost,
                              op);
    int8::check_weight(input, weight, weight_scale, weight_zero_point, geo.out_channels, 0, false,
                       Backend::kChecksValuesOnHost, op);
    int8::check_bias(input, bias, geo.out_channels, at::kInt, op);
    return Backend::convolution(input, input_scale, input_zero_point, quant_min, quant_max, weight, weight_scale,
                                weight_zero_point, bias, geo, transposed, groups, relu);
  }

  static at::Tensor linear_int8_dynamic(const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                                        const std::optional<at::Tensor>& bias, bool per_row) {
    constexpr const char* op = "qatx::linear_int8_dynamic";
    const c10::SymInt n = int8::check_linear(input, weight, op);
    int8::check_weight(input, weight, weight_scale, weight_zero_point, n, weight.sym_size(1), false,
                       Backend::kChecksValuesOnHost, op);
    int8::check_bias(input, bias, n, at::kFloat, op);
    return Backend::linear_dynamic(input, weight, weight_scale, weight_zero_point, bias, per_row);
  }

  static at::Tensor add_int8(const at::Tensor& input, const at::Tensor& input_scale,
                             const at::Tensor& input_zero_point, int64_t input_quant_min, int64_t input_quant_max,
                             const at::Tensor& other, const at::Tensor& other_scale, const at::Tensor& other_zero_point,
                             int64_t other_quant_min, int64_t other_quant_max, bool relu) {
    constexpr const char* op = "qatx::add_int8";
    int8::check_input_qparams(input, input_scale, input_zero_point, input_quant_min, input_quant_max,
                              Backend::kChecksValuesOnHost, op);
    int8::check_input_qparams(other, other_scale, other_zero_point, other_quant_min, other_quant_max,
                              Backend::kChecksValuesOnHost, op, "other");
    int8::check_add(input, other, op);
    at::Tensor out = empty_output_like(input, Granularity::per_tensor(), at::kFloat);
    Backend::add(input, input_scale, input_zero_point, input_quant_min, input_quant_max, other, other_scale,
                 other_zero_point, other_quant_min, other_quant_max, relu, out);
    return out;
  }

  static void register_all(torch::Library& m) {
    m.impl("linear_int8", &linear_int8);
    m.impl("convolution_int8", &convolution_int8);
    m.impl("linear_int8_dynamic", &linear_int8_dynamic);
    m.impl("add_int8", &add_int8);
  }
};

}  // namespace ops
}  // namespace qatx
