"""algos/grpo_toolrl.py under bad input and failure: parse-time argument checks, a non-finite step skipped,
a killed run resumed to the same metrics, and two processes (torchrun, gloo) making the one-process update."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from algos.grpo_toolrl import Args, grpo_update
from algos.model import FiniteGuard, collate, generate, load_model, parse_args, start_rollouts

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
DATA = ["--train-file", "data/toolrl_train_sample.jsonl", "--eval-file", "data/bfcl_eval_sample.jsonl",
        "--heldout-file", ""]


# ---------------------------------------------------------------- 1. parse-time argument checks
def test_a_bad_argument_exits_2_before_loading_a_model(tmp_path):  # the other cases: in-process, below
    out = subprocess.run([sys.executable, "algos/grpo_toolrl.py", "--runs-dir", str(tmp_path)] + DATA +
                         ["--loss-type", "foo"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 2 and "argument --loss-type: invalid choice: 'foo'" in out.stderr, out.stderr[-2000:]
    assert "usage:" in out.stderr and not list(tmp_path.iterdir())  # no run folder: nothing started


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/dir"], "argument --model: no such model folder: /no/such/dir"),
    (["--num-minibatches", "0"], "argument --num-minibatches: must be >= 1 (got 0)"),
    (["--group-size", "1"], "argument --group-size: must be >= 2 (got 1)"),
    (["--old-logp", "cached"], "argument --old-logp: invalid choice: 'cached'"),
    (["--adv-scale", "std"], "argument --adv-scale: invalid choice"),
    (["--matching", "hungarian"], "argument --matching: invalid choice"),
    (["--granularity", "fines"], "argument --granularity: invalid choice"),
    (["--schedule", "linear"], "argument --schedule: invalid choice"),
    (["--length-reward", "on"], "argument --length-reward: invalid choice"),
    (["--temperature", "0"], "argument --temperature: must be > 0 (got 0.0)"),
    (["--lr=-1e-5"], "argument --lr: must be >= 0 (got -1e-05)"),
    (["--clip-low", "1.5"], "argument --clip-low: must be <= 1 (got 1.5)"),
    (["--clip-high=-0.1"], "argument --clip-high: must be >= 0"),
    (["--beta=-0.04"], "argument --beta: must be >= 0"),
    (["--adv-eps", "0"], "argument --adv-eps: must be > 0"),
    (["--max-grad-norm", "0"], "argument --max-grad-norm: must be > 0"),
    (["--ppo-epochs", "0"], "argument --ppo-epochs: must be >= 1"),
    (["--gen-batch-size", "0"], "argument --gen-batch-size: must be >= 1"),
    (["--prompts-per-step=-4"], "argument --prompts-per-step: must be >= 0"),
    (["--eval-per-category=-2"], "argument --eval-per-category: must be >= -1"),
    (["--max-new-tokens=-1"], "argument --max-new-tokens: must be >= 0"),
    (["--train-file", "no/such.jsonl"], "argument --train-file: no such file: no/such.jsonl: run `python data/make"),
    (["--heldout-file", "no/such.jsonl"], "argument --heldout-file: no such file: no/such.jsonl"),
    (["--prompts-per-step", "3", "--num-minibatches", "2"], "--num-minibatches 2 must divide the 3 groups"),
    (["--shared-prefix", "false", "--prompts-per-step", "3", "--group-size", "3", "--num-minibatches", "2"],
     "--num-minibatches 2 must divide the 9 rows"),
    (["--num-minibatches", "3"], "--num-minibatches 3 must divide the"),  # against the auto prompts_per_step
    (["--fsdp", "true"], "argument --fsdp: needs torchrun"),  # (pytest runs outside torchrun)
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(Args, DATA + argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_good_arguments_parse_and_auto_values_stay_zero():
    args = parse_args(Args, DATA + ["--model", "tiny", "--heldout-file", "data/toolrl_train_sample.jsonl",
                                    "--num-minibatches", "3", "--eval-only", "true"])  # no training: no minibatches
    assert args.total_steps == 0 and args.prompts_per_step == 0 and args.num_minibatches == 3  # resolved in main
    args = parse_args(Args, DATA + ["--prompts-per-step", "6", "--num-minibatches", "3", "--clip-low", "1"])
    assert (args.prompts_per_step, args.clip_low) == (6, 1.0)


# ---------------------------------------------------------------- 2. a killed run resumed
VOWELS = """import sys
sys.path.insert(0, {root!r})
import algos.grpo_toolrl as script


