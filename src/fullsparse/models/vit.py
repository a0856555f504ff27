"""Vision Transformer (Dosovitskiy et al. 2021), ViT-Ti sizes by default (DeiT-Ti, Touvron et al.).

Written with explicit ``nn.Linear`` layers so the sparsifier can swap each for its sparse
twin: attention is ``qkv`` (D → 3D) then ``proj`` (D → D), the MLP is ``fc1``/``fc2``, and
all four are called on 3-D ``[B, T, D]`` tensors — the token axis T is dim -2, which is
the axis the ``grad_weight`` fixed mask pairs along (``docs/spec.md``, "FST, step by step", step 3).
``nn.MultiheadAttention`` is deliberately avoided: its fused kernel reads
``out_proj.weight`` directly, bypassing a replaced module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "Mlp", "Block", "VisionTransformer", "default_patch_size", "vit_tiny"]


def default_patch_size(image_size: int) -> int:
    """Patch side used for an image side when none is given.

    4 for images up to 32 px (CIFAR 32 → 8×8 = 64 tokens, Fashion-MNIST 28 → 7×7 = 49), 16
    from 224 px (the paper's ImageNet setting, 14×14 = 196 tokens), and 8 in between (e.g.
    64 → 64 tokens, 128 → 256 tokens), which keeps the token count between those two ends.
    """
    if image_size <= 32:
        return 4
    if image_size >= 224:
        return 16
    return 8


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``.

    Shapes: ``[B, T, D] -> [B, T, D]``; heads split D into ``num_heads × D/num_heads``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x)  # [B, T, 3D]
        qkv = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, nh, T, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, nh, T, hd]
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.proj(out)


class Mlp(nn.Module):
    """Transformer feed-forward: ``fc2(gelu(fc1 x))``. Shapes: ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1 x)``, then ``x + mlp(norm2 x)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding, cls token, learned position embedding, pre-norm blocks.

    The patch embedding is a Conv2d with kernel = stride = patch size; the classifier
    ``head`` reads the final-normed cls token and is the last ``nn.Linear`` of the model.

    Args:
        image_size: input side (square images); must be divisible by ``patch_size``.
        patch_size: patch side; ``None`` picks :func:`default_patch_size`.
        in_channels, num_classes: image channels and head width.
        embed_dim, depth, num_heads, mlp_ratio: model size (ViT-Ti: 192, 12, 3, 4).

    Shapes: ``[B, in_channels, S, S] -> [B, num_classes]``; inside, tokens are
    ``[B, 1 + (S/p)², embed_dim]``.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int | None = None,
        in_channels: int = 3,
        num_classes: int = 10,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if patch_size is None:
            patch_size = default_patch_size(image_size)
        if image_size < 1 or patch_size < 1 or image_size % patch_size != 0:
            raise ValueError(
                f"ViT image_size {image_size} must be divisible by its patch size {patch_size} "
                f"(default patch: 4 up to 32 px, 8 up to 223 px, 16 from 224 px; or pass "
                f"patch_size)"
            )
        if num_classes < 1 or in_channels < 1 or depth < 1 or embed_dim < 1:
            raise ValueError(
                f"ViT sizes must be >= 1: num_classes={num_classes}, in_channels={in_channels}, "
                f"depth={depth}, embed_dim={embed_dim}"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # ViT/DeiT init: truncated normal (std 0.02) for embeddings and Linear weights, which
        # keeps early attention logits small; the patch conv is a Linear on flattened patches.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, _, h, w = x.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT was built for {self.image_size}x{self.image_size} images, got input "
                f"{tuple(x.shape)}; the position embedding has a fixed token count"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # [B, 1+N, D]
        x = self.blocks(x + self.pos_embed)
        x = self.norm(x[:, 0])  # [B, D] cls token only: the head's input is 2-D
        return self.head(x)


def vit_tiny(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **options: Any
) -> VisionTransformer:
    """ViT-Ti (embed 192, 12 blocks, 3 heads, MLP ×4: :class:`VisionTransformer`'s
    defaults); ``options`` (``depth``, ``embed_dim``, ``num_heads``, ``mlp_ratio``,
    ``patch_size``) shrink it for CPU tests."""
    return VisionTransformer(
        image_size=image_size, in_channels=in_channels, num_classes=num_classes, **options
    )
