"""Speed and peak memory of the kernels next to eager PyTorch, torch.compile and Liger-Kernel, in one run.

    python kernels/bench.py                       # GPU: the full table (bf16); CPU: a tiny smoke configuration
    python kernels/bench.py --quick --out b.json  # a few small shapes, results also written as JSON
    python kernels/bench.py --peak-gbps 3350      # bandwidth fraction against the spec sheet instead

Columns: median time (triton.testing.do_bench on GPU), achieved bandwidth in GB/s and its fraction of the
device's peak (--peak-gbps, default 3000 = H100 measured copy bandwidth) for the memory-bound ops, TFLOP/s and
its fraction of --peak-tflops for the LM-head variant, and peak memory above the inputs
(torch.cuda.max_memory_allocated). Bytes and FLOPs are the minimum the op must move or compute, the same for
every provider, so the numbers compare implementations against the same floor:
    token_logprobs fwd      read the logits once                  N V b bytes
    token_logprobs fwd+bwd  read; read again and write dlogits    3 N V b bytes
    linear fwd+bwd          logits, dhidden, dweight matmuls      6 N H V FLOPs (ours recomputes: +2 N H V)
    policy_loss fwd+bwd     read logp, old, ref, mask, write and read the saved gradient, write the gradient
Liger-Kernel has no per-token log-prob op with this API: its column times LigerCrossEntropyLoss /
LigerFusedLinearCrossEntropyLoss (reduction="sum"), which compute the same softmax statistics and gradient
(and fold the backward into the forward). Without CUDA the script runs a tiny CPU configuration of the
PyTorch paths only: those numbers say nothing about the GPU targets.
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
    p.add_argument("--peak-gbps", type=float, default=3000.0, help="device memory bandwidth for the %% column")
    p.add_argument("--peak-tflops", type=float, default=800.0, help="device bf16 dense TFLOP/s for the %% column")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (compiles per shape)")
    p.add_argument("--compile", action="store_true", help="on CPU, add the torch.compile column (slow to compile)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (GPU uses do_bench)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- eager baselines (what people write today)
def eager_token_logprobs(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def eager_linear_token_logprobs(hidden, weight, targets):
    return eager_token_logprobs(hidden @ weight.t(), targets)


def _liger():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
        return LigerCrossEntropyLoss(reduction="sum"), LigerFusedLinearCrossEntropyLoss(reduction="sum")
    except Exception:  # not installed, or no GPU
        return None


# ---------------------------------------------------------------- measurement
def measure(fn, cuda, reps):
    """-> (median ms, peak MB above what was allocated before)."""
    if cuda:
        import triton.testing
        fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"), peak_mb
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


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
    """-> (dict provider name -> zero-argument callable, work amount, unit 'GB' or 'TFLOP')."""
    N = shape["N"]
    gen = torch.Generator(device=device).manual_seed(0)
    if op.startswith("token_logprobs"):
        V = shape["V"]
        x = (torch.randn(N, V, device=device, generator=gen) * 3).to(dtype)
        y = torch.randint(0, V, (N,), device=device, generator=gen)
        g = torch.randn(N, device=device, generator=gen)
        backward = op.endswith("bwd")
        x.requires_grad_(backward)

        def run(f):
            def step():
                out = f(x, y)
                if backward:
                    out.backward(g)
                x.grad = None  # freed at the end, so peak memory counts it once
            return step
        fns = {"ours": run(token_logprobs), "eager": run(eager_token_logprobs)}
        if use_compile:
            fns["compile"] = run(torch.compile(eager_token_logprobs))
        if liger is not None:
            fns["liger (CE)"] = run(lambda a, b: liger[0](a, b))
        return fns, (3 if backward else 1) * N * V * x.element_size() / 1e9, "GB"
    if op.startswith("linear"):
        V, H = shape["V"], shape["H"]
        h = torch.randn(N, H, device=device, generator=gen).to(dtype).requires_grad_()
        w = (torch.randn(V, H, device=device, generator=gen) * H**-0.5).to(dtype).requires_grad_()
        y = torch.randint(0, V, (N,), device=device, generator=gen)
        g = torch.randn(N, device=device, generator=gen)

        def run(f, scalar=False):
            def step():
                out = f(h, w, y)
                out.backward() if scalar else out.backward(g)
                h.grad = w.grad = None
            return step
        fns = {"ours": run(linear_token_logprobs), "eager": run(eager_linear_token_logprobs)}
        if use_compile:
            fns["compile"] = run(torch.compile(eager_linear_token_logprobs))
        if liger is not None:
            fns["liger (FLCE)"] = run(lambda a, b, c: liger[1](b, a, c), scalar=True)
        return fns, 6 * N * H * V / 1e12, "TFLOP"
    # policy_loss
    B = shape["B"]
    T = N // B
    logp = (torch.randn(B, T, device=device, generator=gen) * 0.3 - 1).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(B, T, device=device, generator=gen)
    ref = logp.detach() + 0.1 * torch.randn(B, T, device=device, generator=gen)
    adv = torch.randn(B, device=device, generator=gen)
    mask = torch.rand(B, T, device=device, generator=gen) > 0.2

    def run(f):
        def step():
            loss, _ = f(logp, old, adv, mask, ref_logp=ref, beta=0.04)
            loss.backward()
            logp.grad = None
        return step
    fns = {"ours": run(policy_loss), "eager": run(policy_loss_ref)}
    if use_compile:
        fns["compile"] = run(torch.compile(policy_loss_ref))
    return fns, 7 * 4 * N / 1e9, "GB"


def main(args):
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    use_compile = (cuda and not args.no_compile) or (not cuda and args.compile)
    liger = _liger() if cuda else None
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; dtype {str(dtype).replace('torch.', '')}; torch {torch.__version__}")
    if not cuda:
        print("NOTE: no CUDA device: tiny CPU configuration, PyTorch reference paths only ('ours' dispatches to "
              "the reference). These numbers are CPU numbers and say nothing about the GPU targets.")
    if cuda and liger is None:
        print("liger_kernel not importable: no Liger column")
    rows = []
    for op, shape in cases(args.quick, cuda):
        fns, work, unit = make_providers(op, shape, device, dtype, use_compile, liger)
        eager_ms = None
        for provider, fn in fns.items():
            row = dict(op=op, shape=" ".join(f"{k}={v}" for k, v in shape.items()), provider=provider)
            try:
                ms, peak_mb = measure(fn, cuda, args.reps)
            except Exception as e:  # OOM, or a baseline that cannot run at this shape
                row.update(error=f"{type(e).__name__}: {str(e)[:80]}")
                rows.append(row)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            rate = work / (ms / 1e3)  # GB/s or TFLOP/s
            peak = args.peak_gbps if unit == "GB" else args.peak_tflops
            eager_ms = ms if provider == "eager" else eager_ms
            row.update(ms=ms, throughput=rate, unit=f"{unit}/s", frac_peak=rate / peak if cuda else None,
                       peak_mem_mb=peak_mb)
            rows.append(row)
        for row in rows:
            if row["op"] == op and row["shape"] == " ".join(f"{k}={v}" for k, v in shape.items()) and "ms" in row:
                row["speedup_vs_eager"] = eager_ms / row["ms"] if eager_ms else None
        del fns
        if cuda:
            torch.cuda.empty_cache()

    print()
    print("| op | shape | provider | median ms | throughput | % of peak | peak mem MB | vs eager |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['error']} | | | | |")
            continue
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        frac = "n/a" if r["frac_peak"] is None else f"{100 * r['frac_peak']:.1f}%"
        speed = "" if r.get("speedup_vs_eager") is None else f"{r['speedup_vs_eager']:.2f}x"
        print(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['ms']:.3f} | {r['throughput']:.3g} {r['unit']} "
              f"| {frac} | {mem} | {speed} |")
    result = dict(device=name, cuda=cuda, dtype=str(dtype), torch=torch.__version__, peak_gbps=args.peak_gbps,
                  peak_tflops=args.peak_tflops, quick=args.quick, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main(parse_args())
