"""In-process `sglang.Engine`s for tests, and a shutdown that stops only the engine it is given.

SGLang's `Engine.shutdown()` kills every child of the calling process: with several engines alive in one test
process it kills the others' schedulers too, whose watchdogs then SIGQUIT the whole test run.
"""

import contextlib

import psutil
import sglang as sgl

from sglang_forkkv.cpu_engine import cpu_engine_kwargs


def start_engine(model_dir: str, adapters: dict[str, str], **kw) -> sgl.Engine:
    return sgl.Engine(**cpu_engine_kwargs(model_dir, adapters, **kw))


def stop_engine(engine: sgl.Engine, timeout: float = 30) -> None:
    """Stop this engine's scheduler and detokenizer processes (and anything they started), nothing else."""
    watchdog = engine.tokenizer_manager._subprocess_watchdog
    own = list(watchdog._processes) if watchdog is not None else []
    if watchdog is not None:
        watchdog.stop()  # before the kill, or it reports its own processes' deaths as crashes
    procs = []
    for p in own:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(p.pid)
            procs += [*root.children(recursive=True), root]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout)
    for p in own:
        p.join(timeout)  # reap, so no zombie is left behind
