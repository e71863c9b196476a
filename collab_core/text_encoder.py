"""The reference's text encoder (an x-transformers ``TransformerWrapper`` + ``Encoder``), official keys.

Token embedding + learned absolute positions, ``depth`` pre-norm blocks of
[LayerNorm → self-attention → +x, LayerNorm → MLP (GELU) → +x], a final LayerNorm, no padding mask.
The module tree mirrors the official one so that ``state_dict()`` names equal the checkpoint's names after
the ``cond_stage_model.transformer.`` prefix and official weights load without a key map. The checkpoint's
``to_logits`` head is never used for conditioning and is dropped on load.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConditioningError

UNUSED_PREFIXES = ("to_logits.",)
_LAYER_KEY = re.compile(r"^attn_layers\.layers\.(\d+)\.")
_KNOWN_OUTER_PREFIXES = (
    "cond_stage_model.text_cond_stage_model.transformer.",
    "cond_stage_model.transformer.",
    "text_cond_stage_model.transformer.",
    "transformer.",
)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            proj(x).view(b, n, self.heads, self.dim_head).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v)
        )
        # Scaling q up front (exact for dim_head 64: ×0.125) equals the reference's (q·k)·scale; SDPA's own
        # scale splits it as √scale on q and k, which rounds differently on the math backend.
        out = F.scaled_dot_product_attention(q * self.dim_head**-0.5, k, v, scale=1.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # Index 1 held a Dropout(0) in the reference; an Identity keeps the official key numbering (net.0.0, net.2).
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AbsolutePositions(nn.Module):
    def __init__(self, dim: int, max_length: int):
        super().__init__()
        self.emb = nn.Embedding(max_length, dim)

    def forward(self, n: int) -> torch.Tensor:
        return self.emb.weight[:n].unsqueeze(0)


class AttentionLayers(nn.Module):
    """``layers[2i]`` = [norm, attention], ``layers[2i+1]`` = [norm, feed-forward], as in the checkpoints."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_hidden: int):
        super().__init__()
        blocks = []
        for _ in range(depth):
            blocks.append(nn.ModuleList([nn.LayerNorm(dim), SelfAttention(dim, heads, dim_head)]))
            blocks.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim, ff_hidden)]))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class TextEncoder(nn.Module):
    """Token ids [B, n ≤ max_length] → embeddings [B, n, dim] (the reference always feeds n = 77)."""

    def __init__(
        self,
        vocab_size: int = 30522,
        max_length: int = 77,
        dim: int = 640,
        depth: int = 32,
        heads: int = 8,
        dim_head: int = 64,
        ff_hidden: int | None = None,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.ff_hidden = ff_hidden if ff_hidden is not None else 4 * dim
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = AbsolutePositions(dim, max_length)
        self.attn_layers = AttentionLayers(dim, depth, heads, dim_head, self.ff_hidden)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ConditioningError(f"token ids must be [batch, length]; got shape {tuple(tokens.shape)}")
        n = tokens.shape[1]
        if n > self.max_length:
            raise ConditioningError(f"{n} tokens given but the text encoder has only {self.max_length} positions")
        x = self.token_emb(tokens) + self.pos_emb(n)
        return self.norm(self.attn_layers(x))

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str], tokenizer=None) -> torch.Tensor:
        """Text(s) → conditioning [B, max_length, dim], tokenised like the reference (lower-cased, padded)."""
        if tokenizer is None:
            from .tokenizer import default_tokenizer

            tokenizer = default_tokenizer(self.max_length)
        tokens = tokenizer(texts).to(self.token_emb.weight.device)
        return self(tokens)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], heads: int = 8) -> "TextEncoder":
        """Build from an official state dict (``cond_stage_model.transformer.`` prefix removed).

        Sizes come from shapes; the head count is not visible in the weights (the official models use 8).
        """
        sd = {k: v for k, v in sd.items() if not k.startswith(UNUSED_PREFIXES)}
        config = infer_text_encoder_config(sd, heads=heads)
        with torch.device("meta"):
            model = cls(**config)
        expected = set(model.state_dict())
        missing = sorted(expected - set(sd))
        unexpected = sorted(set(sd) - expected)
        if missing or unexpected:
            raise CheckpointError(_key_problem("text encoder", missing, unexpected))
        try:
            # assign=True adopts the given tensors instead of copying into freshly initialised ones.
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as err:
            raise CheckpointError(f"text encoder weights do not fit together: {err}") from None
        return model.eval()


def infer_text_encoder_config(sd: Mapping[str, torch.Tensor], heads: int = 8) -> dict:
    """Constructor arguments of :class:`TextEncoder` read from weight shapes."""
    for key in ("token_emb.weight", "pos_emb.emb.weight", "attn_layers.layers.0.1.to_q.weight", "attn_layers.layers.1.1.net.0.0.weight"):
        if key not in sd:
            hint = ""
            prefixed = [p for p in _KNOWN_OUTER_PREFIXES if p + key in sd]
            if prefixed:
                hint = f" (the keys still carry the prefix {prefixed[0]!r}; remove it first)"
            raise CheckpointError(f"not a text-encoder state dict: key {key!r} is missing{hint}")
    vocab_size, dim = sd["token_emb.weight"].shape
    max_length = sd["pos_emb.emb.weight"].shape[0]
    inner = sd["attn_layers.layers.0.1.to_q.weight"].shape[0]
    ff_hidden = sd["attn_layers.layers.1.1.net.0.0.weight"].shape[0]
    indices = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))}
    n_sub = max(indices) + 1
    if n_sub % 2 or indices != set(range(n_sub)):
        raise CheckpointError(
            f"text encoder sub-layers must come in [attention, feed-forward] pairs numbered 0..2·depth-1; "
            f"found indices {sorted(indices)[:8]}{'...' if len(indices) > 8 else ''} (highest {n_sub - 1})"
        )
    if heads <= 0 or inner % heads:
        raise CheckpointError(
            f"attention width {inner} is not divisible by heads={heads}; the official text encoders use heads=8"
        )
    return dict(
        vocab_size=int(vocab_size),
        max_length=int(max_length),
        dim=int(dim),
        depth=n_sub // 2,
        heads=int(heads),
        dim_head=int(inner) // heads,
        ff_hidden=int(ff_hidden),
    )


def _key_problem(what: str, missing: list[str], unexpected: list[str]) -> str:
    parts = [f"{what} state dict does not match the expected layout:"]
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    return " ".join(parts)
