// Unit tests of qatx/kernels/histogram_math.h (torch-free; GoogleTest only): bin indices, the grid
// rule, exact rebinning, percentile ranks and the candidate searches on small histograms.
#include "qatx/kernels/histogram_math.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using namespace qatx::math;

TEST(HistogramMath, FloorIsExactAndHandlesNegativeUnderflow) {
  EXPECT_EQ(hist_floor(2.5f, 1.0f), 2);
  EXPECT_EQ(hist_floor(-2.5f, 1.0f), -3);
  EXPECT_EQ(hist_floor(-2.0f, 1.0f), -2);
  EXPECT_EQ(hist_floor(-0.0f, 1.0f), 0);
  // -2^-149 * 2^-20 rounds to -0, whose floor would be 0; the true floor is -1.
  EXPECT_EQ(hist_floor(-1e-45f, exp2_int(-20)), -1);
  EXPECT_EQ(hist_floor(1e-45f, exp2_int(-20)), 0);
}

TEST(HistogramMath, BinIgnoresNonFiniteAndOutOfGridValues) {
  const float inv = 1.0f, a = -2.0f, bins = 4.0f;  // bins [-2,-1) [-1,0) [0,1) [1,2)
  EXPECT_EQ(hist_bin(-2.0f, inv, a, bins), 0);
  EXPECT_EQ(hist_bin(-0.5f, inv, a, bins), 1);
  EXPECT_EQ(hist_bin(1.99f, inv, a, bins), 3);
  EXPECT_EQ(hist_bin(2.0f, inv, a, bins), 4);
  EXPECT_EQ(hist_bin(-2.5f, inv, a, bins), 4);
  EXPECT_EQ(hist_bin(std::numeric_limits<float>::quiet_NaN(), inv, a, bins), 4);
  EXPECT_EQ(hist_bin(std::numeric_limits<float>::infinity(), inv, a, bins), 4);
  EXPECT_EQ(hist_bin(3e38f, exp2_int(100), a, bins), 4);
}

TEST(HistogramMath, FitGridIsTheSmallestFittingExponent) {
  const HistGrid g = hist_fit_grid(-1.0f, 2.9f, -126, 16);  // bins -4 .. 11 of width 1/4
  EXPECT_EQ(g.e, -2);
  EXPECT_EQ(g.a, -4);
  const HistGrid g2 = hist_fit_grid(-1.0f, 3.25f, -126, 16);  // needs 18 bins of 1/4: w = 1/2
  EXPECT_EQ(g2.e, -1);
  EXPECT_EQ(g2.a, -2);
  const HistGrid z = hist_fit_grid(0.0f, 0.0f, -126, 16);
  EXPECT_EQ(z.e, -126);
  EXPECT_EQ(z.a, 0);
  // Precision floor: 1000 + tiny spread is binned no finer than 2^(9 - 22).
  EXPECT_EQ(hist_fit_grid(1000.0f, 1000.0f, -126, 2048).e, 9 - kHistPrecisionBits);
}

TEST(HistogramMath, RebinMergesOldBinsExactly) {
  const HistGrid from{-3, -5}, to{-1, -2};  // width 1/8 -> 1/2, every new edge is an old edge
  for (int64_t i = 0; i < 16; ++i) {
    const double left = (from.a + i) / 8.0;
    const int64_t j = hist_rebin_index(i, from, to);
    EXPECT_LE((to.a + j) / 2.0, left);
    EXPECT_GE((to.a + j + 1) / 2.0, left + 1.0 / 8.0);
  }
  EXPECT_EQ(hist_rebin_index(0, HistGrid{-126, -3}, HistGrid{10, -1}), 0);  // huge k: only the sign remains
  EXPECT_EQ(hist_rebin_index(5, HistGrid{-126, -3}, HistGrid{10, -1}), 1);
}

TEST(HistogramMath, PercentileRank) {
  EXPECT_EQ(percentile_rank(99.99, 10000), 9999);
  EXPECT_EQ(percentile_rank(100.0, 7), 7);
  EXPECT_EQ(percentile_rank(50.0, 7), 4);
  EXPECT_EQ(percentile_rank(1e-9, 7), 1);
}

HistSearch search(const std::vector<int64_t>& counts, HistGrid g, float lo, float hi, HistMethod m, int64_t qmin,
                  int64_t qmax, bool symmetric, std::vector<double>& scratch) {
  scratch.assign(hist_scratch_size(static_cast<int64_t>(counts.size())), 0.0);
  HistSearch s = make_hist_search(counts.data(), static_cast<int64_t>(counts.size()), g, lo, hi,
                                  HistSearchParams{m, 99.0, qmin, qmax, symmetric}, scratch.data());
  s.prepare();
  return s;
}

TEST(HistogramMath, PercentileOnAbsoluteValues) {
  // bins of width 1 from -8: 98 values in [0, 1), one in [-6, -5), one in [6, 7).
  std::vector<int64_t> counts(16, 0);
  counts[8] = 98, counts[2] = 1, counts[14] = 1;
  std::vector<double> scratch;
  const HistSearch s = search(counts, HistGrid{0, -8}, -5.5f, 6.5f, HistMethod::Percentile, -128, 127, true, scratch);
  const HistRange r = s.percentile_range();  // rank 99 of |x| lies in |x|-bin [5, 6)
  EXPECT_EQ(r.lo, -5.5f);
  EXPECT_EQ(r.hi, 6.0f);
}

TEST(HistogramMath, MseKeepsAUniformRangeAndEntropyIsFinite) {
  std::vector<int64_t> counts(64, 100);
  std::vector<double> scratch;
  const HistSearch s = search(counts, HistGrid{-4, -32}, -2.0f, 1.9375f, HistMethod::Mse, -128, 127, true, scratch);
  double best = 0.0;
  int64_t best_i = -1;
  for (int64_t i = 0; i < s.num_candidates(); ++i)
    if (hist_better(s.candidate_error(i), i, best, best_i)) best = s.candidate_error(i), best_i = i;
  ASSERT_GE(best_i, 0);
  EXPECT_EQ(s.candidate_range(best_i).lo, -2.0f);  // no clipping: the noise is tiny at 8 bits
  const HistSearch e = search(counts, HistGrid{-4, -32}, -2.0f, 1.9375f, HistMethod::Entropy, -8, 7, true, scratch);
  ASSERT_GT(e.num_candidates(), 0);
  for (int64_t i = 0; i < e.num_candidates(); ++i) EXPECT_TRUE(std::isfinite(e.candidate_error(i)));
}

}  // namespace
