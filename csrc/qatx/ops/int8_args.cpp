#include "qatx/ops/int8_args.h"

#include <ATen/ATen.h>

#include <limits>
#include <string>

#include "qatx/kernels/quant_math.h"
#include "qatx/ops/affine.h"
#include "qatx/ops/affine_args.h"
#include "qatx/ops/output_memory.h"

namespace qatx {
namespace ops {
namespace int8 {

static void check_device(const at::Tensor& input, const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the input's device (", input.device(),
              "), got ", t.device());
}

// The qparams of one per-tensor grid (`name`_scale, `name`_zero_point, `name`_quant_min/max).
static void check_grid(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                       int64_t quant_min, int64_t quant_max, bool values, const char* op, const std::string& n) {
  check_device(input, scale, (n + "_scale").c_str(), op);
  check_device(input, zero_point, (n + "_zero_point").c_str(), op);
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()) && scale.sym_numel() == 1, op, ": ", n,
              "_scale must be a floating tensor with one element (per-tensor), got dtype ", scale.scalar_type(),
              " and shape ", scale.sizes());
  TORCH_CHECK(at::isIntegralType(zero_point.scalar_type(), false) && zero_point.sym_numel() == 1, op, ": ", n,
              "_zero_point must be an integer tensor with one element (per-tensor), got dtype ",
              zero_point.scalar_type(), " and shape ", zero_point.sizes());
  TORCH_CHECK(quant_min >= -128 && quant_max <= 255 && quant_min < quant_max && quant_max - quant_min <= 255, op,
              ": ", n, "_quant_min=", quant_min, " and ", n, "_quant_max=", quant_max,
              " must describe at most 8 bits (quant_max - quant_min <= 255) inside [-128, 255]");
  if (values) check_qparam_values_cpu(scale, zero_point, quant_min, quant_max, true, op);
}

void check_input_qparams(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                         int64_t quant_min, int64_t quant_max, bool values, const char* op, const char* name) {
  const std::string n = name;
  const at::ScalarType t = input.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kByte || t == at::kChar, op, ": ", n,
              " must be torch.float32, or torch.uint8 / torch.int8 holding its quantized integers, got ", t);
  TORCH_CHECK(t != at::kByte || quant_min >= 0, op, ": a torch.uint8 ", n, " needs ", n,
              "_quant_min >= 0, got ", quant_min);
  TORCH_CHECK(t != at::kChar || quant_max <= 127, op, ": a torch.int8 ", n, " needs ", n,
              "_quant_max <= 127, got ", quant_max);
  check_grid(input, scale, zero_point, quant_min, quant_max, values, op, n);
}

std::optional<OutputQParams> check_output_qparams(const at::Tensor& input, const std::optional<at::Tensor>& scale,
                                                  const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                                                  int64_t quant_max, bool values, const char* op) {
  const bool has_scale = scale.has_value() && scale->defined();
  const bool has_zero_point = zero_point.has_value() && zero_point->defined();
  TORCH_CHECK(has_scale == has_zero_point, op, ": output_scale and output_zero_point must be given together (got ",
              has_scale ? "output_scale" : "output_zero_point", " only)");
  if (!has_scale) return std::nullopt;
  TORCH_CHECK(quant_min >= 0 ? quant_max <= 255 : (quant_min >= -128 && quant_max <= 127), op,
              ": output_quant_min=", quant_min, " and output_quant_max=", quant_max,
              " must lie inside [0, 255] (uint8 output) or [-128, 127] (int8 output)");
  check_grid(input, *scale, *zero_point, quant_min, quant_max, values, op, "output");
  return OutputQParams{*scale, *zero_point, quant_min, quant_max, quant_min >= 0 ? at::kByte : at::kChar};
}

at::Tensor quantized_output(const at::Tensor& y, const std::optional<OutputQParams>& out) {
  if (!out.has_value() || y.scalar_type() != at::kFloat) return y;
  return quantize_per_tensor_affine(y, out->scale, out->zero_point, out->quant_min, out->quant_max, out->dtype);
}

at::Tensor float_input(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point) {
  if (input.scalar_type() == at::kFloat) return input;
  return (input.to(at::kFloat) - zero_point.to(at::kFloat).reshape({})) * scale.to(at::kFloat).reshape({});
}

