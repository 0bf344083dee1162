// The one way the public C++ wrappers (qatx::ops::...) call an operator: a typed handle looked
// up once through the dispatcher, so a call reaches the CPU, CUDA and Meta kernels and records
// autograd exactly as a call from Python or TorchScript does.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace qatx {
namespace ops {
namespace detail {

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace detail
}  // namespace ops
}  // namespace qatx

// Body of a wrapper: calls qatx::NAME, whose C++ signature is SIGNATURE, with the arguments.
#define QATX_DISPATCH(NAME, SIGNATURE, ...)                                              \
  static const auto op = ::qatx::ops::detail::typed_op<SIGNATURE>("qatx::" NAME);       \
  return op.call(__VA_ARGS__)
