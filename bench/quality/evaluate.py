"""What sharing costs in quality: the trained role adapters of bench/quality/ through the real server (HTTP), per
system, context length and agent order.

    .venv/bin/python bench/quality/evaluate.py --systems stock recompute eager --lengths 1000 --ledgers 40

For each test ledger the three role agents ask their question one after another (the first one prefills the shared
ledger; the cache is flushed between ledgers, so each ledger starts cold), greedy, float32 on the CPU. Per system and
role it reports task accuracy, greedy agreement with stock SGLang (the exact per-adapter cache: the reply's tokens
all equal), the mean KL(stock || system) of the first answer token's next-token distribution (full vocabulary), and
the KV the three agents held against what stock holds for them.

Systems: ``stock`` (no --forkkv), or --forkkv as parts joined by ``+``: ``recompute`` or ``eager`` (--forkkv-mode;
recompute if neither), ``private:SPEC`` (the layers of --forkkv-private-layers SPEC kept per adapter, e.g.
``private:last:15``) and ``base-model`` (the ledger first prefilled by a request without an adapter, so the
adapter-free model writes the base and every agent reads it alike: what sharing-aware adapters are trained for, see
train.py). For example ``base-model+private:last:15``. Orders: ``forward`` (extract, count, check) and ``reverse``.
``--adapters`` picks the adapter set: ``adapters`` (plain) or ``adapters-aware`` (sharing-aware).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tasks  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_e2e", HERE.parent / "e2e.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)

CPU_FLAGS = ["--device", "cpu", "--dtype", "float32", "--attention-backend", "torch_native", "--lora-backend",
             "torch_native", "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
             "--sleep-on-idle", "--max-loras-per-batch", str(len(tasks.ROLES) + 1), "--log-level", "warning"]
ORDERS = {"forward": tasks.ROLES, "reverse": tuple(reversed(tasks.ROLES))}
MAX_NEW_TOKENS = 6


def system_flags(system: str) -> list[str]:
    if system == "stock":
        return []
    parts = system.split("+")
    unknown = [p for p in parts if p not in ("recompute", "eager", "base-model") and not p.startswith("private:")]
    if unknown:
        raise ValueError(f"unknown system part(s) {unknown} in {system!r}")
    flags = ["--forkkv", "--forkkv-mode", "eager" if "eager" in parts else "recompute"]
    for part in parts:
        if part.startswith("private:"):
            flags += ["--forkkv-private-layers", part.split(":", 1)[1]]
    return flags


def base_model_writes(system: str) -> bool:
    return "base-model" in system.split("+")


def ask(url: str, case: tasks.Case, vocab: int) -> dict:
    """The agent's greedy reply, then the full next-token distribution of its answer's first content token (a second
    request over the now cached prompt, from the same cache entries). Numbers start with a bare space token in
    SmolLM2's tokenizer (" 514" is " ", "5", "1", "4"), whose distribution says nothing: their KL is taken at the
    first digit, after the prompt and that space."""
    body = {"text": case.prompt, "lora_path": case.role,
            "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS, "stop": "\n"}}
    reply = e2e.post(url, "/generate", body)
    row = {"text": reply["text"], "output_ids": reply.get("output_ids"), "correct": tasks.score(case, reply["text"]),
           "cached_tokens": reply["meta_info"].get("cached_tokens", 0)}
    if not vocab:  # no distribution wanted (the CI guard)
        return row
    text = case.prompt + (" " if case.answer.strip().isdigit() else "")
    body = {"text": text, "lora_path": case.role, "sampling_params": {"temperature": 0, "max_new_tokens": 1},
            "return_logprob": True, "top_logprobs_num": vocab}
    top = e2e.post(url, "/generate", body)["meta_info"]["output_top_logprobs"][0]
    logprobs = [0.0] * vocab
    for logprob, token, _ in top:
        logprobs[token] = logprob
    return dict(row, logprobs=logprobs)


def run_system(url: str, system: str, lengths: list[int], ledgers: int, orders: list[str], vocab: int) -> list[dict]:
    rows = []
    for length in lengths:
        # stock is exact whatever the order; with the base model as writer every agent is a follower
        for order in orders if system != "stock" and not base_model_writes(system) else ["forward"]:
            started = time.time()
            for index, cases in enumerate(tasks.split("test", ledgers, length)):
                e2e.post(url, "/flush_cache")
                if base_model_writes(system):
                    e2e.post(url, "/generate", {"text": cases[0].document,
                                                "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
                by_role = {c.role: c for c in cases}
                for position, role in enumerate(ORDERS[order]):
                    row = ask(url, by_role[role], vocab)
                    rows.append(dict(row, system=system, length=length, order=order, ledger=index, role=role,
                                     position=position))
                stats = e2e.forkkv_stats(url)
                if stats:
                    rows[-1]["kv"] = {k: stats[k] for k in ("forkkv_bytes", "per_adapter_bytes")}
            print(f"{system:>10} {length:>5} {order:>7}: {ledgers} ledgers in {time.time() - started:.0f} s", flush=True)
    return rows


def kl(p_logprobs: list[float], q_logprobs: list[float]) -> float:
    """KL(p || q) in nats over the full vocabulary."""
    return sum(math.exp(p) * (p - q) for p, q in zip(p_logprobs, q_logprobs) if p > -60)


def summarise(rows: list[dict]) -> list[dict]:
    reference = {(r["length"], r["ledger"], r["role"]): r for r in rows if r["system"] == "stock"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        for role in (r["role"], "all"):
            groups.setdefault((r["system"], r["length"], r["order"], role), []).append(r)
    out = []
    for (system, length, order, role), members in groups.items():
        refs = [reference.get((r["length"], r["ledger"], r["role"])) for r in members]
        paired = [(r, ref) for r, ref in zip(members, refs) if ref is not None]
        kv = [r["kv"] for r in rows if r["system"] == system and r["length"] == length and r["order"] == order
              and "kv" in r]
        out.append({
            "system": system, "length": length, "order": order, "role": role, "cases": len(members),
            # the agent that prefilled the ledger (none where the adapter-free model did)
            "first_in_order": role != "all" and ORDERS[order][0] == role and not base_model_writes(system),
            "accuracy": sum(r["correct"] for r in members) / len(members),
            # stock's accuracy on the same cases: the exact reference of this row's loss
            "exact_accuracy": sum(ref["correct"] for _, ref in paired) / len(paired) if paired else None,
            "agreement": sum(r["output_ids"] == ref["output_ids"] for r, ref in paired) / len(paired) if paired else None,
            "kl": sum(kl(ref["logprobs"], r["logprobs"]) for r, ref in paired) / len(paired) if paired else None,
            "kv_ratio": (sum(k["per_adapter_bytes"] for k in kv) / sum(k["forkkv_bytes"] for k in kv)) if kv else None,
        })
    return out


def table(summary: list[dict]) -> str:
    lines = ["| system | context | order | role | cases | accuracy | vs exact (points) | agreement with stock | KL (nats) "
             "| KV saved |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["length"], s["system"] != "stock", s["system"], s["order"],
                                            s["role"] == "all", s["role"])):
        first = " (first)" if s["first_in_order"] and s["system"] != "stock" else ""
        lines.append(
            f"| {s['system']} | {s['length']} | {s['order']} | {s['role']}{first} | {s['cases']} | "
            f"{100 * s['accuracy']:.1f}% | "
            + ("-" if s["exact_accuracy"] is None else f"{100 * (s['accuracy'] - s['exact_accuracy']):+.1f}") + " | "
            + ("-" if s["agreement"] is None else f"{100 * s['agreement']:.1f}%")
            # an exact system's KL is float noise of either sign
            + " | " + ("-" if s["kl"] is None else f"{max(s['kl'], 0.0):.4f}") + " | "
            + ("1.00x" if s["system"] == "stock" else (f"{s['kv_ratio']:.2f}x" if s["kv_ratio"] else "-")) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["stock", "recompute", "eager"],
                        help="stock, or +-joined parts of recompute, eager, base-model, private:SPEC")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1000])
    parser.add_argument("--ledgers", type=int, default=40)
    parser.add_argument("--orders", nargs="+", default=["forward", "reverse"], choices=list(ORDERS))
    parser.add_argument("--out", default="bench/out/quality")
    parser.add_argument("--reuse", action="store_true", help="load systems already run into --out instead of rerunning")
    parser.add_argument("--model", default=None, help="HF folder (default: sglang_forkkv.model_prep's)")
    parser.add_argument("--adapters", default="adapters", choices=["adapters", "adapters-aware"],
                        help="the adapter set under bench/quality/ (plain, or sharing-aware)")
    args = parser.parse_args(argv)
    if "stock" not in args.systems:
        parser.error("stock is the reference of agreement and KL: include it")
    for system in args.systems:
        try:
            system_flags(system)
        except ValueError as error:
            parser.error(str(error))
    from sglang_forkkv.model_prep import prepare_model

    model = args.model or str(prepare_model())
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    adapters = {role: str(HERE / args.adapters / role) for role in tasks.ROLES}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = ["--max-total-tokens", str(4 * max(args.lengths) + 4096)]
    rows = []
    for system in ["stock"] + [s for s in args.systems if s != "stock"]:
        # each system's rows (log-probabilities included) are kept, so later runs can add systems or orders
        saved = out / f"rows-{system.replace(':', '-')}.json"
        if args.reuse and saved.exists():
            rows += [r for r in json.loads(saved.read_text()) if r["length"] in args.lengths]
            continue
        spec = [(CPU_FLAGS + pool + system_flags(system), out / f"server-{system.replace(':', '-')}.log")]
        with e2e.servers(model, adapters, spec, cpu=True) as (url,):
            new = run_system(url, system, args.lengths, args.ledgers, args.orders, vocab)
        saved.write_text(json.dumps(new))
        rows += new
    summary = summarise(rows)
    (out / "quality.json").write_text(json.dumps(
        {"args": vars(args), "summary": summary,
         "rows": [{k: v for k, v in r.items() if k != "logprobs"} for r in rows]}, indent=1) + "\n")
    print(table(summary))
    return summary


if __name__ == "__main__":
    main()
