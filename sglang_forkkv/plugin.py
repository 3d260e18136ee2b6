"""Entry point (`sglang.srt.plugins`: forkkv): wires forkkv into SGLang 0.5.17 through its registries and hooks.

Runs in the launcher and in every scheduler process. Every hook is inert unless the server was
started with `--forkkv` (the residual pool then exists on the model runner and the tree cache is a
DualRadixTree).
"""

from __future__ import annotations

import importlib
import logging

import torch

logger = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.17"
_loaded = False


def load_plugin():
    global _loaded
    if _loaded:
        return
    import sglang

    if sglang.__version__ != SGLANG_VERSION:
        raise RuntimeError(f"sglang-forkkv needs sglang {SGLANG_VERSION}, found {sglang.__version__}")
    from sglang.srt.server_args import ServerArgs

    if "forkkv" not in ServerArgs.__dataclass_fields__:
        raise RuntimeError("sglang-forkkv patches are not applied: run `sglang-forkkv apply`")

    from sglang.srt.layers.attention import attention_registry
    from sglang.srt.mem_cache.registry import register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_forkkv import config as forkkv_config
    from sglang_forkkv import scheduling

    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.__post_init__",
        # In the launcher, before SGLang resolves the arguments: unsupported combinations fail before any process starts.
        lambda self, *a, **k: forkkv_config.validate_server_args(self),
        HookType.BEFORE,
    )
    HookRegistry.register("sglang.srt.managers.schedule_batch.Req.__init__", _strip_lora_from_extra_key, HookType.AFTER)
    HookRegistry.register(
        "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool", _create_residual_pool, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        _charge_residual_bytes,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.lora.layers.QKVParallelLinearWithLoRA.apply_lora", _qkv_apply_lora, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.alloc_for_extend",
        lambda result, batch, *a, **k: scheduling.after_alloc_for_extend(batch, result),
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.alloc_for_decode",
        lambda result, batch, *a, **k: scheduling.after_alloc_for_decode(batch, result),
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", _add_one_req, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req",
        lambda result, adder, req, *a, **k: scheduling.reserve_chunked(adder, req),
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.ScheduleBatch.check_decode_mem",
        lambda result, batch, selected_indices=None: result and scheduling.residual_fits_decode(batch, selected_indices),
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens",
        lambda result, scheduler, req, *a, **k: scheduling.bound_to_residual_pool(scheduler, req),
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state", _internal_state, HookType.AFTER
    )
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.on_idle", _on_idle, HookType.AFTER)
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.unload_lora_adapter", _drop_unloaded_residuals, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend", _log_prefill, HookType.AFTER
    )

    _swap_attention_backend(attention_registry, "torch_native", "sglang_forkkv.attention_torch", "ForkKVTorchAttnBackend")
    _swap_attention_backend(attention_registry, "triton", "sglang_forkkv.attention_triton", "ForkKVTritonAttnBackend")
    register_radix_cache_backend("forkkv", _make_tree)
    # By the flag, not by --radix-cache-backend: ServerArgs may be built in a process that never loaded this
    # plugin (sgl.Runtime), so nothing can be relied on to have rewritten the backend name.
    HookRegistry.register(
        "sglang.srt.mem_cache.kv_cache_builder.create_tree_cache",
        lambda original, ctx: _make_tree(ctx) if forkkv_config.is_enabled(ctx.server_args) else original(ctx),
        HookType.AROUND,
    )
    _loaded = True


def _swap_attention_backend(attention_registry, name: str, module: str, cls: str):
    """SGLang's backend `name` unless the runner has a residual pool (--forkkv): then forkkv's class."""
    stock = attention_registry.ATTENTION_BACKENDS[name]

    def stock_or_forkkv(runner):
        if getattr(runner, "forkkv_residual_pool", None) is None:
            return stock(runner)
        return getattr(importlib.import_module(module), cls)(runner)

    attention_registry.ATTENTION_BACKENDS[name] = stock_or_forkkv


##### Hooks #####


def _strip_lora_from_extra_key(result, req, *args, **kwargs):
    """SGLang appends lora_id to extra_key, splitting the prefix cache per adapter; forkkv keys the
    base tree without it and keeps the adapter in the residual tree's key."""
    if _ACTIVE["on"] and req.lora_id is not None and req.extra_key is not None:
        stripped = req.extra_key[: len(req.extra_key) - len(req.lora_id)]
        req.extra_key = stripped or None


