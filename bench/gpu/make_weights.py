"""Random Llama weights and random PEFT LoRA adapters, made on the device's GPU from a carried config.json.

    python3 bench/gpu/make_weights.py --config bench/gpu/llama8b --layers 4 --adapters 8 --rank 16 --out /tmp/w4

Writes OUT/model (bf16 safetensors + config.json) and OUT/loras/a0 .. a{n-1} (q, k, v, o; alpha = 2 r). Random
weights are right for speed and memory figures only; quality is measured with real weights on the CPU.
"""

import argparse
import math
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

# lora_B ~ N(0, B_STD): with A ~ N(0, 1/in), scaling 2 and rank 16 the delta is ~10% of the base output
# (base weights ~ N(0, 0.02), HF's initializer_range).
B_STD = 0.016


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--layers", type=int)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    cfg = AutoConfig.from_pretrained(args.config)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out / "model")
    peft_model = get_peft_model(model, LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False))
    for i in range(args.adapters):
        g = torch.Generator(device="cuda").manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:
                    param.normal_(0, 1 / math.sqrt(param.shape[1]), generator=g)
                elif "lora_B" in name:
                    param.normal_(0, B_STD, generator=g)
        peft_model.save_pretrained(out / "loras" / f"a{i}")
    print(f"weights ready in {out}: {cfg.num_hidden_layers} layers, {args.adapters} adapters of rank {args.rank}")


if __name__ == "__main__":
    main()
