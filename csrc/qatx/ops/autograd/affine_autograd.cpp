// Autograd kernels of the affine ops, in C++ so that gradients work from Python, from
// TorchScript and from pure libtorch programs alike.
//
// Fake-quantize uses the straight-through estimator: d(output)/d(input) = 1 where
// quant_min <= rint(x / scale) + zero_point <= quant_max, else 0; scale and zero_point get no
// gradient (fixed qparams; the learnable ops are separate). The forward saves only the
// bit-packed mask (numel / 8 bytes), never the input.
#include <torch/autograd.h>
#include <torch/library.h>

#include "qatx/ops/affine.h"

namespace qatx {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The mask's bit order is the memory order of the tensor it was made for; brings a gradient
// into that layout (a copy only when its strides differ).
at::Tensor in_layout(const at::Tensor& grad, at::IntArrayRef sizes, at::IntArrayRef strides) {
  if (grad.strides() == strides && grad.is_non_overlapping_and_dense()) return grad;
  return at::empty_strided(sizes, strides, grad.options()).copy_(grad);
}

void save_layout(AutogradContext* ctx, const at::Tensor& t) {
  ctx->saved_data["sizes"] = t.sizes().vec();
  ctx->saved_data["strides"] = t.strides().vec();
}

at::Tensor grad_in_saved_layout(AutogradContext* ctx, const at::Tensor& grad) {
  return in_layout(grad, ctx->saved_data["sizes"].toIntVector(), ctx->saved_data["strides"].toIntVector());
}

// grad_input = mask * grad_output is linear in grad_output, so its own gradient is the same
// masking: double backward works and is exact.
class SteBackwardFunction : public torch::autograd::Function<SteBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& mask) {
    ctx->save_for_backward({mask});
    save_layout(ctx, grad_output);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return qatx::ops::_fake_quantize_ste_backward(grad_output, mask);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    return {SteBackwardFunction::apply(grad_in_saved_layout(ctx, grads[0]), mask), at::Tensor()};
  }
};

at::Tensor ste_backward_autograd(const at::Tensor& grad_output, const at::Tensor& mask) {
  return SteBackwardFunction::apply(grad_output, mask);
}

// Forward op F (one of the _with_mask ops) wrapped in the straight-through estimator.
template <typename Forward>
class FakeQuantizeSte : public torch::autograd::Function<FakeQuantizeSte<Forward>> {
 public:
  template <typename... Args>
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& scale,
                            const at::Tensor& zero_point, Args... args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mask] = Forward::call(input, scale, zero_point, args...);
    ctx->save_for_backward({mask});
    save_layout(ctx, output);
    return output;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    variable_list result(3 + Forward::kNumIntArgs);  // undefined: no gradient for qparams or ints
    result[0] = SteBackwardFunction::apply(grad_in_saved_layout(ctx, grads[0]), mask);
    return result;
  }
};

struct PerTensorForward {
  static constexpr int kNumIntArgs = 2;
  static auto call(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z, int64_t qmin, int64_t qmax) {
    return qatx::ops::_fake_quantize_per_tensor_affine_with_mask(x, s, z, qmin, qmax);
  }
};
struct PerChannelForward {
  static constexpr int kNumIntArgs = 3;
  static auto call(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z, int64_t axis, int64_t qmin,
                   int64_t qmax) {
    return qatx::ops::_fake_quantize_per_channel_affine_with_mask(x, s, z, axis, qmin, qmax);
  }
};
struct PerGroupForward {
  static constexpr int kNumIntArgs = 3;
  static auto call(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z, int64_t group_size, int64_t qmin,
                   int64_t qmax) {
    return qatx::ops::_fake_quantize_per_group_affine_with_mask(x, s, z, group_size, qmin, qmax);
  }
};

// Records the STE only when a gradient is wanted; otherwise runs the mask-free kernel.
bool wants_grad(const at::Tensor& input) { return torch::autograd::GradMode::is_enabled() && input.requires_grad(); }

at::Tensor fake_quantize_per_tensor_autograd(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z,
                                             int64_t qmin, int64_t qmax) {
  if (wants_grad(x)) return FakeQuantizeSte<PerTensorForward>::apply(x, s, z, qmin, qmax);
  at::AutoDispatchBelowADInplaceOrView guard;
  return qatx::ops::fake_quantize_per_tensor_affine(x, s, z, qmin, qmax);
}

at::Tensor fake_quantize_per_channel_autograd(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z,
                                              int64_t axis, int64_t qmin, int64_t qmax) {
  if (wants_grad(x)) return FakeQuantizeSte<PerChannelForward>::apply(x, s, z, axis, qmin, qmax);
  at::AutoDispatchBelowADInplaceOrView guard;
  return qatx::ops::fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax);
}

at::Tensor fake_quantize_per_group_autograd(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z,
                                            int64_t group_size, int64_t qmin, int64_t qmax) {
  if (wants_grad(x)) return FakeQuantizeSte<PerGroupForward>::apply(x, s, z, group_size, qmin, qmax);
  at::AutoDispatchBelowADInplaceOrView guard;
  return qatx::ops::fake_quantize_per_group_affine(x, s, z, group_size, qmin, qmax);
}

}  // namespace

TORCH_LIBRARY_IMPL(qatx, Autograd, m) {
  m.impl("fake_quantize_per_tensor_affine", &fake_quantize_per_tensor_autograd);
  m.impl("fake_quantize_per_channel_affine", &fake_quantize_per_channel_autograd);
  m.impl("fake_quantize_per_group_affine", &fake_quantize_per_group_autograd);
  m.impl("_fake_quantize_ste_backward", &ste_backward_autograd);
  // Integer outputs, or not meant to be differentiated directly: backward raises a clear error.
  for (const char* name :
       {"_fake_quantize_per_tensor_affine_with_mask", "_fake_quantize_per_channel_affine_with_mask",
        "_fake_quantize_per_group_affine_with_mask", "quantize_per_tensor_affine", "quantize_per_channel_affine",
        "quantize_per_group_affine", "dequantize_per_tensor_affine", "dequantize_per_channel_affine",
        "dequantize_per_group_affine"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
}

}  // namespace ops
}  // namespace qatx
