// Argument checks, output shapes and the exact reference computation of the INT8 ops
// (linear_int8, linear_int8_dynamic, convolution_int8, add_int8). The CPU, CUDA and Meta kernels share
// the checks and shapes; the reference computation is the CUDA route for convolutions and the
// CPU route for what the int16 GEMM does not serve. Formulas and errors: docs/ops.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace qatx {
namespace ops {
namespace int8 {

// The per-tensor input qparams of a static op, checked: float scale and integer zero point with
// one element each, quant range of at most 8 bits (quant_max - quant_min <= 255) inside
// [-128, 255]. values: also the values (scale valid, zero point in range) on the host. `name`:
// the argument's name in the messages (its qparams are name_scale, name_zero_point, ...). The
// input is float32, or uint8 / int8 holding its integers (the range must then fit the dtype).
void check_input_qparams(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                         int64_t quant_min, int64_t quant_max, bool values, const char* op,
                         const char* name = "input");
// The requested output grid of a static op (output_scale, output_zero_point, ...): the output is
// then y quantized to it, as uint8 (quant_min >= 0) or int8 (quant_max <= 127).
struct OutputQParams {
  at::Tensor scale, zero_point;
  int64_t quant_min, quant_max;
  at::ScalarType dtype;
};
// Checks them like input qparams; none when both tensors are absent (one alone is an error).
std::optional<OutputQParams> check_output_qparams(const at::Tensor& input, const std::optional<at::Tensor>& scale,
                                                  const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                                                  int64_t quant_max, bool values, const char* op);
// y (float32) quantized to `out` with qatx::quantize_per_tensor_affine; y itself without a grid.
at::Tensor quantized_output(const at::Tensor& y, const std::optional<OutputQParams>& out);
// A uint8 / int8 input as float32 (q - z) * s, for backends that take float input only: their
// quantization gives q back exactly (|q - z| <= 255, so x * (1/s) is within 1e-4 of q - z).
// Float input is returned as it is.
at::Tensor float_input(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point);

// add_int8: `other` has input's shape and device (both float32, checked with their qparams).
void check_add(const at::Tensor& input, const at::Tensor& other, const char* op);

// How the weight's scales are laid out: one scale, one per output channel, or per group of
// group_size consecutive input features (linear only; [N, K / group_size]).
struct WeightQParams {
  enum class Kind { PerTensor, PerChannel, PerGroup } kind;
};

// Checks an int8 weight whose output channels are `out_channels` and (for per-group) whose
// reduction length is `in_features`, with its scale / zero point; values on the host when asked.
WeightQParams check_weight(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                           const at::Tensor& zero_point, const c10::SymInt& out_channels,
                           const c10::SymInt& in_features, bool allow_group, bool values, const char* op);
// bias: int32 (static ops) or float32 (dynamic), shape [out_channels], on the input's device.
void check_bias(const at::Tensor& input, const std::optional<at::Tensor>& bias, const c10::SymInt& out_channels,
                at::ScalarType dtype, const char* op);

// linear: input float32 [..., K], weight int8 [N, K]. Returns N. Shapes may be symbolic
// (Meta kernels under torch.compile / torch.export).
c10::SymInt check_linear(const at::Tensor& input, const at::Tensor& weight, const char* op);
std::vector<c10::SymInt> linear_output_shape(const at::Tensor& input, const at::Tensor& weight);

// Convolution geometry, validated; `out_channels` from the weight and groups.
struct ConvGeometry {
  int64_t spatial;                        // 1, 2 or 3
  c10::SymInt out_channels;
  std::vector<int64_t> stride, padding, dilation, output_padding;
  std::vector<c10::SymInt> output_shape;  // [N, C_out, *spatial_out]
};
ConvGeometry check_convolution(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                               at::IntArrayRef output_padding, int64_t groups, const char* op);

// The output layout of convolution_int8 on every backend: channels-last strides ([N, *spatial,
// C] in memory) for non-transposed convolutions, which is what the im2col GEMM writes;
// contiguous for transposed ones.
at::Tensor empty_conv_output(const ConvGeometry& geo, bool transposed, const at::TensorOptions& options);
// `y` copied into that layout (no copy when it already has it).
at::Tensor in_conv_layout(const at::Tensor& y, const ConvGeometry& geo, bool transposed);

// ---- exact reference computation (any device) ----
// The centered integer input q - z with q = clamp(rint(x * (1/s)) + z, quant_min, quant_max),
// computed by qatx::quantize_per_tensor_affine (bit-identical to the fake-quantize forward); for
// an integer input, q = clamp(input, quant_min, quant_max).
at::Tensor centered_input(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                          int64_t quant_min, int64_t quant_max);
at::Tensor linear_reference(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                            int64_t quant_min, int64_t quant_max, const at::Tensor& weight,
                            const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                            const std::optional<at::Tensor>& bias, bool relu);
at::Tensor convolution_reference(const at::Tensor& input, const at::Tensor& input_scale,
                                 const at::Tensor& input_zero_point, int64_t quant_min, int64_t quant_max,
                                 const at::Tensor& weight, const at::Tensor& weight_scale,
                                 const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                 const ConvGeometry& geo, bool transposed, int64_t groups, bool relu);

// Dynamic qparams of the rows of a 2-D float input (per_row) or of all of it, uint8 [0, 255]:
// lo = min(min x, 0), hi = max(max x, 0), s = (hi - lo) / 255 (1 where hi == lo),
// z = clamp(rint(-lo / s), 0, 255). Float32 arithmetic, on the input's device, no host sync.
std::pair<at::Tensor, at::Tensor> dynamic_qparams(const at::Tensor& input2d, bool per_row);
at::Tensor linear_dynamic_reference(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
                                    const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                    bool per_row);

// unpack_int4: packed must be uint8 with at least one dimension and n one of
// 2 * packed.size(-1) - 1, 2 * packed.size(-1). unpack_int4_shape: the output's sizes.
std::vector<c10::SymInt> unpack_int4_shape(const at::Tensor& packed, int64_t n);
// The unpacked int8 values, contiguous, with ATen operations (any device).
at::Tensor unpack_int4_values(const at::Tensor& packed, int64_t n);

}  // namespace int8
}  // namespace ops
}  // namespace qatx
