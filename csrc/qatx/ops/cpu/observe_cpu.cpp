// CPU kernel of qatx::_observe_min_max: one read of the input for the minimum and maximum of
// each channel (non-finite values read as 0), then a short serial pass over the channels that
// updates the running range and writes scale and zero_point (kernels/quant_math.h).
//
// The input is seen in memory order as [outer, channels, inner]. Per-tensor inputs and long inner
// runs are cut into chunks (parallel), each reduced into its own partial range; short inner runs
// are reduced by row blocks, each with a partial range per channel. Min and max do not depend on
// the order of evaluation, so the partials are merged serially in any fixed order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "qatx/ops/cpu/cpu_kernels.h"
#include "qatx/ops/observe_impl.h"

namespace qatx {
namespace ops {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kLanes = 16;  // independent minima/maxima, so the loop vectorizes without -ffast-math

// Range of n consecutive elements, merged into [lo, hi]. Inlined into the multi-ISA loops below.
template <typename T>
QATX_ALWAYS_INLINE void merge_range_of_run(const T* x, int64_t n, float& lo, float& hi) {
  float l[kLanes], h[kLanes];
  for (int k = 0; k < kLanes; ++k) l[k] = lo, h[k] = hi;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float v = math::finite_or_zero(static_cast<float>(x[j + k]));
      l[k] = math::select(v < l[k], v, l[k]);
      h[k] = math::select(v > h[k], v, h[k]);
    }
  }
  for (; j < n; ++j) {
    const float v = math::finite_or_zero(static_cast<float>(x[j]));
    l[0] = v < l[0] ? v : l[0];
    h[0] = v > h[0] ? v : h[0];
  }
  for (int k = 0; k < kLanes; ++k) {
    lo = l[k] < lo ? l[k] : lo;
    hi = h[k] > hi ? h[k] : hi;
  }
}

template <typename T>
QATX_CPU_CLONES void range_of_run(const T* x, int64_t n, float& lo, float& hi) {
  merge_range_of_run(x, n, lo, hi);
}

// Per-channel ranges of rows [o0, o1) of [outer, channels, inner] with short inner runs: each
// row is one contiguous segment of channels runs of inner elements.
template <typename T>
QATX_CPU_CLONES void ranges_of_rows(const T* x, math::QParamRuns r, int64_t o0, int64_t o1, float* lo, float* hi) {
  for (int64_t o = o0; o < o1; ++o) {
    const T* row = x + o * r.channels * r.inner;
    for (int64_t c = 0; c < r.channels; ++c) merge_range_of_run(row + c * r.inner, r.inner, lo[c], hi[c]);
  }
}

void batch_ranges(const at::Tensor& x, math::QParamRuns r, std::vector<float>& lo, std::vector<float>& hi) {
  lo.assign(r.channels, kInf);
  hi.assign(r.channels, -kInf);
  QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_observe_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    constexpr int64_t kLongRun = 4096;
    if (r.inner >= kLongRun || r.channels == 1) {
      // Chunks of at most kGrainElements inside one inner run: tasks (o, c, chunk).
      const int64_t chunks = (r.inner + cpu::kGrainElements - 1) / cpu::kGrainElements;
      const int64_t tasks = r.outer * r.channels * chunks;
      std::vector<float> plo(tasks, kInf), phi(tasks, -kInf);
      at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t run = t / chunks, i0 = (t % chunks) * cpu::kGrainElements;
          range_of_run<scalar_t>(xp + run * r.inner + i0, std::min(cpu::kGrainElements, r.inner - i0), plo[t],
                                 phi[t]);
        }
      });
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t c = (t / chunks) % r.channels;
        lo[c] = std::min(lo[c], plo[t]);
        hi[c] = std::max(hi[c], phi[t]);
      }
      return;
    }
    // Short inner runs: blocks of rows, each with its own per-channel partial ranges.
    const int64_t row_elems = r.channels * r.inner;
    const int64_t rows_per_task = std::max<int64_t>(1, cpu::kGrainElements / row_elems);
    const int64_t tasks = (r.outer + rows_per_task - 1) / rows_per_task;
    std::vector<float> plo(tasks * r.channels, kInf), phi(tasks * r.channels, -kInf);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        ranges_of_rows<scalar_t>(xp, r, t * rows_per_task, std::min(r.outer, (t + 1) * rows_per_task),
                                 plo.data() + t * r.channels, phi.data() + t * r.channels);
      }
    });
    for (int64_t t = 0; t < tasks; ++t) {
      for (int64_t c = 0; c < r.channels; ++c) {
        lo[c] = std::min(lo[c], plo[t * r.channels + c]);
        hi[c] = std::max(hi[c], phi[t * r.channels + c]);
      }
    }
  });
}

struct CpuObserveBackend {
  static constexpr bool kRunsKernels = true;
  static void observe(const at::Tensor& x, math::QParamRuns r, at::Tensor& min_val, at::Tensor& max_val,
                      at::Tensor& scale, at::Tensor& zero_point, float c, int64_t quant_min, int64_t quant_max,
                      bool symmetric) {
    std::vector<float> lo, hi;
    batch_ranges(x, r, lo, hi);
    float* mn = min_val.mutable_data_ptr<float>();
    float* mx = max_val.mutable_data_ptr<float>();
    float* s = scale.mutable_data_ptr<float>();
    int32_t* z = zero_point.mutable_data_ptr<int32_t>();
    for (int64_t k = 0; k < r.channels; ++k) {
      const math::Range run = math::update_running_range({mn[k], mx[k]}, {lo[k], hi[k]}, c);
      mn[k] = run.lo;
      mx[k] = run.hi;
      const math::RangeQParams q = math::qparams_from_range(run.lo, run.hi, quant_min, quant_max, symmetric);
      s[k] = q.scale;
      z[k] = q.zero_point;
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CPU, m) { m.impl("_observe_min_max", &ObserveKernels<CpuObserveBackend>::observe); }

}  // namespace ops
}  // namespace qatx