void check_add(const at::Tensor& input, const at::Tensor& other, const char* op) {
  check_device(input, other, "other", op);
  TORCH_CHECK(other.sym_sizes() == input.sym_sizes(), op, ": other must have input's shape ", input.sym_sizes(),
              ", got ", other.sym_sizes());
}

WeightQParams check_weight(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                           const at::Tensor& zero_point, const c10::SymInt& out_channels,
                           const c10::SymInt& in_features, bool allow_group, bool values, const char* op) {
  check_device(input, weight, "weight", op);
  check_device(input, scale, "weight_scale", op);
  check_device(input, zero_point, "weight_zero_point", op);
  TORCH_CHECK(weight.scalar_type() == at::kChar, op, ": weight must be torch.int8, got ", weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), op, ": weight_scale must be a floating tensor, got ",
              scale.scalar_type());
  TORCH_CHECK(at::isIntegralType(zero_point.scalar_type(), false), op,
              ": weight_zero_point must be an integer tensor, got ", zero_point.scalar_type());
  TORCH_CHECK(scale.sym_sizes() == zero_point.sym_sizes(), op,
              ": weight_scale and weight_zero_point must have the same shape, got ", scale.sym_sizes(), " and ",
              zero_point.sym_sizes());
  WeightQParams q{WeightQParams::Kind::PerTensor};
  if (scale.dim() <= 1 && scale.sym_numel() == 1) {
    q.kind = WeightQParams::Kind::PerTensor;
  } else if (scale.dim() == 1 && scale.sym_size(0) == out_channels) {
    q.kind = WeightQParams::Kind::PerChannel;
  } else if (allow_group && scale.dim() == 2 && scale.sym_size(0) == out_channels && scale.sym_size(1) > 0 &&
             in_features % scale.sym_size(1) == 0) {
    q.kind = WeightQParams::Kind::PerGroup;
  } else {
    TORCH_CHECK(false, op, ": weight_scale must have shape [1] (per-tensor), [", out_channels, "] (per-channel)",
                allow_group ? " or [out_features, in_features // group_size] (per-group)" : "", ", got ",
                scale.sym_sizes());
  }
  if (values) check_qparam_values_cpu(scale, zero_point, -128, 127, true, op);
  return q;
}

void check_bias(const at::Tensor& input, const std::optional<at::Tensor>& bias, const c10::SymInt& out_channels,
                at::ScalarType dtype, const char* op) {
  if (!bias.has_value() || !bias->defined()) return;
  check_device(input, *bias, "bias", op);
  TORCH_CHECK(bias->scalar_type() == dtype, op, ": bias must be ", dtype, ", got ", bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == out_channels, op, ": bias must have shape [", out_channels,
              "], got ", bias->sym_sizes());
}

c10::SymInt check_linear(const at::Tensor& input, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
              weight.sym_sizes());
  TORCH_CHECK(input.sym_size(-1) == weight.sym_size(1), op, ": input.shape[-1]=", input.sym_size(-1),
              " must equal in_features=weight.shape[1]=", weight.sym_size(1));
  return weight.sym_size(0);
}

std::vector<c10::SymInt> linear_output_shape(const at::Tensor& input, const at::Tensor& weight) {
  std::vector<c10::SymInt> shape(input.sym_sizes().begin(), input.sym_sizes().end());
  shape.back() = weight.sym_size(0);
  return shape;
}

static std::vector<int64_t> expand_param(at::IntArrayRef v, int64_t n, const char* name, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == n || v.size() == 1, op, ": ", name, " must have 1 or ", n,
              " elements, got ", v.size());
  return v.size() == 1 ? std::vector<int64_t>(n, v[0]) : v.vec();
}

