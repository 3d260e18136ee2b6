"""The CPU configuration of SGLang 0.5.17 that forkkv's demo, tests and CPU benchmarks share."""

from __future__ import annotations

import os


def cpu_engine_kwargs(model_dir: str, adapters: dict[str, str], **overrides) -> dict:
    """sglang.Engine keyword arguments for this machine: float32, torch_native attention and LoRA."""
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    kwargs = dict(
        model_path=model_dir,
        device="cpu",
        dtype="float32",
        attention_backend="torch_native",
        lora_backend="torch_native",
        cuda_graph_backend_decode="disabled",
        cuda_graph_backend_prefill="disabled",
        # Without a cap the CPU pool takes ~72% of RAM and 30 s to allocate.
        max_total_tokens=8192,
        # An idle scheduler otherwise spins a core; on 2 cores that starves every other engine.
        sleep_on_idle=True,
        log_level="warning",
    )
    if adapters:
        kwargs.update(
            enable_lora=True,
            lora_paths=[f"{name}={path}" for name, path in adapters.items()],
            # every adapter plus base-only requests in one batch
            max_loras_per_batch=len(adapters) + 1,
        )
    kwargs.update(overrides)
    return kwargs


# One first word per seed, each a different first token for SmolLM2's tokenizer: with forkkv, any prefix two
# adapters' requests share is shared base, down to one token, so documents of different seeds must share none.
LEDGER_TOPICS = ("Orders", "Travel", "Payments", "Stock", "Fuel", "Energy", "Health", "Weather",
                 "Music", "Sports", "Rent", "Books", "Food", "Water", "Market", "Budget")


def shared_document(num_records: int = 90, seed: int = 0) -> str:
    """A synthetic ledger every agent reads (about 21 tokens per record with SmolLM2's tokenizer); documents of
    seeds that differ modulo 16 start with different tokens."""
    lines = []
    for i in range(num_records):
        j = i + seed * 1000
        status = "shipped" if j % 3 else "pending"
        lines.append(
            f"Record {i}: customer {chr(65 + j % 26)}{j * 7 % 100}, order total {j * 13 % 997} dollars, status {status}."
        )
    return f"{LEDGER_TOPICS[seed % len(LEDGER_TOPICS)]} ledger {seed}.\n" + "\n".join(lines)
