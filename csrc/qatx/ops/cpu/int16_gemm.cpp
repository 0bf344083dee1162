// AVX2 kernels of int16_gemm.h. Only the functions marked QATX_AVX2 use AVX2 instructions; they
// run only after supported() said yes, so the library still loads on any x86-64 CPU.
#include "qatx/ops/cpu/int16_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "qatx/kernels/quant_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QATX_INT16_GEMM 1
#include <immintrin.h>
// AVX2 without FMA: with FMA enabled GCC would contract the epilogue's multiply and add into one
// rounding, and the results would no longer be the reference route's.
#define QATX_AVX2 __attribute__((target("avx2")))
#else
#define QATX_INT16_GEMM 0
#define QATX_AVX2
#endif
#if defined(__GNUC__) || defined(__clang__)
#define QATX_ALWAYS_INLINE __attribute__((always_inline))
#else
#define QATX_ALWAYS_INLINE
#endif

namespace qatx {
namespace ops {
namespace int16_gemm {

namespace {
constexpr int64_t kPanel = 16;  // columns per B panel: two ymm of int32
constexpr int64_t kTileRows = 6;  // rows per micro-tile: 12 accumulators + 2 B + 1 A + 1 product = 16 ymm
constexpr int64_t kBlockRows = 192;  // rows of A per work item (a multiple of 2 * kTileRows)
constexpr int64_t kL2Bytes = 512 * 1024;  // per-core L2 of the CPUs this is tuned on (AMD Zen 3)
// Multiply-adds below which a call runs on the calling thread: a few microseconds of work, about
// what waking the other threads costs (an OpenMP fork and join measured 3-4 us here).
constexpr int64_t kMinParallelWork = int64_t{1} << 18;
}  // namespace

bool supported() {
#if QATX_INT16_GEMM
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

namespace {
// A PackedB of n columns and k reduction elements, its panels zeroed.
PackedB zeroed(int64_t n, int64_t k) {
  PackedB b;
  b.n = n;
  b.k = k;
  b.kp = k + (k & 1);
  b.panels.assign(static_cast<size_t>((n + kPanel - 1) / kPanel * b.kp * kPanel), 0);
  return b;
}

// One integer code clamped to the range and centered (Centerer's value).
template <typename Code>
int32_t centered1(Code q, const Centerer& c) {
  return std::min<int32_t>(std::max<int32_t>(q, c.quant_min), c.quant_max) - c.zero_point;
}

// w - z as int16, recording its magnitude in b.max_abs.
int16_t centered(int32_t w, int32_t z, PackedB& b) {
  const int32_t v = w - z;
  b.max_abs = std::max(b.max_abs, v < 0 ? -v : v);
  return static_cast<int16_t>(v);
}
}  // namespace

namespace {
// pack() for int8 or int16 rows; zero_points may be null (none).
template <typename T>
PackedB pack_rows(const T* rows, int64_t n, int64_t k, const int32_t* zero_points) {
  PackedB b = zeroed(n, k);
  const int64_t pairs = b.kp / 2;
  bool fits_int8 = true;
  for (int64_t c = 0; c < n; ++c) {
    int16_t* panel = b.panels.data() + (c / kPanel) * pairs * kPanel * 2;
    const int64_t j = c % kPanel;
    for (int64_t kk = 0; kk < k; ++kk) {
      const int16_t v = centered(rows[c * k + kk], zero_points ? zero_points[c] : 0, b);
      fits_int8 = fits_int8 && v >= -128 && v <= 127;
      panel[((kk / 2) * kPanel + j) * 2 + (kk & 1)] = v;
    }
  }
  if (fits_int8) b.panels8.assign(b.panels.begin(), b.panels.end());
  return b;
}
}  // namespace

PackedB pack(const int8_t* rows, int64_t n, int64_t k, const int32_t* zero_points) {
  return pack_rows(rows, n, k, zero_points);
}

namespace {
// F(2, 3) along one dimension (a 2-D transform applies it to the rows, then the columns): two
// outputs of a 3-tap correlation from a patch of 4 inputs d through 4 products m_p = t_p * v_p,
// with G's halves doubled so that all are integers and the outputs come out doubled:
// t = (d0 - d2, d1 + d2, d2 - d1, d1 - d3), v = (2 g0, g0 + g1 + g2, g0 - g1 + g2, 2 g2),
// 2 y = (m0 + m1 + m2, m1 - m2 - m3). In 2-D: 16 products per 2x2 block and Y = 4 y.
struct F23 {
  static constexpr int kPatch = 4, kPositions = 4, kShift = 2;
  template <typename V, typename Ops>
  QATX_ALWAYS_INLINE QATX_AVX2 static void input(const V* d, V* t, Ops o) {
    t[0] = o.sub(d[0], d[2]), t[1] = o.add(d[1], d[2]), t[2] = o.sub(d[2], d[1]), t[3] = o.sub(d[1], d[3]);
  }
  static void weight(const int32_t* g, int32_t* v) {
    v[0] = 2 * g[0], v[1] = g[0] + g[1] + g[2], v[2] = g[0] - g[1] + g[2], v[3] = 2 * g[2];
  }
  template <typename V, typename Ops>
  QATX_ALWAYS_INLINE QATX_AVX2 static void output(const V* m, V* y, Ops o) {
    y[0] = o.add(o.add(m[0], m[1]), m[2]), y[1] = o.sub(o.sub(m[1], m[2]), m[3]);
  }
};

struct ScalarOps {
  int32_t add(int32_t a, int32_t b) const { return a + b; }
  int32_t sub(int32_t a, int32_t b) const { return a - b; }
};

// A 2-D transform: f along each row of in (rows x kIn), then along each column of the result.
// Always inlined, so that on vectors it compiles with its AVX2 caller's instructions.
template <int kRows, int kIn, int kOut, typename V, typename F>
QATX_ALWAYS_INLINE inline void transform_2d(const V (&in)[kRows][kIn], V (&out)[kOut][kOut], F f) {
  V r[kRows][kOut];
  for (int i = 0; i < kRows; ++i) f(in[i], r[i]);
  for (int j = 0; j < kOut; ++j) {
    V col[kRows], t[kOut];
    for (int i = 0; i < kRows; ++i) col[i] = r[i][j];
    f(col, t);
    for (int i = 0; i < kOut; ++i) out[i][j] = t[i];
  }
}

}  // namespace

PackedWinograd pack_winograd(const int8_t* rows, int64_t n, int64_t cp, const int32_t* zero_points) {
  constexpr int P = F23::kPositions;
  PackedWinograd w;
  std::vector<int16_t> v(static_cast<size_t>(P * P * n * cp));
  for (int64_t o = 0; o < n; ++o) {
    for (int64_t c = 0; c < cp; ++c) {
      int32_t g[3][3], t[P][P];
      for (int k = 0; k < 9; ++k) {
        g[k / 3][k % 3] = rows[(o * 9 + k) * cp + c] - zero_points[o];
        w.weight_max_abs = std::max(w.weight_max_abs, std::abs(g[k / 3][k % 3]));
      }
      transform_2d(g, t, [](const int32_t* in, int32_t* out) { F23::weight(in, out); });
      for (int p = 0; p < P * P; ++p) v[(p * n + o) * cp + c] = static_cast<int16_t>(t[p / P][p % P]);
    }
  }
  for (int p = 0; p < P * P; ++p) w.positions.push_back(pack_rows(v.data() + p * n * cp, n, cp, nullptr));
  return w;
}

bool winograd_exact(const PackedWinograd& b, int32_t max_abs_input) {
  return 36.0 * static_cast<double>(b.positions.front().k) * max_abs_input * b.weight_max_abs <= 2147483647.0;
}

// Depthwise layout: per block of 16 channels and pair of taps (t0, t1), 32 int16 in the order of
// vpunpck{l,h}wd's 128-bit lanes: the low vector's 8 int32 slots hold channels 0-3 and 8-11 of the
// block, the high vector's 4-7 and 12-15, each as the pair (w[c, t0], w[c, t1]).
PackedB pack_depthwise(const int8_t* weight, int64_t channels, int64_t taps, const int32_t* zero_points) {
  PackedB b = zeroed(channels, taps);
  const int64_t blocks = (channels + kPanel - 1) / kPanel, pairs = b.kp / 2;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int64_t kk = 0; kk < pairs; ++kk) {
      int16_t* dst = b.panels.data() + (blk * pairs + kk) * kPanel * 2;
      for (int64_t slot = 0; slot < kPanel; ++slot) {  // slots 0-7: low vector, 8-15: high vector
        const int64_t lane = (slot % 8) / 4, in_lane = slot % 4, high = slot / 8;
        const int64_t c = blk * kPanel + lane * 8 + high * 4 + in_lane;
        for (int64_t h = 0; h < 2 && c < channels && 2 * kk + h < taps; ++h) {
          dst[slot * 2 + h] = centered(weight[c * taps + 2 * kk + h], zero_points[c], b);
        }
      }
    }
  }
  return b;
}

#if QATX_INT16_GEMM
namespace {

// 16 consecutive panel entries as int16.
QATX_AVX2 inline __m256i load16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
QATX_AVX2 inline __m256i load16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 16 integer codes (uint8 / int8) clamped to the range, in 8 bits (the range fits the codes'
// type), and centered: Centerer's values as int16.
template <typename Code>
QATX_AVX2 inline __m256i centered16(const Code* q, const Centerer& c) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i lo = _mm_set1_epi8(static_cast<char>(c.quant_min)), hi = _mm_set1_epi8(static_cast<char>(c.quant_max));
  const __m256i z = _mm256_set1_epi16(static_cast<int16_t>(c.zero_point));
  if constexpr (std::is_same_v<Code, int8_t>) {
    return _mm256_sub_epi16(_mm256_cvtepi8_epi16(_mm_min_epi8(_mm_max_epi8(v, lo), hi)), z);
  } else {
    return _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_min_epu8(_mm_max_epu8(v, lo), hi)), z);
  }
}

// Asks for the cache lines of n elements from p on (a hint: no fault, whatever the address).
template <typename T>
QATX_AVX2 inline void prefetch(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) _mm_prefetch(bytes + off, _MM_HINT_T0);
}

