#include "qatx/ops/output_memory.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ExpandUtils.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/strides.h>

#include <cstring>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace qatx {
namespace ops {

namespace {

constexpr size_t kPage = 4096;

// Cached blocks by size; `order` lists them oldest first, for eviction.
class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < static_cast<size_t>(kMinCachedBytes)) return c10::GetCPUAllocator()->allocate(n);
    const size_t size = (n + kPage - 1) / kPage * kPage;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        ptr = it->second.back()->ptr;
        order_.erase(it->second.back());
        it->second.pop_back();
        cached_ -= size;
        ++reused_;
      } else {
        ++allocated_;
      }
    }
    if (ptr == nullptr) ptr = c10::alloc_cpu(size);
    // As the default CPU allocator: the profiler's memory view sees the output while it lives.
    c10::profiledCPUMemoryReporter().New(ptr, n);
    return {ptr, new Block{ptr, size}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  CpuCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(limit_), reused_, allocated_};
  }

  int64_t set_limit(int64_t limit) {
    std::vector<void*> freed;
    int64_t previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = static_cast<int64_t>(limit_);
      limit_ = static_cast<size_t>(limit);
      evict_to(limit_, freed);
    }
    free_all(freed);
    return previous;
  }

  int64_t empty() {
    std::vector<void*> freed;
    size_t bytes;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      bytes = cached_;
      evict_to(0, freed);
    }
    free_all(freed);
    return static_cast<int64_t>(bytes);
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  static void give_back(void* ctx);

  // Takes the oldest blocks out (into `freed`, released outside the lock by free_all) until at
  // most `target` bytes are cached.
  void evict_to(size_t target, std::vector<void*>& freed) {
    while (!order_.empty() && cached_ > target) {
      const Block b = order_.front();
      auto& same = free_[b.size];
      same.erase(same.begin());  // the oldest of its size is the first
      order_.pop_front();
      cached_ -= b.size;
      freed.push_back(b.ptr);
    }
  }

  static void free_all(const std::vector<void*>& freed) {
    for (void* p : freed) c10::free_cpu(p);
  }

  void keep(Block b) {
    std::vector<void*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (b.size <= limit_) {
        evict_to(limit_ - b.size, freed);
        order_.push_back(b);
        free_[b.size].push_back(std::prev(order_.end()));
        cached_ += b.size;
      } else {
        freed.push_back(b.ptr);
      }
    }
    free_all(freed);
  }

  std::mutex mutex_;
  std::list<Block> order_;
  std::unordered_map<size_t, std::vector<std::list<Block>::iterator>> free_;
  size_t cached_ = 0, limit_ = size_t{512} << 20;
  int64_t reused_ = 0, allocated_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
CachingCpuAllocator& cache() {
  static auto* allocator = new CachingCpuAllocator();
  return *allocator;
}

void CachingCpuAllocator::give_back(void* ctx) {
  std::unique_ptr<Block> b(static_cast<Block*>(ctx));
  c10::profiledCPUMemoryReporter().Delete(b->ptr);
  cache().keep(*b);
}

}  // namespace

CpuCacheStats cpu_cache_stats() { return cache().stats(); }

int64_t set_cpu_cache_limit(int64_t limit_bytes) {
  TORCH_CHECK(limit_bytes >= 0, "set_cpu_cache_limit: limit_bytes must be >= 0, got ", limit_bytes);
  return cache().set_limit(limit_bytes);
}

int64_t empty_cpu_cache() { return cache().empty(); }

namespace {
// A CPU tensor whose memory comes from the cache.
at::Tensor cached_cpu_tensor(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  return at::detail::empty_strided_generic(sizes, strides, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(options.dtype()));
}
}  // namespace

at::Tensor empty_output(c10::SymIntArrayRef sizes, c10::SymIntArrayRef strides, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty_strided_symint(sizes, strides, options);
  return cached_cpu_tensor(C10_AS_INTARRAYREF_SLOW(sizes), C10_AS_INTARRAYREF_SLOW(strides), options);
}

at::Tensor empty_output(c10::SymIntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty_symint(sizes, options);
  const at::IntArrayRef concrete = C10_AS_INTARRAYREF_SLOW(sizes);
  return cached_cpu_tensor(concrete, c10::contiguous_strides(concrete), options);
}

at::Tensor empty_like_output(const at::Tensor& input, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty_like(input, options);
  if (input.is_non_overlapping_and_dense()) return cached_cpu_tensor(input.sizes(), input.strides(), options);
  // As at::empty_like: dense strides in the input's stride order.
  return cached_cpu_tensor(input.sizes(), at::infer_dense_strides(input.sizes(), input.strides()), options);
}

}  // namespace ops
}  // namespace qatx
