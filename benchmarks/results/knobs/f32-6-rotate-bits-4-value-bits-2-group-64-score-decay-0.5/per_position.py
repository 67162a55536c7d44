"""Per-position loss of the 2k loss task (8 prompts, float32, chunk 512): one method against
the full cache, in buckets of 32 forced tokens, per prompt and in total (the total is
accuracy.py's loss delta). A one-off kept with the runs it made; from the repository root:

    (cd benchmarks && KVREVIVER_EXP_DECAY=0.5 ../.venv/bin/python \
        results/knobs/<this folder>/per_position.py SEED OUT.json METHOD BUDGET KEY=VALUE ...)
"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import accuracy as A
from harness.tasks import TaskGenerator
from transformers import AutoTokenizer
from kvreviver_vllm.models import default_model_dir

def main():
    seed, out, method, budget = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    knobs = A.parse_knobs(sys.argv[5:])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    model_dir = str(default_model_dir())
    gen = TaskGenerator(AutoTokenizer.from_pretrained(model_dir))
    samples = gen.samples("loss", 2048, 8, seed)
    full = A.stock_run_cached(model_dir, "full", {"dtype": "float32"}, samples, 512, A.RESULTS / ".cache")
    kw = {"dtype": "float32", **A.engine_kwargs(method, budget, None, knobs)}
    run = A.run_method(model_dir, method, budget, kw, samples, 512)
    def nll(r, s): return [-st[t] for t, st in zip(s.forced_ids[1:], r.forced_logprobs)]
    res = {"full": [nll(r, s) for r, s in zip(full.results, samples)],
           "method": [nll(r, s) for r, s in zip(run.results, samples)]}
    Path(out).write_text(json.dumps(res))
    import statistics as st
    n = len(res["full"][0])
    for b in range(0, n, 32):
        d = st.fmean(st.fmean(m[b:b+32]) - st.fmean(f[b:b+32]) for f, m in zip(res["full"], res["method"]))
        print(f"pos {b+1:3d}-{min(b+32,n):3d}: {d:+.3f}")
    print("per prompt:", [round(st.fmean(m) - st.fmean(f), 3) for f, m in zip(res["full"], res["method"])])
    print("total:", st.fmean(st.fmean(m) - st.fmean(f) for f, m in zip(res["full"], res["method"])))

if __name__ == "__main__":
    main()
