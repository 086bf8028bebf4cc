"""algos/grpo_toolrl.py and data/make_toolrl_bfcl.py: BFCL checker, converter, smoke run, learning test."""
import copy
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algos.grpo_toolrl import (Args, bfcl_check, grpo_update, load_jsonl, micro_batches, paired_bootstrap,
                               parse_bfcl_calls, toolrl_reward, value_ok)

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_toolrl_bfcl", ROOT / "data" / "make_toolrl_bfcl.py")
conv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv)

TOOLS = [{"name": "area", "parameters": {"type": "dict", "required": ["base"], "properties": {
    "base": {"type": "integer"}, "unit": {"type": "string"}, "scale": {"type": "float"},
    "tags": {"type": "array", "items": {"type": "string"}}, "opts": {"type": "dict"}}}}]
ANSWER = [{"area": {"base": [10], "unit": ["square meters", ""], "scale": [1.5, ""], "tags": [["a b", "c"], ""],
                    "opts": [{"round": [True], "digits": [2, ""]}, ""]}}]


def call(**arguments):
    return [{"name": "area", "arguments": arguments}]


# ---------------------------------------------------------------- BFCL checker
def test_bfcl_simple_values_types_and_optional():
    assert bfcl_check(call(base=10), ANSWER, TOOLS, "simple_python") == (True, None)
    assert bfcl_check(call(base=10, unit="Square-Meters"), ANSWER, TOOLS, "simple_python")[0]  # BFCL normalising
    assert not bfcl_check(call(base="10"), ANSWER, TOOLS, "simple_python")[0]                 # string for an int
    assert not bfcl_check(call(base=10.0), ANSWER, TOOLS, "simple_python")[0]                 # float for an int
    assert not bfcl_check(call(base=True), ANSWER, TOOLS, "simple_python")[0]                 # bool is not an int
    assert bfcl_check(call(base=10, scale=1.5), ANSWER, TOOLS, "simple_python")[0]
    assert not bfcl_check(call(base=10, scale=2), ANSWER, TOOLS, "simple_python")[0]          # int -> float 2.0
    assert not bfcl_check(call(unit="m"), ANSWER, TOOLS, "simple_python")[0]                  # missing required
    assert not bfcl_check(call(base=10, color="red"), ANSWER, TOOLS, "simple_python")[0]      # unexpected
    assert bfcl_check(call(base=10, tags=["A-B", "c"]), ANSWER, TOOLS, "simple_python")[0]    # list items normalised
    assert not bfcl_check(call(base=10, tags=["c", "a b"]), ANSWER, TOOLS, "simple_python")[0]  # order matters
    assert bfcl_check(call(base=10, opts={"round": True}), ANSWER, TOOLS, "simple_python")[0]   # optional dict key
    assert not bfcl_check(call(base=10, opts={"digits": 2}), ANSWER, TOOLS, "simple_python")[0]  # missing dict key
    assert not bfcl_check([], ANSWER, TOOLS, "simple_python")[0]
    assert not bfcl_check(None, ANSWER, TOOLS, "simple_python")[0]
    assert not bfcl_check(call(base=10) * 2, ANSWER, TOOLS, "multiple")[0]                     # one call expected
    answer = [{"area": {"base": [10], "unit": ["m"]}}]  # a parameter not marked optional must be given
    assert not bfcl_check(call(base=10), answer, TOOLS, "simple_python")[0]
    assert value_ok(3, [3.0], "float") and not value_ok("x", ["y"], "string")


def test_bfcl_parallel_any_order_and_irrelevance():
    answer = [{"area": {"base": [1]}}, {"area": {"base": [2]}}]
    assert bfcl_check(call(base=2) + call(base=1), answer, TOOLS, "parallel")[0]
    assert not bfcl_check(call(base=2) + call(base=2), answer, TOOLS, "parallel")[0]
    assert not bfcl_check(call(base=1), answer, TOOLS, "parallel_multiple")[0]
    assert bfcl_check([], [], TOOLS, "irrelevance")[0]
    assert bfcl_check(None, [], TOOLS, "irrelevance")[0]     # an unparseable block counts as no call (as BFCL)
    assert not bfcl_check(call(base=1), [], TOOLS, "irrelevance")[0]


