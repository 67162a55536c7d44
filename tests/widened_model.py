"""The default model with every KV head doubled, so that tensor parallel 2 divides it.

SmolLM2-135M has 9 query heads in 3 groups of 3 over 3 KV heads, which TP=2 cannot
split. The widened model has 6 KV heads (each original one twice) and 18 query
heads (each original group once per copy of its KV head), and ``o_proj`` reads
each query head at half weight. Every attention output is then the original one
(two equal halves summed), so the widened model computes the same function as
the default model, with real weights and real attention patterns, up to float
rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COPIES = 2


def widen_kv_heads(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the widened model to ``out_dir`` (tokenizer files copied) and return it."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    group = heads // kv_heads
    # New KV head j is old KV head j // COPIES; new query head i (group i // group)
    # is old query head (i // group // COPIES) * group + i % group.
    new_kv = [j // COPIES for j in range(kv_heads * COPIES)]
    new_q = [(i // group // COPIES) * group + i % group for i in range(heads * COPIES)]

    def rows(weight: torch.Tensor, order: list[int]) -> torch.Tensor:
        return weight.view(-1, head_dim, weight.shape[-1])[order].reshape(-1, weight.shape[-1])

    tensors = load_file(model_dir / "model.safetensors")
    widened = {}
    for name, weight in tensors.items():
        if name.endswith("self_attn.q_proj.weight"):
            weight = rows(weight, new_q)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            weight = rows(weight, new_kv)
        elif name.endswith("self_attn.o_proj.weight"):
            cols = weight.view(weight.shape[0], heads, head_dim)[:, new_q]
            weight = (cols.float() / COPIES).to(weight.dtype).reshape(weight.shape[0], -1)
        widened[name] = weight.contiguous()

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors" and f.suffix != ".partial":
            shutil.copy(f, out_dir / f.name)
    config.update(num_attention_heads=heads * COPIES, num_key_value_heads=kv_heads * COPIES)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(widened, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir
