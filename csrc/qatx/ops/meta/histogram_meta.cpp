// Meta kernels of the histogram observer ops: shapes and dtypes only, sharing every check and
// allocation with the CPU and CUDA kernels (ops/histogram_impl.h).
#include "qatx/ops/histogram_impl.h"

namespace qatx {
namespace ops {
namespace {

struct HistogramMetaBackend {
  static constexpr bool kRunsKernels = false;
  static constexpr bool kChecksValuesOnHost = false;
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, Meta, m) { HistogramKernels<HistogramMetaBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
