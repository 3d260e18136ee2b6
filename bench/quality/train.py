"""Train one LoRA adapter per role of tasks.py on SmolLM2-135M-Instruct; seeded, plain torch (no peft).

    python bench/quality/train.py --model MODEL_DIR --out ADAPTERS_DIR [--roles extract count check] [--steps 400]
        [--regimes stock base-model base-model-eager]

Regimes (each training row draws one): how the ledger's K and V are written, as the server would write them.
``stock``: from the agent's own hidden states (SGLang's exact per-adapter cache). ``base-model``: the ledger's base
K/V ``x W`` from the adapter-free model's hidden states, the agent's residuals ``x A`` from its own (an adapter-free
request prefilled the ledger; the agent recomputes its residuals, `--forkkv-mode recompute`). ``base-model-eager``:
base and residuals both from the adapter-free hidden states (the adapter-free prefill wrote every resident adapter's
residuals, `--forkkv-mode eager`). The question and answer tokens are always the agent's own. Training on the
sharing regimes makes adapters that expect to read a base written by the base model ("sharing-aware").

Writes ``ADAPTERS_DIR/<role>/`` in PEFT's on-disk format (bf16 tensors, q/k/v/o, rank 8) and ``train_log.json`` (loss
curve, held-out accuracy of HF greedy decoding with the adapter). Made on the GPU (`bench/quality/gpu_train.sh`): a
step on 8 ledgers of up to 4K tokens takes a fraction of a second there and minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from sglang_forkkv.config import private_layer_set  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
REGIMES = ("stock", "base-model", "base-model-eager")


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
        self.enabled = True  # False: the adapter-free model
        # (writer [B, T, in], base_rows [B, T, 1], lora_rows [B, T, 1]) on a sharing step: where a mask is set, that
        # part of the projection reads the adapter-free model's input instead of this agent's
        self.shared = None

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        x_base = x_lora = x
        if self.shared is not None:
            writer, base_rows, lora_rows = self.shared
            writer = writer.to(x.dtype)
            x_base, x_lora = torch.where(base_rows, writer, x), torch.where(lora_rows, writer, x)
        return self.base(x_base) + (x_lora @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def attach_lora(model, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for layer, block in enumerate(model.model.layers):
        for name in TARGETS:
            module = LoRALinear(getattr(block.self_attn, name), rank, alpha, generator)
            setattr(block.self_attn, name, module)
            wrapped[f"model.layers.{layer}.self_attn.{name}"] = module
    return wrapped


@dataclasses.dataclass
class Example:
    prompt: list[int]
    answer: list[int]  # the answer's ids and the newline that ends it
    shared: int  # the prompt's first `shared` ids are the ledger, which the server shares between agents
    regime: str = "stock"


def encode(tokenizer, case: tasks.Case, regime: str = "stock") -> Example:
    """The server tokenizes the prompt text the same way (no BOS), and its radix tree shares the ledger's ids that
    the prompt's ids start with (the question's first token may merge with the ledger's last: not shared then)."""
    prompt = tokenizer(case.prompt, add_special_tokens=False).input_ids
    answer = tokenizer(case.answer + "\n", add_special_tokens=False).input_ids
    document = tokenizer(case.document, add_special_tokens=False).input_ids
    shared = next((i for i, (a, b) in enumerate(zip(prompt, document)) if a != b), min(len(prompt), len(document)))
    return Example(prompt, answer, shared, regime)


def set_sharing(wrapped: dict[str, LoRALinear], writer_inputs: list[torch.Tensor] | None, base_rows=None,
                lora_rows=None, private: frozenset = frozenset()) -> None:
    """Point each shared layer's k/v projections at the adapter-free model's inputs of that layer (None: no
    sharing); the ``private`` layers (--forkkv-private-layers) keep the agent's own K and V."""
    for name, module in wrapped.items():
        if name.endswith(("k_proj", "v_proj")):
            layer = int(name.split(".")[2])
            sharing = writer_inputs is not None and layer not in private
            module.shared = (writer_inputs[layer], base_rows, lora_rows) if sharing else None


@torch.no_grad()
def writer_inputs(model, wrapped: dict[str, LoRALinear], ids, mask) -> list[torch.Tensor]:
    """Each layer's k_proj input (the normed hidden states) in the adapter-free model: what writes a shared base."""
    captured, hooks = {}, []
    for name, module in wrapped.items():
        module.enabled = False
        if name.endswith("k_proj"):
            layer = int(name.split(".")[2])
            hooks.append(module.register_forward_pre_hook(lambda m, args, layer=layer: captured.__setitem__(layer, args[0])))
    try:
        model.model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
        for module in wrapped.values():
            module.enabled = True
    return [captured[i] for i in range(len(captured))]


