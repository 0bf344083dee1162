// CPU kernels of the INT8 ops. Linear and (non-transposed, per-tensor/-channel) convolution run
// on FBGEMM, the int8 GEMM library inside libtorch_cpu: the input is quantized by our own loop
// (bit-identical to the fake-quantize forward) into uint8, packed (rows, or im2col rows for a
// convolution), multiplied with the cached packed int8 weight with int32 accumulation, and
// dequantized in FBGEMM's float epilogue (ReQuantizeForFloat, ReLU fused). Everything else
// (per-group weights, transposed convolutions, a CPU without AVX2) takes the exact reference
// route of int8_args.cpp.
//
// Exactness on AVX2: FBGEMM's u8*s8 kernels add two neighbouring products in int16 with
// saturation (vpmaddubsw) before widening, so a pair of large activations meeting a pair of large
// same-sign weights would saturate. For each packed weight we compute the largest sum of two
// neighbouring positive (and negative) weights and from it the activation bound T below which no
// pair can saturate. Activations are split a = min(a, T) + r: the GEMM sees min(a, T), and the
// residual r (rare: only values above T, e.g. the top ~35% of the uint8 range for a typical
// weight) is added exactly afterwards, by a sparse int32 pass when few values exceed T and by a
// second GEMM otherwise. The integer result is therefore always the exact sum.
#include "qatx/ops/int8_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "qatx/kernels/quant_math.h"

#if defined(__x86_64__) || defined(_M_X64)
#define QATX_WITH_FBGEMM 1
#include <fbgemm/Fbgemm.h>
#else
#define QATX_WITH_FBGEMM 0
#endif

