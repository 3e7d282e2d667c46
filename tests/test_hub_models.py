"""The papers' hub models (GPT-2 small, GPT-2 medium, Pythia-160m) through the hub code path of ``load_model``,
offline, from a Hugging Face cache written by :mod:`fake_hub` (their exact configurations, random weights, two
layers; see that module for what differs). Loading and every notebook run in fresh processes, which read the
cache's location from ``HF_HUB_CACHE`` as a reader's machine would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import LAYERS, REVISION, write_fake_hub

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "gpt2-small-attention" / "tokenizer"
HUB_NAMES = ["gpt2-small", "gpt2-medium", "pythia-160m"]


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    if not TOKENIZER.is_dir():
        pytest.skip(f"../shared is absent ({TOKENIZER} not found): the fake hub needs GPT-2's tokenizer")
    cache = tmp_path_factory.mktemp("hub")
    write_fake_hub(cache, TOKENIZER)
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


PROBE = """
import json
from headcircuits.models import load_model
from headcircuits.tasks import ioi, laundry_list, colored_objects
out = {}
for name in %r:
    m = load_model(name, device="cpu")
    data = ioi.generate(m, 4, seed=0)
    out[name] = {"facts": {k: v for k, v in vars(m.facts).items() if k in
                           ("family", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "d_vocab",
                            "prepend_bos", "norm", "positional")},
                 "weights_id": m.weights_id, "first_token": int(data.clean.ids[0, 0]), "bos": m.bos_id,
                 "io_at": m.to_str_tokens([int(data.clean.ids[0, int(data.positions["IO"][0])])])[0],
                 "io": data.meta.io[0], "objects": len(laundry_list.usable_items(m)),
                 "colored_objects": len(colored_objects.generate(m, 2, seed=0))}
print("RESULT" + json.dumps(out))
"""


def test_the_papers_models_load_through_the_hub_path_offline(hub_env):
    run = subprocess.run([sys.executable, "-c", PROBE % HUB_NAMES], env=hub_env, capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.split("RESULT", 1)[1])
    expected = {  # the real models' shapes (only the layer count is cut to LAYERS)
        "gpt2-small": dict(family="gpt2", n_heads=12, n_kv_heads=12, d_head=64, d_model=768, d_vocab=50257,
                           prepend_bos=True, norm="layernorm", positional="learned"),
        "gpt2-medium": dict(family="gpt2", n_heads=16, n_kv_heads=16, d_head=64, d_model=1024, d_vocab=50257,
                            prepend_bos=False, norm="layernorm", positional="learned"),
        "pythia-160m": dict(family="gpt-neox", n_heads=12, n_kv_heads=12, d_head=64, d_model=768, d_vocab=50304,
                            prepend_bos=True, norm="layernorm", positional="rotary"),
    }
    for name, facts in expected.items():
        assert got[name]["facts"] == {**facts, "n_layers": LAYERS}, name
        assert got[name]["weights_id"].endswith(f"@{REVISION}"), got[name]["weights_id"]
        # BOS per the papers: Circuit Reuse tokenised GPT-2 medium without it; ours for the other two
        assert (got[name]["first_token"] == got[name]["bos"]) is facts["prepend_bos"], name
        assert got[name]["io_at"] == " " + got[name]["io"], name  # named positions land on the named token
        assert got[name]["objects"] == 22 and got[name]["colored_objects"] == 2  # GPT-2's BPE: every object fits


def test_offline_without_the_model_the_hub_path_fails_at_once_with_the_fix(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", "from headcircuits.models import load_model; load_model('gpt2-small')"],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode != 0 and "HubUnreachableError" in run.stderr and "smollm2-135m" in run.stderr
    assert "snapshot_download('gpt2')" in run.stderr


@pytest.mark.slow
@pytest.mark.notebooks
def test_every_notebook_runs_on_the_papers_hub_models(hub_env, tmp_path, monkeypatch):
    """Every chapter, with small parameters, on all three hub models at once (numbers meaningless: random
    weights). A failing cell fails the test with the chapter's traceback."""
    from headcircuits import execution
    from test_plots_and_book import SMALL

    for key in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, hub_env[key])
    notebooks = execution.notebooks_in_toc(ROOT)
    params = {**SMALL, "model_names": ",".join(HUB_NAMES)}
    executed = execution.execute_notebooks(notebooks, tmp_path / "executed", params, reuse=False)
    for path in executed:
        text = path.read_text()
        assert all(name in text for name in HUB_NAMES), f"{path.name} does not show every hub model"
        cells = json.loads(text)["cells"]
        stderr = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"] if o.get("name") == "stderr"]
        assert not stderr, f"{path.name} wrote to stderr (the book build would fail): {stderr[:1]}"