def test_parse_bfcl_calls():
    text = '<think>x</think>\n<tool_call>\n{"name": "a", "parameters": {"x": 1}}\n{"name": "b", "arguments": {}}\n' \
           '</tool_call>'
    assert parse_bfcl_calls(text) == [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]
    assert parse_bfcl_calls("<think>x</think>\n<response>no</response>") == []
    assert parse_bfcl_calls("<tool_call>\n{broken\n</tool_call>") is None
    assert parse_bfcl_calls('<tool_call>\n{"name": "a", "parameters": {}}') is None  # unclosed


# ---------------------------------------------------------------- converter and committed samples
def test_samples_are_valid_and_reference_turns_score_max():
    train = load_jsonl(ROOT / "data" / "toolrl_train_sample.jsonl", ["id", "tools", "dialogue", "ground_truth"])
    evals = load_jsonl(ROOT / "data" / "bfcl_eval_sample.jsonl",
                       ["id", "category", "tools", "dialogue", "possible_answer"])
    cats = {r["category"] for r in train}
    assert {"live_simple", "live_multiple", "live_parallel", "live_irrelevance"} <= cats
    assert any(r["ground_truth"].count('{"name"') > 1 for r in train)              # a multi-call target
    for r in train:
        expected = 4.0 if "<tool_call>" in r["ground_truth"] else 1.0                # no-call: format only
        assert toolrl_reward(r["ground_truth"], r["ground_truth"])["total"] == expected
    assert {r["category"] for r in evals} == set(conv.EVAL_CATEGORIES)
    for r in evals:  # the reference turn built from the possible answers passes our checker
        calls = parse_bfcl_calls(conv.reference_turn(r["possible_answer"], r["tools"]))
        assert bfcl_check(calls, r["possible_answer"], r["tools"], r["category"])[0], r["id"]


@pytest.mark.skipif(importlib.util.find_spec("bfcl_eval") is None, reason="bfcl_eval not installed")
def test_converter_is_deterministic_and_matches_committed_sample():
    train, dev, evals = conv.build(conv.bfcl_data_dir())
    assert not {r["id"] for r in train} & {r["id"] for r in dev}
    assert not {r["id"] for r in train} & {r["id"] for r in evals}                  # live vs non-live: disjoint
    committed = [json.loads(line) for line in open(ROOT / "data" / "toolrl_train_sample.jsonl")]
    assert conv.sample(train, 8, 1200) == committed
    committed_sft = [json.loads(line) for line in open(ROOT / "data" / "toolrl_sft_sample.jsonl")]
    assert conv.sft_records(conv.sample(train, 4, 1200), 1200) == committed_sft  # holds today's system prompt
    no_call = sum("<tool_call>" not in r["ground_truth"] for r in train + dev)
    assert 0 < no_call <= 0.25 * len(train + dev) + 1


def test_converter_malformed_rows_name_file_line_field(tmp_path):
    good = {"id": "live_simple_0", "question": [[{"role": "user", "content": "hi"}]],
            "function": [{"name": "f", "parameters": {"type": "dict", "properties": {}}}]}
    (tmp_path / "possible_answer").mkdir()
    answer = {"id": "live_simple_0", "ground_truth": [{"f": {}}]}

    def write(rows, answers):
        (tmp_path / "BFCL_v4_live_simple.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (tmp_path / "possible_answer" / "BFCL_v4_live_simple.json").write_text(
            "\n".join(json.dumps(a) for a in answers) + "\n")

    write([good], [answer])
    assert conv.load_category(tmp_path, "live_simple")[0]["possible_answer"] == [{"f": {}}]
    bad = dict(good, id="live_simple_1")
    del bad["function"]
    write([good, bad], [answer])
    with pytest.raises(ValueError, match=r"BFCL_v4_live_simple.json:2: missing field 'function'"):
        conv.load_category(tmp_path, "live_simple")
    write([good], [{"id": "live_simple_0", "ground_truth": [{"unknown_tool": {}}]}])
    with pytest.raises(ValueError, match=r"possible_answer/BFCL_v4_live_simple.json:1: field 'ground_truth'"):
        conv.load_category(tmp_path, "live_simple")
    (tmp_path / "BFCL_v4_live_simple.json").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"BFCL_v4_live_simple.json:2: not valid JSON"):
        conv.load_category(tmp_path, "live_simple")