namespace qatx {
namespace ops {
namespace {

#if QATX_WITH_FBGEMM

// ---------------------------------------------------------------------------------------------
// Packed weights, cached per weight tensor.

// The packed form of one int8 weight seen as G groups of [out/G, Kg] (rows = output channels,
// each row's Kg reduction elements in the order the packed A matrix uses).
struct PackedWeight {
  std::unique_ptr<fbgemm::PackBMatrix<int8_t>> packed;
  int64_t out = 0, kg = 0, groups = 1;
  std::vector<int32_t> col_offsets;  // sum_k w[c, k] - Kg * z_w[c]  (FBGEMM's column offsets)
  std::vector<int32_t> zero_points;  // per output channel (expanded)
  bool symmetric = true;             // every zero point is 0
  std::vector<int16_t> centered_t;   // (w - z_w) as [G][Kg][out/G], for the sparse residual pass
  int64_t t_bound = 255;             // activations <= t_bound never saturate an int16 pair
};

// Largest activation a with a * (w_k + w_k+1) inside int16 for every neighbouring pair (both
// parities, so the bound holds however the kernel pairs the reduction elements).
int64_t saturation_free_bound(const int8_t* w, int64_t rows, int64_t kg) {
  int64_t pos = 1, neg = 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* p = w + r * kg;
    for (int64_t k = 0; k + 1 < kg; ++k) {
      const int64_t a = p[k], b = p[k + 1];
      pos = std::max(pos, std::max<int64_t>(a, 0) + std::max<int64_t>(b, 0));
      neg = std::max(neg, std::max<int64_t>(-a, 0) + std::max<int64_t>(-b, 0));
    }
    if (kg == 1) {
      pos = std::max<int64_t>(pos, std::max<int64_t>(p[0], 0));
      neg = std::max<int64_t>(neg, std::max<int64_t>(-p[0], 0));
    }
  }
  return std::min<int64_t>({255, 32767 / pos, 32768 / neg});
}

// `w_rows`: the weight as [out, Kg] rows (groups stacked: rows g*out/G .. of group g).
std::shared_ptr<PackedWeight> pack_weight(const at::Tensor& w_rows, const at::Tensor& zero_point, int64_t groups) {
  auto p = std::make_shared<PackedWeight>();
  p->out = w_rows.size(0);
  p->kg = w_rows.size(1);
  p->groups = groups;
  const int8_t* w = w_rows.const_data_ptr<int8_t>();
  const at::Tensor z = zero_point.to(at::kInt).contiguous().expand({p->out}).contiguous();
  p->zero_points.assign(z.const_data_ptr<int32_t>(), z.const_data_ptr<int32_t>() + p->out);
  p->symmetric = std::all_of(p->zero_points.begin(), p->zero_points.end(), [](int32_t v) { return v == 0; });
  p->col_offsets.resize(p->out);
  const int64_t og = p->out / groups;
  p->centered_t.resize(p->out * p->kg);
  for (int64_t c = 0; c < p->out; ++c) {
    int32_t sum = 0;
    const int64_t g = c / og, j = c % og;
    for (int64_t k = 0; k < p->kg; ++k) {
      sum += w[c * p->kg + k];
      p->centered_t[(g * p->kg + k) * og + j] = static_cast<int16_t>(w[c * p->kg + k] - p->zero_points[c]);
    }
    p->col_offsets[c] = sum - static_cast<int32_t>(p->kg) * p->zero_points[c];
  }
  p->t_bound = saturation_free_bound(w, p->out, p->kg);
  // Rows of output channels with Kg reduction elements: FBGEMM's "transposed" B of G groups.
  p->packed = std::make_unique<fbgemm::PackBMatrix<int8_t>>(fbgemm::matrix_op_t::Transpose,
                                                            static_cast<int32_t>(p->kg * groups),
                                                            static_cast<int32_t>(og), w,
                                                            static_cast<int32_t>(p->kg), nullptr,
                                                            static_cast<int>(groups));
  return p;
}

// The cache: one entry per live weight storage. An entry holds a weak reference to the storage,
// so a freed weight's address can never alias a new one, and records the weight's version
// counter, so an in-place change (load_state_dict, copy_) repacks. Expired entries are dropped
// on every insertion.
class PackedWeightCache {
 public:
  std::shared_ptr<PackedWeight> get(const at::Tensor& weight, const at::Tensor& zero_point, int64_t groups, int kind,
                                    const std::function<at::Tensor()>& rows) {
    c10::StorageImpl* storage = weight.storage().unsafeGetStorageImpl();
    const int64_t version = weight._version();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& e : entries_) {
        if (e.storage_raw == storage && !e.storage.expired() && e.version == version &&
            e.offset == weight.storage_offset() && e.sizes == weight.sizes().vec() &&
            e.strides == weight.strides().vec() && e.groups == groups && e.kind == kind &&
            e.zero_point_version == zero_point._version() && e.zero_point_data == zero_point.const_data_ptr()) {
          return e.packed;
        }
      }
    }
    auto packed = pack_weight(rows(), zero_point, groups);  // outside the lock: packing can be slow
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.remove_if([](const Entry& e) { return e.storage.expired(); });
    entries_.push_back(Entry{c10::weak_intrusive_ptr<c10::StorageImpl>(weight.storage().getWeakStorageImpl()),
                             storage, version, weight.storage_offset(), weight.sizes().vec(), weight.strides().vec(),
                             groups, kind, zero_point._version(), zero_point.const_data_ptr(), packed});
    return packed;
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    c10::StorageImpl* storage_raw;
    int64_t version;
    int64_t offset;
    std::vector<int64_t> sizes, strides;
    int64_t groups;
    int kind;
    int64_t zero_point_version;
    const void* zero_point_data;
    std::shared_ptr<PackedWeight> packed;
  };
  std::mutex mutex_;
  std::list<Entry> entries_;
};

PackedWeightCache& cache() {
  static PackedWeightCache c;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Activations.

// q + shift as uint8 for the float input (linear order), with q exactly the fake-quantize
// forward's integer; shift = -quant_min for signed ranges (128 for int8). Errors on NaN (it has no integer).
void quantize_to_u8(const float* x, uint8_t* out, int64_t n, float scale, int32_t zero_point, int64_t quant_min,
                    int64_t quant_max, int32_t shift, const char* op) {
  const float inv = 1.0f / scale;
  const float z = static_cast<float>(zero_point), lo = static_cast<float>(quant_min),
              hi = static_cast<float>(quant_max);
  std::atomic<bool> nan{false};
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    bool bad = false;
    for (int64_t i = b; i < e; ++i) {
      const float q = math::quantize_value(x[i], inv, z, lo, hi);
      bad |= (q != q);
      out[i] = static_cast<uint8_t>(static_cast<int32_t>(q == q ? q : lo) + shift);
    }
    if (bad) nan = true;
  });
  TORCH_CHECK(!nan.load(), op, ": input contains NaN, which has no quantized value");
}