def _create_residual_pool(result, runner, *args, **kwargs):
    from sglang_forkkv.config import ForkKVConfig, is_enabled, private_layer_set, validate_server_args
    from sglang_forkkv.model_check import check_model_supported
    from sglang_forkkv.pool import ResidualPool, lora_max_rank

    server_args = runner.server_args
    if not is_enabled(server_args) or getattr(runner, "forkkv_residual_pool", None) is not None:
        return
    # Again in the scheduler process: the launcher's check is skipped where ServerArgs was built without this plugin.
    validate_server_args(server_args)
    check_model_supported(runner.model)
    config = ForkKVConfig.from_server_args(server_args)
    kv_pool = runner.token_to_kv_pool
    num_layers = len(kv_pool.k_buffer)
    qkv_rank = lora_max_rank(runner.model)  # 0: LoRA off, or no adapter targets q/k/v (MLP-only adapters)
    max_rank = max(qkv_rank, 1)
    k0, v0 = kv_pool.k_buffer[0], kv_pool.v_buffer[0]
    private = private_layer_set(config.private_layers, num_layers)
    pool = ResidualPool(
        num_slots=int(runner.max_total_num_tokens * config.residual_ratio),
        max_rank=max_rank,
        num_layers=num_layers,
        dtype=kv_pool.dtype if kv_pool.dtype != torch.uint8 else torch.bfloat16,
        device=runner.device,
        max_reqs=runner.req_to_token_pool.req_to_token.shape[0],
        max_context_len=runner.req_to_token_pool.req_to_token.shape[1],
        private_layers=private,
        kv_head_shape=tuple(k0.shape[1:]),
    )
    pool.base_bytes_per_token = num_layers * (k0[0].numel() * k0.element_size() + v0[0].numel() * v0.element_size())
    private_cells = len(private) * (k0[0].numel() + v0[0].numel())
    pool.bytes_per_residual_slot = ResidualPool.bytes_per_slot(max_rank, num_layers, pool.dtype, private_cells)
    pool.attention_lora = qkv_rank > 0
    runner.forkkv_residual_pool = pool
    runner.forkkv_config = config
    logger.info(
        "forkkv on (mode %s): base KV %d tokens x %d B, residual %d slots x %d B, private layers %s",
        config.mode, runner.max_total_num_tokens, pool.base_bytes_per_token, pool.num_slots, pool.bytes_per_residual_slot,
        sorted(private) or "none",
    )


def _charge_residual_bytes(original, configurator, kvc, num_layers):
    """Bytes per base token, residual share included, so a memory-fraction-sized pool stays within budget
    and max_total_num_tokens reports the base tokens that really fit."""
    from sglang_forkkv.config import ForkKVConfig, is_enabled, private_layer_set
    from sglang_forkkv.pool import ResidualPool, lora_max_rank

    cell = original(configurator, kvc, num_layers)
    if not is_enabled(kvc.server_args):
        return cell
    config = ForkKVConfig.from_server_args(kvc.server_args)
    residual = ResidualPool.bytes_per_slot(max(lora_max_rank(kvc.model), 1), num_layers, kvc.kv_cache_dtype)
    # a private layer holds a whole K/V entry per residual slot: one layer's share of the base cell
    residual += len(private_layer_set(config.private_layers, num_layers)) * cell // num_layers
    return cell + int(residual * config.residual_ratio)


def _qkv_apply_lora(original, layer, base_output, x):
    from sglang_forkkv.lora import qkv_apply_lora
    from sglang_forkkv.plan import CAPTURE

    if CAPTURE.plan is None:
        return original(layer, base_output, x)
    return qkv_apply_lora(layer, base_output, x)


def _make_tree(ctx):
    from sglang_forkkv.tree import DualRadixTree

    runner = ctx.tp_worker.model_runner
    pool = getattr(runner, "forkkv_residual_pool", None)
    if pool is None:
        raise ValueError("--radix-cache-backend forkkv is selected by --forkkv; do not pass it alone")
    _ACTIVE["on"] = True
    _ACTIVE["enable_metrics"] = bool(ctx.server_args.enable_metrics)
    return DualRadixTree(ctx.params, pool, runner.forkkv_config, getattr(runner, "lora_manager", None))


def _add_one_req(original, adder, req, *args, **kwargs):
    from sglang.srt.managers.schedule_policy import AddReqResult

    from sglang_forkkv.scheduling import residual_admits

    if not residual_admits(adder, req):
        return AddReqResult.NO_TOKEN
    return original(adder, req, *args, **kwargs)


def _internal_state(result, scheduler, *args, **kwargs):
    from sglang_forkkv.metrics import snapshot
    from sglang_forkkv.tree import DualRadixTree

    if isinstance(scheduler.tree_cache, DualRadixTree):
        result.internal_state["forkkv"] = snapshot(scheduler.tree_cache)
        result.internal_state["forkkv"]["residual_tokens_by_adapter"] = scheduler.tree_cache.residual_tokens_by_adapter()
    return result


def _on_idle(result, scheduler, *args, **kwargs):
    from sglang_forkkv.metrics import check_idle, export_when_idle
    from sglang_forkkv.tree import DualRadixTree

    if isinstance(scheduler.tree_cache, DualRadixTree) and scheduler.is_fully_idle():
        check_idle(scheduler.tree_cache)
        if _ACTIVE["enable_metrics"]:
            export_when_idle(scheduler.tree_cache)


def _drop_unloaded_residuals(result, scheduler, recv_req, *args, **kwargs):
    """An unloaded adapter's residuals can never be read again (a reload gets a new lora_id): free them."""
    from sglang_forkkv.tree import DualRadixTree

    if isinstance(scheduler.tree_cache, DualRadixTree) and recv_req.lora_id is not None:
        freed = scheduler.tree_cache.drop_adapter(recv_req.lora_id)
        logger.info("forkkv: adapter %s unloaded, %d residual slots freed", recv_req.lora_name, freed)
    return result


def _log_prefill(result, batch, *args, **kwargs):
    from sglang_forkkv.metrics import log_prefill
    from sglang_forkkv.tree import DualRadixTree

    if isinstance(batch.tree_cache, DualRadixTree):
        log_prefill(batch.tree_cache, _ACTIVE["enable_metrics"])


_ACTIVE = {"on": False, "enable_metrics": False}
