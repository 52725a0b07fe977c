// fastlstm C++ CPU backend: how a time loop's threads share the work: the team loop's parts (a spin barrier, when
// a team runs, each thread's slice of hidden units) and the row split (when it runs, each thread's rows).
#pragma once

#include "cpu_id.h"
#include "env.h"
#include "simd.h"
#include "step_product.h"
#include "threads.h"

#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif
#include <climits>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

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

// Threads now in team loops, over every call of the process (Python threads may each run one).
inline std::atomic<int>& team_threads_running() {
  static std::atomic<int> running{0};
  return running;
}

// Pauses a waiter at the barrier spins before it yields: long enough to cover a step's uneven work while every team
// thread has a core. Where the teams running (several Python threads' calls at once) hold more threads than the
// CPUs, the thread awaited often has no core, and a waiter that spins, or yields (the scheduler may hand the core
// straight back), keeps it from one: there a waiter spins a little, then sleeps until the last thread in wakes it.
// 2-core Zen 4, inference as teams of 2 (benchmarks/calls_per_second.py --python-threads N), calls per second from
// all threads: B1-T100-H128 from 2 Python threads 184-191 -> 1387-1411 (nn.LSTM 987-1079), from 4 503-611 ->
// 1528-1650; B4-T100-H256 from 4 146-166 -> 331-340 (nn.LSTM 211-238); alone unchanged (2104 / 2119).
constexpr int kSpinsWithCores = 4096, kSpinsOversubscribed = 64;

class SpinBarrier {
 public:
  // Sized by one thread of the team; counted among the running teams' threads until the barrier is destroyed.
  void init(int n) {
    n_ = n;
    team_threads_running().fetch_add(n, std::memory_order_relaxed);
    counted_ = n;
  }
  ~SpinBarrier() { team_threads_running().fetch_sub(counted_, std::memory_order_relaxed); }

  // gen: the caller's count of barriers passed so far.
  void wait(int& gen) {
    ++gen;
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all();
      return;
    }
    const int spins = oversubscribed() ? kSpinsOversubscribed : kSpinsWithCores;
    for (int k = 0; k < spins; ++k) {
      if (generation_.load(std::memory_order_acquire) == gen) return;
      spin_pause();
    }
    // With a core for every team thread, yield and look again, as this barrier always did: a sleeper's wake-up (a
    // system call, then the scheduler) would cost more than such a wait
    while (!oversubscribed()) {
      if (generation_.load(std::memory_order_acquire) == gen) return;
      std::this_thread::yield();
    }
    // Sleep until the last thread in bumps the generation. The sleeper count is raised before the generation is
    // read again, and the last thread reads it after bumping (both sequentially consistent): either this thread
    // sees the new generation or that thread sees a sleeper and wakes it. A wake between the read and the sleep
    // finds the generation changed, and the futex returns at once.
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    for (int seen = generation_.load(std::memory_order_seq_cst); seen != gen;
         seen = generation_.load(std::memory_order_seq_cst))
      sleep_while(seen);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  static bool oversubscribed() {
    const int cpus = lockstep_cpus();
    return cpus > 0 && team_threads_running().load(std::memory_order_relaxed) > cpus;
  }

#ifdef __linux__
  int* futex_word() { return reinterpret_cast<int*>(&generation_); }
  void sleep_while(int seen) { syscall(SYS_futex, futex_word(), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0); }
  void wake_all() { syscall(SYS_futex, futex_word(), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0); }
#else
  void sleep_while(int) { std::this_thread::yield(); }
  void wake_all() {}
#endif
  static_assert(sizeof(std::atomic<int>) == sizeof(int) && std::atomic<int>::is_always_lock_free,
                "the futex waits on the generation's own int");

  int n_ = 1, counted_ = 0;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
  std::atomic<int> sleepers_{0};  // beside the generation: the last thread in reads both
};

