// fastlstm C++ CPU backend: one LSTM layer, one direction, forward and backward.
//
// The layer contract (fastlstm/reference.py is the executable spec):
//   x [T, B, I], h0 [B, P], c0 [B, H], w_ih [4H, I], w_hh [4H, P], b [4H]?, w_hr [P, H]?,
//   batch_sizes [T] int64 CPU? (packed: only the first batch_sizes[t] rows are live at step t), reverse.
//   -> y [T, B, P] (zero where a row is not live), hT [B, P], cT [B, H]
// Gate order along 4H: input, forget, cell, output.
//
// How it is fast:
//   * x @ w_ih^T for all steps is one GEMM before the time loop, written straight into the gate buffer
//     (float32: oneDNN's matmul on CPUs other than Intel's, where it beat MKL's sgemm); from 8 rows on, when
//     the steps run the register-blocked kernel, it runs per step beside h @ w_hh^T instead, so the gates
//     reach the cell while in cache.
//   * Inside the loop h @ w_hh^T runs against a weight packed once per call (transposed through AVX-512
//     registers, 16 x 16 at a time): a register-blocked kernel in GCC vector extensions (~95% of the FMA peak
//     in isolation; panels of w_hh stay in each thread's cache across steps; threads split panel x row-block
//     units); for float32 on Intel CPUs where libtorch carries MKL, MKL's packed GEMM; for float64 batches
//     >= 16, a plain dgemm. No dispatcher, no allocation.
//   * Small steps (up to 2^20 multiply-adds, no projection) run as one team of threads for the whole
//     sequence, each owning a slice of hidden units, with one spin barrier per step, forward and backward.
//   * The pointwise cell is one fused loop in explicit SIMD with an own exp: ~1 ulp for float, ~1e-16
//     relative for double; a row's last partial vector runs the same code through masked loads and stores.
//   * Inference keeps no gates for backward: with the projection fused, one step's [B, 4H] buffer, reused.
//   * Backward runs the reverse time loop for the gate gradients only; dx, dw_ih, dw_hh, db, dw_hr are then
//     single GEMMs / reductions over all T*B rows (float32 weight gradients on Zen 5: oneDNN's matmul).
//   * Autograd is a C++ Autograd kernel (no per-call Python); double backward recomputes the layer in ATen ops.
//   * bfloat16, on CPUs with AVX512-BF16: the products take bf16 in pairs (vdpbf16ps, float accumulation), the
//     recurrent and input products in the register-blocked kernel, backward's large ones in ATen's bf16 matmul;
//     h (and, in backward, dgates) is rounded to bf16 for them, as native bf16 does; the cell, c and the saved
//     gates stay float. Elsewhere bfloat16, and float16 everywhere, compute in float32 end to end (fp32 c) and are
//     rounded at the boundary.
// Saved for backward: activated gates [T, B, 4H] and the cell history [T, B, H] (plus the output y).

#include <torch/library.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The Fortran BLAS that libtorch_cpu already carries (MKL on x86 wheels, OpenBLAS elsewhere). Weak, so that
// a torch build without them still loads; we then fall back to at::addmm on views.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's packed GEMM (x86 torch wheels): pack the recurrent weight once per call, reuse it every step.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace fastlstm {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------------------
// GEMM on row-major buffers: C[M,N] = alpha * op(A) op(B) + beta * C.
// op(A) is [M,K]: A is stored [M,K] (lda) or, with trans_a, [K,M]. Same for B ([K,N] or, trans_b, [N,K]).

template <typename scalar_t>
void gemm_fallback(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, scalar_t alpha, const scalar_t* A,
                   int64_t lda, const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  Tensor a = trans_a ? at::from_blob(const_cast<scalar_t*>(A), {K, M}, {lda, 1}, opts).t()
                     : at::from_blob(const_cast<scalar_t*>(A), {M, K}, {lda, 1}, opts);
  Tensor b = trans_b ? at::from_blob(const_cast<scalar_t*>(B), {N, K}, {ldb, 1}, opts).t()
                     : at::from_blob(const_cast<scalar_t*>(B), {K, N}, {ldb, 1}, opts);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == scalar_t(0)) {
    at::mm_out(c, a, b);
    if (alpha != scalar_t(1)) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// The Fortran BLAS routine for scalar_t (null when libtorch does not carry one).
template <typename scalar_t>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const scalar_t*,
                             const scalar_t*, const int*, const scalar_t*, const int*, const scalar_t*, scalar_t*,
                             const int*);
template <typename scalar_t>
FortranGemm<scalar_t> fortran_gemm() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return sgemm_;
  } else {
    return dgemm_;
  }
}

template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, scalar_t alpha, const scalar_t* A,
          int64_t lda, const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const int64_t big = std::numeric_limits<int>::max();
  const FortranGemm<scalar_t> blas = fortran_gemm<scalar_t>();
  if (blas != nullptr && M < big && N < big && K < big && lda < big && ldb < big && ldc < big && K > 0) {
    // Row-major C = A B is column-major C^T = B^T A^T, and a row-major buffer read column-major is the transpose.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = (int)N, n = (int)M, k = (int)K, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
    blas(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    gemm_fallback<scalar_t>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The per-step product C[n, N] (+)= A[n, K] @ Bm[K, N], Bm row-major and contiguous (the weight, laid out once
// per call). A register-blocked kernel in GCC/Clang vector extensions: a block of RB rows x 2 vectors of
// columns lives in registers while k runs; columns are the outer loop (and the split between threads) so a
// thread's slice of the weight stays in its cache across all row blocks and all time steps. No allocation,
// no dispatcher: this is what runs T times.

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

// dst[j * ldd + i] = src[i * lds + j] for one square block of one 64-byte cache line per row (16 x 16 units of 4
// bytes, 8 x 8 of 8). Packing transposes the whole weight once per call; element by element it cost ~1.4 cycles
// a unit (a one-step call at batch 1, hidden 128, one thread: 43 us, 29 us with this; Zen 4). With AVX-512 the
// block goes through registers: log2(L) rounds, each exchanging the off-diagonal s x s blocks of every 2s x 2s
// block, one two-source permute per row.
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
#endif
  for (int i = 0; i < L; ++i)
    for (int j = 0; j < L; ++j) dst[j * ldd + i] = src[i * lds + j];
}

// A weight B [K, N] packed in panels of kPanel vectors of columns: panel p holds columns [p*W, p*W+W) as a
// contiguous [steps, W] block of units (zero padded past N), so the micro-kernel reads it sequentially. A unit
// is what one kernel step takes of one column: one element (FmaDot) or a pair of k (Bf16Dot, a 32-bit word).
constexpr int kPanel = 2;

// Memory of packed weights, kept by each thread between calls (at most kPackKeep bytes a thread). Every call
// packs its weights afresh, and fresh allocations of that size come from the kernel as pages that fault and
// are zeroed on first touch: at batch 1, hidden 512 (4 MB of w_hh) that cost ~1.4 ms of a 6 ms forward,
// measured by running with glibc told never to return memory (MALLOC_TRIM_THRESHOLD_). Buffers are reused by
// size; the same model asks for the same sizes call after call.
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
    at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
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

// C[RB, valid] (+)= A[RB, K] @ panel, K in steps of Dot::pair (lda in elements).
template <typename Dot, int RB>
inline void micro_kernel(const typename Dot::elem_t* __restrict__ A, int64_t lda,
                         const typename Dot::elem_t* __restrict__ panel, int64_t steps,
                         typename Dot::acc_t* __restrict__ C, int64_t ldc, int64_t valid, bool accumulate) {
  using acc_t = typename Dot::acc_t;
  using vec = typename Dot::vec;
  constexpr int L = Dot::lanes, CV = kPanel, W = CV * L, PR = Dot::pair;
  vec acc[RB][CV];
  acc_t tmp[RB * W];
  acc_t* out = C;
  int64_t ldo = ldc;
  if (valid < W) {  // the last, partial panel goes through a small buffer
    out = tmp;
    ldo = W;
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < W; ++c) tmp[r * W + c] = (accumulate && c < valid) ? C[r * ldc + c] : acc_t(0);
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < CV; ++v) acc[r][v] = accumulate ? Vec<acc_t>::load(out + r * ldo + v * L) : vec{};
  // Few rows leave too few independent FMA chains to hide latency: unroll k into KU partial sums.
  constexpr int KU = RB == 1 ? 4 : (RB == 2 ? 2 : 1);
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
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < CV; ++v) Vec<acc_t>::store(out + r * ldo + v * L, acc[r][v]);
  if (valid < W) {
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < valid; ++c) C[r * ldc + c] = tmp[r * W + c];
  }
}

// Rows in the register-blocked kernel's row blocks (the last block of a product takes the remainder): RB x 2
// accumulators, 2 weight vectors and a broadcast row value must fit the register file, 32 vector registers with
// AVX-512 and 16 with AVX2 or SSE (NEON has 32, but no ARM machine was measured: 6 there too).
constexpr int kRowBlock = kVecBytes == 64 ? 8 : 6;

template <typename Dot>
inline void panel_rows(const typename Dot::elem_t* A, int64_t lda, const typename Dot::elem_t* panel, int64_t steps,
                       typename Dot::acc_t* C, int64_t ldc, int64_t n, int64_t valid, bool accumulate) {
  constexpr int RB = kRowBlock;
  int64_t r = 0;
  for (; r + RB <= n; r += RB)
    micro_kernel<Dot, RB>(A + r * lda, lda, panel, steps, C + r * ldc, ldc, valid, accumulate);
  const auto* a = A + r * lda;
  auto* c = C + r * ldc;
  switch (n - r) {
    case 0: break;
    case 1: micro_kernel<Dot, 1>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 2: micro_kernel<Dot, 2>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 3: micro_kernel<Dot, 3>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 4: micro_kernel<Dot, 4>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 5: micro_kernel<Dot, 5>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    case 6: micro_kernel<Dot, 6>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
    default: micro_kernel<Dot, 7>(a, lda, panel, steps, c, ldc, valid, accumulate); break;
  }
}

// Work (multiply-adds) below which one step's product is not split over threads.
constexpr int64_t kParallelStepWork = 1 << 17;

// One row of h against rows of the weight as stored (row-major, no packing): out[r] (+)= h . w[r] for the rows
// [0, rows), each a dot product of `units` units, lane-wise partial sums added up at the end. At batch 1 this
// is the whole recurrent product, and packing the weight first cost more than the product at short sequences:
// at hidden 512 the pack took ~0.25 ms a call, the product ~19 us a step. AVX-512 only (one reduction
// instruction per row); other builds pack.
constexpr int64_t kDotBlock = 8;  // weight rows a dot_rows block takes at once

#if defined(__AVX512F__)
constexpr bool kHasDotRows = true;

