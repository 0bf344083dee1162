// Tests of the qatx ops through the public C++ API (qatx/qatx.h, qatx::ops::...), linked
// against the qatx library and libtorch like any user program:
//   - fake-quantize per tensor / per channel bit-identical to ATen's fake_quantize_*_affine,
//     per group bit-identical to a reference written as plain tensor ops;
//   - quantize -> dequantize bit-identical to fake-quantize (int8, uint8, int16);
//   - the straight-through-estimator gradient from C++, and double backward;
//   - the learnable quantizers' (LSQ+, PACT) gradients from C++, and the refused double backward;
//   - the INT8 add bit-identical to the fake-quantized sum (and ReLU);
//   - argument errors (c10::Error, naming the argument), Meta tensors, op registration.
// All comparisons are exact (torch::equal), except the learnable quantizers' scale and zero-point
// gradients: sums whose order differs from the reference's, compared to a stated tolerance.
#include "qatx/qatx.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

struct QRange {
  int64_t qmin, qmax;
};
const QRange kRanges[] = {{-128, 127}, {0, 255}, {-8, 7}, {0, 15}, {0, 1}, {-32768, 32767}};

std::string describe(const QRange& r) { return "[" + std::to_string(r.qmin) + ", " + std::to_string(r.qmax) + "]"; }

class OpsTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(20240611); }
};

// Scales in [0.01, 0.1): with randn * 4 inputs, narrow ranges clamp often and int16 never.
Tensor random_scale(at::IntArrayRef shape) { return torch::rand(shape) * 0.09f + 0.01f; }
Tensor random_zero_point(at::IntArrayRef shape, const QRange& r) {
  return torch::randint(r.qmin, r.qmax + 1, shape, torch::kInt);
}
Tensor random_input(at::IntArrayRef shape) { return torch::randn(shape) * 4.0f; }

// Shape [1, ..., n, ..., 1] so that a per-channel qparam broadcasts along `axis`.
Tensor along_axis(const Tensor& qparam, int64_t dim, int64_t axis) {
  std::vector<int64_t> shape(dim, 1);
  shape[axis] = qparam.numel();
  return qparam.to(torch::kFloat).reshape(shape);
}

// ---- reference math as plain tensor ops (torch::round is round half to even) ----
// The unclamped quantized value round(x * (1 / s)) + z, with s and z broadcast against x.
Tensor ref_unclamped(const Tensor& x, const Tensor& s, const Tensor& z) {
  return torch::round(x * s.reciprocal()) + z;
}
Tensor ref_fake_quantize(const Tensor& x, const Tensor& s, const Tensor& z, const QRange& r) {
  return (torch::clamp(ref_unclamped(x, s, z), r.qmin, r.qmax) - z) * s;
}
Tensor ref_mask(const Tensor& x, const Tensor& s, const Tensor& z, const QRange& r) {
  const Tensor q = ref_unclamped(x, s, z);
  return (q >= r.qmin) & (q <= r.qmax);
}
// Per-group: reshape [..., n] into [..., n / group_size, group_size] and broadcast the
// qparams of shape [..., n / group_size] over the last dimension.
struct Grouped {
  Tensor x, s, z;
  std::vector<int64_t> sizes;
};
Grouped group(const Tensor& x, const Tensor& s, const Tensor& z, int64_t group_size) {
  std::vector<int64_t> sizes = x.sizes().vec();
  std::vector<int64_t> grouped = sizes;
  grouped.back() = sizes.back() / group_size;
  grouped.push_back(group_size);
  return {x.reshape(grouped), s.to(torch::kFloat).unsqueeze(-1), z.to(torch::kFloat).unsqueeze(-1), sizes};
}
Tensor ref_fake_quantize_per_group(const Tensor& x, const Tensor& s, const Tensor& z, int64_t group_size,
                                   const QRange& r) {
  const Grouped g = group(x, s, z, group_size);
  return ref_fake_quantize(g.x, g.s, g.z, r).reshape(g.sizes);
}
Tensor ref_mask_per_group(const Tensor& x, const Tensor& s, const Tensor& z, int64_t group_size, const QRange& r) {
  const Grouped g = group(x, s, z, group_size);
  return ref_mask(g.x, g.s, g.z, r).reshape(g.sizes);
}

// Unpacks the bit-packed STE mask (bit j of byte b = element 8 * b + j in memory order).
Tensor unpack_mask(const Tensor& packed, int64_t numel) {
  const Tensor bytes = packed.contiguous();
  EXPECT_EQ(bytes.scalar_type(), torch::kByte);
  EXPECT_EQ(bytes.numel(), (numel + 7) / 8);
  Tensor out = torch::empty({numel}, torch::kBool);
  const uint8_t* b = bytes.const_data_ptr<uint8_t>();
  bool* o = out.mutable_data_ptr<bool>();
  for (int64_t i = 0; i < numel; ++i) o[i] = (b[i / 8] >> (i % 8)) & 1;
  return out;
}

Tensor masked(const Tensor& mask, const Tensor& g) { return torch::where(mask, g, torch::zeros_like(g)); }

// The message of the c10::Error thrown by f (empty when nothing is thrown).
template <typename F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

#define EXPECT_ERROR_MENTIONS(stmt, text)                                                        \
  do {                                                                                          \
    EXPECT_THROW(stmt, c10::Error);                                                              \
    const std::string message_ = error_message([&] { stmt; });                                    \
    EXPECT_NE(message_.find(text), std::string::npos) << "message: " << message_;              \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Registration and version
// ---------------------------------------------------------------------------------------------

TEST(Registration, SchemasAreFoundWithoutTorchScript) {
  auto& dispatcher = c10::Dispatcher::singleton();
  EXPECT_TRUE(dispatcher.findSchema({"qatx::fake_quantize_per_tensor_affine", ""}).has_value());
  for (const char* name :
       {"qatx::fake_quantize_per_channel_affine", "qatx::fake_quantize_per_group_affine",
        "qatx::_fake_quantize_per_tensor_affine_with_mask", "qatx::_fake_quantize_per_channel_affine_with_mask",
        "qatx::_fake_quantize_per_group_affine_with_mask", "qatx::_fake_quantize_ste_backward",
        "qatx::quantize_per_tensor_affine", "qatx::quantize_per_channel_affine", "qatx::quantize_per_group_affine",
        "qatx::dequantize_per_tensor_affine", "qatx::dequantize_per_channel_affine",
        "qatx::dequantize_per_group_affine", "qatx::fake_quantize_lsq", "qatx::fake_quantize_lsq_per_group",
        "qatx::fake_quantize_pact", "qatx::_fake_quantize_lsq_backward", "qatx::_fake_quantize_lsq_per_group_backward",
        "qatx::_fake_quantize_pact_backward", "qatx::observe_fake_quantize_per_tensor_affine",
        "qatx::observe_fake_quantize_per_channel_affine", "qatx::observe_fake_quantize_per_group_affine",
        "qatx::_observe_min_max", "qatx::linear_int8", "qatx::convolution_int8", "qatx::linear_int8_dynamic",
        "qatx::add_int8"}) {
    EXPECT_TRUE(dispatcher.findSchema({name, ""}).has_value()) << name;
  }
  EXPECT_FALSE(dispatcher.findSchema({"qatx::no_such_op", ""}).has_value());
}

TEST(Registration, KernelsForCpuMetaAndAutograd) {
  const auto op = c10::Dispatcher::singleton().findSchema({"qatx::fake_quantize_per_tensor_affine", ""});
  ASSERT_TRUE(op.has_value());
  EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CPU));
  EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::Meta));
  EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::AutogradCPU) ||
              op->hasKernelForDispatchKey(c10::DispatchKey::Autograd));
}

