"""GRPO with the ToolRL reward (format + fine-grained tool-call correctness), scored on BFCL.

Paper: Qian et al. 2025, "ToolRL: Reward is All Tool Learning Needs" (arXiv 2504.13958); reward as in the released
code (`verl/utils/reward_score/rlla.py` of github.com/qiancheng0/ToolRL). One assistant turn per prompt, no tool is
executed: the turn is scored against the reference turn. R = R_format [0, 1] + R_correct [-3, 3].

Differences from the paper and the released code:
1. Data: BFCL's "live" categories (data/make_toolrl_bfcl.py), not ToolACE/Hammer/xLAM. Evaluation: greedy ToolRL reward
   on held-out live prompts (paired bootstrap interval), BFCL's non-live ones by our smaller AST checker (`bfcl_check`).
2. Scale: SmolLM2-135M-Instruct at the auto sizes of Args (paper: 1.5B-7B models, 512 prompts x 4, ~105 steps, 1024
   tokens). A cold 135M model almost never writes the tags (no signal): run.sh first gives it a short SFT warm start.
3. Format: every tag of the pattern once, <think> included (the code does not count <think>). A call must be a JSON
   object with a string "name" and an object "parameters", else R_correct = min (the code fails only on a missing field
   it reads). Schedules use this run's `total_steps` (code: 150). The call template is not JSON: GRPO copied one.
   `--no-call match`: a no-call reference scores R_correct by the paper's formula, +3 without a call, -3 with one.
4. No KL by default (as the paper; the released script adds 0.001 KL to the reward); `beta` > 0: k3 KL to a frozen
   reference. No entropy bonus (code: 0.001). old_logp: the sampler's; in bf16 recomputed (verl's extra pass). bf16's
   first-minibatch check allows its rounding: decode vs forward, or micro-batch shapes (135M: approx_kl <= 2e-3).
5. A prompt runs once for its G samples, in sampling and training (algos/model.py; exact), so minibatches hold whole
   groups (verl shuffles rows) and micro-batches are sized in tokens. `--shared-prefix false`: every row on its own.

Usage:
    bash run.sh grpo_toolrl   # data, BFCL as shipped, SFT warm start, GRPO, evaluation before/after (README.md)
    python algos/grpo_toolrl.py --model tiny --total-steps 2 --train-file data/toolrl_train_sample.jsonl \\
        --eval-file data/bfcl_eval_sample.jsonl --heldout-file data/toolrl_train_sample.jsonl   # smoke test, seconds
    torchrun --nproc_per_node 8 algos/grpo_toolrl.py ... [--fsdp true]   # 1/8 of the groups each: README.md, torchrun
"""
import copy
import functools
import json
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from algos.model import (FiniteGuard, RunLogger, all_reduce, arg, collate, data_parallel, distributed,  # noqa: E402
                         file_error, gather, generate, load_model, model_error, parse_args, rows_at, seed_of,
                         sequence_logprobs, start_rollouts, sync_gradients)
from kernels.advantage import LOSS_TYPES, group_advantages, policy_loss  # noqa: E402

GEN = "data/generated/"  # data/make_toolrl_bfcl.py writes here


def data_file(path):  # checked at parse time, before a model is loaded
    return file_error(path) and f"{file_error(path)}: run `python data/make_toolrl_bfcl.py --out-dir {GEN}`"


