"""Needle coverage: after compaction, does the cache still hold the answer?

A retrieval prompt fails under compression either because the answer's tokens left
the cache (coverage) or because what was kept is too coarse to read (precision).
This tells the two apart. For each method and budget it runs the retrieval prompts of
``harness.tasks`` in real vLLM (greedy, as ``accuracy.py`` does) and records,
at each request's first compaction (its first decode step, where the prompt is brought
to budget), which prompt positions every (layer, KV head) still holds
(``harness.probes.install_coverage_probe``). Per task it reports:

* ``held``: the fraction of (layer, KV head) pairs that hold every token of at least
  one copy of the answer's digits, exact or in the store;
* ``exact``: the same, counting exact tokens only;
* ``tokens``: prompt tokens held per (layer, KV head), as a fraction of the prompt;
* ``held`` among the prompts answered correctly and among the others, both counted only
  where stock vLLM with the full cache answers (run first, for that alone): a prompt the
  model misses anyway says nothing about compression.

Run:  .venv/bin/python benchmarks/needle_coverage.py [--quick] [--budgets ...] [--methods ...] [--seed N]
      [--set KEY=VALUE ...]

Writes ``coverage.json``, ``coverage.md`` and ``coverage.png`` to ``--out`` (default
``benchmarks/results/coverage``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import accuracy

RESULTS = accuracy.RESULTS / "coverage"
METHODS = ("streaming", "evict", "sketch", "quantized", "quantized-3bit", "quantized-2bit")
TASKS = ("passkey-repeat", "passkey-natural", "multikey")


def answer_copies(prompt_ids: list[int], answer_ids: list[int]) -> list[range]:
    """Position ranges of every occurrence of ``answer_ids`` in ``prompt_ids``."""
    n = len(answer_ids)
    return [range(i, i + n) for i in range(len(prompt_ids) - n + 1)
            if prompt_ids[i : i + n] == answer_ids]


def holds(positions: set[int], copies: list[range]) -> bool:
    return any(all(p in positions for p in copy) for copy in copies)


def generate(model_dir: str, kwargs: dict, samples, chunk: int, probe: bool):
    """Greedy outputs of every sample and, with ``probe``, what the coverage probe saw."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from harness.probes import coverage_results, install_coverage_probe

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc ships the probe
    max_len = max(len(s.prompt_ids) for s in samples) + accuracy.MAX_TOKENS + 8
    with accuracy.engine(model_dir, max_len, chunk, **kwargs) as llm:
        if probe:
            llm.collective_rpc(install_coverage_probe)
        params = SamplingParams(temperature=0.0, max_tokens=accuracy.MAX_TOKENS, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=s.prompt_ids) for s in samples], params)
        held = llm.collective_rpc(coverage_results)[0] if probe else []
    return outs, held


def full_cache_answers(model_dir: str, samples, chunk: int, dtype: str) -> list[bool]:
    """Whether stock vLLM with the full cache answers each sample."""
    from harness.tasks import is_correct

    outs, _ = generate(model_dir, {"dtype": dtype}, samples, chunk, probe=False)
    return [is_correct(s, o.outputs[0].text) for s, o in zip(samples, outs)]


def run_config(model_dir: str, method: str, budget: float, samples, chunk: int, dtype: str,
               tokenizer, full_correct: list[bool], knobs: dict | None = None):
    """Per sample: correct (and whether the full cache is), and per (layer, head) whether
    the answer is held (any / exact) and how many prompt tokens are held."""
    from harness.tasks import is_correct

    kwargs = {"dtype": dtype, **accuracy.engine_kwargs(method, budget, None, knobs)}
    outs, held = generate(model_dir, kwargs, samples, chunk, probe=True)
    by_request: dict[int, list[tuple[list[int], list[int]]]] = {}
    for serial, _, _, exact, vague in held:
        by_request.setdefault(serial, []).append((exact, vague))
    rows = []
    for serial, (sample, out) in enumerate(zip(samples, outs)):
        copies = answer_copies(sample.prompt_ids, tokenizer.encode(sample.answer, add_special_tokens=False))
        if not copies:
            raise RuntimeError(f"{sample.task}: answer {sample.answer} not found in its prompt")
        pairs = by_request.get(serial)
        if not pairs:
            raise RuntimeError(f"{method}@{budget:g}: request {serial} was never compacted")
        prompt_len = len(sample.prompt_ids)
        any_held, exact_held, tokens = [], [], []
        for exact, vague in pairs:
            exact_set = {p for p in exact if p < prompt_len}
            all_set = exact_set | {p for p in vague if p < prompt_len}
            any_held.append(holds(all_set, copies))
            exact_held.append(holds(exact_set, copies))
            tokens.append(len(all_set) / prompt_len)
        rows.append(dict(task=sample.task, correct=is_correct(sample, out.outputs[0].text),
                         full_correct=full_correct[serial],
                         held=statistics.fmean(any_held), exact=statistics.fmean(exact_held),
                         tokens=statistics.fmean(tokens), pairs=len(pairs)))
    return rows


