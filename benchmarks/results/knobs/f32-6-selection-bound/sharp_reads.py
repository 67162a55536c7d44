"""What the ranking drops at the prompt's compaction: the continuation's sharp reads of prompt
tokens (attention over 0.1 from one decode row, mean over a KV head's query heads, full cache)
whose token is not among the records the ranking keeps (selection_bound.py's 4 / 2-bit one-group
records, budget and window, from its constants; the window's 32 rows and row P, pooled as POOL
says), by kind:
  induction  the token after an earlier occurrence of the reading row's token
  copy       the token the reading row is about to produce
  same       the reading row's own token, earlier
  other      anything else
Run from the repository root: .venv/bin/python <this> SEED SAMPLES [BEFORE/AFTER/DECAY]"""
import sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from selection_bound import (G, HKV, MD, RECENT, SINK, WINDOW, budget_slots, capacity, parse_pool,
                             pooled_scores)  # also puts the repository on sys.path
from transformers import AutoModelForCausalLM, AutoTokenizer, AttentionInterface
from harness.tasks import TaskGenerator
SHARP = 0.1
KINDS = ("induction", "copy", "same", "other")
POOL = parse_pool(sys.argv[3] if len(sys.argv) > 3 else "")
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
    cap = capacity(budget_slots(P + 1) - SINK - RECENT)
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
    tok = AutoTokenizer.from_pretrained(MD)
    model = AutoModelForCausalLM.from_pretrained(MD, dtype=torch.float32, attn_implementation="reads").eval()
    for s in TaskGenerator(tok).samples("loss", 2048, nsamp, seed):
        ids = torch.tensor([list(s.prompt_ids) + list(s.forced_ids)])
        CTX.update(P=len(s.prompt_ids), ids=ids[0])
        with torch.no_grad(): model(ids)
    total = kept_mass + missed_mass
    print(f"seed {seed}, {nsamp} prompts, pool {POOL}: sharp-read mass kept / dropped by kind")
    for c, name in enumerate(KINDS):
        print(f"  {name:9s} kept {kept_mass[c]:7.1f}  dropped {missed_mass[c]:6.1f}  ({100 * missed_mass[c] / total[c].clamp_min(1e-9):.0f}% dropped)")
    print("  dropped mass by layer:", " ".join(f"{x:.0f}" for x in layer_missed.tolist()))
