"""OTC: tool-efficient RL (PPO with a value head and GAE, or GRPO) on multi-turn Search-R1-style search rollouts.

Paper: Wang et al. 2025, "Acting Less is Reasoning More! Teaching Model to Act Efficiently" (OTC, arXiv 2504.14870), on
the Search-R1 recipe (Jin et al. 2025, arXiv 2503.09516). The policy thinks, searches with <search> q </search>, reads
the results in <information> ... </information> (not trained on: loss_mask 0) and answers with <answer> a </answer>.
`--reward em` is Search-R1's exact match; `--reward otc` multiplies it by the OTC tool reward of a rollout's m calls:
cos(m pi / (2m + c)) for PPO; for GRPO one peaking at m = n, the question's fewest calls in a correct rollout so far.

Differences from the paper and Search-R1, and why:
1. Value model: a linear head on the policy's last hidden state, trunk detached by default (paper: a separate critic
   LLM, own lr): on a 2-core CPU a second 135M trunk doubles every pass, and a value loss into the shared trunk
   (`--value-grad-to-trunk true`) moves the policy's features at the head's much larger lr. In checkpoint/value_head.pt.
2. Retrieved passages come back as a `tool` chat turn (Search-R1 splices them into the assistant's text): a real turn
   structure, and algos/sft.py's masking trains the warm start on exactly the token layout the rollouts produce.
3. Retrieval: BM25 (bm25s) over a small fictional + real-fact corpus in data/ (the paper: E5 over Wikipedia 2018).
4. Data: data/make_otc_qa.py's knowledge-boundary QA (not NQ + HotpotQA), a known optimal call count (0, 1 or 2) per
   question; run.sh's warm start answers each memory question both directly and after a search (data/README.md).
5. Scale: SmolLM2-135M on a CPU; run.sh's arms: GRPO, 12 steps x 4 questions x 4 rollouts, lr 2e-5 (paper: 7B, 1e-6).
6. No correct rollout of a question yet, so no n (paper: silent): OTC-GRPO uses the OTC-PPO form (EM is 0 anyway).
7. KL 0.001 (paper; run.sh's CPU arms: 0, ~1e-5 of their loss): k1 in PPO's reward (verl), k3 loss in GRPO; no entropy.
8. Calls: only executed searches count; a search written after the c-th one ends the rollout unexecuted.
9. GRPO runs a question's prompt once for its G rollouts in training (algos/model.py; exact), so minibatches hold
   whole groups; micro-batches are sized in tokens. PPO runs each row alone (the value head reads its hidden states).
10. old_logp: the sampler's (verl: an extra pass), recomputed with `--precision bf16` (autocast trunk, fp32 rest).

Usage:
    bash run.sh otc_ppo      # data if missing (data/make_otc_qa.py), SFT warm start, EM vs OTC arms, EM/TC/TP table
    torchrun --nproc_per_node 2 algos/otc_ppo.py --model <sft checkpoint> [--fsdp true] [--precision bf16]   # README.md
    python algos/otc_ppo.py --model tiny --total-steps 2 --prompts-per-step 2 --max-turn-tokens 8   # smoke, seconds
Expected (run.sh's arms, 2-core CPU): 12-17 min per arm; 1-2 calls per question under EM, 1 under OTC (README.md).
"""
import copy
import json
import math
import os
import random
import re
import string
import sys
import time
import urllib.request  # also loads urllib.error
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from algos.model import (FiniteGuard, RunLogger, all_reduce, append_tokens, arg, clip_grad_norm, collate,  # noqa: E402
                         data_parallel, distributed, file_error, gather, generate, load_model, model_error,
                         parse_args, render_chat, rows_at, seed_of, sequence_logprobs, start_rollouts, sync_gradients)
from kernels.advantage import LOSS_TYPES, group_advantages, policy_loss  # noqa: E402


def positive(value):  # check= for rates, temperatures and clip ranges: arg's low= bound is inclusive, 0 is no use
    return None if value > 0 else "must be > 0"


