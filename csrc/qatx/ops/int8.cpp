#include "qatx/ops/int8.h"

#include "qatx/ops/typed_op.h"

namespace qatx {
namespace ops {

using T = at::Tensor;
using CT = const at::Tensor&;
using OptT = const std::optional<at::Tensor>&;
using Ints = at::IntArrayRef;

T linear_int8(CT input, CT input_scale, CT input_zero_point, int64_t input_quant_min, int64_t input_quant_max,
              CT weight, CT weight_scale, CT weight_zero_point, OptT bias, bool relu, OptT output_scale,
              OptT output_zero_point, int64_t output_quant_min, int64_t output_quant_max) {
  QATX_DISPATCH("linear_int8", T(CT, CT, CT, int64_t, int64_t, CT, CT, CT, OptT, bool, OptT, OptT, int64_t, int64_t),
                input, input_scale, input_zero_point, input_quant_min, input_quant_max, weight, weight_scale,
                weight_zero_point, bias, relu, output_scale, output_zero_point, output_quant_min, output_quant_max);
}

T convolution_int8(CT input, CT input_scale, CT input_zero_point, int64_t input_quant_min, int64_t input_quant_max,
                   CT weight, CT weight_scale, CT weight_zero_point, OptT bias, Ints stride, Ints padding,
                   Ints dilation, bool transposed, Ints output_padding, int64_t groups, bool relu, OptT output_scale,
                   OptT output_zero_point, int64_t output_quant_min, int64_t output_quant_max) {
  QATX_DISPATCH("convolution_int8",
                T(CT, CT, CT, int64_t, int64_t, CT, CT, CT, OptT, Ints, Ints, Ints, bool, Ints, int64_t, bool, OptT,
                  OptT, int64_t, int64_t),
                input, input_scale, input_zero_point, input_quant_min, input_quant_max, weight, weight_scale,
                weight_zero_point, bias, stride, padding, dilation, transposed, output_padding, groups, relu,
                output_scale, output_zero_point, output_quant_min, output_quant_max);
}

T linear_int8_dynamic(CT input, CT weight, CT weight_scale, CT weight_zero_point, OptT bias, bool per_row) {
  QATX_DISPATCH("linear_int8_dynamic", T(CT, CT, CT, CT, OptT, bool), input, weight, weight_scale, weight_zero_point,
                bias, per_row);
}

T add_int8(CT input, CT input_scale, CT input_zero_point, int64_t input_quant_min, int64_t input_quant_max, CT other,
           CT other_scale, CT other_zero_point, int64_t other_quant_min, int64_t other_quant_max, bool relu,
           OptT output_scale, OptT output_zero_point, int64_t output_quant_min, int64_t output_quant_max) {
  QATX_DISPATCH("add_int8",
                T(CT, CT, CT, int64_t, int64_t, CT, CT, CT, int64_t, int64_t, bool, OptT, OptT, int64_t, int64_t),
                input, input_scale, input_zero_point, input_quant_min, input_quant_max, other, other_scale,
                other_zero_point, other_quant_min, other_quant_max, relu, output_scale, output_zero_point,
                output_quant_min, output_quant_max);
}

T unpack_int4(CT packed, int64_t n) { QATX_DISPATCH("unpack_int4", T(CT, int64_t), packed, n); }

#undef QATX_DISPATCH

}  // namespace ops
}  // namespace qatx
