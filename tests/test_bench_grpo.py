"""algos/bench_grpo.py: the table's arithmetic and one path end to end on the tiny model."""
import json
import subprocess
import sys
from pathlib import Path

from algos.bench_grpo import summarize

ROOT = Path(__file__).resolve().parents[1]


def test_summarize_skips_the_warm_up_batch():
    row = summarize("now", 0, 100.0, 2.5, [(30.0, 40.0), (10.0, 20.0), (14.0, 16.0)])
    assert (row["sample_s"], row["train_s"], row["step_s"], row["first_step_s"]) == (12.0, 18.0, 30.0, 70.0)
    assert row["steps"] == 3 and row["peak_rss_gb"] == 2.5
    assert summarize("before", 1, 5.0, 1.0, [(3.0, 4.0)])["step_s"] == 7.0  # one batch: nothing to skip


def test_bench_smoke_tiny(tmp_path):
    cmd = [sys.executable, "algos/bench_grpo.py", "--model", "tiny", "--steps", "1", "--paths", "now",
           "--train-file", "data/toolrl_train_sample.jsonl", "--max-prompt-tokens", "1024", "--max-new-tokens", "4",
           "--runs-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = sorted(tmp_path.glob("bench_grpo__1__*"))[-1]
    (result,) = json.loads((run / "summary.json").read_text())["results"]
    assert result["path"] == "now" and result["exit_code"] == 0 and result["steps"] == 1
    assert result["sample_s"] > 0 and 0 < result["peak_rss_gb"] < 8
    assert "| now |" in (run / "table.md").read_text()
