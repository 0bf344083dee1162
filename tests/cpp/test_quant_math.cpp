// Unit tests of qatx/kernels/quant_math.h, the torch-free math shared by the CPU and CUDA
// kernels. This file links GoogleTest only: no libtorch. All comparisons are exact (bitwise
// for floats), never with a tolerance.
#include "qatx/kernels/quant_math.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using namespace qatx::math;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

uint32_t bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// Bitwise float equality: tells -0 from +0, and needs no tolerance.
#define EXPECT_FLOAT_BITS_EQ(actual, expected) EXPECT_EQ(bits(actual), bits(expected)) << (actual) << " vs " << (expected)

TEST(RoundHalfEven, Ties) {
  EXPECT_FLOAT_BITS_EQ(round_half_even(0.5f), 0.0f);
  EXPECT_FLOAT_BITS_EQ(round_half_even(1.5f), 2.0f);
  EXPECT_FLOAT_BITS_EQ(round_half_even(2.5f), 2.0f);
  EXPECT_FLOAT_BITS_EQ(round_half_even(3.5f), 4.0f);
  EXPECT_FLOAT_BITS_EQ(round_half_even(-0.5f), -0.0f);
  EXPECT_TRUE(std::signbit(round_half_even(-0.5f)));
  EXPECT_FLOAT_BITS_EQ(round_half_even(-1.5f), -2.0f);
  EXPECT_FLOAT_BITS_EQ(round_half_even(-2.5f), -2.0f);
  EXPECT_FLOAT_BITS_EQ(round_half_even(-3.5f), -4.0f);
}

TEST(RoundHalfEven, NonTies) {
  EXPECT_FLOAT_BITS_EQ(round_half_even(0.49999997f), 0.0f);  // largest float below 0.5
  EXPECT_FLOAT_BITS_EQ(round_half_even(0.50000006f), 1.0f);  // smallest float above 0.5
  EXPECT_FLOAT_BITS_EQ(round_half_even(2.4f), 2.0f);
  EXPECT_FLOAT_BITS_EQ(round_half_even(2.6f), 3.0f);
  EXPECT_FLOAT_BITS_EQ(round_half_even(-2.6f), -3.0f);
  EXPECT_FLOAT_BITS_EQ(round_half_even(8388609.0f), 8388609.0f);  // 2^23 + 1: already integral
  EXPECT_FLOAT_BITS_EQ(round_half_even(kInf), kInf);
  EXPECT_FLOAT_BITS_EQ(round_half_even(-kInf), -kInf);
  EXPECT_TRUE(std::isnan(round_half_even(kNaN)));
}

TEST(QuantizeValue, RoundsAndAddsZeroPoint) {
  // inv_scale 4 (scale 0.25), zero point 10, range [0, 255].
  EXPECT_FLOAT_BITS_EQ(quantize_value(1.0f, 4.0f, 10.0f, 0.0f, 255.0f), 14.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(0.125f, 4.0f, 10.0f, 0.0f, 255.0f), 10.0f);   // 0.5 -> 0
  EXPECT_FLOAT_BITS_EQ(quantize_value(0.375f, 4.0f, 10.0f, 0.0f, 255.0f), 12.0f);   // 1.5 -> 2
  EXPECT_FLOAT_BITS_EQ(quantize_value(-0.375f, 4.0f, 10.0f, 0.0f, 255.0f), 8.0f);   // -1.5 -> -2
  EXPECT_FLOAT_BITS_EQ(quantize_value(-2.5f, 4.0f, 10.0f, 0.0f, 255.0f), 0.0f);     // exactly quant_min
  EXPECT_FLOAT_BITS_EQ(quantize_value(61.25f, 4.0f, 10.0f, 0.0f, 255.0f), 255.0f);  // exactly quant_max
}

TEST(QuantizeValue, Clamps) {
  EXPECT_FLOAT_BITS_EQ(quantize_value(1000.0f, 1.0f, 0.0f, -128.0f, 127.0f), 127.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(-1000.0f, 1.0f, 0.0f, -128.0f, 127.0f), -128.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(127.5f, 1.0f, 0.0f, -128.0f, 127.0f), 127.0f);   // 128 (even) -> 127
  EXPECT_FLOAT_BITS_EQ(quantize_value(-128.5f, 1.0f, 0.0f, -128.0f, 127.0f), -128.0f);  // -128 (even)
  EXPECT_FLOAT_BITS_EQ(quantize_value(-129.0f, 1.0f, 0.0f, -128.0f, 127.0f), -128.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(-1.0f, 1.0f, 5.0f, 0.0f, 15.0f), 4.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(-6.0f, 1.0f, 5.0f, 0.0f, 15.0f), 0.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(11.0f, 1.0f, 5.0f, 0.0f, 15.0f), 15.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(1e30f, 1e10f, 0.0f, -32768.0f, 32767.0f), 32767.0f);
}

TEST(QuantizeValue, NaNPropagates) {
  EXPECT_TRUE(std::isnan(quantize_value(kNaN, 1.0f, 0.0f, -128.0f, 127.0f)));
  EXPECT_TRUE(std::isnan(quantize_value(kNaN, 0.5f, 3.0f, 0.0f, 255.0f)));
  EXPECT_TRUE(std::isnan(quantize_unclamped(kNaN, 1.0f, 0.0f)));
  EXPECT_TRUE(std::isnan(clamp_nan_propagating(kNaN, 0.0f, 1.0f)));
}

