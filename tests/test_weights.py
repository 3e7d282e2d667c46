"""Weights-only head analysis: factored = dense, invariances, extraction from models, GPT-2's known relations."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED
from headcircuits import composition
from headcircuits import weights

GPT2_WEIGHTS = SHARED / "gpt2-small-attention"


def _random_weights(L=3, H=4, d=32, dh=8, seed=0) -> weights.HeadWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return weights.HeadWeights(r(L, H, d, dh), r(L, H, d, dh), r(L, H, d, dh), r(L, H, dh, d))


def _dense_scores(w: weights.HeadWeights, kind: str) -> torch.Tensor:
    """The straightforward implementation: materialise every d_model x d_model circuit."""
    OV = w.W_V @ w.W_O
    QK = w.W_Q @ w.W_K.transpose(-1, -2)
    M = {"Q": QK, "K": QK.transpose(-1, -2), "V": OV}[kind]
    L, H = w.n_layers, w.n_heads
    out = torch.full((L, H, L, H), float("nan"))
    for ls in range(L):
        for hs in range(H):
            for lr in range(ls + 1, L):
                for hr in range(H):
                    a, b = OV[ls, hs], M[lr, hr]
                    out[ls, hs, lr, hr] = torch.linalg.norm(a @ b) / (torch.linalg.norm(a) * torch.linalg.norm(b))
    return out


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_vectorised_scores_match_the_dense_implementation(kind):
    w = _random_weights()
    fast, dense = composition.composition_scores(w, kind), _dense_scores(w, kind)
    assert torch.equal(fast.isnan(), dense.isnan())
    torch.testing.assert_close(fast.nan_to_num(), dense.nan_to_num(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_scores_are_invariant_to_reparametrisations_that_keep_the_circuits(kind):
    """OV = W_V W_O and QK = W_Q W_K^T are unchanged by W_V -> W_V G, W_O -> G^-1 W_O (and likewise for Q/K),
    and a score does not change when a head's output is scaled."""
    w = _random_weights(seed=1)
    g = torch.Generator().manual_seed(2)
    G = torch.randn(8, 8, generator=g) + 3 * torch.eye(8)
    Gi = torch.linalg.inv(G)
    moved = weights.HeadWeights(w.W_Q @ G, w.W_K @ Gi.T, w.W_V @ G, 5.0 * (Gi @ w.W_O))
    torch.testing.assert_close(
        composition.composition_scores(moved, kind).nan_to_num(), composition.composition_scores(w, kind).nan_to_num(),
        rtol=1e-3, atol=1e-5,
    )


def test_factored_norm_and_svd_match_dense():
    w = _random_weights()
    dense = w.W_V @ w.W_O
    torch.testing.assert_close(composition.frobenius(w.W_V, w.W_O), torch.linalg.matrix_norm(dense), rtol=1e-5, atol=1e-5)
    s = weights.head_svd(w.OV)
    torch.testing.assert_close(s.U @ torch.diag_embed(s.S) @ s.Vh, dense, rtol=1e-4, atol=1e-4)
    assert (s.S[..., :-1] >= s.S[..., 1:]).all()


def test_component_scores_decompose_the_composition_score():
    """||U S Vh M||^2 = sum_k s_k^2 ||v_k^T M||^2: the head's score is the s^2-weighted mean of its components'."""
    w = _random_weights(seed=3)
    for kind in "QKV":
        comp = composition.component_scores(w, (0, 1), (2, 3), kind)
        S = weights.head_svd(w.OV[0, 1]).S
        recombined = ((S**2 * comp**2).sum() / (S**2).sum()).sqrt()
        torch.testing.assert_close(recombined, composition.composition_scores(w, kind)[0, 1, 2, 3], rtol=1e-4, atol=1e-6)
        assert float((comp**2).sum()) <= 1 + 1e-5  # shares of the receiver's reading, summed over the sender's space
    with pytest.raises(ValueError, match="below"):
        composition.component_scores(w, (2, 0), (1, 0))


