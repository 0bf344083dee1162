// CPU kernels of the learnable quantizers (LSQ, LSQ+, PACT). The forward passes are the affine
// fake-quantize loop (cpu_kernels.h, via lsq_impl.h); this file holds the backward passes. The
// math is qatx/kernels/quant_math.h; this file only loops.
//
// A backward pass reads the input and the incoming gradient once: it recomputes each element's
// quantization, writes grad_input and reduces the qparam gradient terms in the same loop. The
// reduction is deterministic: math::ReductionTiling cuts the tensor, seen as [outer, channels,
// inner], into tiles that depend only on its shape; each tile sums its terms per channel in a
// fixed order into one partial sum (float32 terms, float64 sums), and each channel's partials
// are then added in row order. So the bits of grad_scale do not depend on the thread count.
// Partials take at most 2 numel / kBlock + 2 channels doubles; there are no atomics.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "qatx/ops/cpu/cpu_kernels.h"
#include "qatx/ops/lsq_impl.h"

namespace qatx {
namespace ops {
namespace {

using cpu::kBlock;
using math::ReductionTile;
using math::ReductionTiling;

// Row segments of at most kBlock elements (they fit the per-element arrays), long runs in kBlock
// chunks, and at least kBlock elements per channel in a tile over short runs.
ReductionTiling cpu_tiling(math::QParamIndex index, int64_t numel) {
  return math::make_reduction_tiling(math::qparam_runs(index, numel), kBlock, kBlock, kBlock);
}

int64_t grain_tiles(const ReductionTiling& t) {
  return std::max<int64_t>(1, cpu::kGrainElements / (t.tile_rows * t.tile_channels * t.run));
}

constexpr int kLanes = 8;

// Adds a[0..n) to 8 float64 lanes: lane k takes positions j = k (mod 8) in increasing order.
// A fixed order that GCC still vectorizes (widen 8 floats, add 8 doubles).
QATX_ALWAYS_INLINE void add_to_lanes(const float* a, int64_t n, double lanes[kLanes]) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += a[j + k];
  for (int k = 0; j + k < n; ++k) lanes[k] += a[j + k];
}

// Adds a row segment of whole inner runs, a[c * inner + i], to sums[c] (i in order).
QATX_ALWAYS_INLINE void add_to_channels(const float* a, int64_t channels, int64_t inner, double* sums) {
  if (inner == 1) {
    for (int64_t c = 0; c < channels; ++c) sums[c] += a[c];
    return;
  }
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t i = 0; i < inner; ++i) sums[c] += a[c * inner + i];
}

// Runs one tile: row(p0, n, terms) handles the row segment of n elements at memory position p0,
// writing grad_input there and each element's kSums gradient terms to terms[k][j]. The terms are
// summed per channel (one-channel tiles through the 8 lanes, added 0..7 at the end) and written
// to partials[k][tile.partial_row][channel].
template <int kSums, typename RowFn>
QATX_ALWAYS_INLINE void reduce_tile(const ReductionTiling& tiling, const ReductionTile& tile, const RowFn& row,
                                    double* partials) {
  const int64_t tile_channels = tile.c1 - tile.c0;
  const int64_t n = tile_channels * (tile.i1 - tile.i0);
  float terms[kSums][kBlock];
  double lanes[kSums][kLanes] = {};
  double sums[kSums][kBlock];
  for (int k = 0; k < kSums; ++k) std::fill(sums[k], sums[k] + tile_channels, 0.0);
  for (int64_t o = tile.o0; o < tile.o1; ++o) {
    row((o * tiling.channels + tile.c0) * tiling.inner + tile.i0, n, terms);
    for (int k = 0; k < kSums; ++k) {
      if (tile_channels == 1)
        add_to_lanes(terms[k], n, lanes[k]);
      else
        add_to_channels(terms[k], tile_channels, tiling.inner, sums[k]);
    }
  }
  for (int k = 0; k < kSums; ++k) {
    if (tile_channels == 1)
      for (int l = 0; l < kLanes; ++l) sums[k][0] += lanes[k][l];
    double* out = partials + (k * tiling.partial_rows() + tile.partial_row) * tiling.channels + tile.c0;
    std::copy(sums[k], sums[k] + tile_channels, out);
  }
}

// The row functions of reduce_tile are functors with always-inlined calls, not lambdas: a lambda
// is a function of its own, compiled for the baseline ISA, whereas the loop must be inlined into
// the multi-ISA clone to use its vectors.
template <typename T, bool kZeroPoint, typename QP>
struct LsqBackwardRow {
  const T* x;
  const T* g;
  T* gx;
  const QP& qp;
  float qmin, qmax;

  QATX_ALWAYS_INLINE void operator()(int64_t p0, int64_t n, float (*terms)[kBlock]) const {
    for (int64_t j = 0; j < n; ++j) {
      const T gj = g[p0 + j];
      const math::LsqGradTerms t = math::lsq_grad_terms(static_cast<float>(x[p0 + j]), static_cast<float>(gj),
                                                        qp.scale(j), qp.inv_scale(j), qp.zero_point(j), qmin, qmax);
      gx[p0 + j] = t.in_range ? gj : T(0);
      terms[0][j] = t.scale;
      if constexpr (kZeroPoint) terms[1][j] = t.zero_point;
    }
  }
};

template <typename T>
struct PactBackwardRow {
  const T* x;
  const T* g;
  T* gx;
  float alpha;
  bool is_signed;