ConvGeometry check_convolution(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                               at::IntArrayRef output_padding, int64_t groups, const char* op) {
  const int64_t d = input.dim() - 2;
  TORCH_CHECK(d >= 1 && d <= 3, op, ": input must be batched [N, C, *spatial] with 1 to 3 spatial dimensions, got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == input.dim(), op, ": weight must have ", input.dim(), " dimensions like the input, got shape ",
              weight.sym_sizes());
  TORCH_CHECK(groups >= 1, op, ": groups must be at least 1, got ", groups);
  ConvGeometry g;
  g.spatial = d;
  g.stride = expand_param(stride, d, "stride", op);
  g.padding = expand_param(padding, d, "padding", op);
  g.dilation = expand_param(dilation, d, "dilation", op);
  g.output_padding = transposed ? expand_param(output_padding, d, "output_padding", op) : std::vector<int64_t>(d, 0);
  for (int64_t i = 0; i < d; ++i) {
    TORCH_CHECK(g.stride[i] >= 1, op, ": stride must be positive, got ", stride);
    TORCH_CHECK(g.dilation[i] >= 1, op, ": dilation must be positive, got ", dilation);
    TORCH_CHECK(g.padding[i] >= 0, op, ": padding must be non-negative, got ", padding);
    TORCH_CHECK(g.output_padding[i] >= 0 && (g.output_padding[i] < g.stride[i] || g.output_padding[i] < g.dilation[i]),
                op, ": output_padding must be non-negative and smaller than stride or dilation, got ", output_padding);
  }
  const c10::SymInt c = input.sym_size(1);
  TORCH_CHECK(c % groups == 0, op, ": input channels (", c, ") must be divisible by groups (", groups, ")");
  if (transposed) {
    TORCH_CHECK(weight.sym_size(0) == c, op, ": transposed weight must have shape [in_channels=", c,
                ", out_channels // groups, *kernel], got ", weight.sym_sizes());
    g.out_channels = weight.sym_size(1) * groups;
  } else {
    TORCH_CHECK(weight.sym_size(1) * groups == c, op, ": weight must have shape [out_channels, in_channels // groups=",
                c / groups, ", *kernel], got ", weight.sym_sizes());
    g.out_channels = weight.sym_size(0);
    TORCH_CHECK(g.out_channels % groups == 0, op, ": out_channels (", g.out_channels, ") must be divisible by groups (",
                groups, ")");
  }
  g.output_shape = {input.sym_size(0), g.out_channels};
  for (int64_t i = 0; i < d; ++i) {
    const c10::SymInt in = input.sym_size(2 + i), k = weight.sym_size(2 + i);
    const c10::SymInt span = (k - 1) * g.dilation[i] + 1;
    const c10::SymInt out = transposed ? (in - 1) * g.stride[i] - 2 * g.padding[i] + span + g.output_padding[i]
                                       : (in + 2 * g.padding[i] - span) / g.stride[i] + 1;
    TORCH_CHECK(out >= 1 && (transposed || in + 2 * g.padding[i] >= span), op, ": spatial dimension ", i,
                " of the output would be empty (input size ", in, ", kernel ", k, ")");
    g.output_shape.push_back(out);
  }
  return g;
}

at::Tensor empty_conv_output(const ConvGeometry& geo, bool transposed, const at::TensorOptions& options) {
  if (transposed) return empty_output(geo.output_shape, options);
  const int64_t d = geo.spatial;
  std::vector<c10::SymInt> strides(d + 2);
  strides[1] = 1;
  c10::SymInt s = geo.output_shape[1];
  for (int64_t i = d - 1; i >= 0; --i) {
    strides[2 + i] = s;
    s = s * geo.output_shape[2 + i];
  }
  strides[0] = s;
  return empty_output(geo.output_shape, strides, options);
}

at::Tensor in_conv_layout(const at::Tensor& y, const ConvGeometry& geo, bool transposed) {
  at::Tensor out = empty_conv_output(geo, transposed, y.options());
  if (out.strides() == y.strides()) return y;
  return out.copy_(y);
}

at::Tensor centered_input(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                          int64_t quant_min, int64_t quant_max) {
  const at::Tensor q = input.scalar_type() == at::kFloat
                           ? quantize_per_tensor_affine(input, scale, zero_point, quant_min, quant_max, at::kInt)
                           : input.to(at::kInt).clamp(quant_min, quant_max);
  return q.to(at::kDouble) - zero_point.reshape({}).to(at::kDouble);
}

// The weight's integers minus their zero points, as float64, with the zero point broadcast over
// the output-channel layout `zp_shape`.
static at::Tensor centered_weight(const at::Tensor& weight, const at::Tensor& zero_point, at::IntArrayRef zp_shape) {
  at::Tensor w = weight.to(at::kDouble);
  const at::Tensor z = zero_point.to(at::kDouble);
  return w - (z.numel() == 1 ? z.reshape({}) : z.reshape(zp_shape));
}