def test_training_loader_rejects_bad_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "a", "tools": [], "dialogue": [], "ground_truth": "<tool_call>\n{x\n"
                                                                                        "</tool_call>"}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: field 'ground_truth'"):
        load_jsonl(path, ["id", "tools", "dialogue", "ground_truth"])
    path.write_text(json.dumps({"id": "a", "tools": []}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: missing field 'dialogue'"):
        load_jsonl(path, ["id", "tools", "dialogue", "ground_truth"])


# ---------------------------------------------------------------- end to end
def test_smoke_tiny(tmp_path):
    cmd = [sys.executable, "algos/grpo_toolrl.py", "--model", "tiny", "--total-steps", "2", "--prompts-per-step",
           "2", "--group-size", "2", "--max-new-tokens", "8", "--num-minibatches", "2", "--eval-per-category", "1",
           "--train-file", "data/toolrl_train_sample.jsonl", "--eval-file", "data/bfcl_eval_sample.jsonl",
           "--max-prompt-tokens", "1024", "--eval-max-prompt-tokens", "1024", "--beta", "0.04",
           "--save-model", "false", "--exp-name", "smoke_toolrl", "--heldout-file", "data/toolrl_train_sample.jsonl",
           "--micro-batch-tokens", "600", "--no-call", "match", "--runs-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    run = sorted(tmp_path.glob("smoke_toolrl__1__*"))[-1]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    for key in ["reward", "rewards/format/mean", "rewards/correctness/mean", "frac_reward_zero_std", "clipfrac",
                "kl", "approx_kl", "completion_len", "time/generate_s", "time/train_s"]:
        assert key in rows[0], key
    preds = [json.loads(line) for line in open(run / "predictions.jsonl")]
    assert len(preds) == 5 and {"id", "completion", "calls", "correct"} <= set(preds[0])
    summary = json.loads((run / "summary.json").read_text())
    assert "after/bfcl/overall" in summary and "before/bfcl/irrelevance" in summary and summary["heldout_items"] > 0
    held = [json.loads(line) for line in open(run / "heldout_predictions.jsonl")]  # the greedy turns behind the mean
    assert len(held) == summary["heldout_items"] and {"id", "format", "correctness", "completion"} <= set(held[0])
    assert abs(sum(h["total"] for h in held) / len(held) - summary["after/heldout/reward"]) < 1e-9
    low, diff, high = (summary[f"after/heldout/{k}"] for k in ("diff_ci95_low", "diff", "diff_ci95_high"))
    assert low <= diff <= high
    assert -3 <= summary["before/heldout/reward"] <= 4 and 0 <= summary["after/heldout/exact"] <= 1
    assert 0 <= summary["after/heldout/call_decision"] <= 1 and json.loads((run / "args.json").read_text())["no_call"] \
        == "match"


def test_eval_only_scores_once(tmp_path):
    cmd = [sys.executable, "algos/grpo_toolrl.py", "--model", "tiny", "--eval-only", "true", "--eval-per-category",
           "1", "--eval-max-new-tokens", "4", "--train-file", "data/toolrl_train_sample.jsonl", "--eval-file",
           "data/bfcl_eval_sample.jsonl", "--eval-max-prompt-tokens", "1024", "--exp-name", "smoke_toolrl_eval",
           "--heldout-file", "", "--runs-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = sorted(tmp_path.glob("smoke_toolrl_eval__1__*"))[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_items"] == 5 and summary["train_prompts"] == 0
    assert "before/bfcl/overall" in summary and not any(k.startswith("after/") for k in summary)
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 5 and not list(run.glob("heldout_*"))
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint").exists()


@pytest.mark.parametrize("loss_type,shared", [("grpo", True), ("bnpo", True), ("dr_grpo", True), ("dapo", True),
                                              ("grpo", False)])
def test_update_equals_whole_batch_gradient(loss_type, shared):
    """One minibatch, SGD with lr 1: the parameter change made by grpo_update (token-sized micro-batches, each prompt
    run once for its group or not, zero-advantage sequences skipped) is minus the gradient of policy_loss over the
    whole batch at once, each row run on its own."""
    from algos.model import collate, generate, load_model, sequence_logprobs, start_rollouts
    from kernels.advantage import policy_loss
    torch.manual_seed(0)
    model, tok = load_model("tiny", device="cpu")
    rollouts = start_rollouts(tok, ["Hi", "Tell me a story", "2 + 2 ="], n=4)
    generate(model, tok, rollouts, 6, 1.0)
    data = collate(rollouts, tok.pad_token_id)
    advantages = torch.tensor([0.0] * 4 + [1.2, -0.8, 0.5, -0.9] + [0.0] * 4)  # two groups carry no signal
    args = Args(num_minibatches=1, micro_batch_tokens=24, max_new_tokens=6, loss_type=loss_type, max_grad_norm=1e9,
                shared_prefix=shared)
    micro = micro_batches(data, range(12), args)  # consecutive, within 24 tokens (a shared prompt counted once)
    assert sum(micro, []) == list(range(12)) and 4 <= len(micro) < 12
    whole = copy.deepcopy(model)
    logp = sequence_logprobs(whole, data["input_ids"], data["attention_mask"], share_prefix=False)
    loss, _ = policy_loss(logp, data["sample_logp"], advantages, data["loss_mask"], 0.2, 0.2, None, 0.0, loss_type,
                          max_completion_len=6, num_active_tokens=float(data["loss_mask"].sum()))
    loss.backward()
    start = [p.detach().clone() for p in model.parameters()]
    grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), data, advantages, args)
    moved = 0
    for p0, p1, pw in zip(start, model.parameters(), whole.parameters()):
        torch.testing.assert_close(p0 - p1.detach(), pw.grad, rtol=1e-4, atol=1e-7)
        moved += int((p0 != p1).any())
    assert moved > 0


