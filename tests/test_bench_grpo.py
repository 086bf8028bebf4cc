"""algos/bench_grpo.py: the table's arithmetic and one path end to end on the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from algos.bench_grpo import Args, run_measured, step_times, summarize, trl_config
from algos.model import parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_summarize_skips_the_warm_up_batch():
    row = summarize("now", 0, 100.0, 2.5, [(30.0, 40.0), (10.0, 20.0), (14.0, 16.0)])
    assert (row["sample_s"], row["train_s"], row["step_s"], row["first_step_s"]) == (12.0, 18.0, 30.0, 70.0)
    assert row["steps"] == 3 and row["peak_rss_gb"] == 2.5
    assert summarize("before", 1, 5.0, 1.0, [(3.0, 4.0)])["step_s"] == 7.0  # one batch: nothing to skip


def test_step_times_skip_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "time/generate_s": 3.5, "time/train_s": 4.0}) + "\n"
                    + '{"step": 1, "time/generate_s": 2.')  # the process died while writing step 1
    assert step_times(path) == [(3.5, 4.0)]


def test_a_path_runs_its_own_code_first_then_a_given_pythonpath(tmp_path, monkeypatch):
    # `before` runs an older checkout from its folder; a trl installed with `pip --target DIR` is found through DIR
    show, log = [sys.executable, "-c", "import os; print(os.environ['PYTHONPATH'])"], tmp_path / "log"
    monkeypatch.setenv("PYTHONPATH", "/x")
    assert run_measured(show, tmp_path, log)[0] == 0 and log.read_text().strip() == f"{tmp_path}{os.pathsep}/x"
    monkeypatch.delenv("PYTHONPATH")
    assert run_measured(show, tmp_path, log)[0] == 0 and log.read_text().strip() == str(tmp_path)


def test_bench_smoke_tiny(tmp_path):
    cmd = [sys.executable, "algos/bench_grpo.py", "--model", "tiny", "--steps", "1", "--paths", "now,now_bf16",
           "--train-file", "data/toolrl_train_sample.jsonl", "--max-prompt-tokens", "1024", "--max-new-tokens", "4",
           "--runs-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = sorted(tmp_path.glob("bench_grpo__1__*"))[-1]
    results = json.loads((run / "summary.json").read_text())["results"]
    assert [r["path"] for r in results] == ["now", "now_bf16"]
    for result in results:
        assert result["exit_code"] == 0 and result["steps"] == 1
        assert result["sample_s"] > 0 and 0 < result["peak_rss_gb"] < 8
    assert "| now |" in (run / "table.md").read_text() and "| now_bf16 |" in (run / "table.md").read_text()


@pytest.mark.parametrize("flag, argv", [
    ("--paths", ["--paths", "now,vllm"]), ("--group-size", ["--group-size", "1"]),  # GRPO needs G >= 2
    ("--num-minibatches", ["--prompts-per-step", "2", "--num-minibatches", "3"]),  # whole groups per minibatch
    ("--before-commit", ["--before-commit", "0" * 40]),  # not a commit here
])
def test_bad_arguments_are_usage_errors(flag, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, ["--train-file", "data/toolrl_train_sample.jsonl", *argv])
    assert e.value.code == 2 and flag in capsys.readouterr().err.splitlines()[-1]


def test_a_bad_argument_stops_the_script_before_loading_a_model(tmp_path):
    unloadable = tmp_path / "unloadable_model"  # passes the model check; loading it would fail (no config.json)
    unloadable.mkdir()
    out = subprocess.run([sys.executable, "algos/bench_grpo.py", "--model", str(unloadable), "--train-file",
                          "data/toolrl_train_sample.jsonl", "--runs-dir", str(tmp_path), "--paths", "now,vllm"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    # the unloadable model proves the order: parse_args ran before main
    assert out.returncode == 2 and "--paths" in out.stderr.splitlines()[-1], out.stderr[-1000:]
    assert not list(tmp_path.glob("bench_grpo__*"))


def test_trl_generates_one_whole_generation_batch_then_num_minibatches_steps(tmp_path):
    pytest.importorskip("trl")
    for p, g, m, micro in [(4, 4, 2, 2), (3, 2, 3, 1), (6, 4, 2, 3)]:
        args = Args(paths="trl", prompts_per_step=p, group_size=g, num_minibatches=m, trl_micro_batch=micro)
        c = trl_config(args, tmp_path)
        assert c.generation_batch_size == p * g  # TRL used to sample trl_micro_batch x num_minibatches (1 group)
        assert c.steps_per_generation == m * c.gradient_accumulation_steps  # num_minibatches optimizer steps each
        assert c.gradient_accumulation_steps * micro * m == p * g