template <typename Dot>
inline typename Dot::vec load_units(const typename Dot::unit_t* p, int64_t n) {
  using vec = typename Dot::vec;
  if constexpr (sizeof(typename Dot::unit_t) == 8) {
    return reinterpret_cast<vec>(_mm512_maskz_loadu_epi64(static_cast<__mmask8>((1u << n) - 1), p));
  } else {
    return reinterpret_cast<vec>(_mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1), p));
  }
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
  if (k < units) {  // masked: zeros past the row, whose end may be the end of the weight
    const vec hv = load_units<Dot>(h + k, units - k);
    for (int r = 0; r < R; ++r) Dot::madd_lanes(acc[r], hv, load_units<Dot>(w + r * ldw + k, units - k));
  }
  for (int r = 0; r < R; ++r) {
    acc_t sum;
    if constexpr (std::is_same_v<acc_t, double>) {
      sum = _mm512_reduce_add_pd(reinterpret_cast<__m512d>(acc[r]));
    } else {
      sum = _mm512_reduce_add_ps(reinterpret_cast<__m512>(acc[r]));
    }
    out[r] = accumulate ? out[r] + sum : sum;
  }
}

template <typename Dot>
inline void dot_rows(const typename Dot::elem_t* h, const typename Dot::unit_t* w, int64_t ldw, int64_t units,
                     typename Dot::acc_t* out, int64_t rows, bool accumulate) {
  const auto* hu = reinterpret_cast<const typename Dot::unit_t*>(h);
  constexpr int R = kDotBlock;
  int64_t r = 0;
  for (; r + R <= rows; r += R) dot_block<Dot, R>(hu, w + r * ldw, ldw, units, out + r, accumulate);
  for (; r < rows; ++r) dot_block<Dot, 1>(hu, w + r * ldw, ldw, units, out + r, accumulate);
}
#else
constexpr bool kHasDotRows = false;

template <typename Dot>
inline void dot_rows(const typename Dot::elem_t*, const typename Dot::unit_t*, int64_t, int64_t,
                     typename Dot::acc_t*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "dot_rows needs AVX-512");
}
#endif

// FASTLSTM_DOT_ROWS=N: the forward's recurrent product through dot_rows at batch <= N whatever the size
// (0: never); unset: dot_pays decides. -1 when unset.
inline int64_t dot_rows_override() {
  static const char* env = std::getenv("FASTLSTM_DOT_ROWS");
  static const int64_t v = !kHasDotRows ? 0 : env != nullptr ? std::max<int64_t>(0, std::atoll(env)) : -1;
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
template <typename Dot>
inline bool dot_pays(int64_t B, int64_t T, int64_t units) {
  if (dot_rows_override() >= 0) return B <= dot_rows_override();
  const int64_t vectors = units / Dot::lanes;
  return kHasDotRows && B == 1 && (vectors >= 16 || (vectors >= 8 && T <= 16));
}

// C[n, N] += A[n, K] @ w^T through dot_rows, w [N, K] as stored (rows `units` long), split over threads in
// blocks of weight rows when the product is worth it (as step_gemm splits). A row's sum does not depend on the
// split.
template <typename Dot>
void step_dot(const typename Dot::elem_t* A, int64_t lda, const typename Dot::unit_t* w, int64_t units,
              typename Dot::acc_t* C, int64_t ldc, int64_t n, int64_t N) {
  const int64_t blocks = (N + kDotBlock - 1) / kDotBlock;
  auto run = [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kDotBlock, r1 = std::min(N, b1 * kDotBlock);
    for (int64_t i = 0; i < n; ++i)
      dot_rows<Dot>(A + i * lda, w + r0 * units, units, units, C + i * ldc + r0, r1 - r0, /*accumulate=*/true);
  };
  if (at::get_num_threads() > 1 && n * N * units * Dot::pair >= kParallelStepWork && blocks > 1 &&
      !at::in_parallel_region()) {
    at::parallel_for(0, blocks, 1, run);
  } else {
    run(0, blocks);
  }
}

// C[m, N] (+)= A[m, K] @ op(W) with op(W) [K, N] packed by MKL for exactly m rows; only for float, only when
// libtorch carries MKL, and only for batches where it beats the register-blocked kernel.
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasBMatrix = 162,
              kCblasPacked = 151;
// MKL picks its fast kernels on Intel CPUs only. Measured on a 2-core AMD EPYC (Zen 4), float32 inference over
// `bench --grid cpu-full`: with MKL's packed GEMM per step, geomean 0.73x of nn.LSTM (min 0.44x); with the
// register-blocked kernel, 0.93x (min 0.80x). So MKL's packed path is the default on Intel only.
inline bool cpu_is_intel() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}
// AMD's CPU family (0x19 Zen 3/4, 0x1A Zen 5), or 0 on other vendors and architectures.
inline int amd_family() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (!__builtin_cpu_is("amd")) return 0;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  const unsigned base = (eax >> 8) & 0xf;
  return static_cast<int>(base == 0xf ? base + ((eax >> 20) & 0xff) : base);
#else
  return 0;
#endif
}
inline int64_t mkl_min_rows() {
  static const int64_t v = std::getenv("FASTLSTM_MKL_MIN_ROWS") ? std::atoll(std::getenv("FASTLSTM_MKL_MIN_ROWS"))
                           : cpu_is_intel()                     ? 1
                                                                : std::numeric_limits<int64_t>::max();
  return v;
}

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

struct MklPacked {
  float* data = nullptr;
  int m = 0, n = 0, k = 0;
  bool ok = false;
  // W row-major; trans: op(W) = W^T.
  void pack(const float* W, int64_t ld, bool trans, int64_t m_, int64_t n_, int64_t k_) {
    ok = false;
    if (cblas_sgemm_pack_get_size == nullptr || cblas_sgemm_pack == nullptr || cblas_sgemm_compute == nullptr) return;
    if (m_ < mkl_min_rows() || m_ > (1 << 20) || n_ > (1 << 20) || k_ > (1 << 20)) return;
    m = (int)m_;
    n = (int)n_;
    k = (int)k_;
    const size_t bytes = cblas_sgemm_pack_get_size(kCblasBMatrix, m, n, k);
    data = static_cast<float*>(pack_scratch().get(bytes));  // MKL asks for megabytes, touches what it uses
    cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, trans ? kCblasTrans : kCblasNoTrans, m, n, k, 1.0f, W, (int)ld,
                     data);
    ok = true;
  }
  bool usable(int64_t rows) const { return ok && rows == m; }
  void run(const float* A, int64_t lda, float* C, int64_t ldc, bool accumulate) const {
    cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, m, n, k, A, (int)lda, data, n,
                        accumulate ? 1.0f : 0.0f, C, (int)ldc);
  }
};

// Where the plain BLAS call (which re-packs the weight every step) beats the register-blocked kernel: float32
// takes MKL's packed path instead whenever available.
inline int64_t dgemm_min_rows() {
  static const int64_t v =
      std::getenv("FASTLSTM_DGEMM_MIN_ROWS") ? std::atoll(std::getenv("FASTLSTM_DGEMM_MIN_ROWS")) : 16;
  return v;
}
template <typename scalar_t>
inline bool use_blas_rows(int64_t B) {
  return std::is_same_v<scalar_t, double> && dgemm_ != nullptr && B >= dgemm_min_rows();
}

// ---------------------------------------------------------------------------------------------------------
// oneDNN's matmul for the large float32 products of the form A @ W^T (the input projection, and dx in
// backward). Measured on a 2-core AMD EPYC (Zen 4), [T*B, K] x [K, 4H] shapes of the benchmark grid:
// 185-209 GFLOP/s, against 136-167 for MKL's sgemm, which runs a generic path on AMD. (For dW = dG^T @ x, a
// long reduction, MKL measured faster, so those stay on gemm.) libtorch does not export oneDNN's API; it is
// reached through the op inductor uses for linear layers, looked up once at run time, and absent (so unused)
// in builds without oneDNN. The user's torch.backends.mkldnn.enabled = False is respected.
using LinearPointwiseFn = Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&, c10::string_view,
                                 c10::List<c10::optional<c10::Scalar>>, c10::optional<c10::string_view>);

const c10::optional<c10::TypedOperatorHandle<LinearPointwiseFn>>& onednn_linear_op() {
  static const auto op = []() -> c10::optional<c10::TypedOperatorHandle<LinearPointwiseFn>> {
    const auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value() || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return c10::nullopt;
    try {
      return handle->typed<LinearPointwiseFn>();
    } catch (const c10::Error&) {  // a torch whose schema differs: keep BLAS
      return c10::nullopt;
    }
  }();
  return op;
}

// Multiply-adds from which oneDNN serves a product: by default from 2^22 on CPUs other than Intel's (smaller
// products measured even), never on Intel, where MKL's sgemm is tuned. FASTLSTM_ONEDNN_MIN_MACS overrides.
inline int64_t onednn_min_macs() {
  static const int64_t v = std::getenv("FASTLSTM_ONEDNN_MIN_MACS")
                               ? std::atoll(std::getenv("FASTLSTM_ONEDNN_MIN_MACS"))
                           : cpu_is_intel() ? std::numeric_limits<int64_t>::max()
                                            : int64_t(1) << 22;
  return v;
}

// Whether oneDNN serves a float32 product of `macs` multiply-adds, and the product A @ W^T as it computes it.
template <typename scalar_t>
bool onednn_serves(int64_t macs) {
  return std::is_same_v<scalar_t, float> && onednn_linear_op().has_value() && macs >= onednn_min_macs() &&
         macs > 0 && at::globalContext().userEnabledMkldnn();
}

Tensor onednn_linear(const Tensor& A, const Tensor& W) {
  return onednn_linear_op()->call(A, W, c10::nullopt, "none", c10::List<c10::optional<c10::Scalar>>(),
                                  c10::nullopt);
}

// A [M, K] (contiguous) @ W [N, K]^T into out [M, N] (contiguous). W may be a transposed view (dx takes
// w_ih.t()): oneDNN reads it strided, which measured faster than a transposing copy first, and BLAS is told.
// oneDNN writes only to a tensor of its own, so when it runs, its result replaces `out` (same shape) rather
// than being copied in: callers adopt `out` after.
template <typename scalar_t>
void linear_nt(const Tensor& A, const Tensor& W, Tensor& out) {
  const int64_t M = A.size(0), K = A.size(1), N = W.size(0);
  if (onednn_serves<scalar_t>(M * N * K)) {
    out = onednn_linear(A, W);
    return;
  }
  // Stored [N, K] (row stride ld >= K), or stored [K, N] (ld >= N); anything else is copied to [N, K].
  Tensor Wc = W;
  bool stored_nk = true;
  int64_t ld = K;
  if (W.stride(1) == 1 && W.stride(0) >= std::max<int64_t>(1, K)) {
    ld = W.stride(0);
  } else if (W.stride(0) == 1 && W.stride(1) >= std::max<int64_t>(1, N)) {
    stored_nk = false;
    ld = W.stride(1);
  } else {
    Wc = W.contiguous();
  }
  gemm(false, stored_nk, M, N, K, scalar_t(1), A.data_ptr<scalar_t>(), K, Wc.data_ptr<scalar_t>(), ld, scalar_t(0),
       out.data_ptr<scalar_t>(), N);
}


