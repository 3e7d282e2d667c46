"""Weights-only analysis of attention heads (Talking Heads; Elhage et al. 2021).

Every head is two low-rank bilinear maps of the residual stream:

* **OV** = W_V W_O  (d_model x d_model, rank <= d_head): what the head *writes* given what it attends to;
* **QK** = W_Q W_K^T (d_model x d_model, rank <= d_head): which (query, key) residual vectors attract attention.

They are kept as TransformerLens ``FactoredMatrix`` objects (two thin factors), never as dense d_model x d_model
matrices per head; their SVD (:func:`head_svd`) gives each head's components, and
:mod:`headcircuits.composition` scores how they compose.

Processing follows TransformerLens' defaults, so numbers are comparable with its GPT-2 results: the norm's scale
is folded into the reading weights (W_Q, W_K, W_V); with LayerNorm (GPT-2, Pythia) reading weights are centred
over d_model (LayerNorm removes the mean) and W_O is centred over its output (the next LayerNorm removes it).
RMSNorm models (SmolLM2, Gemma) get the scale folded only. What stays approximate, and where:

* rotary models: W_Q W_K^T ignores the position-dependent rotation of q and k;
* Gemma-3: q/k norms rescale q and k per head, and a post-attention norm rescales the attention output before it
  reaches the residual stream, so both QK and OV are approximations of what the head computes;
* the offline models are 4-bit quantised. On GPT-2's own weights (``load_gpt2_small_attention``) all of this is exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.FactoredMatrix import FactoredMatrix

from headcircuits.models import architecture
from headcircuits.models.core import Model

Kind = Literal["Q", "K", "V"]


@dataclass
class HeadWeights:
    """Per-head attention weights of a whole model, K/V heads already expanded to one per query head.

    Shapes: ``W_Q``, ``W_K``, ``W_V``: [layer, head, d_model, d_head]; ``W_O``: [layer, head, d_head, d_model].
    A head reads ``x @ W_Q[l, h]`` (row-vector convention, as TransformerLens).
    """

    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer head d_model d_head"]
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    description: str = ""

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def OV(self) -> FactoredMatrix:
        """[layer, head] of d_model x d_model OV circuits, factored as W_V @ W_O."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """[layer, head] of d_model x d_model QK circuits, factored as W_Q @ W_K^T."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-1, -2))