// Per-step multiply-adds up to which the team loop runs (above, the per-step path splits the product more
// evenly: it balances 4H/W panels instead of H/W): 2^20, measured on Zen 4. On Zen 5 (AMD family 0x1A on),
// whose products take half the time, the per-step path's two fork/joins a step weigh more, and the forward
// pays as a team up to 2^23: float32 inference, 9 shapes of batch 1-64 alternating 2^20 / 2^23 / 2^26 twice,
// gained where the threshold moved (B2-T200-H384 1.67x -> 1.70x of nn.LSTM, B8-T100-H256 1.06x -> 1.15x,
// B8-T35-H384-bi 1.11x -> 1.26x, B16-T100-H256 1.01x -> 1.04x, B32-T100-H256 0.98x -> 1.00x); 2^26 lost
// B64-T35-H200 (1.09x -> 0.89x: 200 units split 112 + 88). The backward, at 2^23, was mixed (0.95-1.64x
// against 0.96-1.40x), so it keeps 2^20. On Zen 3 the forward pays as a team up to 2^23 below kTeamZen3Rows
// rows: float32 inference against nn.LSTM, 2^23 against 2^20 alternating in processes three or four times,
// B1-T100-H1024 1.40x -> 1.60x, B3-T100-H512 1.26x -> 1.35x, B5-T50-H600 1.08x -> 1.19x, B4-T100-H384 1.14x ->
// 1.19x, B2-T100-H512 1.84x -> 1.95x, B6-T100-H384 1.01x -> 1.04x, B2-T200-H384 1.52x -> 1.64x in one set and
// 1.53x -> 1.49x in another; training B3-T100-H512 1.09x -> 1.17x, B6-T100-H384 1.09x -> 1.11x. From 8 rows even
// or slower (B8-T100-H256 0.99x, B8-T35-H384-bi 1.00x, B16-T50-H300 0.95x).
// FASTLSTM_TEAM_MAX_MACS overrides all; 0 disables.
constexpr int64_t kTeamZen3Rows = 8;

inline int64_t team_max_macs(bool backward, int64_t rows) {
  static const std::optional<int64_t> env = env_int("FASTLSTM_TEAM_MAX_MACS");
  if (env) return *env;
  constexpr int64_t narrow = int64_t(1) << 20, wide = int64_t(1) << 23;
  static const bool zen5 = amd_family() >= 0x1A, zen3 = amd_zen3();
  if (backward) return narrow;
  return zen5 || (zen3 && rows < kTeamZen3Rows) ? wide : narrow;
}

// Hidden units each team thread must own for the team to pay: below, a thread's slice is a vector or two and
// the per-step barrier costs more than the split saves. Measured on 2 threads (Zen 4, batch 1-64), alternating
// A/B against a team at any size. float32: the forward step wants 24+ (hidden 16-40 ran 1.1-1.6x faster on one
// thread, 48+ even or better as a team); the backward step, with more work per unit, 20+ (hidden 32 ran
// 1.05-1.3x faster alone, hidden 40 1.05-1.15x faster as a team). float64, whose cell costs more per unit: 16+
// both ways (hidden 16 ran 1.3-1.6x faster alone; hidden 32 1.1-1.6x faster as a team).
// FASTLSTM_TEAM_MIN_HIDDEN overrides all.
inline std::optional<int64_t> team_min_hidden_env() {
  static const std::optional<int64_t> v = env_int("FASTLSTM_TEAM_MIN_HIDDEN", 1);  // read (and warned about) once
  return v;
}
template <typename scalar_t>
inline int64_t team_min_hidden(bool backward) {
  if (const auto env = team_min_hidden_env()) return *env;
  if constexpr (std::is_same_v<scalar_t, double>) return 16;
  return backward ? 20 : 24;
}

