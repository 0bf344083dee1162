// Histogram calibration math shared by the CPU and CUDA kernels (torch-free, like quant_math.h).
//
// Grid. A channel's histogram has `bins` bins of width w = 2^e; bin j covers
// [(a + j) w, (a + j + 1) w) for an integer offset a. Every edge is a multiple of w, so 0 is
// always an edge, and when the range grows the new width is w' = 2^k w: every new edge is an old
// edge, so each old bin lies inside exactly one new bin and the old counts merge exactly
// (new index = floor((a + j) / 2^k) - a'). Nothing is interpolated or spread.
//
// Fitting rule for observed data [lo, hi] (finite): e is the smallest integer with
//   e >= previous e (the grid never gets finer), e >= -126,
//   e >= ilogb(max(|lo|, |hi|)) - 22     (so |x| / w < 2^23: float32 bin indices are exact),
//   floor(hi / w) - floor(lo / w) < bins (the data fit);
// a = floor(lo / w) (left-aligned). A grid that already covers the data is kept unchanged.
// The data then fill more than bins / 4 bins unless their spread is below 2^-20 of their magnitude
// (finer bins than two float32 ulps would be pointless).
//
// Bin index of x: floor(x * 2^-e) - a, computed in float32. x * 2^-e is exact (a power-of-two
// scaling) unless it underflows; an underflow that rounds a negative product to -0 is mapped to
// -1, its true floor. So the CPU and CUDA kernels put every value in the same bin.
//
// Range searches (one channel; "x-bins" are the bins above, "|x|-bins" the histogram of |x|,
// whose bin k covers [k w, (k + 1) w) and collects x-bins k and -k-1):
//   percentile  symmetric: t = upper edge of the |x|-bin holding the r-th smallest |x|,
//               r = ceil(p N / 100); range [max(lo, -t), min(hi, t)].
//               asymmetric: hi' = upper edge of the x-bin holding the r-th smallest x,
//               lo' = lower edge of the x-bin holding the (N - r + 1)-th smallest x;
//               range [max(lo, lo'), min(hi, hi')].
//   mse         argmin over candidate clip ranges of the expected squared error with counts
//               spread uniformly inside their bins: s^2 / 12 per value inside the quantizer's
//               clip range [(qmin - z) s, (qmax - z) s], the exact integral of (x - clip)^2 for
//               the mass outside. Candidates: symmetric, t = min(k w, amax) for every |x|-bin edge
//               k w above the smallest |x| (s, z as calculate_qparams); asymmetric, every pair
//               (lo', hi') of x-bin edges with lo' <= 0 <= hi' inside the data (and 0), clipped
//               to [lo, hi] (s = (hi' - lo') / (qmax - qmin), z = clamp(qmin - rint(lo' / s))).
//   entropy     TensorRT-style KL search on the |x| histogram with L levels: for each i >= L
//               (threshold t = i w), P = |x|-bins 0..i-1 with the mass beyond added to bin i-1,
//               Q = bins 0..i-1 merged into L groups of floor(i / L) bins (the last group takes
//               the rest) and each group's count spread over its non-empty bins; minimise
//               KL(P || Q') = sum_{p > 0} p log(p / q') over normalised P, Q, where
//               Q' = (1 - 1e-4) Q + 1e-4 / i mixes in a little of the uniform distribution so
//               that the collected outliers landing in an empty bin cost a finite penalty
//               (TensorRT's published outline leaves that case infinite).
//               L = steps + 1 for symmetric ranges (128 for int8), qmax - qmin + 1 for
//               asymmetric one-sided data, (qmax - qmin) / 2 + 1 for asymmetric two-sided data.
// Ties pick the smallest candidate. An empty histogram gives [lo, hi] unchanged.
#pragma once

#include <cmath>
#include <cstdint>

#include "qatx/kernels/quant_math.h"

