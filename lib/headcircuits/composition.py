"""Composition scores (Talking Heads §3; Elhage et al. 2021): how much of what a sender head writes lands in the
subspace a later receiver reads with its queries (Q-composition), keys (K-) or values (V-), from the weights
alone (:mod:`headcircuits.weights`):

    score(A, B) = ||A B||_F / (||A||_F ||B||_F),   Q: A = OV_sender, B = QK_receiver
                                                   K: A = OV_sender, B = QK_receiver^T
                                                   V: A = OV_sender, B = OV_receiver

and the same per SVD component of a sender (which component of an inhibition head a mover reads), against the
score of random matrices of the same shapes.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from headcircuits.weights import HeadWeights, Kind, head_svd

def _gram_root(x: Tensor) -> Tensor:
    """R with R^T R = x^T x (x: [..., n, k]); ||x M||_F == ||R M||_F for any M, with R only k x k."""
    return torch.linalg.qr(x, mode="r").R


def frobenius(A: Tensor, B: Tensor) -> Tensor:
    """||A B||_F of a factored matrix (A: [..., n, k], B: [..., k, m]) via a k x k root, never forming A B
    (TransformerLens' FactoredMatrix.norm goes through an SVD, about 25x slower here).

    Args:
        A: ``[..., n, k]``.
        B: ``[..., k, m]``.

    Returns:
        ``[...]`` norms.
    """
    return torch.linalg.matrix_norm(_gram_root(A) @ B)


def composition_scores(w: HeadWeights, kind: Kind) -> Float[Tensor, "layer_s head_s layer_r head_r"]:
    """Elhage et al.'s composition score for every (sender, receiver) pair with sender layer < receiver layer
    (NaN elsewhere), vectorised over pairs without forming any d_model x d_model matrix.

    For a sender with OV = A_s B_s (A = W_V, B = W_O) and a receiver reading through C_r D_r^T
    (Q: W_Q W_K^T, K: W_K W_Q^T, V: W_V W_O), ||OV_s C_r D_r^T||_F = ||R(A_s) (B_s C_r) R(D_r)^T||_F, where R(.)
    is the d_head x d_head triangular factor of a QR decomposition. Folding the roots into the factors leaves one
    matrix product per receiver layer (all senders below it x all its heads) and a blockwise Frobenius norm.

    Args:
        weights: the heads' :class:`HeadWeights`.
        kind: ``Q``, ``K`` or ``V`` composition.

    Returns:
        ``[layer, head, layer, head]``: sender by receiver (NaN unless the sender is below).
    """
    L, H, _, dh = w.W_Q.shape
    if kind == "Q":
        C, D = w.W_Q, w.W_K
    elif kind == "K":
        C, D = w.W_K, w.W_Q
    elif kind == "V":
        C, D = w.W_V, w.W_O.transpose(-1, -2)
    else:
        raise ValueError(f"kind must be 'Q', 'K' or 'V', not {kind!r}")
    # fold the d_head x d_head roots into the thin factors once: R(A_s) B_s and C_r R(D_r)^T
    left = _gram_root(w.W_V) @ w.W_O  # [L, H, dh, d_model]
    right = C @ _gram_root(D).transpose(-1, -2)  # [L, H, d_model, dh]
    sender_norm = frobenius(w.W_V, w.W_O)  # [L, H]
    receiver_norm = frobenius(C, D.transpose(-1, -2))
    out = torch.full((L, H, L, H), float("nan"))
    for lr in range(1, L):
        # one matrix product for every sender below layer lr and every receiver head of layer lr
        senders = left[:lr].reshape(lr * H * dh, -1)
        receivers = right[lr].permute(1, 0, 2).reshape(-1, H * dh)
        core = (senders @ receivers).reshape(lr, H, dh, H, dh)
        norms = core.square().sum(dim=(2, 4)).sqrt()  # Frobenius norm of each [dh, dh] block: [Ls, Hs, Hr]
        out[:lr, :, lr, :] = norms / (sender_norm[:lr, :, None] * receiver_norm[lr][None, None, :])
    return out


def random_baseline(
    d_model: int, d_head: int, kind: Kind = "Q", n_samples: int = 1000, seed: int = 0, chunk: int = 100
) -> Float[Tensor, " sample"]:
    """Composition scores between independent random Gaussian heads of the same shapes: what "no relation"
    looks like. A real pair reads as "above chance" when it exceeds, e.g., the 99th percentile of this sample.

    Args:
        d_model: the residual width.
        d_head: the head width.
        kind: ``Q``, ``K`` or ``V``.
        n_samples: pairs.
        seed: the draw.
        chunk: pairs per batch.

    Returns:
        ``[n_samples]`` scores.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_samples, chunk):
        n = min(chunk, n_samples - start)
        g = lambda *shape: torch.randn(n, *shape, generator=gen)  # noqa: E731
        A1, B1, A2, B2 = g(d_model, d_head), g(d_head, d_model), g(d_model, d_head), g(d_head, d_model)
        if kind == "K":  # the receiver's QK transposed
            A2, B2 = B2.transpose(-1, -2), A2.transpose(-1, -2)
        # ||A1 B1 A2 B2||_F through d_head x d_head roots, as in composition_scores (no SVD of d_model matrices)
        core = _gram_root(A1) @ (B1 @ A2) @ _gram_root(B2.transpose(-1, -2)).transpose(-1, -2)
        out.append(torch.linalg.matrix_norm(core) / (frobenius(A1, B1) * frobenius(A2, B2)))
    return torch.cat(out)


