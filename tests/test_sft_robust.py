"""algos/sft.py robustness (issue 14): parse-time argument checks, --resume after a real SIGKILL continues with the
same numbers, non-finite steps skipped and counted (FiniteGuard), and torchrun data parallelism equal to one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import algos.sft as sft
from algos.model import FiniteGuard, RunLogger, load_model, parse_args
from algos.sft import Args, load_rows, tokenize, train_step

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "data" / "smart_er_train.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ALGORITHMIC = ("loss", "grad_norm", "lr", "skipped_steps", "eval_loss")


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "0"], "--lr"), (["--select", "best"], "--select"), (["--model", "no/such/dir/x"], "--model"),
    (["--max-steps", "0"], "--max-steps"),
    (["--batch-size", "0"], "--batch-size"), (["--warmup-ratio", "1.5"], "--warmup-ratio"),
    (["--train-file", "missing.jsonl"], "--train-file"), (["--eval-file", "nope.jsonl"], "--eval-file"),
    (["--resume", "/nonexistent/run"], "--resume"), (["--max-bad-steps", "0"], "--max-bad-steps"),
    (["--select-size", "5"], "--select-size"),  # a cross-field rule (__post_init__): only with --select random
    (["--fsdp", "true"], "--fsdp"),  # outside torchrun
])
def test_bad_arguments_are_usage_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_a_bad_argument_stops_the_command_line_before_any_model_loads(tmp_path):  # other cases: in-process
    out = subprocess.run([sys.executable, "algos/sft.py", "--max-steps", "0", "--output-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 2 and "--max-steps" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_changed_arguments_on_resume_are_warned_about(tmp_path, capsys):
    (tmp_path / "args.json").write_text(json.dumps({**vars(Args()), "max_steps": 10}))
    RunLogger("sft", 1, Args(max_steps=10, resume=str(tmp_path), output_dir="elsewhere"), resume=str(tmp_path))
    assert capsys.readouterr().err == ""  # resume and output_dir are not compared
    RunLogger("sft", 1, Args(max_steps=20, lr=1e-3), resume=str(tmp_path))
    err = capsys.readouterr().err
    assert "warning: resuming" in err and "'max_steps': (10, 20)" in err and "'lr': (0.0001, 0.001)" in err


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_continues_with_the_same_numbers(tmp_path):
    steps = 6
    cmd = [sys.executable, "algos/sft.py", "--model", "tiny", "--max-steps", str(steps), "--batch-size", "2",
           "--max-len", "256", "--lr", "1e-3", "--eval-rows", "2", "--eval-every", "2", "--decision-rows", "0",
           "--agent-rows", "0", "--save-every", "1"]
    whole = subprocess.Popen(cmd + ["--output-dir", str(tmp_path / "whole")], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cut = subprocess.Popen(cmd + ["--output-dir", str(tmp_path / "cut")], cwd=ROOT, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and cut.poll() is None:
        runs = list((tmp_path / "cut").glob("*/checkpoint/trainer_state.pt"))
        if runs and (runs[0].parents[1] / "metrics.jsonl").exists() and len(rows(runs[0].parents[1])) >= 2:
            break
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)  # a real kill, mid-run: no handler, no clean-up
    assert cut.wait(30) == -signal.SIGKILL
    (run,) = (tmp_path / "cut").iterdir()
    saved = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    assert 1 <= saved < steps and not (run / "summary.json").exists()
    out = subprocess.run(cmd + ["--resume", str(run)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr[-3000:]
    assert whole.wait(300) == 0, whole.stderr.read()[-3000:]
    (full,) = (tmp_path / "whole").iterdir()
    resumed, expected = rows(run), rows(full)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1)) == [r["step"] for r in expected]
    for a, b in zip(resumed, expected):
        assert a.keys() == b.keys()
        torch.testing.assert_close({k: a[k] for k in ALGORITHMIC if k in a}, {k: b[k] for k in ALGORITHMIC if k in b})
    assert json.loads((run / "summary.json").read_text())["eval_loss_end"] == pytest.approx(
        json.loads((full / "summary.json").read_text())["eval_loss_end"])


def test_non_finite_loss_skips_the_step_and_stops_after_max_bad_steps(monkeypatch):
    model, tokenizer = load_model("tiny", device="cpu")
    args = Args(model="tiny", batch_size=2, max_bad_steps=2)
    examples = tokenize(tokenizer, load_rows(str(TRAIN))[:2], 320)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    guard, pad = FiniteGuard(args.max_bad_steps), tokenizer.pad_token_id
    before = [p.detach().clone() for p in model.parameters()]
    nll = sft.nll_sum
    monkeypatch.setattr(sft, "nll_sum", lambda m, b: (nll(m, b)[0] * float("nan"), nll(m, b)[1]))
    metrics, _ = train_step(model, examples, optimizer, scheduler, guard, args, pad, "cpu")
    assert metrics["skipped_steps"] == 1 and guard.in_a_row == 1
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)  # the optimizer did not step
        assert p.grad is None  # and the NaN gradients are gone
    monkeypatch.setattr(sft, "nll_sum", nll)  # a finite step resets the run of bad ones and moves the parameters
    metrics, _ = train_step(model, examples, optimizer, scheduler, guard, args, pad, "cpu")
    assert metrics["skipped_steps"] == 1 and guard.in_a_row == 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
    monkeypatch.setattr(sft, "nll_sum", lambda m, b: (nll(m, b)[0] * float("inf"), nll(m, b)[1]))
    train_step(model, examples, optimizer, scheduler, guard, args, pad, "cpu")
    with pytest.raises(FloatingPointError, match="2 optimizer steps in a row"):
        train_step(model, examples, optimizer, scheduler, guard, args, pad, "cpu")


DRIVER = """
import sys, torch
sys.path.insert(0, {root!r})
from algos.model import FiniteGuard, data_parallel, distributed, load_model, save_checkpoint
from algos.sft import Args, load_rows, tokenize, train_step
rank, world = distributed()
model, tokenizer = load_model("tiny", "cpu")
data_parallel(model, shard=sys.argv[2] == "fsdp")
args = Args(model="tiny", batch_size=2, max_grad_norm=0.05)  # a clip that bites: the global norm is the one clipped
examples = tokenize(tokenizer, load_rows({train!r})[:5], 320)  # 5 rows: 3 + 2, so 2 and 1 micro-batches per rank
# SGD, not Adam: its update is linear in the gradient, so a mis-weighted gradient sum shows in the weights (a uniform
# scale is undone by the clip; grad_norm below catches it). Adam's first step is about lr * sign(g): it hides such
# errors, and it flips on near-zero gradients whose sum order differs.
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
metrics, _ = train_step(model, examples, optimizer, scheduler, FiniteGuard(3), args, tokenizer.pad_token_id, "cpu",
                        rank, world)
