// fastlstm C++ CPU backend: the ops. Their CPU kernels are the layer's (lstm_cpu.cpp, through layer.h); here the
// Autograd kernel of cpp_lstm_fwd, and the registration of all the ops' kernels.

#include <torch/library.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/TensorOperators.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros_like.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "layer.h"

// The CPython calls that tell whether this thread holds the GIL, let go of it and take it back, declared rather
// than included: the build needs no Python headers (a system Python without its -dev package has none). Weak, so
// that the library still loads in a process without Python, which holds no GIL. Every CPython 3 exports them.
#if defined(__ELF__)
#define FASTLSTM_WEAK __attribute__((weak))
#else
#define FASTLSTM_WEAK
#endif
extern "C" {
struct _ts;
FASTLSTM_WEAK int PyGILState_Check();
FASTLSTM_WEAK _ts* PyEval_SaveThread();
FASTLSTM_WEAK void PyEval_RestoreThread(_ts*);
}

namespace fastlstm {
namespace {

using at::Tensor;
using layer::compute_type;
using layer::live_rows;
using layer::lstm_bwd;
using layer::lstm_fwd;

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
  // Steps by unbind, not x_proj[t]: each select's backward is a zero-filled [T, B, 4H] gradient (T of them summed,
  // quadratic in T), whose large short-lived buffers fragmented glibc's heap around the small tensors that the
  // gradients' graph keeps: a gradient penalty at B16-T200-H256 float64 peaked 7.9 GB over the process's baseline
  // where nn.LSTM's took 0.6 GB.
  const std::vector<Tensor> x_steps = x_proj.unbind(0);
  Tensor h = h0, c = c0;
  std::vector<Tensor> ys(T);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t n = live[t];
    // Rows past n are finished (forward) or not started (reverse, still at h0/c0): they keep their state.
    const auto q = (x_steps[t].narrow(0, 0, n) + at::matmul(h.narrow(0, 0, n), w_hh.t())).chunk(4, 1);
    const Tensor c_live = q[1].sigmoid() * c.narrow(0, 0, n) + q[0].sigmoid() * q[2].tanh();
    Tensor h_live = q[3].sigmoid() * c_live.tanh();
    if (w_hr.defined()) h_live = at::matmul(h_live, w_hr.t());
    ys[t] = n < B ? at::cat({h_live, h_live.new_zeros({B - n, h_live.size(1)})}) : h_live;
    h = n < B ? at::cat({h_live, h.narrow(0, n, B - n)}) : h_live;
    c = n < B ? at::cat({c_live, c.narrow(0, n, B - n)}) : c_live;
  }
  return {at::stack(ys), h, c};
}

// Lets go of the GIL for its scope, where the calling thread holds it. Compiled autograd (torch.compile of the
// backward pass, which calls C++ autograd functions from Python) runs the layer's backward with the GIL held, and
// torch's autograd engine, which differentiable_grads starts, refuses to under it ("The autograd engine was called
// while holding the GIL").
class WithoutGil {
 public:
  WithoutGil() {
    if (PyGILState_Check != nullptr && PyGILState_Check()) state_ = PyEval_SaveThread();
  }
  ~WithoutGil() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;

 private:
  _ts* state_ = nullptr;
};

