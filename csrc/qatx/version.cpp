#include "qatx/qatx.h"

namespace qatx {

int64_t version() noexcept { return QATX_VERSION_NUMBER; }

}  // namespace qatx
