"""Time per GRPO generation batch (sampling and training apart) and peak memory, one configuration, several code paths.

The configuration of README's ToolRL run (model, training prompts, prompts_per_step x group_size samples, completion
and prompt length limits, minibatches, learning rate, loss) goes through:
- `before`: algos/grpo_toolrl.py as of commit `before_commit` (e365580: every sequence on its own, full-vocabulary
  logits at prefill, micro-batches of 8 rows), extracted with `git archive` into a temporary folder;
- `now`: algos/grpo_toolrl.py as it is (a prompt runs once for its group, token-sized micro-batches);
- `now_unshared`: the same with `--shared-prefix false` (what sharing alone buys);
- `now_ckpt`: the same with activation checkpointing;
- `now_bf16`: `now` with `--precision bf16` (bf16 autocast sampling and log-prob passes, old_logp recomputed);
- `trl`: TRL's GRPOTrainer, when `trl` is importable (optional: `pip install --no-deps trl`), with the same model,
  prompts, reward (the ToolRL reward), G, lengths, minibatches and loss: one generation batch of prompts_per_step x
  group_size samples per step (`trl_config`; before 2026-11-29 TRL sampled trl_micro_batch x num_minibatches at once).
Each path runs in its own process, so its peak resident memory (ru_maxrss from wait4) is its own; model loading is in
it. A generation batch is one GRPO step: sampling of prompts_per_step x group_size completions, then
num_minibatches optimizer steps. Timings on a shared machine are noisy: run the paths back to back and read ratios.

Usage:
    python algos/bench_grpo.py --model runs/toolrl_sft__1__<t>/checkpoint          # README's table, ~30 min on CPU
    python algos/bench_grpo.py --model tiny --steps 1 --paths now,now_unshared      # smoke test
Expected (2-core CPU, SFT checkpoint, 4 x 4 samples, 80 new tokens): the same samples on both paths at a fixed seed,
peak RSS 9.6 GB before and 5.5 GB now (measured); step times: README.md (on a busy machine they did not compare).
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from algos.model import CACHE, RunLogger, arg, model_error, parse_args  # noqa: E402


PATHS = ("before", "now", "now_unshared", "now_ckpt", "now_bf16", "trl")


def paths_error(paths):  # check= of --paths: one or more of PATHS, comma-separated
    names = [p.strip() for p in paths.split(",") if p.strip()]
    if (bad := [p for p in names if p not in PATHS]) or not names:
        return f"{f'unknown {bad}' if bad else 'no path'}; choose a comma-separated subset of {','.join(PATHS)}"


@dataclass
class Args:
    exp_name: str = arg("bench_grpo", "run name; the run folder is <runs_dir>/<exp_name>__<seed>__<time>")
    seed: int = arg(1, "seed of every path", low=0, high=2 ** 32 - 1)
    model: str = arg("smollm2-135m", "model of every path (README: the SFT warm start's checkpoint)", check=model_error)
    train_file: str = arg("data/generated/toolrl_train.jsonl", "ToolRL training prompts (data/make_toolrl_bfcl.py)",
                          check=lambda p: None if Path(p).is_file() else f"no such file: {p}")
    paths: str = arg("before,now,now_unshared,now_bf16,trl", "comma-separated subset of: " + " | ".join(PATHS),
                     check=paths_error)
    steps: int = arg(3, "generation batches (GRPO steps) per path; the first includes warm-up", low=1)
    prompts_per_step: int = arg(4, "prompts per generation batch", low=1)
    group_size: int = arg(4, "samples per prompt G", low=2)
    max_new_tokens: int = arg(80, "completion length limit", low=1)
    max_prompt_tokens: int = arg(320, "training prompts longer than this are dropped", low=1)
    num_minibatches: int = arg(2, "optimizer steps per generation batch", low=1)
    lr: float = arg(1e-5, "learning rate", low=0)
    before_commit: str = arg("e365580", "commit of the `before` path")
    trl_micro_batch: int = arg(2, "TRL per_device_train_batch_size (8 ran out of 24 GB on the README's CPU)", low=1)
    trl_checkpointing: bool = arg(False, "TRL gradient_checkpointing (its default is on)")
    trl_bf16: bool = arg(False, "TRL bf16=True (mixed precision, as now_bf16; on a CPU only with bf16 instructions)")
    runs_dir: str = arg("runs", "folder that receives the run folder (and the paths' own runs)")

    def __post_init__(self):
        paths = [p.strip() for p in self.paths.split(",")]
        if self.num_minibatches > self.prompts_per_step:  # grpo_toolrl.py's minibatches hold whole groups
            raise ValueError(f"--num-minibatches {self.num_minibatches} > --prompts-per-step {self.prompts_per_step}: "
                             "a minibatch holds whole prompt groups")
        if "trl" in paths and self.prompts_per_step * self.group_size % (self.num_minibatches * self.trl_micro_batch):
            raise ValueError("--prompts-per-step x --group-size must be a multiple of --num-minibatches x "
                             "--trl-micro-batch (TRL's minibatches are whole micro-batches)")
        if "before" in paths and subprocess.run(["git", "rev-parse", "--verify", "--quiet", self.before_commit +
                                                 "^{commit}"], cwd=ROOT, capture_output=True).returncode:
            raise ValueError(f"--before-commit {self.before_commit}: not a commit of this repository (a shallow "
                             "clone lacks it: git fetch --unshallow)")


# ---------------------------------------------------------------- one path, one process
def grpo_command(args, script, exp_name, runs_dir, empty_eval, extra=()):
    """grpo_toolrl.py's command line for the shared configuration; no BFCL evaluation (an empty eval file)."""
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # `before` runs elsewhere
    cmd = [sys.executable, str(script), "--model", model, "--train-file", str(Path(args.train_file).resolve()),
           "--eval-file", str(empty_eval), "--total-steps", str(args.steps), "--prompts-per-step",
           str(args.prompts_per_step), "--group-size", str(args.group_size), "--max-new-tokens",
           str(args.max_new_tokens), "--max-prompt-tokens", str(args.max_prompt_tokens), "--num-minibatches",
           str(args.num_minibatches), "--lr", str(args.lr), "--seed", str(args.seed), "--save-model", "false",
           "--exp-name", exp_name]
    return cmd + ([] if "before" in exp_name else ["--heldout-file", "", "--runs-dir", str(runs_dir)]) + list(extra)