TEST(Version, MatchesVersionFile) { EXPECT_EQ(qatx::version(), QATX_EXPECTED_VERSION_NUMBER); }

// ---------------------------------------------------------------------------------------------
// Fake-quantize forward against ATen and the reference
// ---------------------------------------------------------------------------------------------

TEST_F(OpsTest, PerTensorMatchesATen) {
  for (const QRange& r : kRanges) {
    const Tensor x = random_input({1000});
    const Tensor s = random_scale({1});
    const Tensor z = random_zero_point({1}, r);
    const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax);
    const Tensor expected = at::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax);
    EXPECT_EQ(y.scalar_type(), torch::kFloat);
    EXPECT_EQ(y.sizes(), x.sizes());
    EXPECT_TRUE(torch::equal(y, expected)) << describe(r);
    EXPECT_TRUE(torch::equal(y, ref_fake_quantize(x, s, z.to(torch::kFloat), r))) << describe(r);
  }
}

TEST_F(OpsTest, PerTensorTiesMatchATen) {
  // x = (k + 1/2) * s lands on (or next to) a tie of x / s; both round half to even.
  const QRange r{-128, 127};
  for (const float scale : {0.5f, 0.25f, 0.1f, 0.03f}) {
    const Tensor s = torch::full({1}, scale);
    const Tensor z = torch::full({1}, 3, torch::kInt);
    const Tensor x = (torch::arange(-140, 140, torch::kFloat) + 0.5f) * scale;
    const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax);
    EXPECT_TRUE(torch::equal(y, at::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax))) << scale;
  }
}

TEST_F(OpsTest, PerTensorMultiDimAndNonContiguousMatchATen) {
  const QRange r{-128, 127};
  const Tensor s = random_scale({1});
  const Tensor z = random_zero_point({1}, r);
  const Tensor base = random_input({4, 6, 5, 3});
  for (const Tensor& x : {base, base.transpose(1, 3), base.slice(2, 0, 5, 2),
                          base.contiguous(at::MemoryFormat::ChannelsLast)}) {
    const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax);
    EXPECT_EQ(y.sizes(), x.sizes());
    EXPECT_TRUE(torch::equal(y, at::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax)));
  }
}

TEST_F(OpsTest, PerTensorLargeInputMatchesATen) {
  // Large enough for several parallel chunks and a partial last block.
  const QRange r{-128, 127};
  const Tensor x = random_input({(1 << 17) + 13});
  const Tensor s = random_scale({1});
  const Tensor z = random_zero_point({1}, r);
  EXPECT_TRUE(torch::equal(qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax),
                           at::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax)));
}

TEST_F(OpsTest, PerChannelMatchesATen) {
  const Tensor base = random_input({4, 8, 5, 6});
  for (const QRange& r : kRanges) {
    for (int64_t axis = -4; axis < 4; ++axis) {
      const int64_t a = axis < 0 ? axis + 4 : axis;
      const Tensor s = random_scale({base.size(a)});
      const Tensor z = random_zero_point({base.size(a)}, r);
      const Tensor y = qatx::ops::fake_quantize_per_channel_affine(base, s, z, axis, r.qmin, r.qmax);
      const Tensor expected = at::fake_quantize_per_channel_affine(base, s, z, a, r.qmin, r.qmax);
      EXPECT_TRUE(torch::equal(y, expected)) << describe(r) << " axis " << axis;
      EXPECT_TRUE(torch::equal(y, ref_fake_quantize(base, along_axis(s, 4, a), along_axis(z, 4, a), r)))
          << describe(r) << " axis " << axis;
    }
  }
}

TEST_F(OpsTest, PerChannelNonContiguousMatchesATen) {
  const QRange r{-128, 127};
  const Tensor base = random_input({3, 16, 7, 9});
  for (const Tensor& x : {base.contiguous(at::MemoryFormat::ChannelsLast), base.transpose(0, 2),
                          base.slice(3, 1, 9, 3)}) {
    for (int64_t axis = 0; axis < 4; ++axis) {
      const Tensor s = random_scale({x.size(axis)});
      const Tensor z = random_zero_point({x.size(axis)}, r);
      const Tensor y = qatx::ops::fake_quantize_per_channel_affine(x, s, z, axis, r.qmin, r.qmax);
      EXPECT_TRUE(torch::equal(y, at::fake_quantize_per_channel_affine(x, s, z, axis, r.qmin, r.qmax)))
          << "axis " << axis << " strides " << x.strides();
    }
  }
}

TEST_F(OpsTest, PerGroupMatchesReference) {
  for (const QRange& r : kRanges) {
    for (const int64_t group_size : {1, 4, 8, 32}) {
      const Tensor x = random_input({6, 32});
      const Tensor s = random_scale({6, 32 / group_size});
      const Tensor z = random_zero_point({6, 32 / group_size}, r);
      const Tensor y = qatx::ops::fake_quantize_per_group_affine(x, s, z, group_size, r.qmin, r.qmax);
      EXPECT_EQ(y.sizes(), x.sizes());
      EXPECT_TRUE(torch::equal(y, ref_fake_quantize_per_group(x, s, z, group_size, r)))
          << describe(r) << " group_size " << group_size;
    }
  }
}

TEST_F(OpsTest, PerGroupMultiDimAndNonContiguousMatchReference) {
  const QRange r{-8, 7};
  const Tensor x = random_input({2, 3, 48});
  const Tensor s = random_scale({2, 3, 3});
  const Tensor z = random_zero_point({2, 3, 3}, r);
  EXPECT_TRUE(torch::equal(qatx::ops::fake_quantize_per_group_affine(x, s, z, 16, r.qmin, r.qmax),
                           ref_fake_quantize_per_group(x, s, z, 16, r)));
  // A transposed input: groups still run along its (logical) last dimension.
  const Tensor xt = random_input({64, 5}).t();  // [5, 64], not contiguous
  const Tensor st = random_scale({5, 4});
  const Tensor zt = random_zero_point({5, 4}, r);
  EXPECT_TRUE(torch::equal(qatx::ops::fake_quantize_per_group_affine(xt, st, zt, 16, r.qmin, r.qmax),
                           ref_fake_quantize_per_group(xt, st, zt, 16, r)));
}

