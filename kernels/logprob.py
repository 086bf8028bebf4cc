"""Per-token log-probabilities (and entropy) of the sampled tokens, without an [N, V] fp32 log-softmax.

Every RL loss in this project needs only logp_y = log softmax(x / T)[y] for the token y that was sampled,
yet the usual `log_softmax(logits.float()).gather(...)` writes a full fp32 copy of the logits (10 GB for
16384 tokens x 151936 vocab) and reads it back. Here one pass over each row is enough.

Math, per row of logits x (length V), target y, temperature T, z = x / T:
    online log-sum-exp over vocabulary blocks: m = running max, d = sum_j exp(z_j - m)
        (when the max grows from m to m', d is rescaled by exp(m - m'))
    lse = m + log d,   logp_y = z_y - lse,   p_j = exp(z_j - lse)
    entropy H = -sum_j p_j log p_j = lse - mean_z, with mean_z = sum_j p_j z_j = s / d, s = sum_j exp(z_j - m) z_j
Backward, with g = dL/dlogp_y and g_H = dL/dH (per-row scalars):
    dL/dx_j = [ g (1[j = y] - p_j) - g_H p_j (z_j - mean_z) ] / T
The "1[j = y] - p_j" is formed in fp32 and only then rounded to the logits' dtype: in bf16, p_y - 1 cancels
catastrophically when p_y -> 1 (20% error at p = 0.99), and RL samples exactly those high-probability tokens.
The kernels work in base 2 (u = z log2 e, exp2 instead of exp, log2 e folded into the 1/T scale): one fewer
multiply per element; results are converted back to natural logarithms once per row.

Shapes: logits (N, V) with targets (N,), (B, T, V) with (B, T), or (B, T+1, V) with (B, T): the last case is
the model's output before the shift (position t predicts token t+1); it is read through its strides, never
copied, and the gradient of the last position is 0. The same holds for hidden states in the LM-head variant.

linear_token_logprobs(hidden, weight, targets) does the same from the last hidden states, one chunk of rows
at a time in the forward and one vocabulary slice at a time in the backward (see _LinearTokenLogprobs).

Backends: CUDA tensors run the Triton kernels; anything else runs the PyTorch reference. The environment
variable KERNELS_BACKEND = auto (default) | triton | torch forces one; with TRITON_INTERPRET=1 set before
triton is imported, "triton" runs the kernels on CPU tensors (that is how tests/test_kernels.py checks them).
"""
import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(z) = exp2(z log2 e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): back from base 2 to natural logarithms
CHECK_TARGETS = True  # one host sync per call to raise on ids outside [0, V); skipped while capturing a CUDA graph


def _use_triton(t: torch.Tensor) -> bool:
    backend = os.environ.get("KERNELS_BACKEND", "auto").lower()
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"KERNELS_BACKEND must be auto, triton or torch, got {backend!r}")
    return backend == "triton" or (backend == "auto" and t.is_cuda)


def _is_shifted(x, targets):
    """True for x (B, T+1, C) with targets (B, T); False when x is (..., C) with targets (...); else raise."""
    if tuple(x.shape[:-1]) == tuple(targets.shape):
        return False
    if x.dim() == 3 and targets.dim() == 2 and x.shape[0] == targets.shape[0] and x.shape[1] == targets.shape[1] + 1:
        return True
    raise ValueError(f"inputs {tuple(x.shape)} do not match targets {tuple(targets.shape)}: expected (..., C) with "
                     "(...), or (B, T+1, C) with (B, T)")


def _check_targets(targets, V):
    """Raise on ids outside [0, V) (the kernels would read a wrong logit; they return nan there instead)."""
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
    if not CHECK_TARGETS or targets.numel() == 0 or torch.compiler.is_compiling():
        return
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = ((targets < 0) | (targets >= V)).reshape(-1)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must be ids in [0, {V}) (no ignore index: mask the result instead); got "
                         f"{int(targets.reshape(-1)[i])} at flat position {i} ({int(bad.sum())} bad ids in all)")


