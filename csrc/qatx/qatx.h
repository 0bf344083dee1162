// qatx public C++ header: include it and link qatx::qatx to use the ops from libtorch.
#pragma once

#include <cstdint>

#include "qatx/ops/affine.h"
#include "qatx/ops/histogram.h"
#include "qatx/ops/int8.h"
#include "qatx/ops/lsq.h"
#include "qatx/ops/observe.h"
#include "qatx/ops/output_memory.h"

#if defined(_WIN32)
#define QATX_API __declspec(dllimport)
#else
#define QATX_API __attribute__((visibility("default")))
#endif

namespace qatx {

// Library version as MAJOR * 10000 + MINOR * 100 + PATCH.
QATX_API int64_t version() noexcept;

namespace detail {
// The library's job is done by static operator registration, which a linker would drop as
// "unused" (--as-needed). Every translation unit that includes this header references
// version(), which keeps the library linked and so its operators registered.
inline const int64_t kLinkAnchor = version();
}  // namespace detail

}  // namespace qatx