// Splits a (in place) into min(a, t) and returns per-row residual counts.
std::vector<int64_t> split_residual(uint8_t* a, uint8_t* residual, int64_t rows, int64_t cols, int64_t t) {
  std::vector<int64_t> counts(rows, 0);
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(cols, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t cnt = 0;
      uint8_t* p = a + r * cols;
      uint8_t* q = residual + r * cols;
      for (int64_t k = 0; k < cols; ++k) {
        const int32_t v = p[k];
        const int32_t over = v > t ? v - static_cast<int32_t>(t) : 0;
        q[k] = static_cast<uint8_t>(over);
        p[k] = static_cast<uint8_t>(v - over);
        cnt += over != 0;
      }
      counts[r] = cnt;
    }
  });
  return counts;
}

// ---------------------------------------------------------------------------------------------
// GEMM driver: y = epilogue(A * B) with A given by make_pack_a(thread buffers).

template <typename PackA, typename MakeA>
void run_gemm(const PackedWeight& pw, MakeA&& make_a, int64_t m, float* y, float a_scale, int32_t a_zero_point,
              const float* w_scale, bool per_channel, const float* bias, bool relu) {
  std::vector<int32_t> acc_buffer(static_cast<size_t>(m * pw.out));
  const int num_tasks = at::get_num_threads();
  // fbgemmPacked splits the rows and groups among num_tasks callers; each packs its own A blocks.
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> row_offsets(PackA::rowOffsetBufferSize());
    for (int64_t task = begin; task < end; ++task) {
      auto pack_a = make_a(row_offsets.data());
      fbgemm::DoNothing<float, float> done;
      auto launch = [&](auto gran, auto fuse) {
        constexpr fbgemm::QuantizationGranularity G = decltype(gran)::value;
        constexpr bool R = decltype(fuse)::value;
        // ReQuantizeForFloat indexes its per-channel arrays by the column of the whole output
        // (group offset included), so the arrays are passed whole.
        fbgemm::ReQuantizeForFloat<R, G> out(done, a_scale, w_scale, a_zero_point, pw.zero_points.data(),
                                             pack_a->getRowOffsetBuffer(), pw.col_offsets.data(), bias,
                                             static_cast<uint32_t>(pw.out), static_cast<int>(pw.groups));
        fbgemm::fbgemmPacked(*pack_a, *pw.packed, y, acc_buffer.data(), static_cast<uint32_t>(pw.out), out,
                             static_cast<int>(task), num_tasks);
      };
      using PerTensor = std::integral_constant<fbgemm::QuantizationGranularity,
                                               fbgemm::QuantizationGranularity::TENSOR>;
      using PerChannel = std::integral_constant<fbgemm::QuantizationGranularity,
                                                fbgemm::QuantizationGranularity::OUT_CHANNEL>;
      if (per_channel) {
        relu ? launch(PerChannel{}, std::true_type{}) : launch(PerChannel{}, std::false_type{});
      } else {
        relu ? launch(PerTensor{}, std::true_type{}) : launch(PerTensor{}, std::false_type{});
      }
    }
  });
}

// Per output channel scale (expanded), as float32.
std::vector<float> expand_scales(const at::Tensor& weight_scale, int64_t out) {
  const at::Tensor s = weight_scale.to(at::kFloat).reshape({-1}).expand({out}).contiguous();
  return std::vector<float>(s.const_data_ptr<float>(), s.const_data_ptr<float>() + out);
}

// bias[c] * s_in * s_w[c] as float32 (FBGEMM adds it after scaling the accumulator).
std::vector<float> scaled_bias(const std::optional<at::Tensor>& bias, float s_in, const std::vector<float>& s_w) {
  if (!bias.has_value() || !bias->defined()) return {};
  const at::Tensor b = bias->contiguous();
  const int32_t* p = b.const_data_ptr<int32_t>();
  std::vector<float> out(s_w.size());
  for (size_t c = 0; c < s_w.size(); ++c) {
    out[c] = static_cast<float>(static_cast<double>(p[c]) * static_cast<double>(s_in) * static_cast<double>(s_w[c]));
  }
  return out;
}