def component_scores(
    w: HeadWeights, sender: tuple[int, int], receiver: tuple[int, int], kind: Kind = "Q", top: int | None = None
) -> Float[Tensor, " component"]:
    """Talking Heads' component-wise score: split the sender's OV into rank-1 SVD components
    ``s_k u_k v_k^T`` and score how much each *written* direction ``v_k`` is read by the receiver:

        score_k = ||v_k^T M_r||_F / ||M_r||_F,   M_r = W_Q W_K^T (Q), W_K W_Q^T (K) or W_V W_O (V)

    (the composition score of the k-th component alone; it does not depend on ``s_k``). Components are in
    order of decreasing singular value; ``top`` keeps the first ones.

    Args:
        weights: the heads' :class:`HeadWeights`.
        sender: the sender ``(layer, head)``.
        receiver: the receiver, above it.
        kind: ``Q``, ``K`` or ``V``.

    Returns:
        ``[d_head]``: each rank-1 component of the sender's OV, scored against the receiver's circuit.
    """
    (ls, hs), (lr, hr) = sender, receiver
    if ls >= lr:
        raise ValueError(f"the sender's layer ({ls}) must be below the receiver's ({lr})")
    svd = head_svd(w.OV[ls, hs])
    written = svd.Vh  # [dh, d_model], unit rows
    M = {"Q": w.QK[lr, hr], "K": w.QK[lr, hr].T, "V": w.OV[lr, hr]}[kind]
    rows = (written @ M.A) @ M.B  # [component, d_model]: how the receiver reads each written direction
    scores = torch.linalg.vector_norm(rows, dim=-1) / frobenius(M.A, M.B)
    return scores if top is None else scores[:top]



def component_to_component(
    w: HeadWeights, sender: tuple[int, int], receiver: tuple[int, int], receiver_component: int, kind: Kind = "V",
) -> Float[Tensor, " component"]:
    """The composition score of each rank-1 OV component of ``sender`` with one rank-1 component of ``receiver``
    (Talking Heads: "3.0.1 and 3.0.2 value-compose with 7.9.6"). For rank-1 matrices ``s u v^T`` the score
    ||W1 W2||_F / (||W1||_F ||W2||_F) is ``|v_1 . u_2|``: how well the sender's written direction lines up with
    the direction the receiver's component reads (``kind``: through its values (V), queries (Q) or keys (K)).

    Args:
        w: the heads' :class:`HeadWeights`.
        sender: the sender.
        receiver: the receiver.
        receiver_component: one component of the receiver's circuit.
        kind: ``Q``, ``K`` or ``V``.

    Returns:
        ``[d_head]``: each component of the sender against that one component.
    """
    (ls, _), (lr, hr) = sender, receiver
    if ls >= lr:
        raise ValueError(f"the sender's layer ({ls}) must be below the receiver's ({lr})")
    M = {"Q": w.QK[lr, hr], "K": w.QK[lr, hr].T, "V": w.OV[lr, hr]}[kind]
    read = head_svd(M).U[:, receiver_component]
    written = head_svd(w.OV[sender[0], sender[1]]).Vh
    return (written @ read).abs() / read.norm()


def standout(scores: Float[Tensor, " component"], index: int) -> float:
    """How far ``scores[index]`` stands above the other components: (score - their mean) / their standard
    deviation (Talking Heads: 8.6.2 is "about 5 standard deviations" above 8.6's other 63 components).

    Args:
        scores: a vector of scores.
        index: the component judged.

    Returns:
        How many standard deviations of the other scores ``scores[index]`` lies above their mean.
    """
    others = torch.cat([scores[:index], scores[index + 1:]])
    return float((scores[index] - others.mean()) / others.std())
