// fastlstm C++ CPU backend: how many threads a loop whose threads meet every step may take, and the parallel
// loop those steps run their products in.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sched.h>  // sched_getaffinity
#endif
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>

namespace fastlstm {
namespace {

// The thread count lockstep_threads read last (high half) and the CPUs then (low half); -1 before the first read.
inline std::atomic<int64_t>& lockstep_seen() {
  static std::atomic<int64_t> seen{-1};
  return seen;
}

// The threads a loop whose threads meet every step may take (the team loop, and each step's parallel products):
// torch's, but no more than the CPUs this process may run on. torch starts with no more, but
// torch.set_num_threads takes any number, and a step then waits for a thread without a core. 2-core Zen 4,
// torch.set_num_threads(4), inference (nn.LSTM, taking all 4: 5-25 ms): B1-T100-H128 as a team of 4, 11-23 ms
// (0.3 ms as a team of 2 with 2 threads). Capped at the CPUs, six processes: B1-T100-H128 0.46-0.49 ms;
// B4-T100-H256 2.5-2.9 ms, once 13.9; B1-T100-H512 3.9-4.9 ms, twice 19-20 (the pool's spare threads still
// contend). On one thread instead, the bounded choice, two to four processes: 0.58-0.83, 7.4-9.5, 8.7-11.4 ms:
// slower on the whole, so the cap. Per-step parallel products capped as well: B8-T100-H256 18.4 ms -> 6.8-9.1
// ms (5 ms with 2 threads), B4-T100-H1024 67-115 -> 44-45 ms. The row split, whose threads never wait on each
// other, keeps torch's threads: capped, B32-T100-H128 measured no faster (inference 5.6-8.4 ms against 6.0-6.3,
// training 20.5-23.3 ms against 17.6-18.2). The CPUs are read again (a system call, ~0.3 us, a tenth of a small
// step's call) when torch's thread count changes, and otherwise at most every 100 ms, so a process that narrows
// its affinity is seen within 100 ms.
inline int lockstep_threads() {
  const int threads = at::get_num_threads();
#ifdef __linux__
  std::atomic<int64_t>& seen = lockstep_seen();
  static std::atomic<int64_t> read_at{0};  // steady_clock nanoseconds
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  int64_t last = seen.load(std::memory_order_relaxed);
  if (last < 0 || (last >> 32) != threads || now - read_at.load(std::memory_order_relaxed) > 100'000'000) {
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    const int count = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? std::max(CPU_COUNT(&cpus), 1) : threads;
    last = (int64_t(threads) << 32) | count;
    seen.store(last, std::memory_order_relaxed);
    read_at.store(now, std::memory_order_relaxed);
  }
  return std::min<int>(threads, static_cast<int>(last & 0xffffffff));
#else
  return threads;
#endif
}

// The CPUs this process may run on as lockstep_threads last read them; 0 where it has not, or cannot.
inline int lockstep_cpus() {
  const int64_t seen = lockstep_seen().load(std::memory_order_relaxed);
  return seen < 0 ? 0 : static_cast<int>(seen & 0xffffffff);
}

// An exception thrown on a thread of an OpenMP region cannot leave the region (std::terminate: a failed allocation
// on a worker aborted the process). Each thread's work runs through run(); the first exception is rethrown after
// the region, on the calling thread.
class RegionErrors {
 public:
  template <typename F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      if (!failed_.exchange(true)) error_ = std::current_exception();
    }
  }
  bool failed() const { return failed_.load(); }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

// at::parallel_for(begin, end, grain, f) on at most `threads` threads: contiguous chunks, one a thread, each in a
// parallel region as at::parallel_for marks it (at::in_parallel_region(), at::get_thread_num()).
//
// Never at::parallel_for itself: it first runs at::internal::lazy_init_num_threads(), an inline function whose
// thread_local flag is this library's own copy (libtorch's is hidden), so its first run in a thread re-ran
// at::init_num_threads() there and put the thread back to the count last set process-wide. A worker thread at
// torch.set_num_threads(1), after the main thread's set_num_threads(2): its first cpp call left it at 2 threads
// (nn.LSTM leaves it at 1). at::get_num_threads() runs libtorch's own flag, as torch's calls do.
template <typename F>
void parallel_on(int threads, int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t range = end - begin;
  if (range <= 0) return;
  const int64_t chunks = (range + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1);
  const int n = static_cast<int>(std::min<int64_t>(threads, chunks));
  if (n <= 1 || at::in_parallel_region()) {
    c10::ParallelGuard guard(true);
    f(begin, end);
    return;
  }
#ifdef _OPENMP
  const int64_t chunk = (range + n - 1) / n;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(n)
  {
    // OpenMP may start fewer threads than asked (OMP_THREAD_LIMIT, OMP_DYNAMIC, OMP_MAX_ACTIVE_LEVELS): each
    // thread then runs every team-th chunk, so no chunk is left undone.
    const int me = omp_get_thread_num(), team = omp_get_num_threads();
    for (int k = me; k < n; k += team) {
      const int64_t b = begin + k * chunk, e = std::min(end, b + chunk);
      if (b >= e) continue;
      try {
        at::internal::ThreadIdGuard id(me);
        c10::ParallelGuard guard(true);
        f(b, e);
      } catch (...) {
        if (!failed.exchange(true)) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#else
  c10::ParallelGuard guard(true);
  f(begin, end);
#endif
}

// at::parallel_for's split over torch's threads (see parallel_on for why not at::parallel_for).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_on(at::get_num_threads(), begin, end, grain, f);
}

// The work of one step on no more threads than lockstep_threads(): each step forks and joins, so a thread without
// a core would hold up every step's join, as a team's barrier.
template <typename F>
void parallel_steps(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_on(lockstep_threads(), begin, end, grain, f);
}

}  // namespace
}  // namespace fastlstm
