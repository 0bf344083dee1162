#include "qatx/ops/affine_args.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/SymInt.h>
#include <c10/util/irange.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "qatx/ops/output_memory.h"

namespace qatx {
namespace ops {

Granularity Granularity::per_channel(const at::Tensor& input, int64_t axis, const char* op) {
  const int64_t dim = input.dim();
  TORCH_CHECK(dim >= 1, op, ": per-channel quantization needs an input with at least one dimension, got a 0-dim tensor");
  TORCH_CHECK(axis >= -dim && axis < dim, op, ": axis=", axis, " is out of range for an input with ", dim,
              " dimensions; allowed range is [", -dim, ", ", dim - 1, "]");
  return {Kind::PerChannel, axis < 0 ? axis + dim : axis, 0};
}

void check_quant_range(int64_t quant_min, int64_t quant_max, const char* op) {
  TORCH_CHECK(quant_min >= math::kQuantRangeLowest && quant_max <= math::kQuantRangeHighest, op,
              ": quant_min=", quant_min, " and quant_max=", quant_max, " must lie inside [",
              math::kQuantRangeLowest, ", ", math::kQuantRangeHighest, "] (at most 16 bits)");
  TORCH_CHECK(quant_min < quant_max, op, ": quant_min=", quant_min, " must be smaller than quant_max=", quant_max);
}

// "torch.int8" rather than c10's "Char": errors speak the user's language.
static std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return c10::toString(dtype);
  }
}

static std::pair<int64_t, int64_t> integer_range(at::ScalarType dtype, const char* op, const char* name) {
  switch (dtype) {
    case at::kChar: return {std::numeric_limits<int8_t>::lowest(), std::numeric_limits<int8_t>::max()};
    case at::kByte: return {0, std::numeric_limits<uint8_t>::max()};
    case at::kShort: return {std::numeric_limits<int16_t>::lowest(), std::numeric_limits<int16_t>::max()};
    case at::kInt: return {std::numeric_limits<int32_t>::lowest(), std::numeric_limits<int32_t>::max()};
    default:
      TORCH_CHECK(false, op, ": ", name, " must be torch.int8, torch.uint8, torch.int16 or torch.int32, got ",
                  dtype_name(dtype));
  }
}

void check_quant_range_for_dtype(int64_t quant_min, int64_t quant_max, at::ScalarType dtype, const char* op) {
  const auto [lo, hi] = integer_range(dtype, op, "dtype");
  TORCH_CHECK(quant_min >= lo && quant_max <= hi, op, ": quant_min=", quant_min, " and quant_max=", quant_max,
              " must lie inside the range of dtype ", dtype_name(dtype), ", [", lo, ", ", hi, "]");
  TORCH_CHECK(quant_min < quant_max, op, ": quant_min=", quant_min, " must be smaller than quant_max=", quant_max);
}

void check_float_input(const at::Tensor& input, const char* op, const char* name) {
  const auto t = input.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype_name(t));
}

void check_int_input(const at::Tensor& input, const char* op) {
  integer_range(input.scalar_type(), op, "input");  // errors with the allowed dtypes
}

static void check_same_device(const at::Tensor& input, const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the input's device (", input.device(),
              "), got ", t.device());
}