@dataclass
class Args:
    exp_name: str = arg("otc_ppo", "run name; the run folder is <runs_dir>/<exp_name>__<seed>__<time>")
    seed: int = arg(1, "seed for python, numpy, torch, each step's sampling (per process) and the data order")
    model: str = arg("smollm2-135m", "smollm2-135m | tiny | hub id | local folder (SFT checkpoint)", check=model_error)
    runs_dir: str = arg("runs", "where run folders go")
    resume: str = arg("", "a run folder: continue it from <run>/checkpoint (same arguments; KL reference: --model)",
                      check=lambda r: r and not Path(r, "checkpoint/trainer_state.pt").is_file() and "no checkpoint")
    save_every: int = arg(0, "save the resumable <run>/checkpoint every N steps (0: at the end only)", low=0)
    max_bad_steps: int = arg(3, "stop after this many optimizer steps in a row with a non-finite loss/gradient", low=1)
    fsdp: bool = arg(False, "under torchrun: shard the policy with FSDP2 instead of DDP (same update; no --resume)")
    train_file: str = arg("data/otc_train.jsonl", "QA rows for RL (data/make_otc_qa.py)",
                          check=lambda p: file_error(p or "''"))
    test_file: str = arg("data/otc_test.jsonl", "held-out QA rows for EM / TC / TP; '' = none", check=file_error)
    corpus_file: str = arg("data/otc_corpus.jsonl", "passages for the local BM25 index",
                           check=lambda p: file_error(p or "''"))
    retriever: str = arg("bm25", "bm25 (local index of corpus_file) | http://host:port of a Search-R1 server",
                         check=lambda v: v != "bm25" and not v.startswith("http") and "bm25 or an http:// address")
    retrieval_timeout: float = arg(10.0, "seconds to wait for the retrieval server", check=positive)
    topk: int = arg(3, "passages per search (paper: 3)", low=1)
    estimator: str = arg("ppo", "ppo (Search-R1: value head + GAE) | grpo (group-normalised)", choices=["ppo", "grpo"])
    reward: str = arg("otc", "em (Search-R1: exact match only) | otc (EM x OTC tool reward)", choices=["em", "otc"])
    max_calls: int = arg(4, "c: most searches per rollout, then one last turn without search (paper: 4)", low=0)
    total_steps: int = arg(8, "RL steps (rollout + update)", low=0)
    prompts_per_step: int = arg(0, "questions per step; 0 = auto: 8 / group_size (8 rollouts per step)", low=0)
    group_size: int = arg(0, "rollouts per question; 0 = auto: 1 for ppo, 4 for grpo (paper's GRPO: 5)", low=0)
    max_turn_tokens: int = arg(40, "sampled tokens per assistant turn", low=1)
    temperature: float = arg(1.0, "sampling temperature", check=positive)
    lr: float = arg(5e-5, "policy Adam lr (paper: 1e-6 for 7B and ~1000 steps)", check=positive)
    critic_lr: float = arg(1e-3, "value head lr (paper's critic: 1e-5, a whole LLM)", check=positive)
    value_grad_to_trunk: bool = arg(False, "let the value loss train the shared trunk (docstring, difference 1)")
    vf_coef: float = arg(0.5, "value loss weight", low=0)
    clip_value: float = arg(0.2, "value clip range around the rollout-time value (clipped value loss)", check=positive)
    gamma: float = arg(1.0, "GAE discount (Search-R1: 1)", low=0, high=1)
    lam: float = arg(1.0, "GAE lambda (Search-R1: 1)", low=0, high=1)
    whiten: bool = arg(True, "whiten PPO advantages over sampled tokens of the batch (Search-R1/verl)")
    beta: float = arg(0.001, "KL coefficient to the frozen start (paper: 0.001); 0 skips the reference model", low=0)
    kl_mode: str = arg("auto", "reward (k1 in the PPO reward) | loss (k3) | auto: ppo reward, grpo loss (Search-R1)",
                       choices=["auto", "reward", "loss"])
    ent_coef: float = arg(0.0, "entropy bonus (needs full logits; Search-R1: 0.001)", low=0)
    num_minibatches: int = arg(2, "optimizer steps per rollout batch", low=1)
    ppo_epochs: int = arg(1, "passes over the rollout batch", low=1)
    micro_batch_tokens: int = arg(0, "tokens per forward/backward; 0 = auto: 1024 on CPU (about one 5-turn rollout; 4 "
                                  "of them took ~10 GB: OOM-killed on the 2-core machine), 16384 on GPU", low=0)
    shared_prefix: bool = arg(True, "GRPO: a question's prompt runs once for its G rollouts (exact); PPO never shares")
    clip_low: float = arg(0.2, "PPO clip epsilon below 1", low=0, high=1)
    clip_high: float = arg(0.2, "PPO clip epsilon above 1", low=0)
    loss_type: str = arg("dapo", "dapo (token mean over a minibatch, verl) | bnpo | grpo | dr_grpo", choices=LOSS_TYPES)
    adv_scale: str = arg("group", "GRPO advantage scaling (Dr. GRPO: none)", choices=["group", "batch", "none"])
    adv_eps: float = arg(1e-6, "GRPO advantage epsilon (verl: 1e-6)", low=0)
    old_logp: str = arg("auto", "old_logp source: sampler log-probs | recompute (extra no-grad pass, as verl) | auto: "
                        "sampler in fp32, recompute in bf16", choices=["auto", "sampler", "recompute"])
    precision: str = arg("fp32", "bf16: autocast rollouts, log-prob passes (difference 10)", choices=["fp32", "bf16"])
    max_grad_norm: float = arg(1.0, "gradient clipping", check=positive)
    eval_before: bool = arg(True, "score the test set before training too")
    eval_items: int = arg(0, "test rows scored (0 = all)", low=0)
    gen_batch_size: int = arg(32, "sequences per generation batch", low=1)
    save_model: bool = arg(True, "save the trained model and value head to <run>/checkpoint (resumable)")

    def __post_init__(self):  # the auto fields, then rules joining fields (parse_args: a ValueError is a usage error)
        self.group_size = self.group_size or (1 if self.estimator == "ppo" else 4)
        self.prompts_per_step = self.prompts_per_step or max(8 // self.group_size, 1)
        self.kl_mode = {"auto": "reward" if self.estimator == "ppo" else "loss"}.get(self.kl_mode, self.kl_mode)
        self.old_logp = self.old_logp.replace("auto", "recompute" if self.precision == "bf16" else "sampler")
        self.micro_batch_tokens = self.micro_batch_tokens or (16384 if torch.cuda.is_available() else 1024)
        self.shared_prefix = self.shared_prefix and self.estimator == "grpo"  # the value head needs each row's states
        if self.estimator == "grpo" and (self.group_size < 2 or self.kl_mode == "reward"):
            raise ValueError("--estimator grpo needs --group-size >= 2 and --kl-mode loss (a reward per rollout)")
        if self.prompts_per_step * (1 if self.shared_prefix else self.group_size) % self.num_minibatches:
            raise ValueError(f"--num-minibatches {self.num_minibatches} must divide a step's groups (GRPO) or rows")
        if self.prompts_per_step % int(os.environ.get("WORLD_SIZE", 1)):  # whole questions, as many per process
            raise ValueError(f"--prompts-per-step {self.prompts_per_step} must split evenly over torchrun's processes")


# ---------------------------------------------------------------- prompt and actions
PROMPT = """Answer the question below. First think briefly between <think> and </think>. If you need a fact you \
do not know, search for it with <search> query </search>; the results come back between <information> and \
</information>. Every search has a cost, so search only for what you cannot answer yourself. When you are ready, \
write the short final answer between <answer> and </answer>.
Question: {question}"""
STOPS = ("</search>", "</answer>")
INVALID = "Invalid action. To search, write <search> query </search>. To answer, write <answer> answer </answer>."
ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


def parse_action(text):
    """("search", query) | ("answer", answer) | ("invalid", "") for one assistant turn. Never raises."""
    found = ACTION.search(text or "")
    return (found.group(1), found.group(2).strip()) if found else ("invalid", "")


def format_docs(docs):
    """Passages as the policy reads them inside <information>: 'Doc 1(Title: t) text' lines (Search-R1)."""
    body = "\n".join(f"Doc {i}(Title: {d['title']}) {d['text']}" for i, d in enumerate(docs, 1))
    return f"<information>{body or 'No results.'}</information>"


def env_turn(tokenizer):
    """-> add(rollout, content): closes the assistant turn (unless it ended with EOS), then a tool turn holding content
    and the next assistant header (loss_mask 0), in the chat template's text around a tool turn, e.g. ChatML
    '<|im_end|>\\n<|im_start|>tool\\n' before the content and '<|im_end|>\\n<|im_start|>assistant\\n' after it."""
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "tool", "content": "B"}]
    text, eos = render_chat(tokenizer, msgs, add_generation_prompt=True), tokenizer.eos_token
    before, _, after = text[text.rindex("A") + 1:].rpartition("B")

    def add(rollout, content):
        ended = rollout.token_ids[-1] == tokenizer.eos_token_id and before.startswith(eos)
        text = before[len(eos):] if ended else before
        append_tokens(rollout, tokenizer.encode(text + content + after, add_special_tokens=False))
    return add