// acc[6][16] = A[6 rows] * B panel. Row i of A is `segments` runs of 2 * pairs int16 each, run s
// starting at starts[s * 6 + i] (im2col without the copy: a run is one input pixel's channels).
// Named accumulators (not an array) keep GCC from spilling them: 12 accumulators + 2 B + 1 A +
// 1 product fill the 16 ymm registers.
QATX_AVX2 void tile(const int16_t* const* starts, int64_t segments, int64_t pairs, const int16_t* panel,
                    int32_t* acc) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t seg = 0; seg < segments; ++seg) {
    const int16_t* const* r = starts + seg * kTileRows;
    const int16_t *a0 = r[0], *a1 = r[1], *a2 = r[2], *a3 = r[3], *a4 = r[4], *a5 = r[5];
    for (int64_t kk = 0; kk < pairs; ++kk, panel += 2 * kPanel) {
      const __m256i b0 = load16(panel), b1 = load16(panel + kPanel);
      // Broadcast (a[2kk], a[2kk + 1]) of a row as the 32-bit pair vpmaddwd multiplies with b's.
#define QATX_ROW(a, c0, c1)                                             \
  {                                                                     \
    int32_t pair;                                                       \
    std::memcpy(&pair, a + 2 * kk, sizeof pair);                        \
    const __m256i av = _mm256_set1_epi32(pair);                         \
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(av, b0));               \
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(av, b1));               \
  }
      QATX_ROW(a0, c00, c01)
      QATX_ROW(a1, c10, c11)
      QATX_ROW(a2, c20, c21)
      QATX_ROW(a3, c30, c31)
      QATX_ROW(a4, c40, c41)
      QATX_ROW(a5, c50, c51)
#undef QATX_ROW
    }
  }
  __m256i* out = reinterpret_cast<__m256i*>(acc);
  _mm256_storeu_si256(out + 0, c00), _mm256_storeu_si256(out + 1, c01);
  _mm256_storeu_si256(out + 2, c10), _mm256_storeu_si256(out + 3, c11);
  _mm256_storeu_si256(out + 4, c20), _mm256_storeu_si256(out + 5, c21);
  _mm256_storeu_si256(out + 6, c30), _mm256_storeu_si256(out + 7, c31);
  _mm256_storeu_si256(out + 8, c40), _mm256_storeu_si256(out + 9, c41);
  _mm256_storeu_si256(out + 10, c50), _mm256_storeu_si256(out + 11, c51);
}

