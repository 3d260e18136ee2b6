"""--forkkv under what clients and operators do (issue 4): adapter churn, pool pressure, aborts, a concurrency soak,
bad input. CPU servers on loopback, float32, greedy decoding.

Two servers live for the module (started on first use):
- `small`: eager mode with a base pool far smaller than the working set (--max-total-tokens 1200), a residual pool
  of half that (--forkkv-residual-ratio 0.5), chunked prefill of 128 tokens mixed with decodes (--enable-mixed-chunk),
  --enable-metrics; adapters planner (r8), coder (r16), critic (r8) and the twins planner2 / coder2 (planner's and
  coder's weights under other names). Tests load and unload more adapters at run time.
- `reference`: recompute mode, default pool, only ever sequential requests: planner, coder, critic and the churn
  adapters churn0..2 under their own names.
One test starts a short-lived server of its own (adapters without attention targets); the refusal tests and one unit
test (an unload racing an eager write) start none.

On forkkv any prefix two adapters' requests share is shared base, down to the first token, and whose prefill wrote
it decides the other adapters' outputs (DESIGN §3). So every prompt family of this module starts with its own first
token (`WORDS`, checked distinct by the `words` fixture), and wherever outputs are compared, the base entries of a
prompt were written by the same weights on both servers.
"""

import json
import random
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from _server import running_server, server_log
from sglang_forkkv.cpu_engine import shared_document
from sglang_forkkv.test_adapters import make_lora_adapter

SMALL_POOL = 1200
RESIDUAL_RATIO = 0.5
# First words of this module's prompt families, each its own first token (the `words` fixture checks).
WORDS = {
    "soak": ("Apples", "Travel", "Stock", "Clocks"),
    "pressure": ("Orders", "Energy", "Health", "Weather"),
    "abort": ("Music", "Sports", "Books", "Food"),
    "churn_shared": ("Violins",),
    "churn_private": ("Pianos", "Dolphins", "Wagons"),
    "churn_long": ("Eagles", "Hammers", "Zebras"),
    "churn_other": ("Bridges", "Tigers", "Ovens"),
    "churn_fresh": ("Rivers", "Ships", "Fuel"),
    "batch": ("Market", "Water", "Gardens", "Islands", "Jackets"),
    "bad": ("Quilts", "Yachts", "Umbrellas", "Nails"),
}


##### Servers and adapters #####


# One OpenMP thread per server: this 2-core machine is shared, and a server whose OpenMP threads spin on a busy
# core decodes ~10x slower (measured: 30 tokens in 20 s with 2 threads against 2 s with 1 while another job ran).
SERVER_ENV = {"OMP_NUM_THREADS": "1"}


def _loras(adapters: dict) -> list[str]:
    return ["--enable-lora", "--lora-paths", *[f"{name}={path}" for name, path in adapters.items()]]


@pytest.fixture(scope="module")
def churn_dirs(model_dir, tmp_path_factory) -> list[str]:
    """Three new-weight rank-8 adapters, loaded in turn on `small` under one name ("churn")."""
    root = tmp_path_factory.mktemp("churn")
    return [str(make_lora_adapter(root / f"churn{k}", model_dir, rank=8, seed=600 + k)) for k in range(3)]


@pytest.fixture(scope="module")
def small(model_dir, adapter_dirs):
    adapters = {**adapter_dirs, "planner2": adapter_dirs["planner"], "coder2": adapter_dirs["coder"]}
    with running_server(
        model_dir, "--forkkv", "--forkkv-mode", "eager", "--max-total-tokens", str(SMALL_POOL),
        "--forkkv-residual-ratio", str(RESIDUAL_RATIO), "--chunked-prefill-size", "128", "--enable-mixed-chunk",
        "--enable-metrics", "--max-loras-per-batch", "6", "--max-lora-rank", "16",
        "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", *_loras(adapters), env=SERVER_ENV,
    ) as url:
        yield url
        log = server_log(url)
        assert "memory leak detected" not in log and "forkkv residual pool leak" not in log


@pytest.fixture(scope="module")
def reference(model_dir, adapter_dirs, churn_dirs):
    adapters = {**adapter_dirs, **{f"churn{k}": path for k, path in enumerate(churn_dirs)}}
    with running_server(model_dir, "--forkkv", "--max-loras-per-batch", "7", *_loras(adapters), env=SERVER_ENV) as url:
        yield url


