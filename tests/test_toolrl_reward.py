"""The ToolRL reward (algos/grpo_toolrl.py): the spec's worked examples, edge cases, ablations, and a random-text
property test that the reward never raises and stays in range."""
import json
import random

import pytest

from algos.grpo_toolrl import (SYSTEM_PROMPT, correctness_reward, format_reward, length_reward,
                               parse_tool_calls, toolrl_reward)


def format_calls(cs):
    """A <tool_call> body as the system prompt asks for it: one {"name", "parameters"} JSON object per line."""
    return "\n".join(json.dumps({"name": c["name"], "parameters": c["parameters"]}) for c in cs)


F = {"name": "f", "parameters": {"a": 1, "b": "x"}}
G = {"name": "g", "parameters": {}}
GT = f"<think>plan</think>\n<tool_call>\n{format_calls([F, G])}\n</tool_call>"  # S_max = 1 + 3 + 1 = 5
GT_RESPONSE = "<think>no tool fits</think>\n<response>sorry</response>"


def calls(*cs, extra=""):
    return f"<think>ok</think>\n<tool_call>\n{format_calls(cs)}\n</tool_call>{extra}"


@pytest.mark.parametrize("completion, fmt, cor", [
    (calls(F, G), 1.0, 3.0),                                                   # exact: 1 + 3
    (calls(G, F), 1.0, 3.0),                                                   # swapped order: still 4
    (calls({"name": "f", "parameters": {"a": "1", "b": "x"}}, G), 1.0, 1.8),   # "1" != 1: 6 * 4/5 - 3
    (calls(F), 1.0, 1.2),                                                      # missing g: 6 * 3.5/5 - 3
    (calls(F, G, {"name": "h", "parameters": {}}), 1.0, 2.6),                  # extra h(): names 2/3
    ("<think>a</think>\n<response>done</response>", 0.0, -3.0),                # response only
    (calls(F, G, extra="\n<response>r</response>"), 0.0, 3.0),                 # correct calls + extra response
])
def test_worked_examples(completion, fmt, cor):
    r = toolrl_reward(completion, GT)
    assert r["format"] == fmt
    assert r["correctness"] == pytest.approx(cor)
    assert r["total"] == pytest.approx(fmt + cor)


def test_optimal_matching_agrees_on_worked_examples_and_beats_greedy():
    for c in [calls(F, G), calls(F), calls(F, G, {"name": "h", "parameters": {}})]:
        assert correctness_reward(c, GT, matching="optimal") == pytest.approx(correctness_reward(c, GT))
    # two f calls in the ground truth; greedy gives g1 the first of two tied predictions, which g2 needed
    g1, g2 = {"name": "f", "parameters": {"a": 1}}, {"name": "f", "parameters": {"a": 1, "b": 2}}
    p1, p2 = {"name": "f", "parameters": {"a": 1, "b": 2}}, {"name": "f", "parameters": {"a": 1, "c": 5}}
    # pair scores: g1-p1 = g1-p2 = 1/2 + 1; g2-p1 = 1 + 2; g2-p2 = 1/3 + 1. S_max = 1 + 2 + 3 = 6, names 1.
    gt, pred = calls(g1, g2), calls(p1, p2)
    assert correctness_reward(pred, gt) == pytest.approx(6 * (1 + 1.5 + 4 / 3) / 6 - 3)
    assert correctness_reward(pred, gt, matching="optimal") == pytest.approx(6 * (1 + 1.5 + 3) / 6 - 3)


def test_no_call_expected():
    assert format_reward("<think>x</think>\n<response>hi</response>", GT_RESPONSE) == 1.0
    assert correctness_reward("<think>x</think>\n<response>hi</response>", GT_RESPONSE) == 0.0
    # a call where none is expected: format fails, correctness stays 0 (the code scores only the format)
    r = toolrl_reward(calls(F), GT_RESPONSE)
    assert (r["format"], r["correctness"]) == (0.0, 0.0)
    # ground truth with neither block: only <think>
    assert format_reward("<think>x</think>", "<think>y</think>") == 1.0
    assert format_reward("<think>x</think>\nmore", "<think>y</think>") == 0.0


