// The single TORCH_LIBRARY block: every qatx operator schema, grouped by family. Kernels are
// registered per dispatch key in ops/{cpu,cuda,meta,autograd}/.
#include <torch/library.h>

TORCH_LIBRARY(qatx, m) {
  // --- Affine fake-quantize with fixed qparams; straight-through-estimator gradient. ---
  // y = (clamp(rint(x / s) + z, quant_min, quant_max) - z) * s, rint = round half to even.
  m.def("fake_quantize_per_tensor_affine(Tensor input, Tensor scale, Tensor zero_point, int quant_min, int quant_max) -> Tensor");
  m.def("fake_quantize_per_channel_affine(Tensor input, Tensor scale, Tensor zero_point, int axis, int quant_min, int quant_max) -> Tensor");
  m.def("fake_quantize_per_group_affine(Tensor input, Tensor scale, Tensor zero_point, int group_size, int quant_min, int quant_max) -> Tensor");
  // Forward for autograd: the output and the STE mask, one bit per element in memory order.
  m.def("_fake_quantize_per_tensor_affine_with_mask(Tensor input, Tensor scale, Tensor zero_point, int quant_min, int quant_max) -> (Tensor output, Tensor mask)");
  m.def("_fake_quantize_per_channel_affine_with_mask(Tensor input, Tensor scale, Tensor zero_point, int axis, int quant_min, int quant_max) -> (Tensor output, Tensor mask)");
  m.def("_fake_quantize_per_group_affine_with_mask(Tensor input, Tensor scale, Tensor zero_point, int group_size, int quant_min, int quant_max) -> (Tensor output, Tensor mask)");
  // STE backward: grad_input = grad_output where the mask bit is set, else 0. grad_output must
  // be dense in the forward output's memory order.
  m.def("_fake_quantize_ste_backward(Tensor grad_output, Tensor mask) -> Tensor");

  // --- Real quantize / dequantize: integer tensors for INT8 export. ---
  // q = clamp(rint(x / s) + z, quant_min, quant_max) as dtype (int8, uint8, int16, int32).
  m.def("quantize_per_tensor_affine(Tensor input, Tensor scale, Tensor zero_point, int quant_min, int quant_max, ScalarType dtype) -> Tensor");
  m.def("quantize_per_channel_affine(Tensor input, Tensor scale, Tensor zero_point, int axis, int quant_min, int quant_max, ScalarType dtype) -> Tensor");
  m.def("quantize_per_group_affine(Tensor input, Tensor scale, Tensor zero_point, int group_size, int quant_min, int quant_max, ScalarType dtype) -> Tensor");
  // y = (q - z) * s as output_dtype (float32 when None).
  m.def("dequantize_per_tensor_affine(Tensor input, Tensor scale, Tensor zero_point, ScalarType? output_dtype=None) -> Tensor");
  m.def("dequantize_per_channel_affine(Tensor input, Tensor scale, Tensor zero_point, int axis, ScalarType? output_dtype=None) -> Tensor");
  m.def("dequantize_per_group_affine(Tensor input, Tensor scale, Tensor zero_point, int group_size, ScalarType? output_dtype=None) -> Tensor");

  // --- Learnable quantizers: fake-quantize whose qparams get exact gradients. ---
  // LSQ / LSQ+: float32 scale and zero point; z_r = rint(clamp(zero_point, quant_min, quant_max)),
  // y = (clamp(rint(x / s) + z_r, quant_min, quant_max) - z_r) * s. Per-tensor when scale has one
  // element, else per-channel along axis (or per-group over the last dimension).
  m.def("fake_quantize_lsq(Tensor input, Tensor scale, Tensor zero_point, int axis, int quant_min, int quant_max, float grad_factor) -> Tensor");
  m.def("fake_quantize_lsq_per_group(Tensor input, Tensor scale, Tensor zero_point, int group_size, int quant_min, int quant_max, float grad_factor) -> Tensor");
  // PACT: fake-quantize clip(x, -alpha or 0, alpha) with scale alpha / (2^(bits-1) - 1 or 2^bits - 1).
  m.def("fake_quantize_pact(Tensor input, Tensor alpha, int bits, bool is_signed) -> Tensor");
  // Backward passes: grad_input and the qparam gradients from one deterministic pass over the
  // input. grad_zero_point is undefined (None) unless zero_point_requires_grad.
  m.def("_fake_quantize_lsq_backward(Tensor grad_output, Tensor input, Tensor scale, Tensor zero_point, int axis, int quant_min, int quant_max, float grad_factor, bool zero_point_requires_grad) -> (Tensor grad_input, Tensor grad_scale, Tensor grad_zero_point)");
  m.def("_fake_quantize_lsq_per_group_backward(Tensor grad_output, Tensor input, Tensor scale, Tensor zero_point, int group_size, int quant_min, int quant_max, float grad_factor, bool zero_point_requires_grad) -> (Tensor grad_input, Tensor grad_scale, Tensor grad_zero_point)");
  m.def("_fake_quantize_pact_backward(Tensor grad_output, Tensor input, Tensor alpha, int bits, bool is_signed) -> (Tensor grad_input, Tensor grad_alpha)");

  // --- Histogram observer: calibration statistics and range searches. ---
  // State per channel (row): hist int64 [C, bins] counts, grid int32 [C, 2] = (e, a) (bin j covers
  // [(a + j) 2^e, (a + j + 1) 2^e)), bounds float32 [C, 2] = observed finite (min, max), min > max
  // while empty. Returns the state after adding input (per tensor when axis is None, else one row
  // per index along axis); the range grows by power-of-two factors, merging old bins exactly.
  m.def("histogram_observe(Tensor input, Tensor hist, Tensor grid, Tensor bounds, int? axis=None) -> (Tensor hist_out, Tensor grid_out, Tensor bounds_out)");
  // Clip range per row chosen from the histogram by method 'percentile', 'mse' or 'entropy'.
  m.def("histogram_range(Tensor hist, Tensor grid, Tensor bounds, str method, float percentile=99.99, int quant_min=-128, int quant_max=127, bool symmetric=True) -> (Tensor min_val, Tensor max_val)");

  // --- Observe + fake-quantize: QAT with min/max observers, one read of the input for its range. ---
  // Updates the running range min_val / max_val in place (moving average m + c (x_m - m) for
  // 0 < averaging_constant <= 1, running min/max when it is negative; an unset range, min > max,
  // takes the batch range as is), writes scale / zero_point computed from it on the device (the
  // formulas of qatx.observers.calculate_qparams), then returns the affine fake-quantize of the
  // input with those qparams (STE gradient). Non-finite input values are read as 0.
  m.def("observe_fake_quantize_per_tensor_affine(Tensor input, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) scale, Tensor(d!) zero_point, float averaging_constant, int quant_min, int quant_max, bool symmetric) -> Tensor");
  m.def("observe_fake_quantize_per_channel_affine(Tensor input, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) scale, Tensor(d!) zero_point, int axis, float averaging_constant, int quant_min, int quant_max, bool symmetric) -> Tensor");
  m.def("observe_fake_quantize_per_group_affine(Tensor input, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) scale, Tensor(d!) zero_point, int group_size, float averaging_constant, int quant_min, int quant_max, bool symmetric) -> Tensor");
  // The observing half: per-group when group_size > 0, else per-channel along axis, else per-tensor.
  m.def("_observe_min_max(Tensor input, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) scale, Tensor(d!) zero_point, int? axis, int group_size, float averaging_constant, int quant_min, int quant_max, bool symmetric) -> ()");
  // --- BN-folded QAT layers. ---
  // input * scale along dim 1 (scale: [input.size(1)]); the autograd node keeps the output, not
  // the input: grad_scale[c] = sum(grad_output * output / scale[c]) over all dims but 1.
  m.def("_scale_channels(Tensor input, Tensor scale) -> Tensor");
  // --- INT8 inference: integer arithmetic inside. ---
  // Input quantized per tensor, q = clamp(rint(x * (1/s_in)) + z_in, quant_min, quant_max) (as the
  // fake-quantize forward), int8 weight w with per-tensor/-channel (/-group for linear) scale and
  // zero point, exact integer sum acc[c] = sum_k (q_k - z_in)(w_ck - z_w[c]), then
  // y = (acc[c] + bias[c]) * s_in * s_w[c] as float32, ReLU when relu. bias: int32, at scale s_in * s_w[c].
  // The input may also be uint8 / int8 holding q itself (clamped to the quant range). With
  // output_scale and output_zero_point the output is y quantized to that grid (uint8 when
  // output_quant_min >= 0, else int8): what the next layer's input quantization would make of y.
  m.def("linear_int8(Tensor input, Tensor input_scale, Tensor input_zero_point, int input_quant_min, int input_quant_max, Tensor weight, Tensor weight_scale, Tensor weight_zero_point, Tensor? bias=None, bool relu=False, Tensor? output_scale=None, Tensor? output_zero_point=None, int output_quant_min=0, int output_quant_max=255) -> Tensor");
  m.def("convolution_int8(Tensor input, Tensor input_scale, Tensor input_zero_point, int input_quant_min, int input_quant_max, Tensor weight, Tensor weight_scale, Tensor weight_zero_point, Tensor? bias, int[] stride, int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups, bool relu=False, Tensor? output_scale=None, Tensor? output_zero_point=None, int output_quant_min=0, int output_quant_max=255) -> Tensor");
  // Dynamic: the input's uint8 qparams come from each call's range (whole input or per row);
  // y = acc[r, c] * s_in[r] * s_w[c] + bias[c] with a float32 bias.
  m.def("linear_int8_dynamic(Tensor input, Tensor weight, Tensor weight_scale, Tensor weight_zero_point, Tensor? bias=None, bool per_row=False) -> Tensor");
  // y = fq(input) + fq(other), ReLU when relu: each input quantized to its own 8-bit grid and dequantized,
  // then summed in float32 (a converted quantized add).
  // 4-bit weights as the converted modules store them (uint8, two per byte along the last
  // dimension: element 2j in the low nibble, 2j + 1 in the high one, two's complement) as int8
  // [..., n], n = 2 * packed.size(-1) or one less. On the CPU the result is kept while `packed` is
  // unchanged and the same tensor comes back (so the ops above find their packed weight cached),
  // unless it was itself changed in place.
  m.def("unpack_int4(Tensor packed, int n) -> Tensor");
  m.def("add_int8(Tensor input, Tensor input_scale, Tensor input_zero_point, int input_quant_min, int input_quant_max, Tensor other, Tensor other_scale, Tensor other_zero_point, int other_quant_min, int other_quant_max, bool relu=False, Tensor? output_scale=None, Tensor? output_zero_point=None, int output_quant_min=0, int output_quant_max=255) -> Tensor");
}
