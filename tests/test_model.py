"""algos/model.py: the real embedded model, chat masking, sampling log-probs, checkpoints, argument parsing."""
import json
import os
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from algos.model import (RunLogger, append_tokens, arg, collate, encode_chat, generate, load_model, parse_args,
                         render_chat, save_checkpoint, sequence_logprobs, start_rollouts)

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
