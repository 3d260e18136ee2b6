"""Plots of bench/e2e.py results against the number of agents N: output tokens/s, peak KV memory and, for result
files that record it, the most requests SGLang ran at once (runs that retracted requests marked with a red x).

    python bench/plot_e2e.py --results e2e.json [more.json ...] --config bench/gpu/llama8b/config.json --rank 16 \
        --out bench/e2e_c8k.png

One line per system and workload shape: rows with more than one round or with Poisson arrivals get their own line
(label `system R=2 0.5 wf/s`), and so do different W where the files mix them (`W=4`); rows from before rounds and
arrival modes existed count as one round, closed loop.
KV memory: base entries (peak tokens in SGLang's pool x 2 x layers x H_kv x D x 2 bytes, bf16) plus, for forkkv,
the peak residual slots x 2 x layers x R_MAX x 2 bytes. Needs matplotlib (not a dependency of the package).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def kv_gb(row: dict, base_bytes: int, residual_bytes: int) -> float:
    return (row["peak_kv_tokens"] * base_bytes + row.get("peak_residual_slots", 0) * residual_bytes) / 1e9


def series_key(row: dict) -> tuple:
    """Rows on one line: same system, W, rounds and arrival rate (older files lack the last two: 1 round, closed)."""
    return row["system"], row["workflows"], row.get("rounds", 1), row.get("request_rate")


def series_label(key: tuple, show_w: bool = False) -> str:
    system, workflows, rounds, rate = key
    return (system + (f" W={workflows}" if show_w else "") + (f" R={rounds}" if rounds != 1 else "")
            + (f" {rate:g} wf/s" if rate is not None else ""))


def series(rows: list) -> dict:
    """series key -> its rows sorted by N."""
    out = {}
    for row in rows:
        out.setdefault(series_key(row), []).append(row)
    return {k: sorted(v, key=lambda r: r["agents"]) for k, v in sorted(out.items(), key=lambda kv: str(kv[0]))}


def plot_running(ax, lines: dict, show_w: bool):
    """Peak running requests against N; a red x where the run retracted requests (it was not served at once)."""
    for key, mine in lines.items():
        mine = [r for r in mine if "peak_running_reqs" in r]
        if not mine:
            continue
        ax.plot([r["agents"] for r in mine], [r["peak_running_reqs"] for r in mine], marker="o",
                label=series_label(key, show_w))
        bad = [r for r in mine if r.get("retracted_reqs", 0) > 0]
        ax.scatter([r["agents"] for r in bad], [r["peak_running_reqs"] for r in bad], marker="x", color="red", s=80,
                   zorder=3)
    # every agent of every workflow at once: the most a closed-loop run can have running
    n = sorted({r["agents"] for mine in lines.values() for r in mine if "peak_running_reqs" in r})
    for w in sorted({r["workflows"] for mine in lines.values() for r in mine if "peak_running_reqs" in r}):
        ax.plot(n, [w * x for x in n], ls="--", color="grey", lw=1, label=f"W x N (W={w})")


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
    lines = series(rows)
    show_w = len({r["workflows"] for r in rows}) > 1
    running = any("peak_running_reqs" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if running else 2, figsize=(16.5 if running else 11, 4))
    tput, mem = axes[0], axes[1]
    for key, mine in lines.items():
        n = [r["agents"] for r in mine]
        tput.plot(n, [r["output_tok_s"] for r in mine], marker="o", label=series_label(key, show_w))
        mem.plot(n, [kv_gb(r, base_bytes, residual_bytes) for r in mine], marker="o", label=series_label(key, show_w))
    panels = [(tput, "output throughput", "output tokens/s"), (mem, "peak KV memory", "GB")]
    if running:
        plot_running(axes[2], lines, show_w)
        panels.append((axes[2], "peak running requests (x: retracted)", "requests"))
    for ax, title, unit in panels:
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