// tile() for a single row (batch-1 inference would otherwise compute six).
template <typename Panel>
QATX_AVX2 void tile_row(const int16_t* const* starts, int64_t segments, int64_t pairs, const Panel* panel,
                        int32_t* acc) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, d0 = c0, d1 = c0;  // two chains each, for latency
  for (int64_t seg = 0; seg < segments; ++seg) {
    const int16_t* a = starts[seg * kTileRows];
    int64_t kk = 0;
    for (; kk + 2 <= pairs; kk += 2, panel += 4 * kPanel) {
      int32_t p0, p1;
      std::memcpy(&p0, a + 2 * kk, sizeof p0);
      std::memcpy(&p1, a + 2 * kk + 2, sizeof p1);
      const __m256i a0 = _mm256_set1_epi32(p0), a1 = _mm256_set1_epi32(p1);
      c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(a0, load16(panel)));
      c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(a0, load16(panel + kPanel)));
      d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(a1, load16(panel + 2 * kPanel)));
      d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(a1, load16(panel + 3 * kPanel)));
    }
    for (; kk < pairs; ++kk, panel += 2 * kPanel) {
      int32_t p0;
      std::memcpy(&p0, a + 2 * kk, sizeof p0);
      const __m256i a0 = _mm256_set1_epi32(p0);
      c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(a0, load16(panel)));
      c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(a0, load16(panel + kPanel)));
    }
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc), _mm256_add_epi32(c0, d0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 8), _mm256_add_epi32(c1, d1));
}

// The output grid's constants, read once per tile into registers (the stores, through a char
// type, could otherwise alias them and force a reload per vector).
struct Grid {
  __m256 inv, z, lo, hi;
  float inv1, z1, lo1, hi1;
};
QATX_AVX2 inline Grid grid_of(const Output& y) {
  return {_mm256_set1_ps(y.inv_scale), _mm256_set1_ps(y.zero_point), _mm256_set1_ps(y.quant_min),
          _mm256_set1_ps(y.quant_max), y.inv_scale, y.zero_point, y.quant_min, y.quant_max};
}

// Eight integer-valued float32 codes as T (uint8 / int8) in the low 8 bytes, saturated to T's
// range; clamped codes pack without saturating.
template <typename T>
QATX_AVX2 inline __m128i bytes8(__m256 q) {
  const __m256i v = _mm256_cvtps_epi32(q);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return std::is_same_v<T, uint8_t> ? _mm_packus_epi16(w, w) : _mm_packs_epi16(w, w);
}
template <typename T>
QATX_AVX2 inline void pack8(__m256 q, T* out) {
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), bytes8<T>(q));
}

// Eight epilogue results (float32, ReLU applied) stored as T: as they are, or quantized with the
// same float32 operations as math::quantize_value.
template <typename T>
QATX_AVX2 inline void store8(__m256 f, T* out, const Grid& g) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(out, f);
  } else {
    const __m256 q = _mm256_add_ps(
        _mm256_round_ps(_mm256_mul_ps(f, g.inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), g.z);
    pack8(_mm256_min_ps(_mm256_max_ps(q, g.lo), g.hi), out);
  }
}
template <typename T>
inline T store1(float f, const Grid& g) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else {
    return static_cast<T>(math::quantize_value(f, g.inv1, g.z1, g.lo1, g.hi1));
  }
}

// Four epilogue results in float64, rounded to float32, ReLU applied.
QATX_AVX2 inline __m128 four(__m128i a, const double* scale, const double* bias, const double* shift, bool relu) {
  __m256d v = _mm256_cvtepi32_pd(a);
  if (bias) v = _mm256_add_pd(v, _mm256_loadu_pd(bias));
  v = _mm256_mul_pd(v, _mm256_loadu_pd(scale));
  if (shift) v = _mm256_add_pd(v, _mm256_loadu_pd(shift));
  const __m128 f = _mm256_cvtpd_ps(v);
  return relu ? _mm_max_ps(f, _mm_setzero_ps()) : f;
}

// The epilogue into an integer grid in float32: t = float32(acc) * m + c, with m = scale / s_out
// and c = (bias * scale + shift) / s_out per column, is the reference's rint argument
// q = float32(float32(y) * inv_scale) up to rounding errors, and rint(t) = rint(q) unless a
// half-integer lies between them. Both are within 3.01 * 2^-24 (|t| + |p|) + 2^-24 |c| + 2^-51
// (the float64 terms) + 2^-22 (float32 underflow) of the exact (acc + bias) * scale * inv +
// shift * inv (p = float32(acc) * m); with |t| <= |p| + |c| that is below
// bound = 2^-20 (|p| + |c| + |bias * scale * inv| + |shift * inv| + 2). So t whose distance to
// the nearest integer is below 0.5 - bound rounds as q does; the other vectors (about 1 in 3000
// measured) take the float64 route. The clamp, and ReLU as a lower clamp at the zero point's
// code (quantizing is monotone, so quantize(max(y, 0)) = max(quantize(y), quantize(0))), then give
// the reference's integer.
class TileStore {
 public:
  TileStore(const Epilogue& ep, const Output& y, int64_t n) : ep_(ep), type_(y.type) {
    if (type_ == Output::Type::Float) return;
    // The grid is the whole of uint8 / int8: the packing's saturation is the clamp (a vector that
    // passes the bound has |t| < 2^20, so t + z converts to int32 exactly).
    full_range_ = type_ == Output::Type::UInt8 ? y.quant_min == 0.0f && y.quant_max == 255.0f
                                               : y.quant_min == -128.0f && y.quant_max == 127.0f;
    m_.resize(static_cast<size_t>(n));
    c_.resize(static_cast<size_t>(n));
    limit_.resize(static_cast<size_t>(n));
    const double inv = y.inv_scale;
    // Beyond float32's range: infinity, which sends every vector of the column the float64 route.
    auto narrow = [](double v) {
      return std::abs(v) <= std::numeric_limits<float>::max() ? static_cast<float>(v)
                                                              : std::numeric_limits<float>::infinity();
    };
    for (int64_t j = 0; j < n; ++j) {
      const double bias = ep.bias ? ep.bias[j] * ep.scale[j] * inv : 0.0, shift = ep.shift ? ep.shift[j] * inv : 0.0;
      m_[j] = narrow(ep.scale[j] * inv);
      c_[j] = narrow(bias + shift);
      const double terms = std::abs(static_cast<double>(c_[j])) + std::abs(bias) + std::abs(shift) + 2.0;
      limit_[j] = std::isfinite(terms) ? static_cast<float>(0.5 - std::ldexp(terms, -20))
                                       : -std::numeric_limits<float>::infinity();
    }
  }