def forward_answers(model, wrapped, batch: list[Example], device, private: frozenset = frozenset()
                    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(logits at the positions that predict answer tokens, their targets, each example's answer length), each
    example's ledger written as its regime says."""
    length = max(len(e.prompt) + len(e.answer) for e in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    base_rows = torch.zeros(len(batch), length, 1, dtype=torch.bool)
    lora_rows = torch.zeros(len(batch), length, 1, dtype=torch.bool)
    rows, cols, targets = [], [], []
    for i, e in enumerate(batch):
        seq = e.prompt + e.answer
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        base_rows[i, : e.shared] = e.regime != "stock"
        lora_rows[i, : e.shared] = e.regime == "base-model-eager"
        for j in range(len(e.answer)):
            rows.append(i)
            cols.append(len(e.prompt) + j - 1)  # the position whose next token is answer[j]
            targets.append(e.answer[j])
    ids, mask = ids.to(device), mask.to(device)
    sharing = any(e.regime != "stock" for e in batch)
    set_sharing(wrapped, writer_inputs(model, wrapped, ids, mask) if sharing else None, base_rows.to(device),
                lora_rows.to(device), private)
    try:
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        set_sharing(wrapped, None)
    logits = model.lm_head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])
    return logits.float(), torch.tensor(targets, device=device), [len(e.answer) for e in batch]


def answer_loss(model, wrapped, batch: list[Example], device, private: frozenset = frozenset()) -> torch.Tensor:
    """Mean cross-entropy over answer tokens only; logits are computed at those positions alone."""
    logits, targets, _ = forward_answers(model, wrapped, batch, device, private)
    return nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def forced_accuracy(model, wrapped, examples: list[Example], device, batch: int = 8,
                    private: frozenset = frozenset()) -> float:
    """Share of examples whose answer (newline excluded) greedy decoding would emit, under each one's regime: every
    answer token is the argmax given the ones before it. (HF generate cannot write the ledger as the server does.)"""
    hits = 0
    for start in range(0, len(examples), batch):
        logits, targets, lengths = forward_answers(model, wrapped, examples[start: start + batch], device, private)
        right = (logits.argmax(-1) == targets).tolist()
        for n in lengths:
            hits += all(right[: n - 1])
            right = right[n:]
    return hits / len(examples)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, cases: list[tasks.Case], device, max_new_tokens: int = 5) -> float:
    hits = 0
    for case in cases:
        ids = torch.tensor([encode(tokenizer, case).prompt], device=device)
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
    private = private_layer_set(args.private_layers, len(model.model.layers))
    params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    index = tasks.ROLES.index(role)
    ledgers = tasks.split("train", args.steps * args.batch, (args.min_tokens, args.max_tokens))
    regimes = random.Random(f"regimes/{args.seed}")
    examples = [encode(tokenizer, ledger[index], regimes.choice(args.regimes)) for ledger in ledgers]
    random.Random(args.seed).shuffle(examples)
    losses, start = [], time.time()
    model.train()
    for step in range(args.steps):
        batch = examples[step * args.batch: (step + 1) * args.batch]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = answer_loss(model, wrapped, batch, device, private)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:  # a checkpoint survives a device call cut off at its time limit
            save_adapter(wrapped, Path(args.out) / role, args.rank, args.alpha, args.model)
        if step % 25 == 0 or step == args.steps - 1:
            print(f"[{role}] step {step} loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    model.eval()
    held_out = [ledger[index] for ledger in tasks.split("test", args.eval_cases, args.eval_tokens)]
    accuracy = greedy_accuracy(model, tokenizer, held_out, device)
    print(f"[{role}] held-out accuracy {accuracy:.3f} on {len(held_out)} ledgers of {args.eval_tokens} tokens", flush=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        by_regime = {regime: forced_accuracy(model, wrapped, [encode(tokenizer, c, regime) for c in held_out], device,
                                             private=private)
                     for regime in REGIMES if not (private and regime == "base-model-eager")}  # eager has no private
    print(f"[{role}] held-out accuracy per regime (teacher-forced greedy): "
          + ", ".join(f"{r} {a:.3f}" for r, a in by_regime.items()), flush=True)
    save_adapter(wrapped, Path(args.out) / role, args.rank, args.alpha, args.model)
    return {"role": role, "losses": losses, "held_out_accuracy": accuracy, "held_out_by_regime": by_regime,
            "seconds": time.time() - start}


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
    parser.add_argument("--regimes", nargs="+", default=["stock"], choices=REGIMES,
                        help="each training example draws one (default: stock, plain adapters)")
    parser.add_argument("--private-layers", default="",
                        help="layers the sharing regimes leave to the agent, as --forkkv-private-layers (e.g. last:15)")
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