// Threads of the team loop: 1 means the per-step path instead.
template <typename scalar_t>
inline int team_threads(int64_t B, int64_t H, int64_t P, bool proj, bool backward) {
  if (proj || at::in_parallel_region() || B * 4 * H * P > team_max_macs(backward, B)) return 1;
  return static_cast<int>(std::min<int64_t>(lockstep_threads(), H / team_min_hidden<scalar_t>(backward)));
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

// ---------------------------------------------------------------------------------------------------------
// The row split: each thread runs the whole time loop, forward or backward, on its own rows of the batch (an
// LSTM's rows never meet). No thread reads what another writes, so there is no barrier a step and no cache line
// moves between cores, where a team thread reads all of h (or dgates) each step, the other threads' part
// written on their cores. But each thread streams all of a step's weights instead of its slice, so the split
// pays only while they stay in the core's L2.
//
// Measured on Zen 5 (1 MB L2), 2 threads, float32, the split against what ran before (team or per-step),
// alternating in one process. Inference, weights a step within L2: B16-T500-H128 1.07x, B16-T100-H128 1.07x,
// B32-T100-H128 1.07x, B24-T100-H96 1.08x, B64-T50-H64 1.05x, B16-T200-H64 1.11x, B48-T100-H160 1.23x (a team
// thread's 80 units fill 2.5 panels), B64-T50-H32 1.31x (too few units for a team: one thread ran). Beyond L2:
// B64-T35-H200 (1.28 MB) 1.01x, B32-T100-H256 (2 MB) 0.98-1.01x, B40-T100-H300 (2.9 MB) 0.90x. Training
// (forward and backward) within L2: 1.01-1.04x.
//
// Where each thread's share is whole row blocks of the kernel, every row goes through the same kernel calls as
// unsplit, and the results are bitwise those of the team and per-step loops. Elsewhere (24 rows on 2 threads:
// 12 each, blocks of 8 + 4) a short block's rows may round differently in the last bits, since the kernel unrolls
// k for short blocks: results then depend on the number of threads. With the same threads they are bitwise the
// same run to run, as the README promises.

// The most bytes of weights a step may read for the split: the L2 of one core, as the C library reports it
// (1 MB where it reports none). FASTLSTM_ROW_SPLIT_MAX_KB overrides; 0 disables the split.
inline int64_t row_split_max_bytes() {
  static const int64_t v = []() -> int64_t {
    if (const auto kb = env_int("FASTLSTM_ROW_SPLIT_MAX_KB", 0, int64_t(1) << 40)) return *kb * 1024;
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 > 0) return static_cast<int64_t>(l2);
#endif
    return int64_t(1) << 20;
  }();
  return v;
}

// Fewest rows a thread of the row split takes. Measured on Zen 5, 2 threads, float32 inference in one process,
// alternating, against nn.LSTM, split from 8 / 4 / 3 rows a thread (the team loop below that): B6-T100-H200
// 1.22x / 1.29x / 1.28x, B6-T50-H160-L2 1.15x / 1.15x / 1.28x, B8-T100-H128 1.21x / 1.26x / 1.28x, B8-T200-H96
// 1.04x / 1.43x / 1.44x, B8-T100-H180 1.09x / 1.12x / 1.12x, B10-T100-H160 0.94x / 1.09x / 1.08x, B12-T200-H96
// 0.95x / 1.35x / 1.35x; B9, B11, B16 even. In processes alternating with the build that split from 8, batch
// 6-15 (16 shapes, inference, three runs each) 0.95-1.41x its speed, all but two (0.95x, 0.97x) faster.
// Training at 3-6 rows a thread, 1.03-1.13x faster than the team loop (B8-T100-H128, B6-T100-H96, B12-T100-H128).
// 2 rows a thread was faster in one state of this VM (B4-T100-H128 1.25x) and slower in another (0.83-0.98x
// on 6 shapes at batch 4-5, B4-T100-H256 0.83x), 1 row a thread slower (B2-T200-H256 0.70x, B2-T100-H128
// 0.80x): every row then reads all of a step's weights alone.
constexpr int64_t kRowSplitMinRows = 3;

// Fewest steps a call takes for the row split: each of its threads reads all of a step's weights, which pays where
// many steps reuse them from cache, while a call of few steps reads them about once and the team loop divides them
// between the threads. The Xeon with AMX, 2 threads, float32, nn.LSTM's speed against cpp's without the split
// (FASTLSTM_ROW_SPLIT_MAX_KB=1) and with it, one process each, 7 rounds interleaved: inference at 1-2 steps the
// team loop faster on all 12 shapes (B24-T1-H160 1.91x against 1.11x, B24-T1-H256-P128 1.11x against 0.69x,
// B16-T1-H300-P150 1.00x against 0.64x), at 5 steps on 5 of 7 by up to 0.45x (the other two within 0.05x; in
// `bench`, B48-T5-H128 1.05-1.07x against 1.09-1.16x), at 10 the split on 3 of 4 (one even), at 20 on 4 of 5
// (B24-T20-H160 1.35x against 1.03x); training at 1 step the team 1.12-1.19x faster, at 5 even, at 50 the split
// (B24-H160, B48-H128 with and without a projection, batch 16-48, hidden 96-307).
constexpr int64_t kRowSplitMinSteps = 8;

