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
# 5. Public functions: dispatch to Triton (CUDA, or KERNELS_BACKEND=triton) or to the reference.
# ----------------------------------------------------------------------------------------------------------
def token_logprobs(logits, targets, temperature=1.0, return_entropy=False):
    """log p(targets) (fp32, shape of targets) under softmax(logits / temperature), optionally with the entropy.

    logits: (..., V) in fp32, bf16 or fp16; targets: (...) integer ids in [0, V). Differentiable w.r.t. logits
    (through the entropy too); the gradient comes back in the logits' dtype.
    """
    return token_logprobs_ref(logits, targets, temperature, return_entropy)


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=4096):
    """fp32 log p(targets) with logits = hidden @ weight.T, computed chunk_size rows at a time.

    hidden: (N, H), weight: (V, H) (the LM head), targets: (N,). Differentiable w.r.t. hidden and weight.
    """
    return linear_token_logprobs_ref(hidden, weight, targets, temperature)
