// fastlstm C++ CPU backend: what the layer (lstm_cpu.cpp) gives the ops (lstm_ops.cpp). Two translation units, which
// ninja compiles at once, each with only the headers it needs: on 2 cores of a Zen 3 the build took 53 s as one
// file, of which ~23 s parsing torch/ATen headers (torch's autograd headers alone ~18 s, ATen/ATen.h ~15 s); split,
// the layer (the kernels, light ATen headers) compiles in ~25 s beside the ops (mostly parsing) and the build in 34 s.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace fastlstm {
namespace layer {

using at::Tensor;

// The CPU kernels of cpp_lstm_fwd and cpp_lstm_bwd (schemas: fastlstm/backends/cpu.py). The kernels a program
// compiled by AOTInductor calls (lstm_fwd, lstm_stack_fwd) take their optional tensors by value: torch 2.5's
// AOTInductor calls an op's kernel through a typed signature of its own making, which passes them so (later
// releases call it boxed, whatever its signature).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                           const Tensor& w_ih, const Tensor& w_hh,
                                                           c10::optional<Tensor> b, c10::optional<Tensor> w_hr,
                                                           c10::optional<Tensor> batch_sizes, bool reverse, bool save);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd(
    const Tensor& grad_y, const Tensor& grad_hT, const Tensor& grad_cT, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& w_hr,
    const c10::optional<Tensor>& batch_sizes, const Tensor& y, const Tensor& gates, const Tensor& c_hist,
    bool reverse, bool has_bias, bool weight_grads, bool input_grad);
// cpp_lstm_bwd without the weight gradients: dx, dh0, dc0, dgates [T, B, 4H], the h each step read [T, B, P], and
// with a projection the gradient reaching each output h [T, B, P] and the unprojected h [T, B, H] (else empty);
// float32 and float64. dx empty without input_grad.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd_rows(
    const Tensor& grad_y, const Tensor& grad_hT, const Tensor& grad_cT, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& w_hr,
    const c10::optional<Tensor>& batch_sizes, const Tensor& y, const Tensor& gates, const Tensor& c_hist,
    bool reverse, bool input_grad);

// The CPU kernel of cpp_lstm_stack_fwd: a whole stack at inference, layer by layer as lstm_fwd runs each.
std::tuple<Tensor, Tensor, Tensor> lstm_stack_fwd(const Tensor& x, c10::optional<Tensor> h0, c10::optional<Tensor> c0,
                                                  at::TensorList weights, c10::optional<Tensor> batch_sizes,
                                                  int64_t biases, bool has_proj, bool bidirectional);

// The dtype the kernels compute a layer of dtype t in, and the live rows of each step (B everywhere unpacked).
at::ScalarType compute_type(at::ScalarType t);
std::vector<int64_t> live_rows(const c10::optional<Tensor>& batch_sizes, int64_t T, int64_t B);

// The small ops: which kernel serves which product, whether bfloat16 takes bf16 dot products (on AMX tiles),
// whether float32 weight gradients go through oneDNN, how a float32 forward splits its rows, and freeing the memory
// kept between calls.
std::string kernel_choices();
bool use_bf16_dot();
bool uses_amx();
bool uses_onednn_weight_grads();
std::vector<int64_t> float32_forward_rows(int64_t T, int64_t B, int64_t I, int64_t H, int64_t P);
int64_t release_memory();

}  // namespace layer
}  // namespace fastlstm
