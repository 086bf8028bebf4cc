"""SMART-ER sample data: deterministic, in sync with its generator, and true to the format other code parses."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_smart_er", ROOT / "data" / "make_smart_er.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

FILES = {"train": ROOT / "data" / "smart_er_train.jsonl", "test": ROOT / "data" / "smart_er_test.jsonl"}


def _load(split):
    return [json.loads(line) for line in FILES[split].read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def rows():
    return {split: _load(split) for split in FILES}


def test_main_is_deterministic_and_matches_committed_files(tmp_path):
    for d in ("a", "b"):
        gen.main(["--out-dir", str(tmp_path / d), "--n-train", "600", "--n-test", "120", "--seed", "0"])
    for split, committed in FILES.items():
        name = committed.name
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() == committed.read_bytes(), f"{name} drifted from the script"


def test_other_seed_differs_and_small_sizes_work():
    train0, _ = gen.generate(40, 12, seed=0)
    train1, test1 = gen.generate(40, 12, seed=1)
    assert [r["question"] for r in train0] != [r["question"] for r in train1]
    assert (len(train1), len(test1)) == (40, 12)


def test_counts_are_balanced(rows):
    for split, n in [("train", 600), ("test", 120)]:
        counts = {}
        for r in rows[split]:
            counts[(r["domain"], r["needs_tool"])] = counts.get((r["domain"], r["needs_tool"]), 0) + 1
        assert counts == {("math", False): n // 4, ("math", True): n // 4,
                          ("facts", False): n // 4, ("facts", True): n // 4}


def test_every_row_validates_and_messages_rebuild(rows):
    for split, rs in rows.items():
        ids = [r["id"] for r in rs]
        assert len(set(ids)) == len(ids)
        for i, r in enumerate(rs, 1):
            gen.validate_row(r, FILES[split], i)
            assert r["messages"] == gen.build_messages(r, seed=0)
            assert r["messages"][0] == {"role": "system", "content": gen.SYSTEM_PROMPT}
            assert r["tool"] == ({"math": "Code", "facts": "Search"}[r["domain"]] if r["needs_tool"] else None)


def test_format_markers(rows):
    for r in rows["train"] + rows["test"]:
        m = r["messages"]
        step = m[2]["content"]
        assert step.startswith("- Step 1: ")
        if r["needs_tool"]:
            assert [x["role"] for x in m] == ["system", "user", "assistant", "tool", "assistant"]
            assert f". (tool: {r['tool']}) " in step.split("\n")[0]
            assert re.fullmatch(rf"{r['tool']}: \S.*", step.split("\n")[-1])
            assert m[3]["content"].startswith("- Output: ")
            assert m[4]["content"].startswith("### Final Response\n")
            assert r["answer"] in m[4]["content"]
        else:
            assert [x["role"] for x in m] == ["system", "user", "assistant"]
            assert ". (general reasoning) " in step.split("\n")[0]
            assert "(tool:" not in step
            head, final = step.split("\n### Final Response\n")
            assert len(head.split("\n")) == 2 and r["answer"] in final


def test_code_outputs_and_math_boundary(rows):
    n_hard = 0
    for r in rows["train"] + rows["test"]:
        if r["domain"] != "math":
            continue
        expr = gen.math_expression(r["question"])
        nums = re.findall(r"\d+", expr)
        one_digit = len(nums) == 2 and all(len(n) == 1 for n in nums)
        assert r["needs_tool"] is (not one_digit), expr
        assert r["answer"] == str(eval(expr))
        if r["needs_tool"]:
            n_hard += 1
            assert r["messages"][2]["content"].split("\n")[-1] == f"Code: {expr}"
            assert r["messages"][3]["content"] == f"- Output: {eval(expr)}"
            assert max(len(n) for n in nums) >= 2
    assert n_hard == 180
    assert gen.eval_arith("47 * 89") == "4183" and gen.eval_arith("1234 - 567") == "667"
    assert gen.math_needs_tool("7 * 6") is False and gen.math_needs_tool("91 * 7") is True


def test_search_outputs_come_from_corpus(rows):
    for r in rows["train"] + rows["test"]:
        if r["domain"] == "facts" and r["needs_tool"]:
            query = r["messages"][2]["content"].split("\n")[-1][len("Search: "):]
            snippet = gen.SEARCH_CORPUS[query]
            assert r["messages"][3]["content"] == "- Output: " + snippet
            assert r["answer"] in snippet
    assert gen.SEARCH_CORPUS["atomic number of hafnium"].endswith("atomic number 72.")


def test_train_test_disjoint(rows):
    tr, te = rows["train"], rows["test"]
    assert not {r["question"] for r in tr} & {r["question"] for r in te}
    facts = lambda rs: {gen.FACT_BY_QUESTION[r["question"]]["key"] for r in rs if r["domain"] == "facts"}
    assert not facts(tr) & facts(te)
    # same operator on the same operands (in any order) never appears in both splits: 3 + 5 in train bars 5 + 3
    key = lambda e: (e.split()[1],) + tuple(sorted(int(n) for n in re.findall(r"\d+", e)))
    math_keys = lambda rs: {key(gen.math_expression(r["question"])) for r in rs if r["domain"] == "math"}
    assert len(math_keys(te)) == 60
    assert not math_keys(tr) & math_keys(te)


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("answer"), "answer"),
    (lambda r: r.update(needs_tool="yes"), "needs_tool"),
    (lambda r: r["messages"][2].update(role="robot"), "messages[2].role"),
    (lambda r: r.update(tool="Calculator"), "tool"),
    (lambda r: r.update(needs_tool=False, tool=None), "messages"),
    (lambda r: r["messages"][2].update(content=r["messages"][2]["content"].rsplit("\n", 1)[0]), "messages[3]"),
    (lambda r: r["messages"][3].update(content="- Output: 1"), "messages[3].content"),
])
def test_validate_row_names_file_line_and_field(rows, mutate, field):
    row = json.loads(json.dumps(next(r for r in rows["train"] if r["domain"] == "math" and r["needs_tool"])))
    mutate(row)
    with pytest.raises(ValueError, match=re.escape(f"x.jsonl:7: field '{field}'")):
        gen.validate_row(row, "x.jsonl", 7)