def process(
    W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, ln_scale: Tensor | None, *, center: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TransformerLens' default processing: fold the norm scale ``ln_scale`` [layer, d_model] into the reading
    weights; if ``center`` (LayerNorm models), centre reading weights over d_model and W_O over its output.

    Args:
        W_Q: ``[layer, head, d_model, d_head]``.
        W_K: the same shape.
        W_V: the same shape.
        W_O: ``[layer, head, d_head, d_model]``.
        ln_scale: ``[layer, d_model]``, or ``None``.
        center: centre as LayerNorm does.

    Returns:
        The processed ``(W_Q, W_K, W_V, W_O)``.
    """
    if ln_scale is not None:
        scale = ln_scale[:, None, :, None]
        W_Q, W_K, W_V = W_Q * scale, W_K * scale, W_V * scale
    if center:
        W_Q, W_K, W_V = (w - w.mean(dim=-2, keepdim=True) for w in (W_Q, W_K, W_V))
        W_O = W_O - W_O.mean(dim=-1, keepdim=True)
    return W_Q, W_K, W_V, W_O


def from_model(model: Model, *, fold_norm: bool = True, center: bool | None = None) -> HeadWeights:
    """The head weights of a zoo model, processed as TransformerLens would (see the module docstring).

    ``center`` defaults to True for LayerNorm models and False for RMSNorm models (whose norm keeps the mean).

    Args:
        model: a zoo model.
        fold_norm: fold the pre-attention norm's scale into the reading weights.
        center: centre as LayerNorm does (default: LayerNorm models only).

    Returns:
        The :class:`HeadWeights`, on the CPU.
    """
    b = model.bridge
    group = model.facts.kv_group_size
    with torch.no_grad():  # weights-only analysis runs on the CPU: the same numbers whatever device the model is on
        W_Q, W_O = b.W_Q.detach().float().cpu(), b.W_O.detach().float().cpu()
        W_K, W_V = b.W_K.detach().float().cpu(), b.W_V.detach().float().cpu()
    if W_K.shape[1] != W_Q.shape[1]:  # grouped K/V heads: query head h reads K/V head h // group
        W_K, W_V = W_K.repeat_interleave(group, dim=1), W_V.repeat_interleave(group, dim=1)
    if center is None:
        center = model.facts.norm == "layernorm"
    scale = architecture.input_norm_scales(model) if fold_norm else None
    parts = process(W_Q, W_K, W_V, W_O, scale, center=center)
    notes = f"{model.name}; norm scale {'folded' if fold_norm else 'not folded'}; {'centred' if center else 'not centred'}"
    return HeadWeights(*parts, description=notes)


def value_offsets(model: Model) -> Float[Tensor, "layer head d_head"]:
    """The constant part of every head's value vectors: ``b_V + b_ln W_V`` (the value bias and the pre-attention
    LayerNorm's bias read through W_V). Attention weights sum to one, so this part reaches the head's output
    whatever it attends to; TransformerLens' processed models (the Talking Heads paper's) fold it into ``b_O``,
    which is why an edit of a head's OV circuit leaves it alone. Zero on the bias-free RMSNorm models.

    Args:
        model: the model.

    Returns:
        ``[layer, head, d_head]`` on the CPU.
    """
    facts = model.facts
    out = torch.zeros(facts.n_layers, facts.n_heads, facts.d_head)
    if facts.norm != "layernorm":
        return out
    with torch.no_grad():
        W_V = model.bridge.W_V.detach().float().cpu()
        biases = architecture.value_biases(model)
        if biases is None:
            warnings.warn(f"{model.name}: a LayerNorm model without value biases (b_V): its heads' constant part is "
                          "taken as the norm's bias through W_V alone. If the checkpoint has value biases, load it "
                          "so that the bridge exposes b_V (e.g. from its Hugging Face folder with load_model)",
                          stacklevel=2)
        else:
            out += biases.float().cpu().repeat_interleave(facts.kv_group_size, dim=1)
        for layer, bias in enumerate(architecture.input_norm_biases(model)):
            if bias is not None:
                out[layer] += torch.einsum("d,hde->he", bias.detach().float().cpu(),
                                           W_V[layer].repeat_interleave(facts.kv_group_size, dim=0))
    return out


def find_gpt2_small_attention(path: str | Path | None = None) -> Path | None:
    """Where GPT-2 small's attention weights are, if anywhere: ``path`` if given, else ``$HEADCIRCUITS_GPT2_ATTENTION``,
    else a developer checkout's ``../shared/gpt2-small-attention``. ``None`` when none of them exists (readers of
    the book usually do not have the file; with internet, ``from_model(load_model("gpt2-small"))`` gives the same
    weights).

    Args:
        path: a folder to look in first.

    Returns:
        The folder, or ``None``.
    """
    import os

    candidates = [path] if path else [os.environ.get("HEADCIRCUITS_GPT2_ATTENTION"),
                                       Path(__file__).resolve().parents[3] / "shared" / "gpt2-small-attention"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "gpt2_small_attention.npz").is_file():
            return Path(candidate)
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def load_gpt2_small_attention(path: str | Path, *, fold_norm: bool = True, center: bool = True) -> HeadWeights:
    """GPT-2 small's real attention weights from the ``gpt2_small_attention.npz`` layout (TransformerLens state
    dict before processing), processed like TransformerLens' default ``HookedTransformer``.

    Args:
        path: the folder of ``gpt2_small_attention.npz``.
        fold_norm: fold the LayerNorm scale in.
        center: centre as LayerNorm does.

    Returns:
        The :class:`HeadWeights`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "gpt2_small_attention.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: GPT-2 small's attention weights are needed for this analysis")
    with np.load(path) as npz:
        t = {k: torch.from_numpy(npz[k]).float() for k in ("W_Q", "W_K", "W_V", "W_O", "ln1_w")}
    parts = process(t["W_Q"], t["W_K"], t["W_V"], t["W_O"], t["ln1_w"] if fold_norm else None, center=center)
    return HeadWeights(*parts, description=f"GPT-2 small (real weights); LN {'folded' if fold_norm else 'raw'}")


