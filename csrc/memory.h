// fastlstm C++ CPU backend: memory kept between calls (packed weights, scratch buffers) and release_memory().
#pragma once

#include "env.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace fastlstm {
namespace {

// Memory of packed weights (and of weight_grad's transposed copies), kept by each thread between calls (at most
// kPackKeep bytes a thread). Every call packs its weights afresh, and fresh allocations of that size come from
// the kernel as pages that fault and are zeroed on first touch: at batch 1, hidden 512 (4 MB of w_hh) that cost
// ~1.4 ms of a 6 ms forward, measured by running with glibc told never to return memory
// (MALLOC_TRIM_THRESHOLD_). Buffers are reused by size; the same model asks for the same sizes call after call.
constexpr size_t kPackKeep = size_t(64) << 20;

// Bumped by release_memory(): every thread's kept memory (PackPool, Scratch) is freed at its next use.
std::atomic<uint64_t> release_epoch{0};

// Whether release_memory() ran since this holder of kept memory last asked.
class ReleaseWatch {
 public:
  bool asked() {
    const uint64_t now = release_epoch.load(std::memory_order_relaxed);
    if (now == seen_) return false;
    seen_ = now;
    return true;
  }

 private:
  uint64_t seen_ = 0;
};

// `bytes` of new memory, or torch's out-of-memory error: std::bad_alloc reached Python as MemoryError where
// nn.LSTM raises RuntimeError (DefaultCPUAllocator's), and an OpenMP worker cannot pass on an exception at all.
inline char* new_bytes(size_t bytes) {
  char* p = new (std::nothrow) char[bytes];
  TORCH_CHECK(p != nullptr, "fastlstm: out of memory allocating ", bytes, " bytes");
  return p;
}

class PackPool {
 public:
  // A buffer of at least `bytes`, 64-byte aligned (its size in `got`): the smallest kept one that fits.
  char* take(size_t bytes, size_t& got) {
    release_if_asked();
    auto best = kept_.end();
    for (auto it = kept_.begin(); it != kept_.end(); ++it)
      if (it->bytes >= bytes && (best == kept_.end() || it->bytes < best->bytes)) best = it;
    if (best == kept_.end()) {
      got = bytes;
      return align(new_bytes(bytes + 64));
    }
    got = best->bytes;
    char* p = best->base;
    kept_bytes_ -= best->bytes;
    kept_.erase(best);
    return p;
  }
  void give(char* p, size_t bytes) {
    release_if_asked();
    if (kept_bytes_ + bytes > kPackKeep) {
      delete[] base_of(p);
      return;
    }
    try {
      kept_.push_back({p, bytes});
    } catch (...) {  // called from destructors (PoolBuffer's), where a throw would end the process: free it instead
      delete[] base_of(p);
      return;
    }
    kept_bytes_ += bytes;
  }
  ~PackPool() { free_kept(); }
  // Frees what this thread keeps if release_memory() ran since it last looked; the bytes freed.
  size_t release_if_asked() { return watch_.asked() ? free_kept() : 0; }

 private:
  struct Buffer {
    char* base;  // aligned; the allocation starts base_of(base)
    size_t bytes;
  };
  // The allocation's start is stored just below the aligned pointer handed out.
  static char* align(char* raw) {
    char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + 64) & ~uintptr_t(63));
    std::memcpy(p - sizeof(char*), &raw, sizeof(char*));
    return p;
  }
  static char* base_of(char* p) {
    char* raw;
    std::memcpy(&raw, p - sizeof(char*), sizeof(char*));
    return raw;
  }
  size_t free_kept() {
    for (const auto& b : kept_) delete[] base_of(b.base);
    kept_.clear();
    return std::exchange(kept_bytes_, 0);
  }
  std::vector<Buffer> kept_;
  size_t kept_bytes_ = 0;
  ReleaseWatch watch_;
};

PackPool& pack_pool() {
  thread_local PackPool pool;
  return pool;
}

// A buffer from the calling thread's PackPool, returned to it (the pool of the thread that drops it) at the end.
template <typename unit_t>
class PoolBuffer {
 public:
  PoolBuffer() = default;
  PoolBuffer(const PoolBuffer&) = delete;
  PoolBuffer& operator=(const PoolBuffer&) = delete;
  ~PoolBuffer() { release(); }
  unit_t* reset(int64_t count) {
    release();
    p_ = pack_pool().take(static_cast<size_t>(count) * sizeof(unit_t), bytes_);
    return get();
  }
  unit_t* get() const { return reinterpret_cast<unit_t*>(p_); }
  bool empty() const { return p_ == nullptr; }

