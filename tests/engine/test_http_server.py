"""`kvreviver serve` end to end: the OpenAI-compatible server on the real default model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from harness.server import free_port, metrics

pytestmark = pytest.mark.engine

STARTUP_TIMEOUT_S = 300


def _kvreviver_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvreviver_vllm", *args]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    # Compression on: short prompts stay under sink + recent and are served exactly,
    # long ones are compacted.
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _kvreviver_cmd("serve", "--port", str(port), "--max-model-len", "4096",
                           "--max-num-seqs", "4", "--additional-config",
                           '{"kvreviver": {"budget": 0.25, "variant": "quantized"}}'),
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.time() + STARTUP_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"server did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
    yield port, proc, log_path
    if proc.poll() is None:
        proc.kill()


@pytest.fixture
def client(server):
    from openai import OpenAI

    port = server[0]
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)


MODEL = "SmolLM2-135M-Instruct"


def test_completions(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=8, temperature=0)
    assert out.choices[0].text.strip()
    assert out.usage.completion_tokens == 8
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is",
                                            max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text


def test_chat_completions(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                         temperature=0)
    text = out.choices[0].message.content
    assert "Paris" in text
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text


def test_bad_request_fails_alone(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4


def _metric(port: int, name: str) -> float:
    values = metrics(port)
    assert name in values, f"{name} not in /metrics"
    return values[name]


def test_aborted_stream_returns_its_blocks(server, client):
    port = server[0]

    def tiny_request_then_usage() -> float:
        # vLLM publishes KV usage after engine steps, so measure after the same
        # small request each time: the usage then reflects only what others hold.
        out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
        time.sleep(1)
        return _metric(port, "vllm:kv_cache_usage_perc")

    baseline = tiny_request_then_usage()
    long_prompt = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(300))
    stream = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=400,
                                       temperature=0, stream=True)
    chunks = iter(stream)
    assert all(next(chunks).choices for _ in range(3))
    assert _metric(port, "vllm:kv_cache_usage_perc") > baseline
    stream.close()  # the client goes away mid-generation: the server aborts the request
    deadline = time.time() + 60
    while tiny_request_then_usage() != baseline or _metric(port, "vllm:num_requests_running"):
        assert time.time() < deadline, "the aborted request still holds KV blocks"


def test_backend_ran_and_server_shuts_down_cleanly(server, client):
    port, proc, log_path = server
    client.completions.create(model=MODEL, prompt="One more", max_tokens=2)
    log = log_path.read_text()
    assert "--attention-backend kvreviver" in log
    assert "KVReviver attention impl in use (KVReviverAttentionImpl" in log
    assert "CPUAttentionBackendImpl" not in log
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]


def test_bad_config_fails_fast(model_dir):
    start = time.time()
    res = subprocess.run(
        _kvreviver_cmd("serve", "--port", str(free_port()), "--additional-config",
                       '{"kvreviver": {"budget": 1.5}}'),
        capture_output=True, text=True, timeout=180,
    )
    assert res.returncode != 0
    assert "kvreviver.budget=1.5 is out of range" in res.stdout + res.stderr
    # Refused in the front end, before any engine process starts.
    assert "EngineCore" not in res.stdout + res.stderr
    assert time.time() - start < 120
