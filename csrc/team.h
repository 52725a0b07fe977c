// fastlstm C++ CPU backend: the team loop's parts: a spin barrier, when a team runs, and each thread's slice of
// hidden units.
#pragma once

#include "cpu_id.h"
#include "simd.h"

#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <type_traits>

namespace fastlstm {
namespace {

// ---------------------------------------------------------------------------------------------------------
// The team loop: one OpenMP region for the whole sequence at small per-step work.
//
// The per-step path forks threads twice a step (product, cell); measured here, an empty parallel region costs
// ~570 ns and `omp barrier` ~280 ns, while a B=1, H=64 step is ~1 us of work. In the team loop each thread
// owns a slice of hidden units (all four gates of them), does its slice's product and cell, and meets the
// others at one spin barrier (~30 ns) per step. h is double-buffered so that no thread writes what another
// still reads in the same step.

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class SpinBarrier {
 public:
  void init(int n) { n_ = n; }
  // gen: the caller's count of barriers passed so far.
  void wait(int& gen) {
    ++gen;
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen, std::memory_order_release);
      return;
    }
    // Spin, then yield: with more threads than free cores a pure spin would starve the thread it waits for.
    for (int spins = 0; generation_.load(std::memory_order_acquire) != gen; ++spins) {
      if (spins < 4096) {
        spin_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  int n_ = 1;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
};

// Per-step multiply-adds up to which the team loop runs (above, the per-step path splits the product more
// evenly: it balances 4H/W panels instead of H/W): 2^20, measured on Zen 4. On Zen 5 (AMD family 0x1A on),
// whose products take half the time, the per-step path's two fork/joins a step weigh more, and the forward
// pays as a team up to 2^23: float32 inference, 9 shapes of batch 1-64 alternating 2^20 / 2^23 / 2^26 twice,
// gained where the threshold moved (B2-T200-H384 1.67x -> 1.70x of nn.LSTM, B8-T100-H256 1.06x -> 1.15x,
// B8-T35-H384-bi 1.11x -> 1.26x, B16-T100-H256 1.01x -> 1.04x, B32-T100-H256 0.98x -> 1.00x); 2^26 lost
// B64-T35-H200 (1.09x -> 0.89x: 200 units split 112 + 88). The backward, at 2^23, was mixed (0.95-1.64x
// against 0.96-1.40x), so it keeps 2^20. FASTLSTM_TEAM_MAX_MACS overrides both; 0 disables.
inline int64_t team_max_macs(bool backward) {
  static const char* env = std::getenv("FASTLSTM_TEAM_MAX_MACS");
  if (env != nullptr) return std::atoll(env);
  static const int64_t forward = amd_family() >= 0x1A ? int64_t(1) << 23 : int64_t(1) << 20;
  return backward ? int64_t(1) << 20 : forward;
}

// Hidden units each team thread must own for the team to pay: below, a thread's slice is a vector or two and
// the per-step barrier costs more than the split saves. Measured on 2 threads (Zen 4, batch 1-64), alternating
// A/B against a team at any size. float32: the forward step wants 24+ (hidden 16-40 ran 1.1-1.6x faster on one
// thread, 48+ even or better as a team); the backward step, with more work per unit, 20+ (hidden 32 ran
// 1.05-1.3x faster alone, hidden 40 1.05-1.15x faster as a team). float64, whose cell costs more per unit: 16+
// both ways (hidden 16 ran 1.3-1.6x faster alone; hidden 32 1.1-1.6x faster as a team).
// FASTLSTM_TEAM_MIN_HIDDEN overrides all.
template <typename scalar_t>
inline int64_t team_min_hidden(bool backward) {
  static const char* env = std::getenv("FASTLSTM_TEAM_MIN_HIDDEN");
  if (env != nullptr) return std::max<int64_t>(std::atoll(env), 1);
  if constexpr (std::is_same_v<scalar_t, double>) return 16;
  return backward ? 20 : 24;
}

// Threads of the team loop: 1 means the per-step path instead.
template <typename scalar_t>
inline int team_threads(int64_t B, int64_t H, int64_t P, bool proj, bool backward) {
  if (proj || at::in_parallel_region() || B * 4 * H * P > team_max_macs(backward)) return 1;
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), H / team_min_hidden<scalar_t>(backward)));
}

// A team thread's place and its slice [j0, j1) of the H hidden units: whole vectors, as even as that allows
// (H = 200: 112 + 88, where whole panels would give 128 + 72). Called inside the team's parallel region, where
// it also sizes the barrier (once, by one thread; `omp single` ends in a barrier, so all see it sized).
struct TeamSlice {
  int64_t j0, j1, width;
};

template <typename scalar_t>
TeamSlice join_team(SpinBarrier& barrier, int64_t H) {
#ifdef _OPENMP
  const int nth = omp_get_num_threads(), me = omp_get_thread_num();
#else
  const int nth = 1, me = 0;
#endif
#pragma omp single
  barrier.init(nth);
  constexpr int64_t lanes = Vec<scalar_t>::lanes;
  const int64_t units = (H + lanes - 1) / lanes;
  const int64_t j0 = std::min(H, units * me / nth * lanes), j1 = std::min(H, units * (me + 1) / nth * lanes);
  return {j0, j1, j1 - j0};
}

}  // namespace
}  // namespace fastlstm