TEST(QuantizeValue, InfinitySaturates) {
  EXPECT_FLOAT_BITS_EQ(quantize_value(kInf, 1.0f, 0.0f, -128.0f, 127.0f), 127.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(-kInf, 1.0f, 0.0f, -128.0f, 127.0f), -128.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(kInf, 0.01f, 7.0f, 0.0f, 255.0f), 255.0f);
  EXPECT_FLOAT_BITS_EQ(quantize_value(-kInf, 0.01f, 7.0f, 0.0f, 255.0f), 0.0f);
}

TEST(InQuantRange, Boundaries) {
  EXPECT_TRUE(in_quant_range(-128.0f, -128.0f, 127.0f));
  EXPECT_TRUE(in_quant_range(127.0f, -128.0f, 127.0f));
  EXPECT_TRUE(in_quant_range(0.0f, -128.0f, 127.0f));
  EXPECT_TRUE(in_quant_range(-0.0f, 0.0f, 255.0f));
  EXPECT_FALSE(in_quant_range(-129.0f, -128.0f, 127.0f));
  EXPECT_FALSE(in_quant_range(128.0f, -128.0f, 127.0f));
  EXPECT_FALSE(in_quant_range(std::nextafter(127.0f, kInf), -128.0f, 127.0f));
  EXPECT_FALSE(in_quant_range(std::nextafter(-128.0f, -kInf), -128.0f, 127.0f));
  EXPECT_FALSE(in_quant_range(kInf, -128.0f, 127.0f));
  EXPECT_FALSE(in_quant_range(-kInf, -128.0f, 127.0f));
}

TEST(InQuantRange, NaNIsOutside) {
  EXPECT_FALSE(in_quant_range(kNaN, -128.0f, 127.0f));
  EXPECT_FALSE(in_quant_range(kNaN, -kInf, kInf));
}

TEST(FakeQuantizeValue, ValueAndMaskBit) {
  // scale 0.5, inv_scale 2, zero point 3, range [0, 15]: representable [-1.5, 6].
  const float s = 0.5f, inv = 2.0f, z = 3.0f, lo = 0.0f, hi = 15.0f;
  struct Case {
    float x, y;
    bool in_range;
  };
  const Case cases[] = {
      {1.0f, 1.0f, true},       // q = 5
      {0.25f, 0.0f, true},      // 0.5 -> 0 (tie to even), q = 3
      {0.75f, 1.0f, true},      // 1.5 -> 2, q = 5
      {-1.5f, -1.5f, true},     // q = 0 = quant_min
      {6.0f, 6.0f, true},       // q = 15 = quant_max
      {-2.0f, -1.5f, false},    // q = -1, clamped to 0
      {6.5f, 6.0f, false},      // q = 16, clamped to 15
      {100.0f, 6.0f, false},
      {kInf, 6.0f, false},
      {-kInf, -1.5f, false},
  };
  for (const Case& c : cases) {
    bool in_range = !c.in_range;  // must be overwritten
    const float y = fake_quantize_value(c.x, s, inv, z, lo, hi, in_range);
    EXPECT_FLOAT_BITS_EQ(y, c.y) << " for x = " << c.x;
    EXPECT_EQ(in_range, c.in_range) << " for x = " << c.x;
  }
  // -1.75 * 2 = -3.5 rounds to -4 (even): q = -1, below quant_min.
  bool in_range = true;
  EXPECT_FLOAT_BITS_EQ(fake_quantize_value(-1.75f, s, inv, z, lo, hi, in_range), -1.5f);
  EXPECT_FALSE(in_range);
  // -1.25 * 2 = -2.5 rounds to -2 (even): q = 1, inside.
  in_range = false;
  EXPECT_FLOAT_BITS_EQ(fake_quantize_value(-1.25f, s, inv, z, lo, hi, in_range), -1.0f);
  EXPECT_TRUE(in_range);
}

TEST(FakeQuantizeValue, NaN) {
  bool in_range = true;
  EXPECT_TRUE(std::isnan(fake_quantize_value(kNaN, 0.5f, 2.0f, 3.0f, 0.0f, 15.0f, in_range)));
  EXPECT_FALSE(in_range);
}

TEST(FakeQuantizeValue, EqualsDequantizeOfQuantize) {
  const float s = 0.1f, inv = 1.0f / s, z = -7.0f, lo = -128.0f, hi = 127.0f;
  for (int i = -2000; i <= 2000; ++i) {
    const float x = static_cast<float>(i) * 0.00731f;
    bool in_range;
    const float y = fake_quantize_value(x, s, inv, z, lo, hi, in_range);
    const float q = quantize_value(x, inv, z, lo, hi);
    EXPECT_FLOAT_BITS_EQ(y, dequantize_value(q, s, z));
    EXPECT_EQ(in_range, in_quant_range(quantize_unclamped(x, inv, z), lo, hi));
  }
}

