"""Group-normalised advantages and the fused per-token clipped policy loss (GRPO / PPO) with the k3 KL.

Advantages (GRPO, DeepSeekMath eq. 3), rewards r laid out as B groups of G completions of the same prompt:
    A_i = (r_i - mean_group) / (std + eps), std unbiased, and
    scale = "group": std over the group (GRPO);  "batch": std over the whole batch, still centred by the group
    mean ("group mean, batch std", Lite PPO / REINFORCE++ style);  "none": no division (Dr. GRPO, Liu et al. 2025).
    A group of one has no baseline: its advantage is 0 (as in TRL). A zero-variance group also gets A = 0
    (r - mean = 0 exactly), which is why callers count such groups (frac_reward_zero_std). eps: TRL 1e-4, verl 1e-6.

Policy loss, per token t of sequence b (PPO, Schulman et al. 2017, with the asymmetric clip of DAPO):
    ratio = exp(logp - old_logp)
    surrogate = -min(ratio A, clamp(ratio, 1 - clip_low, 1 + clip_high) A)
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1   (>= 0; Schulman's k3 estimator of KL(pi || ref))
    loss_t = surrogate + beta k3
    A is per sequence (B,) for GRPO or per token (B, T) for PPO with GAE.
Reductions (TRL names), each a per-token weight w_t times mask_t:
    grpo    = mean over sequences of the per-sequence masked token mean   w = 1 / (B * n_b), n_b = tokens of row b
    bnpo    = sum(loss mask) / sum(mask)                                   w = 1 / sum(mask)
    dr_grpo = sum(loss mask) / (B * max_completion_len)                    w = 1 / (B * L)
    dapo    = sum(loss mask) / num_active_tokens (whole generation batch)  w = 1 / num_active_tokens
Because every reduction is a per-token weight, dloss/dlogp_t = w_t * dloss_t/dlogp_t, with
    dsurrogate/dlogp = -A ratio where the unclipped term is selected, else 0;  dk3/dlogp = 1 - exp(ref - logp).
The Triton kernel computes loss, gradient and metrics in one pass over the tokens, in the forward; the
backward only scales the saved gradient by the incoming scalar.
Metrics (masked token means, detached fp32): clipfrac = share of tokens where the clipped term is selected and
differs from the unclipped one; approx_kl = k3 of old vs new, exp(old - logp) - (old - logp) - 1;
kl = k3 vs ref (when ref_logp is given); ratio_mean.
Masked positions may hold any finite values: their log-ratios are replaced by 0 before exp, so padding can
never overflow into inf * 0 = nan.

Backends as in kernels/logprob.py: CUDA -> Triton, else the reference; KERNELS_BACKEND=auto|triton|torch.
"""
import os

import torch
import triton
import triton.language as tl

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _use_triton(t: torch.Tensor) -> bool:
    backend = os.environ.get("KERNELS_BACKEND", "auto").lower()
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"KERNELS_BACKEND must be auto, triton or torch, got {backend!r}")
    return backend == "triton" or (backend == "auto" and t.is_cuda)


# ----------------------------------------------------------------------------------------------------------
# 0. Group advantages: B*G numbers per step, so plain PyTorch on any device (a kernel would only add a launch).
# ----------------------------------------------------------------------------------------------------------
def group_advantages(rewards, group_size, scale="group", eps=1e-6):
    """Advantages (B*G,) fp32 from rewards (B*G,) laid out group after group; see the module docstring."""
    rewards = torch.as_tensor(rewards).float().reshape(-1)
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    grouped = rewards.view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G); exactly 0 for a group of one
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        centred = centred / (std + eps)
    return centred.reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# 1. PyTorch reference
# ----------------------------------------------------------------------------------------------------------
def _check_args(logp, advantages, mask, loss_type):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logp.dim() != 2 or mask.shape != logp.shape:
        raise ValueError(f"logp and mask must both be (B, T), got {tuple(logp.shape)} and {tuple(mask.shape)}")
    B, T = logp.shape
    if advantages.shape not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"advantages must be (B,) or (B, T) = ({B}, {T}), got {tuple(advantages.shape)}")