// y[r, c] += float(corr[r, c]) * s_in * s_w[c], then ReLU when asked.
void add_correction(float* y, const int32_t* corr, int64_t rows, int64_t out, float s_in, const std::vector<float>& sw,
                    bool relu) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / out), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      for (int64_t c = 0; c < out; ++c) {
        float v = y[r * out + c] + static_cast<float>(corr[r * out + c]) * (s_in * sw[c]);
        y[r * out + c] = relu ? std::max(v, 0.0f) : v;
      }
    }
  });
}

void relu_inplace(float* y, int64_t n) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] = std::max(y[i], 0.0f);
  });
}

// Whether the residual is sparse enough for the scalar pass (else a second GEMM).
bool residual_is_sparse(int64_t nonzeros, int64_t total) { return nonzeros * 10 <= total; }

// ---------------------------------------------------------------------------------------------
// Linear.

at::Tensor linear_fbgemm(const at::Tensor& input, float s_in, int32_t z_in, int64_t quant_min, int64_t quant_max,
                         const at::Tensor& weight, const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                         const std::optional<at::Tensor>& bias, bool relu, const char* op) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor x = input.contiguous();
  const int64_t m = x.numel() / k;
  const int32_t shift = static_cast<int32_t>(std::max<int64_t>(0, -quant_min));  // into [0, 255]
  const auto pw = cache().get(weight, weight_zero_point, 1, /*kind=*/0, [&] { return weight.contiguous(); });
  at::Tensor out = at::empty_symint(int8::linear_output_shape(input, weight), input.options());
  if (m == 0) return out;
  std::vector<uint8_t> a(static_cast<size_t>(m * k));
  quantize_to_u8(x.const_data_ptr<float>(), a.data(), m * k, s_in, z_in, quant_min, quant_max, shift, op);
  const std::vector<float> sw = expand_scales(weight_scale, n);
  const std::vector<float> b = scaled_bias(bias, s_in, sw);
  const bool per_channel = weight_scale.numel() > 1;
  const int32_t zp = z_in + shift;
  float* y = out.mutable_data_ptr<float>();

  std::vector<uint8_t> residual;
  int64_t nonzeros = 0;
  std::vector<int64_t> counts;
  if (quant_max + shift > pw->t_bound) {
    residual.resize(a.size());
    counts = split_residual(a.data(), residual.data(), m, k, pw->t_bound);
    for (auto c : counts) nonzeros += c;
  }
  auto make_a = [&](const uint8_t* data) {
    return [&, data](int32_t* row_offsets) {
      return std::make_unique<fbgemm::PackAWithRowOffset<uint8_t>>(fbgemm::matrix_op_t::NoTranspose,
                                                                    static_cast<uint32_t>(m), static_cast<uint32_t>(k),
                                                                    data, static_cast<uint32_t>(k), nullptr, 1,
                                                                    row_offsets);
    };
  };
  run_gemm<fbgemm::PackAWithRowOffset<uint8_t>>(*pw, make_a(a.data()), m, y, s_in, zp, sw.data(), per_channel,
                                                b.empty() ? nullptr : b.data(), relu && nonzeros == 0);
  if (nonzeros == 0) return out;
  if (residual_is_sparse(nonzeros, m * k)) {
    // corr[r, :] = sum over the residual's nonzeros r_k * (w[:, k] - z_w)
    std::vector<int32_t> corr(static_cast<size_t>(m * n), 0);
    at::parallel_for(0, m, 1, [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) {
        if (counts[r] == 0) continue;
        int32_t* acc = corr.data() + r * n;
        const uint8_t* res = residual.data() + r * k;
        for (int64_t kk = 0; kk < k; ++kk) {
          const int32_t v = res[kk];
          if (v == 0) continue;
          const int16_t* wt = pw->centered_t.data() + kk * n;
          for (int64_t c = 0; c < n; ++c) acc[c] += v * static_cast<int32_t>(wt[c]);
        }
      }
    });
    add_correction(y, corr.data(), m, n, s_in, sw, relu);
  } else {
    at::Tensor second = at::empty_like(out);
    run_gemm<fbgemm::PackAWithRowOffset<uint8_t>>(*pw, make_a(residual.data()), m, second.mutable_data_ptr<float>(),
                                                  s_in, 0, sw.data(), per_channel, nullptr, false);
    out.add_(second);
    if (relu) relu_inplace(y, out.numel());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Convolution (non-transposed), NHWC im2col packing.

template <int D>
at::Tensor convolution_fbgemm(const at::Tensor& input, float s_in, int32_t z_in, int64_t quant_min, int64_t quant_max,
                              const at::Tensor& weight, const at::Tensor& weight_scale,
                              const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                              const int8::ConvGeometry& geo, int64_t groups, bool relu, const char* op) {
  const int64_t batch = input.size(0), c_in = input.size(1), c_out = geo.out_channels.expect_int();
  const int64_t kg = weight.numel() / c_out;  // kvol * C_in / G
  // Channels-last input: [N, *spatial, C] in memory.
  std::vector<int64_t> perm = {0};
  for (int64_t i = 0; i < D; ++i) perm.push_back(2 + i);
  perm.push_back(1);
  const at::Tensor x = input.permute(perm).contiguous();
  const int32_t shift = static_cast<int32_t>(std::max<int64_t>(0, -quant_min));  // into [0, 255]
  const auto pw = cache().get(weight, weight_zero_point, groups, /*kind=*/D, [&] {
    // [OC, C/G, *k] -> [OC, *k, C/G]: each output channel's reduction in im2col order.
    std::vector<int64_t> wp = {0};
    for (int64_t i = 0; i < D; ++i) wp.push_back(2 + i);
    wp.push_back(1);
    return weight.permute(wp).contiguous().reshape({c_out, -1});
  });

  std::array<int, D> in_dim{}, kernel{}, stride{}, dilation{};
  std::array<int, D * 2> pad{};
  for (int i = 0; i < D; ++i) {
    in_dim[i] = static_cast<int>(input.size(2 + i));
    kernel[i] = static_cast<int>(weight.size(2 + i));
    stride[i] = static_cast<int>(geo.stride[i]);
    dilation[i] = static_cast<int>(geo.dilation[i]);
    pad[i] = pad[D + i] = static_cast<int>(geo.padding[i]);
  }
  const fbgemm::conv_param_t<D> conv(static_cast<int>(batch), static_cast<int>(c_in), static_cast<int>(c_out), in_dim,
                                     static_cast<int>(groups), kernel, stride, pad, dilation);
  int64_t rows = batch;
  for (int i = 0; i < D; ++i) rows *= conv.OUT_DIM[i];

  // Output [N, OC, *out] with channels-last strides: the GEMM writes [N * prod(out), OC].
  at::Tensor out = int8::empty_conv_output(geo, false, input.options());
  if (rows == 0) return out;

  std::vector<uint8_t> a(static_cast<size_t>(x.numel()));
  quantize_to_u8(x.const_data_ptr<float>(), a.data(), x.numel(), s_in, z_in, quant_min, quant_max, shift, op);
  const std::vector<float> sw = expand_scales(weight_scale, c_out);
  const std::vector<float> b = scaled_bias(bias, s_in, sw);
  const bool per_channel = weight_scale.numel() > 1;
  const int32_t zp = z_in + shift;
  const int64_t t = pw->t_bound;
  float* y = out.mutable_data_ptr<float>();

  std::vector<uint8_t> residual;
  int64_t nonzeros = 0;
  if (quant_max + shift > t) {
    residual.resize(a.size());
    for (auto c : split_residual(a.data(), residual.data(), x.numel() / c_in, c_in, t)) nonzeros += c;
  }
  // Padding carries the zero point, which splits like any value.
  const int32_t pad1 = std::min<int32_t>(zp, static_cast<int32_t>(t)), pad2 = zp - pad1;
  auto make_a = [&](const uint8_t* data, int32_t pad_value) {
    return [&, data, pad_value](int32_t* row_offsets) {
      return std::make_unique<fbgemm::PackAWithIm2Col<uint8_t, int32_t, D>>(conv, data, nullptr, pad_value,
                                                                            row_offsets, false);
    };
  };
  const bool any_residual = nonzeros > 0 || pad2 > 0;
  run_gemm<fbgemm::PackAWithIm2Col<uint8_t, int32_t, D>>(*pw, make_a(a.data(), pad1), rows, y, s_in, zp, sw.data(),
                                                         per_channel, b.empty() ? nullptr : b.data(),
                                                         relu && !any_residual);
  if (!any_residual) return out;
  if (pad2 == 0 && residual_is_sparse(nonzeros, static_cast<int64_t>(a.size()))) {
    // Scatter each residual input value into the outputs whose windows contain it.
    const int64_t og = c_out / groups, cg = c_in / groups;
    std::array<int64_t, 3> in3{1, 1, 1}, out3{1, 1, 1}, k3{1, 1, 1}, st3{1, 1, 1}, pd3{0, 0, 0}, dl3{1, 1, 1};
    for (int i = 0; i < D; ++i) {
      in3[3 - D + i] = in_dim[i];
      out3[3 - D + i] = conv.OUT_DIM[i];
      k3[3 - D + i] = kernel[i];
      st3[3 - D + i] = stride[i];
      pd3[3 - D + i] = pad[i];
      dl3[3 - D + i] = dilation[i];
    }
    const int64_t in_plane = in3[0] * in3[1] * in3[2], out_plane = out3[0] * out3[1] * out3[2];
    std::vector<int32_t> corr(static_cast<size_t>(rows * c_out), 0);
    at::parallel_for(0, batch, 1, [&](int64_t nb, int64_t ne) {
      for (int64_t nn = nb; nn < ne; ++nn) {
        for (int64_t p = 0; p < in_plane; ++p) {
          const uint8_t* res = residual.data() + (nn * in_plane + p) * c_in;
          const int64_t i0 = p / (in3[1] * in3[2]), i1 = (p / in3[2]) % in3[1], i2 = p % in3[2];
          for (int64_t ci = 0; ci < c_in; ++ci) {
            const int32_t v = res[ci];
            if (v == 0) continue;
            const int64_t g = ci / cg, cc = ci % cg;
            for (int64_t k0 = 0; k0 < k3[0]; ++k0) {
              const int64_t t0 = i0 + pd3[0] - k0 * dl3[0];
              if (t0 < 0 || t0 % st3[0] || t0 / st3[0] >= out3[0]) continue;
              for (int64_t k1 = 0; k1 < k3[1]; ++k1) {
                const int64_t t1 = i1 + pd3[1] - k1 * dl3[1];
                if (t1 < 0 || t1 % st3[1] || t1 / st3[1] >= out3[1]) continue;
                for (int64_t k2 = 0; k2 < k3[2]; ++k2) {
                  const int64_t t2 = i2 + pd3[2] - k2 * dl3[2];
                  if (t2 < 0 || t2 % st3[2] || t2 / st3[2] >= out3[2]) continue;
                  const int64_t o = ((t0 / st3[0]) * out3[1] + t1 / st3[1]) * out3[2] + t2 / st3[2];
                  const int64_t kk = ((k0 * k3[1] + k1) * k3[2] + k2) * cg + cc;  // im2col order
                  const int16_t* wt = pw->centered_t.data() + (g * kg + kk) * og;
                  int32_t* acc = corr.data() + (nn * out_plane + o) * c_out + g * og;
                  for (int64_t j = 0; j < og; ++j) acc[j] += v * static_cast<int32_t>(wt[j]);
                }
              }
            }
          }
        }
      }
    });
    add_correction(y, corr.data(), rows, c_out, s_in, sw, relu);
  } else {
    at::Tensor second = at::empty_like(out);
    run_gemm<fbgemm::PackAWithIm2Col<uint8_t, int32_t, D>>(*pw, make_a(residual.data(), pad2), rows,
                                                           second.mutable_data_ptr<float>(), s_in, 0, sw.data(),
                                                           per_channel, nullptr, false);
    out.add_(second);
    if (relu) relu_inplace(y, out.numel());
  }
  return out;
}

#endif  // QATX_WITH_FBGEMM

bool fbgemm_usable() {
#if QATX_WITH_FBGEMM
  static const bool ok = fbgemm::fbgemmSupportedCPU();
  return ok;
#else
  return false;
#endif
}

struct Int8CpuBackend {
  static constexpr bool kChecksValuesOnHost = true;

  static at::Tensor linear(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                           int64_t quant_min, int64_t quant_max, const at::Tensor& weight,
                           const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                           const std::optional<at::Tensor>& bias, bool relu, const int8::WeightQParams& wq) {
#if QATX_WITH_FBGEMM
    // Exact int32 accumulation needs K * 255 * 128 < 2^31.
    if (fbgemm_usable() && wq.kind != int8::WeightQParams::Kind::PerGroup && weight.size(1) > 0 &&
        weight.size(1) < 65536) {
      return linear_fbgemm(input, input_scale.to(at::kFloat).item<float>(), input_zero_point.item<int32_t>(),
                           quant_min, quant_max, weight, weight_scale, weight_zero_point, bias, relu,
                           "qatx::linear_int8");
    }
#endif
    return int8::linear_reference(input, input_scale, input_zero_point, quant_min, quant_max, weight, weight_scale,
                                  weight_zero_point, bias, relu);
  }

  static at::Tensor convolution(const at::Tensor& input, const at::Tensor& input_scale,
                                const at::Tensor& input_zero_point, int64_t quant_min, int64_t quant_max,
                                const at::Tensor& weight, const at::Tensor& weight_scale,
                                const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                const int8::ConvGeometry& geo, bool transposed, int64_t groups, bool relu) {
#if QATX_WITH_FBGEMM
    if (fbgemm_usable() && !transposed && weight.numel() > 0 &&
        weight.numel() / std::max<int64_t>(geo.out_channels.expect_int(), 1) < 65536) {
      const float s = input_scale.to(at::kFloat).item<float>();
      const int32_t z = input_zero_point.item<int32_t>();
      constexpr const char* op = "qatx::convolution_int8";
      switch (geo.spatial) {
        case 1: return convolution_fbgemm<1>(input, s, z, quant_min, quant_max, weight, weight_scale,
                                             weight_zero_point, bias, geo, groups, relu, op);
        case 2: return convolution_fbgemm<2>(input, s, z, quant_min, quant_max, weight, weight_scale,
                                             weight_zero_point, bias, geo, groups, relu, op);
        default: return convolution_fbgemm<3>(input, s, z, quant_min, quant_max, weight, weight_scale,
                                              weight_zero_point, bias, geo, groups, relu, op);
      }
    }
#endif
    return int8::in_conv_layout(int8::convolution_reference(input, input_scale, input_zero_point, quant_min,
                                                            quant_max, weight, weight_scale, weight_zero_point, bias,
                                                            geo, transposed, groups, relu),
                                geo, transposed);
  }

  static at::Tensor linear_dynamic(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
                                   const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                   bool per_row) {
    const int64_t k = weight.size(1);
    const at::Tensor x = input.reshape({-1, k});
    if (x.size(0) > 0) {
      auto [lo, hi] = at::aminmax(x);
      TORCH_CHECK(std::isfinite(lo.item<float>()) && std::isfinite(hi.item<float>()),
                  "qatx::linear_int8_dynamic: input must be finite (it contains NaN or Inf)");
    }
#if QATX_WITH_FBGEMM
    if (!per_row && fbgemm_usable() && k > 0 && k < 65536 && x.size(0) > 0) {
      auto [s, z] = int8::dynamic_qparams(x, false);
      const float s_in = s.item<float>();
      at::Tensor y = linear_fbgemm(input, s_in, z.item<int32_t>(), 0, 255, weight, weight_scale, weight_zero_point,
                                   std::nullopt, false, "qatx::linear_int8_dynamic");
      if (bias.has_value() && bias->defined()) y.add_(*bias);
      return y;
    }
#endif
    return int8::linear_dynamic_reference(input, weight, weight_scale, weight_zero_point, bias, per_row);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CPU, m) { Int8Kernels<Int8CpuBackend>::register_all(m); }

}  // namespace ops
}  // namespace qatx
