// fastlstm C++ CPU backend: one step's product h @ W (and x @ W_ih): the packed weight, the register-blocked
// kernel, and dot products over the weight as stored.
#pragma once

#include "amx.h"
#include "env.h"
#include "memory.h"
#include "simd.h"
#include "threads.h"

#include <ATen/Parallel.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace fastlstm {
namespace {

// ---------------------------------------------------------------------------------------------------------
// The per-step product C[n, N] (+)= A[n, K] @ Bm[K, N], Bm row-major and contiguous (the weight, laid out once
// per call). A register-blocked kernel in GCC/Clang vector extensions: a block of RB rows x 2 vectors of
// columns lives in registers while k runs; columns are the outer loop (and the split between threads) so a
// thread's slice of the weight stays in its cache across all row blocks and all time steps. No allocation,
// no dispatcher: this is what runs T times.

// A weight B [K, N] packed in panels of kPanel vectors of columns: panel p holds columns [p*W, p*W+W) as a
// contiguous [steps, W] block of units (zero padded past N), so the micro-kernel reads it sequentially. A unit
// is what one kernel step takes of one column: one element (FmaDot) or a pair of k (Bf16Dot, a 32-bit word).
constexpr int kPanel = 2;

template <typename Dot>
struct Packed {
  using elem_t = typename Dot::elem_t;
  using unit_t = typename Dot::unit_t;
  static constexpr int64_t W = kPanel * Dot::lanes;  // columns per panel
  PoolBuffer<unit_t> data;                           // uninitialised: every unit is written by pack()
  int64_t steps = 0, N = 0, panels = 0;
  // B[k, n] = src[k * sk + n * sn], k over `steps` units. Runs once per call over the whole weight, so it is
  // blocked and parallel: a plain element-wise transpose of a 4 MB weight measured ~0.9 ms, as long as 25 steps
  // of B=1, H=512.
  void pack(const unit_t* src, int64_t steps_, int64_t N_, int64_t sk, int64_t sn, bool parallel = true) {
    steps = steps_;
    N = N_;
    panels = (N + W - 1) / W;
    data.reset(std::max<int64_t>(1, panels * steps * W));
    if (!parallel) {
      for (int64_t p = 0; p < panels; ++p) pack_panel(src, sk, sn, p);
      return;
    }
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, steps * W));
    parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) pack_panel(src, sk, sn, p);
    });
  }
  void pack_panel(const unit_t* src, int64_t sk, int64_t sn, int64_t p) {
    unit_t* d = data.get() + p * steps * W;
    const int64_t width = std::min(W, N - p * W);
    if (sk == 1) {
      // Source columns are contiguous in k. Blocks of one cache line of k: the W source lines and the
      // [kb, W] piece of the panel being written both stay in L1. Whole square blocks go through vector
      // registers (transpose_block); what remains, element by element.
      constexpr int64_t kb = 64 / sizeof(unit_t);
      for (int64_t k0 = 0; k0 < steps; k0 += kb) {
        const int64_t k1 = std::min(steps, k0 + kb);
        int64_t c = 0;
        if (k1 - k0 == kb)
          for (; c + kb <= width; c += kb) transpose_block(src + (p * W + c) * sn + k0, sn, d + k0 * W + c, W);
        for (; c < width; ++c) {
          const unit_t* col = src + (p * W + c) * sn;
          for (int64_t k = k0; k < k1; ++k) d[k * W + c] = col[k];
        }
      }
    } else {
      for (int64_t k = 0; k < steps; ++k)
        for (int64_t c = 0; c < width; ++c) d[k * W + c] = src[k * sk + (p * W + c) * sn];
    }
    if (width < W)
      for (int64_t k = 0; k < steps; ++k) std::fill(d + k * W + width, d + (k + 1) * W, unit_t(0));
  }
  const elem_t* panel(int64_t p) const { return reinterpret_cast<const elem_t*>(data.get() + p * steps * W); }
};

