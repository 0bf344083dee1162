// CPU kernels of the INT8 ops. Linear, the per-tensor dynamic linear and non-transposed
// convolution with per-tensor / per-channel weights run on the int16 GEMM of int16_gemm.h on
// AVX2 CPUs: the input is quantized by the fake-quantize forward's arithmetic, centered (q - z)
// into int16, multiplied with the cached packed centered weight with exact int32 accumulation and
// scaled in float64 - the reference route's arithmetic, so both routes give the same bits.
// Convolutions are implicit GEMMs over the channels-last input (no im2col copy). Everything else
// (per-group weights, transposed convolutions, a reduction too long for an exact int32 sum, a CPU
// without AVX2) takes the exact reference route of int8_args.cpp. add_int8 is one elementwise
// pass over both inputs (quant_math.h's add_int8_value).
#include "qatx/ops/int8_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "qatx/ops/cpu/cpu_kernels.h"
#include "qatx/ops/cpu/int16_gemm.h"
#include "qatx/ops/output_memory.h"

namespace qatx {
namespace ops {
namespace {

// ---------------------------------------------------------------------------------------------
// Packed weights, cached per weight tensor.

// One packed B per group; `rows` is the weight as [out, Kg] (groups stacked: rows g * out / G ..
// belong to group g), each row's Kg reduction elements in the order the GEMM's A rows use.
using PackedWeight = std::vector<int16_gemm::PackedB>;

std::shared_ptr<PackedWeight> pack_weight(const at::Tensor& rows, const at::Tensor& zero_point, int64_t groups) {
  const int64_t out = rows.size(0), kg = rows.size(1), og = out / groups;
  const at::Tensor z = zero_point.to(at::kInt).reshape({-1}).expand({out}).contiguous();
  auto packed = std::make_shared<PackedWeight>();
  for (int64_t g = 0; g < groups; ++g) {
    packed->push_back(int16_gemm::pack(rows.const_data_ptr<int8_t>() + g * og * kg, og, kg,
                                       z.const_data_ptr<int32_t>() + g * og));
  }
  return packed;
}

// The cache: one entry per live weight storage. An entry holds a weak reference to the storage,
// so a freed weight's address can never alias a new one, and records the weight's version
// counter, so an in-place change (load_state_dict, copy_) repacks. Expired entries are dropped
// on every insertion. A weight or zero point created under torch.inference_mode has no version
// counter, so nothing would see it change: it is packed on every call instead.
class PackedWeightCache {
 public:
  // kind: 0 linear, D for a D-d convolution, 3 + D for a depthwise one (all PackedWeight), 7 for
  // a Winograd 3x3 one (PackedWinograd), 8 for an unpacked 4-bit weight; make() makes the entry on
  // a miss.
  template <typename T>
  std::shared_ptr<const T> get(const at::Tensor& weight, const at::Tensor& zero_point, int64_t groups, int kind,
                               const std::function<std::shared_ptr<T>()>& make) {
    if (weight.is_inference() || zero_point.is_inference()) return make();
    c10::StorageImpl* storage = weight.storage().unsafeGetStorageImpl();
    const int64_t version = weight._version();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& e : entries_) {
        if (e.storage_raw == storage && !e.storage.expired() && e.version == version &&
            e.offset == weight.storage_offset() && e.sizes == weight.sizes().vec() &&
            e.strides == weight.strides().vec() && e.groups == groups && e.kind == kind &&
            e.zero_point_version == zero_point._version() && e.zero_point_data == zero_point.const_data_ptr()) {
          return std::static_pointer_cast<const T>(e.packed);
        }
      }
    }
    std::shared_ptr<const T> packed = make();  // outside the lock: packing can be slow
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
    std::shared_ptr<const void> packed;
  };
  std::mutex mutex_;
  std::list<Entry> entries_;
};

PackedWeightCache& cache() {
  static PackedWeightCache c;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Shared pieces.

// Whether K * max|a| * max|w| fits int32 for every group: the accumulator is exact then.
bool exact_in_int32(const PackedWeight& packed, int32_t z_in, int64_t quant_min, int64_t quant_max) {
  const int64_t max_a = std::max<int64_t>(quant_max - z_in, z_in - quant_min);
  return std::all_of(packed.begin(), packed.end(), [&](const int16_gemm::PackedB& b) {
    return static_cast<double>(b.k) * static_cast<double>(max_a) * static_cast<double>(b.max_abs) <= 2147483647.0;
  });
}

// The reference epilogue's terms in float64: scale = s_in * s_w[c] (exact: a product of two
// floats), the int32 bias (before scaling) or the dynamic op's float bias (after).
struct EpilogueTerms {
  std::vector<double> scale, bias, shift;
  int16_gemm::Epilogue at(int64_t channel, bool relu) const {
    return {scale.data() + channel, bias.empty() ? nullptr : bias.data() + channel,
            shift.empty() ? nullptr : shift.data() + channel, relu};
  }
};
EpilogueTerms epilogue_terms(float s_in, const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                             int64_t out) {
  // Read in place when already float32 / int32 (the converted modules' dtypes): no per-call copies.
  EpilogueTerms e;
  const at::Tensor sw = weight_scale.scalar_type() == at::kFloat ? weight_scale.contiguous()
                                                                 : weight_scale.to(at::kFloat).contiguous();
  const float* swp = sw.const_data_ptr<float>();
  const int64_t step = sw.numel() == 1 ? 0 : 1;
  e.scale.resize(static_cast<size_t>(out));
  for (int64_t c = 0; c < out; ++c) e.scale[c] = static_cast<double>(s_in) * swp[c * step];
  if (bias.has_value() && bias->defined()) {
    std::vector<double>& dst = bias->scalar_type() == at::kInt ? e.bias : e.shift;
    if (bias->scalar_type() == at::kInt) {
      const at::Tensor b = bias->contiguous();
      dst.assign(b.const_data_ptr<int32_t>(), b.const_data_ptr<int32_t>() + out);
    } else {
      const at::Tensor b = bias->to(at::kDouble).contiguous();
      dst.assign(b.const_data_ptr<double>(), b.const_data_ptr<double>() + out);
    }
  }
  return e;
}

// Scratch for the centered activations, n int16 (contents unspecified). Kept per calling thread
// up to 32 MB, so that inference does not map and fault in fresh pages on every call; larger
// requests get a buffer of their own (owner) that is freed on return.
int16_t* int16_scratch(int64_t n, std::vector<int16_t>& owner) {
  constexpr int64_t kKeptElements = (int64_t{32} << 20) / sizeof(int16_t);
  thread_local std::vector<int16_t> kept;
  std::vector<int16_t>& buffer = n <= kKeptElements ? kept : owner;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

// Input elements per thread when quantizing (or widening) the input: fewer run on the calling
// thread, since waking the others costs about as much as quantizing them.
constexpr int64_t kQuantizeGrain = int64_t{1} << 16;

void check_no_nan(bool ok, const char* op) {
  TORCH_CHECK(ok, op, ": input contains NaN, which has no quantized value");
}

// The input's integers, centered (q - z, int16), from a dense input: float32 quantized as the
// fake-quantize forward does, or uint8 / int8 clamped to the quant range.
class CenteredInput {
 public:
  CenteredInput(const at::Tensor& x, float s, int32_t z, int64_t quant_min, int64_t quant_max)
      : type_(x.scalar_type()),
        data_(x.const_data_ptr()),  // once: the checked accessor costs as much as a short row
        quantize_(s, z, quant_min, quant_max),
        center_{z, static_cast<int32_t>(quant_min), static_cast<int32_t>(quant_max)} {}
  // Elements [offset, offset + n) into dst; false when they hold a NaN.
  bool operator()(int64_t offset, int16_t* dst, int64_t n) const {
    switch (type_) {
      case at::kByte: center_(static_cast<const uint8_t*>(data_) + offset, dst, n); return true;
      case at::kChar: center_(static_cast<const int8_t*>(data_) + offset, dst, n); return true;
      default: return quantize_(static_cast<const float*>(data_) + offset, dst, n);
    }
  }

 private:
  at::ScalarType type_;
  const void* data_;
  int16_gemm::Quantizer quantize_;
  int16_gemm::Centerer center_;
};

// The output's dtype: float32, or the requested grid's integer type.
at::TensorOptions output_options(const at::Tensor& input, const std::optional<int8::OutputQParams>& out_q) {
  return input.options().dtype(out_q.has_value() ? out_q->dtype : at::kFloat);
}

// Where the GEMM writes `out` (ld elements per row), quantized when out_q asks.
int16_gemm::Output gemm_output(at::Tensor& out, int64_t ld, const std::optional<int8::OutputQParams>& out_q) {
  int16_gemm::Output y{out.data_ptr(), ld};
  if (out_q.has_value()) {
    y.type = out_q->dtype == at::kByte ? int16_gemm::Output::Type::UInt8 : int16_gemm::Output::Type::Int8;
    y.inv_scale = 1.0f / out_q->scale.item<float>();
    y.zero_point = static_cast<float>(out_q->zero_point.item<int32_t>());
    y.quant_min = static_cast<float>(out_q->quant_min);
    y.quant_max = static_cast<float>(out_q->quant_max);
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// Linear. Returns an undefined tensor when the int32 sum could overflow (reference route then).

at::Tensor linear_int16(const at::Tensor& input, float s_in, int32_t z_in, int64_t quant_min, int64_t quant_max,
                        const at::Tensor& weight, const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                        const std::optional<at::Tensor>& bias, bool relu,
                        const std::optional<int8::OutputQParams>& out_q, const char* op) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const auto packed = cache().get<PackedWeight>(weight, weight_zero_point, 1, /*kind=*/0,
                                  [&] { return pack_weight(weight.contiguous(), weight_zero_point, 1); });
  if (!exact_in_int32(*packed, z_in, quant_min, quant_max)) return {};
  const int16_gemm::PackedB& b = packed->front();
  const at::Tensor x = input.contiguous();
  const int64_t m = x.numel() / k;
  at::Tensor out = empty_output(int8::linear_output_shape(input, weight), output_options(input, out_q));
  if (m == 0) return out;
  // Rows of b.kp int16 (an odd K gets a zero column).
  const CenteredInput quantize(x, s_in, z_in, quant_min, quant_max);
  std::vector<int16_t> owner;
  int16_t* a = int16_scratch(m * b.kp, owner);
  std::atomic<bool> ok{true};
  at::parallel_for(0, m, std::max<int64_t>(1, kQuantizeGrain / k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (!quantize(r * k, a + r * b.kp, k)) ok = false;
      if (b.kp != k) a[r * b.kp + k] = 0;  // the zero column of an odd K
    }
  });
  check_no_nan(ok, op);
  const EpilogueTerms e = epilogue_terms(s_in, weight_scale, bias, n);
  int16_gemm::gemm(m, b, a, b.kp, e.at(0, relu), gemm_output(out, n, out_q));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Convolution (non-transposed): an implicit GEMM per group over the channels-last int16 input.
// The input is quantized once into a zero-padded buffer (the padding's integer is the zero point,
// centered 0), so every window lies inside it; row r of group g's A is output position r's
// window, read in place, one run of the group's channels per kernel tap. Runs hold an even number
// of channels (cgp = C/G rounded up), so the buffer has cgp channels per group and the weight
// rows cgp entries per tap (the extra channel is 0). Without groups and dilation along the last
// spatial dimension, the taps of one kernel row are adjacent pixels: they form one run (fewer,
// longer runs; a 3-channel stem's run is 12 elements instead of 4).

// Input channels from which a 3x3 convolution of stride 1 takes the Winograd route: with fewer,
// its 16 GEMMs are too short to pay for the transforms (measured at batch 64 on 2 threads:
// 8 input channels 0.63x the implicit GEMM's speed, 16 1.09x, 32 1.25x, 128 1.55x).
constexpr int64_t kWinogradMinChannels = 16;

// [0, 2, ..., spatial + 1, 1]: a [N, C, *spatial] tensor (or weight [OC, C/G, *k]) channels last.
std::vector<int64_t> channels_last_order(int64_t spatial) {
  std::vector<int64_t> order = {0};
  for (int64_t i = 0; i < spatial; ++i) order.push_back(2 + i);
  order.push_back(1);
  return order;
}

// A depthwise convolution over channels-last integer codes (batch images of in[0] x in[1] x in[2]
// pixels of `channels` codes, as 3-d), read as they are: each output position's taps point at
// their pixels, or at a pixel of zero-point codes where they fall in the padding, and the zero
// point comes off through the bias: sum_t (q_t - z) w_t = sum_t q_t w_t - z sum_t w_t, integers
// added exactly in the float64 epilogue.
template <typename Code>
void depthwise_from_codes(const Code* x, int64_t batch, const std::array<int64_t, 3>& in,
                          const std::array<int64_t, 3>& out_dim, const std::array<int64_t, 3>& kernel,
                          const std::array<int64_t, 3>& stride, const std::array<int64_t, 3>& pad,
                          const std::array<int64_t, 3>& dilation, int64_t channels, int32_t z_in,
                          const at::Tensor& weight, const at::Tensor& weight_zero_point, const int16_gemm::PackedB& b,
                          EpilogueTerms e, bool relu, const int16_gemm::Output& y) {
  const int64_t taps = b.k;
  const at::Tensor w = weight.reshape({channels, taps}).contiguous();
  const at::Tensor zw = weight_zero_point.to(at::kInt).reshape({-1}).expand({channels}).contiguous();
  if (e.bias.empty()) e.bias.assign(static_cast<size_t>(channels), 0.0);
  const int8_t* rows = w.const_data_ptr<int8_t>();
  const int32_t* zero_points = zw.const_data_ptr<int32_t>();
  for (int64_t c = 0; c < channels; ++c) {
    int64_t sum = -taps * int64_t{zero_points[c]};  // sum_t (w[c, t] - z_w[c])
    for (int64_t t = 0; t < taps; ++t) sum += rows[c * taps + t];
    e.bias[c] -= static_cast<double>(int64_t{z_in} * sum);
  }
  const std::vector<Code> fill(static_cast<size_t>(channels), static_cast<Code>(z_in));
  const int64_t out_plane = out_dim[0] * out_dim[1] * out_dim[2];
  auto locate = [&](int64_t row, const Code** starts) {
    const int64_t nn = row / out_plane, o = row % out_plane;
    const int64_t o0 = o / (out_dim[1] * out_dim[2]), o1 = o / out_dim[2] % out_dim[1], o2 = o % out_dim[2];
    const Code* image = x + nn * in[0] * in[1] * in[2] * channels;
    for (int64_t k0 = 0, t = 0; k0 < kernel[0]; ++k0) {
      const int64_t i0 = o0 * stride[0] + k0 * dilation[0] - pad[0];
      for (int64_t k1 = 0; k1 < kernel[1]; ++k1) {
        const int64_t i1 = o1 * stride[1] + k1 * dilation[1] - pad[1];
        for (int64_t k2 = 0; k2 < kernel[2]; ++k2, ++t) {
          const int64_t i2 = o2 * stride[2] + k2 * dilation[2] - pad[2];
          const bool inside = i0 >= 0 && i0 < in[0] && i1 >= 0 && i1 < in[1] && i2 >= 0 && i2 < in[2];
          starts[t] = inside ? image + ((i0 * in[1] + i1) * in[2] + i2) * channels : fill.data();
        }
      }
    }
  };
  int16_gemm::depthwise<Code>(batch * out_plane, b, locate, e.at(0, relu), y);
}

template <int D>
at::Tensor convolution_int16(const at::Tensor& input, float s_in, int32_t z_in, int64_t quant_min, int64_t quant_max,
                             const at::Tensor& weight, const at::Tensor& weight_scale,
                             const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                             const int8::ConvGeometry& geo, int64_t groups, bool relu,
                             const std::optional<int8::OutputQParams>& out_q, const char* op) {
  const int64_t batch = input.size(0), c_in = input.size(1), c_out = geo.out_channels.expect_int();
  const int64_t cg = c_in / groups, og = c_out / groups;
  const int64_t taps = weight.numel() / (c_out * cg);
  // Depthwise (one input and one output channel per group): one filter per channel, multiplied
  // elementwise over 16 channels at a time; its buffer has no padding channel.
  const bool depthwise = groups > 1 && cg == 1 && og == 1;
  const int64_t cgp = depthwise ? 1 : cg + (cg & 1), c_stride = groups * cgp;
  // [OC, C/G, *k] -> [OC, *k, C/G] (each output channel's window in tap-major order), padded.
  auto tap_major = [&]() -> at::Tensor {
    return at::constant_pad_nd(weight.permute(channels_last_order(D)).contiguous().reshape({c_out, taps, cg}),
                               {0, cgp - cg})
        .reshape({c_out, taps * cgp});
  };
  // 3x3, stride 1, one group, enough channels: Winograd's F(2x2, 3x3) (int16_gemm.h), when exact.
  std::shared_ptr<const int16_gemm::PackedWinograd> winograd;
  if (D == 2 && groups == 1 && cg >= kWinogradMinChannels && weight.size(2) == 3 && weight.size(3) == 3 &&
      geo.stride[0] == 1 && geo.stride[1] == 1 && geo.dilation[0] == 1 && geo.dilation[1] == 1) {
    winograd = cache().get<int16_gemm::PackedWinograd>(weight, weight_zero_point, 1, /*kind=*/7, [&] {
      const at::Tensor z = weight_zero_point.to(at::kInt).reshape({-1}).expand({c_out}).contiguous();
      const at::Tensor rows = tap_major();
      return std::make_shared<int16_gemm::PackedWinograd>(
          int16_gemm::pack_winograd(rows.const_data_ptr<int8_t>(), c_out, cgp, z.const_data_ptr<int32_t>()));
    });
    if (!int16_gemm::winograd_exact(*winograd, std::max<int32_t>(static_cast<int32_t>(quant_max) - z_in,
                                                                 z_in - static_cast<int32_t>(quant_min)))) {
      winograd.reset();
    }
  }
  std::shared_ptr<const PackedWeight> packed;
  if (!winograd) {
    packed = cache().get<PackedWeight>(weight, weight_zero_point, groups, depthwise ? 3 + D : D, [&] {
      if (depthwise) {
        const at::Tensor w = weight.reshape({c_out, taps}).contiguous();
        const at::Tensor z = weight_zero_point.to(at::kInt).reshape({-1}).expand({c_out}).contiguous();
        return std::make_shared<PackedWeight>(PackedWeight{
            int16_gemm::pack_depthwise(w.const_data_ptr<int8_t>(), c_out, taps, z.const_data_ptr<int32_t>())});
      }
      return pack_weight(tap_major(), weight_zero_point, groups);
    });
    if (!exact_in_int32(*packed, z_in, quant_min, quant_max)) return {};
  }
  // A strided 1x1 convolution without padding reads every stride-th pixel: it is the 1x1
  // convolution of stride 1 over those pixels, and only they are quantized.
  bool pointwise = true;
  for (int i = 0; i < D; ++i) pointwise = pointwise && weight.size(2 + i) == 1 && geo.padding[i] == 0;
  at::Tensor pixels_read = input;
  for (int i = 0; pointwise && i < D; ++i) pixels_read = pixels_read.slice(2 + i, 0, std::nullopt, geo.stride[i]);
  // Geometry as 3-d (leading unit dimensions); `padded`: the input with its padding.
  std::array<int64_t, 3> in{1, 1, 1}, out_dim{1, 1, 1}, kernel{1, 1, 1}, stride{1, 1, 1}, pad{0, 0, 0},
      dilation{1, 1, 1}, padded{1, 1, 1};
  for (int i = 0; i < D; ++i) {
    const int j = 3 - D + i;
    in[j] = pixels_read.size(2 + i);
    out_dim[j] = geo.output_shape[2 + i].expect_int();
    kernel[j] = weight.size(2 + i);
    stride[j] = pointwise ? 1 : geo.stride[i];
    pad[j] = geo.padding[i];
    dilation[j] = geo.dilation[i];
    padded[j] = in[j] + 2 * pad[j];
  }
  const int64_t out_plane = out_dim[0] * out_dim[1] * out_dim[2], rows = batch * out_plane;
  at::Tensor out = int8::empty_conv_output(geo, false, output_options(input, out_q));
  if (rows == 0) return out;

  // Quantize, one padded row (n, i0, i1) at a time: rows in the padding are zeros, the others
  // get their left and right padding zeroed and their pixels quantized. Rows no window reads
  // (a strided 1x1 convolution skips every other one) are left as they are.
  std::array<std::vector<char>, 2> read;
  for (int j = 0; j < 2; ++j) {
    read[j].assign(static_cast<size_t>(padded[j]), 0);
    for (int64_t o = 0; o < out_dim[j]; ++o) {
      for (int64_t k = 0; k < kernel[j]; ++k) read[j][o * stride[j] + k * dilation[j]] = 1;
    }
  }
  // Channels last, each pixel's channels adjacent (a view of a channels-last input: the pixels
  // of a strided 1x1 convolution are not copied), or planar: each channel's rows contiguous (a
  // channels-first input such as a float NCHW image, read in place channel by channel).
  at::Tensor x = pixels_read.permute(channels_last_order(D));
  const bool planar = x.stride(D + 1) != 1 && x.stride(D) == 1 && x.size(D) > 1;
  if (x.stride(D + 1) != 1 && !planar) x = x.contiguous();
  std::array<int64_t, 3> x_stride{0, 0, 0};  // per spatial step, as 3-d
  for (int i = 0; i < D; ++i) x_stride[3 - D + i] = x.stride(1 + i);
  const int64_t x_batch_stride = x.stride(0), x_channel_stride = x.stride(D + 1);
  const EpilogueTerms e = epilogue_terms(s_in, weight_scale, bias, c_out);
  // Integer codes with whole channel pairs go to the Winograd route as they are: it centers them
  // as it reads them (no int16 copy of the input to write and read back).
  if (winograd && cgp == cg && x.is_contiguous() && (x.scalar_type() == at::kByte || x.scalar_type() == at::kChar)) {
    const int16_gemm::Centerer codes{z_in, static_cast<int32_t>(quant_min), static_cast<int32_t>(quant_max)};
    const int16_gemm::Output y = gemm_output(out, c_out, out_q);
    if (x.scalar_type() == at::kByte) {
      int16_gemm::winograd(batch, x.const_data_ptr<uint8_t>(), in[1], in[2], pad[1], pad[2], codes, *winograd,
                           e.at(0, relu), y);
    } else {
      int16_gemm::winograd(batch, x.const_data_ptr<int8_t>(), in[1], in[2], pad[1], pad[2], codes, *winograd,
                           e.at(0, relu), y);
    }
    return out;
  }
  // So do strided depthwise layers over 16k channels whose quant range is the codes' whole type
  // (no clamp to apply), summed as they are: the loads never pass a pixel's channels, and the
  // int32 bound holds for |q| <= 255 as it did for |q - z| <= 255. Widening each code once per
  // tap read instead of once in a copy pays at stride 2 (2.25 reads per pixel: 0.57-0.87x the
  // time at batch 64), not at stride 1 (9 reads: 1.01-1.07x).
  const bool whole_type = x.scalar_type() == at::kByte   ? quant_min == 0 && quant_max == 255
                          : x.scalar_type() == at::kChar ? quant_min == -128 && quant_max == 127
                                                         : false;
  const bool strided = std::any_of(stride.begin(), stride.end(), [](int64_t s) { return s > 1; });
  if (depthwise && strided && c_in % 16 == 0 && x.is_contiguous() && whole_type &&
      static_cast<double>(packed->front().k) * 255.0 * packed->front().max_abs <= 2147483647.0) {
    const int16_gemm::Output y = gemm_output(out, c_out, out_q);
    if (x.scalar_type() == at::kByte) {
      depthwise_from_codes(x.const_data_ptr<uint8_t>(), batch, in, out_dim, kernel, stride, pad, dilation, c_in, z_in,
                           weight, weight_zero_point, packed->front(), e, relu, y);
    } else {
      depthwise_from_codes(x.const_data_ptr<int8_t>(), batch, in, out_dim, kernel, stride, pad, dilation, c_in, z_in,
                           weight, weight_zero_point, packed->front(), e, relu, y);
    }
    return out;
  }
  const int64_t row_len = padded[2] * c_stride, image = padded[0] * padded[1] * row_len;
  std::vector<int16_t> owner;
  int16_t* xq = int16_scratch(batch * image + 16, owner);  // + the depthwise kernel's overread
  const CenteredInput quantize(x, s_in, z_in, quant_min, quant_max);
  std::atomic<bool> ok{true};
  const int64_t padded_rows = batch * padded[0] * padded[1];
  at::parallel_for(0, padded_rows, std::max<int64_t>(1, kQuantizeGrain / row_len), [&](int64_t begin, int64_t end) {
    std::vector<int16_t> tmp(cgp == cg && !planar ? 0 : static_cast<size_t>(in[2] * c_in));
    for (int64_t r = begin; r < end; ++r) {
      int16_t* dst = xq + r * row_len;
      const int64_t p1 = r % padded[1], p0 = r / padded[1] % padded[0], nn = r / (padded[0] * padded[1]);
      if (!read[0][p0] || !read[1][p1]) continue;
      const int64_t i0 = p0 - pad[0], i1 = p1 - pad[1];
      if (i0 < 0 || i0 >= in[0] || i1 < 0 || i1 >= in[1]) {
        std::memset(dst, 0, static_cast<size_t>(row_len) * sizeof(int16_t));
        continue;
      }
      std::memset(dst, 0, static_cast<size_t>(pad[2] * c_stride) * sizeof(int16_t));
      std::memset(dst + (pad[2] + in[2]) * c_stride, 0, static_cast<size_t>(pad[2] * c_stride) * sizeof(int16_t));
      const int64_t src = nn * x_batch_stride + i0 * x_stride[0] + i1 * x_stride[1];
      int16_t* pixels = dst + pad[2] * c_stride;
      if (planar) {  // each channel's row as one run, then to its place in every pixel
        for (int64_t c = 0; c < c_in; ++c) {
          if (!quantize(src + c * x_channel_stride, tmp.data(), in[2])) ok = false;
          int16_t* channel = pixels + c / cg * cgp + c % cg;
          for (int64_t px = 0; px < in[2]; ++px) channel[px * c_stride] = tmp[px];
        }
        for (int64_t px = 0; cgp != cg && px < in[2] * groups; ++px) pixels[px * cgp + cg] = 0;
        continue;
      }
      int16_t* row = cgp == cg ? pixels : tmp.data();  // tmp: spread below
      if (x_stride[2] == c_in) {  // adjacent pixels: one run
        if (!quantize(src, row, in[2] * c_in)) ok = false;
      } else {
        for (int64_t px = 0; px < in[2]; ++px) {
          if (!quantize(src + px * x_stride[2], row + px * c_in, c_in)) ok = false;
        }
      }
      if (cgp == cg) continue;
      for (int64_t px = 0; px < in[2] * groups; ++px) {  // spread each group's cg channels over cgp
        std::memcpy(pixels + px * cgp, tmp.data() + px * cg, static_cast<size_t>(cg) * sizeof(int16_t));
        pixels[px * cgp + cg] = 0;
      }
    }
  });
  check_no_nan(ok, op);

  if (winograd) {
    int16_gemm::winograd(batch, xq, padded[1], padded[2], *winograd, e.at(0, relu), gemm_output(out, c_out, out_q));
    return out;
  }
  // Runs per row: one per kernel tap, or one per kernel row when its taps are adjacent pixels.
  const bool merge_row = groups == 1 && (dilation[2] == 1 || kernel[2] == 1);
  const int64_t segments = merge_row ? kernel[0] * kernel[1] : taps;
  // Per output position of an image and run: the run's offset in the padded image.
  std::vector<int64_t> offsets(static_cast<size_t>(out_plane * segments));
  for (int64_t o = 0, t = 0; o < out_plane; ++o) {
    const int64_t o0 = o / (out_dim[1] * out_dim[2]), o1 = (o / out_dim[2]) % out_dim[1], o2 = o % out_dim[2];
    for (int64_t k0 = 0; k0 < kernel[0]; ++k0) {
      const int64_t i0 = o0 * stride[0] + k0 * dilation[0];
      for (int64_t k1 = 0; k1 < kernel[1]; ++k1) {
        const int64_t i1 = o1 * stride[1] + k1 * dilation[1];
        for (int64_t k2 = 0; k2 < (merge_row ? 1 : kernel[2]); ++k2) {
          offsets[t++] = ((i0 * padded[1] + i1) * padded[2] + o2 * stride[2] + k2 * dilation[2]) * c_stride;
        }
      }
    }
  }
  // The runs of output row `row` over group g's channels.
  auto locate_in_group = [&](int64_t g) {
    return [&, g](int64_t row, const int16_t** starts) {
      const int64_t nn = row / out_plane;
      const int16_t* base = xq + nn * image + g * cgp;
      const int64_t* off = offsets.data() + (row - nn * out_plane) * segments;
      for (int64_t t = 0; t < segments; ++t) starts[t] = base + off[t];
    };
  };
  if (depthwise) {  // all channels at once: each pixel's run starts at channel 0
    int16_gemm::depthwise(rows, packed->front(), locate_in_group(0), e.at(0, relu), gemm_output(out, c_out, out_q));
    return out;
  }
  const int16_gemm::Output y = gemm_output(out, c_out, out_q);
  if (groups == 1 && segments == 1 && out_plane == padded[0] * padded[1] * padded[2]) {
    // A 1x1 convolution without padding or stride (as run): row r is pixel r, rows evenly spaced.
    int16_gemm::gemm(rows, packed->front(), xq, c_stride, e.at(0, relu), y);
    return out;
  }
  for (int64_t g = 0; g < groups; ++g) {
    int16_gemm::gemm(rows, (*packed)[g], segments, locate_in_group(g), e.at(g * og, relu), y.at(0, g * og));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// add_int8.

math::TensorGrid tensor_grid(const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                             int64_t quant_max) {
  const float s = scale.item<float>();
  return {s, 1.0f / s, zero_point.item<float>(), static_cast<float>(quant_min),
          static_cast<float>(quant_max)};
}

// An integer operand's value: its code clamped to the range, dequantized. A code is finite, so
// the clamp is a min and a max (clamp_nan_propagating's value for finite input), which vectorize
// without blends.
template <typename Int>
inline float code_value(Int q, const math::TensorGrid& g) {
  return math::dequantize_value(std::min(std::max(static_cast<float>(q), g.quant_min), g.quant_max), g.scale,
                                g.zero_point);
}

// Float inputs and output: quant_math.h's add_int8_value, elementwise.
QATX_CPU_CLONES void add_int8_range(const float* x, const float* y, float* out, int64_t begin, int64_t end,
                                    math::TensorGrid gx, math::TensorGrid gy, bool relu) {
  for (int64_t i = begin; i < end; ++i) out[i] = math::add_int8_value(x[i], gx, y[i], gy, relu);
}

// uint8 operands and output (a chained residual add): the same float32 operations as the block
// path below, in one pass. Integer operands have finite values, so no value is NaN and the
// output's clamp is a min and a max too; ReLU is chosen outside the loop (64 x 32 x 32 x 32 on
// one thread: 1.99 ms with the NaN-propagating forms, 1.39-1.47 ms).
template <bool kRelu>
QATX_ALWAYS_INLINE void add_uint8_loop(const uint8_t* x, const uint8_t* y, uint8_t* out, int64_t begin, int64_t end,
                                       math::TensorGrid gx, math::TensorGrid gy, math::TensorGrid go) {
  for (int64_t i = begin; i < end; ++i) {
    float sum = code_value(x[i], gx) + code_value(y[i], gy);
    if (kRelu) sum = sum < 0.0f ? 0.0f : sum;
    const float q = math::round_half_even(sum * go.inv_scale) + go.zero_point;
    out[i] = static_cast<uint8_t>(static_cast<int32_t>(std::min(std::max(q, go.quant_min), go.quant_max)));
  }
}
QATX_CPU_CLONES void add_uint8_range(const uint8_t* x, const uint8_t* y, uint8_t* out, int64_t begin, int64_t end,
                                     math::TensorGrid gx, math::TensorGrid gy, math::TensorGrid go, bool relu) {
  if (relu) return add_uint8_loop<true>(x, y, out, begin, end, gx, gy, go);
  add_uint8_loop<false>(x, y, out, begin, end, gx, gy, go);
}

// Any other combination of dtypes runs in blocks of kAddBlock elements through three simple
// (vectorized) passes: each operand's real value, the sum, the store. One operand's value: a
// float32 through its fake-quantize forward, an integer (already on the grid) clamped to the
// range and dequantized; both give the same float for the same q.
constexpr int64_t kAddBlock = 512;

QATX_CPU_CLONES void grid_values(const float* x, float* v, int64_t n, math::TensorGrid g) {
  for (int64_t i = 0; i < n; ++i) {
    v[i] = math::dequantize_value(math::quantize_value(x[i], g.inv_scale, g.zero_point, g.quant_min, g.quant_max),
                                  g.scale, g.zero_point);
  }
}
QATX_CPU_CLONES void grid_values(const uint8_t* x, float* v, int64_t n, math::TensorGrid g) {
  for (int64_t i = 0; i < n; ++i) v[i] = code_value(x[i], g);
}
QATX_CPU_CLONES void grid_values(const int8_t* x, float* v, int64_t n, math::TensorGrid g) {
  for (int64_t i = 0; i < n; ++i) v[i] = code_value(x[i], g);
}

// a[i] = a[i] + b[i] in float32, then max(., 0) when relu (NaN stays NaN).
QATX_CPU_CLONES void sum_values(float* a, const float* b, int64_t n, bool relu) {
  for (int64_t i = 0; i < n; ++i) {
    const float sum = a[i] + b[i];
    a[i] = math::select(relu & (sum < 0.0f), 0.0f, sum);
  }
}

// The sums as float32 or quantized to the output grid go (math::quantize_value); false when a
// sum is NaN, which has no integer.
bool store_values(const float* v, float* out, int64_t n, math::TensorGrid) {
  std::memcpy(out, v, static_cast<size_t>(n) * sizeof(float));
  return true;
}
template <typename Int>
inline bool quantize_values(const float* v, Int* out, int64_t n, math::TensorGrid go) {
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float q = math::quantize_value(v[i], go.inv_scale, go.zero_point, go.quant_min, go.quant_max);
    nan |= q != q;
    out[i] = static_cast<Int>(static_cast<int32_t>(math::select(q != q, go.quant_min, q)));
  }
  return nan == 0;
}
QATX_CPU_CLONES bool store_values(const float* v, uint8_t* out, int64_t n, math::TensorGrid go) {
  return quantize_values(v, out, n, go);
}
QATX_CPU_CLONES bool store_values(const float* v, int8_t* out, int64_t n, math::TensorGrid go) {
  return quantize_values(v, out, n, go);
}

// Elements [offset, offset + n) of a float32 / uint8 / int8 operand through grid_values.
void grid_values_at(const at::Tensor& t, int64_t offset, float* v, int64_t n, math::TensorGrid g) {
  switch (t.scalar_type()) {
    case at::kByte: return grid_values(t.const_data_ptr<uint8_t>() + offset, v, n, g);
    case at::kChar: return grid_values(t.const_data_ptr<int8_t>() + offset, v, n, g);
    default: return grid_values(t.const_data_ptr<float>() + offset, v, n, g);
  }
}

// The sums v into elements [offset, offset + n) of out, through store_values.
bool store_values_at(const float* v, at::Tensor& out, int64_t offset, int64_t n, math::TensorGrid go) {
  switch (out.scalar_type()) {
    case at::kByte: return store_values(v, out.mutable_data_ptr<uint8_t>() + offset, n, go);
    case at::kChar: return store_values(v, out.mutable_data_ptr<int8_t>() + offset, n, go);
    default: return store_values(v, out.mutable_data_ptr<float>() + offset, n, go);
  }
}

// ---------------------------------------------------------------------------------------------
// unpack_int4: a 4-bit layer unpacks its weight on every call; a fresh tensor each time would
// miss the packed-weight cache and repack the weight on every call too (a 4-bit 64 x 256 x 256
// linear layer took 7x the time of the same layer stored as int8). So the unpacked tensor is kept,
// keyed like a packed weight (packed's storage and version), and handed out again while
// neither it nor packed has changed.
struct UnpackedInt4 {
  at::Tensor values;
  int64_t version;  // values' version counter when made
};

// The values of int8::unpack_int4_values in one pass over the bytes (that composite of ATen ops
// took 1.3 ns per value; an embedding's gathered rows are unpacked on every call).
at::Tensor unpack_int4_values(const at::Tensor& packed, int64_t n) {
  std::vector<int64_t> shape = packed.sizes().vec();
  shape.back() = n;
  at::Tensor out = at::empty(shape, packed.options().dtype(at::kChar));
  const int64_t bytes = packed.size(-1), rows = n == 0 ? 0 : out.numel() / n;
  if (rows == 0) return out;
  const at::Tensor p = packed.contiguous();
  const uint8_t* src = p.const_data_ptr<uint8_t>();
  int8_t* dst = out.mutable_data_ptr<int8_t>();
  auto nibble = [](int v) { return static_cast<int8_t>((v ^ 8) - 8); };  // two's complement of 4 bits
  at::parallel_for(0, rows, std::max<int64_t>(1, kQuantizeGrain / n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* in = src + r * bytes;
      int8_t* row = dst + r * n;
      for (int64_t i = 0; i < n / 2; ++i) {
        row[2 * i] = nibble(in[i] & 15);
        row[2 * i + 1] = nibble(in[i] >> 4);
      }
      if (n & 1) row[n - 1] = nibble(in[n / 2] & 15);
    }
  });
  return out;
}

at::Tensor unpack_int4_cached(const at::Tensor& packed, int64_t n) {
  int8::unpack_int4_shape(packed, n);  // the checks, before any lookup
  auto make = [&] {
    c10::InferenceMode normal(false);  // a tensor with a version counter, even under inference_mode
    at::Tensor values = unpack_int4_values(packed, n);
    return std::make_shared<UnpackedInt4>(UnpackedInt4{values, values._version()});
  };
  // Keyed by packed alone (it stands in for the zero point too); kind 8 with n as `groups`.
  const auto kept = cache().get<UnpackedInt4>(packed, packed, n, /*kind=*/8, make);
  return kept->values._version() == kept->version ? kept->values : make()->values;
}

struct Int8CpuBackend {
  static constexpr bool kChecksValuesOnHost = true;
  static constexpr bool kIntegerIO = true;

  static at::Tensor linear(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                           int64_t quant_min, int64_t quant_max, const at::Tensor& weight,
                           const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                           const std::optional<at::Tensor>& bias, bool relu, const int8::WeightQParams& wq,
                           const std::optional<int8::OutputQParams>& out_q) {
    if (int16_gemm::supported() && wq.kind != int8::WeightQParams::Kind::PerGroup && weight.size(1) > 0) {
      at::Tensor y = linear_int16(input, input_scale.item<float>(), input_zero_point.item<int32_t>(),
                                  quant_min, quant_max, weight, weight_scale, weight_zero_point, bias, relu, out_q,
                                  "qatx::linear_int8");
      if (y.defined()) return y;
    }
    return int8::linear_reference(input, input_scale, input_zero_point, quant_min, quant_max, weight, weight_scale,
                                  weight_zero_point, bias, relu);
  }

  static at::Tensor convolution(const at::Tensor& input, const at::Tensor& input_scale,
                                const at::Tensor& input_zero_point, int64_t quant_min, int64_t quant_max,
                                const at::Tensor& weight, const at::Tensor& weight_scale,
                                const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                const int8::ConvGeometry& geo, bool transposed, int64_t groups, bool relu,
                                const std::optional<int8::OutputQParams>& out_q) {
    if (int16_gemm::supported() && !transposed && weight.numel() > 0) {
      const float s = input_scale.item<float>();
      const int32_t z = input_zero_point.item<int32_t>();
      constexpr const char* op = "qatx::convolution_int8";
      at::Tensor y;
      switch (geo.spatial) {
        case 1: y = convolution_int16<1>(input, s, z, quant_min, quant_max, weight, weight_scale, weight_zero_point,
                                         bias, geo, groups, relu, out_q, op); break;
        case 2: y = convolution_int16<2>(input, s, z, quant_min, quant_max, weight, weight_scale, weight_zero_point,
                                         bias, geo, groups, relu, out_q, op); break;
        default: y = convolution_int16<3>(input, s, z, quant_min, quant_max, weight, weight_scale,
                                          weight_zero_point, bias, geo, groups, relu, out_q, op);
      }
      if (y.defined()) return y;
    }
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
    if (!per_row && int16_gemm::supported() && k > 0 && x.size(0) > 0) {
      auto [s, z] = int8::dynamic_qparams(x, false);
      at::Tensor y = linear_int16(input, s.item<float>(), z.item<int32_t>(), 0, 255, weight, weight_scale,
                                  weight_zero_point, bias, false, std::nullopt, "qatx::linear_int8_dynamic");
      if (y.defined()) return y;
    }
    return int8::linear_dynamic_reference(input, weight, weight_scale, weight_zero_point, bias, per_row);
  }

  static void add(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                  int64_t input_quant_min, int64_t input_quant_max, const at::Tensor& other,
                  const at::Tensor& other_scale, const at::Tensor& other_zero_point, int64_t other_quant_min,
                  int64_t other_quant_max, bool relu, const std::optional<int8::OutputQParams>& out_q,
                  at::Tensor& out) {
    if (out.numel() == 0) return;
    const at::Tensor x = dense_input_like_output(input, Granularity::per_tensor());
    const at::Tensor y = in_layout_of(other, out);
    const math::TensorGrid gx = tensor_grid(input_scale, input_zero_point, input_quant_min, input_quant_max);
    const math::TensorGrid gy = tensor_grid(other_scale, other_zero_point, other_quant_min, other_quant_max);
    if (x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && !out_q.has_value()) {
      const float* xp = x.const_data_ptr<float>();
      const float* yp = y.const_data_ptr<float>();
      float* op = out.mutable_data_ptr<float>();
      at::parallel_for(0, out.numel(), cpu::kGrainElements, [&](int64_t begin, int64_t end) {
        add_int8_range(xp, yp, op, begin, end, gx, gy, relu);
      });
      return;
    }
    const math::TensorGrid go =
        out_q.has_value() ? tensor_grid(out_q->scale, out_q->zero_point, out_q->quant_min, out_q->quant_max)
                          : math::TensorGrid{1.0f, 1.0f, 0.0f, 0.0f, 0.0f};
    if (x.scalar_type() == at::kByte && y.scalar_type() == at::kByte && out.scalar_type() == at::kByte) {
      const uint8_t* xp = x.const_data_ptr<uint8_t>();
      const uint8_t* yp = y.const_data_ptr<uint8_t>();
      uint8_t* op = out.mutable_data_ptr<uint8_t>();
      at::parallel_for(0, out.numel(), cpu::kGrainElements, [&](int64_t begin, int64_t end) {
        add_uint8_range(xp, yp, op, begin, end, gx, gy, go, relu);
      });
      return;
    }
    std::atomic<bool> ok{true};
    at::parallel_for(0, out.numel(), cpu::kGrainElements, [&](int64_t begin, int64_t end) {
      float a[kAddBlock], b[kAddBlock];
      for (int64_t i = begin; i < end; i += kAddBlock) {
        const int64_t n = std::min(kAddBlock, end - i);
        grid_values_at(x, i, a, n, gx);
        grid_values_at(y, i, b, n, gy);
        sum_values(a, b, n, relu);
        if (!store_values_at(a, out, i, n, go)) ok = false;
      }
    });
    check_no_nan(ok, "qatx::add_int8");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CPU, m) {
  Int8Kernels<Int8CpuBackend>::register_all(m);
  m.impl("unpack_int4", &unpack_int4_cached);
}

}  // namespace ops
}  // namespace qatx
