// fastlstm C++ CPU backend: vector types, the kernels' multiply-adds (float FMA, bfloat16 pairs), and the register
// transpose that packing uses.
#pragma once

#include <ATen/core/Tensor.h>
#include "threads.h"
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

namespace fastlstm {
namespace {

// Every vector is one of the machine's registers: 64 bytes with AVX-512, 32 with AVX2, 16 elsewhere (SSE,
// NEON). GCC lowers a wider vector-extension type through the stack: an AVX2 build with 64-byte vectors ran the
// per-step kernel ~20x slower than this (B1-T100-H128: 5.5 ms, nn.LSTM on AVX2 0.4 ms).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename scalar_t>
struct Vec {
  typedef scalar_t type __attribute__((vector_size(kVecBytes)));
  // Same vector, under-aligned and may_alias: dereferencing it is an unaligned load/store.
  typedef scalar_t utype __attribute__((vector_size(kVecBytes), aligned(sizeof(scalar_t)), may_alias));
  static constexpr int lanes = kVecBytes / sizeof(scalar_t);
  static type load(const scalar_t* p) { return *reinterpret_cast<const utype*>(p); }
  static void store(scalar_t* p, type v) { *reinterpret_cast<utype*>(p) = v; }
};

// How the kernel multiplies: the element type of the packed weight and of the rows A, how many k one step of
// the kernel consumes, and the multiply-add of one broadcast row value (or pair) into a vector of columns.
//
// FmaDot: scalar_t everywhere, one k per step, acc += a * w.
template <typename scalar_t>
struct FmaDot {
  using acc_t = scalar_t;
  using elem_t = scalar_t;
  using unit_t = scalar_t;
  using vec = typename Vec<scalar_t>::type;
  using row_t = scalar_t;
  static constexpr int lanes = Vec<scalar_t>::lanes;
  static constexpr int pair = 1;
  static row_t row(const elem_t* a) { return *a; }
  static vec load(const elem_t* p) { return Vec<scalar_t>::load(p); }
  static void madd(vec& acc, row_t a, vec w) { acc += a * w; }
  static void madd_lanes(vec& acc, vec a, vec w) { acc += a * w; }  // lane by lane (dot_rows)
  static elem_t from(acc_t v) { return v; }
  static acc_t to(elem_t v) { return v; }
};

// Bf16Dot (CPUs with AVX512-BF16, e.g. AMD Zen 4, Intel Cooper Lake / Sapphire Rapids): bfloat16 weights and rows,
// float accumulators. One step consumes a pair of k: vdpbf16ps adds a[2k] * w[2k] + a[2k+1] * w[2k+1] to each
// float lane, products exact in float. So the weight streams half the bytes and each instruction does twice
// the multiply-adds of a float FMA, as oneDNN's bf16 LSTM does. The panel stores the pair of one column side by
// side (one 32-bit unit); rows (h, x) and weights are bfloat16 with a zero past an odd K.
#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;
struct Bf16Dot {
  using acc_t = float;
  using elem_t = uint16_t;  // bfloat16 bits
  using unit_t = uint32_t;  // a pair of them
  using vec = Vec<float>::type;
  using row_t = __m512bh;
  static constexpr int lanes = Vec<float>::lanes;
  static constexpr int pair = 2;
  static row_t row(const elem_t* a) {
    int32_t both;
    std::memcpy(&both, a, sizeof(both));
    return reinterpret_cast<__m512bh>(_mm512_set1_epi32(both));
  }
  static vec load(const elem_t* p) { return Vec<float>::load(reinterpret_cast<const float*>(p)); }
  static void madd(vec& acc, row_t a, vec w) {
    acc = reinterpret_cast<vec>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(acc), a, reinterpret_cast<__m512bh>(w)));
  }
  static void madd_lanes(vec& acc, vec a, vec w) {
    acc = reinterpret_cast<vec>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(acc), reinterpret_cast<__m512bh>(a),
                                                 reinterpret_cast<__m512bh>(w)));
  }
  static elem_t from(float v) { return c10::BFloat16(v).x; }  // round to nearest even, as torch rounds
  static acc_t to(elem_t v) { return static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits())); }
};
#else
constexpr bool kHasBf16Dot = false;
using Bf16Dot = FmaDot<float>;  // never used for computing: kHasBf16Dot guards every use
#endif

// Lane indices for one round of transpose_block: row i (bit s clear) keeps its lanes j with bit s clear and
// takes row i+s's lanes j-s for the others (`high` false); row i+s takes row i's lanes j+s and keeps its own
// (`high` true). Indices >= L pick from the second source of a two-source permute.
template <typename index_t, int L, int s, bool high>
constexpr std::array<index_t, L> exchange_indices() {
  std::array<index_t, L> idx{};
  for (int j = 0; j < L; ++j) idx[j] = high ? ((j & s) ? L + j : j + s) : ((j & s) ? L + j - s : j);
  return idx;
}

