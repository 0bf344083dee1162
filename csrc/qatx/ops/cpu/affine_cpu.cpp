// CPU kernels of the affine ops. The math is qatx/kernels/quant_math.h; this file only loops.
//
// Work is split into blocks of kBlock elements (a multiple of 8, so each block owns whole
// bytes of the bit-packed mask) and the blocks into at::parallel_for chunks. Inside a block the
// qparams are either one value (per-tensor, or the block lies in one channel / group) or
// gathered into per-element arrays; both inner loops are plain float code that the compiler
// vectorizes, compiled for several ISAs (cpu_kernels.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "qatx/ops/affine_impl.h"
#include "qatx/ops/cpu/cpu_kernels.h"

namespace qatx {
namespace ops {
namespace {

using cpu::kBlock;
using cpu::PerElementQParams;
using cpu::UniformQParams;
using math::QParamIndex;

constexpr int64_t kGrainBlocks = cpu::kGrainElements / kBlock;

struct QParamsCpu {
  const float* scale;
  const float* zero_point;
  QParamIndex index;

  // Calls block(p0, n, qparams) for every block in [block_begin, block_end).
  template <typename BlockFn>
  QATX_ALWAYS_INLINE void for_each_block(int64_t numel, int64_t block_begin, int64_t block_end, BlockFn&& block) const {
    PerElementQParams gathered;
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t p0 = b * kBlock;
      const int64_t n = std::min(kBlock, numel - p0);
      if (index.channels == 1 || p0 / index.inner == (p0 + n - 1) / index.inner) {
        const int64_t c = index(p0);
        block(p0, n, UniformQParams{scale[c], 1.0f / scale[c], zero_point[c]});
        continue;
      }
      // Walk the channel counter instead of dividing per element.
      int64_t in_run = p0 % index.inner;
      int64_t c = index(p0);
      for (int64_t j = 0; j < n; ++j) {
        gathered.s[j] = scale[c];
        gathered.inv[j] = 1.0f / scale[c];
        gathered.z[j] = zero_point[c];
        if (++in_run == index.inner) {
          in_run = 0;
          if (++c == index.channels) c = 0;
        }
      }
      block(p0, n, gathered);
    }
  }
};

template <typename T, bool kWithMask, typename QP>
QATX_ALWAYS_INLINE void fake_quantize_block(const T* x, T* y, uint8_t* mask, int64_t n, const QP& qp, float qmin,
                                            float qmax) {
  uint8_t flags[kBlock];
  for (int64_t j = 0; j < n; ++j) {
    bool in_range;
    y[j] = static_cast<T>(math::fake_quantize_value(static_cast<float>(x[j]), qp.scale(j), qp.inv_scale(j),
                                                    qp.zero_point(j), qmin, qmax, in_range));
    flags[j] = in_range;
  }
  if constexpr (kWithMask) {
    for (int64_t j = n; j < ((n + 7) & ~int64_t(7)); ++j) flags[j] = 0;
    for (int64_t b = 0; b < (n + 7) / 8; ++b) mask[b] = math::pack_bits8(flags + 8 * b);
  }
}

template <typename T, bool kWithMask>
QATX_CPU_CLONES void fake_quantize_blocks(const T* x, T* y, uint8_t* mask, int64_t numel, int64_t block_begin,
                                          int64_t block_end, QParamsCpu qp, float qmin, float qmax) {
  qp.for_each_block(numel, block_begin, block_end, [&](int64_t p0, int64_t n, const auto& q) {
    fake_quantize_block<T, kWithMask>(x + p0, y + p0, kWithMask ? mask + p0 / 8 : nullptr, n, q, qmin, qmax);
  });
}

// One block of quantize: the float values first (the loop fake_quantize_block also runs), then
// the NaN check and the conversion as separate loops, each of which GCC vectorizes.
template <typename T, typename Int, typename QP>
QATX_ALWAYS_INLINE bool quantize_block(const T* x, Int* out, int64_t n, const QP& qp, float qmin, float qmax,
                                       Int int_min, Int int_max) {
  float v[kBlock];
  for (int64_t j = 0; j < n; ++j) {
    v[j] = math::quantize_value(static_cast<float>(x[j]), qp.inv_scale(j), qp.zero_point(j), qmin, qmax);
  }
  int32_t nan = 0;
  for (int64_t j = 0; j < n; ++j) nan |= v[j] != v[j];
  if constexpr (sizeof(Int) < sizeof(int32_t)) {
    // v is an integer in [quant_min, quant_max], which fits Int, or NaN (an error, reported by
    // the caller): a branch-free conversion.
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<Int>(static_cast<int32_t>(math::select(v[j] == v[j], v[j], qmin)));
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = math::to_quantized_int<Int>(v[j], int_min, int_max);
  }
  return nan != 0;
}

template <typename T, typename Int>
QATX_CPU_CLONES void quantize_blocks(const T* x, Int* out, int64_t numel, int64_t block_begin, int64_t block_end,
                                     QParamsCpu qp, int64_t quant_min, int64_t quant_max, bool& saw_nan) {
  bool nan = false;
  const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
  const Int int_min = static_cast<Int>(quant_min), int_max = static_cast<Int>(quant_max);
  qp.for_each_block(numel, block_begin, block_end, [&](int64_t p0, int64_t n, const auto& q) {
    nan |= quantize_block(x + p0, out + p0, n, q, qmin, qmax, int_min, int_max);
  });
  saw_nan = nan;
}

template <typename Int, typename T>
QATX_CPU_CLONES void dequantize_blocks(const Int* q, T* out, int64_t numel, int64_t block_begin, int64_t block_end,
                                       QParamsCpu qp) {
  qp.for_each_block(numel, block_begin, block_end, [&](int64_t p0, int64_t n, const auto& qpar) {
    for (int64_t j = 0; j < n; ++j)
      out[p0 + j] = static_cast<T>(math::dequantize_value(static_cast<float>(q[p0 + j]), qpar.scale(j), qpar.zero_point(j)));
  });
}

// grad where the mask bit is set, else +0. Selected on the bit patterns (an AND with an all-ones or
// all-zeros word), eight elements per mask byte: the loop vectorizes, where `bit ? grad : 0` (a
// conditional load) does not.
template <typename T>
QATX_CPU_CLONES void ste_backward_blocks(const T* grad, const uint8_t* mask, T* out, int64_t numel,
                                         int64_t block_begin, int64_t block_end) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 2, "float32, float16 or bfloat16");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  const Bits* g = reinterpret_cast<const Bits*>(grad);
  Bits* o = reinterpret_cast<Bits*>(out);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t p0 = b * kBlock;
    const int64_t n = std::min(kBlock, numel - p0);
    const uint8_t* m = mask + p0 / 8;
    const int64_t full = n / 8;
    for (int64_t byte = 0; byte < full; ++byte) {
      const uint32_t bits = m[byte];
      for (int k = 0; k < 8; ++k) {
        const int64_t p = p0 + 8 * byte + k;
        o[p] = g[p] & static_cast<Bits>(0u - ((bits >> k) & 1u));
      }
    }
    for (int64_t j = 8 * full; j < n; ++j) {
      o[p0 + j] = g[p0 + j] & static_cast<Bits>(0u - static_cast<uint32_t>(math::mask_bit(m[j >> 3], j & 7)));
    }
  }
}