params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]  # FSDP: shards
if rank == 0 or sys.argv[2] == "fsdp":  # under FSDP every process calls it (the weights gather to rank 0)
    save_checkpoint(model, tokenizer, sys.argv[1] + ".ckpt")
if rank == 0:
    torch.save({{"params": params, "metrics": metrics}}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def one_process_update(tmp_path_factory):
    """The gold: the driver in one process (data_parallel is a no-op there, so one run serves DDP and FSDP)."""
    tmp = tmp_path_factory.mktemp("one_process")
    driver = tmp / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), train=str(TRAIN)))
    one = subprocess.run([sys.executable, str(driver), str(tmp / "one.pt"), "ddp"], capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    return torch.load(tmp / "one.pt")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_update_equals_one_process(tmp_path, parallel, one_process_update):
    """5 rows: 2 and 1 micro-batches per process; under DDP and FSDP (--fsdp), whose checkpoint (gathered to rank 0)
    reloads with plain from_pretrained."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), train=str(TRAIN)))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(driver), str(tmp_path / "two.pt"), parallel], capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = one_process_update, torch.load(tmp_path / "two.pt")
    torch.testing.assert_close(list(AutoModelForCausalLM.from_pretrained(tmp_path / "two.pt.ckpt").parameters()),
                               a["params"])
    before = [p.detach() for p in load_model("tiny", device="cpu")[0].parameters()]
    step_a, step_b = ([p - q for p, q in zip(x["params"], before)] for x in (a, b))
    assert sum(d.norm() ** 2 for d in step_a) ** 0.5 == pytest.approx(0.05, rel=1e-3)  # it stepped, clipped to 0.05
    # the updates themselves, not the weights (whose 1e-5 atol would hide a 10% error in a ~1e-4 update); atol: half
    # an fp32 ulp of a weight near 1 (the norms' scales), rtol: the FSDP norm's rounding below
    torch.testing.assert_close(step_a, step_b, rtol=1e-4, atol=1e-7)
    assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-6)
    # FSDP: the norm of sharded gradients rounds apart from torch's fp32 norm of whole ones (CPU: ~3e-5 here)
    rel = 1e-4 if parallel == "fsdp" else 1e-6
    assert a["metrics"]["grad_norm"] == pytest.approx(b["metrics"]["grad_norm"], rel=rel)


def test_torchrun_smoke_run_of_the_script(tmp_path):
    """Under FSDP; DDP runs in the two-process test above and in grpo_toolrl's script smoke run (same plumbing)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "algos/sft.py",
           "--fsdp", "true", "--model", "tiny", "--max-steps", "2", "--batch-size", "2", "--max-len", "320",
           "--eval-rows", "4", "--eval-every", "1", "--decision-rows", "2", "--decision-tokens", "4",
           "--agent-rows", "2", "--agent-tokens", "4", "--output-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = tmp_path.iterdir()  # one run folder: only rank 0 writes
    assert [r["step"] for r in rows(run)] == [1, 2] and all(r["skipped_steps"] == 0 for r in rows(run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss_end"] > 0 and 0 <= summary["decision_acc_end"] <= 1
    assert 0 <= summary["agent_acc_end"] <= 1 and (run / "agent.jsonl").exists()
    assert (run / "checkpoint" / "trainer_state.pt").exists() and (run / "checkpoint" / "config.json").exists()
