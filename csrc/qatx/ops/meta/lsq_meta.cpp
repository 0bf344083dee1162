// Meta kernels of the learnable quantizers: shapes, dtypes and strides only (symbolic sizes
// allowed), sharing every check and allocation with the CPU and CUDA kernels (ops/lsq_impl.h).
#include "qatx/ops/lsq_impl.h"

namespace qatx {
namespace ops {
namespace {

struct LsqMetaBackend {
  static constexpr bool kRunsKernels = false;
  static constexpr bool kChecksValuesOnHost = false;
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, Meta, m) { LsqKernels<LsqMetaBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