void check_qparams(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                   const Granularity& g, const char* op, QParamDtypes dtypes) {
  check_same_device(input, scale, "scale", op);
  check_same_device(input, zero_point, "zero_point", op);
  if (dtypes == QParamDtypes::Learnable) {
    TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be torch.float32 (a learnable parameter), got ",
                dtype_name(scale.scalar_type()));
    TORCH_CHECK(zero_point.scalar_type() == at::kFloat, op,
                ": zero_point must be torch.float32 (a learnable parameter, rounded to an integer when used), got ",
                dtype_name(zero_point.scalar_type()));
  } else {
    TORCH_CHECK(at::isFloatingType(scale.scalar_type()), op, ": scale must have a floating dtype, got ",
                dtype_name(scale.scalar_type()));
    TORCH_CHECK(at::isIntegralType(zero_point.scalar_type(), /*includeBool=*/false), op,
                ": zero_point must have an integer dtype (e.g. torch.int32), got ",
                dtype_name(zero_point.scalar_type()));
  }
  TORCH_CHECK(scale.sym_sizes() == zero_point.sym_sizes(), op, ": scale and zero_point must have the same shape, got ",
              scale.sym_sizes(), " and ", zero_point.sym_sizes());
  switch (g.kind) {
    case Granularity::Kind::PerTensor:
      TORCH_CHECK(scale.sym_numel() == 1, op, ": per-tensor scale and zero_point must have one element, got shape ",
                  scale.sym_sizes());
      break;
    case Granularity::Kind::PerChannel:
      TORCH_CHECK(scale.dim() == 1 && scale.sym_size(0) == input.sym_size(g.axis), op,
                  ": per-channel scale and zero_point must have shape [", input.sym_size(g.axis),
                  "] (input.shape[axis] for axis=", g.axis, "), got ", scale.sym_sizes());
      break;
    case Granularity::Kind::PerGroup: {
      TORCH_CHECK(input.dim() >= 1, op, ": per-group quantization needs an input with at least one dimension");
      const c10::SymInt last = input.sym_size(-1);
      TORCH_CHECK(g.group_size >= 1, op, ": group_size=", g.group_size, " must be at least 1");
      TORCH_CHECK(last % g.group_size == 0, op, ": group_size=", g.group_size,
                  " must divide the last dimension of the input (", last, ")");
      std::vector<c10::SymInt> expected(input.sym_sizes().begin(), input.sym_sizes().end());
      expected.back() = last / g.group_size;
      TORCH_CHECK(scale.sym_sizes() == c10::SymIntArrayRef(expected), op,
                  ": per-group scale and zero_point must have shape input.shape[:-1] + [input.shape[-1] // group_size] = ",
                  c10::SymIntArrayRef(expected), ", got ", scale.sym_sizes());
      break;
    }
  }
}

void check_qparam_values_cpu(const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                             int64_t quant_max, bool check_zero_point_range, const char* op) {
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const float* sp = s.const_data_ptr<float>();
  // As double (exact for int32 and float32); an int32 zero point is read as it is (no copy).
  const bool int32 = zero_point.scalar_type() == at::kInt;
  const at::Tensor z = int32 ? zero_point.contiguous() : zero_point.to(at::kDouble).contiguous();
  const auto zero_point_at = [&](int64_t i) {
    return int32 ? static_cast<double>(z.const_data_ptr<int32_t>()[i]) : z.const_data_ptr<double>()[i];
  };
  for (const auto i : c10::irange(s.numel())) {
    const double zp_i = zero_point_at(i);
    TORCH_CHECK(math::is_valid_scale(sp[i]), op, ": scale must be finite and at least 2^-126 (", math::kMinScale,
                ") so that 1/scale is finite; got scale=", sp[i], " at index ", i);
    TORCH_CHECK(!std::isnan(zp_i), op, ": zero_point must not be NaN; got NaN at index ", i);
    TORCH_CHECK(!check_zero_point_range || (zp_i >= quant_min && zp_i <= quant_max), op, ": zero_point=", zp_i,
                " at index ", i, " must lie inside [quant_min, quant_max] = [", quant_min, ", ", quant_max, "]");
  }
}

at::Tensor empty_output_like(const at::Tensor& input, const Granularity& g, at::ScalarType dtype) {
  const auto options = input.options().dtype(dtype);
  if (g.kind == Granularity::Kind::PerGroup) return empty_output(input.sym_sizes(), options);
  return empty_like_output(input, options);
}

at::Tensor empty_mask_for(const at::Tensor& input) {
  return empty_output({(input.sym_numel() + 7) / 8}, input.options().dtype(at::kByte));
}

at::Tensor dense_input_like_output(const at::Tensor& input, const Granularity& g) {
  if (g.kind == Granularity::Kind::PerGroup) return input.contiguous();
  if (input.is_non_overlapping_and_dense()) return input;
  return at::empty_like(input).copy_(input);
}

at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& dense) {
  if (t.strides() == dense.strides() && t.is_non_overlapping_and_dense()) return t;
  return at::empty_like(dense, t.options()).copy_(t);
}

at::Tensor scale_as_float(const at::Tensor& scale) { return scale.to(at::kFloat).contiguous(); }

at::Tensor zero_point_as_float(const at::Tensor& zero_point) { return zero_point.to(at::kFloat).contiguous(); }

math::QParamIndex qparam_index(const at::Tensor& dense, const Granularity& g) {
  switch (g.kind) {
    case Granularity::Kind::PerChannel:
      return {std::max<int64_t>(dense.stride(g.axis), 1), std::max<int64_t>(dense.size(g.axis), 1)};
    case Granularity::Kind::PerGroup:
      return {g.group_size, std::max<int64_t>(dense.numel() / g.group_size, 1)};
    case Granularity::Kind::PerTensor:
    default:
      return {std::max<int64_t>(dense.numel(), 1), 1};
  }
}

}  // namespace ops
}  // namespace qatx
