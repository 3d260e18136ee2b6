"""RoPE on the residual's K contribution, with the model's own cos/sin table and layout."""

from __future__ import annotations

import torch


def find_rotary(model: torch.nn.Module):
    """The model's rotary embedding module (SGLang's RotaryEmbedding: cos_sin_cache, rotary_dim, is_neox_style)."""
    for module in model.modules():
        if hasattr(module, "cos_sin_cache") and hasattr(module, "is_neox_style") and hasattr(module, "rotary_dim"):
            return module
    raise ValueError(f"--forkkv found no rotary embedding in {type(model).__name__}")


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, rotary_dim: int, is_neox: bool):
    """x [n, H, D] rotated at `positions` [n] over its first rotary_dim dims (SGLang's forward_native math)."""
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
    else:
        x1, x2 = rot[..., ::2], rot[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        rot = torch.cat((o1, o2), dim=-1)
    else:
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((rot, rest), dim=-1)
