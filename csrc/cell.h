// fastlstm C++ CPU backend: the pointwise LSTM cell, forward and backward, in explicit SIMD.
#pragma once

#include "simd.h"
#include "threads.h"

#include <ATen/Parallel.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <limits>

namespace fastlstm {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Pointwise math, all in explicit SIMD (a row's last partial vector too, through masked loads and stores).

// float through GCC/Clang vector extensions, one register wide (kVecBytes): a Cephes-style exp, about 1 ulp;
// sigmoid and tanh from it within ~2 ulp (measured up to 2.2 and 2.1 over 20,000 points a range), and towards
// +-1 as accurate as oneDNN's, which their derivatives need (see vsigmoid).
//
// Near 0 tanh is -m / (2 + m) with m = e^(-2|x|) - 1 taken from exp's own parts, not (1 - e) / (1 + e): near 0
// that subtraction cancels, leaving tanh an absolute error of an ulp of 1 instead of a relative one. A layer
// whose activations were ~1e-6 then measured 3e-3 relative error in float32 against nn.LSTM's 2e-6 (and 6e-12
// in float64), found by random configurations (proj_size 1, no bias, three layers).
using vf = Vec<float>::type;
typedef int32_t vi __attribute__((vector_size(kVecBytes)));

inline vf vsplat(float a) { return vf{} + a; }

// x clamped to [lo, hi], a NaN kept. With AVX-512 one max and one min (which return their second operand where
// either is NaN), where GCC makes a comparison and a blend of each `x < lo ? lo : x`: the cell's math is bound by
// its count of vector instructions (~2.3 ns an element on a Xeon with AMX, one thread), and these and vpow2 took
// it 8-9% faster there, to the same bits (float; double kept its form: there GCC then rounded an ulp otherwise).
inline vf vclamp(vf x, float lo, float hi) {
#ifdef __AVX512F__
  const __m512 above = _mm512_max_ps(_mm512_set1_ps(lo), reinterpret_cast<__m512>(x));
  return reinterpret_cast<vf>(_mm512_min_ps(_mm512_set1_ps(hi), above));
#else
  x = x < vsplat(lo) ? vsplat(lo) : x;
  return x > vsplat(hi) ? vsplat(hi) : x;
#endif
}

// 2^n of an integral n in [-126, 128] (128: inf): one vscalefps with AVX-512, else the exponent's bits.
inline vf vpow2(vf n) {
#ifdef __AVX512F__
  return reinterpret_cast<vf>(_mm512_scalef_ps(_mm512_set1_ps(1.0f), reinterpret_cast<__m512>(n)));
#else
  return reinterpret_cast<vf>((__builtin_convertvector(n, vi) + 127) << 23);
#endif
}

// exp(x) = s * (1 + q): s = 2^n, n = round(x / ln 2), q = e^r - 1 of the remainder r, |r| <= ln 2 / 2.
inline void vexp_parts(vf x, vf& s, vf& q) {
  x = vclamp(x, -87.3365447504f, 88.3762626647949f);
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
  q = p * r * r + r;
  s = vpow2(n);
}

// The same for double: exp by range reduction and a degree-12 Taylor polynomial (~1e-16 relative).
using vd = Vec<double>::type;
typedef int64_t vl __attribute__((vector_size(kVecBytes)));

inline vd vsplat(double a) { return vd{} + a; }

inline void vexp_parts(vd x, vd& s, vd& q) {
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
  q = p * r;
  s = reinterpret_cast<vd>((__builtin_convertvector(n, vl) + 1023) << 52);
}

// Each lane's bits as an integer vector (for its sign), and the lane type, of vf and vd.
template <typename V>
struct VecBits;
template <>
struct VecBits<vf> {
  using type = vi;
  using lane = float;
  static constexpr int32_t sign = std::numeric_limits<int32_t>::min();
  static constexpr float exp_overflow = 88.7228391f;  // log of the largest float: e^x is inf beyond it
};
template <>
struct VecBits<vd> {
  using type = vl;
  using lane = double;
  static constexpr int64_t sign = std::numeric_limits<int64_t>::min();
  static constexpr double exp_overflow = 709.782712893384;
};

// exp, sigmoid and tanh of vf or vd, from the exp parts above: one formula for both widths.
template <typename V, typename S = typename VecBits<V>::lane>
inline V vexp(V x) {
  V s, q;
  vexp_parts(x, s, q);
  return (q + S(1)) * s;
}
// Towards 1 (x >= 0) as 1 - e / (1 + e), e = e^-x: the small part then carries exp's relative accuracy and one
// rounding to the nearest float of 1 - it is all the error left, where 1 / (1 + e) rounded twice (~1.5 ulp of 1).
// A saturated gate's derivative s (1 - s) is that rounding over again: float32 gradients with gate
// pre-activations of 2-16 measured about twice oneDNN's error before (as ATen's cell), its error after.
// Exactly 0 where e^-x overflows, as ATen's and oneDNN's sigmoid give it: exp's clamp would leave ~4e-39 (1e-308
// in double) there, and a saturated gate times an inf (or 1e38) cell would then give inf (or a finite number)
// where nn.LSTM gives NaN (or 0).
template <typename V, typename S = typename VecBits<V>::lane>
inline V vsigmoid(V x) {
  const V e = vexp(-x);
  const V r = S(1) / (S(1) + e);
  const V s = x >= V{} ? S(1) - e * r : r;
  return x < V{} - VecBits<V>::exp_overflow ? V{} : s;
}
// Beyond |x| = 0.55 (tanh 0.5) as 1 - 2e / (1 + e), e = e^(-2|x|), for the reason sigmoid goes towards 1 so (its
// derivative 1 - tanh^2 cancels there); below it as -m / (2 + m), m = e - 1 from exp's parts (see above).
template <typename V, typename S = typename VecBits<V>::lane>
inline V vtanh(V x) {
  using I = typename VecBits<V>::type;
  const I xb = reinterpret_cast<I>(x);
  const I sign_bit = I{} + VecBits<V>::sign;
  const I sign = xb & sign_bit;
  const V a = reinterpret_cast<V>(xb & ~sign_bit);
  V s, q;
  vexp_parts(S(-2) * a, s, q);
  const V m = s * q + (s - S(1));  // e - 1
  const auto upper = a > S(0.55);
  const V r = (upper ? S(2) * ((q + S(1)) * s) : -m) / (m + S(2));
  const V t = upper ? S(1) - r : r;
  return reinterpret_cast<V>(reinterpret_cast<I>(t) | sign);
}

// A vector of the lanes [p, p + n) of a row, n <= lanes: a plain load for a whole vector, else a masked one
// (zeros past n), so that a row's last partial vector (H = 24, 40, 200, ...) runs the same vector math rather
// than a scalar loop of exp and tanh (which, at H = 24, took as long as the rest of the step).
template <bool Whole, typename scalar_t>
inline auto vload_n(const scalar_t* p, int64_t n) {
  if constexpr (Whole) {
    return Vec<scalar_t>::load(p);
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
    return Vec<scalar_t>::load(buf);
#endif
  }
}

template <bool Whole, typename scalar_t, typename V>
inline void vstore_n(scalar_t* p, V v, int64_t n) {
  if constexpr (Whole) {
    Vec<scalar_t>::store(p, v);
  } else {
#ifdef __AVX512F__
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512>(v));
    } else {
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), reinterpret_cast<__m512d>(v));
    }
#else
    scalar_t buf[kVecBytes / sizeof(scalar_t)];
    Vec<scalar_t>::store(buf, v);
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
    parallel_steps(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) f(r);
    });
  } else {
    for (int64_t r = 0; r < n; ++r) f(r);
  }
}

}  // namespace
}  // namespace fastlstm
