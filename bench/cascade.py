"""Cascade decode: N agents over one shared base prefix, base read once per group (issue 8, step 2).

W workflows x N agents, every request 32768 keys: a shared prefix of 32672 keys (the workflow's context and common
instructions: same base slots for its N agents, as the DualRadixTree gives forked agents) and 96 keys of its own
(suffix and generated tokens). Agent i of a workflow uses adapter i (rank 16, K and V LoRA); every request has its
own residuals over all its keys. One decode step of one layer, Llama-3.1-8B heads, bf16:

    plain        ResidualAttention decode, each request reads the shared base for itself
    cascade A    plan_cascade + residual_decode(cascade=...), A agents a program (4: the 16 rows a plain program
                 pads its 4 query heads to; 8: 32 rows); the plan's cost is timed separately (once per step, not
                 per layer)
    SGLang stock SGLang 0.5.17's decode kernel over per-agent materialised KV (what stock multi-LoRA caches)
    SGLang shared  the same kernel over the shared page table with no residual: the unsafe full-sharing ceiling

Floor (cascade): one base copy per workflow plus every request's own keys and residual rows, over the measured
copy bandwidth. Timer and Setup come from bench/kernels.py (CUDA-graph replays, L2 flushed before each, medians).

GPU (repo root, after `source bench/gpu/setup.sh`): python3 bench/cascade.py --out $OUT/cascade.md
CPU smoke test (interpreter, tiny shapes): TRITON_INTERPRET=1 python bench/cascade.py --smoke
"""

import argparse
import importlib.util
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(_HERE, "kernels.py"))
bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bk)  # puts the repo root on sys.path too
try:
    from sglang_forkkv.kernels.residual_cascade import plan_cascade
except ImportError:
    from kernels.residual_cascade import plan_cascade


