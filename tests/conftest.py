"""Shared fixtures. Tiny random models (seconds) for most tests; the embedded SmolLM2 for tests marked slow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite's cached results live in a folder of its own, new for every run: it never reads a user's (or an older
# library version's) results, nor leaves its own behind. Prepared models are shared (they are verified on load).
os.environ["HEADCIRCUITS_RESULTS"] = tempfile.mkdtemp(prefix="headcircuits-test-results-")
# HEADCIRCUITS_DEVICE (e.g. cuda) runs the whole suite on that device; the default is CUDA when available.

from headcircuits.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-gemma3", "tiny-gpt-neox"]


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a test's random inputs do not depend on which tests ran
    before it (the order, the slow tests that were selected, what a cache spared)."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _nothing_kept():
    """Every test starts with no kept pass (:data:`headcircuits.store.STORE`), so what it measures does not depend
    on what an earlier test left in memory."""
    from headcircuits.store import STORE

    STORE.clear()
    yield
    STORE.clear()


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request):
    """One tiny random model per architecture family (read-only: tests must not edit its weights)."""
    return load_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (prepared on first use, ~30 s; then ~2 s)."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    path = SHARED / "gpt2-small-attention" / "tokenizer"
    if not path.is_dir():
        pytest.skip(f"../shared is absent ({path} not found): GPT-2 tokenizer checks need it")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


@pytest.fixture(scope="session", params=["tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def smollm2_or_tiny(request):
    """A check that must hold both on a tiny model and on the real tokenizer of the embedded model."""
    return load_model(request.param)


@pytest.fixture(scope="session")
def gpt2_weights():
    """GPT-2 small's real attention weights (the Talking Heads paper's model), from ../shared."""
    path = SHARED / "gpt2-small-attention"
    if not path.is_dir():
        pytest.skip(f"../shared is absent ({path} not found): GPT-2 small's real weights are needed")
    from headcircuits import weights

    return weights.load_gpt2_small_attention(path)
