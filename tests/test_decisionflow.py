"""algos/decisionflow.py: utility arithmetic, schema validation, retry-then-fallback, answer parsing, the MTA loader,
the bundled sample, and a smoke run with the tiny model."""
import importlib.util
import json
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from algos.decisionflow import (STEPS, Args, DataError, ask_json, correct_choices, decide, extract_json,
                                filter_attributes, load_mta, main, majority, parse_answer, run_baseline,
                                run_decisionflow, score, step_schema, utilities, validate)
from algos.model import parse_args

ROOT = Path(__file__).resolve().parents[1]


class ScriptedClient:
    """Stands in for ChatClient: replies come from a list in order (n replies per conversation)."""

    def __init__(self, replies):
        self.replies, self.seen, self.calls = list(replies), [], 0

    def chat(self, conversations, max_tokens=256, temperature=0.0, n=1):
        out = []
        for c in conversations:
            for _ in range(n):
                self.seen.append(c)
                out.append(self.replies.pop(0))
        self.calls += len(out)
        return out


def item(scores=(10, 0), kdma="fairness", n=2):
    return {"id": "x", "scenario": "s", "state": None, "probe": "p", "choices": [f"c{j}" for j in range(n)],
            "kdma": kdma, "scores": list(scores)}


# ---------------------------------------------------------------- utility, filter, decision
def test_utility_filter_and_decision_hand_computed():
    weights = [0.9, 0.2, 0.31, 0.3]  # 0.3 itself is not kept: the rule is weight > 0.3
    kept, empty = filter_attributes(weights, 0.3)
    assert kept == [0, 2] and not empty
    scores = [[1.0, 0.5], [0.2, 1.0]]  # (choices, kept attributes)
    u = utilities([weights[i] for i in kept], scores)
    assert u == pytest.approx([0.9 * 1.0 + 0.31 * 0.5, 0.9 * 0.2 + 0.31 * 1.0])  # [1.055, 0.49]
    assert decide(u, "high") == 0 and decide(u, "low") == 1
    assert decide([0.3, 0.7, 0.1], "high") == 1 and decide([0.3, 0.7, 0.1], "low") == 2  # three choices
    assert decide([0.5, 0.5], "high") is None and decide([0.5, 0.5], "low") is None  # a tie is no decision


def test_filter_keeps_all_when_none_pass():
    kept, empty = filter_attributes([0.1, 0.3, 0.0], 0.3)
    assert kept == [0, 1, 2] and empty


def test_every_attribute_gets_its_weight():
    """The released code's `break` weighted only the first attribute; here the weights step must give one weight
    per attribute, or it is invalid."""
    st = {"attributes": [{"variable": "a", "attribute": "x", "value": "1"}] * 3}
    schema = step_schema("weights", item(), st)
    assert validate({"weights": [0.8, 0.1, 0.5]}, schema) is None
    assert "1 items" in validate({"weights": [0.8]}, schema)
    assert "outside" in validate({"weights": [0.8, 1.5, 0.2]}, schema)


# ---------------------------------------------------------------- JSON extraction and validation
def test_extract_json_from_prose_and_fences():
    assert extract_json('Sure! ```json\n{"weights": [0.5, 1]}\n``` done') == {"weights": [0.5, 1]}
    assert extract_json('{bad} then {"a": {"b": 2}} tail }') == {"a": {"b": 2}}
    assert extract_json("no json [1, 2]") is None and extract_json("") is None and extract_json(None) is None
    assert extract_json('{"a": ' * 5000 + "1" + "}" * 5000) is None  # deeper than Python's stack: no object, no crash


def test_validate_schema_errors():
    st = {"variables": ["vendor", "bomber"], "kept": [0, 1, 2]}
    assert validate({"variables": ["a", "b"]}, step_schema("variables", item(), st)) is None
    assert "distinct" in validate({"variables": ["a", "a"]}, step_schema("variables", item(), st))
    assert "placeholder" in validate({"variables": ["<subject of A>", "b"]}, step_schema("variables", item(), st))
    assert "missing key" in validate({"vars": ["a", "b"]}, step_schema("variables", item(), st))
    facts = step_schema("extraction", item(), st)
    assert validate({"facts": [{"variable": "vendor", "fact": "The vendor helped."}]}, facts) is None
    assert "not one of" in validate({"facts": [{"variable": "he", "fact": "He helped."}]}, facts)
    scores = step_schema("scores", item(), st)
    assert validate({"scores": [[0, 0.5, 1], [1, 1, 0]]}, scores) is None
    assert "expected number" in validate({"scores": [[0, "0.5", 1], [1, 1, 0]]}, scores)
    assert "expected number" in validate({"scores": [[0, True, 1], [1, 1, 0]]}, scores)  # bool is not a number
    # Python's json reads NaN and Infinity: neither may reach the utility (NaN compares false with both bounds)
    assert "expected number" in validate(extract_json('{"scores": [[0, NaN, 1], [1, 1, 0]]}'), scores)
    assert "expected number" in validate(extract_json('{"scores": [[0, 1, 1], [1, -Infinity, 0]]}'), scores)
    assert "2 items" in validate({"scores": [[0, 0.5], [1, 1, 0]]}, scores)
    dec = step_schema("decision", item(), st)
    assert validate({"choice": "B", "explanation": "because"}, dec) is None
    assert "not one of" in validate({"choice": "C", "explanation": "because"}, dec)


