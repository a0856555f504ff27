"""A small GPT-style causal decoder over bytes (vocabulary 256), for language modelling.

Every projection is an explicit ``nn.Linear`` called on ``[B, T, D]`` inputs — ``qkv``,
``proj``, ``fc1``, ``fc2`` — so ``sparsify_`` reaches them and the ``fst`` recipe pairs
adjacent tokens (T is dim -2) for the weight gradient. ``lm_head`` is the last Linear and
stays dense by default, like a classifier head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "gpt_tiny"]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class GPT(nn.Module):
    """Byte-level causal decoder: ``tokens [B, T] int64`` → ``logits [B, T, vocab]``."""

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 128,
        depth: int = 4,
        embed_dim: int = 128,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("context", context),
            ("depth", depth),
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT {name} must be a positive int, got {value!r}")
        self.context = context
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, embed_dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, context, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            nn.init.normal_(block.attn.proj.weight, std=0.02 / (2 * depth) ** 0.5)
            nn.init.normal_(block.fc2.weight, std=0.02 / (2 * depth) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"GPT expects tokens [B, T], got shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
        x = self.tok_emb(tokens) + self.pos_emb[:, :t]  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))  # (B, T, vocab)


def gpt_tiny(context: int = 128, **kwargs: int | float) -> GPT:
    """4 layers, 4 heads, width 128 (~0.8M parameters): trains on 2 CPU cores."""
    return GPT(context=context, **kwargs)  # type: ignore[arg-type]
