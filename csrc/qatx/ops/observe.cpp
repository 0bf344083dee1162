#include "qatx/ops/observe.h"

#include "qatx/ops/typed_op.h"

namespace qatx {
namespace ops {

using T = at::Tensor;
using CT = const at::Tensor&;
using MT = at::Tensor&;

T observe_fake_quantize_per_tensor_affine(CT input, MT min_val, MT max_val, MT scale, MT zero_point,
                                          double averaging_constant, int64_t quant_min, int64_t quant_max,
                                          bool symmetric) {
  QATX_DISPATCH("observe_fake_quantize_per_tensor_affine", T(CT, MT, MT, MT, MT, double, int64_t, int64_t, bool),
                input, min_val, max_val, scale, zero_point, averaging_constant, quant_min, quant_max, symmetric);
}
T observe_fake_quantize_per_channel_affine(CT input, MT min_val, MT max_val, MT scale, MT zero_point, int64_t axis,
                                           double averaging_constant, int64_t quant_min, int64_t quant_max,
                                           bool symmetric) {
  QATX_DISPATCH("observe_fake_quantize_per_channel_affine",
                T(CT, MT, MT, MT, MT, int64_t, double, int64_t, int64_t, bool), input, min_val, max_val, scale,
                zero_point, axis, averaging_constant, quant_min, quant_max, symmetric);
}
T observe_fake_quantize_per_group_affine(CT input, MT min_val, MT max_val, MT scale, MT zero_point, int64_t group_size,
                                         double averaging_constant, int64_t quant_min, int64_t quant_max,
                                         bool symmetric) {
  QATX_DISPATCH("observe_fake_quantize_per_group_affine",
                T(CT, MT, MT, MT, MT, int64_t, double, int64_t, int64_t, bool), input, min_val, max_val, scale,
                zero_point, group_size, averaging_constant, quant_min, quant_max, symmetric);
}
void _observe_min_max(CT input, MT min_val, MT max_val, MT scale, MT zero_point, std::optional<int64_t> axis,
                      int64_t group_size, double averaging_constant, int64_t quant_min, int64_t quant_max,
                      bool symmetric) {
  QATX_DISPATCH("_observe_min_max",
                void(CT, MT, MT, MT, MT, std::optional<int64_t>, int64_t, double, int64_t, int64_t, bool), input,
                min_val, max_val, scale, zero_point, axis, group_size, averaging_constant, quant_min, quant_max,
                symmetric);
}

}  // namespace ops
}  // namespace qatx
