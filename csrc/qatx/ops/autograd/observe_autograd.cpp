// The observe + fake-quantize ops are compositions (CompositeImplicitAutograd): the observing
// op, which has no gradient (it only writes statistics and qparams), then the affine
// fake-quantize op, whose autograd node gives the straight-through gradient. So their gradient,
// their kernels per device and their traced graphs are those of the two parts.
#include <torch/library.h>

#include "qatx/ops/affine.h"
#include "qatx/ops/observe.h"

namespace qatx {
namespace ops {
namespace {

at::Tensor per_tensor(const at::Tensor& input, at::Tensor& min_val, at::Tensor& max_val, at::Tensor& scale,
                      at::Tensor& zero_point, double c, int64_t quant_min, int64_t quant_max, bool symmetric) {
  _observe_min_max(input.detach(), min_val, max_val, scale, zero_point, std::nullopt, 0, c, quant_min, quant_max,
                   symmetric);
  return fake_quantize_per_tensor_affine(input, scale, zero_point, quant_min, quant_max);
}

at::Tensor per_channel(const at::Tensor& input, at::Tensor& min_val, at::Tensor& max_val, at::Tensor& scale,
                       at::Tensor& zero_point, int64_t axis, double c, int64_t quant_min, int64_t quant_max,
                       bool symmetric) {
  _observe_min_max(input.detach(), min_val, max_val, scale, zero_point, axis, 0, c, quant_min, quant_max, symmetric);
  return fake_quantize_per_channel_affine(input, scale, zero_point, axis, quant_min, quant_max);
}

at::Tensor per_group(const at::Tensor& input, at::Tensor& min_val, at::Tensor& max_val, at::Tensor& scale,
                     at::Tensor& zero_point, int64_t group_size, double c, int64_t quant_min, int64_t quant_max,
                     bool symmetric) {
  TORCH_CHECK(group_size >= 1, "qatx::observe_fake_quantize_per_group_affine: group_size=", group_size,
              " must be at least 1");
  _observe_min_max(input.detach(), min_val, max_val, scale, zero_point, std::nullopt, group_size, c, quant_min,
                   quant_max, symmetric);
  return fake_quantize_per_group_affine(input, scale, zero_point, group_size, quant_min, quant_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CompositeImplicitAutograd, m) {
  m.impl("observe_fake_quantize_per_tensor_affine", &per_tensor);
  m.impl("observe_fake_quantize_per_channel_affine", &per_channel);
  m.impl("observe_fake_quantize_per_group_affine", &per_group);
}

}  // namespace ops
}  // namespace qatx
