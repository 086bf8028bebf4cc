"""Supervised fine-tuning for self-aware tool use: SMART-ER-style reasoning chains, MinPrompt data selection.

Papers: SMART: Self-Aware Agent for Tool Overuse Mitigation (Qian et al., 2025, arXiv 2502.11435);
MinPrompt: Graph-based Minimal Prompt Data Augmentation for Few-shot QA (Chen et al.).
The objective is next-token NLL on assistant tokens only, through the model's own chat template; the same script is
the cold start of the RL scripts and the distillation stage of RM-R1 (any JSONL of `{"messages": [...]}` rows).

Differences from the papers, and why:
1. Data: our own generated SMART-ER-style chains (data/make_smart_er.py) in two domains where the embedded
   SmolLM2-135M's knowledge boundary is real: arithmetic (one digit: reason; harder: the Code tool) and facts (well
   known: answer; obscure: the Search tool). SMART-ER has Math, Time and Intention (AskUser) domains.
2. Tool outputs are separate `tool` chat turns (loss_mask 0) instead of text spliced into one assistant message, so
   a chain with k tool calls is one row with k+1 assistant turns rather than k+1 training pairs; the loss covers
   the same target tokens.
3. MinPrompt selects sentences of raw text and then generates QA pairs from them (loss L_orig + lambda * L_aug). We
   apply its greedy minimum dominating set to the training rows themselves: rows are nodes, an edge joins two rows
   whose user turns share an entity, and a regex (numbers, capitalised words not opening a sentence) stands in for
   the paper's NER. The selected rows are the training set; there is no augmentation loss.
4. Evaluation on our held-out rows, not SMART's benchmarks: (a) tool-decision accuracy: greedy first assistant
   turn; a tool call is the `(tool: ...)` marker or a `Code:`/`Search:` line; nothing is executed. (b) Agentic, as
   SMART scores it (final-answer accuracy and tool calls per question), on --agent-rows questions: `Code:` requests
   run in run_python (a process-level sandbox), `Search:` requests get the row's recorded snippet (no search engine;
   'no result' for rows without one), at most --max-tool-calls calls (a sandbox, as the model may write any code).

Usage (from the repository root):
    python algos/sft.py                                   # SmolLM2-135M on data/smart_er_train.jsonl
    python algos/sft.py --select dominating_set           # MinPrompt-style data selection first
    python algos/sft.py --model tiny --max-steps 5        # smoke run, seconds
    python algos/sft.py --train-file my.jsonl --eval-file "" --model Qwen/Qwen2.5-0.5B-Instruct
    python algos/sft.py --agent-rows 40 --max-tool-calls 1   # a larger agentic evaluation (Code in the sandbox)
    python algos/sft.py --save-every 10                   # resumable checkpoint every 10 steps; after a crash:
    python algos/sft.py --save-every 10 --resume runs/sft__1__<time>   # continues in that folder, same numbers
    torchrun --nproc_per_node 2 algos/sft.py --model tiny # data parallel: each process --batch-size rows a step
    torchrun --nproc_per_node 2 algos/sft.py --model tiny --fsdp true  # FSDP2: AdamW, grads sharded, weights per step
Non-finite steps are skipped and counted (skipped_steps); --max-bad-steps 3 in a row stop the run.
Expected at the defaults (SmolLM2-135M, 2-core CPU): held-out loss falls several-fold and the tool decision on
unseen questions goes from the base model's "never call a tool" to mostly right; README.md has the measured figures.
Agentic evaluation (16 held-out questions, measured 2026-11-29 on the checkpoint of a default run): final-answer
accuracy 43.8% -> 62.5%, tool calls per question 0 -> 0.25 (Code on the 4 hard sums, all right; no Search on the 4
obscure facts: the model still answers those from memory); ~15 s per evaluation on the CPU.
"""
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `python algos/sft.py` finds algos/ and kernels/
import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from algos.model import (FiniteGuard, RunLogger, Rollout, all_reduce, arg, collate, data_parallel,  # noqa: E402
                         distributed, encode_chat, gathered, generate, load_model, model_error, parse_args,
                         sequence_logprobs, start_rollouts, sync_gradients)