# ----------------------------------------------------------------------------------------------------------
# 1. PyTorch reference: plain fp32, easy to read, materialises the full log-softmax.
# ----------------------------------------------------------------------------------------------------------
def token_logprobs_ref(logits, targets, temperature=1.0, return_entropy=False):
    """fp32 log p(targets) under softmax(logits / temperature); logits (..., V), targets (...)."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V) fp32
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (...)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (...)
    return logp, entropy


def linear_token_logprobs_ref(hidden, weight, targets, temperature=1.0):
    """fp32 log p(targets) with logits = hidden @ weight.T; hidden (..., H), weight (V, H), targets (...)."""
    logits = hidden.float() @ weight.float().t()  # (..., V) fp32
    return token_logprobs_ref(logits, targets, temperature)


# ----------------------------------------------------------------------------------------------------------
# 2. Triton kernels. One program per row (rows on grid axis 0, which allows 2^31 - 1 programs), looping over
#    the vocabulary in BLOCK_V columns. A row r of a (B, T, V) view sits at b * stride_b + t * stride_t with
#    b = r // T, t = r - b T, so a strided (B, T+1, V)[:, :-1] view is read in place. Offsets are int64
#    (row * V exceeds 2^31 at 16384 x 151936). The scale log2(e) / T is a constexpr: a Python float runtime
#    argument becomes fp64 under torch.compile, and a run uses one temperature (one compilation per value).
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _online_update(u, m, d, s, HAS_ENTROPY: tl.constexpr):
    """Fold one block of base-2 scores u into (running max m, sum d of 2^(u - m), sum s of 2^(u - m) u)."""
    m_new = tl.maximum(m, tl.max(u, axis=0))
    # while every score so far is -inf, m_new = -inf and u - m_new = -inf + inf = nan: subtract 0 instead
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp2(m - m_safe)
    e = tl.exp2(u - m_safe)
    d = d * rescale + tl.sum(e, axis=0)
    if HAS_ENTROPY:
        s = s * rescale + tl.sum(e * tl.where(e > 0, u, 0.0), axis=0)  # e == 0 at -inf: 0, not 0 * -inf = nan
    return m_new, d, s


@triton.jit
def _logprob_fwd_kernel(x_ptr, y_ptr, logp_ptr, lse_ptr, ent_ptr, meanz_ptr, V, T, stride_b, stride_t,
                        SCALE: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    x_row = x_ptr + b * stride_b + (row - b * T) * stride_t
    m = tl.full((), float("-inf"), tl.float32)  # running max of u = z log2 e
    d = tl.zeros((), tl.float32)  # running sum of 2^(u - m)
    s = tl.zeros((), tl.float32)  # running sum of 2^(u - m) u (entropy only)
    v_main = (V // BLOCK_V) * BLOCK_V
    for start in range(0, v_main, BLOCK_V):  # full blocks: no mask, no select
        u = tl.load(x_row + start + tl.arange(0, BLOCK_V)).to(tl.float32) * SCALE
        m, d, s = _online_update(u, m, d, s, HAS_ENTROPY)
    if v_main < V:  # ragged tail: padded columns are -inf, add 2^-inf = 0 and never win the max
        cols = v_main + tl.arange(0, BLOCK_V)
        u = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * SCALE
        m, d, s = _online_update(u, m, d, s, HAS_ENTROPY)
    lse2 = m + tl.log2(d)
    y = tl.load(y_ptr + row).to(tl.int64)
    # an id outside [0, V) would read another row: give nan instead (the public functions raise before this)
    u_y = tl.load(x_row + y, mask=(y >= 0) & (y < V), other=float("nan")).to(tl.float32) * SCALE
    tl.store(logp_ptr + row, (u_y - lse2) * LN2)
    tl.store(lse_ptr + row, lse2 * LN2)
    if HAS_ENTROPY:
        mean_u = s / d
        tl.store(ent_ptr + row, (lse2 - mean_u) * LN2)
        tl.store(meanz_ptr + row, mean_u * LN2)


@triton.jit
def _logprob_bwd_kernel(x_ptr, dx_ptr, y_ptr, lse_ptr, meanz_ptr, g_ptr, gh_ptr, V, T, stride_b, stride_t,
                        dstride_b, dstride_t, col0, SCALE: tl.constexpr, INV_T: tl.constexpr,
                        HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    # dx may alias x (in-place gradient, and the linear path's logits tile): every element is read before written.
    # The V columns may be a vocabulary slice starting at column col0 of the full row (the linear path).
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = x_ptr + b * stride_b + t * stride_t
    dx_row = dx_ptr + b * dstride_b + t * dstride_t
    y = tl.load(y_ptr + row).to(tl.int64) - col0  # the target's column in this slice (may lie outside it)
    lse2 = tl.load(lse_ptr + row) * LOG2E
    g = tl.load(g_ptr + row).to(tl.float32)
    if HAS_ENTROPY:
        g_h = tl.load(gh_ptr + row).to(tl.float32)
        mean_z = tl.load(meanz_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        u = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32) * SCALE
        p = tl.exp2(u - lse2)
        # (1[j = y] - p) in fp32 *before* rounding: no bf16 cancellation when p_y -> 1
        grad = g * (tl.where(cols == y, 1.0, 0.0) - p)
        if HAS_ENTROPY:
            grad -= g_h * p * (tl.where(p > 0, u * LN2, mean_z) - mean_z)  # p == 0: no nan from a -inf logit
        tl.store(dx_row + cols, (grad * INV_T).to(dx_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------------------
# 3. Launchers, on (B, T, V) views with unit column stride. BLOCK_V / NUM_WARPS are module settings (tests
#    shrink BLOCK_V to exercise many blocks under the interpreter); untuned first choices for an H100.
# ----------------------------------------------------------------------------------------------------------
BLOCK_V = 4096
NUM_WARPS = 8
MIN_SLICE = 1024  # narrowest vocabulary slice of the linear backward (narrower makes thin, slow matmuls)


def _block_v(V):
    return min(BLOCK_V, triton.next_power_of_2(V))


def _view3(x, shift):
    """The (B, T, V) view the kernels read: (N, V) -> (1, N, V); (B, T+1, V) -> [:, :-1] when shifted."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x[:, :-1] if shift else x