// Keep a loaded vector in a register. For row blocks of 2-4, GCC otherwise folds the panel loads into every FMA
// as a memory operand, loading the same weights once per row: measured in isolation, 2-4 rows ran at ~50% of
// the FMA peak that way, 70-96% with the loads kept (other block sizes are unaffected or slower, so only these).
// Only for a vector that is one AVX register (AVX2's ymm, AVX-512's zmm).
template <int RB, typename V>
inline void keep_in_register(V& v) {
#if defined(__AVX512F__)
  if constexpr (RB >= 2 && RB <= 4 && sizeof(V) == kVecBytes) asm("" : "+v"(v));
#elif defined(__AVX__)
  if constexpr (RB >= 2 && RB <= 4 && sizeof(V) == kVecBytes) asm("" : "+x"(v));
#else
  (void)v;
#endif
}

// Independent chains of multiply-adds a block of RB rows x CV vectors of columns keeps in flight: RB x CV
// accumulators, times KU partial sums over k. Two FMA units of 4 cycles' latency need 8 chains; fewer rows leave
// fewer, so k is unrolled into KU partial sums, as far as the register file allows (AVX-512: 32 vector registers;
// else 16). Measured on Zen 5 (2 threads, forward, in one process, each build's calls alternating after
// nn.LSTM's), 3-4 rows at KU = 2 against 1: B4-T35-H200-L2 1.07-1.09x, B3-T100-H128 1.04-1.05x, B12 (8 + 4
// rows)-T100-H256 1.03x faster; 5-6 rows 1.01x (not taken); 1 row at KU = 8 against 4: 0.91-0.98x. With 16
// registers (AVX2), 2 rows take KU = 3 and 3 rows KU = 2 (12 chains in 14-15 registers): the kernel alone on Zen 3
// (K = 200, 128 columns, one thread, alternating with the build before), 2 rows 1.14-1.20x and 3 rows 1.09-1.36x
// faster; 1 row at KU = 6: 0.95x. One vector of columns (a panel's last vector alone, CV = 1): 8+ chains.
template <int RB, int CV>
constexpr int k_unroll() {
  if constexpr (CV == 1) return (8 + RB - 1) / RB;
  if constexpr (kVecBytes == 64) return RB == 1 ? 4 : RB <= 4 ? 2 : 1;
  return RB == 1 ? 4 : RB == 2 ? 3 : RB == 3 ? 2 : 1;
}

// C[RB, valid] (+)= A[RB, K] @ panel, K in steps of Dot::pair (lda in elements), for the panel's first CV vectors
// of columns (valid <= CV lanes: CV = 1 where a panel's second vector is all padding, which would double the
// work of a lone vector).
template <typename Dot, int RB, int CV>
inline void micro_kernel_body(const typename Dot::elem_t* __restrict__ A, int64_t lda,
                              const typename Dot::elem_t* __restrict__ panel, int64_t steps,
                              typename Dot::acc_t* __restrict__ C, int64_t ldc, int64_t valid, bool accumulate) {
  using acc_t = typename Dot::acc_t;
  using vec = typename Dot::vec;
  // W: the panel's row of units (its stride over k); WC: the columns computed here.
  constexpr int L = Dot::lanes, W = kPanel * L, WC = CV * L, PR = Dot::pair;
  static_assert(CV >= 1 && CV <= kPanel, "a panel has kPanel vectors of columns");
  vec acc[RB][CV];
  acc_t tmp[RB * WC];
  acc_t* out = C;
  int64_t ldo = ldc;
  if (valid < WC) {  // a partial vector goes through a small buffer
    out = tmp;
    ldo = WC;
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < WC; ++c) tmp[r * WC + c] = (accumulate && c < valid) ? C[r * ldc + c] : acc_t(0);
  }
  // The sums start from zero and C is added at the end, as a GEMM's beta: started from C (the step's input
  // projection, often the larger term), each of K additions rounded at C's magnitude, and float32 outputs at hidden
  // 512-1024 drifted 2.5x further from float64 than nn.LSTM's over a sequence (mean error, an audit).
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < CV; ++v) acc[r][v] = vec{};
  constexpr int KU = k_unroll<RB, CV>();
  vec part[KU > 1 ? KU - 1 : 1][RB][CV];
  if constexpr (KU > 1) {
    for (int u = 0; u < KU - 1; ++u)
      for (int r = 0; r < RB; ++r)
        for (int v = 0; v < CV; ++v) part[u][r][v] = vec{};
  }
  int64_t k = 0;
  if constexpr (KU > 1) {
    for (; k + KU <= steps; k += KU) {
      for (int u = 0; u < KU; ++u) {
        vec w[CV];
        for (int v = 0; v < CV; ++v) w[v] = Dot::load(panel + (k + u) * W * PR + v * L * PR);
        for (int v = 0; v < CV; ++v) keep_in_register<RB>(w[v]);
        for (int r = 0; r < RB; ++r) {
          const auto a = Dot::row(A + r * lda + (k + u) * PR);
          for (int v = 0; v < CV; ++v) Dot::madd(u == 0 ? acc[r][v] : part[u > 0 ? u - 1 : 0][r][v], a, w[v]);
        }
      }
    }
    for (int u = 0; u < KU - 1; ++u)
      for (int r = 0; r < RB; ++r)
        for (int v = 0; v < CV; ++v) acc[r][v] += part[u][r][v];
  }
  for (; k < steps; ++k) {
    vec w[CV];
    for (int v = 0; v < CV; ++v) w[v] = Dot::load(panel + k * W * PR + v * L * PR);
    for (int v = 0; v < CV; ++v) keep_in_register<RB>(w[v]);
    for (int r = 0; r < RB; ++r) {
      const auto a = Dot::row(A + r * lda + k * PR);
      for (int v = 0; v < CV; ++v) Dot::madd(acc[r][v], a, w[v]);
    }
  }
  if (accumulate)
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < CV; ++v) acc[r][v] += Vec<acc_t>::load(out + r * ldo + v * L);
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < CV; ++v) Vec<acc_t>::store(out + r * ldo + v * L, acc[r][v]);
  if (valid < WC) {
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < valid; ++c) C[r * ldc + c] = tmp[r * WC + c];
  }
}