TEST_F(OpsTest, NaNStaysNaNAndInfinitySaturates) {
  const QRange r{-128, 127};
  const Tensor x = torch::tensor({std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                                  -std::numeric_limits<float>::infinity(), 1.0f});
  const Tensor s = torch::full({1}, 0.5f);
  const Tensor z = torch::zeros({1}, torch::kInt);
  const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax);
  EXPECT_TRUE(std::isnan(y[0].item<float>()));
  EXPECT_EQ(y[1].item<float>(), 63.5f);   // quant_max * scale
  EXPECT_EQ(y[2].item<float>(), -64.0f);  // quant_min * scale
  EXPECT_EQ(y[3].item<float>(), 1.0f);
}

TEST_F(OpsTest, EmptyInput) {
  const Tensor x = torch::empty({0, 4});
  const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, torch::ones({1}), torch::zeros({1}, torch::kInt),
                                                              -128, 127);
  EXPECT_EQ(y.sizes(), x.sizes());
}

// ---------------------------------------------------------------------------------------------
// Mask ops and the STE backward kernel
// ---------------------------------------------------------------------------------------------

TEST_F(OpsTest, WithMaskOpsReturnOutputAndPackedMask) {
  const QRange r{-8, 7};
  const Tensor x = random_input({5, 13});  // 65 elements: a partial last mask byte
  {
    const Tensor s = random_scale({1});
    const Tensor z = random_zero_point({1}, r);
    auto [y, mask] = qatx::ops::_fake_quantize_per_tensor_affine_with_mask(x, s, z, r.qmin, r.qmax);
    EXPECT_TRUE(torch::equal(y, qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax)));
    const Tensor expected = ref_mask(x, s, z.to(torch::kFloat), r).reshape({-1});
    EXPECT_TRUE(torch::equal(unpack_mask(mask, x.numel()), expected));
    const Tensor g = torch::randn_like(x);
    EXPECT_TRUE(torch::equal(qatx::ops::_fake_quantize_ste_backward(g, mask), masked(expected.view_as(x), g)));
  }
  {
    const Tensor s = random_scale({13});
    const Tensor z = random_zero_point({13}, r);
    auto [y, mask] = qatx::ops::_fake_quantize_per_channel_affine_with_mask(x, s, z, 1, r.qmin, r.qmax);
    EXPECT_TRUE(torch::equal(y, qatx::ops::fake_quantize_per_channel_affine(x, s, z, 1, r.qmin, r.qmax)));
    const Tensor expected = ref_mask(x, along_axis(s, 2, 1), along_axis(z, 2, 1), r).reshape({-1});
    EXPECT_TRUE(torch::equal(unpack_mask(mask, x.numel()), expected));
  }
  {
    const Tensor xg = random_input({5, 12});
    const Tensor s = random_scale({5, 3});
    const Tensor z = random_zero_point({5, 3}, r);
    auto [y, mask] = qatx::ops::_fake_quantize_per_group_affine_with_mask(xg, s, z, 4, r.qmin, r.qmax);
    EXPECT_TRUE(torch::equal(y, ref_fake_quantize_per_group(xg, s, z, 4, r)));
    EXPECT_TRUE(torch::equal(unpack_mask(mask, xg.numel()), ref_mask_per_group(xg, s, z, 4, r).reshape({-1})));
  }
}

// ---------------------------------------------------------------------------------------------
// Quantize / dequantize
// ---------------------------------------------------------------------------------------------

struct IntCase {
  torch::ScalarType dtype;
  QRange range;
};
const IntCase kIntCases[] = {
    {torch::kChar, {-128, 127}}, {torch::kByte, {0, 255}}, {torch::kShort, {-32768, 32767}}, {torch::kChar, {-8, 7}}};

TEST_F(OpsTest, QuantizeDequantizeEqualsFakeQuantizePerTensor) {
  for (const IntCase& c : kIntCases) {
    const QRange& r = c.range;
    const Tensor x = random_input({33, 17});
    const Tensor s = random_scale({1});
    const Tensor z = random_zero_point({1}, r);
    const Tensor q = qatx::ops::quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax, c.dtype);
    EXPECT_EQ(q.scalar_type(), c.dtype);
    EXPECT_TRUE(torch::equal(q, torch::clamp(ref_unclamped(x, s, z.to(torch::kFloat)), r.qmin, r.qmax).to(c.dtype)))
        << describe(r);
    const Tensor d = qatx::ops::dequantize_per_tensor_affine(q, s, z);
    EXPECT_EQ(d.scalar_type(), torch::kFloat);
    EXPECT_TRUE(torch::equal(d, qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax))) << describe(r);
  }
}

TEST_F(OpsTest, QuantizeDequantizeEqualsFakeQuantizePerChannel) {
  for (const IntCase& c : kIntCases) {
    const QRange& r = c.range;
    const Tensor x = random_input({6, 7, 8});
    for (int64_t axis = 0; axis < 3; ++axis) {
      const Tensor s = random_scale({x.size(axis)});
      const Tensor z = random_zero_point({x.size(axis)}, r);
      const Tensor q = qatx::ops::quantize_per_channel_affine(x, s, z, axis, r.qmin, r.qmax, c.dtype);
      EXPECT_EQ(q.scalar_type(), c.dtype);
      const Tensor expected_q =
          torch::clamp(ref_unclamped(x, along_axis(s, 3, axis), along_axis(z, 3, axis)), r.qmin, r.qmax);
      EXPECT_TRUE(torch::equal(q, expected_q.to(c.dtype))) << describe(r) << " axis " << axis;
      const Tensor d = qatx::ops::dequantize_per_channel_affine(q, s, z, axis);
      EXPECT_TRUE(torch::equal(d, qatx::ops::fake_quantize_per_channel_affine(x, s, z, axis, r.qmin, r.qmax)))
          << describe(r) << " axis " << axis;
    }
  }
}

TEST_F(OpsTest, QuantizeDequantizeEqualsFakeQuantizePerGroup) {
  for (const IntCase& c : kIntCases) {
    const QRange& r = c.range;
    const Tensor x = random_input({4, 3, 64});
    const Tensor s = random_scale({4, 3, 4});
    const Tensor z = random_zero_point({4, 3, 4}, r);
    const Tensor q = qatx::ops::quantize_per_group_affine(x, s, z, 16, r.qmin, r.qmax, c.dtype);
    EXPECT_EQ(q.scalar_type(), c.dtype);
    const Grouped g = group(x, s, z, 16);
    const Tensor expected_q = torch::clamp(ref_unclamped(g.x, g.s, g.z), r.qmin, r.qmax).reshape(g.sizes);
    EXPECT_TRUE(torch::equal(q, expected_q.to(c.dtype))) << describe(r);
    const Tensor d = qatx::ops::dequantize_per_group_affine(q, s, z, 16);
    EXPECT_TRUE(torch::equal(d, qatx::ops::fake_quantize_per_group_affine(x, s, z, 16, r.qmin, r.qmax)))
        << describe(r);
  }
}