  // Rows < mr and columns < cols of the tile (kPanel int32 per row) through the epilogue into y,
  // which points at the tile's first element; the columns from `col` on.
  QATX_AVX2 void operator()(const int32_t* acc, int64_t mr, int64_t col, int64_t cols, const Output& y) const {
    switch (type_) {
      case Output::Type::Float: return store_as<float>(acc, mr, col, cols, y);
      case Output::Type::UInt8: return store_as<uint8_t>(acc, mr, col, cols, y);
      case Output::Type::Int8: return store_as<int8_t>(acc, mr, col, cols, y);
    }
  }

 private:
  // Eight results of row a by the float64 route (int16_gemm.h's Epilogue).
  template <typename T>
  QATX_AVX2 void exact8(const int32_t* a, int64_t col, T* out, const Grid& g) const {
    const double *scale = ep_.scale + col, *bias = ep_.bias ? ep_.bias + col : nullptr,
                 *shift = ep_.shift ? ep_.shift + col : nullptr;
    // One 256-bit load per 256-bit store of the accumulators (a load of its upper half alone
    // would not be forwarded from the store).
    const __m256i a8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
    const __m128 lo = four(_mm256_castsi256_si128(a8), scale, bias, shift, ep_.relu);
    const __m128 hi = four(_mm256_extracti128_si256(a8, 1), scale + 4, bias ? bias + 4 : nullptr,
                           shift ? shift + 4 : nullptr, ep_.relu);
    store8<T>(_mm256_set_m128(hi, lo), out, g);
  }

  template <typename T>
  QATX_AVX2 void store_as(const int32_t* acc, int64_t mr, int64_t col, int64_t cols, const Output& y) const {
    const Grid g = grid_of(y);
    T* const base = static_cast<T*>(y.data);
    const int64_t ld = y.ld;
    int64_t j = 0;
    if constexpr (!std::is_same_v<T, float>) {
      const __m256 lo = ep_.relu ? _mm256_max_ps(g.lo, _mm256_min_ps(g.z, g.hi)) : g.lo;
      const T zero_code = static_cast<T>(std::min(std::max(y.zero_point, y.quant_min), y.quant_max));
      const __m128i relu_floor = _mm_set1_epi8(static_cast<char>(zero_code));
      const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      const __m256 eps = _mm256_set1_ps(1.0f / (1 << 20));
      for (; j + 8 <= cols; j += 8) {
        const __m256 m = _mm256_loadu_ps(m_.data() + col + j), c = _mm256_loadu_ps(c_.data() + col + j);
        const __m256 limit = _mm256_loadu_ps(limit_.data() + col + j);
        for (int64_t i = 0; i < mr; ++i) {
          const int32_t* a = acc + i * kPanel + j;
          T* out = base + i * ld + j;
          const __m256i a8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
          const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(a8), m);
          const __m256 t = _mm256_add_ps(p, c);
          const __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m256 dist = _mm256_add_ps(_mm256_and_ps(_mm256_sub_ps(t, r), magnitude),
                                            _mm256_mul_ps(_mm256_and_ps(p, magnitude), eps));
          // Not below the limit (or NaN, from an infinite m or c): the float64 route.
          if (_mm256_movemask_ps(_mm256_cmp_ps(dist, limit, _CMP_LT_OQ)) != 0xff) {
            exact8<T>(a, col + j, out, g);
            continue;
          }
          if (full_range_) {
            __m128i bytes = bytes8<T>(_mm256_add_ps(r, g.z));
            if (ep_.relu) {
              bytes = std::is_same_v<T, uint8_t> ? _mm_max_epu8(bytes, relu_floor) : _mm_max_epi8(bytes, relu_floor);
            }
            _mm_storel_epi64(reinterpret_cast<__m128i*>(out), bytes);
          } else {
            pack8(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, g.z), lo), g.hi), out);
          }
        }
      }
    }
    for (; j + 8 <= cols; j += 8) {  // float32 outputs
      for (int64_t i = 0; i < mr; ++i) exact8<T>(acc + i * kPanel + j, col + j, base + i * ld + j, g);
    }
    const double *scale = ep_.scale + col, *bias = ep_.bias ? ep_.bias + col : nullptr,
                 *shift = ep_.shift ? ep_.shift + col : nullptr;
    for (int64_t i = 0; i < mr; ++i) {
      const int32_t* a = acc + i * kPanel;
      T* out = base + i * ld;
      for (int64_t jj = j; jj < cols; ++jj) {
        double v = static_cast<double>(a[jj]);
        if (bias) v += bias[jj];
        v *= scale[jj];
        if (shift) v += shift[jj];
        const float f = static_cast<float>(v);
        out[jj] = store1<T>(ep_.relu ? std::max(f, 0.0f) : f, g);
      }
    }
  }

  const Epilogue& ep_;
  Output::Type type_;
  bool full_range_ = false;
  std::vector<float> m_, c_, limit_;  // per column, for integer outputs
};

// A pixel's centered channels: stored centered (int16), or integer codes (uint8 / int8) clamped
// to the quant range and centered as they are loaded (the codes' own range: no int16 copy of the
// input is written and read back). `fill` is a pixel whose centered channels are 0.
template <typename Pixel>
struct CenteredPixels {
  QATX_AVX2 __m256i operator()(const Pixel* p) const {  // 16 channels
    if constexpr (std::is_same_v<Pixel, int16_t>) {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    } else {
      return centered16(p, codes);
    }
  }
  int32_t one(const Pixel* p) const {
    if constexpr (std::is_same_v<Pixel, int16_t>) return *p;
    return centered1(*p, codes);
  }
  Pixel fill() const { return std::is_same_v<Pixel, int16_t> ? 0 : static_cast<Pixel>(codes.zero_point); }
  Centerer codes;  // unused for int16
};

