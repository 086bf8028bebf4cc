"""algos/rmr1_distill_rl.py and data/make_rmr1_cor.py: verdict reward on hacking attempts, evaluation parser, data
generator, loaders, a --model tiny smoke run, a learning test."""
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algos.rmr1_distill_rl import (SYSTEM_PROMPT, Args, grpo_update, load_pairs, pair_scores, parse_verdict,
                                   task_type, verdict_reward, well_formed)

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_rmr1_cor", ROOT / "data" / "make_rmr1_cor.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)

A, B = "<answer>[[A]]</answer>", "<answer>[[B]]</answer>"
TRACE = "<type>Chat</type>\n<rubric>1. Safety (70%).\n<justify>why</justify></rubric>\n<eval>...</eval>\n"


# ---------------------------------------------------------------- the +-1 verdict reward (released rule)
@pytest.mark.parametrize("completion, label, expected", [
    (TRACE + A, "A", 1.0),
    (TRACE + A, "B", -1.0),
    (TRACE + B, "B", 1.0),
    (TRACE + A + "<|im_end|>", "A", 1.0),                 # decoded EOS text inside the window: still read
    (TRACE + A + "\n  ", "A", 1.0),                       # trailing whitespace: nothing stripped, tag still inside
    (TRACE + A + " " + B, "A", -1.0),                     # both verdicts in the window
    (TRACE + A + " " + B, "B", -1.0),
    (TRACE + A + A, "A", 1.0),                            # the same verdict twice
    (B + "x" * 100 + A, "A", 1.0),                        # a contrary verdict far earlier is not seen
    (B + "x" * 100 + A, "B", -1.0),
    (A + "x" * 100, "A", -1.0),                           # verdict far from the end
    (TRACE + "<answer>[[A]]</answ", "A", -1.0),           # truncated tag
    (TRACE + "<answer>[[A]", "A", -1.0),
    (TRACE + "[[A]]", "A", -1.0),                         # bare verdict
    (TRACE + "<answer> [[A]] </answer>", "A", -1.0),      # spaces inside the tag
    (TRACE + "<answer>\n[[A]]\n</answer>", "A", -1.0),    # newlines inside the tag
    (TRACE + "<answer>[[ A ]]</answer>", "A", -1.0),
    (TRACE + "<answer>[[a]]</answer>", "A", -1.0),        # case matters
    (TRACE + "<Answer>[[A]]</Answer>", "A", -1.0),
    ("", "A", -1.0),
    ("\x00\ufffd" * 50, "B", -1.0),
])
def test_verdict_reward(completion, label, expected):
    assert verdict_reward(completion, label) == expected


def test_verdict_reward_window_edge():
    start = "y" * 200
    assert verdict_reward(start + A + "z" * (80 - len(A)), "A") == 1.0      # tag starts exactly 80 from the end
    assert verdict_reward(start + A + "z" * (81 - len(A)), "A") == -1.0     # one character too far
    assert verdict_reward(start + A + "z" * 10, "A", window=len(A) + 10) == 1.0
    assert verdict_reward(start + A + "z" * 10, "A", window=len(A) + 9) == -1.0


def test_eval_parser_and_format():
    assert parse_verdict(TRACE + A) == "A" and parse_verdict(TRACE + B) == "B"
    assert parse_verdict("I pick [[B]] for sure") == "B"                    # bare verdict counts at evaluation
    assert parse_verdict(A + " " + B) is None                                # both -> error (wrong)
    assert parse_verdict(B + "x" * 500 + A) is None                          # even far apart
    assert parse_verdict("no verdict here") is None and parse_verdict("") is None
    assert parse_verdict("[[A") is None
    assert well_formed(TRACE + A) and not well_formed(A + A) and not well_formed("[[A]]")
    assert not well_formed(A + B) and not well_formed("<answer> [[A]]</answer>")
    assert task_type(TRACE) == "Chat" and task_type("<type>Reasoning</type>") == "Reasoning"
    assert task_type("<type>Other</type>") is None


def test_pair_scores_both_orders():
    right = pair_scores("A", "B")                            # the chosen response wins in both orders
    assert right == {"acc_chosen_A": 1.0, "acc_chosen_B": 1.0, "acc": 1.0, "both_right": 1.0, "consistent": 1.0,
                     "says_A": 0.5}
    biased = pair_scores("A", "A")                           # always says A: half right, never consistent
    assert biased["acc"] == 0.5 and biased["both_right"] == 0.0 and biased["consistent"] == 0.0
    assert biased["says_A"] == 1.0
    wrong = pair_scores("B", "A")                            # consistently prefers the rejected response
    assert wrong["acc"] == 0.0 and wrong["consistent"] == 1.0
    missing = pair_scores(None, "B")
    assert missing["acc"] == 0.5 and missing["consistent"] == 0.0


