"""Prompt / behaviour encoder: UTF-8 bytes -> prompt tokens.

Behaviour states ("speaking", "listening", "thinking", "idle") and free-text actions from an
external planner are both plain text, encoded the same way: bytes (truncated/padded to
`preset.prompt_tokens`), a byte embedding, learned positions and a small pre-LN transformer.
Chosen over a pretrained sentence encoder because it needs no tokenizer or hub download, is
deterministic, trains jointly with the denoiser, and costs microseconds: a stream's prompt is
encoded once when it changes, not per NFE. The interface (texts -> (B, P, text_dim)) is what
a pretrained encoder would plug into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowact.presets import Preset

PAD = 256  # byte values are 0..255; 256 pads


def tokenize(texts: list[str], length: int) -> torch.Tensor:
    """UTF-8 bytes, truncated and padded: B strings -> (B, length) int64."""
    ids = torch.full((len(texts), length), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        data = list(text.encode("utf-8"))[:length]
        ids[i, : len(data)] = torch.tensor(data, dtype=torch.long)
    return ids


class TextLayer(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:  # (B, P, D), (B, 1, 1, P)
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (B, H, P, Dh)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, P, Dh)
        x = x + self.proj(attn.transpose(1, 2).flatten(2))  # (B, P, D)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, preset: Preset):
        super().__init__()
        self.length = preset.prompt_tokens
        self.embed = nn.Embedding(PAD + 1, preset.text_dim)
        self.pos = nn.Parameter(torch.randn(1, preset.prompt_tokens, preset.text_dim) * 0.02)
        self.layers = nn.ModuleList(TextLayer(preset.text_dim) for _ in range(preset.text_layers))
        self.norm = nn.LayerNorm(preset.text_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, P) -> prompt tokens (B, P, text_dim). The empty prompt attends to its first pad."""
        keep = (ids != PAD) | (torch.arange(ids.shape[1], device=ids.device) == 0)  # (B, P)
        x = self.embed(ids) + self.pos  # (B, P, D)
        for layer in self.layers:
            x = layer(x, keep[:, None, None, :])
        return self.norm(x)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.forward(tokenize(texts, self.length).to(self.pos.device))  # (B, P, D)