// Integer codes (uint8 / int8) widened to int16 as they are: no clamp, no centering.
template <typename Code>
struct WidenedCodes {
  QATX_AVX2 __m256i operator()(const Code* p) const {  // 16 channels
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return std::is_same_v<Code, uint8_t> ? _mm256_cvtepu8_epi16(v) : _mm256_cvtepi8_epi16(v);
  }
};

// Rows per depthwise step: their 8 accumulators, the 2 weight vectors and 4 temporaries fit the
// 16 ymm registers; the weights are loaded once for all of them.
constexpr int64_t kDepthwiseRows = 4;

// Depthwise accumulators of kDepthwiseRows rows for one block of 16 channels: acc[i * 16 + j] is
// row i, channel j of the block. starts[i * taps + t]: row i's tap t.
template <typename Pixel, typename Load>
QATX_AVX2 void depthwise_block(const Pixel* const* starts, int64_t taps, int64_t channel, const int16_t* panel,
                               const Load& load, int32_t* acc) {
  __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0, lo2 = lo0, hi2 = lo0, lo3 = lo0, hi3 = lo0;
  for (int64_t t = 0; t < taps; t += 2, panel += 2 * kPanel) {
    const __m256i wlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel));
    const __m256i whi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + kPanel));
    const int64_t t1 = t + 1 < taps ? t + 1 : t;  // an odd last tap meets zero weights
#define QATX_DW_ROW(i, lo, hi)                                                      \
  {                                                                                \
    const __m256i a = load(starts[i * taps + t] + channel);                        \
    const __m256i b = load(starts[i * taps + t1] + channel);                       \
    lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), wlo)); \
    hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), whi)); \
  }
    QATX_DW_ROW(0, lo0, hi0)
    QATX_DW_ROW(1, lo1, hi1)
    QATX_DW_ROW(2, lo2, hi2)
    QATX_DW_ROW(3, lo3, hi3)
#undef QATX_DW_ROW
  }
  // Lanes back to channel order: (low lane of lo, low lane of hi) = channels 0-7, the high lanes 8-15.
  __m256i* out = reinterpret_cast<__m256i*>(acc);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(lo0, hi0, 0x20));
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(lo0, hi0, 0x31));
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(lo1, hi1, 0x20));
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(lo1, hi1, 0x31));
  _mm256_storeu_si256(out + 4, _mm256_permute2x128_si256(lo2, hi2, 0x20));
  _mm256_storeu_si256(out + 5, _mm256_permute2x128_si256(lo2, hi2, 0x31));
  _mm256_storeu_si256(out + 6, _mm256_permute2x128_si256(lo3, hi3, 0x20));
  _mm256_storeu_si256(out + 7, _mm256_permute2x128_si256(lo3, hi3, 0x31));
}

// depthwise() over pixels of Pixel loaded 16 channels at a time by `load`.
template <typename Pixel, typename Load>
void depthwise_from(int64_t m, const PackedB& b, const std::function<void(int64_t, const Pixel**)>& locate,
                    const Load& load, const Epilogue& epilogue, const Output& y) {
  if (m == 0 || b.n == 0) return;
  const int64_t taps = b.k, blocks = (b.n + kPanel - 1) / kPanel, steps = (m + kDepthwiseRows - 1) / kDepthwiseRows;
  const int64_t grain = m * b.n * taps < kMinParallelWork ? steps : std::max<int64_t>(1, 4096 / (b.n * taps));
  const TileStore store(epilogue, y, b.n);
  at::parallel_for(0, steps, grain, [&](int64_t begin, int64_t end) {
    std::vector<const Pixel*> starts(static_cast<size_t>(kDepthwiseRows * taps));
    alignas(32) int32_t acc[kDepthwiseRows * kPanel];
    for (int64_t step = begin; step < end; ++step) {
      const int64_t first = step * kDepthwiseRows, rows = std::min(kDepthwiseRows, m - first);
      for (int64_t i = 0; i < kDepthwiseRows; ++i) {  // a short step repeats its last row
        locate(first + std::min(i, rows - 1), starts.data() + i * taps);
      }
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t col = blk * kPanel;
        depthwise_block(starts.data(), taps, col, b.panels.data() + blk * (b.kp / 2) * kPanel * 2, load, acc);
        store(acc, rows, col, std::min(kPanel, b.n - col), y.at(first, col));
      }
    }
  });
}

}  // namespace
#endif

void depthwise(int64_t m, const PackedB& b, const LocateRow& locate, const Epilogue& epilogue, const Output& y) {
#if QATX_INT16_GEMM
  depthwise_from(m, b, locate, CenteredPixels<int16_t>{}, epilogue, y);
#else
  (void)m, (void)b, (void)locate, (void)epilogue, (void)y;
  TORCH_INTERNAL_ASSERT(false, "int16_gemm::depthwise needs an x86-64 CPU with AVX2");
#endif
}

template <typename Code>
void depthwise(int64_t m, const PackedB& b, const std::function<void(int64_t, const Code**)>& locate,
               const Epilogue& epilogue, const Output& y) {
#if QATX_INT16_GEMM
  TORCH_INTERNAL_ASSERT(b.n % kPanel == 0, "int16_gemm::depthwise: integer codes need a multiple of 16 channels");
  depthwise_from(m, b, locate, WidenedCodes<Code>{}, epilogue, y);
#else
  (void)m, (void)b, (void)locate, (void)epilogue, (void)y;
  TORCH_INTERNAL_ASSERT(false, "int16_gemm::depthwise needs an x86-64 CPU with AVX2");
#endif
}
template void depthwise(int64_t, const PackedB&, const std::function<void(int64_t, const uint8_t**)>&,
                        const Epilogue&, const Output&);
template void depthwise(int64_t, const PackedB&, const std::function<void(int64_t, const int8_t**)>&,
                        const Epilogue&, const Output&);