TEST(DequantizeValue, Values) {
  EXPECT_FLOAT_BITS_EQ(dequantize_value(5.0f, 0.5f, 3.0f), 1.0f);
  EXPECT_FLOAT_BITS_EQ(dequantize_value(0.0f, 0.5f, 3.0f), -1.5f);
  EXPECT_FLOAT_BITS_EQ(dequantize_value(3.0f, 0.5f, 3.0f), 0.0f);
  EXPECT_FLOAT_BITS_EQ(dequantize_value(-128.0f, 0.25f, 0.0f), -32.0f);
  EXPECT_FLOAT_BITS_EQ(dequantize_value(255.0f, 0.125f, 128.0f), 15.875f);
  EXPECT_FLOAT_BITS_EQ(dequantize_value(32767.0f, 1.0f, -32768.0f), 65535.0f);
  // One rounding of the exact product (q - z) * scale.
  EXPECT_FLOAT_BITS_EQ(dequantize_value(3.0f, 0.1f, 0.0f), 3.0f * 0.1f);
}

TEST(IsValidScale, Values) {
  EXPECT_FALSE(is_valid_scale(0.0f));
  EXPECT_FALSE(is_valid_scale(-0.0f));
  EXPECT_FALSE(is_valid_scale(-1.0f));
  EXPECT_FALSE(is_valid_scale(-FLT_MIN));
  EXPECT_FALSE(is_valid_scale(kNaN));
  EXPECT_FALSE(is_valid_scale(kInf));
  EXPECT_FALSE(is_valid_scale(-kInf));
  EXPECT_TRUE(is_valid_scale(FLT_MIN));
  EXPECT_EQ(kMinScale, FLT_MIN);
  EXPECT_FALSE(is_valid_scale(std::nextafter(FLT_MIN, 0.0f)));                 // largest denormal
  EXPECT_FALSE(is_valid_scale(FLT_MIN / 2.0f));                                // denormal
  EXPECT_FALSE(is_valid_scale(std::numeric_limits<float>::denorm_min()));    // smallest denormal
  EXPECT_TRUE(is_valid_scale(1.0f));
  EXPECT_TRUE(is_valid_scale(0.1f));
  EXPECT_TRUE(is_valid_scale(1e-30f));
  EXPECT_TRUE(is_valid_scale(FLT_MAX));
  // Valid scales have a finite reciprocal.
  EXPECT_TRUE(std::isfinite(1.0f / FLT_MIN));
}

TEST(SaturateCast, Int8) {
  EXPECT_EQ(saturate_cast<int8_t>(0.0f), 0);
  EXPECT_EQ(saturate_cast<int8_t>(-0.0f), 0);
  EXPECT_EQ(saturate_cast<int8_t>(3.0f), 3);
  EXPECT_EQ(saturate_cast<int8_t>(-77.0f), -77);
  EXPECT_EQ(saturate_cast<int8_t>(127.0f), 127);
  EXPECT_EQ(saturate_cast<int8_t>(-128.0f), -128);
  EXPECT_EQ(saturate_cast<int8_t>(128.0f), 127);
  EXPECT_EQ(saturate_cast<int8_t>(-129.0f), -128);
  EXPECT_EQ(saturate_cast<int8_t>(1e9f), 127);
  EXPECT_EQ(saturate_cast<int8_t>(-1e9f), -128);
  EXPECT_EQ(saturate_cast<int8_t>(kInf), 127);
  EXPECT_EQ(saturate_cast<int8_t>(-kInf), -128);
}

TEST(SaturateCast, UInt8) {
  EXPECT_EQ(saturate_cast<uint8_t>(0.0f), 0);
  EXPECT_EQ(saturate_cast<uint8_t>(200.0f), 200);
  EXPECT_EQ(saturate_cast<uint8_t>(255.0f), 255);
  EXPECT_EQ(saturate_cast<uint8_t>(256.0f), 255);
  EXPECT_EQ(saturate_cast<uint8_t>(-1.0f), 0);
  EXPECT_EQ(saturate_cast<uint8_t>(-300.0f), 0);
  EXPECT_EQ(saturate_cast<uint8_t>(kInf), 255);
  EXPECT_EQ(saturate_cast<uint8_t>(-kInf), 0);
}

TEST(SaturateCast, Int16) {
  EXPECT_EQ(saturate_cast<int16_t>(32767.0f), 32767);
  EXPECT_EQ(saturate_cast<int16_t>(-32768.0f), -32768);
  EXPECT_EQ(saturate_cast<int16_t>(32768.0f), 32767);
  EXPECT_EQ(saturate_cast<int16_t>(-32769.0f), -32768);
  EXPECT_EQ(saturate_cast<int16_t>(-12345.0f), -12345);
}