@dataclass
class Args:
    exp_name: str = arg("grpo_toolrl", "run name; the run folder is runs/<exp_name>__<seed>__<time>")
    seed: int = arg(1, "seed for python, numpy and torch")
    model: str = arg("smollm2-135m", "smollm2-135m | tiny | hub id | folder (an SFT checkpoint...)", check=model_error)
    train_file: str = arg(GEN + "toolrl_train.jsonl", "ToolRL records (data/make_toolrl_bfcl.py)", check=data_file)
    eval_file: str = arg(GEN + "bfcl_eval.jsonl", "BFCL eval records (data/make_toolrl_bfcl.py)", check=data_file)
    total_steps: int = arg(0, "GRPO steps (rollout + updates); 0 = auto: 6 on CPU, 100 on GPU", low=0)
    prompts_per_step: int = arg(0, "prompts per step; 0 = auto: 4 on CPU, 64 on GPU (paper: 512)", low=0)
    group_size: int = arg(4, "samples per prompt G (paper: 4); a group of one has no baseline", low=2)
    max_new_tokens: int = arg(0, "completion length limit; 0 = auto: 80 on CPU, 512 on GPU (paper: 1024)", low=0)
    max_prompt_tokens: int = arg(0, "drop training prompts longer than this; 0 = auto: 320 CPU, 2048 GPU", low=0)
    eval_max_prompt_tokens: int = arg(0, "drop BFCL/held-out prompts longer; 0 = auto: 512 CPU, 4096 GPU", low=0)
    temperature: float = arg(1.0, "sampling temperature (paper: 1.0)", check=lambda t: t <= 0 and "must be > 0")
    lr: float = arg(1e-5, "Adam learning rate (paper: 1e-6 for 1.5B-7B models and ~105 steps)", low=0)
    num_minibatches: int = arg(2, "optimizer steps per rollout batch (paper: batch 512 / minibatch 128 = 4)", low=1)
    ppo_epochs: int = arg(1, "passes over the rollout batch (verl's ppo_epochs)", low=1)
    micro_batch_tokens: int = arg(0, "micro-batch tokens (a shared prompt once); 0 = auto: 1024 CPU, 16384 GPU", low=0)
    shared_prefix: bool = arg(True, "a prompt runs once for its G samples (exact); false: every sequence on its own")
    checkpointing: bool = arg(False, "activation checkpointing per decoder layer (less memory, a second forward)")
    clip_low: float = arg(0.2, "PPO clip epsilon below 1 (paper: 0.2)", low=0, high=1)
    clip_high: float = arg(0.2, "PPO clip epsilon above 1 (DAPO uses 0.28; paper: 0.2)", low=0)
    beta: float = arg(0.0, "k3 KL weight to a frozen reference (paper drops KL: 0; DeepSeekMath GRPO: 0.04)", low=0)
    loss_type: str = arg("grpo", "grpo (sequence mean, DeepSeekMath) | bnpo | dr_grpo (Liu et al.) | dapo (Yu et al.)",
                         choices=LOSS_TYPES)
    adv_scale: str = arg("group", "advantage scaling: group std (GRPO) | batch std | none (Dr. GRPO)",
                         choices=("group", "batch", "none"))
    adv_eps: float = arg(1e-6, "advantage epsilon (verl, the paper's code: 1e-6; TRL: 1e-4)",
                         check=lambda eps: eps <= 0 and "must be > 0")
    old_logp: str = arg("auto", "old_logp source: sampler log-probs | recompute (extra no-grad pass, as verl) | auto: "
                        "sampler in fp32, recompute in bf16", choices=("auto", "sampler", "recompute"))
    precision: str = arg("fp32", "bf16: sampling, greedy evaluation and the log-prob passes (old, ref, policy) under "
                         "bf16 autocast; weights, optimizer, loss fp32 (GPUs, bf16 CPUs)", choices=["fp32", "bf16"])
    max_grad_norm: float = arg(1.0, "gradient clipping", check=lambda norm: norm <= 0 and "must be > 0")
    matching: str = arg("greedy", "call matching: greedy (code) | optimal (paper)", choices=("greedy", "optimal"))
    granularity: str = arg("finest", "granularity (paper Sec. 5)", choices=("finest", "fine", "intermediate", "coarse"))
    schedule: str = arg("none", "reward scale schedule (paper Sec. 5)", choices=("none", "dynamic", "two_stage"))
    two_stage_step: int = arg(30, "two_stage: step where correctness range x3 and format range /2 (code: 30)", low=0)
    equal_max: bool = arg(False, "ablation: R_correct in [-1, 1] (equal max with format)")
    no_call: str = arg("zero", "training R_correct where the reference makes no call: zero (code) | match (paper's "
                       "formula, G empty: max without a call, min with one; docstring 3)", choices=("zero", "match"))
    length_reward: str = arg("none", "ablation: none | fixed (+min(think words/512, 1)) | dynamic (target 384->640)",
                             choices=("none", "fixed", "dynamic"))
    eval_per_category: int = arg(0, "BFCL items per category (hashed subset); 0 = auto: 6 CPU, all GPU; -1 all", low=-1)
    eval_max_new_tokens: int = arg(0, "greedy tokens at BFCL evaluation; 0 = auto: 128 on CPU, 1024 on GPU", low=0)
    gen_batch_size: int = arg(32, "sequences per generation batch", low=1)
    heldout_file: str = arg(GEN + "toolrl_dev.jsonl", "held-out prompts: greedy reward; '' = none", check=data_file)
    eval_only: bool = arg(False, "only measure BFCL accuracy of --model (no training)")
    save_model: bool = arg(True, "save the trained model to <run>/checkpoint (resumable, as --save-every)")
    save_every: int = arg(0, "save the resumable <run>/checkpoint every N steps (0: at the end only)", low=0)
    resume: str = arg("", "a run folder: continue its run from <run>/checkpoint (give the same arguments)",
                      check=lambda run: run and not Path(run, "checkpoint", "trainer_state.pt").is_file() and
                      f"no resumable checkpoint in {run}")
    max_bad_steps: int = arg(3, "stop after N optimizer steps in a row with a non-finite loss or gradient", low=1)
    fsdp: bool = arg(False, "under torchrun: shard the policy with FSDP2 instead of DDP (same update; no --resume)")
    runs_dir: str = arg("runs", "folder that receives the run folder")

    def __post_init__(self):  # rules joining several fields, on the values main will use (auto resolved)
        self.old_logp = self.old_logp.replace("auto", "recompute" if self.precision == "bf16" else "sampler")
        r, world = resolve_defaults(copy.copy(self)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
        units = r.prompts_per_step * (1 if r.shared_prefix else r.group_size)  # what minibatches are drawn from
        if r.total_steps and units % r.num_minibatches:
            raise ValueError(f"--num-minibatches {r.num_minibatches} must divide the {units} "
                             f"{'groups' if r.shared_prefix else 'rows'} of a step (--prompts-per-step)")
        if r.total_steps and r.prompts_per_step % world:  # each process samples whole groups, as many as the others
            raise ValueError(f"--prompts-per-step {r.prompts_per_step} must split evenly over {world} processes")


def resolve_defaults(args):
    """Fill the auto (0) fields: small on a CPU (run.sh aims at ~20 min on 2 cores), larger on a GPU."""
    gpu = torch.cuda.is_available()
    for name, cpu, gpu_value in [("total_steps", 6, 100), ("prompts_per_step", 4, 64), ("max_new_tokens", 80, 512),
                                 ("max_prompt_tokens", 320, 2048), ("eval_max_prompt_tokens", 512, 4096),
                                 ("eval_per_category", 6, -1), ("eval_max_new_tokens", 128, 1024),
                                 ("micro_batch_tokens", 1024, 16384)]:
        setattr(args, name, getattr(args, name) or (gpu_value if gpu else cpu))
    args.total_steps = 0 if args.eval_only else args.total_steps
    return args


# ---------------------------------------------------------------- prompt and output format
SYSTEM_PROMPT = """You can call tools. The tools, one JSON schema per line:
{tools}

Answer in this format:
<think> short reasoning </think>
<tool_call>
{{"name": <tool name>, "parameters": {{<argument name>: <value>, ...}}}}
</tool_call>
One JSON call per line. If no tool fits, make no call and write <response> your reply </response> after </think>."""


def build_messages(tools, dialogue):
    """Chat messages for one record: our system prompt with the tools (and any dataset system message), the dialogue."""
    extra = "".join("\n\n" + m["content"] for m in dialogue if m["role"] == "system")
    tool_lines = "\n".join(json.dumps({k: t[k] for k in ("name", "description", "parameters") if k in t},
                                      ensure_ascii=False) for t in tools)
    system = {"role": "system", "content": SYSTEM_PROMPT.format(tools=tool_lines) + extra}
    return [system] + [{"role": m["role"], "content": m["content"]} for m in dialogue if m["role"] != "system"]


def json_or_none(line):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's stack
        return None


def parse_tool_calls(text):
    """Calls of the first <tool_call> block as the released code reads them (one JSON object per line) -> list of dicts;
    None when a tag is missing or a line is not {"name": str, "parameters": object}. Never raises."""
    if "<tool_call>" not in text or "</tool_call>" not in text:
        return None
    calls = [json_or_none(x) for x in text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0].strip().split("\n")]
    ok = all(isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("parameters"), dict)
             for c in calls)
    return calls if ok else None