#if QATX_INT16_GEMM
namespace {
struct Ops16 {  // inlined into their AVX2 callers
  QATX_AVX2 __m256i add(__m256i a, __m256i b) const { return _mm256_add_epi16(a, b); }
  QATX_AVX2 __m256i sub(__m256i a, __m256i b) const { return _mm256_sub_epi16(a, b); }
};
struct Ops32 {
  QATX_AVX2 __m256i add(__m256i a, __m256i b) const { return _mm256_add_epi32(a, b); }
  QATX_AVX2 __m256i sub(__m256i a, __m256i b) const { return _mm256_sub_epi32(a, b); }
};

// The patch's transformed values of channels [0, cp), position p's at u + p * stride (16 channels
// at a time, then one at a time).
template <typename Pixel>
QATX_AVX2 void transform_patch(const Pixel* const (&px)[F23::kPatch][F23::kPatch], int64_t cp,
                               const CenteredPixels<Pixel>& load, int16_t* u, int64_t stride) {
  constexpr int N = F23::kPatch, P = F23::kPositions;
  int64_t c = 0;
  for (; c + 16 <= cp; c += 16) {
    __m256i d[N][N], t[P][P];
    for (int i = 0; i < N; ++i) {
      for (int j = 0; j < N; ++j) d[i][j] = load(px[i][j] + c);
    }
    transform_2d(d, t, [](const __m256i* in, __m256i* out) QATX_AVX2 { F23::input(in, out, Ops16()); });
    for (int p = 0; p < P * P; ++p) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + p * stride + c), t[p / P][p % P]);
    }
  }
  for (; c < cp; ++c) {
    int32_t d[N][N], t[P][P];
    for (int i = 0; i < N; ++i) {
      for (int j = 0; j < N; ++j) d[i][j] = load.one(px[i][j] + c);
    }
    transform_2d(d, t, [](const int32_t* in, int32_t* out) QATX_AVX2 { F23::input(in, out, ScalarOps()); });
    for (int p = 0; p < P * P; ++p) u[p * stride + c] = static_cast<int16_t>(t[p / P][p % P]);
  }
}

// The block's 2x2 outputs from row i of the accumulator tiles (16 columns): top (left, right) as
// rows 0, 1 of top, bottom likewise; divided by 4 (exact: the result is 4 y) as a shift.
QATX_AVX2 void output_transform(const int32_t (*acc)[kTileRows * kPanel], int64_t i, int32_t* top, int32_t* bottom) {
  constexpr int P = F23::kPositions;
  for (int h = 0; h < kPanel; h += 8) {
    __m256i m[P][P], y[2][2];
    for (int p = 0; p < P * P; ++p) {
      m[p / P][p % P] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc[p] + i * kPanel + h));
    }
    transform_2d(m, y, [](const __m256i* in, __m256i* out) QATX_AVX2 { F23::output(in, out, Ops32()); });
    for (int r = 0; r < 2; ++r) {
      int32_t* out = r == 0 ? top : bottom;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h), _mm256_srai_epi32(y[r][0], F23::kShift));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kPanel + h), _mm256_srai_epi32(y[r][1], F23::kShift));
    }
  }
}

}  // namespace
#endif

#if QATX_INT16_GEMM
namespace {
// winograd() on an input of in_h x in_w pixels inside zero padding (centered 0) that is not
// stored: pad_h rows above and below, pad_w columns left and right.
template <typename Pixel>
void winograd_from(int64_t batch, const Pixel* x, int64_t in_h, int64_t in_w, int64_t pad_h, int64_t pad_w,
                   const CenteredPixels<Pixel>& load, const PackedWinograd& b, const Epilogue& epilogue,
                   const Output& y) {
  constexpr int N = F23::kPatch, P = F23::kPositions * F23::kPositions;
  const int64_t out_h = in_h + 2 * pad_h - 2, out_w = in_w + 2 * pad_w - 2;
  if (batch == 0 || out_h <= 0 || out_w <= 0 || b.positions.front().n == 0) return;
  const int64_t n = b.positions.front().n, cp = b.positions.front().kp, pairs = cp / 2;
  const int64_t blocks_h = (out_h + 1) / 2, blocks_w = (out_w + 1) / 2;
  const int64_t blocks = batch * blocks_h * blocks_w, panels = (n + kPanel - 1) / kPanel;
  // Work items: chunks of blocks whose transformed patches stay in L2 while every panel of every
  // position meets them (in 6-block tiles).
  const int64_t threads = blocks * P * cp * n < kMinParallelWork ? 1 : at::get_num_threads();
  const int64_t fits_l2 = kL2Bytes / 2 / (P * cp * static_cast<int64_t>(sizeof(int16_t)));
  const int64_t per_thread = (blocks + threads - 1) / threads;
  const int64_t chunk =
      std::max<int64_t>(1, std::min<int64_t>({fits_l2, 8 * kTileRows, per_thread + kTileRows - 1}) / kTileRows) *
      kTileRows;
  const int64_t chunks = (blocks + chunk - 1) / chunk;
  const TileStore store(epilogue, y, n);
  at::parallel_for(0, chunks, threads == 1 ? chunks : 1, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> u(static_cast<size_t>(P * chunk * cp));
    // Pixels in the padding or past the edge (odd output sizes).
    const std::vector<Pixel> zeros(static_cast<size_t>(cp), load.fill());
    std::vector<const int16_t*> starts(static_cast<size_t>(P * chunk));
    alignas(32) int32_t acc[P][kTileRows * kPanel];
    alignas(32) int32_t out[2][2 * kTileRows * kPanel];  // the tile's top and bottom output pixels
    struct BlockOrigin {
      int64_t row, oy, ox;  // a block's top-left output pixel: its row of y, its position
    };
    std::vector<BlockOrigin> origins(static_cast<size_t>(chunk));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t first = item * chunk, count = std::min(chunk, blocks - first);
      // The chunk's blocks in raster order (stepped, not divided: divisions cost as much as a
      // 32-channel patch transform).
      int64_t image = first / (blocks_h * blocks_w), by = first / blocks_w % blocks_h, bx = first % blocks_w;
      for (int64_t r = 0; r < count; ++r) {
        const int64_t py0 = 2 * by, px0 = 2 * bx;
        origins[r] = {(image * out_h + py0) * out_w + px0, py0, px0};
        const int64_t iy = py0 - pad_h, ix = px0 - pad_w;  // the patch's first pixel in x
        const Pixel* image_x = x + image * in_h * in_w * cp;
        const bool inside = iy >= 0 && ix >= 0 && iy + N <= in_h && ix + N <= in_w;
        const Pixel* px[N][N];
        for (int i = 0; i < N; ++i) {
          for (int j = 0; j < N; ++j) {
            const int64_t yy = iy + i, xx = ix + j;
            px[i][j] = inside || (yy >= 0 && yy < in_h && xx >= 0 && xx < in_w) ? image_x + (yy * in_w + xx) * cp
                                                                                 : zeros.data();
          }
        }
        // The two pixel columns that block r + 2 is the first to read, fetched while this block
        // is transformed (the input is mostly in L3: 10-13% on a 32-channel layer).
        const int64_t ahead = std::max<int64_t>(0, std::min<int64_t>(ix + 6, in_w - 2));
        for (int i = 0; i < N; ++i) {
          if (iy + i >= 0 && iy + i < in_h) {
            prefetch(image_x + ((iy + i) * in_w + ahead) * cp, std::min<int64_t>(2, in_w - ahead) * cp);
          }
        }
        transform_patch(px, cp, load, u.data() + r * cp, chunk * cp);
        if (++bx == blocks_w) {
          bx = 0;
          if (++by == blocks_h) by = 0, ++image;
        }
      }
      // A short chunk's last tile repeats its last block in the unused rows; only its rows are stored.
      for (int64_t p = 0; p < P; ++p) {
        for (int64_t r = 0; r < chunk; ++r) starts[p * chunk + r] = u.data() + (p * chunk + std::min(r, count - 1)) * cp;
      }
      for (int64_t panel = 0; panel < panels; ++panel) {
        const int64_t col = panel * kPanel, cols = std::min(kPanel, n - col), offset = panel * pairs * kPanel * 2;
        for (int64_t t = 0; t < count; t += kTileRows) {
          for (int64_t p = 0; p < P; ++p) {
            tile(starts.data() + p * chunk + t, 1, pairs, b.positions[p].panels.data() + offset, acc[p]);
          }
          // The tile's blocks in raster order: a run of them in one block row writes two output
          // rows of adjacent pixels, each through one epilogue call.
          const int64_t tile_blocks = std::min(kTileRows, count - t);
          for (int64_t i = 0; i < tile_blocks; ++i) {
            output_transform(acc, i, out[0] + 2 * i * kPanel, out[1] + 2 * i * kPanel);
          }
          for (int64_t i = 0; i < tile_blocks;) {
            const BlockOrigin& blk = origins[t + i];
            const int64_t run = std::min(tile_blocks - i, blocks_w - blk.ox / 2), width = std::min(2 * run, out_w - blk.ox);
            store(out[0] + 2 * i * kPanel, width, col, cols, y.at(blk.row, col));
            if (blk.oy + 1 < out_h) {
              store(out[1] + 2 * i * kPanel, width, col, cols, y.at(blk.row + out_w, col));
            }
            i += run;
          }
        }
      }
    }
  });
}
}  // namespace
#endif