namespace qatx {
namespace math {

constexpr int kHistMinExponent = -126;
constexpr int kHistPrecisionBits = 22;
constexpr int64_t kHistMinBins = 16;
constexpr int64_t kHistMaxBins = int64_t{1} << 20;
// Weight of the uniform distribution mixed into Q by the entropy search (finite KL everywhere).
constexpr double kEntropySmoothing = 1e-4;
// Range search methods (the op's `method` string maps to these).
enum class HistMethod : int { Percentile = 0, Mse = 1, Entropy = 2 };

struct HistGrid {
  int32_t e;  // bin width 2^e
  int32_t a;  // bin j covers [(a + j) 2^e, (a + j + 1) 2^e)
};

// 2^e as float32, e in [-149, 127].
QATX_HOST_DEVICE float exp2_int(int e) { return ldexpf(1.0f, e); }

// floor(y), exact for every float. On the host it is formed from rint, which GCC vectorizes
// (floorf is left scalar under the default -ftrapping-math).
QATX_HOST_DEVICE float floor_float(float y) {
#if defined(__CUDA_ARCH__)
  return floorf(y);
#else
  const float r = round_half_even(y);
  return r - select(r > y, 1.0f, 0.0f);
#endif
}

// floor(x * inv_width) as an integer (|result| < 2^24 for data the grid was fitted to).
QATX_HOST_DEVICE int32_t hist_floor(float x, float inv_width) {
  const float f = floor_float(x * inv_width);
  // A negative product that underflowed to -0 has floor -1.
  return static_cast<int32_t>(select((x < 0.0f) & (f >= 0.0f), -1.0f, f));
}

QATX_HOST_DEVICE int ilog2_floor(int64_t n) {
  int r = 0;
  while (n > 1) {
    n >>= 1;
    ++r;
  }
  return r;
}

QATX_HOST_DEVICE bool hist_grid_covers(HistGrid g, int64_t bins, float lo, float hi) {
  const float inv = exp2_int(-g.e);
  return hist_floor(lo, inv) >= g.a && static_cast<int64_t>(hist_floor(hi, inv)) < g.a + bins;
}

// The fitting rule above for finite lo <= hi, with e >= min_e.
QATX_HOST_DEVICE HistGrid hist_fit_grid(float lo, float hi, int min_e, int64_t bins) {
  const float amax = fmaxf(fabsf(lo), fabsf(hi));
  int e = min_e > kHistMinExponent ? min_e : kHistMinExponent;
  if (amax > 0.0f) {
    const int p = ilogbf(amax) - kHistPrecisionBits;
    e = p > e ? p : e;
  }
  const double span = static_cast<double>(hi) - static_cast<double>(lo);
  if (span > 0.0) {
    const int s = ilogb(span) - ilog2_floor(bins);  // at most two steps below the answer
    e = s > e ? s : e;
  }
  for (;;) {
    const float inv = exp2_int(-e);
    const int32_t l = hist_floor(lo, inv);
    if (static_cast<int64_t>(hist_floor(hi, inv)) - l < bins) return HistGrid{e, l};
    ++e;
  }
}

// Index in grid `to` of bin i of grid `from` (to.e >= from.e): exact, see the header comment.
QATX_HOST_DEVICE int64_t hist_rebin_index(int64_t i, HistGrid from, HistGrid to) {
  const int64_t g = static_cast<int64_t>(from.a) + i;
  const int k = to.e - from.e;
  // Arithmetic shift = floor division by 2^k; |g| < 2^25, so k >= 40 leaves only the sign.
  const int64_t merged = k >= 40 ? (g < 0 ? -1 : 0) : (g >> k);
  return merged - to.a;
}

// One channel's state after a batch whose finite values span [batch_lo, batch_hi] (empty when
// batch_lo > batch_hi): the bounds become the union, the grid is kept when it covers them and
// refitted otherwise (never finer than before). An empty state has lo > hi.
struct HistUpdate {
  HistGrid grid;
  float lo, hi;
};

QATX_HOST_DEVICE HistUpdate hist_update(HistGrid grid, float lo, float hi, float batch_lo, float batch_hi,
                                        int64_t bins) {
  const bool had = lo <= hi, got = batch_lo <= batch_hi;
  if (!got) return HistUpdate{grid, lo, hi};
  const float nlo = had ? fminf(lo, batch_lo) : batch_lo, nhi = had ? fmaxf(hi, batch_hi) : batch_hi;
  if (had && hist_grid_covers(grid, bins, nlo, nhi)) return HistUpdate{grid, nlo, nhi};
  return HistUpdate{hist_fit_grid(nlo, nhi, had ? grid.e : kHistMinExponent, bins), nlo, nhi};
}

// Bin of x in the grid: floor(x * 2^-e) - a when that lies in [0, bins), else `bins` (one past
// the last bin, where the kernels collect what they ignore): NaN, +-Inf and values outside the
// grid. inv_width = 2^-e, a and bins as floats.
QATX_HOST_DEVICE int32_t hist_bin(float x, float inv_width, float a, float bins) {
  const float f = floor_float(x * inv_width);
  const float g = select((x < 0.0f) & (f >= 0.0f), -1.0f, f);
  // Inside the grid g and a are integers below 2^24 whose difference is in [0, bins): exact.
  const float r = g - a;
  return static_cast<int32_t>(select((r >= 0.0f) & (r < bins), r, bins));
}

// r = ceil(p N / 100) in [1, N]; the relative slack of 1e-12 absorbs the binary rounding of
// decimal percentiles (99.99 of 10000 values is rank 9999, not 10000).
QATX_HOST_DEVICE int64_t percentile_rank(double percentile, int64_t n) {
  const double r = percentile * static_cast<double>(n) / 100.0;
  int64_t k = static_cast<int64_t>(ceil(r - r * 1e-12));
  if (k < 1) k = 1;
  if (k > n) k = n;
  return k;
}

struct HistSearchParams {
  HistMethod method;
  double percentile;
  int64_t quant_min, quant_max;
  bool symmetric;
};

struct HistRange {
  float lo, hi;
};

// Doubles of scratch one channel's search needs.
QATX_HOST_DEVICE int64_t hist_scratch_size(int64_t bins) { return 5 * bins + 4; }

// One channel's histogram and the range searches on it. prepare() fills the scratch serially;
// afterwards candidate_error(i) is independent per candidate (CUDA threads share a channel).
// Coordinates are in bin units relative to the grid: v = x / w - a, so bin j is [j, j + 1).
struct HistSearch {
  const int64_t* counts;
  int64_t bins;
  HistGrid grid;
  float lo, hi;  // observed bounds; lo > hi when empty
  HistSearchParams p;
  double* scratch;

