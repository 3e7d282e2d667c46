"""Every checker accepts a right answer written as a learner would, and names the typical wrong answers."""

from __future__ import annotations

import pytest
import torch

from headcircuits import exercises


@pytest.fixture(autouse=True)
def not_in_the_book(monkeypatch):
    monkeypatch.delenv("HEADCIRCUITS_BOOK", raising=False)


def _fails(check, *words):
    assert not check, check.message
    for w in words:
        assert w in check.message, check.message


# the normalised effect ------------------------------------------------------------------------------------------

def right_effect(p, c, x):
    return (p.mean(-1) - c.mean()) / (x.mean() - c.mean())


def test_normalised_effect_checker(capsys):
    assert exercises.check_normalised_effect(right_effect)
    assert "✓" in capsys.readouterr().out
    _fails(exercises.check_normalised_effect(lambda p, c, x: ((p - c) / (x - c)).mean(-1)), "ratio of the means")
    _fails(exercises.check_normalised_effect(lambda p, c, x: -right_effect(p, c, x)), "sign")
    _fails(exercises.check_normalised_effect(lambda p, c, x: (p.mean(-1) - x.mean()) / (c.mean() - x.mean())),
           "counterfactual end")
    _fails(exercises.check_normalised_effect(lambda p, c, x: (p.mean() - c.mean()) / (x.mean() - c.mean())), "shape")
    _fails(exercises.check_normalised_effect(lambda p, c, x: (p[:, :].mean(1) - c.mean()) / (x.mean() - c.mean())),
           "[layer, head, prompts]")

    def unwritten(p, c, x):
        raise NotImplementedError

    _fails(exercises.check_normalised_effect(unwritten), "not written yet")
    _fails(exercises.check_normalised_effect(lambda p, c, x: None), "returned None")


def test_a_failing_check_raises_while_the_book_is_built(monkeypatch):
    monkeypatch.setenv("HEADCIRCUITS_BOOK", "1")
    with pytest.raises(exercises.ExerciseCheckFailed, match="sign"):
        exercises.check_normalised_effect(lambda p, c, x: -right_effect(p, c, x), verbose=False)
    assert exercises.check_normalised_effect(right_effect, verbose=False)


# the logit difference ---------------------------------------------------------------------------------------------

def right_ld(model, data):
    logits = model.logits(data.clean)
    rows = torch.arange(len(data))
    end = data.at("END")
    return logits[rows, end, data.answer] - logits[rows, end, data.distractor]


def test_logit_difference_checker():
    assert exercises.check_logit_difference(right_ld)

    def at_last(model, data):
        logits = model.logits(data.clean)[:, -1]
        rows = torch.arange(len(data))
        return logits[rows, data.answer] - logits[rows, data.distractor]

    _fails(exercises.check_logit_difference(at_last), "index -1", "END")
    _fails(exercises.check_logit_difference(lambda m, d: -right_ld(m, d)), "sign")
    _fails(exercises.check_logit_difference(lambda m, d: right_ld(m, d)[:-1]), "differ")


# the inhibition score ---------------------------------------------------------------------------------------------

def right_inhibition(pattern, data):
    rows = torch.arange(len(data))
    end = data.at("END")
    return pattern[rows, end, data.at("IO")] - pattern[rows, end, data.at("S1")]


def test_inhibition_score_checker():
    assert exercises.check_inhibition_score(right_inhibition)
    rows = lambda d: torch.arange(len(d))  # noqa: E731
    _fails(exercises.check_inhibition_score(
        lambda p, d: p[rows(d), d.at("END"), d.at("IO")] - p[rows(d), d.at("END"), d.at("S2")]), "S1")
    _fails(exercises.check_inhibition_score(lambda p, d: -right_inhibition(p, d)), "sign")
    _fails(exercises.check_inhibition_score(
        lambda p, d: p[rows(d), -1, d.at("IO")] - p[rows(d), -1, d.at("S1")]), "index -1")


# the composition score --------------------------------------------------------------------------------------------

def right_composition(ov, reader):
    return torch.linalg.matrix_norm(ov @ reader) / (torch.linalg.matrix_norm(ov) * torch.linalg.matrix_norm(reader))