@pytest.fixture(scope="module")
def words(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    firsts = {}
    for word in (w for group in WORDS.values() for w in group):
        first = tokenizer(word + " log")["input_ids"][0]
        assert first not in firsts, f"{word!r} and {firsts[first]!r} start with the same token"
        firsts[first] = word
    return WORDS


##### Client helpers #####


def generate(url, text, lora=None, max_new=8, timeout=300, sampling=None, **body):
    sampling_params = {"temperature": 0, "max_new_tokens": max_new, **(sampling or {})}
    payload = {"text": text, "sampling_params": sampling_params, **body}
    if lora is not None:
        payload["lora_path"] = lora
    return requests.post(url + "/generate", json=payload, timeout=timeout)


def output(url, text, lora=None, max_new=8, **body) -> dict:
    r = generate(url, text, lora, max_new, **body)
    assert r.status_code == 200, r.text
    return r.json()


def generate_batch(url, texts: list, loras: list, max_new: int) -> list:
    """One /generate call over several prompts (SGLang batches them), each with its own adapter."""
    payload = {"text": texts, "lora_path": loras, "sampling_params": {"temperature": 0, "max_new_tokens": max_new}}
    r = requests.post(url + "/generate", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    return [o["output_ids"] for o in r.json()]


def load_adapter(url, name, path):
    return requests.post(url + "/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120)


def unload_adapter(url, name):
    return requests.post(url + "/unload_lora_adapter", json={"lora_name": name}, timeout=300)


def stream(url, text, lora=None, max_new=8, stop_after=None, on_chunk=None, sampling=None):
    """Stream a generation; with `stop_after`, close the connection after that many chunks (a client that goes
    away mid-decode). Returns (last chunk or None, number of chunks)."""
    payload = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new, **(sampling or {})},
               "stream": True}
    if lora is not None:
        payload["lora_path"] = lora
    last, count = None, 0
    with requests.post(url + "/generate", json=payload, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            last, count = json.loads(line[5:]), count + 1
            if on_chunk is not None:
                on_chunk(count)
            if stop_after is not None and count >= stop_after:
                break
    return last, count


def abort(url, rid: str = "", abort_all: bool = False):
    r = requests.post(url + "/abort_request", json={"rid": rid, "abort_all": abort_all}, timeout=30)
    assert r.status_code == 200, r.text


def stats(url) -> dict:
    return requests.get(url + "/get_server_info", timeout=30).json()["internal_states"][0]["forkkv"]


def aborted_total(url) -> float:
    """sglang:num_aborted_requests_total: aborts the tokenizer manager sent to the scheduler (--enable-metrics)."""
    text = requests.get(url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("sglang:num_aborted_requests_total"))


def idle_stats(url, timeout: float = 120) -> dict:
    """forkkv stats once every request has finished: in both pools free + tree-held == capacity and nothing locked.
    Polls (a finished request's entries are inserted a step after its response); a leak never settles."""
    deadline = time.time() + timeout
    while True:
        s = stats(url)
        if (s["base_free"] + s["base_tokens"] == s["base_capacity"]
                and s["residual_free"] + s["residual_tokens"] == s["residual_capacity"]
                and s["base_protected"] == 0 and s["residual_protected"] == 0):
            return s
        assert time.time() < deadline, f"slots not all back at idle: {s}"
        time.sleep(1)


def assert_healthy(url):
    """The scheduler still serves (the idle leak checks raise in the scheduler and would have killed it)."""
    assert output(url, "Kettles log: one, two,", max_new=2)["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    log = server_log(url)
    assert "memory leak detected" not in log and "forkkv residual pool leak" not in log
    assert "Scheduler hit an exception" not in log


def ledger(word: str, records: int, seed: int) -> str:
    """A document of `records` ledger lines whose first token is `word`'s."""
    return f"{word} log {seed}.\n" + shared_document(records, seed=seed).split("\n", 1)[1]


def copy_prompt(word: str, context: int, question: int) -> str:
    """A question the model answers by copying from the document (depends on every cached entry, no near-ties)."""
    document = ledger(word, 3 + 4 * context, 20 + context)
    return f"{document}\nQuestion: repeat record {question} exactly.\nRecord {question}: customer"


##### 1. Adapter churn #####


def test_adapter_churn_drops_residuals_and_never_reads_stale_ones(small, reference, churn_dirs, words):
    """Three cycles on `small`: load "churn" with new weights, run it on a prompt every cycle shares (its base entries
    were written by the first cycle's weights) and on private prompts, then unload it while a request of its own and a
    planner request run (whose prefill, in eager mode, also wrote churn residuals).

    - unload waits for churn's running request, which finishes with full length; the planner request finishes too;
    - after unload and at idle no residual entry of an unloaded adapter is left, and every slot is back;
    - a reloaded "churn" never reads the previous weights' residuals: every churn output equals the `reference`
      server's output of the same weights (loaded there as churn0..2) run in the same order, private prompts exactly
      as a fresh server gives them.
    """
    shared = ledger(words["churn_shared"][0], 3, seed=1) + "\nRecord 1: customer"
    got = {"shared": [], "private": [], "long": [], "other": [], "other_long": []}
    for k, path in enumerate(churn_dirs):
        r = load_adapter(small, "churn", path)
        assert r.status_code == 200 and r.json()["success"], r.text
        private = ledger(words["churn_private"][k], 2, seed=2 + k) + "\nRecord 0: customer"
        long_prompt = ledger(words["churn_long"][k], 2, seed=5 + k) + "\nRecord 1: customer"
        other = ledger(words["churn_other"][k], 2, seed=8 + k)
        fresh = ledger(words["churn_fresh"][k], 2, seed=11 + k) + "\nRecord 1: customer"
        # churn first (resident in the LoRA buffer), then planner's prefill writes churn residuals (eager mode)
        shared_out = output(small, shared, "churn", max_new=12)
        if k > 0:  # the first cycle's base entries of the shared prompt are still there: this reads them
            assert shared_out["meta_info"]["cached_tokens"] >= shared_out["meta_info"]["prompt_tokens"] - 1
        got["shared"].append(shared_out["output_ids"])
        got["private"].append(output(small, private, "churn", max_new=12)["output_ids"])
        got["other"].append(output(small, other + "\nRecord 0: customer", "planner", max_new=8)["output_ids"])
        assert stats(small)["residual_tokens_by_adapter"].get("churn", 0) > 0  # churn residuals are cached

        # While churn decodes, planner prefills a fresh prompt and (eager mode, churn resident) writes churn residuals
        # over it: the unload must drop those too.
        results, started = {}, threading.Event()

        def run(key, *args, **kw):
            results[key] = stream(small, *args, **kw)

        threads = [
            threading.Thread(target=run, args=("long", long_prompt, "churn", 24),
                             kwargs={"on_chunk": lambda n: started.set()}),
            threading.Thread(target=run, args=("other_long", fresh, "planner", 40)),
        ]
        for t in threads:
            t.start()
        assert started.wait(120), "churn request never started decoding"
        r = unload_adapter(small, "churn")
        assert r.status_code == 200 and r.json()["success"], r.text
        for t in threads:
            t.join(300)
        for key in ("long", "other_long"):
            last, _ = results[key]
            assert last["meta_info"]["finish_reason"]["type"] == "length", last["meta_info"]
            got[key].append(last["output_ids"])

        s = idle_stats(small)
        assert not [name for name in s["residual_tokens_by_adapter"] if "unloaded" in name or name == "churn"], (
            f"residuals of an unloaded adapter outlive it: {s['residual_tokens_by_adapter']}")
    assert_healthy(small)

    # The same requests, in the same order, sequentially on the reference server.
    want = {key: [] for key in got}
    for k in range(3):
        want["shared"].append(output(reference, shared, f"churn{k}", max_new=12)["output_ids"])
    for k in range(3):
        private = ledger(words["churn_private"][k], 2, seed=2 + k) + "\nRecord 0: customer"
        long_prompt = ledger(words["churn_long"][k], 2, seed=5 + k) + "\nRecord 1: customer"
        other = ledger(words["churn_other"][k], 2, seed=8 + k)
        fresh = ledger(words["churn_fresh"][k], 2, seed=11 + k) + "\nRecord 1: customer"
        want["private"].append(output(reference, private, f"churn{k}", max_new=12)["output_ids"])
        want["other"].append(output(reference, other + "\nRecord 0: customer", "planner", max_new=8)["output_ids"])
        want["long"].append(output(reference, long_prompt, f"churn{k}", max_new=24)["output_ids"])
        want["other_long"].append(output(reference, fresh, "planner", max_new=40)["output_ids"])
    # the three weights answer the shared prompt differently, so stale residuals would show
    assert len({tuple(o) for o in want["shared"]}) > 1, want["shared"]
    for key in got:
        assert got[key] == want[key], key


def test_unload_racing_an_eager_write_leaves_no_residual_behind():
    """Unit level, as the race cannot be timed from a client: with the overlap scheduler an unload can land between
    the planning of a batch, where an eager-mode request of adapter a took residual slots for resident adapter b (and
    locked b's entries below them), and that batch's insert. Nothing may then be inserted under b's dead namespace,
    and b's entries the request kept locked through the unload must go once it lets them go."""
    from types import SimpleNamespace

    from test_tree import Harness

    from sglang_forkkv.req_state import fork_state
    from sglang_forkkv.scheduling import plan_eager_residuals

    h = Harness()
    manager = SimpleNamespace(
        loras={"a": object(), "b": object()},
        lora_refs={"a": SimpleNamespace(lora_name="A"), "b": SimpleNamespace(lora_name="B")},
        memory_pool=SimpleNamespace(uid_to_buffer_id={"a": 0, "b": 1}),
    )
    h.tree.lora_manager = manager
    ctx = [1, 2, 3, 1, 2]
    h.start(ctx, "a")
    req = h.running[0]
    plan_eager_residuals(h.tree, req, fork_state(req), 0, len(ctx))  # a's prefill also writes b's residuals
    h.finish(0)
    h.check()
    assert h.tree.residual_tokens_by_adapter() == {"A": 5, "B": 5}

    h.start(ctx + [3, 3], "a")  # extends ctx: the eager write for b locks b's entry of ctx
    req = h.running[0]
    plan_eager_residuals(h.tree, req, fork_state(req), 5, 2)
    assert "b" in fork_state(req).eager
    for table in (manager.loras, manager.lora_refs, manager.memory_pool.uid_to_buffer_id):
        del table["b"]  # SGLang unloads b, then forkkv's hook drops b's residuals
    h.tree.drop_adapter("b")
    h.finish(0)
    h.check()
    assert h.tree.residual_tokens_by_adapter() == {"A": 7}
    assert h.pool.allocator.available_size() + h.tree.residual.total_size() == h.pool.allocator.size


##### 2. Pressure #####


def test_pressure_many_forking_agents(small, words):
    """Four shared contexts (~140 tokens), six agents forking over each (five adapters, twins included, and the base
    model), twelve requests at a time with up to 48 new tokens each (100 for the base model's): several times the
    1200-token base pool and the 600-slot residual pool. Every request completes (admission control and eviction) or
    is refused with a clear error, nothing hangs, and at idle every base and residual slot is free or held by a tree,
    none locked.
    Two requests probe the limits: a prompt over the residual pool (refused, naming --forkkv-residual-ratio) and one
    whose prompt plus max_new_tokens exceed it (its max_new_tokens clipped, as SGLang clips them for the base pool)."""
    rng = random.Random(4)
    jobs = []
    for i, word in enumerate(words["pressure"]):
        document = ledger(word, 6, seed=40 + i)
        for j, lora in enumerate(["planner", "coder", "critic", "planner2", "coder2", None]):
            max_new = rng.randint(60, 100) if lora is None else rng.randint(8, 48)  # the base model's agents write more
            jobs.append((f"{document}\nAgent {j}: the record that matters most is", lora, max_new))
    rng.shuffle(jobs)
    capacity = stats(small)["residual_capacity"]

    over = ledger(words["pressure"][0], 36, seed=50)  # ~780 tokens: fits the base pool, not the residual pool
    clipped = ledger(words["pressure"][1], 26, seed=51)  # ~570 tokens + 300 new > residual pool: ~30 new tokens
    jobs += [(over, "coder", 8), (clipped, "critic", 300)]

    start = time.time()
    with ThreadPoolExecutor(12) as pool:
        # ignore_eos: the clipped request must run into its (clipped) length
        responses = list(pool.map(
            lambda job: generate(small, *job, timeout=600, sampling={"ignore_eos": True}), jobs))
    elapsed = time.time() - start

    refused = responses[-2]
    assert refused.status_code == 400 and "--forkkv-residual-ratio" in refused.text, refused.text
    clip = responses[-1].json()
    assert responses[-1].status_code == 200, responses[-1].text
    assert clip["meta_info"]["completion_tokens"] == capacity - clip["meta_info"]["prompt_tokens"] - 1 < 300
    assert clip["meta_info"]["finish_reason"]["type"] == "length"
    done = [r.json() for r in responses[:-2]]
    assert all(r.status_code == 200 for r in responses[:-2]), [r.text for r in responses[:-2] if r.status_code != 200]
    assert all(o["meta_info"]["finish_reason"]["type"] in ("length", "stop") for o in done)
    working_set = sum(o["meta_info"]["prompt_tokens"] + o["meta_info"]["completion_tokens"] for o in done)
    retractions = sum(o["meta_info"].get("num_retractions", 0) for o in done)
    s = idle_stats(small)
    print(f"pressure: {len(done)} requests in {elapsed:.0f} s, working set {working_set} tokens, "
          f"{retractions} retractions, pools {s['base_capacity']} / {s['residual_capacity']}")
    assert working_set > 3 * s["base_capacity"]
    assert s["base_hit_tokens"] > 0
    assert_healthy(small)


def test_admission_counts_no_request_its_own_prefix_as_room():
    """Unit level (the concurrency soak crashed the scheduler with "residual pool exhausted" once the earlier tests
    had left residuals behind): a waiting request's matched residual prefix is evictable until its admission locks
    it, so it is no room for the request's own new tokens. Residual pool of 10: 8 slots hold adapter a's entries of
    a context (unlocked), 2 are free. A request of a extending the context by 3 tokens must wait (it can free only
    what it does not read); a request of b with 3 tokens of its own, which may evict a's entries, is admitted and
    gets its slots."""
    from array import array
    from types import SimpleNamespace

    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from test_tree import FakeReq, Harness

    from sglang_forkkv.scheduling import alloc_residual_slots, residual_admits

    h = Harness(residual_slots=10)
    ctx = [1, 2, 3, 4, 5, 6, 7, 8]
    h.start(ctx, "a")
    h.finish(0)
    assert (h.pool.allocator.available_size(), h.tree.residual_evictable_size()) == (2, 8)

    def waiting(tokens, lora_id):
        req = FakeReq(tokens, lora_id, row=1)
        req.sampling_params = SimpleNamespace(max_new_tokens=0)
        m = h.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), None, limit=len(tokens) - 1),
                                                  req=req))
        req.prefix_indices, req.last_node = m.device_indices, m.last_device_node
        return req

    follower = waiting(ctx + [9, 9, 9], "a")
    assert len(follower.prefix_indices) == 8
    assert not residual_admits(SimpleNamespace(tree_cache=h.tree, running_batch=None), follower)
    other = waiting([20, 21, 22], "b")
    assert residual_admits(SimpleNamespace(tree_cache=h.tree, running_batch=None), other)
    h.tree.inc_lock_ref(other.last_node)  # as SGLang's add_one_req does next
    assert len(alloc_residual_slots(h.tree, 3)) == 3
    h.tree.dec_lock_ref(other.last_node)