def test_learning_reward_rises_tiny():
    """GRPO update on the tiny random model with a reward it can learn in a few steps: the share of sampled tokens
    whose (initial) embedding points along a fixed random direction u. Moving the final hidden state along u raises
    all those tokens at once, so the policy gradient has a direction to find; the ToolRL reward itself gives a random
    model no signal (it never writes the tags). Same sampler, advantages, loss and optimizer as the script."""
    from algos.model import collate, generate, load_model, start_rollouts
    from kernels.advantage import group_advantages
    torch.manual_seed(0), random.seed(0)
    model, tok = load_model("tiny", device="cpu")
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    good = model.get_input_embeddings().weight.detach() @ u > 0  # (V,)
    args = Args(lr=3e-2, num_minibatches=2, micro_batch_tokens=1024, max_new_tokens=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    curve = []
    for _ in range(12):
        rollouts = start_rollouts(tok, ["Write something:", "Go:", "Hello there", "Numbers:"], n=8)
        generate(model, tok, rollouts, args.max_new_tokens, 1.0)
        rewards = torch.tensor([good[torch.tensor(r.completion_ids)].float().mean().item() for r in rollouts])
        stats = grpo_update(model, optimizer, collate(rollouts, tok.pad_token_id), group_advantages(rewards, 8), args)
        assert stats["approx_kl"] >= 0 and 0 <= stats["clipfrac"] <= 1
        curve.append(rewards.mean().item())
    assert sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 0.1, curve


def test_paired_bootstrap():
    before, after = [0.0, 1.0, -3.0, 4.0, 1.0], [1.0, 1.0, -2.0, 4.0, 2.0]  # differences 1, 0, 1, 0, 1
    diff, low, high = paired_bootstrap(before, after).values()
    assert diff == pytest.approx(0.6) and 0.0 <= low < 0.6 < high <= 1.0
    assert paired_bootstrap([1.0] * 4, [1.0] * 4) == {"diff": 0.0, "diff_ci95_low": 0.0, "diff_ci95_high": 0.0}


def test_bf16_logprobs_close_to_fp32_and_first_ratio_one():
    """--precision bf16: the training log-prob pass under bf16 autocast is within bf16 rounding of fp32 on the tiny
    model (measured max 2e-3; bound 2e-2) and of the bf16 sampler's; fp32 out, fp32 master weights kept; the default
    old_logp (auto: recompute in bf16) gives the first minibatch ratio 1 (one minibatch: every ratio)."""
    from algos.grpo_toolrl import _logprobs
    from algos.model import collate, generate, load_model, start_rollouts
    torch.manual_seed(0)
    model, tok = load_model("tiny", device="cpu")
    rollouts = start_rollouts(tok, ["Hi", "Tell me a story", "2 + 2 ="], n=3)
    with torch.autocast("cpu", torch.bfloat16):  # as the script samples with --precision bf16
        generate(model, tok, rollouts, 7, 1.0)
    data = collate(rollouts, tok.pad_token_id)
    with torch.no_grad():
        lp = {p: _logprobs(model, data, list(range(9)), Args(precision=p, group_size=3)) for p in ("fp32", "bf16")}
    mask = data["loss_mask"][:, :lp["fp32"].shape[1]]  # (9, width)
    assert lp["bf16"].dtype == torch.float32 and lp["bf16"].shape == lp["fp32"].shape
    assert 0 < float(((lp["bf16"] - lp["fp32"]) * mask).abs().max()) < 2e-2  # rounded, but only by bf16
    torch.testing.assert_close(lp["bf16"] * mask, data["sample_logp"][:, :mask.shape[1]] * mask, atol=2e-2, rtol=0)
    args = Args(precision="bf16", group_size=3, num_minibatches=1, max_new_tokens=7, micro_batch_tokens=40, lr=1e-3)
    start = [p.detach().clone() for p in model.parameters()]
    stats = grpo_update(model, torch.optim.Adam(model.parameters(), lr=args.lr), data,
                        torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0, 0.0, -0.3, 0.9, -0.6]), args)
    assert abs(stats["ratio_mean"] - 1) < 1e-3 and abs(stats["approx_kl"]) < 1e-5 and stats["skipped_steps"] == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any((p0 != p).any() for p0, p in zip(start, model.parameters()))