def _data_file(spec, optional=False):
    """For `check=`: a local .json/.jsonl path must exist (anything else is taken as a hub dataset id)."""
    if (optional and not spec) or not spec.endswith((".json", ".jsonl")) or Path(spec).is_file():
        return None
    return f"no such file: {spec}" if spec else "needs a file"


def _positive(v):
    return None if v > 0 else "must be > 0"


def _resumable(run_dir):
    return None if not run_dir or (Path(run_dir) / "checkpoint" / "trainer_state.pt").is_file() else \
        f"no resumable checkpoint in {run_dir} (<run>/checkpoint/trainer_state.pt)"


@dataclass
class Args:
    exp_name: str = arg("sft", "experiment name; the run folder is runs/<exp_name>__<seed>__<unix time>")
    seed: int = arg(1, "seed of random, numpy and torch (every torchrun process: the same data order, its own slice)")
    model: str = arg("smollm2-135m", "smollm2-135m (embedded), tiny (random, for tests), a hub id or a local folder",
                     check=model_error)
    train_file: str = arg("data/smart_er_train.jsonl", "JSONL file or hub dataset of {'messages': [...]} rows",
                          check=_data_file)
    eval_file: str = arg("data/smart_er_test.jsonl", "held-out rows for the loss and the tool decision ('' = none)",
                         check=lambda v: _data_file(v, optional=True))
    select: str = arg("all", "training rows: all | dominating_set (MinPrompt greedy, Chen et al.) | random",
                      choices=["all", "dominating_set", "random"])
    select_size: int = arg(0, "with --select random: how many rows (0 = as many as dominating_set picks)", low=0)
    max_len: int = arg(512, "tokens per row; longer rows are cut (their cut-off targets are lost)", low=16)
    batch_size: int = arg(4, "rows per micro-batch (per process under torchrun)", low=1)
    grad_accum: int = arg(1, "micro-batches per optimiser step; a step takes batch_size * grad_accum rows in all "
                             "(split over torchrun processes)", low=1)
    max_steps: int = arg(40, "optimiser steps", low=1)
    lr: float = arg(1e-4, "peak learning rate (AdamW)", check=_positive)
    warmup_ratio: float = arg(0.1, "fraction of steps of linear warm-up before the cosine decay to 0", low=0, high=1)
    weight_decay: float = arg(0.0, "AdamW weight decay", low=0)
    max_grad_norm: float = arg(1.0, "gradient clipping norm", check=_positive)
    eval_every: int = arg(20, "steps between held-out loss evaluations (and at start and end)", low=1)
    eval_rows: int = arg(32, "held-out rows used for the loss (0 = all)", low=0)
    decision_rows: int = arg(60, "held-out questions for the tool-decision accuracy at start and end (0 = skip)", low=0)
    decision_tokens: int = arg(48, "max new tokens when probing the tool decision", low=1)
    agent_rows: int = arg(16, "held-out questions answered agentically at start and end (Code run in run_python, "
                              "Search from the row's recorded output): final-answer accuracy, tool calls per "
                              "question (SMART's metrics); 0 = skip", low=0)
    agent_tokens: int = arg(96, "max new tokens per assistant turn in the agentic evaluation", low=1)
    max_tool_calls: int = arg(2, "tool calls per question in the agentic evaluation; a further request ends it "
                                 "unanswered", low=0)
    save_every: int = arg(0, "steps between resumable checkpoints (0 = only at the end); each replaces the last whole",
                          low=0)
    resume: str = arg("", "RUN_DIR: continue that run from its checkpoint (model, optimizer, scheduler, RNGs, data "
                          "order and cursor); give the same arguments (a difference is warned about)",
                      check=_resumable)
    max_bad_steps: int = arg(3, "stop after this many optimiser steps in a row with a non-finite loss or gradient "
                                "(each is skipped and counted as skipped_steps)", low=1)
    fsdp: bool = arg(False, "under torchrun: shard the model with FSDP2 instead of DDP (same update; no --resume)")
    output_dir: str = arg("runs", "where run folders go")

    def __post_init__(self):  # rules joining several fields
        if self.select_size and self.select != "random":
            raise ValueError("--select-size is only used with --select random")


