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

// c ? a : b without a branch. GCC (with its default -ftrapping-math) may not speculate a
// floating-point operation, so `c ? f(x) : g(x)` whose operands it sinks into the two branches
// stays a branch, and the whole loop stays scalar; selecting the bit patterns keeps both operands
// computed unconditionally and the loop vectorizable (a blend). Device code has no such issue.
QATX_HOST_DEVICE float select(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  uint32_t ai, bi;
  std::memcpy(&ai, &a, sizeof ai);
  std::memcpy(&bi, &b, sizeof bi);
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  const uint32_t r = (ai & mask) | (bi & ~mask);
  float out;
  std::memcpy(&out, &r, sizeof out);
  return out;
#endif
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

// The stored integer of a clamped q: saturate_cast, then clamped again to [quant_min, quant_max]
// in the integer type. For int32 ranges beyond 2^24 the float32 bounds used by the clamp may lie
// outside the integer bounds (float(2^30 - 1) == 2^30), so only this second clamp keeps q inside
// the requested range. NaN (reported separately as an error) gives quant_min, never an undefined
// float-to-integer conversion.
template <typename Int>
QATX_HOST_DEVICE Int to_quantized_int(float q, Int quant_min, Int quant_max) {
  const Int v = q == q ? saturate_cast<Int>(q) : quant_min;
  return v < quant_min ? quant_min : (v > quant_max ? quant_max : v);
}

// The per-tensor grid of one operand of the INT8 add: scale, 1/scale, zero point and range.
struct TensorGrid {
  float scale, inv_scale, zero_point, quant_min, quant_max;
};

// One element of the INT8 add: the fake-quantize forward of x on gx plus that of y on gy,
// summed in float32 (one rounding), then max(sum, 0) when relu (NaN stays NaN, as torch.relu).
// Branch-free so that the CPU loop vectorizes.
QATX_HOST_DEVICE float add_int8_value(float x, const TensorGrid& gx, float y, const TensorGrid& gy, bool relu) {
  const float a = dequantize_value(quantize_value(x, gx.inv_scale, gx.zero_point, gx.quant_min, gx.quant_max),
                                   gx.scale, gx.zero_point);
  const float b = dequantize_value(quantize_value(y, gy.inv_scale, gy.zero_point, gy.quant_min, gy.quant_max),
                                   gy.scale, gy.zero_point);
  const float sum = a + b;
  return select(relu & (sum < 0.0f), 0.0f, sum);
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

// ---------------------------------------------------------------------------------------------
// Observed ranges (the fused observe + fake-quantize ops): the running range update and the
// qparams of a range, the same formulas as qatx.observers (MinMaxObserver, calculate_qparams),
// written so that the results are bit-identical to those Python functions on each device.
// ---------------------------------------------------------------------------------------------

// Lower bound of a computed scale: float32 machine epsilon (2^-23), calculate_qparams's default.
constexpr float kObserverEps = 1.1920928955078125e-07f;

// Observers ignore non-finite values by reading them as 0, which every range contains
// (v - v is 0 exactly for finite v, NaN for +/-Inf and NaN).
QATX_HOST_DEVICE float finite_or_zero(float v) { return select((v - v) == 0.0f, v, 0.0f); }

// x / n for a count n, as ATen divides a float tensor by a Python number: a true division on the
// CPU, and a product with the float32 reciprocal on CUDA (ATen's CUDA division by a host scalar
// multiplies by 1/n). The two can differ in the last bit; following each keeps qparams
// bit-identical to calculate_qparams on either device.
QATX_HOST_DEVICE float divide_by_count(float x, float n) {
#if defined(__CUDA_ARCH__)
  return x * (1.0f / n);
#else
  return x / n;
#endif
}

QATX_HOST_DEVICE float fused_multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

struct Range {
  float lo, hi;
};

// One running-range update with a batch range. A running range with lo > hi (the +Inf / -Inf an
// observer starts from) is unset and takes the batch range as is. Else, for c > 0, the moving
// average m + c (b - m) as one fused multiply-add (what ATen's add(alpha=c) computes on the CPU and
// on CUDA); for c < 0, the running minimum and maximum.
QATX_HOST_DEVICE Range update_running_range(Range run, Range batch, float c) {
  if (!(run.lo <= run.hi)) return batch;
  if (c > 0.0f) {
    return {fused_multiply_add(c, batch.lo - run.lo, run.lo), fused_multiply_add(c, batch.hi - run.hi, run.hi)};
  }
  return {batch.lo < run.lo ? batch.lo : run.lo, batch.hi > run.hi ? batch.hi : run.hi};
}

struct RangeQParams {
  float scale;
  int32_t zero_point;
};

// qparams of the range [lo, hi], first widened to contain 0 (float32 throughout):
//   symmetric, quant_min < 0:   s = max(-lo, hi) / min(-quant_min, quant_max),  z = 0
//   symmetric, quant_min >= 0:  z = (quant_min + quant_max + 1) / 2 (floor),
//                               s = max(-lo, hi) / min(z - quant_min, quant_max - z)
//   asymmetric:                 s = (hi - lo) / (quant_max - quant_min),
//                               z = clamp(quant_min - rint(lo / s), quant_min, quant_max)
// s is then at least kObserverEps (a zero range gives eps, never 0 or NaN); rint rounds half to
// even. In the symmetric case s is clamped before z is used; in the asymmetric case the clamped
// s divides lo, as in calculate_qparams.
QATX_HOST_DEVICE RangeQParams qparams_from_range(float lo, float hi, int64_t quant_min, int64_t quant_max,
                                                 bool symmetric) {
  lo = lo > 0.0f ? 0.0f : lo;
  hi = hi < 0.0f ? 0.0f : hi;
  if (symmetric) {
    const float amax = -lo > hi ? -lo : hi;
    int64_t zero = 0, steps;
    if (quant_min < 0) {
      steps = -quant_min < quant_max ? -quant_min : quant_max;
    } else {
      zero = (quant_min + quant_max + 1) / 2;
      steps = zero - quant_min < quant_max - zero ? zero - quant_min : quant_max - zero;
    }
    const float s = divide_by_count(amax, static_cast<float>(steps));
    return {s < kObserverEps ? kObserverEps : s, static_cast<int32_t>(zero)};
  }
  float s = divide_by_count(hi - lo, static_cast<float>(quant_max - quant_min));
  s = s < kObserverEps ? kObserverEps : s;
  const float z = static_cast<float>(quant_min) - round_half_even(lo / s);
  const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
  return {s, static_cast<int32_t>(z < qmin ? qmin : (z > qmax ? qmax : z))};
}

// ---------------------------------------------------------------------------------------------
// Learnable quantizers: LSQ / LSQ+ (learned scale and zero point) and PACT (learned clip value).
// ---------------------------------------------------------------------------------------------

// One element's share of the LSQ / LSQ+ backward, for the incoming gradient g:
//   in_range    grad_input = g here (quant_min <= q_u <= quant_max), 0 elsewhere
//   scale       g * (rint(v) - v) inside, g * (quant_min - z) below, g * (quant_max - z) above
//   zero_point  0 inside, -g * s outside (LSQ+)
// with v = x * inv_scale and q_u = rint(v) + z, as in the forward (z is the learnable zero point
// already rounded to an integer in [quant_min, quant_max]). The sums of these terms over
// the elements sharing a scale, times grad_factor, are grad_scale and grad_zero_point.
// Each term is one subtraction and one product in float32. A NaN input is outside the range;
// its scale term is NaN (clamp keeps NaN).
struct LsqGradTerms {
  bool in_range;
  float scale;
  float zero_point;
};

QATX_HOST_DEVICE LsqGradTerms lsq_grad_terms(float x, float g, float scale, float inv_scale, float zero_point,
                                             float quant_min, float quant_max) {
  const float v = x * inv_scale;
  const float r = round_half_even(v);
  const float q_unclamped = r + zero_point;
  const bool in_range = in_quant_range(q_unclamped, quant_min, quant_max);
  const float d_scale_inside = r - v;
  const float d_scale_outside = clamp_nan_propagating(q_unclamped, quant_min, quant_max) - zero_point;
  return {in_range, g * select(in_range, d_scale_inside, d_scale_outside), select(in_range, 0.0f, -(g * scale))};
}

// PACT (Choi et al. 2018) quantizes clip(x, lo, alpha), lo = -alpha (signed) or 0 (unsigned),
// with scale alpha / levels, zero point 0 and range [-levels, levels] or [0, levels].
// levels = 2^(bits-1) - 1 (signed, symmetric) or 2^bits - 1 (unsigned).
QATX_HOST_DEVICE constexpr int64_t pact_levels(int64_t bits, bool is_signed) {
  return (int64_t{1} << (is_signed ? bits - 1 : bits)) - 1;
}

// The gradient passes to the input strictly inside the clip range, -alpha < x < alpha (signed)
// or 0 <= x < alpha (unsigned): the clip's derivative is 1 there (the rounding is a straight
// through estimator) and 0 where the clip saturates. NaN is outside.
QATX_HOST_DEVICE bool pact_in_range(float x, float alpha, bool is_signed) {
  const bool above_lower = is_signed ? x > -alpha : x >= 0.0f;
  return above_lower & (x < alpha);
}

// One element's share of grad_alpha: g where x >= alpha, -g where x <= -alpha (signed), else 0.
// The clipped value alpha (or -alpha) is the element's output there; the dependence of the
// scale on alpha is ignored, as in the paper.
QATX_HOST_DEVICE float pact_alpha_term(float x, float g, float alpha, bool is_signed) {
  return select(x >= alpha, g, select(is_signed & (x <= -alpha), -g, 0.0f));
}

// ---------------------------------------------------------------------------------------------
// Deterministic reductions over the elements that share a qparam (the learnable backward passes).
// ---------------------------------------------------------------------------------------------

// A dense tensor in memory order seen as [outer, channels, inner], so that the element at
// memory position p = (o * channels + c) * inner + i uses qparam c (QParamIndex): per-tensor
// [1, 1, numel], per-channel [.., size(axis), stride(axis)], per-group [1, groups, group_size].
struct QParamRuns {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

QATX_HOST_DEVICE QParamRuns qparam_runs(QParamIndex index, int64_t numel) {
  if (index.channels <= 1) return {1, 1, numel};
  return {numel / (index.inner * index.channels), index.channels, index.inner};
}

// The part of [outer, channels, inner] one tile covers: rows [o0, o1), channels [c0, c1),
// inner positions [i0, i1). Row o of the tile is the contiguous memory segment starting at
// (o * channels + c0) * inner + i0 of length (c1 - c0) * (i1 - i0). The tile writes the partial
// sums of its channels at row partial_row.
struct ReductionTile {
  int64_t o0, o1, c0, c1, i0, i1;
  int64_t partial_row;
};

// How a backward kernel splits [outer, channels, inner] into tiles. Each tile reduces its
// elements in a fixed order into one partial sum per channel, and each (partial_row, channel)
// belongs to exactly one tile; the final sum runs over the partial rows in order. So the result
// depends only on the shape and the tiling constants, never on how many threads (or thread
// blocks) run the tiles. There are at most 2 numel / min(segment, long_run, min_run) + 2 channels
// partial sums.
struct ReductionTiling {
  int64_t outer, channels, inner;
  int64_t run;            // inner positions per tile: all of them, or chunks of a long run
  int64_t tile_channels;  // channels per tile; more than 1 only when run == inner
  int64_t tile_rows;      // outer rows per tile

  QATX_HOST_DEVICE int64_t chunks() const { return (inner + run - 1) / run; }
  QATX_HOST_DEVICE int64_t row_tiles() const { return (outer + tile_rows - 1) / tile_rows; }
  QATX_HOST_DEVICE int64_t channel_tiles() const { return (channels + tile_channels - 1) / tile_channels; }
  // Partial sums per channel; the partials form a [partial_rows(), channels] array.
  QATX_HOST_DEVICE int64_t partial_rows() const { return row_tiles() * chunks(); }
  QATX_HOST_DEVICE int64_t num_tiles() const { return row_tiles() * channel_tiles() * chunks(); }

  // Tiles are numbered in memory order (row tile, then channel tile, then chunk).
  QATX_HOST_DEVICE ReductionTile tile(int64_t t) const {
    const int64_t chunk = t % chunks();
    const int64_t rest = t / chunks();
    const int64_t channel_tile = rest % channel_tiles();
    const int64_t row_tile = rest / channel_tiles();
    ReductionTile r;
    r.o0 = row_tile * tile_rows;
    r.o1 = r.o0 + tile_rows < outer ? r.o0 + tile_rows : outer;
    r.c0 = channel_tile * tile_channels;
    r.c1 = r.c0 + tile_channels < channels ? r.c0 + tile_channels : channels;
    r.i0 = chunk * run;
    r.i1 = r.i0 + run < inner ? r.i0 + run : inner;
    r.partial_row = row_tile * chunks() + chunk;
    return r;
  }
};

// segment: longest row segment a tile may have when it spans several channels (whole inner
// runs of inner < segment elements); long_run: the chunk length of inner runs of at least
// segment elements (one channel per tile; a tile takes several rows when one chunk is the whole
// run); min_run: a tile over short runs takes enough rows for at least min_run elements per
// channel, which bounds the number of partial sums.
QATX_HOST_DEVICE ReductionTiling make_reduction_tiling(QParamRuns r, int64_t segment, int64_t long_run,
                                                       int64_t min_run) {
  ReductionTiling t{r.outer, r.channels, r.inner, r.inner, 1, 1};
  int64_t rows = 1;
  if (r.inner >= segment) {
    if (r.inner > long_run) t.run = long_run;
    else rows = (long_run + r.inner - 1) / r.inner;
  } else {
    const int64_t fit = segment / r.inner;
    t.tile_channels = fit < r.channels ? fit : r.channels;
    rows = (min_run + r.inner - 1) / r.inner;
  }
  t.tile_rows = rows < r.outer ? rows : (r.outer > 0 ? r.outer : 1);
  return t;
}

}  // namespace math
}  // namespace qatx