def test_smoke_tiny_bf16(tmp_path):
    cmd = [sys.executable, "algos/grpo_toolrl.py", "--model", "tiny", "--precision", "bf16", "--total-steps", "2",
           "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "8", "--num-minibatches", "2",
           "--eval-per-category", "1", "--eval-max-new-tokens", "4", "--train-file", "data/toolrl_train_sample.jsonl",
           "--eval-file", "data/bfcl_eval_sample.jsonl", "--max-prompt-tokens", "1024", "--eval-max-prompt-tokens",
           "1024", "--beta", "0.04", "--save-model", "false", "--exp-name", "smoke_bf16", "--heldout-file", "",
           "--runs-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]  # the run-time invariants (first ratio, k3 >= 0) held
    run = sorted(tmp_path.glob("smoke_bf16__1__*"))[-1]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1] and all(r["kl"] >= 0 and r["skipped_steps"] == 0 for r in rows)
    saved = json.loads((run / "args.json").read_text())  # what ran: --old-logp auto resolved for bf16
    assert (saved["precision"], saved["old_logp"]) == ("bf16", "recompute")


def test_greedy_batches_by_length_but_returns_rows_in_order(monkeypatch):
    """greedy() hands generate() the prompts sorted by length; every completion must still come back to its own row.
    generate is replaced by one that answers each prompt with its own token count, so a mix-up shows."""
    import types

    import algos.grpo_toolrl as g
    from algos.model import load_model, start_rollouts
    tok = load_model("tiny", device="cpu")[1]
    seen = []

    def answer_with_length(model, tokenizer, rollouts, max_new_tokens, temperature, batch_size=None, watch=()):
        seen.append([r.prompt_len for r in rollouts])
        for r in rollouts:
            r.token_ids += tokenizer.encode(f" {r.prompt_len}", add_special_tokens=False) + [tokenizer.eos_token_id]

    monkeypatch.setattr(g, "generate", answer_with_length)
    rows = [{"tools": TOOLS, "dialogue": [{"role": "user", "content": "word " * n}]} for n in (40, 3, 17, 9)]
    texts = g.greedy(types.SimpleNamespace(device=torch.device("cpu")), tok, rows, 4, Args())
    lengths = [start_rollouts(tok, [g.build_messages(r["tools"], r["dialogue"])])[0].prompt_len for r in rows]
    assert seen == [sorted(lengths)] and len(set(lengths)) == 4
    assert [t.strip() for t, _ in texts] == [str(n) for n in lengths]  # EOS cut, each row its own answer


