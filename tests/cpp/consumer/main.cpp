// Smallest user of an installed qatx: fake-quantizes eight values and checks them exactly.
// Exit status 0 only when the output is the expected one.
//
// QATX_CONSUMER_DISPATCHER_ONLY: call the op by name through the dispatcher, so that nothing
// but the link anchor of qatx/qatx.h ties this program to libqatx.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include "qatx/qatx.h"

namespace {

at::Tensor fake_quantize(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z, int64_t qmin, int64_t qmax) {
#if defined(QATX_CONSUMER_DISPATCHER_ONLY)
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qatx::fake_quantize_per_tensor_affine", "")
                             .typed<Signature>();
  return op.call(x, s, z, qmin, qmax);
#else
  return qatx::ops::fake_quantize_per_tensor_affine(x, s, z, qmin, qmax);
#endif
}

}  // namespace

int main() {
  try {
#if !defined(QATX_CONSUMER_DISPATCHER_ONLY)
    if (qatx::version() != QATX_EXPECTED_VERSION_NUMBER) {
      std::printf("FAIL: qatx::version() = %lld, expected %lld\n", static_cast<long long>(qatx::version()),
                  static_cast<long long>(QATX_EXPECTED_VERSION_NUMBER));
      return 1;
    }
#endif
    // scale 0.5 (1/scale = 2 exactly), zero point 0, range [-2, 2]; ties round to even.
    const std::vector<float> in = {-1.0f, -0.26f, 0.0f, 0.24f, 0.25f, 0.75f, 1.0f, 10.0f};
    const std::vector<float> expected = {-1.0f, -0.5f, 0.0f, 0.0f, 0.0f, 1.0f, 1.0f, 1.0f};
    const at::Tensor x = at::tensor(in);
    const at::Tensor s = at::full({1}, 0.5, at::kFloat);
    const at::Tensor z = at::zeros({1}, at::kInt);
    const at::Tensor y = fake_quantize(x, s, z, -2, 2).contiguous();

    std::printf("qatx %lld fake_quantize_per_tensor_affine(%s):", static_cast<long long>(QATX_EXPECTED_VERSION_NUMBER),
#if defined(QATX_CONSUMER_DISPATCHER_ONLY)
                "dispatcher"
#else
                "qatx::ops"
#endif
    );
    bool ok = y.scalar_type() == at::kFloat && y.numel() == static_cast<int64_t>(expected.size());
    for (int64_t i = 0; ok && i < y.numel(); ++i) {
      const float v = y.const_data_ptr<float>()[i];
      std::printf(" %g", v);
      ok = std::memcmp(&v, &expected[i], sizeof(float)) == 0;
    }
    std::printf("\n%s\n", ok ? "OK" : "FAIL: unexpected output");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("FAIL: %s\n", e.what());
    return 1;
  }
}
