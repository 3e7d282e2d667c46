"""Checkers for the chapters' exercises: each compares a learner's function with the library's own on tiny random
models (every architecture family) or on random inputs, and says what is wrong in the terms of the papers.

    >>> from headcircuits import exercises
    >>> exercises.check_normalised_effect(my_effect)        # prints what passed, or what is wrong
    Check(passed=True, message='...')

A check returns a :class:`Check` (``bool(check)`` is whether it passed) and prints its message. While the book is
built (``HEADCIRCUITS_BOOK=1``) a failing check raises, so a wrong solution in a chapter fails the build.

The checkers know the usual mistakes and name them: averaging per-prompt ratios instead of the papers' ratio of
means, reading a right-padded batch at index -1 instead of each prompt's END, the second subject mention instead
of the first, composing in the wrong order, forgetting to normalise, mixing attention without keeping a
distribution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from headcircuits import circuits, composition, path_patching, repair, scoring, weights
from headcircuits.models import load_model
from headcircuits.models.core import Model
from headcircuits.tasks import ioi

FAMILIES = ("tiny-gpt2", "tiny-llama", "tiny-gemma3", "tiny-gpt-neox")


@dataclass(frozen=True)
class Check:
    """The outcome of one checker: ``passed`` and a message that says what was compared, or what is wrong."""

    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return ("✓ " if self.passed else "✗ ") + self.message


class ExerciseCheckFailed(AssertionError):
    """A checker failed while the book was being built: the chapter's solution is wrong."""


def _report(check: Check, verbose: bool) -> Check:
    if verbose:
        print(check)
    if not check.passed and os.environ.get("HEADCIRCUITS_BOOK") == "1":
        raise ExerciseCheckFailed(str(check))
    return check


def _call(fn: Callable, *args) -> tuple[Tensor | None, str | None]:
    """The learner's result as a float tensor, or a message saying why there is none."""
    try:
        out = fn(*args)
    except NotImplementedError:
        return None, "your function is not written yet (it raises NotImplementedError)"
    except Exception as exc:  # the learner's bug: report it, do not crash the checker
        return None, f"your function raised {type(exc).__name__}: {exc}"
    if out is None:
        return None, "your function returned None: return the result"
    try:
        return torch.as_tensor(out, dtype=torch.float64).detach().cpu(), None
    except Exception:
        return None, f"your function returned a {type(out).__name__}; return a tensor (or a number)"


def _close(a: Tensor, b: Tensor, tol: float = 1e-4) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b.to(a.dtype), atol=tol, rtol=tol))


_models: dict[str, Model] = {}


def _tiny(name: str) -> Model:
    if name not in _models:
        _models[name] = load_model(name, device="cpu")
    return _models[name]


# --- the normalised effect (Circuit Component Reuse §3; Wang et al. App. B) ---------------------------------------

