"""The run plumbing of algos/model.py: argument checks, resumable checkpoints, the non-finite guard, torchrun."""
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from algos.model import (FiniteGuard, RunLogger, arg, file_error, gather, load_model, model_error, parse_args,
                         rows_at, seed_of)


@dataclass
class Args:
    exp_name: str = arg("t", "name")
    group_size: int = arg(4, "samples per prompt", low=2)
    clip: float = arg(0.2, "clip range", low=0.0, high=1.0)
    loss_type: str = arg("dapo", "reduction", choices=["dapo", "grpo"])
    model: str = arg("tiny", "model", check=model_error)
    shared: bool = arg(True, "a flag")
    batch: int = arg(8, "rows", low=1)
    minibatches: int = arg(2, "minibatches", low=1)

    def __post_init__(self):
        if self.batch % self.minibatches:
            raise ValueError(f"--batch {self.batch} must be divisible by --minibatches {self.minibatches}")


def test_parse_args_accepts_good_values():
    args = parse_args(Args, ["--group-size", "2", "--clip", "1.0", "--loss-type", "grpo", "--shared", "false"])
    assert (args.group_size, args.clip, args.loss_type, args.shared) == (2, 1.0, "grpo", False)


@pytest.mark.parametrize("argv, message", [
    (["--group-size", "1"], "--group-size: must be >= 2 (got 1)"),
    (["--clip", "1.5"], "--clip: must be <= 1.0 (got 1.5)"),
    (["--clip", "nan"], "--clip: must be >= 0.0 (got nan)"),
    (["--loss-type", "foo"], "--loss-type: invalid choice: 'foo'"),
    (["--model", "/no/such/dir"], "--model: no such model folder: /no/such/dir"),
    (["--batch", "9"], "--batch 9 must be divisible by --minibatches 2"),
])
def test_parse_args_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    assert model_error("smollm2-135m") is None and model_error("tiny") is None
    assert model_error(str(tmp_path / "ckpt")) is None and model_error("Qwen/Qwen2.5-0.5B-Instruct") is None
    assert model_error(str(tmp_path / "nope")) == f"no such model folder: {tmp_path / 'nope'}"
    assert model_error("tests/not_a_model") == "no such model folder: tests/not_a_model"  # tests/ exists here


def test_file_error(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}")
    assert file_error(str(tmp_path / "a.jsonl")) is None and file_error("") is None
    assert file_error(str(tmp_path)) == f"no such file: {tmp_path}"


def test_data_stream_is_a_pure_function_of_the_position():
    rows = list("abcdefg")
    stream = rows_at(rows, 3, 0, 21)
    assert all(sorted(stream[i:i + 7]) == rows for i in (0, 7, 14))  # each pass holds every row once
    assert stream[:7] != stream[7:14]  # in its own shuffle
    assert rows_at(rows, 3, 5, 9) == stream[5:14]  # a resumed run continues the same stream
    assert rows_at(rows, 4, 0, 7) != stream[:7] and seed_of(1, "x", 2) == seed_of(1, "x", 2) != seed_of(1, "x", 3)
    assert gather({"a": 1}) == [{"a": 1}]  # one process


def test_resume_recovers_a_checkpoint_caught_between_renames(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint.old123").mkdir(parents=True)
    RunLogger("t", 1, Args(), resume=str(run))
    assert (run / "checkpoint").is_dir() and not (run / "checkpoint.old123").exists()


def test_save_restore_roundtrip(tmp_path):
    """A resumed run continues exactly: optimizer state, RNG streams, step, extra state, metrics cut back."""
    model, tokenizer = load_model("tiny", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    logger = RunLogger("t", 1, Args(), root=tmp_path)
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)})
    with open(logger.dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the line a kill cut short
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    logger.save(2, model, tokenizer, optimizer, order=[3, 1, 2], history={"q1": 2})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # scramble, then resume
    restored, _ = load_model(str(logger.dir / "checkpoint"), "cpu")
    fresh = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    resumed = RunLogger("t", 1, Args(), root=tmp_path, resume=str(logger.dir))
    state = resumed.restore(fresh)
    assert state == {"step": 2, "order": [3, 1, 2], "history": {"q1": 2}}
    assert (random.random(), np.random.rand()) == expected[:2]
    torch.testing.assert_close(torch.rand(3), expected[2], rtol=0, atol=0)
    for a, b in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state[a]["exp_avg"], fresh.state[b]["exp_avg"], rtol=0, atol=0)
    assert [int(line.split('"step": ')[1][0]) for line in (logger.dir / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]
    assert not list(tmp_path.glob("*/checkpoint.tmp*")), "the temporary folder was renamed into place"


def test_finite_guard_skips_then_stops():
    guard = FiniteGuard(limit=2)
    assert guard.ok(torch.tensor(1.0), 3.0)
    assert not guard.ok(torch.tensor(float("nan")), 1.0) and guard.skipped == 1
    assert guard.ok(1.0, torch.tensor([1.0, 2.0])) and guard.in_a_row == 0  # a finite step resets the run
    assert not guard.ok(1.0, float("inf"))
    with pytest.raises(FloatingPointError, match="2 optimizer steps in a row"):
        guard.ok(torch.tensor(float("-inf")))
    assert guard.skipped == 3


DRIVER = textwrap.dedent("""
    import sys, torch
    from algos.model import all_reduce, data_parallel, distributed, load_model, sequence_logprobs, sync_gradients
    rank, world = distributed()
    model, _ = load_model("tiny", "cpu")
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1)  # a second module (a value head): synced on its own
    if rank == 1:
        torch.nn.init.zeros_(head.weight)  # differs on purpose: data_parallel must broadcast rank 0's copy
    data_parallel(model), data_parallel(head)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (5, 9), generator=g)
    rows = [range(5), [[0, 1, 2], [3, 4]][rank]][world - 1]
    n = all_reduce(float(len(rows) * 8))  # the global count normalises every process's loss
    for r in rows:  # one micro-batch per row: 3 on rank 0, 2 on rank 1
        logp = sequence_logprobs(model, ids[r:r + 1], torch.ones(1, 9, dtype=torch.long))
        (-logp.sum() / n).backward()
        head(torch.ones(1, 64) * r).sum().backward()
    sync_gradients(model), sync_gradients(head)
    grads = torch.cat([p.grad.flatten() for p in [*model.parameters(), *head.parameters()]] + [head.weight[0]])
    torch.save(grads, sys.argv[1] + f"/grad{world}_{rank}.pt")
    assert all_reduce(torch.tensor([1.0, float(rank)]), "max").tolist() == [1.0, float(world - 1)]
""")


def test_two_processes_sum_to_the_one_process_gradient(tmp_path):
    """torchrun with gloo: 2 processes, uneven micro-batches, two modules -> the same gradient as 1 process."""
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(__import__("pathlib").Path.cwd())}
    for command in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node", "2"]):
        done = subprocess.run(command + [str(tmp_path / "driver.py"), str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    one, *two = (torch.load(tmp_path / name) for name in ("grad1_0.pt", "grad2_0.pt", "grad2_1.pt"))
    torch.testing.assert_close(two[0], two[1], rtol=0, atol=0)  # every process holds the same summed gradient
    torch.testing.assert_close(two[0], one, rtol=1e-5, atol=1e-7)
    assert one.abs().max() > 1e-3  # a real gradient, not zeros
