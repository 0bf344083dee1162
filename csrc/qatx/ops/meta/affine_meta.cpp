// Meta kernels of the affine ops: shapes, dtypes and strides only (symbolic sizes allowed), so
// torch.compile and torch.export trace the ops without running them. They share every check
// and allocation with the CPU and CUDA kernels (ops/affine_impl.h).
#include "qatx/ops/affine_impl.h"

namespace qatx {
namespace ops {
namespace {

struct MetaBackend {
  static constexpr bool kRunsKernels = false;
  static constexpr bool kChecksValuesOnHost = false;
  static void fake_quantize(const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                            math::QParamIndex, int64_t, int64_t) {}
  static void quantize(const at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, math::QParamIndex,
                       int64_t, int64_t) {}
  static void dequantize(const at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, math::QParamIndex) {}
  static void ste_backward(const at::Tensor&, const at::Tensor&, at::Tensor&) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, Meta, m) { AffineKernels<MetaBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