##### 3. Aborts #####


def test_aborts_mid_prefill_mid_decode_and_mid_fork_leave_nothing_behind(small, words):
    """Clients that go away: /abort_request during a chunked prefill (128-token chunks of a ~500-token prompt), streams
    closed mid-decode, a client timing out on a non-streaming request, and a fork of six branches over one shared
    prefix (five adapters and the base model) of which some are aborted in prefill, some dropped in decode, the rest
    finish. Then /abort_request abort_all over a running batch. Afterwards: every abort reached the scheduler (finish
    reason "abort", the aborts metric, or a dropped stream's request ending at once), no slot is leaked and no lock
    reference left (stats at idle), and the server serves on."""
    aborts_before = aborted_total(small)
    expected_aborts = 0
    long_doc = ledger(words["abort"][0], 22, seed=60)  # ~480 tokens: four chunks

    # /abort_request mid-prefill and mid-decode: the client keeps its connection and gets finish_reason "abort"
    def abort_later(rid, delay):
        time.sleep(delay)
        abort(small, rid)

    aborted = []
    for i, delay in enumerate((0.3, 0.8, 1.6, 3.0)):
        rid = uuid.uuid4().hex
        threading.Thread(target=abort_later, args=(rid, delay)).start()
        r = generate(small, f"{long_doc}\nQuery {i}:", ["planner", "coder", None, "critic"][i], 200, rid=rid)
        assert r.status_code == 200, r.text
        aborted.append(r.json()["meta_info"])
    expected_aborts += 4
    assert all(m["finish_reason"]["type"] == "abort" for m in aborted), aborted
    assert any(m["completion_tokens"] == 0 for m in aborted), "no abort landed before the first token"

    # streams dropped mid-decode (SGLang aborts these without counting them in the metric): each must end long
    # before its 500+ tokens would (30 s and more on this machine), every slot back
    for i, lora in enumerate(["coder", "planner2", None]):
        text = ledger(words["abort"][1], 4, seed=61) + f"\nNote {i}:"
        _, chunks = stream(small, text, lora, 1000, stop_after=2 + i, sampling={"ignore_eos": True})
        dropped = time.time()
        assert chunks == 2 + i
        idle_stats(small, timeout=60)
        assert time.time() - dropped < 10, "a dropped stream kept running"

    # a non-streaming client that times out (the server notices within its wait timeout)
    with pytest.raises(requests.exceptions.ReadTimeout):
        generate(small, ledger(words["abort"][2], 6, seed=62), "critic", 200, timeout=1.5)
    expected_aborts += 1

    # a fork: six branches over one shared prefix, concurrently; 0 and 3 aborted early, 1 and 4 dropped mid-decode
    prefix = ledger(words["abort"][3], 10, seed=63)
    loras = ["planner", "coder", "critic", "planner2", "coder2", None]
    results = {}

    def branch(j):
        text = f"{prefix}\nBranch {j}: the answer is"
        if j in (0, 3):
            rid = uuid.uuid4().hex
            threading.Thread(target=abort_later, args=(rid, 0.2 + 0.3 * j)).start()
            results[j] = generate(small, text, loras[j], 60, rid=rid).json()["meta_info"]["finish_reason"]["type"]
        elif j in (1, 4):
            results[j] = stream(small, text, loras[j], 60, stop_after=3)[1]
        else:
            results[j] = generate(small, text, loras[j], 12).json()["meta_info"]["finish_reason"]["type"]

    threads = [threading.Thread(target=branch, args=(j,)) for j in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results[0] == results[3] == "abort", results
    assert results[1] == results[4] == 3, results
    assert results[2] in ("length", "stop") and results[5] in ("length", "stop"), results
    expected_aborts += 2

    # abort_all over a running batch
    outs = {}

    def long_request(j):
        outs[j] = generate(small, ledger(words["abort"][0], 3, seed=64 + j) + f"\nItem {j}:", loras[j], 200).json()

    threads = [threading.Thread(target=long_request, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    time.sleep(4)
    abort(small, abort_all=True)
    for t in threads:
        t.join(300)
    assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs.values()), outs
    expected_aborts += 1

    deadline = time.time() + 30
    while aborted_total(small) - aborts_before < expected_aborts and time.time() < deadline:
        time.sleep(1)
    assert aborted_total(small) - aborts_before >= expected_aborts
    idle_stats(small)
    assert_healthy(small)


##### 4. Concurrency soak #####


# first word -> adapters with identical weights (None: the base model)
SOAK_FAMILIES = dict(zip(WORDS["soak"], [("planner", "planner2"), ("coder", "coder2"), ("critic",), (None,)]))
SOAK_MAX_NEW = 10


def test_concurrency_soak_matches_sequential_reference(small, reference, words):
    """Four clients, ten forks each (fixed seed): a fork picks a prompt family and one of its three contexts
    (different lengths, partly sharing a prefix) and sends two or three branch questions at once, each on a random
    adapter of the family, with 3..10 new tokens; a branch is a plain request, a stream read to the end, a request
    aborted by /abort_request after a random delay, or a stream dropped after a few chunks. All of it runs on `small`
    (eager mode, pools far smaller than the working set: eviction, chunked prefill, mixed batches).

    The reference is well defined by construction: families start with distinct first tokens, so no two families
    ever share a base entry, and within a family every adapter has the same weights (twins). Who wrote a shared
    entry then does not matter, and every request's output is a function of its prompt and weights alone: the
    sequential output of that prompt on the recompute-mode `reference` server (family's first adapter name, float32,
    greedy). Every completed request must equal it (its prefix, for fewer new tokens); aborted ones that produced
    tokens must be a prefix of it."""
    rng_main = random.Random(2026)
    seeds = [rng_main.randrange(1 << 30) for _ in range(4)]
    records = []  # (family, context, question, max_new, kind, result)
    lock = threading.Lock()

    def branch(family, context, question, lora, max_new, kind, delay):
        text = copy_prompt(family, context, question)
        if kind == "plain":
            result = generate(small, text, lora, max_new).json()
        elif kind == "stream":
            result = stream(small, text, lora, max_new)[0]
        elif kind == "abort":
            rid = uuid.uuid4().hex
            timer = threading.Timer(delay, abort, args=(small, rid))
            timer.start()
            result = generate(small, text, lora, max_new, rid=rid).json()
            timer.join()
        else:  # drop
            result = stream(small, text, lora, max_new, stop_after=1 + int(delay * 2))[0]
        with lock:
            records.append((family, context, question, max_new, kind, result))

    def client(seed):
        rng = random.Random(seed)
        for _ in range(10):
            family = rng.choice(list(SOAK_FAMILIES))
            context = rng.randrange(3)
            questions = rng.sample(range(3), rng.choice([2, 3]))
            threads = []
            for question in questions:
                kind = rng.choices(["plain", "stream", "abort", "drop"], weights=[5, 2, 2, 1])[0]
                args = (family, context, question, rng.choice(SOAK_FAMILIES[family]), rng.randint(3, SOAK_MAX_NEW),
                        kind, rng.uniform(0.0, 1.5))
                threads.append(threading.Thread(target=branch, args=args))
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)

    start = time.time()
    clients = [threading.Thread(target=client, args=(seed,)) for seed in seeds]
    for t in clients:
        t.start()
    for t in clients:
        t.join(600)
    elapsed = time.time() - start
    s = idle_stats(small)

    # the sequential reference, once per distinct prompt
    want = {}
    for family, context, question, *_ in sorted(records, key=lambda r: r[:3]):
        key = (family, context, question)
        if key not in want:
            want[key] = output(reference, copy_prompt(*key), SOAK_FAMILIES[family][0], SOAK_MAX_NEW)["output_ids"]

    kinds = {"completed": 0, "aborted": 0, "dropped": 0}
    wrong = []
    for family, context, question, max_new, kind, result in records:
        ref = want[(family, context, question)]
        got = result["output_ids"] if result is not None else []
        # a dropped stream's last chunk is unfinished (finish_reason None)
        reason = ((result or {}).get("meta_info", {}).get("finish_reason") or {}).get("type", "none")
        if kind == "drop" and reason not in ("length", "stop"):
            kinds["dropped"] += 1
        elif reason == "abort":
            kinds["aborted"] += 1
        else:
            kinds["completed"] += 1
            if reason == "length":
                assert len(got) == max_new, result["meta_info"]
            else:
                assert reason == "stop" and len(ref) == len(got), (result["meta_info"], ref)
        if got != ref[: len(got)]:
            wrong.append((family, context, question, kind, got, ref))
    print(f"soak: {len(records)} requests in {elapsed:.0f} s ({kinds}), {len(want)} distinct prompts, "
          f"residual hits {s['residual_hit_tokens']}")
    assert not wrong, wrong
    assert len(records) == sum(kinds.values()) and kinds["completed"] >= len(records) // 2
    assert kinds["aborted"] > 0 and kinds["dropped"] > 0
    assert_healthy(small)


##### 5. Bad input #####


def _write_adapter(dst, tensors: dict, config: dict):
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return str(dst)


@pytest.fixture(scope="module")
def odd_adapters(model_dir, tmp_path_factory) -> dict:
    """"big": rank 32 (over --max-lora-rank 16); "alien": targets a module this model lacks (c_attn);
    "qv": rank 4 on q_proj and v_proj only (PEFT's default targets); "qv_full": the same adapter on q/k/v/o with zero
    k and o deltas (lora_B = 0), i.e. the same function through the q/k/v/o code path."""
    from safetensors.torch import load_file

    model = json.loads(open(f"{model_dir}/config.json").read())
    kv_rows = model["num_key_value_heads"] * model["hidden_size"] // model["num_attention_heads"]
    root = tmp_path_factory.mktemp("odd")
    out = {"big": str(make_lora_adapter(root / "big", model_dir, rank=32, seed=301))}
    qv = make_lora_adapter(root / "qv", model_dir, rank=4, seed=302, target_modules=("q_proj", "v_proj"), scale=0.25)
    tensors = load_file(str(qv / "adapter_model.safetensors"))
    config = json.loads((qv / "adapter_config.json").read_text())
    out["qv"] = str(qv)
    full = dict(tensors)
    for name, a in tensors.items():
        if "q_proj.lora_A" in name:
            for module in ("k_proj", "o_proj"):
                b = tensors[name.replace("lora_A", "lora_B")]
                a_m = name.replace("q_proj", module)
                full[a_m] = a.clone()
                rows = kv_rows if module == "k_proj" else b.shape[0]  # o_proj's output is q's size
                full[a_m.replace("lora_A", "lora_B")] = b.new_zeros(rows, b.shape[1])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    out["qv_full"] = _write_adapter(root / "qv_full", full, {**config, "target_modules": targets})
    alien = {k.replace("q_proj", "c_attn"): v for k, v in tensors.items() if "q_proj" in k}
    out["alien"] = _write_adapter(root / "alien", alien, {**config, "target_modules": ["c_attn"]})
    return out


def test_mixed_ranks_and_targets_in_one_batch(small, reference, odd_adapters, words):
    """One /generate batch over adapters of ranks 8, 16, 8, 4 (q/v only), 4 (q/k/v/o, zero k/o deltas) and the base
    model: each of the first three equals the reference server's sequential output, and the q/v-only adapter equals
    its q/k/v/o twin (forkkv's residual reads k and v of the stacked x·A by rank: a q/v adapter has no k part)."""
    for name in ("qv", "qv_full"):
        r = load_adapter(small, name, odd_adapters[name])
        assert r.status_code == 200 and r.json()["success"], r.text
    w = words["batch"]
    prompts = [copy_prompt(w[0], 1, 1), copy_prompt(w[1], 1, 2), copy_prompt(w[2], 1, 0), copy_prompt(w[3], 1, 1),
               copy_prompt(w[4], 1, 2), copy_prompt(w[4], 1, 2)]
    loras = ["planner", "coder", "critic", None, "qv", "qv_full"]
    got = generate_batch(small, prompts, loras, 12)
    for prompt, lora, g in list(zip(prompts, loras, got))[:4]:
        assert g == output(reference, prompt, lora, 12)["output_ids"], lora
    assert got[4] == got[5]
    base = output(reference, prompts[4], None, 12)["output_ids"]  # a prompt the reference never saw: exact
    assert got[4] != base, "the q/v adapter changed nothing: the comparison above says nothing"
    for name in ("qv", "qv_full"):
        assert unload_adapter(small, name).json()["success"]
    idle_stats(small)


def test_bad_input_is_refused_clearly(small, odd_adapters, words):
    """Adapters over --max-lora-rank or targeting modules the model lacks are refused at load with SGLang's message;
    empty prompts, prompts over the context length and (forkkv's own limit) adapter prompts over the residual pool
    are refused per request with a 400 naming the reason. Nothing is left allocated and the server serves on."""
    for name, needle in (("big", "rank 32"), ("alien", "target modules")):
        r = load_adapter(small, name, odd_adapters[name])
        assert r.status_code == 400 and needle in r.json()["error_message"], r.text
        r = generate(small, f"{words['bad'][0]} log: hello", name)
        assert r.status_code == 400 and name in r.text, r.text

    r = generate(small, "", "planner")
    assert r.status_code == 400 and "empty" in r.text, r.text
    r = requests.post(small + "/generate", json={"input_ids": [], "lora_path": "coder",
                                                 "sampling_params": {"max_new_tokens": 4}}, timeout=60)
    assert r.status_code == 400 and "empty" in r.text, r.text
    too_long = ledger(words["bad"][1], 70, seed=70)  # ~1500 tokens > the 1200-token pool
    for lora in ("coder", None):
        r = generate(small, too_long, lora)
        assert r.status_code == 400 and "exceeds the maximum allowed length" in r.text, r.text
    capacity = stats(small)["residual_capacity"]
    over_residual = ledger(words["bad"][2], 36, seed=71)  # ~770 tokens: within the context, over the residual pool
    r = generate(small, over_residual, "critic")
    assert r.status_code == 400 and f"residual pool holds ({capacity})" in r.text, r.text
    # the same prompt without an adapter needs no residual slot: served
    assert generate(small, over_residual, None, 2).status_code == 200
    # zero new tokens on an adapter
    assert output(small, f"{words['bad'][3]} log: one, two,", "planner", 0)["meta_info"]["completion_tokens"] == 0
    idle_stats(small)
    assert_healthy(small)


def test_adapters_without_attention_targets(model_dir, tmp_path):
    """A server whose only adapter targets MLP projections (no q/k/v, so SGLang builds no QKV LoRA buffer): forkkv has
    no residual to keep. It used to crash the scheduler on the first adapter request; outputs must equal the model
    with the adapter merged into its weights (transformers, float32, greedy)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mlp = make_lora_adapter(tmp_path / "mlp", model_dir, rank=8, seed=401,
                            target_modules=("gate_proj", "up_proj", "down_proj"))
    prompts = [copy_prompt("Lanterns", 0, 1), copy_prompt("Orders", 0, 2)]
    loras = _loras({"mlp": str(mlp)})
    with running_server(model_dir, "--forkkv", "--max-loras-per-batch", "2", *loras, env=SERVER_ENV) as url:
        got = [output(url, prompts[0], "mlp", 12)["output_ids"], output(url, prompts[1], None, 12)["output_ids"]]
        # both again in one batch, the adapter's prompt now sharing nothing new
        assert generate_batch(url, prompts, ["mlp", None], 12) == got
        assert "Scheduler hit an exception" not in server_log(url)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((mlp / "adapter_config.json").read_text())
    weights = load_file(str(mlp / "adapter_model.safetensors"))
    want = []
    for prompt, merged in zip(prompts, (True, False)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        if merged:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, a in weights.items():
                    if ".lora_A." in name:
                        target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                        b = weights[name.replace("lora_A", "lora_B")]
                        params[target] += config["lora_alpha"] / config["r"] * (b.float() @ a.float())
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        want.append(out[0, ids.shape[1]:].tolist())
    assert got == want
    assert got[0] != want[1]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"page_size": 16}, "--page-size 1 only"),
        ({"enable_hierarchical_cache": True}, "--enable-hierarchical-cache"),
        ({"speculative_algorithm": "EAGLE"}, "--speculative-algorithm"),
        ({"enable_dp_attention": True}, "--enable-dp-attention"),
        ({"radix_cache_backend": "lru"}, "--radix-cache-backend"),
        ({"attention_backend": "flashinfer"}, "--attention-backend"),
        ({"enable_lora": True, "lora_backend": "csgmv"}, "--lora-backend"),
        ({"forkkv_mode": "lazy"}, "--forkkv-mode"),
        ({"forkkv_residual_ratio": 0.0}, "--forkkv-residual-ratio"),
        ({"enable_lmcache": True}, "--enable-lmcache"),
        ({"enable_flexkv": True}, "--enable-flexkv"),
        ({"enable_streaming_session": True}, "--enable-streaming-session"),
        ({"enable_session_radix_cache": True}, "--enable-session-radix-cache"),
        ({"disaggregation_mode": "prefill"}, "--disaggregation-mode"),
        ({"device": "cuda", "attention_backend": "triton"}, "--disable-prefill-cuda-graph"),
        ({"device": "cuda", "disable_prefill_cuda_graph": True}, "decode CUDA graphs with --attention-backend triton"),
        ({"device": "cuda", "attention_backend": "triton", "disable_prefill_cuda_graph": True, "enable_lora": True,
          "lora_backend": "torch_native"}, "decode CUDA graphs with --lora-backend triton"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_refuses_unsupported_options(model_dir, overrides, needle):
    """Each option forkkv does not support stops ServerArgs (launcher and scheduler process alike) with a message
    naming it. The last five were silently dropped before: forkkv builds its own tree in place of SGLang's
    create_tree_cache, which is where they take effect, and disaggregation moves base KV without residuals.
    (--disable-radix-cache and a k_norm model are refused through a real server in test_server.py.)"""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    kwargs = {"model_path": model_dir, "device": "cpu", "forkkv": True, "attention_backend": "torch_native",
              **overrides}
    with pytest.raises(ValueError, match=re.escape(needle)):
        ServerArgs(**kwargs)


@pytest.mark.parametrize("flags", [{"disable_prefill_cuda_graph": True}, {"disable_cuda_graph": True},
                                   {"cuda_graph_backend_prefill": "disabled"}])
def test_accepts_decode_cuda_graphs_on_the_gpu_path(model_dir, flags):
    """Decode CUDA graphs are supported with triton attention and LoRA (prefill graphs off): the checks pass on
    the GPU settings (validated on a copy of a CPU-built ServerArgs with the device switched)."""
    import dataclasses
    from types import SimpleNamespace

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    from sglang_forkkv.config import validate_server_args

    load_plugins()
    built = ServerArgs(model_path=model_dir, device="cpu", forkkv=True, attention_backend="torch_native")
    args = SimpleNamespace(**{f.name: getattr(built, f.name) for f in dataclasses.fields(ServerArgs)})
    args.device, args.attention_backend, args.enable_lora, args.lora_backend = "cuda", "triton", True, "triton"
    args.disable_cuda_graph, args.cuda_graph_config = False, None  # as given on a GPU launch: nothing resolved yet
    for name, value in flags.items():
        setattr(args, name, value)
    validate_server_args(args)
    args.disable_prefill_cuda_graph, args.disable_cuda_graph, args.cuda_graph_backend_prefill = False, False, None
    with pytest.raises(ValueError, match="--disable-prefill-cuda-graph"):
        validate_server_args(args)
