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
//     units); for float32 on Intel CPUs where libtorch carries MKL, from 8 rows of a w_hh 256+ wide, MKL's
//     packed GEMM; for float64 batches
//     >= 16, a plain dgemm. No dispatcher, no allocation.
//   * Batches of 3+ rows a thread whose step weights fit a core's L2 split their rows among the threads, each
//     running the whole time loop on its own rows: no barrier, nothing shared but the weights.
//   * Other small steps (up to 2^20 multiply-adds, no projection) run as one team of threads for the whole
//     sequence, each owning a slice of hidden units, with one spin barrier per step, forward and backward.
//   * The pointwise cell is one fused loop in explicit SIMD with an own exp: sigmoid and tanh within ~2 ulp for
//     float, ~1e-16 relative for double; a row's last partial vector runs the same code through masked loads and stores.
//   * Inference keeps no gates for backward: with the projection fused, one step's [B, 4H] buffer, reused.
//   * Backward runs the reverse time loop for the gate gradients only; dx, dw_ih, dw_hh, db, dw_hr are then
//     single GEMMs / reductions over all T*B rows (float32 weight gradients on Zen 5: oneDNN's matmul).
//   * Autograd is a C++ Autograd kernel (no per-call Python); double backward recomputes the layer in ATen ops.
//   * bfloat16, on CPUs with AVX512-BF16: the products take bf16 in pairs (vdpbf16ps, float accumulation), the
//     recurrent and input products in the register-blocked kernel (on AMX tiles where the CPU has them, amx.h),
//     backward's large ones in ATen's bf16 matmul;
//     h (and, in backward, dgates) is rounded to bf16 for them, as native bf16 does; the cell, c and the saved
//     gates stay float. Elsewhere bfloat16, and float16 everywhere, compute in float32 end to end (fp32 c) and are
//     rounded at the boundary.
// Saved for backward: activated gates [T, B, 4H] and the cell history [T, B, H] (plus the output y).
//
// This file holds the layer (argument checks, the forward and backward time loops); lstm_ops.cpp holds the ops
// (the Autograd kernel, the registration) and calls the layer through layer.h. The layer's parts:
//   simd.h          vector types, the kernels' multiply-adds (float FMA, bfloat16 pairs), the register transpose
//   amx.h           bfloat16 products on AMX tiles, over the same packed weight
//   memory.h        memory kept between calls (packed weights, scratch) and release_memory()
//   step_product.h  one step's product: the packed weight, the register-blocked kernel, dot products
//   cell.h          the pointwise cell, forward and backward
//   team.h          how a time loop's threads share it: the team loop's barrier and thresholds, the row split
//   cpu_id.h        which CPU this is (Intel, AMD's family), for choices measured to differ between CPUs
//   blas.h          the products libraries serve: BLAS, MKL's packed GEMM, oneDNN's matmul

// Light ATen headers (the tensor class and the operators used, not ATen/ATen.h): see layer.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
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
#include <numeric>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "blas.h"
#include "cell.h"
#include "env.h"
#include "layer.h"
#include "memory.h"
#include "simd.h"
#include "step_product.h"
#include "team.h"