# ---------------------------------------------------------------- the ToolRL reward (pure functions)
def format_reward(completion: str, ground_truth: str, max_reward=1.0, min_reward=0.0) -> float:
    """max_reward if the completion is the ground truth's blocks (<think> first), each tag once, else min_reward."""
    text, call, reply = completion.strip(), "<tool_call>" in ground_truth, "<response>" in ground_truth
    tags = ["think"] + ["tool_call"] * call + ["response"] * reply
    pattern = r"<think>.*?</think>" + r"\n<tool_call>\n.*?\n</tool_call>" * call + r"\n<response>.*?</response>" * reply
    ok = re.fullmatch(pattern, text, re.DOTALL) and all(text.count(f"<{t}>") == text.count(f"</{t}>") == 1
                                                        for t in tags)
    return float(max_reward if ok else min_reward)


def match_score(a, b, exact=False):
    """Multiset Jaccard of two lists (the code's match_score): equal lists -> 1, an empty one -> 0."""
    if a == b or exact or not a or not b:
        return float(a == b)
    inter = sum((Counter(a) & Counter(b)).values())
    return inter / (len(a) + len(b) - inter)


def _pair_score(g, p, granularity):
    """Score of predicted call p for ground-truth call g (same name): key Jaccard + number of equal values."""
    if granularity == "intermediate":
        return 1.0 if g == p else 0.0
    gp, pp = g["parameters"], p["parameters"]
    return match_score(list(gp), list(pp), exact=granularity == "fine") + \
        sum(1.0 for k, v in gp.items() if k in pp and pp[k] == v)  # Python == on parsed JSON, as the code


def _assign(gt, pred, granularity, matching):
    """Sum of pair scores over a one-to-one matching of predictions to ground-truth calls of the same name."""
    scores = [[_pair_score(g, p, granularity) if p["name"] == g["name"] else 0.0 for p in pred] for g in gt]
    if matching == "greedy" or len(pred) > 12:  # the released code: ground-truth order, best unused, first wins ties
        used = []  # per ground-truth call: the prediction it takes, -1 for none
        for row in scores:  # max() keeps the first of equal scores
            used.append(max((j for j, s in enumerate(row) if j not in used and s > 0), key=row.__getitem__, default=-1))
        return sum(row[j] for row, j in zip(scores, used) if j >= 0)

    @functools.lru_cache(maxsize=None)
    def best(i, used):  # optimal: exact search over (ground-truth index, bit set of used predictions)
        return 0.0 if i == len(gt) else max([best(i + 1, used)] + [
            s + best(i + 1, used | 1 << j) for j, s in enumerate(scores[i]) if s > 0 and not used >> j & 1])
    return best(0, 0)


