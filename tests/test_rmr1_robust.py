"""algos/rmr1_distill_rl.py robustness (issue 14): parse-time argument checks, --resume after a SIGKILL continues
exactly as an uninterrupted run, FiniteGuard skips non-finite steps, and under torchrun (gloo, 2 processes) the update
on a global batch split by whole groups equals the one-process update."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from algos.model import FiniteGuard, collate, generate, load_model, parse_args, start_rollouts
from algos.rmr1_distill_rl import Args, grpo_update

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "algos" / "rmr1_distill_rl.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def rows_of(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


# ---------------------------------------------------------------- 1. parse-time argument checks
BAD_ARGS = [
    (["--loss-type", "ppo"], "--loss-type"),
    (["--adv-scale", "rows"], "--adv-scale"),
    (["--group-size", "1"], "--group-size"),
    (["--lr", "-1e-5"], "--lr"),
    (["--clip-low", "1.5"], "--clip-low"),
    (["--max-bad-steps", "0"], "--max-bad-steps"),
    (["--model", "no/such/folder"], "--model"),
    (["--train-file", "nowhere.jsonl"], "--train-file"),
    (["--resume", "not_a_run"], "--resume"),
    (["--fsdp", "true"], "--fsdp"),                                                      # outside torchrun
    (["--prompts-per-step", "3", "--num-minibatches", "2"], "--num-minibatches"),      # cross-field rules
    (["--eval-only", "true", "--eval-file", "", "--hhh-file", ""], "--eval-only"),
]


@pytest.mark.parametrize("argv, flag", BAD_ARGS)
def test_bad_args_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, ["--hhh-file", "", *argv])
    assert e.value.code == 2 and flag in capsys.readouterr().err.splitlines()[-1]


def test_a_bad_arg_stops_the_script_before_loading():  # the other cases: in-process, above
    out = subprocess.run([sys.executable, SCRIPT, "--hhh-file", "", "--prompts-per-step", "3", "--num-minibatches",
                          "2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--num-minibatches" in out.stderr.splitlines()[-1], out.stderr[-2000:]
    assert "train pairs" not in out.stdout                                              # stopped before loading


# ---------------------------------------------------------------- 2. --resume after a real SIGKILL
ALGO_KEYS = ["reward", "reward_std", "entropy", "policy_loss", "clipfrac", "approx_kl", "kl", "ratio_mean", "grad_norm",
             "completion_len", "verdict_format", "says_A", "label_A", "frac_reward_zero_std", "skipped_steps"]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    cmd = [sys.executable, SCRIPT, "--model", "tiny", "--total-steps", "5", "--prompts-per-step", "2",
           "--group-size", "2", "--max-new-tokens", "12", "--eval-file", "", "--hhh-file", "", "--save-every", "1",
           "--save-model", "false", "--label-slot", "random", "--exp-name", "res"]
    whole = subprocess.Popen(cmd + ["--runs-dir", str(tmp_path / "a")], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(cmd + ["--runs-dir", str(tmp_path / "b")], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, step = time.time() + 240, -1
    while step < 1 and time.time() < deadline and killed.poll() is None:
        state = list(tmp_path.glob("b/res__1__*/checkpoint/trainer_state.pt"))
        try:
            step = torch.load(state[0], weights_only=False)["step"] if state else -1
        except (OSError, RuntimeError, EOFError):  # caught while the next checkpoint was renamed into place
            pass
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)                                                   # mid-run, no clean-up
    assert killed.wait(60) == -signal.SIGKILL, "the run ended before it could be killed"
    run = next(tmp_path.glob("b/res__1__*"))
    assert len(rows_of(run)) < 5
    # resumed with one harmless difference (the run folder is RUN_DIR whatever the name): warned about
    resumed = subprocess.run(cmd + ["--runs-dir", str(tmp_path / "b"), "--resume", str(run), "--exp-name", "x"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: resuming" in resumed.stderr and "'exp_name': ('res', 'x')" in resumed.stderr
    assert whole.wait(240) == 0, whole.stderr.read()[-3000:]
    want, got = rows_of(next(tmp_path.glob("a/res__1__*"))), rows_of(run)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(5))
    for a, b in zip(want, got):
        torch.testing.assert_close({k: b[k] for k in ALGO_KEYS}, {k: a[k] for k in ALGO_KEYS}, rtol=0, atol=0)
    assert len({r["entropy"] for r in want}) == 5 and {r["skipped_steps"] for r in want} == {0}  # samples differ
    # the last checkpoints agree too: weights, Adam's state (its step count), RNGs, data cursor
    ckpt_a, ckpt_b = (next(tmp_path.glob(f"{d}/res__1__*")) / "checkpoint" for d in "ab")
    state_a, state_b = (torch.load(c / "trainer_state.pt", weights_only=False) for c in (ckpt_a, ckpt_b))
    torch.testing.assert_close(state_b["objects"], state_a["objects"], rtol=0, atol=0)
    assert state_a["objects"][0]["state"][0]["step"] == 2 * 5                           # 2 minibatches a step
    assert state_b["extra"]["cursor"] == state_a["extra"]["cursor"] and state_b["extra"]["order"] == \
        state_a["extra"]["order"]
    torch.testing.assert_close(state_b["rng"][2], state_a["rng"][2], rtol=0, atol=0)


# ---------------------------------------------------------------- 3. non-finite steps are skipped, K in a row stop
def test_non_finite_step_skipped_then_stops():
    torch.manual_seed(0)
    model, tok = load_model("tiny", device="cpu")
    args = Args(group_size=3, prompts_per_step=2, num_minibatches=1, beta=0.0, max_new_tokens=5, micro_batch_tokens=64,
                max_bad_steps=2, old_logp="recompute")  # the same batch after updates: old_logp of the current policy
    rollouts = start_rollouts(tok, ["Judge:", "Which is better?"], n=3)
    generate(model, tok, rollouts, 5, 1.0)
    data = collate(rollouts, tok.pad_token_id)
    good = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])
    bad = good.clone()
    bad[1] = float("nan")
    optimizer, guard = torch.optim.Adam(model.parameters(), lr=1e-2), FiniteGuard(args.max_bad_steps)
    params = lambda: [p.detach().clone() for p in model.parameters()]  # noqa: E731
    before = params()
    stats = grpo_update(model, optimizer, data, bad, args, guard=guard)
    assert guard.skipped == 1 and guard.in_a_row == 1 and stats["grad_norm"] != stats["grad_norm"]  # NaN
    torch.testing.assert_close(params(), before, rtol=0, atol=0)                        # nothing stepped
    assert optimizer.state_dict()["state"] == {}
    grpo_update(model, optimizer, data, good, args, guard=guard)                        # a finite step resets the run
    assert guard.skipped == 1 and guard.in_a_row == 0
    assert any((a != b).any() for a, b in zip(params(), before))
    grpo_update(model, optimizer, data, bad, args, guard=guard)
    with pytest.raises(FloatingPointError, match="2 optimizer steps in a row"):
        grpo_update(model, optimizer, data, bad, args, guard=guard)
    assert guard.skipped == 3


# ---------------------------------------------------------------- 4. torchrun: 2 processes == 1 process
DRIVER = """
import copy, sys, torch
from algos.model import collate, data_parallel, distributed, generate, load_model, start_rollouts
from algos.rmr1_distill_rl import Args, grpo_update
from kernels.advantage import group_advantages
rank, world = distributed()
model, tok = load_model("tiny", device="cpu")
ref = load_model("tiny", device="cpu")[0].requires_grad_(False)
fsdp = sys.argv[2] == "fsdp"
data_parallel(model, shard=fsdp)
init = copy.deepcopy(model.state_dict())  # FSDP: this process's shards
torch.manual_seed(0)  # the same global batch in every process: 4 prompts x G = 3
rollouts = start_rollouts(tok, ["Judge A or B.", "Which is better?", "Pick one:", "Verdict, please"], n=3)
generate(model, tok, rollouts, 7, 1.0)
data = collate(rollouts, tok.pad_token_id)
rewards = torch.tensor([1.0, -1, -1, 1, 1, 1, -1, 1, -1, -1, -1, 1])  # the second group has zero std
rows = slice(rank * 12 // world, (rank + 1) * 12 // world)  # whole groups per process
for name, kw in [("grpo_kl", dict(beta=0.01)), ("dapo_recompute", dict(loss_type="dapo", old_logp="recompute")),
                 ("bnpo_rows", dict(loss_type="bnpo", shared_prefix=False)),
                 ("dr_grpo_batch", dict(loss_type="dr_grpo", adv_scale="batch"))]:
    kw = {"beta": 0.0, **kw}
    args = Args(group_size=3, prompts_per_step=4, num_minibatches=2, ppo_epochs=2, max_new_tokens=7,
                micro_batch_tokens=14, **kw)
    model.load_state_dict(init)
    adv = group_advantages(rewards, 3, scale=args.adv_scale)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = grpo_update(model, opt, {k: v[rows] for k, v in data.items()}, adv[rows], args,
                        ref if args.beta > 0 else None, seed=5)
    params = [p.full_tensor() if fsdp else p.detach().clone() for p in model.parameters()]
    torch.save({"params": params, "stats": stats}, f"{sys.argv[1]}/{name}_{world}{sys.argv[2]}_{rank}.pt")
"""


def test_two_processes_update_equals_one_process(tmp_path):
    """Under DDP and under FSDP (--fsdp), both against the same one-process run."""
    (tmp_path / "driver.py").write_text(DRIVER)
    procs = [subprocess.Popen(cmd + [str(tmp_path / "driver.py"), str(tmp_path), parallel], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, parallel in [([sys.executable], "ddp"), (TORCHRUN, "ddp"), (TORCHRUN, "fsdp")]]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    for name in ["grpo_kl", "dapo_recompute", "bnpo_rows", "dr_grpo_batch"]:
        one = torch.load(tmp_path / f"{name}_1ddp_0.pt")
        init = load_model("tiny", device="cpu")[0]
        assert any((a - b).abs().max() > 1e-4 for a, b in zip(one["params"], init.parameters())), name  # it moved
        for parallel, rank in [("ddp", 0), ("ddp", 1), ("fsdp", 0), ("fsdp", 1)]:
            two = torch.load(tmp_path / f"{name}_2{parallel}_{rank}.pt")
            torch.testing.assert_close(two["params"], one["params"], rtol=1e-5, atol=1e-6, msg=name + parallel)
            torch.testing.assert_close(two["stats"], one["stats"], rtol=1e-5, atol=1e-6, msg=name + parallel)


def test_torchrun_smoke_tiny(tmp_path):
    cmd = TORCHRUN + [SCRIPT, "--model", "tiny", "--total-steps", "2", "--prompts-per-step", "2", "--group-size",
                      "2", "--max-new-tokens", "8", "--eval-max-new-tokens", "4", "--eval-per-category", "1",
                      "--hhh-file", "", "--runs-dir", str(tmp_path), "--exp-name", "ddp", "--save-every", "1"]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    runs = list(tmp_path.glob("ddp__1__*"))
    assert len(runs) == 1                                                                # only rank 0 writes
    rows = rows_of(runs[0])
    assert [r["step"] for r in rows] == [0, 1] and all(r["reward"] == -1.0 for r in rows)
    assert all(r["kl"] >= 0 and r["skipped_steps"] == 0 for r in rows)
    preds = [json.loads(line) for line in open(runs[0] / "predictions_synth.jsonl")]
    assert len(preds) == 4 and preds == sorted(preds, key=lambda p: p["id"])           # both processes' pairs
    assert torch.load(runs[0] / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["after/synth/pairs"] == 4 and out.stdout.count("step    0") == 1      # rank 0 prints
    # resumed under torchrun with one more step: continues from the checkpoint, no second 'before' evaluation
    more = subprocess.run(cmd + ["--total-steps", "3", "--resume", str(runs[0])], cwd=ROOT, env=ENV,  # last wins
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, (more.stdout + more.stderr)[-3000:]
    assert "'total_steps': (2, 3)" in more.stderr and "before:" not in more.stdout
    assert [r["step"] for r in rows_of(runs[0])] == [0, 1, 2]
    resumed = json.loads((runs[0] / "summary.json").read_text())
    assert resumed["before/synth/acc"] == summary["before/synth/acc"] and resumed["after/synth/pairs"] == 4
