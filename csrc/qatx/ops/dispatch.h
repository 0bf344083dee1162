// The dtype dispatch of the kernels, shared by the CPU and CUDA files: exactly the dtypes the
// argument checks admit, so no kernel is compiled for a dtype that cannot reach it.
#pragma once

#include <ATen/Dispatch.h>

#include <cstdint>

// Float inputs/outputs: float32, float16, bfloat16 (scalar_t inside the body).
#define QATX_DISPATCH_FLOAT(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace qatx {
namespace ops {

// Calls fn(Int{}) for the integer dtypes of the quantize / dequantize ops.
template <typename Fn>
void dispatch_int_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kChar: return fn(int8_t{});
    case at::kByte: return fn(uint8_t{});
    case at::kShort: return fn(int16_t{});
    case at::kInt: return fn(int32_t{});
    default: TORCH_CHECK(false, "qatx: unsupported integer dtype ", dtype);
  }
}

}  // namespace ops
}  // namespace qatx
