// CPU kernels of the histogram observer ops. The math (grid rule, exact rebinning, range
// searches) is qatx/kernels/histogram_math.h; this file only loops.
//
// observe: one pass for each channel's finite min / max, a serial per-channel grid update and
// exact rebinning of the previous counts, one pass that bins the batch (per tensor, when the
// state is not empty, the batch is binned on the current grid in the range pass itself and
// binned again only if it fell outside). Per-tensor work is split into chunks with private
// counts that are added afterwards (integer sums, so the result does not depend on the split);
// per-channel work is split by channel. Bin indices are computed in blocks by a vectorized loop
// (cpu_kernels.h clones it per ISA), then counted in interleaved private histograms.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "qatx/ops/cpu/cpu_kernels.h"
#include "qatx/ops/histogram_impl.h"

namespace qatx {
namespace ops {
namespace {

using cpu::kBlock;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Lanes of the min / max accumulators: a fixed lane per position lets GCC keep them in vector
// registers (a single float min / max reduction does not vectorize without -ffinite-math-only).
constexpr int kLanes = 16;

// Folds the finite v into lane accumulators l / h (NaN and +-Inf are skipped).
QATX_ALWAYS_INLINE void fold_finite(float v, float& l, float& h) {
  const bool finite = std::fabs(v) <= std::numeric_limits<float>::max();
  const float vl = math::select(finite, v, kInf), vh = math::select(finite, v, -kInf);
  l = vl < l ? vl : l;
  h = vh > h ? vh : h;
}

QATX_ALWAYS_INLINE void reduce_lanes(const float* l, const float* h, float& lo, float& hi) {
  for (int k = 0; k < kLanes; ++k) {
    lo = l[k] < lo ? l[k] : lo;
    hi = h[k] > hi ? h[k] : hi;
  }
}

// Min and max of the finite values of x[0, n) folded into lo / hi.
template <typename T>
QATX_CPU_CLONES void finite_minmax(const T* x, int64_t n, float& lo, float& hi) {
  float l[kLanes], h[kLanes];
  for (int k = 0; k < kLanes; ++k) l[k] = kInf, h[k] = -kInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) fold_finite(static_cast<float>(x[j + k]), l[k], h[k]);
  for (int k = 0; j + k < n; ++k) fold_finite(static_cast<float>(x[j + k]), l[k], h[k]);
  reduce_lanes(l, h, lo, hi);
}

// Bin indices of x[0, n) (math::hist_bin: `bins` for what is not counted) and, folded into
// lo / hi, the min and max of its finite values: one vectorized pass.
template <typename T>
QATX_CPU_CLONES void bin_indices(const T* x, int64_t n, float inv_width, float a, float bins, int32_t* idx,
                                 float& lo, float& hi) {
  float l[kLanes], h[kLanes];
  for (int k = 0; k < kLanes; ++k) l[k] = kInf, h[k] = -kInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float v = static_cast<float>(x[j + k]);
      idx[j + k] = math::hist_bin(v, inv_width, a, bins);
      fold_finite(v, l[k], h[k]);
    }
  }
  for (int k = 0; j + k < n; ++k) {
    const float v = static_cast<float>(x[j + k]);
    idx[j + k] = math::hist_bin(v, inv_width, a, bins);
    fold_finite(v, l[k], h[k]);
  }
  reduce_lanes(l, h, lo, hi);
}

// Counts of one thread: kCopies interleaved 32-bit histograms of bins + 1 entries (the last
// collects what is ignored), so that runs of equal bins do not serialise on one counter; they
// are flushed into 64-bit counts before they could overflow.
class LocalCounts {
 public:
  static constexpr int kCopies = 4;
  explicit LocalCounts(int64_t bins) : bins_(bins), counts_(kCopies * (bins + 1), 0) {}

  // Bins x[0, n) with grid g and folds its finite min / max into lo / hi.
  template <typename T>
  void add(const T* x, int64_t n, math::HistGrid g, float& lo, float& hi, int64_t* flush_to) {
    int32_t idx[kBlock];
    const float inv = math::exp2_int(-g.e);
    const int64_t stride = bins_ + 1;
    uint32_t* c = counts_.data();
    for (int64_t p = 0; p < n; p += kBlock) {
      const int64_t m = std::min(kBlock, n - p);
      bin_indices(x + p, m, inv, static_cast<float>(g.a), static_cast<float>(bins_), idx, lo, hi);
      int64_t j = 0;
      for (; j + kCopies <= m; j += kCopies)
        for (int k = 0; k < kCopies; ++k) ++c[k * stride + idx[j + k]];
      for (; j < m; ++j) ++c[idx[j]];
      pending_ += m;
      if (pending_ > (int64_t{1} << 30)) flush(flush_to);
    }
  }