def _token_weights(mask, loss_type, max_completion_len, num_active_tokens):
    """Per-row scale (B,) fp32 such that loss = sum_t scale_b * mask_bt * loss_bt for every reduction.

    No host-device traffic: a Python number becomes a fill (torch.full), never torch.tensor(...) on the device
    (a synchronous host-to-device copy on every call), and a device tensor is never read back.
    """
    B, T = mask.shape
    if loss_type == "grpo":
        return 1.0 / (B * mask.float().sum(dim=1).clamp(min=1.0))
    if loss_type == "dr_grpo":
        return torch.full((B,), 1.0 / (B * (max_completion_len or T)), device=mask.device, dtype=torch.float32)
    if loss_type == "bnpo" or num_active_tokens is None:  # bnpo; dapo over this batch only
        return (1.0 / mask.float().sum().clamp(min=1.0)).expand(B).contiguous()
    if torch.is_tensor(num_active_tokens) and num_active_tokens.device == mask.device:
        return (1.0 / num_active_tokens.float().clamp(min=1.0)).expand(B).contiguous()
    n = float(num_active_tokens)  # a Python number or a host tensor: read on the host, no device sync
    return torch.full((B,), 1.0 / max(n, 1.0), device=mask.device, dtype=torch.float32)


def policy_loss_ref(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, ref_logp=None, beta=0.0,
                    loss_type="grpo", max_completion_len=None, num_active_tokens=None):
    """Readable fp32 reference of policy_loss; same arguments and results."""
    _check_args(logp, advantages, mask, loss_type)
    B, T = logp.shape
    active = mask > 0  # (B, T)
    maskf = mask.float()
    adv = advantages.float().reshape(B, -1)  # (B, 1) or (B, T): broadcasts over T
    log_ratio = torch.where(active, logp.float() - old_logp.float(), 0.0)  # (B, T), 0 on padding
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.min(unclipped, clipped)  # (B, T)
    if ref_logp is not None:
        delta = torch.where(active, ref_logp.float() - logp.float(), 0.0)
        k3 = torch.exp(delta) - delta - 1.0  # (B, T), >= 0
        per_token = per_token + beta * k3
    if loss_type == "grpo":
        loss = ((per_token * maskf).sum(1) / maskf.sum(1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * maskf).sum() / maskf.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * maskf).sum() / (B * (max_completion_len or T))
    else:  # dapo
        n = maskf.sum() if num_active_tokens is None else num_active_tokens
        loss = (per_token * maskf).sum() / (n.float().clamp(min=1.0) if torch.is_tensor(n) else max(float(n), 1.0))
    with torch.no_grad():
        n_tok = maskf.sum().clamp(min=1.0)
        neg = -log_ratio  # old - new
        metrics = {
            "clipfrac": ((clipped < unclipped).float() * maskf).sum() / n_tok,
            "approx_kl": ((torch.exp(neg) - neg - 1.0) * maskf).sum() / n_tok,
            "ratio_mean": (ratio * maskf).sum() / n_tok,
        }
        if ref_logp is not None:
            metrics["kl"] = (k3 * maskf).sum() / n_tok
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# 2. Triton kernel: one pass over the B*T tokens (flattened, on grid axis 0, never T on axis 1/2), computing
#    the weighted loss, its gradient w.r.t. logp and the metric sums. Each program writes its partial sums to
#    its own row of a small buffer that torch then sums: deterministic, no atomics. Hyper-parameters are
#    constexpr (a Python float runtime argument would become fp64 under torch.compile).
# ----------------------------------------------------------------------------------------------------------
N_SUMS = 6  # weighted loss, clipped tokens, approx_kl, kl, ratio, mask


@triton.jit
def _policy_loss_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, scale_ptr, dlogp_ptr, part_ptr,
                        n_tokens, T, CLIP_LOW: tl.constexpr, CLIP_HIGH: tl.constexpr, BETA: tl.constexpr,
                        HAS_REF: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_tokens
    row = offs // T
    mask = tl.load(mask_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    active = mask > 0
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + offs, mask=inb, other=0.0)
    else:
        adv = tl.load(adv_ptr + row, mask=inb, other=0.0)
    w = mask * tl.load(scale_ptr + row, mask=inb, other=0.0)  # reduction weight of each token

    log_ratio = tl.where(active, logp - old, 0.0)  # 0 on padding: exp never overflows there
    ratio = tl.exp(log_ratio)
    unclipped = ratio * adv
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - CLIP_LOW), 1.0 + CLIP_HIGH) * adv
    loss = -tl.minimum(unclipped, clipped)
    # d(-min)/dlogp: -A ratio where the unclipped term is selected (ties: both terms have that slope), else 0
    dloss = tl.where(unclipped <= clipped, -adv * ratio, 0.0)
    k3 = tl.zeros_like(loss)
    if HAS_REF:
        delta = tl.where(active, tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32) - logp, 0.0)
        exp_delta = tl.exp(delta)
        k3 = exp_delta - delta - 1.0
        loss += BETA * k3
        dloss += BETA * (1.0 - exp_delta)
    tl.store(dlogp_ptr + offs, w * dloss, mask=inb)

    neg = -log_ratio  # k3 of old vs new for approx_kl
    part = part_ptr + pid.to(tl.int64) * 6
    tl.store(part + 0, tl.sum(w * loss, axis=0))
    tl.store(part + 1, tl.sum(tl.where(clipped < unclipped, mask, 0.0), axis=0))
    tl.store(part + 2, tl.sum(mask * (tl.exp(neg) - neg - 1.0), axis=0))
    tl.store(part + 3, tl.sum(mask * k3, axis=0))
    tl.store(part + 4, tl.sum(mask * ratio, axis=0))
    tl.store(part + 5, tl.sum(mask, axis=0))


