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

linear_token_logprobs(hidden, weight, targets) does the same from the last hidden states, one chunk of rows
at a time, so that only one chunk of logits (chunk_size x V) is ever alive; see _LinearTokenLogprobs for why
the backward recomputes the chunk's logits instead of keeping them.

Backends: CUDA tensors run the Triton kernels; anything else runs the PyTorch reference. The environment
variable KERNELS_BACKEND = auto (default) | triton | torch forces one; with TRITON_INTERPRET=1 set before
triton is imported, "triton" runs the kernels on CPU tensors (that is how tests/test_kernels.py checks them).
"""
import os

import torch
import triton
import triton.language as tl


def _use_triton(t: torch.Tensor) -> bool:
    backend = os.environ.get("KERNELS_BACKEND", "auto").lower()
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"KERNELS_BACKEND must be auto, triton or torch, got {backend!r}")
    return backend == "triton" or (backend == "auto" and t.is_cuda)


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
    """fp32 log p(targets) with logits = hidden @ weight.T; hidden (N, H), weight (V, H), targets (N,)."""
    logits = hidden.float() @ weight.float().t()  # (N, V) fp32
    return token_logprobs_ref(logits, targets, temperature)


# ----------------------------------------------------------------------------------------------------------
# 2. Triton kernels. One program per row (rows on grid axis 0, which allows 2^31 - 1 programs), looping over
#    the vocabulary in BLOCK_V columns. Offsets are int64: row * V exceeds 2^31 at 16384 x 151936.
#    The temperature enters as a constexpr 1/T: a Python float passed as a runtime argument becomes fp64
#    under torch.compile, and a run uses one temperature, so one compilation per value is cheap.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _logprob_fwd_kernel(x_ptr, y_ptr, logp_ptr, lse_ptr, ent_ptr, meanz_ptr, V, stride_x,
                        INV_T: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    m = tl.full((), float("-inf"), tl.float32)  # running max of z
    d = tl.zeros((), tl.float32)  # running sum of exp(z - m)
    s = tl.zeros((), tl.float32)  # running sum of exp(z - m) * z (entropy only)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        # padded tail columns are -inf, so they add exp(-inf) = 0 and never win the max
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * INV_T
        m_new = tl.maximum(m, tl.max(z, axis=0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        d = d * rescale + tl.sum(e, axis=0)
        if HAS_ENTROPY:
            # where e == 0 (the -inf tail) use z = 0, as 0 * -inf would be nan
            s = s * rescale + tl.sum(e * tl.where(e > 0, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(d)
    y = tl.load(y_ptr + row).to(tl.int64)
    z_y = tl.load(x_row + y).to(tl.float32) * INV_T
    tl.store(logp_ptr + row, z_y - lse)
    tl.store(lse_ptr + row, lse)
    if HAS_ENTROPY:
        mean_z = s / d
        tl.store(ent_ptr + row, lse - mean_z)
        tl.store(meanz_ptr + row, mean_z)


@triton.jit
def _logprob_bwd_kernel(x_ptr, dx_ptr, y_ptr, lse_ptr, meanz_ptr, g_ptr, gh_ptr, V, stride_x, stride_dx,
                        INV_T: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    # dx may alias x (the linear path overwrites its logits chunk): every element is read before written.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dx_row = dx_ptr + row * stride_dx
    y = tl.load(y_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row).to(tl.float32)
    if HAS_ENTROPY:
        g_h = tl.load(gh_ptr + row).to(tl.float32)
        mean_z = tl.load(meanz_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32) * INV_T
        p = tl.exp(z - lse)
        # (1[j = y] - p) in fp32 *before* rounding: no bf16 cancellation when p_y -> 1
        grad = g * (tl.where(cols == y, 1.0, 0.0) - p)
        if HAS_ENTROPY:
            grad -= g_h * p * (tl.where(p > 0, z, mean_z) - mean_z)  # p == 0: no nan from a -inf logit
        tl.store(dx_row + cols, (grad * INV_T).to(dx_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------------------
# 3. Launchers. BLOCK_V / NUM_WARPS are module settings (tests shrink BLOCK_V to exercise many blocks under
#    the interpreter); on an H100 a 4096-column block keeps 8 warps busy with 16 elements per thread.
# ----------------------------------------------------------------------------------------------------------
BLOCK_V = 4096
NUM_WARPS = 8


def _block_v(V):
    return min(BLOCK_V, triton.next_power_of_2(V))


def _logprob_fwd(logits, targets, temperature, with_entropy, logp=None, lse=None):
    """logits (N, V) with unit column stride, targets (N,) -> logp, lse, entropy, mean_z (fp32 (N,))."""
    N, V = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    logp = torch.empty(N, **f32) if logp is None else logp
    lse = torch.empty(N, **f32) if lse is None else lse
    ent = torch.empty(N, **f32) if with_entropy else lse  # unused pointer when HAS_ENTROPY is False
    mean_z = torch.empty(N, **f32) if with_entropy else lse
    if N > 0:
        _logprob_fwd_kernel[(N,)](logits, targets, logp, lse, ent, mean_z, V, logits.stride(0),
                                  INV_T=1.0 / temperature, HAS_ENTROPY=with_entropy, BLOCK_V=_block_v(V),
                                  num_warps=NUM_WARPS)
    return logp, lse, (ent if with_entropy else None), (mean_z if with_entropy else None)


def _logprob_bwd(logits, targets, lse, mean_z, g, g_h, temperature, out=None):
    """dL/dlogits in the logits' dtype; out=logits overwrites the logits in place."""
    N, V = logits.shape
    dx = torch.empty_like(logits) if out is None else out
    has_entropy = g_h is not None
    if N > 0:
        _logprob_bwd_kernel[(N,)](logits, dx, targets, lse, mean_z if has_entropy else lse, g.contiguous(),
                                  g_h.contiguous() if has_entropy else g, V, logits.stride(0), dx.stride(0),
                                  INV_T=1.0 / temperature, HAS_ENTROPY=has_entropy, BLOCK_V=_block_v(V),
                                  num_warps=NUM_WARPS)
    return dx


