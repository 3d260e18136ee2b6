"""ForkKVConfig: the one home of sglang-forkkv's settings, built once from SGLang's ServerArgs."""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)

FILL_MODES = ("recompute", "eager")
# Attention and LoRA backends with a forkkv path: the torch reference (CPU) and the Triton kernels (GPU).
ATTENTION_BACKENDS = ("torch_native", "triton")
LORA_BACKENDS = ("torch_native", "triton")

# Options whose code paths bypass the hooks forkkv relies on (page-granular trees, speculative
# verification, host-side cache tiers, other tree backends). Each is refused at start-up with its name.
UNSUPPORTED_OPTIONS = {
    "disable_radix_cache": "forkkv is a radix cache; without it there is nothing to share",
    "enable_hierarchical_cache": "the host cache tier copies KV without residuals",
    "speculative_algorithm": "speculative decoding writes draft KV outside the residual pool",
    "enable_dp_attention": "data-parallel attention is not wired to the residual pool",
}


@dataclasses.dataclass(frozen=True)
class ForkKVConfig:
    """Settings of one forkkv server.

    mode: how an adapter obtains residuals for base tokens that another adapter prefilled
      ("recompute": its own forward over them; "eager": the prefilling request writes them for
      every adapter resident in SGLang's LoRA buffer).
    residual_ratio: residual slots per base slot; the residual pool holds ratio * base tokens.
    """

    mode: str = "recompute"
    residual_ratio: float = 4.0

    def __post_init__(self):
        if self.mode not in FILL_MODES:
            raise ValueError(f"--forkkv-mode must be one of {FILL_MODES}, got {self.mode!r}")
        if not self.residual_ratio > 0:
            raise ValueError(f"--forkkv-residual-ratio must be > 0, got {self.residual_ratio!r}")

    @classmethod
    def from_server_args(cls, server_args) -> "ForkKVConfig":
        return cls(mode=server_args.forkkv_mode, residual_ratio=server_args.forkkv_residual_ratio)


def is_enabled(server_args) -> bool:
    return bool(getattr(server_args, "forkkv", False))


def validate_server_args(server_args) -> None:
    """Refuse option combinations forkkv does not support, naming the option (read-only: before ServerArgs
    resolves in the launcher, and again on the resolved arguments in the scheduler process)."""
    if not is_enabled(server_args):
        return
    ForkKVConfig.from_server_args(server_args)
    for name, why in UNSUPPORTED_OPTIONS.items():
        value = getattr(server_args, name, None)
        if value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--forkkv does not support {flag}={value!r}: {why}")
    if server_args.page_size not in (None, 1):
        raise ValueError(f"--forkkv supports --page-size 1 only, got {server_args.page_size}")
    if server_args.radix_cache_backend not in (None, "forkkv"):
        raise ValueError(
            f"--forkkv brings its own radix cache; drop --radix-cache-backend={server_args.radix_cache_backend!r}"
        )
    for flag, value in (("attention-backend", server_args.attention_backend),
                        ("prefill-attention-backend", server_args.prefill_attention_backend),
                        ("decode-attention-backend", server_args.decode_attention_backend)):
        if value is not None and value not in ATTENTION_BACKENDS:
            raise ValueError(f"--forkkv supports --{flag} in {ATTENTION_BACKENDS}, got {value!r}")
    if server_args.attention_backend is None:
        raise ValueError(f"--forkkv needs an explicit --attention-backend, one of {ATTENTION_BACKENDS}")
    if (server_args.enable_lora or server_args.lora_paths) and server_args.lora_backend not in LORA_BACKENDS:
        raise ValueError(f"--forkkv supports --lora-backend in {LORA_BACKENDS}, got {server_args.lora_backend!r}")
    if server_args.device != "cpu" and not cuda_graphs_disabled(server_args):
        raise ValueError(
            "--forkkv builds its attention plan on the host for every batch and does not support CUDA graphs: "
            "pass --disable-cuda-graph (or --cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled)"
        )


def cuda_graphs_disabled(server_args) -> bool:
    """Whether both decode and prefill CUDA graphs are off, read from SGLang 0.5.17's flags before it resolves them."""
    off = {
        "decode": server_args.disable_decode_cuda_graph or server_args.cuda_graph_backend_decode == "disabled",
        "prefill": server_args.disable_prefill_cuda_graph or server_args.cuda_graph_backend_prefill == "disabled",
    }
    explicit = server_args.cuda_graph_config  # JSON wins over the per-phase flags (SGLang's precedence)
    if explicit is not None and not isinstance(explicit, dict):
        explicit = explicit.to_dict()
    for phase, settings in (explicit or {}).items():
        if isinstance(settings, dict) and "backend" in settings:
            off[phase] = settings["backend"] == "disabled"
    return bool(server_args.disable_cuda_graph) or all(off.values())
