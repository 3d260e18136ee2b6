"""Seeded random LoRA adapters in PEFT's on-disk format, for tests and benchmarks (no peft needed).

No trained adapter for SmolLM2 can be downloaded here, so tests make their own. A useful test adapter must change
greedy outputs visibly (else an engine that silently drops the adapter passes) without wrecking the model (else
every output is garbage and comparisons say nothing). We size each projection's delta relative to that
projection's base weight: ``scale`` is the target ratio ||s B A x|| / ||W x|| for inputs x of random direction.
Real activations are not isotropic, so the measured ratio differs per projection; see ``DEFAULT_SCALE``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The adapters the test suite shares (tests/conftest.py `adapter_dirs`): name -> make_lora_adapter arguments.
TEST_ADAPTERS = {
    "planner": {"rank": 8, "seed": 101},
    "coder": {"rank": 16, "seed": 102},
    "critic": {"rank": 8, "seed": 103},
}
# Measured on SmolLM2-135M-Instruct (float32, 4 chat prompts, ranks 8 and 16, q/k/v/o): scale 0.1 gives median
# per-projection output deltas of 6-7% (q, k), 10% (o) and 16% (v) of the base output norm; greedy 40-token answers
# differ from the base model's on 2-3 of 4 prompts and stay fluent. 0.15 starts to repeat itself, 0.25 is garbage.
DEFAULT_SCALE = 0.1
_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def module_path(layer: int, module: str) -> str:
    """``model.layers.{i}.self_attn.q_proj`` etc.: the HF Llama name of a projection."""
    if module not in _PARENT:
        raise ValueError(f"unsupported LoRA target {module!r}; choose from {sorted(_PARENT)}")
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


def make_lora_adapter(
    out_dir: Path | str,
    model_dir: Path | str,
    rank: int,
    seed: int,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    alpha: float | None = None,
    scale: float = DEFAULT_SCALE,
    dtype: str = "float32",
) -> Path:
    """Write a random PEFT LoRA adapter for the HF Llama model in ``model_dir`` into ``out_dir``; return ``out_dir``.

    ``alpha`` defaults to ``2 * rank`` (LoRA scaling 2, not 1, so a backend that forgets the scaling is caught).
    ``lora_A`` entries ~ N(0, 1/in); ``lora_B`` is sized so the delta is ``scale`` times the base output (see module
    docstring). Same arguments, same bytes.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir, model_dir = Path(out_dir), Path(model_dir)
    alpha = float(2 * rank if alpha is None else alpha)
    scaling = alpha / rank
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        for layer in range(num_layers):
            for module in target_modules:
                name = module_path(layer, module)
                base = weights.get_tensor(f"{name}.weight").float()  # [out, in]
                lora_a, lora_b = _random_pair(base, rank, scaling, scale, generator)
                tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.to(getattr(torch, dtype)).contiguous()
                tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.to(getattr(torch, dtype)).contiguous()

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = _adapter_config(model_dir, rank, alpha, list(target_modules))
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _random_pair(base, rank: int, scaling: float, scale: float, generator):
    """(A [r, in], B [out, r]) with ||scaling * B A x|| ~= scale * ||W x|| for x of random direction.

    For isotropic x: ||W x|| ~= ||x|| ||W||_F / sqrt(in), and with A ~ N(0, 1/in), B ~ N(0, sigma^2):
    ||B A x|| ~= ||x|| sigma sqrt(r * out / in). Solving for sigma gives the expression below.
    """
    import torch

    out_features, in_features = base.shape
    sigma_b = scale * base.norm().item() / (scaling * math.sqrt(rank * out_features))
    lora_a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
    lora_b = torch.randn(out_features, rank, generator=generator) * sigma_b
    return lora_a, lora_b


def _adapter_config(model_dir: Path, rank: int, alpha: float, target_modules: list[str]) -> dict:
    """The adapter_config.json fields PEFT and SGLang read (PEFT's defaults for the rest)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }
