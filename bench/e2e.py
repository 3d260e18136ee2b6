"""End-to-end multi-agent benchmark (issue 7): W workflows x N agents over HTTP to `python -m sglang.launch_server`.

Workflow w has its own shared context of C tokens; agent a of it (adapter a, one per agent) sends context + a
32-token suffix of its own and generates G tokens (greedy, ignore_eos). All W*N requests are sent at once
(closed loop, one request per agent), streamed, with input_ids (the server runs with --skip-tokenizer-init).

Systems (one server each, started and stopped here; `ceiling` reuses the stock server after /flush_cache):
    stock      SGLang 0.5.17 as shipped: the prefix cache is keyed by adapter, so every agent prefills C
    ceiling    stock with every agent on adapter 0: the context is shared, no residuals (unsafe: wrong adapter)
    recompute  --forkkv --forkkv-mode recompute: shared base entries, each agent recomputes its residuals
    eager      --forkkv --forkkv-mode eager: the first prefill of a context writes every resident adapter's residuals

Metrics per system: output and total tok/s, TTFT and ITL median/p99, peak KV tokens in use (SGLang's own
`#token` / `token usage` log lines; forkkv adds peak residual slots from /get_server_info), prefill tokens
computed (prompt tokens minus tokens no forward ran over: stock's cached_tokens, forkkv's residual hits).

    python bench/e2e.py --model DIR --adapters a0=DIR a1=DIR ... --systems stock,recompute --out OUT [--gpu-flags]
    python bench/e2e.py --cpu --out OUT   # tiny CPU smoke run: SmolLM2, the test adapters, W=1 N=2 C=64 G=4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

GPU_FLAGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--lora-backend", "triton",
             "--skip-tokenizer-init", "--disable-cuda-graph"]
CPU_FLAGS = ["--device", "cpu", "--dtype", "float32", "--attention-backend", "torch_native", "--lora-backend",
             "torch_native", "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
             "--skip-tokenizer-init", "--max-total-tokens", "8192"]
SYSTEM_FLAGS = {
    "stock": [],
    "ceiling": [],
    "recompute": ["--forkkv", "--forkkv-mode", "recompute"],
    "eager": ["--forkkv", "--forkkv-mode", "eager"],
}
SUFFIX_TOKENS = 32


##### Server #####


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def servers(model: str, adapters: dict, specs: list, timeout: float = 900, cpu: bool = False):
    """Start one server per (flags, log_path) in specs, all at once; yield their base URLs once all are healthy."""
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1") if cpu else dict(os.environ)
    procs, urls, logs = [], [], []
    try:
        for flags, log_path in specs:
            port = free_port()
            cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--host", "127.0.0.1",
                   "--port", str(port), "--enable-lora", "--lora-paths", *[f"{k}={v}" for k, v in adapters.items()],
                   "--max-loras-per-batch", str(len(adapters)), *flags]
            log = open(log_path, "w")
            log.write(" ".join(cmd) + "\n")
            log.flush()
            logs.append(log)
            # cwd outside the checkout: `-m` puts the cwd first on sys.path, and the checkout's sglang_forkkv
            # lacks the kernels subpackage that an install maps in from kernels/
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir()))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.time() + timeout
        for proc, url, (_, log_path) in zip(procs, urls, specs):
            while not healthy(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; log:\n{log_path.read_text()[-4000:]}")
                if time.time() > deadline:
                    raise TimeoutError(f"server not healthy after {timeout} s; log:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()


def healthy(url: str) -> bool:
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    return False


def post(url: str, path: str, body: dict | None = None, timeout: float = 3600) -> dict:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip().startswith(("{", "[")) else {"text": text}


def forkkv_stats(url: str) -> dict | None:
    with urllib.request.urlopen(url + "/get_server_info", timeout=30) as r:
        info = json.loads(r.read())
    return info["internal_states"][0].get("forkkv")


def generate_stream(url: str, input_ids: list, lora: str | None, gen: int) -> dict:
    """One streamed greedy request; returns start/first/end times, per-chunk (time, tokens) and meta_info."""
    body = {"input_ids": input_ids, "lora_path": lora, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": gen, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    chunks, meta = [], None
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            out = json.loads(line[5:])
            meta = out["meta_info"]
            chunks.append((time.perf_counter(), meta["completion_tokens"]))
    return {"start": start, "end": time.perf_counter(), "chunks": chunks, "meta": meta}


##### Workload #####


def workload(workflows: int, agents: int, context: int, vocab: int, seed: int) -> list[tuple[int, int, list]]:
    """[(workflow, agent, input_ids)]: one random context per workflow, one random suffix per agent."""
    rng = random.Random(seed)
    low, high = 100, vocab - 100  # stay clear of special tokens at both ends of the vocabulary
    out = []
    for w in range(workflows):
        ctx = [rng.randrange(low, high) for _ in range(context)]
        for a in range(agents):
            out.append((w, a, ctx + [rng.randrange(low, high) for _ in range(SUFFIX_TOKENS)]))
    return out


def percentile(xs: list, q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run_once(url: str, reqs: list, names: list, gen: int, same_adapter: bool, poll: bool) -> dict:
    """Send every request at once; gather the metrics of the module docstring."""
    stop = threading.Event()
    peak_residual = [0]

    def poller():
        while not stop.wait(1.0):
            with contextlib.suppress(OSError, KeyError):
                s = forkkv_stats(url)
                peak_residual[0] = max(peak_residual[0], s["residual_capacity"] - s["residual_free"])

    before = forkkv_stats(url) if poll else None
    thread = threading.Thread(target=poller, daemon=True) if poll else None
    if thread:
        thread.start()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(reqs)) as pool:
        futs = [pool.submit(generate_stream, url, ids, names[0 if same_adapter else a], gen) for _, a, ids in reqs]
        results = [f.result() for f in futs]
    wall = time.perf_counter() - t0
    stop.set()
    if thread:
        thread.join()
    after = forkkv_stats(url) if poll else None

    ttft, itl = [], []
    for res in results:
        first = next(t for t, n in res["chunks"] if n >= 1)
        ttft.append(first - res["start"])
        for (t_a, n_a), (t_b, n_b) in zip(res["chunks"], res["chunks"][1:]):
            if n_b > n_a:
                itl.extend([(t_b - t_a) / (n_b - n_a)] * (n_b - n_a))
    prompt = sum(r["meta"]["prompt_tokens"] for r in results)
    output = sum(r["meta"]["completion_tokens"] for r in results)
    if poll:
        # forkkv: a forward ran over every prompt token whose residual was missing (recompute included)
        skipped = after["residual_hit_tokens"] - before["residual_hit_tokens"]
    else:
        skipped = sum(r["meta"]["cached_tokens"] for r in results)
    out = {
        "requests": len(results), "wall_s": wall, "prompt_tokens": prompt, "output_tokens": output,
        "output_tok_s": output / wall, "total_tok_s": (prompt + output) / wall,
        "ttft_median_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 99),
        "itl_median_ms": 1e3 * statistics.median(itl) if itl else float("nan"),
        "itl_p99_ms": 1e3 * percentile(itl, 99), "prefill_tokens_computed": prompt - skipped,
    }
    if poll:
        out["peak_residual_slots"] = max(peak_residual[0], after["residual_capacity"] - after["residual_free"])
        out["base_hit_tokens"] = after["base_hit_tokens"] - before["base_hit_tokens"]
        out["forkkv_after"] = after
    return out


def peak_kv_tokens(log_text: str, capacity: int) -> int:
    """Largest KV token count SGLang logged (decode lines give '#token: N', prefill lines 'token usage: F')."""
    counts = [int(m) for m in re.findall(r"#token: (\d+)", log_text)]
    usages = [float(m) for m in re.findall(r"token usage: ([0-9.]+)", log_text)]
    return max(counts + [int(u * capacity) for u in usages] + [0])


def run_system(args, system: str, url: str, log_path: Path, names: list, vocab: int, seed: int) -> dict:
    if not args.cpu:
        # warm-up: Triton compilation stays out of the timing, and every agent's adapter is loaded into SGLang's
        # LoRA buffer (eager mode writes residuals only for resident adapters, DESIGN.md section 3)
        warm = workload(1, len(names), min(args.context, 512), vocab, seed + 1000)
        run_once(url, warm, names, 4, same_adapter=False, poll=False)
    post(url, "/flush_cache")
    offset = len(log_path.read_text())
    reqs = workload(args.workflows, len(names), args.context, vocab, seed)
    res = run_once(url, reqs, names, args.gen, same_adapter=system == "ceiling", poll=system in ("recompute", "eager"))
    info = json.loads(urllib.request.urlopen(url + "/get_server_info", timeout=30).read())
    capacity = int(info["internal_states"][0]["memory_usage"]["token_capacity"])
    res["kv_capacity_tokens"] = capacity
    res["peak_kv_tokens"] = peak_kv_tokens(log_path.read_text()[offset:], capacity)
    res["system"] = system
    return res


##### Entry point #####


def cpu_setup(out: Path):
    """SmolLM2 (sglang_forkkv.model_prep) and the seeded test adapters (sglang_forkkv.test_adapters)."""
    from sglang_forkkv.model_prep import prepare_model
    from sglang_forkkv.test_adapters import TEST_ADAPTERS, make_lora_adapter

    model = prepare_model()
    adapters = {name: str(make_lora_adapter(out / "adapters" / name, model, **spec))
                for name, spec in TEST_ADAPTERS.items()}
    return str(model), adapters


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--adapters", nargs="*", default=[], help="name=dir, one per agent (agent a uses the a-th)")
    p.add_argument("--systems", default="stock,ceiling,recompute,eager")
    p.add_argument("--workflows", type=int, default=4)
    p.add_argument("--agents", default="8", help="N, or a comma list N1,N2,...: each N runs on the same servers")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--extra", default="", help="extra server flags, one string")
    p.add_argument("--forkkv-extra", default="", help="extra server flags for forkkv systems only")
    p.add_argument("--cpu", action="store_true", help="tiny CPU run (SmolLM2, test adapters, W=1 N=2 C=64 G=4)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.agents = [int(n) for n in str(args.agents).split(",")]
    if args.cpu:
        args.workflows, args.context, args.gen = min(args.workflows, 1), min(args.context, 64), min(args.gen, 4)
        args.agents = [min(n, 2) for n in args.agents]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        model, adapters = cpu_setup(out)
        base_flags = CPU_FLAGS
    else:
        model, adapters = args.model, dict(a.split("=", 1) for a in args.adapters)
        base_flags = GPU_FLAGS
    names = list(adapters)[: max(args.agents)]
    if len(names) < max(args.agents):
        raise ValueError(f"{max(args.agents)} agents need as many adapters, got {len(names)}: {names}")
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    systems = args.systems.split(",")
    results = []
    # stock and ceiling share one server (the ceiling run follows a /flush_cache)
    groups = [[s for s in systems if s in ("stock", "ceiling")]] + [[s] for s in systems if s in ("recompute", "eager")]
    for group in filter(None, groups):
        flags = base_flags + args.extra.split() + SYSTEM_FLAGS[group[0]]
        if group[0] in ("recompute", "eager"):
            flags += args.forkkv_extra.split()
        log_path = out / f"server-{'-'.join(group)}.log"
        with servers(model, {n: adapters[n] for n in names}, [(flags, log_path)], cpu=args.cpu) as (url,):
            for agents in args.agents:
                for i, system in enumerate(group):
                    res = run_system(args, system, url, log_path, names[:agents], vocab, args.seed + 10 * i)
                    res.update(workflows=args.workflows, agents=agents, context=args.context, gen=args.gen)
                    results.append(res)
                    print(json.dumps({k: v for k, v in res.items() if k != "forkkv_after"}), flush=True)
                    # after every run: a call cut short by its time limit still returns what it measured
                    (out / "e2e.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


def table(results: list) -> str:
    cols = ["system", "agents", "context", "wall_s", "output_tok_s", "total_tok_s", "ttft_median_s", "ttft_p99_s", "itl_median_ms",
            "itl_p99_ms", "peak_kv_tokens", "peak_residual_slots", "prefill_tokens_computed"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [r.get(c, "") for c in cols]
        lines.append("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