# ----------------------------------------------------------------------------------------------------------
# 4. Autograd Functions
# ----------------------------------------------------------------------------------------------------------
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, return_entropy):
        logp, lse, ent, mean_z = _logprob_fwd(logits, targets, temperature, return_entropy)
        ctx.save_for_backward(logits, targets, lse, mean_z)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # a None gradient (entropy unused) skips that term
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, g, g_h=None):
        logits, targets, lse, mean_z = ctx.saved_tensors
        if g is None:
            g = torch.zeros_like(lse)
        dx = _logprob_bwd(logits, targets, lse, mean_z, g, g_h, ctx.temperature)
        return dx, None, None, None


class _LinearTokenLogprobs(torch.autograd.Function):
    """logp of hidden @ weight.T, chunk_size rows at a time.

    Why the backward recomputes each chunk's logits: the output is one log-prob per token, so the upstream
    gradient g is a vector that arrives only in the backward, and dweight = sum_i g_i (onehot_i - p_i)^T h_i / T
    needs it. The only alternative is to keep every chunk's logits until then, i.e. all N x V of them, which is
    what this function exists to avoid. Recomputing costs one extra chunk matmul (8 N H V FLOPs in all instead of
    6 N H V). A caller that reduces to a scalar loss inside the same function could instead compute gradients in
    the forward (as fused linear cross-entropy kernels do); a per-token API cannot.
    Chunks are large (default 4096 rows) so that the weight is re-read rarely; logits are kept in the inputs'
    dtype, as the model's own LM head would produce them, and the kernels accumulate in fp32. Per-chunk weight
    gradients are summed in fp32. Results depend on chunk_size only through matmul rounding.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        N = hidden.shape[0]
        logp = torch.empty(N, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        for s in range(0, N, chunk_size):
            logits = hidden[s:s + chunk_size] @ weight.t()  # (c, V), the only logits alive
            _logprob_fwd(logits, targets[s:s + chunk_size], temperature, False, logp[s:s + chunk_size],
                         lse[s:s + chunk_size])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp

    @staticmethod
    def backward(ctx, g):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        g = g.contiguous()
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            e = s + ctx.chunk_size
            h = hidden[s:e]  # (c, H)
            logits = h @ weight.t()  # (c, V) recomputed, then overwritten by its gradient
            _logprob_bwd(logits, targets[s:e], lse[s:e], None, g[s:e], None, ctx.temperature, out=logits)
            if need_h:
                torch.mm(logits, weight, out=d_hidden[s:e])  # (c, H)
            if need_w:
                d_weight += (logits.t() @ h).float()  # (V, H), summed over chunks in fp32
        if need_w:
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, None, None, None


# ----------------------------------------------------------------------------------------------------------
# 5. Public functions: dispatch to Triton (CUDA, or KERNELS_BACKEND=triton) or to the reference.
# ----------------------------------------------------------------------------------------------------------
def token_logprobs(logits, targets, temperature=1.0, return_entropy=False):
    """log p(targets) (fp32, shape of targets) under softmax(logits / temperature), optionally with the entropy.

    logits: (..., V) in fp32, bf16 or fp16; targets: (...) integer ids in [0, V) (no ignore index: mask the
    result instead). Differentiable w.r.t. logits (through the entropy too); the gradient comes back in the
    logits' dtype. Returns logp (...) fp32, or (logp, entropy) when return_entropy.
    """
    if not _use_triton(logits):
        return token_logprobs_ref(logits, targets, temperature, return_entropy)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = _TokenLogprobs.apply(flat, targets.reshape(-1).contiguous(), float(temperature), bool(return_entropy))
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=4096):
    """fp32 log p(targets) with logits = hidden @ weight.T, computed chunk_size rows at a time.

    hidden: (N, H), weight: (V, H) (the LM head), targets: (N,). Differentiable w.r.t. hidden and weight.
    """
    if not _use_triton(hidden):
        return linear_token_logprobs_ref(hidden, weight, targets, temperature)
    return _LinearTokenLogprobs.apply(hidden.contiguous(), weight.contiguous(), targets.reshape(-1).contiguous(),
                                      float(temperature), int(chunk_size))