def test_call_logodds_are_read_at_the_first_pick_outside_think_and_ranked_by_auc(monkeypatch, tmp_path):
    """greedy() reads log p(<tool_call>) - log p(<response>) where a completion first picks one of the two outside
    <think> (a bare "tool" token inside <think> does not count; no <think> at all: its first pick; no pick: None);
    evaluate() reports how well those log-odds rank the prompts that need a call above the others (call_auc) and
    writes each with its prediction."""
    import types

    import algos.grpo_toolrl as g
    from algos.model import load_model
    tok = load_model("tiny", device="cpu")[1]
    call, reply = '<tool_call>\n{"name": "area", "parameters": {"base": 10}}\n</tool_call>', "<response>ok</response>"
    rows = {"a": ("<think>tool</think>\n" + call, 0, call), "b": ("<think>x</think>\n" + reply, -20, reply),
            "c": ("no tags at all", 0, call), "d": ("<think>y</think>\n" + reply, 5, reply),
            "e": ("<think>w</think>\n" + call, 10, call), "f": (call, 30, reply), "g": ("<think>" + call, 0, call)}
    # name: (completion, offset of its log-odds, reference); g never closes its <think>

    def fake_generate(model, tokenizer, rollouts, max_new_tokens, temperature, batch_size=None, watch=()):
        for r in rollouts:
            text, offset, _ = next(v for k, v in rows.items() if f"ask {k}<" in tokenizer.decode(r.token_ids))
            ids = tokenizer.encode(text, add_special_tokens=False)
            r.token_ids += ids
            r.watched += [[k + offset, 0.0] for k in range(len(ids))]  # log-odds k + offset at position k

    monkeypatch.setattr(g, "generate", fake_generate)
    choice = [tok.encode(t, add_special_tokens=False)[1] for t in ("<tool_call>", "<response>")]
    picks = {k: [i for i, t in enumerate(tok.encode(v[0], add_special_tokens=False)) if t in choice] for k, v in
             rows.items()}
    assert picks["a"][:2] == [3, 9] and all(picks[k][0] == 9 for k in "bde") and not picks["c"]  # a: "tool" in <think>
    assert picks["f"][0] == 1  # f: no <think>, "<" then "tool"
    want = [9, -11, None, 14, 19, 31, None]  # pick token 9 (f: 1) + the row's offset; c and g have no pick
    heldout = [{"id": k, "tools": TOOLS, "dialogue": [{"role": "user", "content": f"ask {k}"}],
                "ground_truth": "<think>.</think>\n" + v[2]} for k, v in rows.items()]
    out, rewards = g.evaluate(types.SimpleNamespace(device=torch.device("cpu")), tok, [], heldout, Args(),
                              tmp_path / "predictions.jsonl")
    assert out["heldout/call_auc"] == 0.5  # calls 9, 19 against no-calls -11, 14, 31: 3 of 6 pairs in order
    saved = [json.loads(x) for x in (tmp_path / "heldout_predictions.jsonl").read_text().splitlines()]
    assert [x["call_logodds"] for x in saved] == want
    assert out["heldout/call_decision"] == 5 / 7  # all but c (no call, one needed) and f (a call, none needed)
