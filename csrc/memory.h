// fastlstm C++ CPU backend: memory kept between calls (packed weights, scratch buffers) and release_memory().
#pragma once

#include <ATen/Parallel.h>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
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
      return align(new char[bytes + 64]);
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
    kept_.push_back({p, bytes});
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
  std::unique_ptr<char[]> once;  // a request too large to keep: freed on the next request
  ReleaseWatch watch;
  void* get(size_t bytes) {
    release_if_asked();
    once.reset();
    if (bytes > kScratchKeep) {
      once.reset(new char[bytes + 64]);
      return align(once.get());
    }
    if (bytes > kept_bytes) {
      kept.reset(new char[bytes + 64]);
      kept_bytes = bytes;
    }
    return align(kept.get());
  }
  // As PackPool's: called where no buffer of this thread's is in use (a request, release_memory's own region).
  size_t release_if_asked() {
    if (!watch.asked()) return 0;
    once.reset();
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

// Frees the memory kept between calls: now on the calling thread and its team of OpenMP threads, at their next
// call on other threads. Returns the bytes freed now. Never while a call of this thread is running (it is a
// separate op, called between calls).
int64_t release_memory() {
  release_epoch.fetch_add(1, std::memory_order_relaxed);
  size_t freed = pack_pool().release_if_asked() + pack_scratch().release_if_asked();
  freed += gates_scratch().release_if_asked();
  size_t workers = 0;
#pragma omp parallel reduction(+ : workers)
  workers += pack_pool().release_if_asked();
  return static_cast<int64_t>(freed + workers);
}

}  // namespace
}  // namespace fastlstm