TEST(SaturateCast, Int32BeyondRange) {
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  constexpr int32_t kMin = std::numeric_limits<int32_t>::lowest();
  EXPECT_EQ(saturate_cast<int32_t>(0.0f), 0);
  EXPECT_EQ(saturate_cast<int32_t>(-123456.0f), -123456);
  EXPECT_EQ(saturate_cast<int32_t>(16777216.0f), 16777216);
  // 2^31 - 128: the largest float below 2^31 converts exactly.
  EXPECT_EQ(saturate_cast<int32_t>(2147483520.0f), 2147483520);
  EXPECT_EQ(saturate_cast<int32_t>(-2147483520.0f), -2147483520);
  // float(INT32_MAX) is 2^31, one beyond the range: saturates instead of overflowing.
  EXPECT_EQ(saturate_cast<int32_t>(2147483648.0f), kMax);
  EXPECT_EQ(saturate_cast<int32_t>(-2147483648.0f), kMin);
  EXPECT_EQ(saturate_cast<int32_t>(3e9f), kMax);
  EXPECT_EQ(saturate_cast<int32_t>(-3e9f), kMin);
  EXPECT_EQ(saturate_cast<int32_t>(1e20f), kMax);
  EXPECT_EQ(saturate_cast<int32_t>(-1e20f), kMin);
  EXPECT_EQ(saturate_cast<int32_t>(FLT_MAX), kMax);
  EXPECT_EQ(saturate_cast<int32_t>(kInf), kMax);
  EXPECT_EQ(saturate_cast<int32_t>(-kInf), kMin);
}

// Regression (found by fuzzing): int32 ranges whose bounds float32 cannot represent. The float
// clamp uses float(2^30 - 1) == 2^30, so the integer clamp must bring q back inside the range.
TEST(ToQuantizedInt, StaysInsideInt32RangesBeyondFloatPrecision) {
  constexpr int32_t kQmin = -1073741823, kQmax = 1073741823;  // +-(2^30 - 1)
  EXPECT_EQ(to_quantized_int<int32_t>(static_cast<float>(kQmax), kQmin, kQmax), kQmax);
  EXPECT_EQ(to_quantized_int<int32_t>(static_cast<float>(kQmin), kQmin, kQmax), kQmin);
  EXPECT_EQ(to_quantized_int<int32_t>(1e10f, kQmin, kQmax), kQmax);
  EXPECT_EQ(to_quantized_int<int32_t>(-kInf, kQmin, kQmax), kQmin);
  constexpr int32_t kLowest = std::numeric_limits<int32_t>::lowest();
  EXPECT_EQ(to_quantized_int<int32_t>(-2147483648.0f, kLowest + 1, 5), kLowest + 1);
  EXPECT_EQ(to_quantized_int<int32_t>(-7.0f, kLowest + 1, 5), -7);
  EXPECT_EQ(to_quantized_int<int8_t>(-128.0f, -127, 127), -127);
  EXPECT_EQ(to_quantized_int<int8_t>(42.0f, -127, 127), 42);
  EXPECT_EQ(to_quantized_int<uint8_t>(std::nanf(""), 3, 200), 3);  // NaN: no undefined conversion
}

TEST(PackBits8, AllPatterns) {
  for (int pattern = 0; pattern < 256; ++pattern) {
    uint8_t flags[8];
    for (int j = 0; j < 8; ++j) flags[j] = static_cast<uint8_t>((pattern >> j) & 1);
    uint8_t expected = 0;
    for (int j = 0; j < 8; ++j)
      if (flags[j]) expected = static_cast<uint8_t>(expected | (1u << j));
    ASSERT_EQ(pack_bits8(flags), expected) << "pattern " << pattern;
    ASSERT_EQ(expected, pattern);
  }
}

TEST(PackBits8, SingleBits) {
  for (int j = 0; j < 8; ++j) {
    uint8_t flags[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    flags[j] = 1;
    EXPECT_EQ(pack_bits8(flags), static_cast<uint8_t>(1u << j)) << "flag " << j;
  }
}

TEST(PackBits8, OnlyBitZeroOfEachFlagCounts) {
  // Flags are 0/1 (bool stored as bytes); higher bits of a flag byte must not leak.
  const uint8_t flags[8] = {0xFE, 0x01, 0xFF, 0x80, 0x03, 0x00, 0x7F, 0x41};
  uint8_t expected = 0;
  for (int j = 0; j < 8; ++j) expected = static_cast<uint8_t>(expected | ((flags[j] & 1u) << j));
  EXPECT_EQ(pack_bits8(flags), expected);
}

TEST(MaskBit, AllBytesAndBits) {
  for (int byte = 0; byte < 256; ++byte)
    for (int j = 0; j < 8; ++j) ASSERT_EQ(mask_bit(static_cast<uint8_t>(byte), j), ((byte >> j) & 1) != 0);
}

TEST(MaskBit, RoundTripsWithPackBits8) {
  for (int pattern = 0; pattern < 256; ++pattern) {
    uint8_t flags[8];
    for (int j = 0; j < 8; ++j) flags[j] = static_cast<uint8_t>((pattern * 37 + j * 11) % 3 == 0);
    const uint8_t packed = pack_bits8(flags);
    for (int j = 0; j < 8; ++j) ASSERT_EQ(mask_bit(packed, j), flags[j] != 0);
  }
}

TEST(QParamIndex, PerTensor) {
  const int64_t numel = 2 * 3 * 4;
  const QParamIndex index{numel, 1};
  for (int64_t p = 0; p < numel; ++p) EXPECT_EQ(index(p), 0);
}

// Contiguous [2, 3, 4]: per-channel along each axis, index = (p / stride(axis)) % size(axis).
TEST(QParamIndex, PerChannelContiguous) {
  const int64_t sizes[3] = {2, 3, 4};
  const int64_t strides[3] = {12, 4, 1};
  for (int axis = 0; axis < 3; ++axis) {
    const QParamIndex index{strides[axis], sizes[axis]};
    for (int64_t i0 = 0; i0 < 2; ++i0)
      for (int64_t i1 = 0; i1 < 3; ++i1)
        for (int64_t i2 = 0; i2 < 4; ++i2) {
          const int64_t coord[3] = {i0, i1, i2};
          const int64_t p = i0 * 12 + i1 * 4 + i2;
          EXPECT_EQ(index(p), coord[axis]) << "axis " << axis << " p " << p;
        }
  }
}

// Channels-last [N=2, C=3, H=2, W=2] (memory order N, H, W, C): per-channel along C has
// stride 1 and size 3.
TEST(QParamIndex, PerChannelChannelsLast) {
  const QParamIndex index{1, 3};
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t w = 0; w < 2; ++w)
        for (int64_t c = 0; c < 3; ++c) {
          const int64_t p = ((n * 2 + h) * 2 + w) * 3 + c;
          EXPECT_EQ(index(p), c);
        }
}