// Whether oneDNN also serves the weight gradients dW = dG^T @ X (float32), reductions over all T*B rows.
// Measured with torch's ops on 2 threads. Zen 4 (256-bit AVX-512 units): MKL's sgemm was the faster. Zen 5,
// whose units are 512 bits wide: MKL's generic path on AMD stays at ~210 GFLOP/s (torch.mm 2048^3: 214), and
// oneDNN, asked for dW^T = X^T @ dG and transposed after (see weight_grad), ran the grid's shapes at 320-420
// GFLOP/s, the copy included ([2048 x 6400] @ [6400 x 512]: 372 against MKL's 211; [800 x 2240] @ [2240 x
// 200]: 418 against 206; [256 x 3200] @ [3200 x 64]: 319 against 181). So from AMD family 0x1A (Zen 5) on,
// from 2^24 multiply-adds (below, MKL was as fast or faster: [512 x 100] @ [100 x 128] 169 against 130
// GFLOP/s, [256 x 500] @ [500 x 64] 159 against 119; from [800 x 140] @ [140 x 200], 22M, oneDNN won).
// FASTLSTM_ONEDNN_WEIGHT_GRADS=1 or 0 overrides which CPUs; FASTLSTM_ONEDNN_MIN_MACS, when set, the size.
inline bool onednn_weight_grads() {
  static const bool v = std::getenv("FASTLSTM_ONEDNN_WEIGHT_GRADS")
                            ? std::atoi(std::getenv("FASTLSTM_ONEDNN_WEIGHT_GRADS")) != 0
                            : amd_family() >= 0x1A;
  return v;
}

// out[M, N] = A[R, M]^T @ X[R, N], A and X with unit column stride. When oneDNN serves it, its result replaces
// `out` (as in linear_nt). From 512 rows on, oneDNN computes out^T = X^T @ A and the result is transposed: it
// ran 1.2-1.8x faster than dG^T @ X read strided at 800-6400 rows (Zen 5, the shapes above), even with the
// copy. Below, the copy does not pay: at 100 rows, [2048 x 512], the product took 0.52 ms and the copy 0.55
// (strided: 0.57 ms in all; at 400 rows the two ran even).
constexpr int64_t kWeightGradTransposeRows = 512;

inline int64_t weight_grad_min_macs() {
  static const int64_t v = std::getenv("FASTLSTM_ONEDNN_MIN_MACS") ? onednn_min_macs() : int64_t(1) << 24;
  return v;
}

template <typename scalar_t>
void weight_grad(const Tensor& A, const Tensor& X, Tensor& out) {
  const int64_t rows = A.size(0), macs = rows * A.size(1) * X.size(1);
  if (onednn_weight_grads() && onednn_serves<scalar_t>(macs) && macs >= weight_grad_min_macs()) {
    out = rows >= kWeightGradTransposeRows ? onednn_linear(X.t(), A.t()).t().contiguous()
                                           : onednn_linear(A.t(), X.t());
    return;
  }
  at::mm_out(out, A.t(), X);
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
               int64_t n, bool accumulate, const StepOperand<Dot>* first = nullptr) {
  if (n == 0 || B.N == 0) return;
  TORCH_INTERNAL_ASSERT(first == nullptr || first->B->N == B.N);
  const int64_t W = Packed<Dot>::W;
  // Threads split units of one panel x one row block, panel-major: a thread's range is whole panels but for its
  // ends, so its slice of the weight stays in its cache across steps, and the split is even when the panels do
  // not divide evenly among threads (25 panels at hidden 200: 13 + 12 before, idling a thread ~4% of the
  // product; 7 panels of dh at hidden 200: 4 + 3, 14%). Row blocks are the kernel's own, so each row goes
  // through the same kernel, and sums in the same order, however the rows are split.
  const int64_t row_blocks = (n + kRowBlock - 1) / kRowBlock;
  auto run = [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1;) {
      const int64_t p = u / row_blocks, b0 = u % row_blocks, b1 = std::min(row_blocks, b0 + (u1 - u));
      const int64_t r0 = b0 * kRowBlock, r1 = std::min(n, b1 * kRowBlock), valid = std::min(W, B.N - p * W);
      if (first != nullptr)
        panel_rows<Dot>(first->A + r0 * first->lda, first->lda, first->B->panel(p), first->B->steps,
                        C + r0 * ldc + p * W, ldc, r1 - r0, valid, /*accumulate=*/false);
      panel_rows<Dot>(A + r0 * lda, lda, B.panel(p), B.steps, C + r0 * ldc + p * W, ldc, r1 - r0, valid,
                      accumulate || first != nullptr);
      u += b1 - b0;
    }
  };
  const int64_t steps = B.steps + (first != nullptr ? first->B->steps : 0);
  const int64_t work = n * B.N * steps * Dot::pair, units = B.panels * row_blocks;
  if (at::get_num_threads() > 1 && work >= kParallelStepWork && units > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, units, 1, run);
  } else {
    run(0, units);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Pointwise math, all in explicit SIMD (a row's last partial vector too, through masked loads and stores).

// float through GCC/Clang vector extensions, one register wide (kVecBytes): a Cephes-style exp, about 1 ulp.
typedef float vf __attribute__((vector_size(kVecBytes)));
typedef float vf_u __attribute__((vector_size(kVecBytes), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(kVecBytes)));

inline vf vload(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void vstore(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline vf vsplat(float a) { return vf{} + a; }

inline vf vexp(vf x) {
  x = x < vsplat(-87.3365447504f) ? vsplat(-87.3365447504f) : x;
  x = x > vsplat(88.3762626647949f) ? vsplat(88.3762626647949f) : x;
  const vf magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = vsplat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * reinterpret_cast<vf>(bits);
}
inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }
inline vf vtanh(vf x) {
  const vi xb = reinterpret_cast<vi>(x);
  const vi sign = xb & (int32_t)0x80000000;
  const vf a = reinterpret_cast<vf>(xb & (int32_t)0x7fffffff);
  const vf e = vexp(-2.0f * a);
  const vf t = (1.0f - e) / (1.0f + e);
  return reinterpret_cast<vf>(reinterpret_cast<vi>(t) | sign);
}

// The same for double: exp by range reduction and a degree-12 Taylor polynomial (~1e-16 relative).
typedef double vd __attribute__((vector_size(kVecBytes)));
typedef double vd_u __attribute__((vector_size(kVecBytes), aligned(8), may_alias));
typedef int64_t vl __attribute__((vector_size(kVecBytes)));

inline vd vload(const double* p) { return *reinterpret_cast<const vd_u*>(p); }
inline void vstore(double* p, vd v) { *reinterpret_cast<vd_u*>(p) = v; }
inline vd vsplat(double a) { return vd{} + a; }

inline vd vexp(vd x) {
  x = x < vsplat(-708.0) ? vsplat(-708.0) : x;
  x = x > vsplat(709.0) ? vsplat(709.0) : x;
  const vd magic = vsplat(6755399441055744.0);  // 1.5 * 2^52
  const vd n = (x * 1.4426950408889634 + magic) - magic;
  const vd r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  vd p = vsplat(1.0 / 479001600.0);
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const vl bits = (__builtin_convertvector(n, vl) + 1023) << 52;
  return p * reinterpret_cast<vd>(bits);
}
inline vd vsigmoid(vd x) { return 1.0 / (1.0 + vexp(-x)); }
inline vd vtanh(vd x) {
  const vl xb = reinterpret_cast<vl>(x);
  const vl sign = xb & (int64_t)0x8000000000000000ULL;
  const vd a = reinterpret_cast<vd>(xb & (int64_t)0x7fffffffffffffffLL);
  const vd e = vexp(-2.0 * a);
  const vd t = (1.0 - e) / (1.0 + e);
  return reinterpret_cast<vd>(reinterpret_cast<vl>(t) | sign);
}

// A vector of the lanes [p, p + n) of a row, n <= lanes: a plain load for a whole vector, else a masked one
// (zeros past n), so that a row's last partial vector (H = 24, 40, 200, ...) runs the same vector math rather
// than a scalar loop of exp and tanh (which, at H = 24, took as long as the rest of the step).
template <bool Whole, typename scalar_t>
inline auto vload_n(const scalar_t* p, int64_t n) {
  if constexpr (Whole) {
    return vload(p);
  } else {
#ifdef __AVX512F__
    if constexpr (std::is_same_v<scalar_t, float>) {
      return reinterpret_cast<vf>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p));
    } else {
      return reinterpret_cast<vd>(_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p));
    }
#else
    scalar_t buf[kVecBytes / sizeof(scalar_t)] = {};
    for (int64_t k = 0; k < n; ++k) buf[k] = p[k];
    return vload(buf);
#endif
  }
}

template <bool Whole, typename scalar_t, typename V>
inline void vstore_n(scalar_t* p, V v, int64_t n) {
  if constexpr (Whole) {
    vstore(p, v);
  } else {
#ifdef __AVX512F__
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512>(v));
    } else {
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), reinterpret_cast<__m512d>(v));
    }
#else
    scalar_t buf[kVecBytes / sizeof(scalar_t)];
    vstore(buf, v);
    for (int64_t k = 0; k < n; ++k) p[k] = buf[k];
#endif
  }
}

// The cell for lanes [j, j + n) of one row (see cell_row).
template <bool Whole, typename scalar_t>
inline void cell_lanes(scalar_t* __restrict__ G, const scalar_t* __restrict__ bias, scalar_t* __restrict__ c,
                       scalar_t* __restrict__ h_out, int64_t S, int64_t j, int64_t n) {
  auto ld = [n](const scalar_t* p) { return vload_n<Whole>(p, n); };
  auto st = [n](scalar_t* p, auto v) { vstore_n<Whole>(p, v, n); };
  auto pi = ld(G + j), pf = ld(G + S + j), pg = ld(G + 2 * S + j), po = ld(G + 3 * S + j);
  if (bias != nullptr) {
    pi += ld(bias + j);
    pf += ld(bias + S + j);
    pg += ld(bias + 2 * S + j);
    po += ld(bias + 3 * S + j);
  }
  const auto i = vsigmoid(pi), f = vsigmoid(pf), g = vtanh(pg), o = vsigmoid(po);
  const auto cn = f * ld(c + j) + i * g;
  st(G + j, i);
  st(G + S + j, f);
  st(G + 2 * S + j, g);
  st(G + 3 * S + j, o);
  st(c + j, cn);
  st(h_out + j, o * vtanh(cn));
}

