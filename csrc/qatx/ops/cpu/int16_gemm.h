// Exact integer GEMM for the INT8 ops on AVX2 CPUs: y = epilogue(A * B) with A and B holding
// centered integers (q - z, at most 9 bits) as int16 and int32 accumulation (vpmaddwd). Unlike
// u8*s8 kernels (vpmaddubsw) no intermediate saturates, so the sum is exact for any 8-bit
// quantization whenever K * max|a| * max|b| < 2^31, and the float64 epilogue makes the result
// bit-identical to the reference route (int8_args.cpp).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace qatx {
namespace ops {
namespace int16_gemm {

// True on a CPU with AVX2 (the only instruction set the kernels need beyond x86-64).
bool supported();

// B as panels of 16 columns: panel p, reduction pair kk holds, for its 16 columns j, the
// neighbouring pair (b[2kk, j], b[2kk + 1, j]); K is padded with zeros to kp (even), the last
// panel's missing columns are zero. When every b fits int8 (weights without a zero point), a
// copy of the panels as int8 (`panels8`, same layout, widened as loaded) serves the one-row
// tiles: half the bytes to stream, which is what bounds a batch-1 linear layer. Six-row tiles
// are bound by the multiplies instead, and the widening would slow them (by 25-30% measured).
struct PackedB {
  std::vector<int16_t> panels;
  std::vector<int8_t> panels8;  // empty, or the panels as int8 (gemm's one-row tiles)
  int64_t n = 0, k = 0, kp = 0;
  int32_t max_abs = 0;  // largest |b|
};

// Packs rows[c, k] - zero_points[c] (rows: n x k int8, row-major) as B[k, c].
PackedB pack(const int8_t* rows, int64_t n, int64_t k, const int32_t* zero_points);

// Row r of A (centered int16, b.kp elements) is `segments` equal runs of b.kp / segments
// elements (an even count): locate(r, starts) sets starts[s] to the first element of run s. A
// convolution's row is its window, one run per kernel tap (that pixel's channels, or zeros in the
// padding), so no im2col copy is made; a linear layer's row is one run.
using LocateRow = std::function<void(int64_t row, const int16_t** starts)>;

// y[r, c] = float32((double(acc[r, c]) + bias[c]) * scale[c] + shift[c]), then max(y, 0) when
// relu: each operation one float64 rounding, as on the reference route. The arrays have b.n
// entries; bias and shift may be null (no term).
struct Epilogue {
  const double* scale;
  const double* bias;
  const double* shift;
  bool relu;
};

// Where the epilogue writes y: float32, or y's integer on a grid, math::quantize_value's
// clamp(rint(y * inv_scale) + zero_point, quant_min, quant_max) as uint8 / int8 (what quantizing
// the float32 output would give). `ld`: elements between rows.
struct Output {
  enum class Type { Float, UInt8, Int8 };
  void* data;
  int64_t ld;
  Type type = Type::Float;
  float inv_scale = 1.0f, zero_point = 0.0f, quant_min = 0.0f, quant_max = 0.0f;
  // The same output from element (row, col) on.
  Output at(int64_t row, int64_t col) const;
};

// y is m x b.n.
void gemm(int64_t m, const PackedB& b, int64_t segments, const LocateRow& locate, const Epilogue& epilogue,
          const Output& y);
// gemm() over rows of one run each, row r at a + r * lda (no call per row to locate it).
void gemm(int64_t m, const PackedB& b, const int16_t* a, int64_t lda, const Epilogue& epilogue, const Output& y);

// Depthwise convolution (one filter per channel): y[r, c] = epilogue(sum_t a_t[c] * w[c, t]) for
// b.n channels and b.k taps, where locate(r, starts) sets starts[t] to tap t's pixel (b.n int16
// channels; reading up to 15 int16 past the last pixel's channels must stay inside the buffer:
// those lanes meet zero weights). Exact in int32 under the same bound as gemm.
PackedB pack_depthwise(const int8_t* weight, int64_t channels, int64_t taps, const int32_t* zero_points);
void depthwise(int64_t m, const PackedB& b, const LocateRow& locate, const Epilogue& epilogue, const Output& y);

// Winograd's F(2x2, 3x3) (Lavin & Gray) for a 3x3 convolution of stride 1, one group and no
// dilation: each 2x2 block of outputs comes from its 4x4 input patch d as
// Y = A^T [(G g G^T) (.) (B^T d B)] A, 16 products per channel pair instead of 36, the
// elementwise products one GEMM over the channels per transform position. All in integers: B^T
// and A^T hold 0 and +-1 and G's halves are doubled, so Y = 4 y; |B^T d B| <= 4 max|a| and
// |G g G^T| <= 9 max|w| fit int16, and vpmaddwd's pair sums of their products are exact. Every
// other step is an int32 addition, exact modulo 2^32, so Y is exact whenever it fits int32:
// whenever 36 * k * max|a| * weight_max_abs < 2^31 (k: input channels; winograd_exact).
struct PackedWinograd {
  std::vector<PackedB> positions;  // 16 B's, position (xi, nu) at 4 xi + nu: (G g G^T)[xi, nu]
  int32_t weight_max_abs = 0;      // largest |w - z| of the untransformed weights
};
// rows: n x 9 x cp int8 (taps row-major, each tap's cp channels; cp even).
PackedWinograd pack_winograd(const int8_t* rows, int64_t n, int64_t cp, const int32_t* zero_points);
bool winograd_exact(const PackedWinograd& b, int32_t max_abs_input);
// x: `batch` images of in_h x in_w pixels of b's cp centered int16 channels, channels last, the
// convolution's zero padding included; y: the (in_h - 2) x (in_w - 2) output pixels of each
// image as rows of b.n channels, through the epilogue.
void winograd(int64_t batch, const int16_t* x, int64_t in_h, int64_t in_w, const PackedWinograd& b,
              const Epilogue& epilogue, const Output& y);

// The fake-quantize forward's integer, centered: dst[i] = clamp(rint(x[i] * (1/s)) + z,
// quant_min, quant_max) - z, an int16 in [quant_min - z, quant_max - z]. Serial; returns false
// when x holds a NaN (which has no integer; its dst is then unspecified).
struct Quantizer {
  Quantizer(float scale, int32_t zero_point, int64_t quant_min, int64_t quant_max);
  bool operator()(const float* x, int16_t* dst, int64_t n) const;
  float inv_scale, zero_point, quant_min, quant_max;
};

// An integer input's centered values: dst[i] = clamp(q[i], quant_min, quant_max) - zero_point,
// the range inside the codes' type (as the ops check).
struct Centerer {
  int32_t zero_point, quant_min, quant_max;
  void operator()(const uint8_t* q, int16_t* dst, int64_t n) const;
  void operator()(const int8_t* q, int16_t* dst, int64_t n) const;
};

// depthwise() over integer codes as they are (Code: uint8_t or int8_t; b.n a multiple of 16, so
// no read passes a pixel's channels): y[r, c] = epilogue(sum_t q_t[c] * w[c, t]), the codes
// widened to int16 as they are read (no int16 copy of the input). locate(r, starts) sets
// starts[t] to tap t's pixel. The caller keeps the codes inside the quant range, folds the zero
// point into the epilogue's bias (-z * sum_t w[c, t]), points taps in the padding at a pixel of
// zero-point codes, and checks the int32 bound for |q| (not |q - z|).
template <typename Code>
void depthwise(int64_t m, const PackedB& b, const std::function<void(int64_t, const Code**)>& locate,
               const Epilogue& epilogue, const Output& y);

// winograd() straight from integer codes (Code: uint8_t or int8_t): q holds `batch` images of
// in_h x in_w pixels of b's cp channels (channels last, dense), centered by `codes` as they are
// read, inside zero padding that is not stored (pad_h rows above and below, pad_w columns on
// each side); y has the (in_h + 2 pad_h - 2) x (in_w + 2 pad_w - 2) output pixels. Same bits as
// centering first.
template <typename Code>
void winograd(int64_t batch, const Code* q, int64_t in_h, int64_t in_w, int64_t pad_h, int64_t pad_w,
              const Centerer& codes, const PackedWinograd& b, const Epilogue& epilogue, const Output& y);

}  // namespace int16_gemm
}  // namespace ops
}  // namespace qatx