void winograd(int64_t batch, const int16_t* x, int64_t in_h, int64_t in_w, const PackedWinograd& b,
              const Epilogue& epilogue, const Output& y) {
#if QATX_INT16_GEMM
  winograd_from(batch, x, in_h, in_w, 0, 0, CenteredPixels<int16_t>{}, b, epilogue, y);
#else
  (void)batch, (void)x, (void)in_h, (void)in_w, (void)b, (void)epilogue, (void)y;
  TORCH_INTERNAL_ASSERT(false, "int16_gemm::winograd needs an x86-64 CPU with AVX2");
#endif
}

template <typename Code>
void winograd(int64_t batch, const Code* q, int64_t in_h, int64_t in_w, int64_t pad_h, int64_t pad_w,
              const Centerer& codes, const PackedWinograd& b, const Epilogue& epilogue, const Output& y) {
#if QATX_INT16_GEMM
  winograd_from(batch, q, in_h, in_w, pad_h, pad_w, CenteredPixels<Code>{codes}, b, epilogue, y);
#else
  (void)batch, (void)q, (void)in_h, (void)in_w, (void)pad_h, (void)pad_w, (void)codes, (void)b, (void)epilogue,
      (void)y;
  TORCH_INTERNAL_ASSERT(false, "int16_gemm::winograd needs an x86-64 CPU with AVX2");
#endif
}
template void winograd(int64_t, const uint8_t*, int64_t, int64_t, int64_t, int64_t, const Centerer&,
                       const PackedWinograd&, const Epilogue&, const Output&);
template void winograd(int64_t, const int8_t*, int64_t, int64_t, int64_t, int64_t, const Centerer&,
                       const PackedWinograd&, const Epilogue&, const Output&);

