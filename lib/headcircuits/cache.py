"""On-disk cache of experiment results (sweeps that take minutes), keyed by everything that determines them.

``cached(name, key, compute)`` stores ``compute()`` under ``<results root>/<name>/<fingerprint>.pt``. The
fingerprint hashes the key (model identity: its facts and which weights, i.e. the prepared cache's manifest, the
hub id, or the random seed; every field of the task data: texts, tokens, answers, positions, candidates,
metadata; every parameter) **and the source code of the library** (:func:`library_hash`): a result never
outlives the code that produced it, since any edit of the library gives new keys.

The results root is ``$HEADCIRCUITS_RESULTS`` if set, else ``<model cache>/results`` (``$HEADCIRCUITS_CACHE`` or
``~/.cache/headcircuits``). The test suite and the book build set ``HEADCIRCUITS_RESULTS`` to folders of their
own, so neither reads nor writes a user's results. A file that cannot be read is recomputed; writes are atomic.
``HEADCIRCUITS_NO_CACHE=1`` bypasses the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import pandas as pd
import torch

from headcircuits.models.core import Model
from headcircuits.models.offline import cache_root
from headcircuits.tasks.base import TaskData

T = TypeVar("T")


def _update(digest, obj: Any) -> None:
    if hasattr(obj, "__fingerprint__"):  # an object that says what identifies it (e.g. a path-patching Baseline)
        digest.update(type(obj).__name__.encode())
        _update(digest, obj.__fingerprint__())
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    elif isinstance(obj, Model):
        _update(digest, {"facts": dataclasses.asdict(obj.facts), "weights": obj.weights_id})
    elif isinstance(obj, TaskData):  # every field: a cached table may depend on any of them
        _update(digest, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    elif isinstance(obj, pd.DataFrame):
        digest.update(b"frame")
        digest.update(obj.to_json(orient="split", date_format="iso", default_handler=str).encode())
        digest.update(json.dumps(obj.attrs, sort_keys=True, default=str).encode())
    elif isinstance(obj, range):
        _update(digest, ["range", obj.start, obj.stop, obj.step])
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
    elif dataclasses.is_dataclass(obj):  # fields one by one (asdict would deep-copy tensors and frames)
        _update(digest, {"type": type(obj).__name__, **{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}})
    elif obj is None or isinstance(obj, (str, int, float, bool)):
        digest.update(json.dumps(obj).encode())
    else:
        raise TypeError(f"cannot fingerprint a {type(obj).__name__}; pass tensors, models, task data, dataclasses or "
                        "plain values")


def library_hash() -> str:
    """A sha256 of every file of the installed ``headcircuits`` package: its modules, the prompts it ships and the
    pinned versions (file names and bytes; compiled ``__pycache__`` files excluded)."""
    return _library_hash(Path(__file__).resolve().parent)


@functools.lru_cache(maxsize=4)
def _library_hash(package: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def fingerprint(key: Any) -> str:
    """A sha256 of everything in ``key`` (tensors by their values) and of the library's source.

    Args:
        key: tensors, models, task data, dataclasses and plain values, nested.

    Returns:
        A hex digest.
    """
    digest = hashlib.sha256(f"headcircuits {library_hash()}".encode())
    _update(digest, key)
    return digest.hexdigest()


def results_root() -> Path:
    """Where cached results live: ``$HEADCIRCUITS_RESULTS``, else ``<model cache>/results``."""
    env = os.environ.get("HEADCIRCUITS_RESULTS")
    return Path(env).expanduser() if env else cache_root() / "results"


def cached(name: str, key: Any, compute: Callable[[], T], *, root: Path | None = None) -> T:
    """``compute()``'s result, from disk when the same ``key`` was computed before by the same library source;
    ``root``: the results root (default :func:`results_root`).

    Args:
        name: the results folder.
        key: what determines the result (see :func:`fingerprint`).
        compute: makes the result.
        root: the results root (default :func:`results_root`).

    Returns:
        The result.
    """
    if os.environ.get("HEADCIRCUITS_NO_CACHE", "") not in ("", "0"):
        return compute()
    return _cached_at(name, fingerprint(key), compute, root)


def _fingerprints(value: Any) -> bool:
    try:
        _update(hashlib.sha256(), value)
        return True
    except TypeError:
        return False


def _cached_at(name: str, digest: str, compute: Callable[[], T], root: Path | None = None) -> T:
    """``compute()``'s result kept in ``<root>/<name>/<digest>.pt`` (see :func:`cached`)."""
    if os.environ.get("HEADCIRCUITS_NO_CACHE", "") not in ("", "0"):
        return compute()
    path = (root or results_root()) / name / f"{digest}.pt"
    found, value = read(path)
    if found:
        return value
    value = compute()
    write(path, value)
    return value


def read(path: Path) -> tuple[bool, Any]:
    """``(True, value)`` for a result kept at ``path``, ``(False, None)`` when there is none. A file that cannot
    be read is deleted with a warning naming it (it will be computed again)."""
    if not path.is_file():
        return False, None
    try:
        return True, torch.load(path, weights_only=False)
    except Exception as exc:  # unreadable (half-written by an old version, disk trouble): recompute
        warnings.warn(f"the cached result {path} cannot be read ({type(exc).__name__}: {exc}); it is deleted and "
                      "computed again. If this repeats, check the disk, or set HEADCIRCUITS_RESULTS to another "
                      "folder", stacklevel=3)
        path.unlink(missing_ok=True)
        return False, None


def write(path: Path, value: Any) -> None:
    """Keep ``value`` at ``path`` atomically (a reader sees the whole file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    os.close(fd)
    torch.save(value, tmp)
    os.replace(tmp, path)


def on_disk(name: str, *, enabled_by: str | None = None, ignore: tuple[str, ...] = ()):
    """A decorator: the function's result is kept by :func:`cached` under ``name``, keyed by **every argument it
    is called with** (bound to its signature, defaults applied), so that no parameter can be missing from the key.

    Args:
        name: the results folder.
        enabled_by: a boolean parameter of the function that switches the cache on (e.g. ``cache``); it is left
            out of the key. ``None``: always cached.
        ignore: parameters that cannot change the result (e.g. ``progress``), left out of the key.

    Every other argument must be something :func:`fingerprint` can key (tensors, models, task data, dataclasses,
    plain values); anything else (e.g. a function) is refused with the parameter's name.
    """
    def decorate(function: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(function)
        for parameter in (*ignore, *([enabled_by] if enabled_by else [])):
            if parameter not in signature.parameters:
                raise TypeError(f"{function.__qualname__} has no parameter {parameter!r} to leave out of its key")

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if enabled_by is not None and not bound.arguments[enabled_by]:
                return function(*args, **kwargs)
            key = {k: v for k, v in bound.arguments.items() if k not in ignore and k != enabled_by}
            try:
                digest = fingerprint(key)
            except TypeError as exc:
                parameter = next(k for k, v in key.items() if not _fingerprints(v))
                raise TypeError(f"{function.__qualname__}: cannot key a cached result by {parameter}="
                                f"{type(key[parameter]).__name__} ({exc})"
                                + (f"; call it with {enabled_by}=False" if enabled_by else "")) from None
            return _cached_at(name, digest, lambda: function(*args, **kwargs))

        return wrapper

    return decorate
