#include "qatx/ops/affine.h"

#include "qatx/ops/typed_op.h"

namespace qatx {
namespace ops {

using T = at::Tensor;
using CT = const at::Tensor&;
using OptDtype = std::optional<at::ScalarType>;

T fake_quantize_per_tensor_affine(CT input, CT scale, CT zero_point, int64_t quant_min, int64_t quant_max) {
  QATX_DISPATCH("fake_quantize_per_tensor_affine", T(CT, CT, CT, int64_t, int64_t), input, scale, zero_point,
                quant_min, quant_max);
}
T fake_quantize_per_channel_affine(CT input, CT scale, CT zero_point, int64_t axis, int64_t quant_min,
                                   int64_t quant_max) {
  QATX_DISPATCH("fake_quantize_per_channel_affine", T(CT, CT, CT, int64_t, int64_t, int64_t), input, scale,
                zero_point, axis, quant_min, quant_max);
}
T fake_quantize_per_group_affine(CT input, CT scale, CT zero_point, int64_t group_size, int64_t quant_min,
                                 int64_t quant_max) {
  QATX_DISPATCH("fake_quantize_per_group_affine", T(CT, CT, CT, int64_t, int64_t, int64_t), input, scale,
                zero_point, group_size, quant_min, quant_max);
}

using Pair = std::tuple<T, T>;
Pair _fake_quantize_per_tensor_affine_with_mask(CT input, CT scale, CT zero_point, int64_t quant_min,
                                                int64_t quant_max) {
  QATX_DISPATCH("_fake_quantize_per_tensor_affine_with_mask", Pair(CT, CT, CT, int64_t, int64_t), input, scale,
                zero_point, quant_min, quant_max);
}
Pair _fake_quantize_per_channel_affine_with_mask(CT input, CT scale, CT zero_point, int64_t axis, int64_t quant_min,
                                                 int64_t quant_max) {
  QATX_DISPATCH("_fake_quantize_per_channel_affine_with_mask", Pair(CT, CT, CT, int64_t, int64_t, int64_t), input,
                scale, zero_point, axis, quant_min, quant_max);
}
Pair _fake_quantize_per_group_affine_with_mask(CT input, CT scale, CT zero_point, int64_t group_size,
                                               int64_t quant_min, int64_t quant_max) {
  QATX_DISPATCH("_fake_quantize_per_group_affine_with_mask", Pair(CT, CT, CT, int64_t, int64_t, int64_t), input,
                scale, zero_point, group_size, quant_min, quant_max);
}
T _fake_quantize_ste_backward(CT grad_output, CT mask) {
  QATX_DISPATCH("_fake_quantize_ste_backward", T(CT, CT), grad_output, mask);
}

T quantize_per_tensor_affine(CT input, CT scale, CT zero_point, int64_t quant_min, int64_t quant_max,
                             at::ScalarType dtype) {
  QATX_DISPATCH("quantize_per_tensor_affine", T(CT, CT, CT, int64_t, int64_t, at::ScalarType), input, scale,
                zero_point, quant_min, quant_max, dtype);
}
T quantize_per_channel_affine(CT input, CT scale, CT zero_point, int64_t axis, int64_t quant_min, int64_t quant_max,
                              at::ScalarType dtype) {
  QATX_DISPATCH("quantize_per_channel_affine", T(CT, CT, CT, int64_t, int64_t, int64_t, at::ScalarType), input,
                scale, zero_point, axis, quant_min, quant_max, dtype);
}
T quantize_per_group_affine(CT input, CT scale, CT zero_point, int64_t group_size, int64_t quant_min,
                            int64_t quant_max, at::ScalarType dtype) {
  QATX_DISPATCH("quantize_per_group_affine", T(CT, CT, CT, int64_t, int64_t, int64_t, at::ScalarType), input, scale,
                zero_point, group_size, quant_min, quant_max, dtype);
}
T dequantize_per_tensor_affine(CT input, CT scale, CT zero_point, OptDtype output_dtype) {
  QATX_DISPATCH("dequantize_per_tensor_affine", T(CT, CT, CT, OptDtype), input, scale, zero_point, output_dtype);
}
T dequantize_per_channel_affine(CT input, CT scale, CT zero_point, int64_t axis, OptDtype output_dtype) {
  QATX_DISPATCH("dequantize_per_channel_affine", T(CT, CT, CT, int64_t, OptDtype), input, scale, zero_point, axis,
                output_dtype);
}
T dequantize_per_group_affine(CT input, CT scale, CT zero_point, int64_t group_size, OptDtype output_dtype) {
  QATX_DISPATCH("dequantize_per_group_affine", T(CT, CT, CT, int64_t, OptDtype), input, scale, zero_point,
                group_size, output_dtype);
}

#undef QATX_DISPATCH

}  // namespace ops
}  // namespace qatx