// Blocks of 2+ rows run out of line: inlined into forward_team's step loop, GCC ran out of registers for the
// loop's own values and spilled the weight vectors to the stack every k (4 rows: 21 instructions a k instead of
// 17; out of line, and with the one-vector panels below, B4-T35-H200-L2 float32 inference went from 1.04-1.11x
// of nn.LSTM to 1.15-1.26x across A/B runs on Zen 3). A single row keeps few
// accumulators, and its calls are short at the sizes it serves (batch 1, hidden 48-64 on 2 threads: 8 calls a step
// a thread, each 48-64 k long), where calling it out of line measured 5-20% slower (medians of five processes
// alternating, B1-T200-H48 and B1-T500-H64 layers).
template <typename Dot, int RB, int CV>
__attribute__((noinline)) void micro_kernel_call(const typename Dot::elem_t* __restrict__ A, int64_t lda,
                                                 const typename Dot::elem_t* __restrict__ panel, int64_t steps,
                                                 typename Dot::acc_t* __restrict__ C, int64_t ldc, int64_t valid,
                                                 bool accumulate) {
  micro_kernel_body<Dot, RB, CV>(A, lda, panel, steps, C, ldc, valid, accumulate);
}

// Steps of k (units of the panel) whose products are summed from zero before being added to C, by row-block size.
// One running sum over all of k rounds each addition at the magnitude of everything before it: backward's dh
// (K = 4H) came out 2-4x further from float64 than nn.LSTM's at hidden 512-1024 (mean error, batch 7-64). Blocks
// of k, as a GEMM library's, bound that. Each block is a call of its own: a loop over blocks inside the kernel
// cost small row blocks 5-10% (B4-T35-H200-L2 inference, three A/B rounds). Blocks of 1-2 rows are left whole:
// split, B2-T200-H384 training lost 8% (1.09-1.16x nn.LSTM against 1.16-1.28x, three rounds, at 256 and 1024
// steps alike), and their error stayed within 1.9x nn.LSTM's (dh0 at batch 2, hidden 512 and 1024).
template <int RB>
constexpr int64_t sum_block() {
  return RB <= 2 ? std::numeric_limits<int64_t>::max() : RB <= 4 ? 512 : 256;
}