TEST_F(OpsTest, QuantizeInt32AndDequantizeOutputDtype) {
  const Tensor x = random_input({100});
  const Tensor s = random_scale({1});
  const Tensor z = torch::full({1}, -5, torch::kInt);
  const Tensor q = qatx::ops::quantize_per_tensor_affine(x, s, z, -1000, 1000, torch::kInt);
  EXPECT_EQ(q.scalar_type(), torch::kInt);
  EXPECT_TRUE(torch::equal(q, torch::clamp(ref_unclamped(x, s, z.to(torch::kFloat)), -1000, 1000).to(torch::kInt)));
  const Tensor d = qatx::ops::dequantize_per_tensor_affine(q, s, z, torch::kHalf);
  EXPECT_EQ(d.scalar_type(), torch::kHalf);
  EXPECT_TRUE(torch::equal(d, ((q.to(torch::kFloat) - z.to(torch::kFloat)) * s).to(torch::kHalf)));
}

// ---------------------------------------------------------------------------------------------
// Autograd from C++: straight-through estimator
// ---------------------------------------------------------------------------------------------

TEST_F(OpsTest, BackwardPerTensorIsMaskedGradient) {
  const QRange r{-128, 127};
  // Scale 0.02 represents only [-2.56, 2.54]: many of the randn * 4 inputs are clamped.
  const Tensor s = torch::full({1}, 0.02f);
  const Tensor z = torch::full({1}, 1, torch::kInt);
  Tensor x = random_input({64, 16}).requires_grad_();
  const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax);
  ASSERT_TRUE(y.requires_grad());
  const Tensor g = torch::randn_like(y);
  y.backward(g);
  const Tensor mask = ref_mask(x.detach(), s, z.to(torch::kFloat), r);
  ASSERT_GT(mask.sum().item<int64_t>(), 0);
  ASSERT_LT(mask.sum().item<int64_t>(), mask.numel());  // both branches of the STE occur
  ASSERT_TRUE(x.grad().defined());
  EXPECT_TRUE(torch::equal(x.grad(), masked(mask, g)));
  EXPECT_TRUE(torch::equal(x.grad(), g * mask.to(torch::kFloat)));  // -0 == 0 for equal
}

TEST_F(OpsTest, BackwardPerChannelIsMaskedGradient) {
  const QRange r{0, 15};
  const Tensor s = random_scale({8}) * 4.0f;
  const Tensor z = random_zero_point({8}, r);
  Tensor x = random_input({3, 8, 10}).requires_grad_();
  const Tensor y = qatx::ops::fake_quantize_per_channel_affine(x, s, z, 1, r.qmin, r.qmax);
  const Tensor g = torch::randn_like(y);
  y.backward(g);
  EXPECT_TRUE(torch::equal(x.grad(), masked(ref_mask(x.detach(), along_axis(s, 3, 1), along_axis(z, 3, 1), r), g)));
}

TEST_F(OpsTest, BackwardPerGroupIsMaskedGradient) {
  const QRange r{-8, 7};
  const Tensor s = random_scale({4, 4}) * 4.0f;
  const Tensor z = random_zero_point({4, 4}, r);
  Tensor x = random_input({4, 32}).requires_grad_();
  const Tensor y = qatx::ops::fake_quantize_per_group_affine(x, s, z, 8, r.qmin, r.qmax);
  const Tensor g = torch::randn_like(y);
  y.backward(g);
  EXPECT_TRUE(torch::equal(x.grad(), masked(ref_mask_per_group(x.detach(), s, z, 8, r), g)));
}

TEST_F(OpsTest, BackwardThroughNonContiguousInputAndGradient) {
  const QRange r{-8, 7};
  const Tensor s = torch::full({1}, 0.3f);
  const Tensor z = torch::zeros({1}, torch::kInt);
  Tensor leaf = random_input({16, 8}).requires_grad_();
  const Tensor x = leaf.t();  // [8, 16], transposed
  const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax);
  const Tensor g = torch::randn({16, 8}).t();  // transposed like y
  y.backward(g);
  const Tensor mask = ref_mask(x.detach(), s, z.to(torch::kFloat), r);
  EXPECT_TRUE(torch::equal(leaf.grad(), masked(mask, g).t()));
  // Same with a contiguous gradient against a transposed output.
  leaf.mutable_grad().reset();
  const Tensor y2 = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax);
  const Tensor g2 = torch::randn({8, 16});
  y2.backward(g2);
  EXPECT_TRUE(torch::equal(leaf.grad(), masked(mask, g2).t()));
}

TEST_F(OpsTest, NoGradientForQParams) {
  const QRange r{-128, 127};
  const Tensor s = torch::full({1}, 0.05f).requires_grad_();
  const Tensor z = torch::zeros({1}, torch::kInt);
  Tensor x = random_input({40}).requires_grad_();
  qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax).sum().backward();
  EXPECT_TRUE(x.grad().defined());
  EXPECT_FALSE(s.grad().defined());
}

TEST_F(OpsTest, NoGraphWithoutGradMode) {
  Tensor x = random_input({10}).requires_grad_();
  torch::NoGradGuard no_grad;
  const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, torch::full({1}, 0.1f),
                                                              torch::zeros({1}, torch::kInt), -128, 127);
  EXPECT_FALSE(y.requires_grad());
}

TEST_F(OpsTest, DoubleBackwardGivesTheMaskAgain) {
  const QRange r{-128, 127};
  const Tensor s = torch::full({1}, 0.02f);
  const Tensor z = torch::full({1}, -3, torch::kInt);
  Tensor x = random_input({12, 20}).requires_grad_();
  const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, r.qmin, r.qmax);
  const Tensor mask = ref_mask(x.detach(), s, z.to(torch::kFloat), r);

  // First backward with create_graph: grad_x = mask * g, differentiable in g.
  const Tensor g = torch::randn_like(y).requires_grad_();
  const Tensor grad_x =
      torch::autograd::grad({y}, {x}, {g}, /*retain_graph=*/true, /*create_graph=*/true)[0];
  EXPECT_TRUE(torch::equal(grad_x, masked(mask, g.detach())));
  ASSERT_TRUE(grad_x.requires_grad());

  // Second backward: d(sum(grad_x * v)) / dg = mask * v; with v = 1 it is the mask itself.
  const Tensor ones = torch::ones_like(grad_x);
  const Tensor grad_g = torch::autograd::grad({grad_x}, {g}, {ones}, /*retain_graph=*/true, /*create_graph=*/true)[0];
  EXPECT_TRUE(torch::equal(grad_g, mask.to(torch::kFloat)));
  const Tensor v = torch::randn_like(grad_x);
  const Tensor grad_g_v = torch::autograd::grad({grad_x}, {g}, {v})[0];
  EXPECT_TRUE(torch::equal(grad_g_v, masked(mask, v)));
}