// y = float32((acc + bias) * s_in * s_w) with acc the exact integer sum (float64 holds it
// exactly: |acc| < 2^53 for any realistic reduction length).
static at::Tensor epilogue(at::Tensor acc, const std::optional<at::Tensor>& bias, const at::Tensor& input_scale,
                           const at::Tensor& weight_scale, at::IntArrayRef channel_shape, bool relu) {
  if (bias.has_value() && bias->defined()) acc = acc + bias->to(at::kDouble).reshape(channel_shape);
  const at::Tensor sw = weight_scale.to(at::kFloat).to(at::kDouble);
  const at::Tensor s = input_scale.to(at::kFloat).to(at::kDouble).reshape({}) *
                       (sw.numel() == 1 ? sw.reshape({}) : sw.reshape(channel_shape));
  at::Tensor y = (acc * s).to(at::kFloat);
  return relu ? y.clamp_min_(0) : y;
}

at::Tensor linear_reference(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                            int64_t quant_min, int64_t quant_max, const at::Tensor& weight,
                            const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                            const std::optional<at::Tensor>& bias, bool relu) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor a = centered_input(input, input_scale, input_zero_point, quant_min, quant_max).reshape({-1, k});
  const auto out_shape = c10::asIntArrayRefUnchecked(linear_output_shape(input, weight)).vec();
  if (weight_scale.dim() == 2 && weight_scale.numel() > 1 && weight_scale.size(1) > 1) {
    // Per group: one exact integer sum per group, scaled by that group's weight scale. The bias
    // is at the scale s_in * s_w[c, 0] (the first group's).
    const int64_t groups = weight_scale.size(1), gs = k / groups;
    const at::Tensor w = centered_weight(weight.reshape({n, groups, gs}), weight_zero_point, {n, groups, 1});
    const at::Tensor acc = at::bmm(a.reshape({-1, groups, gs}).transpose(0, 1), w.permute({1, 2, 0}));  // [G, M, N]
    const at::Tensor sw = weight_scale.to(at::kFloat).to(at::kDouble);
    at::Tensor sum = (acc * sw.t().unsqueeze(1)).sum(0);  // [M, N]
    if (bias.has_value() && bias->defined()) sum = sum + bias->to(at::kDouble) * sw.select(1, 0);
    at::Tensor y = (sum * input_scale.to(at::kFloat).to(at::kDouble).reshape({})).to(at::kFloat);
    if (relu) y.clamp_min_(0);
    return y.reshape(out_shape);
  }
  const at::Tensor w = centered_weight(weight, weight_zero_point.reshape({-1}), {n, 1});
  return epilogue(at::mm(a, w.t()), bias, input_scale, weight_scale.reshape({-1}), {1, n}, relu).reshape(out_shape);
}

at::Tensor convolution_reference(const at::Tensor& input, const at::Tensor& input_scale,
                                 const at::Tensor& input_zero_point, int64_t quant_min, int64_t quant_max,
                                 const at::Tensor& weight, const at::Tensor& weight_scale,
                                 const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                 const ConvGeometry& geo, bool transposed, int64_t groups, bool relu) {
  const at::Tensor a = centered_input(input, input_scale, input_zero_point, quant_min, quant_max);
  std::vector<int64_t> ones(geo.spatial, 1);
  at::Tensor w;
  if (transposed) {  // [C, OC/g, *k]: output channel g * OC/g + j is column j of group g
    std::vector<int64_t> grouped = {groups, weight.size(0) / groups, weight.size(1)};
    std::vector<int64_t> zp_shape = {groups, 1, weight.size(1)};
    for (int64_t i = 0; i < geo.spatial; ++i) {
      grouped.push_back(weight.size(2 + i));
      zp_shape.push_back(1);
    }
    w = centered_weight(weight.reshape(grouped), weight_zero_point.reshape({-1}), zp_shape).reshape(weight.sizes());
  } else {
    std::vector<int64_t> zp_shape = {geo.out_channels.expect_int(), 1};
    zp_shape.insert(zp_shape.end(), ones.begin(), ones.end());
    w = centered_weight(weight, weight_zero_point.reshape({-1}), zp_shape);
  }
  const at::Tensor acc = at::convolution(a, w, std::nullopt, geo.stride, geo.padding, geo.dilation, transposed,
                                         geo.output_padding, groups);
  std::vector<int64_t> channel_shape = {1, geo.out_channels.expect_int()};
  channel_shape.insert(channel_shape.end(), ones.begin(), ones.end());
  return epilogue(acc, bias, input_scale, weight_scale.reshape({-1}), channel_shape, relu);
}

