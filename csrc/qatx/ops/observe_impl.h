// The device-independent part of qatx::_observe_min_max: argument checks and the [outer,
// channels, inner] view of the input. A backend (CPU, CUDA, Meta) supplies only the loops:
//   static constexpr bool kRunsKernels;   false for Meta (checks only)
//   static void observe(x, runs, min_val, max_val, scale, zero_point, c, quant_min, quant_max, symmetric);
// x is dense; element p of its memory uses qparam (p / runs.inner) % runs.channels; min_val,
// max_val, scale (float32) and zero_point (int32) are contiguous with runs.channels elements.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>

#include "qatx/ops/affine_args.h"

namespace qatx {
namespace ops {

// Granularity of the observe op from its arguments: per-group when group_size > 0, else
// per-channel along axis when given, else per-tensor.
inline Granularity observe_granularity(const at::Tensor& input, std::optional<int64_t> axis, int64_t group_size,
                                       const char* op) {
  TORCH_CHECK(group_size >= 0, op, ": group_size=", group_size, " must be 0 (no groups) or positive");
  TORCH_CHECK(!(group_size > 0 && axis.has_value()), op, ": give either axis (per-channel) or group_size > 0 "
              "(per-group), not both");
  if (group_size > 0) return Granularity::per_group(group_size);
  if (axis.has_value()) return Granularity::per_channel(input, *axis, op);
  return Granularity::per_tensor();
}

template <class Backend>
struct ObserveKernels {
  static void observe(const at::Tensor& input, at::Tensor& min_val, at::Tensor& max_val, at::Tensor& scale,
                      at::Tensor& zero_point, std::optional<int64_t> axis, int64_t group_size,
                      double averaging_constant, int64_t quant_min, int64_t quant_max, bool symmetric) {
    constexpr const char* op = "qatx::_observe_min_max";
    check_float_input(input, op);
    check_quant_range(quant_min, quant_max, op);
    TORCH_CHECK(averaging_constant < 0 || (averaging_constant > 0 && averaging_constant <= 1), op,
                ": averaging_constant=", averaging_constant,
                " must be in (0, 1] (moving average) or negative (running min/max)");
    const Granularity g = observe_granularity(input, axis, group_size, op);
    TORCH_CHECK(input.sym_numel() > 0, op, ": the input is empty; an observer needs at least one element");
    check_qparams(input, scale, zero_point, g, op);
    TORCH_CHECK(scale.scalar_type() == at::kFloat && zero_point.scalar_type() == at::kInt, op,
                ": scale must be torch.float32 and zero_point torch.int32 (they are written), got ",
                scale.scalar_type(), " and ", zero_point.scalar_type());
    for (const at::Tensor* t : {&min_val, &max_val}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->device() == input.device() &&
                      t->sym_sizes() == scale.sym_sizes(), op,
                  ": min_val and max_val must be torch.float32 on the input's device with the qparams' shape ",
                  scale.sym_sizes(), ", got ", t->scalar_type(), " on ", t->device(), " with shape ", t->sym_sizes());
    }
    for (const at::Tensor* t : {&min_val, &max_val, &scale, &zero_point}) {
      TORCH_CHECK(t->is_contiguous(), op, ": min_val, max_val, scale and zero_point must be contiguous (written in place)");
    }
    if constexpr (Backend::kRunsKernels) {
      const at::Tensor x = dense_input_like_output(input, g);
      const math::QParamRuns runs = math::qparam_runs(qparam_index(x, g), x.numel());
      Backend::observe(x, runs, min_val, max_val, scale, zero_point, static_cast<float>(averaging_constant),
                       quant_min, quant_max, symmetric);
    }
  }
};

}  // namespace ops
}  // namespace qatx
