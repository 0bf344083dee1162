// CUDA kernels of the INT8 ops. Linear: the input is quantized by qatx::quantize_per_tensor_affine
// (the fake-quantize forward's integers), moved to int8 by a constant offset, multiplied with the
// int8 weight by at::_int_mm (cuBLASLt, int32 accumulation), and one epilogue kernel removes the
// zero-point terms and dequantizes: acc = raw - z_a * colsum_w[c] - z_w[c] * rowsum_a[r] + K z_a z_w[c],
// y = (acc + bias[c]) * s_in * s_w[c]. Shapes _int_mm does not take (M <= 16, K or N not a
// multiple of 8), per-group weights, convolutions and the dynamic op run the exact reference
// route of int8_args.cpp (float64 on the device). add_int8 is one elementwise kernel
// (quant_math.h's add_int8_value). No host synchronisation: qparams stay tensors.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "qatx/ops/affine.h"
#include "qatx/ops/cuda/cuda_kernels.cuh"
#include "qatx/ops/int8_kernels.h"

namespace qatx {
namespace ops {
namespace {

__global__ void linear_epilogue_kernel(const int32_t* __restrict__ raw, const int32_t* __restrict__ row_sum,
                                       const int32_t* __restrict__ col_sum, const int32_t* __restrict__ a_zero_point,
                                       const int32_t* __restrict__ w_zero_point, bool w_zero_point_per_channel,
                                       const float* __restrict__ a_scale, const float* __restrict__ w_scale,
                                       bool w_scale_per_channel, const int32_t* __restrict__ bias, bool relu,
                                       int64_t m, int64_t n, int64_t k, float* __restrict__ out) {
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t r = i / n, c = i % n;
    const int64_t za = a_zero_point[0];
    const int64_t zw = w_zero_point[w_zero_point_per_channel ? c : 0];
    int64_t acc = static_cast<int64_t>(raw[i]) - za * col_sum[c] - zw * row_sum[r] + k * za * zw;
    if (bias != nullptr) acc += bias[c];
    const double s = static_cast<double>(a_scale[0]) * static_cast<double>(w_scale[w_scale_per_channel ? c : 0]);
    float y = static_cast<float>(static_cast<double>(acc) * s);
    out[i] = relu ? fmaxf(y, 0.0f) : y;
  }
}

// The grid of one add operand, read on the device from float32 scale / zero point tensors of one
// element; the values are checked there (a device-side assertion) so the host never waits.
__device__ __forceinline__ math::TensorGrid load_grid(const float* scale, const float* zero_point, float quant_min,
                                                      float quant_max) {
  const float s = scale[0], z = zero_point[0];
  CUDA_KERNEL_ASSERT_MSG(math::is_valid_scale(s), "qatx::add_int8: scale must be finite and at least 2^-126");
  CUDA_KERNEL_ASSERT_MSG(z >= quant_min && z <= quant_max,
                         "qatx::add_int8: zero_point must lie inside [quant_min, quant_max]");
  return {s, 1.0f / s, z, quant_min, quant_max};
}

__global__ void add_int8_kernel(const float* __restrict__ x, const float* __restrict__ y, float* __restrict__ out,
                                int64_t numel, const float* __restrict__ x_scale, const float* __restrict__ x_zero_point,
                                float x_min, float x_max, const float* __restrict__ y_scale,
                                const float* __restrict__ y_zero_point, float y_min, float y_max, bool relu) {
  const math::TensorGrid gx = load_grid(x_scale, x_zero_point, x_min, x_max);
  const math::TensorGrid gy = load_grid(y_scale, y_zero_point, y_min, y_max);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    out[i] = math::add_int8_value(x[i], gx, y[i], gy, relu);
  }
}

at::Tensor linear_int_mm(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                         int64_t quant_min, int64_t quant_max, const at::Tensor& weight, const at::Tensor& weight_scale,
                         const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias, bool relu) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor x = input.reshape({-1, k});
  const int64_t m = x.size(0);
  // Offset that moves [quant_min, quant_max] (at most 8 bits) into int8.
  const int64_t offset = std::max<int64_t>(0, quant_max - 127);
  const at::Tensor q = quantize_per_tensor_affine(x, input_scale, input_zero_point, quant_min, quant_max, at::kInt);
  const at::Tensor a = (q - offset).to(at::kChar);
  const at::Tensor raw = at::_int_mm(a, weight.t());
  const at::Tensor row_sum = a.sum(1, false, at::kInt);
  const at::Tensor col_sum = weight.sum(1, false, at::kInt);
  const at::Tensor za = (input_zero_point.reshape({1}).to(at::kInt) - offset).contiguous();
  const at::Tensor zw = weight_zero_point.reshape({-1}).to(at::kInt).contiguous();
  const at::Tensor sa = input_scale.reshape({1}).to(at::kFloat).contiguous();
  const at::Tensor sw = weight_scale.reshape({-1}).to(at::kFloat).contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  at::Tensor out = at::empty({m, n}, input.options());
  if (m * n > 0) {
    const int blocks = static_cast<int>(std::min<int64_t>((m * n + cuda::kThreads - 1) / cuda::kThreads, 65535));
    linear_epilogue_kernel<<<blocks, cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        raw.const_data_ptr<int32_t>(), row_sum.const_data_ptr<int32_t>(), col_sum.const_data_ptr<int32_t>(),
        za.const_data_ptr<int32_t>(), zw.const_data_ptr<int32_t>(), zw.numel() > 1, sa.const_data_ptr<float>(),
        sw.const_data_ptr<float>(), sw.numel() > 1, b.has_value() ? b->const_data_ptr<int32_t>() : nullptr, relu, m,
        n, k, out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.reshape_symint(int8::linear_output_shape(input, weight));
}

struct Int8CudaBackend {
  static constexpr bool kChecksValuesOnHost = false;
  static constexpr bool kIntegerIO = false;  // float32 in and out; the glue converts integer tensors

