// fastlstm C++ CPU backend: the products that libraries serve (BLAS, MKL's packed GEMM, oneDNN's matmul).
#pragma once

#include "cpu_id.h"
#include "env.h"
#include "memory.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

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

// C[m, N] (+)= A[m, K] @ op(W) with op(W) [K, N] packed by MKL for exactly m rows; only for float, only when
// libtorch carries MKL, and only for batches where it beats the register-blocked kernel.
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasBMatrix = 162,
              kCblasPacked = 151;
// MKL picks its fast kernels on Intel CPUs only. Measured on a 2-core AMD EPYC (Zen 4), float32 inference over
// `bench --grid cpu-full`: with MKL's packed GEMM per step, geomean 0.73x of nn.LSTM (min 0.44x); with the
// register-blocked kernel, 0.93x (min 0.80x). So MKL's packed path is the default on Intel only, and there (a
// 2-core Xeon with AMX, the float32 grid twice, processes alternating with and without it; speedups against
// nn.LSTM, MKL's then the kernel's) from 8 rows of a w_hh 256+ wide: there it won (inference B8-T100-H256 1.01x
// against 0.75-0.79x, B8-T35-H384-bi 1.32x against 1.08-1.09x, B32-T35-H512-L2-bi 1.10-1.12x against
// 0.90-0.92x, B64-T100-H512 1.03-1.05x against 0.88-0.90x; training likewise, by less), and it lost below 8 rows
// (B1-T100-H512 inference 0.74-0.76x against 2.22-2.32x, B1-T100-H128 1.05-1.07x against 1.54-1.57x; B2-B4
// even) and at narrower weights (B16-T500-H128 0.95-0.96x against 1.27-1.28x, B64-T50-H64-L2-bi 1.00x against
// 1.41-1.43x, B64-T35-H200 1.04-1.07x against 1.11-1.12x), where the kernel's team loop and row split serve.
// FASTLSTM_MKL_MIN_ROWS overrides the rows, and then any width goes.
inline std::optional<int64_t> mkl_min_rows_env() {
  static const std::optional<int64_t> v = env_int("FASTLSTM_MKL_MIN_ROWS");
  return v;
}
inline int64_t mkl_min_rows() {
  return mkl_min_rows_env().value_or(cpu_is_intel() ? 8 : std::numeric_limits<int64_t>::max());
}
inline int64_t mkl_min_width() { return mkl_min_rows_env() ? 0 : 256; }

struct MklPacked {
  float* data = nullptr;
  std::unique_ptr<char[]> own;  // data's memory where the scratch does not keep a pack this large
  int m = 0, n = 0, k = 0;
  bool ok = false;
  // W row-major; trans: op(W) = W^T.
  // Whether pack() takes a product of m rows, n columns and depth k (MKL present, m from mkl_min_rows(), both sides
  // of the weight from mkl_min_width(): w_hh is [4H, P] forward and [P, 4H] backward).
  static bool applies(int64_t m_, int64_t n_, int64_t k_) {
    return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr &&
           m_ >= mkl_min_rows() && std::min(n_, k_) >= mkl_min_width() && m_ <= (1 << 20) && n_ <= (1 << 20) &&
           k_ <= (1 << 20);
  }
  void pack(const float* W, int64_t ld, bool trans, int64_t m_, int64_t n_, int64_t k_) {
    ok = false;
    if (!applies(m_, n_, k_)) return;
    m = (int)m_;
    n = (int)n_;
    k = (int)k_;
    const size_t bytes = cblas_sgemm_pack_get_size(kCblasBMatrix, m, n, k);
    // MKL asks for megabytes, touches what it uses; beyond the scratch's cap, memory of this pack's own
    if (Scratch::keeps(bytes)) {
      data = static_cast<float*>(pack_scratch().get(bytes));
    } else {
      own.reset(new_bytes(bytes + 64));
      data = static_cast<float*>(Scratch::align(own.get()));
    }
    cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, trans ? kCblasTrans : kCblasNoTrans, m, n, k, 1.0f, W, (int)ld,
                     data);
    ok = true;
  }
  void run(const float* A, int64_t lda, float* C, int64_t ldc, bool accumulate) const {
    cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, m, n, k, A, (int)lda, data, n,
                        accumulate ? 1.0f : 0.0f, C, (int)ldc);
  }
};

