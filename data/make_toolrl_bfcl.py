"""Build ToolRL-format training records and BFCL evaluation records from the data shipped in `bfcl-eval`.

Reads the JSON-lines files under bfcl_eval/data/ (found with importlib, nothing of bfcl_eval is imported):
- training (ToolRL format) from the "live" categories: live_simple, live_multiple, live_parallel,
  live_parallel_multiple (one or more calls) and live_irrelevance (no call: the reference turn answers in
  <response>). live_relevance is skipped: it has no possible answers, only "some call is expected".
  The reference turn: `<think>...</think>\\n<tool_call>\\n{"name": ..., "parameters": {...}}\\n...\\n</tool_call>` or
  `<think>...</think>\\n<response>...</response>`; each parameter takes the first acceptable value, and a parameter
  that BFCL marks optional ("" among its values) is left out. The think text is a fixed template (the paper's RL data
  has placeholders there too). No-call records are capped at `--max-no-call-frac` of the training set.
  A hashed 5% of the live items is the dev split.
- evaluation from the non-live categories simple_python, multiple, parallel, parallel_multiple, irrelevance, with
  the possible answers embedded.
Every output is in a fixed hashed order (sha1 of the id), so "the first n of a category" is a fixed random subset.
Malformed rows stop the script with file, line and field.

    python data/make_toolrl_bfcl.py --out-dir data/generated     # full outputs (run.sh), not committed
    python data/make_toolrl_bfcl.py --samples                     # the small committed samples in data/
"""
import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from algos.grpo_toolrl import build_messages, load_jsonl  # noqa: E402  (the prompt and the loader live there)

TRAIN_CATEGORIES = ["live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance"]
EVAL_CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"]
NO_CALL_THINK = "No tool fits this request."
NO_CALL_RESPONSE = "I cannot help with that using the available tools."


def bfcl_data_dir():
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None:
        sys.exit("bfcl_eval is not installed: pip install --no-deps bfcl-eval (run.sh does it)")
    return Path(spec.submodule_search_locations[0]) / "data"


def hashed(key):
    return hashlib.sha1(key.encode()).hexdigest()


def read_rows(path):
    """(line number, dict) per line; a line that is not a JSON object stops with file and line."""
    return list(enumerate(load_jsonl(path, []), 1))


def check_question(path, i, row):
    """Validate one BFCL question row; returns (dialogue messages, tools)."""
    where = f"{path}:{i}"
    for key in ("id", "question", "function"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    turns = row["question"]
    if not isinstance(turns, list) or not all(isinstance(t, list) for t in turns):
        raise ValueError(f"{where}: field 'question' must be a list of turns (lists of messages)")
    dialogue = [m for t in turns for m in t]
    if not dialogue or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in dialogue):
        raise ValueError(f"{where}: field 'question' needs messages with string 'role' and 'content'")
    tools = row["function"]
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                              and isinstance(t.get("parameters"), dict) for t in tools):
        raise ValueError(f"{where}: field 'function' needs tools with a string 'name' and a 'parameters' object")
    return [{"role": m["role"], "content": m["content"]} for m in dialogue], tools


def check_answer(path, i, row, tools):
    where = f"{path}:{i}"
    gt = row.get("ground_truth")
    if not isinstance(gt, list) or not all(isinstance(c, dict) and len(c) == 1 for c in gt):
        raise ValueError(f"{where}: field 'ground_truth' must be a list of one-key objects {{name: params}}")
    names = {t["name"] for t in tools}
    for call in gt:
        name, params = next(iter(call.items()))
        if name not in names:
            raise ValueError(f"{where}: field 'ground_truth' names unknown tool {name!r}")
        if not isinstance(params, dict) or not all(isinstance(v, list) for v in params.values()):
            raise ValueError(f"{where}: field 'ground_truth' parameters of {name!r} must map to lists of values")
    return gt


def load_category(data_dir, category):
    """Validated items of one category: dicts with id, category, dialogue, tools and possible_answer (or None)."""
    qpath, apath = data_dir / f"BFCL_v4_{category}.json", data_dir / "possible_answer" / f"BFCL_v4_{category}.json"
    questions = read_rows(qpath)
    answers = {}
    if apath.exists():
        for i, row in read_rows(apath):
            if "id" not in row:
                raise ValueError(f"{apath}:{i}: missing field 'id'")
            answers[row["id"]] = (i, row)
    items = []
    for i, row in questions:
        dialogue, tools = check_question(qpath, i, row)
        item = {"id": row["id"], "category": category, "tools": tools, "dialogue": dialogue, "possible_answer": None}
        if "irrelevance" not in category:
            if row["id"] not in answers:
                raise ValueError(f"{apath}: no possible answer for id {row['id']!r} ({qpath}:{i})")
            j, ans = answers[row["id"]]
            item["possible_answer"] = check_answer(apath, j, ans, tools)
        items.append(item)
    return items


