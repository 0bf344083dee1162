// CPU kernels of the histogram observer ops. The math (grid rule, exact rebinning, range
// searches) is qatx/kernels/histogram_math.h; this file only loops.
//
// observe: one pass for each channel's finite min / max, a serial per-channel grid update and
// exact rebinning of the previous counts, one pass that bins the batch. Per-tensor work is split
// into chunks with private counts that are added afterwards (integer sums, so the result does
// not depend on the split); per-channel work is split by channel. Bin indices are computed in
// blocks by a vectorized loop (cpu_kernels.h clones it per ISA), then counted.
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

// Min and max of the finite values of x[0, n) folded into lo / hi.
template <typename T>
QATX_CPU_CLONES void finite_minmax(const T* x, int64_t n, float& lo, float& hi) {
  float l = lo, h = hi;
  for (int64_t j = 0; j < n; ++j) {
    const float v = static_cast<float>(x[j]);
    const bool finite = std::fabs(v) <= std::numeric_limits<float>::max();
    const float vl = math::select(finite, v, kInf), vh = math::select(finite, v, -kInf);
    l = vl < l ? vl : l;
    h = vh > h ? vh : h;
  }
  lo = l;
  hi = h;
}

// Bin indices of x[0, n) (dump for non-finite values).
template <typename T>
QATX_CPU_CLONES void bin_indices(const T* x, int64_t n, float inv_width, float a, float dump, int32_t* idx) {
  for (int64_t j = 0; j < n; ++j) idx[j] = math::hist_bin(static_cast<float>(x[j]), inv_width, a, dump);
}

// Adds the values x[0, n) to counts (bins + 1 entries; the last collects non-finite values).
template <typename T>
void count_values(const T* x, int64_t n, math::HistGrid g, int64_t bins, int64_t* counts) {
  int32_t idx[kBlock];
  const float inv = math::exp2_int(-g.e);
  for (int64_t p = 0; p < n; p += kBlock) {
    const int64_t m = std::min(kBlock, n - p);
    bin_indices(x + p, m, inv, static_cast<float>(g.a), static_cast<float>(bins), idx);
    for (int64_t j = 0; j < m; ++j) ++counts[idx[j]];
  }
}

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

struct HistogramCpuBackend {
  static constexpr bool kRunsKernels = true;
  static constexpr bool kChecksValuesOnHost = true;

  static void observe(const at::Tensor& x, math::QParamIndex index, const at::Tensor& hist, const at::Tensor& grid,
                      const at::Tensor& bounds, at::Tensor& hist_out, at::Tensor& grid_out, at::Tensor& bounds_out) {
    const int64_t channels = hist.size(0), bins = hist.size(1), numel = x.numel();
    const int64_t inner = index.inner, outer = numel == 0 ? 0 : numel / (inner * channels);
    std::vector<float> batch_lo(channels, kInf), batch_hi(channels, -kInf);
    QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_histogram_minmax_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
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
    });

    // Grid update and exact rebinning of the previous counts, channel by channel.
    const int64_t* h_in = hist.const_data_ptr<int64_t>();
    const int32_t* g_in = grid.const_data_ptr<int32_t>();
    const float* b_in = bounds.const_data_ptr<float>();
    int64_t* h_out = hist_out.mutable_data_ptr<int64_t>();
    int32_t* g_out = grid_out.mutable_data_ptr<int32_t>();
    float* b_out = bounds_out.mutable_data_ptr<float>();
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

    QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_histogram_count_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      if (channels == 1) {
        const int64_t chunk = 1 << 18;
        const int64_t chunks = (numel + chunk - 1) / chunk;
        at::Tensor partial = at::zeros({chunks, bins + 1}, hist.options());
        int64_t* pp = partial.mutable_data_ptr<int64_t>();
        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t p = c * chunk;
            count_values(xp + p, std::min(chunk, numel - p), grids[0], bins, pp + c * (bins + 1));
          }
        });
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t j = 0; j < bins; ++j) h_out[j] += pp[c * (bins + 1) + j];
      } else {
        at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
          std::vector<int64_t> counts(bins + 1);
          for (int64_t c = c0; c < c1; ++c) {
            std::fill(counts.begin(), counts.end(), int64_t{0});
            for_each_run(xp, outer, channels, inner, c,
                         [&](const scalar_t* run, int64_t n) { count_values(run, n, grids[c], bins, counts.data()); });
            for (int64_t j = 0; j < bins; ++j) h_out[c * bins + j] += counts[j];
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
        math::HistSearch s{h + c * bins, bins, math::HistGrid{g[2 * c], g[2 * c + 1]}, b[2 * c], b[2 * c + 1], params,
                           scratch.data()};
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