# ---------------------------------------------------------------- rewards (pure functions)
def normalize_answer(s: str) -> str:
    """SQuAD/Search-R1 normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def em_reward(answer, golds) -> float:
    """1.0 when the extracted answer equals one gold answer after normalisation; 0.0 otherwise or with no answer."""
    return float(isinstance(answer, str) and normalize_answer(answer) in {normalize_answer(g) for g in golds})


def otc_ppo_tool_reward(m: int, c: int) -> float:
    """OTC-PPO: cos(m pi / (2m + c)): 1 at m = 0, falling towards cos(pi/2) = 0 as m grows; c = call budget."""
    return 1.0 if m == 0 else math.cos(m * math.pi / (2 * m + c))


def otc_grpo_tool_reward(m: int, n, c: int) -> float:
    """OTC-GRPO, n = fewest calls of a correct rollout of this question so far: n = 0 or None (none correct yet,
    difference 6) -> the OTC-PPO form; else sin(f pi / (2n)), f = 2nm / (m + n): 1 at m = n, smaller on both sides."""
    return otc_ppo_tool_reward(m, c) if not n else math.sin((2 * n * m / (m + n)) * math.pi / (2 * n))


def otc_rewards(episodes, rows, args, best_calls):
    """Named reward components per rollout. OTC-GRPO first adds this batch of every process to best_calls (question id
    -> fewest calls of a correct rollout): n covers this group and earlier visits, the same in all processes."""
    qs = [rows[i // args.group_size] for i in range(len(episodes))]  # each rollout's question
    em = [em_reward(e["answer"], q["answers"]) for e, q in zip(episodes, qs)]
    for qid, m in sum(gather([(q["id"], e["calls"]) for e, q, ok in zip(episodes, qs, em) if ok == 1.0]), []):
        best_calls[qid] = min(best_calls.get(qid, m), m)
    tool = [otc_grpo_tool_reward(e["calls"], best_calls.get(q["id"]), args.max_calls) if args.estimator == "grpo"
            else otc_ppo_tool_reward(e["calls"], args.max_calls) for e, q in zip(episodes, qs)]
    return [{"em": m, "tool": t, "total": m * t if args.reward == "otc" else m} for m, t in zip(em, tool)]


# ---------------------------------------------------------------- GAE, whitening, losses (pure functions)
def gae(rewards, values, mask, gamma=1.0, lam=1.0):
    """GAE over sampled tokens (mask 1) -> (advantages, returns), (B, T), 0 elsewhere; values[t]: V before token t. A
    retrieved span is the environment's transition: the token before it bootstraps from V at the next sampled one."""
    adv, last_gae = torch.zeros_like(rewards), rewards.new_zeros(len(rewards))
    next_value = last_gae  # 0 after the last token (never changed in place)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t] > 0
        g = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last_gae  # delta_t + gamma lam A_t+1
        adv[:, t] = torch.where(m, g, 0.0)
        last_gae = torch.where(m, g, last_gae)
        next_value = torch.where(m, values[:, t], next_value)
    return adv, (adv + values) * mask


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries of all processes (so 2 processes = 1); 0 elsewhere."""
    n = all_reduce(mask.sum()).clamp(min=1)
    mean = all_reduce((x * mask).sum()) / n
    var = all_reduce((((x - mean) * mask) ** 2).sum()) / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def value_loss(values, old_values, returns, mask, clip):
    """PPO's clipped value loss per token, 0.5 max((V - R)^2, (V_clip - R)^2), summed over the mask (B, T)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return (0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2) * mask).sum()


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over all processes' sampled tokens (1: perfect critic, 0: a constant, nan: R flat)."""
    r, d = returns[mask > 0].double(), (returns - values)[mask > 0].double()
    n, s_r, q_r, s_d, q_d = all_reduce(torch.stack([r.new_tensor(r.numel()), r.sum(), r.square().sum(), d.sum(),
                                                    d.square().sum()])).tolist()
    var_r = (q_r - s_r ** 2 / n) / max(n - 1, 1)
    return float("nan") if n < 2 or var_r < 1e-12 else 1 - (q_d - s_d ** 2 / n) / max(n - 1, 1) / var_r


