"""algos/sft.py: MinPrompt dominating set, data validation, tool decisions, schedule, smoke and learning runs."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from algos.model import load_model
from algos.sft import (Args, cosine_lr, dominating_set, entities, entity_graph, load_rows, main, select_rows,
                       tokenize, tool_decision)

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = ROOT / "data" / "smart_er_train.jsonl", ROOT / "data" / "smart_er_test.jsonl"


def graph(n, edges):
    nb = [set() for _ in range(n)]
    for a, b in edges:
        nb[a].add(b), nb[b].add(a)
    return nb


def dominates(nb, chosen):
    covered = set(chosen).union(*(nb[c] for c in chosen)) if chosen else set()
    return covered == set(range(len(nb)))


def test_dominating_set_on_graphs_with_known_answers():
    assert dominating_set(graph(5, [(0, 1), (1, 2), (2, 3), (3, 4)])) == [1, 3]  # path: the optimum, 2 nodes
    assert dominating_set(graph(6, [(0, i) for i in range(1, 6)])) == [0]  # star: its centre
    assert dominating_set(graph(3, [])) == [0, 1, 2]  # isolated nodes dominate only themselves
    # two triangles joined by the edge 2-3: greedy takes 2 (degree 3, lowest index), which removes 0, 1 and 3;
    # 4 and 5 remain, each of degree 1, and the tie goes to 4
    assert dominating_set(graph(6, [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)])) == [2, 4]


def test_dominating_set_dominates_random_graphs():
    rng = random.Random(0)
    for n in (1, 7, 40):
        nb = graph(n, [(a, b) for a in range(n) for b in range(a + 1, n) if rng.random() < 0.1])
        chosen = dominating_set(nb)
        assert dominates(nb, chosen) and len(set(chosen)) == len(chosen)


def test_entities_and_selection_on_the_sample_data():
    assert entities("What is the capital of France? Paris is 47 km from Orly.") == {"france", "47", "orly"}
    assert entities("What is 12 * 34?") == {"12", "34"}
    rows = load_rows(str(TRAIN))
    nb = entity_graph(rows)
    chosen = select_rows(rows, "dominating_set", 0, seed=0)
    assert 0 < len(chosen) < len(rows)
    ids = {r["id"] for r in chosen}
    assert dominates(nb, [i for i, r in enumerate(rows) if r["id"] in ids])
    assert len(select_rows(rows, "random", 0, seed=0)) == len(chosen)
    with pytest.raises(ValueError, match="--select"):
        select_rows(rows, "best", 0, seed=0)


def write(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.mark.parametrize("line, where", [
    ('{"messages": [', "bad.jsonl:3: field '<json>'"),
    (json.dumps({"text": "no messages"}), "bad.jsonl:3: field 'messages'"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "bad.jsonl:3: field 'messages[0].role'"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}), "bad.jsonl:3: field 'messages[0].content'"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "bad.jsonl:3: field 'messages'"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, line, where):
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        load_rows(write(tmp_path, [GOOD, GOOD, line]))


def test_malformed_data_stops_the_run_before_training(tmp_path):
    bad = write(tmp_path, [GOOD, '{"messages": 3}'])
    with pytest.raises(ValueError, match="bad.jsonl:2: field 'messages'"):
        main(Args(model="tiny", train_file=bad, eval_file="", output_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_tool_decision_parses_markers_and_never_raises():
    assert tool_decision("- Step 1: Multiply. (tool: Code) Hard.\nCode: 47 * 89") == "tool"
    assert tool_decision("Search: elevation of K2") == "tool"
    assert tool_decision("- Step 1: Add. (general reasoning) Easy.\n3 + 5 = 8.\n### Final Response\n8") == "direct"
    assert tool_decision("The capital of France is Paris.") == "direct"
    assert tool_decision("") == "direct"


def test_cosine_schedule_warms_up_then_decays_to_zero():
    values = [cosine_lr(s, 100, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(values[10:], values[11:])) and values[-1] < 0.001


def test_tokenize_masks_tool_turns_and_keeps_targets():
    _, tokenizer = load_model("tiny", device="cpu")
    rows = [r for r in load_rows(str(TRAIN)) if r["needs_tool"]][:3]
    for row, ex in zip(rows, tokenize(tokenizer, rows, 1024)):
        trained = tokenizer.decode([t for t, m in zip(ex.token_ids, ex.loss_mask) if m])
        output = next(m["content"] for m in row["messages"] if m["role"] == "tool")
        assert output not in trained and "### Final Response" in trained and trained.count("<|im_end|>") == 2
    assert tokenize(tokenizer, rows, 8) == []  # cut before any assistant token: nothing left to train on


def test_smoke_tiny_model_through_the_command_line(tmp_path):
    cmd = [sys.executable, "algos/sft.py", "--model", "tiny", "--max-steps", "2", "--batch-size", "2",
           "--eval-every", "1", "--eval-rows", "4", "--decision-rows", "4", "--decision-tokens", "4",
           "--save-every", "1", "--agent-rows", "3", "--agent-tokens", "4", "--output-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_rows"] == 600 and summary["eval_loss_end"] > 0 and summary["tokens_per_s"] > 0
    assert 0 <= summary["decision_acc_end"] <= 1 and len(summary["git_commit"] or "x") > 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run / "checkpoint" / "config.json").exists() and (run / "args.json").exists()
    assert len((run / "decisions.jsonl").read_text().splitlines()) == 4
    assert 0 <= summary["agent_acc_end"] <= 1 and 0 <= summary["tool_calls_start"] <= 2
    assert len((run / "agent.jsonl").read_text().splitlines()) == 3


def test_sft_on_the_sample_data_lowers_heldout_loss(tmp_path):
    """Learning: six steps of SmolLM2-135M on SMART-ER chains cut the held-out loss by more than a third
    (the chains' format and the tool/no-tool rule are new to the model; 8 unseen test rows). Measured 2026-12-02:
    2.39 -> 1.17 (x0.49)."""
    summary = main(Args(model="smollm2-135m", max_steps=6, batch_size=2, lr=2e-4, max_len=384, eval_every=100,
                        eval_rows=8, decision_rows=0, agent_rows=0, output_dir=str(tmp_path)))
    assert summary["eval_loss_end"] < 0.65 * summary["eval_loss_start"], summary


def test_tool_request_and_final_answer_parsing():
    from algos.sft import final_correct, tool_request
    assert tool_request("- Step 1: Multiply. (tool: Code) Hard.\nCode: 47 * 89") == ("Code", "47 * 89")
    assert tool_request("Search: elevation of K2\n") == ("Search", "elevation of K2")
    assert tool_request("3 + 5 = 8.\n### Final Response\n8") is None and tool_request("Code:") is None
    assert final_correct("### Final Response\nThe answer is 4183.", "4183")
    assert not final_correct("### Final Response\nThe answer is 41830.", "4183")  # whole numbers only
    assert final_correct("x\n### Final Response\nIt is paris.", "Paris") and final_correct("Paris, surely", "Paris")
    assert not final_correct("Paris\n### Final Response\nRome", "Paris")
    assert not final_correct("### Final Response\n", None)


def test_agentic_eval_runs_code_answers_search_and_caps_calls(monkeypatch):
    """Scripted model turns: Code is really executed in the sandbox, Search gets the row's recorded output, a model
    that keeps calling tools stops at max_tool_calls; accuracy and calls per question are SMART's two metrics."""
    import algos.sft as sft
    rows = load_rows(str(TEST))
    math_row = next(r for r in rows if r["tool"] == "Code")
    search_row = next(r for r in rows if r["tool"] == "Search")
    direct_row = next(r for r in rows if not r["needs_tool"])
    loop_row = {"id": "loop", "answer": "1", "messages": [{"role": "user", "content": "Loop on tools?"}]}
    expr = next(m["content"] for m in math_row["messages"] if m["role"] == "assistant").split("Code: ")[-1]
    script = {math_row["question"]: [f"- Step 1: x. (tool: Code) y\nCode: {expr}",
                                     f"### Final Response\nThe answer is {eval(expr)}."],
              search_row["question"]: ["(tool: Search)\nSearch: what", "### Final Response\nIt is wrong."],
              direct_row["question"]: [f"### Final Response\n{direct_row['answer']}"],
              "Loop on tools?": ["Code: 1/0"] * 5}

    def fake_generate(model, tokenizer, rollouts, max_new_tokens, **kw):
        texts = [tokenizer.decode(r.token_ids) for r in rollouts]
        return [script[q][t.count("<|im_start|>assistant") - 1] + tokenizer.eos_token
                for t in texts for q in script if q in t]

    monkeypatch.setattr(sft, "generate", fake_generate)
    model, tokenizer = load_model("tiny", device="cpu")
    metrics, transcripts = sft.agentic_eval(model, tokenizer, [math_row, search_row, direct_row, loop_row], 16, 2)
    assert metrics == {"agent_acc": 0.5, "tool_calls": (1 + 1 + 0 + 2) / 4, "code_errors": 2}
    assert transcripts[0]["messages"][1] == {"role": "tool", "content": f"- Output: {eval(expr)}"}
    assert transcripts[1]["messages"][1]["content"] == next(m["content"] for m in search_row["messages"]
                                                            if m["role"] == "tool")
    assert transcripts[3]["messages"][1]["content"] == "- Output: error: ZeroDivisionError: division by zero"
    assert len(transcripts[3]["messages"]) == 5  # request, error, request, error, request left unanswered
    assert [t["correct"] for t in transcripts] == [True, False, True, False]
    assert [t["tool_calls"] for t in transcripts] == [1, 1, 0, 2]
