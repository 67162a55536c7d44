from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Helpers shared by the test modules (engine runner, prompts, probes), and the
# benchmarks' evaluation harness (tasks, teacher forcing, probes).
TESTS = Path(__file__).parent
sys.path[:0] = [str(TESTS), str(TESTS.parent / "benchmarks")]

from cores import narrow_to_worker_share  # noqa: E402

# Before any test starts an engine: under pytest-xdist, one share of the cores each.
narrow_to_worker_share()


@pytest.fixture(scope="session")
def model_dir() -> str:
    """The real default model, converted once into the KVReviver cache."""
    from kvreviver_vllm.models import prepare_default_model

    return str(prepare_default_model())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def pytest_collection_modifyitems(config, items):
    """Tests marked `install` (a fresh venv, minutes) run only when `-m` names them."""
    if "install" in (config.option.markexpr or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("install")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("install")]