# ---------------------------------------------------------------- data generator
def test_generator_deterministic_balanced_and_traces_match_labels(tmp_path):
    gen.main(["--out-dir", str(tmp_path), "--sft-dir", str(tmp_path / "gen")])
    for name in ["rmr1_train.jsonl", "rmr1_test.jsonl", "rmr1_sft_sample.jsonl"]:    # same bytes as committed
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / name).read_bytes(), name
    train, test, sft_train, sft_dev = gen.build()
    assert (train, test) == gen.build()[:2]
    assert len(train) == 240 and len(test) == 48
    assert not {p["input"] for p in train} & {p["input"] for p in test}             # unseen questions in test
    assert not {p["input"].split("?")[0] for p in train if p["category"] == "instruction"} & \
        {p["input"].split("?")[0] for p in test if p["category"] == "instruction"}
    for rows in (sft_train, sft_dev):
        for cat in gen.CATEGORIES:
            labels = [r["label"] for r in rows if r["category"] == cat]
            assert labels.count("A") == labels.count("B") > 0, cat              # verdicts balanced across A/B
        for r in rows:
            system, user, trace = r["messages"]
            assert system["content"] == SYSTEM_PROMPT and trace["role"] == "assistant"
            assert parse_verdict(trace["content"]) == r["label"] and well_formed(trace["content"])
            assert verdict_reward(trace["content"], r["label"]) == 1.0
            assert task_type(trace["content"]) == ("Reasoning" if r["category"] == "math" else "Chat")
            assert ("<solution>" in trace["content"]) == (r["category"] == "math")
            assert ("<justify>" in trace["content"]) == (r["category"] != "math")
    # the chosen response really sits in the labelled slot
    pair = {p["id"]: p for p in train}[sft_train[1]["id"]]
    slot = sft_train[1]["messages"][1]["content"].split("[Start of Chatbot B's response]\n")[1]
    assert slot.startswith(pair["chosen"] if sft_train[1]["label"] == "B" else pair["rejected"])


def test_math_pairs_are_right_and_wrong():
    import re
    train, test, _, _ = gen.build()
    for p in (p for p in train + test if p["category"] == "math"):
        a, op, b = p["input"][len("What is "):-1].split()
        right = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        said = [int(re.findall(r"-?\d+", r.replace(f"{a} {op} {b}", ""))[-1]) for r in (p["chosen"], p["rejected"])]
        assert said[0] == right and said[1] != right, p


# ---------------------------------------------------------------- loaders
def test_load_pairs_errors_name_file_line_field(tmp_path):
    path = tmp_path / "p.jsonl"
    good = {"id": "x-1", "category": "c", "input": "q", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        load_pairs(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "rejected"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'rejected'"):
        load_pairs(path)
    path.write_text(json.dumps(dict(good, chosen="  ")) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'chosen'"):
        load_pairs(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: not a JSON object"):
        load_pairs(path)
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "subset": "xstest", "id": 7}) + "\n\n"
                    + json.dumps({"prompt": "q2", "chosen": "a", "rejected": "b", "subset": "math-prm"}) + "\n")
    assert load_pairs(path) == [{"id": "7", "category": "xstest", "input": "q", "chosen": "a", "rejected": "b"},
                                {"id": "math-prm-3", "category": "math-prm", "input": "q2", "chosen": "a",
                                 "rejected": "b"}]
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")      # no subset
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'category'"):
        load_pairs(path)


def test_sft_rows_load_in_sft_py(tmp_path):
    from algos.sft import load_rows
    rows = load_rows(str(ROOT / "data" / "rmr1_sft_sample.jsonl"))
    assert len(rows) == 8 and rows[0]["messages"][2]["role"] == "assistant"


# ---------------------------------------------------------------- end to end
def test_smoke_tiny(tmp_path):
    cmd = [sys.executable, "algos/rmr1_distill_rl.py", "--model", "tiny", "--total-steps", "2", "--prompts-per-step",
           "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-max-new-tokens", "4", "--eval-per-category",
           "1", "--hhh-file", "", "--rewardbench-file", str(ROOT / "data" / "rmr1_test.jsonl"),
           "--runs-dir", str(tmp_path), "--exp-name", "smoke", "--save-model", "false"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    run = next(tmp_path.glob("smoke__1__*"))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    for key in ["reward", "rewards/verdict/mean", "verdict_format", "frac_reward_zero_std", "kl", "approx_kl",
                "clipfrac", "says_A", "label_A", "completion_len", "time/generate_s", "time/train_s"]:
        assert key in rows[0], key
    assert all(r["reward"] == -1.0 and r["verdict_format"] == 0.0 for r in rows)     # a random model: no verdict
    preds = [json.loads(line) for line in open(run / "predictions_synth.jsonl")]
    assert len(preds) == 4 and {"completion_AB", "completion_BA", "consistent", "acc"} <= set(preds[0])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["before/synth/pairs"] == 4 and summary["after/rewardbench/pairs"] == 48
    assert "before/synth/math/acc" in summary and "after/synth/consistent" in summary


def test_learning_reward_rises_tiny():
    """GRPO update (k3 KL to a frozen reference on) with the verdict reward on the tiny random model. A random model
    never writes the tag, so a synthetic judge stands in: its verdict is A when most sampled tokens have an (initial)
    embedding along a fixed direction u, and the completion scored by verdict_reward is the trace that ends in that
    verdict; every label is A. Moving the final hidden state along u raises all those tokens, so the reward can
    rise within a few steps."""
    from algos.model import collate, generate, load_model, start_rollouts
    from kernels.advantage import group_advantages
    torch.manual_seed(0), random.seed(0)
    model, tok = load_model("tiny", device="cpu")
    ref = load_model("tiny", device="cpu")[0].requires_grad_(False)
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    good = model.get_input_embeddings().weight.detach() @ u > 0  # (V,)
    args = Args(lr=3e-2, num_minibatches=2, group_size=8, micro_batch_tokens=4096, max_new_tokens=8, beta=0.001)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    curve = []
    for _ in range(12):
        rollouts = start_rollouts(tok, ["Judge:", "Which is better?", "A or B", "Verdict:"], n=8)
        generate(model, tok, rollouts, args.max_new_tokens, 1.0)
        verdicts = ["A" if good[torch.tensor(r.completion_ids)].float().mean() > 0.5 else "B" for r in rollouts]
        rewards = torch.tensor([verdict_reward(f"{TRACE}<answer>[[{v}]]</answer>", "A") for v in verdicts])
        stats = grpo_update(model, optimizer, collate(rollouts, tok.pad_token_id), group_advantages(rewards, 8), args,
                            ref)
        assert stats["approx_kl"] >= 0 and stats["kl"] >= 0 and 0 <= stats["clipfrac"] <= 1
        curve.append(rewards.mean().item())
    assert sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 0.4, curve


def test_teacher_traces_kept_only_when_verdict_matches(monkeypatch):
    """The teacher path keeps a trace only when it has exactly one well-formed verdict equal to the label."""
    import algos.model

    class FakeTeacher:  # replies: right verdict, wrong verdict, both verdicts, right verdict twice
        replies = iter([TRACE + A, TRACE + A, TRACE + A + B, TRACE + B + B])

        def __init__(self, backend, model_name="", log_path=None):
            self.backend = backend

        def chat(self, conversations, max_tokens=256, temperature=0.0, n=1):
            return [next(self.replies)]
    monkeypatch.setattr(algos.model, "ChatClient", FakeTeacher)
    pairs = gen.build()[1][:4]  # labels alternate A, B, A, B
    rows = gen.teacher_rows(pairs, "http://teacher/v1", "m", 64, None, seed=0)
    assert [r["id"] for r in rows] == [pairs[0]["id"]]
    assert rows[0]["label"] == "A" and rows[0]["messages"][-1] == {"role": "assistant", "content": TRACE + A}


def test_smoke_tiny_bf16(tmp_path):
    """--precision bf16 (autocast sampling and log-prob passes; old_logp recomputed): the run-time invariants hold."""
    cmd = [sys.executable, "algos/rmr1_distill_rl.py", "--model", "tiny", "--precision", "bf16", "--total-steps", "2",
           "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "8", "--eval-file", "", "--hhh-file", "",
           "--runs-dir", str(tmp_path), "--exp-name", "smoke_bf16", "--save-model", "false"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = next(tmp_path.glob("smoke_bf16__1__*"))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1] and all(r["kl"] >= 0 and r["skipped_steps"] == 0 for r in rows)
    assert json.loads((run / "args.json").read_text())["old_logp"] == "recompute"  # auto, resolved for bf16