// Backward with create_graph=True (gradient penalties, Hessian-vector products): the kernels' gradients are not
// themselves differentiable, so recompute the layer from the saved inputs in differentiable ops and let autograd
// differentiate that. Slow (a step loop of small ops), exact, and only ever taken for this case.
//
// The recomputation starts from an alias of each input: a gradient taken with respect to the input itself would
// also follow the input's own history, which the outer backward follows again (h0 computed from x, a state carried
// from the module's previous call, one weight in two places: those paths counted twice). Only the outputs whose
// gradient was given are differentiated (grads undefined where not): a zero gradient of y would still put w_hr in
// the result's graph, and a second backward would give w_hr a zero gradient where nn.LSTM gives none. Only the
// inputs in `needed` are differentiated: a penalty on the input's gradient alone (grad(y, x, create_graph=True))
// had built the weights' gradients too, a [4H, P] product and sum a step that the outer backward then drops (at
// B16-T200-H256 float64, 0.94 GB over the baseline while taking the gradient; 0.26 GB without them).
variable_list differentiable_grads(const std::vector<Tensor>& inputs, const std::vector<bool>& needed,
                                   const Tensor& batch_sizes, bool reverse, const variable_list& grads) {
  const Tensor& x = inputs[0];
  const auto ct = compute_type(x.scalar_type());
  variable_list wrt;
  std::vector<size_t> where;
  std::vector<Tensor> v;  // the inputs in the compute dtype (bfloat16 and float16 in float32, as the kernels)
  for (size_t k = 0; k < inputs.size(); ++k) {
    Tensor t = inputs[k];
    if (t.defined() && t.requires_grad()) {
      t = t.view_as(t);
      if (needed[k]) {
        wrt.push_back(t);
        where.push_back(k);
      }
    }
    v.push_back(t.defined() ? t.to(ct) : t);
  }
  variable_list result(inputs.size() + 3);  // + batch_sizes, reverse, save: none
  if (wrt.empty()) return result;
  const auto live = live_rows(none_if_undefined(batch_sizes), x.size(0), x.size(1));
  auto [y, hT, cT] = layer_in_aten_ops(v[0], v[1], v[2], v[3], v[4], v[5], v[6], live, reverse);
  variable_list outputs, given;
  for (const auto& [out, grad] : {std::pair{y, grads[0]}, std::pair{hT, grads[1]}, std::pair{cT, grads[2]}}) {
    // An output that depends on no input requiring grad contributes nothing (one step's c_n where only w_hr
    // requires grad), and autograd refuses to differentiate it.
    if (grad.defined() && out.requires_grad()) {
      outputs.push_back(out);
      given.push_back(grad.to(ct));
    }
  }
  if (outputs.empty()) return result;
  WithoutGil without_gil;
  const variable_list got = torch::autograd::grad(outputs, wrt, given, /*retain_graph=*/true, /*create_graph=*/true,
                                                  /*allow_unused=*/true);
  for (size_t k = 0; k < wrt.size(); ++k) result[where[k]] = got[k];
  return result;
}

// Whether a layer's gradient reaches w_hr. Not where one step's c_n alone is differentiated: c_n then depends on no
// projection, and nn.LSTM leaves w_hr's gradient None there (an optimizer skips it, weight decay included) where a
// zero gradient would be decayed. The steps as a symbolic size: AOTAutograd traces this backward on fake tensors,
// where size() made every dimension a constant of the graph (a compiled training step recompiled for each batch
// size and length; fullgraph=True failed at the eighth); sym_size guards only T > 1, which dynamic sizes assume.
bool projection_used(const Tensor& w_hr, const Tensor& x, const Tensor& grad_y, const Tensor& grad_hT) {
  return w_hr.defined() && (x.sym_size(0) > 1 || grad_y.defined() || grad_hT.defined());
}

