"""Reliability under load, faults and bad input: a real ``kvreviver serve`` on the
default model (float32, loopback only, ``--api-key``), its KV pool small enough that
the load preempts requests.

Per budget (``--budgets``), one server and:

1. **Rounds of mixed load** (``--rounds`` x ``--requests``; at budget 1.0, which
   keeps every token, ``Setup.uncompressed_rounds`` x ``uncompressed_requests``),
   from ``Setup.clients`` concurrent clients, seeded: completions and chat, prompts
   short or long (``Setup.long_len`` tokens), streamed or not, ``n`` 1-3,
   ``max_tokens`` 1..``Setup.max_tokens``, stop strings, logprobs, greedy and sampled;
   streaming clients that disconnect before the first token (mid-prefill) or after a
   few (mid-decode); and bad requests (``bad_inputs``) mixed in: one in ten at random,
   and each kind once per round. Every valid request must be answered completely
   (each choice finished by ``length`` with exactly ``max_tokens`` tokens, or by
   ``stop``; streams end in ``[DONE]``); every bad one must get its 4xx with a
   message naming the problem.
2. **Nothing lost**, after each round: no request running or waiting, KV usage back at
   its idle value (``/metrics``), the same server processes (never restarted), and the
   server's resident memory (its whole process tree) within ``RSS_TOLERANCE`` of the
   first round's.
3. **Isolation**: a greedy probe alone, then submitted last into a batch of 16 with
   long neighbours that make the scheduler preempt: the same tokens.
4. **Security**: requests without the key or with a wrong one get 401 and cost no
   prompt tokens and no KV blocks.
5. **Shutdown** (the last server): SIGTERM in the middle of a load; its engine processes
   must be gone within ``SHUTDOWN_GRACE_S`` and no process of its tree left behind
   (``sigterm_mid_load`` says what the HTTP server waits for).

Run:  .venv/bin/python benchmarks/stress.py [--quick] [--out DIR]
Writes ``stress.json`` and ``stress.png`` to ``--out`` (``benchmarks/results``); exits 1
if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.server import Server, engine_processes, metrics

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "SmolLM2-135M-Instruct"
API_KEY = "stress-test-key"
RSS_TOLERANCE = 0.05
SHUTDOWN_GRACE_S = 30
IDLE_TIMEOUT_S = 120
WORDS = ("river stone apple light garden winter market silver table window morning "
         "letter music paper forest engine harbor candle mirror valley").split()


@dataclass(frozen=True)
class Setup:
    budgets: tuple[float, ...] = (0.1, 1.0)
    rounds: int = 3
    requests: int = 160
    clients: int = 16
    max_model_len: int = 8192
    long_len: tuple[int, int] = (3000, 6000)
    max_tokens: int = 512
    pool_tokens: int = 8704
    """KV pool in tokens of stock vLLM's bytes per token: one request of
    ``max_model_len`` in this backend's slots (a prompt is held whole while it is
    read; a slot is ~4% wider than stock's) and little more, so that two long
    prompts read at once overflow it."""
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 512
    """Up to four prompts read at once, 512 tokens each per step (the stock
    scheduler gives one long prompt the whole step): long prompts held whole
    while read overflow the pool together, even when the compressed requests
    fit it."""
    probe_len: int = 2000
    probe_tokens: int = 64
    uncompressed_rounds: int = 1
    uncompressed_requests: int = 30
    """Budget 1.0 keeps every token and decodes several times slower on 2 cores
    than 0.1 under this load: it runs one shorter round."""

    def load(self, budget: float) -> tuple[int, int]:
        """(rounds, requests per round) at ``budget``."""
        if budget >= 1.0:
            return self.uncompressed_rounds, self.uncompressed_requests
        return self.rounds, self.requests


QUICK = Setup(budgets=(0.1,), rounds=2, requests=40, clients=8, max_model_len=2048,
              long_len=(1000, 1900), max_tokens=24, pool_tokens=2560, probe_len=600,
              probe_tokens=24, max_num_batched_tokens=512, long_prefill_token_threshold=0)


# -- requests ------------------------------------------------------------------------

@dataclass(frozen=True)
class BadInput:
    name: str
    endpoint: str
    body: bytes
    status: int
    says: tuple[str, ...]
    """Words the error message must contain (any one, case-insensitive)."""


def bad_inputs(max_model_len: int) -> tuple[BadInput, ...]:
    def body(**fields) -> bytes:
        return json.dumps({"model": MODEL, **fields}).encode()

    completions, chat = "/v1/completions", "/v1/chat/completions"
    return (
        BadInput("invalid JSON", completions, b'{"model": "' + MODEL.encode() + b'", "prompt": ',
                 400, ("json",)),
        BadInput("negative max_tokens", completions, body(prompt="Hi", max_tokens=-5), 400,
                 ("max_tokens",)),
        BadInput("huge max_tokens", completions, body(prompt="Hi", max_tokens=10**9), 400,
                 ("max_tokens", "context length")),
        BadInput("prompt over --max-model-len", completions,
                 body(prompt=[100] * (max_model_len + 10), max_tokens=4), 400,
                 ("context length", "maximum")),
        BadInput("unknown model", completions,
                 json.dumps({"model": "no-such-model", "prompt": "Hi"}).encode(), 404,
                 ("no-such-model",)),
        BadInput("wrong type: max_tokens", completions, body(prompt="Hi", max_tokens="ten"), 400,
                 ("max_tokens",)),
        BadInput("wrong type: messages", chat, body(messages="Hi", max_tokens=4), 400,
                 ("messages",)),
        BadInput("empty prompt", completions, body(prompt="", max_tokens=4), 400,
                 ("prompt",)),
        BadInput("non-UTF-8 bytes", completions,
                 b'{"model": "' + MODEL.encode() + b'", "prompt": "caf\xe9 \xff\xfe"}', 400,
                 # vLLM's FastAPI says only this, for any body it cannot decode.
                 ("utf-8", "error parsing the body")),
        BadInput("negative temperature", completions, body(prompt="Hi", temperature=-1.0), 400,
                 ("temperature",)),
    )


@dataclass
class Request:
    kind: str
    endpoint: str
    payload: dict | None = None
    bad: BadInput | None = None
    disconnect_after: int | None = None
    """Streaming clients that go away: after this many content chunks (0: mid-prefill)."""


def token_prompt(rng: random.Random, length: int) -> list[int]:
    """Random token ids (the model's ordinary vocabulary range)."""
    return [rng.randrange(100, 40000) for _ in range(length)]


def text_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_request(rng: random.Random, setup: Setup, bad: tuple[BadInput, ...]) -> Request:
    roll = rng.random()
    if roll < 0.1:
        pick = rng.choice(bad)
        return Request(f"bad: {pick.name}", pick.endpoint, bad=pick)
    long = rng.random() < 0.25
    length = rng.randint(*setup.long_len) if long else rng.randint(8, 200)
    chat = rng.random() < 0.4
    # Mostly short answers, one in four up to the longest.
    longest = setup.max_tokens if rng.random() < 0.25 else min(32, setup.max_tokens)
    params: dict = {"model": MODEL, "max_tokens": rng.randint(1, longest), "n": 1}
    if rng.random() < 0.5:
        params["temperature"] = 0.0
    else:  # vLLM refuses n > 1 with greedy sampling
        params.update(temperature=0.9, seed=rng.randrange(1 << 30), n=rng.choice((1, 2, 3)))
    if rng.random() < 0.25:
        params["stop"] = rng.choice(([".", "\n"], ["river"], ["\n\n"]))
    if rng.random() < 0.3:
        params.update({"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2})
    if chat:
        # A word is one or two tokens of this model.
        words = length * 2 // 3
        params["messages"] = [{"role": "user", "content": text_prompt(rng, words)}]
        endpoint, kind = "/v1/chat/completions", "chat"
    else:
        params["prompt"] = token_prompt(rng, length)
        endpoint, kind = "/v1/completions", "completion"
    kind += ", long prompt" if long else ""
    stream_roll = rng.random()
    disconnect = None
    if stream_roll < 0.35:
        params.update(stream=True, stream_options={"include_usage": True})
        kind += ", streamed"
    elif stream_roll < 0.5:
        params.update(stream=True, max_tokens=max(params["max_tokens"], 8))
        disconnect = rng.choice((0, rng.randint(1, 4)))
        kind = "disconnect " + ("mid-prefill" if disconnect == 0 else "mid-decode")
    return Request(kind, endpoint, params, disconnect_after=disconnect)


# -- clients -------------------------------------------------------------------------

@dataclass
class Outcome:
    kind: str
    ok: bool
    detail: str = ""


def check_answer(req: Request, body: dict) -> str:
    """Why a non-streamed answer is incomplete ('' if complete)."""
    p = req.payload
    choices = body.get("choices", [])
    if len(choices) != p["n"]:
        return f"{len(choices)} choices for n={p['n']}"
    tokens = body["usage"]["completion_tokens"]
    if tokens > p["n"] * p["max_tokens"]:
        return f"{tokens} tokens > n * max_tokens"
    for c in choices:
        if c["finish_reason"] not in ("length", "stop"):
            return f"finish_reason {c['finish_reason']!r}"
    if all(c["finish_reason"] == "length" for c in choices) and tokens != p["n"] * p["max_tokens"]:
        return f"{tokens} tokens, finished by length, for n={p['n']} x {p['max_tokens']}"
    if p.get("logprobs"):
        for c in choices:
            lp = c["logprobs"]
            count = len(lp["content"]) if "content" in (lp or {}) else len((lp or {}).get("tokens", []))
            if c["finish_reason"] == "length" and count != p["max_tokens"]:
                return f"{count} logprobs for {p['max_tokens']} tokens"
    return ""


def check_stream(req: Request, events: list[dict], done: bool) -> str:
    """Why a streamed answer is incomplete ('' if complete)."""
    p = req.payload
    if not done:
        return "no [DONE]"
    finished = {c["index"]: c["finish_reason"] for e in events for c in e.get("choices", [])
                if c.get("finish_reason")}
    if sorted(finished) != list(range(p["n"])):
        return f"finished choices {sorted(finished)} for n={p['n']}"
    if any(r not in ("length", "stop") for r in finished.values()):
        return f"finish reasons {finished}"
    usage = [e["usage"] for e in events if e.get("usage")]
    if not usage:
        return "no usage chunk"
    tokens = usage[-1]["completion_tokens"]
    if all(r == "length" for r in finished.values()) and tokens != p["n"] * p["max_tokens"]:
        return f"{tokens} tokens, finished by length, for n={p['n']} x {p['max_tokens']}"
    return ""


async def send(session, base: str, req: Request, headers: dict) -> Outcome:
    import aiohttp

    url = base + req.endpoint
    try:
        if req.bad is not None:
            async with session.post(url, data=req.bad.body, headers={
                    **headers, "Content-Type": "application/json"}) as r:
                text = await r.text(errors="replace")
                said = any(w in text.lower() for w in req.bad.says)
                ok = r.status == req.bad.status and said
                return Outcome(req.kind, ok, "" if ok else f"{r.status}: {text[:300]}")
        async with session.post(url, json=req.payload, headers=headers) as r:
            if r.status != 200:
                return Outcome(req.kind, False, f"{r.status}: {(await r.text())[:300]}")
            if not req.payload.get("stream"):
                why = check_answer(req, await r.json())
                return Outcome(req.kind, not why, why)
            events, done, content_chunks = [], False, 0
            async for line in r.content:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                events.append(event)
                content_chunks += any(c.get("text") or (c.get("delta") or {}).get("content")
                                      for c in event.get("choices", []))
                if req.disconnect_after is not None and content_chunks >= req.disconnect_after:
                    break
            if req.disconnect_after is not None:
                return Outcome(req.kind, True)  # the client went away; the server must cope
            why = check_stream(req, events, done)
            return Outcome(req.kind, not why, why)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        return Outcome(req.kind, False, f"{type(e).__name__}: {e}")


async def run_load(port: int, requests: list[Request], clients: int,
                   headers: dict | None = None) -> list[Outcome]:
    """``requests`` from ``clients`` concurrent clients; the outcomes in request order."""
    import aiohttp

    headers = {"Authorization": f"Bearer {API_KEY}"} if headers is None else headers
    base = f"http://127.0.0.1:{port}"
    gate = asyncio.Semaphore(clients)
    timeout = aiohttp.ClientTimeout(total=1800)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(req: Request) -> Outcome:
            async with gate:
                if req.disconnect_after == 0:
                    # Mid-prefill: give up before the first token arrives.
                    task = asyncio.ensure_future(send(session, base, req, headers))
                    await asyncio.sleep(0.3)
                    if not task.done():
                        task.cancel()
                        return Outcome(req.kind, True)
                    return await task
                return await send(session, base, req, headers)

        return await asyncio.gather(*(one(r) for r in requests))


# -- the server's health -------------------------------------------------------------

def process_tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_rss_mib(pid: int) -> float:
    return sum(p.memory_info().rss for p in process_tree(pid)) / 2**20


def idle_usage(port: int) -> tuple[float, float]:
    """Once nothing runs or waits: (KV usage, running + waiting) after one tiny
    request (vLLM publishes KV usage after engine steps)."""
    deadline = time.time() + IDLE_TIMEOUT_S
    while True:
        m = metrics(port)
        busy = m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
        if not busy or time.time() > deadline:
            break
        time.sleep(1)
    tiny = Request("tiny", "/v1/completions",
                   {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "n": 1})
    assert asyncio.run(run_load(port, [tiny], 1))[0].ok, "the server does not answer"
    time.sleep(1.5)
    m = metrics(port)
    return (m.get("vllm:kv_cache_usage_perc", 0.0),
            m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0))


@dataclass
class RoundReport:
    round: int
    seconds: float
    outcomes: dict[str, list[int]]
    """Request kind -> [passed, failed]."""
    failures: list[str]
    preemptions: int
    kv_usage_after: float
    busy_after: float
    rss_mib_after: float
    same_processes: bool

    def summary(self) -> str:
        return (f"round {self.round}: {self.seconds} s, {len(self.failures)} failed, "
                f"{self.preemptions} preemptions, RSS {self.rss_mib_after} MiB")


def load_round(server: Server, index: int, count: int, setup: Setup, rng: random.Random,
               bad: tuple[BadInput, ...], pids: set[int], seeded: bool = True) -> RoundReport:
    """One round of ``count`` drawn requests and every bad input. ``seeded``
    False drops the sampled requests' ``seed`` (for stock vLLM, whose CPU engine
    dies on a seeded request whose prompt takes more than one step)."""
    # Every bad input once, besides those drawn at random.
    requests = [make_request(rng, setup, bad) for _ in range(count)]
    if not seeded:
        for req in requests:
            if req.payload is not None:
                req.payload.pop("seed", None)
    requests += [Request(f"bad: {b.name}", b.endpoint, bad=b) for b in bad]
    rng.shuffle(requests)
    before = metrics(server.port)
    t0 = time.perf_counter()
    outcomes = asyncio.run(run_load(server.port, requests, setup.clients))
    seconds = time.perf_counter() - t0
    usage, busy = idle_usage(server.port)
    after = metrics(server.port)
    table: dict[str, list[int]] = {}
    for o in outcomes:
        table.setdefault(o.kind, [0, 0])[0 if o.ok else 1] += 1
    return RoundReport(
        round=index, seconds=round(seconds, 1), outcomes=dict(sorted(table.items())),
        failures=[f"{o.kind}: {o.detail}" for o in outcomes if not o.ok],
        preemptions=int(after.get("vllm:num_preemptions_total", 0)
                        - before.get("vllm:num_preemptions_total", 0)),
        kv_usage_after=usage, busy_after=busy, rss_mib_after=round(tree_rss_mib(server.proc.pid), 1),
        same_processes={p.pid for p in process_tree(server.proc.pid)} == pids,
    )


# -- isolation, security, shutdown ----------------------------------------------------

def completion_tokens(port: int, requests: list[Request], clients: int) -> list[list[int] | None]:
    """Greedy completions' generated token ids (None where a request failed)."""
    import aiohttp

    async def go() -> list:
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {API_KEY}"}
        gate = asyncio.Semaphore(clients)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
            async def one(req: Request, delay: float):
                await asyncio.sleep(delay)
                async with gate, session.post(base + req.endpoint, json=req.payload,
                                              headers=headers) as r:
                    if r.status != 200:
                        return None
                    return (await r.json())["choices"][0]["token_ids"]
            # The last request arrives last: first in line to be preempted.
            delays = [0.0] * (len(requests) - 1) + [0.5]
            return await asyncio.gather(*(one(r, d) for r, d in zip(requests, delays)))

    return asyncio.run(go())


def greedy(prompt: list[int], max_tokens: int) -> Request:
    return Request("probe", "/v1/completions", {
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "return_token_ids": True})


def probe_request(setup: Setup) -> Request:
    """The isolation probe: the same greedy request on every server."""
    return greedy(token_prompt(random.Random(1234), setup.probe_len), setup.probe_tokens)


def isolation(server: Server, setup: Setup, rng: random.Random) -> dict:
    probe = probe_request(setup)
    alone = completion_tokens(server.port, [probe], 1)[0]
    neighbours = [greedy(token_prompt(rng, rng.randint(*setup.long_len) if i % 2 else
                                      rng.randint(8, 200)), setup.probe_tokens)
                  for i in range(15)]
    before = metrics(server.port).get("vllm:num_preemptions_total", 0)
    batch = completion_tokens(server.port, [*neighbours, probe], 16)
    preempted = metrics(server.port).get("vllm:num_preemptions_total", 0) - before
    return {"probe_tokens": setup.probe_tokens, "alone": alone,
            "alone_equals_in_batch": alone == batch[-1],
            "alone_answered": alone is not None and len(alone) == setup.probe_tokens,
            "neighbours_answered": sum(t is not None for t in batch[:-1]),
            "preemptions_in_batch": int(preempted)}


def routes(port: int) -> list[str]:
    """The server's HTTP routes, from its OpenAPI schema."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=10) as r:
        return sorted(json.load(r)["paths"])


def security(server: Server, setup: Setup, rng: random.Random) -> dict:
    long = json.dumps({"model": MODEL, "prompt": token_prompt(rng, setup.long_len[0]),
                       "max_tokens": 8}).encode()
    unauthorized = BadInput("no key", "/v1/completions", long, 401, ("unauthorized",))
    requests = [Request("no key", unauthorized.endpoint, bad=unauthorized)] * 5
    before = metrics(server.port)
    outcomes = [o for headers in ({}, {"Authorization": "Bearer wrong-key"})
                for o in asyncio.run(run_load(server.port, requests, 1, headers))]
    time.sleep(1.5)
    after = metrics(server.port)
    return {"unauthorized_requests": len(outcomes), "all_401": all(o.ok for o in outcomes),
            "prompt_tokens_charged": int(after.get("vllm:prompt_tokens_total", 0)
                                         - before.get("vllm:prompt_tokens_total", 0)),
            "kv_usage_during": after.get("vllm:kv_cache_usage_perc", 0.0)}


def is_alive(process) -> bool:
    """Running and not a zombie (a killed child its parent has not reaped yet)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sigterm_mid_load(server: Server, setup: Setup, rng: random.Random) -> dict:
    """SIGTERM while ``setup.clients`` requests are in flight. vLLM stops its engine
    at once (``--shutdown-timeout`` 0: abort); its HTTP server (uvicorn) then waits for
    open client connections, so the clients are cut ``SHUTDOWN_GRACE_S`` after the
    signal if they are still connected. Measured: when the engine processes were gone,
    when the API server exited, and whether it had to wait for the clients."""
    import psutil

    api = psutil.Process(server.proc.pid)
    # The API server's other children (multiprocessing's resource tracker) go with it.
    engine = engine_processes(server.proc.pid)
    # Greedy and unseeded: stock vLLM's engine dies on seeded long prompts
    # (vllm_fixes.py), which would end this run before the signal.
    requests = [greedy(token_prompt(rng, rng.randint(8, setup.long_len[0])), 256)
                for _ in range(setup.clients)]

    async def load_then_term() -> dict:
        load = asyncio.ensure_future(run_load(server.port, requests, setup.clients))
        await asyncio.sleep(3)
        t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        alive = engine
        while alive and time.perf_counter() - t0 < SHUTDOWN_GRACE_S:
            await asyncio.sleep(0.2)
            alive = [p for p in alive if is_alive(p)]
        engine_s = time.perf_counter() - t0
        try:
            await asyncio.to_thread(server.proc.wait, max(0.0, SHUTDOWN_GRACE_S - engine_s))
            waited_for_clients = False
        except subprocess.TimeoutExpired:
            waited_for_clients = True
            load.cancel()  # the clients go away
            await asyncio.to_thread(server.proc.wait, SHUTDOWN_GRACE_S)
        api_s = time.perf_counter() - t0
        outcomes = [] if load.cancelled() else await load
        return {"engine_exit_s": round(engine_s, 1), "api_exit_s": round(api_s, 1),
                "api_waited_for_clients": waited_for_clients,
                "engine_processes": len(engine), "engine_left": [p.pid for p in alive],
                "requests_answered_before_exit": sum(o.ok for o in outcomes)}

    try:
        result = asyncio.run(load_then_term())
    except subprocess.TimeoutExpired:
        result = {"api_exit_s": None}
    time.sleep(1)
    left = [p.pid for p in (api, *engine) if is_alive(p)]
    return {**result, "exit_code": server.proc.returncode, "processes_left": left,
            "clean": not left and not result.get("engine_left")
            and result.get("engine_exit_s", SHUTDOWN_GRACE_S + 1) <= SHUTDOWN_GRACE_S}


# -- report --------------------------------------------------------------------------

@dataclass
class BudgetReport:
    budget: float
    pool_bytes: int
    rounds: list[RoundReport] = field(default_factory=list)
    isolation: dict = field(default_factory=dict)
    security: dict = field(default_factory=dict)
    shutdown: dict = field(default_factory=dict)
    idle_kv_usage: float = 0.0
    routes: list[str] = field(default_factory=list)
    stock: dict | None = None
    """Stock vLLM's answers to the same questions (the full run): its routes and, at
    budget 1.0, its tokens for the isolation probe."""

    def checks(self) -> dict[str, bool]:
        first = self.rounds[0].rss_mib_after
        against_stock = {}
        if self.stock:
            against_stock["the same HTTP routes as stock vLLM"] = self.routes == self.stock["routes"]
            if self.budget == 1.0:
                against_stock["budget 1.0: probe tokens == stock vLLM's"] = (
                    self.isolation.get("alone") == self.stock["probe_alone"])
        return {
            **against_stock,
            "every request answered or refused as it should be": all(
                not r.failures for r in self.rounds),
            "load preempted requests": any(r.preemptions for r in self.rounds),
            "KV usage back to idle after every round": all(
                r.kv_usage_after == self.idle_kv_usage and not r.busy_after for r in self.rounds),
            "server never restarted": all(r.same_processes for r in self.rounds),
            **({f"RSS within {RSS_TOLERANCE:.0%} of round 1": all(
                abs(r.rss_mib_after - first) <= RSS_TOLERANCE * first for r in self.rounds)}
               if len(self.rounds) > 1 else {}),
            "probe alone == probe in a preempting batch": bool(
                self.isolation.get("alone_answered") and self.isolation.get("alone_equals_in_batch")),
            "no key / wrong key: 401, no prompt tokens charged": bool(
                self.security.get("all_401") and not self.security.get("prompt_tokens_charged")),
            **({f"SIGTERM mid-load: engine gone within {SHUTDOWN_GRACE_S} s, no process left":
                bool(self.shutdown.get("clean"))} if self.shutdown else {}),
        }


def print_report(report: BudgetReport) -> None:
    print(f"\n== budget {report.budget}: pool {report.pool_bytes / 2**20:.0f} MiB ==")
    kinds = sorted({k for r in report.rounds for k in r.outcomes})
    print(f"{'request kind':<40}" + "".join(f"{'round ' + str(r.round):>14}" for r in report.rounds))
    for k in kinds:
        cells = [r.outcomes.get(k, [0, 0]) for r in report.rounds]
        print(f"{k:<40}" + "".join(f"{f'{ok} ok / {bad} bad':>14}" for ok, bad in cells))
    for r in report.rounds:
        print(f"round {r.round}: {r.seconds} s, {r.preemptions} preemptions, KV usage after "
              f"{r.kv_usage_after}, RSS {r.rss_mib_after} MiB, same processes {r.same_processes}")
        for f in r.failures[:10]:
            print("   FAILED", f)
    for name, ok in report.checks().items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")


def plot(reports: list[BudgetReport], path: Path) -> None:
    if not reports:  # stock vLLM only: nothing of ours to draw
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(7 * len(reports), 6), squeeze=False)
    for ax, report in zip(axes[0], reports):
        totals: Counter = Counter()
        failed: Counter = Counter()
        for r in report.rounds:
            for kind, (ok, bad) in r.outcomes.items():
                totals[kind] += ok + bad
                failed[kind] += bad
        kinds = sorted(totals)
        ax.barh(kinds, [totals[k] - failed[k] for k in kinds], label="as required")
        ax.barh(kinds, [failed[k] for k in kinds], left=[totals[k] - failed[k] for k in kinds],
                color="tab:red", label="failed")
        ax.set_title(f"budget {report.budget}: {len(report.rounds)} rounds")
        ax.set_xlabel("requests")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def server_flags(setup: Setup, pool_bytes: int, budget: float | None) -> list[str]:
    """``kvreviver serve`` flags of a stress server; ``budget`` None: stock vLLM."""
    flags = ["--dtype", "float32", "--max-model-len", str(setup.max_model_len),
             "--kv-cache-memory-bytes", str(pool_bytes), "--max-num-seqs", "16",
             "--max-num-batched-tokens", str(setup.max_num_batched_tokens),
             "--long-prefill-token-threshold", str(setup.long_prefill_token_threshold),
             # Admit requests on their first chunk, so that they outgrow the pool
             # while reading their prompts and are preempted.
             "--no-scheduler-reserve-full-isl", "--api-key", API_KEY]
    if budget is None:
        return flags + ["--attention-backend", "CPU_ATTN"]
    return flags + ["--additional-config", json.dumps({"kvreviver": {"budget": budget}})]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run for the test suite")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--budgets", type=float, nargs="*",
                        help="budgets to serve (none: stock vLLM only)")
    parser.add_argument("--rounds", type=int, help="at budgets under 1.0")
    parser.add_argument("--requests", type=int, help="per round, at budgets under 1.0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stock-rounds", type=int, default=0,
                        help="load rounds on stock vLLM too (the requests of the first budget's "
                             "rounds, without their sampling seeds), for its RSS and preemptions "
                             "under the same load")
    parser.add_argument("--no-stock", action="store_true",
                        help="skip the stock vLLM server (routes, probe, SIGTERM); --quick skips it")
    args = parser.parse_args()
    args.no_stock |= args.quick
    setup = QUICK if args.quick else Setup()
    overrides = {k: v for k, v in (("rounds", args.rounds), ("requests", args.requests)) if v}
    if args.budgets is not None:
        overrides["budgets"] = tuple(args.budgets)
    setup = Setup(**{**setup.__dict__, **overrides})

    from throughput import stock_bytes_per_token

    from kvreviver_vllm.models import prepare_default_model

    model_dir = str(prepare_default_model())
    pool_bytes = setup.pool_tokens * stock_bytes_per_token(model_dir, "float32")
    bad = bad_inputs(setup.max_model_len)
    rng = random.Random(args.seed)
    reports: list[BudgetReport] = []
    started = time.time()
    logs = Path(tempfile.mkdtemp(prefix="kvreviver-stress-"))
    print(f"[stress] server logs in {logs}", flush=True)
    stock = None
    if not args.no_stock:
        print("[stress] stock vLLM (CPU_ATTN): starting the server ...", flush=True)
        with Server(server_flags(setup, pool_bytes, None), "stress-stock", logs) as server:
            stock = {"routes": routes(server.port),
                     "probe_alone": completion_tokens(server.port, [probe_request(setup)], 1)[0]}
            if args.stock_rounds:
                pids = {p.pid for p in process_tree(server.proc.pid)}
                stock_rng = random.Random(args.seed)  # the first budget's requests
                stock["rounds"] = []
                for r in range(1, args.stock_rounds + 1):
                    done = load_round(server, r, setup.requests, setup, stock_rng, bad, pids,
                                      seeded=False)
                    stock["rounds"].append(done.__dict__)
                    print(f"[stress]   stock {done.summary()}", flush=True)
            stock["shutdown"] = sigterm_mid_load(server, setup, random.Random(args.seed))
        print(f"[stress]   stock: SIGTERM {stock['shutdown']}", flush=True)
        if not setup.budgets:
            write_report(args, setup, bad, stock, reports, time.time() - started, complete=True)
    for i, budget in enumerate(setup.budgets):
        report = BudgetReport(budget, pool_bytes, stock=stock)
        reports.append(report)
        print(f"[stress] budget {budget}: starting the server ...", flush=True)
        with Server(server_flags(setup, pool_bytes, budget), f"stress-{budget:g}", logs) as server:
            report.routes = routes(server.port)
            pids = {p.pid for p in process_tree(server.proc.pid)}
            report.idle_kv_usage = idle_usage(server.port)[0]
            rounds, requests = setup.load(budget)
            for r in range(1, rounds + 1):
                done = load_round(server, r, requests, setup, rng, bad, pids)
                report.rounds.append(done)
                print(f"[stress]   {done.summary()}", flush=True)
                for failure in done.failures:
                    print(f"[stress]     FAILED {failure}", flush=True)
            report.isolation = isolation(server, setup, rng)
            report.security = security(server, setup, rng)
            if i == len(setup.budgets) - 1:
                report.shutdown = sigterm_mid_load(server, setup, rng)
            if any(not ok for ok in report.checks().values()):
                print(server.log_path.read_text()[-3000:])
            print_report(report)
        # Written after every budget, so a run that stops keeps what it measured.
        write_report(args, setup, bad, stock, reports, time.time() - started,
                     complete=i == len(setup.budgets) - 1)
    return 0 if all(all(r.checks().values()) for r in reports) else 1


def write_report(args: argparse.Namespace, setup: Setup, bad: tuple[BadInput, ...],
                 stock: dict | None, reports: list[BudgetReport], seconds: float,
                 complete: bool) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "seed": args.seed, "cpus": os.cpu_count(), "complete": complete,
        "seconds": round(seconds), "setup": setup.__dict__,
        "bad_inputs": [b.name for b in bad],
        "stock": stock,
        "budgets": [{**{k: v for k, v in r.__dict__.items() if k != "stock"},
                     "rounds": [x.__dict__ for x in r.rounds], "checks": r.checks()}
                    for r in reports],
    }
    (args.out / "stress.json").write_text(json.dumps(out, indent=2))
    plot(reports, args.out / "stress.png")



if __name__ == "__main__":
    sys.exit(main())
