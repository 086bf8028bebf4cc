"""algos/model.py: the real embedded model, chat masking, sampling log-probs, checkpoints, argument parsing."""
import copy
import json
import os
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from algos.model import (RunLogger, _prefill_chunks, append_tokens, arg, collate, encode_chat, generate, load_model,
                         parse_args, prefix_groups, render_chat, save_checkpoint, sequence_logprobs,
                         shared_prefix_logprobs, start_rollouts)

CONVERSATION = [
    {"role": "system", "content": "You may use tools."},
    {"role": "user", "content": "What is 47 * 89?"},
    {"role": "assistant", "content": "- Step 1: Multiply. (tool: Code)\nCode: 47 * 89"},
    {"role": "tool", "content": "- Output: 4183"},
    {"role": "assistant", "content": "### Final Response\nThe answer is 4183."},
]


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def test_embedded_model_knows_the_capital_of_france(smollm):
    model, tokenizer = smollm
    question = [{"role": "user", "content": "What is the capital of France?"}]
    rollouts = start_rollouts(tokenizer, [question])
    text = generate(model, tokenizer, rollouts, max_new_tokens=24, temperature=0)[0]
    assert "Paris" in text
    # a stop string ends the rollout right there, with the reason recorded
    rollouts = start_rollouts(tokenizer, [question])
    text = generate(model, tokenizer, rollouts, max_new_tokens=24, temperature=0, stop=("Paris",))[0]
    assert rollouts[0].stop_reason == "stop" and text.rstrip(".").endswith("Paris")


def test_encode_chat_trains_on_assistant_tokens_and_their_eos_only(tiny):
    _, tokenizer = tiny
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    assert tokenizer.decode(ids) == render_chat(tokenizer, CONVERSATION)  # the ids are the template, unchanged
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    eos = tokenizer.eos_token
    assert trained == CONVERSATION[2]["content"] + eos + CONVERSATION[4]["content"] + eos
    assert sum(1 for i, m in zip(ids, mask) if m and i == tokenizer.eos_token_id) == 2  # EOS kept though pad == eos
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert "4183" in untrained and "47 * 89?" in untrained and "You may use tools." in untrained


def test_sampling_logprobs_match_the_training_forward(tiny):
    """Sampled log-probs (left-padded, KV cache) equal a fresh right-padded forward pass: ratio == 1 at step 0."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = start_rollouts(tokenizer, [CONVERSATION[:2], "<|im_start|>user\nHi<|im_end|>\n"], n=2)
    generate(model, tokenizer, rollouts, max_new_tokens=7, temperature=0.7)
    assert all(r.stop_reason in ("eos", "length") for r in rollouts)
    tool_ids = tokenizer.encode("\n<|im_start|>tool\n- Output: 4183<|im_end|>\n", add_special_tokens=False)
    append_tokens(rollouts[1], tool_ids)
    generate(model, tokenizer, rollouts, max_new_tokens=5, temperature=0.7)
    r = rollouts[1]
    assert r.loss_mask[r.prompt_len:].count(0) == len(tool_ids)  # tool output: never trained on
    batch = collate(rollouts, tokenizer.pad_token_id)
    B, T = batch["input_ids"].shape
    assert B == 4 and T == max(len(x.token_ids) for x in rollouts)
    with torch.no_grad():
        logp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], temperature=0.7)
    mask = batch["loss_mask"].bool()
    assert mask.sum() == sum(sum(x.loss_mask) for x in rollouts)
    torch.testing.assert_close(logp[mask], batch["sample_logp"][mask], atol=1e-4, rtol=1e-4)


def test_watched_logprobs_are_those_of_a_forward_pass(tiny):
    """generate(watch=ids) keeps, at each sampled token, the log-probs of those ids under the sampling distribution
    (temperature 0.7): those of a fresh forward pass at that position, padding and prompt lengths notwithstanding."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = start_rollouts(tokenizer, [CONVERSATION[:2], "Hi"], n=2)
    watch = (5, 17, tokenizer.eos_token_id)
    generate(model, tokenizer, rollouts, 6, temperature=0.7, watch=watch)
    for r in rollouts:
        assert len(r.watched) == len(r.token_ids) - r.prompt_len > 0
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r.token_ids])).logits[0, r.prompt_len - 1:-1].float() / 0.7
        want = torch.log_softmax(logits, -1)[:, list(watch)]  # (new tokens, 3)
        torch.testing.assert_close(torch.tensor(r.watched), want, atol=1e-4, rtol=1e-4)