// One step of the cell for `count` hidden units of one row: G holds their pre-activations, gate q of unit j at
// G[q * S + j] (S = H for a whole row; a slice of a row keeps the row's stride), overwritten with activations;
// bias likewise; c the state (updated); h_out receives o * tanh(c).
template <typename scalar_t>
inline void cell_row(scalar_t* __restrict__ G, const scalar_t* __restrict__ bias, scalar_t* __restrict__ c,
                     scalar_t* __restrict__ c_hist, scalar_t* __restrict__ h_out, int64_t count, int64_t S) {
  constexpr int64_t lanes = Vec<scalar_t>::lanes;
  int64_t j = 0;
  for (; j + lanes <= count; j += lanes) cell_lanes<true>(G, bias, c, h_out, S, j, lanes);
  if (j < count) cell_lanes<false>(G, bias, c, h_out, S, j, count - j);
  if (c_hist != nullptr) std::memcpy(c_hist, c, count * sizeof(scalar_t));
}

// The cell's backward for lanes [j, j + n) of one row (see cell_row_backward).
template <bool Whole, typename scalar_t>
inline void cell_lanes_backward(const scalar_t* __restrict__ a, const scalar_t* __restrict__ cn,
                                const scalar_t* __restrict__ cprev, const scalar_t* __restrict__ dh,
                                scalar_t* __restrict__ dc, scalar_t* __restrict__ dg, scalar_t* __restrict__ hr,
                                int64_t S, int64_t j, int64_t n) {
  auto ld = [n](const scalar_t* p) { return vload_n<Whole>(p, n); };
  auto st = [n](scalar_t* p, auto v) { vstore_n<Whole>(p, v, n); };
  const scalar_t one = 1;
  const auto i = ld(a + j), f = ld(a + S + j), g = ld(a + 2 * S + j), o = ld(a + 3 * S + j);
  const auto tc = vtanh(ld(cn + j));
  const auto dhj = ld(dh + j);
  const auto dct = ld(dc + j) + dhj * o * (one - tc * tc);
  st(dg + j, dct * g * i * (one - i));
  st(dg + S + j, dct * ld(cprev + j) * f * (one - f));
  st(dg + 2 * S + j, dct * i * (one - g * g));
  st(dg + 3 * S + j, dhj * tc * o * (one - o));
  st(dc + j, dct * f);
  if (hr != nullptr) st(hr + j, o * tc);
}

// Backward of one row of the cell. a: activations [4H], cn: c after the step, cprev: c before it,
// dh: gradient reaching o*tanh(c), dc: gradient reaching c (in: from later steps; out: for cprev),
// dg: pre-activation gradients [4H]; hr (optional) receives o*tanh(c) for dw_hr. As for cell_row, `count`
// hidden units with gate stride S (S = H for a whole row).
template <typename scalar_t>
inline void cell_row_backward(const scalar_t* __restrict__ a, const scalar_t* __restrict__ cn,
                              const scalar_t* __restrict__ cprev, const scalar_t* __restrict__ dh,
                              scalar_t* __restrict__ dc, scalar_t* __restrict__ dg, scalar_t* __restrict__ hr,
                              int64_t count, int64_t S) {
  constexpr int64_t lanes = Vec<scalar_t>::lanes;
  int64_t j = 0;
  for (; j + lanes <= count; j += lanes) cell_lanes_backward<true>(a, cn, cprev, dh, dc, dg, hr, S, j, lanes);
  if (j < count) cell_lanes_backward<false>(a, cn, cprev, dh, dc, dg, hr, S, j, count - j);
}

// Split [0, n) rows over threads only when the work is worth a fork/join.
template <typename F>
inline void for_rows(int64_t n, int64_t work_per_row, F&& f) {
  const int64_t total = n * work_per_row;
  if (total >= 32768 && n > 1 && at::get_num_threads() > 1) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) f(r);
    });
  } else {
    for (int64_t r = 0; r < n; ++r) f(r);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks shared by forward and backward.

struct Dims {
  int64_t T, B, I, H, P;
};

Dims check_args(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                const c10::optional<Tensor>& b, const c10::optional<Tensor>& w_hr,
                const c10::optional<Tensor>& batch_sizes) {
  TORCH_CHECK(x.dim() == 3, "fastlstm cpp: x must be [T, B, I], got ", x.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2, "fastlstm cpp: weights must be 2-d");
  TORCH_CHECK(w_ih.size(0) % 4 == 0, "fastlstm cpp: w_ih must be [4H, I], got ", w_ih.sizes());
  Dims d{x.size(0), x.size(1), x.size(2), w_ih.size(0) / 4, w_hh.size(1)};
  TORCH_CHECK(w_ih.size(1) == d.I, "fastlstm cpp: w_ih is ", w_ih.sizes(), " but x has I=", d.I);
  TORCH_CHECK(w_hh.size(0) == 4 * d.H, "fastlstm cpp: w_hh must be [4H, P], got ", w_hh.sizes());
  const bool proj = w_hr.has_value() && w_hr->defined();
  if (proj) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) == d.P && w_hr->size(1) == d.H,
                "fastlstm cpp: w_hr must be [P, H] = [", d.P, ", ", d.H, "], got ", w_hr->sizes());
  } else {
    TORCH_CHECK(d.P == d.H, "fastlstm cpp: without w_hr, w_hh must be [4H, H], got ", w_hh.sizes());
  }
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == d.B && h0.size(1) == d.P, "fastlstm cpp: h0 must be [B, P] = [", d.B,
              ", ", d.P, "], got ", h0.sizes());
  TORCH_CHECK(c0.dim() == 2 && c0.size(0) == d.B && c0.size(1) == d.H, "fastlstm cpp: c0 must be [B, H] = [", d.B,
              ", ", d.H, "], got ", c0.sizes());
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == 4 * d.H, "fastlstm cpp: b must be [4H], got ", b->sizes());
  }
  for (const Tensor* t : {&x, &h0, &c0, &w_ih, &w_hh}) {
    TORCH_CHECK(t->device().is_cpu(), "fastlstm cpp: tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "fastlstm cpp: all tensors must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "fastlstm cpp: dtype must be float32, float64, bfloat16 or float16, got ", dt);
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1 && bs.size(0) == d.T,
                "fastlstm cpp: batch_sizes must be an int64 CPU tensor [T]");
  }
  return d;
}

// Live rows per step (validated), or B everywhere.
std::vector<int64_t> live_rows(const c10::optional<Tensor>& batch_sizes, int64_t T, int64_t B) {
  std::vector<int64_t> live(T, B);
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    Tensor bs = batch_sizes->contiguous();
    const int64_t* p = bs.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(p[t] >= 0 && p[t] <= B && (t == 0 || p[t] <= p[t - 1]),
                  "fastlstm cpp: batch_sizes must be non-increasing and within [0, B]");
      live[t] = p[t];
    }
    TORCH_CHECK(T == 0 || live[0] == B, "fastlstm cpp: batch_sizes[0] must equal the batch size ", B);
  }
  return live;
}

bool is_packed(const c10::optional<Tensor>& batch_sizes) {
  return batch_sizes.has_value() && batch_sizes->defined();
}

// bfloat16 (without bf16 dot products) and float16 compute in float32 end to end, rounded at the boundary.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf ? at::kFloat : t; }

Tensor as_compute(const Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }
c10::optional<Tensor> as_compute(const c10::optional<Tensor>& t, at::ScalarType ct) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return t->to(ct).contiguous();
}


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

// Batch size from which the input projection runs per step, beside the recurrent product, instead of as one
// GEMM for all steps up front: the gates then go from the register-blocked kernel (~95% of the FMA peak in
// isolation at 8+ rows) straight into the cell while in cache, where the up-front GEMM wrote [T, B, 4H] to
// memory and each step read its slice back. Below 8 rows the kernel is bound by loading the weight, and one
// big GEMM wins. FASTLSTM_FUSE_MIN_ROWS overrides; a huge value disables.
inline int64_t fuse_min_rows() {
  static const int64_t v =
      std::getenv("FASTLSTM_FUSE_MIN_ROWS") ? std::atoll(std::getenv("FASTLSTM_FUSE_MIN_ROWS")) : 8;
  return v;
}

// Per-step multiply-adds up to which the team loop runs (above, the per-step path splits the product more
// evenly: it balances 4H/W panels instead of H/W). FASTLSTM_TEAM_MAX_MACS overrides; 0 disables.
inline int64_t team_max_macs() {
  static const int64_t v =
      std::getenv("FASTLSTM_TEAM_MAX_MACS") ? std::atoll(std::getenv("FASTLSTM_TEAM_MAX_MACS")) : int64_t(1) << 20;
  return v;
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
  if (proj || at::in_parallel_region() || B * 4 * H * P > team_max_macs()) return 1;
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

// The rows the kernel reads as h (and x): Dot's element type, row stride `ld` (the width rounded up to whole
// pairs, the pad zero). FmaDot: the same numbers. Bf16Dot: h rounded to bfloat16 every step, as native bf16
// keeps it (c stays float).
template <typename Dot>
inline int64_t row_stride(int64_t width) {
  return (width + Dot::pair - 1) / Dot::pair * Dot::pair;
}

template <typename Dot>
void rows_from_kernel(const typename Dot::elem_t* src, int64_t lds, typename Dot::acc_t* dst, int64_t ldd,
                      int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) dst[r * ldd + j] = Dot::to(src[r * lds + j]);
}

// n values into the kernel's element type; with `rounded`, also the values dst now holds, back in acc_t.
template <typename Dot>
inline void to_kernel(const typename Dot::acc_t* src, typename Dot::elem_t* dst, int64_t n,
                      typename Dot::acc_t* rounded) {
  if constexpr (std::is_same_v<typename Dot::elem_t, typename Dot::acc_t>) {
    if (dst != src) std::memcpy(dst, src, n * sizeof(*src));
    if (rounded != nullptr && rounded != src) std::memcpy(rounded, src, n * sizeof(*src));
  } else {
#if defined(__AVX512BF16__)
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m256i b = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + j)));
      _mm256_mask_storeu_epi16(dst + j, m, b);
      if (rounded != nullptr)
        _mm512_mask_storeu_ps(rounded + j, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
    }
#else
    for (int64_t j = 0; j < n; ++j) {
      dst[j] = Dot::from(src[j]);
      if (rounded != nullptr) rounded[j] = Dot::to(dst[j]);
    }
#endif
  }
}

// Rows [rows, cols] of src into the kernel's rows (ldd apart, zero past cols): the same conversion as every
// step's h (to_kernel).
template <typename Dot>
void rows_to_kernel(const typename Dot::acc_t* src, int64_t lds, typename Dot::elem_t* dst, int64_t ldd, int64_t rows,
                    int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    to_kernel<Dot>(src + r * lds, dst + r * ldd, cols, nullptr);
    std::fill(dst + r * ldd + cols, dst + (r + 1) * ldd, Dot::from(0.0f));
  }
}

