"""kernels/bench.py must keep running: its quick mode, through a subprocess, produces a full table and JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPS = ("token_logprobs fwd", "token_logprobs fwd+bwd", "linear_token_logprobs fwd+bwd", "policy_loss fwd+bwd")


def test_bench_quick_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("KERNELS_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "kernels/bench.py", "--quick", "--reps", "2", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "| op | shape | provider | median ms |" in text
    if not torch.cuda.is_available():
        assert "say nothing about the GPU targets" in text  # CPU numbers are labelled as such
    result = json.loads(out.read_text())
    assert result["cuda"] == torch.cuda.is_available()
    rows = result["rows"]
    for op in OPS:
        providers = {r["provider"] for r in rows if r["op"] == op}
        assert {"ours", "eager"} <= providers, (op, providers)
        assert f"| {op} |" in text
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["throughput"] > 0 and r["unit"] in ("GB/s", "TFLOP/s")
        assert r["speedup_vs_eager"] > 0
        if r["provider"] == "eager":
            assert abs(r["speedup_vs_eager"] - 1.0) < 1e-9