#if defined(__AVX512F__)
template <int bytes, int s>
inline __attribute__((always_inline)) void exchange_round(__m512i* r) {
  constexpr int L = 64 / bytes;
  using index_t = std::conditional_t<bytes == 4, int32_t, int64_t>;
  alignas(64) static constexpr std::array<index_t, L> lo = exchange_indices<index_t, L, s, false>();
  alignas(64) static constexpr std::array<index_t, L> hi = exchange_indices<index_t, L, s, true>();
  const __m512i vlo = _mm512_load_si512(lo.data()), vhi = _mm512_load_si512(hi.data());
  for (int i = 0; i < L; ++i) {
    if (i & s) continue;
    const __m512i a = r[i], b = r[i + s];
    if constexpr (bytes == 4) {
      r[i] = _mm512_permutex2var_epi32(a, vlo, b);
      r[i + s] = _mm512_permutex2var_epi32(a, vhi, b);
    } else {
      r[i] = _mm512_permutex2var_epi64(a, vlo, b);
      r[i + s] = _mm512_permutex2var_epi64(a, vhi, b);
    }
  }
  if constexpr (s > 1) exchange_round<bytes, s / 2>(r);
}
#endif

#if defined(__AVX__) && !defined(__AVX512F__)
// The AVX register transposes transpose_block takes its squares through: 8 x 8 units of 4 bytes (pairs interleaved,
// then pairs of pairs, then the 128-bit halves exchanged), 4 x 4 of 8 (pairs, then halves).
inline void transpose_8x8_of_4(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

inline void transpose_4x4_of_8(const double* src, int64_t lds, double* dst, int64_t ldd) {
  __m256d r[4], t[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm256_loadu_pd(src + i * lds);
  for (int i = 0; i < 4; i += 2) {
    t[i] = _mm256_unpacklo_pd(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_pd(r[i], r[i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    _mm256_storeu_pd(dst + i * ldd, _mm256_permute2f128_pd(t[i], t[i + 2], 0x20));
    _mm256_storeu_pd(dst + (i + 2) * ldd, _mm256_permute2f128_pd(t[i], t[i + 2], 0x31));
  }
}
#endif

// dst[j * ldd + i] = src[i * lds + j] for one square block of one 64-byte cache line per row (16 x 16 units of 4
// bytes, 8 x 8 of 8). Packing transposes the whole weight once per call; element by element it cost ~1.4 cycles
// a unit (a one-step call at batch 1, hidden 128, one thread: 43 us, 29 us with this; Zen 4). With AVX-512 the
// block goes through registers: log2(L) rounds, each exchanging the off-diagonal s x s blocks of every 2s x 2s
// block, one two-source permute per row. With AVX, in four register-sized squares (one-step float32 calls on
// Zen 3, AVX2, 2 threads: batch 2, hidden 384 330 -> 270 us; batch 8, hidden 256 190 -> 140 us).
template <typename unit_t>
inline void transpose_block(const unit_t* src, int64_t lds, unit_t* dst, int64_t ldd) {
  constexpr int L = 64 / sizeof(unit_t);
#if defined(__AVX512F__)
  if constexpr (sizeof(unit_t) == 4 || sizeof(unit_t) == 8) {
    __m512i r[L];
    for (int i = 0; i < L; ++i) r[i] = _mm512_loadu_si512(src + i * lds);
    exchange_round<sizeof(unit_t), L / 2>(r);
    for (int i = 0; i < L; ++i) _mm512_storeu_si512(dst + i * ldd, r[i]);
    return;
  }
#elif defined(__AVX__)
  if constexpr (sizeof(unit_t) == 4 || sizeof(unit_t) == 8) {
    using lane_t = std::conditional_t<sizeof(unit_t) == 4, float, double>;  // the bits, moved as they are
    constexpr int S = L / 2;
    for (int bi = 0; bi < L; bi += S)
      for (int bj = 0; bj < L; bj += S) {
        const auto* from = reinterpret_cast<const lane_t*>(src + bi * lds + bj);
        auto* to = reinterpret_cast<lane_t*>(dst + bj * ldd + bi);
        if constexpr (sizeof(unit_t) == 4) {
          transpose_8x8_of_4(from, lds, to, ldd);
        } else {
          transpose_4x4_of_8(from, lds, to, ldd);
        }
      }
    return;
  }
#endif
  for (int i = 0; i < L; ++i)
    for (int j = 0; j < L; ++j) dst[j * ldd + i] = src[i * lds + j];
}

// dst[j * ldd + i] = src[i * lds + j] for a whole [rows, cols] matrix, in transpose_block's squares, parallel over
// column strips. at::copy_ of a transposed view ran ~5 GB/s here (a [1024, 256] float32 weight gradient: 190 us,
// Zen 5), as long as a fifth of the product it followed.
template <typename unit_t>
void transpose_matrix(const unit_t* src, int64_t rows, int64_t cols, int64_t lds, unit_t* dst, int64_t ldd) {
  constexpr int64_t L = 64 / sizeof(unit_t);
  const int64_t strips = (cols + L - 1) / L;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, rows * L));
  parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) {
    const int64_t c0 = s0 * L, c1 = std::min(cols, s1 * L);
    int64_t i = 0;
    for (; i + L <= rows; i += L) {
      int64_t j = c0;
      for (; j + L <= c1; j += L) transpose_block(src + i * lds + j, lds, dst + j * ldd + i, ldd);
      for (; j < c1; ++j)
        for (int64_t r = i; r < i + L; ++r) dst[j * ldd + r] = src[r * lds + j];
    }
    for (; i < rows; ++i)
      for (int64_t j = c0; j < c1; ++j) dst[j * ldd + i] = src[i * lds + j];
  });
}

}  // namespace
}  // namespace fastlstm
