"""The kept-pass store: served only for the same model and prompts, unchanged, with no hook active; a byte budget
that counts what it holds; weak references."""

from __future__ import annotations

import gc

import torch
from headcircuits.models import architecture, load_model
from headcircuits.store import PassStore, hooks_active, storage_bytes
from headcircuits.tasks import ioi


def _values(made):
    def value(i):
        return lambda: made.append(i) or [torch.zeros(256), {"x": (torch.ones(256), i)}]  # 2 KiB each
    return value


def test_the_store_keeps_at_most_its_byte_budget_least_recently_used_first(tiny):
    data = [ioi.generate(tiny, 2, seed=s) for s in range(3)]
    made: list[int] = []
    value = _values(made)
    store = PassStore(budget=5000)  # room for two values
    for i in range(2):
        store.keep(tiny, data[i], ("k",), value(i))
    store.keep(tiny, data[0], ("k",), value(9))  # kept: reused, and now the most recently used
    store.keep(tiny, data[2], ("k",), value(2))  # the third drops the least recently used (data[1])
    store.keep(tiny, data[0], ("k",), value(9))
    store.keep(tiny, data[1], ("k",), value(1))
    assert made == [0, 1, 2, 1] and len(store) == 2 and store.nbytes == 4096
    view = torch.zeros(1000)  # a slice keeps its whole storage (4,000 bytes) alive: it counts whole
    assert storage_bytes([view[:10], view[10:20]]) == 4000
    store.keep(tiny, data[0], ("slice",), lambda: [view[:10], view[10:20]])
    assert len(store) == 1  # 4,000 bytes, counted once, leave no room for a second value
    small = PassStore(budget=100)
    assert not small.put(tiny, data[0], ("too big",), torch.zeros(1000)) and len(small) == 0  # larger than all
    made.clear()
    store.clear()
    store.keep(tiny, data[0], ("k",), value(0))
    store.keep(tiny, data[0], ("k",), value(5))  # kept
    data[0].clean.ids.add_(0)  # changed in place: the kept value is not reused
    store.keep(tiny, data[0], ("k",), value(6))
    assert made == [0, 6]


def test_the_store_matches_the_same_objects_and_a_key_the_caller_accepts(tiny):
    a, b = ioi.generate(tiny, 2, seed=0), ioi.generate(tiny, 2, seed=0)  # equal prompts, another object
    store = PassStore()
    store.put(tiny, a, ("prefix", 1, (1, 2)), "kept")
    assert store.get(tiny, b, lambda key: True) is None
    assert store.get(tiny, a, lambda key: key[:2] == ("prefix", 1) and {1} <= set(key[2])) == "kept"
    assert store.get(tiny, a, lambda key: key[:2] == ("prefix", 0)) is None
    other = load_model("tiny-llama" if tiny.facts.family != "llama" else "tiny-gpt2")
    assert store.get(other, a, lambda key: True) is None


def test_the_store_neither_keeps_nor_serves_a_pass_while_a_hook_is_active(tiny):
    data = ioi.generate(tiny, 2, seed=0)
    store = PassStore()
    name = architecture.hook("z", 0)
    assert not hooks_active(tiny)
    with tiny.bridge.hooks(fwd_hooks=[(name, lambda x, hook: x)]):
        assert hooks_active(tiny)
        assert not store.put(tiny, data, "k", torch.zeros(3)) and len(store) == 0  # made under a hook: refused
    assert store.put(tiny, data, "k", torch.zeros(3))
    with tiny.bridge.hooks(fwd_hooks=[(name, lambda x, hook: x)]):
        assert store.get(tiny, data, lambda key: True) is None  # a clean pass is not served inside a hooked run
    assert store.get(tiny, data, lambda key: True) is not None


def test_the_store_holds_its_model_and_prompts_by_weak_reference(tiny):
    store = PassStore()
    data = ioi.generate(tiny, 2, seed=0)
    store.put(tiny, data, "k", torch.zeros(3))
    assert len(store) == 1
    del data
    gc.collect()
    assert len(store) == 0  # the prompts are gone, and with them what was kept for them