def _two_turn_rollouts(model, tokenizer, temperature, share_prefix, keep_cache=False, turns=2, prefill_tokens=8192):
    """3 prompts of different lengths x 3 copies; a tool turn appended to two rows, then another generate."""
    torch.manual_seed(0)
    rollouts = start_rollouts(tokenizer, ["Hi", CONVERSATION[:2], "Tell me a story about a cat, please"], n=3)
    kw = dict(share_prefix=share_prefix, keep_cache=keep_cache, prefill_tokens=prefill_tokens)
    generate(model, tokenizer, rollouts, 6, temperature, **kw)
    for turn in range(turns - 1):
        for r in (rollouts[1], rollouts[4 + turn]):
            append_tokens(r, tokenizer.encode(f"\n<|im_start|>tool\n- Output: 41{turn}<|im_end|>\n",
                                              add_special_tokens=False))
        generate(model, tokenizer, rollouts, 5, temperature, **kw)
    return rollouts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefix_sampling_matches_unshared(tiny, temperature):
    """Prefilling each distinct prefix once and copying its keys/values samples the same tokens (same seed) with the
    same log-probs as running every row on its own, over two turns with padding and different prompt lengths; here
    also each row prefilled in a chunk of its own (prefill_tokens=1), their caches padded into one decoding batch."""
    model, tokenizer = tiny
    shared = _two_turn_rollouts(model, tokenizer, temperature, share_prefix=True)
    alone = _two_turn_rollouts(model, tokenizer, temperature, share_prefix=False, prefill_tokens=1)
    for a, b in zip(shared, alone):
        assert a.token_ids == b.token_ids and a.loss_mask == b.loss_mask and a.stop_reason == b.stop_reason
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-5, atol=1e-5)
    group, length = prefix_groups([r.token_ids[:r.prompt_len] + [7] for r in shared])
    assert group == [group[0]] * 3 + [group[3]] * 3 + [group[6]] * 3 and len(set(group)) == 3
    assert sorted(length) == sorted(r.prompt_len for r in shared[::3])  # the whole prompt is shared
    assert prefix_groups([[1, 2, 3], [1, 2, 3], [9]]) == ([0, 0, 1], [2, 0])  # at most all but the last token


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kept_cache_between_turns_matches_a_fresh_prefill(tiny, temperature):
    """keep_cache (multi-turn: a turn prefills only the tokens added since the last) samples what a fresh prefill of
    the whole rollout samples, with the same log-probs, over three turns of rows that continue or stop at different
    turns; the kept keys/values cover every token but the last sampled one."""
    model, tokenizer = tiny
    kept = _two_turn_rollouts(model, tokenizer, temperature, share_prefix=True, keep_cache=True, turns=3)
    fresh = _two_turn_rollouts(model, tokenizer, temperature, share_prefix=True, turns=3)
    for a, b in zip(kept, fresh):
        assert a.token_ids == b.token_ids and a.loss_mask == b.loss_mask and a.stop_reason == b.stop_reason
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-5, atol=1e-5)
        assert a.cache_len == len(a.token_ids) - 1 and b.cache is None
        assert a.cache.shape == (2, 2, model.config.num_key_value_heads, a.cache_len, model.config.head_dim)
    assert len({len(r.token_ids) - r.prompt_len for r in kept}) == 3  # rows that stopped after turn 1, 2 and 3
    # the kept keys/values are a plain forward pass's (each row alone, fp32), and the next turn reads them
    r = kept[1]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([r.token_ids[:r.cache_len]]), use_cache=True).past_key_values
    for i, layer in enumerate(out.layers):
        torch.testing.assert_close(r.cache[i, 0], layer.keys[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r.cache[i, 1], layer.values[0], rtol=1e-4, atol=1e-5)
    right, wrong = copy.deepcopy(r), copy.deepcopy(r)
    wrong.cache = torch.zeros_like(r.cache)
    for x in (right, wrong):
        append_tokens(x, tokenizer.encode("\n<|im_start|>tool\n- Output: 7<|im_end|>\n", add_special_tokens=False))
        generate(model, tokenizer, [x], 3, 0.0)
    assert right.logprobs[-3:] != wrong.logprobs[-3:]


def test_prefill_chunks_keep_groups_whole_and_sort_by_length():
    """Chunks of whole prefix groups by prefix length, each padding to <= budget tokens unless one group is more."""
    seqs = [[1] * 10] * 3 + [[2] * 4] * 2 + [[3] * 30] + [[4] * 5]
    group, shared = [0, 0, 0, 1, 1, 2, 3], [9, 3, 29, 4]
    assert _prefill_chunks(seqs, group, shared, 10_000) == [[3, 4, 6, 0, 1, 2, 5]]
    # a chunk's cost: prefixes x longest prefix + rows x longest own part; groups 1 and 3 together: 2x4 + 3x1 = 11
    assert _prefill_chunks(seqs, group, shared, 11) == [[3, 4, 6], [0, 1, 2], [5]]
    assert _prefill_chunks(seqs, group, shared, 1) == [[3, 4], [6], [0, 1, 2], [5]]


def test_shared_prefix_training_is_exact(tiny):
    """shared_prefix_logprobs (each prompt forward once, its keys/values serving the group) gives the log-probs,
    entropies and parameter gradients of the row-by-row computation, fp32; with activation checkpointing too; and with
    a loss_mask (the LM head only at its positions, 0 elsewhere), also one that covers part of a shared prefix."""
    model, tokenizer = tiny
    rollouts = _two_turn_rollouts(model, tokenizer, 1.0, share_prefix=True)
    batch = collate(rollouts, tokenizer.pad_token_id)
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    assert len({r.prompt_len for r in rollouts}) == 3 and len({len(r.token_ids) for r in rollouts}) > 3
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0))
    in_prompt = mask.clone()
    in_prompt[3::2, 2:6] = 1.0  # rows 3, 5 and 7 also want prompt positions, which their group's prefix computes once
    assert (in_prompt - mask).sum() == 12 and rollouts[3].prompt_len > 6 and rollouts[7].prompt_len > 6

    def run(fn, m, **kwargs):
        copy = load_model("tiny", device="cpu")[0]
        logp, ent = fn(copy, ids, attn, temperature=0.7, return_entropy=True, **kwargs)
        ((logp * weights + 0.1 * ent) * m).sum().backward()
        if "loss_mask" in kwargs:  # nothing outside the loss_mask
            assert not logp[m == 0].any() and not ent[m == 0].any()
        return logp * m, ent * m, [p.grad for p in copy.parameters()]

    for m in (mask, in_prompt):
        reference = run(sequence_logprobs, m, share_prefix=False)
        for fn, kwargs in [(shared_prefix_logprobs, {}), (sequence_logprobs, {"checkpointing": True}),
                           (shared_prefix_logprobs, {"loss_mask": m}), (sequence_logprobs, {"share_prefix": False,
                                                                                            "loss_mask": m})]:
            logp, ent, grads = run(fn, m, **kwargs)
            torch.testing.assert_close(logp, reference[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ent, reference[1], rtol=1e-5, atol=1e-5)
            for g, g_ref in zip(grads, reference[2]):
                torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    # the log-probs are those the sampler recorded (temperature 1 there): the exact path also serves ratio == 1
    with torch.no_grad():
        logp = shared_prefix_logprobs(model, ids, attn)
        assert torch.equal(shared_prefix_logprobs(model, ids, attn, loss_mask=mask), logp * mask)
    torch.testing.assert_close(logp * mask, batch["sample_logp"], rtol=1e-4, atol=1e-4)


def test_checkpoint_reloads_with_plain_transformers(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "checkpoint"
    save_checkpoint(model, tokenizer, path)
    save_checkpoint(model, tokenizer, path)  # replacing a checkpoint leaves one whole folder, no leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([tokenizer.encode("Hello there")])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


@dataclass
class _Args:
    exp_name: str = arg("demo", "name")
    group_size: int = arg(4, "samples per prompt")
    lr: float = arg(1e-5, "learning rate")
    use_kl: bool = arg(False, "k3 KL term")


def test_parse_args_and_run_folder(tmp_path):
    args = parse_args(_Args, ["--group-size", "8", "--lr", "3e-4", "--use-kl", "true"])
    assert (args.group_size, args.lr, args.use_kl, args.exp_name) == (8, 3e-4, True, "demo")
    logger = RunLogger(args.exp_name, 7, args, root=tmp_path)
    assert logger.dir.name.startswith("demo__7__")
    logger.log(1, {"loss": torch.tensor(0.5), "reward": 1.0})
    logger.log(2, {"loss": 0.25})
    summary = logger.finish({"final": 1})
    assert json.loads((logger.dir / "args.json").read_text())["group_size"] == 8
    rows = [json.loads(line) for line in (logger.dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "reward": 1.0}, {"step": 2, "loss": 0.25}]
    assert json.loads((logger.dir / "summary.json").read_text())["final"] == 1 and summary["wall_time_s"] >= 0


def test_interrupted_save_keeps_the_previous_checkpoint_whole(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    path = save_checkpoint(model, tokenizer, tmp_path / "checkpoint")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(*args, **kwargs):  # dies after writing part of the new checkpoint
        (tmp_path / f"checkpoint.tmp{os.getpid()}" / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tokenizer, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    AutoModelForCausalLM.from_pretrained(path)  # still loads
