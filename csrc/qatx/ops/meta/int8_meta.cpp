// Meta kernels of the INT8 ops: the shared checks (no value reads) and an empty output,
// so torch.compile and torch.export trace the ops.
#include "qatx/ops/int8_kernels.h"

#include <ATen/ops/empty.h>

namespace qatx {
namespace ops {
namespace {

struct Int8MetaBackend {
  static constexpr bool kChecksValuesOnHost = false;
  static constexpr bool kIntegerIO = false;  // float32 output; the glue quantizes it
  static at::Tensor linear(const at::Tensor& input, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                           const at::Tensor& weight, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, bool, const int8::WeightQParams&,
                           const std::optional<int8::OutputQParams>&) {
    return at::empty_symint(int8::linear_output_shape(input, weight), input.options());
  }
  static at::Tensor convolution(const at::Tensor& input, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, const int8::ConvGeometry& geo, bool transposed,
                                int64_t, bool, const std::optional<int8::OutputQParams>&) {
    return int8::empty_conv_output(geo, transposed, input.options());
  }
  static at::Tensor linear_dynamic(const at::Tensor& input, const at::Tensor& weight, const at::Tensor&,
                                   const at::Tensor&, const std::optional<at::Tensor>&, bool) {
    return at::empty_symint(int8::linear_output_shape(input, weight), input.options());
  }
  static void add(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool,
                  const std::optional<int8::OutputQParams>&, at::Tensor&) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, Meta, m) {
  Int8Kernels<Int8MetaBackend>::register_all(m);
  m.impl("unpack_int4", [](const at::Tensor& packed, int64_t n) {
    return at::empty_symint(int8::unpack_int4_shape(packed, n), packed.options().dtype(at::kChar));
  });
}

}  // namespace ops
}  // namespace qatx