// A step's new h (n values of one row, y) becomes the next step's kernel input h. Where the kernel reads another
// type (bfloat16), y is rounded in place as well, so that the output, the state and what backward reads are all
// exactly the values the next step multiplied.
template <typename Dot>
inline void publish(typename Dot::acc_t* y, typename Dot::elem_t* h, int64_t n) {
  to_kernel<Dot>(y, h, n, y);
}

// The forward time loop without projection (P == H) on `threads` threads. h: h0 in, hT out; c likewise.
// With w_ih given, the input projection runs here too, per step and per slice (x: [T, B, ldx], the kernel's
// rows); else G holds it. Step t's gates are G + t * g_step (g_step 0: one step's buffer, reused). Weights as
// the kernel reads them: rows of w_hh H and of w_ih ldx elements long.
template <typename scalar_t, typename Dot>
void forward_team(int threads, const Dims& d, const std::vector<int64_t>& live, bool reverse, scalar_t* G,
                  int64_t g_step, const scalar_t* bias, const typename Dot::unit_t* w_hh, scalar_t* h, scalar_t* c,
                  scalar_t* y, scalar_t* c_hist, const typename Dot::unit_t* w_ih, const typename Dot::elem_t* x,
                  int64_t ldx) {
  using elem_t = typename Dot::elem_t;
  const int64_t T = d.T, B = d.B, H = d.H, G4 = 4 * H, ldh = row_stride<Dot>(H);
  const int64_t kh = ldh / Dot::pair, ki = ldx / Dot::pair;  // units in a row of w_hh, w_ih
  constexpr int64_t W = Packed<Dot>::W;
  std::vector<elem_t> hbuf(2 * B * ldh, Dot::from(0.0f));
  rows_to_kernel<Dot>(h, H, hbuf.data(), ldh, B, H);
  // The recurrent product as dot products over w_hh as stored (not with the input projection fused in).
  const bool dot = w_ih == nullptr && dot_pays<Dot>(B, T, kh);
  SpinBarrier barrier;
#pragma omp parallel num_threads(threads)
  {
    // Each thread packs its own slice, which so starts out in its own cache.
    const auto [j0, j1, width] = join_team<scalar_t>(barrier, H);
    Packed<Dot> Wq[4], Wi[4];  // gate q, this slice: B[k, n] = w_hh[q * H + j0 + n, k]; w_ih likewise
    if (width > 0) {
      if (!dot)
        for (int q = 0; q < 4; ++q) Wq[q].pack(w_hh + (q * H + j0) * kh, kh, width, 1, kh, /*parallel=*/false);
      if (w_ih != nullptr)
        for (int q = 0; q < 4; ++q) Wi[q].pack(w_ih + (q * H + j0) * ki, ki, width, 1, ki, /*parallel=*/false);
    }
    int gen = 0;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t n = live[t];
      const elem_t* hin = hbuf.data() + (s & 1) * B * ldh;
      elem_t* hout = hbuf.data() + ((s + 1) & 1) * B * ldh;
      scalar_t* Gt = G + t * g_step;
      scalar_t* yt = y + t * B * H;
      if (width > 0) {
        if (dot) {  // rows q * H + [j0, j1) of w_hh, as stored
          for (int64_t r = 0; r < n; ++r)
            for (int q = 0; q < 4; ++q)
              dot_rows<Dot>(hin + r * ldh, w_hh + (q * H + j0) * kh, kh, kh, Gt + r * G4 + q * H + j0, width,
                            /*accumulate=*/true);
        } else {
          for (int q = 0; q < 4; ++q)
            for (int64_t p = 0; p < Wq[q].panels; ++p) {
              scalar_t* out = Gt + q * H + j0 + p * W;
              const int64_t valid = std::min(W, width - p * W);
              if (w_ih != nullptr)
                panel_rows<Dot>(x + t * B * ldx, ldx, Wi[q].panel(p), Wi[q].steps, out, G4, n, valid,
                                /*accumulate=*/false);
              panel_rows<Dot>(hin, ldh, Wq[q].panel(p), Wq[q].steps, out, G4, n, valid, /*accumulate=*/true);
            }
        }
        for (int64_t r = 0; r < n; ++r) {
          cell_row<scalar_t>(Gt + r * G4 + j0, bias != nullptr ? bias + j0 : nullptr, c + r * H + j0,
                             c_hist != nullptr ? c_hist + (t * B + r) * H + j0 : nullptr, yt + r * H + j0, width, H);
          publish<Dot>(yt + r * H + j0, hout + r * ldh + j0, width);
        }
        for (int64_t r = n; r < B; ++r)  // rows not live this step keep their state
          std::memcpy(hout + r * ldh + j0, hin + r * ldh + j0, width * sizeof(elem_t));
      }
      barrier.wait(gen);
    }
  }
  rows_from_kernel<Dot>(hbuf.data() + (T & 1) * B * ldh, ldh, h, H, B, H);
}

// Whether bfloat16 runs on the bf16 dot-product kernel (see Bf16Dot): on CPUs that have it, unless
// FASTLSTM_BF16_DOT=0 asks for float32 math throughout (for measurements and tests).
inline bool use_bf16_dot() {
  static const char* env = std::getenv("FASTLSTM_BF16_DOT");
  static const bool v = kHasBf16Dot && !(env != nullptr && std::atoll(env) == 0);
  return v;
}

// Whether a layer of dtype dt runs on the bf16 dot-product kernel: forward and backward must agree.
inline bool runs_bf16_dot(at::ScalarType dt) { return dt == at::kBFloat16 && use_bf16_dot(); }

// Which kernel serves which product on this CPU, with the knobs applied (for `python -m fastlstm info` and the
// tests that force each path).
std::string kernel_choices() {
  const auto from = [](int64_t v, const char* unit) {
    return v >= (int64_t(1) << 40) ? std::string("never") : "from " + std::to_string(v) + " " + unit;
  };
  const bool mkl =
      cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
  const int64_t dgemm_rows = dgemm_ != nullptr ? dgemm_min_rows() : std::numeric_limits<int64_t>::max();
  return "vectors of " + std::to_string(kVecBytes) + " bytes, row blocks of " + std::to_string(kRowBlock) +
         "; float32 step: MKL packed GEMM " + from(mkl ? mkl_min_rows() : std::numeric_limits<int64_t>::max(), "rows") +
         ", else register-blocked; float64 step: dgemm " + from(dgemm_rows, "rows") +
         ", else register-blocked; float32 x@W^T and dx: oneDNN matmul " +
         from(onednn_linear_op().has_value() ? onednn_min_macs() : std::numeric_limits<int64_t>::max(),
              "multiply-adds") +
         ", else BLAS; float32 weight gradients: " +
         (onednn_weight_grads() && onednn_linear_op().has_value()
              ? "oneDNN matmul " + from(std::max(onednn_min_macs(), weight_grad_min_macs()), "multiply-adds") +
                    ", else BLAS"
              : std::string("BLAS")) +
         "; bfloat16 forward: " +
         (use_bf16_dot() ? "bf16 dot products (AVX512-BF16), h rounded to bf16 each step"
                         : "float32 math, rounded at the end") +
         "; time loop: one team of threads " +
         (team_max_macs() <= 0 ? std::string("never")
                               : "up to " + std::to_string(team_max_macs()) + " multiply-adds a step, " +
                                     std::to_string(team_min_hidden<float>(false)) +
                                     "+ hidden units a thread (float32 backward " +
                                     std::to_string(team_min_hidden<float>(true)) + "+, float64 " +
                                     std::to_string(team_min_hidden<double>(false)) + "+)") +
         " (no projection), else per-step parallel; input projection: per step " + from(fuse_min_rows(), "rows") +
         " (register-blocked steps), else one GEMM up front; recurrent product (forward): " +
         (dot_rows_override() > 0   ? "dot products over w_hh as stored up to " + std::to_string(dot_rows_override()) +
                                          " rows"
          : dot_rows_override() == 0 ? std::string("packed weight always")
                                     : std::string("dot products over w_hh as stored at batch 1 with rows of 16+ "
                                                   "vectors (8+ up to 16 steps), else packed weight"));
}

// ---------------------------------------------------------------------------------------------------------
// Forward.