def _logprob_fwd(x3, targets, temperature, with_entropy, logp=None, lse=None):
    """x3 (B, T, V) view, targets (B*T,) -> logp, lse, entropy, mean_z (fp32 (B*T,))."""
    B, T, V = x3.shape
    f32 = dict(device=x3.device, dtype=torch.float32)
    logp = torch.empty(B * T, **f32) if logp is None else logp
    lse = torch.empty(B * T, **f32) if lse is None else lse
    ent = torch.empty(B * T, **f32) if with_entropy else lse  # unused pointer when HAS_ENTROPY is False
    mean_z = torch.empty(B * T, **f32) if with_entropy else lse
    if B * T > 0:
        _logprob_fwd_kernel[(B * T,)](x3, targets, logp, lse, ent, mean_z, V, T, x3.stride(0), x3.stride(1),
                                      SCALE=LOG2E.value / temperature, HAS_ENTROPY=with_entropy,
                                      BLOCK_V=_block_v(V), num_warps=NUM_WARPS)
    return logp, lse, (ent if with_entropy else None), (mean_z if with_entropy else None)


def _logprob_bwd(x3, dx3, targets, lse, mean_z, g, g_h, temperature, col0=0):
    """Write dL/dlogits into dx3 (same shape as x3, may be x3 itself) in dx3's dtype."""
    B, T, V = x3.shape
    has_entropy = g_h is not None
    if B * T > 0:
        _logprob_bwd_kernel[(B * T,)](x3, dx3, targets, lse, mean_z if has_entropy else lse, g.contiguous(),
                                      g_h.contiguous() if has_entropy else g, V, T, x3.stride(0), x3.stride(1),
                                      dx3.stride(0), dx3.stride(1), col0, SCALE=LOG2E.value / temperature,
                                      INV_T=1.0 / temperature, HAS_ENTROPY=has_entropy, BLOCK_V=_block_v(V),
                                      num_warps=NUM_WARPS)


