// Affine quantization math shared by the CPU and CUDA kernels.
//
// Torch-free on purpose: this header depends on nothing but the C++ standard library, so the
// same inline functions compile into the host kernels, the device kernels and the GoogleTest
// unit tests, and a later stable-ABI build can reuse it unchanged.
//
// Definitions (all arithmetic in float32):
//   inv_scale = 1.0f / scale                      (one IEEE division, rounded to nearest)
//   q_real    = rint(x * inv_scale) + zero_point  (rint: round half to even)
//   q         = clamp(q_real, quant_min, quant_max)
//   y         = (q - zero_point) * scale
// x * inv_scale (not x / scale) is what torch.fake_quantize_* computes; keeping it makes the
// results bit-identical to torch's ops.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define QATX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QATX_HOST_DEVICE inline
#endif

namespace qatx {
namespace math {

// Largest admissible range of quant_min / quant_max for the fake-quantize ops (int16).
constexpr int64_t kQuantRangeLowest = -32768;
constexpr int64_t kQuantRangeHighest = 32767;

// Smallest scale whose reciprocal is finite in float32 (FLT_MIN, 2^-126).
constexpr float kMinScale = std::numeric_limits<float>::min();

// Round half to even. rint follows the current rounding mode, which is round-to-nearest-even
// unless the program changed it; compilers lower it to one roundps / cvt.rni instruction, so
// the CPU loops vectorize.
QATX_HOST_DEVICE float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return __builtin_rintf(v);
#endif
}

// Clamp that propagates NaN (both comparisons are false for NaN). std::fmin/fmax would turn
// NaN into a bound and so hide it; they also stop GCC from vectorizing.
QATX_HOST_DEVICE float clamp_nan_propagating(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Unclamped quantized value rint(x * inv_scale) + zero_point.
QATX_HOST_DEVICE float quantize_unclamped(float x, float inv_scale, float zero_point) {
  return round_half_even(x * inv_scale) + zero_point;
}

// True when the unclamped quantized value lies in [quant_min, quant_max]: the
// straight-through estimator passes the gradient exactly there. False for NaN.
QATX_HOST_DEVICE bool in_quant_range(float q_unclamped, float quant_min, float quant_max) {
  return (q_unclamped >= quant_min) & (q_unclamped <= quant_max);
}

// q = clamp(rint(x * inv_scale) + zero_point, quant_min, quant_max); NaN stays NaN,
// +/-Inf saturate to quant_max / quant_min.
QATX_HOST_DEVICE float quantize_value(float x, float inv_scale, float zero_point, float quant_min,
                                      float quant_max) {
  return clamp_nan_propagating(quantize_unclamped(x, inv_scale, zero_point), quant_min, quant_max);
}

// y = (q - zero_point) * scale.
QATX_HOST_DEVICE float dequantize_value(float q, float scale, float zero_point) {
  return (q - zero_point) * scale;
}

// dequantize(quantize(x)), returning the STE mask bit through in_range.
QATX_HOST_DEVICE float fake_quantize_value(float x, float scale, float inv_scale, float zero_point,
                                           float quant_min, float quant_max, bool& in_range) {
  const float q_unclamped = quantize_unclamped(x, inv_scale, zero_point);
  in_range = in_quant_range(q_unclamped, quant_min, quant_max);
  return dequantize_value(clamp_nan_propagating(q_unclamped, quant_min, quant_max), scale,
                          zero_point);
}

// A scale is valid when it is finite and 1/scale is finite: [2^-126, FLT_MAX]. NaN fails.
QATX_HOST_DEVICE bool is_valid_scale(float scale) {
  return scale >= kMinScale && scale <= std::numeric_limits<float>::max();
}

// Float-to-integer conversion of an already clamped, integer-valued q. Values beyond the
// integer type (only possible for int32, whose bounds float32 cannot represent exactly)
// saturate instead of being undefined behaviour.
template <typename Int>
QATX_HOST_DEVICE Int saturate_cast(float q) {
  constexpr float lo = static_cast<float>(std::numeric_limits<Int>::lowest());
  constexpr float hi = static_cast<float>(std::numeric_limits<Int>::max());
  if (q <= lo) return std::numeric_limits<Int>::lowest();
  if (q >= hi) return std::numeric_limits<Int>::max();
  return static_cast<Int>(q);
}

// Packs eight 0/1 flags (flag j -> bit j) into one byte: the STE mask keeps one bit per
// element instead of one byte. The multiply gathers bit 0 of each byte into the top byte.
QATX_HOST_DEVICE uint8_t pack_bits8(const uint8_t flags[8]) {
  uint64_t word = 0;
#if defined(__CUDA_ARCH__)
  for (int j = 0; j < 8; ++j) word |= static_cast<uint64_t>(flags[j] & 1u) << (8 * j);
#else
  std::memcpy(&word, flags, 8);
  word &= 0x0101010101010101ull;
#endif
  return static_cast<uint8_t>((word * 0x0102040810204080ull) >> 56);
}

// Bit j of a packed mask byte.
QATX_HOST_DEVICE bool mask_bit(uint8_t byte, int j) { return (byte >> j) & 1u; }

// Index of the scale / zero point for the element at memory position p of a dense tensor:
// (p / inner) % channels. Per-tensor: channels = 1. Per-channel along an axis: inner is that
// axis's stride and channels its size. Per-group over the last dimension of a contiguous
// tensor: inner = group_size and channels = numel / group_size.
struct QParamIndex {
  int64_t inner;
  int64_t channels;
  QATX_HOST_DEVICE int64_t operator()(int64_t p) const { return (p / inner) % channels; }
};

}  // namespace math
}  // namespace qatx