def summarize(method: str, budget: float, per_sample: list[dict]) -> list[dict]:
    out = []
    for task in dict.fromkeys(r["task"] for r in per_sample):
        mine = [r for r in per_sample if r["task"] == task]
        # Among the prompts the full cache answers: a miss there is compression's.
        right = [r["held"] for r in mine if r["correct"] and r["full_correct"]]
        wrong = [r["held"] for r in mine if not r["correct"] and r["full_correct"]]
        out.append(dict(
            method=method, budget=budget, task=task, samples=len(mine),
            correct=sum(r["correct"] for r in mine),
            full_correct=sum(r["full_correct"] for r in mine),
            held=statistics.fmean(r["held"] for r in mine),
            exact=statistics.fmean(r["exact"] for r in mine),
            tokens=statistics.fmean(r["tokens"] for r in mine),
            held_correct=statistics.fmean(right) if right else None,
            held_wrong=statistics.fmean(wrong) if wrong else None,
        ))
    return out


def markdown(rows: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    lines = ["Held (right) and held (wrong): among the prompts the full cache answers.", "",
             "| method | budget | task | correct | full cache | held | exact | tokens held "
             "| held (right) | held (wrong) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']:.0%} | {r['task']} | {r['correct']}/{r['samples']} "
                     f"| {r['full_correct']}/{r['samples']} "
                     f"| {pct(r['held'])} | {pct(r['exact'])} | {pct(r['tokens'])} "
                     f"| {pct(r['held_correct'])} | {pct(r['held_wrong'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), squeeze=False, figsize=(4 * len(tasks), 3.2))
    for ax, task in zip(axes[0], tasks):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["task"] == task and r["method"] == method),
                          key=lambda r: r["budget"])
            ax.plot([r["budget"] for r in mine], [r["held"] for r in mine], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"answer held, {task}", fontsize=9)
        ax.set_xlabel("budget (fraction of context)", fontsize=8)
        ax.set_ylabel("(layer, KV head) pairs", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid for tests (~2 min)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["evict", "quantized"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--samples", type=int, default=8, help="prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=512, help="--max-num-batched-tokens")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="kvreviver config keys for every method, as in accuracy.py")
    accuracy.add_dtype_argument(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    knobs = accuracy.parse_knobs(args.set)
    dtype = accuracy.resolve_dtype(args)
    if args.quick:
        args.budgets, args.context, args.tasks, args.samples = [0.25], 1024, ["passkey-repeat"], 2
    bad = [b for b in args.budgets if not 0 < b < 1]
    if bad:
        raise SystemExit(f"--budgets {bad[0]}: a budget here is a fraction in (0, 1)")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from transformers import AutoTokenizer

    from kvreviver_vllm.models import default_model_dir
    from harness.tasks import TaskGenerator

    model_dir = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = TaskGenerator(tokenizer)
    samples = [s for task in args.tasks
               for s in generator.samples(task, args.context, args.samples, args.seed)]
    start = time.perf_counter()
    full_correct = full_cache_answers(model_dir, samples, args.chunk, dtype)
    rows, seconds, per_samples = [], {"full": time.perf_counter() - start}, {}
    for budget in args.budgets:
        for method in args.methods:
            start = time.perf_counter()
            per_sample = run_config(model_dir, method, budget, samples, args.chunk, dtype,
                                    tokenizer, full_correct, knobs)
            seconds[f"{method}@{budget:g}"] = time.perf_counter() - start
            per_samples[f"{method}@{budget:g}"] = per_sample
            rows += summarize(method, budget, per_sample)
            print(f"[needle_coverage] {method}@{budget:g}: {seconds[f'{method}@{budget:g}']:.0f} s", flush=True)
    table = markdown(rows)
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "coverage_quick" if args.quick else "coverage"
    (args.out / f"{stem}.json").write_text(json.dumps(dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command, seed=args.seed, context=args.context, dtype=dtype, knobs=knobs,
        seconds=seconds, rows=rows,
        samples=per_samples,
    ), indent=1))
    (args.out / f"{stem}.md").write_text(
        f"Command: `python benchmarks/{command}` (seed {args.seed}, ~{args.context} tokens, "
        f"{dtype})\n\n{table}\n")
    plot(rows, args.out / f"{stem}.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