 private:
  void release() {
    if (p_ != nullptr) pack_pool().give(p_, bytes_);
    p_ = nullptr;
  }
  char* p_ = nullptr;
  size_t bytes_ = 0;
};

// Per-thread scratch memory kept between calls (up to kScratchKeep bytes): fresh multi-megabyte buffers
// every call cost page faults that show in profiles of short sequences.
constexpr size_t kScratchKeep = size_t(64) << 20;

struct Scratch {
  std::unique_ptr<char[]> kept;
  size_t kept_bytes = 0;
  ReleaseWatch watch;
  // Whether a request of `bytes` is served here. A larger one takes memory of the call's own, freed with it: kept
  // here until the thread's next request, it had outlived the call (an idle thread after one B64-T200-H512
  // inference call held 100 MiB of gates, over the cap, which release_memory() cannot free on another thread).
  static bool keeps(size_t bytes) { return bytes <= kScratchKeep; }
  void* get(size_t bytes) {
    TORCH_CHECK(keeps(bytes), "fastlstm: scratch request of ", bytes, " bytes over its cap");
    release_if_asked();
    if (bytes > kept_bytes) {
      kept.reset(new_bytes(bytes + 64));
      kept_bytes = bytes;
    }
    return align(kept.get());
  }
  // As PackPool's: called where no buffer of this thread's is in use (a request, release_memory's own region).
  size_t release_if_asked() {
    if (!watch.asked()) return 0;
    kept.reset();
    return std::exchange(kept_bytes, 0);
  }
  static void* align(char* p) { return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63)); }
};

// Only one MklPacked is alive at a time (per forward or backward call), so one buffer suffices.
Scratch& pack_scratch() {
  thread_local Scratch s;
  return s;
}
Scratch& gates_scratch() {
  thread_local Scratch s;
  return s;
}

// The large tensors a training call makes and drops every call: the saved gates and cell history (freed after
// backward) and backward's gate gradients. At batch 64+ they are tens of MB each, which the allocator takes from
// the kernel and hands back every call, as pages that fault and are zeroed on first touch: bf16 training of
// B64-T100-H512 on a 2-core Xeon ran 128-134 ms a step, 93-97 ms with glibc told to keep its memory
// (MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_), and a profile of B256-T35-H512 had a quarter of its samples in page
// faults. Kept here between calls instead, process-wide (a tensor is freed on whichever thread drops it), up to
// kTensorKeep bytes (FASTLSTM_KEEP_TENSORS_MB overrides; 0 keeps none). Only for tensors that stay inside the
// layer's ops: memory from here cannot be resized, which a user's y may need.
//
// Only what calls go on using is kept, so that memory follows the model's working set rather than the cap:
// sequences of varying length (bucketed batches, packed lengths) ask for a new size nearly every step, and kept by
// exact size those filled the cap with sizes that never came back (+520 MB over nn.LSTM's memory, training a
// 2-layer H256 model on T of 20-200). A request takes the smallest kept block up to kFitSlack larger, and blocks
// no request took for kIdlePeriods busy periods are freed, a busy period ending whenever none of the pool's
// memory is in use (after a training step's backward, typically); over the cap, the longest idle go first.
// Threads that train at once, their steps overlapping, may never leave the pool idle: no period ends, and what
// is kept then grows to the cap (bounded, not freed until a pause or release_memory()).
// Inference takes nothing from the pool, so where training stops (an evaluation, a model served after training in
// one process) no period ended and a step's tensors stayed kept for good (an audit: +88 MB over nn.LSTM's memory
// after 5 steps of B16-T200-H256-L2-bi, unchanged over 2,000 inference calls). kInferenceCallsToRelease inference
// calls with no training call between them free what is kept: a loop that runs a few inference calls between
// training steps (rollouts, a validation batch) keeps its memory.
constexpr size_t kTensorKeep = size_t(512) << 20;
constexpr size_t kTensorPoolMin = size_t(1) << 20;  // below this the allocator's own reuse suffices
constexpr size_t kFitSlack = 4;                     // a block up to a quarter larger than asked serves
constexpr uint64_t kIdlePeriods = 2;                // two: steps that alternate two shapes keep both
constexpr uint64_t kInferenceCallsToRelease = 64;