// ---------------------------------------------------------------------------------------------
// Learnable quantizers from C++: LSQ+ and PACT gradients through autograd
// ---------------------------------------------------------------------------------------------

TEST_F(OpsTest, LearnableQuantizerBackward) {
  const QRange r{-8, 7};
  // Channels-last [N, C, H, W], per-channel along C; zero points fractional and out of range.
  Tensor x = random_input({3, 4, 5, 6}).div(10.0f).contiguous(at::MemoryFormat::ChannelsLast).requires_grad_();
  Tensor s = torch::tensor({0.02f, 0.05f, 0.1f, 0.0625f}).requires_grad_();
  Tensor z = torch::tensor({0.4f, -2.5f, 9.0f, 3.0f}).requires_grad_();
  const double grad_factor = 0.25;
  const Tensor y = qatx::ops::fake_quantize_lsq(x, s, z, 1, r.qmin, r.qmax, grad_factor);
  const Tensor g = torch::randn_like(y);
  y.backward(g);

  // Reference: z_r = rint(clamp(z)), v = x * (1 / s), q_u = rint(v) + z_r.
  const Tensor zr = torch::round(torch::clamp(z.detach(), r.qmin, r.qmax));
  const Tensor sb = along_axis(s.detach(), 4, 1), zb = along_axis(zr, 4, 1);
  const Tensor v = x.detach() * sb.reciprocal();
  const Tensor q = torch::round(v) + zb;
  const Tensor inside = (q >= r.qmin) & (q <= r.qmax);
  ASSERT_GT(inside.sum().item<int64_t>(), 0);
  ASSERT_LT(inside.sum().item<int64_t>(), inside.numel());
  EXPECT_TRUE(torch::equal(y, ref_fake_quantize(x.detach(), sb, zb, r)));
  EXPECT_TRUE(torch::equal(x.grad(), masked(inside, g)));  // exact
  const std::vector<int64_t> dims{0, 2, 3};
  const Tensor gd = g.to(torch::kDouble), vd = v.to(torch::kDouble);
  const Tensor qd = torch::clamp(q, r.qmin, r.qmax).to(torch::kDouble), zd = zb.to(torch::kDouble);
  const Tensor ds = grad_factor * (gd * torch::where(inside, torch::round(vd) - vd, qd - zd)).sum(dims);
  const Tensor dz = grad_factor * (gd * torch::where(inside, torch::zeros_like(gd), -sb.to(torch::kDouble))).sum(dims);
  // Float32 terms summed in float64, against float64 sums: a few float32 ulps of the magnitudes.
  const Tensor ds_mag = grad_factor * (gd.abs() * (vd.abs() + (qd - zd).abs())).sum(dims);
  const Tensor dz_mag = grad_factor * (gd.abs() * sb.to(torch::kDouble)).sum(dims);
  EXPECT_TRUE(((s.grad().to(torch::kDouble) - ds).abs() <= 1e-6 * ds_mag).all().item<bool>());
  EXPECT_TRUE(((z.grad().to(torch::kDouble) - dz).abs() <= 1e-6 * dz_mag).all().item<bool>());

  // The backward op gives the same bits; without the zero point's gradient it returns none.
  auto [gx, gs, gz] =
      qatx::ops::_fake_quantize_lsq_backward(g, x.detach(), s.detach(), z.detach(), 1, r.qmin, r.qmax, grad_factor, true);
  EXPECT_TRUE(torch::equal(gx, x.grad()) && torch::equal(gs, s.grad()) && torch::equal(gz, z.grad()));
  auto [gx2, gs2, gz2] = qatx::ops::_fake_quantize_lsq_backward(g, x.detach(), s.detach(), z.detach(), 1, r.qmin,
                                                                r.qmax, grad_factor, false);
  EXPECT_TRUE(torch::equal(gs2, gs));
  EXPECT_FALSE(gz2.defined());

  // Double backward is refused with a message naming the op.
  const Tensor gs_graph = torch::autograd::grad({qatx::ops::fake_quantize_lsq(x, s, z, 1, r.qmin, r.qmax, 1.0).sum()},
                                                {s}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
  EXPECT_ERROR_MENTIONS(gs_graph.sum().backward(), "double backward is not supported");

  // PACT, signed 4-bit: the gradient reaches the input inside (-alpha, alpha), alpha at the clip.
  Tensor xp = torch::tensor({-2.0f, -1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 2.0f}).requires_grad_();
  Tensor alpha = torch::tensor({1.0f}).requires_grad_();
  qatx::ops::fake_quantize_pact(xp, alpha, 4, true).backward(torch::arange(1.0f, 8.0f));
  EXPECT_TRUE(torch::equal(xp.grad(), torch::tensor({0.0f, 0.0f, 3.0f, 4.0f, 5.0f, 0.0f, 0.0f})));
  EXPECT_EQ(alpha.grad().item<float>(), (6.0f + 7.0f) - (1.0f + 2.0f));
}

// ---------------------------------------------------------------------------------------------
// Argument errors
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Observe + fake-quantize
// ---------------------------------------------------------------------------------------------

TEST_F(OpsTest, ObserveFakeQuantizePerChannelUpdatesRangeQParamsAndGradient) {
  const float inf = std::numeric_limits<float>::infinity();
  Tensor min_val = torch::full({3}, inf), max_val = torch::full({3}, -inf);
  Tensor scale = torch::empty({3}), zero_point = torch::empty({3}, torch::kInt);
  const Tensor x0 = random_input({3, 50});
  const Tensor x1 = random_input({3, 50}).requires_grad_();
  qatx::ops::observe_fake_quantize_per_channel_affine(x0, min_val, max_val, scale, zero_point, 0, 0.25, 0, 255, false);
  EXPECT_TRUE(torch::equal(min_val, std::get<0>(x0.min(1))));  // unset: the first batch as is
  EXPECT_TRUE(torch::equal(max_val, std::get<0>(x0.max(1))));
  const Tensor lo0 = min_val.clone(), hi0 = max_val.clone();
  const Tensor y = qatx::ops::observe_fake_quantize_per_channel_affine(x1, min_val, max_val, scale, zero_point, 0,
                                                                       0.25, 0, 255, false);
  const Tensor lo1 = std::get<0>(x1.detach().min(1)), hi1 = std::get<0>(x1.detach().max(1));
  EXPECT_TRUE(torch::equal(min_val, lo0.add(lo1 - lo0, 0.25)));  // moving average, as ATen's add(alpha)
  EXPECT_TRUE(torch::equal(max_val, hi0.add(hi1 - hi0, 0.25)));
  const Tensor lo = min_val.clamp_max(0), hi = max_val.clamp_min(0);
  const Tensor expected_scale = ((hi - lo) / 255.0).clamp_min(std::numeric_limits<float>::epsilon());
  EXPECT_TRUE(torch::equal(scale, expected_scale));
  EXPECT_TRUE(torch::equal(zero_point, (-torch::round(lo / expected_scale)).clamp(0, 255).to(torch::kInt)));
  EXPECT_TRUE(torch::equal(y, qatx::ops::fake_quantize_per_channel_affine(x1.detach(), scale, zero_point, 0, 0, 255)));
  y.backward(torch::ones_like(y));
  const QRange r{0, 255};
  EXPECT_TRUE(torch::equal(x1.grad(), ref_mask(x1.detach(), along_axis(scale, 2, 0), along_axis(zero_point, 2, 0), r)
                                          .to(torch::kFloat)));
  EXPECT_FALSE(scale.requires_grad());
}

TEST_F(OpsTest, ErrorObserveAveragingConstant) {
  Tensor t = torch::zeros({1}), z = torch::zeros({1}, torch::kInt);
  EXPECT_ERROR_MENTIONS(qatx::ops::observe_fake_quantize_per_tensor_affine(random_input({4}), t, t, t, z, 2.0, 0, 255,
                                                                           false),
                        "averaging_constant=2 must be in (0, 1]");
}

TEST_F(OpsTest, ErrorQuantMinNotBelowQuantMax) {
  const Tensor x = random_input({8});
  const Tensor s = torch::full({1}, 0.1f);
  const Tensor z = torch::zeros({1}, torch::kInt);
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_tensor_affine(x, s, z, 5, 5), "quant_min");
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_tensor_affine(x, s, z, 10, 3), "quant_min");
  EXPECT_ERROR_MENTIONS(qatx::ops::quantize_per_tensor_affine(x, s, z, 0, 0, torch::kChar), "quant_min");
  // Beyond 16 bits for fake-quantize, beyond the dtype for quantize.
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_tensor_affine(x, s, z, -40000, 10), "quant_min");
  EXPECT_ERROR_MENTIONS(qatx::ops::quantize_per_tensor_affine(x, s, z, -1, 255, torch::kByte), "quant_min");
  EXPECT_ERROR_MENTIONS(qatx::ops::quantize_per_tensor_affine(x, s, z, -128, 127, torch::kFloat), "dtype");
}

