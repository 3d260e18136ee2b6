"""End-to-end multi-agent benchmark (issue 7): W workflows x N agents x R rounds over HTTP to SGLang's server.

Workload. Workflow w has its own shared context of C random tokens; agent a of it (adapter a, one per agent) sends
the shared context + a 32-token random suffix of its own and generates G tokens (greedy, ignore_eos), streamed, with
input_ids (the server runs with --skip-tokenizer-init). With `--rounds R` a workflow runs R rounds: round r+1 starts
once all N agents of round r are done, and its shared context is round r's shared context followed by every agent's
output tokens of round r, in agent order (the way agent trajectories grow), each agent adding a fresh random suffix
per round. So with every agent generating G tokens, a round-r prompt (r from 0) has C + r*N*G + 32 tokens. Round 0 is
drawn exactly as before rounds existed (R=1 sends the same tokens as earlier result files). Output token ids come
from the stream: SGLang 0.5.17 sends `output_ids` in every chunk, cumulative by default (the whole output so far) and
deltas only under --incremental-streaming-output; `generate_stream` takes either.

Modes (a comma list of `--request-rate` values runs each on the same servers):
    closed     (default) all W workflows start at once; the agents of a round are sent together (like sgl.fork)
    poisson    `--request-rate L`: workflows arrive as a Poisson process of L workflows/s (workflow 0 at t=0, then
               seeded exponential gaps of mean 1/L); within a workflow, rounds run as in closed mode
Workflows are independent: a workflow's next round waits for its own agents only, never for other workflows.

Systems (one server each, started and stopped here; `ceiling` reuses the stock server after /flush_cache):
    stock      SGLang 0.5.17 as shipped: the prefix cache is keyed by adapter, so every agent prefills C
    nocache    stock with --disable-radix-cache: nothing is reused, not even an agent's own prefix across rounds
    ceiling    stock with every agent on adapter 0: the context is shared, no residuals (unsafe: wrong adapter)
    recompute  --forkkv --forkkv-mode recompute: shared base entries, each agent recomputes its residuals
    eager      --forkkv --forkkv-mode eager: the first prefill of a context writes every resident adapter's residuals

CUDA graphs (GPU only, the same for every system of an invocation, recorded as `cuda_graph` in each row):
`--cuda-graph decode` (default) runs decode under CUDA graphs up to M = W x max N requests (rounded up to a multiple
of 8, at least 8) and prefill eagerly; `--cuda-graph off` disables both. CPU runs use CPU_FLAGS (no graphs).

Metrics per run (one row of e2e.json and of the table; wall time runs from the first arrival to the last response):
    output_tok_s, total_tok_s          output, and prompt + output, tokens per wall second
    ttft_*_s, itl_*_ms                 time to first token and inter-token latency over all requests, median and p99
    peak_kv_tokens                     largest KV token count SGLang logged (`#token` / `token usage` lines, one a
                                       decode step and one a prefill batch);
                                       forkkv adds peak_residual_slots (polled from /get_server_info)
    peak_running_reqs                  most requests SGLang ran in one batch: the largest `#running-req` of its
                                       decode lines (one a step: the servers run with LOG_FLAGS) or `#new-seq` of
                                       its prefill lines
    retracted_reqs                     requests SGLang's decode retracted (preempted) for want of KV memory: the sum
                                       of `#retracted_reqs: K` in its "KV cache pool is full. Retract requests." lines
    prefill_tokens_computed            prompt tokens minus tokens no forward ran over (stock: cached_tokens,
                                       forkkv: residual hits)
    round_prompt_tokens                prompt tokens sent per round
    requests_file                      requests-SYSTEM-nN-MODE.jsonl beside e2e.json, one line per request: workflow,
                                       round, agent, start (s into the run), TTFT, latency, prompt and cached tokens,
                                       a SHA-1 of the prompt ids (`ids_digest`) and the output ids
The largest number of agents served at once without preemption is the peak_running_reqs of a run whose
retracted_reqs is 0. Every row also records workflows, agents, rounds, context, gen, mode, request_rate, arrivals_s
(each workflow's scheduled start), cuda_graph (and cuda_graph_max_bs). A tqdm bar per run counts finished requests
on stderr (if tqdm is importable; `--no-progress` turns it off).

    python bench/e2e.py --model DIR --adapters a0=DIR a1=DIR ... --systems stock,recompute --out OUT \
        [--workflows W] [--agents N1,N2] [--rounds R] [--request-rate closed,L1,L2] [--cuda-graph decode|off]
    python bench/e2e.py --cpu --out OUT   # tiny CPU smoke run: SmolLM2, the test adapters, W=1 N=2 C=64 G=4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
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

# Base GPU flags, without any CUDA graph flag: `graph_flags` adds the one setting every system of a run shares.
# --grammar-backend none: the GPU wheelhouse carries an xgrammar stand-in (bench/gpu/make_room.sh)
GPU_FLAGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--lora-backend", "triton",
             "--skip-tokenizer-init", "--grammar-backend", "none"]
CPU_FLAGS = ["--device", "cpu", "--dtype", "float32", "--attention-backend", "torch_native", "--lora-backend",
             "torch_native", "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
             "--skip-tokenizer-init", "--max-total-tokens", "8192"]
SYSTEM_FLAGS = {
    "stock": [],
    "ceiling": [],
    "nocache": ["--disable-radix-cache"],
    "recompute": ["--forkkv", "--forkkv-mode", "recompute"],
    "eager": ["--forkkv", "--forkkv-mode", "eager"],
}
FORKKV_SYSTEMS = ("recompute", "eager")
# One decode log line a step (SGLang's default is one per 40): peak_running_reqs and peak_kv_tokens read them, and
# G = 128 would leave three samples per request. A short line a step (its cost not measured on the GPU); `--extra
# "--decode-log-interval 40"` restores the default (--extra comes later on the command line).
LOG_FLAGS = ["--decode-log-interval", "1"]
SUFFIX_TOKENS = 32
CUDA_GRAPH_MODES = ("off", "decode")


def graph_bs(max_running: int) -> int:
    """Decode graph batch sizes to capture: every request that can run at once, rounded up to a multiple of 8."""
    return max(8, -(-max_running // 8) * 8)


def graph_flags(mode: str, max_running: int) -> list[str]:
    """Server flags for `--cuda-graph MODE` on a GPU (module docstring)."""
    if mode == "off":
        return ["--disable-cuda-graph"]
    if mode == "decode":
        return ["--disable-prefill-cuda-graph", "--cuda-graph-max-bs", str(graph_bs(max_running))]
    raise ValueError(f"--cuda-graph must be one of {CUDA_GRAPH_MODES}, got {mode!r}")


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
    """One streamed greedy request; returns start/first/end times, per-chunk (time, tokens), the output token ids
    and the last meta_info."""
    body = {"input_ids": input_ids, "lora_path": lora, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": gen, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    chunks, meta, output_ids = [], None, []
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            out = json.loads(line[5:])
            meta = out["meta_info"]
            chunks.append((time.perf_counter(), meta["completion_tokens"]))
            output_ids = merge_output_ids(output_ids, out.get("output_ids", []), meta["completion_tokens"])
    if meta is None or len(output_ids) != meta["completion_tokens"]:
        raise RuntimeError(f"stream gave {len(output_ids)} output ids for meta_info {meta}")
    return {"start": start, "end": time.perf_counter(), "chunks": chunks, "meta": meta, "output_ids": output_ids}


def merge_output_ids(so_far: list, chunk: list, completion_tokens: int) -> list:
    """A chunk's `output_ids` is the whole output so far (SGLang's default) or, under
    --incremental-streaming-output, the new tokens only: a chunk as long as the output is the whole of it."""
    return list(chunk) if len(chunk) >= completion_tokens else so_far + list(chunk)


##### Workload #####


def random_tokens(rng: random.Random, n: int, vocab: int) -> list:
    low, high = 100, vocab - 100  # stay clear of special tokens at both ends of the vocabulary
    return [rng.randrange(low, high) for _ in range(n)]


def workload(workflows: int, agents: int, context: int, vocab: int, seed: int) -> list[tuple[list, list]]:
    """Round 0 of each workflow: (shared context, [suffix of each agent]). One seeded stream, drawn in the order
    the benchmark always used (context 0, its agents' suffixes, context 1, ...), so old results stay comparable."""
    rng = random.Random(seed)
    out = []
    for _ in range(workflows):
        ctx = random_tokens(rng, context, vocab)
        out.append((ctx, [random_tokens(rng, SUFFIX_TOKENS, vocab) for _ in range(agents)]))
    return out


def round_suffixes(agents: int, vocab: int, seed: int, workflow: int, rnd: int) -> list:
    """Fresh suffixes for round rnd >= 1, seeded per (workflow, round): they do not depend on which workflow's
    round happens to come first."""
    rng = random.Random(f"{seed}/{workflow}/{rnd}")
    return [random_tokens(rng, SUFFIX_TOKENS, vocab) for _ in range(agents)]


def grow_context(context: list, outputs: list) -> list:
    """Next round's shared context: this round's, then every agent's output tokens in agent order."""
    return context + [t for out in outputs for t in out]


def poisson_arrivals(workflows: int, rate: float | None, seed: int) -> list:
    """Start time (s after the run starts) of each workflow: all at 0 in closed mode (rate None), else a Poisson
    process of `rate` workflows/s with the first workflow at 0 (no idle lead-in in the wall time)."""
    if rate is None:
        return [0.0] * workflows
    rng = random.Random(f"arrivals/{seed}")
    times, t = [], 0.0
    for _ in range(workflows):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def percentile(xs: list, q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


##### Running #####


class Progress:
    """A tqdm bar over finished requests on stderr when tqdm is importable and wanted, else nothing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar, self.lock = None, threading.Lock()
        if enabled:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=True)

    def done(self):
        if self.bar is not None:
            with self.lock:  # request threads finish concurrently
                self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_workflow(w: int, plan: tuple, send, rounds: int, vocab: int, seed: int, start_at: float) -> list:
    """One workflow's rounds: the N agents of a round go out together, the next round waits for all of them."""
    context, suffixes = plan
    time.sleep(max(0.0, start_at - time.perf_counter()))
    results = []
    for rnd in range(rounds):
        if rnd:
            suffixes = round_suffixes(len(suffixes), vocab, seed, w, rnd)
        futures = [send(a, context + suffix) for a, suffix in enumerate(suffixes)]
        outs = [f.result() for f in futures]
        for a, res in enumerate(outs):
            res.update(workflow=w, round=rnd, agent=a)
        results += outs
        context = grow_context(context, [res["output_ids"] for res in outs])
    return results


def run_workflows(url: str, plans: list, names: list, gen: int, rounds: int, arrivals: list, vocab: int, seed: int,
                  same_adapter: bool, progress: Progress) -> tuple[list, float, float]:
    """Run every workflow from its arrival time on; returns every request's result, the start time (perf_counter)
    and the wall time."""
    agents = len(plans[0][1])
    # one thread per request that can be in flight at once (W x N), so no request waits for a thread
    requests = concurrent.futures.ThreadPoolExecutor(len(plans) * agents)

    def one(a: int, ids: list) -> dict:
        res = generate_stream(url, ids, names[0 if same_adapter else a], gen)
        res["prompt_ids"] = ids  # a reference; hashed for the request file after the run, outside the timing
        progress.done()
        return res

    def send(a: int, ids: list) -> concurrent.futures.Future:
        return requests.submit(one, a, ids)

    t0 = time.perf_counter()
    with requests, concurrent.futures.ThreadPoolExecutor(len(plans)) as flows:
        futures = [flows.submit(run_workflow, w, plan, send, rounds, vocab, seed, t0 + arrivals[w])
                   for w, plan in enumerate(plans)]
        results = [res for f in futures for res in f.result()]
    return results, t0, time.perf_counter() - t0


def ids_digest(ids: list) -> str:
    """A short fingerprint of a prompt, so the per-request file can show what was sent without 32K ids a line."""
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()


def first_token_time(res: dict) -> float:
    return next(t for t, n in res["chunks"] if n >= 1)


def request_record(res: dict, t0: float) -> dict:
    """One line of the per-request file (requests-*.jsonl); times in s from the start of the run."""
    meta = res["meta"]
    first = first_token_time(res)
    return {"workflow": res["workflow"], "round": res["round"], "agent": res["agent"],
            "start_s": res["start"] - t0, "ttft_s": first - res["start"], "latency_s": res["end"] - res["start"],
            "prompt_tokens": meta["prompt_tokens"], "cached_tokens": meta["cached_tokens"],
            "prompt_sha1": ids_digest(res["prompt_ids"]), "output_ids": res["output_ids"]}


def latency_metrics(results: list) -> dict:
    ttft, itl = [], []
    for res in results:
        ttft.append(first_token_time(res) - res["start"])
        for (t_a, n_a), (t_b, n_b) in zip(res["chunks"], res["chunks"][1:]):
            if n_b > n_a:
                itl.extend([(t_b - t_a) / (n_b - n_a)] * (n_b - n_a))
    return {"ttft_median_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 99),
            "itl_median_ms": 1e3 * statistics.median(itl) if itl else float("nan"),
            "itl_p99_ms": 1e3 * percentile(itl, 99)}


def run_once(url: str, plans: list, names: list, gen: int, same_adapter: bool, poll: bool, rounds: int = 1,
             arrivals: list | None = None, vocab: int = 0, seed: int = 0, progress: bool = False,
             desc: str = "") -> dict:
    """Run the workload (workflow w starts arrivals[w] s in; all at once without arrivals); gather the metrics of
    the module docstring that the HTTP side sees (run_system adds those from the server log)."""
    stop = threading.Event()
    peak_residual = [0]

    def poller():
        while not stop.wait(1.0):
            with contextlib.suppress(OSError, KeyError):
                s = forkkv_stats(url)
                peak_residual[0] = max(peak_residual[0], s["residual_capacity"] - s["residual_free"])

    arrivals = arrivals or [0.0] * len(plans)
    bar = Progress(len(plans) * len(plans[0][1]) * rounds, desc, progress)
    before = forkkv_stats(url) if poll else None
    thread = threading.Thread(target=poller, daemon=True) if poll else None
    if thread:
        thread.start()
    try:
        results, t0, wall = run_workflows(url, plans, names, gen, rounds, arrivals, vocab, seed, same_adapter, bar)
    finally:
        stop.set()
        bar.close()
    if thread:
        thread.join()
    after = forkkv_stats(url) if poll else None

    prompt = sum(r["meta"]["prompt_tokens"] for r in results)
    output = sum(r["meta"]["completion_tokens"] for r in results)
    if poll:
        # forkkv: a forward ran over every prompt token whose residual was missing (recompute included)
        skipped = after["residual_hit_tokens"] - before["residual_hit_tokens"]
    else:
        skipped = sum(r["meta"]["cached_tokens"] for r in results)
    out = {
        "requests": len(results), "wall_s": wall, "prompt_tokens": prompt, "output_tokens": output,
        "output_tok_s": output / wall, "total_tok_s": (prompt + output) / wall, **latency_metrics(results),
        "prefill_tokens_computed": prompt - skipped,
        "round_prompt_tokens": [sum(r["meta"]["prompt_tokens"] for r in results if r["round"] == rnd)
                                for rnd in range(rounds)],
        "arrivals_s": arrivals,
        "request_records": [request_record(r, t0) for r in sorted(results, key=lambda r: (r["workflow"], r["round"],
                                                                                             r["agent"]))],
    }
    if poll:
        out["peak_residual_slots"] = max(peak_residual[0], after["residual_capacity"] - after["residual_free"])
        out["base_hit_tokens"] = after["base_hit_tokens"] - before["base_hit_tokens"]
        out["forkkv_after"] = after
    return out


##### Server log #####


def peak_kv_tokens(log_text: str, capacity: int) -> int:
    """Largest KV token count SGLang logged (decode lines give '#token: N', prefill lines 'token usage: F')."""
    counts = [int(m) for m in re.findall(r"#token: (\d+)", log_text)]
    usages = [float(m) for m in re.findall(r"token usage: ([0-9.]+)", log_text)]
    return max(counts + [int(u * capacity) for u in usages] + [0])


PREFILL_LINE = re.compile(r"Prefill batch.*?#new-seq: (\d+)")
DECODE_LINE = re.compile(r"Decode batch.*?#running-req: (\d+)")
# scheduler.py, when a decode step does not fit: "KV cache pool is full. Retract requests. #retracted_reqs: K, ..."
RETRACT_LINE = re.compile(r"#retracted_reqs: (\d+)")


def peak_running_reqs(log_text: str) -> int:
    """Most requests SGLang ran in one batch: a decode line's #running-req is the decode batch just run (retracted
    requests are out of it), a prefill line's #new-seq the requests prefilled together. Not a prefill line's
    #running-req: it is the running batch before SGLang drops the requests that finished in its last step (with
    W=2, N=2 it logged 4 running next to 2 new while only 4 requests existed)."""
    peak = 0
    for line in log_text.splitlines():
        if m := PREFILL_LINE.search(line):
            peak = max(peak, int(m[1]))
        elif m := DECODE_LINE.search(line):
            peak = max(peak, int(m[1]))
    return peak


def retracted_reqs(log_text: str) -> int:
    """Requests SGLang's decode retracted (preempted: freed their KV, back to the queue) for want of memory."""
    return sum(int(k) for k in RETRACT_LINE.findall(log_text))


def run_system(args, system: str, url: str, log_path: Path, names: list, vocab: int, seed: int,
               rate: float | None) -> dict:
    if not args.cpu:
        # warm-up: Triton compilation stays out of the timing, and every agent's adapter is loaded into SGLang's
        # LoRA buffer (eager mode writes residuals only for resident adapters, DESIGN.md section 3)
        warm = workload(1, len(names), min(args.context, 512), vocab, seed + 1000)
        run_once(url, warm, names, 4, same_adapter=False, poll=False, vocab=vocab, seed=seed + 1000)
    post(url, "/flush_cache")
    offset = len(log_path.read_text())
    plans = workload(args.workflows, len(names), args.context, vocab, seed)
    # the same arrival schedule for every system (args.seed, not the system's seed): a fair comparison
    arrivals = poisson_arrivals(args.workflows, rate, args.seed)
    mode = "closed" if rate is None else f"{rate:g}/s"
    res = run_once(url, plans, names, args.gen, same_adapter=system == "ceiling",
                   poll=system in FORKKV_SYSTEMS, rounds=args.rounds, arrivals=arrivals, vocab=vocab,
                   seed=seed, progress=not args.no_progress, desc=f"{system} N={len(names)} R={args.rounds} {mode}")
    info = json.loads(urllib.request.urlopen(url + "/get_server_info", timeout=30).read())
    capacity = int(info["internal_states"][0]["memory_usage"]["token_capacity"])
    log_text = log_path.read_text()[offset:]
    res["kv_capacity_tokens"] = capacity
    res["peak_kv_tokens"] = peak_kv_tokens(log_text, capacity)
    res["peak_running_reqs"] = peak_running_reqs(log_text)
    res["retracted_reqs"] = retracted_reqs(log_text)
    res["system"] = system
    # per-request details next to e2e.json rather than in it (W x N x R lines, each with its G output ids)
    name = f"requests-{system}-n{len(names)}-{'closed' if rate is None else f'rate{rate:g}'}.jsonl"
    (log_path.parent / name).write_text("".join(json.dumps(r) + "\n" for r in res.pop("request_records")))
    res["requests_file"] = name
    res["mode"] = "closed" if rate is None else "poisson"
    res["request_rate"] = rate
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


def parse_rates(text: str) -> list:
    """`closed,0.5,2` -> [None, 0.5, 2.0]: None is the closed loop, a number a Poisson rate in workflows/s."""
    rates = []
    for item in text.split(","):
        if item.strip() == "closed":
            rates.append(None)
        elif float(item) > 0:
            rates.append(float(item))
        else:
            raise ValueError(f"--request-rate: {item!r} is neither 'closed' nor a positive rate")
    return rates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--adapters", nargs="*", default=[], help="name=dir, one per agent (agent a uses the a-th)")
    p.add_argument("--systems", default="stock,ceiling,recompute,eager")
    p.add_argument("--workflows", type=int, default=None, help="W (default 4; 1 with --cpu)")
    p.add_argument("--agents", default="8", help="N, or a comma list N1,N2,...: each N runs on the same servers")
    p.add_argument("--rounds", type=int, default=1, help="R: rounds per workflow, each appending the outputs")
    p.add_argument("--request-rate", default="closed",
                   help="'closed' (all workflows at once) or L workflows/s (Poisson); a comma list runs each")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--cuda-graph", choices=CUDA_GRAPH_MODES, default="decode",
                   help="GPU: 'decode' graphs up to W x max N requests, prefill eager; 'off' none")
    p.add_argument("--extra", default="", help="extra server flags, one string")
    p.add_argument("--forkkv-extra", default="", help="extra server flags for forkkv systems only")
    p.add_argument("--cpu", action="store_true",
                   help="tiny CPU run (SmolLM2, test adapters; W=1 unless given, at most W=2 N=2 C=64 G=4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.agents = [int(n) for n in str(args.agents).split(",")]
    args.rates = parse_rates(args.request_rate)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.cpu:
        args.workflows = min(args.workflows or 1, 2)
        args.context, args.gen = min(args.context, 64), min(args.gen, 4)
        args.agents = [min(n, 2) for n in args.agents]
    elif args.workflows is None:
        args.workflows = 4
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        model, adapters = cpu_setup(out)
        base_flags, graph = CPU_FLAGS, "off"
    else:
        model, adapters = args.model, dict(a.split("=", 1) for a in args.adapters)
        # one graph setting for every system (fairness), sized for every request this invocation can run at once
        base_flags = GPU_FLAGS + graph_flags(args.cuda_graph, args.workflows * max(args.agents))
        graph = args.cuda_graph
    names = list(adapters)[: max(args.agents)]
    if len(names) < max(args.agents):
        raise ValueError(f"{max(args.agents)} agents need as many adapters, got {len(names)}: {names}")
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEM_FLAGS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; known: {list(SYSTEM_FLAGS)}")
    results = []
    # stock and ceiling share one server (the ceiling run follows a /flush_cache)
    groups = [[s for s in systems if s in ("stock", "ceiling")]] + [[s] for s in systems if s in ("nocache", *FORKKV_SYSTEMS)]
    for group in filter(None, groups):
        flags = base_flags + LOG_FLAGS + args.extra.split() + SYSTEM_FLAGS[group[0]]
        if group[0] in FORKKV_SYSTEMS:
            flags += args.forkkv_extra.split()
        log_path = out / f"server-{'-'.join(group)}.log"
        with servers(model, {n: adapters[n] for n in names}, [(flags, log_path)], cpu=args.cpu) as (url,):
            for agents in args.agents:
                for rate in args.rates:
                    for i, system in enumerate(group):
                        res = run_system(args, system, url, log_path, names[:agents], vocab, args.seed + 10 * i, rate)
                        res.update(workflows=args.workflows, agents=agents, rounds=args.rounds, context=args.context,
                                   gen=args.gen, cuda_graph=graph)
                        if graph == "decode":
                            res["cuda_graph_max_bs"] = graph_bs(args.workflows * max(args.agents))
                        results.append(res)
                        print(json.dumps({k: v for k, v in res.items() if k != "forkkv_after"}), flush=True)
                        # after every run: a call cut short by its time limit still returns what it measured
                        (out / "e2e.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


TABLE_COLUMNS = ["system", "agents", "rounds", "mode", "context", "wall_s", "output_tok_s", "total_tok_s",
                 "ttft_median_s", "ttft_p99_s", "itl_median_ms", "itl_p99_ms", "peak_kv_tokens", "peak_residual_slots",
                 "peak_running_reqs", "retracted_reqs", "prefill_tokens_computed"]


def table_cell(row: dict, col: str) -> str:
    """One markdown cell; rows from before a column existed (older result files) leave it empty."""
    if col == "mode" and row.get("mode") == "poisson":
        return f"poisson {row['request_rate']:g}/s"
    value = row.get(col, "")
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table(results: list) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(table_cell(r, c) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