// The cap's environment variable, in MiB: a whole number of 0 or more, else a warning and the default (atoll had
// read "-1" as no cap at all, and "abc" or "" as 0).
inline size_t keep_bytes_from_env(const char* name, size_t fallback) {
  const auto mib = env_int(name, 0, int64_t(1) << 30, "MiB", std::to_string(fallback >> 20) + " MiB");
  return mib ? size_t(*mib) << 20 : fallback;
}

inline size_t tensor_keep_bytes() {
  static const size_t v = keep_bytes_from_env("FASTLSTM_KEEP_TENSORS_MB", kTensorKeep);
  return v;
}

class TensorPool {
 public:
  struct Block {
    void* p;
    size_t bytes;
  };

  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = kept_.lower_bound(bytes);
      if (it != kept_.end() && it->first - bytes <= bytes / kFitSlack) {
        const Block block{it->second.p, it->first};
        kept_.erase(it);
        kept_bytes_ -= block.bytes;
        in_use_ += block.bytes;
        return block;
      }
    }
    void* p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p != nullptr, "fastlstm: out of memory allocating ", bytes, " bytes");
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_ += bytes;
    return {p, bytes};
  }

  void give(const Block& block) {
    std::lock_guard<std::mutex> lock(mutex_);
    inference_calls_ = 0;
    in_use_ -= block.bytes;
    kept_.emplace(block.bytes, Kept{block.p, period_});
    kept_bytes_ += block.bytes;
    while (kept_bytes_ > tensor_keep_bytes()) free_kept(longest_idle());
    if (in_use_ == 0) end_period();
  }

  // A call that keeps nothing for backward: the kInferenceCallsToRelease-th in a row frees what is kept.
  void inference_call() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (kept_.empty() || in_use_ != 0 || ++inference_calls_ < kInferenceCallsToRelease) return;
    release_locked();
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    return release_locked();
  }

 private:
  size_t release_locked() {
    inference_calls_ = 0;
    for (const auto& [bytes, kept] : kept_) std::free(kept.p);
    kept_.clear();
    return std::exchange(kept_bytes_, 0);
  }

  struct Kept {
    void* p;
    uint64_t period;  // the busy period in which it was last given back
  };
  using Map = std::multimap<size_t, Kept>;

  Map::iterator longest_idle() {
    auto oldest = kept_.begin();
    for (auto it = kept_.begin(); it != kept_.end(); ++it)
      if (it->second.period < oldest->second.period) oldest = it;
    return oldest;
  }
  Map::iterator free_kept(Map::iterator it) {
    std::free(it->second.p);
    kept_bytes_ -= it->first;
    return kept_.erase(it);
  }
  void end_period() {
    for (auto it = kept_.begin(); it != kept_.end();)
      it = period_ - it->second.period >= kIdlePeriods ? free_kept(it) : std::next(it);
    ++period_;
  }

  std::mutex mutex_;
  Map kept_;
  size_t kept_bytes_ = 0;
  size_t in_use_ = 0;  // bytes of the pool's blocks held by live tensors
  uint64_t period_ = 0;
  uint64_t inference_calls_ = 0;  // since a training call last gave a block back
};

// Never destroyed: tensors may be freed after static destructors ran, and their deleters come here.
TensorPool& tensor_pool() {
  static TensorPool* pool = new TensorPool;
  return *pool;
}

// at::empty (or, with `zero`, at::zeros) of sizes and options, large ones from the TensorPool.
at::Tensor pooled_tensor(at::IntArrayRef sizes, const at::TensorOptions& options, bool zero) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kTensorPoolMin || tensor_keep_bytes() == 0)
    return zero ? at::zeros(sizes, options) : at::empty(sizes, options);
  const TensorPool::Block block = tensor_pool().take((bytes + 65535) & ~size_t(65535));
  if (zero) std::memset(block.p, 0, bytes);
  return at::from_blob(block.p, sizes, [block](void*) { tensor_pool().give(block); }, options);
}

// Frees the memory kept between calls: now on the calling thread and its team of OpenMP threads, at their next
// call on other threads. Returns the bytes freed now. Never while a call of this thread is running (it is a
// separate op, called between calls).
int64_t release_memory() {
  release_epoch.fetch_add(1, std::memory_order_relaxed);
  size_t freed = pack_pool().release_if_asked() + pack_scratch().release_if_asked();
  freed += gates_scratch().release_if_asked() + tensor_pool().release();
  size_t workers = 0;
#pragma omp parallel reduction(+ : workers)
  workers += pack_pool().release_if_asked();
  return static_cast<int64_t>(freed + workers);
}

}  // namespace
}  // namespace fastlstm
