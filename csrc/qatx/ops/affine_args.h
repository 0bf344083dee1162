// Argument checking and memory layout shared by every affine (fake-)quantize kernel: the CPU,
// CUDA and Meta kernels call the same functions, so they agree on what is valid and on the
// layout of their outputs.
#pragma once

#include <ATen/core/Tensor.h>

#include "qatx/kernels/quant_math.h"

namespace qatx {
namespace ops {

// Which elements share a scale / zero point.
struct Granularity {
  enum class Kind { PerTensor, PerChannel, PerGroup };
  Kind kind;
  int64_t axis = 0;        // PerChannel: the channel dimension, already wrapped to [0, dim).
  int64_t group_size = 0;  // PerGroup: consecutive elements of the last dimension.

  static Granularity per_tensor() { return {Kind::PerTensor}; }
  // Wraps a negative axis; errors when axis is outside [-dim, dim).
  static Granularity per_channel(const at::Tensor& input, int64_t axis, const char* op);
  static Granularity per_group(int64_t group_size) { return {Kind::PerGroup, 0, group_size}; }
};

// quant_min < quant_max, both inside [-32768, 32767] (2- to 16-bit).
void check_quant_range(int64_t quant_min, int64_t quant_max, const char* op);
// quant_min < quant_max, both representable in the integer dtype `dtype`.
void check_quant_range_for_dtype(int64_t quant_min, int64_t quant_max, at::ScalarType dtype,
                                 const char* op);
// input is float32, float16 or bfloat16.
void check_float_input(const at::Tensor& input, const char* op, const char* name = "input");
// input is int8, uint8, int16 or int32 (what quantize_* produces).
void check_int_input(const at::Tensor& input, const char* op);
// The dtypes the qparams may have. Affine ops: any floating scale and an integer zero point
// (both used as float32). Learnable ops: float32 scale and float32 zero point, the parameters
// whose gradients the ops return.
enum class QParamDtypes { Affine, Learnable };

// Shape, dtype and device of scale and zero_point for the granularity. Meta-safe (no data
// access, symbolic sizes allowed).
void check_qparams(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                   const Granularity& g, const char* op, QParamDtypes dtypes = QParamDtypes::Affine);

// Value checks of the qparams, on the CPU only (a CUDA kernel checks them on the device to
// avoid a host synchronisation): every scale in [2^-126, FLT_MAX], no zero point NaN (a float
// zero point), and, when check_zero_point_range, every zero point inside [quant_min, quant_max].
void check_qparam_values_cpu(const at::Tensor& scale, const at::Tensor& zero_point,
                             int64_t quant_min, int64_t quant_max, bool check_zero_point_range,
                             const char* op);

// The output of an elementwise affine op: the input's dense layout (so channels-last and
// permuted tensors keep theirs) and contiguous for per-group, whose groups run along the
// last dimension in memory.
at::Tensor empty_output_like(const at::Tensor& input, const Granularity& g, at::ScalarType dtype);
// The bit-packed STE mask: one bit per element, ceil(numel / 8) bytes, in memory order.
at::Tensor empty_mask_for(const at::Tensor& input);
// The input in the layout empty_output_like gives (a copy only when the input is not
// already dense in that layout), so kernels can walk input and output linearly.
at::Tensor dense_input_like_output(const at::Tensor& input, const Granularity& g);
// `t` (same shape as the dense tensor `dense`) with dense's strides, a copy only when they
// differ: a kernel then walks both in the same memory order (e.g. an incoming gradient).
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& dense);

// Scale as float32 and zero point as float32 (exact for int16), both contiguous.
at::Tensor scale_as_float(const at::Tensor& scale);
at::Tensor zero_point_as_float(const at::Tensor& zero_point);
// Maps a memory position of the dense tensor `dense` to its qparam index.
math::QParamIndex qparam_index(const at::Tensor& dense, const Granularity& g);

}  // namespace ops
}  // namespace qatx
