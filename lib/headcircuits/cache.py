"""On-disk cache of experiment results (sweeps that take minutes), keyed by everything that determines them.

``cached(name, key, compute)`` stores ``compute()`` under ``$HEADCIRCUITS_CACHE/results/<name>/<fingerprint>.pt``.
The fingerprint hashes the key: model identity (its facts and which weights: the prepared cache's manifest, the
hub id, or the random seed), the task data's tokens / answers / positions, every parameter, and the library
version. A file that cannot be read is recomputed; writes are atomic. ``HEADCIRCUITS_NO_CACHE=1`` bypasses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from headcircuits.models.core import Model
from headcircuits.models.offline import cache_root
from headcircuits.tasks.base import TaskData

T = TypeVar("T")


def _update(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    elif isinstance(obj, Model):
        _update(digest, {"facts": dataclasses.asdict(obj.facts), "weights": obj.weights_id})
    elif isinstance(obj, TaskData):
        _update(digest, {
            "task": obj.task, "clean": obj.clean.ids, "clean_lengths": obj.clean.lengths, "corrupt": obj.corrupt.ids,
            "answer": obj.answer, "distractor": obj.distractor, "positions": obj.positions,
        })
    elif isinstance(obj, dict):
        digest.update(b"{")
        for key in sorted(obj, key=str):
            digest.update(json.dumps(str(key)).encode())
            _update(digest, obj[key])
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[")
        for item in obj:
            _update(digest, item)
        digest.update(b"]")
    elif dataclasses.is_dataclass(obj):
        _update(digest, {"type": type(obj).__name__, **dataclasses.asdict(obj)})
    elif obj is None or isinstance(obj, (str, int, float, bool)):
        digest.update(json.dumps(obj).encode())
    else:
        raise TypeError(f"cannot fingerprint a {type(obj).__name__}; pass tensors, models, task data or plain values")


def fingerprint(key: Any) -> str:
    """A sha256 of everything in ``key`` (tensors by their values)."""
    from headcircuits import __version__

    digest = hashlib.sha256(f"headcircuits {__version__}".encode())
    _update(digest, key)
    return digest.hexdigest()


def cached(name: str, key: Any, compute: Callable[[], T], *, root: Path | None = None) -> T:
    """``compute()``'s result, from disk when the same ``key`` was computed before."""
    if os.environ.get("HEADCIRCUITS_NO_CACHE", "") not in ("", "0"):
        return compute()
    folder = (root or cache_root()) / "results" / name
    path = folder / f"{fingerprint(key)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # unreadable (half-written by an old version, disk trouble): recompute below
            path.unlink(missing_ok=True)
    value = compute()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".partial")
    os.close(fd)
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value