template <typename Dot, int RB, int CV>
inline void micro_kernel(const typename Dot::elem_t* __restrict__ A, int64_t lda,
                         const typename Dot::elem_t* __restrict__ panel, int64_t steps,
                         typename Dot::acc_t* __restrict__ C, int64_t ldc, int64_t valid, bool accumulate) {
  constexpr int64_t block = sum_block<RB>();
  constexpr int64_t panel_step = Packed<Dot>::W * Dot::pair;  // elements of the panel per step of k
  for (int64_t k0 = 0;; k0 += block) {
    const int64_t n = std::min(block, steps - k0);
    const auto* a = A + k0 * Dot::pair;
    const auto* b = panel + k0 * panel_step;
    if constexpr (RB == 1) {
      micro_kernel_body<Dot, RB, CV>(a, lda, b, n, C, ldc, valid, accumulate || k0 > 0);
    } else {
      micro_kernel_call<Dot, RB, CV>(a, lda, b, n, C, ldc, valid, accumulate || k0 > 0);
    }
    if (steps - k0 <= block) break;
  }
}

// Rows in the register-blocked kernel's row blocks (the last block of a product takes the remainder): RB x 2
// accumulators, 2 weight vectors and a broadcast row value must fit the register file, 32 vector registers with
// AVX-512 and 16 with AVX2 or SSE (NEON has 32, but no ARM machine was measured: 6 there too).
constexpr int kRowBlock = kVecBytes == 64 ? 8 : 6;

template <typename Dot, int CV>
inline void panel_row_blocks(const typename Dot::elem_t* A, int64_t lda, const typename Dot::elem_t* panel,
                             int64_t steps, typename Dot::acc_t* C, int64_t ldc, int64_t n, int64_t valid,
                             bool accumulate) {
  constexpr int RB = kRowBlock;
  int64_t r = 0;
  for (; r + RB <= n; r += RB)
    micro_kernel<Dot, RB, CV>(A + r * lda, lda, panel, steps, C + r * ldc, ldc, valid, accumulate);
  const auto* a = A + r * lda;
  auto* c = C + r * ldc;
  switch (n - r) {
    case 0: break;
    case 1: micro_kernel<Dot, 1, CV>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 2: micro_kernel<Dot, 2, CV>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 3: micro_kernel<Dot, 3, CV>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 4: micro_kernel<Dot, 4, CV>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 5: micro_kernel<Dot, 5, CV>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 6: micro_kernel<Dot, 6, CV>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    default: micro_kernel<Dot, 7, CV>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
  }
}

// C[n, valid] (+)= A[n, K] @ one panel: the kernel over its row blocks, on the panel's first vector of columns
// alone where the rest is padding (a slice or a width of an odd number of vectors, e.g. 25 at hidden 200).
template <typename Dot>
inline void panel_rows(const typename Dot::elem_t* A, int64_t lda, const typename Dot::elem_t* panel, int64_t steps,
                       typename Dot::acc_t* C, int64_t ldc, int64_t n, int64_t valid, bool accumulate) {
#ifdef FASTLSTM_AMX
  // bfloat16 from amx_min_rows() rows: whole blocks of 16 pairs of k on the tiles, the rest of k below.
  if constexpr (std::is_same_v<Dot, Bf16Dot>) {
    const int64_t blocks = steps / 16;
    if (blocks > 0 && n >= amx_min_rows() && amx_enabled()) {
      amx_panel_blocks(A, lda, panel, blocks, C, ldc, n, valid, accumulate);
      const int64_t done = blocks * 16;
      if (done == steps) return;
      A += done * Dot::pair;
      panel += done * Packed<Dot>::W * Dot::pair;
      steps -= done;
      accumulate = true;
    }
  }
#endif
  if (valid <= Dot::lanes) {
    panel_row_blocks<Dot, 1>(A, lda, panel, steps, C, ldc, n, valid, accumulate);
  } else {
    panel_row_blocks<Dot, kPanel>(A, lda, panel, steps, C, ldc, n, valid, accumulate);
  }
}

// Work (multiply-adds) below which one step's product is not split over threads.
constexpr int64_t kParallelStepWork = 1 << 17;