  // Filled by prepare().
  int64_t total;
  double w;
  int64_t k0, k1;           // |x|-bin window [k0, k1) (absolute |x|-bin indices)
  int64_t lo_g0, lo_n;      // asymmetric lo candidates: edges lo_g0 .. lo_g0 + lo_n - 1 (global)
  int64_t hi_g0, hi_n;      // asymmetric hi candidates
  bool lo_zero, hi_zero;    // an extra candidate 0 on that side (appended last)
  int64_t levels;           // entropy levels

  // scratch: [0, B) |x| counts of window k0..; then prefix sums of the x-bins P0, P1, P2
  // (B + 1 each, P2 with the within-bin variance 1/12), then |x| prefix H (B + 1).
  QATX_HOST_DEVICE double* abs_h() const { return scratch; }
  QATX_HOST_DEVICE double* p0() const { return scratch + bins; }
  QATX_HOST_DEVICE double* p1() const { return scratch + 2 * bins + 1; }
  QATX_HOST_DEVICE double* p2() const { return scratch + 3 * bins + 2; }
  QATX_HOST_DEVICE double* abs_prefix() const { return scratch + 4 * bins + 3; }

  QATX_HOST_DEVICE int64_t count_at(int64_t g) const {  // count of the x-bin with global index g
    const int64_t j = g - grid.a;
    return (j >= 0 && j < bins) ? counts[j] : 0;
  }
  QATX_HOST_DEVICE float amax() const { return fmaxf(fabsf(lo), fabsf(hi)); }
  QATX_HOST_DEVICE int64_t steps() const {
    if (p.quant_min < 0) return p.quant_min + p.quant_max < 0 ? p.quant_max : -p.quant_min;
    const int64_t z = (p.quant_min + p.quant_max + 1) / 2;
    return (z - p.quant_min) < (p.quant_max - z) ? (z - p.quant_min) : (p.quant_max - z);
  }
  QATX_HOST_DEVICE int64_t symmetric_zero() const {
    return p.quant_min < 0 ? 0 : (p.quant_min + p.quant_max + 1) / 2;
  }

