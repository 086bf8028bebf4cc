"""algos/otc_ppo.py and data/make_otc_qa.py: GAE, info mask, OTC rewards, retrieval client, data, smoke, learning."""
import copy
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import algos.otc_ppo as otc
from algos.model import collate, generate, load_model, start_rollouts
from algos.otc_ppo import (QA_FIELDS, Args, BM25Retriever, RetrievalError, SearchR1Client, em_reward, gae,
                           load_jsonl, otc_grpo_tool_reward, otc_ppo_tool_reward, otc_rewards, ppo_update)

ROOT = Path(__file__).resolve().parents[1]
PASSAGES = [{"id": "d0", "title": "Zorvia", "text": "Zorvia is a small country. Its capital is Quelmar."},
            {"id": "d1", "title": "France", "text": "France is a country in Europe. Its capital is Paris."},
            {"id": "d2", "title": "Oris Kandel", "text": "Oris Kandel is a poet. Oris was born in Hesk."}]


# ---------------------------------------------------------------- GAE
def brute_force_gae(rewards, values, mask, gamma, lam):
    """Per row, the sampled positions only: A_k = sum_l (gamma lam)^l delta_{k+l}, delta_j = r_j + gamma V_{j+1} - V_j
    (V after the last sampled token = 0); rewards and values elsewhere are ignored."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t] > 0]
        v = [float(values[b, t]) for t in idx] + [0.0]
        deltas = [float(rewards[b, t]) + gamma * v[k + 1] - v[k] for k, t in enumerate(idx)]
        for k, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** l * d for l, d in enumerate(deltas[k:]))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.7), (0.99, 0.0)])
def test_gae_matches_brute_force_with_info_gaps(gamma, lam):
    g = torch.Generator().manual_seed(3)
    B, T = 5, 13
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.4).float()
    mask[0, :] = 0  # a row with nothing sampled
    mask[1, :] = 1  # a row with no gap
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = brute_force_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, (expected + values) * mask, rtol=1e-5, atol=1e-5)
    # values / rewards on retrieved (mask 0) tokens never matter
    noise = torch.randn(B, T, generator=g) * 100 * (1 - mask)
    adv2, _ = gae(rewards + noise, values + noise, mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)


# ---------------------------------------------------------------- rewards
def test_em_reward_normalises_and_never_raises():
    assert em_reward("The Paris.", ["paris"]) == 1.0
    assert em_reward("  new   delhi ", ["New Delhi", "Delhi"]) == 1.0
    assert em_reward("Paris, France", ["Paris"]) == 0.0
    assert em_reward(None, ["Paris"]) == 0.0 and em_reward("", ["Paris"]) == 0.0


def test_otc_tool_reward_corner_values():
    c = 4
    assert otc_ppo_tool_reward(0, c) == 1.0
    assert otc_ppo_tool_reward(1, c) == pytest.approx(math.cos(math.pi / 6))
    assert otc_ppo_tool_reward(4, c) == pytest.approx(0.5)
    vals = [otc_ppo_tool_reward(m, c) for m in range(12)]
    assert all(a > b for a, b in zip(vals, vals[1:])) and vals[-1] > 0        # strictly falling, towards 0
    assert otc_ppo_tool_reward(3, 0) == pytest.approx(0.0, abs=1e-12)         # c = 0: any call costs everything
    assert otc_grpo_tool_reward(0, 0, c) == 1.0
    assert otc_grpo_tool_reward(2, 0, c) == pytest.approx(math.cos(2 * math.pi / 8))
    for n in (1, 2, 3):
        assert otc_grpo_tool_reward(n, n, c) == pytest.approx(1.0)           # peak at m = n
        assert otc_grpo_tool_reward(0, n, c) == pytest.approx(0.0, abs=1e-12)
        assert otc_grpo_tool_reward(n + 1, n, c) < 1 and otc_grpo_tool_reward(n + 2, n, c) < \
            otc_grpo_tool_reward(n + 1, n, c)
    assert otc_grpo_tool_reward(1, 2, c) == pytest.approx(math.sin(math.pi / 3))
    assert otc_grpo_tool_reward(3, 2, c) == pytest.approx(math.sin(3 * math.pi / 5))
    assert otc_grpo_tool_reward(3, None, c) == otc_ppo_tool_reward(3, c)      # no correct rollout yet


def test_otc_rewards_product_history_and_fallback():
    rows = [{"id": "q1", "answers": ["Paris"]}, {"id": "q2", "answers": ["Hesk"]}]
    args = Args(estimator="grpo", reward="otc", group_size=3, prompts_per_step=2, num_minibatches=1)
    eps = [{"calls": 2, "answer": "Paris"}, {"calls": 1, "answer": "paris"}, {"calls": 0, "answer": "Rome"},
           {"calls": 1, "answer": "x"}, {"calls": 3, "answer": None}, {"calls": 0, "answer": "y"}]
    best = {}
    comps = otc_rewards(eps, rows, args, best)
    assert best == {"q1": 1}                                                  # q2: nobody correct, no n
    assert [c["em"] for c in comps] == [1, 1, 0, 0, 0, 0]
    assert comps[0]["total"] == pytest.approx(math.sin(2 * math.pi / 3))     # m = 2, n = 1
    assert comps[1]["total"] == pytest.approx(1.0) and comps[2]["total"] == 0.0
    assert comps[4]["tool"] == pytest.approx(otc_ppo_tool_reward(3, 4)) and comps[4]["total"] == 0.0  # fallback
    # a later visit keeps the history: n stays 1 although this group's best correct rollout used 2 calls
    comps = otc_rewards([{"calls": 2, "answer": "Paris"}] * 3 + [{"calls": 2, "answer": "Hesk"}] * 3, rows, args, best)
    assert best == {"q1": 1, "q2": 2}
    assert comps[0]["total"] == pytest.approx(math.sin(2 * math.pi / 3)) and comps[3]["total"] == pytest.approx(1.0)
    em_args = Args(estimator="ppo", reward="em", prompts_per_step=6, num_minibatches=1)
    comps = otc_rewards(eps, rows * 3, em_args, {})
    assert comps[0]["total"] == 1.0 and comps[0]["tool"] == pytest.approx(otc_ppo_tool_reward(2, 4))


# ---------------------------------------------------------------- rollout environment and the info mask
def scripted_generate(turns):
    """A stand-in for model.generate that writes the next scripted turn of every unfinished rollout."""
    state = {"turn": 0}

    def fake(model, tokenizer, rollouts, max_new_tokens, temperature=1.0, stop=(), batch_size=None, keep_cache=False):
        text = turns[min(state["turn"], len(turns) - 1)]
        state["turn"] += 1
        out = []
        for r in rollouts:
            if r.done:
                out.append("")
                continue
            ids = tokenizer.encode(text, add_special_tokens=False)
            r.token_ids += ids
            r.loss_mask += [1] * len(ids)
            r.logprobs += [-0.5] * len(ids)
            r.done = True
            out.append(text)
        return out
    return fake


def test_episode_masks_retrieved_tokens_and_counts_calls(monkeypatch):
    model, tok = load_model("tiny", device="cpu")
    retriever = BM25Retriever(PASSAGES)
    args = Args(max_calls=2, topk=1)
    turns = ["<think>no idea</think>\n<search> capital of Zorvia </search>", "oops, no tag",
             "<think>found</think>\n<answer> Quelmar </answer>"]
    monkeypatch.setattr(otc, "generate", scripted_generate(turns))
    rollouts, eps = otc.run_episodes(model, tok, ["What is the capital of Zorvia?"], retriever, args, 1, 1.0)
    assert eps == [{"calls": 1, "invalid": 1, "answer": "Quelmar"}]
    r = rollouts[0]
    sampled = tok.decode([t for t, m in zip(r.token_ids, r.loss_mask) if m])
    env = tok.decode([t for t, m in zip(r.completion_ids, r.loss_mask[r.prompt_len:]) if not m])
    assert sampled == "".join(turns)
    assert "<information>Doc 1(Title: Zorvia) Zorvia is a small country. Its capital is Quelmar.</information>" in env
    assert otc.INVALID in env and "Quelmar" not in sampled.split("<answer>")[0]
    assert all(lp == 0.0 for lp, m in zip(r.logprobs, r.loss_mask) if not m)
    # a model that always searches: c searches run, the last turn's search does not, no answer
    monkeypatch.setattr(otc, "generate", scripted_generate(["<search> Zorvia </search>"]))
    _, eps = otc.run_episodes(model, tok, ["Q?"], retriever, args, 2, 1.0)
    assert eps == [{"calls": 2, "invalid": 0, "answer": None}] * 2


def test_info_mask_keeps_retrieved_tokens_out_of_every_loss():
    """Policy loss, value loss, k3 KL and entropy: garbage on loss_mask 0 positions (retrieved passages) of every
    per-token input must leave the update exactly the same."""
    torch.manual_seed(0)
    model, tok = load_model("tiny", device="cpu")
    rollouts = start_rollouts(tok, ["Hi", "Tell me a story"], n=2)
    generate(model, tok, rollouts, 4, 1.0)
    for r in rollouts:  # a retrieved span in the middle of the completion, then more sampled tokens
        otc.append_tokens(r, tok.encode("<information>Doc 1 text</information>", add_special_tokens=False))
        r.done = False
    generate(model, tok, rollouts, 3, 1.0)
    data = collate(rollouts, tok.pad_token_id)
    mask = data["loss_mask"]
    args = Args(num_minibatches=1, micro_batch_tokens=40, beta=0.1, kl_mode="loss", ent_coef=0.05, vf_coef=0.5,
                max_grad_norm=1e9, value_grad_to_trunk=True, loss_type="bnpo")
    g = torch.Generator().manual_seed(1)
    adv, ret, old_v = (torch.randn(mask.shape, generator=g) * mask for _ in range(3))
    ref = data["sample_logp"] - 0.1 * mask

    def run(junk):
        m, head = copy.deepcopy(model), torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.constant_(head.weight, 0.01), torch.nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(list(m.parameters()) + list(head.parameters()), lr=1.0)
        noise = (1 - mask) * junk
        stats = ppo_update(m, head, opt, data, adv + noise, args, data["sample_logp"] + noise, ref - noise,
                           old_v + noise, ret + 3 * noise)
        return [p.detach() for p in list(m.parameters()) + list(head.parameters())], stats
    clean, stats = run(0.0)
    dirty, _ = run(torch.randn(mask.shape, generator=g) * 5)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert {"value_loss", "entropy", "kl_loss", "approx_kl"} <= set(stats)
    moved = sum(int((p0 != p1).any()) for p0, p1 in zip(model.parameters(), clean))
    assert moved > 0


# ---------------------------------------------------------------- retrieval client against a real HTTP server
@pytest.fixture
def server():
    bm25 = BM25Retriever(PASSAGES)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/slow/retrieve":
                time.sleep(1.5)
            if self.path == "/broken/retrieve":
                reply, code = {"oops": 1}, 200
            elif self.path == "/fail/retrieve":
                reply, code = {"error": "index not loaded"}, 500
            else:
                assert body["return_scores"] is True
                reply, code = {"result": [[{"document": {"id": "x", "contents": f'"{d["title"]}"\n{d["text"]}'},
                                            "score": d["score"]} for d in hits]
                                          for hits in bm25.search(body["queries"], body["topk"])]}, 200
            data = json.dumps(reply).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout case)
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", bm25
    httpd.shutdown()


def test_search_r1_client_matches_local_index(server):
    url, bm25 = server
    got = SearchR1Client(url, timeout=5).search(["capital of Zorvia", "Oris Kandel born"], 2)
    want = bm25.search(["capital of Zorvia", "Oris Kandel born"], 2)
    assert got[0][0]["title"] == "Zorvia" and got[1][0]["title"] == "Oris Kandel"
    assert [[(d["title"], d["text"]) for d in q] for q in got] == [[(d["title"], d["text"]) for d in q] for q in want]
    assert got[0][0]["score"] == pytest.approx(want[0][0]["score"])
    assert SearchR1Client(url).search([], 3) == []


def test_search_r1_client_errors_are_clear(server):
    url, _ = server
    with pytest.raises(RetrievalError, match=r"no reply within 0.3 s"):
        SearchR1Client(url + "/slow", timeout=0.3).search(["Zorvia"], 1)
    with pytest.raises(RetrievalError, match=r"not a Search-R1 /retrieve reply"):
        SearchR1Client(url + "/broken").search(["Zorvia"], 1)
    with pytest.raises(RetrievalError, match=r"HTTP 500"):
        SearchR1Client(url + "/fail").search(["Zorvia"], 1)
    with pytest.raises(RetrievalError, match=r"127.0.0.1:9/retrieve: no reply"):
        SearchR1Client("http://127.0.0.1:9", timeout=1).search(["Zorvia"], 1)


# ---------------------------------------------------------------- data
def test_committed_data_is_valid_and_splits_are_disjoint():
    train = load_jsonl(ROOT / "data" / "otc_train.jsonl", QA_FIELDS)
    test = load_jsonl(ROOT / "data" / "otc_test.jsonl", QA_FIELDS)
    corpus = load_jsonl(ROOT / "data" / "otc_corpus.jsonl", {"id": str, "title": str, "text": str})
    for rows in (train, test):
        assert {r["kind"] for r in rows} == {"memory", "1hop", "2hop"}
        assert all(r["optimal_calls"] == {"memory": 0, "1hop": 1, "2hop": 2}[r["kind"]] for r in rows)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    text = " ".join(p["text"] for p in corpus)
    assert all(r["answers"][0] in text for r in train + test if r["kind"] != "memory")  # only the corpus knows
    probe = [json.loads(line) for line in open(ROOT / "data" / "otc_memory_probe.jsonl")]
    kept = {p["question"] for p in probe if p["kept"]}
    assert {r["question"] for r in train + test if r["kind"] == "memory"} <= kept
    sft = [json.loads(line) for line in open(ROOT / "data" / "otc_sft.jsonl")]
    assert all(m["role"] in ("user", "assistant", "tool") for r in sft for m in r["messages"])
    # the generator still writes the committed warm start: a memory question is answered twice from memory and once
    # after one search (both modes in the start policy's support), with the rollout prompt
    sys.path.insert(0, str(ROOT / "data"))
    import make_otc_qa
    first = [r["messages"] for r in sft if r["id"].startswith(sft[0]["id"].split(".")[0] + ".")]
    row = {"question": first[0][0]["content"].split("Question: ")[-1], "kind": "memory", "answers": ["Paris"]}
    assert make_otc_qa.sft_trajectories(row, BM25Retriever(corpus)) == first
    assert [sum(m["role"] == "tool" for m in t) for t in first] == [0, 0, 1]
    assert first[0][0]["content"] == otc.PROMPT.format(question=row["question"])


def test_malformed_rows_name_file_line_field(tmp_path):
    path = tmp_path / "qa.jsonl"
    good = {"id": "a", "question": "q", "answers": ["x"], "kind": "1hop", "optimal_calls": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "answers"}) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:2: missing field 'answers'"):
        load_jsonl(path, QA_FIELDS)
    path.write_text(json.dumps(dict(good, answers="x")) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:1: field 'answers' is not a list"):
        load_jsonl(path, QA_FIELDS)
    path.write_text(json.dumps(dict(good, answers=[3])) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:1: field 'answers' is not a list of strings"):
        load_jsonl(path, QA_FIELDS)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:2: not valid JSON"):
        load_jsonl(path, QA_FIELDS)


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("estimator,precision", [("ppo", "fp32"), ("grpo", "fp32"), ("ppo", "bf16")])
def test_smoke_tiny(tmp_path, estimator, precision):
    """bf16 (autocast rollouts and log-prob passes, value head fp32): old_logp is recomputed, so the first minibatch's
    run-time check holds at fp32 tolerances, and at step 0 old_logp and ref_logp are the same pass: KL exactly 0."""
    cmd = [sys.executable, "algos/otc_ppo.py", "--model", "tiny", "--estimator", estimator, "--total-steps", "2",
           "--prompts-per-step", "2", "--group-size", "2", "--max-turn-tokens", "6", "--max-calls", "1",
           "--eval-items", "2", "--runs-dir", str(tmp_path), "--exp-name", "smoke", "--save-model", "true",
           "--precision", precision]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]  # the run-time invariants (first ratio, k3 >= 0) held
    run = next(tmp_path.glob("smoke__1__*"))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(r[k]) for r in rows for k in ["reward", "kl", "approx_kl", "clipfrac", "ratio_mean"] +
               ["value_loss"] * (estimator == "ppo"))
    assert all(r["skipped_steps"] == 0 and r["kl"] >= 0 and abs(r["ratio_mean"] - 1) < 5e-2 for r in rows)
    saved = json.loads((run / "args.json").read_text())
    assert (saved["precision"], saved["old_logp"]) == (precision, "recompute" if precision == "bf16" else "sampler")
    assert precision == "fp32" or rows[0]["kl"] == 0.0
    for key in ["reward", "rewards/em/mean", "rewards/tool/mean", "tool_calls", "kl", "approx_kl", "clipfrac",
                "invalid_actions", "frac_reward_zero_std"] + (["value_loss", "explained_variance"] *
                                                               (estimator == "ppo")):
        assert key in rows[0], key
    summary = json.loads((run / "summary.json").read_text())
    assert {"before/em", "before/tc", "after/em", "after/tc", "after/tp"} <= set(summary)
    assert (run / "checkpoint" / "value_head.pt").exists() == (estimator == "ppo")
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 2


def test_learning_fewer_calls_tiny():
    """PPO (value head, GAE, whitening) on the tiny random model with a reward that favours fewer "calls": a call is a
    sampled token from a fixed half of the vocabulary (those whose embedding points along a random direction), and
    every answer counts as correct, so the reward is otc_ppo_tool_reward(calls, c = 4). Calls must fall."""
    torch.manual_seed(0), random.seed(0)
    model, tok = load_model("tiny", device="cpu")
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    call_tok = model.get_input_embeddings().weight.detach() @ u > 0  # (V,)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    args = Args(lr=3e-2, critic_lr=1e-2, num_minibatches=2, micro_batch_tokens=4096, beta=0.0, max_turn_tokens=8)
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": args.lr},
                            {"params": head.parameters(), "lr": args.critic_lr}])
    curve = []
    for _ in range(10):
        rollouts = start_rollouts(tok, ["Search:", "Go:", "Question:", "Look up:"], n=8)
        generate(model, tok, rollouts, 8, 1.0)
        calls = torch.tensor([float(call_tok[torch.tensor(r.completion_ids)].sum()) for r in rollouts])
        rewards = torch.tensor([otc_ppo_tool_reward(int(m), 4) for m in calls])
        data = collate(rollouts, tok.pad_token_id)
        mask = data["loss_mask"]
        old_v = otc._logprobs_in_chunks(model, head, data, args)[1]
        last = (mask * torch.arange(mask.shape[1])).argmax(1)
        token_rewards = torch.zeros_like(mask)
        token_rewards[torch.arange(len(last)), last] = rewards
        adv, ret = gae(token_rewards, old_v, mask)
        stats = ppo_update(model, head, opt, data, otc.masked_whiten(adv, mask), args, data["sample_logp"], None,
                           old_v, ret)
        assert stats["approx_kl"] >= 0 and stats["value_loss"] >= 0
        curve.append(calls.mean().item())
    print("calls per rollout:", [round(c, 2) for c in curve])
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5, curve