// Contiguous [2, 3, 8] in groups of 4 along the last dimension: qparams of shape [2, 3, 2],
// index = flat index of (i0, i1, i2 / 4).
TEST(QParamIndex, PerGroup) {
  const int64_t group_size = 4, numel = 2 * 3 * 8;
  const QParamIndex index{group_size, numel / group_size};
  for (int64_t i0 = 0; i0 < 2; ++i0)
    for (int64_t i1 = 0; i1 < 3; ++i1)
      for (int64_t i2 = 0; i2 < 8; ++i2) {
        const int64_t p = (i0 * 3 + i1) * 8 + i2;
        EXPECT_EQ(index(p), (i0 * 3 + i1) * 2 + i2 / group_size) << "p " << p;
      }
}

TEST(QParamIndex, PerGroupWholeRow) {
  // group_size = last dimension: one qparam per row.
  const QParamIndex index{8, 5};
  for (int64_t p = 0; p < 40; ++p) EXPECT_EQ(index(p), p / 8);
}

TEST(Select, PicksBitPatterns) {
  EXPECT_FLOAT_BITS_EQ(select(true, 1.5f, -2.0f), 1.5f);
  EXPECT_FLOAT_BITS_EQ(select(false, 1.5f, -2.0f), -2.0f);
  EXPECT_FLOAT_BITS_EQ(select(true, -0.0f, 0.0f), -0.0f);
  EXPECT_FLOAT_BITS_EQ(select(false, -0.0f, 0.0f), 0.0f);
  EXPECT_FLOAT_BITS_EQ(select(true, kInf, kNaN), kInf);
  EXPECT_TRUE(std::isnan(select(false, kInf, kNaN)));
  EXPECT_TRUE(std::isnan(select(true, kNaN, 1.0f)));
}

// ---- learnable quantizers -------------------------------------------------------------------

// scale 0.25 (inv_scale 4), zero point 2, range [-8, 7], incoming gradient 2: every value below
// is exact in float32.
constexpr float kS = 0.25f, kInv = 4.0f, kZ = 2.0f, kMin = -8.0f, kMax = 7.0f, kG = 2.0f;

TEST(LsqGradTerms, InsideTheRange) {
  // v = 1.5 (a tie) rounds to 2: g * (2 - 1.5); no zero-point term.
  LsqGradTerms t = lsq_grad_terms(0.375f, kG, kS, kInv, kZ, kMin, kMax);
  EXPECT_TRUE(t.in_range);
  EXPECT_FLOAT_BITS_EQ(t.scale, 1.0f);
  EXPECT_FLOAT_BITS_EQ(t.zero_point, 0.0f);
  // v = 0.5 rounds to 0: g * (0 - 0.5).
  t = lsq_grad_terms(0.125f, kG, kS, kInv, kZ, kMin, kMax);
  EXPECT_TRUE(t.in_range);
  EXPECT_FLOAT_BITS_EQ(t.scale, -1.0f);
  // v = -0.75 rounds to -1: g * (-1 + 0.75).
  t = lsq_grad_terms(-0.1875f, kG, kS, kInv, kZ, kMin, kMax);
  EXPECT_FLOAT_BITS_EQ(t.scale, -0.5f);
  // g = 0 gives no term.
  t = lsq_grad_terms(0.375f, 0.0f, kS, kInv, kZ, kMin, kMax);
  EXPECT_FLOAT_BITS_EQ(t.scale, 0.0f);
}

TEST(LsqGradTerms, RangeBoundariesAreInside) {
  // v = -10: q_u = -8 = quant_min; v = 5: q_u = 7 = quant_max. rint(v) - v = 0.
  for (const float x : {-2.5f, 1.25f}) {
    const LsqGradTerms t = lsq_grad_terms(x, kG, kS, kInv, kZ, kMin, kMax);
    EXPECT_TRUE(t.in_range) << x;
    EXPECT_FLOAT_BITS_EQ(t.scale, 0.0f);
    EXPECT_FLOAT_BITS_EQ(t.zero_point, 0.0f);
  }
}