def vowels(text, ground_truth, *args):  # a reward the random tiny model varies on (it never writes the tags)
    share = sum(c in "aeiou" for c in text) / max(len(text), 1)
    return {{"format": share, "correctness": 0.0, "total": share}}


script.toolrl_reward = vowels
script.main(script.parse_args(script.Args))
"""


def command(tmp_path, name, *extra):
    """The script with the vowel reward (a learning signal: the resumed run must restore model, Adam, data)."""
    (tmp_path / "vowels.py").write_text(VOWELS.format(root=str(ROOT)))
    rows = (ROOT / "data" / "toolrl_train_sample.jsonl").read_text().splitlines()
    (tmp_path / "heldout.jsonl").write_text("\n".join(rows[:4]) + "\n")  # 4 held-out prompts: fast
    return [sys.executable, str(tmp_path / "vowels.py"), "--model", "tiny", "--total-steps", "3",
            "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "6", "--num-minibatches", "2",
            "--lr", "1e-2", "--beta", "0.04", "--eval-per-category", "1", "--eval-max-new-tokens", "2",
            "--max-prompt-tokens", "1024", "--eval-max-prompt-tokens", "1024", "--save-model", "false",
            "--exp-name", name, "--runs-dir", str(tmp_path), *DATA, "--heldout-file", str(tmp_path / "heldout.jsonl"),
            *extra]


def metrics(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def test_killed_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    full = subprocess.run(command(tmp_path, "full"), cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert full.returncode == 0, full.stderr[-3000:]
    with open(tmp_path / "cut.err", "w") as err:  # SIGKILL mid-run, just after the checkpoint of step 1
        cut = subprocess.Popen(command(tmp_path, "cut", "--save-every", "1"), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=err, text=True, env=ENV)
        lines = iter(cut.stdout.readline, "")
        assert any(line.startswith("checkpoint after step 1:") for line in lines), (tmp_path / "cut.err").read_text()
        cut.send_signal(signal.SIGKILL)
        cut.wait(), cut.stdout.close()
    run = next(tmp_path.glob("cut__1__*"))
    assert not (run / "summary.json").exists() and len(metrics(run)) < 3
    resumed = subprocess.run(command(tmp_path, "cut", "--save-every", "3", "--resume", str(run)), cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: resuming" in resumed.stderr and "'save_every': (1, 3)" in \
        resumed.stderr and "resumed " in resumed.stdout
    expected, got = metrics(next(tmp_path.glob("full__1__*"))), metrics(run)
    assert [r["step"] for r in got] == [0, 1, 2] and got[0]["skipped_steps"] == 0 and got[2]["approx_kl"] > 0
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and "kl" in a
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same samples, losses and updates, step by step
    s_full, s_cut = (json.loads((r / "summary.json").read_text()) for r in (next(tmp_path.glob("full__1__*")), run))
    for key in ("before/bfcl/overall", "after/bfcl/overall", "before/heldout/reward", "after/heldout/diff"):
        assert s_full[key] == s_cut[key], key


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, DATA + ["--resume", str(tmp_path)])
    assert f"argument --resume: no resumable checkpoint in {tmp_path}" in capsys.readouterr().err


# ---------------------------------------------------------------- 3. a non-finite step is skipped
def test_non_finite_step_is_skipped_counted_and_stops_the_run():
    torch.manual_seed(0)
    model, tok = load_model("tiny", device="cpu")
    args = Args(num_minibatches=1, max_new_tokens=5, max_bad_steps=2)
    optimizer, guard = torch.optim.Adam(model.parameters(), lr=1e-2), FiniteGuard(args.max_bad_steps)

    def update(advantages):  # a fresh batch from the current policy
        rollouts = start_rollouts(tok, ["Hi", "Tell me a story"], n=2)
        generate(model, tok, rollouts, 5, 1.0)
        return grpo_update(model, optimizer, collate(rollouts, tok.pad_token_id), torch.tensor(advantages), args,
                           guard=guard)["skipped_steps"]
    nan, good = [float("nan"), 1.0, -1.0, 0.5], [1.0, -1.0, 0.5, -0.5]
    start = [p.detach().clone() for p in model.parameters()]
    assert update(nan) == 1 and guard.in_a_row == 1
    assert all(torch.equal(p0, p) for p0, p in zip(start, model.parameters())) and not optimizer.state
    assert update(good) == 1 and guard.in_a_row == 0  # finite: a step
    assert any(not torch.equal(p0, p) for p0, p in zip(start, model.parameters()))
    assert update(nan) == 2
    with pytest.raises(FloatingPointError, match="2 optimizer steps in a row"):
        update(nan)


# ---------------------------------------------------------------- 4. torchrun: two processes, one update
DRIVER = """
import sys, copy, torch
sys.path.insert(0, {root!r})
from algos.grpo_toolrl import Args, grpo_update
from algos.model import collate, data_parallel, distributed, generate, load_model, save_checkpoint, start_rollouts
rank, world = distributed()
rows = slice(0, 12) if world == 1 else slice(6 * rank, 6 * rank + 6)  # whole groups of 3 per process
advantages = torch.tensor([0.0] * 3 + [1.2, -0.8, -0.4] + [0.3, 0.0, -0.3] + [0.9, -1.1, 0.2])[rows]
out = {{}}
for loss_type, beta in [("grpo", 0.0), ("bnpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.0), ("grpo", 0.04)]:
    torch.manual_seed(0)  # the same model and batch in every process
    model, tok = load_model("tiny", device="cpu")
    rollouts = start_rollouts(tok, ["Hi", "Tell me a story", "2 + 2 =", "Name a colour"], n=3)
    generate(model, tok, rollouts, 5, 1.0)
    ref = copy.deepcopy(model) if beta else None
    data_parallel(model, shard={fsdp})
    args = Args(group_size=3, prompts_per_step=4, num_minibatches=2, micro_batch_tokens=40, max_new_tokens=5,
                loss_type=loss_type, beta=beta, max_grad_norm=1e9)
    stats = grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), collate(rollouts[rows], tok.pad_token_id),
                        advantages, args, ref, seed=7)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]  # FSDP: shards
    out[(loss_type, beta)] = (params, stats)