  QATX_ALWAYS_INLINE void operator()(int64_t p0, int64_t n, float (*terms)[kBlock]) const {
    for (int64_t j = 0; j < n; ++j) {
      const float xf = static_cast<float>(x[p0 + j]);
      const T gj = g[p0 + j];
      gx[p0 + j] = math::pact_in_range(xf, alpha, is_signed) ? gj : T(0);
      terms[0][j] = math::pact_alpha_term(xf, static_cast<float>(gj), alpha, is_signed);
    }
  }
};

template <typename T, bool kZeroPoint>
QATX_CPU_CLONES void lsq_backward_tiles(const T* x, const T* g, T* gx, const float* scale, const float* zero_point,
                                        ReductionTiling tiling, int64_t tile_begin, int64_t tile_end, float qmin,
                                        float qmax, double* partials) {
  constexpr int kSums = kZeroPoint ? 2 : 1;
  cpu::PerElementQParams gathered;
  for (int64_t i = tile_begin; i < tile_end; ++i) {
    const ReductionTile tile = tiling.tile(i);
    if (tile.c1 - tile.c0 == 1) {
      const cpu::UniformQParams qp{scale[tile.c0], 1.0f / scale[tile.c0], zero_point[tile.c0]};
      reduce_tile<kSums>(tiling, tile, LsqBackwardRow<T, kZeroPoint, cpu::UniformQParams>{x, g, gx, qp, qmin, qmax},
                         partials);
      continue;
    }
    // Whole inner runs of several channels: the same per-element qparams for every row.
    for (int64_t c = tile.c0, j = 0; c < tile.c1; ++c) {
      for (int64_t k = 0; k < tiling.inner; ++k, ++j) {
        gathered.s[j] = scale[c];
        gathered.inv[j] = 1.0f / scale[c];
        gathered.z[j] = zero_point[c];
      }
    }
    reduce_tile<kSums>(tiling, tile,
                       LsqBackwardRow<T, kZeroPoint, cpu::PerElementQParams>{x, g, gx, gathered, qmin, qmax},
                       partials);
  }
}

template <typename T>
QATX_CPU_CLONES void pact_backward_tiles(const T* x, const T* g, T* gx, float alpha, bool is_signed,
                                         ReductionTiling tiling, int64_t tile_begin, int64_t tile_end,
                                         double* partials) {
  for (int64_t i = tile_begin; i < tile_end; ++i)
    reduce_tile<1>(tiling, tiling.tile(i), PactBackwardRow<T>{x, g, gx, alpha, is_signed}, partials);
}

at::Tensor empty_partials(const ReductionTiling& tiling, int64_t sums, const at::Tensor& like) {
  return at::empty({sums, tiling.partial_rows(), tiling.channels}, like.options().dtype(at::kDouble));
}

// grad[c] = float32(factor * sum of partials[k][r][c] over r in increasing order).
void sum_partials(const at::Tensor& partials, int64_t k, const ReductionTiling& tiling, double factor,
                  at::Tensor& grad) {
  const int64_t rows = tiling.partial_rows();
  const int64_t channels = tiling.channels;
  const double* p = partials.const_data_ptr<double>() + k * rows * channels;
  float* out = grad.mutable_data_ptr<float>();
  at::parallel_for(0, channels, std::max<int64_t>(1, cpu::kGrainElements / rows), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double sum = 0.0;
      for (int64_t r = 0; r < rows; ++r) sum += p[r * channels + c];
      out[c] = static_cast<float>(factor * sum);
    }
  });
}

struct LsqCpuBackend : CpuBackend {
  static void lsq_backward(const at::Tensor& x, const at::Tensor& grad, at::Tensor& grad_input,
                           const at::Tensor& scale, const at::Tensor& zero_point, math::QParamIndex index,
                           int64_t quant_min, int64_t quant_max, double grad_factor, at::Tensor& grad_scale,
                           at::Tensor& grad_zero_point) {
    const ReductionTiling tiling = cpu_tiling(index, x.numel());
    const bool with_zero_point = grad_zero_point.defined();
    const at::Tensor partials = empty_partials(tiling, with_zero_point ? 2 : 1, x);
    const float* sp = scale.const_data_ptr<float>();
    const float* zp = zero_point.const_data_ptr<float>();
    double* pp = partials.mutable_data_ptr<double>();
    const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
    QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_lsq_backward_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      scalar_t* gxp = grad_input.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, tiling.num_tiles(), grain_tiles(tiling), [&](int64_t t0, int64_t t1) {
        if (with_zero_point)
          lsq_backward_tiles<scalar_t, true>(xp, gp, gxp, sp, zp, tiling, t0, t1, qmin, qmax, pp);
        else
          lsq_backward_tiles<scalar_t, false>(xp, gp, gxp, sp, zp, tiling, t0, t1, qmin, qmax, pp);
      });
    });
    sum_partials(partials, 0, tiling, grad_factor, grad_scale);
    if (with_zero_point) sum_partials(partials, 1, tiling, grad_factor, grad_zero_point);
  }

  static void pact_backward(const at::Tensor& x, const at::Tensor& grad, at::Tensor& grad_input,
                            const at::Tensor& alpha, bool is_signed, at::Tensor& grad_alpha) {
    const ReductionTiling tiling = cpu_tiling(math::QParamIndex{x.numel(), 1}, x.numel());
    const at::Tensor partials = empty_partials(tiling, 1, x);
    const float a = alpha.const_data_ptr<float>()[0];
    double* pp = partials.mutable_data_ptr<double>();
    QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_pact_backward_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      scalar_t* gxp = grad_input.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, tiling.num_tiles(), grain_tiles(tiling), [&](int64_t t0, int64_t t1) {
        pact_backward_tiles<scalar_t>(xp, gp, gxp, a, is_signed, tiling, t0, t1, pp);
      });
    });
    sum_partials(partials, 0, tiling, 1.0, grad_alpha);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CPU, m) { LsqKernels<LsqCpuBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
