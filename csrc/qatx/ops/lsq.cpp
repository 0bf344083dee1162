#include "qatx/ops/lsq.h"

#include "qatx/ops/typed_op.h"

namespace qatx {
namespace ops {

using T = at::Tensor;
using CT = const at::Tensor&;
using Triple = std::tuple<T, T, T>;
using Pair = std::tuple<T, T>;

T fake_quantize_lsq(CT input, CT scale, CT zero_point, int64_t axis, int64_t quant_min, int64_t quant_max,
                    double grad_factor) {
  QATX_DISPATCH("fake_quantize_lsq", T(CT, CT, CT, int64_t, int64_t, int64_t, double), input, scale, zero_point,
                axis, quant_min, quant_max, grad_factor);
}
T fake_quantize_lsq_per_group(CT input, CT scale, CT zero_point, int64_t group_size, int64_t quant_min,
                              int64_t quant_max, double grad_factor) {
  QATX_DISPATCH("fake_quantize_lsq_per_group", T(CT, CT, CT, int64_t, int64_t, int64_t, double), input, scale,
                zero_point, group_size, quant_min, quant_max, grad_factor);
}
T fake_quantize_pact(CT input, CT alpha, int64_t bits, bool is_signed) {
  QATX_DISPATCH("fake_quantize_pact", T(CT, CT, int64_t, bool), input, alpha, bits, is_signed);
}

Triple _fake_quantize_lsq_backward(CT grad_output, CT input, CT scale, CT zero_point, int64_t axis, int64_t quant_min,
                                   int64_t quant_max, double grad_factor, bool zero_point_requires_grad) {
  QATX_DISPATCH("_fake_quantize_lsq_backward", Triple(CT, CT, CT, CT, int64_t, int64_t, int64_t, double, bool),
                grad_output, input, scale, zero_point, axis, quant_min, quant_max, grad_factor,
                zero_point_requires_grad);
}
Triple _fake_quantize_lsq_per_group_backward(CT grad_output, CT input, CT scale, CT zero_point, int64_t group_size,
                                             int64_t quant_min, int64_t quant_max, double grad_factor,
                                             bool zero_point_requires_grad) {
  QATX_DISPATCH("_fake_quantize_lsq_per_group_backward",
                Triple(CT, CT, CT, CT, int64_t, int64_t, int64_t, double, bool), grad_output, input, scale,
                zero_point, group_size, quant_min, quant_max, grad_factor, zero_point_requires_grad);
}
Pair _fake_quantize_pact_backward(CT grad_output, CT input, CT alpha, int64_t bits, bool is_signed) {
  QATX_DISPATCH("_fake_quantize_pact_backward", Pair(CT, CT, CT, int64_t, bool), grad_output, input, alpha, bits,
                is_signed);
}

}  // namespace ops
}  // namespace qatx
