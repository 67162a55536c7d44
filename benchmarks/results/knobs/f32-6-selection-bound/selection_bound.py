"""The engine's compaction schedule, emulated in Hugging Face transformers (float32), to bound
what a better choice of which tokens the store keeps could buy at the same bytes.

Loss task prompts (benchmarks/harness/tasks.py, 2k, 8 per seed): the prompt is read exact;
from the first decode step on, each KV head holds sink 4 + recent 32 exact tokens plus as many
4-bit-key / 2-bit-value rotated one-group records (64 bytes) as float32 budget 0.059 holds
(bf16 10%'s bytes), compacted when the 32-token decode room fills, as schedule.py does. A
policy decides which tokens the store keeps at each compaction:
  snap          the engine's ranking: attention from the last 32 prompt rows, then from every
                decode row since the last compaction, max-pooled 3 back / 24 ahead
  oracle        the attention each token will receive from the decode rows still to come
                (full cache), i.e. perfect foresight: not buildable, a bound
  oracle-first  / oracle-later: foresight at the first compaction only / at the later ones
  h2o           mean attention each token received from every prompt row that saw it
  h2o-half      snap's window plus h2o; maxrow: the largest single-row attention
  delayK        snap, but the first compaction waits K decode steps (the prompt held whole)
  rot           snap's window rows, their queries moved 0 / 64 / 128 / 256 positions ahead
                (RoPE), as the decode rows to come will read the prompt from further away
  snap+KIND:A   snap, each token ranked by the larger of its pooled score and A times a
                predicted future read (summed over the GQA group), at every compaction:
                  succ  the weight row j-1 would give key j beside its own keys,
                        sigmoid(q[j-1].k[j] * scale - lse[j-1]): key j as an induction
                        target (the token after an occurrence of the token about to be read)
                  self  row j's causal weight on itself (a duplicate-token target)
                  both  the larger of the two
  snap+gsucc:A:TAU  succ in the KV heads whose prompt succ averages TAU or more (the
                induction-like heads: 5 of the 90 at TAU 0.3, 22 at 0.15, the same on every
                prompt measured), none elsewhere
  snap*succ:A   A times succ added to the prompt's scores before the first compaction (one
                score field, as the engine's slots hold)
A policy may end in @BEFORE/AFTER/DECAY: its scores pooled so (policy.pooled_scores;
default 3/24/1, the engine's), at every compaction (foresight is never pooled).
Loss: mean next-token loss over the 256 forced tokens (position 0, read from the exact prompt,
included). Run from the repository root:
  .venv/bin/python <this> SEED SAMPLES POLICY[,POLICY...]
(FIRST=K in the environment skips the first K prompts.)"""
import os, sys, json, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, AttentionInterface
from harness.tasks import TaskGenerator
from kvreviver_vllm.rotation import rotation_matrix
from kvreviver_vllm.policy import POOL_AFTER, POOL_BEFORE, POOL_DECAY, pooled_scores
from kvreviver_vllm.models import default_model_dir
from kvreviver_vllm.config import budget_tokens
from kvreviver_vllm.layout import record_bytes, slot_width
from kvreviver_vllm.schedule import DECODE_ROOM
from vllm.utils.math_utils import round_up
torch.set_num_threads(1)
MD = str(default_model_dir())
D, HQ, HKV, G = 64, 9, 3, 3
SINK, RECENT, WINDOW, BLOCK = 4, 32, 32, 16
BUDGET = 0.059
SLOT_BYTES = slot_width(D, torch.float32) * 4  # float32 slot: 520 bytes
REC_BYTES = record_bytes(D, 4, 64, 2)  # 4-bit keys, 2-bit values, one group: 64 bytes
R = rotation_matrix(D)

# Its own rounding of the scale (float16 before dividing): up to one step off the engine's
# reference.quantize_records on some channels.
def qtok(x, bits, group=64):
    T = x.shape[0]; g = (x @ R).view(T, -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo).clamp_min(1e-8) / (2 ** bits - 1)).half().float(); lo = lo.half().float()
    return ((((g - lo) / s).round().clamp(0, 2 ** bits - 1) * s + lo).view(T, D)) @ R.T

