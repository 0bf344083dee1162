// qatx::_scale_channels(input, scale) = input * scale along dim 1, for the BN-folded QAT layers'
// un-scaling y * (1/f). It computes what aten::mul computes, but its autograd node saves the
// output instead of the input: the output is the batch norm's input, which the batch norm saves
// anyway, so the one tensor serves both backward passes (aten::mul would keep the conv output
// alive as well, a second activation-sized tensor per layer).
//
// Gradients (out = input * scale[c]):
//   grad_input = grad_output * scale[c]
//   grad_scale[c] = sum over all but dim 1 of grad_output * out / scale[c]
// out / scale[c] recovers input to within two float32 roundings; reductions are at::sum's.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace qatx {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// [1, C, 1, ...]: scale broadcast along dim 1 of a tensor with `dim` dimensions.
at::Tensor channel_view(const at::Tensor& scale, int64_t dim) {
  std::vector<int64_t> shape(static_cast<size_t>(dim), 1);
  shape[1] = scale.numel();
  return scale.reshape(shape);
}

void check_args(const at::Tensor& input, const at::Tensor& scale) {
  TORCH_CHECK(input.dim() >= 2, "qatx::_scale_channels: input must have at least 2 dimensions [N, C, ...], got ",
              input.dim());
  TORCH_CHECK(input.is_floating_point(), "qatx::_scale_channels: input must be floating point, got ",
              input.scalar_type());
  TORCH_CHECK(scale.dim() == 1 && scale.numel() == input.size(1),
              "qatx::_scale_channels: scale must be 1-D with input.size(1) = ", input.size(1), " elements, got shape ",
              scale.sizes());
  TORCH_CHECK(scale.is_floating_point(), "qatx::_scale_channels: scale must be floating point, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.device() == input.device(), "qatx::_scale_channels: scale is on ", scale.device(),
              " but input is on ", input.device());
}

at::Tensor scale_channels(const at::Tensor& input, const at::Tensor& scale) {
  check_args(input, scale);
  return input * channel_view(scale, input.dim());
}

class ScaleChannels : public torch::autograd::Function<ScaleChannels> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& scale) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("qatx::_scale_channels", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
      out = op.call(input, scale);
    }
    ctx->save_for_backward({out, scale});
    ctx->saved_data["scale_requires_grad"] = scale.requires_grad();
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& out = saved[0];
    const at::Tensor& scale = saved[1];
    const at::Tensor& grad = grads[0];
    const at::Tensor s = channel_view(scale, out.dim());
    at::Tensor grad_input = grad * s;
    at::Tensor grad_scale;
    if (ctx->saved_data["scale_requires_grad"].toBool()) {
      std::vector<int64_t> dims;
      for (int64_t d = 0; d < out.dim(); ++d)
        if (d != 1) dims.push_back(d);
      grad_scale = (grad * (out / s)).sum(dims).to(scale.scalar_type());
    }
    return {grad_input, grad_scale};
  }
};

at::Tensor scale_channels_autograd(const at::Tensor& input, const at::Tensor& scale) {
  if (torch::autograd::GradMode::is_enabled() && (input.requires_grad() || scale.requires_grad()))
    return ScaleChannels::apply(input, scale);
  at::AutoDispatchBelowADInplaceOrView guard;
  return scale_channels(input, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CompositeExplicitAutograd, m) { m.impl("_scale_channels", &scale_channels); }

TORCH_LIBRARY_IMPL(qatx, Autograd, m) { m.impl("_scale_channels", &scale_channels_autograd); }

}  // namespace ops
}  // namespace qatx