// x, w_ih, w_hh as the kernel reads them (for Bf16Dot bfloat16, their last dimension rounded up to even, the pad
// zero); everything else scalar_t.
template <typename scalar_t, typename Dot>
void forward_impl(const Dims& d, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                  const c10::optional<Tensor>& b, const c10::optional<Tensor>& w_hr, const std::vector<int64_t>& live,
                  bool reverse, Tensor& gates, Tensor& y, Tensor& h, Tensor& c, scalar_t* c_hist) {
  using elem_t = typename Dot::elem_t;
  // Bf16Dot multiplies in the register-blocked kernel only (no BLAS or oneDNN call takes bf16 in, float out).
  constexpr bool own_rows = !std::is_same_v<elem_t, scalar_t>;
  using unit_t = typename Dot::unit_t;
  const int64_t T = d.T, B = d.B, I = d.I, H = d.H, P = d.P, G4 = 4 * H, ldx = x.size(2);
  const unit_t* wih_u = reinterpret_cast<const unit_t*>(w_ih.data_ptr());
  const unit_t* whh_u = reinterpret_cast<const unit_t*>(w_hh.data_ptr());
  const int64_t ki = w_ih.size(1) / Dot::pair, kh = w_hh.size(1) / Dot::pair;  // units a row
  // The recurrent weights laid out [K, N] for step_gemm: w_hh^T [P, 4H], w_hr^T [H, P].
  Packed<Dot> WhhT, WihT;
  Packed<FmaDot<scalar_t>> WhrT;
  MklPacked mkl_whh;
  if constexpr (std::is_same_v<scalar_t, float> && !own_rows) mkl_whh.pack(w_hh.data_ptr<float>(), P, true, B, G4, P);
  const bool blocked_step = !mkl_whh.ok && !use_blas_rows<scalar_t>(B);
  // The input projection: one GEMM for all steps up front (straight into the gate buffer; the bias is added in
  // the cell), or, from fuse_min_rows() rows on, per step beside the recurrent product (see fuse_min_rows).
  const bool fuse_input = blocked_step && B >= fuse_min_rows() && I > 0;
  // Inference (gates undefined) keeps gates in reused per-thread scratch memory; with the projection fused it
  // keeps a single step's [B, 4H], which every step overwrites while it is in cache, instead of streaming T
  // steps of gates through memory.
  const bool one_step = !gates.defined() && fuse_input;
  if (!gates.defined()) {
    const int64_t rows = one_step ? B : T * B;
    gates = at::from_blob(gates_scratch().get(std::max<int64_t>(1, rows * G4) * sizeof(scalar_t)),
                          {one_step ? 1 : T, B, G4}, y.options());
  }
  const int64_t g_step = one_step ? 0 : B * G4;
  const elem_t* xp = reinterpret_cast<const elem_t*>(x.data_ptr());
  if (!fuse_input) {
    if constexpr (own_rows) {
      WihT.pack(wih_u, ki, G4, 1, ki);  // B[k, n] = w_ih[n, k]
      step_gemm<Dot>(xp, ldx, WihT, gates.data_ptr<scalar_t>(), G4, T * B, /*accumulate=*/false);
    } else {
      Tensor G2 = gates.view({T * B, G4});
      linear_nt<scalar_t>(x.view({T * B, I}), w_ih, G2);
      gates = G2.view({T, B, G4});
    }
  }
  scalar_t* G = gates.data_ptr<scalar_t>();
  const scalar_t* bp = b.has_value() ? b->data_ptr<scalar_t>() : nullptr;
  const bool proj = w_hr.has_value();
  scalar_t* hp = h.data_ptr<scalar_t>();
  scalar_t* cp = c.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int threads = team_threads<scalar_t>(B, H, P, proj, /*backward=*/false);
  if (blocked_step && threads > 1) {
    forward_team<scalar_t, Dot>(threads, d, live, reverse, G, g_step, bp, whh_u, hp, cp, yp, c_hist,
                                fuse_input ? wih_u : nullptr, xp, ldx);
    return;
  }
  // At batch 1, w_hh as stored (see dot_pays); the input projection is never fused below 8 rows.
  const bool dot = blocked_step && !fuse_input && dot_pays<Dot>(B, T, kh);
  if (proj) WhrT.pack(w_hr->data_ptr<scalar_t>(), H, P, 1, H);  // B[k, n] = w_hr[n, k]
  if (fuse_input) WihT.pack(wih_u, ki, G4, 1, ki);  // B[k, n] = w_ih[n, k]
  std::vector<scalar_t> h_raw(proj ? B * H : 0);
  // The h the kernel reads: hp itself, or its rows in the kernel's type (converted back into hp at the end).
  const int64_t ldh = row_stride<Dot>(P);
  std::vector<elem_t> h_rows(own_rows ? B * ldh : 0);
  elem_t* hk = nullptr;
  if constexpr (own_rows) {
    hk = h_rows.data();
    rows_to_kernel<Dot>(hp, P, hk, ldh, B, P);
  } else {
    hk = hp;
  }
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t n = live[t];
    if (n == 0) continue;
    scalar_t* Gt = G + t * g_step;
    if (dot) {
      step_dot<Dot>(hk, ldh, whh_u, kh, Gt, G4, n, G4);
    } else if (blocked_step) {
      if (WhhT.data.empty()) WhhT.pack(whh_u, kh, G4, 1, kh);  // B[k, n] = w_hh[n, k]
      // fuse_input: the gates are x_t @ w_ih^T + h @ w_hh^T, both here; else the first term is already in G
      const StepOperand<Dot> input{xp + t * B * ldx, ldx, &WihT};
      step_gemm<Dot>(hk, ldh, WhhT, Gt, G4, n, /*accumulate=*/true, fuse_input ? &input : nullptr);
    } else if constexpr (!own_rows) {
      if (mkl_whh.ok) {
        // All B rows even when fewer are live: rows past n of this step's gate buffer are never read, and the
        // packed weight is valid for exactly B rows.
        if constexpr (std::is_same_v<scalar_t, float>) mkl_whh.run(hp, P, Gt, G4, /*accumulate=*/true);
      } else {
        gemm(false, true, n, G4, P, scalar_t(1), hp, P, w_hh.data_ptr<scalar_t>(), P, scalar_t(1), Gt, G4);
      }
    }
    scalar_t* yt = yp + t * B * P;
    scalar_t* ch = c_hist != nullptr ? c_hist + t * B * H : nullptr;
    scalar_t* cell_out = proj ? h_raw.data() : yt;
    for_rows(n, 16 * H, [&](int64_t r) {
      cell_row<scalar_t>(Gt + r * G4, bp, cp + r * H, ch != nullptr ? ch + r * H : nullptr, cell_out + r * H, H, H);
    });
    if (proj) step_gemm<FmaDot<scalar_t>>(h_raw.data(), H, WhrT, yt, P, n, /*accumulate=*/false);
    if constexpr (own_rows) {
      for (int64_t r = 0; r < n; ++r) publish<Dot>(yt + r * P, hk + r * ldh, P);
    } else {
      std::memcpy(hp, yt, n * P * sizeof(scalar_t));
    }
  }
  if constexpr (own_rows) rows_from_kernel<Dot>(hk, ldh, hp, P, B, P);
}

// A bfloat16 tensor as Bf16Dot reads it: contiguous, the last dimension rounded up to even with a zero.
Tensor bf16_pairs(const Tensor& t) {
  return t.size(-1) % 2 == 0 ? t.contiguous() : at::constant_pad_nd(t, {0, 1}).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd(const Tensor& x_in, const Tensor& h0_in,
                                                           const Tensor& c0_in, const Tensor& w_ih_in,
                                                           const Tensor& w_hh_in, const c10::optional<Tensor>& b_in,
                                                           const c10::optional<Tensor>& w_hr_in,
                                                           const c10::optional<Tensor>& batch_sizes, bool reverse,
                                                           bool save) {
  const Dims d = check_args(x_in, h0_in, c0_in, w_ih_in, w_hh_in, b_in, w_hr_in, batch_sizes);
  const auto live = live_rows(batch_sizes, d.T, d.B);
  const bool packed = is_packed(batch_sizes);
  const at::ScalarType dt = x_in.scalar_type(), ct = compute_type(dt);
  const bool bf16_dot = runs_bf16_dot(dt);
  const auto opts = x_in.options().dtype(ct);
  auto b = as_compute(b_in, ct);
  auto w_hr = as_compute(w_hr_in, ct);
  Tensor h = h0_in.to(ct, /*non_blocking=*/false, /*copy=*/true).contiguous();
  Tensor c = c0_in.to(ct, false, true).contiguous();
  // Training keeps every step's gates for backward; inference leaves them to forward_impl (undefined here).
  Tensor gates = save ? at::empty({d.T, d.B, 4 * d.H}, opts) : Tensor();
  Tensor y = packed ? at::zeros({d.T, d.B, d.P}, opts) : at::empty({d.T, d.B, d.P}, opts);
  Tensor c_hist = save ? (packed ? at::zeros({d.T, d.B, d.H}, opts) : at::empty({d.T, d.B, d.H}, opts))
                       : at::empty({0}, opts);
  if (d.T > 0 && d.B > 0) {
    if (bf16_dot) {
      forward_impl<float, Bf16Dot>(d, bf16_pairs(x_in), bf16_pairs(w_ih_in), bf16_pairs(w_hh_in), b, w_hr, live,
                                   reverse, gates, y, h, c, save ? c_hist.data_ptr<float>() : nullptr);
    } else {
      const Tensor x = as_compute(x_in, ct), w_ih = as_compute(w_ih_in, ct), w_hh = as_compute(w_hh_in, ct);
      AT_DISPATCH_FLOATING_TYPES(ct, "fastlstm_cpp_lstm_fwd", [&] {
        forward_impl<scalar_t, FmaDot<scalar_t>>(d, x, w_ih, w_hh, b, w_hr, live, reverse, gates, y, h, c,
                                                 save ? c_hist.data_ptr<scalar_t>() : nullptr);
      });
    }
  }
  if (!save) gates = at::empty({0}, opts);
  if (dt != ct) {
    y = y.to(dt);
    h = h.to(dt);
    c = c.to(dt);
  }
  return {y, h, c, gates, c_hist};
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

// Is step t the first step a row r takes (its previous state is h0/c0)?
inline bool first_step(const std::vector<int64_t>& live, int64_t T, int64_t t, int64_t r, bool reverse) {
  if (!reverse) return t == 0;
  return t == T - 1 || r >= live[t + 1];
}

// The backward time loop without projection (P == H) on `threads` threads (see forward_team). Each step, each
// thread turns its hidden slice's incoming gradient into dgates (all four gates of the slice); after the one
// barrier it computes its slice of dh for the previous step from all of dgates. The next step's cell needs only
// the thread's own slice of dh, and writes another step's dgates, so one barrier a step suffices.
// dh, dc: grad_hT, grad_cT in; dh0, dc0 out. w_hh as the kernel's units, B[k, n] = w[k * sk + n * sn] with k over
// 4H / Dot::pair units; dgk: dgates as the kernel reads them (dgates itself for FmaDot).
template <typename scalar_t, typename Dot>
void backward_team(int threads, const Dims& d, const std::vector<int64_t>& live, bool reverse, const scalar_t* gy,
                   const scalar_t* gates, const scalar_t* c_hist, const scalar_t* c0, const typename Dot::unit_t* w_hh,
                   int64_t sk, int64_t sn, scalar_t* dgates, typename Dot::elem_t* dgk, scalar_t* dh, scalar_t* dc) {
  const int64_t T = d.T, B = d.B, H = d.H, G4 = 4 * H;
  constexpr int64_t W = Packed<Dot>::W;
  std::vector<scalar_t> dht(B * H);  // the total gradient reaching this step's h
  SpinBarrier barrier;
#pragma omp parallel num_threads(threads)
  {
    const auto [j0, j1, width] = join_team<scalar_t>(barrier, H);
    Packed<Dot> Wd;  // this slice of w_hh: B[k, n] = w_hh[k, j0 + n], k over 4H
    if (width > 0) Wd.pack(w_hh + j0 * sn, G4 / Dot::pair, width, sk, sn, /*parallel=*/false);
    int gen = 0;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? s : T - 1 - s;  // the forward's steps, last first
      const int64_t n = live[t];
      const int64_t prev_t = reverse ? t + 1 : t - 1;
      if (width > 0) {
        for (int64_t r = 0; r < n; ++r) {
          scalar_t* dhr = dht.data() + r * H;
          const scalar_t* gyr = gy + (t * B + r) * H;
          for (int64_t j = j0; j < j1; ++j) dhr[j] = dh[r * H + j] + gyr[j];
          const scalar_t* cprev = first_step(live, T, t, r, reverse) ? c0 + r * H : c_hist + (prev_t * B + r) * H;
          scalar_t* dg = dgates + (t * B + r) * G4 + j0;
          cell_row_backward<scalar_t>(gates + (t * B + r) * G4 + j0, c_hist + (t * B + r) * H + j0, cprev + j0,
                                      dhr + j0, dc + r * H + j0, dg, nullptr, width, H);
          if constexpr (!std::is_same_v<typename Dot::elem_t, scalar_t>)
            for (int q = 0; q < 4; ++q) to_kernel<Dot>(dg + q * H, dgk + (t * B + r) * G4 + j0 + q * H, width, nullptr);
        }
      }
      barrier.wait(gen);
      if (width > 0)
        for (int64_t p = 0; p < Wd.panels; ++p)
          panel_rows<Dot>(dgk + t * B * G4, G4, Wd.panel(p), Wd.steps, dh + j0 + p * W, H, n,
                          std::min(W, width - p * W), /*accumulate=*/false);
    }
  }
}

// h_prev of every (t, r) as backward's dw_hh product reads it: y of the previous step, or h0 at a row's first
// step; zero where a row is not live.
template <typename elem_t>
Tensor previous_h(const Tensor& y, const Tensor& h0, const std::vector<int64_t>& live, bool reverse) {
  const int64_t T = y.size(0), B = y.size(1), P = y.size(2);
  Tensor h_prev = at::empty({T, B, P}, y.options());
  const elem_t* yp = reinterpret_cast<const elem_t*>(y.data_ptr());
  const elem_t* h0p = reinterpret_cast<const elem_t*>(h0.data_ptr());
  elem_t* hpp = reinterpret_cast<elem_t*>(h_prev.data_ptr());
  at::parallel_for(0, T, 16, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n = live[t];
      const int64_t prev_t = reverse ? t + 1 : t - 1;
      for (int64_t r = 0; r < B; ++r) {
        elem_t* dst = hpp + (t * B + r) * P;
        if (r >= n) {
          std::memset(dst, 0, P * sizeof(elem_t));
        } else if (first_step(live, T, t, r, reverse)) {
          std::memcpy(dst, h0p + r * P, P * sizeof(elem_t));
        } else {
          std::memcpy(dst, yp + (prev_t * B + r) * P, P * sizeof(elem_t));
        }
      }
    }
  });
  return h_prev;
}