def check_normalised_effect(fn: Callable, *, verbose: bool = True) -> Check:
    """``fn(ld_patched, ld_clean, ld_corrupt)``: the papers' normalised effect of a patch, where ``ld_patched`` is
    [..., prompts] (leading dimensions, e.g. one row per sender) and the other two are [prompts]:
    (mean LD_patched − mean LD_clean) / (mean LD_corrupt − mean LD_clean) over the prompts, one value per row."""
    gen = torch.Generator().manual_seed(0)
    clean = 2.0 + torch.rand(12, generator=gen, dtype=torch.float64)
    corrupt = -1.0 + 0.5 * torch.rand(12, generator=gen, dtype=torch.float64)
    patched = clean + (corrupt - clean) * torch.rand(5, 12, generator=gen, dtype=torch.float64) \
        + 0.3 * torch.randn(5, 12, generator=gen, dtype=torch.float64)
    want = path_patching.normalised_effect(patched, clean, corrupt)
    got, why = _call(fn, patched.clone(), clean.clone(), corrupt.clone())
    if why:
        return _report(Check(False, why), verbose)
    if got.shape != want.shape:
        hint = (" (you averaged over the senders too: average over the last dimension, the prompts, only)"
                if got.numel() == 1 else "")
        return _report(Check(False, f"shape {tuple(got.shape)} for ld_patched of shape {tuple(patched.shape)}; "
                                    f"expected {tuple(want.shape)}: one effect per row{hint}"), verbose)
    if _close(got, want):
        # and with leading dimensions of another rank
        patched3 = patched.reshape(5, 1, 12).expand(5, 2, 12)
        got3, why = _call(fn, patched3.clone(), clean.clone(), corrupt.clone())
        if why or not _close(got3, path_patching.normalised_effect(patched3, clean, corrupt)):
            return _report(Check(False, "right for [senders, prompts] but not for [layer, head, prompts]: reduce over "
                                        "the last dimension only (ld_patched.mean(-1))"), verbose)
        return _report(Check(True, "the normalised effect matches the library's on random logit differences, "
                                   "for 2-D and 3-D ld_patched"), verbose)
    per_prompt = ((patched - clean) / (corrupt - clean)).mean(-1)
    if _close(got, per_prompt):
        return _report(Check(False, "you averaged per-prompt ratios; the papers take the ratio of the means over the "
                                    "prompts (a prompt whose clean and counterfactual LD are close would otherwise "
                                    "dominate)"), verbose)
    if _close(got, -want):
        return _report(Check(False, "the sign is flipped: 0 means the patch changes nothing and 1 means it moves "
                                    "the model all the way to the counterfactual"), verbose)
    if _close(got, 1 - want):
        return _report(Check(False, "you measured from the counterfactual end (1 − effect): subtract the clean LD "
                                    "in the numerator and the denominator"), verbose)
    return _report(Check(False, f"values differ from the library's (first rows: yours {got[:3].tolist()}, expected "
                                f"{want[:3].tolist()})"), verbose)


# --- the logit difference at END (chapter 01) -------------------------------------------------------------------

def check_logit_difference(fn: Callable, *, verbose: bool = True) -> Check:
    """``fn(model, data)``: logit(answer) − logit(distractor) at each prompt's own END, per prompt, on the clean
    prompts of a TaskData (checked on a tiny model of every family, prompts of different lengths)."""
    for name in FAMILIES:
        model = _tiny(name)
        data = ioi.generate(model, 6, seed=1)
        logits = model.logits(data.clean)
        want = scoring.logit_difference(scoring.end_logits(model, data), data.answer, data.distractor)
        got, why = _call(fn, model, data)
        if why:
            return _report(Check(False, f"on {name}: {why}"), verbose)
        want = want.double().cpu()
        if _close(got, want):
            continue
        at_last = scoring.logit_difference(logits[:, -1].cpu(), data.answer, data.distractor).double()
        if _close(got, at_last):
            return _report(Check(False, "you read the logits at index -1: the batch is right-padded, so for every "
                                        "prompt shorter than the longest that is a pad token; read each prompt at "
                                        "its own END (data.at('END'))"), verbose)
        if _close(got, -want):
            return _report(Check(False, "the sign is flipped: logit(answer) − logit(distractor)"), verbose)
        return _report(Check(False, f"on {name} the values differ from the library's (yours {got[:3].tolist()}, "
                                    f"expected {want[:3].tolist()})"), verbose)
    return _report(Check(True, f"the logit difference at END matches the library's on {', '.join(FAMILIES)}"), verbose)


# --- the inhibition score (Talking Heads §3) -------------------------------------------------------------------

def check_inhibition_score(fn: Callable, *, verbose: bool = True) -> Check:
    """``fn(pattern, data)``: Talking Heads' inhibition score per prompt from one head's attention pattern
    [batch, query, key] on a TaskData's clean prompts: attention at END to IO minus attention to S1."""
    model = _tiny("tiny-gpt2")
    data = ioi.generate(model, 8, seed=2)
    gen = torch.Generator().manual_seed(3)
    width = data.clean.ids.shape[1]
    pattern = torch.rand(len(data), width, width, generator=gen).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    end, io, s1, s2 = (data.at(k) for k in ("END", "IO", "S1", "S2"))
    rows = torch.arange(len(data))
    a = torch.stack([pattern[rows, end, k] for k in (io, s1, s2)], -1).double()
    want = a[:, 0] - a[:, 1]
    got, why = _call(fn, pattern.clone(), data)
    if why:
        return _report(Check(False, why), verbose)
    if _close(got, want):
        return _report(Check(True, "the inhibition score matches END→IO minus END→S1 on random patterns"), verbose)
    if _close(got, a[:, 0] - a[:, 2]):
        return _report(Check(False, "you subtracted the attention to S2; the paper's score uses the first subject "
                                    "mention, S1"), verbose)
    if _close(got, -want):
        return _report(Check(False, "the sign is flipped: attention to IO minus attention to S1"), verbose)
    rows = torch.arange(len(data))
    if _close(got, (pattern[rows, -1, io] - pattern[rows, -1, s1]).double()):
        return _report(Check(False, "you read the query at index -1; read it at each prompt's END "
                                    "(data.at('END')): shorter prompts are padded"), verbose)
    return _report(Check(False, f"values differ (yours {got[:3].tolist()}, expected {want[:3].tolist()})"), verbose)