TEST(LsqGradTerms, BelowAndAboveTheRange) {
  // v = -12: q_u = -10 < -8: g * (quant_min - z) and -g * s.
  LsqGradTerms t = lsq_grad_terms(-3.0f, kG, kS, kInv, kZ, kMin, kMax);
  EXPECT_FALSE(t.in_range);
  EXPECT_FLOAT_BITS_EQ(t.scale, -20.0f);
  EXPECT_FLOAT_BITS_EQ(t.zero_point, -0.5f);
  // v = -10.5 rounds to -10 (even): q_u = -8, inside; v = -10.75: q_u = -9, below.
  EXPECT_TRUE(lsq_grad_terms(-2.625f, kG, kS, kInv, kZ, kMin, kMax).in_range);
  EXPECT_FALSE(lsq_grad_terms(-2.6875f, kG, kS, kInv, kZ, kMin, kMax).in_range);
  // v = 12: q_u = 14 > 7: g * (quant_max - z) and -g * s.
  t = lsq_grad_terms(3.0f, kG, kS, kInv, kZ, kMin, kMax);
  EXPECT_FALSE(t.in_range);
  EXPECT_FLOAT_BITS_EQ(t.scale, 10.0f);
  EXPECT_FLOAT_BITS_EQ(t.zero_point, -0.5f);
  // +Inf saturates above, -Inf below.
  EXPECT_FLOAT_BITS_EQ(lsq_grad_terms(kInf, kG, kS, kInv, kZ, kMin, kMax).scale, 10.0f);
  EXPECT_FLOAT_BITS_EQ(lsq_grad_terms(-kInf, kG, kS, kInv, kZ, kMin, kMax).scale, -20.0f);
}

TEST(LsqGradTerms, NaNInputIsOutsideWithANaNScaleTerm) {
  const LsqGradTerms t = lsq_grad_terms(kNaN, kG, kS, kInv, kZ, kMin, kMax);
  EXPECT_FALSE(t.in_range);
  EXPECT_TRUE(std::isnan(t.scale));
  EXPECT_FLOAT_BITS_EQ(t.zero_point, -0.5f);
}

TEST(LsqGradTerms, AgreesWithFakeQuantizeMask) {
  // The backward's in_range is the forward's STE mask bit, for every x on a fine grid.
  for (int k = -4000; k <= 4000; ++k) {
    const float x = static_cast<float>(k) * 0.001f;
    bool mask;
    fake_quantize_value(x, kS, kInv, kZ, kMin, kMax, mask);
    ASSERT_EQ(lsq_grad_terms(x, kG, kS, kInv, kZ, kMin, kMax).in_range, mask) << x;
  }
}

TEST(Pact, Levels) {
  EXPECT_EQ(pact_levels(2, false), 3);
  EXPECT_EQ(pact_levels(2, true), 1);
  EXPECT_EQ(pact_levels(4, false), 15);
  EXPECT_EQ(pact_levels(4, true), 7);
  EXPECT_EQ(pact_levels(8, false), 255);
  EXPECT_EQ(pact_levels(8, true), 127);
  EXPECT_EQ(pact_levels(16, false), 65535);
  EXPECT_EQ(pact_levels(16, true), 32767);
}

TEST(Pact, InRangeBoundaries) {
  const float a = 0.75f;
  const float below_a = std::nextafter(a, 0.0f), above_a = std::nextafter(a, 1.0f);
  // unsigned: 0 <= x < alpha
  EXPECT_TRUE(pact_in_range(0.0f, a, false));
  EXPECT_TRUE(pact_in_range(-0.0f, a, false));
  EXPECT_FALSE(pact_in_range(-1e-30f, a, false));
  EXPECT_TRUE(pact_in_range(below_a, a, false));
  EXPECT_FALSE(pact_in_range(a, a, false));
  EXPECT_FALSE(pact_in_range(above_a, a, false));
  // signed: -alpha < x < alpha
  EXPECT_TRUE(pact_in_range(-0.5f, a, true));
  EXPECT_TRUE(pact_in_range(-below_a, a, true));
  EXPECT_FALSE(pact_in_range(-a, a, true));
  EXPECT_FALSE(pact_in_range(a, a, true));
  EXPECT_FALSE(pact_in_range(kNaN, a, true));
  EXPECT_FALSE(pact_in_range(kNaN, a, false));
}

TEST(Pact, AlphaTerm) {
  const float a = 0.75f;
  for (const bool is_signed : {false, true}) {
    EXPECT_FLOAT_BITS_EQ(pact_alpha_term(a, 3.0f, a, is_signed), 3.0f);
    EXPECT_FLOAT_BITS_EQ(pact_alpha_term(5.0f, 3.0f, a, is_signed), 3.0f);
    EXPECT_FLOAT_BITS_EQ(pact_alpha_term(kInf, 3.0f, a, is_signed), 3.0f);
    EXPECT_FLOAT_BITS_EQ(pact_alpha_term(std::nextafter(a, 0.0f), 3.0f, a, is_signed), 0.0f);
    EXPECT_FLOAT_BITS_EQ(pact_alpha_term(0.0f, 3.0f, a, is_signed), 0.0f);
    EXPECT_FLOAT_BITS_EQ(pact_alpha_term(kNaN, 3.0f, a, is_signed), 0.0f);
  }
  // Below -alpha: -g when signed, nothing when unsigned (the clip at 0 does not depend on alpha).
  EXPECT_FLOAT_BITS_EQ(pact_alpha_term(-a, 3.0f, a, true), -3.0f);
  EXPECT_FLOAT_BITS_EQ(pact_alpha_term(-5.0f, 3.0f, a, true), -3.0f);
  EXPECT_FLOAT_BITS_EQ(pact_alpha_term(-a, 3.0f, a, false), 0.0f);
  EXPECT_FLOAT_BITS_EQ(pact_alpha_term(std::nextafter(-a, 0.0f), 3.0f, a, true), 0.0f);
}

