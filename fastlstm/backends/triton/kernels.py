"""Triton kernels for one LSTM layer in one direction (imported only when triton is available).

Buffers (all contiguous; allocated per call by fastlstm.backends.triton.ops, or kept across calls as a graph's
window of steps by graphs.py):
    xg    [T, B, 4H]      x @ W_ih^T + b for every step (one torch GEMM, outside the time loop)
    hs    [T+1, B, P]     h states; time t reads slot t + REV and writes slot t + 1 - REV
    cs    [T+1, B, H]     c states, fp32 (fp64 for float64 input), same slots as hs
    acts  [T, B, 4H]      gate activations (i, f, g, o after sigmoid/tanh), fp32; saved for backward
                          (inference: SAVE_ACTS off, empty and never touched)
    r     [T, B, H]       o * tanh(c) before the projection (only with w_hr)
    y     [T, B, P]       output, zero where a row is not live
    bs    [T+2] int32     live rows of time t at bs[t + 1]; bs[0] = bs[T+1] = 0 (no step there)
Backward:
    dgb   [T+2, B, 4H]    dgates of time t at slot t + 1; slots 0 and T+1 stay zero
    dh    [B, P], dc [B, H]  fp32 carries: grad of the state after the step being processed
    dhy   [T, B, P]       total grad of h at each live step (only with w_hr, for dW_hr)
    dr    [B, H]          grad of r at the current step (only with w_hr)

Every K and N extent (H, P) is a constexpr: loops over them are static, so the kernels also run under
TRITON_INTERPRET=1; the time loop of the sequence kernels is a `while` over a runtime T.
Offsets are int32 (the per-step kernels compute theirs from the step indices): the launcher refuses calls with
more than 2**31 elements in one buffer.
"""

# No `from __future__ import annotations` here: triton 3.1's interpreter takes a parameter as constexpr only where
# its annotation is tl.constexpr itself, and would read the string "tl.constexpr" as a runtime argument.
import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    # Towards 1 as 1 - e / (1 + e): the small part's error (exp's, the division's) then stays small, and the one
    # rounding of 1 - it is all that is left, where 1 / (1 + e) rounds twice near 1; a saturated gate's derivative
    # s (1 - s) carries that error (csrc/cell.h measured it halve in float32). Below 0, e / (1 + e) itself; e of
    # -|x| never overflows.
    e = tl.exp(-tl.abs(x))
    q = e / (1.0 + e)
    return tl.where(x >= 0, 1.0 - q, q)


@triton.jit
def _tanh(x):
    # (1 - e) / (1 + e), e = exp(-2|x|), cancels near 0 (an absolute error of an ulp of 1, so a relative error of
    # 3e-3 at activations ~1e-6, as 2 / (1 + e) - 1 had): below |x| = 1/5 the odd Taylor series to x^17 instead,
    # whose first omitted term (443861162/1856156927625 x^19) is below 1e-16 of x there (float64 under the
    # interpreter too); above, the formula's cancellation costs at most a factor 3; beyond tanh 0.5 (|x| 0.55),
    # 1 - 2e / (1 + e), for the reason _sigmoid goes towards 1 so.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    s = tl.minimum(a, 0.2)  # the series only where it is taken (no overflow for huge |x|)
    z = s * s
    p = -929569.0 / 638512875.0 + z * (6404582.0 / 10854718875.0)
    p = 62.0 / 2835.0 + z * (-1382.0 / 155925.0 + z * (21844.0 / 6081075.0 + z * p))
    p = -1.0 / 3.0 + z * (2.0 / 15.0 + z * (-17.0 / 315.0 + z * p))
    t = tl.where(a < 0.55, (1.0 - e) / (1.0 + e), 1.0 - 2.0 * e / (1.0 + e))
    t = tl.where(a < 0.2, s + s * z * p, t)
    return tl.where(x < 0, -t, t)