def capacity(slots): return max(0, slots) * SLOT_BYTES // REC_BYTES
def budget_slots(n): return budget_tokens(BUDGET, n, SINK + RECENT)
def decode_limit(n): return round_up(budget_slots(n) + DECODE_ROOM, BLOCK)

def parse_pool(spec):  # "BEFORE/AFTER/DECAY" -> pooled_scores' arguments; "" -> the engine's
    if not spec: return POOL_BEFORE, POOL_AFTER, POOL_DECAY
    before, after, decay = spec.split("/")
    return int(before), int(after), float(decay)

MODE = {"policy": "snap", "pool": parse_pool("")}
THETA = AutoConfig.from_pretrained(MD).rope_parameters["rope_theta"]
INV = 1.0 / (THETA ** (torch.arange(0, D, 2).float() / D))  # the model's RoPE frequencies

def rope_shift(x, dl):  # post-RoPE vectors moved dl positions further (rotate_half layout)
    ang = dl * INV; cos, sin = torch.cat([ang.cos()] * 2), torch.cat([ang.sin()] * 2)
    return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

def sim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    q, k, v = query[0], key[0], value[0]  # [HQ,T,D], [HKV,T,D]
    T = q.shape[1]; P = MODE["P"]; scale = scaling
    kk = k.repeat_interleave(G, 0); vv = v.repeat_interleave(G, 0)
    logits = (q @ kk.transpose(1, 2)) * scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    masked = logits.masked_fill(~causal, float("-inf"))
    full = torch.softmax(masked, -1)
    out = full @ vv  # [HQ,T,D]
    if MODE["policy"] == "full":
        return out.transpose(0, 1)[None].contiguous(), None
    # quantized copies for records
    kq = torch.stack([qtok(k[h], 4) for h in range(HKV)]); vq = torch.stack([qtok(v[h], 2) for h in range(HKV)])
    future = full[:, P:].sum(1).view(HKV, G, T).sum(1)  # oracle mass from decode rows
    pol = MODE["policy"]
    if pol in ("h2o", "h2o-sum"):
        scores = full[:, :P].sum(1).view(HKV, G, T).sum(1)
        if pol == "h2o":  # mean over the prompt rows that see each token
            scores = scores / (P - torch.arange(T)).clamp_min(1) * WINDOW
    elif pol == "maxrow":
        scores = full[:, :P].view(HKV, G, P, T).sum(1).amax(1) * WINDOW
    elif pol == "h2o-half":  # window plus a normalized whole-prompt term
        w = full[:, P - WINDOW:P].sum(1).view(HKV, G, T).sum(1)
        a = full[:, :P].sum(1).view(HKV, G, T).sum(1) / (P - torch.arange(T)).clamp_min(1) * WINDOW
        scores = w + a
    elif pol == "rot":
        qw, kk = q[:, P - WINDOW:P], k[:, :P].repeat_interleave(G, 0)
        scores = torch.zeros(HKV, T); offsets = (0, 64, 128, 256)
        for dl in offsets:
            a = torch.softmax((rope_shift(qw, dl) @ kk.transpose(1, 2)) * scale, -1)
            scores[:, :P] += a.sum(1).view(HKV, G, P).sum(1) / len(offsets)
    else:
        scores = full[:, P - WINDOW:P].sum(1).view(HKV, G, T).sum(1)  # prefill window
    bonus, once = None, "*" in pol
    if "+" in pol or once:  # predicted future reads of each token
        pol, _, extra = pol.partition("*" if once else "+")
        kind, alpha, *tau = extra.split(":"); alpha = float(alpha)
        lse = torch.logsumexp(masked, -1)  # [HQ, T]
        succ = torch.zeros(HQ, T)
        succ[:, 1:] = torch.sigmoid(torch.diagonal(logits, 1, 1, 2) - lse[:, :-1])
        succ = succ.view(HKV, G, T).sum(1)
        selfw = torch.diagonal(full, 0, 1, 2).reshape(HKV, G, T).sum(1)
        if kind == "gsucc":
            succ = succ * (succ[:, 1:P].mean(-1, keepdim=True) >= float(tau[0]))
        bonus = {"succ": succ, "gsucc": succ, "self": selfw,
                 "both": torch.maximum(succ, selfw)}[kind] * alpha
        if once:
            scores, bonus = scores + bonus, None
    exact = list(range(P))  # same for every head
    rec = [torch.zeros(T, dtype=torch.bool) for _ in range(HKV)]
    settled = False
    ncomp = 0
    delay = int(pol[5:]) if pol.startswith("delay") else 0
    def mixed():
        RM = torch.stack(rec)[:, :, None]  # [HKV, T, 1]
        return (torch.where(RM, kq, k).repeat_interleave(G, 0), torch.where(RM, vq, v).repeat_interleave(G, 0))
    KH, VH = mixed()
    for t in range(P, T):
        n = t + 1
        exact.append(t)
        ex = torch.zeros(T, dtype=torch.bool); ex[exact] = True
        vis = (ex[None] | torch.stack(rec)).repeat_interleave(G, 0)  # [HQ, T]
        lg = torch.einsum("hd,htd->ht", q[:, t], KH) * scale
        p = torch.softmax(lg.masked_fill(~vis, float("-inf")), -1)
        out[:, t] = torch.einsum("ht,htd->hd", p, VH)
        scores += p.view(HKV, G, T).sum(1)
        used = -(-int(rec[0].sum()) * REC_BYTES // SLOT_BYTES) + len(exact)
        if (not settled and used > budget_slots(n) and t - P + 1 >= delay) or (settled and used + 1 > decode_limit(n)):
            settled = True
            bs = budget_slots(n)
            keep_exact = exact[:SINK] + exact[-RECENT:]
            demoted = exact[SINK:-RECENT]
            cap = capacity(bs - len(keep_exact))
            for h in range(HKV):
                cand = sorted(rec[h].nonzero()[:, 0].tolist() + demoted)
                ci = torch.tensor(cand)
                if pol == "oracle" or (pol == "oracle-first" and ncomp == 0) or (pol == "oracle-later" and ncomp > 0):
                    rank_s = future[h, ci]
                else:
                    rank_s = pooled_scores(scores[h, ci][None], *MODE["pool"])[0]
                    if bonus is not None:
                        rank_s = torch.maximum(rank_s, bonus[h, ci])
                top = rank_s.sort(descending=True, stable=True).indices[:cap]
                rec[h] = torch.zeros(T, dtype=torch.bool); rec[h][ci[top]] = True
            exact = keep_exact
            KH, VH = mixed()
            scores.zero_()
            ncomp += 1
            if pol.startswith("oracle"):  # future mass only from rows after now
                future = full[:, t + 1:].sum(1).view(HKV, G, T).sum(1) if t + 1 < T else future * 0
    return out.transpose(0, 1)[None].contiguous(), None

AttentionInterface.register("kvsim", sim_attention)

if __name__ == "__main__":
    seed, nsamp = int(sys.argv[1]), int(sys.argv[2]); policies = sys.argv[3].split(",")
    tok = AutoTokenizer.from_pretrained(MD)
    model = AutoModelForCausalLM.from_pretrained(MD, dtype=torch.float32, attn_implementation="kvsim").eval()
    samples = TaskGenerator(tok).samples("loss", 2048, nsamp, seed)
    res = {p: [] for p in policies}
    for i, s in enumerate(samples):
        if i < int(os.environ.get("FIRST", 0)):
            continue
        ids = torch.tensor([list(s.prompt_ids) + list(s.forced_ids)])
        P = len(s.prompt_ids); MODE["P"] = P
        for spec in policies:
            pol, _, pool = spec.partition("@")
            MODE["policy"], MODE["pool"] = pol, parse_pool(pool)
            with torch.no_grad(): lg = model(ids).logits[0].float()
            ce = torch.nn.functional.cross_entropy(lg[P - 1:-1], ids[0, P:]).item()
            res[spec].append(ce)
            print(i, spec, round(ce, 4), flush=True)
    means = {p: sum(v) / len(v) for p, v in res.items()}
    print(json.dumps(means))
    json.dump({"per_sample": res, "mean": means}, open(Path(__file__).parent / f"seed{seed}-{'-'.join(policies).replace('/', '_')}.json", "w"))