int64_t num_blocks(int64_t numel) { return (numel + kBlock - 1) / kBlock; }

QParamsCpu qparams_cpu(const at::Tensor& scale, const at::Tensor& zero_point, QParamIndex index) {
  return {scale.const_data_ptr<float>(), zero_point.const_data_ptr<float>(), index};
}

}  // namespace

void CpuBackend::fake_quantize(const at::Tensor& x, at::Tensor& out, at::Tensor& mask, const at::Tensor& scale,
                               const at::Tensor& zero_point, QParamIndex index, int64_t quant_min, int64_t quant_max) {
  const QParamsCpu qp = qparams_cpu(scale, zero_point, index);
  const int64_t numel = x.numel();
  QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_fake_quantize_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    uint8_t* mp = mask.defined() ? mask.mutable_data_ptr<uint8_t>() : nullptr;
    at::parallel_for(0, num_blocks(numel), kGrainBlocks, [&](int64_t b0, int64_t b1) {
      if (mp)
        fake_quantize_blocks<scalar_t, true>(xp, yp, mp, numel, b0, b1, qp, quant_min, quant_max);
      else
        fake_quantize_blocks<scalar_t, false>(xp, yp, nullptr, numel, b0, b1, qp, quant_min, quant_max);
    });
  });
}

void CpuBackend::quantize(const at::Tensor& x, at::Tensor& out, const at::Tensor& scale, const at::Tensor& zero_point,
                          QParamIndex index, int64_t quant_min, int64_t quant_max) {
  const QParamsCpu qp = qparams_cpu(scale, zero_point, index);
  const int64_t numel = x.numel();
  std::atomic<bool> saw_nan{false};
  QATX_DISPATCH_FLOAT(x.scalar_type(), "qatx_quantize_cpu", [&] {
    dispatch_int_dtype(out.scalar_type(), [&](auto int_tag) {
      using Int = decltype(int_tag);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      Int* qp_out = out.mutable_data_ptr<Int>();
      at::parallel_for(0, num_blocks(numel), kGrainBlocks, [&](int64_t b0, int64_t b1) {
        bool nan = false;
        quantize_blocks<scalar_t, Int>(xp, qp_out, numel, b0, b1, qp, quant_min, quant_max, nan);
        if (nan) saw_nan = true;
      });
    });
  });
  TORCH_CHECK(!saw_nan, "qatx::quantize_*_affine: input contains NaN, which has no quantized value");
}

void CpuBackend::dequantize(const at::Tensor& q, at::Tensor& out, const at::Tensor& scale,
                            const at::Tensor& zero_point, QParamIndex index) {
  const QParamsCpu qp = qparams_cpu(scale, zero_point, index);
  const int64_t numel = q.numel();
  QATX_DISPATCH_FLOAT(out.scalar_type(), "qatx_dequantize_cpu", [&] {
    dispatch_int_dtype(q.scalar_type(), [&](auto int_tag) {
      using Int = decltype(int_tag);
      const Int* in = q.const_data_ptr<Int>();
      scalar_t* yp = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, num_blocks(numel), kGrainBlocks, [&](int64_t b0, int64_t b1) {
        dequantize_blocks<Int, scalar_t>(in, yp, numel, b0, b1, qp);
      });
    });
  });
}

void CpuBackend::ste_backward(const at::Tensor& grad, const at::Tensor& mask, at::Tensor& out) {
  const int64_t numel = grad.numel();
  QATX_DISPATCH_FLOAT(grad.scalar_type(), "qatx_ste_backward_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const uint8_t* mp = mask.const_data_ptr<uint8_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, num_blocks(numel), kGrainBlocks, [&](int64_t b0, int64_t b1) {
      ste_backward_blocks<scalar_t>(gp, mp, op, numel, b0, b1);
    });
  });
}

TORCH_LIBRARY_IMPL(qatx, CPU, m) { AffineKernels<CpuBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
