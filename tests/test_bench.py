"""kernels/bench.py must keep running and be trustworthy: its quick mode, through a subprocess, produces a full
table and JSON with a measured copy bandwidth, fixed iteration counts and outputs checked against eager; in
process, a scalar-loss provider (the Liger wiring) runs forward + backward, and a wrong provider is refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels.bench as bench

ROOT = Path(__file__).resolve().parents[1]
OPS = ("token_logprobs fwd", "token_logprobs fwd+bwd", "linear_token_logprobs fwd+bwd", "policy_loss fwd+bwd")


def test_bench_quick_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("KERNELS_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "kernels/bench.py", "--quick", "--iters", "2", "--loop", "3", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "| op | shape | provider | median ms |" in text and "measured copy bandwidth" in text
    if not torch.cuda.is_available():
        assert "say nothing about the GPU targets" in text  # CPU numbers are labelled as such
    result = json.loads(out.read_text())
    assert result["cuda"] == torch.cuda.is_available()
    assert result["copy_gbps"] > 0 and result["peak_gbps"] == result["copy_gbps"]  # measured, not hard-coded
    assert result["iters"] == 2 and result["loop"] == 3
    rows = result["rows"]
    for op in OPS:
        providers = {r["provider"] for r in rows if r["op"] == op}
        assert {"ours", "eager"} <= providers, (op, providers)
        assert f"| {op} |" in text
    assert "ours (in-place grad)" in {r["provider"] for r in rows if r["op"] == "token_logprobs fwd+bwd"}
    for r in rows:
        assert "error" not in r, r
        assert r["max_rel_err"] <= result["tolerance"]  # checked before timing
        assert r["ms"] > 0 and r["throughput"] > 0 and r["unit"] in ("GB/s", "TFLOP/s") and r["iters"] == 2
        assert r["calls_per_iter"] == (3 if r["op"].startswith("policy_loss") else 1)
        assert r["speedup_vs_eager"] > 0
        if r["provider"] == "eager":
            assert abs(r["speedup_vs_eager"] - 1.0) < 1e-9 and r["max_rel_err"] == 0.0


def _run_with_liger(monkeypatch, ce, flce):
    monkeypatch.setattr(bench, "_liger", lambda cuda: (ce, flce))
    monkeypatch.setattr(bench, "cases", lambda quick, cuda: iter([("token_logprobs fwd", dict(N=9, V=37)),
                                                                  ("token_logprobs fwd+bwd", dict(N=9, V=37)),
                                                                  ("linear_token_logprobs fwd+bwd",
                                                                   dict(N=9, V=37, H=5))]))
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    result = bench.main(bench.parse_args(["--quick", "--iters", "1", "--warmup", "0"]))
    return {(r["op"], r["provider"]): r for r in result["rows"]}


def test_bench_scalar_loss_provider_runs_forward_and_backward(monkeypatch):
    """Liger's losses are scalars (reduction="sum"): the forward+backward rows must call backward() on them
    (the old script passed a per-token gradient and crashed) and agree with eager on loss and gradients."""
    rows = _run_with_liger(monkeypatch, lambda x, y: F.cross_entropy(x.float(), y, reduction="sum"),
                           lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"))
    for key in [("token_logprobs fwd", "liger (CE)"), ("token_logprobs fwd+bwd", "liger (CE)"),
                ("linear_token_logprobs fwd+bwd", "liger (FLCE)")]:
        assert "error" not in rows[key], rows[key]
        assert rows[key]["ms"] > 0 and rows[key]["max_rel_err"] < 1e-5


def test_bench_refuses_to_time_a_provider_that_disagrees(monkeypatch):
    rows = _run_with_liger(monkeypatch, lambda x, y: F.cross_entropy(x.float(), y, reduction="mean"),  # wrong
                           lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"))
    for op in ("token_logprobs fwd", "token_logprobs fwd+bwd"):
        row = rows[(op, "liger (CE)")]
        assert "outputs disagree with eager" in row["error"] and "ms" not in row and row["max_rel_err"] > 0.5
    assert "error" not in rows[("linear_token_logprobs fwd+bwd", "liger (FLCE)")]
    assert "error" not in rows[("token_logprobs fwd+bwd", "ours")]
