"""What the forkkv cache is doing: hit counters, pool occupancy, and the memory a per-adapter cache needs.

Reported three ways: a log line per prefill batch (INFO), the scheduler's internal state
(`Engine.get_server_info()["internal_states"][0]["forkkv"]`, HTTP `/get_server_info`), and Prometheus
gauges on `/metrics` when SGLang runs with `--enable-metrics`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ForkKVStats:
    prefill_requests: int = 0
    adapter_requests: int = 0
    base_hit_tokens: int = 0  # base entries reused instead of written
    residual_hit_tokens: int = 0  # residual entries reused (tokens not computed again)

    def record_prefill(self, base_hit: int, residual_hit: int, has_adapter: bool):
        self.prefill_requests += 1
        self.adapter_requests += int(has_adapter)
        self.base_hit_tokens += base_hit
        self.residual_hit_tokens += residual_hit


STATS = ForkKVStats()
_gauges = None


def snapshot(tree) -> dict:
    """Counters plus both pools' occupancy and bytes (the tree must be a DualRadixTree)."""
    pool = tree.residual_pool
    allocator = tree.token_to_kv_pool_allocator
    out = dataclasses.asdict(STATS)
    out.update(tree.stats())
    base_cell, res_cell = pool.base_bytes_per_token, pool.bytes_per_residual_slot
    out.update(
        base_free=allocator.available_size(),
        base_capacity=allocator.size,
        base_protected=tree.protected_size(),
        residual_free=pool.allocator.available_size(),
        residual_capacity=pool.allocator.size,
        residual_protected=tree.residual.protected_size(),
        forkkv_bytes=out["base_tokens"] * base_cell + out["residual_tokens"] * res_cell,
        per_adapter_bytes=out["per_adapter_equivalent_tokens"] * base_cell,
    )
    out["saved_bytes"] = out["per_adapter_bytes"] - out["forkkv_bytes"]
    return out


def log_prefill(tree, enable_metrics: bool):
    """One INFO line per prefill batch (beside SGLang's own), and fresh gauges."""
    snap = snapshot(tree)
    logger.info(
        "forkkv cache: base %d tok, residual %d tok, base hits %d, residual hits %d, "
        "%.2f MiB held vs %.2f MiB per-adapter (saved %.2f MiB)",
        snap["base_tokens"], snap["residual_tokens"], snap["base_hit_tokens"], snap["residual_hit_tokens"],
        snap["forkkv_bytes"] / 2**20, snap["per_adapter_bytes"] / 2**20, snap["saved_bytes"] / 2**20,
    )
    if enable_metrics:
        _export(snap)


_last_idle_export = 0.0


def export_when_idle(tree):
    """Gauges catch up with the inserts of finished requests (at most twice a second: idle loops spin)."""
    global _last_idle_export
    now = time.monotonic()
    if now - _last_idle_export >= 0.5:
        _last_idle_export = now
        _export(snapshot(tree))


def _export(snap: dict):
    global _gauges
    from prometheus_client import Gauge

    if _gauges is None:
        _gauges = {
            name: Gauge(f"sglang_forkkv_{name}", f"forkkv {name.replace('_', ' ')}", multiprocess_mode="mostrecent")
            for name in (
                "base_tokens", "residual_tokens", "base_hit_tokens", "residual_hit_tokens",
                "per_adapter_bytes", "forkkv_bytes", "saved_bytes", "residual_free",
            )
        }
    for name, gauge in _gauges.items():
        gauge.set(snap[name])


def check_idle(tree):
    """At idle no residual slot may be unaccounted for and no residual node locked (leak check)."""
    pool = tree.residual_pool
    held = tree.residual.total_size()
    free = pool.allocator.available_size()
    if free + held != pool.allocator.size or tree.residual.protected_size() != 0:
        raise RuntimeError(
            f"forkkv residual pool leak: free {free} + tree {held} != capacity {pool.allocator.size}, "
            f"locked {tree.residual.protected_size()}"
        )