// One row of h against rows of the weight as stored (row-major, no packing): out[r] (+)= h . w[r] for the rows
// [0, rows), each a dot product of `units` units, lane-wise partial sums added up at the end. At batch 1 this
// is the whole recurrent product, and packing the weight first cost more than the product at short sequences:
// at hidden 512 the pack took ~0.25 ms a call, the product ~19 us a step. AVX-512 and AVX2 builds (a masked load
// for the end of a row); other builds pack.
constexpr int64_t kDotBlock = 8;  // weight rows a dot_rows block takes at once

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr bool kHasDotRows = true;

// The first n units at p, zeros past them (the row's end may be the end of the weight: nothing past it is read).
template <typename Dot>
inline typename Dot::vec load_units(const typename Dot::unit_t* p, int64_t n) {
  using vec = typename Dot::vec;
#if defined(__AVX512F__)
  if constexpr (sizeof(typename Dot::unit_t) == 8) {
    return reinterpret_cast<vec>(_mm512_maskz_loadu_epi64(static_cast<__mmask8>((1u << n) - 1), p));
  } else {
    return reinterpret_cast<vec>(_mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1), p));
  }
#else
  if constexpr (sizeof(typename Dot::unit_t) == 8) {
    const __m256i live = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
    return reinterpret_cast<vec>(_mm256_maskload_pd(reinterpret_cast<const double*>(p), live));
  } else {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
    return reinterpret_cast<vec>(_mm256_maskload_ps(reinterpret_cast<const float*>(p), live));
  }
#endif
}

// The sum of a vector's lanes.
template <typename acc_t, typename vec>
inline acc_t sum_lanes(vec v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, double>) {
    return _mm512_reduce_add_pd(reinterpret_cast<__m512d>(v));
  } else {
    return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
  }
#else
  if constexpr (std::is_same_v<acc_t, double>) {
    const __m256d x = reinterpret_cast<__m256d>(v);
    const __m128d half = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
  } else {
    const __m256 x = reinterpret_cast<__m256>(v);
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
  }
#endif
}

// The sums of 8 vectors' lanes, each vector given as 256 bits (8 floats or 4 doubles), into out[0..8) (added to
// it with `accumulate`): horizontal adds of pairs of vectors, then the two 128-bit halves, 11 instructions where
// sum_lanes takes 5 a vector (40). At batch 1 each row of w_hh ends in such a sum: dot_rows alone, rows of 64-200
// floats, ran 1.03-1.08x faster this way (Zen 3, medians of 31 runs alternating with sum_lanes; float64 even).
// Each row's sum is a fixed tree of its own lanes, whichever rows share the call.
template <typename acc_t, typename half_t>
inline void sum_halves8(const half_t* acc, acc_t* out, bool accumulate) {
  if constexpr (std::is_same_v<acc_t, double>) {
    for (int g = 0; g < 8; g += 4) {
      const auto a = [&](int r) { return reinterpret_cast<__m256d>(acc[g + r]); };
      // [a0 01, a1 01 | a0 23, a1 23] and the same for a2, a3: the halves added give the four sums in order
      const __m256d p01 = _mm256_hadd_pd(a(0), a(1)), p23 = _mm256_hadd_pd(a(2), a(3));
      __m256d sums = _mm256_add_pd(_mm256_permute2f128_pd(p01, p23, 0x20), _mm256_permute2f128_pd(p01, p23, 0x31));
      if (accumulate) sums = _mm256_add_pd(sums, _mm256_loadu_pd(out + g));
      _mm256_storeu_pd(out + g, sums);
    }
  } else {
    const auto a = [&](int r) { return reinterpret_cast<__m256>(acc[r]); };
    const __m256 p01 = _mm256_hadd_ps(a(0), a(1)), p23 = _mm256_hadd_ps(a(2), a(3));
    const __m256 p45 = _mm256_hadd_ps(a(4), a(5)), p67 = _mm256_hadd_ps(a(6), a(7));
    // each 128-bit half: the four rows' sums over that half's lanes
    const __m256 q0 = _mm256_hadd_ps(p01, p23), q1 = _mm256_hadd_ps(p45, p67);
    __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
    if (accumulate) sums = _mm256_add_ps(sums, _mm256_loadu_ps(out));
    _mm256_storeu_ps(out, sums);
  }
}

