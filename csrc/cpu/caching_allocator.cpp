// A caching allocator for host tensors (betanas::cache_cpu_allocations), installed as c10's CPU allocator
// by a search on the CPU.
//
// Why: a search step allocates the same activations every step. glibc hands blocks above its mmap
// threshold (at most 32 MiB) back to the kernel on free and trims the heap above its trim threshold, so
// every step page-faults its activations in again, and the kernel zeroes each page first; on a small VM
// that cost more than the convolutions writing into them. Here, blocks of 256 KiB and more are kept on
// free, in size classes of four per power of two (at most 25 % unused), and handed out again; their
// pages are asked to be transparent huge pages. Smaller blocks come from malloc, as before. The cache
// holds at most `max_cached_bytes` of free blocks; beyond that, freed blocks go back to the kernel.
// Allocations are reported to the profiler as c10's own CPU allocator reports them.
#include <sys/mman.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace betanas {
namespace {

constexpr size_t kHeader = 64;           // keeps the data 64-byte aligned inside a page-aligned block
constexpr size_t kMinCached = 256 << 10;

// The size class of n bytes (n >= kMinCached): the next of 2^b * {1, 1.25, 1.5, 1.75, 2}.
size_t size_class(size_t n) {
  const int b = 63 - __builtin_clzll(n - 1);
  const size_t base = size_t(1) << b, step = base / 4;
  return base + (n - base + step - 1) / step * step;
}

struct Header {
  size_t mapped;  // bytes of the mapping (header included)
  size_t klass;   // its size class
  size_t used;    // bytes asked for, for the profiler
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = bytes;
    trim_locked();
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t klass = n < kMinCached ? 0 : size_class(n);
    void* block = klass == 0 ? nullptr : take(klass);
    if (klass == 0) {  // small: from malloc, behind the same header, so that one deleter frees every block
      block = std::aligned_alloc(kHeader, (n + 2 * kHeader - 1) / kHeader * kHeader);
      TORCH_CHECK(block != nullptr, "betanas caching CPU allocator: out of memory allocating ", n, " bytes");
      *static_cast<Header*>(block) = {0, 0, 0};
    } else if (block == nullptr) {
      const size_t mapped = (klass + kHeader + 4095) / 4096 * 4096;
      block = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(block != MAP_FAILED, "betanas caching CPU allocator: out of memory allocating ", mapped, " bytes");
      madvise(block, mapped, MADV_HUGEPAGE);  // advice only: ignored where THP is off
      *static_cast<Header*>(block) = {mapped, klass, 0};
    }
    auto* header = static_cast<Header*>(block);
    header->used = n;
    void* data = static_cast<char*>(block) + kHeader;
    report(data, static_cast<int64_t>(n));
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static void release(void* data) {
    if (data == nullptr) return;
    void* block = static_cast<char*>(data) - kHeader;
    instance()->give_back(block, data);
  }

  static CachingCPUAllocator* instance() {
    static CachingCPUAllocator* the = new CachingCPUAllocator();  // never destroyed: frees may come at exit
    return the;
  }

 private:
  void* take(size_t klass) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(klass);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* block = it->second.back();
    it->second.pop_back();
    cached_ -= static_cast<Header*>(block)->mapped;
    return block;
  }

  void give_back(void* block, void* data) {
    auto* header = static_cast<Header*>(block);
    report(data, -static_cast<int64_t>(header->used));
    if (header->klass == 0) {
      std::free(block);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    free_[header->klass].push_back(block);
    cached_ += header->mapped;
    trim_locked();
  }

  void trim_locked() {
    for (auto it = free_.begin(); cached_ > limit_ && it != free_.end(); ++it) {
      while (cached_ > limit_ && !it->second.empty()) {
        void* block = it->second.back();
        it->second.pop_back();
        const size_t mapped = static_cast<Header*>(block)->mapped;
        cached_ -= mapped;
        munmap(block, mapped);
      }
    }
  }

  void report(void* data, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    const int64_t allocated = allocated_ += delta;
    c10::reportMemoryUsageToProfiler(data, delta, static_cast<size_t>(allocated), static_cast<size_t>(allocated),
                                     c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0, limit_ = 0;
  std::atomic<int64_t> allocated_{0};
};

// Installs the allocator (once) and sets the most bytes of free blocks it keeps; returns that limit.
int64_t cache_cpu_allocations(int64_t max_cached_bytes) {
  TORCH_CHECK(max_cached_bytes >= 0, "betanas::cache_cpu_allocations: max_cached_bytes must be >= 0, got ",
              max_cached_bytes);
  static std::once_flag installed;
  std::call_once(installed, [] {
    c10::SetCPUAllocator(CachingCPUAllocator::instance(), /*priority=*/1);
  });
  CachingCPUAllocator::instance()->set_limit(static_cast<size_t>(max_cached_bytes));
  return max_cached_bytes;
}

}  // namespace

TORCH_LIBRARY_IMPL(betanas, CompositeExplicitAutograd, m) { m.impl("cache_cpu_allocations", &cache_cpu_allocations); }

}  // namespace betanas
