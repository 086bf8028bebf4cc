"""Property-based tests (hypothesis) of every parser and reward: on arbitrary text and on near-misses of the expected
tags and JSON, they never raise, always return a finite value, and stay in their documented range.

Malformed model output is a normal event in RL, so a parser that raises on it would crash a run mid-step. Each
property runs on N_EXAMPLES generated strings: 2,000 by default (about 7 s a property on a 2-core CPU, where 10,000
took 35 s each, a fifth of the whole suite); `HYPOTHESIS_EXAMPLES=10000 pytest tests/test_properties.py` searches
longer: worth running after a parser or reward changes.
"""
import math
import os
import tempfile

from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from algos import decisionflow, iteralign, otc_ppo, rmr1_distill_rl, sft
from algos import grpo_toolrl as toolrl

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))  # its caches go to a temporary folder, not the repo
N_EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "2000"))
PROPERTY = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,  # no .hypothesis/
                    suppress_health_check=list(HealthCheck))

# Fragments a model writes when it almost gets the format right: tags (whole, truncated, misspelled, with spaces),
# JSON pieces, verdicts, newlines. A completion is arbitrary text, a random concatenation of fragments, or a valid
# completion of one of the project's formats with a few edits (a fragment inserted, characters deleted, cut short).
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<response>", "</response>", "<answer>", "</answer>",
        "<search>", "</search>", "<information>", "</information>", "<tool_call", "tool_call>", "</tool_call",
        "< think>", "<THINK>", "<answer>[[A]]</answer>", "<answer>[[B]]</answer>", "[[A]]", "[[B]]", "<answer>[[",
        "(tool: Code)", "Code:", "Search:", "(general reasoning)", "### Final Response"]
JSON_BITS = ['{"name": "f", "parameters": {"x": 1}}', '{"name": "f", "arguments": {}}', '{"name": 3}',
             '{"name": "f", "parameters": []}', '{"name": "f"', "[" * 50, "{" * 30, '"parameters": {', "null",
             '{"name": "get_weather", "parameters": {"city": "Paris", "unit": ["c"]}}', "1e999", "NaN", "}",
             "[" * 5000, '{"a": ' * 3000, '{"weights": [', '{"scores": [[', "0.5", ", ", "]}", "Infinity", "-0.2",
             '{"choice": "A", "explanation": "it saves more"}', "Positive", "negative", "The assistant should "]
GROUND_TRUTHS = [
    '<think>needs f</think>\n<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n</tool_call>',
    '<think>two calls</think>\n<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n'
    '{"name": "g", "parameters": {"y": "a", "z": [1, 2]}}\n</tool_call>',
    "<think>no tool fits</think>\n<response>I cannot help with that.</response>",
    '<think>call then reply</think>\n<tool_call>\n{"name": "f", "parameters": {}}\n</tool_call>\n'
    "<response>done</response>",
]
VALID = GROUND_TRUTHS + [
    "<think>I know this.</think>\n<answer> Paris </answer>",
    "<think>look it up</think>\n<search> capital of France </search>",
    "<type>Chat</type>\n<rubric>helpful 1.0<justify>it asks for help</justify></rubric>\n<eval>A helps</eval>\n"
    "<answer>[[A]]</answer>",
    '{"weights": [0.9, 0.1, 0.5]}',
    '{"scores": [[0.2, 1.0], [0.7, 0.0]]}',
    "Negative. The answer explains how to do harm.",
    "1. The assistant should refuse to help with weapons.\n2. The assistant should point to help lines.",
    "Answer: B",
]
fragment = st.one_of(st.sampled_from(TAGS), st.sampled_from(JSON_BITS), st.sampled_from(["\n", " ", "\n\n"]),
                     st.text(max_size=12))


def mutate(text, edits):
    """Apply (kind, position, fragment) edits to a valid completion: insert a fragment, delete a few characters,
    or cut the text there (a truncated generation)."""
    for kind, position, piece in edits:
        at = position % (len(text) + 1)
        if kind == "insert":
            text = text[:at] + piece + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + 1 + len(piece) % 4:]
        else:
            text = text[:at]
    return text


edit = st.tuples(st.sampled_from(["insert", "insert", "delete", "cut"]), st.integers(0, 10**6), fragment)
near_miss = st.one_of(st.lists(fragment, max_size=14).map("".join),
                      st.builds(mutate, st.sampled_from(VALID), st.lists(edit, max_size=3)))
completion = st.one_of(near_miss, st.text(max_size=200))


def finite_in(value, low, high):
    return isinstance(value, float) and math.isfinite(value) and low - 1e-9 <= value <= high + 1e-9


@PROPERTY
@given(completion)
def test_parse_tool_calls_never_raises(text):
    calls = toolrl.parse_tool_calls(text)
    assert calls is None or all(isinstance(c["name"], str) and isinstance(c["parameters"], dict) for c in calls)


