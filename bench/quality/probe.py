"""Divergence probe: per layer, how alike are the base K and V (x·W_k, x·W_v) that different agents compute over one
shared context? ForkKV shares exactly these entries; where agents' hidden states x drift apart, sharing costs.

    .venv/bin/python bench/quality/probe.py [--tokens 1000]

For every pair of agents (the trained role adapters and the adapter-free model), the cosine similarity of their
per-token base K (and V) vectors over one test ledger, averaged over tokens, per layer (LRAgent reports the same
quantity). Layer 0 sees the embeddings alone, so every pair agrees exactly there. Float32, HF transformers, CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tasks  # noqa: E402
import train  # noqa: E402


def load_adapter(model, adapter_dir: Path) -> dict:
    """Wrap q/k/v/o in LoRALinear and load a PEFT adapter's tensors into them; returns the wrapped modules."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    wrapped = train.attach_lora(model, config["r"], config["lora_alpha"], seed=0)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for name, module in wrapped.items():
        module.lora_A.data.copy_(tensors[f"base_model.model.{name}.lora_A.weight"].float())
        module.lora_B.data.copy_(tensors[f"base_model.model.{name}.lora_B.weight"].float())
    return wrapped


@torch.no_grad()
def base_kv(model_dir: str, adapter_dir: Path | None, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (x·W_k, x·W_v) [tokens, H_kv * D] of the agent's own forward (its adapter on every layer)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    captured = []
    hooks = []
    for block in model.model.layers:
        for name in ("k_proj", "v_proj"):
            proj = getattr(block.self_attn, name)
            base = proj.base if isinstance(proj, train.LoRALinear) else proj
            hooks.append(base.register_forward_hook(lambda m, i, o: captured.append(o[0].clone())))
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    return list(zip(captured[0::2], captured[1::2]))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="bench/out/quality/probe.json")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from sglang_forkkv.model_prep import prepare_model

    model_dir = args.model or str(prepare_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    document = tasks.split("test", 1, args.tokens)[0][0].document
    ids = torch.tensor([tokenizer(document, add_special_tokens=False).input_ids])
    agents = {"none": None, **{role: HERE / "adapters" / role for role in tasks.ROLES}}
    kv = {name: base_kv(model_dir, path, ids) for name, path in agents.items()}
    layers = len(kv["none"])
    pairs = list(itertools.combinations(agents, 2))
    result = {"tokens": ids.shape[1], "pairs": [f"{a}/{b}" for a, b in pairs], "layers": []}
    for layer in range(layers):
        k = [cosine(kv[a][layer][0], kv[b][layer][0]) for a, b in pairs]
        v = [cosine(kv[a][layer][1], kv[b][layer][1]) for a, b in pairs]
        result["layers"].append({"layer": layer, "k": k, "v": v})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    roles = [p for p in result["pairs"] if "none" not in p]
    lines = ["| layer | K cos, role pairs (min / mean) | V cos, role pairs (min / mean) | K cos vs adapter-free (min) "
             "| V cos vs adapter-free (min) |", "|---|---|---|---|---|"]
    for row in result["layers"]:
        pick = lambda xs, names: [x for x, p in zip(xs, result["pairs"]) if p in names]  # noqa: E731
        k_roles, v_roles = pick(row["k"], roles), pick(row["v"], roles)
        others = [p for p in result["pairs"] if "none" in p]
        lines.append(f"| {row['layer']} | {min(k_roles):.4f} / {sum(k_roles) / len(k_roles):.4f} | "
                     f"{min(v_roles):.4f} / {sum(v_roles) / len(v_roles):.4f} | "
                     f"{min(pick(row['k'], others)):.4f} | {min(pick(row['v'], others)):.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