# ----------------------------------------------------------------------------------------------------------
# 3. Launcher. BLOCK is a module setting so tests can shrink it and get several programs under the interpreter.
# ----------------------------------------------------------------------------------------------------------
BLOCK = 1024


def _policy_loss_fwd(logp, old_logp, ref_logp, advantages, mask, row_scale, clip_low, clip_high, beta):
    """-> dloss/dlogp (B, T) fp32, weighted loss (0-dim) and the metric sums (N_SUMS - 1,)."""
    B, T = logp.shape
    n = B * T
    dlogp = torch.empty((B, T), device=logp.device, dtype=torch.float32)
    grid = max(triton.cdiv(n, BLOCK), 1)
    partial = torch.zeros((grid, N_SUMS), device=logp.device, dtype=torch.float32)
    if n > 0:
        per_token = advantages.dim() == 2 and advantages.shape[1] == T
        _policy_loss_kernel[(grid,)](logp, old_logp, logp if ref_logp is None else ref_logp, advantages, mask,
                                     row_scale, dlogp, partial, n, T, CLIP_LOW=float(clip_low),
                                     CLIP_HIGH=float(clip_high), BETA=float(beta), HAS_REF=ref_logp is not None,
                                     ADV_PER_TOKEN=per_token, BLOCK=BLOCK, num_warps=4)
    return dlogp, partial[:, 0].sum(), partial[:, 1:].sum(dim=0)


# ----------------------------------------------------------------------------------------------------------
# 4. Autograd Function: the gradient is computed in the forward, the backward scales it.
# ----------------------------------------------------------------------------------------------------------
class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, mask, row_scale, clip_low, clip_high, beta):
        dlogp, loss, sums = _policy_loss_fwd(logp, old_logp, ref_logp, advantages, mask, row_scale, clip_low,
                                             clip_high, beta)
        ctx.save_for_backward(dlogp)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, g_loss, g_sums):
        (dlogp,) = ctx.saved_tensors
        return (dlogp * g_loss).to(ctx.logp_dtype), None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# 5. Public function
# ----------------------------------------------------------------------------------------------------------
def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, ref_logp=None, beta=0.0,
                loss_type="grpo", max_completion_len=None, num_active_tokens=None):
    """Clipped surrogate (+ beta k3 KL) reduced by loss_type -> (loss 0-dim fp32, metrics dict of 0-dim fp32).

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,) per sequence or (B, T) per token.
    Differentiable w.r.t. logp only. num_active_tokens (dapo): masked tokens in the whole generation batch when
    the caller splits it into micro-batches (default: mask.sum()). max_completion_len (dr_grpo): default T.
    """
    if not _use_triton(logp):
        return policy_loss_ref(logp, old_logp, advantages, mask, clip_low, clip_high, ref_logp, beta, loss_type,
                               max_completion_len, num_active_tokens)
    _check_args(logp, advantages, mask, loss_type)
    B, T = logp.shape
    row_scale = _token_weights(mask, loss_type, max_completion_len, num_active_tokens)  # (B,)
    adv = advantages.float().reshape(B, -1).contiguous()  # (B, 1) or (B, T)
    adv = adv.reshape(B) if adv.shape[1] == 1 else adv
    maskf = (mask if mask.is_floating_point() else mask.float()).contiguous()
    loss, sums = _PolicyLoss.apply(logp.contiguous(), old_logp.detach().contiguous(),
                                   None if ref_logp is None else ref_logp.detach().contiguous(), adv, maskf,
                                   row_scale, clip_low, clip_high, beta)
    n_tok = sums[4].clamp(min=1.0)
    metrics = {"clipfrac": sums[0] / n_tok, "approx_kl": sums[1] / n_tok, "ratio_mean": sums[3] / n_tok}
    if ref_logp is not None:
        metrics["kl"] = sums[2] / n_tok
    return loss, metrics
