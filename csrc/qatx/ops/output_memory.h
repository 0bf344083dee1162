// CPU memory for the ops' outputs. Freshly mapped memory costs a page fault per 4 KiB on first
// touch (microseconds each on a virtual machine: 8 MiB of output can take longer to fault in than
// to compute), and glibc returns large freed blocks to the system. So outputs of at least
// kMinCachedBytes come from a cache: a freed block waits there for the next output of the same
// size (a model's forward asks for the same sizes on every call). The cache holds at most its
// limit (default 512 MiB); beyond it the oldest blocks are freed first.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qatx {
namespace ops {

struct CpuCacheStats {
  int64_t cached_bytes;  // held by freed blocks, ready for reuse
  int64_t limit_bytes;
  int64_t reused;        // outputs served from the cache
  int64_t allocated;     // outputs of at least kMinCachedBytes that needed new memory
};

constexpr int64_t kMinCachedBytes = 128 * 1024;

CpuCacheStats cpu_cache_stats();
// Sets the limit (0 turns the cache off), frees what exceeds it; returns the previous limit.
int64_t set_cpu_cache_limit(int64_t limit_bytes);
// Frees every cached block; returns the bytes freed.
int64_t empty_cpu_cache();

// For the kernels: an uninitialised output with these sizes and strides (from the cache on the
// CPU, at::empty_strided elsewhere).
at::Tensor empty_output(c10::SymIntArrayRef sizes, c10::SymIntArrayRef strides, const at::TensorOptions& options);
// ... contiguous.
at::Tensor empty_output(c10::SymIntArrayRef sizes, const at::TensorOptions& options);
// ... with the layout of at::empty_like(input, options).
at::Tensor empty_like_output(const at::Tensor& input, const at::TensorOptions& options);

}  // namespace ops
}  // namespace qatx
