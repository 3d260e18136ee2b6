"""sglang-forkkv: one shared base KV cache and small per-adapter residual caches for multi-LoRA agents on SGLang."""

__version__ = "0.1.0"
