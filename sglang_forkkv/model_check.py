"""Models forkkv cannot serve exactly, refused at start-up with the reason."""

from __future__ import annotations

import torch


def check_model_supported(model: torch.nn.Module) -> None:
    """Raise ValueError for a model with a norm on K before RoPE (e.g. Qwen3's k_norm).

    The split K = RoPE(x W_k) + RoPE(s R_k B_k) needs K linear in x·W_k + s R_k B_k up to RoPE; a norm
    applied to the whole K before RoPE makes base and residual inseparable (DESIGN §5).
    """
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] == "k_norm":
            raise ValueError(
                f"--forkkv cannot serve {type(model).__name__}: it applies a norm to K before RoPE "
                f"({name}), which breaks the additive base + residual split of K"
            )
