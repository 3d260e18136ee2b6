"""forkkv against stock SGLang on the GPU (bf16, random weights and adapters): how close, and where by design not.

    python3 bench/gpu/check_correctness.py --model DIR --loras DIR --out OUT [--mode recompute]

Starts a stock server and a `--forkkv` server side by side (triton attention and LoRA) and sends both the same
greedy requests (G = 32 tokens, ignore_eos):
  own        one distinct prompt per adapter (and one without): each request writes its own base entries, so
             forkkv should give what stock gives, up to bf16 rounding (other kernels, K/V LoRA added in another order)
  fork       a0 prefills a shared context first (the writer), then a1..a3 fork over it: the writer must match
             stock; the forks read a0's base entries (the approximation of DESIGN.md section 3)
  twin       a0 prefills a context, then `twin` (a0's weights under another name) forks over it: sharing between
             identical adapters must match a0's own output
Reports, per group: greedy token agreement with stock and |first-token logprob - stock's|.

With --graphs a third server runs forkkv with decode CUDA graphs (the other two run without graphs) and every
group is compared with the graph-free forkkv server too: the same kernels replayed from a graph must give the
same tokens.
"""

import argparse
import concurrent.futures
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e import GPU_FLAGS, forkkv_stats, graph_flags, post, servers  # noqa: E402

GEN = 32


def generate(url, ids, lora):
    body = {"input_ids": ids, "lora_path": lora, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": GEN, "ignore_eos": True}}
    out = post(url, "/generate", body)
    return {"ids": out["output_ids"], "lp0": out["meta_info"]["output_token_logprobs"][0][0],
            "cached": out["meta_info"]["cached_tokens"]}


def run_all(url, reqs):
    with concurrent.futures.ThreadPoolExecutor(max(len(reqs), 1)) as pool:
        return list(pool.map(lambda r: generate(url, *r), reqs))


def compare(name, forkkv, stock):
    agree = [sum(a == b for a, b in zip(f["ids"], s["ids"])) / GEN for f, s in zip(forkkv, stock)]
    prefix = [next((i for i, (a, b) in enumerate(zip(f["ids"], s["ids"])) if a != b), GEN)
              for f, s in zip(forkkv, stock)]
    dlp = [abs(f["lp0"] - s["lp0"]) for f, s in zip(forkkv, stock)]
    return {"group": name, "agreement": agree, "same_prefix_tokens": prefix, "first_logprob_abs_diff": dlp}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--loras", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="recompute")
    p.add_argument("--graphs", action="store_true", help="also a forkkv server with decode CUDA graphs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapters = {f"a{i}": f"{args.loras}/a{i}" for i in range(4)}
    adapters["twin"] = adapters["a0"]
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(7)

    def tokens(n):
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    base = GPU_FLAGS + [
        "--mem-fraction-static", "0.28" if args.graphs else "0.35", "--max-total-tokens", "65536"]
    forkkv = ["--forkkv", "--forkkv-mode", args.mode]
    no_graphs = graph_flags("off", 0)
    specs = [(base + no_graphs, out / "server-stock.log"),
             (base + no_graphs + forkkv, out / f"server-forkkv-{args.mode}.log")]
    if args.graphs:
        specs.append((base + graph_flags("decode", 16) + forkkv,
                      out / f"server-forkkv-{args.mode}-graphs.log"))
    report = []
    with servers(args.model, adapters, specs) as urls:
        stock_url, forkkv_url = urls[:2]
        systems = [("stock", stock_url), ("forkkv", forkkv_url)] + ([("graphs", urls[2])] if args.graphs else [])
        own = [(tokens(300 + 37 * i), lora) for i, lora in enumerate(["a0", "a1", "a2", "a3", None])]
        ctx = tokens(1500)
        writer = [(ctx + tokens(32), "a0")]
        forks = [(ctx + tokens(32), f"a{i}") for i in (1, 2, 3)]
        ctx2, tail = tokens(1200), tokens(32)
        twin_first, twin_second = [(ctx2 + tail, "a0")], [(ctx2 + tail, "twin")]
        results = {}
        for name, url in systems:
            r = {"own": run_all(url, own), "writer": run_all(url, writer), "forks": run_all(url, forks),
                 "twin_first": run_all(url, twin_first), "twin_second": run_all(url, twin_second)}
            results[name] = r
        stats = forkkv_stats(forkkv_url)
    f, s = results["forkkv"], results["stock"]
    report.append(compare("own prompts (a0..a3, none)", f["own"], s["own"]))
    report.append(compare("shared context: writer a0", f["writer"], s["writer"]))
    report.append(compare("shared context: forks a1..a3", f["forks"], s["forks"]))
    report.append(compare("twin after a0 (vs stock twin)", f["twin_second"], s["twin_second"]))
    report.append(compare("twin after a0 (vs forkkv a0)", f["twin_second"], f["twin_first"]))
    report.append({"group": "forks cached tokens (forkkv / stock)",
                   "forkkv": [x["cached"] for x in f["forks"] + f["twin_second"]],
                   "stock": [x["cached"] for x in s["forks"] + s["twin_second"]]})
    if args.graphs:
        g = results["graphs"]
        for key, label in (("own", "own prompts"), ("writer", "writer a0"), ("forks", "forks a1..a3"),
                           ("twin_second", "twin after a0")):
            report.append(compare(f"decode graphs vs none: {label}", g[key], f[key]))
    report.append({"group": "forkkv counters", **{k: stats[k] for k in
                   ("base_hit_tokens", "residual_hit_tokens", "base_tokens", "residual_tokens")}})
    (out / f"correctness-{args.mode}{'-graphs' if args.graphs else ''}.json").write_text(json.dumps(report, indent=1))
    for row in report:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