namespace fastlstm {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------------------
// Argument checks shared by forward and backward.

struct Dims {
  int64_t T, B, I, H, P;
};

// A layer's arguments but its state (check_args; cpp_lstm_stack_fwd checks the whole stack's state itself).
Dims check_layer_args(const Tensor& x, const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& b,
                      const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& batch_sizes) {
  TORCH_CHECK(x.dim() == 3, "fastlstm cpp: x must be [T, B, I], got ", x.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2, "fastlstm cpp: weights must be 2-d");
  TORCH_CHECK(w_ih.size(0) % 4 == 0, "fastlstm cpp: w_ih must be [4H, I], got ", w_ih.sizes());
  Dims d{x.size(0), x.size(1), x.size(2), w_ih.size(0) / 4, w_hh.size(1)};
  // the kernels divide by each (their chunk and block sizes): a size of 0 would stop the process
  TORCH_CHECK(d.I > 0 && d.H > 0 && d.P > 0,
              "fastlstm cpp: input, hidden and projection sizes must be positive, got I=", d.I, ", H=", d.H,
              ", P=", d.P);
  TORCH_CHECK(w_ih.size(1) == d.I, "fastlstm cpp: w_ih is ", w_ih.sizes(), " but x has I=", d.I);
  TORCH_CHECK(w_hh.size(0) == 4 * d.H, "fastlstm cpp: w_ih ", w_ih.sizes(), " and w_hh ", w_hh.sizes(),
              " disagree on 4H (both must have 4H rows)");
  const bool proj = w_hr.has_value() && w_hr->defined();
  if (proj) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) == d.P && w_hr->size(1) == d.H,
                "fastlstm cpp: w_hr must be [P, H] = [", d.P, ", ", d.H, "], got ", w_hr->sizes());
  } else {
    TORCH_CHECK(d.P == d.H, "fastlstm cpp: without w_hr, w_hh must be [4H, H], got ", w_hh.sizes());
  }
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == 4 * d.H, "fastlstm cpp: b must be [4H], got ", b->sizes());
  }
  std::vector<const Tensor*> tensors{&x, &w_ih, &w_hh};
  if (b.has_value() && b->defined()) tensors.push_back(&*b);
  if (proj) tensors.push_back(&*w_hr);
  for (const Tensor* t : tensors) {
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

// The initial state of one layer ([B, P] and [B, H]; layers 0) or of a stack of them ([L, B, P] and [L, B, H]).
void check_state(const Dims& d, const Tensor& x, const Tensor& h0, const Tensor& c0, int64_t layers) {
  std::vector<int64_t> h_shape{d.B, d.P}, c_shape{d.B, d.H};
  if (layers > 0) {
    h_shape.insert(h_shape.begin(), layers);
    c_shape.insert(c_shape.begin(), layers);
  }
  TORCH_CHECK(h0.sizes() == h_shape, "fastlstm cpp: h0 must be ", h_shape, ", got ", h0.sizes());
  TORCH_CHECK(c0.sizes() == c_shape, "fastlstm cpp: c0 must be ", c_shape, ", got ", c0.sizes());
  for (const Tensor* t : {&h0, &c0}) {
    TORCH_CHECK(t->device().is_cpu(), "fastlstm cpp: tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "fastlstm cpp: all tensors must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
}

Dims check_args(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                const c10::optional<Tensor>& b, const c10::optional<Tensor>& w_hr,
                const c10::optional<Tensor>& batch_sizes) {
  const Dims d = check_layer_args(x, w_ih, w_hh, b, w_hr, batch_sizes);
  check_state(d, x, h0, c0, /*layers=*/0);
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

// The cell state c_n as the call returns it. A float16 layer's c is float32 inside, where it grows past float16's
// range (a forget gate at 1 for 65,504+ steps) while nn.LSTM's float16 cell stops growing; rounded to inf, that
// state carried into the next call (streaming, step) turns NaN where a forget gate closes (0 * inf), though one
// call over both chunks stays finite. Saturated, it stays finite as nn.LSTM's does; an inf the call was given stays
// (as NaN does). One pass, as the plain conversion: a streamed step's state is small and its call's fixed costs count.
Tensor state_to(const Tensor& c, at::ScalarType dt) {
  if (dt != at::kHalf) return c.to(dt);
  TORCH_INTERNAL_ASSERT(c.scalar_type() == at::kFloat, "a float16 layer's state is float32 inside");
  const Tensor src = c.contiguous();
  Tensor out = at::empty(src.sizes(), src.options().dtype(dt));
  const float* from = src.data_ptr<float>();
  at::Half* to = out.data_ptr<at::Half>();
  const float largest = static_cast<float>(std::numeric_limits<at::Half>::max());
  for (int64_t i = 0; i < src.numel(); ++i) {
    const float v = from[i];
    to[i] = static_cast<at::Half>(std::isinf(v) ? v : std::clamp(v, -largest, largest));
  }
  return out;
}


// Batch size from which the input projection runs per step, beside the recurrent product, instead of as one
// GEMM for all steps up front: the gates then go from the register-blocked kernel (~95% of the FMA peak in
// isolation at 8+ rows) straight into the cell while in cache, where the up-front GEMM wrote [T, B, 4H] to
// memory and each step read its slice back. Below 8 rows the kernel is bound by loading the weight, and one
// big GEMM wins. On AMX tiles (bfloat16) from 16 rows: there the products are fast enough that writing the gates
// of every step costs less than the second weight each step streams. bf16 inference, 2-core Xeon with AMX, one
// process each way: B8-T100-H256 1.46 -> 1.23 ms up front, B12 1.66 -> 1.54 ms, B16 1.97 -> 1.98 ms, B16-H512
// 6.48 -> 6.31 ms, B8-H512 even; B32-H256 2.86 -> 3.40 ms and B64-H512 20.6 -> 24.5 ms, so fused from 16 rows
// there. FASTLSTM_FUSE_MIN_ROWS overrides both; a huge value disables.
inline std::optional<int64_t> fuse_min_rows_override() {
  static const std::optional<int64_t> v = env_int("FASTLSTM_FUSE_MIN_ROWS");
  return v;
}

inline int64_t fuse_min_rows() { return fuse_min_rows_override().value_or(8); }

template <typename Dot>
inline int64_t fuse_min_rows_of() {
  if constexpr (kHasAmx && std::is_same_v<Dot, Bf16Dot>)
    if (!fuse_min_rows_override() && amx_enabled()) return 16;
  return fuse_min_rows();
}

// Bytes of w_ih up to which the float32 input projection up front (below 8 rows) and dx = dgates @ w_ih run on the
// register-blocked kernel, w_ih packed each call, rather than on oneDNN's matmul or BLAS: at these small products a
// library call's fixed costs (oneDNN fetches its primitive, reorders the weight and writes a fresh output, where
// the kernel writes into the kept gate buffer) are a large part of the product. Measured on Zen 3, 2 threads, the
// ops alone, alternating in one process:
//   * forward, 64 KB-1 MB of w_ih: 1.03-1.15x faster than oneDNN (B1-T100-H128 1.14-1.15x, B4-T35-H200 1.07-1.08x,
//     B1-T500-H64 1.06-1.10x, B4-T100-H256 1.09x, B1-T100-I1024-H64 1.11x), 1.00-1.03x faster than BLAS; from
//     1.6 MB even or slower (I=H=320 1.00-1.04x, 384 0.97-1.05x, 512 0.96-0.98x: the packing grows with w_ih while
//     the rows stay few); float64 0.90-1.04x against BLAS, so float32 only;
//   * dx: 1.04-1.10x faster than oneDNN on 7 shapes at batch 1-4, B1-T100-I1024-H64 0.99x, B3-T100-H256 0.93x
//     and then 1.17x; from 16 rows even or slower (B16-T500-H128 0.87x, B32-T100-H256 0.96x).
// Against nn.LSTM (the bench, processes alternating with the build before): inference B1-T100-H128 1.51x -> 1.70x,
// B3-T100-H256 1.41x -> 1.76x; training B1-T100-H128 1.52x -> 1.63x, B4-T35-H200-L2 1.69x -> 1.76x.
// FASTLSTM_OWN_PROJECTION_MAX_KB overrides; 0 disables.
inline int64_t own_projection_max_bytes() {
  static const int64_t v = env_int("FASTLSTM_OWN_PROJECTION_MAX_KB", 0, int64_t(1) << 40).value_or(1024) * 1024;
  return v;
}

// Whether the input projection x @ w_ih^T up front, or dx = dgates @ w_ih, of a batch of B rows runs on the
// register-blocked kernel (float32; w_ih_elems: 4H * I).
template <typename scalar_t>
bool own_projection(int64_t B, int64_t w_ih_elems) {
  return std::is_same_v<scalar_t, float> && B < fuse_min_rows() &&
         w_ih_elems * static_cast<int64_t>(sizeof(float)) <= own_projection_max_bytes();
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
  RegionErrors errors;
#pragma omp parallel num_threads(threads)
  {
    // Each thread packs its own slice, which so starts out in its own cache.
    const TeamSlice slice = join_team<scalar_t>(barrier, H);
    const int64_t j0 = slice.j0, width = slice.width;
    Packed<Dot> Wq[4], Wi[4];  // gate q, this slice: B[k, n] = w_hh[q * H + j0 + n, k]; w_ih likewise
    errors.run([&] {
      if (width == 0) return;
      if (!dot)
        for (int q = 0; q < 4; ++q) Wq[q].pack(w_hh + (q * H + j0) * kh, kh, width, 1, kh, /*parallel=*/false);
      if (w_ih != nullptr)
        for (int q = 0; q < 4; ++q) Wi[q].pack(w_ih + (q * H + j0) * ki, ki, width, 1, ki, /*parallel=*/false);
    });
    // A pack that failed (out of memory) ends the call on every thread, none left waiting at the step barrier.
#pragma omp barrier
    int gen = 0;
    const int64_t steps = errors.failed() ? 0 : T;  // every thread alike: they meet at each step
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t n = live[t];
      const elem_t* hin = hbuf.data() + (s & 1) * B * ldh;
      elem_t* hout = hbuf.data() + ((s + 1) & 1) * B * ldh;
      scalar_t* Gt = G + t * g_step;
      scalar_t* yt = y + t * B * H;
      if (width > 0) {
        // Odd steps visit the slice of w_hh last part first. Read in one order every step, a slice larger than
        // the core's L2 misses all of it (each part is evicted before its next use); read back and forth, the
        // part read last stays cached for the next step. Same sums, in any order. Measured on Zen 5 (1 MB L2),
        // 2 threads, alternating in one process: B2-T200-H384 1.11x, B2-T100-H512 1.12-1.15x, B1-T100-H512
        // 1.05-1.08x, slices that fit L2 unchanged (0.99-1.02x).
        const bool back = s & 1;
        if (dot) {  // rows q * H + [j0, j1) of w_hh, as stored
          for (int64_t r = 0; r < n; ++r)
            for (int qi = 0; qi < 4; ++qi) {
              const int q = back ? 3 - qi : qi;
              dot_rows<Dot>(hin + r * ldh, w_hh + (q * H + j0) * kh, kh, kh, Gt + r * G4 + q * H + j0, width,
                            /*accumulate=*/true, back);
            }
        } else {
          for (int qi = 0; qi < 4; ++qi)
            for (int64_t pi = 0; pi < Wq[qi].panels; ++pi) {
              const int q = back ? 3 - qi : qi;
              const int64_t p = back ? Wq[q].panels - 1 - pi : pi;
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
  errors.rethrow();
  rows_from_kernel<Dot>(hbuf.data() + (T & 1) * B * ldh, ldh, h, H, B, H);
}

// Whether bfloat16 runs on the bf16 dot-product kernel (see Bf16Dot): on CPUs that have it, unless
// FASTLSTM_BF16_DOT=0 asks for float32 math throughout (for measurements and tests).
inline bool use_bf16_dot() {
  static const bool asked = env_flag("FASTLSTM_BF16_DOT").value_or(true);  // read (and checked) in every build
  static const bool v = kHasBf16Dot && asked;
  return v;
}

// Whether a layer of dtype dt runs on the bf16 dot-product kernel: forward and backward must agree.
inline bool runs_bf16_dot(at::ScalarType dt) { return dt == at::kBFloat16 && use_bf16_dot(); }

// Whether the bf16 dot-product kernel's products take AMX tiles (see amx.h).
inline bool uses_amx() { return use_bf16_dot() && amx_enabled(); }

inline std::string amx_description() {
#ifdef FASTLSTM_AMX
  if (uses_amx())
    return ", on AMX tiles from " + std::to_string(amx_min_rows()) + " rows (input projection per step from " +
           std::to_string(fuse_min_rows_of<Bf16Dot>()) + " rows)";
#endif
  return std::string();
}

// Whether float32 weight gradients go through oneDNN's matmul (from weight_grad_min_macs on): the training
// measurements behind dispatch's float32 rule depend on it.
bool uses_onednn_weight_grads() {
  return onednn_weight_grads() && onednn_linear_op().has_value() && !openmp_may_start_fewer_threads();
}

// Steps of one chunk of a long inference: FASTLSTM_INFERENCE_CHUNK_STEPS when set (tests: chunk borders), else
// as many as fit the scratch memory a thread keeps (kScratchKeep) with their gates. The gates of every step
// ([T, B, 4H], 4x the output) are what an inference that projects its input up front holds beyond the output:
// T = 20,000 at batch 4, hidden 512 peaked at 782 MB, against nn.LSTM's 313 MB; in chunks, 208 MB (as fast, within
// the noise of this machine: 3.31 s against 3.34 s a call, Zen 3, 2 threads). A chunk repacks the weights, a few
// steps' worth of memory traffic.
inline int64_t inference_chunk_override() {
  static const int64_t v = env_int("FASTLSTM_INFERENCE_CHUNK_STEPS", 1).value_or(0);
  return v;
}

inline int64_t inference_chunk_steps(int64_t B, int64_t H, size_t elem_bytes) {
  if (inference_chunk_override() > 0) return inference_chunk_override();
  return std::max<int64_t>(1, static_cast<int64_t>(kScratchKeep / (B * 4 * H * elem_bytes)));
}

// Whether a single step (T = 1: streaming, LSTM.step) of B rows multiplies every weight as stored (dot_rows)
// rather than packed: a packed weight pays when several steps or many rows read it, and packing writes the whole
// weight out once more. weight_bytes: w_ih and w_hh as the kernel reads them. The ops alone on Zen 4 (2 threads,
// float32, I = H, FASTLSTM_ONE_STEP_ROWS=0 against 16 or 64, alternating processes, best of 5-7, on a VM whose
// figures for unchanged code moved up to 1.5x between rounds): batch 1-8 at hidden 16-1024 1.2-2.7x faster (hidden
// 32 at batch 1 0.73x in one early pair of rounds, 1.2-1.5x in three later), batch 2-8 at hidden 512-1024 2.8-7x,
// where packing streamed the weight through memory twice more; batch 16 1.9-3.2x
// faster at hidden 512-1024 (8 MB of weights and more) but 0.8-1.0x at hidden 32-256, where dot_rows, reading
// each weight vector once per row, loses to the packed kernel's row blocks; batch 32 at hidden 128-256 0.5-0.8x.
// FASTLSTM_ONE_STEP_ROWS=N: up to N rows whatever the size (0: never).
inline int64_t one_step_rows_override() {
  static const int64_t rows = dot_rows_knob("FASTLSTM_ONE_STEP_ROWS");
  return rows;
}

inline bool one_step_pays(int64_t B, int64_t weight_bytes) {
  if (one_step_rows_override() >= 0) return B <= one_step_rows_override();
  return B <= 8 || (B <= 16 && weight_bytes >= (int64_t(8) << 20));
}

// Whether an inference call of a few steps (2+) of B rows runs as a single step does where one_step_pays: every
// product as dot products over the weights as stored, none packed. Packing reads a weight and writes it out once
// more, which a few rows do not pay back where the weights exceed a core's L2 and every step streams them from
// memory either way; over more rows the packed kernel's row blocks (or MKL's) win, and the more so the smaller the
// weights: up to one row of a step (T * B rows in all) for every 512 KB of weights, 2-10 steps, batch 2+, 4 MB+ of
// weights. float32 on the Xeon with AMX (2 MB of L2; I = H, one layer, `bench --backend cpp --mode inference`, this
// path against the packed weight, processes alternating twice, cpp's own medians: nn.LSTM's in the same process
// moved by up to 2x with what cpp had run before it): within the rule, one thread hidden 512-1024 batch 2-8, 2-5
// steps 1.04-2.37x faster, 10 steps at batch 4 0.98-1.16x; two threads 1.06-2.08x; ten more shapes at and within
// its edge 0.92-1.37x. Beyond it: hidden 512 (8 MB) at 20-40 rows 0.80-1.14x and 80-160 rows 0.57-0.78x, hidden
// 768 at 40 rows 0.93-0.98x, hidden 1024 at 80-160 rows 0.77-1.07x, B16-T4-H640 (64 rows of 13 MB) 0.83-0.86x;
// batch 1 (dot_rows already) 0.82-1.25x; hidden 256 (2 MB) 0.56-1.25x. Training (the forward's part, two threads)
// ran even, 0.77-1.25x: it keeps the packed weight, as do the other types (not measured).
// benchmarks/results/cpu-intel-xeon-amx-2core.md, "A few steps of float32 inference". FASTLSTM_FEW_STEPS=N: up to N
// steps whatever the size and mode (0: never), with one_step_pays' rows.
inline int64_t few_steps_override() {
  static const int64_t steps = dot_rows_knob("FASTLSTM_FEW_STEPS");
  return steps;
}

template <typename scalar_t, typename Dot>
inline bool few_steps_pay(int64_t T, int64_t B, int64_t weight_bytes, bool inference) {
  if (few_steps_override() >= 0) return T <= few_steps_override();
  constexpr bool float32 = std::is_same_v<scalar_t, float> && std::is_same_v<typename Dot::elem_t, float>;
  return float32 && inference && T <= 10 && B >= 2 && weight_bytes >= (int64_t(4) << 20) &&
         T * B <= (weight_bytes >> 19);
}

// Whether the input projection up front of a few steps (T * B rows in all) runs as dot products over w_ih as
// stored rather than packing w_ih first (or calling a library): step_dot reads the weight once for all the rows,
// where packing writes it out once more. The op alone on Zen 4 (float32, I = H, 2 threads, a temporary switch, four
// alternating rounds, best of each): T * B = 2-8 rows at hidden 256-1024 (w_ih 1-16 MB) 1.06-1.49x faster
// (T2-B1-H256 1.49x, T4-B1-H256 1.30x, T4-B2-H512 1.28x, T2-B2-H1024 1.11x, T8-B1-H512 1.06x), at hidden 128 0.97x;
// 16 rows at hidden 256 0.67-0.76x. FASTLSTM_DOT_INPUT_ROWS=N: up to N rows whatever the size (0: never).
inline int64_t dot_input_rows_override() {
  static const int64_t rows = dot_rows_knob("FASTLSTM_DOT_INPUT_ROWS");
  return rows;
}

inline bool dot_input_pays(int64_t rows, int64_t w_ih_bytes) {
  if (dot_input_rows_override() >= 0) return rows <= dot_input_rows_override();
  return rows <= 8 && w_ih_bytes >= (int64_t(1) << 20);
}

// Which kernel serves which product on this CPU, with the knobs applied (for `python -m fastlstm info` and the
// tests that force each path).
std::string kernel_choices() {
  // Both switches read in every build (uses_amx() stops at the first), so a malformed one warns here too
  (void)use_bf16_dot();
  (void)amx_enabled();
  const auto from = [](int64_t v, const char* unit) {
    return v >= (int64_t(1) << 40) ? std::string("never") : "from " + std::to_string(v) + " " + unit;
  };
  // A dot_rows path's rows: its knob's (dot_rows_knob), or its rule's when unset.
  const auto up_to = [](int64_t knob, const std::string& rule) {
    return knob > 0 ? "up to " + std::to_string(knob) + " rows" : knob == 0 ? std::string("never") : rule;
  };
  const bool mkl =
      cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
  // Not where OpenMP may start fewer threads than asked: oneDNN's matmul computes wrong there (blas.h)
  const bool onednn = onednn_linear_op().has_value() && !openmp_may_start_fewer_threads();
  const int64_t dgemm_rows = dgemm_ != nullptr ? dgemm_min_rows() : std::numeric_limits<int64_t>::max();
  return "vectors of " + std::to_string(kVecBytes) + " bytes, row blocks of " + std::to_string(kRowBlock) +
         "; float32 step: MKL packed GEMM " + from(mkl ? mkl_min_rows() : std::numeric_limits<int64_t>::max(), "rows") +
         (mkl && mkl_min_rows() < (int64_t(1) << 40) && mkl_min_width() > 1
              ? " of a w_hh " + std::to_string(mkl_min_width()) + "+ wide"
              : std::string()) +
         ", else register-blocked; float64 step: dgemm " + from(dgemm_rows, "rows") +
         ", else register-blocked; float32 x@W^T and dx: oneDNN matmul " +
         from(onednn ? onednn_min_macs() : std::numeric_limits<int64_t>::max(), "multiply-adds") +
         ", else BLAS; float32 input projection up front and dx below " + std::to_string(fuse_min_rows()) +
         " rows: register-blocked " +
         (own_projection_max_bytes() > 0 ? "up to " + std::to_string(own_projection_max_bytes()) + " bytes of w_ih"
                                         : std::string("never")) +
         "; float32 weight gradients: " +
         (uses_onednn_weight_grads()
              ? "oneDNN matmul " + from(weight_grad_min_macs(), "multiply-adds") + ", else BLAS"
              : std::string("BLAS")) +
         "; bfloat16 forward: " +
         (use_bf16_dot() ? "bf16 dot products (AVX512-BF16)" + amx_description() + ", h rounded to bf16 each step"
                         : "float32 math, rounded at the end") +
         "; time loop: one team of threads " +
         (team_max_macs(false, 1) <= 0
              ? std::string("never")
              : "up to " + std::to_string(team_max_macs(false, 1)) + " multiply-adds a step" +
                    (team_max_macs(false, kTeamZen3Rows) == team_max_macs(false, 1)
                         ? std::string()
                         : " below " + std::to_string(kTeamZen3Rows) + " rows, " +
                               std::to_string(team_max_macs(false, kTeamZen3Rows)) + " from " +
                               std::to_string(kTeamZen3Rows)) +
                    " (backward " + std::to_string(team_max_macs(true, 1)) + "), " +
                    std::to_string(team_min_hidden<float>(false)) +
                    "+ hidden units a thread (float32 backward " + std::to_string(team_min_hidden<float>(true)) +
                    "+, float64 " + std::to_string(team_min_hidden<double>(false)) + "+)") +
         " (no projection; " + std::to_string(lockstep_threads()) +
         " threads now: torch's count, capped at the CPUs this process may use), else per-step parallel; row "
         "split (each thread its own rows' time loop): " +
         (row_split_max_bytes() <= 0 ? std::string("never")
                                     : "with " + std::to_string(kRowSplitMinRows) + "+ rows a thread, " +
                                           std::to_string(kRowSplitMinSteps) + "+ steps and up to " +
                                           std::to_string(row_split_max_bytes()) + " bytes of weights a step") +
         "; input projection: per step " + from(fuse_min_rows(), "rows") +
         " (register-blocked steps), else one GEMM up front; recurrent product (forward): " +
         (dot_rows_override() > 0   ? "dot products over w_hh as stored up to " + std::to_string(dot_rows_override()) +
                                          " rows"
          : dot_rows_override() == 0 ? std::string("packed weight always")
                                     : std::string("dot products over w_hh as stored at batch 1 with rows of 16+ "
                                                   "vectors (8+ up to 16 steps), else packed weight")) +
         "; a single step: every product as dot products over the weights as stored " +
         up_to(one_step_rows_override(), "up to 8 rows, 16 with 8 MB of weights") + ", and so a call of " +
         (few_steps_override() > 0    ? "up to " + std::to_string(few_steps_override()) + " steps"
          : few_steps_override() == 0 ? std::string("one step only")
                                      : std::string("2-10 steps at float32 inference from batch 2, up to a row of "
                                                    "a step for every 512 KB of weights, 4 MB and more")) +
         "; the input projection of a few steps: dot products over w_ih as stored " +
         up_to(dot_input_rows_override(), "up to 8 rows with 1 MB of w_ih") +
         "; long inference with the input projected up front: in chunks of " +
         (inference_chunk_override() > 0 ? std::to_string(inference_chunk_override()) + " steps"
                                         : "steps whose gates fit " + std::to_string(kScratchKeep) + " bytes");
}

// ---------------------------------------------------------------------------------------------------------
// Forward.

// How the forward runs its steps, for T steps of B rows (I, P: the widths of x and h as the kernel reads them;
// inference: nothing kept for backward).
struct ForwardSteps {
  bool blocked_step;  // the register-blocked kernel (else MKL's packed GEMM or dgemm)
  bool fuse_input;    // the input projection per step, beside the recurrent product (else one GEMM up front)
  bool dot;           // the recurrent product as dot products over w_hh as stored
  bool one_step;      // every product (input, recurrent, projection) as dot products over the weights as stored,
                      // no team loop: a single step, or a few (few_steps_pay)
  bool dot_input;     // the input projection up front as dot products over w_ih as stored
  int split;          // threads of the row split (1: none)
};

template <typename scalar_t, typename Dot>
ForwardSteps forward_steps(int64_t T, int64_t B, int64_t I, int64_t H, int64_t P, bool proj, bool inference) {
  ForwardSteps f{};
  const int64_t elem_bytes = sizeof(typename Dot::elem_t);
  const int64_t weight_bytes = 4 * H * (I + P) * elem_bytes;
  if ((T == 1 || few_steps_pay<scalar_t, Dot>(T, B, weight_bytes, inference)) && one_step_pays(B, weight_bytes)) {
    f.blocked_step = f.dot = f.one_step = f.dot_input = true;
    f.split = 1;
    return f;
  }
  const bool mkl = std::is_same_v<scalar_t, float> && std::is_same_v<typename Dot::elem_t, float> &&
                   MklPacked::applies(B, 4 * H, P);
  f.blocked_step = !mkl && !use_blas_rows<scalar_t>(B);
  // One GEMM for all steps up front (straight into the gate buffer; the bias is added in the cell), or, from
  // fuse_min_rows() rows on, per step beside the recurrent product (see fuse_min_rows).
  f.fuse_input = f.blocked_step && B >= fuse_min_rows_of<Dot>() && I > 0;
  // At batch 1, w_hh as stored (see dot_pays); the input projection is never fused below 8 rows.
  f.dot = f.blocked_step && !f.fuse_input && dot_pays<Dot>(B, T, P / Dot::pair);
  f.dot_input = f.blocked_step && !f.fuse_input && I > 0 && dot_input_pays(T * B, 4 * H * I * elem_bytes);
  // The weights every step reads: w_hh, w_ih where the input projection is fused, w_hr.
  const int64_t step_bytes = (P + (f.fuse_input ? I : 0)) * 4 * H * elem_bytes + (proj ? H * P * sizeof(scalar_t) : 0);
  f.split = f.blocked_step && !f.dot ? row_split_threads(B, T, step_bytes) : 1;
  return f;
}

// The first row of each thread of a float32 forward of T steps of B rows (unpacked: each thread one range), then
// B; {0, B} when the rows are not split. dispatch's measured rule depends on it.
std::vector<int64_t> float32_forward_rows(int64_t T, int64_t B, int64_t I, int64_t H, int64_t P) {
  TORCH_CHECK(T > 0 && B > 0 && I > 0 && H > 0 && P >= 0, "fastlstm cpp: float32_forward_rows takes positive T, B, "
              "I, H and P >= 0 (0: no projection), got ", T, ", ", B, ", ", I, ", ", H, ", ", P);
  // Layer sizes whose weights could exist: the products of them it takes (4H x (I + P) weights, in bytes) then stay
  // within int64. T and B are any a tensor's.
  constexpr int64_t most = int64_t{1} << 24;
  TORCH_CHECK(I <= most && H <= most && P <= most, "fastlstm cpp: float32_forward_rows takes I, H and P up to ", most,
              ", got ", I, ", ", H, ", ", P);
  const ForwardSteps f = forward_steps<float, FmaDot<float>>(T, B, I, H, P > 0 ? P : H, P > 0, /*inference=*/true);
  std::vector<int64_t> bounds;
  for (const auto& thread : row_split_ranges(std::vector<int64_t>(T, B), B, f.split))
    bounds.push_back(thread.empty() ? B : thread.front().first);
  bounds.push_back(B);
  return bounds;
}

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
  const bool proj = w_hr.has_value();
  const ForwardSteps steps = forward_steps<scalar_t, Dot>(T, B, ldx, H, kh * Dot::pair, proj, c_hist == nullptr);
  const bool blocked_step = steps.blocked_step, fuse_input = steps.fuse_input, dot = steps.dot,
             one_step = steps.one_step;
  MklPacked mkl_whh;
  if constexpr (std::is_same_v<scalar_t, float> && !own_rows)
    if (!blocked_step) mkl_whh.pack(w_hh.data_ptr<float>(), P, true, B, G4, P);
  // Inference (gates undefined) keeps gates in reused per-thread scratch memory; with the projection fused it
  // keeps a single step's [B, 4H], which every step overwrites while it is in cache, instead of streaming T
  // steps of gates through memory.
  const bool reuse_gates = !gates.defined() && fuse_input;
  if (!gates.defined()) {
    const int64_t rows = reuse_gates ? B : T * B;
    const size_t bytes = std::max<int64_t>(1, rows * G4) * sizeof(scalar_t);
    const std::vector<int64_t> shape{reuse_gates ? 1 : T, B, G4};
    gates = Scratch::keeps(bytes) ? at::from_blob(gates_scratch().get(bytes), shape, y.options())
                                  : at::empty(shape, y.options());
  }
  const int64_t g_step = reuse_gates ? 0 : B * G4;
  const elem_t* xp = reinterpret_cast<const elem_t*>(x.data_ptr());
  if (steps.dot_input) {
    scalar_t* G0 = gates.data_ptr<scalar_t>();
    std::fill(G0, G0 + T * B * G4, scalar_t(0));
    step_dot<Dot>(xp, ldx, wih_u, ki, G0, G4, T * B, G4);
  } else if (!fuse_input) {
    // Bf16Dot's products are the kernel's always (no library call takes bf16 in, float out).
    if (own_rows || own_projection<scalar_t>(B, G4 * I)) {
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
  scalar_t* hp = h.data_ptr<scalar_t>();
  scalar_t* cp = c.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int threads = team_threads<scalar_t>(B, H, P, proj, /*backward=*/false);
  if (blocked_step && threads > 1 && steps.split == 1 && !one_step) {
    forward_team<scalar_t, Dot>(threads, d, live, reverse, G, g_step, bp, whh_u, hp, cp, yp, c_hist,
                                fuse_input ? wih_u : nullptr, xp, ldx);
    return;
  }
  if (proj && !one_step) WhrT.pack(w_hr->data_ptr<scalar_t>(), H, P, 1, H);  // B[k, n] = w_hr[n, k]
  if (fuse_input) WihT.pack(wih_u, ki, G4, 1, ki);  // B[k, n] = w_ih[n, k]
  if (blocked_step && !dot) WhhT.pack(whh_u, kh, G4, 1, kh);  // B[k, n] = w_hh[n, k]
  const int64_t ldh = row_stride<Dot>(P);
  // The time loop for rows [r0, r1): every pointer below is offset to row r0, row strides stay B's.
  auto run_rows = [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0;
    std::vector<scalar_t> h_raw(proj ? rows * H : 0);
    // The h the kernel reads: hp itself, or its rows in the kernel's type (converted back into hp at the end).
    std::vector<elem_t> h_rows(own_rows ? rows * ldh : 0);
    scalar_t* hr = hp + r0 * P;
    scalar_t* cr = cp + r0 * H;
    elem_t* hk = nullptr;
    if constexpr (own_rows) {
      hk = h_rows.data();
      rows_to_kernel<Dot>(hr, P, hk, ldh, rows, P);
    } else {
      hk = hr;
    }
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t n = std::clamp<int64_t>(live[t] - r0, 0, rows);
      if (n == 0) continue;
      scalar_t* Gt = G + t * g_step + r0 * G4;
      if (dot) {
        step_dot<Dot>(hk, ldh, whh_u, kh, Gt, G4, n, G4);
      } else if (blocked_step) {
        // fuse_input: the gates are x_t @ w_ih^T + h @ w_hh^T, both here; else the first term is already in G
        const StepOperand<Dot> input{xp + (t * B + r0) * ldx, ldx, &WihT};
        // Odd steps back to front, as in forward_team (one thread, B2-T200-H384: 1.13x; B4-T100-H384 1.04x).
        step_gemm<Dot>(hk, ldh, WhhT, Gt, G4, n, /*accumulate=*/true, fuse_input ? &input : nullptr, s & 1);
      } else if constexpr (!own_rows) {
        if (mkl_whh.ok) {
          // All B rows even when fewer are live: rows past n of this step's gate buffer are never read, and the
          // packed weight is valid for exactly B rows. (The rows are never split here: r0 is 0.)
          if constexpr (std::is_same_v<scalar_t, float>) mkl_whh.run(hp, P, Gt, G4, /*accumulate=*/true);
        } else {
          gemm(false, true, n, G4, P, scalar_t(1), hr, P, w_hh.data_ptr<scalar_t>(), P, scalar_t(1), Gt, G4);
        }
      }
      scalar_t* yt = yp + (t * B + r0) * P;
      scalar_t* ch = c_hist != nullptr ? c_hist + (t * B + r0) * H : nullptr;
      scalar_t* cell_out = proj ? h_raw.data() : yt;
      for_rows(n, 16 * H, [&](int64_t r) {
        cell_row<scalar_t>(Gt + r * G4, bp, cr + r * H, ch != nullptr ? ch + r * H : nullptr, cell_out + r * H, H, H);
      });
      if (proj && one_step) {
        std::fill(yt, yt + n * P, scalar_t(0));
        step_dot<FmaDot<scalar_t>>(h_raw.data(), H, w_hr->data_ptr<scalar_t>(), H, yt, P, n, P);
      } else if (proj) {
        step_gemm<FmaDot<scalar_t>>(h_raw.data(), H, WhrT, yt, P, n, /*accumulate=*/false);
      }
      if constexpr (own_rows) {
        for (int64_t r = 0; r < n; ++r) publish<Dot>(yt + r * P, hk + r * ldh, P);
      } else {
        std::memcpy(hr, yt, n * P * sizeof(scalar_t));
      }
    }
    if constexpr (own_rows) rows_from_kernel<Dot>(hk, ldh, hr, P, rows, P);
  };
  run_row_split(row_split_ranges(live, B, steps.split), run_rows);
}

// forward_impl, and for inference (no c_hist: nothing saved for backward) where the gates of every step would be
// kept (the input projected up front, not per step) and the sequence is long, chunk by chunk of steps
// (inference_chunk_steps), each chunk's steps picking up the state where the previous chunk left it; reverse takes
// the chunks last first. Rows not live in a chunk keep their state through it, as through any step.
template <typename scalar_t, typename Dot>
void forward_chunked(const Dims& d, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                     const c10::optional<Tensor>& b, const c10::optional<Tensor>& w_hr,
                     const std::vector<int64_t>& live, bool reverse, Tensor& gates, Tensor& y, Tensor& h, Tensor& c,
                     scalar_t* c_hist) {
  const int64_t chunk = inference_chunk_steps(d.B, d.H, sizeof(scalar_t));
  const bool fused =
      forward_steps<scalar_t, Dot>(d.T, d.B, x.size(2), d.H, w_hh.size(1), w_hr.has_value(), c_hist == nullptr)
          .fuse_input;
  // Up to two chunks' worth in one piece: a call just past a chunk is not cut in two.
  if (c_hist != nullptr || fused || d.T <= (inference_chunk_override() > 0 ? chunk : 2 * chunk)) {
    forward_impl<scalar_t, Dot>(d, x, w_ih, w_hh, b, w_hr, live, reverse, gates, y, h, c, c_hist);
    return;
  }
  for (int64_t done = 0; done < d.T; done += chunk) {
    const int64_t len = std::min(chunk, d.T - done), t0 = reverse ? d.T - done - len : done;
    Dims part = d;
    part.T = len;
    const std::vector<int64_t> part_live(live.begin() + t0, live.begin() + t0 + len);
    Tensor part_gates, y_part = y.narrow(0, t0, len);
    forward_impl<scalar_t, Dot>(part, x.narrow(0, t0, len), w_ih, w_hh, b, w_hr, part_live, reverse, part_gates,
                                y_part, h, c, nullptr);
  }
}

// A bfloat16 tensor as Bf16Dot reads it: contiguous, the last dimension rounded up to even with a zero.
Tensor bf16_pairs(const Tensor& t) {
  return t.size(-1) % 2 == 0 ? t.contiguous() : at::constant_pad_nd(t, {0, 1}).contiguous();
}

// One layer's forward (d: check_layer_args'). h, c: the initial state in the compute dtype, contiguous, which the
// layer leaves holding its final state. Returns y, in x's dtype; with `save`, gates and c_hist for backward.
Tensor forward_layer(const Dims& d, const Tensor& x_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
                     const c10::optional<Tensor>& b_in, const c10::optional<Tensor>& w_hr_in,
                     const c10::optional<Tensor>& batch_sizes, bool reverse, bool save, Tensor& h, Tensor& c,
                     Tensor& gates, Tensor& c_hist) {
  const auto live = live_rows(batch_sizes, d.T, d.B);
  const bool packed = is_packed(batch_sizes);
  const at::ScalarType dt = x_in.scalar_type(), ct = compute_type(dt);
  const bool bf16_dot = runs_bf16_dot(dt);
  const auto opts = x_in.options().dtype(ct);
  auto b = as_compute(b_in, ct);
  auto w_hr = as_compute(w_hr_in, ct);
  // Training keeps every step's gates for backward; inference leaves them to forward_impl (undefined here).
  gates = save ? pooled_tensor({d.T, d.B, 4 * d.H}, opts, /*zero=*/false) : Tensor();
  Tensor y = packed ? at::zeros({d.T, d.B, d.P}, opts) : at::empty({d.T, d.B, d.P}, opts);
  c_hist = save ? pooled_tensor({d.T, d.B, d.H}, opts, /*zero=*/packed) : at::empty({0}, opts);
  if (d.T > 0 && d.B > 0) {
    if (bf16_dot) {
      forward_chunked<float, Bf16Dot>(d, bf16_pairs(x_in), bf16_pairs(w_ih_in), bf16_pairs(w_hh_in), b, w_hr, live,
                                      reverse, gates, y, h, c, save ? c_hist.data_ptr<float>() : nullptr);
    } else {
      const Tensor x = as_compute(x_in, ct), w_ih = as_compute(w_ih_in, ct), w_hh = as_compute(w_hh_in, ct);
      AT_DISPATCH_FLOATING_TYPES(ct, "fastlstm_cpp_lstm_fwd", [&] {
        forward_chunked<scalar_t, FmaDot<scalar_t>>(d, x, w_ih, w_hh, b, w_hr, live, reverse, gates, y, h, c,
                                                    save ? c_hist.data_ptr<scalar_t>() : nullptr);
      });
    }
  }
  if (!save) gates = at::empty({0}, opts);
  return dt != ct ? y.to(dt) : y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                           const Tensor& w_ih, const Tensor& w_hh,
                                                           const c10::optional<Tensor>& b,
                                                           const c10::optional<Tensor>& w_hr,
                                                           const c10::optional<Tensor>& batch_sizes, bool reverse,
                                                           bool save) {
  const Dims d = check_args(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes);
  if (!save) tensor_pool().inference_call();
  const at::ScalarType dt = x.scalar_type(), ct = compute_type(dt);
  Tensor h = h0.to(ct, /*non_blocking=*/false, /*copy=*/true).contiguous();
  Tensor c = c0.to(ct, false, true).contiguous();
  Tensor gates, c_hist;
  const Tensor y = forward_layer(d, x, w_ih, w_hh, b, w_hr, batch_sizes, reverse, save, h, c, gates, c_hist);
  if (dt != ct) {
    h = h.to(dt);
    c = state_to(c, dt);
  }
  return {y, h, c, gates, c_hist};
}

// Packed data [N, F] in a PackedSequence's order (each step's live rows, longest sequences first) for batch sizes
// `live`, as the padded, time-major batch [T, B, F] the layers take (zero where no sequence is live), and back.
// The module did both in Python (an index of the live rows, index_copy, index_select): at batch 2, 5 steps, that
// took longer than the whole stack's call. One copy a step here.
std::vector<int64_t> packed_batch_sizes(const Tensor& data, const Tensor& batch_sizes) {
  TORCH_CHECK(data.device().is_cpu(), "fastlstm cpp: tensors must be on the CPU");
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong && batch_sizes.dim() == 1 &&
                  batch_sizes.numel() > 0,
              "fastlstm cpp: batch_sizes must be an int64 CPU tensor [T], T > 0");
  const Tensor bs = batch_sizes.contiguous();
  const int64_t* p = bs.data_ptr<int64_t>();
  std::vector<int64_t> live(p, p + bs.numel());
  int64_t rows = 0;
  for (size_t t = 0; t < live.size(); ++t) {
    TORCH_CHECK(live[t] > 0 && live[t] <= live[0],
                "fastlstm cpp: packed batch_sizes must be positive and at most batch_sizes[0], got ", batch_sizes);
    // bounded before the sum: batch_sizes that sum past int64 (no tensor has that many rows) overflowed it
    TORCH_CHECK(live[t] <= data.size(0) - rows, "fastlstm cpp: packed batch_sizes sum past the data's ",
                data.size(0), " rows");
    rows += live[t];
  }
  // Rows past the batch sizes' sum (a hand-built pack over a buffer larger than its batch) are left out, as
  // nn.LSTM leaves them: its output has the sum's rows.
  return live;
}

Tensor pad_packed_rows(const Tensor& data, const std::vector<int64_t>& live) {
  const int64_t T = static_cast<int64_t>(live.size()), B = live[0], F = data.size(1);
  const Tensor src = data.contiguous();
  Tensor padded = at::zeros({T, B, F}, data.options());
  const int64_t row_bytes = F * static_cast<int64_t>(data.element_size());
  const char* from = static_cast<const char*>(src.data_ptr());
  char* to = static_cast<char*>(padded.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(to + t * B * row_bytes, from, live[t] * row_bytes);
    from += live[t] * row_bytes;
  }
  return padded;
}

Tensor pack_padded_rows(const Tensor& padded, const std::vector<int64_t>& live) {
  const int64_t T = static_cast<int64_t>(live.size()), B = live[0], F = padded.size(2);
  const Tensor src = padded.contiguous();
  Tensor data = at::empty({std::accumulate(live.begin(), live.end(), int64_t{0}), F}, padded.options());
  const int64_t row_bytes = F * static_cast<int64_t>(padded.element_size());
  const char* from = static_cast<const char*>(src.data_ptr());
  char* to = static_cast<char*>(data.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(to, from + t * B * row_bytes, live[t] * row_bytes);
    to += live[t] * row_bytes;
  }
  return data;
}

// A whole stack at inference, each (layer, direction) through forward_layer as a call of lstm_fwd of its own would
// run it (the same numbers: the same kernel, the same b_ih + b_hh, the directions' outputs concatenated as the
// module concatenates them), in one call from Python, with the state of every layer in one tensor from start to
// end. At batch 1 a layer's products take a few microseconds, and its call from Python (arguments, outputs, the
// autograd wrapper, the bias sum, the state's copies, unbind and stack) several times that.
// weights: per (layer, direction) w_ih, w_hh, then `biases` biases (2: nn.LSTM's _flat_weights, b_ih and b_hh; 1:
// their sum, as the module casts it under autocast; 0: none)[, w_hr]; h0 [L*D, B, P] and
// c0 [L*D, B, H], or neither for zeros; batch_sizes as for lstm_fwd (packed input, padded to [T, B, I]), or with x
// the packed data itself [N, I] (y then packed too, [N, D*P]). x [B, I] without batch_sizes is a single step (y
// then [B, P]).
std::tuple<Tensor, Tensor, Tensor> lstm_stack_fwd(const Tensor& x_in, const c10::optional<Tensor>& h0,
                                                  const c10::optional<Tensor>& c0, at::TensorList weights,
                                                  const c10::optional<Tensor>& batch_sizes, int64_t biases,
                                                  bool has_proj, bool bidirectional) {
  TORCH_CHECK(biases >= 0 && biases <= 2, "fastlstm cpp_lstm_stack_fwd: biases must be 0, 1 or 2, got ", biases);
  tensor_pool().inference_call();
  const size_t per_layer = 2 + static_cast<size_t>(biases) + (has_proj ? 1 : 0);
  const int64_t directions = bidirectional ? 2 : 1;
  TORCH_CHECK(!weights.empty() && weights.size() % (per_layer * directions) == 0, "fastlstm cpp_lstm_stack_fwd: ",
              weights.size(), " weights for layers of ", per_layer, " in ", directions, " direction(s)");
  TORCH_CHECK(h0.has_value() == c0.has_value(), "fastlstm cpp_lstm_stack_fwd: h0 and c0 come together");
  const int64_t count = static_cast<int64_t>(weights.size() / per_layer);  // (layer, direction) pairs
  auto bias = [&](at::TensorList w) -> c10::optional<Tensor> {
    if (biases == 0) return c10::nullopt;
    if (biases == 1) return w[2];
    // each as check_layer_args checks the sum: their sum would broadcast a [1]-shaped or int bias
    for (const Tensor& one : {w[2], w[3]}) {
      TORCH_CHECK(one.dim() == 1 && one.size(0) == w[0].size(0), "fastlstm cpp: b_ih and b_hh must be [4H] = [",
                  w[0].size(0), "], got ", one.sizes());
      TORCH_CHECK(one.scalar_type() == x_in.scalar_type(), "fastlstm cpp: all tensors must have x's dtype ",
                  x_in.scalar_type(), ", got ", one.scalar_type());
    }
    return at::add(w[2], w[3]);
  };
  auto projection = [&](at::TensorList w) {
    return has_proj ? c10::optional<Tensor>(w[per_layer - 1]) : c10::nullopt;
  };
  const bool packed_data = x_in.dim() == 2 && is_packed(batch_sizes);
  const bool one_step = x_in.dim() == 2 && !packed_data;
  const std::vector<int64_t> live = packed_data ? packed_batch_sizes(x_in, *batch_sizes) : std::vector<int64_t>();
  const Tensor x = packed_data ? pad_packed_rows(x_in, live) : one_step ? x_in.unsqueeze(0) : x_in;
  const at::ScalarType dt = x.scalar_type(), ct = compute_type(dt);
  Tensor h_n, c_n;
  Tensor layer_in = x;
  for (int64_t k0 = 0; k0 < count; k0 += directions) {
    std::vector<Tensor> outputs;
    for (int64_t k = k0; k < k0 + directions; ++k) {
      const at::TensorList w = weights.slice(k * per_layer, per_layer);
      const auto b = bias(w), w_hr = projection(w);
      const Dims d = check_layer_args(layer_in, w[0], w[1], b, w_hr, batch_sizes);
      if (k == 0) {
        if (h0.has_value()) {
          check_state(d, x, *h0, *c0, count);
          h_n = h0->to(ct, /*non_blocking=*/false, /*copy=*/true).contiguous();
          c_n = c0->to(ct, false, true).contiguous();
        } else {
          h_n = at::zeros({count, d.B, d.P}, x.options().dtype(ct));
          c_n = at::zeros({count, d.B, d.H}, x.options().dtype(ct));
        }
      }
      TORCH_CHECK(h_n.size(2) == d.P && c_n.size(2) == d.H, "fastlstm cpp_lstm_stack_fwd: layer ", k / directions,
                  " has another hidden or projection size than layer 0");
      Tensor h = h_n.select(0, k), c = c_n.select(0, k), gates, c_hist;
      outputs.push_back(forward_layer(d, layer_in, w[0], w[1], b, w_hr, batch_sizes, /*reverse=*/k > k0,
                                      /*save=*/false, h, c, gates, c_hist));
    }
    layer_in = outputs.size() == 1 ? outputs[0] : at::cat(outputs, 2);
  }
  if (dt != ct) {
    h_n = h_n.to(dt);
    c_n = state_to(c_n, dt);
  }
  if (packed_data) return {pack_padded_rows(layer_in, live), h_n, c_n};
  return {one_step ? layer_in.squeeze(0) : layer_in, h_n, c_n};
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

// Is step t the first step a row r takes (its previous state is h0/c0)?
inline bool first_step(const std::vector<int64_t>& live, int64_t T, int64_t t, int64_t r, bool reverse) {
  if (!reverse) return t == 0;
  return t == T - 1 || r >= live[t + 1];
}

// acc[j] += v[j] for j < n, in double: a step's gate gradients into the bias gradient as backward makes them, while
// they are in cache. A sum over all T * B rows afterwards kept, in bfloat16 training, a float32 [T, B, 4H] of
// them for that sum alone: 105 MB of the 418 a B64-T200-H512 step grew the process by (310 without it). Time
// was even (one and two threads, bfloat16 and float32, six shapes), the error of db lower (float32: 0.12-0.21x
// nn.LSTM's mean against float64, from 0.16-0.26x).
template <typename scalar_t>
inline void add_into(double* __restrict__ acc, const scalar_t* __restrict__ v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<double>(v[j]);
}

// The backward time loop without projection (P == H) on `threads` threads (see forward_team). Each step, each
// thread turns its hidden slice's incoming gradient into dgates (all four gates of the slice); after the one
// barrier it computes its slice of dh for the previous step from all of dgates. The next step's cell needs only
// the thread's own slice of dh, and writes another step's dgates, so one barrier a step suffices.
// dh, dc: grad_hT, grad_cT in; dh0, dc0 out. w_hh as the kernel's units, B[k, n] = w[k * sk + n * sn] with k over
// 4H / Dot::pair units; dgk: dgates as the kernel reads them (dgates itself for FmaDot). dgates: the gate
// gradients [T, B, 4H] in scalar_t where the products read them (FmaDot); nullptr where they read dgk alone
// (Bf16Dot), a row's then in a scratch row only. db_blocks: where not nullptr, the bias gradient of each block of
// kRowBlock rows accumulates in db_blocks[its first row] (backward_impl), each thread over its own units.
template <typename scalar_t, typename Dot>
void backward_team(int threads, const Dims& d, const std::vector<int64_t>& live, bool reverse, const scalar_t* gy,
                   const scalar_t* gates, const scalar_t* c_hist, const scalar_t* c0, const typename Dot::unit_t* w_hh,
                   int64_t sk, int64_t sn, scalar_t* dgates, typename Dot::elem_t* dgk, scalar_t* dh, scalar_t* dc,
                   std::vector<double>* db_blocks) {
  const int64_t T = d.T, B = d.B, H = d.H, G4 = 4 * H;
  constexpr int64_t W = Packed<Dot>::W;
  std::vector<scalar_t> dht(B * H);  // the total gradient reaching this step's h
  SpinBarrier barrier;
  RegionErrors errors;
#pragma omp parallel num_threads(threads)
  {
    const TeamSlice slice = join_team<scalar_t>(barrier, H);
    const int64_t j0 = slice.j0, j1 = slice.j1, width = slice.width;
    std::vector<scalar_t> row_dg(dgates == nullptr ? G4 : 0);  // a row's gate gradients, without dgates
    Packed<Dot> Wd;  // this slice of w_hh: B[k, n] = w_hh[k, j0 + n], k over 4H
    errors.run([&] {
      if (width > 0) Wd.pack(w_hh + j0 * sn, G4 / Dot::pair, width, sk, sn, /*parallel=*/false);
    });
#pragma omp barrier
    int gen = 0;
    const int64_t steps = errors.failed() ? 0 : T;  // as forward_team
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? s : T - 1 - s;  // the forward's steps, last first
      const int64_t n = live[t];
      const int64_t prev_t = reverse ? t + 1 : t - 1;
      if (width > 0) {
        for (int64_t r = 0; r < n; ++r) {
          scalar_t* dhr = dht.data() + r * H;
          const scalar_t* gyr = gy + (t * B + r) * H;
          for (int64_t j = j0; j < j1; ++j) dhr[j] = dh[r * H + j] + gyr[j];
          const scalar_t* cprev = first_step(live, T, t, r, reverse) ? c0 + r * H : c_hist + (prev_t * B + r) * H;
          scalar_t* dg = (dgates == nullptr ? row_dg.data() : dgates + (t * B + r) * G4) + j0;
          cell_row_backward<scalar_t>(gates + (t * B + r) * G4 + j0, c_hist + (t * B + r) * H + j0, cprev + j0,
                                      dhr + j0, dc + r * H + j0, dg, nullptr, width, H);
          if (db_blocks != nullptr) {
            double* db = db_blocks[r / kRowBlock * kRowBlock].data() + j0;
            for (int q = 0; q < 4; ++q) add_into(db + q * H, dg + q * H, width);
          }
          if constexpr (!std::is_same_v<typename Dot::elem_t, scalar_t>)
            for (int q = 0; q < 4; ++q) to_kernel<Dot>(dg + q * H, dgk + (t * B + r) * G4 + j0 + q * H, width, nullptr);
        }
      }
      barrier.wait(gen);
      if (width > 0)
        for (int64_t pi = 0; pi < Wd.panels; ++pi) {
          const int64_t p = s & 1 ? Wd.panels - 1 - pi : pi;  // back and forth, as forward_team (B1-H384 1.09x)
          panel_rows<Dot>(dgk + t * B * G4, G4, Wd.panel(p), Wd.steps, dh + j0 + p * W, H, n,
                          std::min(W, width - p * W), /*accumulate=*/false);
        }
    }
  }
  errors.rethrow();
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
  parallel_for(0, T, 16, [&](int64_t tb, int64_t te) {
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

// Whether a packed row's last output y (forward direction) is NaN or inf. The next step's dw_hh product reads it
// where the row has ended and its dgates are zero: 0 * NaN is NaN, a term nn.LSTM's packed loop never forms. Only
// the rows that end before the last step are read (at most B), not a copy of y (previous_h: 1-4% of a packed
// training call, B32-T100-H256). Rows ended earlier hold y's zeros.
template <typename scalar_t>
bool ended_rows_nonfinite(const Tensor& y, const std::vector<int64_t>& live) {
  const int64_t T = y.size(0), B = y.size(1), P = y.size(2);
  const scalar_t* yp = y.data_ptr<scalar_t>();
  for (int64_t t = 1; t < T; ++t) {
    for (int64_t r = live[t]; r < live[t - 1]; ++r) {
      const scalar_t* row = yp + ((t - 1) * B + r) * P;
      for (int64_t p = 0; p < P; ++p) {
        if (!std::isfinite(row[p])) return true;
      }
    }
  }
  return false;
}

// What backward leaves for the weight gradients, where its caller computes them (per-sample gradients): dgates
// [T, B, 4H], the h each step read [T, B, P] (previous_h), and with a projection the total gradient reaching each
// output h [T, B, P] and the unprojected h [T, B, H]; dgates and the projection's rows are zero where a row is not
// live.
struct GateRows {
  Tensor dgates, h_prev, dh_out, h_raw;
};

// FmaDot: every tensor in scalar_t. Bf16Dot (scalar_t float): x, h0, w_ih and y are bfloat16, w_hh_k is w_hh^T
// [P, 4H] in bfloat16 (so that pairs of k are adjacent), and the recurrent product and the large weight and
// input gradient products take dgates rounded to bfloat16, as native bf16 does; the cell, c, dh and db stay float.
// An undefined dx (the input needs no gradient: a first layer fed data) or dw_ih (no weight needs one) skips
// that product: dx = dgates @ w_ih is as large as each weight's gradient product.
template <typename scalar_t, typename Dot>
void backward_impl(const Dims& d, const Tensor& grad_y, const Tensor& x, const Tensor& h0, const Tensor& c0,
                   const Tensor& w_ih, const Tensor& w_hh_k, const c10::optional<Tensor>& w_hr,
                   const std::vector<int64_t>& live, const Tensor& y, const Tensor& gates, const Tensor& c_hist,
                   bool reverse, bool packed, Tensor& dx, Tensor& dh, Tensor& dc, Tensor& dw_ih, Tensor& dw_hh,
                   Tensor& db, Tensor& dw_hr, GateRows* rows = nullptr) {
  using elem_t = typename Dot::elem_t;
  using unit_t = typename Dot::unit_t;
  constexpr bool own_rows = !std::is_same_v<elem_t, scalar_t>;
  const int64_t T = d.T, B = d.B, I = d.I, H = d.H, P = d.P, G4 = 4 * H;
  const bool proj = w_hr.has_value();
  const auto opts = grad_y.options();
  // Without rows to hand back and without dw_ih to fill, no weight needs a gradient (frozen weights, gradients for
  // the input only): the weight gradients' products, a third of a training step's, are skipped.
  const bool weights = rows == nullptr && dw_ih.defined();
  // The gate gradients the products read: in scalar_t (FmaDot), or rounded to elem_t (Bf16Dot), whose scalar_t
  // rows then live a step at a time in a scratch row block (the bias gradient sums them as they are made).
  Tensor dgates = own_rows ? Tensor() : pooled_tensor({T, B, G4}, opts, /*zero=*/packed);
  Tensor dgates_k = own_rows ? pooled_tensor({T, B, G4}, x.options(), /*zero=*/packed) : dgates;
  // The bias gradient in double, summed as the time loop makes the gate gradients, per block of kRowBlock rows
  // (cut where a range of the row split starts or ends; by its first row), the blocks then added in row order:
  // the same sums whichever loop ran (the team's threads own units, the row split's threads rows).
  std::vector<std::vector<double>> db_blocks(weights ? B : 0);
  // With projection: the total gradient reaching each output h [T,B,P] and the unprojected h [T,B,H].
  Tensor dh_all, hraw_all;
  if (proj) {
    dh_all = packed ? at::zeros({T, B, P}, opts) : at::empty({T, B, P}, opts);
    hraw_all = packed ? at::zeros({T, B, H}, opts) : at::empty({T, B, H}, opts);
  }
  scalar_t* dgp = own_rows ? nullptr : dgates.data_ptr<scalar_t>();
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
  // The reverse time loop for rows [r0, r1): every pointer below is offset to row r0, row strides stay B's.
  auto run_rows = [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0;
    std::vector<scalar_t> dh_tot(rows * P), dh_raw(proj ? rows * H : 0);
    std::vector<scalar_t> dg_rows(own_rows ? rows * G4 : 0);  // this step's gate gradients, without dgates
    if (weights)
      for (int64_t r = r0; r < r1; r = (r / kRowBlock + 1) * kRowBlock) db_blocks[r].assign(G4, 0.0);
    scalar_t* dhr = dhp + r0 * P;
    scalar_t* dcr = dcp + r0 * H;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? s : T - 1 - s;  // the forward's steps, last first
      const int64_t n = std::clamp<int64_t>(live[t] - r0, 0, rows);
      if (n == 0) continue;
      const int64_t prev_t = reverse ? t + 1 : t - 1;
      const int64_t row_t = t * B + r0;  // this step's first row of ours in [T, B, *] tensors
      // Total gradient reaching this step's output h.
      scalar_t* dht = proj ? dh_all.data_ptr<scalar_t>() + row_t * P : dh_tot.data();
      const scalar_t* gyt = gy + row_t * P;
      for (int64_t k = 0; k < n * P; ++k) dht[k] = dhr[k] + gyt[k];
      const scalar_t* dhu = dht;  // gradient w.r.t. the unprojected o * tanh(c)
      if (proj) {
        step_gemm<FmaDot<scalar_t>>(dht, P, Whr, dh_raw.data(), H, n, /*accumulate=*/false);
        dhu = dh_raw.data();
      }
      scalar_t* hraw_t = proj ? hraw_all.data_ptr<scalar_t>() + row_t * H : nullptr;
      scalar_t* dgt = own_rows ? dg_rows.data() : dgp + row_t * G4;  // this step's gate gradients, row r0 first
      for_rows(n, 16 * H, [&](int64_t i) {
        const int64_t r = r0 + i;
        const scalar_t* cprev = first_step(live, T, t, r, reverse) ? c0p + r * H : chp + (prev_t * B + r) * H;
        cell_row_backward<scalar_t>(gp + (row_t + i) * G4, chp + (row_t + i) * H, cprev, dhu + i * H, dcr + i * H,
                                    dgt + i * G4, hraw_t != nullptr ? hraw_t + i * H : nullptr, H, H);
      });
      if (weights)
        for (int64_t i = 0; i < n; ++i)
          add_into(db_blocks[std::max(r0, (r0 + i) / kRowBlock * kRowBlock)].data(), dgt + i * G4, G4);
      // dh for the previous step: dgates @ w_hh  ([n, 4H] @ [4H, P]).
      if (blocked_step) {
        if constexpr (own_rows) to_kernel<Dot>(dgt, dgk + row_t * G4, n * G4, nullptr);
        // Odd steps back to front, as in forward_team (B2-T200-H384 1.06x, B2-T100-H1024 1.09x on two threads).
        step_gemm<Dot>(dgk + row_t * G4, G4, Whh, dhr, P, n, /*accumulate=*/false, nullptr, s & 1);
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
          gemm(false, false, n, P, G4, scalar_t(1), dgp + row_t * G4, G4, w_hh_k.data_ptr<scalar_t>(), P,
               scalar_t(0), dhr, P);
        }
      }
    }
  };
  // The weights every step reads: w_hh, and w_hr with a projection.
  const int64_t step_bytes = G4 * P * sizeof(elem_t) + (proj ? H * P * sizeof(scalar_t) : 0);
  const int split = blocked_step ? row_split_threads(B, d.T, step_bytes) : 1;
  if (blocked_step && threads > 1 && split == 1) {
    if (weights)
      for (int64_t r = 0; r < B; r += kRowBlock) db_blocks[r].assign(G4, 0.0);
    backward_team<scalar_t, Dot>(threads, d, live, reverse, gy, gp, chp, c0p, whh_u, sk, sn, dgp, dgk, dhp, dcp,
                                 weights ? db_blocks.data() : nullptr);
  } else {
    if (blocked_step) Whh.pack(whh_u, G4 / Dot::pair, P, sk, sn);
    run_row_split(row_split_ranges(live, B, split), run_rows);
  }
  // Weight and input gradients: large GEMMs over all T*B rows.
  const int64_t TB = T * B;
  if (weights) {
    std::vector<double> sum(G4, 0.0);
    for (const auto& block : db_blocks)
      if (!block.empty()) add_into(sum.data(), block.data(), G4);
    scalar_t* dbp = db.data_ptr<scalar_t>();
    for (int64_t g = 0; g < G4; ++g) dbp[g] = static_cast<scalar_t>(sum[g]);
    if (proj) weight_grad<scalar_t>(dh_all.view({TB, P}), hraw_all.view({TB, H}), dw_hr);
  }
  if constexpr (own_rows) {
    // bf16 in, bf16 out (float accumulation inside): the results' dtype, rounded once.
    Tensor dgk2 = dgates_k.view({TB, G4});
    if (dx.defined()) dx = bf16_mm(dgk2, w_ih).view({T, B, I});
    if (!weights) return;
    dw_ih = bf16_mm(dgk2.t(), x.view({TB, I}));
    dw_hh = bf16_mm(dgk2.t(), previous_h<elem_t>(y, h0, live, reverse).view({TB, P}));
    return;
  }
  Tensor dg2 = dgates.view({TB, G4});
  if (dx.defined()) {
    Tensor dx2 = dx.view({TB, I});
    if (own_projection<scalar_t>(B, G4 * I)) {
      Packed<FmaDot<scalar_t>> WihB;
      WihB.pack(w_ih.data_ptr<scalar_t>(), G4, I, I, 1);  // B[k, n] = w_ih[k, n]
      step_gemm<FmaDot<scalar_t>>(dg2.data_ptr<scalar_t>(), G4, WihB, dx2.data_ptr<scalar_t>(), I, TB,
                                  /*accumulate=*/false);
    } else {
      linear_nt<scalar_t>(dg2, w_ih.t(), dx2);
    }
    dx = dx2.view({T, B, I});
  }
  if (rows != nullptr) {
    *rows = {dgates, previous_h<scalar_t>(y, h0, live, reverse), dh_all, hraw_all};
    return;
  }
  if (!weights) return;
  weight_grad<scalar_t>(dg2, x.view({TB, I}), dw_ih);
  if (!(reverse && packed) && !ended_rows_nonfinite<scalar_t>(y, live)) {
    // Every row's first step is the same step (0, or T-1 in reverse), where h_prev is h0; elsewhere it is y of
    // the previous step (rows not live at a step have zero dgates, and there y is finite: 0 * y adds nothing).
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
  // Packed reverse: rows start at different steps. Or a row's last output is NaN or inf: previous_h reads it as
  // zero at the steps after the row's end.
  weight_grad<scalar_t>(dg2, previous_h<scalar_t>(y, h0, live, reverse).view({TB, P}), dw_hh);
}

// What forward saved for backward: gates [T, B, 4H] and the cell history [T, B, H] in the compute dtype ct.
void check_saved(const Dims& d, const Tensor& gates, const Tensor& c_hist, at::ScalarType ct) {
  TORCH_CHECK(gates.numel() == d.T * d.B * 4 * d.H && c_hist.numel() == d.T * d.B * d.H,
              "fastlstm cpp: backward needs the saved gates and cell history (forward ran with save=false)");
  TORCH_CHECK(gates.sizes() == c10::IntArrayRef({d.T, d.B, 4 * d.H}) &&
                  c_hist.sizes() == c10::IntArrayRef({d.T, d.B, d.H}),
              "fastlstm cpp: saved gates must be [T, B, 4H] and the cell history [T, B, H], got ", gates.sizes(),
              " and ", c_hist.sizes());
  TORCH_CHECK(gates.scalar_type() == ct && c_hist.scalar_type() == ct, "fastlstm cpp: saved tensors must be ", ct,
              ", got ", gates.scalar_type(), " and ", c_hist.scalar_type());
  TORCH_CHECK(gates.device().is_cpu() && c_hist.device().is_cpu(), "fastlstm cpp: tensors must be on the CPU");
}

// The incoming gradients and the forward's output: y and grad_y [T, B, P], grad_hT and grad_cT as h0 and c0, all in
// x's dtype (the kernels read y as x's rows: a y of 1-byte items overran its copy).
void check_gradients(const Dims& d, const Tensor& x, const Tensor& grad_y, const Tensor& grad_hT,
                     const Tensor& grad_cT, const Tensor& y, const Tensor& h0, const Tensor& c0) {
  TORCH_CHECK(grad_y.sizes() == y.sizes() && y.dim() == 3 && y.size(0) == d.T && y.size(1) == d.B &&
                  y.size(2) == d.P,
              "fastlstm cpp: grad_y / y must be [T, B, P]");
  TORCH_CHECK(grad_hT.sizes() == h0.sizes() && grad_cT.sizes() == c0.sizes(), "fastlstm cpp: grad_hT / grad_cT shapes");
  for (const Tensor* t : {&grad_y, &grad_hT, &grad_cT, &y}) {
    TORCH_CHECK(t->device().is_cpu(), "fastlstm cpp: tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "fastlstm cpp: all tensors must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd(
    const Tensor& grad_y_in, const Tensor& grad_hT_in, const Tensor& grad_cT_in, const Tensor& x_in,
    const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
    const c10::optional<Tensor>& w_hr_in, const c10::optional<Tensor>& batch_sizes, const Tensor& y_in,
    const Tensor& gates_in, const Tensor& c_hist_in, bool reverse, bool has_bias, bool weight_grads,
    bool input_grad) {
  const Dims d = check_args(x_in, h0_in, c0_in, w_ih_in, w_hh_in, c10::nullopt, w_hr_in, batch_sizes);
  const auto live = live_rows(batch_sizes, d.T, d.B);
  const bool packed = is_packed(batch_sizes);
  const at::ScalarType dt = x_in.scalar_type(), ct = compute_type(dt);
  check_saved(d, gates_in, c_hist_in, ct);
  check_gradients(d, x_in, grad_y_in, grad_hT_in, grad_cT_in, y_in, h0_in, c0_in);
  const bool bf16_dot = runs_bf16_dot(dt);
  Tensor grad_y = as_compute(grad_y_in, ct), c0 = as_compute(c0_in, ct), gates = gates_in.contiguous(),
         c_hist = c_hist_in.contiguous();
  auto w_hr = as_compute(w_hr_in, ct);
  const auto opts = grad_y.options();
  Tensor dh = grad_hT_in.to(ct, false, true).contiguous();
  Tensor dc = grad_cT_in.to(ct, false, true).contiguous();
  // Without input_grad dx, and without weight_grads the weights' gradients, stay undefined, which tells
  // backward_impl to skip them, and go out empty.
  Tensor dx = input_grad ? at::empty({d.T, d.B, d.I}, opts) : Tensor();
  Tensor dw_ih, dw_hh, db, dw_hr;
  if (weight_grads) {
    dw_ih = at::empty({4 * d.H, d.I}, opts);
    dw_hh = at::empty({4 * d.H, d.P}, opts);
    db = at::empty({4 * d.H}, opts);
    dw_hr = w_hr.has_value() ? at::empty({d.P, d.H}, opts) : at::empty({0}, opts);
  }
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
    for (Tensor* t : {&dx, &dw_ih, &dw_hh, &db, &dw_hr})
      if (t->defined()) t->zero_();
  }
  for (Tensor* t : {&dx, &dw_ih, &dw_hh, &db, &dw_hr})
    if (!t->defined()) *t = at::empty({0}, opts);
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

// Backward without the weight gradients: dx, dh0, dc0 and the rows they are made of (GateRows), for a caller that
// sums them per sample of a batch (torch.vmap of per-sample gradients). float32 and float64. Without input_grad
// dx goes out empty, its product skipped, as in lstm_bwd.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd_rows(
    const Tensor& grad_y_in, const Tensor& grad_hT_in, const Tensor& grad_cT_in, const Tensor& x_in,
    const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
    const c10::optional<Tensor>& w_hr_in, const c10::optional<Tensor>& batch_sizes, const Tensor& y_in,
    const Tensor& gates_in, const Tensor& c_hist_in, bool reverse, bool input_grad) {
  const Dims d = check_args(x_in, h0_in, c0_in, w_ih_in, w_hh_in, c10::nullopt, w_hr_in, batch_sizes);
  const at::ScalarType dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "fastlstm cpp: backward by rows takes float32 or float64");
  check_saved(d, gates_in, c_hist_in, dt);
  check_gradients(d, x_in, grad_y_in, grad_hT_in, grad_cT_in, y_in, h0_in, c0_in);
  const auto live = live_rows(batch_sizes, d.T, d.B);
  const auto opts = x_in.options();
  const bool proj = w_hr_in.has_value();
  Tensor dh = grad_hT_in.to(dt, false, true).contiguous();
  Tensor dc = grad_cT_in.to(dt, false, true).contiguous();
  Tensor dx = input_grad ? at::empty({d.T, d.B, d.I}, opts) : Tensor();
  GateRows rows;
  if (d.T == 0 || d.B == 0) {
    rows = {at::empty({d.T, d.B, 4 * d.H}, opts), at::empty({d.T, d.B, d.P}, opts),
            proj ? at::empty({d.T, d.B, d.P}, opts) : at::empty({0}, opts),
            proj ? at::empty({d.T, d.B, d.H}, opts) : at::empty({0}, opts)};
  } else {
    Tensor unused;
    AT_DISPATCH_FLOATING_TYPES(dt, "fastlstm_cpp_lstm_bwd_rows", [&] {
      backward_impl<scalar_t, FmaDot<scalar_t>>(
          d, grad_y_in.contiguous(), x_in.contiguous(), h0_in.contiguous(), c0_in.contiguous(), w_ih_in.contiguous(),
          w_hh_in.contiguous(), as_compute(w_hr_in, dt), live, y_in.contiguous(), gates_in.contiguous(),
          c_hist_in.contiguous(), reverse, is_packed(batch_sizes), dx, dh, dc, unused, unused, unused, unused, &rows);
    });
    if (!proj) {  // two tensors: a schema's outputs must not alias
      rows.dh_out = at::empty({0}, opts);
      rows.h_raw = at::empty({0}, opts);
    }
  }
  if (!input_grad) dx = at::empty({0}, opts);
  return {dx, dh, dc, rows.dgates, rows.h_prev, rows.dh_out, rows.h_raw};
}

}  // namespace
}  // namespace fastlstm

// What lstm_ops.cpp calls (layer.h).
namespace fastlstm {
namespace layer {

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                           const Tensor& w_ih, const Tensor& w_hh,
                                                           c10::optional<Tensor> b, c10::optional<Tensor> w_hr,
                                                           c10::optional<Tensor> batch_sizes, bool reverse, bool save) {
  return fastlstm::lstm_fwd(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, save);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd(
    const Tensor& grad_y, const Tensor& grad_hT, const Tensor& grad_cT, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& w_hr,
    const c10::optional<Tensor>& batch_sizes, const Tensor& y, const Tensor& gates, const Tensor& c_hist,
    bool reverse, bool has_bias, bool weight_grads, bool input_grad) {
  // The backward ops have no Autograd kernel: called where grad mode is on and a tensor requires grad (a make_fx
  // graph of a backward, replayed), the ATen ops inside would reach autograd, and mm's out= variant refuses it
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return fastlstm::lstm_bwd(grad_y, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, gates, c_hist,
                            reverse, has_bias, weight_grads, input_grad);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd_rows(
    const Tensor& grad_y, const Tensor& grad_hT, const Tensor& grad_cT, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& w_hr,
    const c10::optional<Tensor>& batch_sizes, const Tensor& y, const Tensor& gates, const Tensor& c_hist,
    bool reverse, bool input_grad) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as lstm_bwd
  return fastlstm::lstm_bwd_rows(grad_y, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, gates, c_hist,
                                 reverse, input_grad);
}

std::tuple<Tensor, Tensor, Tensor> lstm_stack_fwd(const Tensor& x, c10::optional<Tensor> h0, c10::optional<Tensor> c0,
                                                  at::TensorList weights, c10::optional<Tensor> batch_sizes,
                                                  int64_t biases, bool has_proj, bool bidirectional) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference only, no Autograd kernel: as lstm_bwd
  return fastlstm::lstm_stack_fwd(x, h0, c0, weights, batch_sizes, biases, has_proj, bidirectional);
}

at::ScalarType compute_type(at::ScalarType t) { return fastlstm::compute_type(t); }
std::vector<int64_t> live_rows(const c10::optional<Tensor>& batch_sizes, int64_t T, int64_t B) {
  return fastlstm::live_rows(batch_sizes, T, B);
}
std::string kernel_choices() { return fastlstm::kernel_choices(); }
bool use_bf16_dot() { return fastlstm::use_bf16_dot(); }
bool uses_amx() { return fastlstm::uses_amx(); }
bool uses_onednn_weight_grads() { return fastlstm::uses_onednn_weight_grads(); }
std::vector<int64_t> float32_forward_rows(int64_t T, int64_t B, int64_t I, int64_t H, int64_t P) {
  return fastlstm::float32_forward_rows(T, B, I, H, P);
}
int64_t release_memory() { return fastlstm::release_memory(); }

}  // namespace layer
}  // namespace fastlstm