TEST_F(OpsTest, ErrorScaleNotPositive) {
  const Tensor x = random_input({8});
  const Tensor z = torch::zeros({1}, torch::kInt);
  for (const float bad : {0.0f, -0.1f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::denorm_min()}) {
    const Tensor s = torch::full({1}, bad);
    EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_tensor_affine(x, s, z, -128, 127), "scale");
    EXPECT_ERROR_MENTIONS(qatx::ops::quantize_per_tensor_affine(x, s, z, -128, 127, torch::kChar), "scale");
  }
  const Tensor s_channel = torch::tensor({0.1f, 0.0f, 0.2f});
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_channel_affine(random_input({2, 3}), s_channel,
                                                                    torch::zeros({3}, torch::kInt), 1, -128, 127),
                        "scale");
}

TEST_F(OpsTest, ErrorZeroPointOutOfRange) {
  const Tensor x = random_input({8});
  const Tensor s = torch::full({1}, 0.1f);
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_tensor_affine(x, s, torch::full({1}, 128, torch::kInt), -128, 127),
                        "zero_point");
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_tensor_affine(x, s, torch::full({1}, -1, torch::kInt), 0, 255),
                        "zero_point");
  EXPECT_ERROR_MENTIONS(
      qatx::ops::quantize_per_channel_affine(random_input({2, 3}), torch::full({3}, 0.1f),
                                             torch::tensor({0, 16, 3}, torch::kInt), 1, 0, 15, torch::kByte),
      "zero_point");
  // A float zero point is rejected by dtype.
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_tensor_affine(x, s, torch::zeros({1}), -128, 127), "zero_point");
}

TEST_F(OpsTest, ErrorAxisOutOfRange) {
  const Tensor x = random_input({2, 3, 4});
  const Tensor s = torch::full({3}, 0.1f);
  const Tensor z = torch::zeros({3}, torch::kInt);
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_channel_affine(x, s, z, 3, -128, 127), "axis");
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_channel_affine(x, s, z, -4, -128, 127), "axis");
  EXPECT_ERROR_MENTIONS(qatx::ops::quantize_per_channel_affine(x, s, z, 7, -128, 127, torch::kChar), "axis");
  EXPECT_ERROR_MENTIONS(qatx::ops::dequantize_per_channel_affine(torch::zeros({2, 3, 4}, torch::kChar), s, z, 3),
                        "axis");
  // In range, but the qparams do not match the size of that axis.
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_channel_affine(x, s, z, 2, -128, 127), "axis");
  EXPECT_NO_THROW(qatx::ops::fake_quantize_per_channel_affine(x, s, z, -2, -128, 127));
}

TEST_F(OpsTest, ErrorGroupSizeNotDividing) {
  const Tensor x = random_input({3, 10});
  const Tensor s = torch::full({3, 2}, 0.1f);
  const Tensor z = torch::zeros({3, 2}, torch::kInt);
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_group_affine(x, s, z, 4, -128, 127), "group_size");
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_group_affine(x, s, z, 3, -128, 127), "group_size");
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_group_affine(x, s, z, 0, -128, 127), "group_size");
  EXPECT_ERROR_MENTIONS(qatx::ops::quantize_per_group_affine(x, s, z, 4, -128, 127, torch::kChar), "group_size");
  // group_size 5 divides 10 and matches the qparam shape [3, 2].
  EXPECT_NO_THROW(qatx::ops::fake_quantize_per_group_affine(x, s, z, 5, -128, 127));
}

TEST_F(OpsTest, ErrorInputDtype) {
  const Tensor s = torch::full({1}, 0.1f);
  const Tensor z = torch::zeros({1}, torch::kInt);
  EXPECT_ERROR_MENTIONS(qatx::ops::fake_quantize_per_tensor_affine(torch::zeros({4}, torch::kInt), s, z, -128, 127),
                        "input");
  EXPECT_ERROR_MENTIONS(qatx::ops::dequantize_per_tensor_affine(torch::zeros({4}), s, z), "input");
}

// ---------------------------------------------------------------------------------------------
// Meta tensors: shapes only
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// INT8 add: one pass, the bits of fake-quantize + fake-quantize (+ ReLU)
// ---------------------------------------------------------------------------------------------