# --- a composition score (Elhage et al. 2021; Talking Heads §2) ----------------------------------------------------

def check_composition_score(fn: Callable, *, verbose: bool = True) -> Check:
    """``fn(ov, reader)``: the composition score of a sender whose OV circuit is ``ov`` [d_model, d_model] with a
    receiver that reads through ``reader`` [d_model, d_model] (its QK circuit W_Q W_Kᵀ for Q-composition), in the
    row-vector convention (x @ ov): ‖ov @ reader‖_F / (‖ov‖_F ‖reader‖_F). Checked against every pair of a tiny
    model's heads."""
    for name in ("tiny-gpt2", "tiny-llama"):
        w = weights.from_model(_tiny(name))
        scores = composition.composition_scores(w, "Q")
        pairs = [(0, 1, 1, 2), (0, 3, 2, 0), (1, 2, 2, 3)]
        for ls, hs, lr, hr in pairs:
            ov = (w.W_V[ls, hs] @ w.W_O[ls, hs]).double()
            qk = (w.W_Q[lr, hr] @ w.W_K[lr, hr].T).double()
            want = scores[ls, hs, lr, hr].double()
            got, why = _call(fn, ov.clone(), qk.clone())
            if why:
                return _report(Check(False, why), verbose)
            got = got.reshape(-1)[0] if got.numel() == 1 else got
            if got.numel() != 1:
                return _report(Check(False, f"return one number per pair, not a tensor of shape {tuple(got.shape)}"),
                               verbose)
            if abs(float(got) - float(want)) < 1e-4 * max(1.0, abs(float(want))):
                continue
            product = torch.linalg.matrix_norm(ov @ qk)
            if abs(float(got) - float(torch.linalg.matrix_norm(qk @ ov) / (torch.linalg.matrix_norm(ov) *
                                                                           torch.linalg.matrix_norm(qk)))) < 1e-6:
                return _report(Check(False, "the order is reversed: the sender writes first and the receiver reads "
                                            "what it wrote, so in the row-vector convention it is ov @ reader"), verbose)
            if abs(float(got) - float(product)) < 1e-6 * max(1.0, float(product)):
                return _report(Check(False, "not normalised: divide ‖ov @ reader‖_F by ‖ov‖_F and by ‖reader‖_F, so "
                                            "that the score does not grow with the weights' scale"), verbose)
            if abs(float(got) - float(torch.linalg.matrix_norm(ov @ qk, ord=2) / (torch.linalg.matrix_norm(ov, ord=2)
                                                                                 * torch.linalg.matrix_norm(qk, ord=2)))) < 1e-6:
                return _report(Check(False, "you used spectral norms; the score uses Frobenius norms"), verbose)
            return _report(Check(False, f"on {name}, sender {ls}.{hs} → receiver {lr}.{hr}: yours {float(got):.5f}, "
                                        f"expected {float(want):.5f}"), verbose)
    return _report(Check(True, "the composition score matches the library's on pairs of heads of two tiny models"),
                   verbose)


# --- a forced attention pattern (Circuit Component Reuse §5, the repair) --------------------------------------------