def test_retry_then_fallback_counts():
    """Three conversations: valid at once; invalid then valid on the retry; invalid twice -> None (fallback)."""
    schema = {"type": "object", "required": ["w"], "properties": {"w": {"type": "number", "maximum": 1}}}
    client = ScriptedClient(['{"w": 0.5}', 'nonsense', '{"w": 7}', '{"w": 1}', 'still {"w": 2}'])
    counts = Counter()
    conv = [{"role": "user", "content": "q"}]
    out = ask_json(client, [conv] * 3, [schema] * 3, Args(), counts)
    assert out == [{"w": 0.5}, {"w": 1}, None]  # reply order: the 3 first tries, then the 2 retries
    assert counts == Counter(valid_first=1, valid_retry=1, fallback=1, items=3)
    retry = client.seen[3]  # the retry shows the invalid reply and the validation error
    assert retry[-2] == {"role": "assistant", "content": "nonsense"} and "no JSON object" in retry[-1]["content"]
    assert "outside" in client.seen[4][-1]["content"]


def test_decisionflow_pipeline_with_scripted_client():
    """Item 0 answers every step validly; item 1 answers nothing valid (all fallbacks: a tie, no decision)."""
    good = ['{"variables": ["vendor", "bomber"]}',
            '{"facts": [{"variable": "vendor", "fact": "The vendor saved children."}]}',
            '{"attributes": [{"variable": "vendor", "attribute": "merit", "value": "saved children"}, '
            '{"variable": "bomber", "attribute": "merit", "value": "planted the bomb"}, '
            '{"variable": "bomber", "attribute": "bleeding", "value": "fast"}]}',
            '{"weights": [1.0, 0.9, 0.2]}',
            '{"scores": [[0.9, 0.8], [0.1, 0.0]]}']
    replies = []
    for g in good:  # per step: first tries of item 0 and item 1, then item 1's retry
        replies += [g, "junk", "junk"]
    replies += ['{"choice": "A", "explanation": "The vendor deserves it."}',
                '{"choice": "A", "explanation": "x y z"}', "junk", "junk", "junk", "junk"]
    stats = {s: Counter() for s in STEPS}
    recs = run_decisionflow(ScriptedClient(replies), [item(), item()], Args(), stats)
    # item 0: kept attributes 0, 1 (0.2 dropped); U_A = 1.0*0.9 + 0.9*0.8 = 1.62, U_B = 1.0*0.1 + 0.9*0.0 = 0.1
    assert recs[0]["utility"] == pytest.approx([1.62, 0.1]) and recs[0]["kept"] == 2
    assert recs[0]["chosen"] == 0 and recs[1]["chosen"] == 1  # high -> argmax, low -> argmin
    assert recs[1]["llm_choice"] == 0  # the model's pick is recorded but the arithmetic decides
    assert recs[2]["utility"] == [0.5, 0.5] and recs[2]["chosen"] is None and recs[3]["chosen"] is None
    assert recs[2]["explanation"].startswith("(fallback)")
    for step in STEPS[:5]:
        assert stats[step] == Counter(valid_first=1, fallback=1, items=2)
    assert stats["decision"] == Counter(valid_first=2, fallback=2, items=4)


# ---------------------------------------------------------------- baselines and scoring
@pytest.mark.parametrize("text, want", [("Answer: B", 1), ("I think... answer is (A).", 0), ("B", 1), ("(A)", 0),
                                        ("Answer: A\nActually, Answer: B", 1), ("**Answer:** B", 1),
                                        ("Answer: C", None), ("I would pick the vendor.", None), ("", None),
                                        ("A or B", None), ("B. Carry the nurse.", 1), ("Answer: I think A", None),
                                        ("The answer is a hard one", None)])