def _backward_tiles(N, V, chunk_size):
    """(vocabulary slice width, rows per tile) so that a logits tile holds about chunk_size * V elements."""
    budget, N = max(int(chunk_size), 1) * V, max(N, 1)
    width = min(V, max(MIN_SLICE, budget // N))
    slices = -(-V // width)
    width = min(V, max(MIN_SLICE, -(-V // slices) + 127 & ~127))  # equal slices (no thin last one), 128-aligned
    return width, (N if N * width <= budget + 128 * N else max(1, budget // width))


# ----------------------------------------------------------------------------------------------------------
# 4. Autograd Functions
# ----------------------------------------------------------------------------------------------------------
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, return_entropy, shift, inplace):
        logp, lse, ent, mean_z = _logprob_fwd(_view3(logits, shift), targets, temperature, return_entropy)
        ctx.save_for_backward(logits, targets, lse, mean_z)
        ctx.temperature, ctx.shift, ctx.inplace = temperature, shift, inplace
        ctx.set_materialize_grads(False)  # a None gradient (entropy unused) skips that term
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, g, g_h=None):
        logits, targets, lse, mean_z = ctx.saved_tensors
        if g is None:
            g = torch.zeros_like(lse)
        # in place (as Liger and flash-attn offer): the gradient overwrites the logits buffer, no second [N, V]
        dx = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if ctx.shift:
            dx[:, -1].zero_()  # the last position predicts no target
        _logprob_bwd(_view3(logits, ctx.shift), _view3(dx, ctx.shift), targets, lse, mean_z, g, g_h,
                     ctx.temperature)
        return dx, None, None, None, None, None


class _LinearTokenLogprobs(torch.autograd.Function):
    """logp of hidden @ weight.T: forward by row chunks, backward by vocabulary slices.

    Why the backward recomputes logits: the output is one log-prob per token, so the upstream gradient g is a
    vector that arrives only in the backward, and dweight = sum_i g_i (onehot_i - p_i)^T h_i / T needs it;
    keeping the logits would mean keeping all N x V of them. Recomputing costs one extra matmul (8 N H V FLOPs
    in all instead of 6).
    Why by vocabulary slices: with the forward's lse saved, the gradient of logits column j needs only column j,
    so the backward walks the vocabulary in slices [v0, v1): recompute logits[:, v0:v1] = h W[v0:v1]^T, turn
    them into their gradient in place, write dW[v0:v1] = dlogits^T h once (the matmul accumulates in fp32; no
    V x H fp32 accumulator, no V x H temporaries) and add dlogits W[v0:v1] to an fp32 (N, H) hidden gradient.
    A tile holds about chunk_size x V logits, as a forward chunk does: slices are N rows x (chunk_size V / N)
    columns, at least MIN_SLICE wide (then rows are split too, with an fp32 (width, H) slice accumulator).
    Each tile is freed before the next is computed. Under autocast both passes compute in the autocast dtype
    (the backward re-casts each weight slice), so the recomputed logits match the saved lse.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, dtype):
        N = hidden.shape[0]
        logp = torch.empty(N, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        w = weight.to(dtype)  # no copy unless autocast or mixed dtypes
        for s in range(0, N, chunk_size):
            logits = hidden[s:s + chunk_size].to(dtype) @ w.t()  # (c, V), the only logits alive
            _logprob_fwd(logits.unsqueeze(0), targets[s:s + chunk_size], temperature, False,
                         logp[s:s + chunk_size], lse[s:s + chunk_size])
            del logits  # freed before the next chunk's matmul allocates
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size, ctx.dtype = temperature, chunk_size, dtype
        return logp

    @staticmethod
    def backward(ctx, g):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        (N, H), V, dtype = hidden.shape, weight.shape[0], ctx.dtype
        h = hidden.to(dtype)
        d_hidden = torch.zeros(N, H, device=hidden.device, dtype=torch.float32) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        g = g.contiguous()
        width, rows = _backward_tiles(N, V, ctx.chunk_size)
        for v0 in range(0, V, width):
            w_v = weight[v0:v0 + width].to(dtype)  # (width, H)
            dw_acc = None
            for s in range(0, N, rows):
                h_c = h[s:s + rows]  # (c, H)
                logits = h_c @ w_v.t()  # (c, width) recomputed, then overwritten by its gradient
                tile = logits.unsqueeze(0)
                _logprob_bwd(tile, tile, targets[s:s + rows], lse[s:s + rows], None, g[s:s + rows], None,
                             ctx.temperature, col0=v0)
                del tile
                if need_h:
                    if dtype == torch.float32:
                        d_hidden[s:s + rows].addmm_(logits, w_v)
                    else:
                        d_hidden[s:s + rows] += logits @ w_v  # (c, H), summed over slices in fp32
                if need_w and rows >= N and d_weight.dtype == dtype:
                    torch.mm(logits.t(), h_c, out=d_weight[v0:v0 + width])  # written once, rounded once
                elif need_w and rows >= N:
                    d_weight[v0:v0 + width] = logits.t() @ h_c  # autocast: into the fp32 master's dtype
                elif need_w:  # rows split too: sum this slice's tiles in fp32
                    dw_acc = torch.zeros(w_v.shape, device=w_v.device, dtype=torch.float32) if s == 0 else dw_acc
                    if dtype == torch.float32:
                        dw_acc.addmm_(logits.t(), h_c)
                    else:
                        dw_acc += logits.t() @ h_c
                del logits  # freed before the next tile's matmul allocates: one tile alive, not two
            if dw_acc is not None:
                d_weight[v0:v0 + width] = dw_acc
        return (None if d_hidden is None else d_hidden.to(hidden.dtype)), d_weight, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# 5. Public functions: dispatch to Triton (CUDA, or KERNELS_BACKEND=triton) or to the reference.
# ----------------------------------------------------------------------------------------------------------
def token_logprobs(logits, targets, temperature=1.0, return_entropy=False, inplace_backward=False):
    """log p(targets) (fp32, shape of targets) under softmax(logits / temperature), optionally with the entropy.

    logits: (..., V) with targets (...), or the unshifted (B, T+1, V) with targets (B, T) (position t scores
    token t+1; read in place through its strides); fp32, bf16 or fp16. targets: integer ids in [0, V) (no ignore
    index: mask the result instead; others raise ValueError). Differentiable w.r.t. logits (through the entropy
    too); the gradient has the logits' shape and dtype. inplace_backward=True writes the gradient into the
    logits' own buffer (saves one logits-sized tensor; the logits must not be used by anything else afterwards).
    Returns logp (...) fp32, or (logp, entropy) when return_entropy.
    """
    V = logits.shape[-1]
    shift = _is_shifted(logits, targets)
    _check_targets(targets, V)
    if not _use_triton(logits):
        return token_logprobs_ref(logits[:, :-1] if shift else logits, targets, temperature, return_entropy)
    if logits.dim() not in (2, 3):
        logits = logits.reshape(-1, V)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels need unit column stride; other strides are free
    out = _TokenLogprobs.apply(logits, targets.reshape(-1).contiguous(), float(temperature), bool(return_entropy),
                               shift, bool(inplace_backward))
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=4096):
    """fp32 log p(targets) with logits = hidden @ weight.T, chunk_size rows of logits at a time.

    hidden: (N, H) with targets (N,), (B, T, H) with (B, T), or the unshifted (B, T+1, H) with (B, T);
    weight: (V, H) (the LM head). Differentiable w.r.t. hidden and weight. Under torch.autocast the logits are
    computed in the autocast dtype (as the model's own LM head would), otherwise in the promoted input dtype.
    """
    V, H = weight.shape
    shift = _is_shifted(hidden, targets)
    _check_targets(targets, V)
    if not _use_triton(hidden):
        return linear_token_logprobs_ref(hidden[:, :-1] if shift else hidden, weight, targets, temperature)
    device = hidden.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else torch.promote_types(hidden.dtype, weight.dtype))
    # shifted: score every row of the flat (B (T+1), H) view (no copy) with a dummy target 0 on the last
    # position of each sequence, then drop those; their upstream gradient is 0, so they add nothing to dW, dh
    full = torch.nn.functional.pad(targets, (0, 1)) if shift else targets
    logp = _LinearTokenLogprobs.apply(hidden.reshape(-1, H), weight, full.reshape(-1).contiguous(),
                                      float(temperature), int(chunk_size), dtype).view(full.shape)
    return logp[:, :-1] if shift else logp