def correctness_reward(completion: str, ground_truth: str, max_reward=3.0, min_reward=-3.0, matching="greedy",
                       granularity="finest", no_call="zero") -> float:
    """R_correct (paper Sec. 3.3): min if no parseable prediction, max if equal calls, else min + (max - min) *
    (r_name + sum r_param + sum r_value) / S_max, S_max = 1 + |G| + sum_g |keys(g)|. G empty: 0 (code), or "match"."""
    if "<tool_call>" not in ground_truth:
        return 0.0 if no_call == "zero" else float(max_reward if "<tool_call>" not in completion else min_reward)
    gt, pred = parse_tool_calls(ground_truth), parse_tool_calls(completion.strip())
    if gt is None:
        raise ValueError(f"ground truth has an unparseable <tool_call> block: {ground_truth!r}")
    if pred is None:
        return float(min_reward)
    if gt == pred or granularity == "coarse":  # coarse: whole-list equality
        return float(max_reward if gt == pred else min_reward)
    score = match_score([c["name"] for c in gt], [c["name"] for c in pred], exact=granularity == "fine")
    score += _assign(gt, pred, granularity, matching)
    s_max = 1.0 + sum(1.0 if granularity == "intermediate" else 1.0 + len(g["parameters"]) for g in gt)
    return float(min_reward + (max_reward - min_reward) * score / s_max)


def length_reward(completion: str, target_words=512) -> float:
    """Length ablation: min(words in <think> / target, 1), rounded to 0.01 as the code; 0 without a think block."""
    if "<think>" not in completion or "</think>" not in completion:
        return 0.0
    words = len(completion.split("<think>")[-1].split("</think>")[0].split())
    return min(round(words / target_words, 2), 1.0)


def toolrl_reward(completion: str, ground_truth: str, step=0, total_steps=1, matching="greedy", granularity="finest",
                  schedule="none", two_stage_step=30, equal_max=False, length="none", no_call="zero"):
    """All components and their total as a dict; the ablations of paper Sec. 5 are the keyword options."""
    fmt, cor = (0.0, 1.0), ((-1.0, 1.0) if equal_max else (-3.0, 3.0))  # (min, max)
    p = min(step / max(total_steps, 1), 1.0)
    if schedule == "two_stage":  # correctness range /3 before two_stage_step, format range /2 after
        cor, fmt = ((cor[0] / 3, cor[1] / 3), fmt) if step < two_stage_step else (cor, (fmt[0] / 2, fmt[1] / 2))
    elif schedule == "dynamic":  # format weight shrinks, correctness weight grows
        fmt, cor = (-2.0 + p, 2.0 - p), (-2.0 - p, 2.0 + p)
    out = {"format": format_reward(completion, ground_truth, fmt[1], fmt[0]),
           "correctness": correctness_reward(completion, ground_truth, cor[1], cor[0], matching, granularity, no_call)}
    if length != "none":
        out["length"] = length_reward(completion, 512 if length == "fixed" else 384 + 256 * p)
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------- BFCL evaluation (a smaller AST checker)
PY_TYPES = dict(string=str, integer=int, float=float, boolean=bool, array=list, tuple=list, dict=dict, any=str)


def parse_bfcl_calls(completion):
    """[{"name", "arguments"}] from every <tool_call> block; [] when there is none; None when a block is unclosed or
    a line is not a JSON object with a name (also accepts "arguments" for "parameters"). Never raises."""
    if completion.count("<tool_call>") != completion.count("</tool_call>"):
        return None
    calls = []
    for body in re.findall(r"<tool_call>(.*?)</tool_call>", completion, re.DOTALL):
        for c in [json_or_none(x) for x in body.strip().split("\n") if x.strip()]:
            args = c.get("parameters", c.get("arguments", {})) if isinstance(c, dict) else None
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(args, dict):
                return None
            calls.append({"name": c["name"], "arguments": args})
    return calls


