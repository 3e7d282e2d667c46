"""The on-disk results cache: reuse, keys, damage."""

from __future__ import annotations

from dataclasses import replace

import torch

import pytest

from headcircuits import cache
from headcircuits import path_patching as patching
from headcircuits.tasks import ioi


def test_same_key_is_computed_once_other_keys_again(tmp_path):
    calls = []

    def compute(x):
        calls.append(x)
        return torch.tensor([x, 2 * x])

    a = cache.cached("t", {"x": 1, "w": torch.ones(3)}, lambda: compute(1), root=tmp_path)
    b = cache.cached("t", {"w": torch.ones(3), "x": 1}, lambda: compute(99), root=tmp_path)  # key order is irrelevant
    c = cache.cached("t", {"x": 1, "w": torch.ones(3) * 2}, lambda: compute(3), root=tmp_path)  # tensor values count
    assert torch.equal(a, b) and calls == [1, 3] and torch.equal(c, torch.tensor([3, 6]))


def test_unreadable_file_is_recomputed_with_a_warning_that_names_it(tmp_path):
    cache.cached("t", {"k": 1}, lambda: torch.zeros(2), root=tmp_path)
    (path,) = (tmp_path / "t").glob("*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match=f"{path.name}.*cannot be read.*HEADCIRCUITS_RESULTS"):
        value = cache.cached("t", {"k": 1}, lambda: torch.ones(2), root=tmp_path)
    assert torch.equal(value, torch.ones(2))
    assert torch.equal(torch.load(path), torch.ones(2))


def test_models_and_task_data_are_keyed_by_their_content(tiny):
    data = ioi.generate(tiny, 4, seed=0)
    other = ioi.generate(tiny, 4, seed=1)
    assert cache.fingerprint({"m": tiny, "d": data}) == cache.fingerprint({"m": tiny, "d": data})
    assert cache.fingerprint({"m": tiny, "d": data}) != cache.fingerprint({"m": tiny, "d": other})
    assert cache.fingerprint(tiny) != cache.fingerprint(replace(tiny, weights_id=tiny.weights_id + "x"))


def test_cached_path_patching_returns_the_same_table(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADCIRCUITS_RESULTS", str(tmp_path))
    data = ioi.generate(tiny, 4, seed=0, counterfactual="s2io")
    receivers = patching.Receivers("logits")
    first = patching.path_patch(tiny, data, receivers, [(0, 0), (1, 1)], cache=True, progress=False)
    assert len(list((tmp_path / "path_patch").glob("*.pt"))) == 1
    second = patching.path_patch(tiny, data, receivers, [(0, 0), (1, 1)], cache=True, progress=False)
    torch.testing.assert_close(first, second, equal_nan=True)
    assert len(list((tmp_path / "path_patch").glob("*.pt"))) == 1


def test_cached_evaluation_is_keyed_by_the_edits(tiny, tmp_path, monkeypatch):
    import pandas as pd

    from headcircuits import scoring
    from headcircuits.edits import ResidualAddition

    monkeypatch.setenv("HEADCIRCUITS_RESULTS", str(tmp_path))
    data = ioi.generate(tiny, 4, seed=0)
    adds = [ResidualAddition(1, "END", torch.full((tiny.facts.d_model,), s)) for s in (1.0, 2.0)]
    plain = scoring.evaluate(tiny, data, cache=True)
    pd.testing.assert_frame_equal(plain, scoring.evaluate(tiny, data))
    first = scoring.evaluate(tiny, data, [adds[0]], cache=True)
    again = scoring.evaluate(tiny, data, [adds[0]], cache=True)
    other = scoring.evaluate(tiny, data, [adds[1]], cache=True)
    pd.testing.assert_frame_equal(first, again)
    assert len(list((tmp_path / "evaluate").glob("*.pt"))) == 3  # none, +1, +2
    assert not first.logit_diff.equals(other.logit_diff)


def test_the_decorator_keys_every_argument_and_refuses_what_it_cannot_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADCIRCUITS_RESULTS", str(tmp_path))
    calls = []

    @cache.on_disk("f", enabled_by="keep", ignore=("progress",))
    def f(x, scale=2.0, *, keep=True, progress=False, extra=None):
        calls.append((x, scale, extra))
        return torch.tensor([x * scale])

    assert f(1) == f(1, progress=True) == f(1, 2.0) and len(calls) == 1  # defaults bound, progress ignored
    f(1, scale=3.0)
    f(1, extra="a")
    assert len(calls) == 3  # every other argument is part of the key, keyword-only ones included
    f(1, keep=False)
    assert len(calls) == 4  # switched off: computed, nothing read
    with pytest.raises(TypeError, match=r"cannot key a cached result by extra=function.*keep=False"):
        f(1, extra=lambda: 0)
    with pytest.raises(TypeError, match="no parameter 'quiet'"):
        cache.on_disk("g", ignore=("quiet",))(lambda x: x)


def test_a_result_cached_by_another_library_source_is_not_used(tmp_path, monkeypatch):
    """An algorithm fix must never leave old numbers behind: the key includes the library's source."""
    first = cache.cached("t", {"k": 1}, lambda: torch.zeros(2), root=tmp_path)
    assert torch.equal(cache.cached("t", {"k": 1}, lambda: torch.ones(2), root=tmp_path), first)  # same source
    monkeypatch.setattr(cache, "library_hash", lambda: "an edited library")
    assert torch.equal(cache.cached("t", {"k": 1}, lambda: torch.ones(2), root=tmp_path), torch.ones(2))


def test_the_library_hash_follows_its_source(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    before = cache._library_hash(package)
    cache._library_hash.cache_clear()
    (package / "a.py").write_text("x = 2\n")
    assert cache._library_hash(package) != before
    assert len(cache.library_hash()) == 64


def test_every_task_data_field_is_in_the_key(tiny):
    data = ioi.generate(tiny, 4, seed=0, counterfactual="s2io")
    key = cache.fingerprint(data)
    changed = {
        "candidates": replace(data, candidates=data.candidates.flip(1)),
        "meta": replace(data, meta=data.meta.assign(template=data.meta.template + 1)),
        "corrupt lengths": replace(data, corrupt=replace(data.corrupt, lengths=data.corrupt.lengths - 1)),
        "corrupt_answer": replace(data, corrupt_answer=data.answer),
        "text": replace(data, clean_text=[t + "!" for t in data.clean_text]),
    }
    for what, other in changed.items():
        assert cache.fingerprint(other) != key, what


def test_path_patching_cache_is_keyed_by_the_baseline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADCIRCUITS_RESULTS", str(tmp_path))
    data = ioi.generate(tiny, 4, seed=0, counterfactual="s2io")
    receivers, senders = patching.Receivers("logits"), [(0, 0), (1, 1)]
    base = patching.baseline(tiny, data)
    assert base.key == patching.baseline(tiny, data).key != patching.baseline(tiny, data.subset([0, 1])).key
    first = patching.path_patch(tiny, data, receivers, senders, cache=True, progress=False, base=base)
    shifted = replace(base, ld_clean=base.ld_clean + 1.0)  # a changed baseline: keyed by its values
    second = patching.path_patch(tiny, data, receivers, senders, cache=True, progress=False, base=shifted)
    assert len(list((tmp_path / "path_patch").glob("*.pt"))) == 2
    assert not torch.allclose(first[0, 0], second[0, 0])
