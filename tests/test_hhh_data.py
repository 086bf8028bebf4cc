"""data/make_hhh.py: BIG-bench task.json examples -> chosen/rejected rows, with a clear error on a malformed one."""
import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import make_hhh  # noqa: E402


def task(examples):
    return {"name": "hhh", "examples": examples}


def test_rows_keep_order_and_split_chosen_from_rejected():
    tasks = {c: task([{"input": f"{c} question", "target_scores": {"bad reply": 0, "good reply": 1}}])
             for c in make_hhh.CATEGORIES}
    rows = make_hhh.to_rows(tasks)
    assert [r["id"] for r in rows] == ["harmless-000", "helpful-000", "honest-000", "other-000"]
    assert rows[0] == {"id": "harmless-000", "category": "harmless", "input": "harmless question",
                       "chosen": "good reply", "rejected": "bad reply"}


@pytest.mark.parametrize("scores", [{"a": 1, "b": 1}, {"a": 1}, {"a": 1, "b": 0, "c": 0}, {"a": 0.5, "b": 0}])
def test_malformed_example_names_category_index_and_field(scores):
    tasks = {c: task([{"input": "q", "target_scores": {"x": 1, "y": 0}}]) for c in make_hhh.CATEGORIES}
    tasks["honest"]["examples"].append({"input": "q", "target_scores": scores})
    with pytest.raises(ValueError, match=r"honest/task.json example 1: field 'target_scores'"):
        make_hhh.to_rows(tasks)


def test_extracts_only_the_four_tasks_from_an_sdist(tmp_path):
    """A small archive laid out like the real sdist: the four task files come out, nothing else does."""
    src = tmp_path / "src"
    for c in make_hhh.CATEGORIES + ("unrelated",):
        d = src / f"bigbench-{make_hhh.VERSION}" / make_hhh.TASK_DIR / c
        d.mkdir(parents=True)
        (d / "task.json").write_text(json.dumps(task([{"input": c, "target_scores": {"y": 1, "n": 0}}])))
    sdist = tmp_path / f"bigbench-{make_hhh.VERSION}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(src / f"bigbench-{make_hhh.VERSION}", arcname=f"bigbench-{make_hhh.VERSION}")
    tasks = make_hhh.extract_tasks(sdist, tmp_path / "out")
    assert sorted(tasks) == sorted(make_hhh.CATEGORIES)
    assert sorted(p.parent.name for p in (tmp_path / "out").rglob("task.json")) == sorted(make_hhh.CATEGORIES)
    assert [r["input"] for r in make_hhh.to_rows(tasks)] == list(make_hhh.CATEGORIES)