def check_forced_pattern(fn: Callable, *, verbose: bool = True) -> Check:
    """``fn(row, keys, strength)``: one query's attention ``row`` [batch, key] moved onto the positions ``keys``
    [batch, n_keys]: (1 − strength) · row + strength · (uniform over the keys)."""
    gen = torch.Generator().manual_seed(4)
    row = torch.rand(6, 10, generator=gen, dtype=torch.float64)
    row = row / row.sum(-1, keepdim=True)
    keys = torch.stack([torch.randperm(10, generator=gen)[:2] for _ in range(6)])
    for strength in (1.0, 0.5, 0.0):
        want = repair.forced_row(row, keys, strength)
        got, why = _call(fn, row.clone(), keys.clone(), strength)
        if why:
            return _report(Check(False, why), verbose)
        if _close(got, want):
            continue
        if got.shape == want.shape and not torch.allclose(got.sum(-1), torch.ones(6, dtype=got.dtype), atol=1e-6):
            return _report(Check(False, f"at strength {strength} the rows sum to {got.sum(-1)[:3].tolist()}: a forced "
                                        f"pattern is still a distribution; mix the two (1 − s)·row + s·target, do "
                                        f"not add"), verbose)
        if _close(got, repair.forced_row(row, keys, 1 - strength)):
            return _report(Check(False, "strength is reversed: 1 means all attention goes to the keys"), verbose)
        return _report(Check(False, f"at strength {strength} your rows differ from the expected ones (first row: "
                                    f"yours {got[0].tolist()}, expected {want[0].tolist()})"), verbose)
    return _report(Check(True, "the forced pattern matches the repair's at strengths 1, 0.5 and 0"), verbose)


# --- the layer-matched null of an overlap (Circuit Component Reuse §4, our baseline) -----------------------------