def _norm(v):
    """BFCL's string standardisation: drop spaces and ,./-_*^, lower-case, ' -> \"; applied one list level deep."""
    return re.sub(r"[ ,./\-_*^]", "", v).lower().replace("'", '"') if isinstance(v, str) else \
        [_norm(x) if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


def _dict_ok(value, accepted):
    """A dict argument against one possible dict whose values are lists of acceptable values."""
    return isinstance(accepted, dict) and all(k in value or "" in acc for k, acc in accepted.items()) and all(
        k in accepted and _norm(v) in [_norm(a) for a in accepted[k]] for k, v in value.items())


def value_ok(value, accepted, ptype):
    """One argument value against its list of acceptable values, BFCL style: type from the tool doc (an int is
    accepted for a float), strings and list items compared after _norm, dicts key by key."""
    value = float(value) if ptype == "float" and type(value) is int else value
    expected, answer_type = PY_TYPES.get(ptype), next((type(a) for a in accepted if a != ""), None)
    if expected is not None and type(value) is not expected and type(value) is not answer_type:
        return False
    if isinstance(value, dict):
        return any(_dict_ok(value, a) for a in accepted)
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        return any(isinstance(a, list) and len(a) == len(value) and all(map(_dict_ok, value, a)) for a in accepted)
    if isinstance(value, (str, list)):
        return _norm(value) in [_norm(a) for a in accepted if type(a) is type(value)]
    return any(value == a and type(a) is not str for a in accepted)


def check_call(call, answer, tools):
    """None if one parsed call satisfies one possible answer {name: {param: [acceptable values]}}, else an error."""
    name, params = next(iter(answer.items()))
    if call["name"] != name:
        return f"wrong function {call['name']!r}, expected {name!r}"
    schema = next((t["parameters"] for t in tools if t["name"] == name), {})
    props, args = schema.get("properties", {}), call["arguments"]
    if missing := [k for k in schema.get("required", []) if k not in args]:
        return f"missing required parameter {missing[0]!r}"
    for k, v in args.items():
        if k not in props or k not in params:
            return f"unexpected parameter {k!r}"
        if not value_ok(v, params[k], props[k].get("type")):
            return f"wrong value for {k!r}: {v!r}, accepted {params[k]!r}"
    missing = [k for k, acc in params.items() if k not in args and "" not in acc]
    return f"missing parameter {missing[0]!r}" if missing else None


def bfcl_check(calls, possible_answer, tools, category):
    """(correct, error) for one BFCL item. irrelevance: correct iff no call (an unparseable block counts as none: BFCL's
    decoder fails). simple/multiple: exactly one call. parallel*: same count, each answer matched greedily to an unused
    call in any order (as BFCL). Simplifications versus bfcl_eval's ast_checker: Python only, no function-name
    rewriting, nested item types of arrays not type-checked, the "variable" case reduced to the answer's type."""
    if category == "irrelevance":
        return (not calls, None if not calls else f"made {len(calls)} call(s)")
    if calls is None:
        return False, "unparseable <tool_call> block"
    if len(calls) != len(possible_answer):
        return False, f"{len(calls)} call(s), expected {len(possible_answer)}"
    used = set()
    for answer in possible_answer:  # the first unused call that satisfies it, else the last unused call's error
        errors = [(j, check_call(call, answer, tools)) for j, call in enumerate(calls) if j not in used]
        match = next((j for j, error in errors if error is None), None)
        if match is None:
            return False, errors[-1][1] if errors else "no call left"
        used.add(match)
    return True, None


# ---------------------------------------------------------------- data
def load_jsonl(path, fields):
    """Rows of a JSONL file; a bad line or a missing field stops the run with file, line and field."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            rows.append(row := json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: not a JSON object")
        if missing := [k for k in fields if k not in row]:
            raise ValueError(f"{path}:{i}: missing field {missing[0]!r}")
        if "<tool_call>" in str(row.get("ground_truth")) and parse_tool_calls(str(row["ground_truth"])) is None:
            raise ValueError(f"{path}:{i}: field 'ground_truth' has an unparseable <tool_call> block")
    return rows


def fits(tokenizer, row, max_tokens):  # the prompt's tokens, as sampling sees them
    return start_rollouts(tokenizer, [build_messages(row["tools"], row["dialogue"])])[0].prompt_len <= max_tokens


# ---------------------------------------------------------------- rollout and evaluation
@torch.no_grad()
def greedy(model, tokenizer, rows, max_new_tokens, args):
    """(greedy completion (EOS cut), call log-odds: log p(<tool_call>) - log p(<response>) where it first picks one
    outside <think>, else None) of each record, in order, batched by prompt length; torchrun: every world-th each."""
    rank, world = distributed()
    rollouts = start_rollouts(tokenizer, [build_messages(r["tools"], r["dialogue"]) for r in rows[rank::world]])
    tags = [tokenizer.encode(t, add_special_tokens=False) for t in ("<tool_call>", "<response>")]
    choice = next((a, b) for a, b in zip(*tags) if a != b)  # the tokens where the two tags part: the decision
    with torch.autocast(model.device.type, torch.bfloat16, enabled=args.precision == "bf16"):  # before = after
        generate(model, tokenizer, sorted(rollouts, key=lambda r: r.prompt_len), max_new_tokens, 0.0,
                 batch_size=args.gen_batch_size, watch=choice)
    odds = [next((w[0] - w[1] for k, (t, w) in enumerate(zip(r.completion_ids, r.watched)) if t in choice and
                  tokenizer.decode(r.completion_ids[:k]).count("think>") % 2 == 0), None) for r in rollouts]
    out = gather(list(zip([tokenizer.decode(r.completion_ids).split(tokenizer.eos_token)[0] for r in rollouts], odds)))
    return [out[i % world][i // world] for i in range(len(rows))]


def evaluate(model, tokenizer, items, heldout, args, path):
    """BFCL accuracy per category and overall, greedy held-out rewards -> (metrics, rewards); completions written."""
    per_cat, preds = {}, []
    for it, (text, _) in zip(items, greedy(model, tokenizer, items, args.eval_max_new_tokens, args)):
        ok, error = bfcl_check(calls := parse_bfcl_calls(text), it["possible_answer"], it["tools"], it["category"])
        per_cat.setdefault(it["category"], []).append(ok)
        preds.append({"id": it["id"], "category": it["category"], "correct": ok, "error": error, "completion": text,
                      "calls": calls})
    texts, odds = zip(*greedy(model, tokenizer, heldout, args.max_new_tokens, args)) if heldout else ((), ())
    parts = [{"id": r["id"], **toolrl_reward(t, r["ground_truth"]), "call_logodds": o, "completion": t}
             for t, o, r in zip(texts, odds, heldout)]
    for name, rows in [(path.name, preds), ("heldout_" + path.name, parts)]:  # held-out: with their reward parts
        if rows and distributed()[0] == 0:
            path.with_name(name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = {f"bfcl/{c}": float(np.mean(v)) for c, v in sorted(per_cat.items())}
    out.update({"bfcl/overall": float(np.mean([ok for v in per_cat.values() for ok in v]))} if items else {})
    rewards, needs = [p["total"] for p in parts], ["<tool_call>" in r["ground_truth"] for r in heldout]
    exact = [x == (4.0 if n else 1.0) for x, n in zip(rewards, needs)]  # the best total
    decided = [("<tool_call>" in t) == n for t, n in zip(texts, needs)]  # calls exactly where the reference does
    pos, neg = ([o for o, n in zip(odds, needs) if o is not None and n == c] for c in (True, False))
    auc = float(np.mean([(a > b) + (a == b) / 2 for a in pos for b in neg])) if pos and neg else None  # AUC of odds
    out.update({"heldout/reward": float(np.mean(rewards)), "heldout/exact": float(np.mean(exact)),
                "heldout/call_decision": float(np.mean(decided)), "heldout/call_auc": auc} if heldout else {})
    return out, rewards


def paired_bootstrap(before, after, samples=10000, seed=0):
    """Mean paired difference after - before and its 95% percentile bootstrap interval (items resampled)."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    means = d[np.random.default_rng(seed).integers(0, len(d), (samples, len(d)))].mean(1)
    return {"diff": float(d.mean()), "diff_ci95_low": float(np.percentile(means, 2.5)),
            "diff_ci95_high": float(np.percentile(means, 97.5))}


def micro_weight(loss_type, rows, mini_rows, tokens, mini_tokens):
    """Scale of a micro-batch loss: the accumulated gradient is the minibatch reduction (dapo's: inside policy_loss)."""
    return tokens / max(mini_tokens, 1.0) if loss_type == "bnpo" else 1.0 if loss_type == "dapo" else rows / mini_rows


def micro_batches(data, rows, args):
    """Consecutive runs of `rows` of <= args.micro_batch_tokens tokens (or one row); a shared prompt counts once."""
    lengths, prompt = data["attention_mask"].sum(1).tolist(), (data["loss_mask"].cumsum(1) == 0).sum(1).tolist()
    out, used = [], 0
    for r in map(int, rows):
        same = args.shared_prefix and out and out[-1][-1] // args.group_size == r // args.group_size
        cost = lengths[r] - (prompt[r] if same else 0)
        if not out or used + cost > args.micro_batch_tokens:
            out, used, cost = out + [[]], 0, lengths[r]
        out[-1], used = out[-1] + [r], used + cost
    return out


def _logprobs(model, data, mb, args):
    """(b, width) fp32 log-probs of rows mb at loss_mask tokens (else 0), padding trimmed, a shared prompt once."""
    width = int(data["attention_mask"][mb].sum(1).max())
    ids, attn, mask = (data[k][mb, :width] for k in ("input_ids", "attention_mask", "loss_mask"))  # (b, width) each
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=args.precision == "bf16"):  # --precision bf16
        return sequence_logprobs(model, ids, attn, args.temperature, share_prefix=args.shared_prefix,
                                 checkpointing=args.checkpointing, loss_mask=mask)