  // Adds the counts (without the ignored slot) to out[0, bins) and clears them.
  void flush(int64_t* out) {
    const int64_t stride = bins_ + 1;
    for (int k = 0; k < kCopies; ++k) {
      uint32_t* c = counts_.data() + k * stride;
      for (int64_t j = 0; j < bins_; ++j) out[j] += c[j];
      std::fill(c, c + stride, 0u);
    }
    pending_ = 0;
  }

 private:
  int64_t bins_;
  std::vector<uint32_t> counts_;
  int64_t pending_ = 0;
};

// Calls fn(ptr, n) for every contiguous run of channel c in x seen as [outer, channels, inner].
template <typename T, typename Fn>
void for_each_run(const T* x, int64_t outer, int64_t channels, int64_t inner, int64_t c, Fn&& fn) {
  if (inner == 1 && channels > 1) {  // strided channel: gather into blocks
    T buf[kBlock];
    for (int64_t o0 = 0; o0 < outer; o0 += kBlock) {
      const int64_t m = std::min(kBlock, outer - o0);
      for (int64_t j = 0; j < m; ++j) buf[j] = x[(o0 + j) * channels + c];
      fn(buf, m);
    }
    return;
  }
  for (int64_t o = 0; o < outer; ++o) fn(x + (o * channels + c) * inner, inner);
}

// Elements per parallel task of the per-tensor pass.
constexpr int64_t kCountChunk = int64_t{1} << 18;

// Per-tensor counts of x on grid g into out[0, bins) (added) and the finite min / max of x.
template <typename T>
void count_per_tensor(const T* x, int64_t numel, math::HistGrid g, int64_t bins, const at::Tensor& like,
                      int64_t* out, float& lo, float& hi) {
  const int64_t chunks = (numel + kCountChunk - 1) / kCountChunk;
  const int max_threads = at::get_num_threads();
  // One row of 64-bit counts and one min / max per task; tasks never exceed the thread count.
  at::Tensor partial = at::zeros({max_threads, bins}, like.options());
  int64_t* pp = partial.mutable_data_ptr<int64_t>();
  std::vector<float> los(max_threads, kInf), his(max_threads, -kInf);
  const int64_t grain = std::max<int64_t>(1, (chunks + max_threads - 1) / max_threads);
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    const int64_t task = c0 / grain;
    LocalCounts counts(bins);
    int64_t* row = pp + task * bins;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t p = c * kCountChunk;
      counts.add(x + p, std::min(kCountChunk, numel - p), g, los[task], his[task], row);
    }
    counts.flush(row);
  });
  for (int t = 0; t < max_threads; ++t) {
    lo = std::min(lo, los[t]);
    hi = std::max(hi, his[t]);
    for (int64_t j = 0; j < bins; ++j) out[j] += pp[t * bins + j];
  }
}

struct HistogramCpuBackend {
  static constexpr bool kRunsKernels = true;
  static constexpr bool kChecksValuesOnHost = true;