# ---------------------------------------------------------------- data: loading and validation
ROLES = {"system", "user", "assistant", "tool"}


def validate_row(row, source, line):
    """Fail early, naming file, line and field, on a row that cannot be trained on."""
    def bad(field, why):
        raise ValueError(f"{source}:{line}: field '{field}': {why}")
    if not isinstance(row, dict):
        bad("<row>", "expected a JSON object")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        bad("messages", "missing or not a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            bad(f"messages[{i}]", "expected an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            bad(f"messages[{i}].role", f"unknown role {m.get('role')!r} (one of {sorted(ROLES)})")
        if not isinstance(m.get("content"), str):
            bad(f"messages[{i}].content", "missing or not a string")
    if not any(m["role"] == "assistant" for m in messages):
        bad("messages", "no assistant turn: nothing to train on")
    return row


def load_rows(spec):
    """Rows of a local JSONL file (checked line by line first, so bad JSON names its line) or a hub dataset."""
    if Path(spec).exists():
        for line_no, line in enumerate(Path(spec).read_text().splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{spec}:{line_no}: field '<json>': {e.msg}") from None
        dataset = load_dataset("json", data_files=str(spec), split="train")
    else:
        dataset = load_dataset(spec, split="train")
    return [validate_row(row, spec, i + 1) for i, row in enumerate(dataset)]


# ---------------------------------------------------------------- MinPrompt: greedy minimum dominating set
def entities(text):
    """Cheap stand-in for NER: numbers, and capitalised words that do not open a sentence."""
    found = set()
    for sentence in re.split(r"(?<=[.?!])\s+", text):
        words = re.findall(r"[A-Za-z]+|\d+(?:\.\d+)?", sentence)
        found |= {w.lower() for w in words[1:] if w[0].isupper() or w[0].isdigit()}
        found |= {w for w in words[:1] if w[0].isdigit()}
    return found


def dominating_set(neighbours):
    """Greedy approximate minimum dominating set (MinPrompt): pick the remaining node of highest degree, remove it
    and its neighbours, update degrees, repeat until no node is left. Ties go to the lowest index.
    `neighbours[i]` is the set of nodes adjacent to i. Returns chosen node ids in the order picked."""
    remaining, chosen = set(range(len(neighbours))), []
    while remaining:
        best = max(sorted(remaining), key=lambda v: len(neighbours[v] & remaining))
        chosen.append(best)
        remaining -= neighbours[best] | {best}
    return chosen


def entity_graph(rows):
    """Rows are nodes; an edge joins two rows whose user turns share an entity."""
    ents = [entities(" ".join(m["content"] for m in r["messages"] if m["role"] == "user")) for r in rows]
    by_entity = {}
    for i, es in enumerate(ents):
        for e in es:
            by_entity.setdefault(e, set()).add(i)
    return [set().union(*(by_entity[e] for e in es)) - {i} if es else set() for i, es in enumerate(ents)]


def select_rows(rows, how, size, seed):
    if how == "all":
        return rows
    picked = dominating_set(entity_graph(rows))
    if how == "dominating_set":
        return [rows[i] for i in sorted(picked)]
    if how == "random":  # the paper's baseline: a random subset of the same size
        return random.Random(seed).sample(rows, size or len(picked))
    raise ValueError(f"--select must be all, dominating_set or random, not {how!r}")


# ---------------------------------------------------------------- the Code tool: a process-level sandbox
_PRELUDE = r"""
import os, resource, sys
cpu, mem, fsize, nproc, drop = map(int, sys.argv[1:6])
for kind, n in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_NPROC, (nproc, nproc))):
    resource.setrlimit(kind, n)
import math, cmath, decimal, fractions, statistics, itertools, functools, collections, re, json, random, datetime
if drop:  # root ignores RLIMIT_NPROC and file permissions: become nobody (after the imports: ~root may be 0700)
    os.setgroups([]), os.setgid(drop), os.setuid(drop)
home, WRITE = os.path.realpath("."), os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATHS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.link", "os.symlink",
         "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
def inside(p):
    p = os.path.realpath(os.fsdecode(p))
    return p == home or p.startswith(home + os.sep)
def hook(event, args):
    path = args[0] if args and isinstance(args[0], (str, bytes, os.PathLike)) else None
    if path is None or event not in PATHS | {"open"}:
        return
    if os.path.realpath(os.fsdecode(path)).startswith("/proc"):
        raise PermissionError(f"sandbox: no access to /proc ({os.fsdecode(path)})")
    if (event != "open" or (args[2] or 0) & WRITE or any(c in (args[1] or "") for c in "wax+")) and not inside(path):
        raise PermissionError(f"sandbox: no writes outside the working directory ({os.fsdecode(path)})")
sys.addaudithook(hook)
sys.argv = ["main.py"]
exec(compile(open("main.py", encoding="utf-8").read(), "main.py", "exec"), {"__name__": "__main__"})
"""


def run_python(code: str, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512, max_output: int = 4000,
               max_procs: int = 16) -> tuple:
    """SMART's Code tool: run model-written Python, return (ok, text): its stdout, or a short error ("timeout after
    5 s", "cpu time limit", "memory limit", "output limit", the last line of a traceback). Never raises.

    A separate process (`sys.executable -I`: no user site, no PYTHON* variables) in a new session, killed as a whole
    process group after `timeout_s` of wall time; limits on CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS),
    output file size (stdout/stderr go to files in its folder, RLIMIT_FSIZE) and processes (RLIMIT_NPROC); an empty
    temporary working folder, removed afterwards; an environment with PATH and a locale only. Run as root, the child
    becomes `nobody` (65534) before the code starts (after importing math, decimal, fractions, statistics, re, json
    and a few more: an interpreter under a private home folder is unreadable to nobody), so the process limit and
    file permissions bite and other processes' /proc/<pid>/environ is unreadable; an audit hook (sys.addaudithook)
    refuses writes outside its folder and opens under /proc. This is a process-level sandbox against accidents and
    a small model's mistakes, NOT a security boundary against a determined attacker (ctypes, a forked child that
    calls setsid, a kernel bug): for that, run it inside a container, gVisor or nsjail."""
    folder, fsize = None, max(65536, 16 * max_output)
    try:
        folder = tempfile.mkdtemp(prefix="sandbox-")
        Path(folder, "main.py").write_text(str(code), encoding="utf-8", errors="replace")
        drop = 65534 if hasattr(os, "geteuid") and os.geteuid() == 0 else 0
        if drop:
            os.chown(folder, drop, drop), os.chown(Path(folder, "main.py"), drop, drop)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": folder}
        limits = [str(int(x)) for x in (cpu_s, memory_mb * 2 ** 20, fsize, max_procs, drop)]
        with open(Path(folder, ".stdout"), "w+b") as out, open(Path(folder, ".stderr"), "w+b") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _PRELUDE, *limits], cwd=folder, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            for _ in range(3):  # the whole group, forked children too; again, for those forked during a kill
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.01)
            proc.wait()
            size = out.seek(0, 2)
            out.seek(0), err.seek(0)
            text = out.read(max_output + 1).decode("utf-8", "replace")
            tail = err.read()[-4096:].decode("utf-8", "replace")
        lines = [line for line in tail.splitlines() if line.strip()]
        if timed_out:
            return False, f"timeout after {timeout_s:g} s"
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return False, f"cpu time limit ({cpu_s} s)"
        if "MemoryError" in tail:
            return False, f"memory limit ({memory_mb} MB)"
        if size >= fsize or "File too large" in tail or proc.returncode == -signal.SIGXFSZ:
            return False, f"output limit ({fsize} bytes)"
        if proc.returncode != 0:
            return False, (lines[-1] if lines else f"exit code {proc.returncode}")[:300]
        return True, text if len(text) <= max_output else text[:max_output] + f"... [{size - max_output} more bytes]"
    except Exception as e:  # the caller (an evaluation loop) keeps running whatever the code string was
        return False, f"sandbox error: {type(e).__name__}: {e}"[:300]
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- objective and evaluation
def tokenize(tokenizer, rows, max_len):
    """Each row as a Rollout (ids, loss_mask); rows whose targets are all cut off by max_len are dropped."""
    out = []
    for row in rows:
        ids, mask = encode_chat(tokenizer, row["messages"])
        ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask):
            out.append(Rollout(ids, mask, [0.0] * len(ids), prompt_len=0))
    return out