// sum_halves8 for the build's vectors. AVX-512: each vector's two 256-bit halves added first, about 27
// instructions for the 8 sums where _mm512_reduce_add takes about 8 a vector (64): rows of a few vectors (a
// projection's w_hh of 97 floats: 7) had as many for their sums as for their products. The op alone, four
// processes a build alternating: float32 B1-T10-H128 0.071-0.076 -> 0.067-0.070 ms, B8-T1-I66-H256-P97
// 0.103-0.107 -> 0.101-0.106 ms; bfloat16 even (benchmarks/results/cpu-intel-xeon-amx-2core.md).
template <typename acc_t, typename vec>
inline void sum_lanes8(const vec* acc, acc_t* out, bool accumulate) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, double>) {
    __m256d halves[8];
    for (int r = 0; r < 8; ++r) {
      const __m512d v = reinterpret_cast<__m512d>(acc[r]);
      halves[r] = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    }
    sum_halves8<acc_t>(halves, out, accumulate);
  } else {
    __m256 halves[8];
    for (int r = 0; r < 8; ++r) {  // the halves as doubles: extractf64x4 is AVX512F, extractf32x8 needs AVX512DQ
      const __m512d v = reinterpret_cast<__m512d>(acc[r]);
      halves[r] = _mm256_add_ps(_mm256_castpd_ps(_mm512_castpd512_pd256(v)),
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(v, 1)));
    }
    sum_halves8<acc_t>(halves, out, accumulate);
  }
#else
  sum_halves8<acc_t>(acc, out, accumulate);
#endif
}

// R rows at once: R independent accumulators, h loaded once per vector of units for all R.
template <typename Dot, int R>
inline void dot_block(const typename Dot::unit_t* h, const typename Dot::unit_t* w, int64_t ldw, int64_t units,
                      typename Dot::acc_t* out, bool accumulate) {
  using vec = typename Dot::vec;
  using unit_t = typename Dot::unit_t;
  using acc_t = typename Dot::acc_t;
  constexpr int64_t L = Dot::lanes;
  static_assert(sizeof(unit_t) == sizeof(acc_t), "a vector holds as many units as accumulator lanes");
  const auto load = [](const unit_t* p) { return Vec<acc_t>::load(reinterpret_cast<const acc_t*>(p)); };
  vec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vec{};
  int64_t k = 0;
  for (; k + L <= units; k += L) {
    const vec hv = load(h + k);
    for (int r = 0; r < R; ++r) Dot::madd_lanes(acc[r], hv, load(w + r * ldw + k));
  }
  if (k < units) {
    const vec hv = load_units<Dot>(h + k, units - k);
    for (int r = 0; r < R; ++r) Dot::madd_lanes(acc[r], hv, load_units<Dot>(w + r * ldw + k, units - k));
  }
  if constexpr (R == 8) {
    sum_lanes8<acc_t>(acc, out, accumulate);
    return;
  }
  for (int r = 0; r < R; ++r) {
    const acc_t sum = sum_lanes<acc_t>(acc[r]);
    out[r] = accumulate ? out[r] + sum : sum;
  }
}

// `descending`: the same sums, the rows visited last first (see forward_team).
template <typename Dot>
inline void dot_rows(const typename Dot::elem_t* h, const typename Dot::unit_t* w, int64_t ldw, int64_t units,
                     typename Dot::acc_t* out, int64_t rows, bool accumulate, bool descending = false) {
  const auto* hu = reinterpret_cast<const typename Dot::unit_t*>(h);
  constexpr int R = kDotBlock;
  const int64_t whole = rows / R * R;
  if (descending) {
    for (int64_t r = rows - 1; r >= whole; --r) dot_block<Dot, 1>(hu, w + r * ldw, ldw, units, out + r, accumulate);
    for (int64_t r = whole - R; r >= 0; r -= R) dot_block<Dot, R>(hu, w + r * ldw, ldw, units, out + r, accumulate);
    return;
  }
  for (int64_t r = 0; r < whole; r += R) dot_block<Dot, R>(hu, w + r * ldw, ldw, units, out + r, accumulate);
  for (int64_t r = whole; r < rows; ++r) dot_block<Dot, 1>(hu, w + r * ldw, ldw, units, out + r, accumulate);
}
#else
constexpr bool kHasDotRows = false;

