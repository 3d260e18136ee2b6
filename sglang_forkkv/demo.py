"""The main job: three LoRA agents fork over one shared document on the CPU with --forkkv.

    python -m sglang_forkkv.demo [--mode recompute|eager] [--records 80]

A planner reads the document first (its prefill writes the shared base entries), then a coder and a
critic, each with its own adapter, fork over the same document. The demo prints what each agent said
and what the cache holds, against what stock SGLang's per-adapter radix cache holds for the same
requests (stock keys KV by (adapter, tokens): one full KV entry per residual entry forkkv keeps).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

ROLES = ("planner", "coder", "critic")


def prepare_adapters(model_dir: Path) -> dict[str, str]:
    from sglang_forkkv.test_adapters import TEST_ADAPTERS, make_lora_adapter

    root = Path(model_dir).parent / "demo-adapters"
    out = {}
    for name, spec in TEST_ADAPTERS.items():
        target = root / name
        if not (target / "adapter_model.safetensors").exists():
            make_lora_adapter(target, model_dir, **spec)
        out[name] = str(target)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["recompute", "eager"], default="recompute")
    parser.add_argument("--records", type=int, default=80, help="ledger records in the shared document")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    import sglang as sgl

    from sglang_forkkv.cpu_engine import cpu_engine_kwargs, shared_document
    from sglang_forkkv.model_prep import prepare_model

    model_dir = prepare_model()
    adapters = prepare_adapters(model_dir)
    print(f"model {model_dir}; adapters {', '.join(adapters)}; starting the engine with --forkkv --forkkv-mode {args.mode}")
    engine = sgl.Engine(**cpu_engine_kwargs(str(model_dir), adapters, forkkv=True, forkkv_mode=args.mode))
    try:
        document = shared_document(args.records)
        prompts = [f"{document}\n\nYou are the {role}. State the one fact that matters most:" for role in ROLES]
        sampling = {"temperature": 0, "max_new_tokens": args.max_new_tokens}
        engine.generate(["ok"] * 3, {"temperature": 0, "max_new_tokens": 1}, lora_path=list(ROLES))
        start = time.perf_counter()
        outs = [engine.generate(prompts[0], sampling, lora_path=ROLES[0])]
        outs += engine.generate(prompts[1:], sampling, lora_path=list(ROLES[1:]))
        elapsed = time.perf_counter() - start
        stats = engine.get_server_info()["internal_states"][0]["forkkv"]
    finally:
        engine.shutdown()

    print(f"\nshared document: {outs[0]['meta_info']['prompt_tokens']} prompt tokens per agent; agents ran in {elapsed:.1f} s")
    for role, out in zip(ROLES, outs):
        meta = out["meta_info"]
        text = out["text"].strip().replace("\n", " ")
        print(f"  {role:8s} cached {meta['cached_tokens']:5d} of {meta['prompt_tokens']:5d} prompt tokens: {text[:70]!r}")
    mib = 2**20
    print("\nKV cache after the three agents")
    print(f"  forkkv base entries      {stats['base_tokens']:7d} tokens (one copy of the document + each agent's own)")
    print(f"  forkkv residual entries  {stats['residual_tokens']:7d} (adapter, token) pairs, rank <= 16")
    print(f"  forkkv KV memory         {stats['forkkv_bytes'] / mib:9.2f} MiB")
    print(f"  stock SGLang KV memory   {stats['per_adapter_bytes'] / mib:9.2f} MiB "
          f"({stats['per_adapter_equivalent_tokens']} per-adapter entries)")
    ratio = stats["per_adapter_bytes"] / max(stats["forkkv_bytes"], 1)
    print(f"  saved                    {stats['saved_bytes'] / mib:9.2f} MiB ({ratio:.2f}x less KV memory)")
    print(f"  base hits {stats['base_hit_tokens']} tokens, residual hits {stats['residual_hit_tokens']} tokens")


if __name__ == "__main__":
    main()