TEST_F(OpsTest, AddInt8EqualsTheFakeQuantizedSum) {
  const QRange xr{0, 255}, yr{-128, 127};
  const Tensor x = random_input({2, 5, 7, 3}).contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor y = random_input({2, 5, 7, 3});
  const Tensor sx = random_scale({1}), sy = random_scale({1});
  const Tensor zx = random_zero_point({1}, xr), zy = random_zero_point({1}, yr);
  for (bool relu : {false, true}) {
    Tensor expected = qatx::ops::fake_quantize_per_tensor_affine(x, sx, zx, xr.qmin, xr.qmax) +
                      qatx::ops::fake_quantize_per_tensor_affine(y, sy, zy, yr.qmin, yr.qmax);
    if (relu) expected = torch::relu(expected);
    const Tensor out = qatx::ops::add_int8(x, sx, zx, xr.qmin, xr.qmax, y, sy, zy, yr.qmin, yr.qmax, relu);
    EXPECT_TRUE(torch::equal(out, expected)) << "relu=" << relu;
    EXPECT_EQ(out.strides(), x.strides());  // the input's channels-last layout
  }
  EXPECT_THROW(qatx::ops::add_int8(x, sx, zx, 0, 255, y.narrow(3, 0, 2), sy, zy, -128, 127), c10::Error);
}

// Integer activations: a layer writes the next layer's uint8 codes, which that layer reads as they
// are; the bits equal float32 output followed by the next layer's quantization.
TEST_F(OpsTest, Int8LayersChainIntegerActivations) {
  const QRange in{0, 255}, mid{0, 255}, out_range{-128, 127};
  const Tensor x = random_input({2, 6, 9, 9});
  const Tensor s_in = random_scale({1}), z_in = random_zero_point({1}, in);
  const Tensor s_mid = random_scale({1}), z_mid = random_zero_point({1}, mid);
  const Tensor s_out = random_scale({1}), z_out = random_zero_point({1}, out_range);
  const Tensor w1 = torch::randint(-128, 128, {8, 6, 3, 3}, torch::kChar);
  const Tensor w2 = torch::randint(-128, 128, {5, 8 * 9 * 9}, torch::kChar);
  const Tensor sw1 = random_scale({8}), sw2 = random_scale({5});
  const Tensor zw1 = torch::zeros({8}, torch::kInt), zw2 = torch::zeros({5}, torch::kInt);
  const auto conv = [&](const Tensor& input, const std::optional<Tensor>& s, const std::optional<Tensor>& z) {
    return qatx::ops::convolution_int8(input, s_in, z_in, in.qmin, in.qmax, w1, sw1, zw1, std::nullopt, {1, 1},
                                       {1, 1}, {1, 1}, false, {0, 0}, 1, true, s, z, mid.qmin, mid.qmax);
  };
  const Tensor y1 = conv(x, std::nullopt, std::nullopt);
  const Tensor codes = conv(x, s_mid, z_mid);
  ASSERT_EQ(codes.scalar_type(), torch::kByte);
  EXPECT_TRUE(torch::equal(codes, qatx::ops::quantize_per_tensor_affine(y1, s_mid, z_mid, 0, 255, torch::kByte)));
  EXPECT_EQ(codes.strides(), y1.strides());  // channels-last, like the float32 output
  const Tensor flat_float = y1.flatten(1), flat_codes = codes.flatten(1);
  const Tensor y2 = qatx::ops::linear_int8(flat_float, s_mid, z_mid, 0, 255, w2, sw2, zw2);
  EXPECT_TRUE(torch::equal(qatx::ops::linear_int8(flat_codes, s_mid, z_mid, 0, 255, w2, sw2, zw2), y2));
  const Tensor signed_codes = qatx::ops::linear_int8(flat_codes, s_mid, z_mid, 0, 255, w2, sw2, zw2, std::nullopt,
                                                     false, s_out, z_out, out_range.qmin, out_range.qmax);
  ASSERT_EQ(signed_codes.scalar_type(), torch::kChar);
  EXPECT_TRUE(torch::equal(signed_codes,
                           qatx::ops::quantize_per_tensor_affine(y2, s_out, z_out, -128, 127, torch::kChar)));
  EXPECT_ERROR_MENTIONS(qatx::ops::linear_int8(flat_codes, s_mid, z_mid, -128, 127, w2, sw2, zw2), "uint8");
  EXPECT_ERROR_MENTIONS(
      qatx::ops::linear_int8(flat_float, s_mid, z_mid, 0, 255, w2, sw2, zw2, std::nullopt, false, s_out, std::nullopt),
      "output_zero_point");
}

// 3x3 stride-1 convolutions with 16 or more input channels take the Winograd F(2x2, 3x3) route on
// AVX2 CPUs; its bits equal the exact integer sum's epilogue (odd output sizes, zero points, bias).
TEST_F(OpsTest, Int8ConvolutionWinogradRouteIsExact) {
  const QRange in{0, 255};
  const Tensor q = torch::randint(0, 256, {2, 20, 7, 9}, torch::kByte);
  const Tensor s_in = random_scale({1}), z_in = random_zero_point({1}, in);
  const Tensor w = torch::randint(-128, 128, {24, 20, 3, 3}, torch::kChar);
  const Tensor sw = random_scale({24}), zw = torch::randint(-20, 20, {24}, torch::kInt);
  const Tensor bias = torch::randint(-3000, 3000, {24}, torch::kInt);
  const Tensor acc = torch::conv2d(q.to(torch::kDouble) - z_in.item<int32_t>(),
                                   w.to(torch::kDouble) - zw.to(torch::kDouble).reshape({24, 1, 1, 1}), {}, 1, 1);
  const Tensor expected = torch::relu(((acc + bias.to(torch::kDouble).reshape({1, 24, 1, 1})) *
                                       (s_in.to(torch::kDouble) * sw.to(torch::kDouble)).reshape({1, 24, 1, 1}))
                                          .to(torch::kFloat));
  const Tensor y = qatx::ops::convolution_int8(q, s_in, z_in, in.qmin, in.qmax, w, sw, zw, bias, {1, 1}, {1, 1},
                                               {1, 1}, false, {0, 0}, 1, true);
  EXPECT_TRUE(torch::equal(y, expected));
  // uint8 codes added in one pass: the bits of the float route on the values they encode.
  const Tensor s_out = random_scale({1}), z_out = random_zero_point({1}, in);
  const Tensor codes = qatx::ops::quantize_per_tensor_affine(y, s_out, z_out, 0, 255, torch::kByte);
  const Tensor values = qatx::ops::dequantize_per_tensor_affine(codes, s_out, z_out);
  const Tensor sum = qatx::ops::add_int8(codes, s_out, z_out, 0, 255, codes, s_out, z_out, 0, 255, true, s_in, z_in,
                                         in.qmin, in.qmax);
  const Tensor float_route = qatx::ops::add_int8(values, s_out, z_out, 0, 255, values, s_out, z_out, 0, 255, true);
  EXPECT_TRUE(torch::equal(sum, qatx::ops::quantize_per_tensor_affine(float_route, s_in, z_in, 0, 255, torch::kByte)));
}

