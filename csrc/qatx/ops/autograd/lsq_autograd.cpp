// Autograd kernels of the learnable quantizers (LSQ, LSQ+, PACT), in C++ so that the qparams
// train from Python, from TorchScript and from pure libtorch programs alike.
//
// The forward saves the input and the qparams (not a mask, as the straight-through estimator
// does): the backward op recomputes each element's quantization from them, and returns
// grad_input and the qparam gradients from that one pass. The backward is not differentiable:
// double backward raises a clear error.
#include <torch/autograd.h>
#include <torch/library.h>

#include "qatx/ops/lsq.h"

namespace qatx {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd kernel of a backward op: computes it below autograd and records a node whose own
// backward refuses with a message naming the forward op. Returns the defined outputs only (an
// autograd node cannot own an undefined output): grad_zero_point is absent when not requested.
template <typename Backward>
class RefuseDoubleBackward : public torch::autograd::Function<RefuseDoubleBackward<Backward>> {
 public:
  template <typename... Args>
  static variable_list forward(AutogradContext*, Args... args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list defined;
    for (at::Tensor& t : Backward::call(args...))
      if (t.defined()) defined.push_back(std::move(t));
    return defined;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, Backward::kForwardOp,
                ": double backward is not supported (the gradient of this op's gradient, e.g. a backward "
                "through gradients computed with create_graph=True); compute the gradients without create_graph");
  }
};

struct LsqBackward {
  static constexpr const char* kForwardOp = "qatx::fake_quantize_lsq";
  static variable_list call(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& s, const at::Tensor& z,
                            int64_t axis, int64_t qmin, int64_t qmax, double grad_factor, bool zero_point_grad) {
    auto [gx, gs, gz] = _fake_quantize_lsq_backward(grad, x, s, z, axis, qmin, qmax, grad_factor, zero_point_grad);
    return {gx, gs, gz};
  }
};

struct LsqPerGroupBackward {
  static constexpr const char* kForwardOp = "qatx::fake_quantize_lsq_per_group";
  static variable_list call(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& s, const at::Tensor& z,
                            int64_t group_size, int64_t qmin, int64_t qmax, double grad_factor, bool zero_point_grad) {
    auto [gx, gs, gz] =
        _fake_quantize_lsq_per_group_backward(grad, x, s, z, group_size, qmin, qmax, grad_factor, zero_point_grad);
    return {gx, gs, gz};
  }
};

struct PactBackward {
  static constexpr const char* kForwardOp = "qatx::fake_quantize_pact";
  static variable_list call(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& alpha, int64_t bits,
                            bool is_signed) {
    auto [gx, ga] = _fake_quantize_pact_backward(grad, x, alpha, bits, is_signed);
    return {gx, ga};
  }
};