template <typename Dot>
inline void dot_rows(const typename Dot::elem_t*, const typename Dot::unit_t*, int64_t, int64_t,
                     typename Dot::acc_t*, int64_t, bool, bool = false) {
  TORCH_INTERNAL_ASSERT(false, "dot_rows needs AVX-512 or AVX2");
}
#endif

// A knob of a dot_rows path, the environment variable `name`: N rows up to which the path runs whatever the size
// (0: never), -1 when unset (the path's rule decides); 0 in builds without dot_rows.
inline int64_t dot_rows_knob(const char* name) {
  return !kHasDotRows ? 0 : env_int(name).value_or(-1);
}

// FASTLSTM_DOT_ROWS=N: the forward's recurrent product through dot_rows at batch <= N whatever the size
// (0: never); unset: dot_pays decides.
inline int64_t dot_rows_override() {
  static const int64_t v = dot_rows_knob("FASTLSTM_DOT_ROWS");
  return v;
}

// Whether a batch-1 recurrent product of rows `units` long, T steps, runs through dot_rows rather than a packed
// weight. Each row's lanes are added up once at the end, which short rows pay relatively more. Measured on Zen 4
// (2 threads, A/B in one build, FASTLSTM_DOT_ROWS=0 against the default): rows of 16+ vectors were as fast or
// faster at any length (float32 hidden 256: 1.00-1.05x at T = 300-500; 384-512: 1.05-1.2x at T = 100-200;
// float64 hidden 128: 1.06-1.11x at T = 300-500) and much faster at one step (hidden 512: 1.8x). Rows of 8-15
// vectors only on short sequences, where packing is not paid back (float32 hidden 128-160, T = 10-16:
// 1.06-1.16x; at T = 500, hidden 128-192: 0.89-0.93x). 4 vectors (hidden 64) was slower: 0.87x at T = 500.
// Batch 2+ packs: dot_rows reads the weight once per row of h, and at batch 2, hidden 384 that ran 0.85x.
// The per-step loop (one thread, or a projection) follows the same rule: one thread, hidden 512, 1.02x at T = 100
// and 1.8x at T = 10; projection 256 of hidden 512 on 2 threads, 1.00-1.03x at T = 10-100.
// AVX2 (vectors of 8 floats, so the same rule takes shorter rows), on Zen 3, batch-1 float32 against nn.LSTM with
// FASTLSTM_DOT_ROWS=1 and =0 alternating, three runs: inference 1.69-1.70x against 1.40-1.45x at T = 10, hidden
// 512; 1.78-1.97x against 1.61-1.66x at T = 100, hidden 1024; 1.44-1.59x against 1.31-1.41x at T = 10, hidden 128;
// even at T = 100-500, hidden 64-256.
template <typename Dot>
inline bool dot_pays(int64_t B, int64_t T, int64_t units) {
  if (dot_rows_override() >= 0) return B <= dot_rows_override();
  const int64_t vectors = units / Dot::lanes;
  return kHasDotRows && B == 1 && (vectors >= 16 || (vectors >= 8 && T <= 16));
}

// Bytes of weight rows that step_dot takes through every row of A before it moves on: they stay in L1 (32 KB and
// up) beside the rows of A, so that the weight streams from memory once however many rows A has. A single step
// (the op alone, Zen 4, 2 threads, against each row of A through the whole weight, three alternating rounds):
// batch 2-16 at hidden 256-1024 1.3-1.9x faster.
constexpr int64_t kDotGroupBytes = 16 << 10;

