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
    # forkkv replaces SGLang's create_tree_cache, so these would otherwise be dropped without a word:
    "enable_lmcache": "forkkv's tree replaces the LMCache-backed radix cache this option selects",
    "enable_flexkv": "forkkv's tree replaces the FlexKV-backed radix cache this option selects",
    "enable_streaming_session": "streaming sessions wrap SGLang's radix cache; forkkv's tree is built without them",
    "enable_session_radix_cache": "the session radix cache is a different tree from forkkv's",
}


@dataclasses.dataclass(frozen=True)
class ForkKVConfig:
    """Settings of one forkkv server.

    mode: how an adapter obtains residuals for base tokens that another adapter prefilled
      ("recompute": its own forward over them; "eager": the prefilling request writes them for
      every adapter resident in SGLang's LoRA buffer).
    residual_ratio: residual slots per base slot; the residual pool holds ratio * base tokens.
    private_layers: layers whose K and V each adapter keeps whole, computed by its own forward ("" none, "all",
      "first:N", "last:N", or indices and ranges "0,2,20-29"); see `private_layer_set`.
    """

    mode: str = "recompute"
    residual_ratio: float = 4.0
    private_layers: str = ""

    def __post_init__(self):
        if self.mode not in FILL_MODES:
            raise ValueError(f"--forkkv-mode must be one of {FILL_MODES}, got {self.mode!r}")
        if not self.residual_ratio > 0:
            raise ValueError(f"--forkkv-residual-ratio must be > 0, got {self.residual_ratio!r}")
        private_layer_set(self.private_layers, None)  # syntax now; indices against the model at pool creation
        if any_private(self.private_layers) and self.mode == "eager":
            # eager writes other adapters' entries from the prefilling agent's hidden states: a private layer
            # filled that way would be no more exact than base + residual
            raise ValueError("--forkkv-private-layers needs --forkkv-mode recompute (each adapter's own forward)")

    @classmethod
    def from_server_args(cls, server_args) -> "ForkKVConfig":
        return cls(mode=server_args.forkkv_mode, residual_ratio=server_args.forkkv_residual_ratio,
                   private_layers=getattr(server_args, "forkkv_private_layers", "") or "")


def any_private(spec: str | None) -> bool:
    return (spec or "").strip().lower() not in ("", "none")


def private_layer_set(spec: str, num_layers: int | None) -> frozenset:
    """Layer indices of a --forkkv-private-layers spec; ``num_layers`` None checks the syntax only."""
    if not any_private(spec):
        return frozenset()
    spec = spec.strip().lower()
    flag = "--forkkv-private-layers"
    try:
        if spec == "all" or spec.startswith(("first:", "last:")):
            count = None if spec == "all" else int(spec.split(":", 1)[1])
            if count is not None and count < 0:
                raise ValueError
            if num_layers is None:
                return frozenset()
            count = num_layers if count is None else min(count, num_layers)
            return frozenset(range(count) if spec.startswith("first:") or spec == "all"
                             else range(num_layers - count, num_layers))
        layers = set()
        for part in spec.split(","):
            low, _, high = part.strip().partition("-")
            low, high = int(low), int(high or low)
            if low < 0 or high < low:
                raise ValueError
            layers.update(range(low, high + 1))
    except ValueError:
        raise ValueError(f"{flag}: expected all, first:N, last:N or indices/ranges like 0,2,20-29; got {spec!r}")
    if num_layers is not None and max(layers) >= num_layers:
        raise ValueError(f"{flag}: layer {max(layers)} does not exist (the model has {num_layers} layers)")
    return frozenset(layers)


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
    if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):
        raise ValueError(
            f"--forkkv does not support --disaggregation-mode={server_args.disaggregation_mode!r}: "
            "the KV transfer between prefill and decode servers carries base KV without the residuals"
        )
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
    if any_private(getattr(server_args, "forkkv_private_layers", "")) and server_args.attention_backend != "torch_native":
        raise ValueError("--forkkv-private-layers is implemented in the torch_native attention backend only; "
                         f"got --attention-backend {server_args.attention_backend!r}")
    if server_args.device != "cpu":
        validate_cuda_graphs(server_args)


def validate_cuda_graphs(server_args) -> None:
    """Decode CUDA graphs run the Triton path (decode_graph.py); extend builds its plan on the host per batch."""
    if not cuda_graph_off(server_args, "prefill"):
        raise ValueError(
            "--forkkv does not support prefill CUDA graphs (its extend plan is built on the host for every batch): "
            "pass --disable-prefill-cuda-graph (decode CUDA graphs are supported)"
        )
    if cuda_graph_off(server_args, "decode"):
        return
    if server_args.attention_backend != "triton" or server_args.decode_attention_backend not in (None, "triton"):
        raise ValueError("--forkkv runs decode CUDA graphs with --attention-backend triton only: pass "
                         "--disable-decode-cuda-graph with another backend")
    if (server_args.enable_lora or server_args.lora_paths) and server_args.lora_backend != "triton":
        raise ValueError("--forkkv runs decode CUDA graphs with --lora-backend triton only (it reads that backend's "
                         f"graph batch info), got {server_args.lora_backend!r}: pass --disable-decode-cuda-graph")


def cuda_graph_off(server_args, phase: str) -> bool:
    """Whether the decode or prefill CUDA graph is off, read from SGLang 0.5.17's flags before it resolves them
    (and after: the flags stay as given)."""
    if server_args.disable_cuda_graph:
        return True
    off = getattr(server_args, f"disable_{phase}_cuda_graph") or getattr(
        server_args, f"cuda_graph_backend_{phase}") == "disabled"
    explicit = server_args.cuda_graph_config  # JSON wins over the per-phase flags (SGLang's precedence)
    if explicit is not None and not isinstance(explicit, dict):
        explicit = explicit.to_dict()
    settings = (explicit or {}).get(phase)
    if isinstance(settings, dict) and "backend" in settings:
        off = str(getattr(settings["backend"], "value", settings["backend"])) == "disabled"
    return bool(off)
