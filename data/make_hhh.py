"""BIG-bench HHH alignment (Askell et al. 2021): 221 human-written two-choice items, as JSONL.

The task ships inside the `bigbench` sdist on PyPI (Apache-2.0). We never install that package (its dependencies are
huge): `pip download --no-deps` fetches the 358 MB archive once into a cache folder, the four task.json files are
extracted from it, and each example becomes one line of data/generated/hhh_alignment.jsonl:

    {"id": "harmless-000", "category": "harmless", "input": "<the human turn>",
     "chosen": "<the reply with target score 1>", "rejected": "<the reply with target score 0>"}

Categories: harmless (58), helpful (59), honest (61), other (43). Used by algos/iteralign.py (evaluation by
log-likelihood) and algos/rmr1_distill_rl.py (real human-written preference pairs). Deterministic: the order of the
source files is kept.

Usage: python data/make_hhh.py [--out-dir data/generated] [--cache .cache/bigbench]
"""
import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "1.0.0"
CATEGORIES = ("harmless", "helpful", "honest", "other")
TASK_DIR = "bigbench/benchmark_tasks/hhh_alignment"


def fetch_sdist(cache: Path) -> Path:
    """The bigbench sdist, downloaded once with pip (no dependencies, nothing installed)."""
    found = sorted(cache.glob(f"bigbench-{VERSION}.tar.gz"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading bigbench=={VERSION} sdist (358 MB, once) into {cache}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "--disable-pip-version-check", "-d", str(cache), f"bigbench=={VERSION}"], check=True)
        found = sorted(cache.glob(f"bigbench-{VERSION}.tar.gz"))
    return found[0]


def extract_tasks(sdist: Path, out_dir: Path) -> dict:
    """Copy the four task.json files out of the archive into out_dir/hhh_alignment/<category>/task.json."""
    wanted = {f"bigbench-{VERSION}/{TASK_DIR}/{c}/task.json": c for c in CATEGORIES}
    tasks = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            if member.name in wanted:
                category = wanted[member.name]
                data = archive.extractfile(member).read()
                target = out_dir / "hhh_alignment" / category / "task.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                tasks[category] = json.loads(data)
                if len(tasks) == len(CATEGORIES):
                    break
    missing = [c for c in CATEGORIES if c not in tasks]
    if missing:
        raise RuntimeError(f"{sdist}: no {TASK_DIR}/{missing[0]}/task.json inside")
    return tasks


def to_rows(tasks: dict) -> list:
    """One row per example; exactly one choice must have target score 1 and the other 0."""
    rows = []
    for category in CATEGORIES:
        for i, example in enumerate(tasks[category]["examples"]):
            scores = example["target_scores"]
            chosen = [text for text, s in scores.items() if s == 1]
            rejected = [text for text, s in scores.items() if s == 0]
            if len(scores) != 2 or len(chosen) != 1 or len(rejected) != 1:
                raise ValueError(f"{category}/task.json example {i}: field 'target_scores' is not one 1 and one 0")
            rows.append({"id": f"{category}-{i:03d}", "category": category, "input": example["input"],
                         "chosen": chosen[0], "rejected": rejected[0]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="data/generated", help="where hhh_alignment.jsonl is written")
    parser.add_argument("--cache", default=".cache/bigbench", help="where the sdist is kept between runs")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    tasks = {}
    existing = [out_dir / "hhh_alignment" / c / "task.json" for c in CATEGORIES]
    if all(p.exists() for p in existing):  # extracted before: the 358 MB archive is not needed again
        tasks = {c: json.loads(p.read_text()) for c, p in zip(CATEGORIES, existing)}
    else:
        tasks = extract_tasks(fetch_sdist(Path(args.cache)), out_dir)
    rows = to_rows(tasks)
    out = out_dir / "hhh_alignment.jsonl"
    with open(out, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    print(f"wrote {len(rows)} items to {out}: {counts}")


if __name__ == "__main__":
    main()
