// The INT8 ops' shared kernel glue: every backend (CPU, CUDA, Meta) runs the same checks and
// allocates the same output; only `compute` differs. A backend provides
//   static constexpr bool kChecksValuesOnHost;
//   static constexpr bool kIntegerIO;   (takes uint8 / int8 inputs and writes quantized outputs)
//   static at::Tensor linear(...), convolution(...), linear_dynamic(...)   (the computation)
//   static void add(input, ..., other, ..., relu, out_q, out)             (writes out)
// Without kIntegerIO, integer inputs reach the backend as float32 (q - z) * s, which it quantizes
// back to q exactly, and its float32 output is quantized here; a kIntegerIO backend may still
// return float32 (a reference route), which is quantized here too.
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
                                const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias, bool relu,
                                const std::optional<at::Tensor>& output_scale,
                                const std::optional<at::Tensor>& output_zero_point,
                                int64_t output_quant_min, int64_t output_quant_max) {
    constexpr const char* op = "qatx::linear_int8";
    const c10::SymInt n = int8::check_linear(input, weight, op);
    int8::check_input_qparams(input, input_scale, input_zero_point, quant_min, quant_max, Backend::kChecksValuesOnHost,
                              op);
    const auto wq = int8::check_weight(input, weight, weight_scale, weight_zero_point, n, weight.sym_size(1), true,
                                       Backend::kChecksValuesOnHost, op);
    int8::check_bias(input, bias, n, at::kInt, op);
    const auto out_q = int8::check_output_qparams(input, output_scale, output_zero_point, output_quant_min,
                                                  output_quant_max, Backend::kChecksValuesOnHost, op);
    return int8::quantized_output(Backend::linear(backend_input(input, input_scale, input_zero_point), input_scale,
                                                  input_zero_point, quant_min, quant_max, weight, weight_scale,
                                                  weight_zero_point, bias, relu, wq, out_q),
                                  out_q);
  }

  static at::Tensor convolution_int8(const at::Tensor& input, const at::Tensor& input_scale,
                                     const at::Tensor& input_zero_point, int64_t quant_min, int64_t quant_max,
                                     const at::Tensor& weight, const at::Tensor& weight_scale,
                                     const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     bool transposed, at::IntArrayRef output_padding, int64_t groups, bool relu,
                                     const std::optional<at::Tensor>& output_scale,
                                     const std::optional<at::Tensor>& output_zero_point,
                                     int64_t output_quant_min, int64_t output_quant_max) {
    constexpr const char* op = "qatx::convolution_int8";
    const auto geo = int8::check_convolution(input, weight, stride, padding, dilation, transposed, output_padding,
                                             groups, op);
    int8::check_input_qparams(input, input_scale, input_zero_point, quant_min, quant_max, Backend::kChecksValuesOnHost,
                              op);
    int8::check_weight(input, weight, weight_scale, weight_zero_point, geo.out_channels, 0, false,
                       Backend::kChecksValuesOnHost, op);
    int8::check_bias(input, bias, geo.out_channels, at::kInt, op);
    const auto out_q = int8::check_output_qparams(input, output_scale, output_zero_point, output_quant_min,
                                                  output_quant_max, Backend::kChecksValuesOnHost, op);
    return int8::quantized_output(
        Backend::convolution(backend_input(input, input_scale, input_zero_point), input_scale, input_zero_point,
                             quant_min, quant_max, weight, weight_scale, weight_zero_point, bias, geo, transposed,
                             groups, relu, out_q),
        out_q);
  }

  static at::Tensor linear_int8_dynamic(const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                                        const std::optional<at::Tensor>& bias, bool per_row) {
    constexpr const char* op = "qatx::linear_int8_dynamic";
    TORCH_CHECK(input.scalar_type() == at::kFloat, op, ": input must be torch.float32, got ", input.scalar_type());
    const c10::SymInt n = int8::check_linear(input, weight, op);
    int8::check_weight(input, weight, weight_scale, weight_zero_point, n, weight.sym_size(1), false,
                       Backend::kChecksValuesOnHost, op);
    int8::check_bias(input, bias, n, at::kFloat, op);
    return Backend::linear_dynamic(input, weight, weight_scale, weight_zero_point, bias, per_row);
  }

  static at::Tensor add_int8(const at::Tensor& input, const at::Tensor& input_scale,
                             const at::Tensor& input_zero_point, int64_t input_quant_min, int64_t input_quant_max,
                             const at::Tensor& other, const at::Tensor& other_scale, const at::Tensor& other_zero_point,
                             int64_t other_quant_min, int64_t other_quant_max, bool relu,
                             const std::optional<at::Tensor>& output_scale,
                             const std::optional<at::Tensor>& output_zero_point,
                             int64_t output_quant_min, int64_t output_quant_max) {
    constexpr const char* op = "qatx::add_int8";
    int8::check_input_qparams(input, input_scale, input_zero_point, input_quant_min, input_quant_max,
                              Backend::kChecksValuesOnHost, op);
    int8::check_input_qparams(other, other_scale, other_zero_point, other_quant_min, other_quant_max,
                              Backend::kChecksValuesOnHost, op, "other");
    int8::check_add(input, other, op);
    const auto out_q = int8::check_output_qparams(input, output_scale, output_zero_point, output_quant_min,
                                                  output_quant_max, Backend::kChecksValuesOnHost, op);
    const bool quantized = Backend::kIntegerIO && out_q.has_value();
    at::Tensor out = empty_output_like(input, Granularity::per_tensor(), quantized ? out_q->dtype : at::kFloat);
    Backend::add(backend_input(input, input_scale, input_zero_point), input_scale, input_zero_point,
                 input_quant_min, input_quant_max, backend_input(other, other_scale, other_zero_point), other_scale,
                 other_zero_point, other_quant_min, other_quant_max, relu, quantized ? out_q : std::nullopt, out);
    return int8::quantized_output(out, out_q);
  }

  static at::Tensor backend_input(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point) {
    return Backend::kIntegerIO ? input : int8::float_input(input, scale, zero_point);
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