  QATX_HOST_DEVICE void prepare() {
    w = ldexp(1.0, grid.e);
    total = 0;
    for (int64_t j = 0; j < bins; ++j) total += counts[j];
    const int64_t a = grid.a;
    if (a >= 0) {
      k0 = a;
      k1 = a + bins;
    } else if (a + bins <= 0) {
      k0 = -(a + bins);
      k1 = -a;
    } else {
      k0 = 0;
      k1 = -a > a + bins ? -a : a + bins;
    }
    double* h = abs_h();
    for (int64_t k = k0; k < k1; ++k) h[k - k0] = static_cast<double>(count_at(k) + count_at(-k - 1));
    double* H = abs_prefix();
    H[0] = 0.0;
    for (int64_t k = 0; k < k1 - k0; ++k) H[k + 1] = H[k] + h[k];
    double *P0 = p0(), *P1 = p1(), *P2 = p2();
    P0[0] = P1[0] = P2[0] = 0.0;
    for (int64_t j = 0; j < bins; ++j) {
      const double n = static_cast<double>(counts[j]), c = j + 0.5;
      P0[j + 1] = P0[j] + n;
      P1[j + 1] = P1[j] + n * c;
      P2[j + 1] = P2[j] + n * (c * c + 1.0 / 12.0);
    }
    // Asymmetric MSE candidates: edges inside the data on each side of 0, plus 0 itself.
    const float inv = exp2_int(-grid.e);
    const int64_t gl = hist_floor(lo, inv), gh = static_cast<int64_t>(hist_floor(hi, inv)) + 1;
    if (lo >= 0.0f) {
      lo_g0 = 0, lo_n = 0, lo_zero = true;
    } else {
      const int64_t end = gh < 0 ? gh : 0;
      lo_g0 = gl, lo_n = end - gl + 1, lo_zero = end < 0;
    }
    if (hi <= 0.0f) {
      hi_g0 = 0, hi_n = 0, hi_zero = true;
    } else {
      const int64_t start = gl > 0 ? gl : 0;
      hi_g0 = start, hi_n = gh - start + 1, hi_zero = start > 0;
    }
    if (p.symmetric)
      levels = steps() + 1;
    else
      levels = (lo >= 0.0f || hi <= 0.0f) ? p.quant_max - p.quant_min + 1 : (p.quant_max - p.quant_min) / 2 + 1;
  }

  QATX_HOST_DEVICE bool empty() const { return !(lo <= hi) || total == 0; }

  // ---- percentile (serial) ----
  QATX_HOST_DEVICE HistRange percentile_range() const {
    const int64_t r = percentile_rank(p.percentile, total);
    if (p.symmetric) {
      const double* h = abs_h();
      double cum = 0.0;
      double t = amax();
      for (int64_t k = k0; k < k1; ++k) {
        cum += h[k - k0];
        if (cum >= static_cast<double>(r)) {
          t = (k + 1) * w;
          break;
        }
      }
      return clip_symmetric(t);
    }
    const int64_t r_lo = total - r + 1;
    int64_t cum = 0;
    double lo_c = lo, hi_c = hi;
    bool have_lo = false;
    for (int64_t j = 0; j < bins; ++j) {
      cum += counts[j];
      if (!have_lo && cum >= r_lo) {
        lo_c = (grid.a + j) * w;
        have_lo = true;
      }
      if (cum >= r) {
        hi_c = (grid.a + j + 1) * w;
        break;
      }
    }
    return HistRange{static_cast<float>(fmax(lo_c, static_cast<double>(lo))),
                     static_cast<float>(fmin(hi_c, static_cast<double>(hi)))};
  }