def run_measured(cmd, cwd, log_path):
    """Run a command to completion; (exit code, wall seconds, peak RSS in GB of that process and its children)."""
    env = {**os.environ, "MODEL_CACHE": str(CACHE),  # cwd's code first; a PYTHONPATH given (trl elsewhere) after it
           "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))}
    env.setdefault("TRITON_INTERPRET", "0" if _has_cuda() else "1")
    start = time.time()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - start, usage.ru_maxrss / 2 ** 20  # KB -> GB (Linux)


def _has_cuda():
    import torch
    return torch.cuda.is_available()


def step_times(metrics_path):
    """[(sampling s, training s)] per GRPO step from a grpo_toolrl metrics.jsonl. A path that crashed or was killed
    mid-write leaves a last line cut short: it is skipped, so the other paths' rows still make the table."""
    rows = []
    for line in open(metrics_path):
        try:
            rows.append(json.loads(line))
        except ValueError:
            print(f"{metrics_path}: skipping a line that is not JSON (a path killed mid-write?): {line[:80]!r}")
    return [(r["time/generate_s"], r["time/train_s"]) for r in rows]


def summarize(name, code, wall, peak_gb, times):
    """One table row: per generation batch, the mean over the steps after the first (warm-up) when there are more."""
    steady = times[1:] if len(times) > 1 else times
    gen, train = (float(np.mean([t[i] for t in steady])) if steady else float("nan") for i in (0, 1))
    return {"path": name, "exit_code": code, "wall_s": round(wall, 1), "peak_rss_gb": round(peak_gb, 2),
            "steps": len(times), "first_step_s": round(sum(times[0]), 1) if times else None,
            "sample_s": round(gen, 1), "train_s": round(train, 1), "step_s": round(gen + train, 1)}


# ---------------------------------------------------------------- TRL's GRPOTrainer (optional)
def trl_config(args, out_dir):
    """TRL samples per_device_train_batch_size x steps_per_generation completions at once: with steps_per_generation =
    accumulation x num_minibatches that is one generation batch (prompts_per_step x group_size), then num_minibatches
    optimizer steps of `accumulation` micro-batches each, as in the other paths."""
    from trl import GRPOConfig
    accumulation = args.prompts_per_step * args.group_size // args.num_minibatches // args.trl_micro_batch
    return GRPOConfig(
        output_dir=str(out_dir / "trl"), per_device_train_batch_size=args.trl_micro_batch,
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation * args.num_minibatches,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, learning_rate=args.lr, beta=0.0,
        temperature=1.0, loss_type="grpo", max_steps=args.steps * args.num_minibatches, logging_steps=1,
        save_strategy="no", report_to=[], seed=args.seed, gradient_checkpointing=args.trl_checkpointing,
        use_cpu=not _has_cuda(), bf16=args.trl_bf16, fp16=False)


def trl_worker(args, out_dir):
    """Run TRL's GRPOTrainer on the same configuration in this process; write per-step times to out_dir."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer
    from transformers import TrainerCallback

    from algos.grpo_toolrl import build_messages, fits, load_jsonl, toolrl_reward
    from algos.model import load_model
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    rows = [r for r in load_jsonl(args.train_file, ["id", "tools", "dialogue", "ground_truth"])
            if fits(tokenizer, r, args.max_prompt_tokens)]
    data = Dataset.from_list([{"prompt": build_messages(r["tools"], r["dialogue"]), "ground_truth": r["ground_truth"]}
                              for r in rows])

    def reward(completions, ground_truth, **kwargs):  # TRL passes conversational completions and dataset columns
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [toolrl_reward(t.split(tokenizer.eos_token)[0], gt)["total"] for t, gt in zip(texts, ground_truth)]

    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward, args=trl_config(args, out_dir),
                          train_dataset=data)
    times, clock = {"sample": [], "step": []}, {}
    generate = trainer._generate_and_score_completions  # TRL samples inside the training step: time it apart

    def timed_generate(*a, **k):
        t = time.time()
        out = generate(*a, **k)
        times["sample"].append(time.time() - t)
        return out
    trainer._generate_and_score_completions = timed_generate

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock["t"] = time.time()

        def on_step_end(self, *a, **k):
            times["step"].append(time.time() - clock["t"])
    trainer.add_callback(Clock())
    trainer.train()
    per_batch = [sum(times["step"][i:i + args.num_minibatches])
                 for i in range(0, len(times["step"]), args.num_minibatches)]
    out = [(s, total - s) for s, total in zip(times["sample"], per_batch)]
    (out_dir / "trl_times.json").write_text(json.dumps(out))


# ---------------------------------------------------------------- main
def main(args):
    logger = RunLogger(args.exp_name, args.seed, args, root=args.runs_dir)
    out, results = logger.dir.resolve(), []
    empty_eval = out / "no_eval.jsonl"
    empty_eval.write_text("")
    for name in [p.strip() for p in args.paths.split(",") if p.strip()]:
        log = out / f"{name}.log"
        if name == "trl":
            try:
                import trl  # noqa: F401
            except ImportError:
                print("trl is not installed: skipping the TRL path (pip install --no-deps trl)")
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(out)] + sys.argv[1:]
            code, wall, peak = run_measured(cmd, ROOT, log)
            path = out / "trl_times.json"
            times = [tuple(t) for t in json.loads(path.read_text())] if path.exists() else []
        elif name == "before":
            src = Path(tempfile.mkdtemp(prefix="bench_before_"))
            archive = subprocess.run(["git", "archive", args.before_commit], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
            cmd = grpo_command(args, src / "algos" / "grpo_toolrl.py", "bench_before", src / "runs", empty_eval)
            code, wall, peak = run_measured(cmd, src, log)
            runs = sorted((src / "runs").glob("bench_before__*/metrics.jsonl"))
            times = step_times(runs[-1]) if runs else []
        else:
            extra = {"now": [], "now_unshared": ["--shared-prefix", "false"],
                     "now_ckpt": ["--checkpointing", "true"], "now_bf16": ["--precision", "bf16"]}[name]
            cmd = grpo_command(args, ROOT / "algos" / "grpo_toolrl.py", f"bench_{name}", out, empty_eval, extra)
            code, wall, peak = run_measured(cmd, ROOT, log)
            runs = sorted(out.glob(f"bench_{name}__*/metrics.jsonl"))
            times = step_times(runs[-1]) if runs else []
        results.append(summarize(name, code, wall, peak, times))
        logger.log(len(results) - 1, results[-1])
        if code != 0:
            print(f"{name} failed (exit {code}); its log: {log}")
    base = next((r for r in results if r["path"] == "before" and r["steps"]), None)
    lines = ["| path | sampling s | training s | per batch s | first batch s | peak RSS GB | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{base['step_s'] / r['step_s']:.2f}x" if base and r["steps"] and r["step_s"] > 0 else "-"
        lines.append(f"| {r['path']} | {r['sample_s']} | {r['train_s']} | {r['step_s']} | {r['first_step_s']} | "
                     f"{r['peak_rss_gb']} | {ratio} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return logger.finish({"results": results, "max_rss_self_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                          / 2 ** 20})


if __name__ == "__main__":
    if "--trl-worker" in sys.argv:
        i = sys.argv.index("--trl-worker")
        out_dir, argv = Path(sys.argv[i + 1]), sys.argv[1:i] + sys.argv[i + 2:]
        trl_worker(parse_args(Args, argv), out_dir)
    else:
        main(parse_args(Args))