  // Per tensor with a non-empty state, the batch is first binned on the current grid in the same
  // pass that finds its range (calibration batches usually fall inside it); only when they do
  // not is the grid refitted and the batch binned again. Otherwise: range pass, then counting.
  static void observe(const at::Tensor& x, math::QParamIndex index, const at::Tensor& hist, const at::Tensor& grid,
                      const at::Tensor& bounds, at::Tensor& hist_out, at::Tensor& grid_out, at::Tensor& bounds_out) {
    const int64_t channels = hist.size(0), bins = hist.size(1), numel = x.numel();
    const int64_t inner = index.inner, outer = numel == 0 ? 0 : numel / (inner * channels);
    const int64_t* h_in = hist.const_data_ptr<int64_t>();
    const int32_t* g_in = grid.const_data_ptr<int32_t>();
    const float* b_in = bounds.const_data_ptr<float>();
    int64_t* h_out = hist_out.mutable_data_ptr<int64_t>();
    int32_t* g_out = grid_out.mutable_data_ptr<int32_t>();
    float* b_out = bounds_out.mutable_data_ptr<float>();

    QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_histogram_observe_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      if (channels == 1 && b_in[0] <= b_in[1] && numel > 0) {
        const math::HistGrid old{g_in[0], g_in[1]};
        std::fill(h_out, h_out + bins, int64_t{0});
        float lo = kInf, hi = -kInf;
        count_per_tensor(xp, numel, old, bins, hist, h_out, lo, hi);
        const math::HistUpdate u = math::hist_update(old, b_in[0], b_in[1], lo, hi, bins);
        if (u.grid.e == old.e && u.grid.a == old.a) {  // the batch fell inside the grid
          for (int64_t j = 0; j < bins; ++j) h_out[j] += h_in[j];
          g_out[0] = old.e, g_out[1] = old.a, b_out[0] = u.lo, b_out[1] = u.hi;
          return;
        }
      }
      std::vector<float> batch_lo(channels, kInf), batch_hi(channels, -kInf);
      if (channels == 1) {
        const int64_t chunks = (numel + cpu::kGrainElements - 1) / cpu::kGrainElements;
        std::vector<float> lo(chunks, kInf), hi(chunks, -kInf);
        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t p = c * cpu::kGrainElements;
            finite_minmax(xp + p, std::min(cpu::kGrainElements, numel - p), lo[c], hi[c]);
          }
        });
        for (int64_t c = 0; c < chunks; ++c) {
          batch_lo[0] = std::min(batch_lo[0], lo[c]);
          batch_hi[0] = std::max(batch_hi[0], hi[c]);
        }
      } else {
        at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c)
            for_each_run(xp, outer, channels, inner, c,
                         [&](const scalar_t* run, int64_t n) { finite_minmax(run, n, batch_lo[c], batch_hi[c]); });
        });
      }

      // Grid update and exact rebinning of the previous counts, channel by channel.
      std::vector<math::HistGrid> grids(channels);
      at::parallel_for(0, channels, 16, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const math::HistGrid old{g_in[2 * c], g_in[2 * c + 1]};
          const float lo = b_in[2 * c], hi = b_in[2 * c + 1];
          const math::HistUpdate u = math::hist_update(old, lo, hi, batch_lo[c], batch_hi[c], bins);
          grids[c] = u.grid;
          g_out[2 * c] = u.grid.e;
          g_out[2 * c + 1] = u.grid.a;
          b_out[2 * c] = u.lo;
          b_out[2 * c + 1] = u.hi;
          int64_t* row = h_out + c * bins;
          std::fill(row, row + bins, int64_t{0});
          if (!(lo <= hi)) continue;  // no previous data
          const int64_t* old_row = h_in + c * bins;
          for (int64_t i = 0; i < bins; ++i) {
            if (old_row[i] == 0) continue;
            // Clamped only for an inconsistent state (counts outside the recorded bounds).
            const int64_t j = std::min(std::max(math::hist_rebin_index(i, old, u.grid), int64_t{0}), bins - 1);
            row[j] += old_row[i];
          }
        }
      });
      if (numel == 0) return;

      if (channels == 1) {
        float lo = kInf, hi = -kInf;
        count_per_tensor(xp, numel, grids[0], bins, hist, h_out, lo, hi);
      } else {
        at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
          LocalCounts counts(bins);
          for (int64_t c = c0; c < c1; ++c) {
            float lo = kInf, hi = -kInf;
            int64_t* row = h_out + c * bins;
            for_each_run(xp, outer, channels, inner, c,
                         [&](const scalar_t* run, int64_t n) { counts.add(run, n, grids[c], lo, hi, row); });
            counts.flush(row);
          }
        });
      }
    });
  }

  static void range(const at::Tensor& hist, const at::Tensor& grid, const at::Tensor& bounds,
                    math::HistSearchParams params, at::Tensor& min_val, at::Tensor& max_val) {
    const int64_t channels = hist.size(0), bins = hist.size(1);
    const int64_t* h = hist.const_data_ptr<int64_t>();
    const int32_t* g = grid.const_data_ptr<int32_t>();
    const float* b = bounds.const_data_ptr<float>();
    float* lo_out = min_val.mutable_data_ptr<float>();
    float* hi_out = max_val.mutable_data_ptr<float>();
    at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
      std::vector<double> scratch(math::hist_scratch_size(bins));
      for (int64_t c = c0; c < c1; ++c) {
        math::HistSearch s = math::make_hist_search(h + c * bins, bins, math::HistGrid{g[2 * c], g[2 * c + 1]},
                                                    b[2 * c], b[2 * c + 1], params, scratch.data());
        s.prepare();
        math::HistRange r = s.full_range();
        if (!s.empty()) {
          if (params.method == math::HistMethod::Percentile) {
            r = s.percentile_range();
          } else {
            double best = 0.0;
            int64_t best_i = -1;
            const int64_t n = s.num_candidates();
            for (int64_t i = 0; i < n; ++i) {
              const double e = s.candidate_error(i);
              if (math::hist_better(e, i, best, best_i)) best = e, best_i = i;
            }
            if (best_i >= 0) r = s.candidate_range(best_i);
          }
        }
        lo_out[c] = r.lo;
        hi_out[c] = r.hi;
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CPU, m) { HistogramKernels<HistogramCpuBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