def test_parse_answer(text, want):
    assert parse_answer(text, 2) == want


def test_majority_vote():
    assert majority([1, 0, 1, None]) == 1
    assert majority([None, 0, 1, 1, 0]) == 1  # tie 2-2: answer 1 reached 2 votes first
    assert majority([None, None]) is None


def test_unparseable_counts_wrong_in_scores():
    it = item((0, 10))
    client = ScriptedClient(["Answer: B", "no idea"])  # high right; low unparseable
    recs = run_baseline(client, [it], "zero_shot", Args())
    rows = [{"kdma": it["kdma"], "target": t, "correct": r["chosen"] in correct_choices(it["scores"], t)}
            for t, r in zip(("high", "low"), recs)]
    s = score(rows)
    assert s["high_acc"] == 100.0 and s["low_acc"] == 0.0 and s["bias"] == 100.0
    assert s["fairness/high_acc"] == 100.0


def test_self_consistency_majority_of_k():
    it = item((10, 0))
    client = ScriptedClient(["Answer: A", "Answer: B", "Answer: A", "Answer: B", "x", "Answer: B"])
    recs = run_baseline(client, [it], "self_consistency", Args(sc_samples=3))
    assert [r["chosen"] for r in recs] == [0, 1] and recs[1]["votes"] == [1, None, 1]


def test_score_per_kdma_and_bias():
    rows = [{"kdma": "a", "target": "high", "correct": True}, {"kdma": "a", "target": "low", "correct": False},
            {"kdma": "b", "target": "high", "correct": True}, {"kdma": "b", "target": "low", "correct": True}]
    s = score(rows)
    assert (s["high_acc"], s["low_acc"], s["bias"]) == (100.0, 50.0, 50.0)
    assert (s["a/bias"], s["b/bias"]) == (100.0, 0.0)