// Where the plain BLAS call (which re-packs the weight every step) beats the register-blocked kernel: float32
// takes MKL's packed path instead whenever available. float64 from 16 rows, measured on Zen 4; never on Zen 5
// (AMD family 0x1A on), where MKL's generic dgemm runs at half the rate of the register-blocked kernel's full-width
// AVX-512: batch 16-64, 7 grid shapes twice, the kernel took float64 inference from 1.06-1.63x of nn.LSTM to
// 1.80-2.96x, training from 1.04-1.69x to 1.41-2.28x. FASTLSTM_DGEMM_MIN_ROWS overrides.
inline int64_t dgemm_min_rows() {
  static const int64_t v =
      env_int("FASTLSTM_DGEMM_MIN_ROWS").value_or(amd_family() >= 0x1A ? std::numeric_limits<int64_t>::max() : 16);
  return v;
}
template <typename scalar_t>
inline bool use_blas_rows(int64_t B) {
  return std::is_same_v<scalar_t, double> && dgemm_ != nullptr && B >= dgemm_min_rows();
}

// ---------------------------------------------------------------------------------------------------------
// oneDNN's matmul for the large float32 products of the form A @ W^T (the input projection, and dx in
// backward). Measured on a 2-core AMD EPYC (Zen 4), [T*B, K] x [K, 4H] shapes of the benchmark grid:
// 185-209 GFLOP/s, against 136-167 for MKL's sgemm, which runs a generic path on AMD. (dW = dG^T @ x, a long
// reduction, has a rule of its own: onednn_weight_grads below.) libtorch does not export oneDNN's API; it is
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
inline std::optional<int64_t> onednn_min_macs_env() {
  static const std::optional<int64_t> v = env_int("FASTLSTM_ONEDNN_MIN_MACS");
  return v;
}
inline int64_t onednn_min_macs() {
  return onednn_min_macs_env().value_or(cpu_is_intel() ? std::numeric_limits<int64_t>::max() : int64_t(1) << 22);
}

// Whether OpenMP may start fewer threads than a parallel region asks for here (OMP_DYNAMIC=true,
// OMP_MAX_ACTIVE_LEVELS=0, OMP_THREAD_LIMIT below torch's thread count). oneDNN's matmul then computes wrong
// numbers: with OMP_THREAD_LIMIT=1 and torch at 2 threads, on a 2-core Zen 4, the float32 training calls whose
// weight gradients or dx it served were off by 0.7 to 6e37 (tests/test_cpp.py::test_fewer_openmp_threads_than_asked,
// three runs, a different shape wrong each time; right with every product on BLAS), as its LSTM is for nn.LSTM
// (fastlstm/backends/native.py). Read from this library's OpenMP runtime, which read the same environment.
inline bool openmp_may_start_fewer_threads() {
#ifdef _OPENMP
  return omp_get_dynamic() || omp_get_max_active_levels() == 0 || omp_get_thread_limit() < at::get_num_threads();
#else
  return false;
#endif
}

// Whether ATen's products may go to oneDNN here: torch built with it, the program's switch
// (torch.backends.mkldnn.enabled) on, and OpenMP starting every thread asked for (else oneDNN's numbers are wrong).
inline bool aten_onednn_on() {
  return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() && !openmp_may_start_fewer_threads();
}

// a @ b of bfloat16 matrices in float accumulation, rounded once to bfloat16. ATen hands such products to oneDNN,
// which gives non-finite numbers where OpenMP may start fewer threads (with OMP_THREAD_LIMIT=1 and torch at 2
// threads, torch 2.13's own bf16 a @ b was off by 3e35, nn.LSTM's bf16 gradients NaN; an audit): there they are
// computed in float32 (BLAS), then rounded. So too where the program has switched oneDNN off (or torch lacks it):
// ATen's own bf16 GEMM then ran a B32-T100-H256 training step's three products in 0.7 s.
inline at::Tensor bf16_mm(const at::Tensor& a, const at::Tensor& b) {
  if (aten_onednn_on()) return at::mm(a, b);
  return at::mm(a.to(at::kFloat), b.to(at::kFloat)).to(a.scalar_type());
}

// Whether oneDNN may serve a float32 product here at all, whatever its size.
template <typename scalar_t>
bool onednn_usable() {
  return std::is_same_v<scalar_t, float> && onednn_linear_op().has_value() && aten_onednn_on();
}