// FmaDot: every tensor in scalar_t. Bf16Dot (scalar_t float): x, h0, w_ih and y are bfloat16, w_hh_k is w_hh^T
// [P, 4H] in bfloat16 (so that pairs of k are adjacent), and the recurrent product and the large weight and
// input gradient products take dgates rounded to bfloat16, as native bf16 does; the cell, c, dh and db stay float.
template <typename scalar_t, typename Dot>
void backward_impl(const Dims& d, const Tensor& grad_y, const Tensor& x, const Tensor& h0, const Tensor& c0,
                   const Tensor& w_ih, const Tensor& w_hh_k, const c10::optional<Tensor>& w_hr,
                   const std::vector<int64_t>& live, const Tensor& y, const Tensor& gates, const Tensor& c_hist,
                   bool reverse, bool packed, Tensor& dx, Tensor& dh, Tensor& dc, Tensor& dw_ih, Tensor& dw_hh,
                   Tensor& db, Tensor& dw_hr) {
  using elem_t = typename Dot::elem_t;
  using unit_t = typename Dot::unit_t;
  constexpr bool own_rows = !std::is_same_v<elem_t, scalar_t>;
  const int64_t T = d.T, B = d.B, I = d.I, H = d.H, P = d.P, G4 = 4 * H;
  const bool proj = w_hr.has_value();
  const auto opts = grad_y.options();
  Tensor dgates = packed ? at::zeros({T, B, G4}, opts) : at::empty({T, B, G4}, opts);
  Tensor dgates_k = dgates;  // what the products read
  if constexpr (own_rows) dgates_k = packed ? at::zeros({T, B, G4}, x.options()) : at::empty({T, B, G4}, x.options());
  // With projection: the total gradient reaching each output h [T,B,P] and the unprojected h [T,B,H].
  Tensor dh_all, hraw_all;
  if (proj) {
    dh_all = packed ? at::zeros({T, B, P}, opts) : at::empty({T, B, P}, opts);
    hraw_all = packed ? at::zeros({T, B, H}, opts) : at::empty({T, B, H}, opts);
  }
  std::vector<scalar_t> dh_tot(B * P), dh_raw(proj ? B * H : 0);
  scalar_t* dgp = dgates.data_ptr<scalar_t>();
  elem_t* dgk = reinterpret_cast<elem_t*>(dgates_k.data_ptr());
  const scalar_t* gy = grad_y.data_ptr<scalar_t>();
  const scalar_t* gp = gates.data_ptr<scalar_t>();
  const scalar_t* chp = c_hist.data_ptr<scalar_t>();
  const scalar_t* c0p = c0.data_ptr<scalar_t>();
  // dh = dgates @ w_hh: B[k, n] = w_hh[k, n], k over 4H, in the kernel's units.
  const unit_t* whh_u = reinterpret_cast<const unit_t*>(w_hh_k.data_ptr());
  const int64_t sk = own_rows ? 1 : P, sn = own_rows ? G4 / Dot::pair : 1;
  Packed<Dot> Whh;
  Packed<FmaDot<scalar_t>> Whr;
  MklPacked mkl_whh;
  if constexpr (std::is_same_v<scalar_t, float> && !own_rows)
    mkl_whh.pack(w_hh_k.data_ptr<float>(), P, false, B, P, G4);
  const bool blocked_step = !mkl_whh.ok && !use_blas_rows<scalar_t>(B);
  std::vector<scalar_t> dh_scratch(mkl_whh.ok && packed ? B * P : 0);
  if (proj) Whr.pack(w_hr->data_ptr<scalar_t>(), P, H, H, 1);  // B = w_hr [P, H]
  scalar_t* dhp = dh.data_ptr<scalar_t>();
  scalar_t* dcp = dc.data_ptr<scalar_t>();
  const int threads = team_threads<scalar_t>(B, H, P, proj, /*backward=*/true);
  if (blocked_step && threads > 1) {
    backward_team<scalar_t, Dot>(threads, d, live, reverse, gy, gp, chp, c0p, whh_u, sk, sn, dgp, dgk, dhp, dcp);
  } else {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? s : T - 1 - s;  // the forward's steps, last first
      const int64_t n = live[t];
      if (n == 0) continue;
      const int64_t prev_t = reverse ? t + 1 : t - 1;
      // Total gradient reaching this step's output h.
      scalar_t* dht = proj ? dh_all.data_ptr<scalar_t>() + t * B * P : dh_tot.data();
      const scalar_t* gyt = gy + t * B * P;
      for (int64_t k = 0; k < n * P; ++k) dht[k] = dhp[k] + gyt[k];
      const scalar_t* dhu = dht;  // gradient w.r.t. the unprojected o * tanh(c)
      if (proj) {
        step_gemm<FmaDot<scalar_t>>(dht, P, Whr, dh_raw.data(), H, n, /*accumulate=*/false);
        dhu = dh_raw.data();
      }
      scalar_t* hraw_t = proj ? hraw_all.data_ptr<scalar_t>() + t * B * H : nullptr;
      for_rows(n, 16 * H, [&](int64_t r) {
        const scalar_t* cprev = first_step(live, T, t, r, reverse) ? c0p + r * H : chp + (prev_t * B + r) * H;
        cell_row_backward<scalar_t>(gp + (t * B + r) * G4, chp + (t * B + r) * H, cprev, dhu + r * H, dcp + r * H,
                                    dgp + (t * B + r) * G4, hraw_t != nullptr ? hraw_t + r * H : nullptr, H, H);
      });
      // dh for the previous step: dgates @ w_hh  ([n, 4H] @ [4H, P]).
      if (blocked_step) {
        if constexpr (own_rows) to_kernel<Dot>(dgp + t * B * G4, dgk + t * B * G4, n * G4, nullptr);
        if (Whh.data.empty()) Whh.pack(whh_u, G4 / Dot::pair, P, sk, sn);
        step_gemm<Dot>(dgk + t * B * G4, G4, Whh, dhp, P, n, /*accumulate=*/false);
      } else if constexpr (!own_rows) {
        if (mkl_whh.ok) {
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (n == B) {
              mkl_whh.run(dgp + t * B * G4, G4, dhp, P, false);
            } else {  // rows past n must keep their gradient: compute all B rows aside (dgates there are 0)
              mkl_whh.run(dgp + t * B * G4, G4, dh_scratch.data(), P, false);
              std::memcpy(dhp, dh_scratch.data(), n * P * sizeof(float));
            }
          }
        } else {
          gemm(false, false, n, P, G4, scalar_t(1), dgp + t * B * G4, G4, w_hh_k.data_ptr<scalar_t>(), P, scalar_t(0),
               dhp, P);
        }
      }
    }
  }
  // Weight and input gradients: large GEMMs over all T*B rows.
  const int64_t TB = T * B;
  Tensor dg2 = dgates.view({TB, G4});
  at::sum_out(db, dg2, {0});
  if (proj) weight_grad<scalar_t>(dh_all.view({TB, P}), hraw_all.view({TB, H}), dw_hr);
  if constexpr (own_rows) {
    // bf16 in, bf16 out (float accumulation inside): the results' dtype, rounded once.
    Tensor dgk2 = dgates_k.view({TB, G4});
    dx = at::mm(dgk2, w_ih).view({T, B, I});
    dw_ih = at::mm(dgk2.t(), x.view({TB, I}));
    dw_hh = at::mm(dgk2.t(), previous_h<elem_t>(y, h0, live, reverse).view({TB, P}));
    return;
  }
  Tensor dx2 = dx.view({TB, I});
  linear_nt<scalar_t>(dg2, w_ih.t(), dx2);
  dx = dx2.view({T, B, I});
  weight_grad<scalar_t>(dg2, x.view({TB, I}), dw_ih);
  if (!(reverse && packed)) {
    // Every row's first step is the same step (0, or T-1 in reverse), where h_prev is h0; elsewhere it is y of
    // the previous step (rows not live at a step have zero dgates, so whatever y holds there does not count).
    const int64_t first = reverse ? T - 1 : 0;
    if (T == 1) {
      at::mm_out(dw_hh, dgates[first].t(), h0);
      return;
    }
    Tensor dg_rest = reverse ? dgates.narrow(0, 0, T - 1) : dgates.narrow(0, 1, T - 1);
    Tensor y_prev = reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1);
    weight_grad<scalar_t>(dg_rest.reshape({(T - 1) * B, G4}), y_prev.reshape({(T - 1) * B, P}), dw_hh);
    dw_hh.addmm_(dgates[first].t(), h0);
    return;
  }
  // Packed reverse: rows start at different steps.
  weight_grad<scalar_t>(dg2, previous_h<scalar_t>(y, h0, live, reverse).view({TB, P}), dw_hh);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd(
    const Tensor& grad_y_in, const Tensor& grad_hT_in, const Tensor& grad_cT_in, const Tensor& x_in,
    const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
    const c10::optional<Tensor>& w_hr_in, const c10::optional<Tensor>& batch_sizes, const Tensor& y_in,
    const Tensor& gates_in, const Tensor& c_hist_in, bool reverse, bool has_bias) {
  const Dims d = check_args(x_in, h0_in, c0_in, w_ih_in, w_hh_in, c10::nullopt, w_hr_in, batch_sizes);
  const auto live = live_rows(batch_sizes, d.T, d.B);
  const bool packed = is_packed(batch_sizes);
  const at::ScalarType dt = x_in.scalar_type(), ct = compute_type(dt);
  TORCH_CHECK(gates_in.numel() == d.T * d.B * 4 * d.H && c_hist_in.numel() == d.T * d.B * d.H,
              "fastlstm cpp: backward needs the saved gates and cell history (forward ran with save=false)");
  TORCH_CHECK(gates_in.scalar_type() == ct && c_hist_in.scalar_type() == ct, "fastlstm cpp: saved tensors dtype");
  TORCH_CHECK(grad_y_in.sizes() == y_in.sizes() && y_in.size(0) == d.T && y_in.size(1) == d.B && y_in.size(2) == d.P,
              "fastlstm cpp: grad_y / y must be [T, B, P]");
  TORCH_CHECK(grad_hT_in.sizes() == h0_in.sizes() && grad_cT_in.sizes() == c0_in.sizes(),
              "fastlstm cpp: grad_hT / grad_cT shapes");
  const bool bf16_dot = runs_bf16_dot(dt);
  Tensor grad_y = as_compute(grad_y_in, ct), c0 = as_compute(c0_in, ct), gates = gates_in.contiguous(),
         c_hist = c_hist_in.contiguous();
  auto w_hr = as_compute(w_hr_in, ct);
  const auto opts = grad_y.options();
  Tensor dh = grad_hT_in.to(ct, false, true).contiguous();
  Tensor dc = grad_cT_in.to(ct, false, true).contiguous();
  Tensor dx = at::empty({d.T, d.B, d.I}, opts);
  Tensor dw_ih = at::empty({4 * d.H, d.I}, opts);
  Tensor dw_hh = at::empty({4 * d.H, d.P}, opts);
  Tensor db = at::empty({4 * d.H}, opts);
  Tensor dw_hr = w_hr.has_value() ? at::empty({d.P, d.H}, opts) : at::empty({0}, opts);
  if (d.T > 0 && d.B > 0) {
    if (bf16_dot) {
      backward_impl<float, Bf16Dot>(d, grad_y, x_in.contiguous(), h0_in.contiguous(), c0, w_ih_in.contiguous(),
                                    w_hh_in.t().contiguous(), w_hr, live, y_in.contiguous(), gates, c_hist, reverse,
                                    packed, dx, dh, dc, dw_ih, dw_hh, db, dw_hr);
    } else {
      AT_DISPATCH_FLOATING_TYPES(ct, "fastlstm_cpp_lstm_bwd", [&] {
        backward_impl<scalar_t, FmaDot<scalar_t>>(d, grad_y, as_compute(x_in, ct), as_compute(h0_in, ct), c0,
                                                  as_compute(w_ih_in, ct), as_compute(w_hh_in, ct), w_hr, live,
                                                  as_compute(y_in, ct), gates, c_hist, reverse, packed, dx, dh, dc,
                                                  dw_ih, dw_hh, db, dw_hr);
      });
    }
  } else {
    dx.zero_();
    dw_ih.zero_();
    dw_hh.zero_();
    db.zero_();
    dw_hr.zero_();
  }
  if (!has_bias) db = at::empty({0}, opts);
  if (dt != ct) {
    dx = dx.to(dt);
    dh = dh.to(dt);
    dc = dc.to(dt);
    dw_ih = dw_ih.to(dt);
    dw_hh = dw_hh.to(dt);
    db = db.to(dt);
    dw_hr = dw_hr.to(dt);
  }
  return {dx, dh, dc, dw_ih, dw_hh, db, dw_hr};
}