# ---------------------------------------------------------------- retrieval
class RetrievalError(RuntimeError):
    """The retrieval server could not be reached in time or sent a reply that is not Search-R1's format."""


class BM25Retriever:
    """BM25 (bm25s) of passages; search(queries, topk) -> per query [{"title", "text", "score"}] with score > 0."""

    def __init__(self, passages):
        import bm25s
        self.passages, self.index = passages, bm25s.BM25()
        self._tok = lambda texts: bm25s.tokenize(texts, stopwords="en", show_progress=False)
        self.index.index(self._tok([f"{p['title']} {p['text']}" for p in passages]), show_progress=False)

    def search(self, queries, topk):
        if not queries:
            return []
        docs, scores = self.index.retrieve(self._tok([q or "-" for q in queries]), k=min(topk, len(self.passages)),
                                           show_progress=False)
        return [[{**{f: self.passages[int(d)][f] for f in ("title", "text")}, "score": float(s)}
                 for d, s in zip(row_d, row_s) if s > 0] for row_d, row_s in zip(docs, scores)]


class SearchR1Client:
    """Client of a Search-R1 retrieval server: POST <url>/retrieve {"queries", "topk", "return_scores": true} ->
    {"result": [[{"document": {"contents": "\\"Title\\"\\ntext"}, "score": s}, ...] per query]}."""

    def __init__(self, url, timeout=10.0):
        self.url, self.timeout = url.rstrip("/") + "/retrieve", timeout

    def search(self, queries, topk):
        if not queries:
            return []
        body = json.dumps({"queries": list(queries), "topk": topk, "return_scores": True}).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url, body, {"Content-Type": "application/json"}),
                                        timeout=self.timeout) as response:
                raw = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            raise RetrievalError(f"{self.url}: HTTP {e.code}: {e.read()[:300]!r}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise RetrievalError(f"{self.url}: no reply within {self.timeout} s ({e})") from None
        try:
            result = json.loads(raw)["result"]
            assert isinstance(result, list) and len(result) == len(queries)
            return [[self._doc(hit) for hit in hits] for hits in result]
        except (ValueError, KeyError, TypeError, AssertionError, AttributeError, IndexError):
            raise RetrievalError(f"{self.url}: not a Search-R1 /retrieve reply for {len(queries)} queries: "
                                 f"{raw[:300]!r}") from None

    @staticmethod
    def _doc(hit):
        title, _, text = hit.get("document", hit)["contents"].partition("\n")
        return {"title": title.strip().strip('"'), "text": text.strip(), "score": hit.get("score")}


# ---------------------------------------------------------------- data
QA_FIELDS = {"id": str, "question": str, "answers": list, "kind": str, "optimal_calls": int}


def load_jsonl(path, fields):
    """Rows of a JSONL file; a bad line, a missing or wrongly typed field stops the run naming file, line and field."""
    rows = []
    for i, line in enumerate(open(path), 1):
        try:
            rows.append(row := json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: not a JSON object")
        for k, kind in fields.items():
            if k not in row:
                raise ValueError(f"{path}:{i}: missing field {k!r}")
            if not isinstance(row[k], kind) or (kind is list and not all(isinstance(a, str) for a in row[k])):
                raise ValueError(f"{path}:{i}: field {k!r} is not a {kind.__name__}" + " of strings" * (kind is list))
    return rows


# ---------------------------------------------------------------- rollout and evaluation
def run_episodes(model, tokenizer, questions, retriever, args, n, temperature):
    """Multi-turn rollouts, n per question in a row, each turn until </search> or </answer>: a search's passages come
    back as a tool turn (loss_mask 0), an invalid turn gets INVALID, the last turn's search is not run."""
    rollouts = start_rollouts(tokenizer, [[{"role": "user", "content": PROMPT.format(question=q)}] for q in questions],
                              n=n)
    episodes = [{"calls": 0, "invalid": 0, "answer": None} for _ in rollouts]
    finished, add_turn = [False] * len(rollouts), env_turn(tokenizer)
    for turn in range(args.max_calls + 1):  # generate runs the rollouts not done; add_turn (append_tokens) undoes done
        with torch.autocast(model.device.type, torch.bfloat16, enabled=args.precision == "bf16"):  # (and evaluate)
            texts = generate(model, tokenizer, rollouts, args.max_turn_tokens, temperature, stop=STOPS,
                             batch_size=args.gen_batch_size, keep_cache=turn < args.max_calls)  # next turn: new tokens
        searches, last = [], turn == args.max_calls
        for i in [i for i, f in enumerate(finished) if not f]:
            kind, content = parse_action(texts[i].split(tokenizer.eos_token)[0])
            episodes[i]["invalid"] += kind == "invalid"
            finished[i] = kind == "answer" or last  # after the c-th search a search is not executed
            if kind == "answer":
                episodes[i]["answer"] = content
            elif kind == "search" and not last:
                searches.append((i, content))
            elif not last:
                add_turn(rollouts[i], INVALID)
        for (i, query), docs in zip(searches, retriever.search([q for _, q in searches], args.topk)):
            episodes[i]["calls"] += 1
            add_turn(rollouts[i], format_docs(docs))
        if all(finished):
            break
    for r in rollouts:
        r.cache = None  # the keys/values kept between turns
    return rollouts, episodes


@torch.no_grad()
def evaluate(model, tokenizer, rows, retriever, args, path):
    """Greedy test rollouts -> EM, TC, TP (None without calls), overall and per kind; predictions in path."""
    rank, world = distributed()
    share = [r["question"] for r in rows[rank * len(rows) // world:(rank + 1) * len(rows) // world]]
    episodes = sum(gather(run_episodes(model, tokenizer, share, retriever, args, 1, 0.0)[1]), [])
    em = [em_reward(e["answer"], r["answers"]) for e, r in zip(episodes, rows)]
    lines = [json.dumps({"id": r["id"], "kind": r["kind"], "optimal_calls": r["optimal_calls"], "em": ok, **e},
                        ensure_ascii=False) + "\n" for r, e, ok in zip(rows, episodes, em)]
    _ = rank == 0 and Path(path).write_text("".join(lines))
    out = {}
    for kind in ["all"] + sorted({r["kind"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if kind in ("all", r["kind"])]
        calls, correct = sum(episodes[i]["calls"] for i in idx), sum(em[i] for i in idx)
        k, n = "" if kind == "all" else f"/{kind}", len(idx)
        out.update({f"em{k}": correct / n, f"tc{k}": calls / n, f"tp{k}": correct / calls if calls else None})
    return out


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


def _logprobs(model, value_head, data, mb, args, entropy=False):
    """(logp, values, entropy) of rows mb, each (b, width) fp32, padding trimmed; t: about token t (logp, entropy: 0 off
    the loss_mask); a GRPO group's prompt once. values (None without a head): the head on the trunk's state before t."""
    width, hidden = int(data["attention_mask"][mb].sum(1).max()), []
    hook = value_head and model.base_model.register_forward_hook(lambda m, i, o: hidden.append(o.last_hidden_state))
    try:  # --precision bf16: the trunk and LM head under autocast, fp32 log-probs out; the value head stays fp32
        with torch.autocast(data["input_ids"].device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            out = sequence_logprobs(model, data["input_ids"][mb, :width], data["attention_mask"][mb, :width],
                                    args.temperature, entropy, share_prefix=args.shared_prefix,
                                    loss_mask=data["loss_mask"][mb, :width])  # (b, width) each
    finally:
        _ = hook and hook.remove()
    h = hidden and (hidden[0] if args.value_grad_to_trunk else hidden[0].detach())[:, :-1].float()  # (b, width - 1, H)
    values = value_head and torch.nn.functional.pad(value_head(h).squeeze(-1), (1, 0))  # (b, width)
    return (out[0], values, out[1]) if entropy else (out, values, None)


@torch.no_grad()
def _logprobs_in_chunks(model, value_head, data, args):
    """(log-probs, values or None), each (N, T), in token-sized micro-batches."""
    logp, values = torch.zeros_like(data["loss_mask"]), torch.zeros_like(data["loss_mask"])  # (N, T)
    for mb in micro_batches(data, range(len(logp)), args):
        lp, v, _ = _logprobs(model, value_head, data, mb, args)
        logp[mb, :lp.shape[1]], values[mb, :lp.shape[1]] = lp, 0.0 if v is None else v
    return logp, (None if value_head is None else values)


def ppo_update(model, value_head, optimizer, data, advantages, args, old_logp, ref_logp=None, old_values=None,
               returns=None, guard=None, seed=0):
    """Step 5 on this process's rows: ppo_epochs x num_minibatches optimizer steps over token-sized micro-batches. A
    minibatch: a share of a permutation (`seed`, the same in every process) of all processes' groups (or rows); losses
    over its global row and token counts make sync_gradients' sum the one-process gradient. advantages: (N,) per row
    (GRPO) or (N, T) per token (PPO: old_values, returns (N, T) train the value head); ref_logp: k3 loss (kl_mode loss).
    Rows of zero gradient (GRPO advantage 0, no KL or entropy) are skipped, still counted; non-finite steps too (guard).
    -> token-weighted means of all processes, mean grad_norm and minibatch policy_loss, skipped_steps."""
    (rank, world), guard = distributed(), guard or FiniteGuard(args.max_bad_steps)
    loss_mask = data["loss_mask"]  # (N, T): 1 on sampled tokens only; prompt, tool turns and padding 0
    assert all_reduce(float(loss_mask.sum())) > 0, "empty loss_mask"
    ppo, kl_ref = returns is not None, ref_logp if args.kl_mode == "loss" else None
    tol = (5e-2, 1e-2) if args.precision == "bf16" else (1e-2, 1e-3)  # |ratio - 1|, approx_kl: bf16 rounding
    skip = advantages.dim() == 1 and kl_ref is None and args.ent_coef == 0
    active = (advantages != 0).cpu() if skip else torch.ones(len(loss_mask), dtype=torch.bool)  # (N,)
    unit = args.group_size if args.shared_prefix else 1  # minibatches of whole groups (or rows)
    n, gen = len(loss_mask) // unit, torch.Generator().manual_seed(seed)  # this process: units rank * n + (0..n-1)
    keys = ["clipfrac", "approx_kl", "ratio_mean"] + ["kl"] * (kl_ref is not None) + ["value_loss"] * ppo
    keys += ["entropy"] * (args.ent_coef > 0)
    sums, steps = torch.zeros(len(keys) + 1, dtype=torch.float64), []  # the keys' token-weighted sums, then tokens
    for epoch in range(args.ppo_epochs):
        for m, units in enumerate(torch.randperm(n * world, generator=gen).view(args.num_minibatches, -1)):
            mini_rows, units = len(units) * unit, units[units // n == rank] - rank * n  # this process's share
            idx = (units[:, None] * unit + torch.arange(unit)).flatten()  # its rows of minibatch m (maybe none)
            mini_tokens = all_reduce(float(loss_mask[idx].sum()))  # global counts
            optimizer.zero_grad(set_to_none=False)  # zero tensors, not None: Adam steps even when all were skipped
            mini_loss = torch.zeros(2, dtype=torch.float64)  # this process's share: whole loss, policy part
            for k, mb in enumerate(micro_batches(data, idx[active[idx]], args)):
                logp, values, ent = _logprobs(model, value_head if ppo else None, data, mb, args, args.ent_coef > 0)
                width, n_tok = logp.shape[1], float(loss_mask[mb].sum())
                mask, adv = loss_mask[mb, :width], advantages[mb, :width] if advantages.dim() == 2 else advantages[mb]
                loss, metrics = policy_loss(
                    logp, old_logp[mb, :width], adv, mask, args.clip_low, args.clip_high,
                    None if kl_ref is None else kl_ref[mb, :width], args.beta, args.loss_type,
                    args.max_turn_tokens * (args.max_calls + 1), num_active_tokens=mini_tokens)  # mask: (b, width)
                weighted = total = loss * micro_weight(args.loss_type, len(mb), mini_rows, n_tok, mini_tokens)
                if ppo:  # value loss: token mean over the minibatch
                    v_loss = value_loss(values, old_values[mb, :width], returns[mb, :width], mask, args.clip_value)
                    total = total + args.vf_coef * v_loss / max(mini_tokens, 1.0)
                    metrics["value_loss"] = v_loss.detach() / max(n_tok, 1.0)
                if ent is not None:
                    ent_sum = (ent * mask).sum()
                    total = total - args.ent_coef * ent_sum / max(mini_tokens, 1.0)
                    metrics["entropy"] = ent_sum.detach() / max(n_tok, 1.0)
                total.backward()
                mini_loss += torch.tensor([total.item(), weighted.item()], dtype=torch.float64)
                if epoch == 0 and m == 0 and k == 0:  # nothing updated yet: the policy is still the sampler
                    ratio, akl = float(metrics["ratio_mean"]), float(metrics["approx_kl"])
                    assert abs(ratio - 1) < tol[0] and akl < tol[1], \
                        f"first minibatch: ratio_mean {ratio}, approx_kl {akl}: sampler and trainer disagree"
                assert "kl" not in metrics or float(metrics["kl"]) >= -1e-6, "k3 KL < 0"
                sums += torch.tensor([float(metrics[k]) * n_tok for k in keys] + [n_tok])
            sync_gradients(model), sync_gradients(value_head)  # each gradient: its sum over processes
            params = [p for g in optimizer.param_groups for p in g["params"]]  # policy and value head
            grad_norm = clip_grad_norm(params, args.max_grad_norm)  # (torch's, or FSDP's shards with the head)
            mini_loss = all_reduce(mini_loss)
            if guard.ok(mini_loss[0], grad_norm):  # the same decision in every process
                optimizer.step()
            steps.append([float(grad_norm), float(mini_loss[1])])
    sums = all_reduce(sums)
    return {**{k if k != "kl" else "kl_loss": float(s / max(sums[-1], 1e-9)) for k, s in zip(keys, sums)},
            **dict(zip(["grad_norm", "policy_loss"], np.mean(steps, 0).tolist())), "skipped_steps": guard.skipped}


def advantages_and_targets(model, value_head, ref_model, data, rewards, args):
    """Steps 3-4 for this process's rows (rewards (B*G,): all processes') -> (the update's inputs, logs): old_logp,
    ref_logp, rollout-time values (no grad), then PPO's GAE whitened over all processes, or GRPO's group advantages."""
    loss_mask, device = data["loss_mask"], data["loss_mask"].device  # (N, T)
    old_logp, old_values, ref_logp, returns, logs = data["sample_logp"], None, None, None, {}
    if value_head is not None or args.old_logp == "recompute":  # no-grad passes (_logprobs_in_chunks)
        recomputed, old_values = _logprobs_in_chunks(model, value_head, data, args)
        old_logp = recomputed if args.old_logp == "recompute" else old_logp
    if ref_model is not None:
        ref_logp = _logprobs_in_chunks(ref_model, None, data, args)[0]
        delta = (ref_logp - old_logp) * loss_mask
        kl, tokens = all_reduce(torch.stack([((delta.exp() - delta - 1) * loss_mask).sum(), loss_mask.sum()]))
        logs["kl"] = float(kl / tokens)
    rank, N = distributed()[0], len(loss_mask)
    if args.estimator == "ppo":
        last = (loss_mask * torch.arange(loss_mask.shape[1], device=device)).argmax(1)  # last sampled token
        token_rewards = torch.zeros_like(loss_mask)
        token_rewards[torch.arange(N), last] = rewards[rank * N:(rank + 1) * N].to(device)  # outcome reward there
        if args.kl_mode == "reward" and ref_logp is not None:
            token_rewards = token_rewards - args.beta * (old_logp - ref_logp) * loss_mask  # k1 per token
        advantages, returns = gae(token_rewards, old_values * loss_mask, loss_mask, args.gamma, args.lam)
        logs["explained_variance"] = explained_variance(old_values, returns, loss_mask)
        advantages = masked_whiten(advantages, loss_mask) if args.whiten else advantages  # (N, T)
    else:  # whole batch (adv_scale batch: the std of all rewards), then this process's rows
        advantages = group_advantages(rewards, args.group_size, scale=args.adv_scale, eps=args.adv_eps)
        advantages = advantages[rank * N:(rank + 1) * N].to(device)  # (N,)
    return dict(advantages=advantages, old_logp=old_logp, ref_logp=ref_logp, old_values=old_values,
                returns=returns), logs


def main(args):
    rank, world = distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)
    B, G, b = args.prompts_per_step, args.group_size, args.prompts_per_step // world  # b: questions per process
    model, tokenizer = load_model(str(Path(args.resume) / "checkpoint") if args.resume else args.model)
    ref_model = None if args.beta == 0 else load_model(args.model)[0] if args.resume else copy.deepcopy(model)
    value_head = torch.nn.Linear(model.config.hidden_size, 1).to(model.device) if args.estimator == "ppo" else None
    if value_head is not None:  # the same in every process: zero (V = 0), or the critic saved with --model's policy
        torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias), data_parallel(value_head)
        if (Path(args.model) / "value_head.pt").exists():
            value_head.load_state_dict(torch.load(Path(args.model) / "value_head.pt"))
    data_parallel(model, shard=args.fsdp)  # torchrun: DDP or FSDP2 (--fsdp); gradients summed by sync_gradients
    train = load_jsonl(args.train_file, QA_FIELDS)
    tests = load_jsonl(args.test_file, QA_FIELDS)[:args.eval_items or None] if args.test_file else []
    retriever = SearchR1Client(args.retriever, args.retrieval_timeout) if args.retriever.startswith("http") else \
        BM25Retriever(load_jsonl(args.corpus_file, {"id": str, "title": str, "text": str}))
    say(f"train/test questions: {len(train)}/{len(tests)}, {args.estimator}, reward {args.reward}, {B} x {G} rollouts")
    logger = RunLogger(args.exp_name, args.seed, args, root=args.runs_dir, resume=args.resume)
    optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": args.lr}] + (
        [] if value_head is None else [{"params": value_head.parameters(), "lr": args.critic_lr}]))
    objects, guard = [optimizer] + [value_head] * (value_head is not None), FiniteGuard(args.max_bad_steps)
    if args.resume:  # the model came from the checkpoint; now optimizer, value head, call history, guard, 'before'
        state = logger.restore(*objects)
        start, before, best_calls, (guard.in_a_row, guard.skipped) = state["step"] + 1, state["before"], \
            state["best_calls"], state["guard"]
        say(f"resumed {logger.dir} at step {start}")
    else:  # 0. EM / TC / TP of the starting model; best_calls (OTC-GRPO): question id -> fewest calls when correct
        t0, start, before, best_calls = time.time(), 0, {}, {}
        if args.eval_before and tests:
            before = evaluate(model, tokenizer, tests, retriever, args, logger.dir / "predictions_before.jsonl")
            say("before:", json.dumps(before), f"({time.time() - t0:.0f} s)")
    keys = ["reward", "rewards/em/mean", "tool_calls", "rewards/tool/mean", "value_loss", "explained_variance", "kl",
            "approx_kl", "clipfrac", "skipped_steps", "time/generate_s", "time/train_s"]
    for step in tqdm(range(start, args.total_steps), desc=args.estimator, disable=rank > 0 or not sys.stderr.isatty()):
        # 1. multi-turn rollouts: G per question of this process's share, searches executed by the retriever
        batch = rows_at(train, args.seed, step * B + rank * b, b)  # the question stream is resumable: by position
        torch.manual_seed(seed_of(args.seed, "sample", step, rank))  # per process; a resumed run draws the same
        t0 = time.time()
        rollouts, episodes = run_episodes(model, tokenizer, [r["question"] for r in batch], retriever, args, G,
                                          args.temperature)
        t_gen = time.time() - t0
        # 2. rewards: EM, the OTC tool reward and their product (or EM alone); those of all processes (rank order)
        data = collate(rollouts, tokenizer.pad_token_id, model.device)
        comps = sum(gather([dict(c, calls=e["calls"], invalid=e["invalid"], kind=batch[i // G]["kind"], len=float(n))
                            for i, (c, e, n) in enumerate(zip(otc_rewards(episodes, batch, args, best_calls), episodes,
                                                              data["loss_mask"].sum(1)))]), [])
        rewards = torch.tensor([c["total"] for c in comps])  # (B*G,)
        assert torch.isfinite(rewards).all(), "non-finite reward"
        # 3.-4. old_logp, ref_logp, rollout-time values; advantages: GAE (PPO) or group-normalised rewards (GRPO)
        inputs, logs = advantages_and_targets(model, value_head, ref_model, data, rewards, args)
        # 5. clipped policy loss (+ clipped value loss) over minibatches
        stats = ppo_update(model, value_head, optimizer, data, args=args, guard=guard,
                           seed=seed_of(args.seed, "minibatches", step), **inputs)
        t_train = time.time() - t0 - t_gen
        # 6. log aggregates over the whole step (all processes)
        mean = {k: float(np.mean([c[k] for c in comps])) for k in ("em", "tool", "calls", "invalid", "len")}
        row = {"reward": rewards.mean(), "reward_std": rewards.std() if len(rewards) > 1 else 0.0, **stats, **logs,
               "rewards/em/mean": mean["em"], "rewards/tool/mean": mean["tool"], "tool_calls": mean["calls"],
               **{f"tool_calls/{k}": float(np.mean([c["calls"] for c in comps if c["kind"] == k]))
                  for k in sorted({c["kind"] for c in comps})},
               "invalid_actions": mean["invalid"], "completion_len": mean["len"], "time/generate_s": t_gen,
               "tokens_per_s": mean["len"] * len(comps) / max(t_gen, 1e-9), "time/train_s": t_train,
               **({"frac_reward_zero_std": float((rewards.view(B, G).std(1) < 1e-6).float().mean())} if G > 1 else {})}
        logger.log(step, row, keys=keys)
        if args.save_every and (step + 1) % args.save_every == 0 or args.save_model and step + 1 == args.total_steps:
            path = logger.save(step, model, tokenizer, *objects, before=before, best_calls=best_calls,
                               guard=(guard.in_a_row, guard.skipped))
            _ = path and value_head is not None and torch.save(value_head.state_dict(), path / "value_head.pt")
    # 7. EM / TC / TP after training
    after = evaluate(model, tokenizer, tests, retriever, args, logger.dir / "predictions.jsonl") \
        if tests and args.total_steps > 0 else {}
    say("after:", json.dumps(after))
    summary = {**{f"before/{k}": v for k, v in before.items()}, **{f"after/{k}": v for k, v in after.items()},
               "test_questions": len(tests), "train_questions": len(train), "skipped_steps": guard.skipped,
               **({"checkpoint": str(logger.dir / "checkpoint")} if args.save_model and args.total_steps > 0 else {})}
    say(json.dumps(logger.finish(summary), indent=1))
    return summary


if __name__ == "__main__":
    main(parse_args(Args))
