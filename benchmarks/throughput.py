"""Serving throughput: stock vLLM against vLLM + KVReviver, same KV memory, same requests.

Each configuration is a real ``kvreviver serve`` (the OpenAI server, ``vllm serve`` with
this package's CPU defaults: eager, no prefix caching; bf16 unless ``--dtype``) on the
default model; stock vLLM is the same command with ``--attention-backend CPU_ATTN``.
Both prefill in chunks of 512 tokens (``--max-num-batched-tokens``, the serve default
here). A KVReviver request holds its whole prompt while reading it, as stock vLLM does,
and its budget plus a 32-token decode room after its first output token.
The load is vLLM's own ``vllm bench serve`` (random-token prompts, seeded, EOS ignored),
and a thread polls the server's ``/metrics`` for running requests and KV usage.

Scenarios:

* ``pressure``: a KV pool of ``--pool-requests`` stock requests' worth of bytes (prompt +
  output), the same bytes for every configuration; ``--requests`` prompts of
  ``--input-len`` tokens, ``--output-len`` generated each; all at once (``burst``) and
  with Poisson arrivals (``poisson``, ``--rate`` requests/s). Budgets ``--budgets``.
* ``no-pressure``: a pool large enough for everything; ``--concurrency`` requests at a
  time over ``--contexts``: the per-token decode cost (TPOT) of the backend itself.

Reported per run: completed/failed requests, peak running requests (``/metrics``),
output tokens/s, requests/s, TTFT and TPOT (median, p99), peak KV blocks in use, and the
ratios to stock vLLM in the same scenario. Accuracy of each configuration is quoted from
``benchmarks/results/accuracy.json`` when present.

Run:  .venv/bin/python benchmarks/throughput.py [--quick] [--out DIR]

Writes ``throughput.json`` and ``throughput.png`` to ``--out`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness.server import Server, metrics

RESULTS = Path(__file__).resolve().parent / "results"
STOCK = "stock"


@dataclass(frozen=True)
class Setup:
    requests: int = 32
    input_len: int = 2048
    output_len: int = 128
    pool_requests: int = 4
    budgets: tuple[float, ...] = (0.1, 0.25)
    rate: float = 0.5
    poisson_budgets: tuple[float, ...] = (0.1,)
    concurrency: tuple[int, ...] = (1, 16)
    contexts: tuple[int, ...] = (2048, 8064)
    """Prompt lengths without memory pressure; 8064 + decode_tokens fills the default
    model's 8192 positions."""
    decode_tokens: int = 64
    no_pressure_budget: float = 0.1
    block_size: int = 32
    shared_servers: bool = False
    """Run the no-pressure loads on the pressure scenario's servers (--quick only:
    one server start per engine)."""
    stock_chunk: int = 512
    """--max-num-batched-tokens of stock vLLM (the serve default here)."""
    chunk: int = 512
    """--max-num-batched-tokens with KVReviver."""
    dtype: str = "bfloat16"
    """Model and KV cache dtype (--quick: the one this CPU computes fast)."""


QUICK = Setup(requests=4, input_len=512, output_len=16, pool_requests=2, budgets=(0.25,),
              rate=2.0, poisson_budgets=(), concurrency=(2,), contexts=(512,), decode_tokens=8,
              no_pressure_budget=0.25, shared_servers=True)


@dataclass
class Result:
    scenario: str
    config: str
    budget: float | None
    load: str
    completed: int = 0
    failed: int = 0
    peak_running: int = 0
    peak_kv_usage: float = 0.0
    num_blocks: int = 0
    output_tok_s: float = 0.0
    request_s: float = 0.0
    ttft_median_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    tpot_median_ms: float = 0.0
    tpot_p99_ms: float = 0.0
    seconds: float = 0.0


# -- the server ------------------------------------------------------------------