std::pair<at::Tensor, at::Tensor> dynamic_qparams(const at::Tensor& input2d, bool per_row) {
  at::Tensor lo, hi;
  if (per_row) {
    std::tie(lo, hi) = at::aminmax(input2d, 1);
  } else {
    std::tie(lo, hi) = at::aminmax(input2d);
    lo = lo.reshape({1});
    hi = hi.reshape({1});
  }
  lo = lo.clamp_max(0);
  hi = hi.clamp_min(0);
  at::Tensor s = (hi - lo) / 255.0f;
  // A range below 2^-118 (all values ~0) gets scale 1: every value then quantizes to the zero point.
  s = at::where(s >= math::kMinScale, s, at::ones_like(s));
  at::Tensor z = at::clamp(at::round(-lo * s.reciprocal()), 0, 255).to(at::kInt);
  return {s, z};
}

at::Tensor linear_dynamic_reference(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
                                    const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                    bool per_row) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor x = input.reshape({-1, k});
  auto [s, z] = dynamic_qparams(x, per_row);
  at::Tensor a;
  if (per_row) {
    a = quantize_per_channel_affine(x, s, z, 0, 0, 255, at::kInt).to(at::kDouble) - z.to(at::kDouble).unsqueeze(1);
  } else {
    a = quantize_per_tensor_affine(x, s, z, 0, 255, at::kInt).to(at::kDouble) - z.to(at::kDouble);
  }
  const at::Tensor w = centered_weight(weight, weight_zero_point.reshape({-1}), {n, 1});
  const at::Tensor sw = weight_scale.to(at::kFloat).to(at::kDouble).reshape({1, -1});
  at::Tensor y = at::mm(a, w.t()) * (s.to(at::kDouble).reshape({-1, 1}) * sw);
  if (bias.has_value() && bias->defined()) y = y + bias->to(at::kDouble);
  return y.to(at::kFloat).reshape_symint(linear_output_shape(input, weight));
}

std::vector<c10::SymInt> unpack_int4_shape(const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "qatx::unpack_int4: packed must be uint8 (two 4-bit values per byte), got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() >= 1, "qatx::unpack_int4: packed must have at least one dimension");
  const c10::SymInt bytes = packed.sym_size(-1);
  // n >= 0 too: with no bytes, 2 * 0 - 1 = -1 would pass.
  TORCH_SYM_CHECK(c10::SymBool(n >= 0).sym_and((bytes * 2 - 1).sym_le(n)).sym_and(c10::SymInt(n).sym_le(bytes * 2)),
                  "qatx::unpack_int4: n must be 2 * packed.size(-1) - 1 or 2 * packed.size(-1), got n=", n,
                  " for packed.size(-1)=", bytes);
  std::vector<c10::SymInt> shape(packed.sym_sizes().begin(), packed.sym_sizes().end());
  shape.back() = c10::SymInt(n);
  return shape;
}

at::Tensor unpack_int4_values(const at::Tensor& packed, int64_t n) {
  const std::vector<c10::SymInt> shape = unpack_int4_shape(packed, n);
  const at::Tensor u = packed.to(at::kShort);
  at::Tensor lo = u.bitwise_and(15), hi = u.bitwise_right_shift(4);
  lo = lo - lo.bitwise_and(8) * 2;  // a nibble's two's complement: 8..15 -> -8..-1
  hi = hi - hi.bitwise_and(8) * 2;
  std::vector<c10::SymInt> pairs(packed.sym_sizes().begin(), packed.sym_sizes().end());
  pairs.back() = pairs.back() * 2;
  return at::stack({lo, hi}, -1).reshape_symint(pairs).narrow_symint(-1, 0, shape.back()).to(at::kChar).contiguous();
}

}  // namespace int8
}  // namespace ops
}  // namespace qatx
