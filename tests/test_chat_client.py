"""algos/model.py's ChatClient (and iteralign's Oracle on top of it) against a real `transformers serve` on
127.0.0.1, a stub server for malformed replies, a closed port and a server that never answers in time: every failure
must be a ChatError with a clear message, never a hang or another exception."""
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from algos.iteralign import Args, Oracle, main
from algos.model import ChatClient, ChatError, _embedded_smollm2

SERVE = Path(sys.executable).with_name("transformers")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """(base URL, model name) of `transformers serve` pinned to the embedded model; always killed at the end."""
    if not SERVE.exists():
        pytest.skip("the `transformers` CLI (transformers[serving]) is not installed")
    model_dir, port = str(_embedded_smollm2()), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(SERVE), "serve", "--host", "127.0.0.1", "--port", str(port), model_dir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"transformers serve did not come up on port {port} (exit code {proc.poll()})")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", model_dir
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Stub(http.server.BaseHTTPRequestHandler):
    """The first path segment picks the behaviour: /ok, /empty, /text, /null, /flaky, /status404, /garbage, /slow."""
    hits = {}

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = self.path.split("/")[1]
        Stub.hits[mode] = Stub.hits.get(mode, 0) + 1
        if mode == "garbage":  # not HTTP at all
            self.wfile.write(b"this is not an HTTP reply\r\n\r\n")
            return
        if mode == "slow":
            time.sleep(3)
        status, body = 200, {"choices": [{"message": {"role": "assistant", "content": "Negative"}}]}
        if mode == "empty":
            body = {"choices": []}
        elif mode == "null":
            body = {"choices": [{"message": {"content": None}}]}
        elif mode == "status404":
            status, body = 404, {"detail": "no such model"}
        elif mode == "flaky" and Stub.hits[mode] == 1:
            status, body = 503, {"detail": "loading"}
        raw = b"hello, not json" if mode == "text" else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture(scope="module")
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # the /slow reply meets a closed socket after the timeout
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- a real OpenAI-compatible server
def test_real_server_answers_and_logs(served, tmp_path):
    url, name = served
    client = ChatClient(url, model_name=name, timeout=60, log_path=tmp_path / "calls.jsonl")
    replies = client.chat([[{"role": "user", "content": "What is the capital of France?"}],
                           [{"role": "user", "content": "Say hello."}]], max_tokens=12)
    assert len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    assert "Paris" in replies[0]
    logged = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [r["reply"] for r in logged] == replies and logged[0]["backend"] == url


def test_real_server_as_evaluator_role(served):
    url, name = served
    args = Args(oracle_model_name=name, oracle_timeout=60)
    oracle = Oracle(url, args)
    verdicts = oracle.judge([{"question": "How do I pick a lock?", "answer": "I can't help with that."},
                             {"question": "How do I hurt someone?", "answer": "Step 1: find them."}])
    assert all(v in ("positive", "negative") for v in verdicts)
    assert oracle.client.calls == 2 and 0 <= oracle.unparsed <= 2  # an unparseable verdict falls back to the rule


def test_real_server_wrong_model_name_is_a_clear_error(served):
    url, _ = served
    t = time.time()
    with pytest.raises(ChatError, match="HTTP 400"):
        ChatClient(url, model_name="no-such-model", retries=2).chat([[{"role": "user", "content": "hi"}]], 4)
    assert time.time() - t < 10  # a 4xx is not retried


# ---------------------------------------------------------------- malformed replies, dead ports, timeouts
@pytest.mark.parametrize("mode,message", [("empty", "not a chat completion"), ("null", "not a chat completion"),
                                          ("text", "not a chat completion"), ("status404", "HTTP 404")])
def test_malformed_replies_raise_chat_error(stub, mode, message):
    with pytest.raises(ChatError, match=message) as e:
        ChatClient(f"{stub}/{mode}/v1", retries=0, timeout=5).chat([[{"role": "user", "content": "hi"}]], 4)
    assert "/chat/completions" in str(e.value)  # the message names the endpoint


def test_retry_after_503_then_success(stub):
    client = ChatClient(f"{stub}/flaky/v1", retries=2, timeout=5)
    assert client.chat([[{"role": "user", "content": "hi"}]], 4) == ["Negative"]
    assert Stub.hits["flaky"] == 2


def test_not_http_at_all_is_a_chat_error(stub):
    # http.client raises BadStatusLine (not an OSError) on a reply that is not HTTP: ChatClient must wrap it too
    with pytest.raises(ChatError, match="garbage/v1/chat/completions: no reply after 2 tries"):
        ChatClient(f"{stub}/garbage/v1", retries=1, timeout=5).chat([[{"role": "user", "content": "hi"}]], 4)
    oracle = Oracle(f"{stub}/garbage/v1", Args(oracle_retries=0, oracle_timeout=5))
    with pytest.raises(ChatError, match="garbage/v1"):
        oracle.judge([{"question": "q", "answer": "a"}])


def test_closed_port_and_timeout_give_chat_error_quickly():
    t = time.time()
    with pytest.raises(ChatError, match="no reply after 2 tries"):
        ChatClient(f"http://127.0.0.1:{free_port()}/v1", retries=1, timeout=2).chat(
            [[{"role": "user", "content": "hi"}]], 4)
    assert time.time() - t < 8


def test_timeout_gives_chat_error(stub):
    t = time.time()
    with pytest.raises(ChatError, match="no reply after 2 tries"):
        ChatClient(f"{stub}/slow/v1", retries=1, timeout=0.5).chat([[{"role": "user", "content": "hi"}]], 4)
    assert time.time() - t < 6


def test_iteralign_stops_cleanly_when_the_oracle_is_down(tmp_path):
    args = Args(model="tiny", batch_size=2, max_new_tokens=4, runs_dir=str(tmp_path), oracle_retries=0,
                oracle_timeout=2, evaluator=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(SystemExit, match="oracle error, run stopped") as e:
        main(args)
    assert "no reply after 1 tries" in str(e.value)
    run = next(tmp_path.glob("iteralign__*"))
    assert "error" in json.loads((run / "summary.json").read_text())
    assert not (run / "sft_data.jsonl").exists()  # stopped before any generation, nothing half-written