// ---------------------------------------------------------------------------------------------------------
// Autograd, in C++: the same formula Python's torch.library.register_autograd would give, without its per-call
// Python (measured ~0.14 ms a layer per training step here, a tenth of a batch-1 step at H = 128). Both ops are
// called through the dispatcher, so tracing (fake tensors, torch.compile) sees the ops and their fake kernels.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor undefined_if_none(const c10::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }
c10::optional<Tensor> none_if_undefined(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

// The layer in differentiable ATen ops, the same steps as fastlstm/reference.py: for double backward only.
std::tuple<Tensor, Tensor, Tensor> layer_in_aten_ops(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                     const Tensor& w_ih, const Tensor& w_hh, const Tensor& b,
                                                     const Tensor& w_hr, const std::vector<int64_t>& live,
                                                     bool reverse) {
  const int64_t T = x.size(0), B = x.size(1);
  Tensor x_proj = at::matmul(x, w_ih.t());
  if (b.defined()) x_proj = x_proj + b;
  Tensor h = h0, c = c0;
  std::vector<Tensor> ys(T);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t n = live[t];
    // Rows past n are finished (forward) or not started (reverse, still at h0/c0): they keep their state.
    const auto q = (x_proj[t].narrow(0, 0, n) + at::matmul(h.narrow(0, 0, n), w_hh.t())).chunk(4, 1);
    const Tensor c_live = q[1].sigmoid() * c.narrow(0, 0, n) + q[0].sigmoid() * q[2].tanh();
    Tensor h_live = q[3].sigmoid() * c_live.tanh();
    if (w_hr.defined()) h_live = at::matmul(h_live, w_hr.t());
    ys[t] = n < B ? at::cat({h_live, h_live.new_zeros({B - n, h_live.size(1)})}) : h_live;
    h = n < B ? at::cat({h_live, h.narrow(0, n, B - n)}) : h_live;
    c = n < B ? at::cat({c_live, c.narrow(0, n, B - n)}) : c_live;
  }
  return {at::stack(ys), h, c};
}

// Backward with create_graph=True (gradient penalties, Hessian-vector products): the kernels' gradients are not
// themselves differentiable, so recompute the layer from the saved inputs in differentiable ops and let autograd
// differentiate that. Slow (a step loop of small ops), exact, and only ever taken for this case.
variable_list differentiable_grads(const std::vector<Tensor>& inputs, const Tensor& batch_sizes, bool reverse,
                                   const Tensor& grad_y, const Tensor& grad_hT, const Tensor& grad_cT) {
  const Tensor& x = inputs[0];
  const auto ct = compute_type(x.scalar_type());
  std::vector<Tensor> v;  // the inputs in the compute dtype (bfloat16 and float16 in float32, as the kernels)
  for (const Tensor& t : inputs) v.push_back(t.defined() ? t.to(ct) : t);
  const auto live = live_rows(none_if_undefined(batch_sizes), x.size(0), x.size(1));
  auto [y, hT, cT] = layer_in_aten_ops(v[0], v[1], v[2], v[3], v[4], v[5], v[6], live, reverse);
  variable_list wrt;
  std::vector<size_t> where;
  for (size_t k = 0; k < inputs.size(); ++k) {
    if (inputs[k].defined() && inputs[k].requires_grad()) {
      wrt.push_back(inputs[k]);
      where.push_back(k);
    }
  }
  variable_list grads(inputs.size() + 3);  // + batch_sizes, reverse, save: none
  if (wrt.empty()) return grads;
  const variable_list got = torch::autograd::grad({y, hT, cT}, wrt, {grad_y.to(ct), grad_hT.to(ct), grad_cT.to(ct)},
                                                  /*retain_graph=*/true, /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t k = 0; k < wrt.size(); ++k) grads[where[k]] = got[k];
  return grads;
}

class LayerFunction : public torch::autograd::Function<LayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& b,
                               const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& batch_sizes,
                               bool reverse, bool save) {
    static const auto op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastlstm::cpp_lstm_fwd", "")
                                .typed<decltype(lstm_fwd)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, hT, cT, gates, c_hist] = op.call(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, save);
    ctx->save_for_backward({x, h0, c0, w_ih, w_hh, undefined_if_none(w_hr), undefined_if_none(batch_sizes), y, gates,
                            c_hist, undefined_if_none(b)});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["save"] = save;
    // gates and c_hist are saved state, never differentiated; unused gradients stay undefined rather than being
    // materialised as zeros ([T, B, 4H] of them).
    ctx->mark_non_differentiable({gates, c_hist});
    ctx->set_materialize_grads(false);
    // The caller gets a copy of y, backward keeps its own: nn.LSTM's ATen path lets a model change its output in
    // place before backward (y += residual), which would otherwise fail backward's version check.
    return {y.clone(), hT, cT, gates, c_hist};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(ctx->saved_data["save"].toBool(),
                "fastlstm cpp: backward through a forward that ran without saving (save=False)");
    static const auto op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastlstm::cpp_lstm_bwd", "")
                                .typed<decltype(lstm_bwd)>();
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &h0 = saved[1], &c0 = saved[2], &w_ih = saved[3], &w_hh = saved[4];
    const Tensor &w_hr = saved[5], &batch_sizes = saved[6], &y = saved[7], &gates = saved[8], &c_hist = saved[9];
    const Tensor& b = saved[10];
    const Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(y);
    const Tensor grad_hT = grads[1].defined() ? grads[1] : at::zeros_like(h0);
    const Tensor grad_cT = grads[2].defined() ? grads[2] : at::zeros_like(c0);
    const bool has_bias = b.defined();
    if (at::GradMode::is_enabled()) {  // create_graph=True
      return differentiable_grads({x, h0, c0, w_ih, w_hh, b, w_hr}, batch_sizes,
                                  ctx->saved_data["reverse"].toBool(), grad_y, grad_hT, grad_cT);
    }
    auto [dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr] =
        op.call(grad_y, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, none_if_undefined(w_hr),
                none_if_undefined(batch_sizes), y, gates, c_hist, ctx->saved_data["reverse"].toBool(), has_bias);
    // One gradient per forward input: batch_sizes, reverse and save get none.
    return {dx, dh0, dc0, dw_ih, dw_hh, has_bias ? db : Tensor(), w_hr.defined() ? dw_hr : Tensor(),
            Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd_autograd(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& b, const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& batch_sizes,
    bool reverse, bool save) {
  const variable_list out = LayerFunction::apply(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, save);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace
}  // namespace fastlstm

// The schemas of cpp_lstm_fwd / cpp_lstm_bwd are defined by fastlstm/backends/cpu.py when fastlstm is imported,
// before this library is built or loaded: a saved torch.export program naming them then loads on a machine that
// has never built it. This library adds their kernels. FRAGMENT: Python defines ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def("cpp_kernel_choices() -> str", &fastlstm::kernel_choices);
  m.def("cpp_bf16_dot() -> bool", &fastlstm::use_bf16_dot);
  m.def("cpp_release_memory() -> int", &fastlstm::release_memory);
}

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("cpp_lstm_fwd", &fastlstm::lstm_fwd);
  m.impl("cpp_lstm_bwd", &fastlstm::lstm_bwd);
}

TORCH_LIBRARY_IMPL(fastlstm, Autograd, m) { m.impl("cpp_lstm_fwd", &fastlstm::lstm_fwd_autograd); }
