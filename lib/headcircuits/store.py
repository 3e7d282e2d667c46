"""Kept passes: clean activations that several runs in a row start from, held in memory for the next run.

Several experiments run many interventions over the same prompts, each changing the model from some layer (or
some token) on: everything below it is the clean run, the same every time. The engine computes that clean part
once and keeps it here, so the next intervention on the same prompts starts from it (e.g. Talking Heads'
traversal after the channel's coordinates were read on the same prompts; the oracle fix after the traversal;
five weight edits of one head, each starting at that head's layer).

A kept pass is served only when it is the same computation:

* the same model and prompts (the same objects, held by weak reference: a model or task data that is no
  longer used elsewhere is dropped with everything kept for it), unchanged in place (the version counters of
  the model's parameters and of the prompts' token ids are part of the entry);
* no hook active on the model, neither when the pass was kept nor when it is served: a pass made under an
  intervention must never stand for a clean one, and a clean one must not be served inside an intervention's
  own run (the store refuses both and the caller computes).

The store holds at most :attr:`PassStore.budget` bytes of tensor storage (a slice counts its whole storage,
which it keeps alive), dropping the least recently used entries first; a value larger than the budget alone is
not kept.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from torch import Tensor

from headcircuits.models.core import Model
from headcircuits.tasks.base import TaskData

#: the default budget of :data:`STORE`, in bytes of tensor storage
BUDGET = 2**29


@dataclass
class _Entry:
    model: weakref.ref
    data: weakref.ref
    key: Hashable
    versions: tuple[int, int]
    value: Any


def _walked(model: Model) -> tuple[list, list]:
    """The model's hook points and parameters, listed once per model (walking the modules costs milliseconds)."""
    if "_walked" not in model.__dict__:
        from transformer_lens.hook_points import HookPoint

        model.__dict__["_walked"] = ([m for m in model.bridge.modules() if isinstance(m, HookPoint)],
                                     list(model.bridge.parameters()))
    return model.__dict__["_walked"]


def hooks_active(model: Model) -> bool:
    """Whether any hook is registered on any of the model's hook points right now (TransformerLens' own module
    hooks, which the bridge keeps on some of the wrapped modules at all times, are not hook points).

    Args:
        model: the model.

    Returns:
        Whether a hook is registered.
    """
    return any(m._forward_hooks or m._forward_pre_hooks for m in _walked(model)[0])


def _versions(model: Model, data: TaskData) -> tuple[int, int]:
    # changing the weights or the prompts in place bumps their tensors' version counters
    return sum(p._version for p in _walked(model)[1]), data.clean.ids._version


def storage_bytes(value: Any, seen: set | None = None) -> int:
    """Bytes of the tensor storage inside ``value`` (tensors in lists, tuples, dicts and objects' attributes),
    each storage counted once: a slice keeps its whole storage alive, so it counts all of it.

    Args:
        value: tensors, possibly nested.
        seen: storages counted already.

    Returns:
        The bytes.
    """
    seen = set() if seen is None else seen
    if isinstance(value, Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        value = list(vars(value).values())
    if isinstance(value, (list, tuple)):
        return sum(storage_bytes(v, seen) for v in value)
    return 0


class PassStore:
    """Kept clean passes, most recently used first (see the module docstring).

    Args:
        budget: the most bytes of tensor storage kept at once.
    """

    def __init__(self, budget: int = BUDGET):
        self.budget = budget
        self._entries: list[_Entry] = []

    def __len__(self) -> int:
        self._drop_dead()
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """The bytes of tensor storage kept now (each storage once)."""
        seen: set = set()
        return sum(storage_bytes(e.value, seen) for e in self._entries)

    def clear(self) -> None:
        """Forget everything kept (a benchmark timing a computation from scratch; a test starting clean)."""
        self._entries.clear()

    def get(self, model: Model, data: TaskData, matches: Callable[[Hashable], bool]) -> Any | None:
        """The value kept for ``model`` and ``data`` (the same objects, unchanged) under a key that ``matches``
        accepts, now the most recently used; ``None`` when there is none, or while a hook is active on the model.

        Args:
            model: the model the pass ran on.
            data: the prompts it ran over.
            matches: which keys serve this call (e.g. a pass through a higher layer serves a lower one).

        Returns:
            The kept value, or ``None``.
        """
        if hooks_active(model):
            return None
        self._drop_dead()
        versions = _versions(model, data)
        for i, entry in enumerate(self._entries):
            if entry.model() is model and entry.data() is data and entry.versions == versions and matches(entry.key):
                self._entries.insert(0, self._entries.pop(i))
                return entry.value
        return None

    def keys(self, model: Model, data: TaskData, matches: Callable[[Hashable], bool]) -> list[Hashable]:
        """The keys kept for ``model`` and ``data`` (unchanged) that ``matches`` accepts, most recently used first;
        none while a hook is active on the model."""
        if hooks_active(model):
            return []
        self._drop_dead()
        versions = _versions(model, data)
        return [e.key for e in self._entries if e.model() is model and e.data() is data and e.versions == versions
                and matches(e.key)]

    def put(self, model: Model, data: TaskData, key: Hashable, value: Any) -> bool:
        """Keep ``value`` for ``model``, ``data`` and ``key`` (replacing an entry with the same key), dropping the
        least recently used entries beyond the budget. Nothing is kept while a hook is active on the model.

        Returns:
            Whether the value is kept.
        """
        if hooks_active(model):
            return False
        self._drop_dead()
        self._entries = [e for e in self._entries
                         if not (e.model() is model and e.data() is data and e.key == key)]
        self._entries.insert(0, _Entry(weakref.ref(model), weakref.ref(data), key, _versions(model, data), value))
        seen: set = set()
        sizes = [storage_bytes(e.value, seen) for e in self._entries]
        while self._entries and sum(sizes) > self.budget:
            self._entries.pop()
            sizes.pop()
        return bool(self._entries) and self._entries[0].value is value

    def keep(self, model: Model, data: TaskData, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, or the value kept for the same model, prompts and ``key``; a computed value is kept."""
        value = self.get(model, data, lambda k: k == key)
        if value is None:
            value = compute()
            self.put(model, data, key, value)
        return value

    def _drop_dead(self) -> None:
        self._entries = [e for e in self._entries if e.model() is not None and e.data() is not None]


#: the library's one store (the engine reads and fills it)
STORE = PassStore()