# --- per-head SVD ---------------------------------------------------------------------------------------------------

@dataclass
class HeadSVD:
    """SVD of every head's OV (or QK) circuit: ``M[l, h] = U diag(S) Vh``.

    For OV, the columns of ``U`` are the residual directions the head *reads* (through W_V) and the rows of
    ``Vh`` are the directions it *writes*; ``S`` says how strongly each read direction is mapped to its write
    direction. Shapes: U [layer, head, d_model, d_head], S [layer, head, d_head], Vh [layer, head, d_head, d_model].
    """

    U: Tensor
    S: Tensor
    Vh: Tensor


def fix_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """An SVD determines each pair (u_k, v_k) only up to a joint sign, and LAPACK builds may pick either. Our
    convention: the entry of largest magnitude of every row of ``Vh`` is positive (``U``'s columns flip with
    them, so U diag(S) Vh is unchanged). Coordinates, correlations and plots along components are then the same
    on every machine.

    Args:
        U: ``[..., d, k]``.
        Vh: ``[..., k, d]``.

    Returns:
        ``(U, Vh)`` with the signs fixed.
    """
    index = Vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(Vh.gather(-1, index))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)  # [..., k, 1]
    return U * sign.transpose(-1, -2), Vh * sign


def head_svd(circuit: FactoredMatrix) -> HeadSVD:
    """SVD of a factored [layer, head] circuit (via its small core; never dense), signs fixed by
    :func:`fix_signs`.

    Args:
        circuit: a head's OV (or QK) as a ``FactoredMatrix``, with any leading dimensions.

    Returns:
        Its :class:`HeadSVD` (U, S, Vh), the signs fixed (:func:`fix_signs`).
    """
    U, S, V = circuit.svd()
    U, Vh = fix_signs(U, V.transpose(-1, -2))
    return HeadSVD(U=U, S=S, Vh=Vh)


def edit_ov(W_V: Float[Tensor, "d_model d_head"], W_O: Float[Tensor, "d_head d_model"], zero) -> tuple[Tensor, Tensor]:
    """Talking Heads' weight edit of one head (§3): set the singular values ``zero`` (component indices, by
    decreasing singular value) of its OV = W_V W_O = U S Vh to 0, then rewrite the head from the edited SVD,
    ``W_V' = U sqrt(S')`` and ``W_O' = sqrt(S') Vh`` (the paper's O = U sqrt(S'), V = sqrt(S') V^T in the column
    convention). ``W_V' W_O' = OV - sum_k s_k u_k v_k^T``: the head no longer writes along the removed components'
    directions, and everything else it writes is unchanged (``zero`` empty: the same OV).

    Args:
        W_V: ``[d_model, d_head]``.
        W_O: ``[d_head, d_model]``.
        zero: the components to remove.

    Returns:
        The edited ``(W_V, W_O)``.
    """
    svd = head_svd(FactoredMatrix(W_V, W_O))
    S = svd.S.clone()
    index = torch.as_tensor(list(zero), dtype=torch.long)
    if len(index) and (index.min() < 0 or index.max() >= len(S)):
        raise ValueError(f"components must be between 0 and {len(S) - 1}, not {sorted(index.tolist())}")
    S[index] = 0.0
    root = S.sqrt()
    return svd.U * root, root[:, None] * svd.Vh