#if QATX_INT16_GEMM
namespace {
// gemm() with the row locator as a type (a lambda is inlined; std::function costs a call per row).
template <typename Locate>
void gemm_rows(int64_t m, const PackedB& b, int64_t segments, const Locate& locate, const Epilogue& epilogue,
               const Output& y) {
  if (m == 0 || b.n == 0) return;
  TORCH_INTERNAL_ASSERT(segments > 0 && b.kp % (2 * segments) == 0, "int16_gemm: K must split into even runs");
  const int64_t panels = (b.n + kPanel - 1) / kPanel, pairs = b.kp / 2 / segments;
  // Work items: blocks of rows, and when there are fewer blocks than threads, slices of the
  // panels too. When all of B fits in L2 (convolutions, small layers), each 6-row tile meets every
  // panel of the slice while its rows are in L1. A larger B would then stream from L3 once per
  // tile, so each panel meets every tile of a (smaller) block instead, whose rows stay in L2.
  const bool panel_outer = static_cast<int64_t>(b.panels.size() * sizeof(int16_t)) > kL2Bytes;
  const int64_t threads = m * b.n * b.kp < kMinParallelWork ? 1 : at::get_num_threads();
  const int64_t max_rows = panel_outer ? kBlockRows / 2 : kBlockRows;
  const int64_t block_rows =
      std::min<int64_t>(max_rows, std::max<int64_t>(kTileRows, (m + threads - 1) / threads + kTileRows - 1) /
                                      kTileRows * kTileRows);
  const int64_t blocks = (m + block_rows - 1) / block_rows;
  const int64_t slices = std::min<int64_t>(panels, std::max<int64_t>(1, threads / blocks));
  const int64_t per_slice = (panels + slices - 1) / slices;
  const int64_t tile_starts = segments * kTileRows;
  const TileStore store(epilogue, y, b.n);
  at::parallel_for(0, blocks * slices, threads == 1 ? blocks * slices : 1, [&](int64_t begin, int64_t end) {
    // starts[t * tile_starts + s * 6 + i]: run s of row i of the block's tile t.
    std::vector<const int16_t*> starts(static_cast<size_t>(block_rows / kTileRows * tile_starts));
    std::vector<const int16_t*> row(static_cast<size_t>(segments));
    alignas(32) int32_t acc[kTileRows * kPanel];
    int64_t located = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item / slices, slice = item % slices;
      const int64_t first = block * block_rows, rows = std::min(block_rows, m - first);
      if (block != located) {
        for (int64_t r = 0; r < rows; ++r) {
          locate(first + r, row.data());
          const int64_t t = r / kTileRows, i = r % kTileRows;
          // A short last tile repeats its last row in the unused slots; only its rows are stored.
          const int64_t last = r + 1 == rows ? kTileRows : i + 1;
          for (int64_t ii = i; ii < last; ++ii) {
            for (int64_t seg = 0; seg < segments; ++seg) starts[t * tile_starts + seg * kTileRows + ii] = row[seg];
          }
        }
        located = block;
      }
      const int64_t p_begin = slice * per_slice, p_end = std::min(panels, (slice + 1) * per_slice);
      auto multiply = [&](int64_t i, int64_t p) {  // tile at row i of the block, panel p
        const int64_t mr = std::min(kTileRows, rows - i), col = p * kPanel;
        const int16_t* const* tile_rows = starts.data() + i / kTileRows * tile_starts;
        const int64_t offset = p * (b.kp / 2) * kPanel * 2;
        if (p == p_begin && i + kTileRows < rows) {  // the next tile's runs, while this one multiplies
          for (int64_t s = 0; s < tile_starts; ++s) prefetch(tile_rows[tile_starts + s], 2 * pairs);
        }
        if (mr > 1) {
          tile(tile_rows, segments, pairs, b.panels.data() + offset, acc);
        } else if (!b.panels8.empty()) {
          tile_row(tile_rows, segments, pairs, b.panels8.data() + offset, acc);
        } else {
          tile_row(tile_rows, segments, pairs, b.panels.data() + offset, acc);
        }
        store(acc, mr, col, std::min(kPanel, b.n - col), y.at(first + i, col));
      };
      if (panel_outer) {
        for (int64_t p = p_begin; p < p_end; ++p) {
          for (int64_t i = 0; i < rows; i += kTileRows) multiply(i, p);
        }
      } else {
        for (int64_t i = 0; i < rows; i += kTileRows) {
          for (int64_t p = p_begin; p < p_end; ++p) multiply(i, p);
        }
      }
    }
  });
}
}  // namespace
#endif

void gemm(int64_t m, const PackedB& b, int64_t segments, const LocateRow& locate, const Epilogue& epilogue,
          const Output& y) {
#if QATX_INT16_GEMM
  gemm_rows(m, b, segments, locate, epilogue, y);
#else
  (void)m, (void)b, (void)segments, (void)locate, (void)epilogue, (void)y;
  TORCH_INTERNAL_ASSERT(false, "int16_gemm::gemm needs an x86-64 CPU with AVX2");
#endif
}

void gemm(int64_t m, const PackedB& b, const int16_t* a, int64_t lda, const Epilogue& epilogue, const Output& y) {
#if QATX_INT16_GEMM
  gemm_rows(m, b, 1, [a, lda](int64_t row, const int16_t** starts) { starts[0] = a + row * lda; }, epilogue, y);
#else
  (void)m, (void)b, (void)a, (void)lda, (void)epilogue, (void)y;
  TORCH_INTERNAL_ASSERT(false, "int16_gemm::gemm needs an x86-64 CPU with AVX2");
#endif
}

Output Output::at(int64_t row, int64_t col) const {
  const int64_t bytes = type == Type::Float ? sizeof(float) : 1;
  Output o = *this;
  o.data = static_cast<char*>(data) + (row * ld + col) * bytes;
  return o;
}

Quantizer::Quantizer(float scale, int32_t zero_point, int64_t quant_min, int64_t quant_max)
    : inv_scale(1.0f / scale),
      zero_point(static_cast<float>(zero_point)),
      quant_min(static_cast<float>(quant_min)),
      quant_max(static_cast<float>(quant_max)) {}

#if QATX_INT16_GEMM
QATX_AVX2
#endif
bool Quantizer::operator()(const float* x, int16_t* dst, int64_t n) const {
  int64_t i = 0;
  bool nan = false;
#if QATX_INT16_GEMM
  // Eight at a time, the same float32 operations as math::quantize_value: rint(x * inv) (half to
  // even), + z, clamp; then - z, exact in float32, and a conversion of an integer value.
  const __m256 inv = _mm256_set1_ps(inv_scale), z = _mm256_set1_ps(zero_point), lo = _mm256_set1_ps(quant_min),
               hi = _mm256_set1_ps(quant_max);
  __m256 unordered = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 q = _mm256_add_ps(
        _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), z);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(q, q, _CMP_UNORD_Q));
    const __m256i v = _mm256_cvtps_epi32(_mm256_sub_ps(_mm256_min_ps(_mm256_max_ps(q, lo), hi), z));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
  }
  nan = _mm256_movemask_ps(unordered) != 0;
#endif
  for (; i < n; ++i) {
    const float q = math::quantize_value(x[i], inv_scale, zero_point, quant_min, quant_max);
    nan |= (q != q);
    dst[i] = static_cast<int16_t>(static_cast<int32_t>(q == q ? q - zero_point : 0.0f));
  }
  return !nan;
}

namespace {
// Centerer for uint8 or int8 codes, 16 at a time.
template <typename Code>
#if QATX_INT16_GEMM
QATX_AVX2
#endif
void center(const Code* q, int16_t* dst, int64_t n, const Centerer& c) {
  int64_t i = 0;
#if QATX_INT16_GEMM
  for (; i + 16 <= n; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), centered16(q + i, c));
#endif
  for (; i < n; ++i) dst[i] = static_cast<int16_t>(centered1(q[i], c));
}
}  // namespace

void Centerer::operator()(const uint8_t* q, int16_t* dst, int64_t n) const { center(q, dst, n, *this); }

void Centerer::operator()(const int8_t* q, int16_t* dst, int64_t n) const { center(q, dst, n, *this); }

}  // namespace int16_gemm
}  // namespace ops
}  // namespace qatx