// Which of the layer's inputs (x, h0, c0, w_ih, w_hh, b, w_hr) the backward that runs wants a gradient of. The
// node's edges are the defined ones in that order: b and w_hr take an edge only where given.
std::vector<bool> inputs_needing_grad(AutogradContext* ctx, const Tensor& b, const Tensor& w_hr) {
  std::vector<bool> needed(7, false);
  size_t edge = 0;
  for (size_t k = 0; k < needed.size(); ++k) {
    if (k == 5 && !b.defined()) continue;
    if (k == 6 && !w_hr.defined()) continue;
    needed[k] = ctx->needs_input_grad(edge++);
  }
  return needed;
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
    // materialised as zeros ([T, B, 4H] of them). Not marked non-differentiable: compiled autograd (torch.compile
    // of the backward) refuses a C++ function that marks any output so (an internal assert in torch).
    ctx->set_materialize_grads(false);
    // The caller gets a copy of y, backward keeps its own: nn.LSTM's ATen path lets a model change its output in
    // place before backward (y += residual), which would otherwise fail backward's version check. Without saving
    // (no_grad, which still comes through here) there is no backward to protect, and the copy cost 8% of an
    // inference call (B32-T100-H256: 0.6 of 7.9 ms).
    return {save ? y.clone() : y, hT, cT, gates, c_hist};
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
    if (at::GradMode::is_enabled()) {  // create_graph=True
      // w_hr's gradient is undefined where projection_used says no: only c_n is differentiated, which one step's
      // projection does not reach.
      return differentiable_grads({x, h0, c0, w_ih, w_hh, b, w_hr}, inputs_needing_grad(ctx, b, w_hr), batch_sizes,
                                  ctx->saved_data["reverse"].toBool(), grads);
    }
    const Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(y);
    const Tensor grad_hT = grads[1].defined() ? grads[1] : at::zeros_like(h0);
    const Tensor grad_cT = grads[2].defined() ? grads[2] : at::zeros_like(c0);
    const bool has_bias = b.defined();
    // The node's edges: x, h0, c0, w_ih, w_hh, then b, w_hr and batch_sizes where given (batch_sizes never needs
    // one). Weights that need none (frozen) spare the weight gradients' products, an input that needs none (a
    // first layer fed data) dx's.
    const size_t edges = 5 + has_bias + w_hr.defined() + batch_sizes.defined();
    bool weight_grads = false;
    for (size_t k = 3; k < edges; ++k) weight_grads = weight_grads || ctx->needs_input_grad(k);
    const bool input_grad = ctx->needs_input_grad(0);
    auto [dx_out, dh0, dc0, dw_ih, dw_hh, db, dw_hr] =
        op.call(grad_y, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, none_if_undefined(w_hr),
                none_if_undefined(batch_sizes), y, gates, c_hist, ctx->saved_data["reverse"].toBool(), has_bias,
                weight_grads, input_grad);
    const Tensor dx = input_grad ? dx_out : Tensor();
    // One gradient per forward input: batch_sizes, reverse and save get none.
    if (!weight_grads) return {dx, dh0, dc0, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    return {dx, dh0, dc0, dw_ih, dw_hh, has_bias ? db : Tensor(),
            projection_used(w_hr, x, grads[0], grads[1]) ? dw_hr : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd_autograd(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    c10::optional<Tensor> b, c10::optional<Tensor> w_hr, c10::optional<Tensor> batch_sizes, bool reverse,
    bool save) {  // the CPU kernel's signature (layer.h)
  // x as nn.LSTM keeps it for backward: a dense copy where it is not dense (a batch_first input, transposed by the
  // module), which the caller may then refill before backward (micro-batches through one buffer); else x itself,
  // whose change in place before backward fails autograd's version check, as there. Copied here, above the
  // function, so that autograd records the copy: a gradient of the gradients (create_graph) reaches x through it.
  const variable_list out =
      LayerFunction::apply(x.contiguous(), h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, save);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// Weights for a call under autocast, in dtype, through autocast's own cache of casts (the one ATen's ops take
// their weights from): a parameter is cast once per autocast region rather than on every call, as nn.LSTM's are.
// Registered without a dispatch key (CompositeImplicitAutograd), so autograd records each cast as it records
// any .to(). Never under inference_mode: tensors made there cannot serve a later call that trains, and the cache
// would hand them to it. A cast cached under no_grad keeps its grad_fn for the same reason (newer releases'
// cached_cast does both itself; older ones did neither).
std::vector<Tensor> autocast_weights(at::TensorList weights, at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), "fastlstm cpp_autocast_weights: casts to a floating-point dtype, got ", dtype);
  for (const Tensor& w : weights)
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), "fastlstm cpp_autocast_weights: weights must be floating point, "
                "got ", w.scalar_type());
  std::vector<Tensor> out;
  out.reserve(weights.size());
  for (const Tensor& w : weights) {
    Tensor cast;
    if (w.scalar_type() == dtype) {
      cast = w;
    } else if (!c10::InferenceMode::is_enabled()) {
      at::AutoGradMode grad(w.requires_grad() || at::GradMode::is_enabled());
      cast = at::autocast::cached_cast(dtype, w, w.device().type());
    }
    // cached_cast leaves what autocast does not cast as it is (float64, say): the call still needs it in dtype
    out.push_back(cast.defined() && cast.scalar_type() == dtype ? cast : w.to(dtype));
  }
  return out;
}

}  // namespace
}  // namespace fastlstm

// The schemas of cpp_lstm_fwd / cpp_lstm_bwd are defined by fastlstm/backends/cpu.py when fastlstm is imported,
// before this library is built or loaded: a saved torch.export program naming them then loads on a machine that
// has never built it. This library adds their kernels. FRAGMENT: Python defines ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def("cpp_kernel_choices() -> str", &fastlstm::layer::kernel_choices);
  m.def("cpp_bf16_dot() -> bool", &fastlstm::layer::use_bf16_dot);
  m.def("cpp_amx() -> bool", &fastlstm::layer::uses_amx);
  m.def("cpp_onednn_weight_grads() -> bool", &fastlstm::layer::uses_onednn_weight_grads);
  m.def("cpp_float32_forward_rows(int T, int B, int I, int H, int P) -> int[]",
        &fastlstm::layer::float32_forward_rows);
  m.def("cpp_release_memory() -> int", &fastlstm::layer::release_memory);
  m.def("cpp_autocast_weights(Tensor[] weights, ScalarType dtype) -> Tensor[]", &fastlstm::autocast_weights);
}

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("cpp_lstm_fwd", &fastlstm::layer::lstm_fwd);
  m.impl("cpp_lstm_bwd", &fastlstm::layer::lstm_bwd);
  m.impl("cpp_lstm_bwd_rows", &fastlstm::layer::lstm_bwd_rows);
  m.impl("cpp_lstm_stack_fwd", &fastlstm::layer::lstm_stack_fwd);
}

TORCH_LIBRARY_IMPL(fastlstm, Autograd, m) { m.impl("cpp_lstm_fwd", &fastlstm::lstm_fwd_autograd); }