// Strided depthwise convolutions over 16k channels of whole-range codes read the codes in place
// (the zero point through the bias, padding taps from a pixel of zero-point codes); their bits
// equal the exact integer sum's epilogue, at the image edges too.
TEST_F(OpsTest, Int8DepthwiseStridedReadsCodesInPlace) {
  const QRange in{0, 255};
  const int64_t c = 32;
  const Tensor q = torch::randint(0, 256, {2, c, 9, 8}, torch::kByte).contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor s_in = random_scale({1}), z_in = random_zero_point({1}, in);
  const Tensor w = torch::randint(-128, 128, {c, 1, 3, 3}, torch::kChar);
  const Tensor sw = random_scale({c}), zw = torch::randint(-20, 20, {c}, torch::kInt);
  const Tensor bias = torch::randint(-3000, 3000, {c}, torch::kInt);
  const Tensor acc = torch::conv2d(q.to(torch::kDouble) - z_in.item<int32_t>(),
                                   w.to(torch::kDouble) - zw.to(torch::kDouble).reshape({c, 1, 1, 1}), {}, 2, 1, 1, c);
  const Tensor expected = ((acc + bias.to(torch::kDouble).reshape({1, c, 1, 1})) *
                           (s_in.to(torch::kDouble) * sw.to(torch::kDouble)).reshape({1, c, 1, 1}))
                              .to(torch::kFloat);
  const Tensor y = qatx::ops::convolution_int8(q, s_in, z_in, in.qmin, in.qmax, w, sw, zw, bias, {2, 2}, {1, 1},
                                               {1, 1}, false, {0, 0}, c, false);
  EXPECT_TRUE(torch::equal(y, expected));
  const Tensor s_out = random_scale({1}), z_out = random_zero_point({1}, in);
  const Tensor codes = qatx::ops::convolution_int8(q, s_in, z_in, in.qmin, in.qmax, w, sw, zw, bias, {2, 2}, {1, 1},
                                                   {1, 1}, false, {0, 0}, c, false, s_out, z_out, 0, 255);
  EXPECT_TRUE(torch::equal(codes, qatx::ops::quantize_per_tensor_affine(expected, s_out, z_out, 0, 255, torch::kByte)));
}

// 4-bit weights: every nibble pair of a byte, element 2j from the low nibble; the CPU kernel hands
// the same tensor back while the packed tensor is unchanged, fresh values after an in-place change.
TEST_F(OpsTest, UnpackInt4ValuesAndKeptResult) {
  const Tensor packed = torch::arange(256, torch::kInt).to(torch::kByte).reshape({2, 128});
  const Tensor y = qatx::ops::unpack_int4(packed, 255);
  ASSERT_EQ(y.scalar_type(), torch::kChar);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 255}));
  for (int64_t i = 0; i < 255; ++i) {
    const int64_t byte = 128 + i / 2, nibble = i % 2 == 0 ? byte % 16 : byte / 16;
    ASSERT_EQ(y[1][i].item<int>(), nibble >= 8 ? nibble - 16 : nibble) << "element " << i;
  }
  EXPECT_EQ(qatx::ops::unpack_int4(packed, 255).data_ptr(), y.data_ptr());
  const Tensor again = packed.clone();
  packed.fill_(0x9F);  // (low 15, high 9) = (-1, -7)
  const Tensor z = qatx::ops::unpack_int4(packed, 256);
  EXPECT_EQ(z[0][0].item<int>(), -1);
  EXPECT_EQ(z[0][1].item<int>(), -7);
  EXPECT_TRUE(torch::equal(qatx::ops::unpack_int4(again, 255), y));
  EXPECT_ERROR_MENTIONS(qatx::ops::unpack_int4(packed, 254), "n must be 2 * packed.size(-1) - 1 or");
  EXPECT_ERROR_MENTIONS(qatx::ops::unpack_int4(packed.to(torch::kChar), 255), "packed must be uint8");
}

TEST_F(OpsTest, CpuOutputCacheReusesAFreedOutput) {
  const int64_t previous = qatx::ops::set_cpu_cache_limit(int64_t{16} << 20);
  qatx::ops::empty_cpu_cache();
  const Tensor x = random_input({64, 1024});  // 256 KiB: cached
  const Tensor s = random_scale({1}), z = random_zero_point({1}, {-128, 127});
  const Tensor expected = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, -128, 127).clone();
  { const Tensor freed = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, -128, 127); }
  const qatx::ops::CpuCacheStats before = qatx::ops::cpu_cache_stats();
  EXPECT_EQ(before.cached_bytes, x.numel() * 4);
  const Tensor y = qatx::ops::fake_quantize_per_tensor_affine(x, s, z, -128, 127);
  const qatx::ops::CpuCacheStats after = qatx::ops::cpu_cache_stats();
  EXPECT_EQ(after.reused, before.reused + 1);
  EXPECT_EQ(after.cached_bytes, 0);
  EXPECT_TRUE(torch::equal(y, expected));
  EXPECT_THROW(qatx::ops::set_cpu_cache_limit(-1), c10::Error);
  qatx::ops::set_cpu_cache_limit(previous);
}

TEST(Meta, ShapesAndDtypes) {
  const auto meta = torch::TensorOptions().device(torch::kMeta);
  const Tensor x = torch::empty({4, 6, 8}, meta);
  const Tensor y = qatx::ops::fake_quantize_per_channel_affine(x, torch::empty({6}, meta),
                                                               torch::empty({6}, meta.dtype(torch::kInt)), 1, -128, 127);
  EXPECT_TRUE(y.is_meta());
  EXPECT_EQ(y.sizes(), x.sizes());
  auto [out, mask] = qatx::ops::_fake_quantize_per_group_affine_with_mask(
      x, torch::empty({4, 6, 2}, meta), torch::empty({4, 6, 2}, meta.dtype(torch::kInt)), 4, -8, 7);
  EXPECT_EQ(out.sizes(), x.sizes());
  EXPECT_EQ(mask.numel(), (x.numel() + 7) / 8);
  EXPECT_EQ(mask.scalar_type(), torch::kByte);
  const Tensor q = qatx::ops::quantize_per_tensor_affine(x, torch::empty({1}, meta),
                                                         torch::empty({1}, meta.dtype(torch::kInt)), 0, 255, torch::kByte);
  EXPECT_TRUE(q.is_meta());
  EXPECT_EQ(q.scalar_type(), torch::kByte);
  EXPECT_THROW(qatx::ops::fake_quantize_per_group_affine(x, torch::empty({4, 6, 2}, meta),
                                                         torch::empty({4, 6, 2}, meta.dtype(torch::kInt)), 3, -8, 7),
               c10::Error);
}

}  // namespace