def nll_sum(model, batch):
    """Summed next-token NLL over loss_mask tokens (assistant tokens and their end-of-turn), and the token count."""
    mask = batch["loss_mask"]  # the LM head runs only at these positions
    logp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], loss_mask=mask)  # (B, T)
    return -(logp * mask).sum(), mask.sum()


def cosine_lr(step, total, warmup_ratio):
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def heldout_loss(model, examples, pad_id, batch_size, device, rank=0, world=1):
    """Mean NLL per target token over all held-out examples (each process scores its slice; the sums are added)."""
    model.eval()
    total, count, mine = 0.0, 0.0, examples[rank::world]
    for i in range(0, len(mine), batch_size):
        s, n = nll_sum(model, collate(mine[i:i + batch_size], pad_id, device))
        total, count = total + float(s), count + float(n)
    return all_reduce(total) / max(all_reduce(count), 1.0)


def train_step(model, examples, optimizer, scheduler, guard, args, pad_id, device, rank=0, world=1):
    """One optimiser step on the step's global batch `examples` (the same list in every process): this process takes
    examples[rank::world] in micro-batches of batch_size. The loss is normalised by the target tokens of the whole
    global batch (all_reduce), so gradient accumulation and data parallelism both equal one large batch (not a mean
    of means); sync_gradients sums gradients over processes before clipping. A non-finite loss or gradient skips the
    step (FiniteGuard). -> (metrics, tokens this process read)."""
    model.train()
    mine = examples[rank::world]
    micro = [collate(mine[i:i + args.batch_size], pad_id, device) for i in range(0, len(mine), args.batch_size)]
    n_tokens = all_reduce(float(sum(b["loss_mask"].sum() for b in micro)))  # global target tokens of the step
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    loss_sum, tokens = 0.0, 0
    for batch in micro:
        with autocast:
            s, _ = nll_sum(model, batch)
        (s / n_tokens).backward()
        loss_sum, tokens = loss_sum + float(s.detach()), tokens + int(batch["attention_mask"].sum())
    sync_gradients(model)  # each gradient becomes its sum over processes (no-op in one process)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    loss = all_reduce(loss_sum) / n_tokens
    if guard.ok(loss, grad_norm):
        optimizer.step()
    scheduler.step(), optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
            "skipped_steps": guard.skipped}, tokens