@triton.jit
def _mm_rows(
    a_ptr,
    stride_a,
    rows,
    row_mask,
    w_ptr,
    stride_wk,
    stride_wn,
    cols,
    col_mask,
    K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """acc[BLOCK_B, BLOCK_N] = A[rows, :K] @ W[:K, cols] with W(k, n) at w_ptr + k * stride_wk + n * stride_wn.

    A is read with .cg (bypassing L1): in the sequence kernels it was written by this program a moment ago.
    """
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_a + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        w = tl.load(
            w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _fwd_cell(
    rows,
    n,
    B,
    cols,
    xg_ptr,
    h_prev_ptr,
    c_prev_ptr,
    c_out_ptr,
    acts_ptr,
    h_out_ptr,
    y_ptr,
    w_hh_ptr,
    H: tl.constexpr,
    P: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    SAVE_ACTS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Gates of hidden units `cols` for rows `rows` of one step, and the pointwise cell.

    Live rows (< n) are updated; the others keep their state (h, c copied to the out slot, y = 0).
    With HAS_PROJ, h_out_ptr is r[t] (o * tanh(c), projected later) and y_ptr is unused.
    Without SAVE_ACTS (inference) the gates are not stored and acts_ptr is never read or written.
    """
    live = rows < n
    col_mask = cols < H
    m_live = live[:, None] & col_mask[None, :]
    m_all = (rows < B)[:, None] & col_mask[None, :]
    off = rows[:, None] * (4 * H) + cols[None, :]
    gi = _mm_rows(h_prev_ptr, P, rows, live, w_hh_ptr, 1, P, cols, col_mask, P, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC)
    gi += tl.load(xg_ptr + off, mask=m_live, other=0.0).to(ACC)
    gf = _mm_rows(
        h_prev_ptr, P, rows, live, w_hh_ptr + H * P, 1, P, cols, col_mask, P, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC
    )
    gf += tl.load(xg_ptr + off + H, mask=m_live, other=0.0).to(ACC)
    gg = _mm_rows(
        h_prev_ptr, P, rows, live, w_hh_ptr + 2 * H * P, 1, P, cols, col_mask, P, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC
    )
    gg += tl.load(xg_ptr + off + 2 * H, mask=m_live, other=0.0).to(ACC)
    go = _mm_rows(
        h_prev_ptr, P, rows, live, w_hh_ptr + 3 * H * P, 1, P, cols, col_mask, P, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC
    )
    go += tl.load(xg_ptr + off + 3 * H, mask=m_live, other=0.0).to(ACC)
    i = _sigmoid(gi)
    f = _sigmoid(gf)
    g = _tanh(gg)
    o = _sigmoid(go)
    if SAVE_ACTS:
        tl.store(acts_ptr + off, i, mask=m_live)
        tl.store(acts_ptr + off + H, f, mask=m_live)
        tl.store(acts_ptr + off + 2 * H, g, mask=m_live)
        tl.store(acts_ptr + off + 3 * H, o, mask=m_live)
    hoff = rows[:, None] * H + cols[None, :]
    c_prev = tl.load(c_prev_ptr + hoff, mask=m_all, other=0.0, cache_modifier=".cg")
    c = f * c_prev + i * g
    r = o * _tanh(c)
    tl.store(c_out_ptr + hoff, tl.where(live[:, None], c, c_prev), mask=m_all)
    if HAS_PROJ:
        tl.store(h_out_ptr + hoff, tl.where(live[:, None], r, 0.0).to(h_out_ptr.dtype.element_ty), mask=m_all)
    else:
        # Without projection P == H: h has the same layout as c.
        h_prev = tl.load(h_prev_ptr + hoff, mask=m_all, other=0.0, cache_modifier=".cg").to(ACC)
        tl.store(h_out_ptr + hoff, tl.where(live[:, None], r, h_prev).to(h_out_ptr.dtype.element_ty), mask=m_all)
        tl.store(y_ptr + hoff, tl.where(live[:, None], r, 0.0).to(y_ptr.dtype.element_ty), mask=m_all)


@triton.jit
def _fwd_proj(
    rows,
    n,
    B,
    cols,
    r_ptr,
    w_hr_ptr,
    h_prev_ptr,
    h_out_ptr,
    y_ptr,
    H: tl.constexpr,
    P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """h[rows, cols] = r @ W_hr^T for live rows; the others keep h_prev; y = h, zero where not live."""
    live = rows < n
    col_mask = cols < P
    m_all = (rows < B)[:, None] & col_mask[None, :]
    h = _mm_rows(r_ptr, H, rows, live, w_hr_ptr, 1, H, cols, col_mask, H, BLOCK_B, BLOCK_P, BLOCK_K, ACC, PREC)
    poff = rows[:, None] * P + cols[None, :]
    h_prev = tl.load(h_prev_ptr + poff, mask=m_all, other=0.0, cache_modifier=".cg").to(ACC)
    tl.store(h_out_ptr + poff, tl.where(live[:, None], h, h_prev).to(h_out_ptr.dtype.element_ty), mask=m_all)
    tl.store(y_ptr + poff, tl.where(live[:, None], h, 0.0).to(y_ptr.dtype.element_ty), mask=m_all)


@triton.jit
def _bwd_dh(
    rows,
    n,
    n_next,
    B,
    cols,
    dg_next_ptr,
    w_hh_ptr,
    dy_ptr,
    dh_ptr,
    dhy_ptr,
    store_dhy,
    H: tl.constexpr,
    P: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grad of the state h after this step, columns `cols`: dgates of the next processed step @ W_hh where
    that step was live (else the carried dh passes through), plus dy of this step where live. Returns it
    ([BLOCK_B, BLOCK_P], ACC) and stores it in the carry dh (and in dhy, zero where not live, with HAS_PROJ).
    """
    live = rows < n
    live_next = rows < n_next
    col_mask = cols < P
    m_all = (rows < B)[:, None] & col_mask[None, :]
    rec = _mm_rows(
        dg_next_ptr, 4 * H, rows, live_next, w_hh_ptr, P, 1, cols, col_mask, 4 * H, BLOCK_B, BLOCK_P, BLOCK_K, ACC, PREC
    )
    poff = rows[:, None] * P + cols[None, :]
    carried = tl.load(dh_ptr + poff, mask=m_all, other=0.0, cache_modifier=".cg")
    dy = tl.load(dy_ptr + poff, mask=live[:, None] & col_mask[None, :], other=0.0).to(ACC)
    dh = tl.where(live_next[:, None], rec, carried) + dy
    tl.store(dh_ptr + poff, dh, mask=m_all)
    # a branch, not a mask term: triton 3.9's interpreter rejects a bool mask and-ed with a scalar compare
    if HAS_PROJ:
        if store_dhy != 0:
            tl.store(dhy_ptr + poff, tl.where(live[:, None], dh, 0.0).to(dhy_ptr.dtype.element_ty), mask=m_all)
    return dh


@triton.jit
def _bwd_cell(
    rows,
    n,
    B,
    cols,
    dr,
    acts_ptr,
    c_ptr,
    c_prev_ptr,
    dc_ptr,
    dg_ptr,
    H: tl.constexpr,
):
    """Pointwise cell backward for hidden units `cols`: dgates of this step (zero where not live) and the
    carried dc (times f where live, unchanged elsewhere). dr: grad of o * tanh(c), [BLOCK_B, BLOCK_H]."""
    live = rows < n
    col_mask = cols < H
    m_live = live[:, None] & col_mask[None, :]
    m_all = (rows < B)[:, None] & col_mask[None, :]
    off = rows[:, None] * (4 * H) + cols[None, :]
    i = tl.load(acts_ptr + off, mask=m_live, other=0.0)
    f = tl.load(acts_ptr + off + H, mask=m_live, other=0.0)
    g = tl.load(acts_ptr + off + 2 * H, mask=m_live, other=0.0)
    o = tl.load(acts_ptr + off + 3 * H, mask=m_live, other=0.0)
    hoff = rows[:, None] * H + cols[None, :]
    c = tl.load(c_ptr + hoff, mask=m_live, other=0.0)
    c_prev = tl.load(c_prev_ptr + hoff, mask=m_live, other=0.0)
    dc_in = tl.load(dc_ptr + hoff, mask=m_all, other=0.0, cache_modifier=".cg")
    dr = tl.where(live[:, None], dr, 0.0)
    tc = _tanh(c)
    dc = dc_in + dr * o * (1.0 - tc * tc)
    d_o = dr * tc * o * (1.0 - o)
    d_i = dc * g * i * (1.0 - i)
    d_f = dc * c_prev * f * (1.0 - f)
    d_g = dc * i * (1.0 - g * g)
    out_ty = dg_ptr.dtype.element_ty
    tl.store(dg_ptr + off, tl.where(live[:, None], d_i, 0.0).to(out_ty), mask=m_all)
    tl.store(dg_ptr + off + H, tl.where(live[:, None], d_f, 0.0).to(out_ty), mask=m_all)
    tl.store(dg_ptr + off + 2 * H, tl.where(live[:, None], d_g, 0.0).to(out_ty), mask=m_all)
    tl.store(dg_ptr + off + 3 * H, tl.where(live[:, None], d_o, 0.0).to(out_ty), mask=m_all)
    tl.store(dc_ptr + hoff, tl.where(live[:, None], dc * f, dc_in), mask=m_all)


# ---------------------------------------------------------------------------------------------------------
# Per-step kernels: grid (batch tiles, column tiles), one launch (two with a projection) per time step.
# They take whole buffers and the step's indices, and offset the pointers themselves: slicing a tensor per
# buffer per step cost the launcher more host time than the launch (~1.4 us a view; a view's pointer can also
# lose the 16-byte alignment triton specialises on). No integer argument is specialised: by default triton
# compiles a kernel again for values equal to 1 or divisible by 16, and the indices, the live rows (n, n_next,
# which packed input takes down to 1), B (and T of the sequence kernels) take every value, so each new class
# of value compiled in the user's process, outside the build guard's child (which builds two steps of one
# batch size).
# ---------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["t", "prev", "out", "n", "B"])
def fwd_step_kernel(
    xg_ptr,
    hs_ptr,
    cs_ptr,
    acts_ptr,
    h_out_ptr,
    y_ptr,
    w_hh_ptr,
    t,
    prev,
    out,
    n,
    B,
    H: tl.constexpr,
    P: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    SAVE_ACTS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Time step t, reading state slot `prev` and writing slot `out`; h_out_ptr is r with HAS_PROJ, else hs."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    if HAS_PROJ:
        h_out_ptr += t * (B * H)
    else:
        h_out_ptr += out * (B * P)
    _fwd_cell(
        rows, n, B, cols, xg_ptr + t * (B * 4 * H), hs_ptr + prev * (B * P), cs_ptr + prev * (B * H),
        cs_ptr + out * (B * H), acts_ptr + t * (B * 4 * H), h_out_ptr,
        y_ptr + t * (B * P), w_hh_ptr, H, P, HAS_PROJ, SAVE_ACTS, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC,
    )  # fmt: skip


@triton.jit(do_not_specialize=["t", "prev", "out", "n", "B"])
def fwd_proj_kernel(
    r_ptr,
    w_hr_ptr,
    hs_ptr,
    y_ptr,
    t,
    prev,
    out,
    n,
    B,
    H: tl.constexpr,
    P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Time step t's projection: h of slot `out` from r[t], slot `prev` kept where a row is not live."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    _fwd_proj(
        rows, n, B, cols, r_ptr + t * (B * H), w_hr_ptr, hs_ptr + prev * (B * P), hs_ptr + out * (B * P),
        y_ptr + t * (B * P), H, P, BLOCK_B, BLOCK_P, BLOCK_K, ACC, PREC,
    )  # fmt: skip


@triton.jit(do_not_specialize=["t", "prev", "out", "nxt", "n", "n_next", "B"])
def bwd_step_kernel(
    dgb_ptr,
    w_hh_ptr,
    dy_ptr,
    dh_ptr,
    acts_ptr,
    cs_ptr,
    dc_ptr,
    t,
    prev,
    out,
    nxt,
    n,
    n_next,
    B,
    H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reverse step t without projection (P == H), after step `nxt` (dgates at slot nxt + 1 of dgb): dh for
    columns `cols` and the cell backward of the same hidden units, fused: dh never leaves the program."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dh = _bwd_dh(
        rows, n, n_next, B, cols, dgb_ptr + (nxt + 1) * (B * 4 * H), w_hh_ptr, dy_ptr + t * (B * H), dh_ptr, dh_ptr,
        0, H, H, False, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC,
    )  # fmt: skip
    _bwd_cell(
        rows, n, B, cols, dh, acts_ptr + t * (B * 4 * H), cs_ptr + out * (B * H), cs_ptr + prev * (B * H), dc_ptr,
        dgb_ptr + (t + 1) * (B * 4 * H), H,
    )  # fmt: skip


@triton.jit(do_not_specialize=["store_dhy", "t", "nxt", "n", "n_next", "B"])
def bwd_dh_kernel(
    dgb_ptr,
    w_hh_ptr,
    dy_ptr,
    dh_ptr,
    dhy_ptr,
    store_dhy,
    t,
    nxt,
    n,
    n_next,
    B,
    H: tl.constexpr,
    P: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reverse step t, part 1 with a projection (and the final dh0 in every case): the carry dh over P, from the
    dgates of step `nxt` (slot nxt + 1 of dgb) and dy[t]; dhy[t] too where store_dhy."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    _bwd_dh(
        rows, n, n_next, B, cols, dgb_ptr + (nxt + 1) * (B * 4 * H), w_hh_ptr, dy_ptr + t * (B * P), dh_ptr,
        dhy_ptr + t * (B * P), store_dhy, H, P, HAS_PROJ, BLOCK_B, BLOCK_P, BLOCK_K, ACC, PREC,
    )  # fmt: skip


@triton.jit(do_not_specialize=["t", "prev", "out", "n", "B"])
def bwd_proj_cell_kernel(
    dh_ptr,
    w_hr_ptr,
    acts_ptr,
    cs_ptr,
    dc_ptr,
    dgb_ptr,
    t,
    prev,
    out,
    n,
    B,
    H: tl.constexpr,
    P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reverse step t, part 2 with a projection: dr = dh @ W_hr for hidden units `cols`, then the cell backward."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    live = rows < n
    dr = _mm_rows(dh_ptr, P, rows, live, w_hr_ptr, H, 1, cols, cols < H, P, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC)
    _bwd_cell(
        rows, n, B, cols, dr, acts_ptr + t * (B * 4 * H), cs_ptr + out * (B * H), cs_ptr + prev * (B * H), dc_ptr,
        dgb_ptr + (t + 1) * (B * 4 * H), H,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Sequence kernels: grid (batch tiles,), one launch for the whole time loop. Each program owns all hidden
# units of its rows, so no program ever waits on another; within a program, phases that read what other
# threads of the same program wrote are separated by tl.debug_barrier(). W_hh (and W_hr) stream from
# L2 every step; the states go through the hs/cs history that backward needs anyway.
# ---------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "B"])
def fwd_seq_kernel(
    xg_ptr,
    hs_ptr,
    cs_ptr,
    acts_ptr,
    r_ptr,
    y_ptr,
    w_hh_ptr,
    w_hr_ptr,
    bs_ptr,
    T,
    B,
    H: tl.constexpr,
    P: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    REVERSE: tl.constexpr,
    SAVE_ACTS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    s = 0
    while s < T:
        if REVERSE:
            t = T - 1 - s
            prev = t + 1
            out = t
        else:
            t = s
            prev = t
            out = t + 1
        n = tl.load(bs_ptr + t + 1)
        if HAS_PROJ:
            h_dst = r_ptr + t * (B * H)
        else:
            h_dst = hs_ptr + out * (B * P)
        for j0 in range(0, H, BLOCK_H):
            cols = j0 + tl.arange(0, BLOCK_H)
            _fwd_cell(
                rows, n, B, cols, xg_ptr + t * (B * 4 * H), hs_ptr + prev * (B * P), cs_ptr + prev * (B * H),
                cs_ptr + out * (B * H), acts_ptr + t * (B * 4 * H), h_dst, y_ptr + t * (B * P), w_hh_ptr,
                H, P, HAS_PROJ, SAVE_ACTS, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC,
            )  # fmt: skip
        tl.debug_barrier()
        if HAS_PROJ:
            for p0 in range(0, P, BLOCK_P):
                pcols = p0 + tl.arange(0, BLOCK_P)
                _fwd_proj(
                    rows, n, B, pcols, r_ptr + t * (B * H), w_hr_ptr, hs_ptr + prev * (B * P),
                    hs_ptr + out * (B * P), y_ptr + t * (B * P), H, P, BLOCK_B, BLOCK_P, BLOCK_K, ACC, PREC,
                )  # fmt: skip
            tl.debug_barrier()
        s += 1


@triton.jit(do_not_specialize=["T", "B"])
def bwd_seq_kernel(
    dgb_ptr,
    w_hh_ptr,
    w_hr_ptr,
    dy_ptr,
    dh_ptr,
    dhy_ptr,
    dc_ptr,
    acts_ptr,
    cs_ptr,
    bs_ptr,
    T,
    B,
    H: tl.constexpr,
    P: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """The whole reverse time loop, then dh0 (left in dh) and dc0 (left in dc)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    s = 0
    while s < T:
        if REVERSE:
            t = s
            nxt = t - 1
            prev = t + 1
            out = t
        else:
            t = T - 1 - s
            nxt = t + 1
            prev = t
            out = t + 1
        n = tl.load(bs_ptr + t + 1)
        n_next = tl.load(bs_ptr + nxt + 1)
        for p0 in range(0, P, BLOCK_P):
            pcols = p0 + tl.arange(0, BLOCK_P)
            _bwd_dh(
                rows, n, n_next, B, pcols, dgb_ptr + (nxt + 1) * (B * 4 * H), w_hh_ptr, dy_ptr + t * (B * P),
                dh_ptr, dhy_ptr + t * (B * P), 1, H, P, HAS_PROJ, BLOCK_B, BLOCK_P, BLOCK_K, ACC, PREC,
            )  # fmt: skip
        tl.debug_barrier()
        for j0 in range(0, H, BLOCK_H):
            cols = j0 + tl.arange(0, BLOCK_H)
            if HAS_PROJ:
                dr = _mm_rows(
                    dh_ptr, P, rows, rows < n, w_hr_ptr, H, 1, cols, cols < H, P, BLOCK_B, BLOCK_H, BLOCK_K, ACC, PREC
                )
            else:
                dr = tl.load(
                    dh_ptr + rows[:, None] * H + cols[None, :],
                    mask=(rows < n)[:, None] & (cols < H)[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
            _bwd_cell(
                rows, n, B, cols, dr, acts_ptr + t * (B * 4 * H), cs_ptr + out * (B * H), cs_ptr + prev * (B * H),
                dc_ptr, dgb_ptr + (t + 1) * (B * 4 * H), H,
            )  # fmt: skip
        tl.debug_barrier()
        s += 1
    # dh0: the first processed step of the forward pass is time 0 (forward) or T - 1 (reverse).
    if REVERSE:
        first = T - 1
    else:
        first = 0
    n_first = tl.load(bs_ptr + first + 1)
    for p0 in range(0, P, BLOCK_P):
        pcols = p0 + tl.arange(0, BLOCK_P)
        _bwd_dh(
            rows, 0, n_first, B, pcols, dgb_ptr + (first + 1) * (B * 4 * H), w_hh_ptr, dy_ptr, dh_ptr, dhy_ptr, 0,
            H, P, HAS_PROJ, BLOCK_B, BLOCK_P, BLOCK_K, ACC, PREC,
        )  # fmt: skip