// C[n, N] += A[n, K] @ w^T through dot_rows, w [N, K] as stored (rows `units` long), split over threads in
// blocks of weight rows when the product is worth it (as step_gemm splits). A row's sum does not depend on the
// split, nor on the groups of weight rows (whole blocks) that the rows of A go through in turn.
template <typename Dot>
void step_dot(const typename Dot::elem_t* A, int64_t lda, const typename Dot::unit_t* w, int64_t units,
              typename Dot::acc_t* C, int64_t ldc, int64_t n, int64_t N) {
  const int64_t blocks = (N + kDotBlock - 1) / kDotBlock;
  const int64_t block_bytes = kDotBlock * units * static_cast<int64_t>(sizeof(typename Dot::unit_t));
  const int64_t group = n == 1 ? blocks : std::max<int64_t>(1, kDotGroupBytes / block_bytes);
  auto run = [&](int64_t b0, int64_t b1) {
    for (int64_t g0 = b0; g0 < b1; g0 += group) {
      const int64_t r0 = g0 * kDotBlock, r1 = std::min(N, std::min(b1, g0 + group) * kDotBlock);
      for (int64_t i = 0; i < n; ++i)
        dot_rows<Dot>(A + i * lda, w + r0 * units, units, units, C + i * ldc + r0, r1 - r0, /*accumulate=*/true);
    }
  };
  if (at::get_num_threads() > 1 && n * N * units * Dot::pair >= kParallelStepWork && blocks > 1 &&
      !at::in_parallel_region()) {
    parallel_steps(0, blocks, 1, run);
  } else {
    run(0, blocks);
  }
}

// One product's left operand (rows A, lda elements apart) and packed right operand.
template <typename Dot>
struct StepOperand {
  const typename Dot::elem_t* A;
  int64_t lda;
  const Packed<Dot>* B;
};

// C[n, N] (+)= A[n, K] @ B, B packed. With `first` (a weight of the same N): C = first.A @ first.B + A @ B, each
// block of C through both products back to back while it is in cache, in one parallel region (the forward's
// input and recurrent products of a step: one fork/join a step fewer).
template <typename Dot>
void step_gemm(const typename Dot::elem_t* A, int64_t lda, const Packed<Dot>& B, typename Dot::acc_t* C, int64_t ldc,
               int64_t n, bool accumulate, const StepOperand<Dot>* first = nullptr, bool descending = false) {
  if (n == 0 || B.N == 0) return;
  TORCH_INTERNAL_ASSERT(first == nullptr || first->B->N == B.N);
  const int64_t W = Packed<Dot>::W;
  // Threads split units of one panel x one row block, panel-major: a thread's range is whole panels but for its
  // ends, so its slice of the weight stays in its cache across steps, and the split is even when the panels do
  // not divide evenly among threads (25 panels at hidden 200: 13 + 12 before, idling a thread ~4% of the
  // product; 7 panels of dh at hidden 200: 4 + 3, 14%). Row blocks are the kernel's own, so each row goes
  // through the same kernel, and sums in the same order, however the rows are split.
  const int64_t row_blocks = (n + kRowBlock - 1) / kRowBlock;
  // Units [u0, u1), all of one panel.
  auto piece = [&](int64_t u0, int64_t u1) {
    const int64_t p = u0 / row_blocks, b0 = u0 % row_blocks, b1 = b0 + (u1 - u0);
    const int64_t r0 = b0 * kRowBlock, r1 = std::min(n, b1 * kRowBlock), valid = std::min(W, B.N - p * W);
    if (first != nullptr)
      panel_rows<Dot>(first->A + r0 * first->lda, first->lda, first->B->panel(p), first->B->steps,
                      C + r0 * ldc + p * W, ldc, r1 - r0, valid, /*accumulate=*/false);
    panel_rows<Dot>(A + r0 * lda, lda, B.panel(p), B.steps, C + r0 * ldc + p * W, ldc, r1 - r0, valid,
                    accumulate || first != nullptr);
  };
  // `descending`: the same pieces, the last panel first (see forward_team's back-and-forth order).
  auto run = [&](int64_t u0, int64_t u1) {
    if (descending) {
      for (int64_t e = u1; e > u0;) {
        const int64_t u = std::max(u0, (e - 1) / row_blocks * row_blocks);
        piece(u, e);
        e = u;
      }
      return;
    }
    for (int64_t u = u0; u < u1;) {
      const int64_t e = std::min(u1, (u / row_blocks + 1) * row_blocks);
      piece(u, e);
      u = e;
    }
  };
  const int64_t steps = B.steps + (first != nullptr ? first->B->steps : 0);
  const int64_t work = n * B.N * steps * Dot::pair, units = B.panels * row_blocks;
  if (at::get_num_threads() > 1 && work >= kParallelStepWork && units > 1 && !at::in_parallel_region()) {
    parallel_steps(0, units, 1, run);
  } else {
    run(0, units);
  }
}

}  // namespace
}  // namespace fastlstm