def tool_decision(text):
    """'tool' if the first assistant turn asks for a tool, else 'direct'. Never raises."""
    if "(tool:" in text or re.search(r"^\s*(Code|Search):", text, re.M):
        return "tool"
    return "direct"


def decision_accuracy(model, tokenizer, rows, max_new_tokens):
    """Greedy first assistant turn on each held-out question; right when it calls a tool exactly when the row's
    knowledge-boundary label (`needs_tool`) says so."""
    model.eval()
    prompts = []
    for row in rows:
        first = next(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        prompts.append(row["messages"][:first])
    rollouts = start_rollouts(tokenizer, prompts)
    texts = generate(model, tokenizer, rollouts, max_new_tokens, temperature=0,
                     stop=("(tool:", "(general reasoning)", "### Final Response"), batch_size=32)
    calls = np.array([tool_decision(t) == "tool" for t in texts])
    needs = np.array([bool(r.get("needs_tool")) for r in rows])
    return {"decision_acc": float((calls == needs).mean()), "tool_rate": float(calls.mean()),
            "acc_needs_tool": float(calls[needs].mean()) if needs.any() else float("nan"),
            "acc_no_tool": float((~calls[~needs]).mean()) if (~needs).any() else float("nan")}, texts


def tool_request(text):
    """The last `Code: <expression>` or `Search: <query>` line of an assistant turn -> (tool, argument) or None."""
    found = re.findall(r"^\s*(Code|Search):[ \t]*(.*\S)", text, re.M)
    return found[-1] if found else None


def final_correct(text, answer):
    """The reference answer as a whole word (case-insensitive) in the final response: after the last '### Final
    Response', or the last assistant turn's text where the model never writes the marker. Never raises."""
    final = text.rsplit("### Final Response", 1)[-1]
    return bool(answer) and re.search(rf"(?<![\w.]){re.escape(str(answer).lower())}(?!\w)", final.lower()) is not None


def agentic_eval(model, tokenizer, rows, max_new_tokens, max_tool_calls, code_timeout_s=5.0):
    """SMART's evaluation on held-out rows: greedy assistant turns; a turn that ends in a `Code:` request has the
    expression run by run_python (the sandbox; errors come back as the output, as a tool would answer), a `Search:`
    request gets the row's own recorded tool output ('no result' for rows without one), inserted as a `tool` turn
    '- Output: ...' as in the training data; after each output the model continues, to its final response. At most
    max_tool_calls calls: a further request ends a wrong, unanswered episode.
    -> ({agent_acc, tool_calls (per question), code_errors}, transcripts)."""
    model.eval()
    chats = [list(r["messages"][:next((i for i, m in enumerate(r["messages"]) if m["role"] == "assistant"),
                                      len(r["messages"]))]) for r in rows]  # the prompt: up to the first answer
    recorded = [next((m["content"] for m in r["messages"] if m["role"] == "tool"), "- Output: no result") for r in rows]
    calls, errors, done, start = [0] * len(rows), 0, [False] * len(rows), [len(c) for c in chats]
    while not all(done):
        todo = [i for i in range(len(rows)) if not done[i]]
        texts = generate(model, tokenizer, start_rollouts(tokenizer, [chats[i] for i in todo]), max_new_tokens,
                         temperature=0, batch_size=32)
        for i, text in zip(todo, texts):
            text = text.split(tokenizer.eos_token)[0]
            chats[i].append({"role": "assistant", "content": text})
            request = tool_request(text) if "### Final Response" not in text else None
            if request is None or calls[i] >= max_tool_calls:
                done[i] = True
                continue
            calls[i] += 1
            ok, out = run_python(f"print({request[1]})", timeout_s=code_timeout_s) if request[0] == "Code" else \
                (True, recorded[i].removeprefix("- Output: "))
            errors += not ok
            chats[i].append({"role": "tool", "content": "- Output: " + (out.strip() if ok else f"error: {out}")})
    unanswered = [tool_request(c[-1]["content"]) is not None and "### Final Response" not in c[-1]["content"]
                  for c in chats]
    correct = [final_correct(c[-1]["content"], r.get("answer")) and not u for c, r, u in zip(chats, rows, unanswered)]
    return {"agent_acc": float(np.mean(correct)), "tool_calls": float(np.mean(calls)), "code_errors": errors}, \
        [{"id": r.get("id"), "correct": ok, "tool_calls": n, "messages": c[k:]}
         for r, ok, n, c, k in zip(rows, correct, calls, chats, start)]


# ---------------------------------------------------------------- training
def main(args):
    rank, world = distributed()  # torchrun: join the process group (before load_model); else (0, 1)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)  # no sampling: same on all ranks
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_rows = select_rows(load_rows(args.train_file), args.select, args.select_size, args.seed)
    eval_rows = load_rows(args.eval_file) if args.eval_file else []
    model, tokenizer = load_model(str(Path(args.resume) / "checkpoint") if args.resume else args.model, device)
    data_parallel(model, shard=args.fsdp)  # torchrun: DDP or FSDP2 (--fsdp); gradients summed in sync_gradients
    pad = tokenizer.pad_token_id
    train = tokenize(tokenizer, train_rows, args.max_len)
    held = tokenize(tokenizer, eval_rows[:args.eval_rows or None], args.max_len)
    probe = [r for r in eval_rows if "needs_tool" in r][:args.decision_rows]
    agent = [r for r in eval_rows if "answer" in r and "needs_tool" in r][:args.agent_rows]  # SMART-ER rows
    if not train:
        raise ValueError(f"{args.train_file}: no row has an assistant token within --max-len {args.max_len}")
    logger = RunLogger(args.exp_name, args.seed, args, args.output_dir, resume=args.resume)
    say = print if logger.main else (lambda *a, **k: None)
    say(f"run folder {logger.dir}; {len(train)} training rows ({args.select}), {len(held)} held-out rows, "
        f"{world} process(es)")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, args.max_steps,
                                                                                  args.warmup_ratio))
    guard = FiniteGuard(args.max_bad_steps)
    state = {"step": 0, "order": [], "cursor": 0, "tokens_seen": 0, "train_time": 0.0, "metrics": {},
             "summary": {"train_rows": len(train)}}
    if args.resume:  # optimizer, scheduler and RNGs in place; data order, cursor, counters and start metrics back
        state.update(logger.restore(optimizer, scheduler))
        guard.in_a_row, guard.skipped = state["guard"]
    else:
        if held:
            state["summary"]["eval_loss_start"] = heldout_loss(model, held, pad, args.batch_size, device, rank, world)
        gathered(model)  # FSDP: every process joins the all-gather; then rank 0 alone may sample
        if probe and logger.main:
            start, texts = decision_accuracy(model, tokenizer, probe, args.decision_tokens)
            state["summary"].update({f"{k}_start": v for k, v in start.items()})
        if agent and logger.main:
            start, _ = agentic_eval(model, tokenizer, agent, args.agent_tokens, args.max_tool_calls)
            state["summary"].update({f"{k}_start": v for k, v in start.items()})
    summary, metrics, order, cursor = state["summary"], state["metrics"], state["order"], state["cursor"]
    tokens_seen, t0 = state["tokens_seen"], time.time() - state["train_time"]

    def save(step):
        return logger.save(step, model, tokenizer, optimizer, scheduler, order=order, cursor=cursor,
                           tokens_seen=tokens_seen, train_time=time.time() - t0, metrics=metrics, summary=summary,
                           guard=(guard.in_a_row, guard.skipped))

    for step in tqdm(range(state["step"] + 1, args.max_steps + 1), desc="sft", disable=None if logger.main else True):
        batch = []
        for _ in range(args.grad_accum * world):  # the step's global batch, from a reshuffled epoch order
            if cursor + args.batch_size > len(order):
                order, cursor = random.sample(range(len(train)), len(train)), 0
            batch += [train[i] for i in order[cursor:cursor + args.batch_size]]
            cursor += args.batch_size
        metrics, tokens = train_step(model, batch, optimizer, scheduler, guard, args, pad, device, rank, world)
        tokens_seen += int(all_reduce(tokens))
        metrics["tokens_per_s"] = tokens_seen / (time.time() - t0)
        if held and (step % args.eval_every == 0 or step == args.max_steps):
            metrics["eval_loss"] = heldout_loss(model, held, pad, args.batch_size, device, rank, world)
        logger.log(step, metrics)
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save(step)

    train_time = time.time() - t0
    checkpoint = save(args.max_steps)
    summary.update({"final_loss": metrics.get("loss"), "train_time_s": round(train_time, 2),
                    "tokens_per_s": round(tokens_seen / train_time, 1), "checkpoint": str(checkpoint),
                    "skipped_steps": guard.skipped})
    if held:
        summary["eval_loss_end"] = metrics.get("eval_loss") or heldout_loss(model, held, pad, args.batch_size,
                                                                              device, rank, world)
    gathered(model)
    if probe and logger.main:
        end, texts = decision_accuracy(model, tokenizer, probe, args.decision_tokens)
        summary.update({f"{k}_end": v for k, v in end.items()})
        with open(logger.dir / "decisions.jsonl", "w") as f:
            for row, text in zip(probe, texts):
                f.write(json.dumps({"id": row.get("id"), "needs_tool": row["needs_tool"], "completion": text,
                                    "decision": tool_decision(text)}) + "\n")
    if agent and logger.main:
        end, transcripts = agentic_eval(model, tokenizer, agent, args.agent_tokens, args.max_tool_calls)
        summary.update({f"{k}_end": v for k, v in end.items()})
        (logger.dir / "agent.jsonl").write_text("".join(json.dumps(t) + "\n" for t in transcripts))
    summary = logger.finish(summary)
    say(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(parse_args(Args))