if rank == 0 or {fsdp}:  # under FSDP every process calls it (the weights gather to rank 0)
    save_checkpoint(model, tok, {out!r}.format(world=world, rank="ckpt"))
torch.save(out, {out!r}.format(world=world, rank=rank))
"""


@pytest.fixture(scope="module")
def one_process_updates(tmp_path_factory):
    """The gold: the driver in one process (data_parallel is a no-op there, so one run serves DDP and FSDP)."""
    tmp = tmp_path_factory.mktemp("one_process")
    driver = tmp / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), out=str(tmp / "w{world}_r{rank}.pt"), fsdp=False))
    one = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    return torch.load(tmp / "w1_r0.pt")


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_make_the_one_process_update(tmp_path, fsdp, one_process_updates):
    """Each process holds two of the four groups; minibatches (2, drawn from all groups) may give a process 0, 1 or 2
    of them. Parameters after the update (SGD, lr 1: the gradient itself) and the metrics match one process, under
    DDP and under FSDP (--fsdp), whose checkpoint (gathered to rank 0) reloads with plain from_pretrained."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), out=str(tmp_path / "w{world}_r{rank}.pt"), fsdp=fsdp))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(driver)], capture_output=True, text=True, timeout=300, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    gold = one_process_updates
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "w2_rckpt.pt")  # the last update (grpo, beta 0.04)
    for p, p1 in zip(saved.parameters(), gold[("grpo", 0.04)][0]):
        torch.testing.assert_close(p, p1, rtol=1e-4, atol=1e-6)
    start, _ = load_model("tiny", device="cpu")
    for rank in (0, 1):
        for key, (params, stats) in torch.load(tmp_path / f"w2_r{rank}.pt").items():
            moved = sum(int(not torch.equal(p, p0)) for p, p0 in zip(params, start.parameters()))
            assert moved > 0, key
            for p, p1 in zip(params, gold[key][0]):
                torch.testing.assert_close(p, p1, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(stats, gold[key][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_torchrun_smoke(tmp_path, fsdp):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "algos/grpo_toolrl.py"] + command(tmp_path, "ddp", "--total-steps", "2", "--save-every", "1",
                                              "--fsdp", fsdp)[2:]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    run = next(tmp_path.glob("ddp__1__*"))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1] and out.stdout.count("step    0") == 1  # rank 0 logs
    assert 0 <= rows[0]["frac_reward_zero_std"] <= 1 and rows[0]["completion_len"] > 0
    preds = [json.loads(line) for line in open(run / "predictions.jsonl")]
    before = [json.loads(line) for line in open(run / "predictions_before.jsonl")]
    assert [p["id"] for p in preds] == [p["id"] for p in before]  # sharded over the processes, merged in order
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_items"] == len(preds) == 5 and (run / "checkpoint" / "trainer_state.pt").is_file()
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and state["extra"]["guard"] == (0, 0) and len(state["extra"]["heldout"]) == 4