@PROPERTY
@given(completion)
def test_parse_bfcl_calls_never_raises(text):
    calls = toolrl.parse_bfcl_calls(text)
    assert calls is None or all(isinstance(c["name"], str) and isinstance(c["arguments"], dict) for c in calls)


@PROPERTY
@given(completion, st.sampled_from(GROUND_TRUTHS), st.sampled_from(["greedy", "optimal"]),
       st.sampled_from(["finest", "fine", "intermediate", "coarse"]))
def test_toolrl_reward_components_stay_in_range(text, truth, matching, granularity):
    assert finite_in(toolrl.format_reward(text, truth), 0.0, 1.0)
    assert finite_in(toolrl.correctness_reward(text, truth, matching=matching, granularity=granularity), -3.0, 3.0)
    assert finite_in(toolrl.length_reward(text), 0.0, 1.0)
    parts = toolrl.toolrl_reward(text, truth, step=3, total_steps=10, matching=matching, granularity=granularity,
                                 length="fixed")
    assert all(math.isfinite(v) for v in parts.values())
    assert math.isclose(parts["total"], parts["format"] + parts["correctness"] + parts["length"])


@PROPERTY
@given(completion, st.sampled_from(["simple_python", "parallel", "irrelevance"]))
def test_bfcl_check_never_raises(text, category):
    tools = [{"name": "f", "parameters": {"type": "dict", "properties": {"x": {"type": "integer"}},
                                          "required": ["x"]}}]
    answer = [] if category == "irrelevance" else [{"f": {"x": [1]}}] * (2 if category == "parallel" else 1)
    ok, error = toolrl.bfcl_check(toolrl.parse_bfcl_calls(text), answer, tools, category)
    assert isinstance(ok, bool) and (ok or isinstance(error, str))


@PROPERTY
@given(completion)
def test_sft_tool_decision_is_one_of_two_labels(text):
    assert sft.tool_decision(text) in ("tool", "direct")


def test_the_generator_reaches_parseable_and_rewarded_completions():
    """The strategy must reach the interesting region, not only garbage: hypothesis finds generated completions that
    parse as a call and that earn the format reward."""
    search = settings(max_examples=20000, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    call = find(near_miss, lambda t: bool(toolrl.parse_tool_calls(t)), settings=search)
    assert toolrl.parse_tool_calls(call)[0]["name"] in ("f", "get_weather")
    formatted = find(near_miss, lambda t: toolrl.format_reward(t, GROUND_TRUTHS[2]) == 1.0, settings=search)
    assert formatted.strip().startswith("<think>") and formatted.strip().endswith("</response>")


@PROPERTY
@given(completion, st.sampled_from(["A", "B"]))
def test_rmr1_verdict_reward_and_parsers(text, label):
    assert rmr1_distill_rl.verdict_reward(text, label) in (-1.0, 1.0)
    assert rmr1_distill_rl.parse_verdict(text) in (None, "A", "B")
    assert isinstance(rmr1_distill_rl.well_formed(text), bool)
    assert rmr1_distill_rl.task_type(text) in (None, "Reasoning", "Chat")


@PROPERTY
@given(completion, st.integers(0, 8), st.one_of(st.none(), st.integers(0, 8)), st.integers(1, 5))
def test_otc_parsers_and_rewards(text, m, n, c):
    kind, payload = otc_ppo.parse_action(text)
    assert kind in ("search", "answer", "invalid") and isinstance(payload, str)
    assert otc_ppo.em_reward(payload if kind == "answer" else None, ["Paris", "the Paris"]) in (0.0, 1.0)
    assert finite_in(otc_ppo.otc_ppo_tool_reward(m, c), 0.0, 1.0)
    assert finite_in(otc_ppo.otc_grpo_tool_reward(m, n, c), 0.0, 1.0)


@PROPERTY
@given(completion)
def test_iteralign_parsers(text):
    assert iteralign.parse_verdict(text) in (None, "positive", "negative")
    assert iteralign.rule_verdict(text) in ("positive", "negative")
    assert all(line.lower().startswith("the assistant") for line in iteralign.parse_constitutions(text))


@PROPERTY
@given(completion)
def test_decisionflow_json_schema_and_answer(text):
    """A reply that passes the weights/scores schemas holds only finite numbers in [0, 1], so the utility in code is
    finite and the decision is made; anything else is a reason string (retry, then fallback)."""
    obj = decisionflow.extract_json(text)
    assert obj is None or isinstance(obj, dict)
    schemas = {"weights": decisionflow._obj(weights=decisionflow._arr(decisionflow.UNIT, 3)),
               "scores": decisionflow._obj(scores=decisionflow._arr(decisionflow._arr(decisionflow.UNIT, 2), 2))}
    for key, schema in schemas.items():
        error = decisionflow.validate(obj, schema) if obj is not None else "no JSON"
        assert error is None or isinstance(error, str)
        if error is None:
            values = obj[key] if key == "weights" else [v for row in obj[key] for v in row]
            assert all(finite_in(float(v), 0.0, 1.0) for v in values)
    assert decisionflow.parse_answer(text, 2) in (None, 0, 1)