def pick(value):
    """One concrete value from a possible-answer value: nested dicts map keys to lists of acceptable values."""
    if isinstance(value, dict):
        return {k: pick(acc[0]) for k, acc in value.items() if isinstance(acc, list) and acc and "" not in acc}
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        return [pick(x) for x in value]
    return value


def reference_turn(possible_answer, tools):
    """The ToolRL-format reference assistant turn for one item: first acceptable value of each parameter; optional
    ones ("" acceptable) are left out unless the tool schema marks them required."""
    if not possible_answer:
        return f"<think>{NO_CALL_THINK}</think>\n<response>{NO_CALL_RESPONSE}</response>"
    required = {t["name"]: set(t["parameters"].get("required", [])) for t in tools}
    calls = []
    for name, params in (next(iter(c.items())) for c in possible_answer):
        chosen = {k: [a for a in acc if a != ""] if k in required[name] else acc for k, acc in params.items()}
        calls.append({"name": name, "parameters": {k: pick(acc[0]) for k, acc in chosen.items()
                                                   if acc and "" not in acc}})
    names = ", ".join(dict.fromkeys(c["name"] for c in calls))
    think = f"The user's request needs {names}."
    lines = "\n".join(json.dumps(c, ensure_ascii=False) for c in calls)
    return f"<think>{think}</think>\n<tool_call>\n{lines}\n</tool_call>"


def prompt_chars(item):
    return len(json.dumps(item["tools"], ensure_ascii=False)) + sum(len(m["content"]) for m in item["dialogue"])


def build(data_dir, max_no_call_frac=0.25, dev_frac=0.05):
    """(train, dev, eval) record lists."""
    live = [it for c in TRAIN_CATEGORIES for it in load_category(data_dir, c)]
    live.sort(key=lambda it: hashed(it["id"]))
    calls = [it for it in live if it["possible_answer"]]
    no_calls = [it for it in live if not it["possible_answer"]]
    cap = int(max_no_call_frac / (1 - max_no_call_frac) * len(calls))
    records = []
    for it in calls + no_calls[:cap]:
        records.append({"id": it["id"], "category": it["category"], "tools": it["tools"],
                        "dialogue": it["dialogue"],
                        "ground_truth": reference_turn(it["possible_answer"], it["tools"])})
    records.sort(key=lambda r: hashed(r["id"]))
    is_dev = lambda r: int(hashed("dev:" + r["id"]), 16) % 1000 < dev_frac * 1000
    train, dev = [r for r in records if not is_dev(r)], [r for r in records if is_dev(r)]
    evals = [it for c in EVAL_CATEGORIES for it in load_category(data_dir, c)]
    for it in evals:
        it["possible_answer"] = it["possible_answer"] or []
    evals.sort(key=lambda it: hashed(it["id"]))
    return train, dev, evals


def sft_records(records, max_chars):
    """Chat records for algos/sft.py: our ToolRL system prompt + dialogue + the reference turn (short prompts)."""
    return [{"id": r["id"], "messages": build_messages(r["tools"], r["dialogue"])
             + [{"role": "assistant", "content": r["ground_truth"]}]}
            for r in records if prompt_chars(r) <= max_chars]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):5d} rows to {path}")


def sample(rows, per_category, max_chars):
    """The first per_category short items of each category (rows are already in hashed order)."""
    out, seen = [], {}
    for r in rows:
        if prompt_chars(r) <= max_chars and seen.get(r["category"], 0) < per_category:
            seen[r["category"]] = seen.get(r["category"], 0) + 1
            out.append(r)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bfcl-dir", default=None, help="BFCL data folder (default: the installed bfcl_eval/data)")
    p.add_argument("--out-dir", default="data/generated", help="where the full outputs go")
    p.add_argument("--max-no-call-frac", type=float, default=0.25, help="cap on no-call records in training")
    p.add_argument("--sft-max-chars", type=int, default=1000, help="SFT records: tools + dialogue at most this long")
    p.add_argument("--samples", action="store_true", help="write the small committed samples into data/ instead")
    a = p.parse_args(argv)
    train, dev, evals = build(Path(a.bfcl_dir) if a.bfcl_dir else bfcl_data_dir(), a.max_no_call_frac)
    if a.samples:
        out = ROOT / "data"
        write_jsonl(out / "toolrl_train_sample.jsonl", sample(train, 8, 1200))
        write_jsonl(out / "bfcl_eval_sample.jsonl", sample(evals, 6, 1200))
        write_jsonl(out / "toolrl_sft_sample.jsonl", sft_records(sample(train, 4, 1200), 1200))
        return
    out = Path(a.out_dir)
    write_jsonl(out / "toolrl_train.jsonl", train)
    write_jsonl(out / "toolrl_dev.jsonl", dev)
    write_jsonl(out / "bfcl_eval.jsonl", evals)
    write_jsonl(out / "toolrl_sft_train.jsonl", sft_records(train, a.sft_max_chars))
    write_jsonl(out / "toolrl_sft_dev.jsonl", sft_records(dev, a.sft_max_chars))


if __name__ == "__main__":
    main()
