"""Run one engine scenario with the engine core in this process and report what
the scheduler saw, as JSON on the last line of stdout.

Run as a subprocess (``python tests/scheduler_probe.py '<json scenario>'``): the
in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0) must not leak into
other tests. Scenario keys: model, backend (null = stock), dtype, prompt_lens,
max_tokens, engine (extra LLM kwargs), abort_at ({request id: step}).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def external_id(request_id: str) -> str:
    """The id we passed to add_request: vLLM appends '-<random suffix>' internally."""
    return request_id.rsplit("-", 1)[0]


def run(scenario: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(builder_cuts)
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tests = Path(__file__).parents[1]
    sys.path[:0] = [str(tests), str(tests.parent / "benchmarks")]
    from harness.offline import open_engine
    from prompts import make_prompt

    from probes import builder_cuts

    tokenizer = AutoTokenizer.from_pretrained(scenario["model"])
    kwargs = dict(model=scenario["model"], dtype=scenario["dtype"],
                  enforce_eager=True, seed=0, **scenario.get("engine", {}))
    if scenario.get("backend"):
        kwargs["attention_backend"] = scenario["backend"]
    with open_engine(**kwargs) as llm:
        engine = llm.llm_engine
        scheduler = engine.engine_core.engine_core.scheduler
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        pool = scheduler.kv_cache_manager.block_pool
        free_at_start = pool.get_num_free_blocks()

        params = SamplingParams(temperature=0.0, max_tokens=scenario["max_tokens"], ignore_eos=True)
        for i, n in enumerate(scenario["prompt_lens"]):
            prompt = TokensPrompt(prompt_token_ids=make_prompt(tokenizer, n, seed=100 + i))
            engine.add_request(str(i), prompt, params)

        abort_at = {rid: step for rid, step in scenario.get("abort_at", {}).items()}
        peak_running, peak_blocks, peak_decode_blocks, preemptions, steps = 0, {}, {}, {}, 0
        # Requests whose cut (the block-list gap freed after the first decode step)
        # the worker's builder and the scheduler's manager agree / disagree on.
        cuts_agreed, cuts_disagreed = set(), []
        outputs: dict[str, dict] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[external_id(out.request_id)] = {
                        "token_ids": list(out.outputs[0].token_ids),
                        "finish_reason": out.outputs[0].finish_reason,
                    }
            steps += 1
            peak_running = max(peak_running, len(scheduler.running))
            for rid, blocks in manager.req_to_blocks.items():
                # Real blocks: a compressed request's list has a gap of null blocks.
                held = sum(not b.is_null for b in blocks)
                # Past its first decode step (the cut) and the step after it (which
                # frees the gap), a request holds only its decode room.
                decoding = scheduler.requests[rid].num_output_tokens >= 3
                rid = external_id(rid)
                peak_blocks[rid] = max(peak_blocks.get(rid, 0), held)
                if decoding:
                    peak_decode_blocks[rid] = max(peak_decode_blocks.get(rid, 0), held)
            for rid, req in scheduler.requests.items():
                rid = external_id(rid)
                preemptions[rid] = max(preemptions.get(rid, 0), req.num_preemptions)
            if scenario.get("backend"):
                worker_cuts = llm.collective_rpc(builder_cuts)[0]
                for rid, prompt_end in getattr(manager, "prompt_end", {}).items():
                    want = manager.kv_cache_spec.cut(prompt_end)
                    got = worker_cuts.get(manager.req_to_blocks[rid][0].block_id)
                    if got == (want.kept, want.prompt_blocks):
                        cuts_agreed.add(external_id(rid))
                    else:
                        cuts_disagreed.append((external_id(rid), steps, got, (want.kept, want.prompt_blocks)))
            to_abort = [rid for rid, step in abort_at.items() if step == steps]
            if to_abort:
                engine.abort_request(to_abort)
        result = {
            "num_blocks": pool.num_gpu_blocks - 1,  # block 0 is vLLM's null block
            "block_size": manager.block_size,
            "free_at_start": free_at_start,
            "free_at_end": pool.get_num_free_blocks(),
            "peak_running": peak_running,
            "peak_blocks": peak_blocks,
            "peak_decode_blocks": peak_decode_blocks,
            "preemptions": sum(preemptions.values()),
            "cuts_agreed": sorted(cuts_agreed),
            "cuts_disagreed": cuts_disagreed,
            "outputs": outputs,
            "steps": steps,
        }
    return result


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