// LSQ with its backward op. Arg is axis (per-tensor / per-channel) or group_size (per-group).
template <typename Op>
class LsqFunction : public torch::autograd::Function<LsqFunction<Op>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, int64_t arg, int64_t qmin, int64_t qmax,
                            double grad_factor) {
    ctx->save_for_backward({x, scale, zero_point});
    ctx->saved_data["arg"] = arg;
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["grad_factor"] = grad_factor;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return Op::forward(x, scale, zero_point, arg, qmin, qmax, grad_factor);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [gx, gs, gz] = Op::backward(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["arg"].toInt(),
                                     ctx->saved_data["qmin"].toInt(), ctx->saved_data["qmax"].toInt(),
                                     ctx->saved_data["grad_factor"].toDouble(), ctx->needs_input_grad(2));
    return {ctx->needs_input_grad(0) ? gx : at::Tensor(), ctx->needs_input_grad(1) ? gs : at::Tensor(), gz,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct LsqOp {
  static constexpr auto forward = &fake_quantize_lsq;
  static constexpr auto backward = &_fake_quantize_lsq_backward;
};
struct LsqPerGroupOp {
  static constexpr auto forward = &fake_quantize_lsq_per_group;
  static constexpr auto backward = &_fake_quantize_lsq_per_group_backward;
};

class PactFunction : public torch::autograd::Function<PactFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& alpha, int64_t bits,
                            bool is_signed) {
    ctx->save_for_backward({x, alpha});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["is_signed"] = is_signed;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return fake_quantize_pact(x, alpha, bits, is_signed);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [gx, ga] = _fake_quantize_pact_backward(grads[0], saved[0], saved[1], ctx->saved_data["bits"].toInt(),
                                                 ctx->saved_data["is_signed"].toBool());
    return {ctx->needs_input_grad(0) ? gx : at::Tensor(), ctx->needs_input_grad(1) ? ga : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// Records the autograd node (which saves the input) only when a gradient is wanted.
bool wants_grad(std::initializer_list<at::Tensor> tensors) {
  if (!torch::autograd::GradMode::is_enabled()) return false;
  for (const at::Tensor& t : tensors)
    if (t.requires_grad()) return true;
  return false;
}

at::Tensor fake_quantize_lsq_autograd(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z, int64_t axis,
                                      int64_t qmin, int64_t qmax, double grad_factor) {
  if (wants_grad({x, s, z})) return LsqFunction<LsqOp>::apply(x, s, z, axis, qmin, qmax, grad_factor);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return fake_quantize_lsq(x, s, z, axis, qmin, qmax, grad_factor);
}

at::Tensor fake_quantize_lsq_per_group_autograd(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z,
                                                int64_t group_size, int64_t qmin, int64_t qmax, double grad_factor) {
  if (wants_grad({x, s, z})) return LsqFunction<LsqPerGroupOp>::apply(x, s, z, group_size, qmin, qmax, grad_factor);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return fake_quantize_lsq_per_group(x, s, z, group_size, qmin, qmax, grad_factor);
}

at::Tensor fake_quantize_pact_autograd(const at::Tensor& x, const at::Tensor& alpha, int64_t bits, bool is_signed) {
  if (wants_grad({x, alpha})) return PactFunction::apply(x, alpha, bits, is_signed);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return fake_quantize_pact(x, alpha, bits, is_signed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsq_backward_autograd(const at::Tensor& grad, const at::Tensor& x,
                                                                     const at::Tensor& s, const at::Tensor& z,
                                                                     int64_t axis, int64_t qmin, int64_t qmax,
                                                                     double grad_factor, bool zero_point_grad) {
  const variable_list r =
      RefuseDoubleBackward<LsqBackward>::apply(grad, x, s, z, axis, qmin, qmax, grad_factor, zero_point_grad);
  return {r[0], r[1], zero_point_grad ? r[2] : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsq_per_group_backward_autograd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& s, const at::Tensor& z, int64_t group_size,
    int64_t qmin, int64_t qmax, double grad_factor, bool zero_point_grad) {
  const variable_list r = RefuseDoubleBackward<LsqPerGroupBackward>::apply(grad, x, s, z, group_size, qmin, qmax,
                                                                           grad_factor, zero_point_grad);
  return {r[0], r[1], zero_point_grad ? r[2] : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor> pact_backward_autograd(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& alpha, int64_t bits, bool is_signed) {
  const variable_list r = RefuseDoubleBackward<PactBackward>::apply(grad, x, alpha, bits, is_signed);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(qatx, Autograd, m) {
  m.impl("fake_quantize_lsq", &fake_quantize_lsq_autograd);
  m.impl("fake_quantize_lsq_per_group", &fake_quantize_lsq_per_group_autograd);
  m.impl("fake_quantize_pact", &fake_quantize_pact_autograd);
  m.impl("_fake_quantize_lsq_backward", &lsq_backward_autograd);
  m.impl("_fake_quantize_lsq_per_group_backward", &lsq_per_group_backward_autograd);
  m.impl("_fake_quantize_pact_backward", &pact_backward_autograd);
}

}  // namespace ops
}  // namespace qatx
