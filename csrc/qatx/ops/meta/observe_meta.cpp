// Meta kernel of qatx::_observe_min_max: the argument checks only (it returns nothing and its
// in-place results have fixed shapes), so torch.compile traces the observe + fake-quantize ops.
#include <torch/library.h>

#include "qatx/ops/observe_impl.h"

namespace qatx {
namespace ops {
namespace {

struct MetaObserveBackend {
  static constexpr bool kRunsKernels = false;
  static void observe(const at::Tensor&, math::QParamRuns, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, float,
                      int64_t, int64_t, bool) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, Meta, m) { m.impl("_observe_min_max", &ObserveKernels<MetaObserveBackend>::observe); }

}  // namespace ops
}  // namespace qatx
