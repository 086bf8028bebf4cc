"""algos/otc_ppo.py under stress: bad arguments, non-finite steps, a run killed mid-way and resumed, torchrun.

Run as a script under torchrun (`python -m torch.distributed.run --nproc_per_node 2 tests/test_otc_robust.py OUT`),
this file is the driver of the 2-process equality test: one update of each estimator on a fixed batch.
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from algos.model import (FiniteGuard, append_tokens, collate, data_parallel, distributed, generate,  # noqa: E402
                         load_model, parse_args, start_rollouts)
from algos.otc_ppo import (Args, _logprobs_in_chunks, advantages_and_targets, gather, otc_rewards,  # noqa: E402
                           ppo_update)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIME_KEYS = ("time/", "tokens_per_s")


def script(*flags, timeout=240):
    return subprocess.run([sys.executable, "algos/otc_ppo.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


# ---------------------------------------------------------------- 1. argument checks
def test_a_bad_argument_exits_2_before_loading_a_model():  # the other cases: in-process, below
    out = script("--estimator", "grpo", "--group-size", "1", timeout=120)
    assert out.returncode == 2 and "--estimator grpo needs --group-size >= 2" in out.stderr, out.stderr[-2000:]
    assert "train questions" not in out.stdout


@pytest.mark.parametrize("flags,message", [
    (["--estimator", "dpo"], "--estimator: invalid choice"), (["--lr", "0"], "--lr: must be > 0"),
    (["--model", "no/such/folder"], "--model: no such model folder"),
    (["--gamma", "1.5"], "--gamma: must be <= 1"), (["--temperature", "0"], "--temperature: must be > 0"),
    (["--group-size", "-1"], "--group-size: must be >= 0"), (["--kl-mode", "k2"], "--kl-mode: invalid choice"),
    (["--loss-type", "sum"], "--loss-type: invalid choice"), (["--adv-scale", "std"], "--adv-scale: invalid choice"),
    (["--retriever", "elastic"], "--retriever: bm25 or an http"), (["--max-bad-steps", "0"], "--max-bad-steps"),
    (["--train-file", "nope.jsonl"], "--train-file: no such file"), (["--resume", "/nonexistent"], "--resume"),
    (["--estimator", "grpo", "--kl-mode", "reward"], "and --kl-mode loss"),
    (["--num-minibatches", "3"], "--num-minibatches 3 must divide a step's groups (GRPO) or rows"),
    (["--micro-batch-tokens", "-5"], "--micro-batch-tokens: must be >= 0"),
    (["--fsdp", "true"], "--fsdp: needs torchrun"),  # (pytest runs outside torchrun)
])
def test_bad_arguments_name_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_auto_fields_and_shared_prefix_only_for_grpo():
    ppo, grpo = Args(), Args(estimator="grpo")
    assert (ppo.group_size, ppo.prompts_per_step, ppo.kl_mode, ppo.shared_prefix) == (1, 8, "reward", False)
    assert (grpo.group_size, grpo.prompts_per_step, grpo.kl_mode, grpo.shared_prefix) == (4, 2, "loss", True)
    assert ppo.micro_batch_tokens == (16384 if torch.cuda.is_available() else 1024)


# ---------------------------------------------------------------- 2. non-finite steps
def fixed_batch(model, tok, n=2):
    """4 prompts x n rollouts: sampled tokens, a retrieved span (loss_mask 0), more sampled tokens."""
    torch.manual_seed(0)
    rollouts = start_rollouts(tok, ["Hi", "Tell me a story", "Search:", "Why?"], n=n)
    generate(model, tok, rollouts, 5, 1.0)
    for r in rollouts:
        append_tokens(r, tok.encode("<information>Doc 1 text</information>", add_special_tokens=False))
    generate(model, tok, rollouts, 3, 1.0)
    return rollouts


def test_non_finite_step_is_skipped_counted_and_stops_after_k():
    model, tok = load_model("tiny", device="cpu")
    data = collate(fixed_batch(model, tok), tok.pad_token_id)
    args = Args(estimator="grpo", group_size=2, prompts_per_step=4, num_minibatches=2, beta=0.0, max_bad_steps=3)
    opt, guard = torch.optim.Adam(model.parameters(), lr=1e-2), FiniteGuard(args.max_bad_steps)
    before = [p.detach().clone() for p in model.parameters()]
    adv = torch.ones(8)
    adv[3] = float("nan")  # poisons the minibatch that holds row 3 (group 1), not the other one
    ppo_update(model, None, opt, data, adv, args, data["sample_logp"], guard=guard)
    assert guard.skipped == 1 and guard.in_a_row in (0, 1)
    assert any((p != b).any() for p, b in zip(model.parameters(), before))  # the finite minibatch stepped
    before = [p.detach().clone() for p in model.parameters()]
    args.num_minibatches, guard.in_a_row = 1, 0
    old_logp = _logprobs_in_chunks(model, None, data, args)[0]  # the policy moved: ratio 1 again
    stats = ppo_update(model, None, opt, data, adv, args, old_logp, guard=guard)
    assert guard.skipped == 2 and guard.in_a_row == 1 and stats["policy_loss"] != stats["policy_loss"]  # nan
    assert all((p == b).all() for p, b in zip(model.parameters(), before))  # skipped: parameters unchanged
    ppo_update(model, None, opt, data, adv, args, old_logp, guard=guard)
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row"):
        ppo_update(model, None, opt, data, adv, args, old_logp, guard=guard)
    assert all((p == b).all() for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------- 3. killed and resumed
def metrics(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in rows]


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    flags = ["--model", "tiny", "--total-steps", "3", "--prompts-per-step", "2", "--group-size", "2",
             "--max-turn-tokens", "6", "--max-calls", "1", "--eval-items", "1", "--beta", "0.05",
             "--num-minibatches", "2", "--save-every", "1", "--exp-name", "r", "--eval-before", "false"]
    full = subprocess.Popen([sys.executable, "algos/otc_ppo.py", *flags, "--runs-dir", str(tmp_path / "full")],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "full.err", "w"))
    proc = subprocess.Popen([sys.executable, "algos/otc_ppo.py", *flags, "--runs-dir", str(tmp_path / "cut")],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # kill it once a checkpoint is written (mid-run)
        run = next((tmp_path / "cut").glob("r__1__*"), None)
        if run and (run / "checkpoint" / "trainer_state.pt").exists() and (run / "metrics.jsonl").exists() and \
                (run / "metrics.jsonl").read_text().count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(30) == -signal.SIGKILL and not (run / "summary.json").exists()
    saved = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    assert 0 <= saved <= 1
    resumed = script(*flags, "--runs-dir", str(tmp_path / "cut"), "--resume", str(run), "--eval-before", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "other arguments than its args.json" in resumed.stderr and "'eval_before': (False, True)" in \
        resumed.stderr  # names the change
    assert full.wait(180) == 0, (tmp_path / "full.err").read_text()[-3000:]
    want, got = metrics(next((tmp_path / "full").glob("r__1__*"))), metrics(run)
    assert [r["step"] for r in got] == list(range(3)) and set(got[-1]) == set(want[-1])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert json.loads((run / "summary.json").read_text())["after/em"] == 0.0


# ---------------------------------------------------------------- 4. torchrun: 2 processes = 1
def one_update(out, parallel="ddp"):
    """One update of each estimator on a fixed batch of 4 questions x 2 rollouts, this process's whole groups (the
    policy under DDP or FSDP); then two rounds of OTC-GRPO rewards whose call history must be merged over processes."""
    rank, world = distributed()
    model, tok = load_model("tiny", device="cpu")
    rollouts, share = fixed_batch(model, tok), slice(rank * 8 // world, (rank + 1) * 8 // world)
    rewards = torch.tensor([1.0, 0.2, 0.0, 0.7, 0.5, 0.5, -1.0, 2.0])  # of the whole batch
    data, result = collate(rollouts[share], tok.pad_token_id), {}
    for estimator, extra in [("ppo", dict(ent_coef=0.01)), ("grpo", dict(loss_type="grpo", adv_scale="batch"))]:
        args = Args(estimator=estimator, group_size=2, prompts_per_step=4, num_minibatches=2, micro_batch_tokens=60,
                    beta=0.05, max_grad_norm=1e6, **extra)  # no clipping: compare the gradients
        policy, ref = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
        head = torch.nn.Linear(model.config.hidden_size, 1) if estimator == "ppo" else None
        if head is not None:
            torch.nn.init.constant_(head.weight, 0.01), torch.nn.init.zeros_(head.bias)
            data_parallel(head)
        data_parallel(policy, shard=parallel == "fsdp")
        opt = torch.optim.SGD(list(policy.parameters()) + ([] if head is None else list(head.parameters())), lr=0.5)
        inputs, logs = advantages_and_targets(policy, head, ref, data, rewards, args)
        stats = ppo_update(policy, head, opt, data, args=args, **inputs)
        modules = [policy] + ([head] if head is not None else [])
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()  # FSDP: shards
                  for m in modules for p in m.parameters()]
        result[estimator] = {"params": params,
                             "advantages": sum(gather(inputs["advantages"].reshape(4 // world * 2, -1).sum(1).tolist()),
                                               []), "stats": stats, "logs": logs}
    rows = [{"id": f"q{i}", "answers": ["Paris"]} for i in range(4)]
    best, totals, args = {}, [], Args(estimator="grpo", group_size=2, prompts_per_step=4, num_minibatches=1)
    for order, calls in [([0, 1, 2, 3], [[2, 1], [0, 3], [1, 1], [4, 2]]),  # question -> calls of its 2 rollouts
                         ([3, 2, 1, 0], [[1, 3], [2, 2], [0, 5], [1, 1]])]:  # round 2: on the other process
        mine = order[rank * 4 // world:(rank + 1) * 4 // world]
        eps = [{"calls": calls[q][j], "answer": "Paris" if (q + j) % 3 else "Rome"} for q in mine for j in range(2)]
        totals.append(sum(gather([c["total"] for c in otc_rewards(eps, [rows[q] for q in mine], args, best)]), []))
    result["otc"] = {"best": best, "totals": totals}
    torch.save(result, Path(out) / f"result{world}{parallel}_{rank}.pt")


def test_two_processes_equal_one(tmp_path):
    """Under DDP and under FSDP (--fsdp; the value head stays under DDP), both against one process."""
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               __file__, str(tmp_path), parallel], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=ENV) for parallel in ("ddp", "fsdp")]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    one_update(tmp_path)  # this process alone: the whole batch
    one = torch.load(tmp_path / "result1ddp_0.pt")
    for parallel, rank in [("ddp", 0), ("ddp", 1), ("fsdp", 0), ("fsdp", 1)]:
        two = torch.load(tmp_path / f"result2{parallel}_{rank}.pt")
        for estimator in ("ppo", "grpo"):
            a, b = one[estimator], two[estimator]
            torch.testing.assert_close(torch.tensor(b["advantages"]), torch.tensor(a["advantages"]))
            for p, q in zip(b["params"], a["params"], strict=True):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            assert set(a["stats"]) == set(b["stats"]) and set(a["logs"]) == set(b["logs"])
            torch.testing.assert_close(b["stats"], a["stats"], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(b["logs"], a["logs"], rtol=1e-4, atol=1e-6)
        assert two["otc"] == one["otc"]
    moved = [(p != q).any() for p, q in zip(one["grpo"]["params"], load_model("tiny", device="cpu")[0].parameters())]
    assert any(moved)


def test_torchrun_smoke_tiny(tmp_path):
    """Under FSDP; DDP runs in the two-process test above and in grpo_toolrl's script smoke run (same plumbing)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "algos/otc_ppo.py",
           "--fsdp", "true", "--model", "tiny", "--estimator", "grpo", "--total-steps", "2", "--prompts-per-step", "2",
           "--group-size", "2", "--num-minibatches", "1", "--max-turn-tokens", "6", "--max-calls", "1",
           "--eval-items", "3", "--runs-dir", str(tmp_path), "--exp-name", "ddp"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=ENV)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (run,) = tmp_path.glob("ddp__1__*")  # one run folder: only rank 0 writes
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["skipped_steps"] == 0
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 3  # both shares of the test rows
    assert (run / "checkpoint" / "trainer_state.pt").exists()


if __name__ == "__main__":
    one_update(sys.argv[1], sys.argv[2])
