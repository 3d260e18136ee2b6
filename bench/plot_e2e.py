"""Plots of bench/e2e.py results: output tokens/s and peak KV memory against the number of agents N.

    python bench/plot_e2e.py --results e2e.json [more.json ...] --config bench/gpu/llama8b/config.json --rank 16 \
        --out bench/e2e_c8k.png

KV memory: base entries (peak tokens in SGLang's pool x 2 x layers x H_kv x D x 2 bytes, bf16) plus, for forkkv,
the peak residual slots x 2 x layers x R_MAX x 2 bytes. Needs matplotlib (not a dependency of the package).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def kv_gb(row: dict, base_bytes: int, residual_bytes: int) -> float:
    return (row["peak_kv_tokens"] * base_bytes + row.get("peak_residual_slots", 0) * residual_bytes) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", nargs="+", required=True)
    p.add_argument("--config", required=True, help="the model's config.json")
    p.add_argument("--rank", type=int, required=True, help="R_MAX of the residual pool")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = json.loads(Path(args.config).read_text())
    layers, head_dim = cfg["num_hidden_layers"], cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    base_bytes = 2 * layers * cfg["num_key_value_heads"] * head_dim * 2
    residual_bytes = 2 * layers * args.rank * 2
    rows = [r for path in args.results for r in json.loads(Path(path).read_text())]
    context = sorted({r["context"] for r in rows})
    fig, (tput, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for system in sorted({r["system"] for r in rows}):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["agents"])
        n = [r["agents"] for r in mine]
        tput.plot(n, [r["output_tok_s"] for r in mine], marker="o", label=system)
        mem.plot(n, [kv_gb(r, base_bytes, residual_bytes) for r in mine], marker="o", label=system)
    for ax, title, unit in ((tput, "output throughput", "output tokens/s"), (mem, "peak KV memory", "GB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("agents per workflow (N)")
        ax.set_ylabel(unit)
        ax.set_title(f"{title}, C = {'/'.join(str(c) for c in context)}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