def test_no_call_match_applies_the_papers_formula_to_an_empty_ground_truth():
    reply = "<think>x</think>\n<response>hi</response>"
    assert correctness_reward(reply, GT_RESPONSE, no_call="match") == 3.0  # G = P = []: equal lists
    assert correctness_reward(calls(F), GT_RESPONSE, no_call="match") == -3.0  # r_name 0, S_max 1
    assert correctness_reward("<tool_call>\n{oops\n</tool_call>", GT_RESPONSE, no_call="match") == -3.0  # unparseable
    assert toolrl_reward(calls(F), GT_RESPONSE, no_call="match")["total"] == -3.0  # format 0 too
    assert toolrl_reward(reply, GT_RESPONSE, no_call="match", equal_max=True)["total"] == 2.0  # range [-1, 1] + 1
    assert toolrl_reward(calls(F), GT, no_call="match") == toolrl_reward(calls(F), GT)  # call prompts: unchanged


def test_prompt_template_copied_verbatim_scores_min():
    # GRPO at 135M learnt to copy a JSON template with a real name (name credit); ours does not parse
    template = SYSTEM_PROMPT.split("<tool_call>\n")[1].split("\n</tool_call>")[0].format()
    assert correctness_reward(f"<think>ok</think>\n<tool_call>\n{template}\n</tool_call>", GT) == -3.0
    json_template = {"name": "f", "parameters": {"argument": "value"}}
    assert correctness_reward(calls(json_template), GT) == pytest.approx(6 * 0.5 / 5 - 3)  # names f vs f, g: 1/2


def test_string_vs_number_and_types():
    gt = calls({"name": "f", "parameters": {"n": 5, "s": "5", "b": True}})
    assert correctness_reward(calls({"name": "f", "parameters": {"n": 5, "s": "5", "b": True}}), gt) == 3.0
    one_wrong = correctness_reward(calls({"name": "f", "parameters": {"n": "5", "s": "5", "b": True}}), gt)
    assert one_wrong == pytest.approx(6 * (1 + 1 + 2) / 5 - 3)
    # Python == on parsed JSON, as in the released code: 5 == 5.0
    assert correctness_reward(calls({"name": "f", "parameters": {"n": 5.0, "s": "5", "b": True}}), gt) == \
        pytest.approx(3.0)


def test_broken_json_missing_and_duplicated_tags():
    assert correctness_reward('<think>x</think>\n<tool_call>\n{"name": "f", "parameters": {\n</tool_call>', GT) == -3
    assert correctness_reward("<think>x</think>\n<tool_call>\n" + json.dumps(F), GT) == -3  # no closing tag
    assert correctness_reward('<tool_call>\n{"name": "f"}\n</tool_call>', GT) == -3          # no "parameters"
    assert correctness_reward('<tool_call>\n{"name": "f", "parameters": [1]}\n</tool_call>', GT) == -3
    assert correctness_reward('<tool_call>\n[1, 2]\n</tool_call>', GT) == -3
    assert correctness_reward('<tool_call>\n\n</tool_call>', GT) == -3                        # empty block
    assert format_reward(calls(F, G).replace("<think>", ""), GT) == 0.0                       # missing <think>
    assert format_reward("<think>a</think>\n" + calls(F, G), GT) == 0.0                       # duplicated <think>
    assert format_reward(calls(F, G) + "\n<tool_call>\n{}\n</tool_call>", GT) == 0.0          # two blocks
    assert format_reward(calls(F, G).replace("\n<tool_call>", "\n\n<tool_call>"), GT) == 0.0  # two newlines
    assert format_reward("  " + calls(F, G) + "\n\n", GT) == 1.0                              # stripped first


def test_empty_parameters():
    gt = calls({"name": "g", "parameters": {}})
    assert correctness_reward(calls({"name": "g", "parameters": {}}), gt) == 3.0
    # extra keys against empty ground-truth keys: key Jaccard 0 -> names 1 + 0 of S_max 2
    assert correctness_reward(calls({"name": "g", "parameters": {"x": 1}}), gt) == pytest.approx(0.0)