  static at::Tensor linear(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                           int64_t quant_min, int64_t quant_max, const at::Tensor& weight,
                           const at::Tensor& weight_scale, const at::Tensor& weight_zero_point,
                           const std::optional<at::Tensor>& bias, bool relu, const int8::WeightQParams& wq,
                           const std::optional<int8::OutputQParams>&) {
    c10::cuda::CUDAGuard guard(input.device());
    const int64_t m = input.numel() / std::max<int64_t>(weight.size(1), 1);
    if (wq.kind != int8::WeightQParams::Kind::PerGroup && m > 16 && weight.size(1) % 8 == 0 &&
        weight.size(0) % 8 == 0) {
      return linear_int_mm(input, input_scale, input_zero_point, quant_min, quant_max, weight, weight_scale,
                           weight_zero_point, bias, relu);
    }
    return int8::linear_reference(input, input_scale, input_zero_point, quant_min, quant_max, weight, weight_scale,
                                  weight_zero_point, bias, relu);
  }

  static at::Tensor convolution(const at::Tensor& input, const at::Tensor& input_scale,
                                const at::Tensor& input_zero_point, int64_t quant_min, int64_t quant_max,
                                const at::Tensor& weight, const at::Tensor& weight_scale,
                                const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                const int8::ConvGeometry& geo, bool transposed, int64_t groups, bool relu,
                                const std::optional<int8::OutputQParams>&) {
    c10::cuda::CUDAGuard guard(input.device());
    return int8::in_conv_layout(int8::convolution_reference(input, input_scale, input_zero_point, quant_min,
                                                            quant_max, weight, weight_scale, weight_zero_point, bias,
                                                            geo, transposed, groups, relu),
                                geo, transposed);
  }

  static at::Tensor linear_dynamic(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
                                   const at::Tensor& weight_zero_point, const std::optional<at::Tensor>& bias,
                                   bool per_row) {
    c10::cuda::CUDAGuard guard(input.device());
    return int8::linear_dynamic_reference(input, weight, weight_scale, weight_zero_point, bias, per_row);
  }

  static void add(const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                  int64_t input_quant_min, int64_t input_quant_max, const at::Tensor& other,
                  const at::Tensor& other_scale, const at::Tensor& other_zero_point, int64_t other_quant_min,
                  int64_t other_quant_max, bool relu, const std::optional<int8::OutputQParams>&, at::Tensor& out) {
    const int64_t numel = out.numel();
    if (numel == 0) return;
    c10::cuda::CUDAGuard guard(input.device());
    const at::Tensor x = dense_input_like_output(input, Granularity::per_tensor());
    const at::Tensor y = in_layout_of(other, out);
    const at::Tensor sx = scale_as_float(input_scale), zx = zero_point_as_float(input_zero_point);
    const at::Tensor sy = scale_as_float(other_scale), zy = zero_point_as_float(other_zero_point);
    const int blocks = static_cast<int>(std::min<int64_t>((numel + cuda::kThreads - 1) / cuda::kThreads, 65535));
    add_int8_kernel<<<blocks, cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<float>(), y.const_data_ptr<float>(), out.mutable_data_ptr<float>(), numel,
        sx.const_data_ptr<float>(), zx.const_data_ptr<float>(), static_cast<float>(input_quant_min),
        static_cast<float>(input_quant_max), sy.const_data_ptr<float>(), zy.const_data_ptr<float>(),
        static_cast<float>(other_quant_min), static_cast<float>(other_quant_max), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qatx, CUDA, m) {
  Int8Kernels<Int8CudaBackend>::register_all(m);
  m.impl("unpack_int4", &int8::unpack_int4_values);
}

}  // namespace ops
}  // namespace qatx
