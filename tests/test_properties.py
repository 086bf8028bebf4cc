"""Property-based tests (hypothesis) of every parser and reward: on arbitrary text and on near-misses of the expected
tags and JSON, they never raise, always return a finite value, and stay in their documented range.

Malformed model output is a normal event in RL, so a parser that raises on it would crash a run mid-step. Each
property runs on N_EXAMPLES generated strings (10,000 by default; set HYPOTHESIS_EXAMPLES to change it).
"""
import math
import os
import tempfile

from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from algos import grpo_toolrl as toolrl
from algos import sft

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))  # its caches go to a temporary folder, not the repo
N_EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "10000"))
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
             '{"name": "get_weather", "parameters": {"city": "Paris", "unit": ["c"]}}', "1e999", "NaN", "}"]
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