def test_ablations():
    c = calls(F)  # 3.5 of 5
    assert correctness_reward(c, GT, 1.0, -1.0) == pytest.approx(2 * 0.7 - 1)               # equal max
    assert toolrl_reward(c, GT, equal_max=True)["correctness"] == pytest.approx(0.4)
    assert correctness_reward(c, GT, granularity="coarse") == -3.0
    assert correctness_reward(calls(F, G), GT, granularity="coarse") == 3.0
    # fine: names must match as a list exactly -> 0; f keys match exactly -> 1 + 2 values: 3 of 5
    assert correctness_reward(c, GT, granularity="fine") == pytest.approx(6 * 3 / 5 - 3)
    # intermediate: S_max = 1 + |G| = 3; names 0.5 + f equal 1 -> 1.5 of 3
    assert correctness_reward(c, GT, granularity="intermediate") == pytest.approx(0.0)
    two = toolrl_reward(c, GT, step=0, schedule="two_stage", two_stage_step=30)
    assert two["correctness"] == pytest.approx(1.2 / 3) and two["format"] == 1.0
    two = toolrl_reward(c, GT, step=30, schedule="two_stage", two_stage_step=30)
    assert two["correctness"] == pytest.approx(1.2) and two["format"] == 0.5
    d0 = toolrl_reward(c, GT, step=0, total_steps=10, schedule="dynamic")
    d1 = toolrl_reward(c, GT, step=10, total_steps=10, schedule="dynamic")
    assert d0["format"] == 2.0 and d1["format"] == 1.0
    assert d0["correctness"] == pytest.approx(-2 + 4 * 0.7) and d1["correctness"] == pytest.approx(-3 + 6 * 0.7)
    assert toolrl_reward("<think>bad", GT, step=0, total_steps=10, schedule="dynamic")["format"] == -2.0
    assert length_reward("<think>" + "w " * 256 + "</think>") == 0.5
    assert length_reward("no think") == 0.0
    assert toolrl_reward("<think>" + "w " * 600 + "</think>", GT, length="fixed")["length"] == 1.0


def test_parse_tool_calls():
    assert parse_tool_calls(calls(F, G)) == [F, G]
    assert parse_tool_calls("<think>x</think>") is None


def _random_text(rng):
    pieces = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<response>", "</response>", "\n", " ",
              json.dumps(F), json.dumps(G), '{"name": "f", "parameters": {"a": 1}}', "{", "}", '"', "[", "]",
              "null", "1e999", "NaN", '{"name": ["f"], "parameters": {}}', '{"name": "f", "parameters": 3}',
              "[" * 50, "\\u00e9", "é", "\x00", "abc", '"name"', '"parameters":']
    n = rng.randint(0, 30)
    return "".join(rng.choice(pieces) if rng.random() < 0.8 else chr(rng.randint(0, 0x2FFF)) for _ in range(n))


@pytest.mark.parametrize("options", [{}, {"matching": "optimal"}, {"granularity": "fine"},
                                     {"granularity": "intermediate"}, {"granularity": "coarse"}])
def test_property_never_raises_and_in_range(options):
    rng = random.Random(0)
    gts = [GT, GT_RESPONSE, "<think>x</think>", calls({"name": "f", "parameters": {}}),
           f"<think>a</think>\n<tool_call>\n{format_calls([F, G])}\n</tool_call>\n<response>r</response>"]
    for _ in range(2000):
        completion, gt = _random_text(rng), rng.choice(gts)
        f = format_reward(completion, gt)
        c = correctness_reward(completion, gt, **options)
        assert f in (0.0, 1.0)
        assert -3.0 - 1e-9 <= c <= 3.0 + 1e-9
        total = toolrl_reward(completion, gt, **options)["total"]
        assert -3.0 - 1e-9 <= total <= 4.0 + 1e-9