// Threads of the row split for a batch of B rows, T steps, whose steps read step_bytes of weights: all of torch's
// threads where each gets kRowSplitMinRows rows or more, the call has kRowSplitMinSteps steps or more and the
// weights fit, else 1 (no split). Only 2 threads were measured, so it never runs on fewer threads than the
// alternatives would.
inline int row_split_threads(int64_t B, int64_t T, int64_t step_bytes) {
  const int threads = at::get_num_threads();
  if (threads < 2 || at::in_parallel_region() || step_bytes > row_split_max_bytes() ||
      B / kRowSplitMinRows < threads || T < kRowSplitMinSteps)
    return 1;
  return threads;
}

// Each thread's rows: ranges [first, end). Unpacked rows all take the same work: contiguous shares as even as
// rows allow, each thread forming its own row blocks. Shares of whole row blocks, as first written (24 rows on 2
// threads: 16 + 8), measured slower wherever the blocks did not divide evenly (2 threads, float32, alternating
// in one process, times against nn.LSTM's, even rows / whole blocks / team loop: inference B24-T200-H96
// 1.17x / 0.91x / 0.83x, B24-T100-H128 1.09x / 0.86x / 0.98x, B40-T100-H128 1.22x / 1.04x / 0.95x,
// B20-T100-H128 1.39x / 1.24x / 1.10x, B56-T50-H128 1.10x / 1.00x / 0.96x, B100-T50-H64 1.34x / 1.31x / 1.11x;
// training B24-T200-H96, B40-T100-H128, B20-T100-H128, B56-T50-H128 1.05-1.13x faster than whole blocks).
// Packed rows come longest first, so contiguous shares would leave the first thread the most work
// (B32-T100-H128 packed, lengths in [T/2, T]: ~10% slower than the team loop): there whole blocks go out
// longest first, each to the thread with the least work so far (the same shape: 7% faster than the team loop,
// three runs alternating; B24-T100-H128 packed, 3 blocks for 2 threads: 7% slower); below a row block a thread,
// blocks of a thread's even share. A thread runs its ranges one after another (rows never meet).
using RowRanges = std::vector<std::vector<std::pair<int64_t, int64_t>>>;

inline RowRanges row_split_ranges(const std::vector<int64_t>& live, int64_t B, int split) {
  RowRanges ranges(split);
  if (split == 1) {
    ranges[0].emplace_back(0, B);
    return ranges;
  }
  std::vector<int64_t> rows_live(B + 1, 0);  // rows_live[n]: steps with n or more rows live
  for (const int64_t n : live) rows_live[std::min(n, B)] += 1;
  if (rows_live[B] == static_cast<int64_t>(live.size())) {  // every step has all B rows live
    for (int t = 0; t < split; ++t) ranges[t].emplace_back(B * t / split, B * (t + 1) / split);
    return ranges;
  }
  for (int64_t n = B - 1; n >= 0; --n) rows_live[n] += rows_live[n + 1];
  std::vector<int64_t> work(split, 0);
  const int64_t rows = std::min<int64_t>(kRowBlock, B / split);  // a deal: every thread gets one or more
  for (int64_t r0 = 0; r0 < B; r0 += rows) {
    const int64_t r1 = std::min(B, r0 + rows);
    int64_t block = 0;  // row r is live on rows_live[r + 1] steps
    for (int64_t r = r0; r < r1; ++r) block += rows_live[r + 1];
    const int me = static_cast<int>(std::min_element(work.begin(), work.end()) - work.begin());
    work[me] += block;
    if (!ranges[me].empty() && ranges[me].back().second == r0) {
      ranges[me].back().second = r1;
    } else {
      ranges[me].emplace_back(r0, r1);
    }
  }
  return ranges;
}

// run_rows(first, end) for each thread's ranges; on the calling thread alone when there is one.
template <typename F>
void run_row_split(const RowRanges& ranges, F&& run_rows) {
  const int split = static_cast<int>(ranges.size());
  if (split == 1) {
    for (const auto& [r0, r1] : ranges[0]) run_rows(r0, r1);
    return;
  }
  RegionErrors errors;
#pragma omp parallel num_threads(split)
  {
#ifdef _OPENMP
    const int me = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int me = 0, team = 1;
#endif
    // OpenMP may start fewer threads than asked (see parallel_on): each then runs every team-th thread's ranges.
    errors.run([&] {
      for (int t = me; t < split; t += team)
        for (const auto& [r0, r1] : ranges[t]) run_rows(r0, r1);
    });
  }
  errors.rethrow();
}

}  // namespace
}  // namespace fastlstm