// ---- reductions over the elements sharing a qparam ----------------------------------------

TEST(QParamRuns, Granularities) {
  const auto eq = [](QParamRuns r, int64_t o, int64_t c, int64_t i) {
    return r.outer == o && r.channels == c && r.inner == i;
  };
  EXPECT_TRUE(eq(qparam_runs({24, 1}, 24), 1, 1, 24));        // per-tensor
  EXPECT_TRUE(eq(qparam_runs({4, 3}, 24), 2, 3, 4));          // contiguous [2, 3, 4], axis 1
  EXPECT_TRUE(eq(qparam_runs({12, 2}, 24), 1, 2, 12));        // axis 0
  EXPECT_TRUE(eq(qparam_runs({1, 4}, 24), 6, 4, 1));          // last axis
  EXPECT_TRUE(eq(qparam_runs({1, 3}, 2 * 3 * 2 * 2), 8, 3, 1));  // channels-last [2, 3, 2, 2], axis 1
  EXPECT_TRUE(eq(qparam_runs({4, 12}, 48), 1, 12, 4));        // per-group, group_size 4
}

// Every element lies in exactly one tile, inside the tile's channel range; each (partial row,
// channel) belongs to exactly one tile; row segments stay within their bounds.
void check_tiling(QParamRuns runs, int64_t segment, int64_t long_run, int64_t min_run) {
  const ReductionTiling t = make_reduction_tiling(runs, segment, long_run, min_run);
  const int64_t numel = runs.outer * runs.channels * runs.inner;
  const QParamIndex index{runs.inner, runs.channels};
  std::vector<int> covered(numel, 0);
  std::vector<int> owned(t.partial_rows() * runs.channels, 0);
  for (int64_t k = 0; k < t.num_tiles(); ++k) {
    const ReductionTile tile = t.tile(k);
    const int64_t length = (tile.c1 - tile.c0) * (tile.i1 - tile.i0);
    if (tile.c1 - tile.c0 > 1) {
      ASSERT_EQ(tile.i1 - tile.i0, runs.inner);  // several channels only with whole runs
      ASSERT_LE(length, segment);
    } else {
      ASSERT_LE(length, std::max(segment, long_run));
    }
    for (int64_t c = tile.c0; c < tile.c1; ++c) owned[tile.partial_row * runs.channels + c] += 1;
    for (int64_t o = tile.o0; o < tile.o1; ++o) {
      const int64_t p0 = (o * runs.channels + tile.c0) * runs.inner + tile.i0;
      for (int64_t j = 0; j < length; ++j) {
        const int64_t p = p0 + j;
        covered[p] += 1;
        const int64_t c = index(p);
        ASSERT_TRUE(c >= tile.c0 && c < tile.c1) << "p " << p;
      }
    }
  }
  for (int64_t p = 0; p < numel; ++p) ASSERT_EQ(covered[p], 1) << "p " << p;
  for (const int n : owned) ASSERT_EQ(n, 1);
  // Few partial sums: at most 2 numel / min(min_run, segment, long_run) + 2 channels.
  EXPECT_LE(t.partial_rows() * runs.channels,
            2 * numel / std::min(min_run, std::min(segment, long_run)) + 2 * runs.channels);
}

TEST(ReductionTiling, CoversEveryElementOnce) {
  for (const QParamRuns runs : {QParamRuns{1, 1, 5000}, QParamRuns{1, 1, 512}, QParamRuns{1, 1, 7},
                                QParamRuns{3, 40, 561}, QParamRuns{1400, 33, 1}, QParamRuns{5, 8, 300},
                                QParamRuns{1, 700, 3}, QParamRuns{1, 2400, 1}, QParamRuns{7, 5, 129},
                                QParamRuns{2, 3, 4096}, QParamRuns{9, 1000, 2}}) {
    check_tiling(runs, 512, 512, 512);    // the CPU kernels' constants
    check_tiling(runs, 256, 4096, 512);   // the CUDA kernels' constants
    check_tiling(runs, 8, 16, 3);         // small constants: many partial tiles
  }
}

