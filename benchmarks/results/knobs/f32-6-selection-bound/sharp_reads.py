"""What the ranking drops at the prompt's compaction: the continuation's sharp reads of prompt
tokens (attention over 0.1 from one decode row, mean over a KV head's query heads, full cache)
whose token is not among the records the ranking keeps (the same 4 / 2-bit one-group bytes at
0.059 as selection_bound.py; the window's 32 rows and row P, pooled as POOL says), by kind:
  induction  the token after an earlier occurrence of the reading row's token
  copy       the token the reading row is about to produce
  same       the reading row's own token, earlier
  other      anything else
Run from the repository root: .venv/bin/python <this> SEED SAMPLES [BEFORE/AFTER/DECAY]"""
import sys, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
from transformers import AutoModelForCausalLM, AutoTokenizer, AttentionInterface
from harness.tasks import TaskGenerator
from kvreviver_vllm.models import default_model_dir
from kvreviver_vllm.policy import pooled_scores
from kvreviver_vllm.config import budget_tokens
from kvreviver_vllm.layout import record_bytes, slot_width
torch.set_num_threads(1)
HKV, G, WINDOW, SINK, RECENT, SHARP = 3, 3, 32, 4, 32, 0.1
SLOT_BYTES, REC_BYTES = slot_width(64, torch.float32) * 4, record_bytes(64, 4, 64, 2)
KINDS = ("induction", "copy", "same", "other")
POOL = tuple(float(x) if i == 2 else int(x) for i, x in enumerate((sys.argv[3] if len(sys.argv) > 3 else "3/24/1").split("/")))
CTX = {}
kept_mass, missed_mass = torch.zeros(4), torch.zeros(4)
layer_missed = torch.zeros(30)

def reads(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    q, k, v = query[0], key[0], value[0]
    T, P, ids, layer = q.shape[1], CTX["P"], CTX["ids"], module.layer_idx
    kk, vv = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    probs = torch.softmax(((q @ kk.transpose(1, 2)) * scaling).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1)
    # The ranking at the first decode step: window rows and row P, over tokens 0..P.
    window = probs[:, P - WINDOW:P + 1, :P + 1].sum(1).view(HKV, G, -1).sum(1)
    cand = torch.arange(SINK, P - RECENT + 1)  # demoted: token P joins the exact window
    cap = (budget_tokens(0.059, P + 1, SINK + RECENT) - SINK - RECENT) * SLOT_BYTES // REC_BYTES
    kept = torch.zeros(HKV, P + 1, dtype=torch.bool)
    top = pooled_scores(window[:, cand], *POOL).topk(cap, -1).indices
    kept[torch.arange(HKV)[:, None], cand[top]] = True
    future = probs[:, P:, :P + 1].view(HKV, G, T - P, P + 1).mean(1)
    h, r, j = ((future > SHARP) & torch.isin(torch.arange(P + 1), cand)).nonzero(as_tuple=True)
    i, w = P + r, future[h, r, j]
    nxt = ids[(i + 1).clamp_max(T - 1)]
    kind = torch.where(ids[j - 1] == ids[i], 0, torch.where(ids[j] == nxt, 1,
                       torch.where(ids[j] == ids[i], 2, 3)))
    hit = kept[h, j]
    for c in range(4):
        kept_mass[c] += (w * (hit & (kind == c))).sum()
        missed_mass[c] += (w * (~hit & (kind == c))).sum()
    layer_missed[layer] += (w * ~hit).sum()
    return (probs @ vv).transpose(0, 1)[None].contiguous(), None

AttentionInterface.register("reads", reads)

if __name__ == "__main__":
    seed, nsamp = int(sys.argv[1]), int(sys.argv[2])
    md = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(md)
    model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32, attn_implementation="reads").eval()
    for s in TaskGenerator(tok).samples("loss", 2048, nsamp, seed):
        ids = torch.tensor([list(s.prompt_ids) + list(s.forced_ids)])
        CTX.update(P=len(s.prompt_ids), ids=ids[0])
        with torch.no_grad(): model(ids)
    total = kept_mass + missed_mass
    print(f"seed {seed}, {nsamp} prompts, pool {POOL}: sharp-read mass kept / dropped by kind")
    for c, name in enumerate(KINDS):
        print(f"  {name:9s} kept {kept_mass[c]:7.1f}  dropped {missed_mass[c]:6.1f}  ({100 * missed_mass[c] / total[c].clamp_min(1e-9):.0f}% dropped)")
    print("  dropped mass by layer:", " ".join(f"{x:.0f}" for x in layer_missed.tolist()))
