"""The 12 forced tokens of one loss prompt whose loss rose most against the full cache, with
the 12 tokens before each (and whether the 4-gram ending at the token occurs in the prompt).
From benchmarks/: ../.venv/bin/python <this> SEED NLL.json PROMPT_INDEX, NLL.json written by
per_position.py (the score-decay folder)."""
import json, sys
sys.path.insert(0, ".")
from harness.tasks import TaskGenerator
from transformers import AutoTokenizer
from kvreviver_vllm.models import default_model_dir
tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
seed, path, idx = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = TaskGenerator(tok).samples("loss", 2048, 8, seed)[idx]
d = json.load(open(path))
f, m = d["full"][idx], d["method"][idx]
delta = [b - a for a, b in zip(f, m)]
top = sorted(range(len(delta)), key=lambda i: -delta[i])[:12]
ids = list(s.forced_ids)
prompt = list(s.prompt_ids)
for i in sorted(top):
    t = i + 1  # forced_ids index
    ctx = tok.decode(ids[max(0, t - 12):t])
    # does the 4-gram ending at t (incl. target) occur in the prompt?
    gram = ids[t - 3:t + 1]
    occ = [j for j in range(len(prompt) - 3) if prompt[j:j + 4] == gram]
    print(f"{t:3d} full {f[i]:.2f} method {m[i]:.2f} d {delta[i]:+.2f} | {ctx!r} -> {tok.decode([ids[t]])!r} | 4gram in prompt at {occ[:3]}")