TEST(ReductionTiling, ShapesOfTheTwoModes) {
  // Long runs: one channel per tile, chunks of long_run.
  ReductionTiling t = make_reduction_tiling({3, 40, 1500}, 512, 512, 512);
  EXPECT_EQ(t.run, 512);
  EXPECT_EQ(t.chunks(), 3);
  EXPECT_EQ(t.tile_channels, 1);
  EXPECT_EQ(t.tile_rows, 1);
  EXPECT_EQ(t.partial_rows(), 9);
  // A run that is one chunk: several rows per tile.
  t = make_reduction_tiling({10, 4, 1000}, 256, 4096, 512);
  EXPECT_EQ(t.run, 1000);
  EXPECT_EQ(t.tile_rows, 5);
  EXPECT_EQ(t.partial_rows(), 2);
  // Short runs (channels-last): whole runs of several channels, rows for min_run elements.
  t = make_reduction_tiling({1000, 64, 1}, 512, 512, 512);
  EXPECT_EQ(t.tile_channels, 64);
  EXPECT_EQ(t.tile_rows, 512);
  EXPECT_EQ(t.partial_rows(), 2);
  t = make_reduction_tiling({1, 5000, 4}, 256, 4096, 512);
  EXPECT_EQ(t.tile_channels, 64);
  EXPECT_EQ(t.tile_rows, 1);
  EXPECT_EQ(t.partial_rows(), 1);
}

TEST(ObservedRange, NonFiniteReadAsZero) {
  EXPECT_EQ(finite_or_zero(1.5f), 1.5f);
  EXPECT_EQ(finite_or_zero(-3.0f), -3.0f);
  EXPECT_EQ(finite_or_zero(std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(finite_or_zero(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(finite_or_zero(std::numeric_limits<float>::quiet_NaN()), 0.0f);
}

TEST(ObservedRange, RunningUpdate) {
  const float inf = std::numeric_limits<float>::infinity();
  Range r = update_running_range({inf, -inf}, {-1.0f, 2.0f}, 0.25f);  // unset: taken as is
  EXPECT_EQ(r.lo, -1.0f);
  EXPECT_EQ(r.hi, 2.0f);
  r = update_running_range(r, {-3.0f, 6.0f}, 0.25f);  // m + c (b - m)
  EXPECT_EQ(r.lo, -1.5f);
  EXPECT_EQ(r.hi, 3.0f);
  r = update_running_range(r, {-1.0f, 7.0f}, -1.0f);  // running min / max
  EXPECT_EQ(r.lo, -1.5f);
  EXPECT_EQ(r.hi, 7.0f);
}

TEST(ObservedRange, QParamFormulas) {
  RangeQParams q = qparams_from_range(-1.0f, 2.0f, -128, 127, true);
  EXPECT_EQ(q.scale, 2.0f / 127.0f);
  EXPECT_EQ(q.zero_point, 0);
  q = qparams_from_range(0.5f, 4.0f, 0, 255, true);  // widened to [0, 4]; unsigned symmetric: z = 128
  EXPECT_EQ(q.scale, 4.0f / 127.0f);
  EXPECT_EQ(q.zero_point, 128);
  q = qparams_from_range(-1.0f, 2.0f, 0, 255, false);
  EXPECT_EQ(q.scale, 3.0f / 255.0f);
  EXPECT_EQ(q.zero_point, 85);
  q = qparams_from_range(-3.0f, -1.0f, 0, 255, false);  // widened to [-3, 0]
  EXPECT_EQ(q.zero_point, 255);
  q = qparams_from_range(0.0f, 0.0f, -8, 7, false);  // zero range: eps, never 0 or NaN
  EXPECT_EQ(q.scale, kObserverEps);
  EXPECT_EQ(q.zero_point, -8);
}

TEST(AddInt8, EachOperandOnItsGridThenOneFloatSum) {
  const TensorGrid gx{0.25f, 4.0f, 10.0f, 0.0f, 255.0f};    // uint8, zero point 10
  const TensorGrid gy{0.5f, 2.0f, 0.0f, -128.0f, 127.0f};   // int8
  // 1.1 -> rint(4.4) = 4 -> 1.0; -0.74 -> rint(-1.48) = -1 -> -0.5.
  EXPECT_FLOAT_BITS_EQ(add_int8_value(1.1f, gx, -0.74f, gy, false), 0.5f);
  // Ties round to even: 0.375 * 4 = 1.5 -> 2 -> 0.5; 0.25 * 2 = 0.5 -> 0 -> 0.
  EXPECT_FLOAT_BITS_EQ(add_int8_value(0.375f, gx, 0.25f, gy, false), 0.5f);
  // Clamped: x below (0 - 10) * 0.25 = -2.5 and y above 127 * 0.5 = 63.5.
  EXPECT_FLOAT_BITS_EQ(add_int8_value(-100.0f, gx, 1e30f, gy, false), -2.5f + 63.5f);
  EXPECT_FLOAT_BITS_EQ(add_int8_value(-kInf, gx, -kInf, gy, false), -2.5f - 64.0f);
  // ReLU: negative sums become +0, positive ones pass, NaN stays NaN (as torch.relu).
  EXPECT_FLOAT_BITS_EQ(add_int8_value(-1.0f, gx, -1.0f, gy, true), 0.0f);
  EXPECT_FLOAT_BITS_EQ(add_int8_value(1.0f, gx, 1.0f, gy, true), 2.0f);
  EXPECT_TRUE(std::isnan(add_int8_value(kNaN, gx, 1.0f, gy, true)));
  EXPECT_TRUE(std::isnan(add_int8_value(1.0f, gx, kNaN, gy, false)));
}

TEST(Constants, QuantRange) {
  EXPECT_EQ(kQuantRangeLowest, std::numeric_limits<int16_t>::lowest());
  EXPECT_EQ(kQuantRangeHighest, std::numeric_limits<int16_t>::max());
}

}  // namespace