def test_weights_from_a_model_reproduce_its_queries_and_keys(tiny):
    """Extraction (and GQA expansion): the unprocessed weights map the norm's output to the hooked q and k."""
    w = weights.from_model(tiny, fold_norm=False, center=False)
    assert w.W_K.shape[1] == tiny.facts.n_heads  # expanded to one K head per query head
    tokens = tiny.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    _, cache = tiny.bridge.run_with_cache(tokens.ids)
    group = tiny.facts.kv_group_size
    for layer in range(tiny.facts.n_layers):
        x = cache[f"blocks.{layer}.ln1.hook_out"][0]
        q, k = cache[f"blocks.{layer}.attn.hook_q"][0], cache[f"blocks.{layer}.attn.hook_k"][0]
        for h in range(tiny.facts.n_heads):
            torch.testing.assert_close(x @ w.W_Q[layer, h], q[:, h], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(x @ w.W_K[layer, h], k[:, h // group], rtol=1e-4, atol=1e-4)


def test_processing_folds_the_norm_scale_and_centres_layernorm_models():
    w = _random_weights()
    scale = torch.rand(3, 32) + 0.5
    W_Q, _, _, W_O = weights.process(w.W_Q, w.W_K, w.W_V, w.W_O, scale, center=True)
    x = torch.randn(5, 32)
    x = x - x.mean(-1, keepdim=True)  # what LayerNorm feeds a head: mean zero
    torch.testing.assert_close((x * scale[1]) @ w.W_Q[1, 2], x @ W_Q[1, 2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(W_O.mean(-1), torch.zeros_like(W_O.mean(-1)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("d_model,d_head", [(64, 8), (256, 16), (256, 64)])
def test_random_heads_compose_at_one_over_root_d_model(d_model, d_head):
    """Two independent rotation-invariant random maps: E ||M1 M2||^2 = ||M1||^2 ||M2||^2 / d_model, so random pairs
    score about 1/sqrt(d_model) whatever d_head (GPT-2 small: 0.036, the chance level the chapters draw)."""
    a = composition.random_baseline(d_model, d_head, n_samples=300, seed=1)
    assert torch.equal(a, composition.random_baseline(d_model, d_head, n_samples=300, seed=1))
    assert abs(float(a.mean()) * d_model**0.5 - 1.0) < 0.05


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_random_baseline_matches_dense_products_of_the_same_draws(kind):
    d_model, d_head, n = 24, 4, 5
    fast = composition.random_baseline(d_model, d_head, kind, n_samples=n, seed=7, chunk=2)
    gen = torch.Generator().manual_seed(7)
    dense = []
    for size in (2, 2, 1):  # the same draws, chunk by chunk
        g = lambda *shape: torch.randn(size, *shape, generator=gen)  # noqa: E731
        sender = g(d_model, d_head) @ g(d_head, d_model)
        receiver = g(d_model, d_head) @ g(d_head, d_model)
        receiver = receiver.transpose(-1, -2) if kind == "K" else receiver
        fro = lambda m: torch.linalg.matrix_norm(m)  # noqa: E731
        dense.append(fro(sender @ receiver) / (fro(sender) * fro(receiver)))
    torch.testing.assert_close(fast, torch.cat(dense), rtol=1e-4, atol=1e-6)


# --- GPT-2 small's real weights (the paper's model) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2():
    if not GPT2_WEIGHTS.is_dir():
        pytest.skip(f"../shared is absent ({GPT2_WEIGHTS} not found): GPT-2 small's real weights are needed")
    return weights.load_gpt2_small_attention(GPT2_WEIGHTS)


def test_gpt2_previous_token_head_feeds_the_induction_heads_keys(gpt2):
    """Known relation (Olsson et al. 2022; Wang et al. 2022 name 4.11 a previous-token head and 5.5, 6.9 induction
    heads): induction heads find their target through K-composition with a previous-token head. Checked without
    tuning: 4.11 is the single strongest K-composition sender into both induction heads."""
    scores = composition.composition_scores(gpt2, "K")
    for receiver in [(5, 5), (6, 9)]:
        col = scores[:, :, receiver[0], receiver[1]].nan_to_num(-1.0)
        best = int(col.flatten().argmax())
        assert divmod(best, 12) == (4, 11), f"strongest K-composition sender into {receiver} is {divmod(best, 12)}"


def test_gpt2_s_inhibition_heads_compose_with_name_movers_queries(gpt2):
    """Known relation (Wang et al. 2022; Talking Heads): S-inhibition heads 7.3, 7.9, 8.6, 8.10 act on the name
    movers 9.6, 9.9, 10.0 through their queries. Their Q-composition exceeds the random 99th percentile, and on
    average exceeds that of all other heads in layers 0-8."""
    scores = composition.composition_scores(gpt2, "Q")
    chance = float(composition.random_baseline(768, 64, "Q", n_samples=500).quantile(0.99))
    inhibition = [(7, 3), (7, 9), (8, 6), (8, 10)]
    for mover in [(9, 6), (9, 9), (10, 0)]:
        col = scores[:9, :, mover[0], mover[1]]
        mask = torch.zeros(9, 12, dtype=torch.bool)
        for layer, head in inhibition:
            mask[layer, head] = True
        assert (col[mask] > chance).all()
        assert col[mask].mean() > col[~mask].mean()


def test_gpt2_weights_are_found_where_given_and_reported_absent_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("HEADCIRCUITS_GPT2_ATTENTION", raising=False)
    assert weights.find_gpt2_small_attention(tmp_path / "nowhere") is None
    (tmp_path / "gpt2_small_attention.npz").write_bytes(b"")
    assert weights.find_gpt2_small_attention(tmp_path) == tmp_path
    monkeypatch.setenv("HEADCIRCUITS_GPT2_ATTENTION", str(tmp_path))
    assert weights.find_gpt2_small_attention() == tmp_path


def test_component_signs_follow_one_convention_and_keep_the_product():
    """An SVD fixes each (u_k, v_k) only up to a joint sign; ours makes the largest entry of every v_k positive,
    so a flipped decomposition comes back identical and U diag(S) Vh is unchanged."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(2, 3, 12, 5, generator=gen) @ torch.randn(2, 3, 5, 12, generator=gen)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U, Vh = U[..., :5], Vh[..., :5, :]
    S = S[..., :5]
    fixed_U, fixed_Vh = weights.fix_signs(U, Vh)
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])
    again_U, again_Vh = weights.fix_signs(U * flip, Vh * flip[:, None])
    torch.testing.assert_close(again_Vh, fixed_Vh)
    torch.testing.assert_close(again_U, fixed_U)
    torch.testing.assert_close(fixed_U @ torch.diag_embed(S) @ fixed_Vh, M, rtol=1e-4, atol=1e-4)
    index = fixed_Vh.abs().argmax(-1, keepdim=True)
    assert (fixed_Vh.gather(-1, index) > 0).all()


def test_the_papers_weight_edit_removes_exactly_the_zeroed_components():
    """Talking Heads §3: O = U sqrt(S'), V = sqrt(S') V^T with singular values set to 0. The product is the OV
    circuit minus those rank-1 components, i.e. OV projected off their written directions; nothing zeroed, nothing
    changes."""
    w = _random_weights(L=2, H=2, d=32, dh=8, seed=3)
    W_V, W_O = w.W_V[1, 0], w.W_O[1, 0]
    OV = W_V @ W_O
    U, S, Vh = torch.linalg.svd(OV)
    for zero in ([], [0], [2, 5]):
        new_V, new_O = weights.edit_ov(W_V, W_O, zero)
        assert new_V.shape == W_V.shape and new_O.shape == W_O.shape
        expected = OV - sum((S[k] * torch.outer(U[:, k], Vh[k]) for k in zero), torch.zeros_like(OV))
        assert torch.allclose(new_V @ new_O, expected, atol=1e-4)
        P = sum((torch.outer(Vh[k], Vh[k]) for k in zero), torch.zeros(32, 32))
        assert torch.allclose(new_V @ new_O, OV @ (torch.eye(32) - P), atol=1e-4)
    assert (torch.linalg.svdvals(weights.edit_ov(W_V, W_O, [0])[0] @ weights.edit_ov(W_V, W_O, [0])[1])[:7]
            - S[1:8]).abs().max() < 1e-4  # the remaining spectrum is the old one without s_0
    with pytest.raises(ValueError, match="between 0 and 7"):
        weights.edit_ov(W_V, W_O, [8])


def test_value_offsets_are_the_constant_part_of_the_values(tiny):
    """The constant part of z is b_V + b_ln W_V: what each head's value vectors are when its block's input is zero
    (LayerNorm maps a zero vector to its bias exactly), read off the running model (bias-free RMSNorm models:
    zero). The norm's bias is randomised on a model of our own (the session's ``tiny`` is read-only)."""
    from headcircuits.models import architecture, load_model

    if tiny.facts.norm != "layernorm":
        assert torch.count_nonzero(weights.value_offsets(tiny)) == 0
        return
    model = load_model(tiny.name, seed=5)
    bias = architecture.input_norm_biases(model)[1]
    with torch.no_grad():
        bias.copy_(torch.randn_like(bias))
    seen = {}

    def zero(x, hook):
        return torch.zeros_like(x)

    def record(v, hook):
        seen["v"] = v.detach().clone()
        return v

    data_ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        model.bridge.run_with_hooks(data_ids, fwd_hooks=[(architecture.hook("resid_pre", 1), zero),
                                                          (architecture.hook("v", 1), record)])
    values = seen["v"][0].float().repeat_interleave(model.facts.kv_group_size, dim=1)  # [pos, head, d_head]
    offsets = weights.value_offsets(model)
    assert offsets.shape == (model.facts.n_layers, model.facts.n_heads, model.facts.d_head)
    for position in range(values.shape[0]):
        torch.testing.assert_close(offsets[1], values[position], rtol=1e-5, atol=1e-5)
    assert offsets[1].abs().max() > 0.1  # the randomised bias reaches the values


def test_gpt2_the_papers_channel_components_are_where_the_paper_says(gpt2):
    """Talking Heads §3 on GPT-2 small's real weights: the component of each inhibition head that composes most
    with name mover 9.9's queries is 7.9.6, 8.6.2 and 8.10.1 (printed "8.6.10" in the paper); 8.6.2 stands far
    above 8.6's other 63 components (the paper: about 5 standard deviations; here 6.8); the duplicate-token head
    3.0 writes through 3.0.1 and 3.0.2 into 7.9.6's values; and the previous-token -> induction key composition
    (4.11 -> 5.5) has no outlier component."""
    top = {s: int(composition.component_scores(gpt2, s, (9, 9), "Q").argmax()) for s in [(7, 9), (8, 6), (8, 10)]}
    assert top == {(7, 9): 6, (8, 6): 2, (8, 10): 1}
    assert composition.standout(composition.component_scores(gpt2, (8, 6), (9, 9), "Q"), 2) > 5
    into = composition.component_to_component(gpt2, (3, 0), (7, 9), 6, "V")
    assert set(into.topk(2).indices.tolist()) == {1, 2}
    assert composition.standout(into, 1) > 4 and composition.standout(into, 2) > 4
    keys = composition.component_scores(gpt2, (4, 11), (5, 5), "K")
    assert max(composition.standout(keys, k) for k in range(len(keys))) < 2.5


def test_component_to_component_is_the_composition_score_of_two_rank_one_matrices():
    w = _random_weights(L=3, H=2, d=24, dh=6, seed=5)
    sender, receiver, c = (0, 1), (2, 0), 3
    S_s, R = weights.head_svd(w.OV[0, 1]), weights.head_svd(w.OV[2, 0])
    scores = composition.component_to_component(w, sender, receiver, c, "V")
    for k in range(6):
        W1 = S_s.S[k] * torch.outer(S_s.U[:, k], S_s.Vh[k])
        W2 = R.S[c] * torch.outer(R.U[:, c], R.Vh[c])
        dense = torch.linalg.matrix_norm(W1 @ W2) / (torch.linalg.matrix_norm(W1) * torch.linalg.matrix_norm(W2))
        assert abs(float(dense) - float(scores[k])) < 1e-5
    assert abs(composition.standout(torch.tensor([0.0, 1.0, 0.0, 2.0, 10.0]), 4) - (10 - 0.75) / torch.tensor([0.0, 1, 0, 2]).std()) < 1e-5