  QATX_HOST_DEVICE HistRange clip_symmetric(double t) const {
    const double tt = fmin(t, static_cast<double>(amax()));
    return HistRange{static_cast<float>(fmax(-tt, static_cast<double>(lo))),
                     static_cast<float>(fmin(tt, static_cast<double>(hi)))};
  }

  // ---- candidate searches (mse, entropy) ----
  QATX_HOST_DEVICE int64_t num_candidates() const {
    if (p.method == HistMethod::Mse) {
      if (p.symmetric) return amax() > 0.0f ? k1 - k0 : 0;
      return (lo_n + lo_zero) * (hi_n + hi_zero);
    }
    // entropy: i in [max(levels, k0 + 1), k1]
    const int64_t first = levels > k0 + 1 ? levels : k0 + 1;
    return k1 >= first ? k1 - first + 1 : 0;
  }

  QATX_HOST_DEVICE double sym_t(int64_t i) const {
    return fmin((k0 + 1 + i) * w, static_cast<double>(amax()));
  }
  QATX_HOST_DEVICE double asym_lo(int64_t i) const {
    return i < lo_n ? fmax((lo_g0 + i) * w, static_cast<double>(lo)) : 0.0;
  }
  QATX_HOST_DEVICE double asym_hi(int64_t i) const {
    if (hi_zero) return i == 0 ? 0.0 : fmin((hi_g0 + i - 1) * w, static_cast<double>(hi));
    return fmin((hi_g0 + i) * w, static_cast<double>(hi));
  }
  QATX_HOST_DEVICE int64_t entropy_i(int64_t c) const { return (levels > k0 + 1 ? levels : k0 + 1) + c; }

  // Expected squared error (in bin units squared) of quantizing with step s and clip [cl, ch]
  // (bin units relative to the grid).
  QATX_HOST_DEVICE double mse_error(double s, double cl, double ch) const {
    const double *P0 = p0(), *P1 = p1(), *P2 = p2();
    const double B = static_cast<double>(bins);
    // Mass above ch and its error.
    double mass_hi = 0.0, err = 0.0;
    const double fh = floor(ch);
    if (fh < 0.0) {
      mass_hi = P0[bins];
      err += P2[bins] - 2.0 * ch * P1[bins] + ch * ch * P0[bins];
    } else if (fh < B) {
      const int64_t jh = static_cast<int64_t>(fh);
      const double n = static_cast<double>(counts[jh]), f = jh + 1 - ch;
      mass_hi = (P0[bins] - P0[jh + 1]) + n * f;
      err += (P2[bins] - P2[jh + 1]) - 2.0 * ch * (P1[bins] - P1[jh + 1]) + ch * ch * (P0[bins] - P0[jh + 1]) +
             n * f * f * f / 3.0;
    }
    double mass_lo = 0.0;
    const double fl = floor(cl);
    if (fl >= B) {
      mass_lo = P0[bins];
      err += P2[bins] - 2.0 * cl * P1[bins] + cl * cl * P0[bins];
    } else if (fl >= 0.0) {
      const int64_t jl = static_cast<int64_t>(fl);
      const double n = static_cast<double>(counts[jl]), f = cl - jl;
      mass_lo = P0[jl] + n * f;
      err += P2[jl] - 2.0 * cl * P1[jl] + cl * cl * P0[jl] + n * f * f * f / 3.0;
    }
    const double inside = P0[bins] - mass_hi - mass_lo;
    return err + (inside > 0.0 ? inside : 0.0) * s * s / 12.0;
  }

