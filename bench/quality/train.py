"""Train one LoRA adapter per role of tasks.py on SmolLM2-135M-Instruct; seeded, plain torch (no peft).

    python bench/quality/train.py --model MODEL_DIR --out ADAPTERS_DIR [--roles extract count check] [--steps 400]

Writes ``ADAPTERS_DIR/<role>/`` in PEFT's on-disk format (bf16 tensors, q/k/v/o, rank 8) and ``train_log.json`` (loss
curve, held-out accuracy of HF greedy decoding with the adapter). Made on the GPU (`bench/quality/gpu_train.sh`): a
step on 8 ledgers of up to 4K tokens takes a fraction of a second there and minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """``base(x) + scaling * x A^T B^T`` with A [r, in] and B [out, r]; B starts at zero (PEFT's convention)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        bound = 1 / math.sqrt(base.in_features)
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def attach_lora(model, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for layer, block in enumerate(model.model.layers):
        for name in TARGETS:
            module = LoRALinear(getattr(block.self_attn, name), rank, alpha, generator)
            setattr(block.self_attn, name, module)
            wrapped[f"model.layers.{layer}.self_attn.{name}"] = module
    return wrapped


def encode(tokenizer, case: tasks.Case) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + newline): the server tokenizes the prompt text the same way (no BOS)."""
    prompt = tokenizer(case.prompt, add_special_tokens=False).input_ids
    answer = tokenizer(case.answer + "\n", add_special_tokens=False).input_ids
    return prompt, answer


def answer_loss(model, batch: list[tuple[list[int], list[int]]], device) -> torch.Tensor:
    """Mean cross-entropy over answer tokens only; logits are computed at those positions alone."""
    length = max(len(p) + len(a) for p, a in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (p, a) in enumerate(batch):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for j in range(len(a)):
            rows.append(i)
            cols.append(len(p) + j - 1)  # the position whose next token is a[j]
            targets.append(a[j])
    hidden = model.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])
    return nn.functional.cross_entropy(logits.float(), torch.tensor(targets, device=device))


@torch.no_grad()
def greedy_accuracy(model, tokenizer, cases: list[tasks.Case], device, max_new_tokens: int = 5) -> float:
    hits = 0
    for case in cases:
        ids = torch.tensor([encode(tokenizer, case)[0]], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        hits += tasks.score(case, tokenizer.decode(out[0, ids.shape[1]:]))
    return hits / len(cases)


def save_adapter(wrapped: dict[str, LoRALinear], out_dir: Path, rank: int, alpha: float, model_dir: str) -> None:
    from safetensors.torch import save_file

    from sglang_forkkv.test_adapters import _adapter_config

    tensors = {}
    for name, module in wrapped.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach().to(torch.bfloat16).cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach().to(torch.bfloat16).cpu().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = _adapter_config(Path("SmolLM2-135M-Instruct"), rank, alpha, list(TARGETS))
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def train_role(role: str, args, tokenizer, device) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model.requires_grad_(False)
    wrapped = attach_lora(model, args.rank, args.alpha, args.seed)
    params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    index = tasks.ROLES.index(role)
    ledgers = tasks.split("train", args.steps * args.batch, (args.min_tokens, args.max_tokens))
    examples = [encode(tokenizer, ledger[index]) for ledger in ledgers]
    random.Random(args.seed).shuffle(examples)
    losses, start = [], time.time()
    model.train()
    for step in range(args.steps):
        batch = examples[step * args.batch: (step + 1) * args.batch]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = answer_loss(model, batch, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            print(f"[{role}] step {step} loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    model.eval()
    held_out = [ledger[index] for ledger in tasks.split("test", args.eval_cases, args.eval_tokens)]
    accuracy = greedy_accuracy(model, tokenizer, held_out, device)
    print(f"[{role}] held-out accuracy {accuracy:.3f} on {len(held_out)} ledgers of {args.eval_tokens} tokens", flush=True)
    save_adapter(wrapped, Path(args.out) / role, args.rank, args.alpha, args.model)
    return {"role": role, "losses": losses, "held_out_accuracy": accuracy, "seconds": time.time() - start}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--roles", nargs="+", default=list(tasks.ROLES), choices=tasks.ROLES)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-tokens", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--eval-cases", type=int, default=40)
    parser.add_argument("--eval-tokens", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    logs = [train_role(role, args, tokenizer, device) for role in args.roles]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_log.json").write_text(json.dumps({"args": vars(args), "roles": logs}) + "\n")
    return logs


if __name__ == "__main__":
    main()