def server_args(budget: float | None, pool_bytes: int, max_len: int, block_size: int,
                chunk: int, dtype: str) -> list[str]:
    """``kvreviver serve`` flags of one configuration; ``budget`` None is stock vLLM."""
    args = ["--max-model-len", str(max_len), "--dtype", dtype,
            "--kv-cache-memory-bytes", str(pool_bytes), "--block-size", str(block_size),
            # vLLM wants at least as many batched tokens as sequences.
            "--max-num-seqs", str(min(256, chunk)), "--max-num-batched-tokens", str(chunk)]
    if budget is None:
        return args + ["--attention-backend", "CPU_ATTN"]
    return args + ["--additional-config", json.dumps({"kvreviver": {"budget": budget}})]


class Poller(threading.Thread):
    """Peak running requests and KV usage, sampled every 0.25 s."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stop, self.peak_running, self.peak_usage = port, threading.Event(), 0, 0.0
        self.num_blocks = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                m = metrics(self.port)
                self.peak_running = max(self.peak_running, int(m.get("vllm:num_requests_running", 0)))
                self.peak_usage = max(self.peak_usage, m.get("vllm:kv_cache_usage_perc", 0.0))
                self.num_blocks = int(m.get("num_blocks", self.num_blocks))
            except OSError:
                pass
            self.stop.wait(0.25)


def bench(server: Server, model_dir: str, num_prompts: int, input_len: int, output_len: int,
          rate: float | None, concurrency: int | None, seed: int, work: Path) -> dict:
    """One ``vllm bench serve`` run against ``server``; its saved JSON result."""
    name = f"bench-{server.port}-{num_prompts}-{input_len}-{rate}-{concurrency}.json"
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "vllm"), "bench", "serve",
        "--backend", "vllm", "--base-url", f"http://127.0.0.1:{server.port}",
        "--model", "SmolLM2-135M-Instruct", "--tokenizer", model_dir,
        "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--random-range-ratio", "0",
        "--num-prompts", str(num_prompts), "--ignore-eos", "--seed", str(seed),
        "--request-rate", "inf" if rate is None else str(rate),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(work), "--result-filename", name,
    ]
    if concurrency:
        cmd += ["--max-concurrency", str(concurrency)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((work / name).read_text())


def measure(scenario: str, config: str, budget: float | None, load: str, server: Server,
            **bench_args) -> Result:
    poller = Poller(server.port)
    poller.start()
    start = time.perf_counter()
    try:
        out = bench(server, **bench_args)
    finally:
        poller.stop.set()
        poller.join()
    return Result(
        scenario=scenario, config=config, budget=budget, load=load,
        completed=out["completed"], failed=out.get("failed", 0),
        peak_running=poller.peak_running, peak_kv_usage=poller.peak_usage,
        num_blocks=poller.num_blocks,
        output_tok_s=out["output_throughput"], request_s=out["request_throughput"],
        ttft_median_ms=out["median_ttft_ms"], ttft_p99_ms=out["p99_ttft_ms"],
        tpot_median_ms=out["median_tpot_ms"], tpot_p99_ms=out["p99_tpot_ms"],
        seconds=time.perf_counter() - start,
    )


# -- reporting ---------------------------------------------------------------------

def with_ratios(results: list[Result]) -> list[dict]:
    rows = []
    for r in results:
        row = asdict(r)
        base = next((b for b in results if (b.scenario, b.load, b.config) == (r.scenario, r.load, STOCK)), None)
        if base is not None:
            for key in ("peak_running", "output_tok_s", "request_s", "tpot_median_ms", "ttft_median_ms"):
                row[f"{key}_x"] = getattr(r, key) / getattr(base, key) if getattr(base, key) else None
        rows.append(row)
    return rows


def accuracy_note(budget: float | None) -> str:
    """Accuracy of this configuration from the committed accuracy report, if any."""
    path = RESULTS / "accuracy.json"
    if budget is None or not path.exists():
        return "full cache" if budget is None else "not measured"
    rows = [r for r in json.loads(path.read_text())["rows"]
            if r["method"] == "quantized" and r["budget"] == budget and "correct" in r]
    if not rows:
        return "not measured"
    return ", ".join(f"{r['task']}@{r['context']}: {r['correct']}/{r['samples']}" for r in rows)


def table(rows: list[dict]) -> str:
    head = ["scenario", "load", "config", "done", "peak run", "out tok/s", "req/s",
            "TTFT p50/p99 ms", "TPOT p50/p99 ms", "x run", "x tok/s", "x TPOT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def x(v):
        return "-" if v is None else f"{v:.2f}"

    for r in rows:
        lines.append("| " + " | ".join([
            r["scenario"], r["load"], r["config"], f"{r['completed']}/{r['completed'] + r['failed']}",
            str(r["peak_running"]), f"{r['output_tok_s']:.1f}", f"{r['request_s']:.3f}",
            f"{r['ttft_median_ms']:.0f}/{r['ttft_p99_ms']:.0f}",
            f"{r['tpot_median_ms']:.0f}/{r['tpot_p99_ms']:.0f}",
            x(r.get("peak_running_x")), x(r.get("output_tok_s_x")), x(r.get("tpot_median_ms_x")),
        ]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pressure = [r for r in rows if r["scenario"] == "pressure" and r["load"] == "burst"]
    quiet = [r for r in rows if r["scenario"] == "no-pressure"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    labels = [r["config"] for r in pressure]
    axes[0].bar(labels, [r["output_tok_s"] for r in pressure], color="tab:blue")
    axes[0].set_title("memory pressure: output tokens/s")
    axes[1].bar(labels, [r["peak_running"] for r in pressure], color="tab:green")
    axes[1].set_title("memory pressure: peak running requests")
    loads = sorted({r["load"] for r in quiet})
    for config in sorted({r["config"] for r in quiet}):
        axes[2].plot(loads, [next(r["tpot_median_ms"] for r in quiet if r["load"] == l and r["config"] == config)
                             for l in loads], marker="o", label=config)
    axes[2].set_title("no pressure: median TPOT (ms)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main --------------------------------------------------------------------------

def stock_bytes_per_token(model_dir: str, dtype: str) -> int:
    """Stock vLLM's KV bytes per token for the model (all layers, K and V)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    value_bytes = 4 if dtype == "float32" else 2
    return cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 2 * head_dim * value_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--scenarios", nargs="+", default=["pressure", "no-pressure"],
                        choices=["pressure", "no-pressure"])
    parser.add_argument("--budgets", type=float, nargs="+",
                        help="KVReviver budgets under pressure (default: 0.1 0.25)")
    parser.add_argument("--chunk", type=int,
                        help="KVReviver's --max-num-batched-tokens (default: 512)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                        help="model and KV cache dtype (default: bfloat16; with --quick: bfloat16 "
                        "where this CPU computes it fast, else float32)")
    parser.add_argument("--no-stock", action="store_true",
                        help="skip stock vLLM (no ratios; for probing one setting)")
    args = parser.parse_args()
    setup = QUICK if args.quick else Setup()
    if args.quick and not args.dtype:
        from kvreviver_vllm.host import fast_dtype

        args.dtype = fast_dtype()
    overrides = {"budgets": tuple(args.budgets) if args.budgets else None, "chunk": args.chunk,
                 "dtype": args.dtype}
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    for name, value in (("--budgets", setup.budgets), ("--chunk", (setup.chunk,))):
        if any(v <= 0 for v in value):
            parser.error(f"{name} must be positive, got {value}")
    if setup.shared_servers and "pressure" not in args.scenarios:
        parser.error("--quick runs both scenarios on the same servers: keep 'pressure'")

    from kvreviver_vllm.models import prepare_default_model

    model_dir = str(prepare_default_model())
    per_token = stock_bytes_per_token(model_dir, setup.dtype)
    work = Path(tempfile.mkdtemp(prefix="kvreviver-throughput-"))
    started = time.perf_counter()
    results: list[Result] = []

    # (budget, pool bytes, max model len) -> [(scenario, load, bench args)]: each
    # server starts once and runs every load planned for it.
    plan: dict[tuple, list[tuple[str, str, dict]]] = {}
    stock = () if args.no_stock else (None,)
    if "pressure" in args.scenarios:
        request_tokens = setup.input_len + setup.output_len
        pool = setup.pool_requests * request_tokens * per_token
        max_len = request_tokens + 64
        common = dict(num_prompts=setup.requests, input_len=setup.input_len,
                      output_len=setup.output_len, concurrency=None)
        for budget in (*stock, *setup.budgets):
            loads = plan.setdefault((budget, pool, max_len), [])
            loads.append(("pressure", "burst", dict(common, rate=None)))
            if budget is None or budget in setup.poisson_budgets:
                loads.append(("pressure", "poisson", dict(common, rate=setup.rate)))
    if "no-pressure" in args.scenarios:
        if not setup.shared_servers:
            max_len = max(setup.contexts) + setup.decode_tokens
            pool = 2 * max(setup.concurrency) * max_len * per_token
        for budget in (*stock, setup.no_pressure_budget):
            loads = plan.setdefault((budget, pool, max_len), [])
            loads += [
                ("no-pressure", f"c{c}@{n}",
                 dict(num_prompts=c, input_len=n, output_len=setup.decode_tokens, rate=None,
                      concurrency=c))
                for n in setup.contexts for c in setup.concurrency
                if not (n > 4096 and c > 1)  # 16 prompts of 8k: too long for a 2-core run
            ]

    for (budget, pool, max_len), loads in plan.items():
        config = STOCK if budget is None else f"kvreviver@{budget:g}"
        chunk = setup.stock_chunk if budget is None else setup.chunk
        print(f"[throughput] {config}, pool {pool / 2**20:.0f} MiB ...", flush=True)
        flags = server_args(budget, pool, max_len, setup.block_size, chunk, setup.dtype)
        with Server(flags, "stock" if budget is None else f"{budget:g}", work) as server:
            for scenario, load, bench_args in loads:
                r = measure(scenario, config, budget, load, server, model_dir=model_dir,
                            seed=args.seed, work=work, **bench_args)
                print(f"[throughput]   {scenario} {load}: {r.completed} done, peak running "
                      f"{r.peak_running}, {r.output_tok_s:.1f} tok/s, TPOT p50 "
                      f"{r.tpot_median_ms:.0f} ms", flush=True)
                results.append(r)
                # Written after every load, so a run that stops keeps what it measured.
                write_report(results, setup, args, per_token, started, complete=False)

    rows = write_report(results, setup, args, per_token, started, complete=True)
    print(table(rows))
    print(f"[throughput] wrote {args.out / report_stem(args)}.{{json,png}} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


def report_stem(args: argparse.Namespace) -> str:
    return "throughput_quick" if args.quick else "throughput"


def write_report(results: list[Result], setup: Setup, args: argparse.Namespace, per_token: int,
                 started: float, complete: bool) -> list[dict]:
    """``<stem>.json`` (and, once complete, ``<stem>.png``) from the loads so far."""
    order = {"pressure": 0, "no-pressure": 1}
    ordered = sorted(results, key=lambda r: (order[r.scenario], r.load, r.budget or 0.0))
    rows = with_ratios(ordered)
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), seed=args.seed,
        complete=complete, seconds=round(time.perf_counter() - started),
        setup=asdict(setup), stock_bytes_per_token=per_token, rows=rows,
        accuracy={cfg: accuracy_note(b) for cfg, b in
                  {r["config"]: r["budget"] for r in rows}.items()},
    )
    (args.out / f"{report_stem(args)}.json").write_text(json.dumps(report, indent=1))
    if complete:
        plot(rows, args.out / f"{report_stem(args)}.png")
    return rows


if __name__ == "__main__":
    sys.exit(main())