# ---------------------------------------------------------------- the MTA loader
def write(tmp_path, obj, name="mta.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_load_released_format(tmp_path):
    data = [[{"scenario": "S", "state": None, "probe": "P?", "choices": ["x", "y"]}, [{"fairness": 0},
                                                                                       {"fairness": 10}]],
            [{"scenario": "S2", "probe": "Q?", "choices": ["x", "y", "z"], "probe_id": "p7"},
             [{"risk_aversion": 3}, {"risk_aversion": 10}, {"risk_aversion": 10}]],
            {"input": {"scenario": "S3", "state": "st", "probe": "R?", "choices": ["x", "y"]},
             "label": [{"utilitarianism": 5}, {"utilitarianism": 5}]}]  # no contrast: skipped
    items, skipped = load_mta(write(tmp_path, data))
    assert skipped == 1 and [it["id"] for it in items] == ["item-000", "p7"]
    assert items[0]["kdma"] == "fairness" and items[0]["scores"] == [0.0, 10.0] and items[0]["state"] is None
    assert correct_choices(items[1]["scores"], "high") == [1, 2] and correct_choices(items[1]["scores"], "low") == [0]


def test_bundled_sample_is_valid_and_balanced():
    items, skipped = load_mta(ROOT / "data" / "decisionflow_sample.json")
    assert skipped == 0 and len(items) == 12 and len({it["kdma"] for it in items}) == 6
    assert sum(correct_choices(it["scores"], "high") == [0] for it in items) == 6  # always-A scores 50%
    spec = importlib.util.spec_from_file_location("make_df", ROOT / "data" / "make_decisionflow_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert json.loads((ROOT / "data" / "decisionflow_sample.json").read_text()) == mod.build()  # made by the script


@pytest.mark.parametrize("data, where", [
    ("[1, 2", "line 1: not valid JSON"),
    ({"a": 1}, "top level"),
    ([["just one"]], "item 0: expected an [input, label] pair"),
    ([[{"probe": "P", "choices": ["x", "y"]}, [{"k": 1}, {"k": 0}]]], "item 0: field input.scenario"),
    ([[{"scenario": "S", "probe": "P", "state": 3, "choices": ["x", "y"]}, [{"k": 1}, {"k": 0}]]],
     "item 0: field input.state"),
    ([[{"scenario": "S", "probe": "P", "choices": ["x"]}, [{"k": 1}]]], "item 0: field input.choices"),
    ([[{"scenario": "S", "probe": "P", "choices": ["x", "y"]}, [{"k": 1}]]], "item 0: field label"),
    ([[{"scenario": "S", "probe": "P", "choices": ["x", "y"]}, [{"k": 1}, {"k": "high"}]]], "item 0: field label[1]"),
    ([[{"scenario": "S", "probe": "P", "choices": ["x", "y"]}, [{"k": 1}, {"k": 0}]],
      [{"scenario": "S", "probe": "P", "choices": ["x", "y"]}, [{"k": 1}, {"j": 0}]]], "item 1: field label:"),
])
def test_loader_errors_name_file_item_field(tmp_path, data, where):
    path = write(tmp_path, data)
    with pytest.raises(DataError) as e:
        load_mta(path)
    assert str(path) in str(e.value) and where in str(e.value)


# ---------------------------------------------------------------- end to end
def test_smoke_tiny(tmp_path):
    preds = tmp_path / "preds.jsonl"
    cmd = [sys.executable, "algos/decisionflow.py", "--model", "tiny", "--limit", "3", "--max-step-tokens", "6",
           "--cot-tokens", "6", "--answer-tokens", "4", "--sc-samples", "2", "--runs-dir", str(tmp_path),
           "--predictions", str(preds), "--exp-name", "smoke_df"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = sorted(tmp_path.glob("smoke_df__1__*"))[-1]
    rows = [json.loads(line) for line in open(preds)]
    assert len(rows) == 4 * 3 * 2 and {"method", "id", "target", "chosen"} <= set(rows[0])
    assert Counter(r["target"] for r in rows) == Counter(high=12, low=12)
    summary = json.loads((run / "summary.json").read_text())
    for m in ("zero_shot", "cot", "self_consistency", "decisionflow"):
        assert {f"{m}/high_acc", f"{m}/low_acc", f"{m}/bias", f"{m}/s_per_item"} <= set(summary)
    for step in STEPS:  # a random model writes no JSON: every step falls back, and the rates say so
        assert summary[f"decisionflow/{step}/fallback"] == 1.0
    calls = (run / "calls.jsonl").read_text().splitlines()
    assert len(calls) == summary["decisionflow/calls_per_item"] * 3 + (2 + 2 + 4) * 3
    assert "DecisionFlow steps" in out.stdout


def test_malformed_data_stops_before_loading_a_model(tmp_path):
    bad = write(tmp_path, [[{"scenario": "S", "probe": "P", "choices": ["x", "y"]}, [{"k": 1}]]])
    out = subprocess.run([sys.executable, "algos/decisionflow.py", "--data", str(bad), "--runs-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and f"{bad}: item 0: field label" in out.stderr
    assert not list(tmp_path.glob("decisionflow__*"))


@pytest.mark.parametrize("flag, argv", [
    ("--methods", ["--methods", "zero_shot,debate"]), ("--keep-threshold", ["--keep-threshold", "1.5"]),
    ("--model", ["--model", "./no_such_model"]),  # not a URL and no such folder
    ("--sc-temperature", ["--sc-temperature", "0"]),  # self-consistency of k greedy samples: a joined rule
])
def test_bad_arguments_are_usage_errors(flag, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err.splitlines()[-1]


def test_a_bad_argument_stops_the_script_before_loading_a_model(tmp_path):
    unloadable = tmp_path / "unloadable_model"  # passes the model check; loading it would fail (no config.json)
    unloadable.mkdir()
    out = subprocess.run([sys.executable, "algos/decisionflow.py", "--model", str(unloadable), "--runs-dir",
                          str(tmp_path), "--keep-threshold", "1.5"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    # the unloadable model proves the order: parse_args ran before main
    assert out.returncode == 2 and "--keep-threshold" in out.stderr.splitlines()[-1], out.stderr[-1000:]
    assert not list(tmp_path.glob("decisionflow__*"))


def test_a_bad_reply_from_a_remote_model_stops_the_run_with_a_clear_error(tmp_path):
    class NotAChatCompletion(BaseHTTPRequestHandler):  # answers every request with HTTP 200 and no choices
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"error": "model overloaded"}).encode()
            self.send_response(200), self.send_header("Content-Length", str(len(body))), self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotAChatCompletion)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        with pytest.raises(SystemExit, match=r"model error in zero_shot, run stopped .*not a chat completion: "
                                             r"'.*model overloaded"):
            main(Args(model=url, methods="zero_shot", limit=1, runs_dir=str(tmp_path)))
    finally:
        server.shutdown(), server.server_close()
    summary = json.loads((next(tmp_path.glob("decisionflow__*")) / "summary.json").read_text())
    assert summary["error"].startswith("zero_shot: http://127.0.0.1") and summary["items"] == 1
