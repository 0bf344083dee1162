// The device-independent part of the histogram observer ops: argument checks and output
// allocation. A backend (CPU, CUDA, Meta) supplies only the loops:
//   static void observe(x, index, hist, grid, bounds, hist_out, grid_out, bounds_out);
//   static void range(hist, grid, bounds, params, min_val, max_val);
// x is dense (its memory order seen as [outer, channels, inner] through `index`); the state
// tensors are contiguous; hist_out / grid_out / bounds_out are fresh contiguous tensors.
// The math (grid rule, exact rebinning, range searches) is qatx/kernels/histogram_math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "qatx/kernels/histogram_math.h"
#include "qatx/ops/affine_args.h"

namespace qatx {
namespace ops {

// Checks the observer state: hist int64 [C, bins] with bins in [16, 2^20], grid int32 [C, 2],
// bounds float32 [C, 2], all on `device`. Returns C.
int64_t check_histogram_state(const at::Tensor& hist, const at::Tensor& grid, const at::Tensor& bounds,
                              const at::Device& device, const char* op);
// The grid exponents of a CPU state lie in [-126, 127] (the CUDA kernels clamp instead).
void check_histogram_grid_values_cpu(const at::Tensor& grid, const char* op);
math::HistMethod histogram_method(const std::string& method, const char* op);
void check_percentile(double percentile, const char* op);

template <class Backend>
struct HistogramKernels {
  using Tensor = at::Tensor;

  static std::tuple<Tensor, Tensor, Tensor> observe(const Tensor& input, const Tensor& hist, const Tensor& grid,
                                                    const Tensor& bounds, c10::optional<int64_t> axis) {
    constexpr const char* op = "qatx::histogram_observe";
    check_float_input(input, op);
    const int64_t channels = check_histogram_state(hist, grid, bounds, input.device(), op);
    Granularity g = Granularity::per_tensor();
    if (axis.has_value()) {
      g = Granularity::per_channel(input, *axis, op);
      TORCH_CHECK(input.size(g.axis) == channels, op, ": hist has ", channels, " rows but input.shape[", *axis,
                  "] = ", input.size(g.axis), "; per-channel state needs one row per channel");
    } else {
      TORCH_CHECK(channels == 1, op, ": axis=None (per-tensor) needs hist of shape [1, bins], got ", channels,
                  " rows");
    }
    Tensor hist_out = at::empty_like(hist, at::MemoryFormat::Contiguous);
    Tensor grid_out = at::empty_like(grid, at::MemoryFormat::Contiguous);
    Tensor bounds_out = at::empty_like(bounds, at::MemoryFormat::Contiguous);
    if constexpr (Backend::kRunsKernels) {
      if (Backend::kChecksValuesOnHost) check_histogram_grid_values_cpu(grid, op);
      const Tensor x = dense_input_like_output(input, g);
      Backend::observe(x, qparam_index(x, g), hist.contiguous(), grid.contiguous(), bounds.contiguous(), hist_out,
                       grid_out, bounds_out);
    }
    return {hist_out, grid_out, bounds_out};
  }

  static std::tuple<Tensor, Tensor> range(const Tensor& hist, const Tensor& grid, const Tensor& bounds,
                                          c10::string_view method, double percentile, int64_t quant_min,
                                          int64_t quant_max, bool symmetric) {
    constexpr const char* op = "qatx::histogram_range";
    const int64_t channels = check_histogram_state(hist, grid, bounds, hist.device(), op);
    const math::HistMethod m = histogram_method(std::string(method.data(), method.size()), op);
    check_percentile(percentile, op);
    check_quant_range(quant_min, quant_max, op);
    Tensor min_val = at::empty({channels}, bounds.options());
    Tensor max_val = at::empty({channels}, bounds.options());
    if constexpr (Backend::kRunsKernels) {
      if (Backend::kChecksValuesOnHost) check_histogram_grid_values_cpu(grid, op);
      Backend::range(hist.contiguous(), grid.contiguous(), bounds.contiguous(),
                     math::HistSearchParams{m, percentile, quant_min, quant_max, symmetric}, min_val, max_val);
    }
    return {min_val, max_val};
  }

  static void register_all(torch::Library& m) {
    m.impl("histogram_observe", &observe);
    m.impl("histogram_range", &range);
  }
};

}  // namespace ops
}  // namespace qatx
