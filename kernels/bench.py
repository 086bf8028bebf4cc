"""Speed and peak memory of the kernels next to eager PyTorch, torch.compile and Liger-Kernel, in one run.

    python kernels/bench.py                       # GPU: the full table (bf16); CPU: a tiny smoke configuration
    python kernels/bench.py --quick --out b.json  # a few small shapes, results also written as JSON
    python kernels/bench.py --peak-gbps 3350      # bandwidth fraction against a given figure instead

How it measures, so that the table can be trusted:
- The device's copy bandwidth is measured in the same run (dst.copy_(src) on a 1 GiB buffer, read + write
  counted) and is the 100% of the bandwidth column unless --peak-gbps is given.
- Before anything is timed, every provider runs once and its outputs (objective, gradients, metrics) are
  compared with eager PyTorch; a provider that disagrees is reported as an error, not timed.
- Every provider is timed over the same fixed number of iterations (--warmup, then --iters, each bracketed by
  CUDA events; the median is reported), however slow it is: a slow eager case is not timed once.
- policy_loss is launch-bound (microseconds of work): each timed iteration runs it --loop times back to back,
  so launch and Python overheads are averaged over a long loop instead of dominating one event pair.
Columns: median ms per call, achieved GB/s or TFLOP/s and its fraction of the peak (measured bandwidth, or
--peak-tflops for the LM-head variant), peak memory above the inputs (torch.cuda.max_memory_allocated), speed-up
vs eager. Bytes and FLOPs are the minimum the op must move or compute, the same for every provider:
    token_logprobs fwd      read the logits once                  N V b bytes
    token_logprobs fwd+bwd  read; read again and write dlogits    3 N V b bytes
    linear fwd+bwd          logits, dhidden, dweight matmuls      6 N H V FLOPs (ours recomputes: +2 N H V)
    policy_loss fwd+bwd     read logp, old, ref, mask, write and read the saved gradient, write the gradient
Every provider optimises the same objective, -sum_i logp_i (= summed cross-entropy), so that Liger-Kernel, which
has no per-token log-prob op with this API, can be compared side by side: LigerCrossEntropyLoss /
LigerFusedLinearCrossEntropyLoss with reduction="sum" (they compute the gradient inside the forward, so their
"fwd" row already includes it). Without CUDA the script runs a tiny CPU configuration of the PyTorch paths only:
those numbers say nothing about the GPU targets.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch  # noqa: E402

from kernels.advantage import policy_loss, policy_loss_ref  # noqa: E402
from kernels.logprob import linear_token_logprobs, token_logprobs  # noqa: E402

GPU_TOKENS = (4096, 16384)
GPU_VOCABS = (49152, 151936)
GPU_LM_HEADS = ((49152, 576), (151936, 896), (151936, 1536), (151936, 3584))  # SmolLM2-135M, Qwen2.5 0.5/1.5/7B


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few small shapes only (seconds on CPU)")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="bandwidth for the %% column (default: the copy bandwidth measured in this run)")
    p.add_argument("--peak-tflops", type=float, default=800.0, help="device bf16 dense TFLOP/s for the %% column")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (compiles per shape)")
    p.add_argument("--compile", action="store_true", help="on CPU, add the torch.compile column (slow to compile)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per provider (compile, autotune)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per provider (default 20 GPU, 5 CPU)")
    p.add_argument("--loop", type=int, default=None,
                   help="policy_loss calls per timed iteration (launch-bound op; default 100 GPU, 5 CPU)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- eager baselines (what people write today)
def eager_token_logprobs(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def eager_linear_token_logprobs(hidden, weight, targets):
    return eager_token_logprobs(hidden @ weight.t(), targets)


def _liger(cuda):
    """(cross-entropy, fused linear cross-entropy), both reduction="sum", or None (not installed, or no GPU)."""
    if not cuda:
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return LigerCrossEntropyLoss(reduction="sum"), lambda h, w, y: flce(w, h, y)  # Liger: (weight, input, y)
    except Exception:
        return None


# ---------------------------------------------------------------- measurement
def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def time_ms(fn, cuda, warmup, iters, inner=1):
    """Median ms per call over `iters` timed iterations of `inner` back-to-back calls each."""
    for _ in range(warmup):
        fn()
    _sync(cuda)
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def peak_mb(fn, cuda):
    """Peak memory allocated by one call above what was allocated before it (GPU only)."""
    if not cuda:
        return None
    _sync(cuda)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(cuda)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth_gbps(device, cuda, iters):
    """Measured device copy bandwidth: dst.copy_(src) moves 2 x nbytes (one read, one write)."""
    nbytes = 2**30 if cuda else 2**26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), cuda, warmup=2, iters=iters)
    del src, dst
    return 2 * nbytes / 1e9 / (ms / 1e3), nbytes


def max_rel_err(outputs, reference, chunk=2**26):
    """max |a - b| / max |b| over every output tensor pair, in chunks (no fp32 copy of a 5 GB gradient)."""
    err = 0.0
    for a, b in zip(outputs, reference):
        if a.shape != b.shape:
            return float("inf")
        a, b = a.detach().reshape(-1), b.detach().reshape(-1)
        diff = scale = 0.0
        for s in range(0, a.numel(), chunk):
            a_c, b_c = a[s:s + chunk].float(), b[s:s + chunk].float()
            diff = max(diff, (a_c - b_c).abs().max().item())
            scale = max(scale, b_c.abs().max().item())
        err = max(err, diff / max(scale, 1e-12))
    return err if err == err else float("inf")  # nan (non-finite outputs) -> inf


# ---------------------------------------------------------------- cases and providers
def cases(quick, cuda):
    """(op, shape dict) pairs."""
    if not cuda:
        tokens, vocabs, heads = (64,), (1000,), ((1000, 64),)
    elif quick:
        tokens, vocabs, heads = (4096,), (49152,), ((49152, 576),)
    else:
        tokens, vocabs, heads = GPU_TOKENS, GPU_VOCABS, GPU_LM_HEADS
    for op in ("token_logprobs fwd", "token_logprobs fwd+bwd"):
        for n in tokens:
            for v in vocabs:
                yield op, dict(N=n, V=v)
    for n in tokens:
        for v, h in heads:
            yield "linear_token_logprobs fwd+bwd", dict(N=n, V=v, H=h)
    for n in tokens:
        yield "policy_loss fwd+bwd", dict(N=n, B=16)


def make_providers(op, shape, device, dtype, use_compile, liger):
    """-> (dict provider -> step(); step() runs one call and returns the tensors to compare, work, unit)."""
    N = shape["N"]
    gen = torch.Generator(device=device).manual_seed(0)
    if op.startswith("token_logprobs"):
        V = shape["V"]
        x0 = (torch.randn(N, V, device=device, generator=gen) * 3).to(dtype)
        y = torch.randint(0, V, (N,), device=device, generator=gen)
        backward = op.endswith("bwd")

        def run(f, per_token=True, own_copy=False):
            x = (x0.detach().clone() if own_copy else x0).requires_grad_(backward)

            def step():
                out = f(x, y)
                objective = -out.sum() if per_token else out  # -sum logp = summed cross-entropy
                # autograd.grad, not backward(): the gradient w.r.t. the logits as a model's LM head receives
                # it (no accumulation into a leaf's .grad, which would copy an in-place gradient)
                grads = torch.autograd.grad(objective, x) if backward else ()
                return (objective.detach(),) + tuple(grads)
            return step
        fns = {"ours": run(token_logprobs), "eager": run(eager_token_logprobs)}
        if backward:  # the gradient overwrites the logits: its own copy, so the others keep theirs
            fns["ours (in-place grad)"] = run(lambda a, b: token_logprobs(a, b, inplace_backward=True),
                                              own_copy=True)
        if use_compile:
            fns["compile"] = run(torch.compile(eager_token_logprobs))
        if liger is not None:
            fns["liger (CE)"] = run(liger[0], per_token=False, own_copy=True)  # stores its gradient in the logits
        return fns, (3 if backward else 1) * N * V * x0.element_size() / 1e9, "GB"
    if op.startswith("linear"):
        V, H = shape["V"], shape["H"]
        h = torch.randn(N, H, device=device, generator=gen).to(dtype).requires_grad_()
        w = (torch.randn(V, H, device=device, generator=gen) * H**-0.5).to(dtype).requires_grad_()
        y = torch.randint(0, V, (N,), device=device, generator=gen)

        def run(f, per_token=True):
            def step():
                out = f(h, w, y)
                objective = -out.sum() if per_token else out
                objective.backward()
                grads = (h.grad, w.grad)
                h.grad = w.grad = None
                return (objective.detach(),) + grads
            return step
        fns = {"ours": run(linear_token_logprobs), "eager": run(eager_linear_token_logprobs)}
        if use_compile:
            fns["compile"] = run(torch.compile(eager_linear_token_logprobs))
        if liger is not None:
            fns["liger (FLCE)"] = run(liger[1], per_token=False)
        return fns, 6 * N * H * V / 1e12, "TFLOP"
    # policy_loss
    B = shape["B"]
    T = N // B
    logp = (torch.randn(B, T, device=device, generator=gen) * 0.3 - 1).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(B, T, device=device, generator=gen)
    ref = logp.detach() + 0.1 * torch.randn(B, T, device=device, generator=gen)
    adv = torch.randn(B, device=device, generator=gen)
    mask = torch.rand(B, T, device=device, generator=gen) > 0.2
    n_active = float(B * T)  # a Python number, as a training loop passes it

    def run(f):
        def step():
            loss, metrics = f(logp, old, adv, mask, ref_logp=ref, beta=0.04, loss_type="dapo",
                              num_active_tokens=n_active)
            loss.backward()
            grad = logp.grad
            logp.grad = None
            return (loss.detach(), grad) + tuple(metrics[k] for k in sorted(metrics))
        return step
    fns = {"ours": run(policy_loss), "eager": run(policy_loss_ref)}
    if use_compile:
        fns["compile"] = run(torch.compile(policy_loss_ref))
    return fns, 7 * 4 * N / 1e9, "GB"


# ---------------------------------------------------------------- main
def main(args):
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    iters = args.iters or (20 if cuda else 5)
    loop = args.loop or (100 if cuda else 5)
    tol = 3e-2 if dtype != torch.float32 else 1e-4  # agreement with eager, relative to the largest output
    use_compile = (cuda and not args.no_compile) or (not cuda and args.compile)
    liger = _liger(cuda)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    copy_gbps, copy_bytes = copy_bandwidth_gbps(device, cuda, iters)
    peak_gbps = args.peak_gbps or copy_gbps
    print(f"device: {name}; dtype {str(dtype).replace('torch.', '')}; torch {torch.__version__}")
    print(f"measured copy bandwidth: {copy_gbps:.0f} GB/s (dst.copy_(src), {copy_bytes / 2**20:.0f} MiB, read + "
          f"write); bandwidth % column against {peak_gbps:.0f} GB/s ({'given' if args.peak_gbps else 'measured'})")
    print(f"timing: {args.warmup} warm-up + {iters} timed iterations per provider, median; policy_loss {loop} calls "
          f"per iteration; outputs checked against eager first (relative tolerance {tol:g})")
    if not cuda:
        print("NOTE: no CUDA device: tiny CPU configuration, PyTorch reference paths only ('ours' dispatches to "
              "the reference). These numbers are CPU numbers and say nothing about the GPU targets.")
    if cuda and liger is None:
        print("liger_kernel not importable: no Liger column")
    rows = []
    for op, shape in cases(args.quick, cuda):
        fns, work, unit = make_providers(op, shape, device, dtype, use_compile, liger)
        shape_s = " ".join(f"{k}={v}" for k, v in shape.items())
        case_rows, reference = [], None
        for provider in ["eager"] + [p for p in fns if p != "eager"]:  # eager first: the reference outputs
            fn, row = fns[provider], dict(op=op, shape=shape_s, provider=provider)
            case_rows.append(row)
            try:
                outputs = fn()
                if provider == "eager":
                    reference = [t.detach().clone() for t in outputs]
                err = max_rel_err(outputs, reference)
                del outputs
                row["max_rel_err"] = err
                if err > tol:
                    row["error"] = f"outputs disagree with eager: max rel err {err:.3g} > {tol:g}; not timed"
                    continue
                inner = loop if op.startswith("policy_loss") else 1
                ms = time_ms(fn, cuda, args.warmup, iters, inner)
                mem = peak_mb(fn, cuda)
            except Exception as e:  # OOM, or a baseline that cannot run at this shape
                row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                if cuda:
                    torch.cuda.empty_cache()
                continue
            rate = work / (ms / 1e3)  # GB/s or TFLOP/s
            peak = peak_gbps if unit == "GB" else args.peak_tflops
            row.update(ms=ms, iters=iters, calls_per_iter=inner, throughput=rate, unit=f"{unit}/s",
                       frac_peak=rate / peak if (cuda or unit == "GB") else None, peak_mem_mb=mem)
        eager_ms = next((r["ms"] for r in case_rows if r["provider"] == "eager" and "ms" in r), None)
        for row in case_rows:
            if "ms" in row:
                row["speedup_vs_eager"] = eager_ms / row["ms"] if eager_ms else None
        rows += sorted(case_rows, key=lambda r: list(fns).index(r["provider"]))
        del fns, reference
        if cuda:
            torch.cuda.empty_cache()

    print()
    print("| op | shape | provider | median ms | throughput | % of peak | peak mem MB | vs eager | max rel err |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
        if "error" in r:
            print(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['error']} | | | | | {err} |")
            continue
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        frac = "n/a" if r["frac_peak"] is None else f"{100 * r['frac_peak']:.1f}%"
        speed = "" if r.get("speedup_vs_eager") is None else f"{r['speedup_vs_eager']:.2f}x"
        print(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['ms']:.3f} | {r['throughput']:.3g} {r['unit']} "
              f"| {frac} | {mem} | {speed} | {err} |")
    result = dict(device=name, cuda=cuda, dtype=str(dtype), torch=torch.__version__, copy_gbps=copy_gbps,
                  peak_gbps=peak_gbps, peak_gbps_source="given" if args.peak_gbps else "measured",
                  peak_tflops=args.peak_tflops, quick=args.quick, warmup=args.warmup, iters=iters, loop=loop,
                  tolerance=tol, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main(parse_args())