// Whether oneDNN serves a float32 product of `macs` multiply-adds, and the product A @ W^T as it computes it.
template <typename scalar_t>
bool onednn_serves(int64_t macs) {
  return onednn_usable<scalar_t>() && macs >= onednn_min_macs() && macs > 0;
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
// Measured on 2 threads. Zen 5, whose AVX-512 units are 512 bits wide: MKL's generic path on AMD stays at ~210
// GFLOP/s (torch.mm 2048^3: 214), and oneDNN, asked for dW^T = X^T @ dG and transposed after (see weight_grad),
// ran the grid's shapes at 320-420 GFLOP/s, the copy included ([2048 x 6400] @ [6400 x 512]: 372 against MKL's
// 211; [800 x 2240] @ [2240 x 200]: 418 against 206; [256 x 3200] @ [3200 x 64]: 319 against 181). From 2^24
// multiply-adds: below, MKL was as fast or faster ([512 x 100] @ [100 x 128] 169 against 130 GFLOP/s, [256 x
// 500] @ [500 x 64] 159 against 119; from [800 x 140] @ [140 x 200], 22M, oneDNN won). Zen 4 (AVX-512 on
// 256-bit units): with torch's ops (oneDNN making its own transposing copy) MKL had been the faster; through
// weight_grad, 35 products of 100-6400 rows at hidden 128-1024 (dW of [4H x R] @ [R x H]) ran 1.0-1.4x MKL's
// speed from 2^24 multiply-adds but two (6400 rows at hidden 768: 0.89x, 0.93x; R=100 at hidden 512 0.87x once,
// 1.07x and 1.15x again), and whole training steps gained or held (benchmarks/results/cpu-amd-epyc-zen4-*.md).
// So from Zen 4 (AMD family 0x19 with AVX-512) on. FASTLSTM_ONEDNN_WEIGHT_GRADS=1 or 0 overrides which CPUs;
// FASTLSTM_ONEDNN_MIN_MACS, when set, the size.
inline bool onednn_weight_grads() {
  static const bool v = env_flag("FASTLSTM_ONEDNN_WEIGHT_GRADS")
                            .value_or(amd_family() >= 0x1A || (amd_family() == 0x19 && !amd_zen3()));
  return v;
}

// Multiply-adds from which oneDNN serves a weight gradient: FASTLSTM_ONEDNN_MIN_MACS when set, else 2^24. Not the
// other products' floor, which is "never" on Intel: there FASTLSTM_ONEDNN_WEIGHT_GRADS=1 alone had switched on
// nothing, while dispatch's training rule read the weight gradients as oneDNN's.
inline int64_t weight_grad_min_macs() {
  static const int64_t v = onednn_min_macs_env().value_or(int64_t(1) << 24);
  return v;
}

// out[M, N] = A[R, M]^T @ X[R, N], A and X with unit column stride. When oneDNN serves it, its result replaces
// `out` (as in linear_nt). oneDNN wants its source contiguous and makes a strided one so with a copy as slow as
// at::copy_ of a transposed view (~5 GB/s), so the transposing copies are made here, by transpose_matrix, in
// whichever of two forms copies fewer elements: A^T as the source with X read strided as the weight (R * M
// elements), or out^T = X^T @ A, X^T as the source and the result transposed back (R * N + M * N). Both ran
// the product itself at 470-500 GFLOP/s (Zen 5, [2048 x 100] @ [100 x 512], [1024 x 800] @ [800 x 256],
// [1536 x 200] @ [200 x 384]), against 350-400 with oneDNN's own copy and ~205 for MKL.
template <typename scalar_t>
void weight_grad(const Tensor& A, const Tensor& X, Tensor& out) {
  const int64_t R = A.size(0), M = A.size(1), N = X.size(1), macs = R * M * N;
  if (!(onednn_weight_grads() && onednn_usable<scalar_t>() && macs > 0 && macs >= weight_grad_min_macs())) {
    at::mm_out(out, A.t(), X);
    return;
  }
  const bool source_a = R * M <= R * N + M * N;
  // The copy lives in kept memory: a fresh one of megabytes faults its pages in every call (at batch 64, hidden
  // 200, 35 steps, two 7 MB copies of A^T that way doubled the backward).
  PoolBuffer<scalar_t> copy;
  if (source_a) {
    const Tensor At = at::from_blob(copy.reset(M * R), {M, R}, A.options());
    transpose_matrix(A.data_ptr<scalar_t>(), R, M, A.stride(0), At.data_ptr<scalar_t>(), R);
    out = onednn_linear(At, X.t());
    return;
  }
  const Tensor Xt = at::from_blob(copy.reset(N * R), {N, R}, X.options());
  transpose_matrix(X.data_ptr<scalar_t>(), R, N, X.stride(0), Xt.data_ptr<scalar_t>(), R);
  const Tensor out_t = onednn_linear(Xt, A.t());  // [N, M]
  if (!(out.is_contiguous() && out.size(0) == M && out.size(1) == N)) out = at::empty({M, N}, X.options());
  transpose_matrix(out_t.data_ptr<scalar_t>(), N, M, M, out.data_ptr<scalar_t>(), N);
}

}  // namespace
}  // namespace fastlstm