  // Error of candidate i (+inf where undefined); range_of(i) is the range it stands for.
  QATX_HOST_DEVICE double candidate_error(int64_t i) const {
    const double inf = HUGE_VAL;
    const double qmin = static_cast<double>(p.quant_min), qmax = static_cast<double>(p.quant_max);
    if (p.method == HistMethod::Mse) {
      double s, z;
      if (p.symmetric) {
        s = sym_t(i) / static_cast<double>(steps()) / w;
        z = static_cast<double>(symmetric_zero());
      } else {
        const int64_t nh = hi_n + hi_zero;
        const double l = asym_lo(i / nh) / w, h = asym_hi(i % nh) / w;
        s = (h - l) / (qmax - qmin);
        if (!(s > 0.0)) return inf;
        z = rint(qmin - rint(l / s));
        z = z < qmin ? qmin : (z > qmax ? qmax : z);
      }
      if (!(s > 0.0)) return inf;
      return mse_error(s, (qmin - z) * s - grid.a, (qmax - z) * s - grid.a);
    }
    return entropy_kl(entropy_i(i));
  }

  QATX_HOST_DEVICE double entropy_kl(int64_t i) const {
    const double* h = abs_h();
    const double* H = abs_prefix();
    const double n_total = static_cast<double>(total);
    const double kept = H[i - k0];  // mass of |x|-bins below i
    if (!(kept > 0.0)) return HUGE_VAL;
    const double outliers = n_total - kept;
    const int64_t merged = i / levels;
    const double uniform = kEntropySmoothing / static_cast<double>(i);
    double kl = 0.0;
    for (int64_t g = k0 / merged < levels ? k0 / merged : levels - 1; g < levels; ++g) {
      const int64_t gs = g * merged, ge = g == levels - 1 ? i : gs + merged;
      const int64_t b = gs > k0 ? gs : k0;
      if (ge <= b) continue;
      double sum = 0.0;
      int64_t nonzero = 0;
      for (int64_t k = b; k < ge; ++k) {
        sum += h[k - k0];
        nonzero += h[k - k0] != 0.0;
      }
      for (int64_t k = b; k < ge; ++k) {
        const double pk = h[k - k0] + (k == i - 1 ? outliers : 0.0);
        if (pk == 0.0) continue;
        const double q = h[k - k0] != 0.0 ? sum / static_cast<double>(nonzero) / kept : 0.0;
        const double pn = pk / n_total, qn = (1.0 - kEntropySmoothing) * q + uniform;
        kl += pn * log(pn / qn);
      }
    }
    return kl;
  }

  QATX_HOST_DEVICE HistRange candidate_range(int64_t i) const {
    if (p.method == HistMethod::Mse) {
      if (p.symmetric) return clip_symmetric(sym_t(i));
      const int64_t nh = hi_n + hi_zero;
      return HistRange{static_cast<float>(fmax(asym_lo(i / nh), static_cast<double>(lo))),
                       static_cast<float>(fmin(asym_hi(i % nh), static_cast<double>(hi)))};
    }
    return clip_symmetric(entropy_i(i) * w);
  }

  // The result when there is no candidate: the data's own range (symmetric: widened to +-amax
  // only through calculate_qparams, so [lo, hi] is returned as is).
  QATX_HOST_DEVICE HistRange full_range() const { return HistRange{lo <= hi ? lo : 0.0f, lo <= hi ? hi : 0.0f}; }
};

// A search over one row (value-initialised, then the inputs set; prepare() fills the rest).
QATX_HOST_DEVICE HistSearch make_hist_search(const int64_t* counts, int64_t bins, HistGrid grid, float lo, float hi,
                                             HistSearchParams params, double* scratch) {
  HistSearch s{};
  s.counts = counts;
  s.bins = bins;
  s.grid = grid;
  s.lo = lo;
  s.hi = hi;
  s.p = params;
  s.scratch = scratch;
  return s;
}

// (error, index) order for the argmin: smaller error, then smaller index; NaN never wins.
QATX_HOST_DEVICE bool hist_better(double err, int64_t i, double best_err, int64_t best_i) {
  if (!(err == err)) return false;
  if (best_i < 0) return err < HUGE_VAL;
  return err < best_err || (err == best_err && i < best_i);
}

}  // namespace math
}  // namespace qatx
