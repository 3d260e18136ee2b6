"""What the agent examples share: a backend (a CPU SGLang server with --forkkv and the demo adapters, or a
server you started) and the report of what forkkv's shared cache saved, read from /server_info."""

from __future__ import annotations

import argparse
import contextlib
import os

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # before sglang loads: this machine may have no GPU

import sglang as sgl  # noqa: E402

from sglang_forkkv.frontend import cache_stats  # noqa: E402

MIB = 2**20


def parse_args(doc: str, records: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--url", help="a running server (--forkkv --enable-lora, adapters planner/coder/critic); "
                        "default: start a CPU one on SmolLM2-135M-Instruct")
    parser.add_argument("--mode", choices=["recompute", "eager"], default="recompute", help="--forkkv-mode")
    parser.add_argument("--records", type=int, default=records, help="ledger records in the shared document")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens each agent writes per turn")
    return parser.parse_args()


@contextlib.contextmanager
def backend(args: argparse.Namespace):
    """A frontend backend: `sgl.RuntimeEndpoint(args.url)`, or an `sgl.Runtime` (the server SGLang's frontend
    starts from Python) on the CPU demo model with the demo adapters, shut down on exit."""
    if args.url:
        yield sgl.RuntimeEndpoint(args.url)
        return
    from sglang.srt.plugins import load_plugins

    from sglang_forkkv.cpu_engine import cpu_engine_kwargs
    from sglang_forkkv.demo import prepare_adapters
    from sglang_forkkv.model_prep import prepare_model

    model_dir = prepare_model()
    adapters = prepare_adapters(model_dir)
    load_plugins()  # so --forkkv's options are checked here, before the server process starts
    print(f"starting a CPU server with --forkkv --forkkv-mode {args.mode}, adapters {', '.join(adapters)} ...")
    runtime = sgl.Runtime(**cpu_engine_kwargs(str(model_dir), adapters, forkkv=True, forkkv_mode=args.mode))
    try:
        yield runtime
    finally:
        runtime.shutdown()


def stats(backend) -> dict:
    found = cache_stats(backend)
    if not found:
        raise SystemExit("the server runs without --forkkv: /server_info has no forkkv cache stats")
    return found


def report_savings(before: dict, after: dict) -> None:
    """Print what the run added to the cache, against what stock SGLang's per-adapter cache holds for it."""
    delta = {key: after[key] - before[key] for key in after if isinstance(after[key], int)}
    ours, stock = delta["forkkv_bytes"], delta["per_adapter_bytes"]
    print("\nKV cache added by this run (GET /server_info -> internal_states[0]['forkkv'])")
    print(f"  base entries       {delta['base_tokens']:7d} tokens, shared by every agent")
    print(f"  residual entries   {delta['residual_tokens']:7d} (adapter, token) pairs of rank <= 16")
    print(f"  base entries reused instead of written: {delta['base_hit_tokens']} tokens")
    print(f"  forkkv KV memory   {ours / MIB:8.2f} MiB")
    entries = delta["per_adapter_equivalent_tokens"]
    print(f"  per-adapter cache  {stock / MIB:8.2f} MiB (stock SGLang: {entries} entries)")
    print(f"  saved              {(stock - ours) / MIB:8.2f} MiB ({stock / max(ours, 1):.2f}x less KV memory)")