def test_composition_score_checker():
    assert exercises.check_composition_score(right_composition)
    _fails(exercises.check_composition_score(lambda ov, r: right_composition(r, ov)), "order is reversed")
    _fails(exercises.check_composition_score(lambda ov, r: torch.linalg.matrix_norm(ov @ r)), "not normalised")
    _fails(exercises.check_composition_score(
        lambda ov, r: torch.linalg.matrix_norm(ov @ r, ord=2) / (torch.linalg.matrix_norm(ov, ord=2)
                                                                 * torch.linalg.matrix_norm(r, ord=2))), "spectral")
    _fails(exercises.check_composition_score(lambda ov, r: ov @ r), "one number per pair")


# the forced pattern -----------------------------------------------------------------------------------------------

def right_forced(row, keys, strength):
    target = torch.zeros_like(row)
    for b in range(row.shape[0]):
        for k in keys[b]:
            target[b, k] += 1 / keys.shape[1]
    return (1 - strength) * row + strength * target


def test_forced_pattern_checker():
    assert exercises.check_forced_pattern(right_forced)
    _fails(exercises.check_forced_pattern(lambda r, k, s: r + s * right_forced(r, k, 1.0)), "distribution")
    _fails(exercises.check_forced_pattern(lambda r, k, s: right_forced(r, k, 1 - s)), "reversed")


# the layer-matched p-value (hard) --------------------------------------------------------------------------------

def right_layer_p(a, b, n_layers, per_layer):
    from math import comb

    dist = [1.0]
    for layer in range(n_layers):
        na, nb = sum(h[0] == layer for h in a), sum(h[0] == layer for h in b)
        here = [comb(nb, k) * comb(per_layer - nb, na - k) / comb(per_layer, na) for k in range(na + 1)]
        dist = [sum(dist[i] * here[k - i] for i in range(len(dist)) if 0 <= k - i < len(here))
                for k in range(len(dist) + len(here) - 1)]
    return sum(dist[len(a & b):])


def test_layer_matched_p_checker():
    from math import comb

    assert exercises.check_layer_matched_p(right_layer_p)

    def all_heads(a, b, n_layers, per_layer):
        n = n_layers * per_layer
        return sum(comb(len(b), k) * comb(n - len(b), len(a) - k) / comb(n, len(a)) for k in range(len(a & b), len(a) + 1))

    _fails(exercises.check_layer_matched_p(all_heads), "all-heads")

    _fails(exercises.check_layer_matched_p(lambda a, b, L, H: _p_above(a, b, L, H)), "≥")
    _fails(exercises.check_layer_matched_p(lambda a, b, L, H: right_layer_p(a, b, L, H) * 0.5), "expected")


def _p_above(a, b, n_layers, per_layer):
    """P(overlap > observed): the off-by-one mistake."""
    from headcircuits import circuits

    o = circuits.overlap(a, b, n_layers * per_layer, n_layers)
    return circuits.Overlap(o.shared + 1, o.size_a, o.size_b, o.n_heads, o.layer_counts, o.heads_per_layer).layer_p_value


# the paper's weight edit (hard) ----------------------------------------------------------------------------------

def right_edit(W_V, W_O, zero):
    U, S, Vh = torch.linalg.svd(W_V @ W_O, full_matrices=False)
    d = W_V.shape[1]
    U, S, Vh = U[:, :d], S[:d].clone(), Vh[:d]
    S[zero] = 0
    return U * S.sqrt(), S.sqrt()[:, None] * Vh


def test_edit_ov_checker():
    assert exercises.check_edit_ov(right_edit)

    def smallest(W_V, W_O, zero):
        return right_edit(W_V, W_O, [W_V.shape[1] - 1 - k for k in zero])

    _fails(exercises.check_edit_ov(smallest), "smallest")

    def keep_only(W_V, W_O, zero):
        U, S, Vh = torch.linalg.svd(W_V @ W_O, full_matrices=False)
        d = W_V.shape[1]
        kept = torch.zeros(d, dtype=S.dtype)
        kept[zero] = S[zero]
        return U[:, :d] * kept.sqrt(), kept.sqrt()[:, None] * Vh[:d]

    _fails(exercises.check_edit_ov(keep_only), "kept only")
    _fails(exercises.check_edit_ov(lambda W_V, W_O, zero: (W_V[:, :1], W_O[:1])), "shape")

    def no_roots(W_V, W_O, zero):
        U, S, Vh = torch.linalg.svd(W_V @ W_O, full_matrices=False)
        d = W_V.shape[1]
        U, S, Vh = U[:, :d], S[:d].clone(), Vh[:d]
        S[zero] = 0
        return U * S, Vh

    _fails(exercises.check_edit_ov(no_roots), "paper's form")
    _fails(exercises.check_edit_ov(lambda W_V, W_O, zero: W_V @ W_O), "two edited matrices")
