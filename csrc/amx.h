// fastlstm C++ CPU backend: bfloat16 products on AMX tiles (Intel Sapphire Rapids and later).
//
// One tile multiply-add (tdpbf16ps) takes a [m, 32] block of bf16 rows against a [32, 16] block of the weight,
// accumulating [m, 16] in float, as vdpbf16ps does per lane: pairs of k, products exact, float sums. A loop of them
// alone on a 2-core Xeon with AMX, one core, K = 1024, 32 columns: 16 rows ran ~700 G multiply-adds a second, 8
// rows ~510, one row ~78 (there the weight's bytes bound it). oneDNN's bf16 LSTM runs on tiles there, and the
// vdpbf16ps kernel alone had run bf16 inference at 0.17-0.79x of nn.LSTM on 11 of the bench grid's 14 shapes.
//
// A Packed<Bf16Dot> panel is already the tiles' weight layout: a step of the panel is 32 columns x one pair of k,
// and 16 columns of 16 steps are one [16 rows x 64 bytes] weight tile, 128 bytes apart. So the tiles read the
// weight as the vector kernel does, and k past the last whole block of 16 pairs goes to the vector kernel.
#pragma once

#include "env.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FASTLSTM_AMX 1
#endif

namespace fastlstm {
namespace {

#ifdef FASTLSTM_AMX
constexpr bool kHasAmx = true;

// Whether the tiles are used: the build has them, Linux lets this process use their state (asked once; a kernel
// before 5.16 refuses), and FASTLSTM_AMX=0 does not turn them off (for measurements and tests).
inline bool amx_enabled() {
  static const bool v = [] {
    if (!env_flag("FASTLSTM_AMX").value_or(true)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return v;
}

// The tiles' layout: tmm0-1 accumulate [16, 16] floats, tmm2 holds [16, 32] bf16 of A, tmm3-4 [32, 16] of the
// weight; tmm5-7 are tmm0-2 for the `tail` rows (1-15) of a product whose rows are not whole blocks of 16. With both
// in one layout, a product of 24 rows (16 + 8) needs no second one: loading a layout costs ~50 ns, as long as a
// few tile multiply-adds, and the steps of a 24-row batch alternate between the two row counts every call.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Makes the thread's tiles hold the layout for `tail` rows (1-16; 0: any tail will do, only single whole blocks
// run). Other code on this thread (oneDNN's kernels, between our calls) configures the tiles its own way, or
// releases them, so the current layout is read back every time (~6 ns) rather than remembered.
inline void amx_configure(int tail) {
  alignas(64) TileConfig have;
  _tile_storeconfig(&have);
  // GCC does not count the builtins as reading or writing this memory: without the barriers it dropped the
  // stores that fill a layout (ldtilecfg then faulted on a zero one).
  asm volatile("" ::: "memory");
  bool ok = have.palette == 1 && have.start_row == 0;
  for (int t = 0; t < 8; ++t)
    ok = ok && have.colsb[t] == 64 && (t < 5 ? have.rows[t] == 16 : tail == 0 || have.rows[t] == tail);
  if (ok) return;
  TileConfig want;
  const int t_rows = tail == 0 ? (have.rows[5] >= 1 && have.rows[5] <= 16 ? have.rows[5] : 16) : tail;
  for (int t = 0; t < 8; ++t) {
    want.colsb[t] = 64;
    want.rows[t] = static_cast<uint8_t>(t < 5 ? 16 : t_rows);
  }
  asm volatile("" ::: "memory");
  _tile_loadconfig(&want);
}

// A panel as the weight tiles read it: one step is 32 columns x a pair of bf16 (128 bytes, a tile row's stride),
// and 16 steps (one tile's rows, 32 of k) are kBlockElems bf16 elements.
constexpr int64_t kPanelBytes = 128;
constexpr int64_t kBlockElems = 16 * 64;

// The tiles a block of rows uses: tmm0-2 for a whole block of 16, tmm5-7 for a tail (the intrinsics take tile
// numbers as literals, so each set is spelled out). Weight tiles tmm3-4 are shared.
template <bool kTail>
struct BlockTiles;
template <>
struct BlockTiles<false> {
  static void load_c0(const float* p, int64_t ld) { _tile_loadd(0, p, ld * 4); }
  static void load_c1(const float* p, int64_t ld) { _tile_loadd(1, p, ld * 4); }
  static void zero_c0() { _tile_zero(0); }
  static void zero_c1() { _tile_zero(1); }
  static void store_c0(float* p, int64_t ld) { _tile_stored(0, p, ld * 4); }
  static void store_c1(float* p, int64_t ld) { _tile_stored(1, p, ld * 4); }
  static void load_a(const uint16_t* p, int64_t ld) { _tile_loadd(2, p, ld * 2); }
  static void dp0() { _tile_dpbf16ps(0, 2, 3); }
  static void dp1() { _tile_dpbf16ps(1, 2, 4); }
};
template <>
struct BlockTiles<true> {
  static void load_c0(const float* p, int64_t ld) { _tile_loadd(5, p, ld * 4); }
  static void load_c1(const float* p, int64_t ld) { _tile_loadd(6, p, ld * 4); }
  static void zero_c0() { _tile_zero(5); }
  static void zero_c1() { _tile_zero(6); }
  static void store_c0(float* p, int64_t ld) { _tile_stored(5, p, ld * 4); }
  static void store_c1(float* p, int64_t ld) { _tile_stored(6, p, ld * 4); }
  static void load_a(const uint16_t* p, int64_t ld) { _tile_loadd(7, p, ld * 2); }
  static void dp0() { _tile_dpbf16ps(5, 7, 3); }
  static void dp1() { _tile_dpbf16ps(6, 7, 4); }
};

// One block of m rows: C[m, valid] (+)= A[m, 32 * blocks] @ the panel's first 16 * blocks steps, valid <= 32
// columns. A block of columns narrower than 16 goes through a small buffer, as the vector kernel's do.
template <bool kTail>
inline void amx_block(const uint16_t* a, int64_t lda, const uint16_t* panel, int64_t blocks, float* c, int64_t ldc,
                      int m, int64_t valid, bool accumulate) {
  using T = BlockTiles<kTail>;
  const bool two = valid > 16;
  const int64_t cols0 = std::min<int64_t>(valid, 16), cols1 = two ? valid - 16 : 0;
  alignas(64) float buf[2][16 * 16];
  // An accumulator tile of `cols` columns at cc: straight from C where all 16 columns are C's, else through cb.
  auto load = [&](int64_t cols, const float* cc, float* cb, auto load_tile, auto zero_tile) {
    if (cols == 16) {
      if (accumulate) load_tile(cc, ldc);
      else zero_tile();
      return;
    }
    for (int r = 0; r < m; ++r)
      for (int j = 0; j < 16; ++j) cb[r * 16 + j] = (accumulate && j < cols) ? cc[r * ldc + j] : 0.0f;
    load_tile(cb, 16);
  };
  auto store = [&](int64_t cols, float* cc, float* cb, auto store_tile) {
    if (cols == 16) {
      store_tile(cc, ldc);
      return;
    }
    store_tile(cb, 16);
    for (int r = 0; r < m; ++r) std::memcpy(cc + r * ldc, cb + r * 16, cols * sizeof(float));
  };
  load(cols0, c, buf[0], T::load_c0, T::zero_c0);
  if (two) load(cols1, c + 16, buf[1], T::load_c1, T::zero_c1);
  for (int64_t kb = 0; kb < blocks; ++kb) {
    T::load_a(a + kb * 32, lda);
    _tile_loadd(3, panel + kb * kBlockElems, kPanelBytes);
    T::dp0();
    if (two) {
      _tile_loadd(4, panel + kb * kBlockElems + 32, kPanelBytes);
      T::dp1();
    }
  }
  store(cols0, c, buf[0], T::store_c0);
  if (two) store(cols1, c + 16, buf[1], T::store_c1);
}

// Two blocks of rows against all 32 columns of a panel at once: 16 rows at a0 on tmm0-2, the rows tmm5-7 are laid
// out for at a1, each weight tile loaded once for both. A weight tile is as many bytes as two blocks' worth of
// multiply-adds read from A, and it comes from L2 where A stays in L1: alone, each block streamed the panel.
inline void amx_pair(const uint16_t* a0, const uint16_t* a1, int64_t lda, const uint16_t* panel, int64_t blocks,
                     float* c0, float* c1, int64_t ldc, bool accumulate) {
  using T0 = BlockTiles<false>;
  using T1 = BlockTiles<true>;
  if (accumulate) {
    T0::load_c0(c0, ldc);
    T0::load_c1(c0 + 16, ldc);
    T1::load_c0(c1, ldc);
    T1::load_c1(c1 + 16, ldc);
  } else {
    T0::zero_c0();
    T0::zero_c1();
    T1::zero_c0();
    T1::zero_c1();
  }
  for (int64_t kb = 0; kb < blocks; ++kb) {
    T0::load_a(a0 + kb * 32, lda);
    T1::load_a(a1 + kb * 32, lda);
    _tile_loadd(3, panel + kb * kBlockElems, kPanelBytes);
    T0::dp0();
    T1::dp0();
    _tile_loadd(4, panel + kb * kBlockElems + 32, kPanelBytes);
    T0::dp1();
    T1::dp1();
  }
  T0::store_c0(c0, ldc);
  T0::store_c1(c0 + 16, ldc);
  T1::store_c0(c1, ldc);
  T1::store_c1(c1 + 16, ldc);
}

// C[n, valid] (+)= A[n, 32 * blocks] @ panel's first 16 * blocks steps (valid <= 32 columns) on the tiles: row
// blocks of 16 and the tail. A whole panel goes two blocks at a time: pairs of 16-row blocks where the rows are
// whole blocks (the second set of tiles laid out for 16 rows), else the tail beside the first block.
inline void amx_panel_blocks(const uint16_t* A, int64_t lda, const uint16_t* panel, int64_t blocks, float* C,
                             int64_t ldc, int64_t n, int64_t valid, bool accumulate) {
  const int tail = static_cast<int>(n % 16);
  const int64_t whole = n / 16;
  const bool pairs = valid == 32 && whole + (tail > 0) >= 2;
  amx_configure(tail > 0 ? tail : pairs ? 16 : 0);
  int64_t b = 0;  // the next whole block
  if (pairs && tail > 0) {
    amx_pair(A, A + whole * 16 * lda, lda, panel, blocks, C, C + whole * 16 * ldc, ldc, accumulate);
    b = 1;
  }
  for (; b < whole; ++b) {
    if (pairs && tail == 0 && b + 1 < whole) {
      amx_pair(A + b * 16 * lda, A + (b + 1) * 16 * lda, lda, panel, blocks, C + b * 16 * ldc,
               C + (b + 1) * 16 * ldc, ldc, accumulate);
      ++b;
      continue;
    }
    amx_block<false>(A + b * 16 * lda, lda, panel, blocks, C + b * 16 * ldc, ldc, 16, valid, accumulate);
  }
  if (tail > 0 && !pairs)
    amx_block<true>(A + whole * 16 * lda, lda, panel, blocks, C + whole * 16 * ldc, ldc, tail, valid, accumulate);
}

// Rows from which a product takes the tiles; below it, the vector kernel. From one row: bf16 on a 2-core Xeon with
// AMX, medians of one process each, B1-T100-H512 training 7.1 -> 6.5 ms against 2 rows (the backward's products
// at batch 1), B3-T100-H256 and B2-T200-H384 1.5x faster than from 4 rows, the rest even. FASTLSTM_AMX_MIN_ROWS
// overrides (a huge value keeps the tiles off).
inline int64_t amx_min_rows() {
  static const int64_t v = env_int("FASTLSTM_AMX_MIN_ROWS").value_or(1);
  return v;
}
#else
constexpr bool kHasAmx = false;
inline bool amx_enabled() {
  static const bool checked = env_flag("FASTLSTM_AMX").has_value();  // a malformed value warns in every build
  (void)checked;
  return false;
}
#endif

}  // namespace
}  // namespace fastlstm