def shared_tables(s, workflows, agents, seq_len, shared):
    """Scattered slots, then each workflow's agents given its first agent's base slots over [0, shared)."""
    batch = workflows * agents
    tables = s.tables([seq_len] * batch, [i % agents for i in range(batch)])
    rtt = tables["req_to_token"]
    for w in range(workflows):
        lead = w * agents
        rtt[lead + 1 : lead + agents, :shared] = rtt[lead, :shared]
    return tables


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="cascade_bench.md")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--workflows", default="1,4")
    parser.add_argument("--agents", default="2,4,8,16")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workflows = [int(x) for x in args.workflows.split(",")]
    agent_counts = [int(x) for x in args.agents.split(",")]
    if args.smoke:
        h_q, h_kv, d, dtype, seq_len, own = 8, 2, 64, torch.float32, 300, 20
        workflows, agent_counts, group_sizes, min_prefix = [2], [2], [2], 16
    else:
        h_q, h_kv, d, dtype, seq_len, own = 32, 8, 128, torch.bfloat16, 32768, 96
        group_sizes, min_prefix = [2, 4, 8], 256
    shared = seq_len - own
    max_batch = max(workflows) * max(agent_counts)
    rank = 16
    # SGLang's kernel computes slot offsets in int32: 2^21 slots (64 x 32768) is the most its pool may hold
    s = bk.Setup(h_q, h_kv, d, rank, max(agent_counts), max_batch * seq_len, seq_len + 16, dtype, device)
    s.num_sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 8
    timer = bk.Timer(device, args.reps)
    copy_bw = bk.copy_bandwidth(device, (4 << 30) if not args.smoke else (1 << 20), timer)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)"
    lines = [f"device: {name}, {s.num_sms} SMs; torch {torch.__version__}; copy bandwidth {copy_bw:.0f} GB/s",
             f"every request {seq_len} keys: {shared} shared within its workflow, {own} its own; rank {rank}"]
    kv_bytes = 2 * h_kv * d * s.k_buffer.element_size()
    r_bytes = 2 * rank * s.r_buffer.element_size()
    splits_cap = bk.MAX_SPLITS
    tol = 1e-2 if dtype != torch.float32 else 1e-3
    ok = True
    rows = []
    # (label, agents a program or None for plain, warps, stages, K residual tile width)
    configs = [("plain rk32", None, 4, 3, 32), ("plain", None, 4, 3, 16)]
    configs += [(f"cascade {a} w{w} s{st} rk{rk}", a, w, st, rk) for a in group_sizes for w in (4, 8)
                for st in (2, 3) for rk in (16, 32)]
    if args.smoke:
        configs = configs[:3]
    for w in workflows:
        for n in agent_counts:
            batch = w * n
            tables = shared_tables(s, w, n, seq_len, shared)
            q = torch.randn(batch, h_q, d, device=device).to(dtype)
            args_ = s.args(tables)
            args_["cos_sin_cache"] = s.cos_sin_half
            ref = bk.residual_decode_ref(q[:4], **{**s.args(tables), **{k: tables[k][:4] for k in (
                "req_pool_indices", "seq_lens", "lora_slot")}}) if device == "cuda" or args.smoke else None
            row = {"W": w, "N": n, "batch": batch}
            plans = {}
            for agents in group_sizes:
                plan = plan_cascade(tables["req_to_token"], tables["req_pool_indices"], tables["seq_lens"], agents,
                                    h_kv, s.num_sms, width=seq_len, min_prefix=min_prefix)
                plans[agents] = plan
                grouped = int((plan.kv_start > 0).sum())
                ok &= grouped == (batch if n > 1 else 0)
                row[f"plan {agents}"] = timer(lambda: plan_cascade(
                    tables["req_to_token"], tables["req_pool_indices"], tables["seq_lens"], agents, h_kv, s.num_sms,
                    width=seq_len, min_prefix=min_prefix, out=plan))
            for label, agents, warps, stages, rk in configs:
                plan = plans.get(agents)
                start = plan.kv_start if plan is not None else 0
                splits = bk.choose_num_kv_splits(tables["seq_lens"] - start, h_kv, splits_cap, s.num_sms)
                total = (plan.max_splits if plan is not None else 0) + splits_cap
                o = torch.full_like(q, float("nan"))
                logits = torch.empty(batch, h_q, total, d, device=device)
                lse = torch.empty(batch, h_q, total, device=device)

                def run(plan=plan, splits=splits, o=o, logits=logits, lse=lse, warps=warps, stages=stages, rk=rk):
                    bk.residual_decode(q, **args_, o=o, attn_logits=logits, attn_lse=lse, num_kv_splits=splits,
                                       block_n=32, num_warps=warps, num_stages=stages, cascade=plan, block_rk=rk)

                run()
                err = bk.rel_err(o[:4], ref) if ref is not None else 0.0
                good = err < tol and not o.isnan().any()
                ok &= good
                lines.append(f"W {w} N {n} {label}: vs float64 reference (4 requests) rel_err {err:.2e}"
                             + ("" if good else " FAILED"))
                row[label] = timer(run)
            # SGLang stock: every agent its own materialised copy (the tables' private slots, no sharing)
            sep = s.tables([seq_len] * batch, [0] * batch)
            plain_splits = bk.choose_num_kv_splits(tables["seq_lens"], h_kv, splits_cap, s.num_sms)
            sg_splits = torch.full((batch,), bk.SGL_SPLITS, dtype=torch.int32, device=device)
            row["SGLang stock"] = min(timer(bk.sglang_decode_runner(s, sep, q, sg_splits, bk.SGL_SPLITS)[1]),
                                      timer(bk.sglang_decode_runner(s, sep, q, plain_splits, splits_cap)[1]))
            # the ceiling: one shared page table, base only
            row["SGLang shared"] = min(timer(bk.sglang_decode_runner(s, tables, q, sg_splits, bk.SGL_SPLITS)[1]),
                                       timer(bk.sglang_decode_runner(s, tables, q, plain_splits, splits_cap)[1]))
            floor_bytes = w * shared * kv_bytes + batch * own * kv_bytes + batch * seq_len * (r_bytes + 8)
            row["floor"] = floor_bytes / copy_bw / 1e3
            rows.append(row)
            print(row, flush=True)
    cascade_labels = [c[0] for c in configs if c[1] is not None]
    sweep = bk.md_table(["config"] + [f"W {r['W']} N {r['N']} us" for r in rows],
                        [[c[0]] + [f"{r[c[0]]:.0f}" for r in rows] for c in configs])
    header = ["W", "N", "batch", "floor us", "plain us (rk32)", "plain us", "best cascade us", "best cascade config",
              "plan us", "SGLang stock us", "SGLang shared (ceiling) us", "best cascade / plain",
              "best cascade / ceiling", "best cascade / floor"]
    table = []
    for r in rows:
        best = min(cascade_labels, key=lambda k: r[k])
        c = r[best]
        table.append([r["W"], r["N"], r["batch"], f"{r['floor']:.0f}", f"{r['plain rk32']:.0f}", f"{r['plain']:.0f}",
                      f"{c:.0f}", best, f"{max(r[f'plan {a}'] for a in group_sizes):.0f}",
                      f"{r['SGLang stock']:.0f}", f"{r['SGLang shared']:.0f}", f"{c / r['plain']:.2f}",
                      f"{c / r['SGLang shared']:.2f}", f"{c / r['floor']:.2f}"])
    lines.append(f"correctness: {'PASS' if ok else 'FAIL'}")
    text = ("\n".join(f"- {x}" for x in lines) + "\n\n" + bk.md_table(header, table) + "\n\n### Every configuration\n\n"
            + sweep + "\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
