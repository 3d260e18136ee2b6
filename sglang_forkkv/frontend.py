"""LoRA adapter choice in SGLang's frontend language; patches/common/0002-frontend-lora.patch calls into this.

A request's adapter comes from the most specific of, in order:
  sgl.gen(..., lora_path=) / sgl.select(..., lora_path=)     that one call
  s.fork(n, lora_path=[...]) / s.copy(lora_path=)            that branch (None in a list: the base model)
  program.run(..., lora_path=) / program.run_batch(...)       the whole program
and an unset level (None) inherits from the one below. The adapter rides in `SglSamplingParams.lora_path`
(each executor's `default_sampling_para` holds its program's or branch's adapter) and `RuntimeEndpoint` sends
it as the request's `lora_path` on every call: generate, streaming, select, fork commits, cache_prefix.

Kept free of torch and sglang.srt: the patched interpreter imports it in client processes.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging

logger = logging.getLogger(__name__)


def branch_sampling_params(parent, size: int, lora_path) -> list:
    """Each fork branch's default `SglSamplingParams`: the parent's, with the branch's adapter.

    lora_path: None (every branch inherits the parent's adapter), one name (every branch uses it), or a
    list of `size` entries, each a name or None (that branch runs on the base model).
    """
    if lora_path is None:
        return [parent] * size
    if isinstance(lora_path, str):
        loras = [lora_path] * size
    elif isinstance(lora_path, (list, tuple)):
        if len(lora_path) != size:
            raise ValueError(f"fork({size}) got {len(lora_path)} adapters in lora_path={list(lora_path)!r}")
        loras = list(lora_path)
    else:
        raise ValueError(f"lora_path must be a name, a list of names/None, or None; got {lora_path!r}")
    for lora in loras:
        if lora is not None and not isinstance(lora, str):
            raise ValueError(f"each fork branch's adapter must be a name or None, got {lora!r}")
    return [dataclasses.replace(parent, lora_path=lora) for lora in loras]


def commit_shared_prefix(branches) -> None:
    """Prefill a fork's shared context once, before its branches run, under the first branch's adapter.

    That branch's prefill writes the base entries every other branch then reuses whatever its adapter
    (forkkv), so a fork whose branches share one adapter is exact. Where the server refuses an adapter
    (an unknown name), the next branch's adapter is tried: the refused branch fails on its own request,
    with the server's error, and the others still share the context.
    """
    tried = set()
    for exe in branches:
        lora = exe.default_sampling_para.lora_path
        if lora in tried:
            continue
        tried.add(lora)
        try:
            exe.backend.commit_lazy_operations(exe)
            return
        except RuntimeError as exc:  # RuntimeEndpoint's error for a non-200 answer
            logger.warning("fork context not prefilled under adapter %r: %s", lora, exc)


def select_kwargs(executor, expr) -> dict:
    """Keyword arguments for `backend.select`: the select's adapter, else the executor's; {} with neither,
    so backends without adapter support keep working when no adapter is asked for."""
    lora = expr.lora_path if expr.lora_path is not None else executor.default_sampling_para.lora_path
    if lora is None:
        return {}
    if "lora_path" not in inspect.signature(executor.backend.select).parameters:
        raise ValueError(
            f"{type(executor.backend).__name__} cannot run a select on LoRA adapter {lora!r}; "
            "use sgl.RuntimeEndpoint (an SGLang server started with --enable-lora)"
        )
    return {"lora_path": lora}


def cache_stats(backend) -> dict:
    """The server's forkkv cache stats (`/server_info` -> internal_states[0]["forkkv"]); {} without forkkv's cache.

    backend: a `sgl.RuntimeEndpoint` (or `sgl.Runtime`).
    """
    backend = getattr(backend, "endpoint", backend)
    stats = backend.get_server_info()["internal_states"][0].get("forkkv")
    # The internal state starts from the server args, whose `forkkv` flag the stats replace only when the
    # forkkv cache is running.
    return stats if isinstance(stats, dict) else {}