@torch.no_grad()
def _logprobs_in_chunks(model, data, args):
    out = torch.zeros_like(data["loss_mask"])  # (N, T)
    for mb in micro_batches(data, range(len(out)), args):
        out[mb, :int(data["attention_mask"][mb].sum(1).max())] = _logprobs(model, data, mb, args)
    return out


def grpo_update(model, optimizer, data, advantages, args, ref_model=None, guard=None, seed=0):
    """Steps 4-5 on this process's rows ((N, T) tensors, advantages (N,)): old_logp, ref_logp, then ppo_epochs x
    num_minibatches optimizer steps over token-sized micro-batches. A minibatch: a share of a permutation (`seed`, the
    same in every process) of all processes' groups (or rows); losses over its global row and token counts make
    sync_gradients' sum the one-process gradient. Without KL (beta = 0) advantage-0 rows have no gradient: skipped
    (still counted). Non-finite steps are skipped (guard). -> metrics (token-weighted, all processes)."""
    (rank, world), guard = distributed(), guard or FiniteGuard(args.max_bad_steps)
    loss_mask = data["loss_mask"]  # (N, T): 1 on sampled tokens, EOS included
    assert loss_mask.sum() > 0, "empty loss_mask"
    active = (advantages != 0) | (args.beta > 0)  # (N,)
    old_logp = _logprobs_in_chunks(model, data, args) if args.old_logp == "recompute" else data["sample_logp"]  # (N, T)
    tol = (5e-2, 1e-2) if args.precision == "bf16" else (1e-2, 1e-3)  # |ratio - 1|, approx_kl (docstring 4)
    ref_logp = None if ref_model is None else _logprobs_in_chunks(ref_model, data, args)
    unit = args.group_size if args.shared_prefix else 1  # minibatches of whole groups (or rows)
    n, gen = len(loss_mask) // unit, torch.Generator().manual_seed(seed)  # this process: units rank * n + (0..n-1)
    keys = ["policy_loss", "clipfrac", "approx_kl", "ratio_mean"] + ["kl"] * (ref_logp is not None)
    sums, norms = torch.zeros(len(keys) + 1, dtype=torch.float64), []  # token-weighted sums, then tokens
    for epoch in range(args.ppo_epochs):
        for m, units in enumerate(torch.randperm(n * world, generator=gen).view(args.num_minibatches, -1)):
            mini_rows, units = len(units) * unit, units[units // n == rank] - rank * n  # this process's share
            idx = (units[:, None] * unit + torch.arange(unit)).flatten()  # its rows of minibatch m (maybe none)
            mini_tokens = all_reduce(float(loss_mask[idx].sum()))  # global counts
            optimizer.zero_grad(set_to_none=False)  # zero tensors, not None: Adam steps even when all were skipped
            mini_loss = 0.0
            for k, mb in enumerate(micro_batches(data, idx[active[idx].cpu()], args)):
                logp = _logprobs(model, data, mb, args)  # (b, width)
                width, n_tok = logp.shape[1], float(loss_mask[mb].sum())
                loss, metrics = policy_loss(
                    logp, old_logp[mb, :width], advantages[mb], loss_mask[mb, :width], args.clip_low, args.clip_high,
                    None if ref_logp is None else ref_logp[mb, :width], args.beta, args.loss_type,
                    max_completion_len=args.max_new_tokens, num_active_tokens=mini_tokens)
                (weighted := loss * micro_weight(args.loss_type, len(mb), mini_rows, n_tok, mini_tokens)).backward()
                mini_loss += weighted.item()
                if epoch == 0 and m == 0 and k == 0:  # nothing updated yet: the policy is still the sampler
                    ratio, akl = float(metrics["ratio_mean"]), float(metrics["approx_kl"])
                    assert abs(ratio - 1) < tol[0] and akl < tol[1], \
                        f"first minibatch: ratio_mean {ratio}, approx_kl {akl}: sampler and trainer disagree"
                assert "kl" not in metrics or float(metrics["kl"]) >= -1e-6, "k3 KL < 0"
                sums += torch.tensor([loss.item() * n_tok] + [float(metrics[k]) * n_tok for k in keys[1:]] + [n_tok])
            sync_gradients(model)  # each gradient: its sum over processes
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            if guard.ok(all_reduce(mini_loss), grad_norm):  # the same decision in every process
                optimizer.step()
            norms.append(float(grad_norm))
    sums = all_reduce(sums)
    return {**{k: float(s / max(sums[-1], 1e-9)) for k, s in zip(keys, sums)}, "grad_norm": float(np.mean(norms)),
            "skipped_steps": guard.skipped}


def main(args):
    args, (rank, world) = resolve_defaults(args), distributed()
    say = print if rank == 0 else (lambda *a, **k: None)  # rank 0 prints
    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)
    model, tokenizer = load_model(str(Path(args.resume) / "checkpoint") if args.resume else args.model)
    ref_model = None if args.beta == 0 else load_model(args.model)[0] if args.resume else copy.deepcopy(model)
    data_parallel(model, shard=args.fsdp)  # torchrun: DDP or FSDP2 (--fsdp); gradients summed by sync_gradients
    all_train = load_jsonl(args.train_file, ["id", "tools", "dialogue", "ground_truth"])
    heldout = [r for r in load_jsonl(args.heldout_file, ["id", "tools", "dialogue", "ground_truth"])
               if fits(tokenizer, r, args.eval_max_prompt_tokens)] if args.heldout_file else []
    train = [r for r in all_train if fits(tokenizer, r, args.max_prompt_tokens)] if args.total_steps > 0 else []
    if args.total_steps > 0 and not train:
        sys.exit(f"no training prompt fits in {args.max_prompt_tokens} tokens")
    by_cat = {}  # the file is already in a fixed hashed order: take the first n of each category that fit
    for r in load_jsonl(args.eval_file, ["id", "category", "tools", "dialogue", "possible_answer"]):
        if fits(tokenizer, r, args.eval_max_prompt_tokens):
            by_cat.setdefault(r["category"], []).append(r)
    evals = [r for v in by_cat.values() for r in (v if args.eval_per_category < 0 else v[:args.eval_per_category])]
    say(f"train prompts: {len(train)} of {len(all_train)} fit in {args.max_prompt_tokens} tokens; held-out prompts: "
        f"{len(heldout)}; eval items: " + ", ".join(f"{c} {len(v)}" for c, v in by_cat.items()))
    logger = RunLogger(args.exp_name, args.seed, args, root=args.runs_dir, resume=args.resume)
    optimizer, guard = torch.optim.Adam(model.parameters(), lr=args.lr), FiniteGuard(args.max_bad_steps)
    B, G, b = args.prompts_per_step, args.group_size, args.prompts_per_step // world  # b: prompts per process
    if args.resume:  # the model came from the checkpoint; now the optimizer, prompt position, guard and 'before'
        state = logger.restore(optimizer)
        start, before, heldout_before = state["step"] + 1, state["before"], state["heldout"]
        guard.in_a_row, guard.skipped = state["guard"]
        say(f"resumed {logger.dir} at step {start}")
    else:  # 0. BFCL accuracy and held-out ToolRL reward of the starting model
        t0, start = time.time(), 0
        before, heldout_before = evaluate(model, tokenizer, evals, heldout, args, logger.dir / (
            "predictions.jsonl" if args.total_steps == 0 else "predictions_before.jsonl"))
        say("before:", json.dumps(before), f"({time.time() - t0:.0f} s)")
    keys = ["reward", "rewards/format/mean", "rewards/correctness/mean", "frac_reward_zero_std", "clipfrac",
            "approx_kl", "completion_len", "skipped_steps", "time/generate_s", "time/train_s"]
    for step in tqdm(range(start, args.total_steps), desc="grpo", disable=rank > 0 or not sys.stderr.isatty()):
        # 1. sample G completions per prompt, this process's share of the step's prompts (no tool execution)
        batch = rows_at(train, args.seed, step * B + rank * b, b)  # the prompt stream is resumable: by position
        torch.manual_seed(seed_of(args.seed, "sample", step, rank))  # per process; a resumed run draws the same
        t0 = time.time()
        rollouts = start_rollouts(tokenizer, [build_messages(r["tools"], r["dialogue"]) for r in batch], n=G)
        with torch.autocast(model.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            texts = [t.split(tokenizer.eos_token)[0] for t in generate(model, tokenizer, rollouts, args.max_new_tokens,
                     args.temperature, batch_size=args.gen_batch_size, share_prefix=args.shared_prefix)]
        t_gen = time.time() - t0
        # 2. rewards: named components per completion; then those of all processes (in prompt order)
        comps = [toolrl_reward(text, batch[i // G]["ground_truth"], step, args.total_steps, args.matching,
                               args.granularity, args.schedule, args.two_stage_step, args.equal_max,
                               args.length_reward, args.no_call) for i, text in enumerate(texts)]
        data = collate(rollouts, tokenizer.pad_token_id, model.device)
        comps = sum(gather([dict(c, len=n, clipped=r.stop_reason == "length", calls=len(parse_bfcl_calls(t) or []))
                            for c, n, r, t in zip(comps, data["loss_mask"].sum(1).tolist(), rollouts, texts)]), [])
        rewards = torch.tensor([c["total"] for c in comps])  # (B*G,)
        assert torch.isfinite(rewards).all(), "non-finite reward"
        # 3. group-normalised advantages (GRPO, DeepSeekMath eq. 3), of the whole batch; this process's rows
        advantages = group_advantages(rewards, G, scale=args.adv_scale, eps=args.adv_eps)  # (B*G,)
        advantages = advantages[rank * b * G:(rank + 1) * b * G].to(model.device)
        # 4.-5. old_logp, then several minibatch updates of the clipped surrogate
        stats = grpo_update(model, optimizer, data, advantages, args, ref_model, guard,
                            seed=seed_of(args.seed, "minibatches", step))
        t_train = time.time() - t0 - t_gen
        # 6. log aggregates over the whole step (all processes)
        mean = {k: float(np.mean([c[k] for c in comps])) for k in comps[0]}
        row = {"reward": rewards.mean(), "reward_std": rewards.std(),
               "frac_reward_zero_std": float((rewards.view(B, G).std(dim=1) < 1e-6).float().mean()),
               **{f"rewards/{k}/mean": v for k, v in mean.items() if k not in ("total", "len", "clipped", "calls")},
               **stats, "completion_len": mean["len"], "clipped_ratio": mean["clipped"], "tool_calls": mean["calls"],
               "tokens_per_s": mean["len"] * len(comps) / max(t_gen, 1e-9), "time/generate_s": t_gen,
               "time/train_s": t_train}
        logger.log(step, row, keys=keys)
        if args.save_every and (step + 1) % args.save_every == 0 or args.save_model and step + 1 == args.total_steps:
            path = logger.save(step, model, tokenizer, optimizer, before=before, heldout=heldout_before,
                               guard=(guard.in_a_row, guard.skipped))
            say(f"checkpoint after step {step}: {path}", flush=True)
    # 7. BFCL accuracy and held-out reward after training (paired bootstrap interval); predictions in predictions.jsonl
    after = {}
    if args.total_steps > 0:
        after, heldout_after = evaluate(model, tokenizer, evals, heldout, args, logger.dir / "predictions.jsonl")
        after.update({f"heldout/{k}": v for k, v in paired_bootstrap(heldout_before, heldout_after).items()}
                     if heldout else {})
        say("after:", json.dumps(after))
    summary = {**{f"before/{k}": v for k, v in before.items()}, **{f"after/{k}": v for k, v in after.items()},
               "eval_items": len(evals), "heldout_items": len(heldout), "train_prompts": len(train),
               **({"checkpoint": str(logger.dir / "checkpoint")} if args.save_model and args.total_steps > 0 else {})}
    say(json.dumps(logger.finish(summary), indent=1))
    return summary


if __name__ == "__main__":
    main(parse_args(Args))