def _head_sets(gen: torch.Generator, n_layers: int, per_layer: int) -> tuple[set, set]:
    heads = [(l, h) for l in range(n_layers) for h in range(per_layer)]
    pick = lambda k: {heads[i] for i in torch.randperm(len(heads), generator=gen)[:k].tolist()}  # noqa: E731
    late = [(l, h) for l, h in heads if l >= n_layers // 2]  # circuits sit in late layers: make them overlap
    a = pick(6) | {late[i] for i in torch.randperm(len(late), generator=gen)[:4].tolist()}
    b = pick(5) | {late[i] for i in torch.randperm(len(late), generator=gen)[:5].tolist()}
    return a, b


def check_layer_matched_p(fn: Callable, *, verbose: bool = True) -> Check:
    """``fn(a, b, n_layers, heads_per_layer)``: for two head sets ``a`` and ``b`` (sets of (layer, head)), the exact
    probability that random sets with **the same number of heads in every layer** as ``a`` and ``b`` share at
    least as many heads as they do (the layer-matched p-value). Checked against ``circuits.overlap`` on random
    sets of three model shapes."""
    gen = torch.Generator().manual_seed(7)
    for n_layers, per_layer in ((6, 4), (8, 3), (12, 12)):
        for _ in range(3):
            a, b = _head_sets(gen, n_layers, per_layer)
            o = circuits.overlap(a, b, n_layers * per_layer, n_layers)
            got, why = _call(fn, set(a), set(b), n_layers, per_layer)
            if why:
                return _report(Check(False, why), verbose)
            if got.numel() != 1:
                return _report(Check(False, f"return one probability, not a tensor of shape {tuple(got.shape)}"), verbose)
            got = float(got.reshape(-1)[0])
            if abs(got - o.layer_p_value) < 1e-9:
                continue
            if abs(got - o.p_value) < 1e-9:
                return _report(Check(False, "that is the all-heads-exchangeable p-value (one hypergeometric over every "
                                            "head): the layer-matched null keeps each layer's head counts, so the "
                                            "overlap is a sum of one hypergeometric count per layer"), verbose)
            strict = circuits.Overlap(o.shared + 1, o.size_a, o.size_b, o.n_heads, o.layer_counts, o.heads_per_layer)
            if abs(got - strict.layer_p_value) < 1e-9:
                return _report(Check(False, "you computed P(overlap > observed); the p-value includes the observed "
                                            "overlap itself: P(overlap ≥ observed)"), verbose)
            if abs(got - o.layer_expected) < 1e-9 or abs(got - o.layer_expected * o.size_a) < 1e-9:
                return _report(Check(False, "that is the expected overlap; return the probability of an overlap at "
                                            "least as large as the observed one"), verbose)
            return _report(Check(False, f"on {n_layers} layers × {per_layer} heads ({o.shared} shared of {o.size_a}): "
                                        f"yours {got:.6g}, expected {o.layer_p_value:.6g}"), verbose)
    return _report(Check(True, "the layer-matched p-value matches circuits.overlap on nine pairs of head sets"), verbose)


# --- Talking Heads' weight edit (§3): remove SVD components from a head ------------------------------------------

def check_edit_ov(fn: Callable, *, verbose: bool = True) -> Check:
    """``fn(W_V, W_O, zero)``: a head's value and output weights ([d_model, d_head], [d_head, d_model]) with the
    SVD components ``zero`` (indices by decreasing singular value) of its OV circuit W_V W_O removed, in the
    paper's form: singular values set to 0, then W_V' = U sqrt(S'), W_O' = sqrt(S') Vᵀ. Checked on heads of two
    tiny models: the edited OV, and the factors' form (W_V'ᵀ W_V' = S', diagonal)."""
    for name in ("tiny-gpt2", "tiny-llama"):
        w = weights.from_model(_tiny(name))
        for layer, head, zero in ((0, 1, [0]), (1, 2, [2]), (2, 0, [0, 3])):
            W_V, W_O = w.W_V[layer, head].double(), w.W_O[layer, head].double()
            V_want, O_want = weights.edit_ov(W_V, W_O, zero)
            try:
                out = fn(W_V.clone(), W_O.clone(), list(zero))
            except NotImplementedError:
                return _report(Check(False, "your function is not written yet (it raises NotImplementedError)"), verbose)
            except Exception as exc:
                return _report(Check(False, f"your function raised {type(exc).__name__}: {exc}"), verbose)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                return _report(Check(False, "return the two edited matrices (W_V', W_O')"), verbose)
            V_got, O_got = (torch.as_tensor(x, dtype=torch.float64) for x in out)
            if V_got.shape != W_V.shape or O_got.shape != W_O.shape:
                return _report(Check(False, f"W_V' must keep the shape {tuple(W_V.shape)} and W_O' the shape "
                                            f"{tuple(W_O.shape)}; yours are {tuple(V_got.shape)}, {tuple(O_got.shape)}"),
                               verbose)
            ov_got, ov_want = V_got @ O_got, V_want @ O_want
            if not _close(ov_got, ov_want, 1e-6):
                U, S, Vh = torch.linalg.svd(W_V @ W_O, full_matrices=False)
                d = W_V.shape[1]
                reversed_zero = [d - 1 - k for k in zero]
                kept = torch.ones(len(S), dtype=torch.bool)
                kept[reversed_zero] = False
                if _close(ov_got, (U[:, kept] * S[kept]) @ Vh[kept], 1e-6):
                    return _report(Check(False, "you removed the smallest components: component 0 is the one with the "
                                                "largest singular value (torch.linalg.svd sorts them decreasing)"), verbose)
                only = (U[:, zero] * S[zero]) @ Vh[zero]
                if _close(ov_got, only, 1e-6):
                    return _report(Check(False, "you kept only the listed components; the edit removes them and keeps "
                                                "every other"), verbose)
                return _report(Check(False, f"on {name} head {layer}.{head}, removing {zero}: your edited OV differs "
                                            f"from the expected one by {float((ov_got - ov_want).abs().max()):.3g}"),
                               verbose)
            gram = V_got.T @ V_got
            if not _close(gram, V_want.T @ V_want, 1e-6):
                return _report(Check(False, "your edited OV is right, but not in the paper's form: W_V' = U sqrt(S') "
                                            "and W_O' = sqrt(S') Vᵀ share the singular values' square roots "
                                            "(W_V'ᵀ W_V' is then diag(S'))"), verbose)
    return _report(Check(True, "the weight edit matches the paper's form on heads of two tiny models"), verbose)


__all__ = ["Check", "ExerciseCheckFailed", "check_composition_score", "check_edit_ov", "check_forced_pattern",
           "check_inhibition_score", "check_layer_matched_p", "check_logit_difference", "check_normalised_effect"]
